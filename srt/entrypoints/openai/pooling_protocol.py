"""Bodies of the pooling routes: OpenAI's ``/v1/embeddings``, SGLang's ``/encode``, and vLLM's
``/classify``, ``/v1/score`` and ``/v1/rerank`` (Jina / Cohere shaped), as pydantic models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from srt.entrypoints.openai.protocol import ChatMessage

# What a route takes as input: a string, strings, token ids, or lists of token ids.
Inputs = str | list[str] | list[int] | list[list[int]]


class PoolingRequest(BaseModel):
    """Fields every pooling route's body has. ``truncate_prompt_tokens`` (vLLM's) is declared so
    that it is refused by name: srt refuses an input longer than the model takes, never cuts it."""

    model: str | None = None
    truncate_prompt_tokens: int | None = None


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingRequest(PoolingRequest):
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format base64


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: PoolingUsage


class EncodeReqInput(BaseModel):
    """SGLang's ``/encode``: ``text`` or ``input_ids``, one or a list."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    dimensions: int | None = None
    rid: str | list[str] | None = None  # accepted for SGLang's clients; each input gets an id of its own
    model: str | None = None


class ClassifyRequest(PoolingRequest):
    """vLLM's ``/classify``: ``input`` (texts or token ids), or ``messages``, one conversation
    rendered with the chat template (what a reward model scores)."""

    input: Inputs | None = None
    messages: list[ChatMessage] | None = None
    user: str | None = None


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    logits: list[float]  # the head's raw scores (a reward model's reward)
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: PoolingUsage


class ScoreRequest(PoolingRequest):
    """vLLM's ``/v1/score``: ``text_1`` against each of ``text_2`` (one against many, or pairwise)."""

    text_1: str | list[str]
    text_2: str | list[str]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage


class RerankRequest(PoolingRequest):
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
