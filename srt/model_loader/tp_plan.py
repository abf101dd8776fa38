"""Tensor parallelism from the model's own TP plan: its linears and embeddings swapped for parallel twins."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.layers.moe.experts import is_experts_module, shard_experts
from srt.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from srt.layers.weight_shards import loadable_param, read_shard
from srt.model_loader.config import ModelShape
from srt.platform.device import experts_kernel
from srt.platform.distributed import TPGroup

logger = logging.getLogger(__name__)

# Plan styles of modules that srt keeps whole on every rank, because whole they compute
# exactly what their sharded twins compute: the module gets the full activations (the
# residual stream is never split) and returns full ones, so nothing downstream can tell.
# Most only matter for training gradients; ``moe_identity_expert`` only undoes the sum of
# a split experts module's outputs. (``moe_tp_experts`` is not among them: srt splits every
# experts module itself, srt.layers.moe, whatever the plan says.)
REPLICATED_EXACTLY = frozenset(
    {
        "replicate",
        "replicated_with_grad_allreduce",
        "mla_kv_a_proj",
        "sequence_parallel",
        "local_params",
        "all_reduce",
        "moe_identity_expert",
    }
)


def apply_tp_plan(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    shape: ModelShape,
    tp_group: TPGroup,
    ep_size: int = 1,
    replicate_unplanned: bool = False,
) -> None:
    """Swap every linear / embedding that the model's TP plan names for its parallel twin,
    and split every experts module over the ranks (``ep_size`` groups of whole experts, each
    expert's intermediate dimension split within a group; srt.layers.moe).

    Linears the plan does not name stay replicated. With one rank the swap still
    happens, so TP=1 runs the same code as TP=N. A model without a plan is refused at TP > 1
    unless ``replicate_unplanned``: then every rank holds and computes all of it, its linears
    srt's (whole on each rank) so that their GEMMs run on packed CPU weights too.
    """
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan and tp_group.size > 1 and replicate_unplanned:
        logger.warning("%s has no tensor-parallel plan: each of the %d ranks computes all of it", type(model).__name__, tp_group.size)
    elif not plan and tp_group.size > 1:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (base_model_tp_plan); use --tp 1")
    lm_head = model.get_output_embeddings()
    experts_modules = 0
    for name, module in list(model.named_modules()):
        if module is lm_head:
            continue  # vocab-parallel below, sharded like the embedding so tied weights agree
        if is_experts_module(module):
            shard_experts(module, dtype, device, tp_group, ep_size, experts_kernel(device))
            experts_modules += 1
            continue
        style = _style(plan, name)
        if style is None and replicate_unplanned and isinstance(module, nn.Linear):
            style = "replicate_packable"
        replacement = _parallel_twin(module, style, dtype, device, shape, tp_group)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
    if ep_size > 1 and not experts_modules:
        logger.warning("--ep-size %d has no effect: %s has no experts module srt splits", ep_size, type(model).__name__)
    if lm_head is not None:
        model.set_output_embeddings(_lm_head(lm_head, dtype, device, tp_group))
    if tp_group.size > 1:
        _shard_bare_parameters(model, plan, device, tp_group)
        _refuse_whole_parameters(model, plan)


def _shard_bare_parameters(model: nn.Module, plan: dict[str, str], device: torch.device, tp_group: TPGroup) -> None:
    """Split the 1-D bare parameters the plan splits ``colwise`` (attention sinks: one value per
    head) into this rank's part, so that they follow the heads its split projections keep."""
    for name, param in list(model.named_parameters()):
        if param.dim() != 1 or hasattr(param, "weight_loader") or _style(plan, name) not in ("colwise", "local_colwise"):
            continue
        if param.shape[0] % tp_group.size:
            raise ValueError(f"parameter {name} of size {param.shape[0]} does not split over tp_size={tp_group.size}")
        owner_name, _, attr = name.rpartition(".")

        def load(target: nn.Parameter, loaded: object) -> None:
            target.data.copy_(read_shard(loaded, 0, 1, tp_group.rank, tp_group.size))

        shard = loadable_param((param.shape[0] // tp_group.size,), param.dtype, device, load)
        setattr(model.get_submodule(owner_name), attr, shard)


def _style(plan: dict[str, str], name: str) -> str | None:
    return next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)


def _refuse_whole_parameters(model: nn.Module, plan: dict[str, str]) -> None:
    """Refuse plan entries that split a bare parameter (not a module) srt would keep whole,
    unless its module is one kept whole too.

    Whole inside a whole module is exact (a module the plan marks ``all_reduce`` or
    ``replicate`` gets full inputs and returns full outputs); whole next to split projections it is not: attention sinks hold one value per head,
    and this rank attends over its own heads only. ``local_params`` marks just such a
    module (one whose projections and bare parameters are split alike), so it does not count.
    """
    for name, param in model.named_parameters():
        style = _style(plan, name)
        if style is None or style in REPLICATED_EXACTLY or hasattr(param, "weight_loader"):
            continue  # not split by the plan, or split by the layer that owns it
        owner = name.rpartition(".")[0]
        if _style(plan, owner) in REPLICATED_EXACTLY - {"local_params"}:
            continue
        raise ValueError(
            f"the tensor-parallel plan splits parameter {name} ({style!r}), which srt does not split; "
            "kept whole next to split layers it would be wrong: use --tp 1"
        )


def _parallel_twin(
    module: nn.Module, style: str | None, dtype: torch.dtype, device: torch.device, shape: ModelShape, tp_group: TPGroup
) -> nn.Module | None:
    if isinstance(module, nn.Embedding) and style is not None and style.startswith("embedding"):
        return VocabParallelEmbedding(
            module.num_embeddings,
            module.embedding_dim,
            dtype,
            device,
            tp_group,
            embed_scale=getattr(module, "embed_scale", None),
        )
    if not isinstance(module, nn.Linear) or style is None:
        return None
    args = (module.in_features, module.out_features, module.bias is not None, dtype, device, tp_group)
    if style in ("colwise", "local_colwise", "colwise_gather_output", "packed_colwise", "colwise_rep"):
        gather = style in ("colwise_gather_output", "colwise_rep")
        # A K or V projection (recognised by its size) with fewer KV heads than ranks:
        # each head is replicated over tp_size / kv_heads ranks.
        kv_replicated = shape.num_kv_heads < tp_group.size and module.out_features == shape.num_kv_heads * shape.head_dim
        return ColumnParallelLinear(
            *args,
            gather_output=gather,
            packed=2 if style == "packed_colwise" else 1,
            num_shards=shape.num_kv_heads if kv_replicated and not gather else None,
        )
    if style == "replicate_packable":  # whole on every rank, in srt's linear (its GEMM on packed CPU weights)
        return ColumnParallelLinear(*args, num_shards=1)
    if style in ("rowwise", "local_rowwise", "rowwise_split_input", "packed_rowwise", "rowwise_rep"):
        return RowParallelLinear(
            *args, input_is_parallel=style != "rowwise_split_input", packed=2 if style == "packed_rowwise" else 1
        )
    if tp_group.size > 1 and style not in REPLICATED_EXACTLY:
        # A linear kept whole still computes its full output; neighbours that were split
        # then fail on shapes rather than compute something else.
        logger.warning("tensor-parallel style %r is not supported; the layer stays replicated", style)
    return None


def _lm_head(lm_head: nn.Module, dtype: torch.dtype, device: torch.device, tp_group: TPGroup) -> ParallelLMHead:
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"unsupported output embedding {type(lm_head).__name__}")
    return ParallelLMHead(lm_head.in_features, lm_head.out_features, lm_head.bias is not None, dtype, device, tp_group)
