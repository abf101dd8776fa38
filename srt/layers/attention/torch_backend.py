"""The CPU attention backend: paged attention with torch ops, and the C decode kernel where it builds.

Per forward, ``prepare`` builds the index tables once for all layers:
- decode requests (one new token each) are attended together. Where the C kernel
  (``srt.kernels.cpu_kernels``) could be built, it reads their K/V in place through
  ``req_to_token``; otherwise, and when every request starts with one long shared
  prefix (cascade attention does that prefix as one GEMM), their KV slots are
  gathered into a padded ``[B, L_max]`` table with a validity mask;
- extend requests (prompts or prompt chunks, possibly after a cached prefix) are
  attended one by one, each over its own prefix + new tokens with a causal mask.
Masks for a sliding window are derived on first use and reused by later layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from srt.kernels import cpu_kernels
from srt.kernels.torch_attention import attend, decode_attend
from srt.platform.device import in_host_memory

if TYPE_CHECKING:
    from srt.model_executor.forward_batch import ForwardBatch


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
    shared_slots: torch.Tensor  # [P] slots every request starts with (a shared cached prefix)
    own_slots: torch.Tensor  # [B, L_max - P] the rest, padding points at slot 0
    flat_own_slots: torch.Tensor  # own_slots.flatten(): index_select on it is 3-5x faster than advanced indexing
    valid: torch.Tensor  # [B, L_max]
    key_pos: torch.Tensor  # [L_max]
    query_pos: torch.Tensor  # [B]
    masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)
    scratch: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def gather(self, buffer: torch.Tensor, which: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``buffer`` rows of the shared prefix ``[P, H_kv, D]`` (None when there is none) and of
        each request's own slots ``[B, L_max - P, H_kv, D]``.

        The output memory is allocated once per forward and reused by every layer:
        fresh multi-MB tensors per layer cost page faults that measured as much as
        the copy itself.
        """
        key = (which, buffer.dtype, buffer.shape[1:])
        out = self.scratch.get(key)
        if out is None:
            out = self.scratch[key] = buffer.new_empty(self.flat_own_slots.numel(), *buffer.shape[1:])
        torch.index_select(buffer, 0, self.flat_own_slots, out=out)
        shared = buffer.index_select(0, self.shared_slots) if self.shared_slots.numel() else None
        return shared, out.view(*self.own_slots.shape, *buffer.shape[1:])

    def additive_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """``[B, L_max]``: 0 where a key is attended, -inf elsewhere."""
        if (window, dtype) not in self.masks:
            allowed = self.valid
            if window is not None:
                allowed = allowed & (self.query_pos[:, None] - self.key_pos[None, :] < window)
            zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self.masks[(window, dtype)] = zeros.masked_fill(~allowed, float("-inf"))
        return self.masks[(window, dtype)]


# A prefix shared by every decoding request is attended as one GEMM from this length on.
_CASCADE_MIN_SHARED = 64


def _shared_prefix_len(slots: torch.Tensor, valid: torch.Tensor) -> int:
    """How many leading KV slots every row of ``slots`` has in common (0 if fewer than
    ``_CASCADE_MIN_SHARED``, or for a single request)."""
    if slots.shape[0] < 2:
        return 0
    same = ((slots == slots[:1]) & valid).all(dim=0)
    shared = int(same.to(torch.int32).cumprod(0).sum())
    return shared if shared >= _CASCADE_MIN_SHARED else 0


@dataclass
class _KernelDecode:
    """All requests with one new token, for the C kernel, which reads the KV cache in place."""

    rows: torch.Tensor | None  # [B] rows of the batch; None when the batch is all decode requests
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B]


def _starts_with_shared_prefix(table_rows: torch.Tensor, seq_lens: torch.Tensor, req_to_token: torch.Tensor) -> bool:
    """Whether every request's first ``_CASCADE_MIN_SHARED`` KV slots are the same (cheap to ask)."""
    if table_rows.numel() < 2 or int(seq_lens.min()) < _CASCADE_MIN_SHARED:
        return False
    heads = req_to_token[table_rows, :_CASCADE_MIN_SHARED]
    return bool((heads == heads[:1]).all())


@dataclass
class _Metadata:
    extends: list[_Extend]
    decode: _Decode | _KernelDecode | None


class TorchAttentionBackend:
    def __init__(self, use_cpu_kernel: bool = True) -> None:
        self.use_cpu_kernel = use_cpu_kernel

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
        if decode_reqs and self._use_kernel(batch, decode_reqs):
            all_decode = len(decode_reqs) == batch.batch_size
            decode = _KernelDecode(
                None if all_decode else torch.tensor(decode_rows, dtype=torch.int64, device=device),
                batch.req_pool_indices if all_decode else batch.req_pool_indices[decode_reqs],
                batch.seq_lens if all_decode else batch.seq_lens[decode_reqs],
            )
        elif decode_reqs:
            lens = batch.seq_lens[decode_reqs]
            max_len = max(seq_lens[i] for i in decode_reqs)
            key_pos = torch.arange(max_len, device=device)
            valid = key_pos[None, :] < lens[:, None]
            slots = batch.req_to_token[batch.req_pool_indices[decode_reqs], :max_len].masked_fill(~valid, 0)
            shared = _shared_prefix_len(slots, valid)
            rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            own = slots[:, shared:]
            decode = _Decode(rows, slots[0, :shared], own, own.flatten(), valid, key_pos, lens - 1)
        batch.attn_metadata = _Metadata(extends, decode)

    def _use_kernel(self, batch: ForwardBatch, decode_reqs: list[int]) -> bool:
        if not self.use_cpu_kernel or batch.kv_cache.dtype not in cpu_kernels.KV_DTYPES:
            return False
        if not in_host_memory(batch.input_ids.device) or not cpu_kernels.available():
            return False
        table_rows = batch.req_pool_indices[decode_reqs]
        return not _starts_with_shared_prefix(table_rows, batch.seq_lens[decode_reqs], batch.req_to_token)

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta: _Metadata = batch.attn_metadata
        k_buffer, v_buffer = batch.kv_cache.k_buffers[layer], batch.kv_cache.v_buffers[layer]
        if isinstance(meta.decode, _KernelDecode) and meta.decode.rows is None:
            return cpu_kernels.decode_attention(
                q, k_buffer, v_buffer, batch.req_to_token, meta.decode.req_pool_indices, meta.decode.seq_lens,
                scaling, sliding_window, softcap, sinks,
            )  # fmt: skip
        out = q.new_empty(q.shape[0], q.shape[1], v_buffer.shape[-1])
        for ext in meta.extends:
            k = k_buffer.index_select(0, ext.slots).to(q.dtype).transpose(0, 1)[None]
            v = v_buffer.index_select(0, ext.slots).to(q.dtype).transpose(0, 1)[None]
            qe = q[ext.start : ext.start + ext.n].transpose(0, 1)[None]
            out[ext.start : ext.start + ext.n] = attend(qe, k, v, ext.mask(sliding_window), scaling, softcap, sinks)[0].transpose(0, 1)
        if isinstance(meta.decode, _KernelDecode):
            dec = meta.decode
            out[dec.rows] = cpu_kernels.decode_attention(
                q[dec.rows], k_buffer, v_buffer, batch.req_to_token, dec.req_pool_indices, dec.seq_lens,
                scaling, sliding_window, softcap, sinks,
            )  # fmt: skip
        elif meta.decode is not None:
            dec = meta.decode
            k_shared, k = (None if t is None else t.to(q.dtype) for t in dec.gather(k_buffer, "k"))
            v_shared, v = (None if t is None else t.to(q.dtype) for t in dec.gather(v_buffer, "v"))
            mask = dec.additive_mask(sliding_window, q.dtype)
            out[dec.rows] = decode_attend(q[dec.rows], k, v, mask, scaling, softcap, k_shared, v_shared, sinks)
        return out
