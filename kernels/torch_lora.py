"""Batched LoRA in torch: every token of a batch gets the delta of its own adapter.

A batch is described by segments: runs of consecutive tokens that use one adapter slot
(``seg_indptr[g]:seg_indptr[g + 1]`` uses slot ``seg_slots[g]``, -1 for none). The delta
of a token ``t`` in a segment with slot ``s`` is ``scales[s] * (x[t] @ A_s.T) @ B_s.T``,
A_s ``[rank, in]`` and B_s ``[out, rank]`` (adapters of smaller rank zero-padded, which
adds nothing).

CPUs run one of two forms, both on the slots stacked along the rank: ``a`` ``[slots * rank,
in]`` and ``b`` ``[out, slots * rank]``, so that slot ``s`` is rows / columns
``s * rank : (s + 1) * rank``:

- ``add_lora_stacked``: three ops per layer whatever the adapters, for small batches
  (decode), where per-op cost dominates: every token goes through every active slot's A
  and the products of slots not its own are zeroed (exactly: ``x * 0 + y == y``) by the
  same multiply that applies its scale;
- ``add_lora_grouped``: a GEMM pair per slot on that slot's tokens only, for large
  batches (prefill), where the stacked form's extra FLOPs would dominate.

``lora_delta_reference`` is the plain per-segment loop, in the Triton kernel's layout (``a``
``[slots, rank, in]``, ``b`` ``[slots, out, rank]``), that both are tested against.
"""

from __future__ import annotations

import torch

# The tokens of one slot: a slice when they are consecutive, else their row indices.
TokenRows = slice | torch.Tensor


def add_lora_stacked(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_scales: torch.Tensor) -> None:
    """``y += ((x @ a.T) * token_scales) @ b.T``; ``token_scales`` ``[tokens, active slots * rank]`` holds
    each token's scale in its slot's columns and zero elsewhere (``a`` / ``b`` cut to the active slots)."""
    h = x @ a.T
    h.mul_(token_scales)
    y.addmm_(h, b.T)


def add_lora_grouped(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, scales: list[float], groups: list[tuple[int, TokenRows]]
) -> None:
    """``y[rows] += scales[slot] * (x[rows] @ A_slot.T) @ B_slot.T`` for each ``(slot, rows)`` of ``groups``."""
    for slot, rows in groups:
        cols = slice(slot * rank, (slot + 1) * rank)
        delta = (x[rows] @ a[cols].T) @ b[:, cols].T
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

