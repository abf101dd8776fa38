"""What the model's TP plan becomes on one rank of several, without starting the ranks.

* Attention and dense MLP projections named by the plan are split; so are the fused 3-D
  weights of an MoE experts module: with ``ep_size`` 1 every rank holds its slice of each
  expert's intermediate dimension (gate and up rows alike); with ``ep_size`` = tp size it
  holds its share of the experts whole. Either way a rank holds half the expert bytes of 2.
* A bare parameter the plan splits next to split projections (attention sinks, one value
  per head) is split with them, so each rank keeps the sinks of its own heads.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.layers.moe.experts import is_experts_module
from srt.model_loader.config import model_shape
from srt.model_loader.tp_plan import apply_tp_plan
from srt.platform.distributed import TPGroup
from tiny_models import _COMMON, CONVERTED_ARCHITECTURES

RANK_0_OF_2 = TPGroup(rank=0, size=2)  # no collective runs while the plan is applied


def _planned_model(model_type: str, group: TPGroup = RANK_0_OF_2, ep_size: int = 1, **overrides: object) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**_COMMON, **CONVERTED_ARCHITECTURES.get(model_type, {}), **overrides})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_tp_plan(model, torch.float32, torch.device("cpu"), model_shape(config, group.size), group, ep_size)
    return model


def _expert_bytes(model: torch.nn.Module) -> int:
    return sum(
        p.numel() * p.element_size() for m in model.modules() if is_experts_module(m) for p in m.parameters()
    )


def test_moe_experts_are_split_on_their_intermediate_dimension() -> None:
    layer = _planned_model("mixtral").model.layers[0]
    assert isinstance(layer.self_attn.q_proj, ColumnParallelLinear)
    assert isinstance(layer.self_attn.o_proj, RowParallelLinear)
    assert layer.self_attn.q_proj.weight.shape == (32, 64)
    experts = layer.mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 16, 64)  # this rank's half of the gate rows and of the up rows
    assert experts.down_proj.shape == (4, 64, 16)


def test_expert_parallel_ranks_hold_whole_experts_and_half_the_bytes() -> None:
    whole = _expert_bytes(_planned_model("olmoe", group=TPGroup()))
    for rank in (0, 1):
        model = _planned_model("olmoe", group=TPGroup(rank=rank, size=2), ep_size=2)
        experts = model.model.layers[0].mlp.experts
        assert experts.gate_up_proj.shape == (6, 2 * 32, 64) and experts.down_proj.shape == (6, 64, 32)
        assert experts.srt_shard.local_experts == range(6 * rank, 6 * rank + 6)
        assert _expert_bytes(model) == whole // 2
    assert _expert_bytes(_planned_model("olmoe")) == whole // 2  # tp 2 without EP: half of every expert


def test_shared_experts_are_split_like_a_dense_mlp() -> None:
    mlp = _planned_model("deepseek_v3").model.layers[1].mlp
    assert isinstance(mlp.shared_experts.gate_proj, ColumnParallelLinear)
    assert isinstance(mlp.shared_experts.down_proj, RowParallelLinear)
    assert mlp.experts.gate_up_proj.shape == (4, 2 * 16, 64)


@pytest.mark.parametrize(
    ("tp", "ep", "overrides", "refusal"),
    [
        (2, 3, {}, r"ep_size=3 does not divide tp_size=2"),
        (4, 4, {"num_experts": 6}, r"the model's 6 experts per layer do not split over ep_size=4 ranks"),
        (4, 1, {"intermediate_size": 30}, r"intermediate size 30 does not split into tp_size / ep_size = 4 slices"),
    ],
    ids=["ep-not-dividing-tp", "experts-not-dividing-ep", "intermediate-not-dividing"],
)
def test_unsplittable_experts_are_refused(tp: int, ep: int, overrides: dict, refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        _planned_model("olmoe", group=TPGroup(rank=0, size=tp), ep_size=ep, **overrides)


def test_attention_sinks_are_split_with_the_heads() -> None:
    attention = _planned_model("granite_swa").model.layers[0].self_attn
    assert isinstance(attention.q_proj, ColumnParallelLinear) and attention.q_proj.weight.shape == (32, 64)
    assert attention.sinks.shape == (2,)  # 4 heads, 2 on this rank
    shard = torch.nn.Parameter(torch.empty(2), requires_grad=False)  # the model's is still on the meta device
    attention.sinks.weight_loader(shard, torch.arange(4.0))
    assert shard.tolist() == [0.0, 1.0]


def test_an_expert_layout_srt_lacks_runs_transformers_eager_experts_on_one_rank_and_is_refused_on_two() -> None:
    experts = _planned_model("gpt_oss", group=TPGroup(rank=0, size=1)).model.layers[0].mlp.experts  # expert biases
    assert experts.config._experts_implementation == "eager" and not hasattr(experts.gate_up_proj, "weight_loader")
    with pytest.raises(NotImplementedError, match=r"GptOssExperts has .*expert biases.*use --tp 1"):
        _planned_model("gpt_oss")
