"""The Triton attention kernels compute what their torch references compute.

They run on CPU tensors under Triton's interpreter. ``triton.jit`` picks the interpreter
when a kernel is *decorated* (it reads ``TRITON_INTERPRET`` from the environment then;
launching does not look again), so the variable is set before the kernel module is
imported, and if an earlier test imported that module without it, the module is
re-executed so its kernels are decorated again. Importing triton itself earlier is harmless.

The interpreter is 10^4-10^5x slower than torch: batches are a handful of requests of
up to ~40 tokens, with blocks of 16 so that several blocks and KV splits are exercised.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from srt.model_executor.forward_batch import ForwardBatch
from srt.kernels import triton_attention as ops
from srt.kernels import triton_kv_store
from srt.layers.attention.torch_backend import TorchAttentionBackend
from srt.layers.attention.triton_backend import TritonAttentionBackend
from srt.mem_cache.memory_pool import KVCache

for module in (ops, triton_kv_store):
    if not isinstance(next(v for k, v in vars(module).items() if k.endswith("_kernel")), InterpretedFunction):
        # Decorated for a GPU by an earlier import; the backend reads kernels through the module, so it follows.
        importlib.reload(module)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (query heads, KV heads, head_dim): MHA, GQA 2 and GQA 4; 80 is not a power of two.
SHAPES = {"mha-d16": (2, 2, 16), "gqa2-d80": (4, 2, 80), "gqa4-d64": (4, 1, 64)}
# (sliding window, soft-cap): windows shorter than most requests; caps small enough to bend the scores.
MASKS = {"full": (None, None), "window8": (8, None), "softcap": (None, 2.0), "window5-softcap": (5, 1.5)}


def assert_within_one_ulp(out: torch.Tensor, expected: torch.Tensor) -> None:
    """``out`` is ``expected`` (computed in fp32) stored in ``out.dtype``: off by under one unit in the last place.

    Round-to-nearest would give half a unit; the interpreter truncates bf16 stores.
    The extra 1e-5 absorbs fp32 summation-order differences.
    """
    finfo = torch.finfo(out.dtype)
    expected = expected.float()
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(finfo.tiny))))
    err = (out.float() - expected).abs()
    worst = (err - ulp).argmax()
    assert (err <= ulp + 1e-5).all(), f"error {err.flatten()[worst]:.3g} > ulp {ulp.flatten()[worst]:.3g}"


@dataclass
class PagedKV:
    """Requests whose K/V sit at scattered slots of a paged cache, reachable through ``req_to_token``."""

    k_buffer: torch.Tensor  # [slots + 1, kv_heads, head_dim], slot 0 zeroed
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # [max_reqs, max_ctx]
    req_pool_indices: torch.Tensor  # [B], not in order
    prefix_lens: list[int]
    extend_lens: list[int]

    @property
    def seq_lens(self) -> torch.Tensor:
        return torch.tensor([p + n for p, n in zip(self.prefix_lens, self.extend_lens)])

    @property
    def extend_starts(self) -> torch.Tensor:
        return torch.tensor([0, *self.extend_lens[:-1]]).cumsum(0)

    def new_token_slots(self) -> torch.Tensor:
        rows = self.req_pool_indices.tolist()
        return torch.cat([self.req_to_token[r, p : p + n] for r, p, n in zip(rows, self.prefix_lens, self.extend_lens)])


def paged_kv(prefix_lens, extend_lens, kv_heads, head_dim, dtype, gen) -> PagedKV:
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    num_slots = sum(seq_lens) + 8  # a few slots nobody reads
    k_buffer = torch.randn(num_slots + 1, kv_heads, head_dim, generator=gen).to(dtype)
    v_buffer = torch.randn(num_slots + 1, kv_heads, head_dim, generator=gen).to(dtype)
    k_buffer[0] = v_buffer[0] = 0
    max_reqs = len(seq_lens) + 3
    req_to_token = torch.zeros(max_reqs, max(seq_lens) + 4, dtype=torch.int64)
    rows = torch.randperm(max_reqs, generator=gen)[: len(seq_lens)]
    slots = (torch.randperm(num_slots, generator=gen) + 1).tolist()
    for row, n in zip(rows.tolist(), seq_lens):
        req_to_token[row, :n] = torch.tensor(slots[:n])
        del slots[:n]
    return PagedKV(k_buffer, v_buffer, req_to_token, rows, list(prefix_lens), list(extend_lens))


def random_lens(gen, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_attention_matches_reference(dtype, shape, mask):
    heads, kv_heads, head_dim = shape
    window, softcap = mask
    gen = torch.Generator().manual_seed(heads * kv_heads + head_dim)
    # Lengths 1..40: with 4 splits of 16-key blocks, short requests leave splits empty.
    seq_lens = [1, 40, *random_lens(gen, 2, 2, 39)]
    kv = paged_kv([n - 1 for n in seq_lens], [1] * len(seq_lens), kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype)
    scaling = head_dim**-0.5

    out = ops.decode_attention(
        q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, scaling, window, softcap,
        num_kv_splits=4, block_n=16,
    )  # fmt: skip
    expected = ops.decode_attention_ref(
        q.float(), kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, scaling, window, softcap
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 5])
def test_decode_result_does_not_depend_on_the_split_count(num_kv_splits):
    gen = torch.Generator().manual_seed(7)
    seq_lens = [3, 37, 18]
    kv = paged_kv([n - 1 for n in seq_lens], [1] * 3, 2, 32, torch.float32, gen)
    q = torch.randn(3, 4, 32, generator=gen)
    args = (q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, 32**-0.5)
    out = ops.decode_attention(*args, num_kv_splits=num_kv_splits, block_n=16)
    torch.testing.assert_close(out, ops.decode_attention_ref(*args), atol=1e-5, rtol=1e-5)


def test_decode_with_more_query_heads_per_kv_head_than_one_program_takes():
    """80 query heads on one KV head: two head blocks of 64, the second one mostly padding."""
    gen = torch.Generator().manual_seed(3)
    seq_lens = [9, 21]
    kv = paged_kv([n - 1 for n in seq_lens], [1, 1], 1, 16, torch.float32, gen)
    q = torch.randn(2, 80, 16, generator=gen)
    args = (q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, 0.25, 6, 3.0)
    torch.testing.assert_close(ops.decode_attention(*args, num_kv_splits=2, block_n=16), ops.decode_attention_ref(*args))


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_extend_attention_matches_reference(dtype, shape, mask):
    heads, kv_heads, head_dim = shape
    window, softcap = mask
    gen = torch.Generator().manual_seed(heads * kv_heads + head_dim)
    # A fresh prompt, a long chunk after a cached prefix, a decode token (a mixed batch), and a random one.
    prefix_lens = [0, 19, 30, *random_lens(gen, 1, 0, 24)]
    extend_lens = [17, 40, 1, *random_lens(gen, 1, 2, 30)]
    kv = paged_kv(prefix_lens, extend_lens, kv_heads, head_dim, dtype, gen)
    q = torch.randn(sum(extend_lens), heads, head_dim, generator=gen).to(dtype)
    scaling = head_dim**-0.5

    out = ops.extend_attention(
        q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices,
        torch.tensor(prefix_lens), torch.tensor(extend_lens), kv.extend_starts, max(extend_lens),
        scaling, window, softcap, block_m=16, block_n=16,
    )  # fmt: skip
    expected = ops.extend_attention_ref(
        q.float(), kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices,
        prefix_lens, extend_lens, scaling, window, softcap,
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("window", [None, 8], ids=["full", "window8"])
def test_kernels_with_attention_sinks_match_reference(window):
    """Sinks join the softmax denominator once: in the extend kernel's online softmax, and in
    the decode kernel's merge of its chunks (some of them empty)."""
    heads, kv_heads, head_dim = SHAPES["gqa2-d80"]
    gen = torch.Generator().manual_seed(11)
    sinks = torch.randn(heads, generator=gen) * 2
    prefix_lens, extend_lens = [0, 19, 30], [17, 23, 1]
    kv = paged_kv(prefix_lens, extend_lens, kv_heads, head_dim, torch.float32, gen)
    q = torch.randn(sum(extend_lens), heads, head_dim, generator=gen)
    out = ops.extend_attention(
        q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices,
        torch.tensor(prefix_lens), torch.tensor(extend_lens), kv.extend_starts, max(extend_lens),
        0.1, window, None, sinks, block_m=16, block_n=16,
    )  # fmt: skip
    expected = ops.extend_attention_ref(
        q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, prefix_lens, extend_lens, 0.1, window, None, sinks
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    seq_lens = [1, 40, 13]
    kv = paged_kv([n - 1 for n in seq_lens], [1] * 3, kv_heads, head_dim, torch.float32, gen)
    q = torch.randn(3, heads, head_dim, generator=gen)
    args = (q, kv.k_buffer, kv.v_buffer, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, 0.1, window, None, sinks)
    torch.testing.assert_close(ops.decode_attention(*args, num_kv_splits=4, block_n=16), ops.decode_attention_ref(*args))


STORES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16,) * 2, "bf16": (torch.bfloat16,) * 2,
          "fp32-into-bf16": (torch.float32, torch.bfloat16), "bf16-into-fp16": (torch.bfloat16, torch.float16)}  # fmt: skip


@pytest.mark.parametrize("src_dtype, cache_dtype", STORES.values(), ids=STORES.keys())
def test_store_kv_writes_new_rows_at_their_slots_and_nothing_else(src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, kv_heads, head_dim = 21, 3, 80  # several token blocks; 3 heads and 80 dims need masking
    k_buffer = torch.randn(64, kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_buffer = torch.randn(64, kv_heads, head_dim, generator=gen).to(cache_dtype)
    loc = torch.randperm(63, generator=gen)[:num_tokens] + 1
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(src_dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(src_dtype)
    k_expected, v_expected = k_buffer.clone(), v_buffer.clone()
    triton_kv_store.store_kv_ref(k_expected, v_expected, loc, k, v)

    triton_kv_store.store_kv(k_buffer, v_buffer, loc, k, v)

    untouched = torch.ones(64, dtype=torch.bool)
    untouched[loc] = False
    assert torch.equal(k_buffer[untouched], k_expected[untouched])
    assert torch.equal(v_buffer[untouched], v_expected[untouched])
    if src_dtype == cache_dtype or cache_dtype == torch.float32:
        assert torch.equal(k_buffer[loc], k_expected[loc]) and torch.equal(v_buffer[loc], v_expected[loc])
    else:  # a narrowing cast: the interpreter may truncate where torch rounds
        assert_within_one_ulp(k_buffer[loc], k.float())
        assert_within_one_ulp(v_buffer[loc], v.float())


BATCHES = {
    "mixed": ([7, 0, 20, 5], [1, 13, 1, 9]),
    "decode-only": ([12, 0, 33], [1, 1, 1]),
    "prefill-only": ([0, 0], [17, 3]),
}


@pytest.mark.parametrize("prefix_lens, extend_lens", BATCHES.values(), ids=BATCHES.keys())
def test_backend_matches_torch_backend(prefix_lens, extend_lens):
    """Three layers (sliding-window, soft-capped, with sinks) over one ForwardBatch, as the model runner drives them."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, num_layers = 4, 2, 48, 3
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    num_tokens = sum(extend_lens)
    cache = KVCache(
        size=sum(seq_lens) + 8, num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    layout = paged_kv(prefix_lens, extend_lens, kv_heads, head_dim, torch.float32, gen)
    new_slots = layout.new_token_slots()
    for layer in range(num_layers):
        for buffer in (cache.k_buffers[layer], cache.v_buffers[layer]):
            buffer[1:] = torch.randn(buffer[1:].shape, generator=gen)  # the cached prefixes
        # This layer's new K/V, stored before attention runs as srt_attention does.
        k, v = (torch.randn(num_tokens, kv_heads, head_dim, generator=gen) for _ in range(2))
        triton_kv_store.store_kv(cache.k_buffers[layer], cache.v_buffers[layer], new_slots, k, v)
    batch = ForwardBatch(
        input_ids=torch.randint(0, 100, (num_tokens,), generator=gen),
        positions=torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, extend_lens)]),
        out_cache_loc=new_slots,
        req_pool_indices=layout.req_pool_indices,
        seq_lens=torch.tensor(seq_lens),
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        req_to_token=layout.req_to_token,
        kv_cache=cache,
    )
    # (scaling, sliding window, soft-cap, sinks)
    layers = [(0.2, 6, None, None), (head_dim**-0.5, None, 3.0, None), (0.3, 5, None, torch.tensor([1.0, -2.0, 3.0, 0.0]))]
    # q as transformers hands it over: [T, H, D], strided over a [H, T, D] tensor.
    queries = [torch.randn(heads, num_tokens, head_dim, generator=gen).transpose(0, 1) for _ in layers]

    def run(backend) -> list[torch.Tensor]:
        backend.prepare(batch)
        return [backend.forward(q, i, batch, *layer) for i, (q, layer) in enumerate(zip(queries, layers))]

    for ours, theirs in zip(run(TritonAttentionBackend()), run(TorchAttentionBackend())):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_kernels_run_when_their_module_was_imported_before_the_interpreter_was_on():
    """Another test file imported the backend without TRITON_INTERPRET: this file still runs its kernels."""
    code = (
        "import sys, pytest, triton, srt.layers.attention.triton_backend\n"
        "from srt.kernels import triton_kv_store\n"
        "assert isinstance(triton_kv_store._store_kv_kernel, triton.runtime.JITFunction)  # compiled for a GPU\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, '-k', 'store_kv']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
