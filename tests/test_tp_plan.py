"""What the model's TP plan becomes on one rank of several, without starting the ranks.

* Attention and dense MLP projections named by the plan are split; the fused 3-D weights
  of an MoE experts module (``moe_tp_experts``) are kept whole on every rank, which is
  exact: the experts get the full hidden states and return full outputs.
* A bare parameter the plan splits next to split projections (attention sinks, one value
  per head) is split with them, so each rank keeps the sinks of its own heads.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.model_loader.config import model_shape
from srt.model_loader.tp_plan import apply_tp_plan
from srt.platform.distributed import TPGroup
from tiny_models import _COMMON, CONVERTED_ARCHITECTURES

RANK_0_OF_2 = TPGroup(rank=0, size=2)  # no collective runs while the plan is applied


def _rank0_model(model_type: str, **overrides: object) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**_COMMON, **CONVERTED_ARCHITECTURES.get(model_type, {}), **overrides})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_tp_plan(model, torch.float32, torch.device("cpu"), model_shape(config, 2), RANK_0_OF_2)
    return model


def test_moe_experts_stay_whole_while_attention_is_split() -> None:
    layer = _rank0_model("mixtral").model.layers[0]
    assert isinstance(layer.self_attn.q_proj, ColumnParallelLinear)
    assert isinstance(layer.self_attn.o_proj, RowParallelLinear)
    assert layer.self_attn.q_proj.weight.shape == (32, 64)
    experts = layer.mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 32, 64)
    assert experts.down_proj.shape == (4, 64, 32)


def test_shared_experts_are_split_like_a_dense_mlp() -> None:
    mlp = _rank0_model("deepseek_v3").model.layers[1].mlp
    assert isinstance(mlp.shared_experts.gate_proj, ColumnParallelLinear)
    assert isinstance(mlp.shared_experts.down_proj, RowParallelLinear)
    assert mlp.experts.gate_up_proj.shape == (4, 2 * 32, 64)


def test_attention_sinks_are_split_with_the_heads() -> None:
    attention = _rank0_model("granite_swa").model.layers[0].self_attn
    assert isinstance(attention.q_proj, ColumnParallelLinear) and attention.q_proj.weight.shape == (32, 64)
    assert attention.sinks.shape == (2,)  # 4 heads, 2 on this rank
    shard = torch.nn.Parameter(torch.empty(2), requires_grad=False)  # the model's is still on the meta device
    attention.sinks.weight_loader(shard, torch.arange(4.0))
    assert shard.tolist() == [0.0, 1.0]
