"""Helpers for HTTP responses that wait on generations: server-sent events, and cancelling
work whose client went away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request

from srt.entrypoints.errors import APIError

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
# How often a waiting non-streaming handler looks for its client: an abandoned request runs this long at most.
_DISCONNECT_POLL_S = 0.1


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")
