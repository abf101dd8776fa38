"""The Triton fused-MoE expert GEMM computes what its torch reference computes.

It runs on CPU tensors under Triton's interpreter, set up as in test_triton_attention.py
(the variable is set before the kernel module is decorated; a module decorated earlier
without it is re-executed). Sizes are a handful of tokens with blocks of 16 pairs, so
that experts span several blocks, some blocks are padding and some experts get nothing.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from srt.kernels import triton_moe
from srt.kernels.torch_moe import reference_expert_gemm
from test_moe import eager_experts_and_inputs, sum_over_ranks
from test_triton_attention import assert_within_one_ulp
from tiny_models import build_tiny_model

if not isinstance(triton_moe._expert_gemm_kernel, InterpretedFunction):
    importlib.reload(triton_moe)  # decorated for a GPU by an earlier import; callers read the kernel through the module

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _routing(gen: torch.Generator, pairs: int, experts: int, held_elsewhere: float) -> torch.Tensor:
    ids = torch.randint(0, experts, (pairs,), generator=gen)
    return torch.where(torch.rand(pairs, generator=gen) < held_elsewhere, -1, ids)


def test_pairs_are_grouped_by_expert_in_whole_blocks() -> None:
    expert_ids = torch.tensor([2, -1, 0, 2, 0, 0, -1, 2])
    sorted_pairs, block_expert = triton_moe.align_by_expert(expert_ids, num_experts=4, block_m=2)
    assert block_expert.tolist() == [0, 0, 2, 2, -1, -1, -1, -1]  # expert 1 and 3 have no pairs; worst case 4 + 4 blocks
    sentinel = len(expert_ids)
    assert sorted_pairs[:8].tolist() == [2, 4, 5, sentinel, 0, 3, 7, sentinel]
    assert (sorted_pairs[8:] == sentinel).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("held_elsewhere", [0.0, 0.4], ids=["all-local", "expert-parallel"])
def test_expert_gemm_matches_reference(dtype: torch.dtype, held_elsewhere: float) -> None:
    gen = torch.Generator().manual_seed(7)
    tokens, top_k, experts, n, k = 11, 2, 3, 40, 48  # n and k are not multiples of the blocks
    a = torch.randn(tokens, k, generator=gen).to(dtype)
    w = (torch.randn(experts, n, k, generator=gen) / k**0.5).to(dtype)
    expert_ids = _routing(gen, tokens * top_k, experts, held_elsewhere)
    a_rows = torch.arange(tokens * top_k) // top_k
    out = triton_moe.triton_expert_gemm(a, a_rows, w, expert_ids, block_m=16, block_n=32, block_k=16)
    expected = reference_expert_gemm(a.float(), a_rows, w.float(), expert_ids)
    assert_within_one_ulp(out, expected)
    assert not out[expert_ids < 0].any()


@torch.inference_mode()
def test_srt_experts_on_the_triton_kernel_match_transformers_over_two_expert_parallel_ranks(tmp_path) -> None:
    whole, inputs = eager_experts_and_inputs(build_tiny_model("mixtral", str(tmp_path)), tokens=5)
    torch.testing.assert_close(sum_over_ranks(whole, 2, 2, "triton", inputs), whole(*inputs), rtol=1e-5, atol=1e-5)
