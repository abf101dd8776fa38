"""The experts implementation that transformers MoE models call, and the sharding of their 3-D weights.

transformers v5 experts modules (classes decorated with ``use_experts_implementation``)
hold all experts of a layer in two fused parameters, ``gate_up_proj [E, 2I, H]`` (the gate
rows of every expert, then its up rows) and ``down_proj [E, H, I]``, and look their
forward up by ``config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS``, as attention
is looked up. ``srt`` is registered there: the model's own router (softmax or sigmoid,
grouped top-k, correction bias) and shared experts still run and hand us ``top_k_index``
and ``top_k_weights``; only the expert GEMMs are ours.

Parallelism, with SGLang's layout: the TP group's ranks form ``ep_size`` expert groups of
``tp_size / ep_size`` consecutive ranks. Group ``g`` holds experts ``[g E/ep, (g+1) E/ep)``
whole, and each rank of a group holds one slice of their intermediate dimension: its part
of the gate rows and of the up rows, and the matching columns of ``down_proj``. Every
(expert, slice) lives on exactly one rank, a token routed elsewhere contributes zero here,
so one all-reduce over the TP group after the down projection sums the partial outputs
into the full one. Shared experts are plain linears split by the model's TP plan, whose
row-parallel down projection reduces their own output: nothing is counted twice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from srt.kernels.torch_moe import grouped_mm_expert_gemm
from srt.kernels.triton_moe import triton_expert_gemm
from srt.layers.weight_shards import loadable_param, read_shard, shape_of
from srt.platform.distributed import TPGroup

# What a model config's ``_experts_implementation`` names to route its experts here.
EXPERTS_IMPLEMENTATION = "srt"

# (a [M, K], a_rows [P], w [E, N, K], expert_ids [P], -1 = held elsewhere) -> [P, N]; see srt.kernels.torch_moe.
ExpertGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_GEMMS: dict[str, ExpertGemm] = {"grouped_mm": grouped_mm_expert_gemm, "triton": triton_expert_gemm}


@dataclass(frozen=True)
class ExpertShard:
    """The part of one experts module that this rank holds, and how it computes."""

    num_experts: int
    first_expert: int
    num_local_experts: int
    slice_index: int  # of the intermediate dimension, within the expert group
    num_slices: int
    gemm: ExpertGemm
    tp_group: TPGroup

    @classmethod
    def of_rank(cls, num_experts: int, intermediate: int, tp_group: TPGroup, ep_size: int, kernel: str) -> ExpertShard:
        if tp_group.size % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide tp_size={tp_group.size}")
        if num_experts % ep_size:
            raise ValueError(f"the model's {num_experts} experts per layer do not split over ep_size={ep_size} ranks")
        num_slices = tp_group.size // ep_size
        if intermediate % num_slices:
            raise ValueError(
                f"the experts' intermediate size {intermediate} does not split into tp_size / ep_size = {num_slices} slices"
            )
        local = num_experts // ep_size
        return cls(
            num_experts=num_experts,
            first_expert=tp_group.rank // num_slices * local,
            num_local_experts=local,
            slice_index=tp_group.rank % num_slices,
            num_slices=num_slices,
            gemm=EXPERT_GEMMS[kernel],
            tp_group=tp_group,
        )

    @property
    def local_experts(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local_experts)


def is_experts_module(module: nn.Module) -> bool:
    """A module of a class decorated with transformers' ``use_experts_implementation``."""
    return all(hasattr(module, flag) for flag in ("has_gate", "is_concatenated", "is_transposed", "_is_expert_parallel"))


def shard_experts(
    module: nn.Module, dtype: torch.dtype, device: torch.device, tp_group: TPGroup, ep_size: int, kernel: str
) -> None:
    """Give ``module`` this rank's part of its expert weights (uninitialised, each with a
    ``weight_loader`` that cuts that part out of the checkpoint tensor) and route it here.

    A layout srt's experts do not implement runs transformers' own eager experts instead,
    whole, which is exact on one rank; split over several it is refused."""
    unsupported = _unsupported_layout(module)
    if unsupported:
        if tp_group.size > 1:
            raise NotImplementedError(
                f"{type(module).__name__} has {unsupported}, which srt's experts implementation does not split "
                "over ranks yet: use --tp 1"
            )
        module.config = copy.copy(module.config)  # only this module's dispatch changes
        module.config._experts_implementation = "eager"
        return
    num_experts, _, hidden = module.gate_up_proj.shape
    intermediate = module.down_proj.shape[2]
    shard = ExpertShard.of_rank(num_experts, intermediate, tp_group, ep_size, kernel)
    local_i = intermediate // shard.num_slices
    module.gate_up_proj = _expert_param(
        shard, (num_experts, 2 * intermediate, hidden), (shard.num_local_experts, 2 * local_i, hidden), 1, 2, dtype, device
    )
    module.down_proj = _expert_param(
        shard, (num_experts, hidden, intermediate), (shard.num_local_experts, hidden, local_i), 2, 1, dtype, device
    )
    module.srt_shard = shard


def _unsupported_layout(module: nn.Module) -> str:
    """What of the module's expert layout srt's implementation lacks ("" when nothing)."""
    missing = [
        what
        for unsupported, what in (
            (module.is_transposed, "transposed expert weights ([E, H, 2I])"),
            (not module.is_concatenated, "interleaved gate/up rows"),
            (getattr(module, "has_bias", False), "expert biases"),
            (not module.has_gate, "ungated experts (up_proj only)"),
            (getattr(module, "has_post_expert_norm", False), "a norm after each expert"),
        )
        if unsupported
    ]
    if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
        missing.append("no fused gate_up_proj")
    return ", ".join(missing)


def _expert_param(
    shard: ExpertShard,
    full: tuple[int, int, int],
    local: tuple[int, int, int],
    split_dim: int,
    packed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Parameter:
    def load(param: nn.Parameter, loaded: Any) -> None:
        got = shape_of(loaded)
        if got[0] == shard.num_experts:  # every expert: a fused checkpoint tensor, or all experts' tensors merged
            loaded = loaded[shard.first_expert : shard.first_expert + shard.num_local_experts]
        elif got[0] != shard.num_local_experts:  # else only this rank's experts were read (weight_mapping)
            raise ValueError(f"has shape {got}, the model's is {list(full)}")
        part = read_shard(loaded, split_dim, packed, shard.slice_index, shard.num_slices)
        if list(part.shape) != list(local):  # copy_ would broadcast a wrong layout silently
            raise ValueError(f"has shape {got}, the model's is {list(full)}")
        param.data.copy_(part)

    param = loadable_param(local, dtype, device, load)
    # weight_mapping reads only these experts' tensors when a checkpoint stores one per expert.
    param.local_experts = shard.local_experts
    return param


@torch.compiler.disable  # routing decides the shapes: under --enable-torch-compile the experts run eagerly
def srt_experts(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: tokens ``[T, H]``, their experts and weights ``[T, k]`` → ``[T, H]``."""
    shard: ExpertShard | None = getattr(module, "srt_shard", None)
    if shard is None:
        raise RuntimeError(
            f"{type(module).__name__} was not prepared by srt's loader (shard_experts), so the srt experts cannot run it"
        )
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1) - shard.first_expert
    if shard.num_local_experts < shard.num_experts:
        held = (expert_ids >= 0) & (expert_ids < shard.num_local_experts)
        expert_ids = torch.where(held, expert_ids, -1)
    pairs = torch.arange(num_tokens * top_k, device=hidden_states.device)
    gate_up = shard.gemm(hidden_states, pairs // top_k, module.gate_up_proj, expert_ids)
    # The model's own gating (act(gate) * up by default), on this rank's [gate slice; up slice].
    inner = module._apply_gate(gate_up)
    out = shard.gemm(inner, pairs, module.down_proj, expert_ids)
    out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
    # Summed over top-k as transformers' batched and grouped implementations do (not index_add_: deterministic).
    out = out.view(num_tokens, top_k, -1).sum(dim=1)
    return shard.tp_group.all_reduce(out)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, srt_experts)
