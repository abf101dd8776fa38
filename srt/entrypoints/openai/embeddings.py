"""``POST /v1/embeddings`` (OpenAI's) and ``POST /encode`` (SGLang's): embeddings of texts or token ids."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from srt.entrypoints.errors import check_model
from srt.entrypoints.offload import off_loop_if_long
from srt.entrypoints.streaming import until_disconnected
from srt.entrypoints.openai.pooling_protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EncodeReqInput, PoolingRequest, PoolingUsage
from srt.runtime.embedding_request import EmbeddingItem, check_dimensions, embedding_vector, encode_result, is_single, items_of
from srt.runtime.generate_request import InvalidRequestError
from srt.runtime.messages import EmbeddingOutput
from srt.tokenizer_manager.manager import TokenizerManager

router = APIRouter()


async def run_pooling(request: Request, body: PoolingRequest | EncodeReqInput, items: list[EmbeddingItem]) -> list[EmbeddingOutput]:
    """Check the model name and the inputs, run them, and give each input's output (every pooling route's core)."""
    check_model(request, body.model)
    if getattr(body, "truncate_prompt_tokens", None) is not None:
        raise InvalidRequestError("truncate_prompt_tokens is not supported: srt refuses an input longer than the model takes", "truncate_prompt_tokens")
    tm: TokenizerManager = request.app.state.tokenizer_manager
    chars = sum(len(item.text or "") + len(item.text_pair or "") for item in items)
    reqs = await off_loop_if_long(chars, tm.check_embedding, items)  # long texts tokenized off the event loop
    return await until_disconnected(request, tm.encode(reqs))


def usage_of(outputs: list[EmbeddingOutput]) -> PoolingUsage:
    tokens = sum(out.prompt_tokens for out in outputs)
    return PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    info = request.app.state.tokenizer_manager.info
    if info.task != "embed" and info.task != "generate":  # a generation model is refused by the manager
        raise InvalidRequestError(f"this server runs a {info.task} model, which returns scores: use /classify or /v1/score", "model")
    check_dimensions(body.dimensions, info)
    outputs = await run_pooling(request, body, items_of(body.input))
    data = []
    for i, out in enumerate(outputs):
        vector = embedding_vector(out, info, body.dimensions)
        value = base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else vector.tolist()
        data.append(EmbeddingData(index=i, embedding=value))
    return EmbeddingResponse(data=data, model=request.app.state.model_name, usage=usage_of(outputs))


@router.post("/encode")
async def encode(body: EncodeReqInput, request: Request) -> dict | list[dict]:
    if (body.text is None) == (body.input_ids is None):
        raise InvalidRequestError("give exactly one of text and input_ids", param="text")
    info = request.app.state.tokenizer_manager.info
    check_dimensions(body.dimensions, info)
    inputs = body.text if body.text is not None else body.input_ids
    outputs = await run_pooling(request, body, items_of(inputs, "text" if body.text is not None else "input_ids"))
    results = [encode_result(out, info, body.dimensions) for out in outputs]
    return results[0] if is_single(inputs) else results
