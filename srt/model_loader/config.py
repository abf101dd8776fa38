"""A model's config, and what the rest of srt needs to know from it before the model exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig


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


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def model_shape(config: PretrainedConfig, tp_size: int, context_length: int | None = None) -> ModelShape:
    """The model's shape, checked to split over ``tp_size`` ranks."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
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
