"""The runtime's child processes: how the parent starts one, and how each one starts up.

A child is ``python -m srt.scheduler`` or ``python -m srt.detokenizer``, a fresh
interpreter that never imports the caller's ``__main__`` (so a script may create an
``srt.Engine`` at module level, with no main guard). Its ``ChildSpec`` arrives as JSON
on stdin (never on the command line, where ``ps`` would show an API key). It reports
``ChildReady`` or ``ChildFailed`` once over a pipe, dies with its parent, and logs its
traceback on any crash.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from srt.runtime.codec import decode, encode
from srt.runtime.ipc import IpcEndpoints
from srt.runtime.messages import ChildFailed, ChildReady
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass
class ChildSpec:
    """Everything a child needs to start: the server's arguments, the sockets, and the
    keyword arguments of its role's main function."""

    name: str
    server_args: ServerArgs
    endpoints: IpcEndpoints
    options: dict[str, Any]
    ready_fd: int = -1


def configure_logging(level: str, prefix: str = "") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"[%(asctime)s{prefix}] %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


# ---- the parent's side -------------------------------------------------------------------------


def start_child(module: str, spec: ChildSpec, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Connection]:
    """Start ``python -m module`` with ``spec``; returns the process and the pipe its report arrives on."""
    read_fd, write_fd = os.pipe()
    spec = dataclasses.replace(spec, ready_fd=write_fd)
    payload = json.dumps(dataclasses.asdict(spec)).encode()
    try:
        # A process group of its own: a stop signal sent to the server's group (systemd, docker
        # stop, Ctrl-C) reaches the parent alone, which then stops its children in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env, process_group=0
        )
    finally:
        os.close(write_fd)
    proc.stdin.write(payload)
    proc.stdin.close()
    return proc, Connection(read_fd, writable=False)


def read_report(pipe: Connection) -> ChildReady | ChildFailed:
    try:
        return decode(pipe.recv_bytes())
    except EOFError:
        return ChildFailed("exited during start-up")


# ---- the child's side --------------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies, so no child is ever orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def run_child(main: Callable[..., None]) -> None:
    """The body of a child's ``__main__``: read the spec, run ``main(spec, report)``; ``main``
    calls ``report(ChildReady(...))`` once it serves. Any crash is logged, and reported
    to a parent still waiting for ``ChildReady``."""
    raw = json.loads(sys.stdin.read())
    spec = ChildSpec(
        name=raw["name"],
        server_args=ServerArgs(**raw["server_args"]),
        endpoints=IpcEndpoints(**raw["endpoints"]),
        options=raw["options"],
        ready_fd=raw["ready_fd"],
    )
    configure_logging(spec.server_args.log_level, f" {spec.name}")
    die_with_parent()
    # SIGINT goes to the whole foreground process group; the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = Connection(spec.ready_fd, readable=False)

    def report(message: ChildReady | ChildFailed) -> None:
        pipe.send_bytes(encode(message))

    try:
        main(spec, report)
    except BaseException:
        text = traceback.format_exc()
        logger.error("%s crashed:\n%s", spec.name, text)
        try:
            report(ChildFailed(f"{spec.name} crashed:\n{text}"))
        except OSError:
            pass
        os._exit(1)
