"""The HTTP server: the app (native routes, the OpenAI-compatible router, errors, API-key
checks) and uvicorn around it.

Every runtime process is started and ready, and one warm-up request has run, before
the port opens. SIGTERM / SIGINT stop accepting, abort requests in flight, and stop
every child within seconds; a dead child makes the server exit non-zero.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from srt.entrypoints.api_schema import ERROR_RESPONSES, install_openapi
from srt.entrypoints.errors import APIError, JSONResponse, install_error_handlers
from srt.entrypoints.http_limits import BodyLimits, HeaderTimeoutProtocol
from srt.entrypoints.lora_api import router as lora_router
from srt.entrypoints.native_api import router as native_router
from srt.entrypoints.native_api import warm_up
from srt.entrypoints.openai.serving import router as openai_router
from srt.entrypoints.openai.tokenization import router as tokenization_router
from srt.model_loader.default_model import DEFAULT_MODEL_NAME
from srt.runtime.runtime import Runtime
from srt.server_args import ServerArgs
from srt.tokenizer_manager.manager import TokenizerManager
from srt.tokenizer_manager.metrics import Metrics

logger = logging.getLogger(__name__)

_GRACEFUL_SHUTDOWN_S = 5


def build_app(tm: TokenizerManager, server_args: ServerArgs) -> FastAPI:
    model_name = server_args.served_model_name or server_args.model_path or DEFAULT_MODEL_NAME
    tm.metrics = Metrics(model_name)  # the HTTP front is where latencies are measured

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await tm.start()
        await warm_up(tm)
        app.state.ready = True
        logger.info("The server is fired up and ready to roll! (http://%s:%d)", server_args.host, server_args.port)
        yield
        app.state.ready = False
        await tm.abort_all()
        await tm.close()

    app = FastAPI(title="srt", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.tokenizer_manager = tm
    app.state.server_args = server_args
    app.state.model_name = model_name
    app.state.ready = False
    install_error_handlers(app)
    if server_args.api_key:
        app.add_middleware(_APIKeyCheck, api_key=server_args.api_key)
    app.add_middleware(BodyLimits, max_bytes=server_args.max_request_body_bytes, timeout_s=server_args.timeout_body_read)
    for router in (native_router, openai_router, tokenization_router, lora_router):
        app.include_router(router, responses=ERROR_RESPONSES)
    install_openapi(app)
    return app


def build_follower_app(runtime: Runtime, on_failure: Callable[[str], None]) -> FastAPI:
    """Nodes other than 0 (``--nnodes``) serve only ``/health`` while their scheduler ranks run."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def watch() -> None:
            while not (dead := runtime.dead_children()):
                await asyncio.sleep(0.5)
            on_failure(f"runtime process(es) died: {', '.join(dead)}")

        task = asyncio.create_task(watch())
        yield
        task.cancel()

    app = FastAPI(title="srt follower node", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if runtime.dead_children() else 200)

    return app


class _APIKeyCheck:
    """Every route but ``/health`` needs ``Authorization: Bearer <key>``. Plain ASGI rather than
    ``@app.middleware``: that wraps the request's ``receive``, and handlers would no longer see
    a client disconnect (whose requests must be aborted)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # in constant time: the key is a secret
                response = APIError(401, "missing or invalid API key", code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, but a stop signal first aborts in-flight requests so their streams end at once."""

    def __init__(self, config: uvicorn.Config, tokenizer_manager: TokenizerManager | None) -> None:
        super().__init__(config)
        self.tokenizer_manager = tokenizer_manager

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            logger.info("received signal %d: shutting down", sig)
            if self.tokenizer_manager is not None:
                asyncio.get_event_loop().create_task(self.tokenizer_manager.abort_all())
        super().handle_exit(sig, frame)


def launch_server(server_args: ServerArgs) -> int:
    """Serve until stopped; the exit code is non-zero when a runtime process died."""
    exit_code = 0
    server: _Server | None = None

    def on_failure(reason: str) -> None:
        nonlocal exit_code
        logger.error("shutting down: %s", reason)
        exit_code = 1
        if server is not None:
            server.should_exit = True

    tm = TokenizerManager.launch(server_args) if server_args.node_rank == 0 else None
    runtime = tm.runtime if tm is not None else Runtime(server_args)
    try:
        if tm is not None:
            tm.on_failure = on_failure
            app = build_app(tm, server_args)
        else:
            app = build_follower_app(runtime, on_failure)
        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            loop="uvloop",
            log_level=server_args.log_level,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            timeout_keep_alive=server_args.timeout_keep_alive,
            http=HeaderTimeoutProtocol,
            access_log=False,
        )
        config.timeout_header_read = server_args.timeout_header_read  # HeaderTimeoutProtocol reads it
        server = _Server(config, tm)
        # uvicorn re-raises the stop signal once it has shut down; with these handlers that
        # lands here instead of killing the process before the children are stopped.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run()
        if not server.started and exit_code == 0:
            exit_code = 1  # the port could not be bound, or start-up failed
    finally:
        runtime.shutdown()
    return exit_code
