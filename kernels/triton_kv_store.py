"""Writing a forward's new K/V into the paged cache, in Triton (``store_kv``), and its torch
reference: rows ``[tokens, kv_heads, head_dim]`` go to their KV slots, cast to the cache dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    K,  # [T, H_kv, D]
    V,
    K_Buffer,  # [slots, H_kv, D]
    V_Buffer,
    Loc,  # [T] destination slots
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbt,
    stride_kbh,
    stride_vbt,
    stride_vbh,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program t: copy tokens [t * BLOCK_T, +BLOCK_T), all heads, into their slots (cast to the cache dtype)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < num_tokens
    slots = tl.load(Loc + offs_t, mask=mask_t, other=0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None, None] & (offs_h < KV_HEADS)[None, :, None] & (offs_d < HEAD_DIM)[None, None, :]

    k = tl.load(K + offs_t[:, None, None] * stride_kt + offs_h[None, :, None] * stride_kh + offs_d[None, None, :], mask=mask)
    v = tl.load(V + offs_t[:, None, None] * stride_vt + offs_h[None, :, None] * stride_vh + offs_d[None, None, :], mask=mask)
    k_dst = K_Buffer + slots[:, None, None] * stride_kbt + offs_h[None, :, None] * stride_kbh + offs_d[None, None, :]
    v_dst = V_Buffer + slots[:, None, None] * stride_vbt + offs_h[None, :, None] * stride_vbh + offs_d[None, None, :]
    tl.store(k_dst, k.to(K_Buffer.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(V_Buffer.dtype.element_ty), mask=mask)


def store_kv(k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``k_buffer[loc] = k`` and ``v_buffer[loc] = v`` for ``k, v [T, H_kv, D]``, cast to the buffers' dtype."""
    num_tokens, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k_buffer.shape[1:] == k.shape[1:] and v_buffer.shape[1:] == v.shape[1:]
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    block_t = max(1, min(16, 4096 // (block_h * block_d)))  # up to 4K elements per program, a power of two
    _store_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        k, v, k_buffer, v_buffer, loc, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip


def store_kv_ref(k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What ``store_kv`` does (and ``KVCache.store``)."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)
