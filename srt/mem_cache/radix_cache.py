"""Radix-tree prefix cache: requests that share a token prefix share its KV slots.

The tree maps token sequences to the KV slots that hold their keys and values. Each
node holds a run of tokens (``key``) and their slots (``value``, same length); the
path from the root spells a prefix. Nodes split on demand, so a match is exact to
the token.

Ownership. Every KV slot belongs to exactly one of: the allocator (free), the tree, or
one request. The cache keeps that true if callers follow these rules:

- ``match_prefix`` lends: the returned slots stay the tree's. Lock ``last_node``
  (``inc_lock_ref``) for as long as a request reads them, and never free them.
- ``insert(token_ids, kv_slots)`` returns ``n``, the number of leading tokens the tree
  already held. The tree takes ``kv_slots[n:]``. ``kv_slots[:n]`` stay with the
  caller: those it got from a match are the tree's own (never free them), the rest
  are duplicates of what the tree holds and the caller must free them.
- ``cache_finished`` / ``cache_unfinished`` apply these rules for a request, and are
  what the scheduler calls.

Namespaces. K/V computed under a LoRA adapter differ from the base model's for the same
tokens, so each adapter (``namespace``, the id of its load) has a tree of its own; None
is the base model's, ``root``. A prefix is only ever found in the tree it was put in. ``ChunkCache`` offers the same two methods, so one caller
  path frees every slot exactly once whichever cache is in use.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from srt.mem_cache.base_prefix_cache import MatchResult, PrefixCache, TreeNode
from srt.mem_cache.memory_pool import KVSlotAllocator


class RadixCache(PrefixCache):
    """Prefix cache over a radix tree, evicting unlocked leaves in LRU order."""

    shares_prefixes = True

    def __init__(self, allocator: KVSlotAllocator) -> None:
        self.allocator = allocator
        self._clock = itertools.count(1)
        self._clear()

    # ---- lookup and insertion ------------------------------------------------

    def match_prefix(self, token_ids: list[int], namespace: int | None = None) -> MatchResult:
        """The longest cached prefix of ``token_ids`` in ``namespace``'s tree.

        ``last_node`` ends exactly at the match (a node is split when the match stops
        inside it), so locking it protects exactly the matched tokens. Marks the
        matched path as recently used.
        """
        tick = next(self._clock)
        node, matched, slots = self._root(namespace), 0, []
        while matched < len(token_ids):
            child = node.children.get(token_ids[matched])
            if child is None:
                break
            n = _common_prefix_len(child.key, token_ids, matched)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = tick
            slots.append(child.value)
            node, matched = child, matched + n
        return MatchResult(self._concat(slots), node)

    def insert(self, token_ids: list[int], kv_slots: torch.Tensor, namespace: int | None = None) -> int:
        """Cache ``token_ids`` whose K/V sit at ``kv_slots``; return how many leading
        tokens were already cached.

        With ``n`` returned, the tree takes ownership of ``kv_slots[n:]``; the caller
        keeps ``kv_slots[:n]`` and must free the ones it did not get from a match
        (see the module docstring). The tree never replaces slots it already holds.
        """
        if len(kv_slots) != len(token_ids):
            raise ValueError(f"{len(token_ids)} tokens but {len(kv_slots)} KV slots")
        tick = next(self._clock)
        node, present = self._root(namespace), 0
        while present < len(token_ids):
            child = node.children.get(token_ids[present])
            if child is None:
                # Cloned: the caller's tensor is often a view of a row it will reuse.
                leaf = TreeNode(list(token_ids[present:]), kv_slots[present:].clone(), node, last_access=tick)
                node.children[leaf.key[0]] = leaf
                self._evictable += len(leaf.key)
                break
            n = _common_prefix_len(child.key, token_ids, present)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = tick
            node, present = child, present + n
        return present

    # ---- per-request bookkeeping (what the scheduler calls) -------------------

    def cache_finished(self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None) -> None:
        """A request is done: cache its tokens, free its duplicates, drop its lock.

        ``token_ids`` are the tokens whose K/V were computed, at ``kv_slots``;
        ``last_node`` is the node the request locked, and ``kv_slots`` must start with
        the slots of the match that returned it. Afterwards the request owns no slots.
        """
        present = self.insert(token_ids, kv_slots, namespace)
        # kv_slots[:depth] were lent by the tree (last_node ends where that match
        # ended); the request's own slots from there up to `present` are duplicates.
        self.allocator.free(kv_slots[_depth(last_node) : present])
        self.dec_lock_ref(last_node)

    def cache_unfinished(
        self, token_ids: list[int], kv_slots: torch.Tensor, last_node: TreeNode, namespace: int | None = None
    ) -> MatchResult:
        """A request computed a prefill chunk: cache what it has so far.

        Same arguments as ``cache_finished``. The request's duplicate slots are freed
        and its lock moves from ``last_node`` to the returned match's node. The
        returned ``kv_slots`` cover all of ``token_ids`` and are the ones the request
        must use from now on (they replace the ones it passed in).
        """
        present = self.insert(token_ids, kv_slots, namespace)
        self.allocator.free(kv_slots[_depth(last_node) : present])  # as in cache_finished
        match = self.match_prefix(token_ids, namespace)
        # Lock the new node before unlocking the old one, so shared ancestors stay locked.
        self.inc_lock_ref(match.last_node)
        self.dec_lock_ref(last_node)
        return match

    # ---- locking and eviction --------------------------------------------------

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction. Locks nest."""
        while node.parent is not None:  # the root holds no tokens
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one ``inc_lock_ref(node)``."""
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock_ref on a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free the least recently used unlocked tokens until ``num_tokens`` are freed
        or none are left; return how many were freed (whole nodes, so maybe more)."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            # Its parent may just have become an evictable leaf.
            if not parent.children and parent.lock_ref == 0 and parent.parent is not None:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def drop_namespace(self, namespace: int) -> None:
        """Free a namespace's whole tree (its adapter is gone; no request may hold any of it)."""
        root = self._roots.pop(namespace, None)
        if root is None:
            return
        for node in _subtree(root):
            if node.lock_ref:
                raise RuntimeError("drop_namespace while requests hold its prefixes")
            self.allocator.free(node.value)
            self._evictable -= len(node.key)

    def all_roots(self) -> list[TreeNode]:
        return list(self._roots.values())

    # ---- sizes and flush ---------------------------------------------------------

    def evictable_size(self) -> int:
        """Tokens in unlocked nodes: what ``evict`` could free now."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected

    def total_size(self) -> int:
        """Tokens (equally, KV slots) the tree holds."""
        return self._evictable + self._protected

    def reset(self) -> None:
        """Empty the tree and free every slot it holds.

        Only for when no request is running: a running request may hold slots the
        tree lent it, so a locked tree refuses.
        """
        if self._protected:
            raise RuntimeError("reset while requests hold locked prefixes")
        for node in self._nodes():
            self.allocator.free(node.value)
        self._clear()

    # ---- internals ---------------------------------------------------------------

    def _clear(self) -> None:
        self.root = TreeNode([], self._concat([]))
        self._roots: dict[int | None, TreeNode] = {None: self.root}
        self._evictable = 0
        self._protected = 0

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child`` after its first ``n`` tokens; return the new upper node.

        ``child`` keeps the lower part, so a request holding it as ``last_node`` still
        holds a node that ends where its prefix ends.
        """
        head = TreeNode(
            child.key[:n], child.value[:n], child.parent, lock_ref=child.lock_ref, last_access=child.last_access
        )
        child.parent.children[head.key[0]] = head
        child.key, child.value, child.parent = child.key[n:], child.value[n:], head
        head.children[child.key[0]] = child
        return head

    def _root(self, namespace: int | None) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode([], self._concat([]))
        return root

    def _nodes(self) -> list[TreeNode]:
        """Every node but the roots."""
        return [node for root in self._roots.values() for node in _subtree(root)]

    def _concat(self, slots: list[torch.Tensor]) -> torch.Tensor:
        if not slots:
            return torch.empty(0, dtype=torch.int64, device=self.allocator.device)
        return torch.cat(slots)


def _subtree(root: TreeNode) -> list[TreeNode]:
    """Every node below ``root``."""
    nodes, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def _common_prefix_len(key: list[int], token_ids: list[int], start: int) -> int:
    """How many leading tokens of ``key`` equal ``token_ids[start:]``."""
    n = min(len(key), len(token_ids) - start)
    for i in range(n):
        if key[i] != token_ids[start + i]:
            return i
    return n


def _depth(node: TreeNode) -> int:
    """Tokens from the root to the end of ``node``: the length of the match it ended."""
    depth = 0
    while node.parent is not None:
        depth += len(node.key)
        node = node.parent
    return depth
