"""Batched multi-LoRA in Triton (SGMV, segmented gather matmul): every segment of a batch
applies its own adapter, in two launches whatever the number of adapters and requests.

Same meaning as ``torch_lora.lora_delta_reference`` (read its docstring): tokens
``seg_indptr[g]:seg_indptr[g + 1]`` use slot ``seg_slots[g]`` (-1 for none) and get
``scales[s] * (x @ a[s].T) @ b[s].T`` added to ``y``.

As in punica / SGLang the product is split at the rank, which is small (<= 256) next to the
hidden sizes: a *shrink* launch computes ``h = x @ a[slot].T`` (``[T, R]``, float32) and an
*expand* launch adds ``scale * h @ b[slot].T`` to ``y``; both are the one segmented GEMM
kernel ``out = in @ w[slot].T``, the expand accumulating. Splitting keeps each program's
tiles small (``BLOCK_M`` rows by one block of R or N) and lets the two GEMMs tile the
dimension they are wide in. ``h`` stays float32 so that the only rounding to a half dtype
is the final store of ``y``, as in the reference.

Both grids are ``(segments, row blocks of the longest segment, column blocks)``: a program
whose segment has no adapter, or is shorter than its row block, returns at once. The
longest segment is passed in by the caller, so the launch needs no host synchronisation
and a decode step (every segment one token long) can be replayed by a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_gemm_kernel(
    in_ptr, w_ptr, out_ptr, scales_ptr, seg_indptr_ptr, seg_slots_ptr,
    N, K,
    stride_im, stride_ik, stride_ws, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """``out[rows, n] = in[rows] @ w[slot, n].T`` for this program's rows of a segment and block of
    ``n``; with ``ACCUMULATE``, ``out[rows, n] += scales[slot] * ...`` instead (the expand)."""
    g = tl.program_id(0)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    row0 = tl.load(seg_indptr_ptr + g) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_indptr_ptr + g + 1)
    if (slot < 0) | (row0 >= end):
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = rows < end
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        inputs = tl.load(
            in_ptr + rows[:, None] * stride_im + offs_k[None, :] * stride_ik,
            mask=valid[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(  # w[slot] is [N, K]; loaded transposed as [BLOCK_K, BLOCK_N]
            w_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=(offs_n[None, :] < N) & (offs_k[:, None] < K),
            other=0.0,
        )
        acc += tl.dot(inputs.to(tl.float32), w_t.to(tl.float32), input_precision=DOT_PRECISION)
    out = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = valid[:, None] & (offs_n[None, :] < N)
    if ACCUMULATE:
        # The add is done in float32 so that y is rounded to its dtype once.
        acc = tl.load(out, mask=mask, other=0.0).to(tl.float32) + tl.load(scales_ptr + slot) * acc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sgmv_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    max_seg_len: int,
    *,
    block_m: int = 16,
    block_r: int | None = None,
    block_k: int = 32,
    block_n: int = 64,
) -> None:
    """In place: y[t] += scales[s] * (x[t] @ a[s].T) @ b[s].T for every token t of segment g
    (tokens seg_indptr[g]:seg_indptr[g+1]) whose slot s = seg_slots[g] >= 0; tokens of segments
    with slot -1 are left unchanged.

    ``y`` ``[T, N]``, ``x`` ``[T, K]`` (any strides), ``a`` ``[S, R, K]``, ``b`` ``[S, N, R]``,
    ``scales`` ``[S]`` float32, ``seg_indptr`` ``[G + 1]`` and ``seg_slots`` ``[G]`` int32;
    ``max_seg_len`` is the longest segment, which sizes the grid. ``block_r`` defaults to R
    rounded up to a power of two, between 16 (tl.dot's minimum) and 64.
    """
    tokens, k = x.shape
    _, r, _ = a.shape
    n = y.shape[1]
    num_segments = seg_slots.shape[0]
    assert y.shape[0] == tokens and a.shape[2] == k and b.shape[1:] == (n, r), "shapes disagree"
    assert x.dtype == y.dtype == a.dtype == b.dtype, "x, y, a and b must share a dtype"
    if tokens == 0 or num_segments == 0 or max_seg_len == 0:
        return
    if block_r is None:
        block_r = min(max(16, triton.next_power_of_2(r)), 64)
    h = torch.empty(tokens, r, dtype=torch.float32, device=x.device)  # rows of slot -1 are never read
    row_blocks = triton.cdiv(max_seg_len, block_m)
    half = x.dtype != torch.float32
    _segment_gemm_kernel[(num_segments, row_blocks, triton.cdiv(r, block_r))](
        x, a, h, scales, seg_indptr, seg_slots, r, k,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_r, BLOCK_K=block_k,
        # fp16/bf16 values are exact in tf32, so tensor cores lose nothing; fp32 inputs get full fp32 dots.
        DOT_PRECISION="tf32" if half else "ieee", ACCUMULATE=False,
    )  # fmt: skip
    _segment_gemm_kernel[(num_segments, row_blocks, triton.cdiv(n, block_n))](
        h, b, y, scales, seg_indptr, seg_slots, n, r,
        h.stride(0), h.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_r,
        # h is float32 and not exact in tf32; tf32x3 keeps it near fp32 on tensor cores.
        DOT_PRECISION="tf32x3" if half else "ieee", ACCUMULATE=True,
    )  # fmt: skip
