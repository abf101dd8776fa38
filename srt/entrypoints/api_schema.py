"""What the OpenAPI schema (``/openapi.json``, ``/docs``) says the routes answer.

FastAPI documents request bodies from their pydantic models by itself; this module adds
what it cannot see: the bodies of routes that return plain dicts or streams, the error
body every route may answer with, and the status codes really sent (a body that fails
validation is a 400 here, as in OpenAI's API, never FastAPI's 422).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which every route answers with when it fails."""

    error: ErrorDetail


class GenerateMetaInfo(BaseModel, extra="allow"):
    """SGLang's ``meta_info``; logprob fields appear only when asked for."""

    id: str
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float | None = None


class GenerateResponse(BaseModel):
    text: str | None = None  # absent with --skip-tokenizer-init
    output_ids: list[int]
    meta_info: GenerateMetaInfo
    index: int | None = None  # in a stream of several generations: which one this event is


class ModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str | None
    served_model_name: str
    is_generation: bool
    context_length: int


class ReplicaLoad(BaseModel):
    dp_rank: int
    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or wrong API key (with --api-key)",
        404: "Unknown model or route",
        413: "Request body too large",
        500: "Internal error (a bug, logged with its traceback)",
        503: "Server overloaded (with Retry-After) or shutting down",
    }.items()
}

def json_or_event_stream(model: Any, description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is ``model`` as JSON, or with ``stream: true`` server-sent events carrying
    JSON in ``data:`` lines. Documented only: the route's result is not re-validated."""
    # Before OpenAPI 3.2 (FastAPI writes 3.1) an event stream's ``schema`` describes one event.
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "description": "one chunk as JSON, or [DONE] at the end"},
            "event": {"type": "string"},
            "id": {"type": "string"},
        },
    }
    return {200: {"model": model, "description": description, "content": {"text/event-stream": {"schema": event}}}}


def plain_text(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the schema without FastAPI's 422 responses and their validation-error models, and
    with every error response documented as the JSON it is."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    for status in ERROR_RESPONSES:
                        # FastAPI gives an error the route's media type; errors are JSON everywhere.
                        content = operation["responses"][str(status)]["content"]
                        content["application/json"] = content.pop(next(iter(content)))
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
