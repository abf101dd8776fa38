"""`python -m srt.launch`: the native API, errors, auth, metrics, disconnects and shutdown,
against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from server_process import running_server, stop
from tiny_models import build_tiny_model

API_KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, "--max-total-tokens", "2048", "--api-key", API_KEY) as (base_url, proc):
        yield base_url, proc


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as c:
        yield c


def idle_state(client: httpx.Client) -> dict:
    return client.get("/server_info").json()["internal_state"]


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_generate_single_batch_and_stream(client):
    single = client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY}).json()
    assert len(single["output_ids"]) == 8 and single["meta_info"]["finish_reason"]["type"] == "length"
    batch = client.post("/generate", json={"input_ids": [[5, 6, 7], [9, 9]], "sampling_params": GREEDY}).json()
    assert batch[0]["output_ids"] == single["output_ids"] and len(batch) == 2
    text = client.post("/generate", json={"text": "hi", "sampling_params": GREEDY}).json()
    assert text["meta_info"]["prompt_tokens"] == 2

    events = []
    with client.stream("POST", "/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 8
    assert chunks[-1]["output_ids"] == single["output_ids"] and chunks[-1]["text"] == single["text"]
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 9))  # cumulative, as SGLang


@pytest.mark.parametrize(
    "body",
    [
        {"input_ids": [1, 2], "sampling_params": {"temperature": -1}},
        {"input_ids": [1, 2], "sampling_params": {"top_p": 0}},
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}},
        {"input_ids": [1, 2], "sampling_params": {"n": 0}},
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100000}},
        {"input_ids": [1, 2], "sampling_params": {"bogus": 1}},
        {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
        {"input_ids": [1, 999999]},
        {"input_ids": []},
        {"text": "a", "input_ids": [1]},
        {"input_ids": "not a list"},
        {"input_ids": [1], "unknown_field": 3},
        # Values that used to crash a process or answer 500: each field is type- and range-checked.
        {"input_ids": [1, 2], "sampling_params": {"skip_special_tokens": None}},
        {"input_ids": [1, 2], "sampling_params": {"top_k": 2**70}},
        {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [1.5]}},
        {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [True]}},
        {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": ["a"]}},
        {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [None]}},
        {"input_ids": [1, 2], "sampling_params": {"logit_bias": {"3": [1]}}},
        {"input_ids": [1, 2], "sampling_params": {"stop": ["\udc00"]}},
        {"input_ids": [1, 2], "top_logprobs_num": 2**70},
        {"text": "\ud800"},
        {"input_ids": [1], "rid": "\ud800"},
        {"input_ids": [[1], [2]], "rid": ["same", "same"]},
        {"input_ids": [1, 2], "return_hidden_states": True},
        {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 2},
    ],
)
def test_bad_input_is_400_and_harmless(client, body):
    # json.dumps escapes lone surrogates as \\u escapes, as a client in any language may send them.
    raw = json.dumps(body).encode()
    assert_openai_error(client.post("/generate", content=raw, headers={"content-type": "application/json"}), 400)
    assert client.post("/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_malformed_json_and_unknown_route(client):
    assert_openai_error(client.post("/generate", content=b'{"input_ids": [1,', headers={"content-type": "application/json"}), 400)
    huge = b'{"input_ids": [1], "sampling_params": {"temperature": 1e400}}'  # JSON reads it as infinity
    assert_openai_error(client.post("/generate", content=huge, headers={"content-type": "application/json"}), 400)
    assert_openai_error(client.get("/no_such_route"), 404)


def test_api_key(server):
    base_url = server[0]
    body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}
    assert_openai_error(httpx.post(f"{base_url}/generate", json=body), 401)
    assert_openai_error(httpx.post(f"{base_url}/generate", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(httpx.get(f"{base_url}/metrics"), 401)
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.post(f"{base_url}/generate", json=body, headers=AUTH).status_code == 200


def test_info_health_metrics_flush(client):
    assert client.get("/health_generate").status_code == 200
    info = client.get("/model_info").json()
    assert info["is_generation"] and info["context_length"] == 512
    server_info = client.get("/server_info").json()
    assert "api_key" not in server_info and server_info["max_total_tokens"] == 2048  # the secret is never shown
    assert {"free_kv_slots", "running_requests", "waiting_requests", "cache_hit_rate"} <= set(server_info["internal_state"])
    metrics = client.get("/metrics").text
    for series in (
        "srt:prompt_tokens_total",
        "srt:generation_tokens_total",
        "srt:time_to_first_token_seconds_bucket",
        "srt:inter_token_latency_seconds_bucket",
        "srt:e2e_request_latency_seconds_bucket",
        "srt:num_running_reqs",
        "srt:num_queue_reqs",
        "srt:token_usage",
        "srt:cache_hit_rate",
    ):
        assert series in metrics, series
    assert client.post("/flush_cache").status_code == 200
    state = idle_state(client)
    assert state["free_kv_slots"] == state["total_kv_slots"]


def test_sixteen_concurrent_streams(server):
    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"input_ids": [3 + i, 4, 5], "sampling_params": {**GREEDY, "max_new_tokens": 12}, "stream": True}
        count = 0
        async with client.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                count += line.startswith("data: {")
        return count

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server[0], headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    assert asyncio.run(main()) == [12] * 16


def test_disconnect_mid_stream_frees_the_request(client, server):
    """With --api-key too: a client that leaves, streaming or not, aborts its request long before it would end."""
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}, "stream": True}
    start = time.monotonic()
    assert client.post("/generate", json={**body, "stream": False}).status_code == 200
    full = time.monotonic() - start  # measured now: the machine's load stretches both
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as other:
        with other.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    # non-streaming request abandoned by its client
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server[0]}/generate", json={**body, "stream": False}, headers=AUTH, timeout=0.5)
    left = time.monotonic()
    while (state := idle_state(client))["running_requests"] and time.monotonic() - left < full:
        time.sleep(0.05)
    assert time.monotonic() - left < full / 2, (time.monotonic() - left, full)
    assert state["running_requests"] == 0 and state["waiting_requests"] == 0
    assert state["free_kv_slots"] + state["cached_tokens"] == state["total_kv_slots"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-server", "to-its-process-group"])
def test_sigterm_leaves_no_process_behind(model_dir, tmp_path, to_group):
    """As systemd and ``docker stop`` do, SIGTERM may reach the whole process group: still a clean
    exit (0) with every child stopped, and nothing reported dead or leaked."""
    log_path = tmp_path / "server.log"
    with running_server(model_dir, "--max-total-tokens", "512", log_path=log_path) as (base_url, proc):
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 2  # scheduler + detokenizer
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}, "stream": True}
        with httpx.Client(base_url=base_url, timeout=30) as other, other.stream("POST", "/generate", json=body) as r:
            next(r.iter_lines())  # a request in flight, which the stop must abort
            start = time.monotonic()
            if to_group:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            else:
                stop(proc)
        assert proc.returncode == 0, log_path.read_text()[-3000:]
        assert time.monotonic() - start < 15
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    log = log_path.read_text()
    assert "died" not in log and "leaked" not in log, log[-3000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/health", timeout=2)


def test_dead_child_makes_the_server_exit_nonzero(model_dir):
    with running_server(model_dir, "--max-total-tokens", "512") as (base_url, proc):
        scheduler = next(c for c in psutil.Process(proc.pid).children() if "srt.scheduler" in c.cmdline())
        os.kill(scheduler.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) != 0


def test_an_unexpected_exception_is_an_openai_shaped_500_not_plain_text():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from srt.entrypoints.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/broken")
    async def broken() -> None:
        raise KeyError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/broken")
    assert response.headers["content-type"] == "application/json"
    assert_openai_error(response, 500)
    assert response.json()["error"]["type"] == "server_error"


def test_limits_keep_one_client_from_exhausting_the_server(tmp_path):
    model_dir = build_tiny_model("llama", str(tmp_path), max_position_embeddings=4096)  # room for long generations
    args = (
        "--max-total-tokens", "8192", "--max-request-body-bytes", "4000", "--max-prompts-per-request", "4",
        "--max-logprobs", "3", "--max-logit-bias-entries", "2", "--max-queued-requests", "2",
    )  # fmt: skip
    with running_server(model_dir, *args) as (base_url, _), httpx.Client(base_url=base_url, timeout=60) as c:
        assert_openai_error(c.post("/generate", json={"input_ids": [1] * 2000}), 413)
        chunked = c.post("/generate", content=iter([b'{"input_ids": [', b"1, " * 2000, b"1]}"]))
        assert_openai_error(chunked, 413)
        assert_openai_error(c.post("/generate", json={"input_ids": [[1]] * 5}), 400)
        assert_openai_error(c.post("/v1/completions", json={"prompt": "hi", "n": 5, "max_tokens": 1}), 400)
        assert_openai_error(c.post("/generate", json={"input_ids": [1], "return_logprob": True, "top_logprobs_num": 4}), 400)
        bias = {"input_ids": [1], "sampling_params": {"logit_bias": {"1": 1, "2": 1, "3": 1}}}
        assert_openai_error(c.post("/generate", json=bias), 400)
        long = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}, "stream": True}
        with httpx.Client(base_url=base_url, timeout=60) as a, httpx.Client(base_url=base_url, timeout=60) as b:
            with a.stream("POST", "/generate", json=long) as ra, b.stream("POST", "/generate", json=long) as rb:
                lines = [ra.iter_lines(), rb.iter_lines()]  # kept: closing one closes its stream
                assert all(next(line).startswith("data: ") for line in lines)  # two generations in flight: the limit
                busy = c.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})
                assert_openai_error(busy, 503)
                assert busy.headers["retry-after"] == "1"
        assert c.get("/health").status_code == 200
        deadline = time.monotonic() + 10  # the streams' clients left: their generations are aborted
        while (ok := c.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ok.status_code == 200


def test_a_text_too_long_for_the_model_is_refused_before_tokenizing(client):
    response = client.post("/generate", json={"text": "x" * 40_000, "sampling_params": {"max_new_tokens": 1}})
    assert_openai_error(response, 400)
    assert "longer than this server accepts" in response.json()["error"]["message"]


def test_a_request_id_in_use_is_a_400_even_for_a_stream(client, server):
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}, "stream": True, "rid": "dup"}
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as other, other.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()  # kept: closing it closes the stream
        assert next(lines).startswith("data: ")
        assert_openai_error(client.post("/generate", json=body), 400)
        assert_openai_error(client.post("/generate", json={**body, "stream": False}), 400)
