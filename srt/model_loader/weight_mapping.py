"""Checkpoint tensor names -> model tensors, through transformers' own conversion mapping.

Checkpoints keep the names their model had when they were written: one tensor per
expert (``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1``),
legacy names (GPT-NeoX's ``embed_out``), fused or split projections. transformers v5
models hold other shapes (all experts of a layer in one 3-D ``gate_up_proj``) and turn
one into the other at load time with the transforms ``get_model_conversion_mapping``
returns for the model: ``WeightRenaming`` (a name changes) and ``WeightConverter``
(several tensors become one, or one several, through ops such as ``MergeModulelist``,
``Concatenate``, ``Chunk``, ``Transpose``). We apply the very same transforms, so every
checkpoint ``from_pretrained`` loads, srt loads, with no table of our own.

A tensor that is only renamed is read by its parameter's ``weight_loader`` straight
from the file, so a rank reads only its shard. A converted tensor is built whole from
its sources first (one target at a time, so memory stays bounded by the largest
parameter), and the full result goes to the same ``weight_loader``. An expert-parallel
rank's experts parameters say which experts they hold (``local_experts``): of a checkpoint
that stores one tensor per expert, only those experts' tensors are read and merged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

# Reads one checkpoint tensor whole when called (a converter calls it only when it converts).
LazyTensor = Callable[[], torch.Tensor]

# The expert index in a per-expert checkpoint key (``mlp.experts.3.gate_proj.weight``).
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def checkpoint_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every model tensor that a checkpoint fills: parameters (a tied one under each of its
    names) and persistent buffers. Non-persistent buffers (rotary ``inv_freq``, ...) are
    computed by the modules themselves and never read from a checkpoint, as in transformers."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                targets[f"{module_name}.{name}" if module_name else name] = buf
    return targets


@dataclass
class LoadPlan:
    """Where each model tensor comes from.

    ``renamed``: model tensor name -> the one checkpoint key it is read from.
    ``converted``: first target name -> a converter holding its sources (lazy readers).
    ``unexpected``: checkpoint keys no model tensor takes.
    """

    renamed: dict[str, str] = field(default_factory=dict)
    converted: dict[str, WeightConverter] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.renamed) + len(self.converted)


def plan_loads(
    model: nn.Module, keys: Iterable[str], targets: dict[str, torch.Tensor], lazy: Callable[[str], LazyTensor]
) -> LoadPlan:
    """Map checkpoint ``keys`` onto ``targets`` the way ``from_pretrained`` does
    (``convert_and_load_state_dict_in_model``): all renamings in turn, then at most one
    converter, then the base-model prefix added or stripped where that makes the name fit."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    plan = LoadPlan()
    # Natural order (experts.2 before experts.10): a merge stacks the experts in the order they are added.
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, targets)
        if name not in targets and key in targets:  # a rename that does not fit this model: the name was right
            name, pattern = key, None
        if name not in targets:
            plan.unexpected.append(key)
        elif pattern is None:
            if name in plan.renamed:  # transformers too keeps the first of two keys renamed alike
                plan.unexpected.append(key)
            else:
                plan.renamed[name] = key
        elif _held_elsewhere(key, targets[name]):
            continue  # another expert-parallel rank's expert: not read here
        else:
            # Each target gets its own converter, which collects that target's sources.
            converter = plan.converted.setdefault(name, deepcopy(converter_of[pattern]))
            converter.add_tensor(name, key, pattern, lazy(key))
    return plan


def _held_elsewhere(key: str, target: torch.Tensor) -> bool:
    local = getattr(target, "local_experts", None)
    match = _EXPERT_INDEX.search(key) if local is not None else None
    return match is not None and int(match.group(1)) not in local


def converted_tensors(model: nn.Module, plan: LoadPlan) -> Iterator[dict[str, torch.Tensor]]:
    """Run the converters of ``plan`` one by one, each reading its sources only now, and yield
    the full tensors each makes by model tensor name. The plan lets go of a converter as it
    runs, so no more than one target's sources are in memory at once."""
    while plan.converted:
        first = next(iter(plan.converted))
        converter = plan.converted.pop(first)
        # Called without loading_info, transformers re-raises a failing op instead of skipping the tensor.
        converted = converter.convert(first, model=model, config=model.config)
        yield {name: tensor[0] if isinstance(tensor, list) else tensor for name, tensor in converted.items()}
