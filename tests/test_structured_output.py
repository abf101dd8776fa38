"""Grammar-constrained decoding against real servers: JSON schemas, regexes and EBNF grammars
through the official openai client, /generate and the Engine, with both backends.

The tiny model has random weights and a byte tokenizer (token id = byte value), so its
unconstrained output is noise: whatever structure the outputs have, the grammar made.
"""

from __future__ import annotations

import json
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest

import srt
from srt.runtime.generate_request import InvalidRequestError

from json_schemas import schemas
from server_process import running_server
from tiny_models import build_tiny_model

MODEL = "tiny"
CONTEXT = 4096
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HI = [{"role": "user", "content": "give me JSON"}]
MAX_TOKENS = 1500  # far above what the bounded schemas need: a "length" finish is a failure


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("structured")
    (tmp / "chat.jinja").write_text(CHAT_TEMPLATE)
    return build_tiny_model("llama", str(tmp / "llama"), max_position_embeddings=CONTEXT)


def _serve(model_dir: str, *args: str):
    template = f"{model_dir}/../chat.jinja"
    return running_server(
        model_dir, "--max-total-tokens", str(4 * CONTEXT), "--served-model-name", MODEL, "--chat-template", template, *args
    )


@pytest.fixture(scope="module")
def server(model_dir) -> str:
    with _serve(model_dir) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)


def _validate(schema: dict, text: str) -> None:
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))


def _chat(client: openai.OpenAI, **kwargs):
    defaults = {"model": MODEL, "messages": HI, "max_tokens": MAX_TOKENS, "temperature": 1.0}
    return client.chat.completions.create(**{**defaults, **kwargs})


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def test_fifty_schemas_validate_at_temperature_one(client):
    cases = schemas(52)

    def run(i: int) -> tuple[str, str]:
        out = _chat(client, response_format=_schema_format(cases[i]), seed=1000 + i)
        return out.choices[0].message.content, out.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(len(cases))))
    for schema, (text, finish) in zip(cases, results):
        assert finish == "stop", (schema, text)
        _validate(schema, text)
    assert len({text for text, _ in results}) > len(cases) // 2  # the model really sampled


def test_seeds_and_n_give_reproducible_valid_choices(client):
    schema = schemas(12)[-1]
    first = _chat(client, response_format=_schema_format(schema), seed=7, n=3)
    again = _chat(client, response_format=_schema_format(schema), seed=7, n=3)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3
    for text in texts:
        _validate(schema, text)


def test_openai_parse_returns_the_pydantic_object(client):
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        legs: int = pydantic.Field(ge=0, le=8)
        kind: str = pydantic.Field(pattern="^(cat|dog|bird)$")

    out = client.chat.completions.parse(model=MODEL, messages=HI, response_format=Pet, max_tokens=MAX_TOKENS, seed=3)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and pet.kind in ("cat", "dog", "bird")


def test_json_object_gives_an_object(client):
    for seed in range(3):
        out = _chat(client, response_format={"type": "json_object"}, seed=seed, temperature=0.7)
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_streamed_constrained_chat_concatenates_to_valid_json(client):
    schema = schemas(3)[0]
    stream = _chat(client, response_format=_schema_format(schema), seed=11, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    _validate(schema, text)
    unstreamed = _chat(client, response_format=_schema_format(schema), seed=11)
    assert unstreamed.choices[0].message.content == text


def test_regex_and_ebnf_on_both_openai_routes(client):
    pattern = r"[a-z]{2,5}-[0-9]{1,3}(\.[0-9])?"
    chat = _chat(client, seed=1, extra_body={"regex": pattern})
    assert re.fullmatch(pattern, chat.choices[0].message.content)
    completion = client.completions.create(model=MODEL, prompt="id:", max_tokens=50, seed=2, extra_body={"regex": pattern})
    assert re.fullmatch(pattern, completion.choices[0].text)
    grammar = 'root ::= answer (", " answer)*\nanswer ::= "yes" | "no" | "maybe"'
    out = client.completions.create(model=MODEL, prompt="q:", max_tokens=60, seed=4, extra_body={"ebnf": grammar})
    assert re.fullmatch(r"(yes|no|maybe)(, (yes|no|maybe))*", out.choices[0].text), out.choices[0].text


def test_native_generate_takes_constraints(server):
    schema = schemas(2)[1]
    body = {"text": "json:", "sampling_params": {"json_schema": json.dumps(schema), "max_new_tokens": MAX_TOKENS, "seed": 5}}
    result = httpx.post(f"{server}/generate", json=body, timeout=120).json()
    assert result["meta_info"]["finish_reason"]["type"] == "stop"
    _validate(schema, result["text"])
    body["sampling_params"]["json_schema"] = schema  # the schema as an object works too
    assert httpx.post(f"{server}/generate", json=body, timeout=120).json()["text"] == result["text"]


def test_max_tokens_mid_object_ends_with_length(client):
    out = _chat(client, response_format=_schema_format(schemas(1)[0]), max_tokens=4, seed=1)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content.startswith("{") and out.usage.completion_tokens == 4


def test_stop_strings_still_apply(client):
    out = _chat(client, extra_body={"regex": "(ab){3,5}c"}, stop=["abab"], seed=1)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content == ""


def test_bad_constraints_are_400s_and_the_server_carries_on(client, server):
    for kwargs in (
        {"extra_body": {"regex": "(unclosed"}},
        {"extra_body": {"ebnf": "root ::= undefined_rule"}},
        {"response_format": _schema_format({"type": "objekt"})},
        {"extra_body": {"json_schema": "{not json"}},
        {"extra_body": {"regex": "a", "ebnf": 'root ::= "a"'}},
    ):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as error:
                _chat(client, stream=stream, **kwargs)
            assert error.value.status_code == 400
    message = error.value.body["message"] if isinstance(error.value.body, dict) else str(error.value)
    assert "only one of" in message
    with pytest.raises(openai.BadRequestError, match="compile"):
        _chat(client, extra_body={"regex": "(unclosed"})
    native = httpx.post(f"{server}/generate", json={"text": "x", "sampling_params": {"regex": "[z-a]"}}, timeout=60)
    assert native.status_code == 400 and "regex" in native.json()["error"]["message"]
    assert _chat(client, max_tokens=3).choices[0].finish_reason == "length"  # still serving


def test_unconstrained_outputs_are_unchanged_by_constrained_neighbours(client):
    """Constrained and unconstrained requests in one batch, sharing prompt prefixes in the radix
    cache: the unconstrained ones give exactly what they give alone."""
    prompts = [[{"role": "user", "content": f"shared prefix for everyone, then {i}"}] for i in range(6)]

    def plain(i: int) -> str:
        out = _chat(client, messages=prompts[i], max_tokens=24, seed=i, extra_body={"ignore_eos": True})
        return out.choices[0].message.content

    def constrained(i: int) -> str:
        return _chat(client, messages=prompts[i], seed=50 + i, response_format=_schema_format(schemas(8)[i])).choices[0].message.content

    alone = [plain(i) for i in range(6)]
    with ThreadPoolExecutor(12) as pool:
        mixed = [pool.submit(plain, i) for i in range(6)]
        others = [pool.submit(constrained, i) for i in range(6)]
        assert [f.result() for f in mixed] == alone
        for i, f in enumerate(others):
            _validate(schemas(8)[i], f.result())


def test_retraction_keeps_constrained_outputs_identical(model_dir):
    """An Engine whose KV cache is too small for the batch retracts requests mid-generation and
    recomputes them (and prefills prompts in chunks); their grammars keep their state, so the outputs
    equal a roomy Engine's."""
    # Exactly 36 tokens ("[", 12 digits, 11 ", ", "]") then EOS: every request runs to nearly its
    # max_new_tokens, as with ignore_eos, so admission's reservations fall short and decoding retracts.
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 12, "maxItems": 12}
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(8, 24))] for _ in range(12)]
    params = [{"json_schema": json.dumps(schema), "temperature": 1.0, "seed": 300 + i, "max_new_tokens": 38} for i in range(12)]
    options = {"model_path": model_dir, "constrained_json_disable_any_whitespace": True}
    with srt.Engine(**options, max_total_tokens=4096) as roomy:
        want = roomy.generate(input_ids=prompts, sampling_params=params)
    with srt.Engine(**options, max_total_tokens=160, chunked_prefill_size=8) as tight:  # prompts in chunks too
        got = tight.generate(input_ids=prompts, sampling_params=params)
        assert tight.get_internal_state().num_retractions > 0, "the tight Engine never retracted: the test proves nothing"
    assert [o["text"] for o in got] == [o["text"] for o in want]
    for out in got:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["text"]
        _validate(schema, out["text"])


def test_llguidance_backend_without_free_whitespace(model_dir):
    cases = schemas(20)[::2]
    with _serve(model_dir, "--grammar-backend", "llguidance", "--constrained-json-disable-any-whitespace") as (url, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: _chat(c, response_format=_schema_format(cases[i]), seed=i), range(len(cases))))
        for schema, out in zip(cases, outs):
            text = out.choices[0].message.content
            _validate(schema, text)
            # Outside strings, only the single spaces of the ", " and ": " separators.
            assert not re.search(r"\s\s|[\n\r\t]", re.sub(r'"(\\.|[^"\\])*"', '""', text)), text
        pattern = r"(cat|dog)s?"
        assert re.fullmatch(pattern, _chat(c, extra_body={"regex": pattern}, seed=1).choices[0].message.content)
        with pytest.raises(openai.BadRequestError, match="compile"):
            _chat(c, extra_body={"regex": "(unclosed"})


def test_grammar_backend_none_refuses_constraints(model_dir):
    with srt.Engine(model_path=model_dir, max_total_tokens=512, grammar_backend="none") as engine:
        with pytest.raises(InvalidRequestError, match="grammar-backend none"):
            engine.generate("hi", {"max_new_tokens": 4, "json_schema": json.dumps({"type": "object"})})


@pytest.mark.skipif(sys.platform != "linux", reason="gloo TP on Linux only")
def test_tensor_parallel_ranks_admit_grammars_together(model_dir):
    """Every rank compiles on its own; rank 0 says when requests leave the grammar queue, so the
    ranks keep one schedule (a divergence would hang their collectives)."""
    cases = schemas(24)[16:24]
    with _serve(model_dir, "--tp", "2") as (url, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(10) as pool:
            constrained = [pool.submit(_chat, c, response_format=_schema_format(s), seed=i) for i, s in enumerate(cases)]
            plain = [pool.submit(_chat, c, max_tokens=16, seed=i) for i in range(2)]
            for schema, f in zip(cases, constrained):
                _validate(schema, f.result().choices[0].message.content)
            assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in plain)
