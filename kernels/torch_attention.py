"""Attention with torch ops: the CPU backend's building blocks, and the references that the
Triton kernels and the C decode kernel are tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over ``k, v [B, H_kv, L, D]`` where ``mask [B, 1, Q, L]`` is True.

    Grouped-query heads share K/V without copying them. Soft-capping
    (``softcap * tanh(scores / softcap)``) is applied to the scaled scores before
    masking, as Gemma 2 defines it. Attention sinks (``sinks [H]``, gpt-oss) are one
    learned logit per head that joins every query's softmax denominator but carries no
    value: the weights of the real keys then sum to less than one. Without soft-capping
    or sinks this is SDPA, whose flash kernel never materialises the scores.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads)
    b, _, n_q, d = q.shape
    group = heads // kv_heads
    grouped = q.reshape(b, kv_heads, group * n_q, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv_heads, group, n_q, -1).masked_fill(~mask.unsqueeze(2), float("-inf"))
    sink = None if sinks is None else sinks.view(1, kv_heads, group, 1, 1)
    probs = _softmax_with_sinks(scores, sink).to(v.dtype)
    out = torch.matmul(probs.view(b, kv_heads, group * n_q, -1), v)
    return out.view(b, heads, n_q, v.shape[-1])


def _softmax_with_sinks(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """fp32 softmax over the last dim of ``scores``; ``sink`` (broadcastable to ``scores`` with a
    last dim of 1) joins each row as one more logit whose probability is then dropped."""
    if sink is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    combined = torch.cat([scores.to(torch.float32), sink.to(torch.float32).expand(*scores.shape[:-1], 1)], dim=-1)
    return torch.softmax(combined, dim=-1)[..., :-1]


def decode_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive_mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    k_shared: torch.Tensor | None = None,
    v_shared: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence: ``q [B, H, D]`` over each sequence's keys, optionally starting
    with ``k_shared, v_shared [P, H_kv, D]`` that every sequence shares, followed by its own
    gathered ``k, v [B, L, H_kv, D]``; ``additive_mask [B, P + L]`` holds 0 or -inf;
    ``sinks [H]`` as in ``attend``.

    A shared prefix (requests that share cached KV through the radix tree) is read once
    and multiplied as one GEMM for the whole batch, instead of being gathered per request
    (cascade attention). Shapes chosen by measurement on CPU: batched matmuls reading K in
    place, the value product as one matmul; 2-3x faster than SDPA here.
    """
    batch, heads, _ = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    grouped = q.view(batch, kv_heads, group, -1)
    # Head-major scores: each head's slice is contiguous for the matmul writing into it.
    own_scores = q.new_empty(kv_heads, batch, group, k.shape[1])
    for h in range(kv_heads):
        torch.bmm(grouped[:, h], k[:, :, h].transpose(1, 2), out=own_scores[h])
    scores = own_scores
    if k_shared is not None:
        # Every request's queries against the shared keys: one [B*G, D] x [D, P] GEMM per head.
        rows = grouped.transpose(0, 1).reshape(kv_heads, batch * group, -1)
        shared_scores = torch.bmm(rows, k_shared.permute(1, 2, 0)).view(kv_heads, batch, group, -1)
        scores = torch.cat([shared_scores, own_scores], dim=-1)
    scores *= scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores += additive_mask[None, :, None, :]
    sink = None if sinks is None else sinks.view(kv_heads, 1, group, 1)
    probs = _softmax_with_sinks(scores, sink).to(v.dtype)
    shared = 0 if k_shared is None else k_shared.shape[0]
    out = torch.matmul(probs[..., shared:].transpose(0, 1), v.transpose(1, 2))
    if shared:
        shared_probs = probs[..., :shared].reshape(kv_heads, batch * group, shared)
        shared_out = torch.bmm(shared_probs, v_shared.transpose(0, 1)).view(kv_heads, batch, group, -1)
        out += shared_out.transpose(0, 1)
    return out.reshape(batch, heads, -1)


# ---- references for the kernels (the Triton ones and the C decode kernel) ------------------


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``extend_attention`` computes, request by request in fp32 (rows packed in request order)."""
    out = q.new_empty(q.shape[0], q.shape[1], v_buffer.shape[-1])
    start = 0
    for row, prefix_len, n in zip(req_pool_indices.tolist(), prefix_lens, extend_lens):
        prefix_len, n = int(prefix_len), int(n)
        slots = req_to_token[row, : prefix_len + n]
        k = k_buffer[slots].float().transpose(0, 1)[None]
        v = v_buffer[slots].float().transpose(0, 1)[None]
        qr = q[start : start + n].float().transpose(0, 1)[None]
        delta = torch.arange(prefix_len, prefix_len + n)[:, None] - torch.arange(prefix_len + n)[None, :]
        mask = delta >= 0
        if sliding_window is not None:
            mask &= delta < sliding_window
        mask = mask.to(q.device)[None, None]
        out[start : start + n] = attend(qr, k, v, mask, scaling, softcap, sinks)[0].transpose(0, 1).to(q.dtype)
        start += n
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``decode_attention`` computes: an extend of one token after ``seq_lens - 1`` cached ones."""
    prefix_lens = [n - 1 for n in seq_lens.tolist()]
    return extend_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, prefix_lens, [1] * len(prefix_lens),
        scaling, sliding_window, softcap, sinks,
    )  # fmt: skip
