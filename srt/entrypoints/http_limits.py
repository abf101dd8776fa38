"""What one HTTP client may hold: request headers within a deadline, a body within a size
and a deadline. Without them a slow client (one byte a second) keeps a connection, and its
buffers, for as long as it likes; uvicorn itself bounds only idle keep-alive connections."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from srt.entrypoints.errors import APIError


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers, counted from the
    connection's start or the previous response's end; past it the connection is closed.
    The deadline is ``timeout_header_read`` set on the uvicorn config by ``launch_server``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout_s: float = config.timeout_header_read
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class BodyLimits:
    """Bodies over ``max_bytes`` get a 413 before the handler sees them: by their Content-Length,
    or, for a chunked body, as soon as the bytes read pass the limit. A body not complete within
    ``timeout_s`` gets a 408. The body is read here first (at most the limit), then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(413, f"the request body is larger than {self.max_bytes} bytes", scope, receive, send)
            return
        try:
            messages = await asyncio.wait_for(self._read_body(receive), self.timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(408, f"the request body did not arrive within {self.timeout_s:g} s", scope, receive, send)
            return
        if messages is None:
            await self._refuse(413, f"the request body is larger than {self.max_bytes} bytes", scope, receive, send)
            return
        buffered = iter(messages)

        async def replay() -> Message:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        """The body's messages, or None once they pass ``max_bytes``."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body", False):
                return messages

    @staticmethod
    async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
        code = "request_too_large" if status == 413 else "request_timeout"
        await APIError(status, message, code=code).response()(scope, receive, send)
