"""The OpenAI-compatible API: ``GET /v1/models``, and the routers of ``POST /v1/completions``
(``completions.py``), ``POST /v1/chat/completions`` (``chat.py``), ``POST /v1/embeddings``
(``embeddings.py``) and the scoring routes (``scoring.py``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from srt.entrypoints.openai.chat import router as chat_router
from srt.entrypoints.openai.completions import router as completions_router
from srt.entrypoints.openai.embeddings import router as embeddings_router
from srt.entrypoints.openai.protocol import ModelCard, ModelList
from srt.entrypoints.openai.scoring import router as scoring_router

router = APIRouter()
router.include_router(completions_router)
router.include_router(chat_router)
router.include_router(embeddings_router)
router.include_router(scoring_router)

_STARTED = int(time.time())  # the model card's `created`


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = request.app.state
    tm = state.tokenizer_manager
    context_length = tm.info.context_length
    base = ModelCard(id=state.model_name, created=_STARTED, max_model_len=context_length)
    adapters = [
        ModelCard(id=name, created=_STARTED, max_model_len=context_length, root=path, parent=state.model_name)
        for name, path in tm.lora_adapters.items()
    ]
    return ModelList(data=[base, *adapters])
