"""Pythonic calls (Llama 3.2 / 4 with their pythonic templates, and others): a Python list of
calls with keyword arguments, ``[get_weather(city="Paris"), f(x=1)]``. The list is read with
``ast`` and its values converted by hand, literals only: nothing is ever evaluated."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

import regex

from srt.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser
from srt.entrypoints.openai.tool_parsers.reader import BracketScanner, Reading

_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


class PythonicParser(ToolParser):
    """A Python list of calls with keyword arguments (see the module's docstring)."""

    _START = regex.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")

    def _parse(self) -> Reading[None]:
        # A call list is decided whole, once it has closed: its calls come out together.
        while (yield from self._search(self._START, self._text)):
            raw: list[str] = []
            closed = yield from self._scan_json(raw.append, BracketScanner(quotes="\"'", opening="([{", closing=")]}"))
            calls = _calls("".join(raw)) if closed else None
            if calls is None or not all(self._known(call.name) for call in calls):
                self._text("".join(raw))
                continue
            for call in calls:
                self._whole_call(call)


def _calls(source: str) -> list[ToolCall] | None:
    """The calls a Python list of calls makes; None if ``source`` is anything else."""
    try:
        tree = ast.parse(source, mode="eval")
        if not isinstance(tree.body, ast.List):
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
                return None  # positional arguments have no names to give them, **kwargs no values
            arguments = {k.arg: _value(k.value) for k in node.keywords}
            calls.append(ToolCall(_dotted_name(node.func), json.dumps(arguments, ensure_ascii=False)))
        return calls
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("not a function name")


def _value(node: ast.expr) -> Any:
    """A literal's JSON value (JSON's true / false / null are taken too); ValueError for anything else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("not a finite number")
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a sign on something that is not a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_value(k) if k is not None else None for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("object keys must be strings")
        return dict(zip(keys, map(_value, node.values)))
    raise ValueError(f"not a literal: {type(node).__name__}")
