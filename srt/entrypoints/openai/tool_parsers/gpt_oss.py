"""gpt-oss's harmony format: the output is a sequence of messages,
``<|start|>assistant<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>CONTENT<|end|>``
(the first one's ``<|start|>assistant`` is the prompt's). ``analysis`` is the model's thinking,
``final`` the answer, and a ``commentary`` message to ``functions.NAME`` ending in ``<|call|>``
is a tool call whose content is its arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass

from srt.entrypoints.openai.tool_parsers.base import ToolParser
from srt.entrypoints.openai.tool_parsers.reader import Reading, StreamReader

START, CHANNEL, CONSTRAIN, MESSAGE = "<|start|>", "<|channel|>", "<|constrain|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
MARKERS = (START, CHANNEL, CONSTRAIN, MESSAGE, *ENDS)


@dataclass(frozen=True)
class Header:
    raw: str  # as written, from <|start|> or <|channel|> up to <|message|>
    channel: str | None
    recipient: str | None

    @classmethod
    def read(cls, raw: str) -> Header:
        channel = re.search(r"<\|channel\|>\s*([^\s<]+)", raw)
        recipient = re.search(r"\bto=([^\s<]+)", raw)
        return cls(raw, channel and channel[1], recipient and recipient[1])


class HarmonyReader(StreamReader):
    """Reads harmony messages and hands them to the hooks: text outside any message, each
    header, its content in pieces, and its end marker (None when the output ended first)."""

    def _on_plain(self, text: str) -> None:
        raise NotImplementedError

    def _on_header(self, header: Header) -> None:
        raise NotImplementedError

    def _on_content(self, text: str) -> None:
        raise NotImplementedError

    def _on_end(self, marker: str | None) -> None:
        raise NotImplementedError

    def _parse(self) -> Reading[None]:
        while (opening := (yield from self._until((START, CHANNEL), self._on_plain))) is not None:
            head, complete = yield from self._read_until(MESSAGE)
            if not complete:  # the output ended inside a header
                self._on_plain(opening + head)
                return
            self._on_header(Header.read(opening + head))
            end = yield from self._until(ENDS, self._on_content)
            self._on_end(end)


class GptOssParser(HarmonyReader, ToolParser):
    """Tool calls from harmony messages; ``final`` and commentary without a recipient are text,
    ``analysis`` is left out (``--reasoning-parser gpt-oss`` returns it as reasoning_content)."""

    markers = MARKERS

    def __init__(self, *args, **kwargs) -> None:
        self._mode = "text"  # of the current message: text, call or hidden
        super().__init__(*args, **kwargs)

    def _on_plain(self, text: str) -> None:
        self._text(text)

    def _on_header(self, header: Header) -> None:
        recipient = header.recipient or ""
        if recipient.startswith("functions.") and self._known(name := recipient.removeprefix("functions.")):
            self._mode = "call"
            self._start_call(name)
        else:
            self._mode = "hidden" if header.channel == "analysis" else "text"

    def _on_content(self, text: str) -> None:
        if self._mode == "call":
            self._args(text)
        elif self._mode == "text":
            self._text(text)

    def _on_end(self, marker: str | None) -> None:
        if self._mode == "call":
            self._end_call()
        self._mode = "text"
