"""TokenizerManager: the front of the runtime, living in the caller's asyncio loop.

It tokenizes requests, sends them to scheduler rank 0, and routes the detokenizer's
outputs back to each request's queue. Callers iterate ``generate_stream`` and get one
``ReqOutput`` (new tokens + text delta) per scheduler step; leaving the iteration
early (a client gone, a task cancelled) aborts the request so its KV is freed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from srt.ipc import AsyncReceiver, AsyncSender, IpcEndpoints
from srt.messages import (
    AbortReq,
    BatchTokenOut,
    FlushCacheDone,
    FlushCacheReq,
    GetInternalStateReq,
    InternalState,
    ReqOutput,
    TokenizedGenerateReq,
)
from srt.sampling_params import SamplingParams

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
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class TokenizerManager:
    def __init__(
        self,
        tokenizer,
        endpoints: IpcEndpoints,
        info: RuntimeInfo,
        dead_children: Callable[[], list[str]],
    ) -> None:
        self.tokenizer = tokenizer
        self.endpoints = endpoints
        self.info = info
        self.dead_children = dead_children
        self.states: dict[str, _ReqState] = {}
        self._control_waiters: dict[type, list[asyncio.Future]] = {}
        self._failure: str | None = None
        self._started = False

    async def start(self) -> None:
        """Open the sockets and start routing outputs; call once, inside the loop that will use it."""
        if self._started:
            return
        context = zmq.asyncio.Context.instance()
        self._to_scheduler = AsyncSender(context, self.endpoints.scheduler_input)
        self._from_detokenizer = AsyncReceiver(context, self.endpoints.tokenizer_input)
        self._tasks = [asyncio.create_task(self._route_outputs()), asyncio.create_task(self._watch_children())]
        self._started = True

    # ---- generation ------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []

    def check_request(self, input_ids: list[int], sampling_params: dict[str, Any] | None) -> SamplingParams:
        """Raise ValueError (with a client-facing message) for a request that cannot run."""
        params = SamplingParams.from_dict(sampling_params)
        params.validate(self.info.vocab_size)
        if not input_ids:
            raise ValueError("the prompt is empty")
        if len(input_ids) > self.info.max_req_input_len:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens, more than the {self.info.max_req_input_len} this server accepts"
            )
        if len(input_ids) + params.max_new_tokens > self.info.context_length:
            raise ValueError(
                f"the prompt ({len(input_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the context length ({self.info.context_length})"
            )
        return params

    async def generate_stream(
        self,
        input_ids: list[int],
        sampling_params: dict[str, Any] | None = None,
        rid: str | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> AsyncIterator[ReqOutput]:
        """Outputs of one request, step by step, the last one carrying ``finish_reason``."""
        self.check_request(input_ids, sampling_params)
        self._raise_if_failed()
        rid = rid or uuid.uuid4().hex
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        state = self.states[rid] = _ReqState()
        msg = TokenizedGenerateReq(rid, list(input_ids), dict(sampling_params or {}), return_logprob, top_logprobs_num)
        try:
            await self._to_scheduler.send(msg)
            while True:
                out = await state.queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finish_reason is not None:
                    state.finished = True
                yield out
                if state.finished:
                    return
        finally:
            self.states.pop(rid, None)
            if not state.finished and self._failure is None:
                # The caller stopped listening: free the request's memory in the scheduler.
                await self._to_scheduler.send(AbortReq(rid))

    async def abort(self, rid: str) -> None:
        await self._to_scheduler.send(AbortReq(rid))

    # ---- control ---------------------------------------------------------------------

    async def flush_cache(self) -> bool:
        reply = await self._control(FlushCacheReq(), FlushCacheDone)
        return reply.success

    async def get_internal_state(self) -> InternalState:
        return await self._control(GetInternalStateReq(), InternalState)

    async def _control(self, request: Any, reply_type: type) -> Any:
        self._raise_if_failed()
        future = asyncio.get_running_loop().create_future()
        self._control_waiters.setdefault(reply_type, []).append(future)
        await self._to_scheduler.send(request)
        return await future

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
        error = RuntimeDiedError(reason)
        for state in self.states.values():
            state.queue.put_nowait(error)
        for waiters in self._control_waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(error)
        self._control_waiters.clear()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeDiedError(self._failure)

    async def close(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
