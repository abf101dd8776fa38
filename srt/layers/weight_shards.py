"""Reading a rank's part of a checkpoint tensor, and parameters that know how to load it.

``loaded`` is a ``torch.Tensor`` or a safetensors slice (``safe_open(...).get_slice``):
both index with slices, and with a slice only the shard is read from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[[nn.Parameter, Any], None]


def shape_of(loaded: Any) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def read_shard(loaded: Any, dim: int, packed: int, index: int, count: int) -> torch.Tensor:
    """Shard ``index`` of ``count`` equal shards of ``loaded`` along ``dim``.

    ``packed`` > 1 means the dimension holds that many equal blocks side by side (a
    fused gate_up projection, say): each block is split, and the shard is its part of
    every block, in order.
    """
    full = shape_of(loaded)
    block = full[dim] // packed
    if full[dim] % (packed * count) or block % count:
        raise ValueError(f"dimension {dim} of size {full[dim]} does not split into {packed} x {count} shards")
    shard = block // count
    pieces = []
    for b in range(packed):
        start = b * block + index * shard
        window = tuple(slice(start, start + shard) if d == dim else slice(None) for d in range(len(full)))
        pieces.append(torch.as_tensor(loaded[window]))
    return pieces[0] if packed == 1 else torch.cat(pieces, dim=dim)


def read_full(loaded: Any) -> torch.Tensor:
    """All of ``loaded``; ``[...]`` (not ``[:]``) so that a 0-dim (scalar) tensor reads too."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]


def loadable_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, loader: WeightLoader) -> nn.Parameter:
    """An uninitialised parameter whose ``weight_loader(param, loaded)`` fills it from the checkpoint."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    return param
