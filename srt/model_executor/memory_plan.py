"""How many KV tokens and running requests fit in this rank's memory after the weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srt.mem_cache.memory_pool import KVCache
from srt.platform import device as devices
from srt.platform.distributed import TPGroup
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class MemoryPlan:
    max_total_tokens: int
    max_running_requests: int
    context_length: int


def plan_memory(
    args: ServerArgs,
    kv_shape: tuple[int, int, int, int],
    kv_dtype: torch.dtype,
    context_length: int,
    device: torch.device,
    tp_group: TPGroup,
) -> MemoryPlan:
    """The KV cache takes its share of what is free now (``--mem-fraction-static``), capped
    by ``--max-total-tokens``; every rank gets the smallest rank's size, so all schedule alike."""
    per_token = KVCache.bytes_per_token(*kv_shape, kv_dtype)
    fraction = args.mem_fraction_static or devices.default_mem_fraction(device)
    ranks_on_host = args.tp_size // args.nnodes * args.dp_size
    budget_tokens = devices.kv_budget_bytes(device, fraction, ranks_on_host) // per_token
    max_total = min(budget_tokens, args.max_total_tokens) if args.max_total_tokens else budget_tokens
    if tp_group.size > 1:
        max_total = _min_across_ranks(max_total, device, tp_group)
    context = context_length
    if max_total < 2:
        raise RuntimeError(
            f"not enough memory for the KV cache: {max_total} token slots "
            f"({per_token} bytes per token); lower the context length or raise --mem-fraction-static"
        )
    if context > max_total:
        logger.warning(
            "the KV cache holds %d tokens, less than the context length %d: requests are capped at %d tokens",
            max_total,
            context,
            max_total,
        )
        context = max_total
    running = args.max_running_requests or max(1, min(4096, max_total // 2))
    logger.info("KV cache: %d tokens (%.1f MiB), up to %d running requests", max_total, max_total * per_token / 2**20, running)
    return MemoryPlan(max_total, running, context)


def _min_across_ranks(value: int, device: torch.device, tp_group: TPGroup) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    return int(tp_group.all_reduce(t, op=dist.ReduceOp.MIN).item())
