"""Batched sampling: one set of tensor ops per step for the whole batch, whatever mix of settings.

Randomness is a function of (request seed, output position, token id) through a
counter-based hash, so a seeded request draws the same tokens whatever batch it
shares, and a request that is retracted and recomputed reproduces its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from srt.sampling.grammar.backend import apply_bitmask
from srt.sampling.grammar.mask_filler import BatchBitmask
from srt.sampling.logits_processor import LogitsProcessor, build_logits_processors
from srt.sampling.sampling_params import SamplingParams


@dataclass
class SamplingRequest:
    """What the sampler needs to know about one request in the batch."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    seed: int
    stop_ids: list[int]  # EOS + stop_token_ids, suppressed until min_new_tokens


@dataclass
class SamplingBatch:
    temperatures: torch.Tensor  # [B, 1]; greedy rows hold 1 to avoid dividing by zero
    greedy: torch.Tensor  # [B] bool
    top_ps: torch.Tensor | None
    top_ks: torch.Tensor | None
    min_ps: torch.Tensor | None
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: output position being sampled
    processors: list[LogitsProcessor]  # applied in order before sampling
    grammar_mask: BatchBitmask | None = None  # applied last: the grammar has the final word

    @classmethod
    def build(
        cls, reqs: list[SamplingRequest], vocab_size: int, device: torch.device, grammar_mask: BatchBitmask | None = None
    ) -> SamplingBatch:
        params = [r.params for r in reqs]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.is_greedy for p in params]
        top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        return cls(
            temperatures=column([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32)[:, None],
            greedy=column(greedy, torch.bool),
            top_ps=column([p.top_p for p in params], torch.float32) if any(p.top_p < 1 for p in params) else None,
            top_ks=column(top_ks, torch.int64) if any(k < vocab_size for k in top_ks) else None,
            min_ps=column([p.min_p for p in params], torch.float32) if any(p.min_p > 0 for p in params) else None,
            seeds=column([r.seed for r in reqs], torch.int64),
            steps=column([len(r.output_ids) for r in reqs], torch.int64),
            processors=build_logits_processors(reqs, vocab_size, device),
            grammar_mask=grammar_mask,
        )


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    for processor in batch.processors:
        logits = processor(logits)
    if batch.grammar_mask is not None:
        if not batch.processors:
            logits = logits.clone()  # the masking is in place, and the caller's logits give the model's logprobs
        apply_bitmask(logits, batch.grammar_mask.bitmask, batch.grammar_mask.rows)
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Next token per row of ``logits [B, V]`` (float32)."""
    logits = apply_logits_processors(logits, batch)
    greedy_ids = logits.argmax(dim=-1)
    if bool(batch.greedy.all()):
        return greedy_ids
    probs = torch.softmax(logits / batch.temperatures, dim=-1)
    probs = _filter(probs, batch)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p exactly.
    noise = -torch.log(_uniform(batch.seeds, batch.steps, probs.shape[-1]))
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_ids, sampled)


def _filter(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero out tokens outside top-k, the top-p nucleus, or below min_p x the top probability."""
    if batch.min_ps is not None:
        threshold = probs.max(dim=-1, keepdim=True).values * batch.min_ps[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    if batch.top_ks is None and batch.top_ps is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
    if batch.top_ks is not None:
        ranks = torch.arange(probs.shape[-1], device=probs.device)
        drop |= ranks[None, :] >= batch.top_ks[:, None]
    if batch.top_ps is not None:
        # Keep a token while the mass before it is below top_p (the top token always stays): the
        # smallest nucleus reaching top_p. Rows with top_p = 1 keep everything, whatever float
        # rounding in the cumulative sum says, so a row samples the same in any batch.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        outside = mass_before >= batch.top_ps[:, None] * sorted_probs.sum(dim=-1, keepdim=True)
        drop |= outside & (batch.top_ps < 1)[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


_MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def _uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) draws of shape ``[B, V]`` determined by (seed, step, token)."""
    row = _mix(_mix(seeds) ^ _mix(steps + 0x9E3779B9))
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix(row[:, None] * 0x01000193 + tokens[None, :])
    return (bits.to(torch.float64) + 0.5) / 2**32


@dataclass
class TokenLogprobs:
    chosen: list[float]
    top: list[list[tuple[int, float]]]  # per row, (token, logprob), empty where not asked


def token_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, top_n: list[int]) -> TokenLogprobs:
    """Log-probabilities of the chosen tokens under the model's distribution (before sampling
    adjustments), plus each row's ``top_n`` most likely tokens."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, next_ids[:, None]).squeeze(-1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in top_n]
    k = min(max(top_n, default=0), logits.shape[-1])  # asking for more than the vocabulary gives all of it
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
        for i, n in enumerate(top_n):
            top[i] = list(zip(ids[i][: max(n, 0)], values[i][: max(n, 0)]))
    return TokenLogprobs(chosen, top)
