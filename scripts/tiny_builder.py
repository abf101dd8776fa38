"""Tiny random-weight models of any transformers architecture, saved as ordinary HF folders.

``shrunk_config_kwargs`` shrinks a model type's default config generically (no table per
type): it reads which size fields the default config has and sets each to a tiny value,
so a new architecture in transformers is covered as soon as it is installed. Where the
tiny sizes break a type's own constraints, ``proportional_config_kwargs`` divides its widths
and head counts by one factor instead, keeping their ratios. Weights are
drawn with a large ``initializer_range`` so that logits are well spread and greedy choices
are not decided by rounding noise. The tests (tests/tiny_models.py) build through here too.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

VOCAB = 256
LAYERS = 2
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16
# A window shorter than the sweep's prompts, so that sliding-window layers really drop keys.
SLIDING_WINDOW = 6

COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=512,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Field -> tiny value, set only where the default config has the field (and it is not None).
_TINY_WHERE_PRESENT: dict[str, Any] = {
    "head_dim": HEAD_DIM,
    # mixture of experts: four experts, two per token, small ones
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 32,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 24,
    "v_head_dim": 16,
    # recurrent / linear-attention mixers
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "n_groups": 1,
    "kv_channels": HEAD_DIM,
    "attention_chunk_size": SLIDING_WINDOW,
}


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config(decoder=True)


def _shrink_layer_lists(default: PretrainedConfig, kwargs: dict[str, Any]) -> None:
    """Per-layer fields (``layer_types`` and any list or pattern string with one entry per layer)
    cut to as many layers as there are distinct kinds (at least ``LAYERS``), every kind kept."""
    old = getattr(default, "num_hidden_layers", None)
    layer_types = getattr(default, "layer_types", None)
    keep = list(range(LAYERS))
    if isinstance(layer_types, (list, tuple)) and layer_types:
        first_of_kind = list({kind: i for i, kind in reversed(list(enumerate(layer_types)))}.values())
        keep = sorted(set(first_of_kind) | set(range(min(LAYERS, len(layer_types)))))
    kwargs["num_hidden_layers"] = len(keep)
    if not old:
        return
    for name, value in vars(default).items():
        if name.startswith("_") or name in kwargs:
            continue
        if isinstance(value, (list, tuple, str)) and len(value) == old and old > 1:
            picked = [value[i] for i in keep if i < len(value)]
            kwargs[name] = "".join(picked) if isinstance(value, str) else type(value)(picked)


# Fields that count or size experts: cut in the proportional shrink too.
_EXPERT_FIELDS = frozenset(
    {"num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts"}
)
# Head counts and widths (by name), divided by one factor in the proportional shrink; per-head sizes are not.
_HEAD_COUNT = re.compile(r"(heads|n_head)$")
_WIDTH = re.compile(r"hidden_size|intermediate|d_model|n_embd|n_inner|ffn|d_ff|d_ssm|d_inner")
_WIDTHS_AND_HEADS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _settable(default: PretrainedConfig, name: str) -> bool:
    """Present (not None) and not a read-only property computed from other fields (Falcon's head_dim)."""
    prop = getattr(type(default), name, None)
    return getattr(default, name, None) is not None and not (isinstance(prop, property) and prop.fset is None)


def _set_experts(default: PretrainedConfig, kwargs: dict[str, Any], fields: Any) -> None:
    for name in fields:
        if _settable(default, name):
            kwargs[name] = _TINY_WHERE_PRESENT[name]
    # A routed model whose default leaves top-k unset (None) would route to no expert at all.
    if any(name in kwargs for name in _EXPERT_FIELDS) and hasattr(default, "num_experts_per_tok"):
        kwargs["num_experts_per_tok"] = _TINY_WHERE_PRESENT["num_experts_per_tok"]


def proportional_config_kwargs(model_type: str) -> dict[str, Any]:
    """A gentler shrink, for a type whose tiny config transformers rejects: every head count and
    width divided by one factor (the type's own ratios between them kept, and its per-head sizes),
    only layers, vocabulary and experts cut as in the tiny one."""
    default = _text_config(AutoConfig.for_model(model_type))
    fields = {
        name: value
        for name, value in vars(default).items()
        if not name.startswith("_") and type(value) is int and value > 1 and (_HEAD_COUNT.search(name) or _WIDTH.search(name))
    }
    common = math.gcd(*fields.values()) if fields else 1
    most = max(1, getattr(default, "num_attention_heads", HEADS) // HEADS)
    factor = max(d for d in range(1, most + 1) if common % d == 0)
    kwargs = {k: v for k, v in COMMON.items() if k not in {"num_hidden_layers", *_WIDTHS_AND_HEADS}}
    kwargs.update({name: value // factor for name, value in fields.items()})
    _set_experts(default, kwargs, _EXPERT_FIELDS)
    if getattr(default, "sliding_window", None) is not None:
        kwargs["sliding_window"] = SLIDING_WINDOW
    _shrink_layer_lists(default, kwargs)
    return kwargs


def shrunk_config_kwargs(model_type: str) -> dict[str, Any]:
    """Config keyword arguments that make ``model_type`` tiny (for ``AutoConfig.for_model``)."""
    default = _text_config(AutoConfig.for_model(model_type))
    kwargs = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"}
    _set_experts(default, kwargs, _TINY_WHERE_PRESENT)
    if getattr(default, "num_key_value_heads", None) == getattr(default, "num_attention_heads", None):
        kwargs["num_key_value_heads"] = HEADS  # multi-head attention stays so (MLA needs it)
    rope = getattr(default, "qk_rope_head_dim", None)
    if rope is not None and getattr(default, "head_dim", None) == rope:  # MLA: head_dim is the rotary part
        kwargs["head_dim"] = _TINY_WHERE_PRESENT["qk_rope_head_dim"]
    if getattr(default, "sliding_window", None) is not None:
        kwargs["sliding_window"] = SLIDING_WINDOW
    # Sizes stated a second time under another name (d_ff, ffn_dim, ...): the same tiny value.
    sizes = {getattr(default, "hidden_size", None): HIDDEN, getattr(default, "intermediate_size", None): INTERMEDIATE}
    sizes.pop(None, None)
    for name, value in vars(default).items():
        if not name.startswith("_") and name not in kwargs and type(value) is int and value in sizes and value > 1:
            kwargs[name] = sizes[value]
    _shrink_layer_lists(default, kwargs)
    return kwargs


def tiny_config(model_type: str, proportional: bool = False, **overrides: Any) -> PretrainedConfig:
    """``model_type``'s config shrunk to a tiny model (``proportional``: to a small one, its
    ratios kept; see ``proportional_config_kwargs``), ``overrides`` on top."""
    shrink = proportional_config_kwargs if proportional else shrunk_config_kwargs
    kwargs = {**shrink(model_type), **overrides}
    config = AutoConfig.for_model(model_type)
    if _text_config(config) is not config:  # a composite config: the sizes are its text model's
        return AutoConfig.for_model(model_type, text_config=kwargs)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(config: PretrainedConfig, directory: str) -> str:
    """Save a random float32 model of ``config`` and a byte tokenizer into ``directory``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _draw_learned_buffers(model, getattr(_text_config(config), "initializer_range", 0.3))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@torch.no_grad()
def _draw_learned_buffers(model: torch.nn.Module, std: float) -> None:
    """Persistent floating-point buffers are learned state saved with the weights (DeepSeek's
    router bias ``e_score_correction_bias``): draw them at random too, so that a loader that
    skipped them would not match transformers."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set and buf.is_floating_point():
                buf.normal_(0.0, std)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are the 256 byte values, so any text round-trips."""
    # GPT-2's byte-to-printable-character table, which the ByteLevel pre-tokenizer emits.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[1], eos_token=chars[2], pad_token=chars[0])
