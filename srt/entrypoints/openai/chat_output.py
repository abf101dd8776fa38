"""One chat choice's output as the API returns it: the reasoning parser splits off the thinking
first, the tool parser reads calls from the rest, and what is left is the content. The same
reading gives a whole message and, piece by piece, the stream's deltas."""

from __future__ import annotations

import functools

from srt.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatDelta,
    ChatToolCall,
    DeltaFunction,
    DeltaToolCall,
    FinishReason,
    ToolCallFunction,
)
from srt.entrypoints.openai.reasoning_parser import ReasoningParser
from srt.entrypoints.openai.tool_parsers import CallArgs, CallStart, Event, Reasoning, Text, ToolParser
from srt.runtime.messages import FinishReason as SrtFinishReason, FinishStop


class ChoiceOutput:
    """Given the ``tokenizer`` (None: the request chose whether special tokens are decoded), the
    output keeps the special tokens that are the parsers' markers (``keeps_special_tokens``,
    for the sampling parameters), and the stop token that ends it is cut off its text."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, tokenizer=None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.call_ids: list[str] = []
        markers = (reasoning.markers if reasoning else ()) + (tools.markers if tools else ())
        self.keeps_special_tokens = tokenizer is not None and not special_tokens(tokenizer).isdisjoint(markers)
        self._tokenizer = tokenizer

    @property
    def made_calls(self) -> bool:
        return bool(self.call_ids)

    def read(self, text: str, finish: SrtFinishReason | None) -> list[Event]:
        """The events of the output's next ``text``; ``finish`` when it is the last."""
        if self.keeps_special_tokens and isinstance(finish, FinishStop) and isinstance(finish.matched, int):
            text = text.removesuffix(self._tokenizer.decode([finish.matched], skip_special_tokens=False))
        events = self._split(self.reasoning.feed(text) if self.reasoning else [Text(text)] if text else [])
        if finish is not None:
            if self.reasoning is not None:
                events += self._split(self.reasoning.finish())
            if self.tools is not None:
                events += self.tools.finish()
        self.call_ids += [self.tools.new_call_id() for e in events if isinstance(e, CallStart)]
        return events

    def finish_reason(self, reason: FinishReason | None) -> FinishReason | None:
        """An output that ended by itself after making calls ends in ``tool_calls``."""
        return "tool_calls" if reason == "stop" and self.made_calls else reason

    def message(self, events: list[Event]) -> AssistantMessage:
        reasoning = [e.text for e in events if isinstance(e, Reasoning)]
        content = "".join(e.text for e in events if isinstance(e, Text))
        calls: dict[int, ChatToolCall] = {}
        for event in events:
            if isinstance(event, CallStart):
                calls[event.index] = ChatToolCall(id=self.call_ids[event.index], function=ToolCallFunction(name=event.name, arguments=""))
            elif isinstance(event, CallArgs):
                calls[event.index].function.arguments += event.fragment
        return AssistantMessage(
            content=content if content or not calls else None,
            reasoning_content="".join(reasoning) if reasoning else None,
            tool_calls=list(calls.values()) or None,
        )

    def deltas(self, events: list[Event]) -> list[ChatDelta]:
        """One delta per run of events of one kind (and one per call's start), in order."""
        deltas: list[ChatDelta] = []
        for event in events:
            last = deltas[-1] if deltas else None
            if isinstance(event, Text):
                if last is not None and last.content is not None:
                    last.content += event.text
                else:
                    deltas.append(ChatDelta(content=event.text))
            elif isinstance(event, Reasoning):
                if last is not None and last.reasoning_content is not None:
                    last.reasoning_content += event.text
                else:
                    deltas.append(ChatDelta(reasoning_content=event.text))
            elif isinstance(event, CallStart):
                function = DeltaFunction(name=event.name, arguments="")
                call = DeltaToolCall(index=event.index, id=self.call_ids[event.index], type="function", function=function)
                deltas.append(ChatDelta(tool_calls=[call]))
            elif last is not None and last.tool_calls is not None and last.tool_calls[-1].id is None:  # more arguments
                last.tool_calls[-1].function.arguments += event.fragment
            else:
                deltas.append(ChatDelta(tool_calls=[DeltaToolCall(index=event.index, function=DeltaFunction(arguments=event.fragment))]))
        return deltas

    def _split(self, events: list[Event]) -> list[Event]:
        """The reasoning parser's events with its text read by the tool parser."""
        if self.tools is None:
            return events
        split: list[Event] = []
        for event in events:
            split += self.tools.feed(event.text) if isinstance(event, Text) else [event]
        return split


@functools.lru_cache(maxsize=4)
def special_tokens(tokenizer) -> frozenset[str]:
    """The tokenizer's special tokens, which decoding leaves out unless told to keep them."""
    return frozenset(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
