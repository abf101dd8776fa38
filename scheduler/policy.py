"""Which waiting request to admit first (``--schedule-policy``).

- ``fcfs``: arrival order.
- ``lpm``: longest cached prefix first, so requests that share a prefix run while it is cached.
- ``dfs-weight``: walk the radix tree depth-first, heaviest subtree (most waiting
  requests under it) first, so requests with common prefixes are admitted together.
Prefix-aware policies fall back to fcfs on long queues, where matching every request
each step would cost more than it saves (as SGLang does).
"""

from __future__ import annotations

from collections import defaultdict

from srt.mem_cache.base_prefix_cache import PrefixCache, TreeNode
from srt.scheduler.req import Req

_PREFIX_POLICY_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache: PrefixCache) -> list[Req]:
    if policy == "fcfs" or len(waiting) > _PREFIX_POLICY_MAX_QUEUE or not cache.shares_prefixes:
        return list(waiting)
    matches = {id(r): cache.match_prefix(r.cache_key[:-1], r.lora_id) for r in waiting}
    if policy == "lpm":
        return sorted(waiting, key=lambda r: -len(matches[id(r)].kv_slots))
    return _dfs_weight_order(waiting, {id(r): matches[id(r)].last_node for r in waiting}, cache.all_roots())


def _dfs_weight_order(waiting: list[Req], node_of: dict[int, TreeNode], roots: list[TreeNode]) -> list[Req]:
    reqs_at = defaultdict(list)
    for req in waiting:
        reqs_at[id(node_of[id(req)])].append(req)
    weight: dict[int, int] = {}

    def subtree_weight(node) -> int:
        w = len(reqs_at[id(node)]) + sum(subtree_weight(c) for c in node.children.values())
        weight[id(node)] = w
        return w

    for root in roots:
        subtree_weight(root)
    order: list[Req] = []
    stack = sorted(roots, key=lambda r: weight[id(r)])  # one tree per LoRA adapter
    while stack:
        node = stack.pop()
        order.extend(reqs_at[id(node)])
        children = sorted(node.children.values(), key=lambda c: weight[id(c)])
        stack.extend(c for c in children if weight[id(c)])  # heaviest popped first
    return order
