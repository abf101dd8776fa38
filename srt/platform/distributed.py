"""The tensor-parallel group: rank, size and the collectives the model and the scheduler need.

NCCL carries the model's collectives on CUDA, gloo on CPU. A single-rank group
initialises nothing and its collectives are identities, so single-process runs need
no setup: ``TPGroup()`` is that group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group, and the group's collectives."""

    rank: int = 0
    size: int = 1
    cpu_group: object = None  # gloo group for control messages, whatever the model's backend

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """``x`` reduced in place over every rank (summed, unless ``op`` says otherwise)."""
        if self.size > 1:
            dist.all_reduce(x, op=op)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (all shards have the same shape)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (others pass None), over the gloo control group."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.cpu_group)
        buffer = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data is not None
            else torch.empty(int(size.item()), dtype=torch.uint8)
        )
        if buffer.numel():
            dist.broadcast(buffer, src=0, group=self.cpu_group)
        return data if data is not None else buffer.numpy().tobytes()


def init_tp_group(rank: int, size: int, device: torch.device, init_method: str) -> TPGroup:
    """Join the tensor-parallel group (nothing to join for a single rank)."""
    if size == 1:
        return TPGroup()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=size)
    group = TPGroup(rank=rank, size=size, cpu_group=dist.new_group(backend="gloo"))
    logger.info("rank %d/%d joined the %s group", rank, size, backend)
    return group
