"""The HTTP app: native endpoints (``/generate``, health, info, cache, abort, metrics), the
OpenAI-compatible router, OpenAI-shaped errors and API-key checks.

Handlers talk only to the TokenizerManager kept in ``app.state``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from srt.entrypoints.errors import APIError, JSONResponse
from srt.runtime.messages import ReqOutput
from srt.entrypoints.metrics import Metrics
from srt.runtime.runtime import Runtime
from srt.server_args import ServerArgs
from srt.tokenizer_manager.manager import RuntimeDiedError, TokenizerManager

logger = logging.getLogger(__name__)

T = TypeVar("T")


class GenerateReqInput(BaseModel):
    """Body of ``POST /generate`` (SGLang's names)."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    rid: str | list[str] | None = None


class AbortReqInput(BaseModel):
    rid: str


def build_app(runtime: Runtime, server_args: ServerArgs) -> FastAPI:
    tm = runtime.tokenizer_manager
    model_name = server_args.served_model_name or server_args.model_path or runtime.model_path
    tm.metrics = Metrics(model_name)  # the HTTP front is where latencies are measured

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await tm.start()
        await _warm_up(tm)
        app.state.ready = True
        logger.info("The server is fired up and ready to roll! (http://%s:%d)", server_args.host, server_args.port)
        yield
        app.state.ready = False
        await tm.abort_all()
        await tm.close()

    app = FastAPI(title="srt", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.tokenizer_manager = tm
    app.state.server_args = server_args
    app.state.model_name = model_name
    app.state.runtime = runtime
    app.state.ready = False
    _install_error_handlers(app)
    _install_auth(app, server_args.api_key)
    _add_native_routes(app)
    from srt.entrypoints.openai.serving import router as openai_router

    app.include_router(openai_router)
    return app


def build_follower_app(runtime: Runtime, on_failure) -> FastAPI:
    """Nodes other than 0 (``--nnodes``) serve only ``/health`` while their scheduler ranks run."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def watch() -> None:
            while not (dead := runtime.dead_children()):
                await asyncio.sleep(0.5)
            on_failure(f"runtime process(es) died: {', '.join(dead)}")

        task = asyncio.create_task(watch())
        yield
        task.cancel()

    app = FastAPI(title="srt follower node", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if runtime.dead_children() else 200)

    return app


async def _warm_up(tm: TokenizerManager) -> None:
    ids = tm.tokenize(["The"])[0] or [0]
    async for _ in tm.generate_stream(ids, {"max_new_tokens": 1, "temperature": 0}):
        pass


# ---- errors and auth --------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, location = "the request body is not valid JSON", []
        elif location:
            message = f"{'.'.join(location)}: {message}"
        # ``param`` names the top-level field, as OpenAI does; the message keeps the full path.
        return APIError(400, message, param=location[0] if location else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RuntimeDiedError)
    async def runtime_died(_: Request, exc: RuntimeDiedError) -> JSONResponse:
        return APIError(503, str(exc), type="server_error").response()


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return APIError(401, "missing or invalid API key", code="invalid_api_key").response()
        return await call_next(request)


# ---- helpers shared with the OpenAI router ---------------------------------------------------


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def check_or_400(tm: TokenizerManager, input_ids: list[int], params: dict | None) -> None:
    try:
        tm.check_request(input_ids, params)
    except ValueError as e:
        raise APIError(400, str(e)) from e


# ---- native API -----------------------------------------------------------------------------


def _add_native_routes(app: FastAPI) -> None:
    def tm_of(request: Request) -> TokenizerManager:
        return request.app.state.tokenizer_manager

    @app.get("/health")
    async def health(request: Request) -> Response:
        ready = request.app.state.ready and tm_of(request).failure is None
        return Response(status_code=200 if ready else 503)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if not request.app.state.ready:
            return Response(status_code=503)
        try:
            await asyncio.wait_for(_warm_up(tm_of(request)), timeout=60)
        except (RuntimeDiedError, asyncio.TimeoutError):
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/model_info")
    async def model_info(request: Request) -> dict:
        runtime: Runtime = request.app.state.runtime
        return {
            "model_path": runtime.model_path,
            "tokenizer_path": runtime.tokenizer_path,
            "served_model_name": request.app.state.model_name,
            "is_generation": True,
            "context_length": runtime.info.context_length,
        }

    @app.get("/server_info")
    async def server_info(request: Request) -> dict:
        state = await tm_of(request).get_internal_state()
        runtime: Runtime = request.app.state.runtime
        return {
            **dataclasses.asdict(request.app.state.server_args),
            "max_total_tokens": runtime.info.max_total_tokens,
            "max_req_input_len": runtime.info.max_req_input_len,
            "internal_state": dataclasses.asdict(state),
        }

    @app.post("/flush_cache")
    async def flush_cache(request: Request) -> Response:
        if await tm_of(request).flush_cache():
            return Response("Cache flushed.\n", status_code=200)
        raise APIError(400, "cannot flush the cache while requests are running")

    @app.post("/abort_request")
    async def abort_request(body: AbortReqInput, request: Request) -> Response:
        await tm_of(request).abort(body.rid)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = await tm_of(request).get_internal_state()
        return Response(tm_of(request).metrics.render(state), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(body: GenerateReqInput, request: Request):
        tm = tm_of(request)
        prompts, params, rids, single = _normalize(tm, body)
        for ids, sp in zip(prompts, params):
            check_or_400(tm, ids, sp)
        streams = [
            tm.generate_stream(ids, sp, rid, body.return_logprob, body.top_logprobs_num, stream=body.stream)
            for ids, sp, rid in zip(prompts, params, rids)
        ]
        if body.stream:
            return StreamingResponse(_sse_generate(streams, single), media_type="text/event-stream")
        results = await until_disconnected(request, asyncio.gather(*(_collect(s) for s in streams)))
        for result in results:
            reason = result["meta_info"]["finish_reason"] or {}
            if reason.get("type") == "abort" and reason.get("status_code") == 400:
                raise APIError(400, reason.get("message", "invalid request"))
        return results[0] if single else results


def _normalize(tm: TokenizerManager, body: GenerateReqInput) -> tuple[list[list[int]], list[dict | None], list[str], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    if body.text is not None:
        single = isinstance(body.text, str)
        prompts = tm.tokenize([body.text] if single else body.text)
    else:
        single = not body.input_ids or isinstance(body.input_ids[0], int)
        prompts = [body.input_ids] if single else body.input_ids
    n = len(prompts)
    if n == 0:
        raise APIError(400, "the batch is empty", param="text")
    params = body.sampling_params if isinstance(body.sampling_params, list) else [body.sampling_params] * n
    if isinstance(body.rid, list):
        rids = body.rid
    elif single:
        rids = [body.rid or uuid.uuid4().hex]
    else:
        rids = [f"{body.rid}-{i}" if body.rid else uuid.uuid4().hex for i in range(n)]
    if len(params) != n or len(rids) != n:
        raise APIError(400, f"sampling_params and rid must have one entry per prompt ({n})", param="sampling_params")
    return prompts, params, rids, single


def _meta(out: ReqOutput, meta: dict, start: float) -> dict:
    meta.update(
        id=out.rid,
        finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens,
        e2e_latency=time.perf_counter() - start,
    )
    if out.logprobs:
        meta.setdefault("output_token_logprobs", []).extend([lp, t] for lp, t in zip(out.logprobs, out.new_token_ids))
        meta.setdefault("output_top_logprobs", []).extend(out.top_logprobs)
    return meta


async def _collect(stream: AsyncIterator[ReqOutput]) -> dict:
    start = time.perf_counter()
    result: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": {}}
    async for out in stream:
        result["text"] += out.text
        result["output_ids"] += out.new_token_ids
        _meta(out, result["meta_info"], start)
    return result


async def _sse_generate(streams: list[AsyncIterator[ReqOutput]], single: bool) -> AsyncIterator[bytes]:
    """SGLang's streaming shape: each event carries the text and ids so far (not deltas)."""
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def pump(index: int, stream: AsyncIterator[ReqOutput]) -> None:
        result: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": {}}
        async for out in stream:
            result["text"] += out.text
            result["output_ids"] += out.new_token_ids
            _meta(out, result["meta_info"], start)
            # Serialised now: the accumulated result keeps changing after this event.
            queue.put_nowait(sse({**result, **({} if single else {"index": index})}))

    async def pump_all() -> None:
        try:
            await asyncio.gather(*(pump(i, s) for i, s in enumerate(streams)))
        except Exception as e:  # a dead runtime: tell the client in-band
            queue.put_nowait(sse(APIError(503, str(e)).body()))
        queue.put_nowait(None)

    task = asyncio.create_task(pump_all())
    try:
        while (event := await queue.get()) is not None:
            yield event
        yield SSE_DONE
    finally:
        task.cancel()  # client gone: the streams' own cleanup aborts their requests
