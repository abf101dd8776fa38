"""Batched LoRA in torch: every token of a batch gets the delta of its own adapter.

A batch is described by segments: runs of consecutive tokens that use one adapter slot
(``seg_indptr[g]:seg_indptr[g + 1]`` uses slot ``seg_slots[g]``, -1 for none). The delta
of a token ``t`` in a segment with slot ``s`` is ``scales[s] * (x[t] @ a[s].T) @ b[s].T``,
with ``a`` ``[slots, rank, in]`` and ``b`` ``[slots, out, rank]`` (adapters of smaller
rank zero-padded, which adds nothing).

``add_lora_grouped`` is what CPUs run: the tokens of each slot gathered into one GEMM
pair, a handful per layer however many requests share an adapter. ``lora_delta_reference``
is the plain per-segment loop the Triton kernel (``triton_lora``) is tested against.
"""

from __future__ import annotations

import torch

# The tokens of one slot: a slice when they are consecutive, else their row indices.
TokenRows = slice | torch.Tensor


def add_lora_grouped(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: list[float], groups: list[tuple[int, TokenRows]]
) -> None:
    """``y[rows] += scales[slot] * (x[rows] @ a[slot].T) @ b[slot].T`` for each ``(slot, rows)`` of ``groups``."""
    for slot, rows in groups:
        delta = (x[rows] @ a[slot].T) @ b[slot].T
        if scales[slot] != 1.0:
            delta.mul_(scales[slot])
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)


def lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor
) -> torch.Tensor:
    """The delta ``[tokens, out]`` in float32, segment by segment (zero for tokens without an adapter)."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    for g, slot in enumerate(seg_slots.tolist()):
        if slot < 0:
            continue
        start, end = int(seg_indptr[g]), int(seg_indptr[g + 1])
        out[start:end] = float(scales[slot]) * (x[start:end].float() @ a[slot].float().T) @ b[slot].float().T
    return out
