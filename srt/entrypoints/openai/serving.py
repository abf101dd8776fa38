"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

A request becomes one generation per choice (each prompt times ``n``), all submitted at
once to the TokenizerManager; their outputs are merged as they arrive and either
streamed as server-sent events or collected into one response. Everything that can be
checked is checked before the first generation starts, so a bad request gets a plain
HTTP error rather than an error event inside a stream. A client that leaves early,
streaming or not, cancels the generations, which aborts them in the scheduler and
frees their KV memory. Choice i's request id is ``<response id>-<i>`` (what
``/abort_request`` takes).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from srt.entrypoints.errors import APIError
from srt.entrypoints.http_server import SSE_DONE, check_or_400, sse, until_disconnected
from srt.runtime.messages import ReqOutput
from srt.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from srt.tokenizer_manager.manager import RuntimeDiedError, TokenizerManager

router = APIRouter()

_STARTED = int(time.time())  # the model card's `created`
_SEED_RANGE = 2**31  # the sampler takes seeds in [0, 2**31); OpenAI clients may send any integer
_MIN_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry (vLLM's choice too)

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


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    model = _check_body(request, body)
    tm: TokenizerManager = request.app.state.tokenizer_manager
    prompts = _completion_prompts(tm, body.prompt)
    max_new = [_max_new_tokens(tm, len(ids), body.max_tokens, "prompt", "max_tokens") for ids in prompts]
    gen = _Generation(tm, f"cmpl-{uuid.uuid4().hex}", _jobs(tm, body, prompts, max_new), body.logprobs, prompts, body.stream)

    def choice(index: int, text: str, logprobs: CompletionLogprobs | None, reason: dict | None) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=_finish_reason(reason),
            matched_stop=reason.get("matched") if reason else None,
        )

    def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)

    if body.stream:
        text_offsets = [0] * len(gen.jobs)  # where each choice's next token starts in its text

        def render(index: int, out: ReqOutput) -> list[BaseModel]:
            logprobs = None
            if body.logprobs is not None:
                offset = text_offsets[index]
                logprobs = _completion_logprobs(tm.tokenizer, out.new_token_ids, out.logprobs, out.top_logprobs, offset)
                text_offsets[index] += sum(map(len, logprobs.tokens))
            if not (out.text or out.finish_reason or (logprobs and logprobs.tokens)):
                return []
            return [response([choice(index, out.text, logprobs, out.finish_reason)])]

        usage_chunk = (lambda usage: response([], usage)) if _include_usage(body) else None
        return _event_stream(gen, [], render, usage_chunk)

    results = await until_disconnected(request, gen.collect())
    choices = []
    for i, r in enumerate(results):
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(tm.tokenizer, r.token_ids, r.logprobs, r.top_logprobs, 0)
        choices.append(choice(i, r.text, logprobs, r.finish_reason))
    return response(choices, gen.usage(results))


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model = _check_body(request, body)
    if not body.logprobs and body.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tm: TokenizerManager = request.app.state.tokenizer_manager
    input_ids = _chat_input_ids(tm.tokenizer, request.app.state.server_args.chat_template, body)
    limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = _max_new_tokens(tm, len(input_ids), getattr(body, limit), "messages", limit)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = _jobs(tm, body, [input_ids], [max_new])
    gen = _Generation(tm, f"chatcmpl-{uuid.uuid4().hex}", jobs, top_logprobs, [input_ids], body.stream)

    def logprobs_of(token_ids: list[int], logprobs: list[float], tops: list[list]) -> ChatLogprobs | None:
        return _chat_logprobs(tm.tokenizer, token_ids, logprobs, tops) if body.logprobs else None

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
                    index=index,
                    delta=ChatDelta(),
                    finish_reason=_finish_reason(reason),
                    matched_stop=reason.get("matched"),
                )
                chunks.append(chunk([finish]))
            return chunks

        # As OpenAI: each choice opens with a chunk naming the role, before any content.
        opening = ChatDelta(role="assistant", content="")
        head = [chunk([ChatStreamChoice(index=i, delta=opening)]) for i in range(body.n)]
        usage_chunk = (lambda usage: chunk([], usage)) if _include_usage(body) else None
        return _event_stream(gen, head, render, usage_chunk)

    results = await until_disconnected(request, gen.collect())
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=logprobs_of(r.token_ids, r.logprobs, r.top_logprobs),
            finish_reason=_finish_reason(r.finish_reason),
            matched_stop=r.finish_reason.get("matched"),
        )
        for i, r in enumerate(results)
    ]
    usage = gen.usage(results)
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)


# ---- checks shared by both endpoints -------------------------------------------------------------


def _check_body(request: Request, body: SamplingRequest) -> str:
    """Refuse what no endpoint can serve; return the model name to answer with."""
    state = request.app.state
    # A missing model means the served one (SGLang is as lenient); a different one does not exist here.
    if body.model is not None and body.model not in (state.model_name, state.server_args.model_path):
        raise APIError(404, f"the model `{body.model}` does not exist", param="model", code="model_not_found")
    if (name := body.unsupported()) is not None:
        raise APIError(400, f"{name} is not supported yet", param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return state.model_name


def _include_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _max_new_tokens(tm: TokenizerManager, prompt_len: int, requested: int | None, prompt_param: str, param: str) -> int:
    """``requested``, if prompt and completion fit the context; None means all the room left (vLLM's default).

    The TokenizerManager checks this too; checking here first lets the error name the
    parameter and carry OpenAI's code for it."""
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


class _Job(NamedTuple):
    """One generation: one choice of one prompt."""

    input_ids: list[int]
    sampling_params: dict[str, Any]


def _jobs(tm: TokenizerManager, body: SamplingRequest, prompts: list[list[int]], max_new: list[int]) -> list[_Job]:
    """``n`` jobs per prompt, prompt by prompt (choice ``p * n + j`` is prompt p's j-th, as OpenAI orders them)."""
    common = body.model_dump(include=_SAMPLING_FIELDS, exclude_none=True)
    if body.min_tokens is not None:
        common["min_new_tokens"] = body.min_tokens
    jobs = []
    for input_ids, max_new_tokens in zip(prompts, max_new):
        for j in range(body.n):
            params = {**common, "max_new_tokens": max_new_tokens}
            if body.seed is not None:
                # One seed per choice: the choices differ, and the same request gives the same choices.
                params["seed"] = (body.seed + j) % _SEED_RANGE
            check_or_400(tm, input_ids, params)
            jobs.append(_Job(input_ids, params))
    return jobs


def _finish_reason(reason: dict[str, Any] | None) -> FinishReason | None:
    """srt's finish reason in OpenAI's words; an aborted request becomes an error."""
    if reason is None:
        return None
    if reason["type"] in ("stop", "length"):
        return reason["type"]
    # An invalid request is the client's fault (400); otherwise the server gave up on it
    # (shutting down, or an operator's /abort_request), and trying again later is the answer.
    raise APIError(reason.get("status_code", 503), f"the request was aborted: {reason.get('message', '')}")


# ---- prompts ------------------------------------------------------------------------------------


def _completion_prompts(tm: TokenizerManager, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt, given as a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return tm.tokenize([prompt])
    if not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if isinstance(prompt[0], str):
        return tm.tokenize(prompt)
    if isinstance(prompt[0], int):
        return [prompt]
    return prompt


def _chat_input_ids(tokenizer, chat_template_arg: str | None, body: ChatCompletionRequest) -> list[int]:
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if chat_template_arg is None and tokenizer.chat_template is None:
        raise APIError(
            400,
            "this model has no chat template: use /v1/completions, or start the server with "
            "--chat-template (a Jinja file or template string)",
            param="messages",
        )
    messages = [_template_message(i, m) for i, m in enumerate(body.messages)]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=_read_chat_template(chat_template_arg) if chat_template_arg else None,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=False,
            **(body.chat_template_kwargs or {}),
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. a template that insists roles alternate
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
    # The template already wrote the special tokens it wants (a BOS among them): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=4)
def _read_chat_template(arg: str) -> str:
    """``--chat-template``: a Jinja file, else the template itself (or the name of one of the tokenizer's)."""
    if os.path.isfile(arg):
        with open(arg) as f:
            return f.read()
    return arg


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    """The message as chat templates expect it: content as one string."""
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text":
                error = f"messages[{index}]: content parts of type {part.type!r} are not supported yet"
                raise APIError(400, error, param="messages")
            if part.text is None:
                raise APIError(400, f"messages[{index}]: a text part has no text", param="messages")
        content = "\n".join(part.text for part in content)
    elif content is None and not (message.role == "assistant" and message.tool_calls):
        raise APIError(400, f"messages[{index}] has no content", param="messages")
    return {**message.model_dump(exclude_none=True), "content": content}


# ---- running the generations ---------------------------------------------------------------------


@dataclass
class _Result:
    """One choice's output, accumulated."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: dict[str, Any] | None = None

    def add(self, out: ReqOutput) -> None:
        self.text += out.text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.completion_tokens = out.completion_tokens
        self.finish_reason = out.finish_reason


@dataclass
class _Generation:
    """The generations behind one API request, one job per choice."""

    tm: TokenizerManager
    id: str
    jobs: list[_Job]
    top_logprobs: int | None  # None: no logprobs
    prompts: list[list[int]]
    stream: bool
    created: int = field(default_factory=lambda: int(time.time()))

    async def outputs(self) -> AsyncIterator[tuple[int, ReqOutput]]:
        """Run every job at once; yield ``(choice index, output)`` as outputs arrive.

        Closing this iterator before the end cancels what still runs, which aborts it."""
        queue: asyncio.Queue = asyncio.Queue()
        want_logprobs, top_n = self.top_logprobs is not None, self.top_logprobs or 0

        async def pump(index: int, job: _Job) -> None:
            try:
                rid = f"{self.id}-{index}"
                async for out in self.tm.generate_stream(
                    job.input_ids, job.sampling_params, rid, want_logprobs, top_n, stream=self.stream
                ):
                    queue.put_nowait((index, out))
                queue.put_nowait((index, None))  # this choice is complete
            except Exception as e:  # a dead runtime: re-raised in the consumer
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(self.jobs)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    running -= 1
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self) -> list[_Result]:
        results = [_Result() for _ in self.jobs]
        async with aclosing(self.outputs()) as outputs:
            async for index, out in outputs:
                results[index].add(out)
        return results

    def usage(self, results: list[_Result]) -> Usage:
        # A prompt counts once however many choices it has, as OpenAI counts it.
        prompt_tokens = sum(map(len, self.prompts))
        completion_tokens = sum(r.completion_tokens for r in results)
        total_tokens = prompt_tokens + completion_tokens
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total_tokens)


def _event_stream(
    gen: _Generation,
    head: list[BaseModel],
    render: Callable[[int, ReqOutput], list[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> StreamingResponse:
    """SSE: ``head``, the chunks ``render`` makes of each output, the usage chunk if asked for, ``[DONE]``.

    Once the response has started its status cannot change, so an error (an aborted
    request, a dead runtime) is sent as an ``{"error": ...}`` event, as vLLM does."""

    def event(chunk: BaseModel) -> bytes:
        return sse(chunk.model_dump(exclude_none=True))

    async def events() -> AsyncIterator[bytes]:
        for chunk in head:
            yield event(chunk)
        results = [_Result() for _ in gen.jobs]
        try:
            async with aclosing(gen.outputs()) as outputs:
                async for index, out in outputs:
                    results[index].completion_tokens = out.completion_tokens
                    for chunk in render(index, out):
                        yield event(chunk)
        except APIError as e:
            yield sse(e.body())
        except RuntimeDiedError as e:
            yield sse(APIError(503, str(e), type="server_error").body())
        else:
            if usage_chunk is not None:
                yield event(usage_chunk(gen.usage(results)))
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


# ---- logprobs -----------------------------------------------------------------------------------


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _completion_logprobs(
    tokenizer,
    token_ids: list[int],
    logprobs: list[float],
    top_logprobs: list[list[tuple[int, float]]],
    text_offset: int,
) -> CompletionLogprobs:
    """The legacy completions shape; ``text_offset`` is where the first token starts in the choice's text."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    tops = []
    for token, logprob, top in zip(tokens, logprobs, top_logprobs):
        entry = {tokenizer.decode([t]): _finite(lp) for t, lp in top}
        # OpenAI lists the sampled token too (so up to n + 1 entries). Set last, it wins when two
        # tokens decode to the same string (say, two halves of characters, both "\ufffd").
        entry[token] = _finite(logprob)
        tops.append(entry)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[_finite(lp) for lp in logprobs], top_logprobs=tops, text_offset=offsets
    )


def _chat_logprobs(
    tokenizer, token_ids: list[int], logprobs: list[float], top_logprobs: list[list[tuple[int, float]]]
) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        # The token's text, decoded alone: a token holding part of a character reads "\ufffd",
        # and so do its `bytes` (its raw bytes are the tokenizer's secret).
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}

    content = [
        TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(tt, tlp)) for tt, tlp in top])
        for t, lp, top in zip(token_ids, logprobs, top_logprobs)
    ]
    return ChatLogprobs(content=content)
