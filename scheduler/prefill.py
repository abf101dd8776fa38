"""Prefill admission: which waiting requests join the next prefill, and how much of each.

A step's prefill holds at most ``--max-prefill-tokens`` new tokens and, with chunked
prefill, at most ``--chunked-prefill-size``: a longer prompt is computed a chunk per
step, its request staying ``chunked`` until its prompt is done. A request is admitted
only while the KV slots left after the decode reservation of running requests hold
its prompt and its own reservation; a request alone is always admitted if its prompt
fits at all, so it never waits for memory that will never free.
"""

from __future__ import annotations

from srt.scheduler.decode import DecodeScheduler
from srt.scheduler.memory import RequestMemory
from srt.scheduler.policy import order_waiting
from srt.scheduler.req import Req
from srt.server_args import ServerArgs

# A waiting request whose uncached prefix shares at least this many tokens with a
# request in the current prefill batch waits one step for the cache to hold them.
_IN_BATCH_PREFIX_MIN_TOKENS = 32


class PrefillAdmission:
    def __init__(
        self, args: ServerArgs, memory: RequestMemory, decode: DecodeScheduler, max_running_requests: int, chunk_size: int | None
    ) -> None:
        self.args = args
        self.memory = memory
        self.cache = memory.cache
        self.decode = decode
        self.max_running_requests = max_running_requests
        self.max_loras_per_batch = args.max_loras_per_batch
        self.chunk_size = chunk_size
        self.chunked: Req | None = None  # the request whose prompt is being prefilled chunk by chunk
        self.prompt_tokens = 0  # of admitted requests, and how many of those the cache held
        self.cached_tokens = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def schedule(self, waiting: list[Req], running: list[Req]) -> list[Req]:
        """The next prefill batch; admitted requests leave ``waiting``."""
        batch: list[Req] = []
        token_budget = self.args.max_prefill_tokens
        chunk_budget = self.chunk_size or float("inf")
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            take = min(req.pending_len, chunk_budget)
            if not self.memory.reserve(req, take):
                self.chunked = req
                return []
            batch.append(req)
            token_budget -= take
            chunk_budget -= take
            if take < req.pending_len:
                self.chunked = req
                return batch
        admitted = []
        # The LoRA adapters of this step's forward (running requests decode with this prefill, or next).
        adapters = {r.lora_name for r in running + batch if r.lora_name is not None}
        for req in order_waiting(waiting, self.args.schedule_policy, self.cache):
            if len(running) + len(batch) >= self.max_running_requests or not self.memory.has_free_row():
                break
            if req.lora_name not in adapters and req.lora_name is not None and len(adapters) >= self.max_loras_per_batch:
                continue  # it waits for a batch whose adapters leave it a slot
            match = self.cache.match_prefix(req.cache_key[: req.reusable_prefix_len], req.lora_id)
            if self._shares_uncached_prefix(req, len(match.kv_slots), batch):
                continue  # next step it finds that prefix in the cache instead of computing it again
            pending = len(req.fill_ids) - len(match.kv_slots)
            take = min(pending, chunk_budget)
            if take <= 0 or (take > token_budget and batch):
                break
            free = int(self.memory.obtainable_tokens() - self.decode.reserved(running + batch))
            if take + self.decode.reservation(req) > free and (
                running or batch or take > self.memory.obtainable_tokens()
            ):
                break
            self.memory.admit(req, match)
            self._count_cache_hit(req)
            if not self.memory.reserve(req, take):
                self.memory.release(req)
                break
            admitted.append(req)
            batch.append(req)
            if req.lora_name is not None:
                adapters.add(req.lora_name)
            token_budget -= take
            chunk_budget -= take
            if take < pending:
                self.chunked = req
                break
        if admitted:
            admitted_ids = {id(r) for r in admitted}
            waiting[:] = [r for r in waiting if id(r) not in admitted_ids]
        return batch

    def _count_cache_hit(self, req: Req) -> None:
        if not req.admitted:  # a retracted request coming back is no new prompt
            req.admitted = True
            req.cached_tokens = req.kv_len
            self.prompt_tokens += len(req.input_ids)
            self.cached_tokens += req.kv_len

    def _shares_uncached_prefix(self, req: Req, cached: int, batch: list[Req]) -> bool:
        """Whether a request already in this prefill batch computes a long stretch of ``req``'s
        uncached prefix (as SGLang's in-batch prefix check: defer, don't compute twice)."""
        if not self.cache.shares_prefixes:
            return False
        ids = req.cache_key
        for other in batch:
            if other.lora_id != req.lora_id:
                continue  # computed under another adapter: it will not be in req's cache
            theirs = other.cache_key
            limit = min(len(ids), len(theirs))
            if limit - cached < _IN_BATCH_PREFIX_MIN_TOKENS or ids[cached] != theirs[cached]:
                continue
            shared = next((i for i in range(cached, limit) if ids[i] != theirs[i]), limit)
            if shared - cached >= _IN_BATCH_PREFIX_MIN_TOKENS:
                return True
        return False
