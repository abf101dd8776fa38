"""Formats whose calls are JSON objects ``{"name": ..., "arguments" | "parameters": {...}}``,
and the parsers of what ``tool_choice: required`` and a named ``tool_choice`` generate."""

from __future__ import annotations

import secrets
import string
import regex

from srt.entrypoints.openai.tool_parsers.base import ToolParser
from srt.entrypoints.openai.tool_parsers.reader import Reading


class HermesParser(ToolParser):
    """Hermes, Qwen2.5 and Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
    block per call, text before and after."""

    markers = ("<tool_call>", "</tool_call>")
    _END = regex.compile(r"\s*</tool_call>")

    def _parse(self) -> Reading[None]:
        while (yield from self._until(("<tool_call>",), self._text)) is not None:
            if (yield from self._json_call(prefix="<tool_call>")) and (end := (yield from self._match(self._END))):
                self._take(end.end())
        yield from self._rest(self._text)


class Llama3Parser(ToolParser):
    """Llama 3.1-3.3 JSON calls: ``{"name": ..., "parameters": {...}}``, after ``<|python_tag|>`` or as
    the whole output (the tag is a special token, often decoded away); several are joined by ``;``."""

    markers = ("<|python_tag|>",)
    _SEPARATOR = regex.compile(r"\s*;")

    def _parse(self) -> Reading[None]:
        prefix = ""
        if (yield from self._peek()) != "{":  # not a call from the start: look for the tag
            if (yield from self._until(self.markers, self._text)) is None:
                return
            prefix = self.markers[0]
        while (yield from self._json_call(prefix)) and (separator := (yield from self._match(self._SEPARATOR))):
            self._take(separator.end())
            prefix = ""
        yield from self._rest(self._text)


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers), or
    ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+; ``[CALL_ID]id`` may come before ``[ARGS]``)."""

    markers = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    _NAMED = regex.compile(r"\s*(?P<name>[A-Za-z0-9_.-]+)(?:\[CALL_ID\][A-Za-z0-9_-]*)?\[ARGS\]\s*\{")

    @staticmethod
    def new_call_id() -> str:
        # Mistral's chat templates refuse tool call ids that are not 9 letters and digits.
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def _parse(self) -> Reading[None]:
        while (yield from self._until(self.markers[:1], self._text)) is not None:
            if (yield from self._peek()) == "[":
                yield from self._json_call_array(prefix=self.markers[0])
                continue
            m = yield from self._match(self._NAMED)
            if m is None or not self._known(m["name"]):
                self._text(self.markers[0])
                continue
            self._take(m.end() - 1)
            self._start_call(m["name"])
            yield from self._scan_json(self._args)
            self._end_call()
        yield from self._rest(self._text)


class JsonArrayParser(ToolParser):
    """What ``tool_choice: required`` generates: a JSON array of ``{"name": ..., "parameters": {...}}``."""

    def _parse(self) -> Reading[None]:
        yield from self._json_call_array()
        yield from self._rest(self._text)


class NamedCallParser(ToolParser):
    """What a named ``tool_choice`` generates: the arguments object of that one function."""

    def __init__(self, function: str) -> None:
        self.function = function
        super().__init__([function])

    def _parse(self) -> Reading[None]:
        if (yield from self._peek()) == "{":
            self._skip_space()
            self._start_call(self.function)
            yield from self._scan_json(self._args)
            self._end_call()
        yield from self._rest(self._text)
