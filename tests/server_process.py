"""Start a real `python -m srt.launch` on a free loopback port, and always stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model_path: str | None, *args: str, startup_timeout_s: float = 180, log_path: os.PathLike | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields ``(base_url, process)``; the server is stopped (SIGTERM, then SIGKILL) on exit.
    ``model_path`` None serves the default model; ``log_path`` takes the server's log."""
    port = free_port()
    model = ["--model-path", model_path] if model_path else []
    cmd = [sys.executable, "-m", "srt.launch", *model, "--host", "127.0.0.1", "--port", str(port), *args]
    log = open(log_path, "w") if log_path is not None else None
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.3)
        yield base_url, proc
    finally:
        stop(proc)
        if log is not None:
            log.close()


def stop(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # The server is its own session leader: kill the whole group, children included.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
