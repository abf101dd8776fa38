"""Tools on the chat route: checking ``tools`` and ``tool_choice``, the grammar that enforces
``tool_choice: required`` or a named function, and the parser that reads each choice's calls.

With ``auto`` the model decides, and its calls are read in its own format (``--tool-call-parser``,
else the format its chat template shows). ``required`` and a named function are enforced as
vLLM and SGLang enforce them: the output is constrained to a JSON array of
``{"name", "parameters"}`` objects (one of the tools each), or to the named function's
arguments object, and read as such.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from srt.entrypoints.errors import APIError
from srt.entrypoints.openai.constraints import constraint_params
from srt.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from srt.entrypoints.openai.tool_parsers import PARSERS, JsonArrayParser, NamedCallParser, ToolParser, detect_tool_parser

logger = logging.getLogger(__name__)

_NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """How one request uses its tools."""

    choice: Literal["none", "auto", "required", "named"]
    names: tuple[str, ...] = ()
    parser_name: str | None = None  # auto: the model's format
    max_calls: int | None = None
    function: str | None = None  # named: the function
    json_schema: str | None = None  # required and named: what the output must match

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None

    def parser(self) -> ToolParser | None:
        """A parser for one choice's output; None when no calls are read from it."""
        if self.choice == "auto":
            return PARSERS[self.parser_name](self.names, self.max_calls)
        if self.choice == "required":
            return JsonArrayParser(self.names, self.max_calls)
        if self.choice == "named":
            return NamedCallParser(self.function)
        return None


def tool_use(body: ChatCompletionRequest, server_parser: str | None) -> ToolUse:
    """The request's use of tools, checked; ``server_parser`` reads the model's own calls."""
    tools = body.tools or []
    names = tuple(tool.function.name for tool in tools)
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions have the same name", param="tools")
    choice = body.tool_choice if body.tool_choice is not None else "auto" if tools else "none"
    if choice == "none":
        return ToolUse("none", names)
    if not tools:
        raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
    max_calls = 1 if body.parallel_tool_calls is False else None
    if choice == "auto":
        if server_parser is None:
            choices = ", ".join(sorted(PARSERS))
            message = (
                "this server cannot read tool calls in this model's format (its chat template shows none it knows): "
                f"start it with --tool-call-parser NAME ({choices}), or send tool_choice none, required or a function"
            )
            raise APIError(400, message, param="tools")
        return ToolUse("auto", names, server_parser, max_calls)
    if constraint_params(body):  # the output cannot follow two grammars
        what = choice if isinstance(choice, str) else f"function {choice.function.name!r}"
        message = f"tool_choice {what} constrains the output itself: it cannot be combined with regex, json_schema, ebnf or response_format"
        raise APIError(400, message, param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools", param="tool_choice")
        return ToolUse("named", names, function=tool.function.name, json_schema=json.dumps(_parameters(tool)))
    return ToolUse("required", names, max_calls=max_calls, json_schema=json.dumps(_calls_schema(tools, max_calls)))


def server_tool_parser(explicit: str | None, chat_template: str) -> str | None:
    """``--tool-call-parser``, else the format the chat template shows."""
    return explicit or _detected(chat_template)


@functools.lru_cache(maxsize=4)
def _detected(chat_template: str) -> str | None:
    name = detect_tool_parser(chat_template)
    if name is not None:  # once per template: the cache remembers
        logger.info("tool calls are read as %s, the format the chat template shows (--tool-call-parser sets it)", name)
    return name


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or _NO_ARGUMENTS


def _calls_schema(tools: list[Tool], max_calls: int | None) -> dict[str, Any]:
    """A JSON array of calls, each ``{"name": <a tool>, "parameters": <its arguments>}``. The
    tools' ``$defs`` move to the top, where their ``#/$defs/...`` references now point."""
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        parameters = dict(_parameters(tool))
        tool_defs = parameters.pop("$defs", {})
        if not isinstance(tool_defs, dict):
            raise APIError(400, f"tools: {tool.function.name}'s $defs is not an object", param="tools")
        for name, definition in tool_defs.items():
            if defs.setdefault(name, definition) != definition:
                raise APIError(400, f"tools: two functions define $defs {name!r} differently", param="tools")
        variants.append(
            {
                "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if defs:
        schema["$defs"] = defs
    return schema
