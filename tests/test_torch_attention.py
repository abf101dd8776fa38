"""The CPU attention backend against plain per-request attention: the C decode kernel that
reads the KV cache in place, the torch gather path, and the cascade path where decoding
requests share a cached prefix."""

from __future__ import annotations

import pytest
import torch

from srt.model_executor.forward_batch import ForwardBatch
from srt.kernels import cpu_kernels
from srt.kernels.torch_attention import decode_attention_ref
from srt.layers.attention.torch_backend import TorchAttentionBackend, _KernelDecode
from srt.mem_cache.memory_pool import KVCache

HEADS, KV_HEADS, DIM = 4, 2, 16
# Attention sinks (one logit per head), large enough to take a visible share of the softmax.
SINKS = torch.tensor([2.0, -1.0, 0.5, 4.0])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, window, softcap, scaling, sinks=None) -> torch.Tensor:
    """One query at position ``pos`` over keys ``[L, H_kv, D]`` at positions 0..L-1, written out plainly;
    ``sinks [H]`` join each head's softmax as value-less logits."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(k.shape[0])
    allowed = key_pos <= pos
    if window is not None:
        allowed &= pos - key_pos < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        return torch.einsum("hl,lhd->hd", torch.softmax(torch.cat([scores, sinks[:, None]], -1), -1)[:, :-1], v)
    return torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v)


def decode_batch(shared_len: int) -> tuple[ForwardBatch, list[int]]:
    """Three decoding requests whose keys start with ``shared_len`` shared KV slots."""
    torch.manual_seed(0)
    cache = KVCache(600, 1, KV_HEADS, DIM, DIM, torch.float32, torch.device("cpu"))
    cache.k_buffers[0][1:] = torch.randn(600, KV_HEADS, DIM)
    cache.v_buffers[0][1:] = torch.randn(600, KV_HEADS, DIM)
    own_lens = [5, 40, 17]
    table = torch.zeros(4, 256, dtype=torch.int64)
    shared = torch.arange(1, shared_len + 1)
    next_slot = shared_len + 1
    for row, n in enumerate(own_lens):
        own = torch.arange(next_slot, next_slot + n)
        next_slot += n
        table[row, : shared_len + n] = torch.cat([shared, own])
    seq_lens = [shared_len + n for n in own_lens]
    batch = ForwardBatch(
        input_ids=torch.zeros(3, dtype=torch.int64),
        positions=torch.tensor(seq_lens) - 1,
        out_cache_loc=torch.tensor([table[r, s - 1] for r, s in enumerate(seq_lens)]),
        req_pool_indices=torch.arange(3),
        seq_lens=torch.tensor(seq_lens),
        prefix_lens=[s - 1 for s in seq_lens],
        extend_lens=[1, 1, 1],
        req_to_token=table,
        kv_cache=cache,
    )
    return batch, seq_lens


def assert_matches_reference(
    backend: TorchAttentionBackend, batch: ForwardBatch, seq_lens: list[int], window, softcap, sinks=None
) -> None:
    q = torch.randn(3, HEADS, DIM)
    out = backend.forward(q, 0, batch, DIM**-0.5, window, softcap, sinks)
    k_buffer, v_buffer = batch.kv_cache.k_buffers[0], batch.kv_cache.v_buffers[0]
    for r, s in enumerate(seq_lens):
        slots = batch.req_to_token[r, :s]
        want = reference(q[r], k_buffer[slots], v_buffer[slots], s - 1, window, softcap, DIM**-0.5, sinks)
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cpu_kernel", [True, False])
@pytest.mark.parametrize("shared_len", [0, 70, 100])
@pytest.mark.parametrize("window,softcap,sinks", [(None, None, None), (30, None, None), (None, 3.0, None), (30, None, SINKS)])
def test_decode_batch_matches_per_request_attention(use_cpu_kernel, shared_len, window, softcap, sinks):
    batch, seq_lens = decode_batch(shared_len)
    backend = TorchAttentionBackend(use_cpu_kernel)
    backend.prepare(batch)
    if use_cpu_kernel and not shared_len:
        assert isinstance(batch.attn_metadata.decode, _KernelDecode)
    else:  # without the kernel, or with a shared prefix that cascade attention does as one GEMM
        assert batch.attn_metadata.decode.shared_slots.numel() == shared_len
    assert_matches_reference(backend, batch, seq_lens, window, softcap, sinks)


def test_without_a_compiler_the_backend_gathers(monkeypatch, tmp_path):
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path))  # no cached build to fall back on
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available()
        batch, seq_lens = decode_batch(0)
        backend = TorchAttentionBackend()
        backend.prepare(batch)
        assert not isinstance(batch.attn_metadata.decode, _KernelDecode)
        assert_matches_reference(backend, batch, seq_lens, None, None)
    finally:
        cpu_kernels._library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("window,softcap,with_sinks", [(None, None, False), (50, None, False), (None, 4.0, False), (50, None, True)])
def test_cpu_kernel_matches_reference_on_scattered_slots(dtype, heads, kv_heads, window, softcap, with_sinks):
    """Ragged lengths (one longer than many spans, one of a single key), slots in no
    particular order, rows of req_to_token out of order, head dims not a power of two."""
    torch.manual_seed(1)
    dim, v_dim, lens = 24, 40, [1, 7, 300, 129, 64]
    slots_total = sum(lens) + 1
    k_buffer = torch.randn(slots_total, kv_heads, dim).to(dtype)
    v_buffer = torch.randn(slots_total, kv_heads, v_dim).to(dtype)
    shuffled = torch.randperm(slots_total - 1) + 1
    table = torch.zeros(8, 320, dtype=torch.int64)
    rows = torch.tensor([5, 0, 7, 2, 3])
    used = 0
    for row, n in zip(rows.tolist(), lens):
        table[row, :n] = shuffled[used : used + n]
        used += n
    q = torch.randn(len(lens), heads, dim).to(dtype)
    sinks = torch.randn(heads) * 2 if with_sinks else None
    out = cpu_kernels.decode_attention(q, k_buffer, v_buffer, table, rows, torch.tensor(lens), 0.2, window, softcap, sinks)
    assert out.dtype == dtype and out.shape == (len(lens), heads, v_dim)
    want = decode_attention_ref(
        q.float(), k_buffer.float(), v_buffer.float(), table, rows, torch.tensor(lens), 0.2, window, softcap, sinks
    )
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=tolerance)


def test_attention_with_sinks_is_gpt_oss_eager_attention():
    """The reference's sinks mean what transformers' gpt-oss eager attention means by them."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from srt.kernels.torch_attention import attend

    torch.manual_seed(2)
    q, k, v = torch.randn(1, HEADS, 9, DIM), torch.randn(1, KV_HEADS, 9, DIM), torch.randn(1, KV_HEADS, 9, DIM)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    module = SimpleNamespace(sinks=SINKS, num_key_value_groups=HEADS // KV_HEADS, training=False)
    additive = torch.zeros(9, 9).masked_fill(~causal, float("-inf"))[None, None]
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3)
    got = attend(q, k, v, causal[None, None], 0.3, sinks=SINKS)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
