"""The adapter slots of one parallel linear, and the delta they add to its output.

Each slot holds one adapter's A and B for this layer, cut the way the layer itself is
cut over the tensor-parallel ranks, so that the delta needs no communication of its own:

- column-parallel (output rows split): A whole, B's rows split like the weight's (fused
  projections block by block, K/V projections replicated like theirs);
- row-parallel (input columns split): A's columns split like the weight's, B whole. Each
  rank's ``(x_rank A_rank^T) B^T`` is a partial sum, added before the layer's all-reduce,
  which then sums the deltas as it sums the GEMM (the bias still comes once, after it).

Ranks below the slots' ``max_rank`` are zero-padded, which adds exactly nothing. The
slots are laid out for the kernel that reads them: ``a`` ``[slots, rank, in]`` always
(equally ``[slots * rank, in]``), ``b`` ``[slots, out, rank]`` for Triton and ``[out,
slots * rank]`` for torch (srt.kernels.torch_lora).
"""

from __future__ import annotations

import torch

from srt.kernels.torch_lora import add_lora_grouped, add_lora_stacked
from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.layers.weight_shards import read_shard
from srt.lora.batch import LoRAState


class LinearLoRA:
    def __init__(
        self, layer: ColumnParallelLinear | RowParallelLinear, state: LoRAState, num_slots: int, max_rank: int, kernel: str
    ) -> None:
        self.layer, self.state, self.kernel = layer, state, kernel
        weight = layer.weight
        if isinstance(layer, ColumnParallelLinear):
            local_in, local_out = layer.in_features, layer.out_features // layer.num_shards
        else:
            local_in, local_out = layer.in_features // layer.tp_group.size, layer.out_features
        self.rank = max_rank
        self.a = torch.zeros(num_slots, max_rank, local_in, dtype=weight.dtype, device=weight.device)
        b_shape = (num_slots, local_out, max_rank) if kernel == "triton" else (local_out, num_slots * max_rank)
        self.b = torch.zeros(b_shape, dtype=weight.dtype, device=weight.device)
        self.occupied = [False] * num_slots  # whether the slot's adapter adapts this layer

    def load(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put this rank's part of an adapter's full ``a`` [rank, in] and ``b`` [out, rank] in ``slot``."""
        layer, rank = self.layer, a.shape[0]
        if isinstance(layer, ColumnParallelLinear):
            b = read_shard(b, 0, layer.packed, layer.shard_index, layer.num_shards)
        else:
            a = read_shard(a, 1, layer.packed, layer.tp_group.rank, layer.tp_group.size)
        self.clear(slot)
        self.a[slot, :rank].copy_(a)
        self._b_of(slot)[:, :rank].copy_(b)
        self.occupied[slot] = True

    def clear(self, slot: int) -> None:
        """The slot's adapter leaves this layer alone."""
        self.occupied[slot] = False
        self.a[slot].zero_()
        self._b_of(slot).zero_()

    def _b_of(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s B ``[out, rank]`` (a view)."""
        return self.b[slot] if self.kernel == "triton" else self.b[:, slot * self.rank : (slot + 1) * self.rank]

    def add(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """Add each token's adapter delta to the layer's local output ``y`` (in place); ``x`` is the
        input the layer's GEMM read."""
        batch = self.state.batch
        if batch is None or not any(self.occupied[slot] for slot, _ in batch.groups):
            return  # no adapter in this batch adapts this layer
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if self.kernel == "triton":
            from srt.kernels.triton_lora import sgmv_lora  # Triton only where a GPU runs it

            sgmv_lora(y2, x2, self.a, self.b, self.state.scales_tensor, batch.seg_indptr, batch.seg_slots, batch.max_seg_len)
        elif batch.token_scales is not None:
            columns = batch.active_slots * self.rank
            add_lora_stacked(y2, x2, self.a.view(-1, self.a.shape[-1])[:columns], self.b[:, :columns], batch.token_scales)
        else:
            groups = [(slot, rows) for slot, rows in batch.groups if self.occupied[slot]]
            add_lora_grouped(y2, x2, self.a.view(-1, self.a.shape[-1]), self.b, self.rank, self.state.scales, groups)
