"""Req: one generation request as the scheduler tracks it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from srt.runtime.messages import FinishReason
from srt.sampling.grammar.backend import GrammarMatcher
from srt.sampling.sampling_params import SamplingParams


@dataclass
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: list[int]  # EOS ids (unless ignore_eos) and stop_token_ids
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = True  # an output every step; otherwise one output when the request finishes
    logprob_start_len: int = -1  # >= 0: the prompt's logprobs from this position on are wanted
    arrival: float = field(default_factory=time.monotonic)
    # A pooling request's pooling ("last" or "mean"; None: generation), and for mean pooling
    # the float32 sum of the hidden states of the chunks computed so far.
    pooling: str | None = None
    pooled_sum: Any = None
    # The LoRA adapter the request runs under (None: the base model), and the id of that
    # adapter's load: the prefix-cache namespace its K/V belong to.
    lora_name: str | None = None
    lora_id: int | None = None
    # Images (scheduler/images.py): the prompt's inputs and image-token positions; the prompt as
    # the prefix cache keys it (image tokens replaced by their image's hash); the features while
    # the prompt is computed; M-RoPE positions of the prompt and the offset of those after it.
    multimodal: Any = None
    image_positions: list[int] = field(default_factory=list)
    cache_prompt_ids: list[int] | None = None
    image_features: Any = None
    mrope_positions: Any = None
    mrope_delta: int = 0

    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # The request's place in its grammar (json_schema / regex / ebnf), once compiled. It has
    # accepted every output token, so it stays valid through retraction, which keeps them.
    grammar: GrammarMatcher | None = None

    # KV state: the first ``kv_len`` tokens of ``fill_ids`` have K/V at
    # req_to_token[req_pool_idx, :kv_len]; ``prefix_node`` is the locked radix node.
    req_pool_idx: int | None = None
    kv_len: int = 0
    prefix_node: Any = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    admitted: bool = False
    announced: bool = False  # the detokenizer has had this request's DetokInit
    # What the next output carries: output_ids[sent_len:] and their logprobs.
    sent_len: int = 0
    unsent_logprobs: list[float] = field(default_factory=list)
    unsent_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    # Prompt logprobs, gathered chunk by chunk while the prompt is computed (see ``wants_input_logprobs``).
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    input_logprobs_done: bool = False

    # Per-step scratch set by the scheduler when the request joins a batch.
    extend_len: int = 0
    logit_positions: range = range(0)  # positions whose logits this forward returns

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob_start_len >= 0 and not self.input_logprobs_done

    @property
    def first_logit_position(self) -> int:
        """For prompt logprobs, the first position whose logits are needed (the logits at
        position p give the logprob of token p + 1)."""
        return max(self.logprob_start_len - 1, 0)

    @property
    def reusable_prefix_len(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last, except that a
        request wanting prompt logprobs computes every position whose logits it needs."""
        limit = len(self.fill_ids) - 1
        if self.pooling == "mean":
            return 0  # every token's hidden state is pooled: none may come from the cache
        return min(limit, self.first_logit_position) if self.wants_input_logprobs else limit

    @property
    def cache_key(self) -> list[int]:
        """``fill_ids`` as the prefix cache keys them: an image's tokens by its content, not the placeholder id."""
        return (self.input_ids if self.cache_prompt_ids is None else self.cache_prompt_ids) + self.output_ids

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose K/V the request needs: prompt plus output so far."""
        return self.input_ids + self.output_ids

    @property
    def pending_len(self) -> int:
        """Tokens whose K/V is not computed yet: the prompt (or what a chunk left) before
        prefill, exactly one (the last sampled token) while decoding."""
        return len(self.input_ids) + len(self.output_ids) - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def remaining_new_tokens(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)
