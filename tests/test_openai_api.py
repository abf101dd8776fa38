"""The OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions), against a
real server, spoken to with the official `openai` client and, for raw bodies, httpx.

The tiny model has random weights and a byte tokenizer (token id = byte value), so its
text is random bytes: tests compare texts with each other, never with expected words.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server_process import running_server
from srt.entrypoints.errors import APIError
from tiny_models import build_tiny_model, byte_tokenizer

MODEL = "tiny"
CONTEXT = 2048  # long enough that a whole generation takes seconds: see the test of clients that leave
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = len("<|user|>hi\n<|assistant|>")  # one token per byte, no special tokens added
FIXED = {"ignore_eos": True}  # exactly max_tokens tokens, whatever the random model emits


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("openai")
    model_dir = build_tiny_model("llama", str(tmp / "llama"), max_position_embeddings=CONTEXT)
    template = tmp / "chat.jinja"  # the tiny tokenizer has none of its own
    template.write_text(CHAT_TEMPLATE)
    args = ("--max-total-tokens", str(2 * CONTEXT), "--served-model-name", MODEL, "--chat-template", str(template))
    with running_server(model_dir, *args) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def chat(client: openai.OpenAI, **kwargs):
    defaults = {"model": MODEL, "messages": HI, "max_tokens": 6, "extra_body": FIXED}
    return client.chat.completions.create(**{**defaults, **kwargs})


def complete(client: openai.OpenAI, **kwargs):
    defaults = {"model": MODEL, "prompt": "hi", "max_tokens": 6, "extra_body": FIXED}
    return client.completions.create(**{**defaults, **kwargs})


# ---- models -------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.owned_by == "srt" and card.created > 0
    assert card.model_extra["max_model_len"] == CONTEXT


# ---- completions ---------------------------------------------------------------------------------


def test_completion_of_text_and_of_token_ids(client):
    text = complete(client, temperature=0)
    assert text.id.startswith("cmpl-") and text.object == "text_completion" and text.model == MODEL
    (choice,) = text.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert (text.usage.prompt_tokens, text.usage.completion_tokens, text.usage.total_tokens) == (2, 6, 8)
    assert complete(client, temperature=0, prompt=[ord("h"), ord("i")]).choices[0].text == choice.text

    batch = complete(client, temperature=0, prompt=["hi", "xyz"])
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text
    assert batch.usage.prompt_tokens == 5
    ids_batch = complete(client, temperature=0, prompt=[[ord("h"), ord("i")], [ord(c) for c in "xyz"]])
    assert [c.text for c in ids_batch.choices] == [c.text for c in batch.choices]


def test_completion_max_tokens_defaults_to_16_as_openai(client):
    assert client.completions.create(model=MODEL, prompt="hi", extra_body=FIXED).usage.completion_tokens == 16


def test_completion_stream_matches_non_streaming(client):
    whole = complete(client, temperature=0, max_tokens=10).choices[0].text
    chunks = list(complete(client, temperature=0, max_tokens=10, stream=True))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)


def test_stop_strings_and_stop_token_ids(client, http):
    greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    greedy_ids = http.post("/generate", json={"text": "hi", "sampling_params": greedy}).json()["output_ids"]
    stop_id = greedy_ids[3]
    by_id = complete(client, temperature=0, max_tokens=8, extra_body={**FIXED, "stop_token_ids": [stop_id]}).choices[0]
    assert by_id.finish_reason == "stop" and by_id.model_extra["matched_stop"] == stop_id

    text = complete(client, temperature=0, max_tokens=8).choices[0].text
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    by_text = complete(client, temperature=0, max_tokens=8, stop=stop).choices[0]
    assert by_text.finish_reason == "stop" and by_text.model_extra["matched_stop"] == stop
    assert by_text.text == text[: text.index(stop)]  # the stop string itself is trimmed


# ---- chat --------------------------------------------------------------------------------------


def test_chat_renders_the_chat_template(client):
    response = chat(client, temperature=0)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == MODEL
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.logprobs is None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (HI_PROMPT_TOKENS, 6)
    # Text parts are the same content as a string.
    parts = chat(client, temperature=0, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert parts.choices[0].message.content == choice.message.content


def test_chat_accepts_every_role(client):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "t", "tool_call_id": "call-1"},
    ]
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    assert chat(client, messages=messages).usage.prompt_tokens == len(rendered)
    without_prompt = chat(client, messages=messages, extra_body={**FIXED, "add_generation_prompt": False})
    assert without_prompt.usage.prompt_tokens == len(rendered) - len("<|assistant|>")


def test_chat_stream_matches_non_streaming(client):
    whole = chat(client, temperature=0, max_tokens=10).choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=10, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and not chunks[-1].choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage_ends_with_a_usage_chunk(client):
    for stream in (
        chat(client, stream=True, stream_options={"include_usage": True}),
        complete(client, stream=True, stream_options={"include_usage": True}),
    ):
        chunks = list(stream)
        *content, last = chunks
        assert last.choices == [] and last.usage.completion_tokens == 6
        assert last.usage.total_tokens == last.usage.prompt_tokens + 6
        assert all(c.usage is None for c in content)


# ---- n, seeds, logprobs ------------------------------------------------------------------------


def test_n_gives_n_choices(client):
    response = chat(client, n=3, temperature=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    assert response.usage.prompt_tokens == HI_PROMPT_TOKENS  # once, however many choices

    batch = complete(client, prompt=["ab", "cde"], n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert batch.usage.prompt_tokens == 5 and batch.usage.completion_tokens == 24

    streamed = list(chat(client, n=3, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1, 2}
    assert sum(c.choices[0].finish_reason == "length" for c in streamed) == 3


def test_a_seed_makes_sampling_reproducible(client):
    first = chat(client, n=2, temperature=1, seed=1234, max_tokens=12)
    second = chat(client, n=2, temperature=1, seed=1234, max_tokens=12)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert texts[0] != texts[1]  # choice i samples with seed + i
    texts = [complete(client, seed=5, temperature=1).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]
    assert chat(client, seed=-1, temperature=1).choices  # any integer, as OpenAI takes


def test_completion_logprobs(client):
    (choice,) = complete(client, temperature=0, max_tokens=5, logprobs=3).choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4 and top[token] == logprob  # the sampled token is always listed
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token

    streamed = list(complete(client, temperature=0, max_tokens=5, logprobs=3, stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_chat_logprobs(client):
    (choice,) = chat(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2).choices
    content = choice.logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy

    streamed = list(chat(client, temperature=0, max_tokens=5, logprobs=True, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content] and all(e.top_logprobs == [] for e in entries)


def test_extra_sglang_and_vllm_parameters_are_accepted(client):
    extra = {
        "top_k": 5,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "min_tokens": 2,
        "stop_token_ids": [3],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
        "not_a_parameter_anywhere": 1,  # unknown fields are ignored, as OpenAI does
    }
    common = dict(presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"65": 5}, user="u1", extra_body=extra)
    assert chat(client, **common).choices[0].finish_reason in ("stop", "length")
    assert complete(client, **common).choices[0].finish_reason in ("stop", "length")


# ---- errors ------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": HI, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, "max_tokens"),  # prompt + max_tokens > context
        ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": 2.1}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
        ("/v1/chat/completions", {**CHAT, "n": 10_000}, "n"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "stop": 5}, "stop"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"100000": 1}}, None),  # outside the vocabulary
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [IMAGE_PART]}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {**CHAT, "regex": 5}, "regex"),
        ("/v1/chat/completions", {**CHAT, "json_schema": "{"}, None),  # not JSON
        ("/v1/chat/completions", {**CHAT, "ebnf": "root ::= undefined"}, None),  # does not compile
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),  # no stream
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": CONTEXT - 1}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "prompt": "x" * CONTEXT}, "prompt"),
        ("/v1/completions", {**COMPLETION, "temperature": 3}, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": -1}, "top_p"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [100000]}, None),  # outside the vocabulary
        ("/v1/completions", {**COMPLETION, "prompt": ""}, None),
        ("/v1/completions", {**COMPLETION, "echo": True, "stream": True}, "echo"),
        ("/v1/completions", {**COMPLETION, "suffix": "x"}, "suffix"),
        ("/v1/completions", {**COMPLETION, "regex": "(a"}, None),  # does not compile
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["ok", "\ud800"]}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "stop": ["\ud800"]}, None),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(http, path, body, param):
    # json.dumps escapes lone surrogates as \\u escapes, as a client in any language may send them.
    response = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").split(".")[0] == (param or "")
    assert http.post(path, json=CHAT if "chat" in path else COMPLETION).status_code == 200  # still serving


def test_malformed_json_is_a_400(http):
    headers = {"content-type": "application/json"}
    response = http.post("/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_an_unknown_model_is_a_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="gpt-4o")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    response = http.post("/v1/completions", json={**COMPLETION, "model": "some-other-model"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert http.post("/v1/chat/completions", json={k: v for k, v in CHAT.items() if k != "model"}).status_code == 200


def test_chat_needs_a_chat_template():
    """Without --chat-template, a tokenizer that has none cannot serve chat (checked before generating)."""
    from srt.entrypoints.openai.serving import router

    app = FastAPI()
    app.include_router(router)
    app.add_exception_handler(APIError, lambda _, e: e.response())
    app.state.model_name = MODEL
    app.state.server_args = SimpleNamespace(chat_template=None, model_path=None, tool_call_parser=None, reasoning_parser=None)
    info = SimpleNamespace(context_length=CONTEXT)
    runtime = SimpleNamespace(model_path="/models/tiny")
    app.state.tokenizer_manager = SimpleNamespace(tokenizer=byte_tokenizer(), info=info, runtime=runtime, check_generates=lambda: None)
    with TestClient(app) as c:
        response = c.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def test_a_stream_aborted_by_the_server_ends_with_an_error_event(http):
    body = {**CHAT, "max_tokens": CONTEXT - HI_PROMPT_TOKENS, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = (line.removeprefix("data: ") for line in r.iter_lines() if line)
        first = json.loads(next(events))
        assert http.post("/abort_request", json={"rid": f"{first['id']}-0"}).status_code == 200  # choice 0's request
        *_, error, done = events
    assert json.loads(error)["error"]["message"] and done == "[DONE]"


# ---- clients that leave ---------------------------------------------------------------------------


def test_a_client_that_leaves_aborts_its_generation(server, http):
    """Streaming or not, the generation stops within a fraction of the time it would take to finish."""

    def seconds_until_idle() -> float:
        start = time.monotonic()
        while http.get("/server_info").json()["internal_state"]["running_requests"]:
            time.sleep(0.05)
        return time.monotonic() - start

    body = {**CHAT, "max_tokens": CONTEXT - HI_PROMPT_TOKENS, "ignore_eos": True}
    start = time.monotonic()
    assert http.post("/v1/chat/completions", json={**body, "max_tokens": 50}).status_code == 200
    # Measured here, as the machine's load stretches both; a short run overestimates a long one.
    full = (time.monotonic() - start) * body["max_tokens"] / 50

    with httpx.Client(base_url=server, timeout=60) as other:
        with other.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    assert seconds_until_idle() < full / 2
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json={**body, "n": 2}, timeout=0.5)
    assert seconds_until_idle() < full / 2
    state = http.get("/server_info").json()["internal_state"]
    assert state["waiting_requests"] == 0 and state["free_kv_slots"] + state["cached_tokens"] == state["total_kv_slots"]


# ---- tokenization ---------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(http):
    ids = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "héllo"}).json()
    assert ids["tokens"] == list("héllo".encode()) and ids["count"] == len("héllo".encode())  # one token per byte
    assert ids["max_model_len"] == CONTEXT
    batch = http.post("/tokenize", json={"prompt": ["a", "bc"]}).json()
    assert batch["tokens"] == [[97], [98, 99]] and batch["count"] == [1, 2]
    assert http.post("/v1/detokenize", json={"tokens": ids["tokens"]}).json() == {"text": "héllo"}
    assert http.post("/v1/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert http.post("/v1/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("route", ["/v1/embeddings", "/encode", "/classify", "/v1/score", "/v1/rerank"])
def test_generation_model_refuses_pooling_routes(http, route):
    body = {"input": "hi", "text": "hi", "text_1": "a", "text_2": "b", "query": "q", "documents": ["d"]}
    body = {k: v for k, v in body.items() if k in _POOLING_FIELDS[route]}
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    assert "generation model: it returns no embeddings or scores" in response.json()["error"]["message"]


_POOLING_FIELDS = {
    "/v1/embeddings": {"input"}, "/encode": {"text"}, "/classify": {"input"}, "/v1/score": {"text_1", "text_2"},
    "/v1/rerank": {"query", "documents"},
}  # fmt: skip


def test_lora_needs_enable_lora(http):
    response = http.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
    assert response.status_code == 400 and "without --enable-lora" in response.json()["error"]["message"]
    response = http.post("/generate", json={"text": "hi", "lora_path": "a"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"


def test_image_parts_are_refused_for_a_text_only_model(http):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {**CHAT, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "does not take images" in response.json()["error"]["message"]
