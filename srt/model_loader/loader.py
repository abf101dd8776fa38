"""Build a transformers model from its config, make it tensor-parallel, load its shard.

No per-model code: the model's own classes run the forward; we only (1) route its
attention to the srt attention function registered for it, (2) swap linears and
embeddings for the parallel layers its TP plan names (tp_plan.py), and (3) stream
weights from safetensors through each parameter's ``weight_loader``, checkpoint names
mapped to the model's as transformers maps them (weight_mapping.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from contextlib import ExitStack
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from srt.layers.moe.experts import EXPERTS_IMPLEMENTATION
from srt.layers.weight_shards import read_full, shape_of
from srt.model_loader.config import model_shape, refuse_quantized, refuse_unsupported_layers
from srt.model_loader.model_task import TaskKind
from srt.model_loader.tp_plan import apply_tp_plan
from srt.model_loader.weight_mapping import checkpoint_targets, converted_tensors, plan_loads
from srt.platform.distributed import TPGroup

logger = logging.getLogger(__name__)


def load_model(
    model_path: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    tp_group: TPGroup,
    attn_implementation: str,
    trust_remote_code: bool = False,
    ep_size: int = 1,
    task: TaskKind = "generate",
) -> nn.Module:
    """The model with this rank's weights, in eval mode, its attention the registered
    ``attn_implementation`` (an ``AttentionContext``'s name) and its MoE experts (if any)
    srt's, split over ``ep_size`` expert-parallel groups.

    ``task`` picks the transformers class: the causal LM, the base model (embeddings) or the
    sequence-classification model. An encoder (attention with ``is_causal=False``) keeps
    transformers' own SDPA attention: it is run whole and padded, with no KV cache
    (``is_encoder``)."""
    refuse_quantized(config)
    if task == "generate":
        refuse_unsupported_layers(config)
    vision = task == "generate" and is_vision_language(config)
    # A vision-language model's language model attends through srt; its vision tower keeps
    # transformers' own attention (it sees each image whole, once, and caches nothing); the TP
    # plan names the language model's linears only, so the tower is replicated on every rank.
    attention = _vision_language_attention(config, attn_implementation) if vision else attn_implementation
    config._attn_implementation = attention
    config._experts_implementation = EXPERTS_IMPLEMENTATION
    # Parameters on the meta device (no memory); buffers such as rotary inv_freq are
    # computed for real by the modules' own constructors.
    not_routed = "does not route its attention through transformers' attention interface"
    auto_class = AutoModelForImageTextToText if vision else _AUTO_CLASSES[task]
    try:
        with init_empty_weights(include_buffers=False):
            model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except KeyError as e:
        if e.args != (attn_implementation,):
            raise
        # The model picks an attention class of its own by name while it is built (Falcon).
        raise ValueError(f"{config.model_type} {not_routed} (it has no attention for {attn_implementation!r})") from e
    if not getattr(language_model(model), "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} {not_routed} (_supports_attention_backend is False), so srt cannot serve it")
    if not vision:
        model.config._attn_implementation = attn_implementation
    model.config._experts_implementation = EXPERTS_IMPLEMENTATION
    if task == "embed" and isinstance(getattr(model, "pooler", None), nn.Module):
        # BERT-style base models compute a pooled [CLS] output that embeddings never read (srt
        # pools the hidden states, as sentence-transformers does); MLM checkpoints have no weights for it.
        model.pooler = None
    encoder = is_encoder(model)
    if encoder:
        model.set_attn_implementation("sdpa" if model._supports_sdpa else "eager")
    elif task != "generate":
        refuse_unsupported_layers(config)
    # An encoder's attention is transformers' own, which a TP plan could shard; without one
    # (BERT-style configs ship none) every rank computes the whole model.
    apply_tp_plan(model, dtype, device, model_shape(config, tp_group.size), tp_group, ep_size, replicate_unplanned=encoder)
    _materialize(model, device)
    load_weights(model, model_path)
    return model.eval()


_AUTO_CLASSES = {"generate": AutoModelForCausalLM, "embed": AutoModel, "classify": AutoModelForSequenceClassification}


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether the checkpoint is one transformers serves as image-text-to-text (LLaVA, Qwen2-VL, ...)."""
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and "vision_config" in getattr(config, "sub_configs", {})


def _vision_language_attention(config: PretrainedConfig, attn_implementation: str) -> dict[str, str | None]:
    """Attention per sub-config: srt's for the text config; for the others (the vision tower)
    None, transformers' default (SDPA where the module supports it, else eager)."""
    text = config.get_text_config()
    return {"": None, **{key: attn_implementation if getattr(config, key) is text else None for key in config.sub_configs}}


def language_model(model: nn.Module) -> nn.Module:
    """The transformer that generates: a vision-language model's text model, else the model itself."""
    text = model.config.get_text_config()
    if text is model.config:
        return model
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is text), model)


def is_encoder(model: nn.Module) -> bool:
    """Whether the model attends bidirectionally (its attention modules say ``is_causal=False``); a
    vision-language model's vision tower does not count."""
    return any(getattr(module, "is_causal", True) is False for module in language_model(model).modules())


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every parameter still on the meta device real (uninitialised) storage, and move buffers."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
            else:
                param.requires_grad_(False)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


# ---- weights ----------------------------------------------------------------------------


def safetensors_files(model_path: str) -> list[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, name) for name in files]
    files = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_path}")
    return [os.path.join(model_path, name) for name in files]


def load_weights(model: nn.Module, model_path: str) -> None:
    """Stream every checkpoint tensor into its model tensor, names mapped as transformers maps
    them (weight_mapping.py); a renamed tensor is read as this rank's slice only."""
    targets = checkpoint_targets(model)
    files = safetensors_files(model_path)
    with ExitStack() as stack:
        # Open every file once (safetensors maps it, nothing is read yet): a converter's
        # sources, all experts of a layer say, may sit in different files.
        handle_of = {}
        for path in files:
            handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            handle_of.update(dict.fromkeys(handle.keys(), handle))
        plan = plan_loads(model, handle_of, targets, lambda key: functools.partial(handle_of[key].get_tensor, key))
        loaded: set[str] = set()
        with tqdm(total=len(plan), desc="Loading weights", unit="tensor", disable=len(files) < 2) as bar:
            for name, key in plan.renamed.items():
                _load(name, targets[name], handle_of[key].get_slice(key))
                loaded.add(name)
                bar.update()
            for converted in converted_tensors(model, plan):
                for name, tensor in converted.items():
                    if name in targets:
                        _load(name, targets[name], tensor)
                        loaded.add(name)
                    else:  # a part of a split that the model does not have
                        plan.unexpected.append(name)
                bar.update()
    if plan.unexpected:
        logger.warning(
            "ignored %d checkpoint tensors the model does not have, e.g. %s", len(plan.unexpected), plan.unexpected[:3]
        )
    _tie_weights(model, loaded)
    _check_complete(model, model_path, targets, loaded)


def _load(name: str, target: torch.Tensor, loaded: Any) -> None:
    """Fill ``target`` from a checkpoint tensor or safetensors slice: through its ``weight_loader``
    when it has one (parallel layers cut their shard; an experts implementation may shard its
    3-D parameters the same way), else whole."""
    loader = getattr(target, "weight_loader", None)
    if loader is not None:
        try:
            loader(target, loaded)
        except ValueError as e:  # a loader knows shapes, not names
            raise ValueError(f"checkpoint tensor for {name}: {e}") from e
        return
    # copy_ would broadcast a tensor of the wrong shape (a missing expert, a transposed layout) silently.
    if shape_of(loaded) != list(target.shape):
        raise ValueError(
            f"checkpoint tensor for {name} has shape {shape_of(loaded)}, the model's is {list(target.shape)}"
        )
    target.data.copy_(read_full(loaded))


def _check_complete(model: nn.Module, model_path: str, targets: dict[str, torch.Tensor], loaded: set[str]) -> None:
    """Refuse a model with parameters the checkpoint did not fill (their memory is uninitialised).

    A persistent buffer the checkpoint lacks keeps the value its module's constructor gave
    it, which is what transformers initialises a missing buffer to; it is only reported.
    """
    loaded_ids = {id(targets[name]) for name in loaded}
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded_ids]
    if missing:
        raise ValueError(f"checkpoint {model_path} lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
    buffers = [name for name, t in targets.items() if not isinstance(t, nn.Parameter) and name not in loaded]
    if buffers:
        logger.warning(
            "checkpoint %s lacks %d buffers, kept as the model builds them: %s", model_path, len(buffers), buffers[:5]
        )


def _tie_weights(model: nn.Module, loaded: set[str]) -> None:
    """Tie what transformers ties (``get_expanded_tied_weights_keys``: the LM head to the input
    embedding under tie_word_embeddings, RoBERTa's decoder bias to its head's bias, ...) where
    the checkpoint filled one side only, to the side it filled, as ``from_pretrained`` does."""
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        if target in loaded and source not in loaded:
            target, source = source, target
        if target in loaded or source not in loaded:
            continue  # both in the checkpoint (kept apart, as transformers keeps differing ones), or neither
        shared = model.get_parameter(source)
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        if getattr(owner, attr).shape != shared.shape:  # e.g. one side vocab-parallel, the other replicated
            raise ValueError(f"{target} is tied to {source}, but their shards differ: {list(getattr(owner, attr).shape)} and {list(shared.shape)}")
        setattr(owner, attr, shared)
        loaded.add(target)
