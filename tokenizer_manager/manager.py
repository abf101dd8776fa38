"""TokenizerManager: the front of the runtime, living in the caller's asyncio loop.

Every front (the Engine, ``/generate``, the OpenAI routes) hands it a
``GenerateReqInput``: ``check`` tokenizes and validates each prompt (the only check a
request gets), ``generate`` sends them to a scheduler replica and yields each prompt's
outputs as the detokenizer returns them. Leaving the iteration early (a client gone, a
task cancelled) aborts what still runs, so its KV memory is freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from srt.tokenizer_manager.metrics import Metrics
from srt.tokenizer_manager.request_checks import RequestChecks
from srt.lora.adapter import parse_lora_paths
from srt.model_loader.default_model import resolve_model_path
from srt.model_loader.tokenizer import load_tokenizer
from srt.multimodal.processor import ImageProcessor
from srt.runtime.generate_request import InvalidRequestError
from srt.runtime.ipc import AsyncReceiver, AsyncSender
from srt.runtime.messages import (
    AbortReq,
    BatchEmbeddingOut,
    BatchStrOut,
    BatchTokenOut,
    EmbeddingOutput,
    FlushCacheReq,
    GetInternalStateReq,
    InternalState,
    FinishAbort,
    LoadLoRAAdapterReq,
    ReqOutput,
    TokenizedBatch,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
    UnloadLoRAAdapterReq,
)
from srt.runtime.runtime import Runtime
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class RuntimeDiedError(RuntimeError):
    """A scheduler or detokenizer process is gone; no request can complete."""


@dataclass
class _ReqState:
    replica: int
    stream: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class TokenizerManager(RequestChecks):
    def __init__(self, runtime: Runtime, tokenizer, metrics: Metrics | None = None, images: ImageProcessor | None = None) -> None:
        """``tokenizer`` is None with ``--skip-tokenizer-init``: prompts must then be token ids,
        and outputs carry no text. ``images`` is the model's processor, for a model that takes images."""
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.images = images
        self.info = runtime.info
        self.metrics = metrics
        self.load_balance_method = runtime.server_args.load_balance_method
        self._next_replica = 0
        # Called once with the reason when a runtime process dies (the server exits on it).
        self.on_failure: Callable[[str], None] | None = None
        self.states: dict[str, _ReqState] = {}
        self._replies: dict[str, asyncio.Future] = {}  # control replies awaited, by request id
        self._failure: str | None = None
        self._background: set[asyncio.Task] = set()
        self._started = False
        # LoRA adapters the schedulers hold, by name (their folders): --lora-paths, then /load_lora_adapter.
        self.lora_adapters = parse_lora_paths(runtime.server_args.lora_paths)

    @classmethod
    def launch(cls, server_args: ServerArgs) -> TokenizerManager:
        """Start the runtime's processes and the manager in front of them. The tokenizer is
        loaded first, so a model folder without one fails at once, with what to do."""
        tokenizer = images = None
        if not server_args.skip_tokenizer_init:
            path = resolve_model_path(server_args.tokenizer_path or server_args.model_path)
            tokenizer = load_tokenizer(path, server_args.trust_remote_code)
        runtime = Runtime(server_args)
        if tokenizer is not None and runtime.info.image_refusal is None:  # the schedulers' model takes images
            try:
                images = ImageProcessor.load(path, server_args.trust_remote_code)
            except BaseException:
                runtime.shutdown()
                raise
            if images is not None and tokenizer.chat_template is None:
                tokenizer.chat_template = images.chat_template  # a VLM's template may live with its processor only
        return cls(runtime, tokenizer, images=images)

    async def start(self) -> None:
        """Open the sockets and start routing outputs; call once, inside the loop that will use it."""
        if self._started:
            return
        context = zmq.asyncio.Context.instance()
        endpoints = self.runtime.endpoints
        self._to_replicas = [AsyncSender(context, endpoint) for endpoint in endpoints.scheduler_inputs]
        self._from_runtime = AsyncReceiver(context, endpoints.tokenizer_input)
        self._tasks = [asyncio.create_task(self._route_outputs()), asyncio.create_task(self._watch_children())]
        self._started = True

    # ---- requests in (checked by RequestChecks) -----------------------------------------------

    async def encode(self, reqs: list[TokenizedEmbeddingReq]) -> list[EmbeddingOutput]:
        """Run pooling requests; one output each, in order. A request the scheduler refused
        raises InvalidRequestError (or RuntimeDiedError when the runtime gave it up)."""
        results: list[EmbeddingOutput | None] = [None] * len(reqs)
        async with contextlib.aclosing(self.generate(reqs)) as outputs:
            async for index, out in outputs:
                reason = out.finish_reason
                if isinstance(reason, FinishAbort):
                    if reason.status_code == 400:
                        raise InvalidRequestError(reason.message, param="input")
                    raise RuntimeDiedError(reason.message)
                results[index] = out
        return results  # type: ignore[return-value]

    async def generate(
        self, reqs: list[TokenizedGenerateReq] | list[TokenizedEmbeddingReq]
    ) -> AsyncIterator[tuple[int, ReqOutput | EmbeddingOutput]]:
        """Run every request at once; yield ``(index in reqs, output)`` as outputs arrive, a
        request's last output carrying its ``finish_reason``. A request that does not stream
        gets one output, when it finishes (a pooling request's is its ``EmbeddingOutput``).
        Closing the iterator early aborts what still runs."""
        self._raise_if_failed()
        self._check_rids_free([req.rid for req in reqs])  # again: another request may have taken one since
        merged: asyncio.Queue = asyncio.Queue()
        index_of = {req.rid: i for i, req in enumerate(reqs)}
        arrival = time.perf_counter()
        states = {}
        try:
            per_replica: dict[int, list] = {}
            for req in reqs:
                stream = getattr(req, "stream", False)
                states[req.rid] = self.states[req.rid] = _ReqState(self._pick_replica(), stream, merged)
                per_replica.setdefault(states[req.rid].replica, []).append(req)
            for replica, batch in per_replica.items():
                # One message for all of a call's requests: the scheduler sees them together, in one batch.
                await self._to_replicas[replica].send(batch[0] if len(batch) == 1 else TokenizedBatch(batch))
            last = dict.fromkeys(states, arrival)
            running = len(reqs)
            while running:
                out = await merged.get()
                if isinstance(out, BaseException):
                    raise out
                self._observe(out, states[out.rid].stream, arrival, last)
                if out.finish_reason is not None or isinstance(out, EmbeddingOutput):
                    states[out.rid].finished = True
                    running -= 1
                yield index_of[out.rid], out
        finally:
            unfinished = [(rid, state.replica) for rid, state in states.items() if not state.finished]
            for rid in states:
                self.states.pop(rid, None)
            if unfinished and self._failure is None:
                # The caller stopped listening: free the requests' memory in the scheduler. A task
                # of its own, so that it runs even when the caller's task is being cancelled.
                task = asyncio.get_running_loop().create_task(self._send_aborts(unfinished))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _send_aborts(self, requests: list[tuple[str, int]]) -> None:
        for rid, replica in requests:
            await self._to_replicas[replica].send(AbortReq(rid))

    def _observe(self, out: ReqOutput | EmbeddingOutput, stream: bool, arrival: float, last: dict[str, float]) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        if isinstance(out, EmbeddingOutput):
            self.metrics.observe_finished(out.prompt_tokens, out.cached_tokens, now - arrival)
            return
        if stream:
            self.metrics.observe_tokens(len(out.new_token_ids), now - last[out.rid], first=last[out.rid] == arrival)
        else:  # one output at the end: no first-token or inter-token time to observe
            self.metrics.count_tokens(len(out.new_token_ids))
        if out.finish_reason is not None:
            self.metrics.observe_finished(out.prompt_tokens, out.cached_tokens, now - arrival)
        last[out.rid] = now

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

    # ---- control -----------------------------------------------------------------------------

    async def flush_cache(self) -> bool:
        replies = await self._control(FlushCacheReq)
        return all(reply.success for reply in replies)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load an adapter on every scheduler; InvalidRequestError says why one refused."""
        if not self.runtime.server_args.enable_lora:
            raise InvalidRequestError("this server runs without --enable-lora", param="lora_name")
        if name in self.lora_adapters:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        await self._lora_control(lambda request_id: LoadLoRAAdapterReq(request_id, name, path), "lora_path")
        self.lora_adapters[name] = path

    async def unload_lora_adapter(self, name: str) -> None:
        """Unload an adapter from every scheduler (refused while a request uses it)."""
        self.check_lora(name)
        await self._lora_control(lambda request_id: UnloadLoRAAdapterReq(request_id, name), "lora_name")
        del self.lora_adapters[name]

    async def _lora_control(self, make: Callable[[str], Any], param: str) -> None:
        errors = [reply.error for reply in await self._control(make) if reply.error is not None]
        if errors:
            raise InvalidRequestError(errors[0], param=param)

    async def get_internal_state(self) -> InternalState:
        """The scheduler's state (summed over data-parallel replicas)."""
        return InternalState.combine(await self.get_replica_states())

    async def get_replica_states(self) -> list[InternalState]:
        return [reply.state for reply in await self._control(GetInternalStateReq)]

    async def _control(self, make: Callable[[str], Any]) -> list[Any]:
        """Send one control request (``make(request id)``) to each replica and gather the reply that
        names its request id."""
        self._raise_if_failed()
        loop = asyncio.get_running_loop()
        ids = [uuid.uuid4().hex for _ in self._to_replicas]
        futures = [self._replies.setdefault(request_id, loop.create_future()) for request_id in ids]
        try:
            for sender, request_id in zip(self._to_replicas, ids):
                await sender.send(make(request_id))
            return list(await asyncio.gather(*futures))
        finally:
            for request_id in ids:
                self._replies.pop(request_id, None)

    # ---- background tasks --------------------------------------------------------------------

    async def _route_outputs(self) -> None:
        while True:
            msg = await self._from_runtime.recv()
            if isinstance(msg, (BatchStrOut, BatchTokenOut, BatchEmbeddingOut)):
                for out in msg.outputs:
                    state = self.states.get(out.rid)
                    if state is not None:
                        # Without a tokenizer the scheduler's outputs come straight here, textless.
                        textless = isinstance(out, (ReqOutput, EmbeddingOutput))
                        state.queue.put_nowait(out if textless else ReqOutput(**vars(out)))
            elif (future := self._replies.get(msg.request_id)) is not None and not future.done():
                future.set_result(msg)

    async def _watch_children(self) -> None:
        while self._failure is None:
            await asyncio.sleep(0.5)
            dead = self.runtime.dead_children()
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
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)

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
