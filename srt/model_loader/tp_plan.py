"""Tensor parallelism from the model's own TP plan: its linears and embeddings swapped for parallel twins."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from srt.model_loader.config import ModelShape
from srt.platform.distributed import TPGroup

logger = logging.getLogger(__name__)


def apply_tp_plan(model: nn.Module, dtype: torch.dtype, device: torch.device, shape: ModelShape, tp_group: TPGroup) -> None:
    """Swap every linear / embedding that the model's TP plan names for its parallel twin.

    Linears the plan does not name stay replicated. With one rank the swap still
    happens, so TP=1 runs the same code as TP=N.
    """
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan and tp_group.size > 1:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (base_model_tp_plan); use --tp 1")
    lm_head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if module is lm_head:
            continue  # vocab-parallel below, sharded like the embedding so tied weights agree
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        replacement = _parallel_twin(module, style, dtype, device, shape, tp_group)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
    if lm_head is not None:
        model.set_output_embeddings(_lm_head(lm_head, dtype, device, tp_group))


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
    if style in ("rowwise", "local_rowwise", "rowwise_split_input", "packed_rowwise", "rowwise_rep"):
        return RowParallelLinear(
            *args, input_is_parallel=style != "rowwise_split_input", packed=2 if style == "packed_rowwise" else 1
        )
    if tp_group.size > 1:
        logger.warning("tensor-parallel style %r is not supported; the layer stays replicated", style)
    return None


def _lm_head(lm_head: nn.Module, dtype: torch.dtype, device: torch.device, tp_group: TPGroup) -> ParallelLMHead:
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"unsupported output embedding {type(lm_head).__name__}")
    return ParallelLMHead(lm_head.in_features, lm_head.out_features, lm_head.bias is not None, dtype, device, tp_group)
