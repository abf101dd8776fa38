"""What the scheduler asks of a prefix cache, whichever one ``--disable-radix-cache`` picks.

The ownership rules for KV slots (who frees what, when) are spelled out in
radix_cache.py; ``ChunkCache`` keeps the same rules while sharing nothing, so the
scheduler has one code path.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

_node_ids = itertools.count()


@dataclass(eq=False)
class TreeNode:
    """A run of tokens following its parent's, and the KV slots that hold them.

    ``lock_ref`` counts the locks on this node or on any node below it: a node with
    ``lock_ref > 0`` is in use by some request and is never evicted.
    """

    key: list[int]
    value: torch.Tensor
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)  # by first token
    lock_ref: int = 0
    last_access: int = 0  # tick of a logical clock; the smallest is evicted first
    id: int = field(default_factory=lambda: next(_node_ids))  # breaks LRU ties


@dataclass
class MatchResult:
    """The cached prefix of a token sequence.

    ``kv_slots`` (int64, one per matched token) belong to the cache; ``last_node`` is
    the node to lock while a request uses them.
    """

    kv_slots: torch.Tensor
    last_node: TreeNode


class PrefixCache(ABC):
    """A map from token prefixes to the KV slots that hold them.

    ``root`` is the base model's tree's root (it holds no tokens), and ``all_roots`` those of
    every namespace (one per LoRA adapter: K/V of one never serve another), so prefix-aware
    scheduling policies can walk any cache. ``shares_prefixes`` says whether requests ever get
    slots computed by others: False for a cache that shares nothing, where looking
    for shared prefixes is wasted work.
    """

    root: TreeNode
    shares_prefixes: bool

    @abstractmethod
    def match_prefix(self, token_ids: list[int], namespace: int | None = None) -> MatchResult:
        """The longest cached prefix of ``token_ids`` in ``namespace``; its slots stay the cache's."""

    @abstractmethod
    def insert(self, token_ids: list[int], kv_slots: torch.Tensor, namespace: int | None = None) -> int:
        """Offer ``token_ids`` at ``kv_slots``; returns ``n``: the cache took ``kv_slots[n:]``."""

    @abstractmethod
    def cache_finished(self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None) -> None:
        """A request is done: keep what the cache wants, free the rest, drop its lock."""

    @abstractmethod
    def cache_unfinished(
        self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None
    ) -> MatchResult:
        """A request computed a prefill chunk: the slots (and node to lock) it uses from now on."""

    @abstractmethod
    def drop_namespace(self, namespace: int) -> None:
        """Free everything cached in ``namespace`` (an unloaded adapter's; none of it locked)."""

    @abstractmethod
    def all_roots(self) -> list[TreeNode]:
        """The root of every namespace's tree."""

    @abstractmethod
    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction. Locks nest."""

    @abstractmethod
    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one ``inc_lock_ref(node)``."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked tokens if there are that many; returns how many were freed."""

    @abstractmethod
    def evictable_size(self) -> int:
        """Tokens ``evict`` could free now."""

    @abstractmethod
    def protected_size(self) -> int:
        """Tokens locked by running requests."""

    @abstractmethod
    def total_size(self) -> int:
        """Tokens (equally, KV slots) the cache holds."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache and free every slot it holds (only while no request runs)."""
