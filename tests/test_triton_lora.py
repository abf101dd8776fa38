"""The Triton SGMV LoRA kernels add what the torch reference computes, and nothing elsewhere.

It runs on CPU tensors under Triton's interpreter, set up as in test_triton_moe.py (the
variable is set before the kernel module is decorated; a module decorated earlier without
it is re-executed). The batch mixes decode segments of one token, segments spanning several
blocks of 16 rows, a segment without an adapter and two segments sharing a slot; ranks,
K and N are not multiples of the blocks, so every mask is exercised.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from srt.kernels import triton_lora
from srt.kernels.torch_lora import lora_delta_reference
from test_triton_attention import assert_within_one_ulp

if not isinstance(triton_lora._segment_gemm_kernel, InterpretedFunction):
    importlib.reload(triton_lora)  # decorated for a GPU by an earlier import; callers read the kernels through the module

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMALL_BLOCKS = {"block_m": 16, "block_r": 16, "block_k": 32, "block_n": 32}

# 40 tokens: slot 0 and slot 1 are each used twice, the third segment has no adapter,
# the 18- and 17-token segments span two row blocks.
SEG_LENS = [1, 18, 3, 1, 17]
SEG_SLOTS = [0, 1, -1, 2, 0]
K, N, SLOTS = 48, 40, 3


def _batch(gen: torch.Generator, dtype: torch.dtype, rank: int, seg_slots: list[int]) -> dict[str, torch.Tensor]:
    tokens = sum(SEG_LENS)
    return {
        "x": torch.randn(tokens, K, generator=gen).to(dtype),
        "a": (torch.randn(SLOTS, rank, K, generator=gen) / K**0.5).to(dtype),
        "b": (torch.randn(SLOTS, N, rank, generator=gen) / rank**0.5).to(dtype),
        "scales": torch.tensor([0.5, 2.0, -1.25], dtype=torch.float32),  # distinct, so a swapped slot shows
        "seg_indptr": torch.tensor([0, *torch.tensor(SEG_LENS).cumsum(0).tolist()], dtype=torch.int32),
        "seg_slots": torch.tensor(seg_slots, dtype=torch.int32),
    }


def _rows_without_adapter(seg_slots: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(seg_slots) < 0, torch.tensor(SEG_LENS))


@pytest.mark.parametrize("rank", [8, 24])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sgmv_matches_reference(dtype: torch.dtype, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    batch = _batch(gen, dtype, rank, SEG_SLOTS)
    y_in = torch.randn(sum(SEG_LENS), N, generator=gen).to(dtype)
    y = y_in.clone()
    triton_lora.sgmv_lora(y, *batch.values(), max(SEG_LENS), **SMALL_BLOCKS)
    assert_within_one_ulp(y, y_in.float() + lora_delta_reference(*batch.values()))
    untouched = _rows_without_adapter(SEG_SLOTS)
    assert torch.equal(y[untouched], y_in[untouched])


def test_sgmv_on_strided_views_with_default_blocks() -> None:
    """x and y are column slices of wider buffers, as for a fused QKV projection; the columns around y stay as they were."""
    gen = torch.Generator().manual_seed(3)
    rank = 24
    batch = _batch(gen, torch.float32, rank, SEG_SLOTS)
    x_wide = torch.randn(sum(SEG_LENS), K + 16, generator=gen)
    x_wide[:, 8 : 8 + K] = batch["x"]
    batch["x"] = x_wide[:, 8 : 8 + K]
    y_wide_in = torch.randn(sum(SEG_LENS), N + 24, generator=gen)
    y_wide = y_wide_in.clone()
    triton_lora.sgmv_lora(y_wide[:, 16 : 16 + N], *batch.values(), max(SEG_LENS))
    assert_within_one_ulp(y_wide[:, 16 : 16 + N], y_wide_in[:, 16 : 16 + N] + lora_delta_reference(*batch.values()))
    assert torch.equal(y_wide[:, :16], y_wide_in[:, :16]) and torch.equal(y_wide[:, 16 + N :], y_wide_in[:, 16 + N :])


def test_sgmv_without_adapters_leaves_y_untouched() -> None:
    gen = torch.Generator().manual_seed(5)
    batch = _batch(gen, torch.bfloat16, 8, [-1] * len(SEG_LENS))
    y_in = torch.randn(sum(SEG_LENS), N, generator=gen).to(torch.bfloat16)
    y = y_in.clone()
    triton_lora.sgmv_lora(y, *batch.values(), max(SEG_LENS), **SMALL_BLOCKS)
    assert torch.equal(y, y_in)
