"""srt.Engine: offline generation through the runtime's processes, without HTTP.

    llm = srt.Engine(model_path="...")
    print(llm.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})["text"])

The runtime's children are fresh interpreters (``python -m srt.scheduler`` ...), so a
script needs no ``if __name__ == "__main__":`` guard. The TokenizerManager runs in an
event loop on a background thread, so the same Engine serves blocking calls
(``generate``), iterators (``stream=True``) and other event loops (``async_generate``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

from srt.entrypoints.results import GenerateResult, collect
from srt.runtime.embedding_request import check_dimensions, encode_result, is_single, items_of
from srt.runtime.generate_request import GenerateReqInput
from srt.runtime.messages import InternalState, TokenizedGenerateReq
from srt.server_args import ServerArgs
from srt.tokenizer_manager.manager import TokenizerManager

logger = logging.getLogger(__name__)

_END = object()


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self.tokenizer_manager = TokenizerManager.launch(self.server_args)
        self.runtime = self.tokenizer_manager.runtime
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
        lora_path: str | list[str | None] | None = None,
        image_data: str | list[str] | list[str | list[str] | None] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """One prompt gives one result dict, a list gives a list. ``stream=True`` gives an iterator of
        incremental results (new ``text`` and ``output_ids`` since the previous one; with several
        prompts each item also says its ``index``). ``lora_path`` names the LoRA adapter (one for
        all prompts or one each, None for the base model). ``image_data``: the images of a prompt
        holding the model's image placeholders, as data: URIs, base64 or allowed file paths (for a
        batch, one entry per prompt)."""
        obj, reqs = self._check(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, stream, lora_path, image_data)
        if stream:
            return self._stream_sync(reqs, obj.is_single)
        results = [r.to_dict() for r in self._call(collect(self.tokenizer_manager, reqs))]
        return results[0] if obj.is_single else results

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        lora_path: str | list[str | None] | None = None,
        image_data: str | list[str] | list[str | list[str] | None] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """``generate`` for callers in their own event loop."""
        obj, reqs = self._check(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, stream, lora_path, image_data)
        if stream:
            return self._stream_async(reqs, obj.is_single)
        future = asyncio.run_coroutine_threadsafe(collect(self.tokenizer_manager, reqs), self._loop)
        results = [r.to_dict() for r in await asyncio.wrap_future(future)]
        return results[0] if obj.is_single else results

    def encode(
        self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None, dimensions: int | None = None
    ) -> dict | list[dict]:
        """Embeddings (or a classifier's scores) of one prompt or a list: ``{"embedding", "meta_info"}``
        each. ``dimensions`` truncates a Matryoshka model's embeddings."""
        inputs = prompt if prompt is not None else input_ids
        info = self.tokenizer_manager.info
        check_dimensions(dimensions, info)
        reqs = self.tokenizer_manager.check_embedding(items_of(inputs, "prompt"))
        results = [encode_result(out, info, dimensions) for out in self._call(self.tokenizer_manager.encode(reqs))]
        return results[0] if is_single(inputs) else results

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        """Load the PEFT adapter in folder ``lora_path`` as ``lora_name`` (InvalidRequestError says why not)."""
        self._call(self.tokenizer_manager.load_lora_adapter(lora_name, lora_path))

    def unload_lora_adapter(self, lora_name: str) -> None:
        """Unload an adapter; refused while a request uses it."""
        self._call(self.tokenizer_manager.unload_lora_adapter(lora_name))

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

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _check(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, stream, lora_path, image_data):
        """The request as a GenerateReqInput, tokenized and checked before anything is sent."""
        obj = GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            stream=stream,
            lora_path=lora_path,
            image_data=image_data,
        )
        return obj, self.tokenizer_manager.check(obj)

    async def _stream_all(self, reqs: list[TokenizedGenerateReq], single: bool, sink: Callable[[Any], None]) -> None:
        """Feed every incremental result to ``sink``, then ``_END`` (or the error that ended it)."""
        has_text, start = self.tokenizer is not None, time.perf_counter()
        try:
            async with aclosing(self.tokenizer_manager.generate(reqs)) as outputs:
                async for index, out in outputs:
                    item = GenerateResult.of(out, has_text, start).to_dict()
                    if not single:
                        item["index"] = index
                    sink(item)
        except Exception as e:
            sink(e)
        sink(_END)

    def _stream_sync(self, reqs: list[TokenizedGenerateReq], single: bool) -> Iterator[dict]:
        items: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._stream_all(reqs, single, items.put), self._loop)
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()  # a consumer that stops early aborts what is still running

    async def _stream_async(self, reqs: list[TokenizedGenerateReq], single: bool) -> AsyncIterator[dict]:
        caller_loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            caller_loop.call_soon_threadsafe(items.put_nowait, item)

        future = asyncio.run_coroutine_threadsafe(self._stream_all(reqs, single, sink), self._loop)
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()
