"""What the OpenAI routes share: the checks of a body, and the generations behind a request.

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
from srt.entrypoints.errors import APIError, check_model
from srt.entrypoints.openai.constraints import constraint_params
from srt.entrypoints.openai.protocol import FinishReason, PromptTokensDetails, SamplingRequest, Usage
from srt.entrypoints.results import GenerateResult
from srt.entrypoints.streaming import SSE_DONE, sse, until_disconnected
from srt.runtime.image_inputs import MultimodalInputs
from srt.runtime.generate_request import GenerateReqInput, InvalidRequestError
from srt.runtime.messages import FinishAbort, FinishReason as SrtFinishReason, FinishStop, ReqOutput, TokenizedGenerateReq
from srt.tokenizer_manager.manager import RuntimeDiedError, TokenizerManager

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


def post_route(router: APIRouter, path: str, body_model: type[BaseModel], description: str):
    """The decorator of a route that answers ``body_model`` as JSON, or with ``stream: true`` an
    event stream of chunks (so the OpenAPI schema documents both)."""
    return router.post(path, response_model=None, responses=json_or_event_stream(body_model, description))


# ---- checks ------------------------------------------------------------------------------------


def check_body(request: Request, body: SamplingRequest) -> tuple[str, TokenizerManager, str | None]:
    """Refuse what no endpoint can serve; return the model name to answer with, the manager, and
    the LoRA adapter the body's ``model`` names (None: the base model)."""
    state = request.app.state
    tm: TokenizerManager = state.tokenizer_manager
    lora = check_model(request, body.model)
    tm.check_generates()
    if (name := body.unsupported()) is not None:
        raise APIError(400, f"{name} is not supported yet", param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if tm.tokenizer is None:
        raise APIError(400, "this server runs with --skip-tokenizer-init, which the OpenAI API needs: use /generate with input_ids")
    return (state.model_name if lora is None else body.model), tm, lora


def include_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def max_new_tokens(tm: TokenizerManager, prompt_len: int, requested: int | None, prompt_param: str, param: str) -> int:
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


def finish_reason(reason: SrtFinishReason | None) -> FinishReason | None:
    """srt's finish reason in OpenAI's words; an aborted request becomes an error."""
    if reason is None:
        return None
    if isinstance(reason, FinishAbort):
        # An invalid request is the client's fault (400); otherwise the server gave up on it
        # (shutting down, or an operator's /abort_request), and trying again later is the answer.
        raise APIError(reason.status_code, f"the request was aborted: {reason.message}")
    return "stop" if isinstance(reason, FinishStop) else "length"


def matched_stop(reason: SrtFinishReason | None) -> int | str | None:
    """SGLang's ``matched_stop``: the stop string or token id that ended the choice."""
    return reason.matched if isinstance(reason, FinishStop) else None


# ---- running the generations ---------------------------------------------------------------------


class Generation:
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
        extra_params: dict[str, Any] | None = None,  # sampling parameters the route adds (a tool call grammar)
        lora: str | None = None,  # the LoRA adapter to generate with
        images: MultimodalInputs | None = None,  # the images of the (one) prompt
    ) -> None:
        self.tm = tm
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        self.n = body.n
        common = body.model_dump(include=_SAMPLING_FIELDS, exclude_none=True) | constraint_params(body) | (extra_params or {})
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
            lora_path=lora,
        )
        try:
            self.reqs: list[TokenizedGenerateReq] = tm.check(obj, images)
        except InvalidRequestError as e:  # its param names a native field (input_ids, ...), not OpenAI's
            raise APIError(400, str(e), code=e.code) from e

    def usage(self, results: list[GenerateResult]) -> Usage:
        # A prompt counts once however many choices it has, as OpenAI counts it.
        prompt_tokens = sum(map(len, self.prompts))
        completion_tokens = sum(r.completion_tokens for r in results)
        total_tokens = prompt_tokens + completion_tokens
        # Each prompt's first choice is admitted first: the others may hit the cache it filled.
        cached = PromptTokensDetails(cached_tokens=sum(r.cached_tokens for r in results[:: self.n]))
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total_tokens, prompt_tokens_details=cached)


async def event_stream(
    request: Request,
    gen: Generation,
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
            finish_reason(first[0][1].finish_reason)  # raises for an aborted request
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
