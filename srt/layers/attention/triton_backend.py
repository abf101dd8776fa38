"""The Triton attention backend: paged attention kernels for CUDA devices.

``prepare`` turns the batch's host-side lengths into the few small tensors the kernels
read, once per forward; every layer's ``forward`` then launches kernels without
reading anything back from the device. A batch where every request has one new token
goes to the split-K decode kernel; any other batch (prompts, prompt chunks, or a mix
with decode requests, which are extends of length 1) goes to the extend kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from srt.kernels import triton_attention, triton_kv_store

if TYPE_CHECKING:
    from srt.model_executor.forward_batch import ForwardBatch


@dataclass
class _Metadata:
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    decode_only: bool
    # decode-only batches
    seq_lens: torch.Tensor | None = None  # [B]
    num_kv_splits: int = 1
    # batches with extends
    prefix_lens: torch.Tensor | None = None  # [B] int32
    extend_lens: torch.Tensor | None = None  # [B] int32
    extend_starts: torch.Tensor | None = None  # [B] int32, row of each request's first new token
    max_extend_len: int = 0


class TritonAttentionBackend:
    def __init__(self, max_kv_splits: int = 8) -> None:
        self.max_kv_splits = max_kv_splits

    def store(self, batch: ForwardBatch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache = batch.kv_cache
        triton_kv_store.store_kv(cache.k_buffers[layer], cache.v_buffers[layer], batch.out_cache_loc, k, v)

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        if batch.is_decode_only:
            max_seq_len = max((p + 1 for p in batch.prefix_lens), default=1)
            batch.attn_metadata = _Metadata(
                req_pool_indices=batch.req_pool_indices,
                decode_only=True,
                seq_lens=batch.seq_lens,
                num_kv_splits=triton_attention.num_kv_splits_for(max_seq_len, self.max_kv_splits),
            )
            return
        starts, row = [], 0
        for n in batch.extend_lens:
            starts.append(row)
            row += n
        # One host-to-device copy for the three per-request tables.
        table = torch.tensor([batch.prefix_lens, batch.extend_lens, starts], dtype=torch.int32, device=device)
        batch.attn_metadata = _Metadata(
            req_pool_indices=batch.req_pool_indices,
            decode_only=False,
            prefix_lens=table[0],
            extend_lens=table[1],
            extend_starts=table[2],
            max_extend_len=max(batch.extend_lens, default=0),
        )

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
        if q.stride(-1) != 1:
            q = q.contiguous()
        if meta.decode_only:
            return triton_attention.decode_attention(
                q, k_buffer, v_buffer, batch.req_to_token, meta.req_pool_indices, meta.seq_lens,
                scaling, sliding_window, softcap, sinks, num_kv_splits=meta.num_kv_splits,
            )  # fmt: skip
        return triton_attention.extend_attention(
            q, k_buffer, v_buffer, batch.req_to_token, meta.req_pool_indices,
            meta.prefix_lens, meta.extend_lens, meta.extend_starts, meta.max_extend_len,
            scaling, sliding_window, softcap, sinks,
        )  # fmt: skip
