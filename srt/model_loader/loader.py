"""Build a transformers model from its config, make it tensor-parallel, load its shard.

No per-model code: the model's own classes run the forward; we only (1) route its
attention to the srt attention function registered for it, (2) swap linears and embeddings for the parallel
layers its TP plan names, and (3) stream weights from safetensors through each
parameter's ``weight_loader``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from srt.layers.weight_shards import read_full
from srt.platform.distributed import tp_size

logger = logging.getLogger(__name__)


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


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def model_shape(config: PretrainedConfig, context_length: int | None = None) -> ModelShape:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if heads % tp_size():
        raise ValueError(f"num_attention_heads={heads} is not divisible by tp_size={tp_size()}")
    if kv_heads % tp_size() and tp_size() % kv_heads:
        raise ValueError(f"num_key_value_heads={kv_heads} neither divides nor is divisible by tp_size={tp_size()}")
    max_positions = getattr(text, "max_position_embeddings", None) or 2048
    return ModelShape(
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        context_length=context_length or max_positions,
    )


def load_model(
    model_path: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model with this rank's weights, in eval mode, its attention the registered
    ``attn_implementation`` (an ``AttentionContext``'s name)."""
    config._attn_implementation = attn_implementation
    # Parameters on the meta device (no memory); buffers such as rotary inv_freq are
    # computed for real by the modules' own constructors.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' attention interface "
            "(_supports_attention_backend is False), so srt cannot serve it"
        )
    model.config._attn_implementation = attn_implementation
    apply_tp_plan(model, dtype, device, model_shape(config))
    _materialize(model, device)
    load_weights(model, model_path)
    return model.eval()


# ---- tensor parallelism ---------------------------------------------------------------


def apply_tp_plan(model: nn.Module, dtype: torch.dtype, device: torch.device, shape: ModelShape) -> None:
    """Swap every linear / embedding that the model's TP plan names for its parallel twin.

    Linears the plan does not name stay replicated. With one rank the swap still
    happens, so TP=1 runs the same code as TP=N.
    """
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan and tp_size() > 1:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (base_model_tp_plan); use --tp 1")
    lm_head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if module is lm_head:
            continue  # vocab-parallel below, sharded like the embedding so tied weights agree
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        replacement = _parallel_twin(module, style, dtype, device, shape)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
    if lm_head is not None:
        model.set_output_embeddings(_lm_head(lm_head, dtype, device))


def _parallel_twin(
    module: nn.Module, style: str | None, dtype: torch.dtype, device: torch.device, shape: ModelShape
) -> nn.Module | None:
    if isinstance(module, nn.Embedding) and style is not None and style.startswith("embedding"):
        return VocabParallelEmbedding(
            module.num_embeddings, module.embedding_dim, dtype, device, embed_scale=getattr(module, "embed_scale", None)
        )
    if not isinstance(module, nn.Linear) or style is None:
        return None
    args = (module.in_features, module.out_features, module.bias is not None, dtype, device)
    if style in ("colwise", "local_colwise", "colwise_gather_output", "packed_colwise", "colwise_rep"):
        gather = style in ("colwise_gather_output", "colwise_rep")
        # A K or V projection (recognised by its size) with fewer KV heads than ranks:
        # each head is replicated over tp_size / kv_heads ranks.
        kv_replicated = shape.num_kv_heads < tp_size() and module.out_features == shape.num_kv_heads * shape.head_dim
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
    if tp_size() > 1:
        logger.warning("tensor-parallel style %r is not supported; the layer stays replicated", style)
    return None


def _lm_head(lm_head: nn.Module, dtype: torch.dtype, device: torch.device) -> ParallelLMHead:
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"unsupported output embedding {type(lm_head).__name__}")
    return ParallelLMHead(lm_head.in_features, lm_head.out_features, lm_head.bias is not None, dtype, device)


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
    """Stream every checkpoint tensor into its parameter; each rank reads only its slices."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded: set[str] = set()
    skipped: list[str] = []
    files = safetensors_files(model_path)
    with tqdm(total=len(files), desc="Loading safetensors", unit="file", disable=len(files) < 2) as bar:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in params:
                        param = params[name]
                        loader = getattr(param, "weight_loader", _load_replicated)
                        loader(param, f.get_slice(name))
                        loaded.add(name)
                    elif name in buffers:
                        buffers[name].copy_(f.get_tensor(name))
                    else:
                        skipped.append(name)
            bar.update()
    if skipped:
        logger.warning("ignored %d checkpoint tensors the model does not have, e.g. %s", len(skipped), skipped[:3])
    _tie_output_embeddings(model)
    loaded_ids = {id(params[name]) for name in loaded}
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded_ids]
    if missing:
        raise ValueError(f"checkpoint {model_path} lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")


def _load_replicated(param: nn.Parameter, loaded) -> None:
    param.data.copy_(read_full(loaded))


def _tie_output_embeddings(model: nn.Module) -> None:
    """Point the LM head at the input embedding when the model ties them."""
    lm_head = model.get_output_embeddings()
    if lm_head is not None and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        lm_head.weight = model.get_input_embeddings().weight
