"""The ``"srt"`` attention function that transformers models call, and the backend behind it.

transformers looks attention up by ``config._attn_implementation``; registering ours
means every model whose attention goes through that interface writes its K/V into
our paged cache and attends over each request's cached prefix. The current
``ForwardBatch`` reaches the function through a per-forward context rather than
model keyword arguments, so models that do not forward ``**kwargs`` still work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from transformers import AttentionInterface

from srt.model_executor.forward_batch import ForwardBatch

ATTENTION_NAME = "srt"


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
    ) -> torch.Tensor:
        """``q`` is ``[tokens, heads, head_dim]``; this layer's new K/V are already in the cache."""


@contextlib.contextmanager
def forward_context(batch: ForwardBatch, backend: AttentionBackend) -> Iterator[None]:
    global _current
    backend.prepare(batch)
    _current = (batch, backend)
    try:
        yield
    finally:
        _current = None


_current: tuple[ForwardBatch, AttentionBackend] | None = None


@torch.compiler.disable  # under --enable-torch-compile the backends run eagerly: they index on the host
def srt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``[1, H, T, D]``, k/v ``[1, H_kv, T, D]`` → ``[1, T, H, D]``."""
    if _current is None:
        raise RuntimeError("the srt attention ran outside a forward context (call the model through ModelRunner)")
    batch, backend = _current
    layer = module.layer_idx
    backend.store(batch, layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if scaling is None:
        scaling = module.scaling
    out = backend.forward(query[0].transpose(0, 1), layer, batch, scaling, sliding_window, softcap)
    return out.unsqueeze(0), None


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, srt_attention)
