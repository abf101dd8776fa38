"""Reasoning parsers (``--reasoning-parser``, SGLang's names): the model's thinking goes to
``reasoning_content``, the rest on to the tool-call parser and ``content``.

Think-tag models write ``<think>...</think>`` before their answer. Whether the output starts
inside the thinking depends on the prompt: DeepSeek-R1's template (and Qwen3-Thinking's) opens
``<think>`` itself, so the output starts inside it; Qwen3's closes it (``<think></think>``)
when ``enable_thinking`` is false, and then nothing is thinking. gpt-oss thinks in harmony's
``analysis`` channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex

from srt.entrypoints.openai.tool_parsers import Reasoning, Text
from srt.entrypoints.openai.tool_parsers.reader import Reading, StreamReader, Trim
from srt.entrypoints.openai.tool_parsers.gpt_oss import MARKERS as HARMONY_MARKERS, MESSAGE, HarmonyReader, Header


class ReasoningParser(StreamReader):
    markers: tuple[str, ...] = ()

    def parse(self, text: str) -> tuple[str | None, str]:
        """``(reasoning_content, content)`` of a whole output (None: no thinking)."""
        reasoning, content = [], []
        for event in [*self.feed(text), *self.finish()]:
            (reasoning if isinstance(event, Reasoning) else content).append(event.text)
        return ("".join(reasoning) if reasoning else None), "".join(content)

    def _reason(self, text: str) -> None:
        if text:
            self._events.append(Reasoning(text))

    def _answer(self, text: str) -> None:
        if text:
            self._events.append(Text(text))


class ThinkParser(ReasoningParser):
    """``<think>reasoning</think>answer``; whitespace around the reasoning and before the answer is dropped."""

    def __init__(self, start: str, end: str, inside: bool) -> None:
        self.start, self.end, self.inside = start, end, inside
        self.markers = (start, end)
        self._opening = regex.compile(r"\s*" + regex.escape(start))
        super().__init__()

    def _parse(self) -> Reading[None]:
        if (opening := (yield from self._match(self._opening))) is not None:
            self._take(opening.end())
        elif not self.inside:
            yield from self._rest(self._answer)
            return
        yield from self._until((self.end,), Trim(self._reason, lstrip=True))
        yield from self._peek()
        self._skip_space()  # between the thinking and the answer
        yield from self._rest(self._answer)


class HarmonyReasoningParser(HarmonyReader, ReasoningParser):
    """gpt-oss: ``analysis`` messages are the reasoning, ``final`` ones and commentary without a
    recipient the content; messages to a recipient (tool calls) pass on whole, for the tool parser."""

    markers = HARMONY_MARKERS

    def __init__(self) -> None:
        self._mode = "content"  # of the current message: reasoning, content or raw
        super().__init__()

    def _on_plain(self, text: str) -> None:
        self._answer(text)

    def _on_header(self, header: Header) -> None:
        self._mode = "reasoning" if header.channel == "analysis" else "raw" if header.recipient else "content"
        if self._mode == "raw":
            self._answer(header.raw + MESSAGE)

    def _on_content(self, text: str) -> None:
        (self._reason if self._mode == "reasoning" else self._answer)(text)

    def _on_end(self, marker: str | None) -> None:
        if self._mode == "raw" and marker is not None:
            self._answer(marker)


@dataclass(frozen=True)
class _ThinkTags:
    start: str
    end: str
    always: bool  # the model always thinks, whether or not the prompt opened the tag


_THINK_TAGS = {
    "deepseek-r1": _ThinkTags("<think>", "</think>", always=True),
    "qwen3-thinking": _ThinkTags("<think>", "</think>", always=True),
    "qwen3": _ThinkTags("<think>", "</think>", always=False),
    "deepseek-v3": _ThinkTags("<think>", "</think>", always=False),  # thinks when chat_template_kwargs has thinking: true
    "glm45": _ThinkTags("<think>", "</think>", always=False),
    "kimi": _ThinkTags("◁think▷", "◁/think▷", always=False),
}
REASONING_PARSERS = (*_THINK_TAGS, "gpt-oss")


def reasoning_parser(name: str, prompt: str, chat_template_kwargs: dict[str, Any] | None) -> ReasoningParser | None:
    """The parser ``--reasoning-parser name`` gives for one output of ``prompt``; None when the
    request turned thinking off (``enable_thinking: false``, as SGLang honours it)."""
    if (chat_template_kwargs or {}).get("enable_thinking") is False:
        return None
    if name == "gpt-oss":
        return HarmonyReasoningParser()
    tags = _THINK_TAGS[name]
    tail = prompt.rstrip()
    inside = tail.endswith(tags.start) or (tags.always and not tail.endswith(tags.end))
    return ThinkParser(tags.start, tags.end, inside)
