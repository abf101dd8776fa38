"""TokenizerManager: the front of the runtime, living in the caller's asyncio loop.

It tokenizes requests, sends them to scheduler rank 0, and routes the detokenizer's
outputs back to each request's queue. Callers iterate ``generate_stream`` and get one
``ReqOutput`` (new tokens + text delta) per scheduler step; leaving the iteration
early (a client gone, a task cancelled) aborts the request so its KV is freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from srt.runtime.ipc import AsyncReceiver, AsyncSender, IpcEndpoints
from srt.runtime.messages import (
    AbortReq,
    BatchTokenOut,
    FlushCacheDone,
    FlushCacheReq,
    GetInternalStateReq,
    InternalState,
    ReqOutput,
    TokenizedGenerateReq,
)
from srt.entrypoints.metrics import Metrics
from srt.sampling.sampling_params import SamplingParams, check_generate_request

logger = logging.getLogger(__name__)


class RuntimeDiedError(RuntimeError):
    """A scheduler or detokenizer process is gone; no request can complete."""


@dataclass
class RuntimeInfo:
    """What the scheduler reported when it became ready."""

    max_total_tokens: int
    max_req_input_len: int
    context_length: int
    vocab_size: int


@dataclass
class _ReqState:
    replica: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class TokenizerManager:
    def __init__(
        self,
        tokenizer,
        endpoints: IpcEndpoints,
        info: RuntimeInfo,
        dead_children: Callable[[], list[str]],
        load_balance_method: str = "round_robin",
        metrics: Metrics | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.endpoints = endpoints
        self.info = info
        self.dead_children = dead_children
        self.metrics = metrics
        self.load_balance_method = load_balance_method
        self._next_replica = 0
        # Called once with the reason when a runtime process dies (the server exits on it).
        self.on_failure: Callable[[str], None] | None = None
        self.states: dict[str, _ReqState] = {}
        self._control_waiters: dict[type, list[asyncio.Future]] = {}
        self._failure: str | None = None
        self._started = False

    async def start(self) -> None:
        """Open the sockets and start routing outputs; call once, inside the loop that will use it."""
        if self._started:
            return
        context = zmq.asyncio.Context.instance()
        self._to_replicas = [AsyncSender(context, endpoint) for endpoint in self.endpoints.scheduler_inputs]
        self._from_detokenizer = AsyncReceiver(context, self.endpoints.tokenizer_input)
        self._tasks = [asyncio.create_task(self._route_outputs()), asyncio.create_task(self._watch_children())]
        self._started = True

    # ---- generation ------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []

    def check_request(self, input_ids: list[int], sampling_params: dict[str, Any] | None) -> SamplingParams:
        """Raise ValueError (with a client-facing message) for a request that cannot run."""
        info = self.info
        return check_generate_request(input_ids, sampling_params, info.vocab_size, info.max_req_input_len, info.context_length)

    async def generate_stream(
        self,
        input_ids: list[int],
        sampling_params: dict[str, Any] | None = None,
        rid: str | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = True,
    ) -> AsyncIterator[ReqOutput]:
        """Outputs of one request, step by step, the last one carrying ``finish_reason``. With
        ``stream=False`` the scheduler sends only that last output, holding every token:
        callers that just collect the result spare the detokenizer and this process a
        wake-up per step."""
        self.check_request(input_ids, sampling_params)
        self._raise_if_failed()
        rid = rid or uuid.uuid4().hex
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        state = self.states[rid] = _ReqState(self._pick_replica())
        msg = TokenizedGenerateReq(rid, list(input_ids), dict(sampling_params or {}), return_logprob, top_logprobs_num, stream)
        arrival = last = time.perf_counter()
        try:
            await self._to_replicas[state.replica].send(msg)
            while True:
                out = await state.queue.get()
                if isinstance(out, BaseException):
                    raise out
                now = time.perf_counter()
                if self.metrics is not None:
                    if stream:
                        self.metrics.observe_tokens(len(out.new_token_ids), now - last, first=last == arrival)
                    else:  # one output at the end: no first-token or inter-token time to observe
                        self.metrics.count_tokens(len(out.new_token_ids))
                    if out.finish_reason is not None:
                        self.metrics.observe_finished(out.prompt_tokens, out.cached_tokens, now - arrival)
                last = now
                if out.finish_reason is not None:
                    state.finished = True
                yield out
                if state.finished:
                    return
        finally:
            self.states.pop(rid, None)
            if not state.finished and self._failure is None:
                # The caller stopped listening: free the request's memory in the scheduler.
                await self._to_replicas[state.replica].send(AbortReq(rid))

    def _pick_replica(self) -> int:
        """Data parallelism: which replica takes the next request."""
        if len(self._to_replicas) == 1:
            return 0
        if self.load_balance_method == "shortest_queue":
            load = [0] * len(self._to_replicas)
            for state in self.states.values():
                load[state.replica] += 1
            return min(range(len(load)), key=load.__getitem__)
        self._next_replica = (self._next_replica + 1) % len(self._to_replicas)
        return self._next_replica

    async def abort(self, rid: str) -> None:
        state = self.states.get(rid)
        if state is not None:
            await self._to_replicas[state.replica].send(AbortReq(rid))

    async def abort_all(self) -> None:
        """Abort every request in flight (shutdown): each stream ends with an ``abort`` finish."""
        for rid in list(self.states):
            await self.abort(rid)

    # ---- control ---------------------------------------------------------------------

    async def flush_cache(self) -> bool:
        replies = await self._control(FlushCacheReq(), FlushCacheDone)
        return all(reply.success for reply in replies)

    async def get_internal_state(self) -> InternalState:
        """The scheduler's state (summed over data-parallel replicas)."""
        return InternalState.combine(await self.get_replica_states())

    async def get_replica_states(self) -> list[InternalState]:
        return await self._control(GetInternalStateReq(), InternalState)

    async def _control(self, request: Any, reply_type: type) -> list[Any]:
        """Send ``request`` to every replica and gather one reply from each."""
        self._raise_if_failed()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in self._to_replicas]
        self._control_waiters.setdefault(reply_type, []).extend(futures)
        for sender in self._to_replicas:
            await sender.send(request)
        return list(await asyncio.gather(*futures))

    # ---- background tasks --------------------------------------------------------------

    async def _route_outputs(self) -> None:
        while True:
            msg = await self._from_detokenizer.recv()
            if isinstance(msg, BatchTokenOut):
                for out in msg.outputs:
                    state = self.states.get(out.rid)
                    if state is not None:
                        state.queue.put_nowait(out)
            else:
                waiters = self._control_waiters.get(type(msg))
                if waiters:
                    waiters.pop(0).set_result(msg)

    async def _watch_children(self) -> None:
        while self._failure is None:
            await asyncio.sleep(0.5)
            dead = self.dead_children()
            if dead:
                self._fail(f"runtime process(es) died: {', '.join(dead)}")

    def _fail(self, reason: str) -> None:
        logger.error("%s; failing all requests", reason)
        self._failure = reason
        if self.on_failure is not None:
            self.on_failure(reason)
        error = RuntimeDiedError(reason)
        for state in self.states.values():
            state.queue.put_nowait(error)
        for waiters in self._control_waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(error)
        self._control_waiters.clear()

    @property
    def failure(self) -> str | None:
        """Why the runtime is down, or None while it is healthy."""
        return self._failure

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeDiedError(self._failure)

    async def close(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
