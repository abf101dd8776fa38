"""What a request's images become on the wire: the processor's tensors as raw bytes, and
what the scheduler keys the prefix cache with.

Tensors travel as ``(dtype, shape, bytes)``, never pickled, so a peer can only send numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedTensor:
    dtype: str  # a torch dtype's name: "float32", "int64", ...
    shape: list[int]
    data: bytes

    @classmethod
    def pack(cls, tensor: torch.Tensor) -> PackedTensor:
        tensor = tensor.detach().cpu().contiguous()
        return cls(str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor.view(torch.uint8).numpy().tobytes())

    def unpack(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {self.dtype!r}")
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(dtype).reshape(self.shape)


@dataclass
class MultimodalInputs:
    """One prompt's images: the processor's outputs for all of them (``pixel_values``,
    ``image_grid_thw``, ...; not the token ids), and per image a hash of its pixels and how
    many of the prompt's image tokens are its own, in order (None: not known, so the
    tokens of all images are keyed by one hash of them all)."""

    tensors: dict[str, PackedTensor]
    image_hashes: list[int]
    image_token_counts: list[int] | None = None
