"""A PEFT LoRA adapter read from its folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only what srt computes exactly is accepted: plain LoRA (``y += scaling * B A x``) on the
base model's linear layers, one rank and alpha for every module. Anything else PEFT can
save (DoRA, LoRA biases, trained embeddings or ``modules_to_save``, per-module rank or
alpha patterns, ``fan_in_fan_out`` Conv1D layers) is refused by name, never ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."  # PEFT's wrapper around the model it adapts
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

# adapter_config.json fields whose non-default values change what the adapter computes
# in ways srt does not reproduce.
_REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "modules_to_save (whole modules trained with the adapter)",
    "trainable_token_indices": "trainable_token_indices",
    "alpha_pattern": "per-module lora_alpha (alpha_pattern)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "target_parameters": "target_parameters (LoRA on bare parameters such as fused experts)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


class AdapterError(ValueError):
    """An adapter folder srt cannot serve; the message says what is missing or unsupported."""


@dataclass
class LoRAAdapter:
    """One adapter's full (unsharded) weights, by the name of the base model's module they adapt."""

    name: str
    path: str
    rank: int
    scaling: float  # lora_alpha / rank (or / sqrt(rank) with rsLoRA)
    # module name -> (A [rank, in_features], B [out_features, rank]), on the CPU
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def target_suffixes(self) -> set[str]:
        """The last component of each adapted module's name (``q_proj``, ``down_proj``...)."""
        return {module.rpartition(".")[2] for module in self.weights}


def read_adapter(name: str, path: str) -> LoRAAdapter:
    """Read and check the adapter in folder ``path``; AdapterError says why it cannot be served."""
    config_path = os.path.join(path, _CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise AdapterError(f"LoRA adapter {name!r}: {config_path} not found (a PEFT adapter folder holds {_CONFIG_FILE})")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LoRA")
    for key, what in _REFUSED_FIELDS.items():
        if config.get(key):
            raise AdapterError(f"LoRA adapter {name!r}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_path = os.path.join(path, _WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise AdapterError(f"LoRA adapter {name!r}: {weights_path} not found (only safetensors adapters are read)")
    return LoRAAdapter(name, path, rank, scaling, _read_weights(name, weights_path, rank))


def _read_weights(name: str, weights_path: str, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights_path, "pt") as f:
        for key in f.keys():
            module, half = _module_of(name, key)
            halves.setdefault(module, {})[half] = f.get_tensor(key)
    weights = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"LoRA adapter {name!r}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, not rank {rank}")
        weights[module] = (a, b)
    if not weights:
        raise AdapterError(f"LoRA adapter {name!r}: {weights_path} holds no lora_A / lora_B weights")
    return weights


def _module_of(name: str, key: str) -> tuple[str, str]:
    """(module name in the base model, "A" or "B") of a PEFT weight key."""
    for suffix, half in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
        if key.endswith(suffix):
            return key.removeprefix(_KEY_PREFIX)[: -len(suffix)], half
    raise AdapterError(f"LoRA adapter {name!r}: weight {key} is not a lora_A / lora_B of a linear layer (trained embeddings or whole modules are not supported)")


def parse_lora_paths(entries: list[str] | None) -> dict[str, str]:
    """``--lora-paths`` entries (``name=path``, or a bare path that is its own name) as {name: path}."""
    paths: dict[str, str] = {}
    for entry in entries or []:
        name, sep, path = entry.partition("=")
        name, path = (name, path) if sep else (entry, entry)
        if not name or not path:
            raise ValueError(f"--lora-paths entry {entry!r} is not name=path")
        if name in paths:
            raise ValueError(f"--lora-paths names adapter {name!r} twice")
        paths[name] = path
    return paths
