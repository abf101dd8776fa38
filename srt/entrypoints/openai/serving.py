"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

A request becomes one ``GenerateReqInput`` with a prompt per choice (each prompt times
``n``), checked as a whole before the first generation starts, so a bad request gets a
plain HTTP error rather than an error event inside a stream. Outputs are either
streamed as server-sent events or collected into one response. A client that leaves
early, streaming or not, aborts the generations, which frees their KV memory. Choice
i's request id is ``<response id>-<i>`` (what ``/abort_request`` takes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from srt.entrypoints.api_schema import json_or_event_stream
from srt.entrypoints.offload import off_loop_if_long
from srt.entrypoints.errors import APIError, check_model
from srt.entrypoints.openai.constraints import constraint_params
from srt.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from srt.entrypoints.openai.prompts import chat_input_ids, completion_prompts
from srt.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)
from srt.entrypoints.results import GenerateResult, collect
from srt.entrypoints.streaming import SSE_DONE, sse, until_disconnected
from srt.runtime.generate_request import GenerateReqInput, InvalidRequestError
from srt.runtime.messages import FinishAbort, FinishReason as SrtFinishReason, FinishStop, ReqOutput, TokenizedGenerateReq
from srt.tokenizer_manager.manager import RuntimeDiedError, TokenizerManager

router = APIRouter()

_STARTED = int(time.time())  # the model card's `created`
_SEED_RANGE = 2**31  # the sampler takes seeds in [0, 2**31); OpenAI clients may send any integer

# Request fields that are sampling parameters under the same name (srt.sampling.sampling_params).
_SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
}


# ---- endpoints --------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = request.app.state
    context_length = state.tokenizer_manager.info.context_length
    return ModelList(data=[ModelCard(id=state.model_name, created=_STARTED, max_model_len=context_length)])


@router.post(
    "/v1/completions",
    response_model=None,
    responses=json_or_event_stream(CompletionResponse, "The completion; with stream: true, CompletionResponse chunks"),
)
async def create_completion(body: CompletionRequest, request: Request):
    model, tm = _check_body(request, body)
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream: true", param="echo")
    prompts = await completion_prompts(tm, body.prompt)
    max_new = [_max_new_tokens(tm, len(ids), body.max_tokens, "prompt", "max_tokens") for ids in prompts]
    gen = _Generation(tm, "cmpl", body, prompts, max_new, body.logprobs, body.echo)

    def choice(index: int, text: str, logprobs, reason: SrtFinishReason | None) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=_finish_reason(reason), matched_stop=_matched(reason)
        )

    def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)

    if body.stream:
        text_offsets = [0] * len(gen.reqs)  # where each choice's next token starts in its text

        def render(index: int, out: ReqOutput) -> list[BaseModel]:
            logprobs = None
            if body.logprobs is not None:
                offset = text_offsets[index]
                logprobs = completion_logprobs(tm.tokenizer, out.new_token_ids, out.logprobs, out.top_logprobs, offset)
                text_offsets[index] += sum(map(len, logprobs.tokens))
            if not (out.text or out.finish_reason or (logprobs and logprobs.tokens)):
                return []
            return [response([choice(index, out.text, logprobs, out.finish_reason)])]

        usage_chunk = (lambda usage: response([], usage)) if _include_usage(body) else None
        return await _event_stream(request, gen, [], render, usage_chunk)

    results = await until_disconnected(request, collect(tm, gen.reqs))
    choices = []
    for i, r in enumerate(results):
        prompt = prompts[i // body.n]
        logprobs = None
        if body.logprobs is not None:
            ids, lps, tops = r.output_ids, r.logprobs, r.top_logprobs
            if body.echo:  # the prompt's tokens and logprobs first
                ids = prompt + ids
                lps = [lp for lp, _ in r.input_token_logprobs] + lps
                tops = r.input_top_logprobs + tops
            logprobs = completion_logprobs(tm.tokenizer, ids, lps, tops, 0)
        text = _prompt_text(tm, body.prompt, i // body.n, prompt) + r.text if body.echo else r.text
        choices.append(choice(i, text, logprobs, r.finish_reason))
    return response(choices, gen.usage(results))


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=json_or_event_stream(ChatCompletionResponse, "The chat completion; with stream: true, ChatCompletionChunk events"),
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model, tm = _check_body(request, body)
    if not body.logprobs and body.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    chars = sum(len(str(m.content)) for m in body.messages or ())
    input_ids = await off_loop_if_long(chars, chat_input_ids, tm.tokenizer, request.app.state.server_args.chat_template, body)
    limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = _max_new_tokens(tm, len(input_ids), getattr(body, limit), "messages", limit)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    gen = _Generation(tm, "chatcmpl", body, [input_ids], [max_new], top_logprobs)

    def logprobs_of(token_ids: list[int], logprobs: list[float], tops: list[list]):
        return chat_logprobs(tm.tokenizer, token_ids, logprobs, tops) if body.logprobs else None

    if body.stream:

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)

        def render(index: int, out: ReqOutput) -> list[BaseModel]:
            chunks = []
            if out.text or (body.logprobs and out.new_token_ids):
                logprobs = logprobs_of(out.new_token_ids, out.logprobs, out.top_logprobs)
                content = ChatStreamChoice(index=index, delta=ChatDelta(content=out.text), logprobs=logprobs)
                chunks.append(chunk([content]))
            if (reason := out.finish_reason) is not None:
                finish = ChatStreamChoice(
                    index=index, delta=ChatDelta(), finish_reason=_finish_reason(reason), matched_stop=_matched(reason)
                )
                chunks.append(chunk([finish]))
            return chunks

        # As OpenAI: each choice opens with a chunk naming the role, before any content.
        opening = ChatDelta(role="assistant", content="")
        head = [chunk([ChatStreamChoice(index=i, delta=opening)]) for i in range(body.n)]
        usage_chunk = (lambda usage: chunk([], usage)) if _include_usage(body) else None
        return await _event_stream(request, gen, head, render, usage_chunk)

    results = await until_disconnected(request, collect(tm, gen.reqs))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=logprobs_of(r.output_ids, r.logprobs, r.top_logprobs),
            finish_reason=_finish_reason(r.finish_reason),
            matched_stop=_matched(r.finish_reason),
        )
        for i, r in enumerate(results)
    ]
    usage = gen.usage(results)
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)


# ---- checks shared by both endpoints -------------------------------------------------------------


def _check_body(request: Request, body: SamplingRequest) -> tuple[str, TokenizerManager]:
    """Refuse what no endpoint can serve; return the model name to answer with, and the manager."""
    state = request.app.state
    tm: TokenizerManager = state.tokenizer_manager
    check_model(request, body.model)
    if (name := body.unsupported()) is not None:
        raise APIError(400, f"{name} is not supported yet", param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if tm.tokenizer is None:
        raise APIError(400, "this server runs with --skip-tokenizer-init, which the OpenAI API needs: use /generate with input_ids")
    return state.model_name, tm


def _prompt_text(tm: TokenizerManager, given: str | list, index: int, input_ids: list[int]) -> str:
    """What ``echo`` repeats: the prompt as the client wrote it, or its token ids decoded."""
    if isinstance(given, str):
        return given
    if isinstance(given[index], str):
        return given[index]
    return tm.tokenizer.decode(input_ids)


def _include_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _max_new_tokens(tm: TokenizerManager, prompt_len: int, requested: int | None, prompt_param: str, param: str) -> int:
    """``requested``, if prompt and completion fit the context; None means all the room left (vLLM's default).

    The TokenizerManager checks the sum too; checking here first lets the error name the
    OpenAI parameter rather than ``max_new_tokens``."""
    context = tm.info.context_length
    room = context - prompt_len
    if room <= 0:
        message = f"the prompt has {prompt_len} tokens, which leaves no room in the context length ({context})"
        raise APIError(400, message, param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        message = f"the prompt ({prompt_len} tokens) plus {param} ({requested}) exceeds the context length ({context})"
        raise APIError(400, message, param=param, code="context_length_exceeded")
    return requested


def _finish_reason(reason: SrtFinishReason | None) -> FinishReason | None:
    """srt's finish reason in OpenAI's words; an aborted request becomes an error."""
    if reason is None:
        return None
    if isinstance(reason, FinishAbort):
        # An invalid request is the client's fault (400); otherwise the server gave up on it
        # (shutting down, or an operator's /abort_request), and trying again later is the answer.
        raise APIError(reason.status_code, f"the request was aborted: {reason.message}")
    return "stop" if isinstance(reason, FinishStop) else "length"


def _matched(reason: SrtFinishReason | None) -> int | str | None:
    """SGLang's ``matched_stop``: the stop string or token id that ended the choice."""
    return reason.matched if isinstance(reason, FinishStop) else None


# ---- running the generations ---------------------------------------------------------------------


class _Generation:
    """The generations behind one API request: ``n`` per prompt, prompt by prompt (choice
    ``p * n + j`` is prompt p's j-th, as OpenAI orders them), checked by the TokenizerManager."""

    def __init__(
        self,
        tm: TokenizerManager,
        kind: str,
        body: SamplingRequest,
        prompts: list[list[int]],
        max_new: list[int],
        top_logprobs: int | None,  # None: no logprobs
        echo: bool = False,  # with logprobs: the prompt's logprobs too
    ) -> None:
        self.tm = tm
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        common = body.model_dump(include=_SAMPLING_FIELDS, exclude_none=True) | constraint_params(body)
        if body.min_tokens is not None:
            common["min_new_tokens"] = body.min_tokens
        params: list[dict[str, Any]] = []
        for max_new_tokens in max_new:
            for j in range(body.n):
                choice = {**common, "max_new_tokens": max_new_tokens}
                if body.seed is not None:
                    # One seed per choice: the choices differ, and the same request gives the same choices.
                    choice["seed"] = (body.seed + j) % _SEED_RANGE
                params.append(choice)
        # Built from a validated body: model_construct spares pydantic a second pass over the ids.
        obj = GenerateReqInput.model_construct(
            input_ids=[ids for ids in prompts for _ in range(body.n)],
            sampling_params=params,
            rid=[f"{self.id}-{i}" for i in range(len(params))],
            stream=body.stream,
            return_logprob=top_logprobs is not None,
            top_logprobs_num=top_logprobs or 0,
            logprob_start_len=0 if echo and top_logprobs is not None else -1,
        )
        try:
            self.reqs: list[TokenizedGenerateReq] = tm.check(obj)
        except InvalidRequestError as e:  # its param names a native field (input_ids, ...), not OpenAI's
            raise APIError(400, str(e), code=e.code) from e

    def usage(self, results: list[GenerateResult]) -> Usage:
        # A prompt counts once however many choices it has, as OpenAI counts it.
        prompt_tokens = sum(map(len, self.prompts))
        completion_tokens = sum(r.completion_tokens for r in results)
        total_tokens = prompt_tokens + completion_tokens
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total_tokens)


async def _event_stream(
    request: Request,
    gen: _Generation,
    head: list[BaseModel],
    render: Callable[[int, ReqOutput], list[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> StreamingResponse:
    """SSE: ``head``, the chunks ``render`` makes of each output, the usage chunk if asked for, ``[DONE]``.

    Once the response has started its status cannot change, so an error (an aborted
    request, a dead runtime) is sent as an ``{"error": ...}`` event, as vLLM does. A
    constrained request waits for its first output before the response starts, so that a
    grammar that does not compile is a plain 400."""

    def event(chunk: BaseModel) -> bytes:
        return sse(chunk.model_dump(exclude_none=True))

    outputs = gen.tm.generate(gen.reqs)
    first: list[tuple[int, ReqOutput]] = []
    if any(req.sampling_params.constraint for req in gen.reqs):
        try:
            first.append(await until_disconnected(request, anext(outputs)))
            _finish_reason(first[0][1].finish_reason)  # raises for an aborted request
        except BaseException:
            await outputs.aclose()
            raise

    async def events() -> AsyncIterator[bytes]:
        for chunk in head:
            yield event(chunk)
        results = [GenerateResult(req.rid) for req in gen.reqs]
        try:
            async with aclosing(outputs):
                async for index, out in _chain(first, outputs):
                    results[index].add(out)
                    for chunk in render(index, out):
                        yield event(chunk)
        except (APIError, RuntimeDiedError) as e:
            yield sse(APIError.of(e).body())
        else:
            if usage_chunk is not None:
                yield event(usage_chunk(gen.usage(results)))
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


async def _chain(first: list[tuple[int, ReqOutput]], rest: AsyncIterator[tuple[int, ReqOutput]]) -> AsyncIterator[tuple[int, ReqOutput]]:
    for item in first:
        yield item
    async for item in rest:
        yield item
