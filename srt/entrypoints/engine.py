"""srt.Engine: offline generation through the runtime's processes, without HTTP.

    with srt.Engine(model_path="...") as engine:
        out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
        print(out["text"])

The TokenizerManager runs in an event loop on a background thread, so the same
Engine serves blocking calls (``generate``), iterators (``stream=True``) and other
event loops (``async_generate``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from srt.runtime.messages import InternalState, ReqOutput
from srt.runtime.runtime import Runtime
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_END = object()


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self.runtime = Runtime(self.server_args)
        self.tokenizer_manager = self.runtime.tokenizer_manager
        self.tokenizer = self.tokenizer_manager.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="srt-engine-loop", daemon=True)
        self._thread.start()
        self._call(self.tokenizer_manager.start())

    # ---- public API ----------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict | list[dict] | Iterator[dict]:
        """One prompt gives one result dict, a list gives a list. ``stream=True`` gives an iterator of
        incremental results (new ``text`` and ``output_ids`` since the previous one; with several
        prompts each item also says its ``index``)."""
        requests, single = self._requests(prompt, sampling_params, input_ids)
        if stream:
            return self._stream_sync(requests, return_logprob, top_logprobs_num, single)
        outs = self._call(self._collect_all(requests, return_logprob, top_logprobs_num))
        return outs[0] if single else outs

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """``generate`` for callers in their own event loop."""
        requests, single = self._requests(prompt, sampling_params, input_ids)
        if stream:
            return self._stream_async(requests, return_logprob, top_logprobs_num, single)
        coro = self._collect_all(requests, return_logprob, top_logprobs_num)
        outs = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))
        return outs[0] if single else outs

    def flush_cache(self) -> bool:
        """Empty the prefix cache (refused while requests run)."""
        return self._call(self.tokenizer_manager.flush_cache())

    def get_internal_state(self) -> InternalState:
        """Free KV slots, cached tokens, running / waiting requests, retractions (for tests and /server_info)."""
        return self._call(self.tokenizer_manager.get_internal_state())

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._call(self.tokenizer_manager.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self.runtime.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _requests(self, prompt, sampling_params, input_ids) -> tuple[list[tuple[list[int], dict | None]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            ids = self.tokenizer_manager.tokenize([prompt] if single else list(prompt))
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling_params for {len(ids)} prompts")
        for p, sp in zip(ids, params):
            self.tokenizer_manager.check_request(p, sp)  # fail before anything is sent
        return list(zip(ids, params)), single

    async def _collect_all(self, requests, return_logprob: bool, top_n: int) -> list[dict]:
        async def one(ids, params) -> dict:
            result = None
            async for out in self.tokenizer_manager.generate_stream(ids, params, None, return_logprob, top_n, stream=False):
                result = _merge(result, _as_dict(out))
            return result

        return list(await asyncio.gather(*(one(ids, params) for ids, params in requests)))

    async def _stream_all(self, requests, return_logprob: bool, top_n: int, single: bool, sink) -> None:
        """Feed every incremental result to ``sink`` (a callable), then ``_END``."""

        async def one(index: int, ids, params) -> None:
            async for out in self.tokenizer_manager.generate_stream(ids, params, None, return_logprob, top_n):
                item = _as_dict(out)
                if not single:
                    item["index"] = index
                sink(item)

        try:
            await asyncio.gather(*(one(i, ids, params) for i, (ids, params) in enumerate(requests)))
        except Exception as e:
            sink(e)
        sink(_END)

    def _stream_sync(self, requests, return_logprob: bool, top_n: int, single: bool) -> Iterator[dict]:
        items: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(
            self._stream_all(requests, return_logprob, top_n, single, items.put), self._loop
        )
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()  # a consumer that stops early aborts what is still running

    async def _stream_async(self, requests, return_logprob: bool, top_n: int, single: bool) -> AsyncIterator[dict]:
        caller_loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            caller_loop.call_soon_threadsafe(items.put_nowait, item)

        future = asyncio.run_coroutine_threadsafe(self._stream_all(requests, return_logprob, top_n, single, sink), self._loop)
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()


def _as_dict(out: ReqOutput) -> dict:
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finish_reason,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
    }
    if out.logprobs:
        meta["output_token_logprobs"] = [(lp, t) for lp, t in zip(out.logprobs, out.new_token_ids)]
        meta["output_top_logprobs"] = out.top_logprobs
    return {"text": out.text, "output_ids": list(out.new_token_ids), "meta_info": meta}


def _merge(result: dict | None, delta: dict) -> dict:
    if result is None:
        return delta
    result["text"] += delta["text"]
    result["output_ids"] += delta["output_ids"]
    meta, new = result["meta_info"], delta["meta_info"]
    for key in ("output_token_logprobs", "output_top_logprobs"):
        if key in new:
            meta.setdefault(key, []).extend(new[key])
    meta.update({k: v for k, v in new.items() if k not in ("output_token_logprobs", "output_top_logprobs")})
    return result
