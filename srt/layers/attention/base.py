"""What every attention backend offers, and how one is built by name.

The model code never knows which backend runs: ``srt_attention`` (interface.py) calls
these three methods, whichever device the backend was made for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from srt.model_executor.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    """What the model runner needs from a device-specific attention implementation."""

    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-forward metadata (index tables, masks) once, before the layers run."""

    def store(self, batch: ForwardBatch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this layer's new ``k``/``v`` (``[tokens, kv_heads, head_dim]``) at ``batch.out_cache_loc``."""

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` is ``[tokens, heads, head_dim]``; this layer's new K/V are already in the cache.

        ``sinks [heads]`` (this rank's heads) are attention sinks: one value-less logit per head
        in the softmax denominator."""


def create_attention_backend(name: str) -> AttentionBackend:
    """The backend called ``name``: ``"triton"`` or ``"torch"`` (the platform resolves ``auto``)."""
    # Imported on demand: each backend pulls in its own kernels (Triton's only where it is used).
    if name == "triton":
        from srt.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "torch":
        from srt.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; expected 'triton' or 'torch'")
