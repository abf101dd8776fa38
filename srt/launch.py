"""``python -m srt.launch --model-path M [--tp N] [--port P] [--config file.yaml]``: start the server.

Every runtime process is started and ready, and one warm-up request has run, before
the port opens. SIGTERM / SIGINT stop accepting, abort requests in flight, and stop
every child within seconds; a dead child makes the server exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvicorn

from srt.runtime.child import configure_logging
from srt.server_args import ServerArgs

logger = logging.getLogger("srt.launch")

_GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    """uvicorn, but a stop signal first aborts in-flight requests so their streams end at once."""

    def __init__(self, config: uvicorn.Config, tokenizer_manager) -> None:
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
    from srt.entrypoints.http_server import build_app, build_follower_app
    from srt.runtime.runtime import Runtime

    runtime = Runtime(server_args)
    exit_code = 0
    server: _Server | None = None

    def on_failure(reason: str) -> None:
        nonlocal exit_code
        logger.error("shutting down: %s", reason)
        exit_code = 1
        if server is not None:
            server.should_exit = True

    try:
        if runtime.is_head:
            app = build_app(runtime, server_args)
            runtime.tokenizer_manager.on_failure = on_failure
        else:
            app = build_follower_app(runtime, on_failure)
        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            loop="uvloop",
            log_level=server_args.log_level,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            access_log=False,
        )
        server = _Server(config, runtime.tokenizer_manager)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srt.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    namespace = parser.parse_args(argv)
    try:
        server_args = ServerArgs.from_cli_args(namespace)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(server_args.log_level)
    sys.exit(launch_server(server_args))


if __name__ == "__main__":
    main()
