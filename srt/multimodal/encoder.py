"""The scheduler's side of images: the model's own vision tower and merge rules.

A request's image features come from the model's ``get_image_features`` on the processor's
tensors, in the order the model's own forward scatters them: feature row i replaces the
prompt's i-th image token. Models with multimodal rotary positions (Qwen2-VL's M-RoPE) get
each prompt's 3-D positions from the model's own ``get_rope_index``; past the prompt every
axis advances together, offset by the prompt's ``rope_delta``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PretrainedConfig

from srt.runtime.image_inputs import MultimodalInputs


class VisionEncoder:
    def __init__(self, model: nn.Module, config: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.owner = _owner_of(model, "get_image_features")
        if self.owner is None:
            raise ValueError(f"{type(model).__name__} has no get_image_features")
        self.device, self.dtype = device, dtype
        self._takes = _parameters(self.owner.get_image_features)
        self.image_token_id: int = _image_token_id(config)
        self._rope_index = getattr(_owner_of(model, "get_rope_index"), "get_rope_index", None)
        self._rope_takes = _parameters(self._rope_index) if self._rope_index is not None else frozenset()

    @property
    def has_mrope(self) -> bool:
        return self._rope_index is not None

    @torch.inference_mode()
    def features(self, inputs: MultimodalInputs, image_tokens: int) -> torch.Tensor:
        """``[image_tokens, hidden]``: every image of the request through the vision tower and projector."""
        kwargs = {name: self._tensor(name, packed.unpack()) for name, packed in inputs.tensors.items() if name in self._takes}
        out = self.owner.get_image_features(**kwargs, return_dict=True)
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        features = features.reshape(-1, features.shape[-1])
        if features.shape[0] != image_tokens:
            raise ValueError(f"the vision tower made {features.shape[0]} image features for {image_tokens} image tokens")
        return features

    @torch.inference_mode()
    def mrope_positions(self, input_ids: list[int], inputs: MultimodalInputs) -> tuple[torch.Tensor, int]:
        """The prompt's ``[3, len]`` positions and the offset of every position after it."""
        ids = torch.tensor([input_ids], device=self.device)
        kwargs = {name: packed.unpack().to(self.device) for name, packed in inputs.tensors.items() if name in self._rope_takes}
        positions, deltas = self._rope_index(ids, **kwargs)
        return positions[:, 0], int(deltas.reshape(-1)[0])

    def _tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() and name.startswith("pixel_values") else tensor


def _owner_of(model: nn.Module, method: str) -> nn.Module | None:
    """The outermost module with ``method`` (the conditional-generation model's inner model)."""
    return next((m for m in model.modules() if callable(getattr(m, method, None))), None)


def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _image_token_id(config: PretrainedConfig) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} names no image token (image_token_id)")
