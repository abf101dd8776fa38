"""The torch (CPU) attention backend against plain per-request attention, including the
cascade path where decoding requests share a cached prefix."""

from __future__ import annotations

import pytest
import torch

from srt.forward_batch import ForwardBatch
from srt.kernels.torch_attention import TorchAttentionBackend
from srt.mem_pool import KVCache

HEADS, KV_HEADS, DIM = 4, 2, 16


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, window, softcap, scaling) -> torch.Tensor:
    """One query at position ``pos`` over keys ``[L, H_kv, D]`` at positions 0..L-1, written out plainly."""
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
    return torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("shared_len", [0, 70, 100])
@pytest.mark.parametrize("window,softcap", [(None, None), (30, None), (None, 3.0)])
def test_decode_batch_matches_per_request_attention(shared_len, window, softcap):
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
    backend = TorchAttentionBackend()
    backend.prepare(batch)
    assert batch.attn_metadata.decode.shared_slots.numel() == shared_len
    q = torch.randn(3, HEADS, DIM)
    out = backend.forward(q, 0, batch, DIM**-0.5, window, softcap)
    for r, s in enumerate(seq_lens):
        slots = table[r, :s]
        want = reference(q[r], cache.k_buffers[0][slots], cache.v_buffers[0][slots], s - 1, window, softcap, DIM**-0.5)
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)
