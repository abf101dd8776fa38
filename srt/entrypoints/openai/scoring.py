"""Scores: ``/classify`` (a classifier's label probabilities), ``/v1/score`` (text pairs) and
``/v1/rerank`` (documents ordered by relevance to a query), as vLLM serves them.

A pair is scored by a cross-encoder (a classifier with one label) reading both texts
together, its logit through a sigmoid; an embedding model scores it by the cosine
similarity of the two texts' embeddings.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from fastapi import APIRouter, Request

from srt.entrypoints.openai.embeddings import run_pooling, usage_of
from srt.entrypoints.openai.prompts import chat_prompt
from srt.entrypoints.openai.protocol import ChatCompletionRequest
from srt.entrypoints.openai.pooling_protocol import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from srt.runtime.embedding_request import EmbeddingItem, embedding_vector, items_of, label_probabilities, logits_of
from srt.runtime.generate_request import InvalidRequestError
from srt.runtime.messages import SchedulerInfo

router = APIRouter()


async def _classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    info: SchedulerInfo = request.app.state.tokenizer_manager.info
    if info.task == "embed":
        raise InvalidRequestError("this server runs an embedding model, which has no labels: use /v1/embeddings", "model")
    if (body.input is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of input and messages", param="input")
    if body.messages is not None:
        if request.app.state.tokenizer_manager.tokenizer is None:
            raise InvalidRequestError("messages need the tokenizer (this server runs with --skip-tokenizer-init)", "messages")
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=False)
        _, ids, _ = chat_prompt(request.app.state.tokenizer_manager, request.app.state.server_args.chat_template, chat)
        items = [EmbeddingItem(input_ids=ids)]
    else:
        items = items_of(body.input)
    outputs = await run_pooling(request, body, items)
    data = []
    for i, out in enumerate(outputs):
        logits = logits_of(out)
        probs = label_probabilities(logits)
        label = info.labels[int(np.argmax(probs))]
        data.append(ClassifyData(index=i, label=label, probs=probs.tolist(), logits=logits.tolist(), num_classes=len(info.labels)))
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=request.app.state.model_name, data=data, usage=usage_of(outputs)
    )


router.post("/classify", response_model=ClassifyResponse)(_classify)
router.post("/v1/classify", response_model=ClassifyResponse)(_classify)


async def pair_scores(request: Request, body: ScoreRequest | RerankRequest, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
    """Each (query, document) pair's score, and the tokens read."""
    info: SchedulerInfo = request.app.state.tokenizer_manager.info
    if info.task == "classify":
        if len(info.labels) != 1:
            raise InvalidRequestError(f"scoring pairs needs a cross-encoder with one label; this classifier has {len(info.labels)}", "model")
        outputs = await run_pooling(request, body, [EmbeddingItem(text=q, text_pair=d) for q, d in pairs])
        return [float(label_probabilities(logits_of(out))[0]) for out in outputs], usage_of(outputs).total_tokens
    # An embedding model: each distinct text embedded once.
    texts = list(dict.fromkeys(text for pair in pairs for text in pair))
    outputs = await run_pooling(request, body, [EmbeddingItem(text=text) for text in texts])
    vectors = {}
    for text, out in zip(texts, outputs):
        vector = embedding_vector(out, info)
        vectors[text] = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return [float(vectors[q] @ vectors[d]) for q, d in pairs], usage_of(outputs).total_tokens


@router.post("/v1/score", response_model=ScoreResponse)
@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if not seconds or len(firsts) != len(seconds):
        raise InvalidRequestError("text_1 must be one text, or as many texts as text_2", param="text_1")
    scores, tokens = await pair_scores(request, body, list(zip(firsts, seconds)))
    return ScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.app.state.model_name,
        data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
@router.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True)
@router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    scores, tokens = await pair_scores(request, body, [(body.query, doc) for doc in body.documents])
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]
    results = [
        RerankResult(
            index=i,
            document=RerankDocument(text=body.documents[i]) if body.return_documents else None,
            relevance_score=scores[i],
        )
        for i in order
    ]
    return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=request.app.state.model_name, usage=RerankUsage(total_tokens=tokens), results=results)
