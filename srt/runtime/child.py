"""Child-process plumbing shared by the scheduler and detokenizer processes."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def configure_logging(level: str, prefix: str = "") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"[%(asctime)s{prefix}] %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies, so no child is ever orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def run_child(name: str, log_level: str, ready: Connection, main: Callable[..., None], *args: Any) -> None:
    """Entry point of every child: logging, parent-death signal, and a logged traceback (sent
    to the parent too, if it is still waiting for ``ready``) on any crash."""
    configure_logging(log_level, f" {name}")
    die_with_parent()
    # SIGINT goes to the whole foreground process group; the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        main(*args, ready=ready)
    except BaseException:
        text = traceback.format_exc()
        logger.error("%s crashed:\n%s", name, text)
        try:
            ready.send({"status": "error", "error": f"{name} crashed:\n{text}"})
        except (OSError, ValueError):
            pass
        os._exit(1)
