"""DeepSeek V3 (and V3.1) calls, between special markers:
``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``;
V3.1 writes ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``."""

from __future__ import annotations

import regex

from srt.entrypoints.openai.tool_parsers.base import ToolParser
from srt.entrypoints.openai.tool_parsers.reader import Reading

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, SEPARATOR, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


class DeepSeekV3Parser(ToolParser):
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, SEPARATOR, CALL_END)
    _NEXT = regex.compile(r"\s*(?P<marker><｜tool▁call▁begin｜>|<｜tool▁calls▁end｜>)")
    _HEADER = regex.compile(
        r"(?:function<｜tool▁sep｜>(?P<name>[^\n<]+?)\s*```(?:json)?\s*"  # V3
        r"|(?P<bare>[^\n<]+?)<｜tool▁sep｜>\s*)\{"  # V3.1
    )
    _TAIL = regex.compile(r"\s*(?:```\s*)?<｜tool▁call▁end｜>")

    def _parse(self) -> Reading[None]:
        while (yield from self._until((CALLS_BEGIN,), self._text)) is not None:
            prefix = CALLS_BEGIN  # given back as text if no call follows
            while (m := (yield from self._match(self._NEXT))) is not None and m["marker"] == CALL_BEGIN:
                self._take(m.end())
                if (yield from self._call(prefix + m.group())):
                    prefix = ""
            if m is not None:
                self._take(m.end())
            else:
                self._text(prefix)
        yield from self._rest(self._text)

    def _call(self, prefix: str) -> Reading[bool]:
        header = yield from self._match(self._HEADER)
        name = header and (header["name"] or header["bare"]).strip()
        if not name or not self._known(name):
            body, ended = yield from self._read_until(CALL_END)
            self._text(prefix + body + (CALL_END if ended else ""))
            return False
        self._take(header.end() - 1)  # up to the arguments' opening brace
        self._start_call(name)
        if (yield from self._scan_json(self._args)) and (tail := (yield from self._match(self._TAIL))):
            self._take(tail.end())
        self._end_call()
        return True
