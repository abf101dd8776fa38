"""``POST /v1/tokenize`` and ``POST /v1/detokenize`` (SGLang's and vLLM's extension of the OpenAI
API; also under ``/tokenize`` and ``/detokenize``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from srt.entrypoints.errors import APIError, check_model
from srt.entrypoints.openai.prompts import tokenize_prompts
from srt.tokenizer_manager.manager import TokenizerManager

router = APIRouter()


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[list[int]]
    count: int | list[int]
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
    skip_special_tokens: bool = False


class DetokenizeResponse(BaseModel):
    text: str


def _tokenizer_manager(request: Request, model: str | None) -> TokenizerManager:
    check_model(request, model)
    tm: TokenizerManager = request.app.state.tokenizer_manager
    if tm.tokenizer is None:
        raise APIError(400, "this server runs with --skip-tokenizer-init: it has no tokenizer")
    return tm


@router.post("/v1/tokenize")
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    tm = _tokenizer_manager(request, body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    ids = await tokenize_prompts(tm, texts, body.add_special_tokens)
    if isinstance(body.prompt, str):
        return TokenizeResponse(tokens=ids[0], count=len(ids[0]), max_model_len=tm.info.context_length)
    return TokenizeResponse(tokens=ids, count=[len(x) for x in ids], max_model_len=tm.info.context_length)


@router.post("/v1/detokenize")
@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    tm = _tokenizer_manager(request, body.model)
    vocab = tm.info.vocab_size
    if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
        raise APIError(400, f"tokens must be integers in [0, {vocab})", param="tokens")
    return DetokenizeResponse(text=tm.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))
