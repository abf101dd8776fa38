"""The attention function that transformers models call, and the per-model context behind it.

transformers looks attention up by ``config._attn_implementation``. Each
``AttentionContext`` registers ``srt_attention`` bound to itself under a name of its
own, and its model's config names it, so every model whose attention goes through
that interface writes its K/V into our paged cache and attends over each request's
cached prefix, and two models in one process (a draft model and its target) never
see each other's batches. The current ``ForwardBatch`` reaches the function through
the context rather than model keyword arguments, so models that do not forward
``**kwargs`` still work.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface

from srt.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from srt.model_executor.forward_batch import ForwardBatch

_context_ids = itertools.count()


class AttentionContext:
    """One model's attention backend and the batch of its forward in progress.

    ``name`` is what the model's ``config._attn_implementation`` must be set to. For
    custom names like it transformers builds no attention mask (``attention_mask`` is
    None): causality and sequence boundaries are the backend's.
    """

    def __init__(self, backend: AttentionBackend) -> None:
        self.backend = backend
        self.batch: ForwardBatch | None = None
        self.name = f"srt{next(_context_ids)}"
        AttentionInterface.register(self.name, functools.partial(srt_attention, self))

    @contextlib.contextmanager
    def running(self, batch: ForwardBatch, backend: AttentionBackend | None = None) -> Iterator[None]:
        """Route the model's attention to ``batch`` (prepared here) while the block runs.

        ``backend`` replaces the context's own for this forward only (the model runner's
        K/V shape probe). On exit the previous batch and backend are back, so forwards nest.
        """
        backend = backend or self.backend
        backend.prepare(batch)
        outer = self.batch, self.backend
        self.batch, self.backend = batch, backend
        try:
            yield
        finally:
            self.batch, self.backend = outer


_NOT_PASSED = object()


class UnsupportedAttention(NotImplementedError):
    """The model asks its attention for something srt does not compute (raised by the
    model runner's start-up probe forward, so a model is refused before it serves)."""


# Keywords transformers' attention classes pass that cannot change what is computed here:
# positions and caching are the batch's (srt keeps its own paged cache), dropout is off in
# eval mode, and the rest are the model's own output switches, handed down with its
# ``**kwargs`` (a multimodal wrapper hands its ``logits_to_keep`` down the same way).
# ``is_causal`` may only confirm causal attention.
_HARMLESS_KEYWORDS = frozenset(
    {
        "dropout", "position_ids", "use_cache", "cache_position", "past_key_values",
        "output_attentions", "output_hidden_states", "output_router_logits", "return_dict", "logits_to_keep",
    }
)  # fmt: skip


def _refuse_unsupported(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse a keyword srt does not implement: dropping it would serve other attention, silently."""
    name = type(module).__name__
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal", True) is False:
        raise UnsupportedAttention(
            f"{name} attends bidirectionally (is_causal=False): an encoder, not a generation model (--is-embedding serves its embeddings)"
        )
    for key, value in kwargs.items():
        if key in _HARMLESS_KEYWORDS or key == "is_causal" or value is None:
            continue
        raise UnsupportedAttention(f"{name} passes the attention keyword {key!r}, which srt does not implement")


@torch.compiler.disable  # under --enable-torch-compile the backends run eagerly: they index on the host
def srt_attention(
    context: AttentionContext,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None | object = _NOT_PASSED,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``[1, H, T, D]``, k/v ``[1, H_kv, T, D]`` → ``[1, T, H, D]``.

    ``s_aux`` are attention sinks (one logit per local head, gpt-oss). Any other keyword that
    could change the result is refused (``_refuse_unsupported``).
    """
    batch, backend = context.batch, context.backend
    _refuse_unsupported(module, kwargs)
    if batch is None:
        raise RuntimeError("the srt attention ran outside a forward context (call the model through ModelRunner)")
    layer = module.layer_idx
    backend.store(batch, layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if sliding_window is _NOT_PASSED:
        # Only a model that never passes the keyword falls back to its module's attribute: one
        # that passes None for its full-attention layers (Exaone 4) keeps the attribute set on all.
        sliding_window = getattr(module, "sliding_window", None)
    if scaling is None:
        scaling = module.scaling
    out = backend.forward(query[0].transpose(0, 1), layer, batch, scaling, sliding_window, softcap, s_aux)
    return out.unsqueeze(0), None
