"""The prefix cache used with ``--disable-radix-cache``: nothing is shared.

Every request computes its whole prompt and keeps its own KV slots until it finishes,
then frees them all. It is a ``PrefixCache`` like ``RadixCache``, so the scheduler has
one code path: ``match_prefix`` finds nothing, ``insert`` takes nothing (it returns the
full length, so a caller freeing its duplicates ``kv_slots[:n]`` frees everything), and
the tree (a root without children) has no tokens to lock, evict or flush.
"""

from __future__ import annotations

import torch

from srt.mem_cache.base_prefix_cache import MatchResult, PrefixCache, TreeNode
from srt.mem_cache.memory_pool import KVSlotAllocator


class ChunkCache(PrefixCache):
    """A cache that caches nothing; every slot stays with the request that allocated it."""

    shares_prefixes = False

    def __init__(self, allocator: KVSlotAllocator) -> None:
        self.allocator = allocator
        empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        # The root stands for "no prefix" and never gets children; locking it is a no-op.
        self.root = TreeNode([], empty)

    def match_prefix(self, token_ids: list[int], namespace: int | None = None) -> MatchResult:
        """Always the empty match."""
        return MatchResult(self.root.value, self.root)

    def insert(self, token_ids: list[int], kv_slots: torch.Tensor, namespace: int | None = None) -> int:
        """Take nothing: returns ``len(token_ids)``, so all of ``kv_slots`` stays with the caller."""
        if len(kv_slots) != len(token_ids):
            raise ValueError(f"{len(token_ids)} tokens but {len(kv_slots)} KV slots")
        return len(token_ids)

    def cache_finished(self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None) -> None:
        """A request is done: free all its slots."""
        self.allocator.free(kv_slots)

    def cache_unfinished(
        self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None
    ) -> MatchResult:
        """A request computed a prefill chunk: it keeps its slots, returned as the match."""
        return MatchResult(kv_slots, self.root)

    def drop_namespace(self, namespace: int) -> None:
        pass

    def all_roots(self) -> list[TreeNode]:
        return [self.root]

    def inc_lock_ref(self, node: TreeNode) -> None:
        pass

    def dec_lock_ref(self, node: TreeNode) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass
