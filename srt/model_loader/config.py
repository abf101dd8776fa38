"""A model's config, and what the rest of srt needs to know from it before the model exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError
from transformers import AutoConfig, PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs


@dataclass
class ModelShape:
    """What the scheduler needs to know about a model (KV shapes are probed from the model itself)."""

    num_attention_heads: int
    num_kv_heads: int  # in the checkpoint, all ranks together
    head_dim: int
    vocab_size: int
    context_length: int


def load_config(model_path: str, trust_remote_code: bool = False, revision: str | None = None) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)


def refuse_quantized(config: PretrainedConfig) -> None:
    """Refuse a quantized checkpoint: srt implements no quantization method yet, and its
    packed integer / fp8 tensors and their scales read as plain weights would be garbage."""
    for part in (config, config.get_text_config()):
        quantization = getattr(part, "quantization_config", None)
        if quantization is None:
            continue
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str Enum
        raise ValueError(f"quantization method {method!r} (quantization_config in config.json) is not supported by srt")


# Layer kinds (transformers' cache layer types) that srt's paged KV cache serves as they are.
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# Layer kinds whose state is a per-request recurrent / convolution state, not per-token K/V.
_RECURRENT_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding"})


def refuse_unsupported_layers(config: PretrainedConfig) -> None:
    """Refuse a model with layers that srt's KV cache cannot serve, read from the layer kinds
    transformers itself builds its cache from (``get_layer_types_and_kwargs``)."""
    text = config.get_text_config(decoder=True)
    try:
        layer_types, _ = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, ValueError):  # a config transformers cannot describe: the probe forward decides
        return
    kinds = set(layer_types) - _ATTENTION_LAYER_TYPES
    if "dummy" in kinds and getattr(text, "kv_sharing_modes", None) is None:
        kinds.discard("dummy")  # a layer with no token mixer at all ("moe", "mlp"): nothing to keep
    if not kinds:
        return
    model_type = getattr(config, "model_type", type(config).__name__)
    if kinds & _RECURRENT_LAYER_TYPES:
        raise ValueError(
            f"{model_type} is a hybrid model: its {sorted(kinds & _RECURRENT_LAYER_TYPES)} layers keep a recurrent "
            "or convolution state per request, and srt has no per-request recurrent-state pool yet"
        )
    if "dummy" in kinds:
        raise ValueError(f"{model_type} shares K/V between layers (kv_sharing_modes), which srt does not implement")
    if "chunked_attention" in kinds:
        raise ValueError(f"{model_type} has chunked-attention layers (attention_chunk_size), which srt does not implement")
    raise ValueError(f"{model_type} has layers of kind {sorted(kinds)}, which srt's KV cache does not implement")


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def model_shape(config: PretrainedConfig, tp_size: int, context_length: int | None = None) -> ModelShape:
    """The model's shape, checked to split over ``tp_size`` ranks."""
    text = config.get_text_config()
    if getattr(text, "num_attention_heads", None) is None:
        raise ValueError(
            f"{config.model_type} has no attention heads (a purely recurrent model): its layers keep a state per "
            "request, and srt has no per-request recurrent-state pool yet"
        )
    heads = text.num_attention_heads
    try:
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    except AmbiguousGlobalPerLayerAttributeError as e:  # per-layer configs (Gemma 4: wider heads on global layers)
        raise ValueError(
            f"{config.model_type} gives its layers different attention shapes ({e}); srt's KV pool holds one "
            "K/V shape for every layer"
        ) from e
    if heads % tp_size:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tp_size={tp_size}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"num_key_value_heads={kv_heads} neither divides nor is divisible by tp_size={tp_size}")
    max_positions = getattr(text, "max_position_embeddings", None) or 2048
    return ModelShape(
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        context_length=context_length or max_positions,
    )
