"""MoE models run their own router and srt's expert GEMMs, split over ranks as SGLang splits them.

Promised here:

* A model loaded by srt names ``srt`` as its experts implementation, every MoE layer's
  experts really run through it, and the model's logits are transformers' own (float32,
  eager experts) to 1e-4: the router code (softmax or sigmoid, grouped top-k, correction
  bias, shared experts) is the model's, untouched.
* With ``tp`` ranks and ``ep`` expert-parallel groups, each rank holds ``E / ep`` whole
  experts and ``1 / (tp / ep)`` of their intermediate dimension (gate and up rows alike),
  and the ranks' partial outputs sum to the full experts' output: for tp 2 / ep 1, tp 2 /
  ep 2 and tp 4 / ep 2 (both at once).
* A rank reads from a per-expert checkpoint only its own experts' tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.integrations.moe import ExpertsInterface

from srt.kernels.torch_moe import grouped_mm_expert_gemm, reference_expert_gemm
from srt.layers.moe.experts import EXPERTS_IMPLEMENTATION, is_experts_module, shard_experts
from srt.model_loader.loader import load_model
from srt.model_loader.weight_mapping import checkpoint_targets, plan_loads
from srt.platform.distributed import TPGroup
from tiny_models import build_tiny_model, load_reference

MOE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _load(model_dir: str, group: TPGroup = TPGroup(), ep_size: int = 1) -> torch.nn.Module:
    """srt's model for one rank, its attention transformers' eager one (no collective runs while loading)."""
    config = AutoConfig.from_pretrained(model_dir)
    return load_model(model_dir, config, torch.float32, torch.device("cpu"), group, "eager", ep_size=ep_size)


@pytest.mark.parametrize("model_type", MOE_TYPES)
@torch.inference_mode()
def test_moe_layers_run_srt_experts_and_match_transformers(tmp_path: Path, model_type: str, monkeypatch) -> None:
    model_dir = build_tiny_model(model_type, str(tmp_path))
    model = _load(model_dir)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    calls = []
    srt_experts = ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION]
    monkeypatch.setitem(
        ExpertsInterface._global_mapping, EXPERTS_IMPLEMENTATION, lambda m, *a: calls.append(m) or srt_experts(m, *a)
    )
    reference = load_reference(model_dir)
    reference.set_experts_implementation("eager")
    tokens = torch.tensor([[5, 77, 200, 31, 9, 140, 66, 3, 18, 250]])
    got = model(input_ids=tokens).logits
    assert {id(m) for m in calls} == {id(m) for m in model.modules() if is_experts_module(m)}
    torch.testing.assert_close(got, reference(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


def eager_experts_and_inputs(model_dir: str, tokens: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The first MoE layer's experts, running transformers' eager implementation, and random routed tokens."""
    whole = load_reference(model_dir).model.layers[0].mlp.experts
    whole.config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, whole.hidden_dim, generator=gen)
    top_k_index = torch.stack([torch.randperm(whole.num_experts, generator=gen)[:2] for _ in range(tokens)])
    return whole, (hidden, top_k_index, torch.rand(tokens, 2, generator=gen))


def sum_over_ranks(whole: torch.nn.Module, tp: int, ep: int, kernel: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Every rank's partial output, as the all-reduce would sum them, each rank's experts
    split from ``whole`` by their own ``weight_loader``."""
    total = torch.zeros_like(inputs[0])
    for rank in range(tp):
        part = copy.deepcopy(whole)
        part.config = copy.copy(whole.config)
        part.config._experts_implementation = EXPERTS_IMPLEMENTATION
        shard_experts(part, torch.float32, torch.device("cpu"), TPGroup(rank=rank, size=tp), ep, kernel)
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(part, name)
            param.weight_loader(param, getattr(whole, name).detach())
        part.srt_shard = dataclasses.replace(part.srt_shard, tp_group=TPGroup())  # the sum is taken here instead
        total += part(*inputs)
    return total


@pytest.mark.parametrize("tp_ep", [(2, 1), (2, 2), (4, 2)], ids=["tp2", "tp2-ep2", "tp4-ep2"])
@torch.inference_mode()
def test_rank_outputs_sum_to_the_whole_experts_output(tmp_path: Path, tp_ep: tuple[int, int]) -> None:
    whole, inputs = eager_experts_and_inputs(build_tiny_model("olmoe", str(tmp_path)), tokens=9)
    got = sum_over_ranks(whole, *tp_ep, "grouped_mm", inputs)
    torch.testing.assert_close(got, whole(*inputs), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_an_expert_parallel_rank_reads_only_its_experts(tmp_path: Path) -> None:
    model_dir = build_tiny_model("mixtral", str(tmp_path))
    reference = load_reference(model_dir)
    model = _load(model_dir, TPGroup(rank=1, size=2), ep_size=2)
    experts = model.model.layers[0].mlp.experts
    torch.testing.assert_close(experts.gate_up_proj, reference.model.layers[0].mlp.experts.gate_up_proj[2:])
    torch.testing.assert_close(experts.down_proj, reference.model.layers[0].mlp.experts.down_proj[2:])
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    plan = plan_loads(model, keys, checkpoint_targets(model), lambda key: lambda: None)
    sources = {key for c in plan.converted.values() for ks in c.layer_targets.values() for key in ks}
    read = {key for key in sources if ".experts." in key}
    assert read and all(".experts.2." in key or ".experts.3." in key for key in read), sorted(read)
    assert not any(".experts." in key for key in plan.unexpected)  # skipped, not reported as unknown


def test_grouped_mm_gemm_is_the_definition_and_zero_for_other_ranks_experts() -> None:
    gen = torch.Generator().manual_seed(1)
    a, w = torch.randn(5, 24, generator=gen), torch.randn(3, 40, 24, generator=gen)
    expert_ids = torch.tensor([2, -1, 0, 0, 1, -1, 2, 2, 0, -1])
    a_rows = torch.arange(10) // 2
    got = grouped_mm_expert_gemm(a, a_rows, w, expert_ids)
    torch.testing.assert_close(got, reference_expert_gemm(a, a_rows, w, expert_ids))
    assert not got[expert_ids < 0].any()
