"""Messages between the processes, one dataclass per kind, grouped by who sends them to whom.

``srt.runtime.codec`` puts them on the wire as msgpack (no pickle). Control requests
carry a ``request_id`` that their reply repeats, so concurrent control calls (one per
data-parallel replica each) never take each other's replies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from srt.runtime.image_inputs import MultimodalInputs, PackedTensor  # noqa: F401 (registered with the codec)
from srt.sampling.sampling_params import SamplingParams

# ---- why a request ended (scheduler → detokenizer → TokenizerManager) ------------------------


@dataclass
class FinishStop:
    """A stop token id (int) or stop string (str) ended the request."""

    matched: int | str

    def to_json(self) -> dict[str, Any]:
        return {"type": "stop", "matched": self.matched}


@dataclass
class FinishLength:
    """``max_new_tokens`` or the context length ended the request after ``length`` tokens."""

    length: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "length", "length": self.length}


@dataclass
class FinishAbort:
    """The request was refused or given up; ``status_code`` is the HTTP status a front answers
    with: 400 when the request itself was at fault, 503 when the server gave it up."""

    message: str
    status_code: int = 503

    def to_json(self) -> dict[str, Any]:
        return {"type": "abort", "message": self.message, "status_code": self.status_code}


FinishReason = FinishStop | FinishLength | FinishAbort


# ---- TokenizerManager → scheduler --------------------------------------------------------------


@dataclass
class TokenizedGenerateReq:
    """A request checked by the TokenizerManager (the only place that validates it)."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = True  # False: the scheduler sends one output, when the request finishes
    logprob_start_len: int = -1  # >= 0: prompt logprobs from this position on (with return_logprob)
    lora_name: str | None = None  # the LoRA adapter to generate with; None: the base model
    multimodal: MultimodalInputs | None = None  # the prompt's images, whose tokens input_ids holds


@dataclass
class TokenizedEmbeddingReq:
    """A pooling request: one forward over the prompt, no generation. ``token_type_ids`` are the
    tokenizer's segment ids of a text pair (BERT-style cross-encoders), when it makes them."""

    rid: str
    input_ids: list[int]
    token_type_ids: list[int] | None = None


@dataclass
class TokenizedBatch:
    """Requests sent together (one API call's prompts), so that the scheduler admits them together."""

    reqs: list[TokenizedGenerateReq | TokenizedEmbeddingReq]


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    request_id: str


@dataclass
class GetInternalStateReq:
    request_id: str


@dataclass
class LoadLoRAAdapterReq:
    request_id: str
    lora_name: str
    lora_path: str


@dataclass
class UnloadLoRAAdapterReq:
    request_id: str
    lora_name: str


# ---- scheduler rank 0 → the other ranks (inside the step's broadcast) --------------------------


@dataclass
class GrammarsReady:
    """These requests' grammars have compiled (or failed to) on rank 0: every rank admits them
    now, so all ranks keep scheduling identically although each compiles on its own."""

    rids: list[str]


# ---- scheduler → TokenizerManager (passed through by the detokenizer) ------------------------


@dataclass
class EmbeddingOutput:
    """A pooling request's result: its embedding (unnormalised, the front applies ``dimensions``
    and normalisation) or its classification logits, float32 bytes; or why it failed."""

    rid: str
    embedding: bytes
    prompt_tokens: int
    cached_tokens: int = 0
    finish_reason: FinishAbort | None = None


@dataclass
class BatchEmbeddingOut:
    outputs: list[EmbeddingOutput]


@dataclass
class FlushCacheReply:
    request_id: str
    success: bool


@dataclass
class LoRAAdapterReply:
    """The end of a load or unload: ``error`` says why it was refused (None: done)."""

    request_id: str
    error: str | None = None


@dataclass
class InternalState:
    free_kv_slots: int
    total_kv_slots: int
    cached_tokens: int
    evictable_tokens: int
    running_requests: int
    waiting_requests: int
    free_request_slots: int
    total_request_slots: int
    num_retractions: int
    cache_hit_rate: float

    @classmethod
    def combine(cls, states: list[InternalState]) -> InternalState:
        """Counts summed over data-parallel replicas; the hit rate averaged."""
        if len(states) == 1:
            return states[0]
        summed = {
            f.name: sum(getattr(s, f.name) for s in states) for f in dataclasses.fields(cls) if f.name != "cache_hit_rate"
        }
        return cls(**summed, cache_hit_rate=sum(s.cache_hit_rate for s in states) / len(states))


@dataclass
class InternalStateReply:
    request_id: str
    state: InternalState


# ---- scheduler → detokenizer -------------------------------------------------------------------


@dataclass
class DetokInit:
    """What the detokenizer needs to know about a request, sent with its first output."""

    rid: str
    prompt_tail: list[int]  # the last prompt tokens, decoding context for the first output token
    stop: list[str]
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    no_stop_trim: bool


@dataclass
class TokenOutput:
    """What one request gained since its last output."""

    rid: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] = field(default_factory=list)  # one per new token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # one list per new token
    # Prompt logprobs (logprob_start_len >= 0), in the request's first output: (logprob, token id)
    # per prompt position from logprob_start_len on (None for position 0, which nothing predicts),
    # and each position's top (token id, logprob) pairs.
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class BatchTokenOut:
    outputs: list[TokenOutput]
    new_requests: list[DetokInit] = field(default_factory=list)  # requests whose first output is in ``outputs``


# ---- detokenizer → TokenizerManager ------------------------------------------------------------


@dataclass
class ReqOutput(TokenOutput):
    """A ``TokenOutput`` with its text: what the fronts read, one per step (or one in all)."""

    text: str = ""  # new text since the last output; empty when the server has no tokenizer


@dataclass
class BatchStrOut:
    outputs: list[ReqOutput]


# ---- a child process → its parent, once, at start-up -----------------------------------------------


@dataclass
class SchedulerInfo:
    """What a scheduler rank reports when it is ready; the TokenizerManager checks requests against it."""

    max_total_tokens: int
    max_req_input_len: int
    context_length: int
    vocab_size: int
    weight_bytes: int
    # What the model serves (srt.model_loader.model_task): "generate", "embed" or "classify",
    # and for a pooling model its output width, pooling, normalisation and score labels.
    task: str = "generate"
    output_dim: int = 0
    pooling: str | None = None
    normalize: bool = False
    matryoshka: bool = False
    labels: list[str] = field(default_factory=list)
    # Why the model takes no images (a text-only model, or image attention srt does not compute);
    # None: it takes them.
    image_refusal: str | None = "the model takes no images"


@dataclass
class ChildReady:
    info: SchedulerInfo | None = None  # None for the detokenizer


@dataclass
class ChildFailed:
    error: str
