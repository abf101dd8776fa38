"""srt: a serving runtime for Hugging Face transformers language models.

``srt.Engine`` and ``srt.ServerArgs`` are imported lazily, so ``python -m srt.launch
--help`` and light imports do not pay for torch and transformers.
"""

from typing import Any

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from srt.entrypoints.engine import Engine

        return Engine
    if name == "ServerArgs":
        from srt.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(f"module 'srt' has no attribute {name!r}")
