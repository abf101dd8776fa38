"""The KV memory of the scheduler's requests: their rows of ``req_to_token`` and their KV slots.

A request's slots come from the allocator (evicting unlocked cache first when it is
short) or from a prefix-cache match; what a request computed goes to the prefix cache
after each prefill chunk and when it ends, so every slot is freed exactly once.
"""

from __future__ import annotations

import torch

from srt.mem_cache.base_prefix_cache import MatchResult, PrefixCache
from srt.mem_cache.memory_pool import KVSlotAllocator, ReqToTokenPool
from srt.scheduler.req import Req


class RequestMemory:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: KVSlotAllocator, cache: PrefixCache) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.cache = cache

    def obtainable_tokens(self) -> int:
        """KV slots that can be had now: free ones plus the cache's unlocked ones."""
        return self.allocator.available_size() + self.cache.evictable_size()

    def token_usage(self) -> float:
        """The fraction of KV slots held by requests (the cache's unlocked ones count as free)."""
        return 1 - self.obtainable_tokens() / self.allocator.size

    def has_free_row(self) -> bool:
        return self.req_to_token_pool.available_size() > 0

    def admit(self, req: Req, match: MatchResult) -> None:
        """Give the request a row that starts with its cached prefix, locked while the request lives."""
        req.req_pool_idx = self.req_to_token_pool.alloc()
        self.cache.inc_lock_ref(match.last_node)
        req.prefix_node = match.last_node
        req.kv_len = len(match.kv_slots)
        self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len] = match.kv_slots

    def reserve(self, req: Req, n: int) -> bool:
        """Allocate KV slots for the request's next ``n`` tokens (evicting cache if needed)."""
        slots = self._alloc(n)
        if slots is None:
            return False
        self.req_to_token_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        req.extend_len = n
        return True

    def unreserve(self, req: Req) -> None:
        """Free the slots ``reserve`` gave the request's next tokens (a prefill it will not run)."""
        self.allocator.free(self.req_to_token_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + req.extend_len].clone())
        req.extend_len = 0

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available_size()
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def cache_prefix(self, req: Req) -> None:
        """Share the prompt computed so far through the prefix cache right away (SGLang's cache_unfinished_req)."""
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        match = self.cache.cache_unfinished(req.cache_key[: req.kv_len], slots, req.prefix_node, req.lora_id)
        self.req_to_token_pool.req_to_token[req.req_pool_idx, : len(match.kv_slots)] = match.kv_slots
        req.prefix_node = match.last_node

    def release(self, req: Req) -> None:
        """Give the request's KV to the prefix cache (which frees what it does not keep) and its row back."""
        if req.req_pool_idx is None:
            return
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        self.cache.cache_finished(req.cache_key[: req.kv_len], slots, req.prefix_node, req.lora_id)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.prefix_node = None
