"""Tool-call and reasoning parsers, read whole and in pieces: what each format gives, and that a
stream cut anywhere (inside markers too) gives exactly what the whole text gives.

A whole text is parsed by one parser; the same text fed one character at a time, and in random
pieces, to fresh parsers must give the same events once concatenated. Malformed calls stay
normal text, whole.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from srt.entrypoints.openai.chat_output import ChoiceOutput
from srt.entrypoints.openai.reasoning_parser import REASONING_PARSERS, reasoning_parser
from srt.entrypoints.openai.tool_parsers import (
    PARSERS,
    CallArgs,
    CallStart,
    JsonArrayParser,
    NamedCallParser,
    Reasoning,
    Text,
    ToolCall,
    collect,
    detect_tool_parser,
)
from srt.runtime.messages import FinishStop
from tiny_models import byte_tokenizer

TOOLS = ["get_weather", "f"]
PARIS = ToolCall("get_weather", '{"city": "Paris"}')


def pieces(text: str, seed: int) -> list[str]:
    """``text`` cut into pieces of 1-8 characters (seed -1: one character each)."""
    if seed == -1:
        return list(text)
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        out.append(text[i : i + n])
        i += n
    return out


def streamed(make, text: str, seed: int) -> list:
    parser = make()
    events = [e for piece in pieces(text, seed) for e in parser.feed(piece)]
    return events + parser.finish()


def check(make, text: str) -> tuple[str, list[ToolCall]]:
    """The parse of ``text``, after checking that every way of streaming it agrees."""
    whole = make().parse(text)
    for seed in (-1, *range(12)):
        events = streamed(make, text, seed)
        assert collect(events) == whole, f"pieces seed {seed}"
        started = []  # each call starts once, in order, and its arguments follow its start
        for e in events:
            if isinstance(e, CallStart):
                started.append(e.index)
            elif isinstance(e, CallArgs):
                assert started and started[-1] == e.index
        assert started == list(range(len(whole[1])))
    return whole


def parser(name: str, tools=TOOLS, max_calls=None):
    return lambda: PARSERS[name](tools, max_calls)


# ---- hermes (Qwen) ---------------------------------------------------------------------------------

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, expected",
    [
        (HERMES_CALL, ("", [PARIS])),
        ("Let me look.\n" + HERMES_CALL, ("Let me look.", [PARIS])),
        (HERMES_CALL + "\nIt is sunny.", ("It is sunny.", [PARIS])),
        (
            HERMES_CALL + '\n<tool_call>\n{"name": "f", "arguments": {"x": [1, {"y": "}</tool_call>"}]}}\n</tool_call>',
            ("", [PARIS, ToolCall("f", '{"x": [1, {"y": "}</tool_call>"}]}')]),
        ),
        ('<tool_call>{"name": "f", "arguments": {"s": "a\\"b\\\\"}}</tool_call>', ("", [ToolCall("f", '{"s": "a\\"b\\\\"}')])),
        # Not streamable as written (arguments first, or as JSON text): decided once the object closed.
        ('<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>', ("", [PARIS])),
        ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', ("", [PARIS])),
        # Cut off inside the arguments (max_tokens): the call stays, partial, as OpenAI returns it.
        ('<tool_call>{"name": "f", "arguments": {"x": "abc', ("", [ToolCall("f", '{"x": "abc')])),
    ],
)
def test_hermes(text, expected):
    assert check(parser("hermes"), text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call> and after",
        'a <tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call> b',  # not among the tools
        '<tool_call>{"name": "f", "argum',  # cut off before the call is known
        '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
        '<tool_call>["f", {}]</tool_call>',
        "a < b, <tool_c and <tool_call",
        "no calls at all",
    ],
)
def test_hermes_malformed_calls_stay_text(text):
    assert check(parser("hermes"), text) == (text, [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = HERMES_CALL + '<tool_call>{"name": "f", "arguments": {}}</tool_call>done'
    assert check(parser("hermes", max_calls=1), text) == ("done", [PARIS])


def test_any_name_is_a_call_without_a_list_of_tools():
    assert check(parser("hermes", tools=None), HERMES_CALL.replace("get_weather", "other")) == ("", [ToolCall("other", PARIS.arguments)])


# ---- llama3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ("", [PARIS])),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', ("", [PARIS])),  # the tag decoded away
        (
            ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "arguments": {}}',
            ("", [PARIS, ToolCall("f", "{}")]),
        ),
        ('Checking. <|python_tag|>{"name": "f", "parameters": {"a": 1}}', ("Checking.", [ToolCall("f", '{"a": 1}')])),
        ('{"answer": 42}', ('{"answer": 42}', [])),  # JSON that is no call
        ('Hello {"name": "f", "parameters": {}}', ('Hello {"name": "f", "parameters": {}}', [])),  # not at the start
        ('{"name": "nope", "parameters": {}}', ('{"name": "nope", "parameters": {}}', [])),
    ],
)
def test_llama3(text, expected):
    assert check(parser("llama3"), text) == expected


# ---- mistral ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]',
            ("", [PARIS, ToolCall("f", "{}")]),
        ),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', ("Sure.", [PARIS])),
        ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}', ("", [PARIS, ToolCall("f", "{}")])),
        ("[TOOL_CALLS] [not json]", ("[TOOL_CALLS] [not json]", [])),
        ("[TOOL_CALLS]nope[ARGS]{}", ("[TOOL_CALLS]nope[ARGS]{}", [])),
    ],
)
def test_mistral(text, expected):
    assert check(parser("mistral"), text) == expected


def test_mistral_call_ids_are_what_its_templates_accept():
    ids = {PARSERS["mistral"].new_call_id() for _ in range(20)}
    assert len(ids) == 20 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    assert re.fullmatch(r"call_[0-9a-f]{24}", PARSERS["hermes"].new_call_id())


# ---- pythonic --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[get_weather(city="Paris")]', ("", [PARIS])),
        (
            "Sure: [get_weather(city='Paris'), f(x=1, y=[True, None, false], z={'k': -2.5}, s=\"a]b)\")] there",
            ("Sure:there", [PARIS, ToolCall("f", '{"x": 1, "y": [true, null, false], "z": {"k": -2.5}, "s": "a]b)"}')]),
        ),
        ("[f()]", ("", [ToolCall("f", "{}")])),
    ],
)
def test_pythonic(text, expected):
    assert check(parser("pythonic"), text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3] and [see (above)]",
        "[f(1)]",  # positional arguments have no names
        "[f(x=g())]",  # values are literals only
        "[f(x=__import__('os').system('touch /tmp/pwned'))]",  # read, never evaluated
        "[get_weather(city='Paris'), nope(a=1)]",  # one unknown function: the list is not calls
        "[f(x=1",
    ],
)
def test_pythonic_non_calls_stay_text(text):
    assert check(parser("pythonic"), text) == (text, [])


# ---- deepseek v3 -----------------------------------------------------------------------------------

DS_CALL = '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>'


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"<｜tool▁calls▁begin｜>{DS_CALL}<｜tool▁calls▁end｜>", ("", [PARIS])),
        (
            f"Let me see.<｜tool▁calls▁begin｜>{DS_CALL}\n"
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ("Let me see.", [PARIS, ToolCall("f", "{}")]),
        ),
        (  # V3.1
            '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
            ("", [PARIS]),
        ),
        (
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>nope\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>nope\n```json\n{}\n```<｜tool▁call▁end｜>", []),
        ),
    ],
)
def test_deepseek_v3(text, expected):
    assert check(parser("deepseek_v3"), text) == expected


# ---- gpt-oss (harmony) -----------------------------------------------------------------------------

GPT_CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<|channel|>analysis<|message|>The user wants weather.<|end|>" + GPT_CALL, ("", [PARIS])),
        ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}', ("", [PARIS])),  # <|call|> was the stop token
        ("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.", ("It is sunny.", [])),
        ("<|channel|>commentary<|message|>Checking the weather.<|end|>" + GPT_CALL, ("Checking the weather.", [PARIS])),
        ("<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}<|call|>", ("{}", [])),
        ("plain text, no harmony", ("plain text, no harmony", [])),
    ],
)
def test_gpt_oss(text, expected):
    assert check(parser("gpt_oss"), text) == expected


# Pieces of every format, markers cut in two among them, put together at random.
_FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]x",
    "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "function<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>",
    "\n```json\n", "```", "<|start|>assistant", "<|channel|>", "analysis", "final", "commentary to=functions.f",
    " <|constrain|>json", "<|message|>", "<|end|>", "<|call|>", '{"name": "f", "arguments": ', '{"name": "get_weather", "parameters": ',
    "{", "}", "[", "]", "(", ")", '"', "\\", ",", ";", ":", "f(", "x=1", "get_weather", '"city"', " ", "\n", "text", "<think>", "</think>",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_any_text_parses_the_same_streamed_or_whole(name):
    rng = random.Random(name)
    for _ in range(150):
        text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 30)))
        check(parser(name), text)


# ---- what tool_choice required / a named function generate -------------------------------------


def test_required_array_of_calls():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "f", "parameters": {}}]'
    assert check(lambda: JsonArrayParser(TOOLS), text) == ("", [PARIS, ToolCall("f", "{}")])
    assert check(lambda: JsonArrayParser(TOOLS, 1), text) == ("", [PARIS])


def test_named_function_arguments():
    assert check(lambda: NamedCallParser("get_weather"), ' {"city": "Paris"}') == ("", [PARIS])
    assert check(lambda: NamedCallParser("get_weather"), "not an object") == ("not an object", [])


# ---- detection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, name",
    [
        ("{% for tool_call in message.tool_calls %}<tool_call>\n{{ tool_call | tojson }}\n</tool_call>{% endfor %}", "hermes"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3"),
        ("{{- '[TOOL_CALLS] [' }}", "mistral"),
        ("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'}}", "deepseek_v3"),
        ("{{- ' to=functions.' + tool_call.name }}<|call|>", "gpt_oss"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ],
)
def test_the_format_is_detected_from_the_chat_template(template, name):
    assert detect_tool_parser(template) == name


def test_every_parser_is_a_server_choice():
    import typing

    from srt.server_args import ServerArgs

    hints = typing.get_type_hints(ServerArgs)
    assert set(typing.get_args(typing.get_args(hints["tool_call_parser"])[0])) == set(PARSERS)
    assert set(typing.get_args(typing.get_args(hints["reasoning_parser"])[0])) == set(REASONING_PARSERS)


# ---- reasoning -------------------------------------------------------------------------------------


def check_reasoning(name: str, prompt: str, text: str, kwargs=None) -> tuple[str | None, str]:
    whole = reasoning_parser(name, prompt, kwargs).parse(text)
    for seed in (-1, *range(8)):
        events = streamed(lambda: reasoning_parser(name, prompt, kwargs), text, seed)
        reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
        content = "".join(e.text for e in events if isinstance(e, Text))
        assert (reasoning or None, content) == whole, f"pieces seed {seed}"
    return whole


@pytest.mark.parametrize(
    "name, prompt, text, expected",
    [
        ("qwen3", "<|im_start|>assistant\n", "<think>\nabc\n</think>\n\nanswer", ("abc", "answer")),
        ("qwen3", "<|im_start|>assistant\n", "just an answer", (None, "just an answer")),
        ("qwen3", "<|im_start|>assistant\n<think>\n", "abc</think>answer", ("abc", "answer")),  # Qwen3-Thinking's template
        ("qwen3", "<|im_start|>assistant\n", "<think>cut off", ("cut off", "")),
        ("deepseek-r1", "<｜Assistant｜><think>\n", "abc\n</think>\n\nanswer", ("abc", "answer")),
        ("deepseek-r1", "<｜Assistant｜>", "<think>abc</think>answer", ("abc", "answer")),  # R1-0528 opens it itself
        ("deepseek-r1", "<｜Assistant｜>", "abc</think>answer", ("abc", "answer")),
        ("deepseek-v3", "<｜Assistant｜></think>", "answer", (None, "answer")),  # thinking off
        ("kimi", "", "◁think▷abc◁/think▷answer", ("abc", "answer")),
        (
            "gpt-oss",
            "<|start|>assistant",
            "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer.",
            ("Think.", "Answer."),
        ),
        ("gpt-oss", "<|start|>assistant", GPT_CALL, (None, GPT_CALL)),  # calls pass on, whole, to the tool parser
    ],
)
def test_reasoning(name, prompt, text, expected):
    assert check_reasoning(name, prompt, text) == expected


def test_enable_thinking_false_turns_reasoning_off():
    assert reasoning_parser("qwen3", "", {"enable_thinking": False}) is None
    assert reasoning_parser("qwen3", "", {"enable_thinking": True}) is not None


# ---- a choice's whole output: reasoning, then calls from the rest ----------------------------------


def choice_events(make_output, text: str, seed: int, finish=FinishStop(2)) -> tuple[ChoiceOutput, list]:
    output = make_output()
    parts = pieces(text, seed)
    events = [e for piece in parts[:-1] for e in output.read(piece, None)]
    return output, events + output.read(parts[-1], finish)


@pytest.mark.parametrize("seed", [-1, *range(6)])
def test_reasoning_then_tool_calls(seed):
    text = "<think>\nThe user wants the weather.\n</think>\n\n" + HERMES_CALL
    make = lambda: ChoiceOutput(reasoning_parser("qwen3", "", None), PARSERS["hermes"](TOOLS))  # noqa: E731
    output, events = choice_events(make, text, seed)
    message = output.message(events)
    assert message.reasoning_content == "The user wants the weather." and message.content is None
    (call,) = message.tool_calls
    assert (call.function.name, call.function.arguments) == (PARIS.name, PARIS.arguments) and call.id.startswith("call_")
    assert output.finish_reason("stop") == "tool_calls" and output.finish_reason("length") == "length"

    deltas = output.deltas(events)
    assert "".join(d.reasoning_content or "" for d in deltas) == message.reasoning_content
    call_deltas = [c for d in deltas for c in d.tool_calls or ()]
    first, *rest = call_deltas
    assert (first.id, first.type, first.function.name, first.function.arguments) == (call.id, "function", "get_weather", "")
    assert all(c.id is None and c.function.name is None for c in rest)
    assert "".join(c.function.arguments for c in rest) == call.function.arguments
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_special_token_markers_are_kept_and_the_stop_token_cut():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    assert not ChoiceOutput(None, PARSERS["hermes"](TOOLS), tokenizer).keeps_special_tokens  # its markers are no special tokens
    assert not ChoiceOutput(None, PARSERS["mistral"](TOOLS), None).keeps_special_tokens  # the request chose
    output = ChoiceOutput(None, PARSERS["mistral"](TOOLS), tokenizer)
    assert output.keeps_special_tokens
    stop_text = tokenizer.decode([stop], skip_special_tokens=False)  # what the detokenizer gives for it
    events = output.read('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}' + stop_text, FinishStop(stop))
    message = output.message(events)
    assert message.content is None and message.tool_calls[0].function.arguments == PARIS.arguments
