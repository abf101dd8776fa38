"""Tool-call parsers: the base class, and the reading of JSON calls that several formats share.

A call is recognised once its header (its name and the start of its arguments) is complete, and
from there its arguments stream as the model writes them; a call is never taken back, so
arguments cut off by ``max_tokens`` stay partial, as OpenAI's API returns them. Text that turns
out not to be a call (bad JSON, an unknown function) stays normal text, so nothing the model
wrote is lost.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import ClassVar

import regex

from srt.entrypoints.openai.tool_parsers.reader import CallArgs, CallStart, Event, Reading, StreamReader, Text, Trim


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text


class ToolParser(StreamReader):
    """Splits output into text and tool calls.

    ``tool_names``: the functions the request offered (None: any name); a call to another is
    text. ``max_calls``: calls beyond it are dropped (``parallel_tool_calls: false``)."""

    markers: ClassVar[tuple[str, ...]] = ()  # the format's literal markers (kept in the text when special tokens)

    def __init__(self, tool_names: Collection[str] | None = None, max_calls: int | None = None) -> None:
        self.tool_names = None if tool_names is None else set(tool_names)
        self.max_calls = max_calls
        self.calls = 0
        # Whitespace between text and calls is dropped: held back until text follows it.
        self._text = Trim(lambda text: self._events.append(Text(text)))
        self._dropping = False
        super().__init__()

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text and the calls of a whole output (a parser reads one output: use a fresh one)."""
        return collect([*self.feed(text), *self.finish()])

    @staticmethod
    def new_call_id() -> str:
        return f"call_{secrets.token_hex(12)}"

    def _known(self, name: str) -> bool:
        return self.tool_names is None or name in self.tool_names

    def _flush(self) -> list[Event]:
        self._text.flush()
        return self._drain()

    def _start_call(self, name: str) -> None:
        self._text.drop()
        self._dropping = self.max_calls is not None and self.calls >= self.max_calls
        if not self._dropping:
            self._events.append(CallStart(self.calls, name))
            self.calls += 1

    def _args(self, fragment: str) -> None:
        if fragment and not self._dropping:
            self._events.append(CallArgs(self.calls - 1, fragment))

    def _end_call(self) -> None:
        self._text.lstrip, self._dropping = True, False

    def _whole_call(self, call: ToolCall) -> None:
        self._start_call(call.name)
        self._args(call.arguments)
        self._end_call()

    # ---- JSON calls: {"name": ..., "arguments": {...}} (hermes, llama3, mistral, required) --------

    def _json_call(self, prefix: str = "") -> Reading[bool]:
        """Reads the ``{"name": ..., "arguments": {...}}`` object at the head of the buffer (after
        whitespace): streamed when it starts with its name, else decided once it has closed.
        ``prefix`` is the raw text before it (a marker), given back with it when it is no call."""
        m = yield from self._match(_JSON_CALL_HEADER)
        if m is not None and (name := _json_string(m["name"])) is not None and self._known(name):
            self._take(m.end() - 1)  # up to the arguments' opening brace
            self._start_call(name)
            if (yield from self._scan_json(self._args)) and (close := (yield from self._match(_OBJECT_CLOSE))):
                self._take(close.end())
            self._end_call()
            return True
        raw: list[str] = []
        closed = (yield from self._peek()) == "{" and (yield from self._scan_json(raw.append))
        text = "".join(raw)
        call = _json_call(text) if closed else None
        if call is not None and self._known(call.name):
            self._whole_call(call)
            return True
        self._text(prefix + text)
        return False

    def _json_call_array(self, prefix: str = "") -> Reading[None]:
        """Reads a JSON array of calls (mistral's, and what ``tool_choice: required`` generates)."""
        if (yield from self._peek()) != "[":
            self._text(prefix)
            return
        prefix += self._take_token()
        while (token := (yield from self._peek())) in ("{", ","):
            if token == ",":
                self._take_token()
            elif (yield from self._json_call(prefix)):
                prefix = ""
            else:
                return  # not a call: it and what follows are text
        if token == "]":
            self._take_token()
        else:
            self._text(prefix)


_JSON_CALL_HEADER = regex.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')
_OBJECT_CLOSE = regex.compile(r"\s*\}")


def _json_string(body: str) -> str | None:
    """The string whose JSON text (quotes left out) is ``body``; None if that is no JSON string."""
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return None


def _json_call(text: str) -> ToolCall | None:
    """The call a whole JSON object describes, whatever its key order; None if it is none."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # arguments given as their JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def collect(events: Iterable[Event]) -> tuple[str, list[ToolCall]]:
    """The text and the calls that ``events`` make up."""
    text, calls = [], {}
    for event in events:
        if isinstance(event, Text):
            text.append(event.text)
        elif isinstance(event, CallStart):
            calls[event.index] = ToolCall(event.name, "")
        elif isinstance(event, CallArgs):
            calls[event.index].arguments += event.fragment
    return "".join(text), list(calls.values())
