"""Tool calling and reasoning on /v1/chat/completions, against a real server, through the official
`openai` client (and httpx for raw bodies).

The tiny model has random weights and a byte tokenizer (token id = byte value): left alone it
writes random bytes and never calls a tool. So calls are made as a user of SGLang's ``regex``
extension would make them: the regex forces the model to write a call in the template's format,
and the server must read it back as a tool call. ``tool_choice: required`` and a named function
need no help: the server itself constrains the output to calls.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from server_process import running_server
from tiny_models import build_tiny_model, byte_tokenizer

MODEL = "tiny"
TEMPLATE = Path(__file__).parent / "chat_templates" / "hermes_tools.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"], "additionalProperties": False}},
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# The call the template asks for, as a regex (SGLang's extension): braces escaped, the city left open.
CALL_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'


def _server(tmp_path_factory, *flags: str):
    tmp = tmp_path_factory.mktemp("tools")
    model_dir = build_tiny_model("llama", str(tmp / "llama"), max_position_embeddings=2048)
    args = ("--max-total-tokens", "8192", "--served-model-name", MODEL, "--chat-template", str(TEMPLATE), *flags)
    return running_server(model_dir, *args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Hermes calls and Qwen3 thinking, as a Qwen3 deployment is started."""
    with _server(tmp_path_factory, "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3") as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120, **kwargs})


def forced(regex: str, **extra) -> dict:
    return {"extra_body": {"regex": regex, **extra}}


def check_arguments(name: str, arguments: str) -> dict:
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def rendered_length(messages: list[dict], tools: list[dict] | None) -> int:
    """Prompt tokens of the messages as the template renders them (one token per byte)."""
    text = byte_tokenizer().apply_chat_template(messages, tools=tools, chat_template=TEMPLATE.read_text(), add_generation_prompt=True, tokenize=False)
    return len(text.encode())


# ---- tool_choice auto: the model's own calls, read back --------------------------------------------


def test_a_call_the_model_writes_comes_back_as_a_tool_call(client):
    response = chat(client, **forced(CALL_REGEX))
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function" and call.function.name == "get_weather"
    assert check_arguments("get_weather", call.function.arguments)["city"] in ("Paris", "Rome")


def test_a_streamed_call_comes_in_openai_shaped_deltas(client):
    chunks = list(chat(client, stream=True, **forced(CALL_REGEX)))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or ()]
    first, *rest = calls
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest and all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    check_arguments("get_weather", "".join(c.function.arguments for c in rest))
    assert not "".join(d.content or "" for d in deltas)  # the call's text is not content too
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The client's own stream helper assembles the same call.
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, **forced(CALL_REGEX)) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    check_arguments("get_weather", call.function.arguments)


def test_a_call_cut_off_by_max_tokens_stays_partial_and_length(client):
    header = '<tool_call>\n{"name": "get_weather", "arguments": {'
    for stream in (False, True):
        response = chat(client, max_tokens=len(header) + 4, stream=stream, **forced(CALL_REGEX))
        if stream:
            chunks = list(response)
            reason = chunks[-1].choices[0].finish_reason
            arguments = "".join(c.function.arguments for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or ())
        else:
            reason, arguments = response.choices[0].finish_reason, response.choices[0].message.tool_calls[0].function.arguments
        assert reason == "length" and arguments == '{"cit'


def test_reasoning_then_a_call(client):
    response = chat(client, **forced(r"<think>I need the weather\.</think>\n" + CALL_REGEX))
    message = response.choices[0].message
    assert message.model_extra["reasoning_content"] == "I need the weather." and message.content is None
    assert message.tool_calls[0].function.name == "get_weather"


# ---- tool_choice required / a named function: the server constrains the output ---------------------


@pytest.mark.parametrize("stream", [False, True])
def test_required_makes_calls_that_match_the_tools(client, stream):
    kwargs = dict(tool_choice="required", temperature=1, seed=3, max_tokens=200)
    if stream:
        with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, **kwargs) as s:
            response = s.get_final_completion()
    else:
        response = chat(client, **kwargs)
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_arguments(call.function.name, call.function.arguments)
    single = chat(client, parallel_tool_calls=False, **kwargs).choices[0].message.tool_calls
    assert len(single) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called(client, stream):
    kwargs = dict(tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1, seed=5, max_tokens=60)
    if stream:
        with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, **kwargs) as s:
            response = s.get_final_completion()
    else:
        response = chat(client, **kwargs)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_time" and response.choices[0].finish_reason == "tool_calls"
    check_arguments("get_time", call.function.arguments)


# ---- tool_choice none, conversations with calls ------------------------------------------------------


def test_tool_choice_none_shows_the_tools_and_reads_no_calls(client):
    response = chat(client, tool_choice="none", max_tokens=8, extra_body={"ignore_eos": True})
    (choice,) = response.choices
    assert choice.finish_reason == "length" and choice.message.tool_calls is None and choice.message.content is not None
    # As vLLM: the template still lists the tools.
    assert response.usage.prompt_tokens == rendered_length(ASK, TOOLS)


def test_with_tool_choice_none_a_written_call_is_content(client):
    (choice,) = chat(client, tool_choice="none", **forced(CALL_REGEX)).choices
    assert choice.message.tool_calls is None and choice.message.content.startswith("<tool_call>") and choice.finish_reason == "stop"


@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}])
def test_a_conversation_with_a_call_and_its_result_renders_and_continues(client, arguments):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    response = chat(client, messages=messages, max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The template writes arguments with tojson: they reached it as an object, not as JSON text.
    as_object = [*messages[:2], {**messages[2], "tool_calls": [{**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}]}, messages[3]]
    assert response.usage.prompt_tokens == rendered_length(as_object, TOOLS)


# ---- bad requests ----------------------------------------------------------------------------------

NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "regex": "a+"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]}, "messages"),
    ],
)
def test_bad_tools_are_a_400_naming_the_parameter(http, body, param):
    request = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 2, **body}
    response = http.post("/v1/chat/completions", json={k: v for k, v in request.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].split(".")[0] == param


def test_the_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in e.value.body["message"]


# ---- reasoning ---------------------------------------------------------------------------------------


def test_thinking_goes_to_reasoning_content(client):
    kwargs = dict(messages=ASK, tools=None, **forced("<think>abc</think>answer"))
    message = chat(client, **kwargs).choices[0].message
    assert message.model_extra["reasoning_content"] == "abc" and message.content == "answer"
    deltas = [c.choices[0].delta for c in chat(client, stream=True, **kwargs) if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "abc"
    assert "".join(d.content or "" for d in deltas) == "answer"
    # enable_thinking false: nothing is thinking (SGLang's rule), the text is the content.
    off = chat(client, **{**kwargs, "extra_body": {**kwargs["extra_body"], "chat_template_kwargs": {"enable_thinking": False}}})
    assert off.choices[0].message.content == "<think>abc</think>answer" and off.choices[0].message.model_extra["reasoning_content"] is None


# ---- the format found from the chat template ---------------------------------------------------------


def test_without_the_flag_the_template_shows_the_format(tmp_path_factory):
    with _server(tmp_path_factory) as (base_url, _):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
        assert chat(client, max_tokens=4).choices[0].finish_reason in ("stop", "length")  # not refused
        (call,) = chat(client, **forced(CALL_REGEX)).choices[0].message.tool_calls
        assert call.function.name == "get_weather"
