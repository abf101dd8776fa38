"""Logits processors: edits of one batch's logits before sampling, applied in order.

Each processor is built once per step for the whole batch, as tensors with a row per
request, so a batch costs one set of tensor ops whatever mix of settings its requests
asked for; a processor no request needs is not built at all. The built-in ones are the
penalties (HF and OpenAI semantics) and additive edits (``logit_bias``, stop tokens
held back until ``min_new_tokens``). Per-request masks (grammars for structured
output) are processors of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from srt.sampling.sampler import SamplingRequest


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [B, V]`` (float32, a row per request of the batch) after this processor's edit."""


@dataclass
class PenaltiesProcessor:
    """Repetition (HF: divide positive logits, multiply negative ones, for every token seen in
    prompt or output), then frequency and presence (OpenAI: subtract per generated count / once)."""

    repetition: torch.Tensor | None  # [B, 1]
    frequency: torch.Tensor | None  # [B, 1]
    presence: torch.Tensor | None  # [B, 1]
    output_counts: torch.Tensor  # [B, V] counts of generated tokens
    seen: torch.Tensor | None  # [B, V] bool: in the prompt or generated

    @classmethod
    def build(cls, reqs: list[SamplingRequest], vocab_size: int, device: torch.device) -> PenaltiesProcessor | None:
        def column(values: list[float], neutral: float) -> torch.Tensor | None:
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        repetition = column([r.params.repetition_penalty for r in reqs], 1.0)
        frequency = column([r.params.frequency_penalty for r in reqs], 0.0)
        presence = column([r.params.presence_penalty for r in reqs], 0.0)
        if repetition is None and frequency is None and presence is None:
            return None
        output_counts = _token_counts([r.output_ids for r in reqs], vocab_size, device)
        seen = None
        if repetition is not None:
            seen = (output_counts > 0) | (_token_counts([r.prompt_ids for r in reqs], vocab_size, device) > 0)
        return cls(repetition, frequency, presence, output_counts, seen)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.repetition is not None:
            penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, penalized, logits)
        if self.frequency is not None:
            logits = logits - self.frequency * self.output_counts
        if self.presence is not None:
            logits = logits - self.presence * (self.output_counts > 0).float()
        return logits


@dataclass
class AdditiveProcessor:
    """``logit_bias``, and -inf on stop tokens while a request has fewer than ``min_new_tokens``."""

    additive: torch.Tensor  # [B, V]

    @classmethod
    def build(cls, reqs: list[SamplingRequest], vocab_size: int, device: torch.device) -> AdditiveProcessor | None:
        suppress = [r.stop_ids if len(r.output_ids) < r.params.min_new_tokens else [] for r in reqs]
        if not any(r.params.logit_bias for r in reqs) and not any(suppress):
            return None
        additive = torch.zeros(len(reqs), vocab_size, dtype=torch.float32, device=device)
        for i, (r, stops) in enumerate(zip(reqs, suppress)):
            for token, bias in r.params.logit_bias.items():
                additive[i, token] += bias
            if stops:
                additive[i, stops] = float("-inf")
        return cls(additive)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.additive


def build_logits_processors(reqs: list[SamplingRequest], vocab_size: int, device: torch.device) -> list[LogitsProcessor]:
    """The processors this batch needs, in the order they apply."""
    built = (PenaltiesProcessor.build(reqs, vocab_size, device), AdditiveProcessor.build(reqs, vocab_size, device))
    return [p for p in built if p is not None]


def _token_counts(sequences: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(sequences), vocab_size, dtype=torch.float32, device=device)
    rows = [i for i, seq in enumerate(sequences) for _ in seq]
    if rows:
        ids = torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64, device=device)
        counts.index_put_((torch.tensor(rows, device=device), ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts
