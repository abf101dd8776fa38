"""Tool-call parsers, one per output format, by the names ``--tool-call-parser`` takes (SGLang's
and vLLM's), and the format a chat template's text shows it uses."""

from __future__ import annotations

from srt.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, collect
from srt.entrypoints.openai.tool_parsers.reader import CallArgs, CallStart, Event, Reasoning, Text
from srt.entrypoints.openai.tool_parsers.deepseek import DeepSeekV3Parser
from srt.entrypoints.openai.tool_parsers.gpt_oss import GptOssParser
from srt.entrypoints.openai.tool_parsers.json_calls import HermesParser, JsonArrayParser, Llama3Parser, MistralParser, NamedCallParser
from srt.entrypoints.openai.tool_parsers.pythonic import PythonicParser

__all__ = [
    "CallArgs", "CallStart", "Event", "JsonArrayParser", "NamedCallParser", "PARSERS", "Reasoning", "Text",
    "ToolCall", "ToolParser", "collect", "detect_tool_parser",
]  # fmt: skip

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen25": HermesParser,  # SGLang's names for Qwen's format, which is Hermes'
    "qwen": HermesParser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "deepseek_v3": DeepSeekV3Parser,
    "deepseekv3": DeepSeekV3Parser,
    "gpt_oss": GptOssParser,
    "gpt-oss": GptOssParser,
}

# What a template that renders tool calls writes, and the format that is; the first found decides.
_SIGNS = (
    ("to=functions.", "gpt_oss"),
    ("<|call|>", "gpt_oss"),
    ("<tool_call>", "hermes"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3"),
)


def detect_tool_parser(chat_template: str) -> str | None:
    """The parser for the tool calls that ``chat_template`` renders, if it shows one."""
    return next((name for sign, name in _SIGNS if sign in chat_template), None)
