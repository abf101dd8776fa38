"""Paged attention in plain torch: the CPU backend and the reference for the Triton kernels.

Per forward, ``prepare`` builds the index tables once for all layers:
- decode requests (one new token each) are attended together: their KV slots are
  gathered into a padded ``[B, L_max]`` table with a validity mask;
- extend requests (prompts or prompt chunks, possibly after a cached prefix) are
  attended one by one, each over its own prefix + new tokens with a causal mask.
Masks for a sliding window are derived on first use and reused by later layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from srt.forward_batch import ForwardBatch


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over ``k, v [B, H_kv, L, D]`` where ``mask [B, 1, Q, L]`` is True.

    Grouped-query heads share K/V without copying them. Soft-capping
    (``softcap * tanh(scores / softcap)``) is applied to the scaled scores before
    masking, as Gemma 2 defines it.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads)
    b, _, n_q, d = q.shape
    group = heads // kv_heads
    grouped = q.reshape(b, kv_heads, group * n_q, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv_heads, group, n_q, -1).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs.view(b, kv_heads, group * n_q, -1), v)
    return out.view(b, heads, n_q, v.shape[-1])


@dataclass
class _Extend:
    """One request with several new tokens: rows ``start:start+n`` of the batch."""

    start: int
    n: int
    slots: torch.Tensor  # [L] KV slots of prefix + new tokens
    key_pos: torch.Tensor  # [L]
    query_pos: torch.Tensor  # [n]
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            delta = self.query_pos[:, None] - self.key_pos[None, :]
            allowed = delta >= 0
            if window is not None:
                allowed &= delta < window
            self.masks[window] = allowed[None, None]
        return self.masks[window]


@dataclass
class _Decode:
    """All requests with one new token, attended as one padded batch."""

    rows: torch.Tensor  # [B] rows of the batch
    slots: torch.Tensor  # [B, L_max], padding points at slot 0
    valid: torch.Tensor  # [B, L_max]
    key_pos: torch.Tensor  # [L_max]
    query_pos: torch.Tensor  # [B]
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            allowed = self.valid
            if window is not None:
                allowed = allowed & (self.query_pos[:, None] - self.key_pos[None, :] < window)
            self.masks[window] = allowed[:, None, None, :]
        return self.masks[window]


@dataclass
class _Metadata:
    extends: list[_Extend]
    decode: _Decode | None


class TorchAttentionBackend:
    def store(self, batch: ForwardBatch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        batch.kv_cache.store(layer, batch.out_cache_loc, k, v)

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        seq_lens = batch.seq_lens.tolist()
        extends, decode_rows, decode_reqs = [], [], []
        start = 0
        for i, (n, seq_len) in enumerate(zip(batch.extend_lens, seq_lens)):
            if n == 1:
                decode_rows.append(start)
                decode_reqs.append(i)
            else:
                row = batch.req_pool_indices[i]
                key_pos = torch.arange(seq_len, device=device)
                extends.append(_Extend(start, n, batch.req_to_token[row, :seq_len], key_pos, key_pos[seq_len - n :]))
            start += n
        decode = None
        if decode_reqs:
            lens = batch.seq_lens[decode_reqs]
            max_len = max(seq_lens[i] for i in decode_reqs)
            key_pos = torch.arange(max_len, device=device)
            valid = key_pos[None, :] < lens[:, None]
            slots = batch.req_to_token[batch.req_pool_indices[decode_reqs], :max_len].masked_fill(~valid, 0)
            rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            decode = _Decode(rows, slots, valid, key_pos, lens - 1)
        batch.attn_metadata = _Metadata(extends, decode)

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        meta: _Metadata = batch.attn_metadata
        k_buffer, v_buffer = batch.kv_cache.k_buffers[layer], batch.kv_cache.v_buffers[layer]
        out = q.new_empty(q.shape[0], q.shape[1], v_buffer.shape[-1])
        for ext in meta.extends:
            k = k_buffer[ext.slots].to(q.dtype).transpose(0, 1)[None]
            v = v_buffer[ext.slots].to(q.dtype).transpose(0, 1)[None]
            qe = q[ext.start : ext.start + ext.n].transpose(0, 1)[None]
            out[ext.start : ext.start + ext.n] = attend(qe, k, v, ext.mask(sliding_window), scaling, softcap)[0].transpose(0, 1)
        if meta.decode is not None:
            dec = meta.decode
            k = k_buffer[dec.slots].to(q.dtype).transpose(1, 2)
            v = v_buffer[dec.slots].to(q.dtype).transpose(1, 2)
            qd = q[dec.rows].unsqueeze(2)
            out[dec.rows] = attend(qd, k, v, dec.mask(sliding_window), scaling, softcap).squeeze(2)
        return out
