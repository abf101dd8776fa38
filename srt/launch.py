"""``python -m srt.launch --model-path M [--tp N] [--port P] [--config file.yaml]``: start the
server (``srt.entrypoints.http_server``)."""

from __future__ import annotations

import argparse
import sys

from srt.runtime.child import configure_logging
from srt.server_args import ServerArgs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srt.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    namespace = parser.parse_args(argv)
    try:
        server_args = ServerArgs.from_cli_args(namespace)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(server_args.log_level)
    # Imported after parsing, so that `--help` and argument errors do not wait for torch.
    from srt.entrypoints.http_server import launch_server

    sys.exit(launch_server(server_args))


if __name__ == "__main__":
    main()
