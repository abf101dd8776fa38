"""What the HTTP front promises any client: its published OpenAPI schema is what it answers
(schemathesis, from PyPI, generates requests from it and checks every response against it),
and a slow client cannot hold a connection: headers and body each have a deadline."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse

import httpx
import pytest

from server_process import running_server
from tiny_models import build_tiny_model
from tiny_pooling_models import build_pooling_model

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    # A short context keeps every generated request quick, whatever max_tokens it asks for.
    model_dir = build_tiny_model("llama", str(tmp_path_factory.mktemp("contract")), max_position_embeddings=64)
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    args = ["--max-total-tokens", "2048", "--chat-template", str(template), "--max-prompts-per-request", "8",
            "--timeout-header-read", str(HEADER_TIMEOUT_S), "--timeout-body-read", str(BODY_TIMEOUT_S)]  # fmt: skip
    with running_server(model_dir, *args) as (url, _):
        yield url


def test_schema_documents_bodies_and_the_errors_really_sent(base_url):
    schema = httpx.get(f"{base_url}/openapi.json").json()
    assert "422" not in json.dumps({p: {m: op["responses"] for m, op in ops.items()} for p, ops in schema["paths"].items()})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            error = operation["responses"]["400"]["content"]  # JSON, on text/plain routes too
            assert error == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}, path
    ok = {path: ops[next(iter(ops))]["responses"]["200"].get("content", {}) for path, ops in schema["paths"].items()}
    assert ok["/v1/models"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelList"}
    assert ok["/v1/chat/completions"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    assert {"application/json", "text/event-stream"} == set(ok["/generate"])
    assert set(ok["/metrics"]) == {"text/plain"} and ok["/health"] == {}


@pytest.fixture(scope="module")
def encoder_url(tmp_path_factory):
    """A pooling server (a BERT embedder), whose routes compute where the generation server's refuse."""
    model_dir = build_pooling_model("bert", str(tmp_path_factory.mktemp("contract-encoder")), max_position_embeddings=64)
    with running_server(model_dir, "--max-prompts-per-request", "8") as (url, _):
        yield url


def _schemathesis(base_url: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json", "--checks", CHECKS,
           "--max-examples", "15", "--workers", "1", "--seed", "1", "--phases", "examples,coverage,fuzzing",
           "--request-timeout", "60", "--no-color", "--generation-database", "none"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "Tested: 31" in run.stdout, run.stdout[-3000:]


def test_schemathesis_finds_no_server_error_on_a_pooling_server(encoder_url, tmp_path):
    _schemathesis(encoder_url, tmp_path)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(base_url, tmp_path):
    _schemathesis(base_url, tmp_path)
    load = httpx.get(f"{base_url}/get_load").json()[0]
    assert load["num_reqs"] == 0 and load["num_tokens"] == 0  # nothing leaked by thousands of odd requests


def _connect(base_url: str) -> socket.socket:
    address = urllib.parse.urlsplit(base_url)
    return socket.create_connection((address.hostname, address.port), timeout=HEADER_TIMEOUT_S + 10)


def test_headers_that_trickle_in_past_the_deadline_lose_the_connection(base_url):
    with _connect(base_url) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        with pytest.raises((ConnectionError, BrokenPipeError)):
            # A byte every half second resets no deadline: the headers never finish in time.
            while time.monotonic() - start < HEADER_TIMEOUT_S + 5:
                s.sendall(b"X")
                time.sleep(0.5)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        raise ConnectionError("closed by the server")
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - start < HEADER_TIMEOUT_S + 3


def test_a_body_that_does_not_arrive_in_time_gets_a_408(base_url):
    with _connect(base_url) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        start = time.monotonic()
        reply = s.recv(4096)
        assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - start < BODY_TIMEOUT_S + 3
        head, _, body = reply.decode().partition("\r\n\r\n")
        length = int(next(line.split(":")[1] for line in head.split("\r\n") if line.lower().startswith("content-length")))
        while len(body.encode()) < length:  # the head and the body may come in separate packets
            body += s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_keep_alive_connection_serves_requests_one_after_another(base_url):
    """The header deadline is re-armed for each request, not once per connection."""
    with httpx.Client(base_url=base_url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(HEADER_TIMEOUT_S * 0.6)


def test_an_error_quoting_a_lone_surrogate_from_the_client_is_still_valid_utf8_json():
    from srt.entrypoints.errors import APIError

    body = APIError(400, "unknown role 'x\ud800'", param="messages\udc00").response().body
    error = json.loads(body.decode("utf-8"))["error"]
    assert error["message"] == "unknown role 'x\\ud800'" and error["param"] == "messages\\udc00"
