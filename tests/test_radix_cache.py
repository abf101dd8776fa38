"""What the prefix caches promise: exact token-level matches, no KV slot lost or freed
twice, locked prefixes kept, LRU eviction of the rest."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from srt.mem_cache.base_prefix_cache import MatchResult, PrefixCache, TreeNode
from srt.mem_cache.chunk_cache import ChunkCache
from srt.mem_cache.memory_pool import KVSlotAllocator
from srt.mem_cache.radix_cache import RadixCache

CPU = torch.device("cpu")


class CheckedAllocator(KVSlotAllocator):
    """A KVSlotAllocator that fails the test the moment a slot is freed twice."""

    def clear(self) -> None:
        super().clear()
        self.in_use: set[int] = set()

    def alloc(self, n: int) -> torch.Tensor | None:
        slots = super().alloc(n)
        if slots is not None:
            self.in_use.update(slots.tolist())
        return slots

    def free(self, slots: torch.Tensor) -> None:
        for slot in slots.tolist():
            assert slot in self.in_use, f"slot {slot} freed but not in use"
            self.in_use.remove(slot)
        super().free(slots)


def new_cache(size: int = 64) -> tuple[CheckedAllocator, RadixCache]:
    allocator = CheckedAllocator(size, CPU)
    return allocator, RadixCache(allocator)


def put(cache: RadixCache, allocator: KVSlotAllocator, token_ids: list[int]) -> torch.Tensor:
    """Insert fresh slots for ``token_ids`` the way a caller must: free the duplicates."""
    slots = allocator.alloc(len(token_ids))
    present = cache.insert(token_ids, slots)
    allocator.free(slots[:present])
    return slots


def depth(node: TreeNode) -> int:
    n = 0
    while node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n


def contents(cache: RadixCache | ChunkCache) -> dict[tuple[int, ...], int]:
    """Every cached prefix and the KV slot of its last token, read off the tree."""
    if isinstance(cache, ChunkCache):
        return {}
    found: dict[tuple[int, ...], int] = {}
    stack: list[tuple[tuple[int, ...], TreeNode]] = [((), cache.root)]
    while stack:
        prefix, node = stack.pop()
        for child in node.children.values():
            assert len(child.key) == len(child.value) > 0
            child_prefix = prefix
            for token, slot in zip(child.key, child.value.tolist()):
                child_prefix += (token,)
                found[child_prefix] = slot
            stack.append((child_prefix, child))
    return found


# ---- RadixCache: matching and inserting --------------------------------------


def test_empty_cache_matches_nothing():
    _, cache = new_cache()
    match = cache.match_prefix([1, 2, 3])
    assert match.kv_slots.tolist() == [] and match.kv_slots.dtype == torch.int64
    assert match.last_node is cache.root


def test_exact_match_returns_the_inserted_slots():
    allocator, cache = new_cache()
    slots = put(cache, allocator, [1, 2, 3])
    match = cache.match_prefix([1, 2, 3])
    assert match.kv_slots.tolist() == slots.tolist()
    assert depth(match.last_node) == 3
    assert cache.match_prefix([1, 2, 3, 4, 5]).kv_slots.tolist() == slots.tolist()


def test_partial_match_splits_the_node_and_both_branches_still_match():
    allocator, cache = new_cache()
    abcd = put(cache, allocator, [1, 2, 3, 4])

    match = cache.match_prefix([1, 2, 9])
    assert match.kv_slots.tolist() == abcd[:2].tolist()
    assert match.last_node.key == [1, 2], "last_node ends exactly at the match"

    assert cache.insert([1, 2, 5, 6], torch.tensor([50, 51, 52, 53])) == 2
    assert cache.match_prefix([1, 2, 3, 4]).kv_slots.tolist() == abcd.tolist()
    assert cache.match_prefix([1, 2, 5, 6]).kv_slots.tolist() == abcd[:2].tolist() + [52, 53]
    assert cache.match_prefix([1, 2, 5, 7]).kv_slots.tolist() == abcd[:2].tolist() + [52]
    assert cache.total_size() == 6


def test_insert_returns_the_length_already_cached_and_keeps_its_own_slots():
    allocator, cache = new_cache()
    first = put(cache, allocator, [1, 2, 3])
    dup = allocator.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], dup) == 3
    # The tree took only dup[3:]; it still serves its original slots for the prefix.
    assert cache.match_prefix([1, 2, 3, 4, 5]).kv_slots.tolist() == first.tolist() + dup[3:].tolist()
    assert cache.insert([1, 2], torch.tensor([7, 8])) == 2
    assert cache.insert([], torch.tensor([], dtype=torch.int64)) == 0


def test_insert_copies_the_slots_it_takes():
    _, cache = new_cache()
    row = torch.tensor([10, 11, 12])
    cache.insert([1, 2, 3], row)
    row[:] = 0  # the caller reuses its buffer
    assert cache.match_prefix([1, 2, 3]).kv_slots.tolist() == [10, 11, 12]


def test_insert_rejects_mismatched_lengths():
    _, cache = new_cache()
    with pytest.raises(ValueError):
        cache.insert([1, 2], torch.tensor([5]))


# ---- RadixCache: locking, sizes, eviction, reset ------------------------------


def test_evicts_least_recently_used_leaves_first():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 1])
    put(cache, allocator, [2, 2])
    put(cache, allocator, [3, 3])
    cache.match_prefix([1, 1])  # [1, 1] is now the most recently used

    assert cache.evict(2) == 2
    assert len(cache.match_prefix([2, 2]).kv_slots) == 0
    assert len(cache.match_prefix([1, 1]).kv_slots) == 2
    assert len(cache.match_prefix([3, 3]).kv_slots) == 2
    assert allocator.available_size() == 64 - 4


def test_evicting_a_leaf_exposes_its_parent():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2, 3])
    put(cache, allocator, [1, 2, 4])  # splits into [1, 2] -> {[3], [4]}
    assert cache.evict(2) == 2  # the two leaves
    assert cache.match_prefix([1, 2, 3]).last_node.key == [1, 2]
    assert cache.evict(1) == 2  # then the parent they left behind, a leaf now
    assert cache.total_size() == 0
    assert allocator.available_size() == 64


def test_evict_frees_whole_nodes_and_stops_when_nothing_is_evictable():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2, 3, 4])
    assert cache.evict(1) == 4
    assert cache.evict(1) == 0
    assert allocator.available_size() == 64


def test_locked_prefixes_are_never_evicted():
    allocator, cache = new_cache()
    slots = put(cache, allocator, [1, 2, 3, 4])
    put(cache, allocator, [5, 6])
    match = cache.match_prefix([1, 2, 9])
    cache.inc_lock_ref(match.last_node)

    assert cache.evict(100) == 4  # [3, 4] and [5, 6]; [1, 2] is locked
    assert cache.match_prefix([1, 2]).kv_slots.tolist() == slots[:2].tolist()
    cache.dec_lock_ref(match.last_node)
    assert cache.evict(100) == 2
    assert cache.total_size() == 0


def test_sizes_count_shared_locked_prefixes_once():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2, 3])
    put(cache, allocator, [1, 2, 4, 5])
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (5, 0, 5)

    a = cache.match_prefix([1, 2, 3]).last_node
    b = cache.match_prefix([1, 2, 4, 5]).last_node
    cache.inc_lock_ref(a)
    cache.inc_lock_ref(b)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 5)
    cache.dec_lock_ref(a)
    assert (cache.evictable_size(), cache.protected_size()) == (1, 4)
    cache.dec_lock_ref(b)
    assert (cache.evictable_size(), cache.protected_size()) == (5, 0)
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(b)


def test_a_split_keeps_the_lock_on_both_halves():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2, 3, 4])
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(node)
    cache.match_prefix([1, 2])  # splits the locked node
    assert (cache.evictable_size(), cache.protected_size()) == (0, 4)
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (4, 0)


def test_reset_frees_every_slot():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2, 3])
    put(cache, allocator, [1, 4])
    cache.reset()
    assert cache.total_size() == 0
    assert allocator.available_size() == 64
    assert len(cache.match_prefix([1, 2, 3]).kv_slots) == 0


def test_reset_refuses_while_a_prefix_is_locked():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2])
    cache.inc_lock_ref(cache.match_prefix([1, 2]).last_node)
    with pytest.raises(RuntimeError):
        cache.reset()


# ---- Requests: cache_unfinished / cache_finished ------------------------------


def test_two_requests_computing_the_same_prefix_end_up_sharing_it():
    allocator, cache = new_cache()
    a_slots, b_slots = allocator.alloc(4), allocator.alloc(4)
    root = cache.match_prefix([1, 2, 3, 4]).last_node  # both found nothing cached

    a = cache.cache_unfinished([1, 2, 3, 4], a_slots, root)
    assert a.kv_slots.tolist() == a_slots.tolist()
    b = cache.cache_unfinished([1, 2, 3, 4], b_slots, root)
    assert b.kv_slots.tolist() == a_slots.tolist(), "b must switch to the tree's slots"
    assert b.last_node is a.last_node
    assert allocator.available_size() == 64 - 4, "b's duplicates were freed"
    assert cache.protected_size() == 4

    cache.cache_finished([1, 2, 3, 4], a.kv_slots, a.last_node)
    cache.cache_finished([1, 2, 3, 4], b.kv_slots, b.last_node)
    assert (cache.evictable_size(), cache.protected_size()) == (4, 0)
    assert allocator.available_size() == 64 - 4


def test_finished_request_frees_only_its_own_duplicates():
    allocator, cache = new_cache()
    put(cache, allocator, [1, 2])
    match = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(match.last_node)
    slots = torch.cat([match.kv_slots, allocator.alloc(3)])  # computes [3, 4, 5]
    put(cache, allocator, [1, 2, 3])  # meanwhile another request cached [3]

    cache.cache_finished([1, 2, 3, 4, 5], slots, match.last_node)
    assert cache.total_size() == 5 and cache.protected_size() == 0
    assert allocator.available_size() == 64 - 5
    assert cache.match_prefix([1, 2, 3, 4, 5]).kv_slots.tolist()[3:] == slots[3:].tolist()


def test_chunked_prefill_moves_the_lock_forward():
    allocator, cache = new_cache()
    tokens = [1, 2, 3, 4, 5, 6]
    match = cache.match_prefix(tokens)
    slots = allocator.alloc(3)
    match = cache.cache_unfinished(tokens[:3], slots, match.last_node)
    assert cache.protected_size() == 3
    slots = torch.cat([match.kv_slots, allocator.alloc(3)])
    match = cache.cache_unfinished(tokens, slots, match.last_node)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 6)
    cache.cache_finished(tokens, match.kv_slots, match.last_node)
    assert (cache.evictable_size(), cache.protected_size()) == (6, 0)
    assert allocator.available_size() == 64 - 6


# ---- The PrefixCache interface ----------------------------------------------------


@pytest.mark.parametrize("cache_class, shares", [(RadixCache, True), (ChunkCache, False)])
def test_both_caches_are_prefix_caches_with_a_root(cache_class, shares):
    cache = cache_class(CheckedAllocator(64, CPU))
    assert isinstance(cache, PrefixCache)
    assert cache.shares_prefixes is shares
    # An empty cache's root is where every lookup ends: prefix-aware policies walk from it.
    assert cache.root.parent is None and not cache.root.children
    assert cache.match_prefix([1, 2, 3]).last_node is cache.root


def test_chunk_cache_root_never_grows():
    allocator = CheckedAllocator(64, CPU)
    cache = ChunkCache(allocator)
    slots = allocator.alloc(3)
    cache.cache_finished([1, 2, 3], slots, cache.match_prefix([1, 2, 3]).last_node)
    assert not cache.root.children and len(cache.root.key) == 0


# ---- ChunkCache ----------------------------------------------------------------


def test_chunk_cache_shares_nothing_and_frees_everything_at_finish():
    allocator = CheckedAllocator(64, CPU)
    cache = ChunkCache(allocator)
    slots = allocator.alloc(4)
    match = cache.match_prefix([1, 2, 3, 4])
    assert len(match.kv_slots) == 0
    cache.inc_lock_ref(match.last_node)

    kept = cache.cache_unfinished([1, 2, 3, 4], slots, match.last_node)
    assert kept.kv_slots.tolist() == slots.tolist()
    assert len(cache.match_prefix([1, 2, 3, 4]).kv_slots) == 0
    assert allocator.available_size() == 60

    cache.cache_finished([1, 2, 3, 4], kept.kv_slots, kept.last_node)
    assert allocator.available_size() == 64
    assert (cache.total_size(), cache.evictable_size(), cache.protected_size(), cache.evict(10)) == (0, 0, 0, 0)


def test_chunk_cache_insert_leaves_every_slot_to_the_caller():
    allocator = CheckedAllocator(64, CPU)
    cache = ChunkCache(allocator)
    put(cache, allocator, [1, 2, 3])  # frees slots[:insert(...)], i.e. all of them
    assert allocator.available_size() == 64


# ---- Random operation sequences -------------------------------------------------

tokens = st.lists(st.integers(0, 3), max_size=12)  # few distinct tokens: prefixes collide often


@dataclass
class LiveRequest:
    token_ids: list[int]  # every token it will have: prompt, then output
    kv_slots: torch.Tensor  # K/V of token_ids[: len(kv_slots)]; the first depth(last_node) lent by the cache
    last_node: TreeNode


class CacheMachine(RuleBasedStateMachine):
    """Random requests and raw calls against one cache, checked after every step."""

    cache_cls: type = RadixCache
    size = 64  # small enough that allocating sometimes has to evict

    def __init__(self) -> None:
        super().__init__()
        self.allocator = CheckedAllocator(self.size, CPU)
        self.cache = self.cache_cls(self.allocator)
        self.requests: list[LiveRequest] = []
        self.locks: list[tuple[list[int], TreeNode]] = []  # raw locks, with the tokens they cover
        self.seen = contents(self.cache)
        self.inserted: list[tuple[list[int], torch.Tensor]] = []  # this step's inserts

    def alloc(self, n: int) -> torch.Tensor | None:
        slots = self.allocator.alloc(n)
        if slots is None:
            self.cache.evict(n - self.allocator.available_size())
            slots = self.allocator.alloc(n)
        return slots

    def check_match(self, token_ids: list[int]) -> MatchResult:
        """Match, checking the result against the tree's contents before the match."""
        expected = []
        for i in range(len(token_ids)):
            slot = self.seen.get(tuple(token_ids[: i + 1]))
            if slot is None:
                break
            expected.append(slot)
        match = self.cache.match_prefix(token_ids)
        assert match.kv_slots.tolist() == expected
        assert depth(match.last_node) == len(expected)
        return match

    @rule(token_ids=tokens)
    def match(self, token_ids):
        self.check_match(token_ids)

    @rule(token_ids=tokens)
    def insert(self, token_ids):
        slots = self.alloc(len(token_ids))
        if slots is None:
            return
        self.seen = contents(self.cache)  # alloc may have evicted
        present = self.cache.insert(token_ids, slots)
        if isinstance(self.cache, RadixCache):
            cached = 0
            while cached < len(token_ids) and tuple(token_ids[: cached + 1]) in self.seen:
                cached += 1
            assert present == cached
        else:
            assert present == len(token_ids)
        self.allocator.free(slots[:present])
        self.inserted.append((token_ids, slots))

    @rule(token_ids=tokens)
    def lock(self, token_ids):
        match = self.check_match(token_ids)
        self.cache.inc_lock_ref(match.last_node)
        self.locks.append((token_ids[: len(match.kv_slots)], match.last_node))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i):
        _, node = self.locks.pop(i % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(n=st.integers(0, 30))
    def evict(self, n):
        before = self.cache.evictable_size()
        freed = self.cache.evict(n)
        assert freed == before if before <= n else n <= freed <= before
        assert self.cache.evictable_size() == before - freed

    @precondition(lambda self: len(self.requests) < 4)
    @rule(token_ids=tokens)
    def start_request(self, token_ids):
        match = self.check_match(token_ids)
        self.cache.inc_lock_ref(match.last_node)
        self.requests.append(LiveRequest(token_ids, match.kv_slots, match.last_node))

    @precondition(lambda self: 0 < len(self.requests) < 4)
    @rule(i=st.integers(0, 100), cut=st.integers(0, 12), suffix=tokens)
    def start_request_sharing_a_prompt(self, i, cut, suffix):
        # Two requests prefilling the same tokens at once: the later one's slots
        # become duplicates that cache_unfinished must swap for the tree's.
        other = self.requests[i % len(self.requests)]
        self.start_request((other.token_ids[:cut] + suffix)[:12])

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100), chunk=st.integers(0, 6))
    def prefill_chunk(self, i, chunk):
        req = self.requests[i % len(self.requests)]
        new = self.alloc(min(chunk, len(req.token_ids) - len(req.kv_slots)))
        if new is None:
            return
        slots = torch.cat([req.kv_slots, new])
        done = req.token_ids[: len(slots)]
        match = self.cache.cache_unfinished(done, slots, req.last_node)
        assert len(match.kv_slots) == len(done)
        req.kv_slots, req.last_node = match.kv_slots, match.last_node
        self.inserted.append((done, slots))

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100), steps=st.integers(1, 6))
    def decode(self, i, steps):
        # Decoded tokens get slots but are cached only when the request finishes.
        req = self.requests[i % len(self.requests)]
        new = self.alloc(min(steps, len(req.token_ids) - len(req.kv_slots)))
        if new is not None:
            req.kv_slots = torch.cat([req.kv_slots, new])

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100))
    def finish_request(self, i):
        self.finish(self.requests.pop(i % len(self.requests)))

    def finish(self, req: LiveRequest) -> None:
        done = req.token_ids[: len(req.kv_slots)]
        self.cache.cache_finished(done, req.kv_slots, req.last_node)
        self.inserted.append((done, req.kv_slots))

    @rule()
    def flush(self):
        while self.requests:
            self.finish(self.requests.pop())
        while self.locks:
            self.cache.dec_lock_ref(self.locks.pop()[1])
        self.cache.reset()
        assert self.cache.total_size() == 0
        assert self.allocator.available_size() == self.size and not self.allocator.in_use

    @invariant()
    def slots_are_accounted_for(self):
        now = contents(self.cache)
        # The tree never changes the slot of a prefix it holds; new prefixes carry
        # the slots they were inserted with.
        for prefix, slot in now.items():
            if prefix in self.seen:
                assert slot == self.seen[prefix]
            else:
                assert any(
                    list(prefix) == ids[: len(prefix)] and slot == slots[len(prefix) - 1].item()
                    for ids, slots in self.inserted
                )
        self.seen, self.inserted = now, []

        tree_slots = set(now.values())
        assert len(tree_slots) == len(now) == self.cache.total_size()
        assert self.cache.evictable_size() + self.cache.protected_size() == self.cache.total_size()

        owned: set[int] = set()
        locked: set[tuple[int, ...]] = set()
        for req in self.requests:
            lent = depth(req.last_node)
            for i, slot in enumerate(req.kv_slots[:lent].tolist()):
                assert now[tuple(req.token_ids[: i + 1])] == slot, "a request reads the tree's slots"
            mine = set(req.kv_slots[lent:].tolist())
            assert len(mine) == len(req.kv_slots) - lent and not mine & (owned | tree_slots)
            owned |= mine
            locked |= {tuple(req.token_ids[:k]) for k in range(1, lent + 1)}
        for token_ids, node in self.locks:
            locked |= {tuple(token_ids[:k]) for k in range(1, depth(node) + 1)}

        assert self.allocator.in_use == tree_slots | owned
        assert self.allocator.available_size() + self.cache.total_size() + len(owned) == self.size
        assert self.cache.protected_size() == len(locked)


class ChunkCacheMachine(CacheMachine):
    cache_cls = ChunkCache


TestRadixCacheRandomOps = CacheMachine.TestCase
TestRadixCacheRandomOps.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)
TestChunkCacheRandomOps = ChunkCacheMachine.TestCase
TestChunkCacheRandomOps.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_namespaces_never_share_prefixes_and_drop_frees_a_whole_one():
    """A LoRA adapter's K/V live in its own tree: the same tokens in another namespace (or the
    base model's) are not a match, and dropping the namespace frees exactly its slots."""
    allocator, cache = new_cache()
    base = put(cache, allocator, [1, 2, 3])
    slots = allocator.alloc(4)
    assert cache.insert([1, 2, 3, 4], slots, namespace=7) == 0  # the base model's [1, 2, 3] is no help
    assert cache.match_prefix([1, 2, 3, 4], namespace=7).kv_slots.tolist() == slots.tolist()
    assert cache.match_prefix([1, 2, 3, 4]).kv_slots.tolist() == base.tolist()
    assert len(cache.match_prefix([1, 2, 3, 4], namespace=8).kv_slots) == 0
    assert cache.total_size() == 7 and len(cache.all_roots()) == 3  # namespace 8's root was made empty
    free_before = allocator.available_size()
    cache.drop_namespace(7)
    assert allocator.available_size() == free_before + 4
    assert cache.total_size() == cache.evictable_size() == 3
    assert len(cache.match_prefix([1, 2, 3, 4], namespace=7).kv_slots) == 0
    assert cache.evict(100) == 3  # what is left is the base model's
