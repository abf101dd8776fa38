"""The scheduler: continuous batching over one ModelRunner.

Each ``step`` either prefills what fits (new prompts, the next chunk of a long one,
retracted requests coming back) or decodes one token for every running request:
``pick batch → forward → sample → finish / cache``. The transport (in-process Engine
or the scheduler process) calls ``add_request`` / ``abort`` / ``step`` and ships the
returned ``ReqOutput`` list; nothing here knows about sockets.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from srt.model_executor.forward_batch import ForwardBatch
from srt.detokenizer.incremental import CONTEXT_TOKENS
from srt.runtime.messages import DetokInit, InternalState, ReqOutput, TokenizedGenerateReq
from srt.model_executor.model_runner import ModelRunner
from srt.sampling.sampler import SamplingBatch, SamplingRequest, sample, token_logprobs
from srt.sampling.sampling_params import check_generate_request
from srt.mem_cache.chunk_cache import ChunkCache
from srt.scheduler.policy import order_waiting
from srt.mem_cache.radix_cache import RadixCache
from srt.scheduler.req import Req
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Decode-growth reservation, as in SGLang: admission keeps room for
# ratio x (remaining new tokens, clipped) per running request; the ratio decays while
# decoding goes well and jumps back up after a retraction.
_INIT_NEW_TOKEN_RATIO = 0.7
_MIN_NEW_TOKEN_RATIO = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
_CLIP_MAX_NEW_TOKENS = 4096
# A waiting request whose uncached prefix shares at least this many tokens with a
# request in the current prefill batch waits one step for the cache to hold them.
_IN_BATCH_PREFIX_MIN_TOKENS = 32


class Scheduler:
    def __init__(self, server_args: ServerArgs, runner: ModelRunner, tokenizer=None) -> None:
        self.args = server_args
        self.runner = runner
        self.tokenizer = tokenizer
        self.allocator = runner.allocator
        self.req_to_token_pool = runner.req_to_token_pool
        self.cache = ChunkCache(self.allocator) if server_args.disable_radix_cache else RadixCache(self.allocator)
        self.context_length = runner.plan.context_length
        self.max_running_requests = runner.plan.max_running_requests
        # A request must leave room for at least one generated token.
        self.max_req_input_len = min(self.context_length, runner.plan.max_total_tokens) - 1
        chunk = server_args.chunked_prefill_size
        if chunk is None:
            from srt.platform.device import default_chunked_prefill_size

            chunk = default_chunked_prefill_size(runner.device)
        self.chunk_size = chunk if chunk > 0 else None
        self.eos_ids = _eos_ids([runner.config, runner.config.get_text_config(), runner.generation_config], tokenizer)
        self.vocab_size = runner.shape.vocab_size
        self._rng = random.Random(server_args.random_seed)

        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None  # the request whose prompt is being prefilled chunk by chunk
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self._prompt_tokens = 0
        self._hit_tokens = 0
        self._decode_steps = 0
        self._last_log = time.monotonic()
        self._generated_since_log = 0

    # ---- requests in ---------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReq) -> ReqOutput | None:
        """Queue a request; an invalid one is answered at once with an ``abort`` finish reason."""
        try:
            params = check_generate_request(
                msg.input_ids, msg.sampling_params, self.vocab_size, self.max_req_input_len, self.context_length
            )
        except ValueError as e:
            return ReqOutput(msg.rid, [], {"type": "abort", "message": str(e), "status_code": 400}, len(msg.input_ids), 0, 0, detok_init=DetokInit([], [], True, True, False))
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_ids)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        req = Req(msg.rid, list(msg.input_ids), params, seed, stop_ids, msg.return_logprob, msg.top_logprobs_num, msg.stream)
        self.waiting.append(req)
        return None

    def abort(self, rid: str) -> ReqOutput | None:
        """Drop a request wherever it is, freeing its memory now."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    return self._finish_now(req, {"type": "abort", "message": "aborted"})
        if self.chunked is not None and self.chunked.rid == rid:
            req, self.chunked = self.chunked, None
            return self._finish_now(req, {"type": "abort", "message": "aborted"})
        return None

    def _finish_now(self, req: Req, reason: dict) -> ReqOutput:
        req.finish_reason = reason
        self._release(req)
        return self._output(req)

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests are in flight."""
        if self.has_work():
            return False
        self.cache.reset()
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def internal_state(self) -> InternalState:
        return InternalState(
            free_kv_slots=self.allocator.available_size(),
            total_kv_slots=self.allocator.size,
            cached_tokens=self.cache.total_size(),
            evictable_tokens=self.cache.evictable_size(),
            running_requests=len(self.running) + (self.chunked is not None),
            waiting_requests=len(self.waiting),
            free_request_slots=self.req_to_token_pool.available_size(),
            total_request_slots=self.req_to_token_pool.size,
            num_retractions=self.num_retractions,
            cache_hit_rate=self._hit_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
        )

    # ---- one step ------------------------------------------------------------------

    def step(self) -> list[ReqOutput]:
        """Prefill what fits, else decode every running request; with ``--enable-mixed-chunk``
        the running requests decode in the same forward as the prefill (their inter-token
        latency no longer waits for other requests' prompts)."""
        prefill = self._schedule_prefill()
        decode = self._schedule_decode() if self.running and (not prefill or self.args.enable_mixed_chunk) else []
        return self._run(prefill, decode) if prefill or decode else []

    def _schedule_prefill(self) -> list[Req]:
        batch: list[Req] = []
        token_budget = self.args.max_prefill_tokens
        chunk_budget = self.chunk_size or float("inf")
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            take = min(req.pending_len, chunk_budget)
            if not self._reserve_slots(req, take):
                self.chunked = req
                return []
            batch.append(req)
            token_budget -= take
            chunk_budget -= take
            if take < req.pending_len:
                self.chunked = req
                return batch
        admitted = []
        for req in order_waiting(self.waiting, self.args.schedule_policy, self.cache):
            if len(self.running) + len(batch) >= self.max_running_requests or not self.req_to_token_pool.available_size():
                break
            match = self.cache.match_prefix(req.fill_ids[:-1])
            if self._shares_uncached_prefix(req, len(match.kv_slots), batch):
                continue  # next step it finds that prefix in the cache instead of computing it again
            pending = len(req.fill_ids) - len(match.kv_slots)
            take = min(pending, chunk_budget)
            if take <= 0 or (take > token_budget and batch):
                break
            reserve = int(min(req.remaining_new_tokens(), _CLIP_MAX_NEW_TOKENS) * self.new_token_ratio)
            if take + reserve > self._free_tokens(batch) and (
                self.running or batch or take > self.allocator.available_size() + self.cache.evictable_size()
            ):
                break  # alone, a request needs no decode reservation: it must not wait for memory that never frees
            self._admit(req, match)
            if not self._reserve_slots(req, take):
                self._release(req)
                break
            admitted.append(req)
            batch.append(req)
            token_budget -= take
            chunk_budget -= take
            if take < pending:
                self.chunked = req
                break
        if admitted:
            admitted_ids = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in admitted_ids]
        return batch

    def _shares_uncached_prefix(self, req: Req, cached: int, batch: list[Req]) -> bool:
        """Whether a request already in this prefill batch computes a long stretch of ``req``'s
        uncached prefix (as SGLang's in-batch prefix check: defer, don't compute twice)."""
        if isinstance(self.cache, ChunkCache):
            return False
        ids = req.fill_ids
        for other in batch:
            theirs = other.fill_ids
            limit = min(len(ids), len(theirs))
            if limit - cached < _IN_BATCH_PREFIX_MIN_TOKENS or ids[cached] != theirs[cached]:
                continue
            shared = next((i for i in range(cached, limit) if ids[i] != theirs[i]), limit)
            if shared - cached >= _IN_BATCH_PREFIX_MIN_TOKENS:
                return True
        return False

    def _free_tokens(self, batch: list[Req]) -> int:
        """KV slots obtainable now (free + evictable) minus the decode reservation of running requests."""
        reserved = sum(
            min(r.remaining_new_tokens(), _CLIP_MAX_NEW_TOKENS) * self.new_token_ratio for r in self.running + batch
        )
        return int(self.allocator.available_size() + self.cache.evictable_size() - reserved)

    def _admit(self, req: Req, match) -> None:
        req.req_pool_idx = self.req_to_token_pool.alloc()
        self.cache.inc_lock_ref(match.last_node)
        req.prefix_node = match.last_node
        req.kv_len = len(match.kv_slots)
        self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len] = match.kv_slots
        if not req.admitted:
            req.admitted = True
            req.cached_tokens = req.kv_len
            self._prompt_tokens += len(req.input_ids)
            self._hit_tokens += req.kv_len

    def _reserve_slots(self, req: Req, n: int) -> bool:
        """Allocate KV slots for the request's next ``n`` tokens (evicting cache if needed)."""
        slots = self._alloc(n)
        if slots is None:
            return False
        self.req_to_token_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        req.extend_len = n
        return True

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available_size()
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def _schedule_decode(self) -> list[Req]:
        """Every running request decodes one token; retract requests while memory is short."""
        while self.allocator.available_size() + self.cache.evictable_size() < len(self.running):
            if len(self.running) == 1:
                break  # a lone request always fits: admission checked its prompt against the pool
            self._retract_one()
        for req in self.running:
            if not self._reserve_slots(req, 1):
                raise RuntimeError("out of KV memory for a single decoding request")
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)
        return list(self.running)

    def _retract_one(self) -> None:
        """Send the request with the least progress back to the waiting queue, keeping its tokens."""
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        self.running.remove(victim)
        self._release(victim)
        victim.kv_len = 0
        self.waiting.insert(0, victim)
        self.num_retractions += 1
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        logger.info("KV cache is full: retracted request %s (%d tokens kept); #retracted=%d", victim.rid, len(victim.fill_ids), self.num_retractions)

    def _release(self, req: Req) -> None:
        """Give the request's KV to the prefix cache (which frees what it does not keep) and its row back."""
        if req.req_pool_idx is None:
            return
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        self.cache.cache_finished(req.fill_ids[: req.kv_len], slots, req.prefix_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.prefix_node = None

    # ---- forward, sample, finish ------------------------------------------------------

    def _run(self, prefill: list[Req], decode: list[Req]) -> list[ReqOutput]:
        batch = prefill + decode
        forward_batch = self._forward_batch(batch)
        logits = self.runner.forward(forward_batch)
        for req in batch:
            req.kv_len += req.extend_len
        for req in prefill:
            self._cache_prefix(req)
        # Requests whose whole prompt (or decode token) is now in the cache get a next token;
        # a request in the middle of a chunked prefill does not.
        sampled = [(i, r) for i, r in enumerate(batch) if r.pending_len == 0]
        outputs = self._sample([r for _, r in sampled], logits[[i for i, _ in sampled]]) if sampled else []
        if prefill:
            self.running.extend(r for i, r in sampled if i < len(prefill) and not r.finished)
            self._log_prefill(prefill)
        if decode:
            self._decode_steps += 1
            self._generated_since_log += len(decode)
            if self._decode_steps % self.args.decode_log_interval == 0:
                self._log_decode()
        return outputs

    def _forward_batch(self, batch: list[Req]) -> ForwardBatch:
        device = self.runner.device
        table = self.req_to_token_pool.req_to_token
        input_ids, positions = [], []
        for req in batch:
            fill = req.fill_ids
            input_ids.extend(fill[req.kv_len : req.kv_len + req.extend_len])
            positions.extend(range(req.kv_len, req.kv_len + req.extend_len))
        rows = torch.tensor([r.req_pool_idx for r in batch], dtype=torch.int64, device=device)
        position_t = torch.tensor(positions, dtype=torch.int64, device=device)
        row_per_token = torch.repeat_interleave(rows, torch.tensor([r.extend_len for r in batch], device=device))
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=position_t,
            out_cache_loc=table[row_per_token, position_t],
            req_pool_indices=rows,
            seq_lens=torch.tensor([r.kv_len + r.extend_len for r in batch], dtype=torch.int64, device=device),
            prefix_lens=[r.kv_len for r in batch],
            extend_lens=[r.extend_len for r in batch],
            req_to_token=table,
            kv_cache=self.runner.kv_cache,
        )

    def _cache_prefix(self, req: Req) -> None:
        """Share the prompt computed so far through the prefix cache right away (SGLang's cache_unfinished_req)."""
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        match = self.cache.cache_unfinished(req.fill_ids[: req.kv_len], slots, req.prefix_node)
        self.req_to_token_pool.req_to_token[req.req_pool_idx, : len(match.kv_slots)] = match.kv_slots
        req.prefix_node = match.last_node

    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> list[ReqOutput]:
        sampling = SamplingBatch.build(
            [SamplingRequest(r.params, r.input_ids, r.output_ids, r.seed, r.stop_ids) for r in reqs],
            self.vocab_size,
            logits.device,
        )
        next_ids = sample(logits, sampling)
        want_logprobs = [r.return_logprob for r in reqs]
        logprobs = (
            token_logprobs(logits, next_ids, [r.top_logprobs_num if r.return_logprob else 0 for r in reqs])
            if any(want_logprobs)
            else None
        )
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, next_ids.tolist())):
            if req.remaining_new_tokens() <= 0:  # max_new_tokens == 0: the prompt only
                req.finish_reason = {"type": "length", "length": 0}
                self._release(req)
                outputs.append(self._output(req))
                continue
            req.output_ids.append(token)
            if logprobs is not None and req.return_logprob:
                req.unsent_logprobs.append(logprobs.chosen[i])
                req.unsent_top_logprobs.append(logprobs.top[i])
            self._check_finished(req, token)
            if req.stream or req.finished:
                outputs.append(self._output(req))
            if req.finished:
                if req in self.running:
                    self.running.remove(req)
                self._release(req)
        return outputs

    def _check_finished(self, req: Req, token: int) -> None:
        if token in req.stop_ids and len(req.output_ids) >= req.params.min_new_tokens:
            req.finish_reason = {"type": "stop", "matched": token}
        elif req.params.stop and self.tokenizer is not None and (matched := self._matched_stop_string(req)):
            req.finish_reason = {"type": "stop", "matched": matched}
        elif req.remaining_new_tokens() <= 0:
            req.finish_reason = {"type": "length", "length": req.params.max_new_tokens}
        elif len(req.fill_ids) >= self.context_length:
            req.finish_reason = {"type": "length", "length": len(req.output_ids)}

    def _matched_stop_string(self, req: Req) -> str | None:
        if len(req.output_ids) < req.params.min_new_tokens:
            return None
        longest = max(len(s) for s in req.params.stop)
        tail = self.tokenizer.decode(req.output_ids[-(longest + 4) :], skip_special_tokens=req.params.skip_special_tokens)
        return next((s for s in req.params.stop if s in tail), None)

    def _output(self, req: Req) -> ReqOutput:
        """What the request generated since its last output (all of it at once for a request
        that does not stream, as SGLang does: nobody reads the steps in between)."""
        new_ids = req.output_ids[req.sent_len :]
        req.sent_len = len(req.output_ids)
        detok_init = None
        if not req.announced:
            req.announced = True
            p = req.params
            detok_init = DetokInit(
                req.input_ids[-CONTEXT_TOKENS:], p.stop, p.skip_special_tokens, p.spaces_between_special_tokens, p.no_stop_trim
            )
        out = ReqOutput(
            rid=req.rid,
            new_token_ids=new_ids,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.input_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            logprobs=req.unsent_logprobs,
            top_logprobs=req.unsent_top_logprobs,
            detok_init=detok_init,
        )
        req.unsent_logprobs, req.unsent_top_logprobs = [], []
        return out

    # ---- logging -----------------------------------------------------------------------

    def _token_usage(self) -> float:
        used = self.allocator.size - self.allocator.available_size() - self.cache.evictable_size()
        return used / self.allocator.size

    def _log_prefill(self, batch: list[Req]) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, #running-req: %d, #queue-req: %d",
            len(batch),
            sum(r.extend_len for r in batch),
            sum(r.kv_len - r.extend_len for r in batch),
            self._token_usage(),
            len(self.running),
            len(self.waiting),
        )

    def _log_decode(self) -> None:
        now = time.monotonic()
        throughput = self._generated_since_log / max(now - self._last_log, 1e-6)
        self._last_log, self._generated_since_log = now, 0
        state = self.internal_state()
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, cache hit rate: %.1f%%, gen throughput (token/s): %.2f, #queue-req: %d",
            len(self.running),
            self.allocator.size - state.free_kv_slots,
            self._token_usage(),
            100 * state.cache_hit_rate,
            throughput,
            len(self.waiting),
        )


def _eos_ids(configs: list, tokenizer) -> list[int]:
    """EOS ids from the model and generation configs, plus the tokenizer's."""
    ids: set[int] = set()
    for config in configs:
        source = getattr(config, "eos_token_id", None)
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
