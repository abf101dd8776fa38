"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status,
and the app's handlers that turn every failure into one."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import starlette.responses
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from srt.runtime.generate_request import InvalidRequestError, ServerOverloadedError
from srt.tokenizer_manager.manager import RuntimeDiedError

logger = logging.getLogger(__name__)


class JSONResponse(starlette.responses.JSONResponse):
    """JSON rendered with orjson (FastAPI's own ORJSONResponse is deprecated). A JSONResponse
    to FastAPI, so the schema shows each route's body model rather than a string."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raise from a handler to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        message, param = _printable(message), None if param is None else _printable(param)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    @classmethod
    def of(cls, error: Exception) -> APIError:
        """The API error for a failure that the runtime raised."""
        if isinstance(error, APIError):
            return error
        if isinstance(error, InvalidRequestError):
            return cls(400, str(error), param=error.param, code=error.code)
        if isinstance(error, RuntimeDiedError):
            return cls(503, str(error), type="server_error")
        if isinstance(error, ServerOverloadedError):
            return cls(503, str(error), code="server_overloaded", headers={"Retry-After": "1"})
        raise TypeError(f"no API error for {type(error).__name__}") from error

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    """``text`` with lone surrogates (from a client's JSON, quoted back in a message) written as
    ``\\udXXX``: JSON bodies must be valid UTF-8, and orjson refuses them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_model(request: Request, model: str | None) -> str | None:
    """A request that names a model must name the served one (or its path), or one of its LoRA
    adapters (by name, or ``base:adapter`` as vLLM users write it); None means the served one,
    as SGLang is as lenient. Returns the adapter named, None for the base model."""
    state = request.app.state
    names = (state.model_name, state.server_args.model_path, state.tokenizer_manager.runtime.model_path)
    if model is None or model in names:
        return None
    adapters = state.tokenizer_manager.lora_adapters
    base, _, adapter = model.rpartition(":")
    if model in adapters:
        return model
    if base in names and adapter in adapters:
        return adapter
    raise APIError(404, f"the model `{model}` does not exist", param="model", code="model_not_found")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(InvalidRequestError)
    @app.exception_handler(RuntimeDiedError)
    @app.exception_handler(ServerOverloadedError)
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return APIError.of(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, location = "the request body is not valid JSON", []
        elif location:
            message = f"{'.'.join(location)}: {message}"
        # ``param`` names the top-level field, as OpenAI does; the message keeps the full path.
        return APIError(400, message, param=location[0] if location else None).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: logged with its traceback, answered in the API's shape.
        logger.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()
