"""SGLang's native routes: ``/generate``, health, model and server info, cache, abort, metrics.

Handlers talk only to the TokenizerManager kept in ``app.state``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from srt.entrypoints.api_schema import GenerateResponse, ModelInfo, ReplicaLoad, json_or_event_stream, plain_text
from srt.entrypoints.errors import APIError, check_model
from srt.entrypoints.offload import INLINE_CHARS, off_loop_if_long
from srt.entrypoints.results import GenerateResult, collect
from srt.entrypoints.streaming import SSE_DONE, sse, until_disconnected
from srt.runtime.embedding_request import EmbeddingItem
from srt.runtime.generate_request import GenerateReqInput
from srt.runtime.messages import FinishAbort, TokenizedGenerateReq
from srt.tokenizer_manager.manager import RuntimeDiedError, TokenizerManager

router = APIRouter()

class AbortReqInput(BaseModel):
    rid: str


def _tm(request: Request) -> TokenizerManager:
    return request.app.state.tokenizer_manager


async def warm_up(tm: TokenizerManager) -> None:
    """One one-token generation, or one embedding (the server's warm-up, and ``/health_generate``)."""
    ids = (tm.tokenize(["The"])[0] if tm.tokenizer is not None else []) or [0]
    if tm.info.task != "generate":
        await tm.encode(tm.check_embedding([EmbeddingItem(input_ids=ids)]))
        return
    await collect(tm, tm.check(GenerateReqInput(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0})))


@router.get("/health", response_class=Response)
async def health(request: Request) -> Response:
    ready = request.app.state.ready and _tm(request).failure is None
    return Response(status_code=200 if ready else 503)


@router.get("/health_generate", response_class=Response)
async def health_generate(request: Request) -> Response:
    if not request.app.state.ready:
        return Response(status_code=503)
    try:
        await asyncio.wait_for(warm_up(_tm(request)), timeout=60)
    except (RuntimeDiedError, asyncio.TimeoutError):
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/model_info")
@router.get("/get_model_info")  # SGLang's name, which sglang-router reads
async def model_info(request: Request) -> ModelInfo:
    runtime = _tm(request).runtime
    return ModelInfo(
        model_path=runtime.model_path,
        tokenizer_path=runtime.tokenizer_path,
        served_model_name=request.app.state.model_name,
        is_generation=True,
        context_length=runtime.info.context_length,
    )


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request) -> dict[str, Any]:
    tm = _tm(request)
    state = await tm.get_internal_state()
    args = request.app.state.server_args
    return {
        # Every argument but the secret: the API key is never shown.
        **{k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"},
        "model_path": args.model_path or tm.runtime.model_path,
        "served_model_name": request.app.state.model_name,
        "max_total_tokens": tm.info.max_total_tokens,
        "max_total_num_tokens": tm.info.max_total_tokens,  # SGLang's name
        "max_req_input_len": tm.info.max_req_input_len,
        "internal_state": dataclasses.asdict(state),
    }


@router.get("/get_load")
async def get_load(request: Request) -> list[ReplicaLoad]:
    """Each data-parallel replica's load, in SGLang's shape (load-aware routing policies read it)."""
    replicas = await _tm(request).get_replica_states()
    return [
        ReplicaLoad(
            dp_rank=rank,
            num_reqs=state.running_requests + state.waiting_requests,
            num_waiting_reqs=state.waiting_requests,
            num_tokens=state.total_kv_slots - state.free_kv_slots - state.evictable_tokens,
        )
        for rank, state in enumerate(replicas)
    ]


@router.post("/flush_cache", response_class=PlainTextResponse, responses=plain_text("Cache flushed"))
async def flush_cache(request: Request) -> PlainTextResponse:
    if await _tm(request).flush_cache():
        return PlainTextResponse("Cache flushed.\n")
    raise APIError(400, "cannot flush the cache while requests are running")


@router.post("/abort_request", response_class=Response)
async def abort_request(body: AbortReqInput, request: Request) -> Response:
    await _tm(request).abort(body.rid)
    return Response(status_code=200)


@router.get("/metrics", response_class=PlainTextResponse, responses=plain_text("Prometheus metrics"))
async def metrics(request: Request) -> Response:
    tm = _tm(request)
    state = await tm.get_internal_state()
    return Response(tm.metrics.render(state), media_type="text/plain; version=0.0.4")


@router.post(
    "/generate",
    response_model=None,
    responses=json_or_event_stream(
        GenerateResponse | list[GenerateResponse],
        "One result per prompt (one object for a single prompt); each stream event is a result so far",
    ),
)
async def generate(body: GenerateReqInput, request: Request):
    lora = check_model(request, body.model)
    if body.lora_path is None:
        body.lora_path = lora
    tm = _tm(request)
    texts = [body.text] if isinstance(body.text, str) else body.text or []
    # Decoding and processing images is never quick: off the loop whatever their size.
    work = INLINE_CHARS if body.image_data is not None else sum(map(len, texts))
    reqs = await off_loop_if_long(work, tm.check, body)
    if body.stream:
        return StreamingResponse(_sse_generate(tm, reqs, body.is_single), media_type="text/event-stream")
    results = await until_disconnected(request, collect(tm, reqs))
    if refused := next((r.finish_reason for r in results if _refused(r.finish_reason)), None):
        raise APIError(400, refused.message)  # e.g. a grammar that does not compile: the request's fault
    results = [r.to_dict() for r in results]
    return results[0] if body.is_single else results


def _refused(reason) -> bool:
    return isinstance(reason, FinishAbort) and reason.status_code == 400


async def _sse_generate(tm: TokenizerManager, reqs: list[TokenizedGenerateReq], single: bool) -> AsyncIterator[bytes]:
    """SGLang's streaming shape: each event carries the text and ids so far (not deltas)."""
    results = [GenerateResult(req.rid, has_text=tm.tokenizer is not None) for req in reqs]
    try:
        async with aclosing(tm.generate(reqs)) as outputs:
            async for index, out in outputs:
                results[index].add(out)
                yield sse({**results[index].to_dict(), **({} if single else {"index": index})})
    except RuntimeDiedError as e:  # the response has started: tell the client in-band
        yield sse(APIError.of(e).body())
    yield SSE_DONE
