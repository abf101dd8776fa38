"""ZeroMQ PUSH/PULL channels between the processes, carrying ``srt.runtime.messages`` dataclasses.

Endpoints are ``ipc://`` paths in a private temporary directory named after the server's
pid; high-water marks are off so that a burst of requests is never dropped or blocks the
sender. A server removes its directory when it stops; one killed outright cannot, so each
new one removes the directories of servers that are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from srt.runtime.codec import decode, encode


@dataclass
class IpcEndpoints:
    """Where each process listens."""

    scheduler_inputs: list[str]  # TokenizerManager → rank 0 of each data-parallel replica
    scheduler_output: str  # every replica's rank 0 → the detokenizer (or, without a tokenizer, the TokenizerManager)
    tokenizer_input: str  # detokenizer → TokenizerManager

    @property
    def has_detokenizer(self) -> bool:
        return self.scheduler_output != self.tokenizer_input

    @classmethod
    def in_new_dir(cls, dp_size: int = 1, with_detokenizer: bool = True) -> tuple[IpcEndpoints, str]:
        remove_stale_dirs()
        directory = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        os.chmod(directory, 0o700)

        def endpoint(name: str) -> str:
            return f"ipc://{os.path.join(directory, name)}"

        schedulers = [endpoint(f"scheduler-{i}") for i in range(dp_size)]
        tokenizer = endpoint("tokenizer")
        return cls(schedulers, endpoint("detokenizer") if with_detokenizer else tokenizer, tokenizer), directory


_DIR_PREFIX = "srt-ipc-"
_DIR_PATTERN = re.compile(rf"{_DIR_PREFIX}(\d+)-")


def remove_stale_dirs(parent: str | None = None) -> None:
    """Remove socket directories whose server process no longer exists (it was killed with SIGKILL)."""
    parent = parent or tempfile.gettempdir()
    for name in os.listdir(parent):
        match = _DIR_PATTERN.match(name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _socket(context: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


class Receiver:
    """The PULL end a process binds to its own endpoint."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.sock = _socket(context, zmq.PULL, endpoint, bind=True)

    def recv(self, timeout_ms: int | None = None) -> Any | None:
        """The next message, or None after ``timeout_ms`` (None: wait for ever; 0: do not wait)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return decode(self.sock.recv())

    def recv_all(self) -> list[Any]:
        """Every message that has arrived, without waiting."""
        messages = []
        while self.sock.poll(0):
            messages.append(decode(self.sock.recv()))
        return messages


class Sender:
    """The PUSH end connected to another process's endpoint."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.sock = _socket(context, zmq.PUSH, endpoint, bind=False)

    def send(self, message: Any) -> None:
        self.sock.send(encode(message))


class AsyncReceiver:
    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = _socket(context, zmq.PULL, endpoint, bind=True)

    async def recv(self) -> Any:
        return decode(await self.sock.recv())


class AsyncSender:
    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = _socket(context, zmq.PUSH, endpoint, bind=False)

    async def send(self, message: Any) -> None:
        await self.sock.send(encode(message))
