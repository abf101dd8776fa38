"""The incremental reader every output parser (tool calls, reasoning) is built on, and the
events the parsers emit.

A parser reads a model's output while it streams. It is fed text deltas (``feed``) and told
when the output has ended (``finish``), and answers with events. Its logic is written as one
generator, ``_parse``, that reads the output from start to end and suspends (``yield``)
whenever it cannot decide yet; the helpers below decide only on text that more output could
not change (what might still become a marker is held back), so the events' concatenation is
the same however the text was cut into deltas. A whole text is read by the same machine, so a
streamed response and a whole one always agree.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import TypeVar

import regex  # partial matching: whether more text could still complete a pattern

T = TypeVar("T")
Reading = Generator[None, None, T]  # a helper of ``_parse``: suspends until more text comes, returns a T


@dataclass(frozen=True)
class Text:
    """Normal text (an answer's content)."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """Text of the model's thinking (``reasoning_content``)."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A tool call begins: the ``index``-th of the output, to ``name``."""

    index: int
    name: str


@dataclass(frozen=True)
class CallArgs:
    """The next piece of call ``index``'s arguments (JSON text)."""

    index: int
    fragment: str


Event = Text | Reasoning | CallStart | CallArgs


class StreamReader:
    """Runs ``_parse`` over text that arrives in pieces; subclasses append their events to ``_events``."""

    def __init__(self) -> None:
        self._buffer = ""  # read but not consumed
        self._final = False  # no more text will come
        self._events: list[Event] = []
        self._machine = self._parse()
        self._running = True
        self._step()

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        self._step()
        return self._drain()

    def finish(self) -> list[Event]:
        self._final = True
        self._step()
        if self._running:
            raise RuntimeError(f"{type(self).__name__} waited for text after the output ended")
        return self._drain() + self._flush()

    def _parse(self) -> Generator[None, None, None]:
        """Reads the whole output, to its end (``_rest`` at the latest)."""
        raise NotImplementedError

    def _flush(self) -> list[Event]:
        """Events held back until the end (trailing whitespace)."""
        return []

    def _step(self) -> None:
        if self._running:
            try:
                self._machine.send(None)
            except StopIteration:
                self._running = False

    def _drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # ---- reading helpers (each a generator: ``x = yield from self._helper(...)``) ----------------

    def _take(self, n: int) -> str:
        taken, self._buffer = self._buffer[:n], self._buffer[n:]
        return taken

    def _wait(self) -> Generator[None, None, None]:
        """Suspends until more text arrives; never called once the output has ended."""
        assert not self._final
        yield

    def _match(self, pattern: regex.Pattern) -> Reading[regex.Match | None]:
        """``pattern`` matched at the head of the buffer, once more text cannot change the answer."""
        while True:
            m = pattern.match(self._buffer, partial=True)
            if m is None or not m.partial:
                return m
            if self._final:
                return None
            yield from self._wait()

    def _until(self, markers: tuple[str, ...], emit) -> Reading[str | None]:
        """Passes text to ``emit`` until one of ``markers``, which is consumed and returned;
        None when the output ends first."""
        while True:
            found = _first(self._buffer, markers)
            if found is not None:
                at, marker = found
                emit(self._take(at))
                self._take(len(marker))
                return marker
            if self._final:
                emit(self._take(len(self._buffer)))
                return None
            emit(self._take(len(self._buffer) - held_suffix(self._buffer, markers)))
            yield from self._wait()

    def _rest(self, emit) -> Reading[None]:
        """Passes everything that is left, to the end of the output, to ``emit``."""
        yield from self._until((), emit)

    def _read_until(self, marker: str) -> Reading[tuple[str, bool]]:
        """The text up to ``marker`` (consumed, not returned) and whether it came, or all that is left."""
        while (at := self._buffer.find(marker)) == -1 and not self._final:
            yield from self._wait()
        if at == -1:
            return self._take(len(self._buffer)), False
        text = self._take(at)
        self._take(len(marker))
        return text, True

    def _search(self, pattern: regex.Pattern, emit) -> Reading[bool]:
        """Passes text to ``emit`` until ``pattern`` matches, leaving the match at the head of
        the buffer (True); False when the output ends first."""
        while True:
            m = pattern.search(self._buffer, partial=True)
            if m is not None and not m.partial:
                emit(self._take(m.start()))
                return True
            if self._final:
                emit(self._take(len(self._buffer)))
                return False
            emit(self._take(m.start() if m is not None else len(self._buffer)))
            yield from self._wait()

    def _peek(self) -> Reading[str]:
        """The next character that is not whitespace (nothing is consumed), or "" at the end."""
        while not self._buffer.strip() and not self._final:
            yield from self._wait()
        return self._buffer.lstrip()[:1]

    def _skip_space(self) -> str:
        return self._take(len(self._buffer) - len(self._buffer.lstrip()))

    def _take_token(self) -> str:
        """Consumes the whitespace and the character that ``_peek`` saw."""
        return self._skip_space() + self._take(1)

    def _scan_json(self, emit, scanner: BracketScanner | None = None) -> Reading[bool]:
        """Passes the JSON object or array (or what ``scanner`` follows) at the head of the buffer
        to ``emit`` as it arrives; True once it closed, False when the output ended first."""
        scanner = scanner or BracketScanner()
        while True:
            end = scanner.scan(self._buffer)
            emit(self._take(len(self._buffer) if end is None else end))
            if end is not None:
                return True
            if self._final:
                return False
            yield from self._wait()


class BracketScanner:
    """Follows a bracketed value (a JSON object or array, a Python list) through its text: where
    it ends. Strings, escapes and nesting are tracked; nothing else is checked."""

    def __init__(self, quotes: str = '"', opening: str = "{[", closing: str = "}]") -> None:
        self.opening = opening
        self._outside = re.compile("[" + re.escape(quotes + opening + closing) + "]")
        self._inside = {q: re.compile("[" + re.escape(q) + r"\\]") for q in quotes}
        self.depth = 0
        self.quote: str | None = None  # the string being read, by its quote
        self.escaped = False

    def scan(self, text: str) -> int | None:
        """Reads ``text`` (the continuation of what it read before); the index just past the
        value's end, or None while it has not ended."""
        i = 0
        if self.escaped and text:
            self.escaped, i = False, 1
        while True:
            m = (self._outside if self.quote is None else self._inside[self.quote]).search(text, i)
            if m is None:
                return None
            c, i = m.group(), m.end()
            if self.quote is not None:
                if c == self.quote:
                    self.quote = None
                elif i == len(text):
                    self.escaped = True  # the escaped character comes with the next text
                    return None
                else:
                    i += 1
            elif c in self.opening:
                self.depth += 1
            elif c in self._inside:
                self.quote = c
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return i


class Trim:
    """Passes text on to ``emit`` without its trailing whitespace, which is held back until more
    text follows (``flush``) or dropped (``drop``); while ``lstrip``, leading whitespace is dropped."""

    def __init__(self, emit, lstrip: bool = False) -> None:
        self.emit = emit
        self.lstrip = lstrip
        self.space = ""

    def __call__(self, text: str) -> None:
        if self.lstrip:
            text = text.lstrip()
            if not text:
                return
            self.lstrip = False
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body) :]
        if body:
            self.emit(body)

    def drop(self) -> None:
        self.space = ""

    def flush(self) -> None:
        if self.space:
            self.emit(self.space)
            self.space = ""


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest marker in ``text`` and where it starts."""
    found = [(at, m) for m in markers if (at := text.find(m)) != -1]
    return min(found) if found else None


def held_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a marker."""
    for size in range(min(len(text), max(map(len, markers), default=1) - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0
