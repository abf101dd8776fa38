"""Fused-MoE expert GEMM in Triton: routed pairs sorted and aligned by expert, then one
grouped GEMM over blocks of ``BLOCK_M`` pairs that all use the same expert's weight.

Same signature and meaning as ``torch_moe.grouped_mm_expert_gemm`` (its reference is
``torch_moe.reference_expert_gemm``): ``out[p] = a[a_rows[p]] @ w[expert_ids[p]].T``, zero
where ``expert_ids[p] == -1`` (an expert another rank holds).

The alignment (as in vLLM / SGLang's ``moe_align_block_size``) is done with torch ops and no
host synchronisation: every expert's pairs start a fresh block and are padded up to a block
boundary with a sentinel pair id; the grid is sized for the worst case (``ceil(P / BLOCK_M)``
+ experts blocks) and blocks past the last expert's return at once, so a decode step can be
replayed by a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    a_rows_ptr,
    w_ptr,
    out_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block past the last expert's pairs
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs  # padding at the end of an expert's group
    rows = tl.load(a_rows_ptr + pairs, mask=valid, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :],
            mask=valid[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=(offs_n[None, :] < N) & (offs_k[:, None] < K),
            other=0.0,
        )
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids sorted by expert, each expert's group padded to whole blocks of ``block_m``
    (padding holds the sentinel ``len(expert_ids)``), and the expert of every block (-1 for
    blocks past the last group). Pairs with expert -1 are left out."""
    num_pairs = expert_ids.shape[0]
    device = expert_ids.device
    key = torch.where(expert_ids >= 0, expert_ids, num_experts)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded_ends = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    padded_starts = padded_ends - (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(counts, 0) - counts
    max_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    local = sorted_key < num_experts
    safe_key = sorted_key.clamp(max=num_experts - 1)
    slot = padded_starts[safe_key] + torch.arange(num_pairs, device=device) - starts[safe_key]
    # Pairs of other ranks' experts all land in one extra slot, dropped below.
    slot = torch.where(local, slot, max_blocks * block_m)
    sorted_pairs = torch.full((max_blocks * block_m + 1,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs[slot] = order
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs[:-1], block_expert


def triton_expert_gemm(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    w: torch.Tensor,
    expert_ids: torch.Tensor,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    num_experts, n, k = w.shape
    num_pairs = expert_ids.shape[0]
    out = torch.zeros(num_pairs, n, dtype=a.dtype, device=a.device)  # rows of other ranks' experts stay zero
    if num_pairs == 0:
        return out
    sorted_pairs, block_expert = align_by_expert(expert_ids, num_experts, block_m)
    a = a.contiguous()
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _expert_gemm_kernel[grid](
        a, a_rows, w, out, sorted_pairs, block_expert, num_pairs, n, k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # fp16/bf16 values are exact in tf32, so tf32 tensor cores lose nothing; fp32 inputs get full fp32 dots.
        DOT_PRECISION="ieee" if torch.float32 in (a.dtype, w.dtype) else "tf32",
    )  # fmt: skip
    return out
