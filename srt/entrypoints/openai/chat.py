"""``POST /v1/chat/completions``: messages (and tools) rendered with the chat template, and each
choice's output returned as reasoning, content and tool calls, streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from srt.entrypoints.errors import APIError
from srt.entrypoints.offload import INLINE_CHARS, off_loop_if_long
from srt.entrypoints.openai.chat_output import ChoiceOutput
from srt.entrypoints.openai.generation import Generation, check_body, event_stream, finish_reason, include_usage, matched_stop, max_new_tokens, post_route
from srt.entrypoints.openai.logprobs import chat_logprobs
from srt.entrypoints.openai.prompts import chat_prompt, chat_template_text
from srt.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    Usage,
)
from srt.entrypoints.openai.reasoning_parser import reasoning_parser
from srt.entrypoints.openai.tool_calls import ToolUse, server_tool_parser, tool_use
from srt.entrypoints.results import collect
from srt.entrypoints.streaming import until_disconnected
from srt.runtime.messages import ReqOutput
from srt.server_args import ServerArgs
from srt.tokenizer_manager.manager import TokenizerManager

router = APIRouter()


@post_route(router, "/v1/chat/completions", ChatCompletionResponse, "The chat completion; with stream: true, ChatCompletionChunk events")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model, tm, lora = check_body(request, body)
    if not body.logprobs and body.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    server_args = request.app.state.server_args
    tools = _tool_use(body, tm, server_args)
    chars = sum(len(str(m.content)) for m in body.messages or ()) + len(str(body.tools or ""))
    if any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content) for m in body.messages or ()):
        chars = max(chars, INLINE_CHARS)  # decoding and processing images is never quick (a file path is short)
    prompt, input_ids, images = await off_loop_if_long(chars, chat_prompt, tm, server_args.chat_template, body)
    limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = max_new_tokens(tm, len(input_ids), getattr(body, limit), "messages", limit)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    outputs = [_choice_output(body, tm, server_args.reasoning_parser, tools, prompt) for _ in range(body.n)]
    extra_params = {"json_schema": tools.json_schema} if tools.constrained else {}
    if outputs[0].keeps_special_tokens:  # the parsers read markers that decoding would leave out
        extra_params["skip_special_tokens"] = False
    gen = Generation(tm, "chatcmpl", body, [input_ids], [max_new], top_logprobs, extra_params=extra_params, lora=lora, images=images)

    def logprobs_of(token_ids: list[int], logprobs: list[float], tops: list[list]):
        return chat_logprobs(tm.tokenizer, token_ids, logprobs, tops) if body.logprobs else None

    if body.stream:

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)

        def render(index: int, out: ReqOutput) -> list[BaseModel]:
            output = outputs[index]
            deltas = output.deltas(output.read(out.text, out.finish_reason))
            logprobs = logprobs_of(out.new_token_ids, out.logprobs, out.top_logprobs) if out.new_token_ids else None
            if logprobs is not None and not deltas:
                deltas = [ChatDelta(content="")]  # the tokens' logprobs, whose text is held back
            chunks = [
                chunk([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs if i == 0 else None)])
                for i, delta in enumerate(deltas)
            ]
            if (reason := out.finish_reason) is not None:
                finish = ChatStreamChoice(
                    index=index, delta=ChatDelta(), finish_reason=output.finish_reason(finish_reason(reason)), matched_stop=matched_stop(reason)
                )
                chunks.append(chunk([finish]))
            return chunks

        # As OpenAI: each choice opens with a chunk naming the role, before any content.
        opening = ChatDelta(role="assistant", content="")
        head = [chunk([ChatStreamChoice(index=i, delta=opening)]) for i in range(body.n)]
        usage_chunk = (lambda usage: chunk([], usage)) if include_usage(body) else None
        return await event_stream(request, gen, head, render, usage_chunk)

    results = await until_disconnected(request, collect(tm, gen.reqs))
    choices = []
    for i, (r, output) in enumerate(zip(results, outputs)):
        message = output.message(output.read(r.text, r.finish_reason))
        reason = output.finish_reason(finish_reason(r.finish_reason))
        logprobs = logprobs_of(r.output_ids, r.logprobs, r.top_logprobs)
        choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason, matched_stop=matched_stop(r.finish_reason)))
    usage = gen.usage(results)
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices, usage=usage)


def _tool_use(body: ChatCompletionRequest, tm: TokenizerManager, server_args: ServerArgs) -> ToolUse:
    parser = None
    if body.tools:  # the template is read only when there are tools to read calls of
        parser = server_tool_parser(server_args.tool_call_parser, chat_template_text(tm.tokenizer, server_args.chat_template))
    return tool_use(body, parser)


def _choice_output(body: ChatCompletionRequest, tm: TokenizerManager, reasoning: str | None, tools: ToolUse, prompt: str) -> ChoiceOutput:
    # A grammar that enforces calls leaves the model no room to think first.
    thinks = reasoning is not None and body.separate_reasoning and not tools.constrained
    thinking = reasoning_parser(reasoning, prompt, body.chat_template_kwargs) if thinks else None
    return ChoiceOutput(thinking, tools.parser(), tm.tokenizer if body.skip_special_tokens is None else None)
