"""Build a transformers model from its config, make it tensor-parallel, load its shard.

No per-model code: the model's own classes run the forward; we only (1) route its
attention to the srt attention function registered for it, (2) swap linears and
embeddings for the parallel layers its TP plan names (tp_plan.py), and (3) stream
weights from safetensors through each parameter's ``weight_loader``.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from srt.layers.weight_shards import read_full
from srt.model_loader.config import model_shape
from srt.model_loader.tp_plan import apply_tp_plan
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
    apply_tp_plan(model, dtype, device, model_shape(config, tp_group.size), tp_group)
    _materialize(model, device)
    load_weights(model, model_path)
    return model.eval()


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
