"""The tensor-parallel group: rank, size and the two collectives the model needs.

NCCL carries the model's collectives on CUDA, gloo on CPU. With one rank nothing is
initialised and the collectives are identities, so single-process runs need no setup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    cpu_group: object = None  # gloo group for control messages, whatever the model's backend


_tp = TPGroup()


def init_tp_group(rank: int, size: int, device: torch.device, init_method: str) -> None:
    """Join the tensor-parallel group (a no-op for a single rank)."""
    global _tp
    _tp = TPGroup(rank=rank, size=size)
    if size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=size)
    _tp.cpu_group = dist.new_group(backend="gloo")
    logger.info("rank %d/%d joined the %s group", rank, size, backend)


def tp_rank() -> int:
    return _tp.rank


def tp_size() -> int:
    return _tp.size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp.size > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (all shards have the same shape)."""
    if _tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's ``data`` on every rank (others pass None), over the gloo control group."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=_tp.cpu_group)
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data is not None
        else torch.empty(int(size.item()), dtype=torch.uint8)
    )
    if buffer.numel():
        dist.broadcast(buffer, src=0, group=_tp.cpu_group)
    return data if data is not None else buffer.numpy().tobytes()


def destroy_tp_group() -> None:
    if _tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
