"""Request work that can take long on the CPU (tokenizing a big prompt, a chat template over
long messages) runs in a worker thread, so the event loop keeps serving other requests and
``/health`` meanwhile; short inputs, the common case, stay inline (a thread hop costs more
than tokenizing them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Texts up to this long tokenize in well under a millisecond.
INLINE_CHARS = 20_000


async def off_loop_if_long(chars: int, fn: Callable[..., T], *args) -> T:
    """``fn(*args)``, in a worker thread when its input is ``chars`` characters or more."""
    if chars < INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
