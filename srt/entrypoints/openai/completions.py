"""``POST /v1/completions``: text (or token ids) in, completions out, streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from srt.entrypoints.errors import APIError
from srt.entrypoints.openai.generation import Generation, check_body, event_stream, finish_reason, include_usage, matched_stop, max_new_tokens, post_route
from srt.entrypoints.openai.logprobs import completion_logprobs
from srt.entrypoints.openai.prompts import completion_prompts
from srt.entrypoints.openai.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from srt.entrypoints.results import collect
from srt.entrypoints.streaming import until_disconnected
from srt.runtime.messages import FinishReason as SrtFinishReason, ReqOutput
from srt.tokenizer_manager.manager import TokenizerManager

router = APIRouter()


@post_route(router, "/v1/completions", CompletionResponse, "The completion; with stream: true, CompletionResponse chunks")
async def create_completion(body: CompletionRequest, request: Request):
    model, tm, lora = check_body(request, body)
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream: true", param="echo")
    prompts = await completion_prompts(tm, body.prompt)
    max_new = [max_new_tokens(tm, len(ids), body.max_tokens, "prompt", "max_tokens") for ids in prompts]
    gen = Generation(tm, "cmpl", body, prompts, max_new, body.logprobs, body.echo, lora=lora)

    def choice(index: int, text: str, logprobs, reason: SrtFinishReason | None) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(reason), matched_stop=matched_stop(reason)
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

        usage_chunk = (lambda usage: response([], usage)) if include_usage(body) else None
        return await event_stream(request, gen, [], render, usage_chunk)

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


def _prompt_text(tm: TokenizerManager, given: str | list, index: int, input_ids: list[int]) -> str:
    """What ``echo`` repeats: the prompt as the client wrote it, or its token ids decoded."""
    if isinstance(given, str):
        return given
    if isinstance(given[index], str):
        return given[index]
    return tm.tokenizer.decode(input_ids)

