"""Random request bodies (bounded hypothesis runs) against a real server: never a 5xx, every
error OpenAI-shaped, and afterwards the server is alive and idle, with no KV or request slot
leaked."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_process import running_server
from tiny_models import build_tiny_model

# Scalars as JSON can carry them, the awkward ones included: huge integers, lone surrogates.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, 2, -1, 5, 2**31, 2**63])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "hi", "", "stop"])
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# JSON-schema-shaped objects, for the grammar compilers: schema keywords with arbitrary values.
SCHEMA_WORDS = ["type", "properties", "items", "enum", "const", "required", "anyOf", "$ref", "$defs", "pattern", "minLength",
                "maxLength", "minimum", "maximum", "minItems", "maxItems", "additionalProperties", "format", "prefixItems"]  # fmt: skip
TYPE_NAMES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "objekt"])
SCHEMAS = st.recursive(
    st.dictionaries(st.sampled_from(SCHEMA_WORDS), TYPE_NAMES | SCALARS, max_size=3),
    lambda inner: st.dictionaries(st.sampled_from(SCHEMA_WORDS), inner | st.lists(inner, max_size=3) | TYPE_NAMES, max_size=3),
    max_leaves=10,
)
SAMPLING = ["temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids",
            "logit_bias", "ignore_eos", "skip_special_tokens", "seed", "n", "frequency_penalty", "repetition_penalty",
            "json_schema", "regex", "ebnf"]  # fmt: skip
ROUTES = {
    "/generate": ["text", "input_ids", "sampling_params", "stream", "return_logprob", "top_logprobs_num", "rid",
                  "logprob_start_len", "model", "return_hidden_states"],
    "/v1/completions": ["model", "prompt", "max_tokens", "n", "stream", "logprobs", "echo", "stop", "seed", "temperature",
                        "top_p", "logit_bias", "stream_options", "top_k", "min_tokens", "ignore_eos", "regex", "json_schema"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "n", "stream", "logprobs", "top_logprobs", "stop",
                             "temperature", "tools", "tool_choice", "response_format", "chat_template_kwargs", "ebnf"],
}  # fmt: skip
# Keeps the valid requests quick (for /generate, max_new_tokens is set in sampling_params).
SMALL_GENERATION_FOR = {"/generate": {}, "/v1/completions": {"max_tokens": 2}, "/v1/chat/completions": {"max_tokens": 2}}


def bodies(route: str) -> st.SearchStrategy[dict]:
    fields = ROUTES[route]
    known = st.dictionaries(st.sampled_from(fields), VALUES, max_size=5)
    sampling = st.tuples(
        st.dictionaries(st.sampled_from(SAMPLING), VALUES, max_size=3),
        st.just({}) | st.fixed_dictionaries({"json_schema": SCHEMAS}),
    ).map(lambda pair: {**pair[0], **pair[1]})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": VALUES})
    shaped = {
        "/generate": st.fixed_dictionaries({"input_ids": st.lists(st.integers(-2, 300), max_size=6), "sampling_params": sampling}),
        "/v1/completions": st.fixed_dictionaries({"prompt": st.text(max_size=10) | st.lists(st.integers(-2, 300), max_size=5)}),
        "/v1/chat/completions": st.fixed_dictionaries(
            {"messages": st.lists(message, max_size=2)},
            optional={"response_format": st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": st.just("f"), "schema": SCHEMAS})})},
        ),
    }[route]
    return st.tuples(shaped, known).map(lambda pair: {**pair[0], **pair[1], **SMALL_GENERATION_FOR[route]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model("llama", str(tmp_path_factory.mktemp("fuzz")))
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with running_server(model_dir, "--max-total-tokens", "4096", "--chat-template", str(template)) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield client


def check(client: httpx.Client, route: str, body: dict) -> None:
    raw = json.dumps(body).encode()  # lone surrogates travel as \u escapes
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_random_bodies_never_get_a_5xx_and_leave_the_server_idle(server, route):
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
    @given(body=bodies(route))
    def run(body: dict) -> None:
        if route == "/generate" and isinstance(body.get("sampling_params"), dict):
            body["sampling_params"].setdefault("max_new_tokens", 2)
        check(server, route, body)

    run()
    assert server.get("/health").status_code == 200
    state = server.get("/server_info").json()["internal_state"]
    assert state["running_requests"] == 0 and state["waiting_requests"] == 0
    assert state["free_kv_slots"] + state["cached_tokens"] == state["total_kv_slots"]
    assert state["free_request_slots"] == state["total_request_slots"]
