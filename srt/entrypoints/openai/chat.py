"""``POST /v1/chat/completions``: messages rendered with the chat template, the answer streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from srt.entrypoints.api_schema import json_or_event_stream
from srt.entrypoints.errors import APIError
from srt.entrypoints.offload import off_loop_if_long
from srt.entrypoints.openai.generation import Generation, check_body, event_stream, finish_reason, include_usage, matched_stop, max_new_tokens
from srt.entrypoints.openai.logprobs import chat_logprobs
from srt.entrypoints.openai.prompts import chat_input_ids
from srt.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    Usage,
)
from srt.entrypoints.results import collect
from srt.entrypoints.streaming import until_disconnected
from srt.runtime.messages import ReqOutput

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=json_or_event_stream(ChatCompletionResponse, "The chat completion; with stream: true, ChatCompletionChunk events"),
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model, tm = check_body(request, body)
    if not body.logprobs and body.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    chars = sum(len(str(m.content)) for m in body.messages or ())
    input_ids = await off_loop_if_long(chars, chat_input_ids, tm.tokenizer, request.app.state.server_args.chat_template, body)
    limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = max_new_tokens(tm, len(input_ids), getattr(body, limit), "messages", limit)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    gen = Generation(tm, "chatcmpl", body, [input_ids], [max_new], top_logprobs)

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
                    index=index, delta=ChatDelta(), finish_reason=finish_reason(reason), matched_stop=matched_stop(reason)
                )
                chunks.append(chunk([finish]))
            return chunks

        # As OpenAI: each choice opens with a chunk naming the role, before any content.
        opening = ChatDelta(role="assistant", content="")
        head = [chunk([ChatStreamChoice(index=i, delta=opening)]) for i in range(body.n)]
        usage_chunk = (lambda usage: chunk([], usage)) if include_usage(body) else None
        return event_stream(gen, head, render, usage_chunk)

    results = await until_disconnected(request, collect(tm, gen.reqs))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=logprobs_of(r.output_ids, r.logprobs, r.top_logprobs),
            finish_reason=finish_reason(r.finish_reason),
            matched_stop=matched_stop(r.finish_reason),
        )
        for i, r in enumerate(results)
    ]
    usage = gen.usage(results)
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)
