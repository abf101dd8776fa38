"""Paged attention in Triton. The plain-torch references the kernels are tested against live in
``torch_attention`` (the C decode kernel shares them) and are re-exported here.

Every kernel reads request ``b``'s K/V through its row of ``req_to_token``: position
``p`` of the request lives in KV slot ``req_to_token[req_pool_indices[b], p]`` of the
per-layer buffers ``[slots, kv_heads, head_dim]``.

- ``decode_attention``: one new token per request, flash-decoding style. Stage 1 cuts
  each request's keys into ``num_kv_splits`` chunks and computes, for all query heads
  that share one KV head, a partial softmax per chunk (normalised output + log-sum-exp);
  stage 2 merges the chunks of each (request, head).
- ``extend_attention``: any number of new tokens per request (a prompt, a prompt chunk
  after a cached prefix, or a decode token in a mixed batch). The new K/V are already in
  the cache, so one loop over key positions covers the prefix and the causal part.

Scores are ``scaling * q.k``, soft-capped to ``softcap * tanh(score / softcap)`` when asked,
then masked: key ``j`` is seen by query ``i`` iff ``j <= i`` and ``i - j < sliding_window``.
Query head ``h`` reads KV head ``h // (heads / kv_heads)``. Attention sinks (``sinks [H]``,
gpt-oss) add one value-less logit per head to the softmax denominator: the extend kernel
starts its online softmax from it, the decode kernel adds it once when merging chunks. Inputs may be fp16, bf16 or
fp32: tiles are cast to fp32 right after loading (the CPU interpreter gets bf16
arithmetic wrong, and fp32 is what the references compute in) and results are cast to
the output dtype when stored. Head dims need not be powers of two: ``BLOCK_D`` is the
next power of two and the extra lanes are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srt.kernels.torch_attention import attend, decode_attention_ref, extend_attention_ref  # noqa: F401 (the kernels' references)

# "No sliding window" as a window wider than any context: keeps the masks branch-free.
_NO_WINDOW = 1 << 30


@triton.jit
def _tanh(x):
    # tl has no tanh that runs both compiled and interpreted; tanh(x) = 2 sigmoid(2x) - 1.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _scores_block(
    q, slots_row, positions, mask_n, K_Buffer, V_Buffer, kv_head, offs_d, mask_d,
    stride_kt, stride_kh, stride_vt, stride_vh, scaling, softcap,
    USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Load one block of keys/values through the request's slot row; scaled (and
    soft-capped) scores of ``q`` against them. Masking is the caller's."""
    slots = tl.load(slots_row + positions, mask=mask_n, other=0)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K_Buffer + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_Buffer + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION) * scaling
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    return v, s


# --------------------------------------------------------------------------- decode


@triton.jit
def _decode_partial_kernel(
    Q,  # [B, H, D]
    K_Buffer,  # [slots, H_kv, D]
    V_Buffer,
    Req_to_token,  # [max_reqs, max_ctx]
    Req_pool_indices,  # [B]
    Seq_lens,  # [B]
    Mid_O,  # [B, H, NUM_SPLITS, D] fp32
    Mid_Lse,  # [B, H, NUM_SPLITS] fp32
    scaling, softcap, window,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_req,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_BLOCKS: tl.constexpr,  # cdiv(GROUP, BLOCK_H)
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (b, kv_head * HEAD_BLOCKS + head_block, split): partial softmax of BLOCK_H query heads over one chunk."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    offs_g = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)  # index within the group
    split = tl.program_id(2)
    mask_h = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # The new token (position seq_len - 1) sees keys [first, seq_len); chunk `split` of them,
    # in whole blocks, is [start, end) (empty for the last chunks of short requests).
    seq_len = tl.load(Seq_lens + b)
    slots_row = Req_to_token + tl.load(Req_pool_indices + b) * stride_req
    first = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        v, s = _scores_block(
            q, slots_row, offs_n, mask_n, K_Buffer, V_Buffer, kv_head, offs_d, mask_d,
            stride_kt, stride_kh, stride_vt, stride_vh, scaling, softcap, USE_SOFTCAP, DOT_PRECISION,
        )
        s = tl.where(mask_n[None, :], s, float("-inf"))

        # Online softmax; every block holds at least one key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # An empty chunk leaves l_i = 0: it stores output 0 with weight exp(-inf) = 0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    o_ptrs = Mid_O + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=mask_h[:, None] & mask_d[None, :])
    tl.store(Mid_Lse + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    Mid_O,
    Mid_Lse,
    Out,  # [B, H, D]
    Sinks,  # [H], read only with USE_SINKS
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """Program (b, h): weight each chunk's output by its share exp(lse - logsumexp(lse)) of the
    denominator, which also holds the head's sink logit."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(Mid_Lse + b * stride_mlb + h * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    if USE_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
        m = tl.maximum(m, sink)
    weights = tl.exp(lse - m)
    denominator = tl.sum(weights, 0)
    if USE_SINKS:
        denominator += tl.exp(sink - m)
    o_ptrs = Mid_O + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(weights[:, None] * o, 0) / denominator
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def decode_attention(
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
    *,
    num_kv_splits: int = 8,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each request's one new token ``q [B, H, D]`` over its ``seq_lens[b]`` cached tokens.

    ``num_kv_splits`` chunks per request run in parallel (more for few long requests);
    pick it from host-side lengths (see ``num_kv_splits_for``), never by reading
    ``seq_lens`` back from the device.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    _check_shapes(q, k_buffer, v_buffer)
    group = heads // kv_heads
    block_h = min(max(16, triton.next_power_of_2(group)), 64)  # tl.dot wants >= 16 rows
    head_blocks = triton.cdiv(group, block_h)
    block_d = triton.next_power_of_2(head_dim)
    mid_o = torch.empty((batch, heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, heads, num_kv_splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = q.new_empty(batch, heads, head_dim)
    if batch == 0:
        return out

    _decode_partial_kernel[(batch, kv_heads * head_blocks, num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        scaling, softcap or 0.0, _window(sliding_window),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, HEAD_DIM=head_dim, NUM_SPLITS=num_kv_splits,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_SOFTCAP=bool(softcap), DOT_PRECISION=_dot_precision(q, k_buffer, v_buffer),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    _decode_merge_kernel[(batch, heads)](
        mid_o, mid_lse, out, q if sinks is None else sinks,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_kv_splits,
        BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=block_d, USE_SINKS=sinks is not None,
        num_warps=4,
    )  # fmt: skip
    return out


def num_kv_splits_for(max_seq_len: int, max_splits: int = 8, min_split_len: int = 256) -> int:
    """Chunks per request for decode: one per ``min_split_len`` keys of the longest request, at most ``max_splits``."""
    return max(1, min(max_splits, triton.cdiv(max_seq_len, min_split_len)))


# --------------------------------------------------------------------------- extend


@triton.jit
def _extend_kernel(
    Q,  # [T, H, D], requests packed one after another
    K_Buffer,
    V_Buffer,
    Out,  # [T, H, D]
    Req_to_token,
    Req_pool_indices,  # [B]
    Prefix_lens,  # [B] tokens already cached before this forward
    Extend_lens,  # [B] new tokens
    Extend_starts,  # [B] row of each request's first new token in Q
    Sinks,  # [H], read only with USE_SINKS
    scaling, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_req,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (b, h, block_m): new tokens [block_m * BLOCK_M, +BLOCK_M) of request b, one head, flash-attention style."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    row0 = tl.program_id(2) * BLOCK_M  # first new token of this block

    prefix_len = tl.load(Prefix_lens + b)
    extend_len = tl.load(Extend_lens + b)
    q_start = tl.load(Extend_starts + b)
    slots_row = Req_to_token + tl.load(Req_pool_indices + b) * stride_req

    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < extend_len
    q_pos = prefix_len + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # Keys [lo, hi): from the first key the block's first query sees up to its last query.
    # Blocks past the request's end (the grid is sized for the longest) get an empty range.
    hi = prefix_len + tl.minimum(row0 + BLOCK_M, extend_len)
    lo = tl.maximum(prefix_len + row0 - window + 1, 0)
    lo = tl.where(row0 < extend_len, lo, hi)

    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:  # the sink is the softmax's first logit, exp(sink - sink) = 1, with a zero value
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + head).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for block_start in range(lo, hi, BLOCK_N):
        k_pos = block_start + tl.arange(0, BLOCK_N)
        mask_n = k_pos < hi
        v, s = _scores_block(
            q, slots_row, k_pos, mask_n, K_Buffer, V_Buffer, kv_head, offs_d, mask_d,
            stride_kt, stride_kh, stride_vt, stride_vh, scaling, softcap, USE_SOFTCAP, DOT_PRECISION,
        )
        delta = q_pos[:, None] - k_pos[None, :]
        s = tl.where(mask_n[None, :] & (delta >= 0) & (delta < window), s, float("-inf"))

        # Online softmax. A row can see nothing in this block (its window starts later),
        # so shift by 0 instead of -inf there to keep exp() NaN-free.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # Every real query sees at least itself; l_i = 0 only on padding rows, never stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    max_extend_len: int,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the packed new tokens ``q [T, H, D]`` over each request's prefix and, causally, themselves.

    Request ``b`` owns rows ``extend_starts[b] : extend_starts[b] + extend_lens[b]`` of
    ``q``; its K/V (prefix and new) are already at ``req_to_token`` positions
    ``0 : prefix_lens[b] + extend_lens[b]``. ``max_extend_len`` (a host int) sizes the grid.
    """
    num_tokens, heads, head_dim = q.shape
    _check_shapes(q, k_buffer, v_buffer)
    block_d = triton.next_power_of_2(head_dim)
    default_block = 64 if block_d <= 128 else 32
    block_m = block_m or default_block
    block_n = block_n or default_block
    if out is None:
        out = q.new_empty(num_tokens, heads, head_dim)
    batch = extend_lens.shape[0]
    if batch == 0 or num_tokens == 0:
        return out

    _extend_kernel[(batch, heads, triton.cdiv(max_extend_len, block_m))](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_starts,
        q if sinks is None else sinks, scaling, softcap or 0.0, _window(sliding_window),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        GROUP=heads // k_buffer.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_SOFTCAP=bool(softcap), USE_SINKS=sinks is not None, DOT_PRECISION=_dot_precision(q, k_buffer, v_buffer),
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- helpers


def _window(sliding_window: int | None) -> int:
    return sliding_window if sliding_window is not None and sliding_window > 0 else _NO_WINDOW


def _dot_precision(*tensors: torch.Tensor) -> str:
    # fp16/bf16 values are exact in tf32, so tf32 tensor cores lose nothing on q.k; fp32 inputs get full fp32 dots.
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _check_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_buffer.shape[1]
    assert heads % kv_heads == 0, f"{heads} query heads cannot share {kv_heads} KV heads"
    assert k_buffer.shape[2] == head_dim and v_buffer.shape[2] == head_dim, "K and V head dims must equal q's"
    assert q.stride(-1) == 1 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1, "head_dim must be contiguous"
