"""srt as a worker behind sglang-router (SGLang's gateway, the real one from PyPI): two srt
servers with an API key, the router in front with the same key, and completions, chat
streaming and ``/generate`` through it, reaching both workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from server_process import free_port, running_server
from test_openai_api import CHAT_TEMPLATE
from tiny_models import build_tiny_model

KEY = "sk-router-test"
MODEL = "tiny"


@contextlib.contextmanager
def running_router(worker_urls: list[str], policy: str) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # workers register in the background: ready once a generation goes through
            if proc.poll() is not None:
                raise RuntimeError(f"the router exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}
                if httpx.post(f"{base_url}/generate", json=body, headers=_auth(), timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the router found no healthy worker")
            time.sleep(0.5)
        yield base_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _finished_requests(worker_url: str) -> float:
    metrics = httpx.get(f"{worker_url}/metrics", headers=_auth(), timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("srt:num_requests_total"))


def test_two_workers_behind_sglang_router(tmp_path):
    model_dir = build_tiny_model("llama", str(tmp_path / "llama"))
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    args = ("--max-total-tokens", "1024", "--served-model-name", MODEL, "--api-key", KEY, "--chat-template", str(template))
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(running_server(model_dir, *args))[0] for _ in range(2)]
        info = httpx.get(f"{workers[0]}/get_model_info", headers=_auth()).json()
        assert info["served_model_name"] == MODEL and info["is_generation"] is True
        server_info = httpx.get(f"{workers[0]}/get_server_info", headers=_auth()).json()
        assert server_info["tp_size"] == 1 and server_info["max_total_num_tokens"] == 1024
        assert "api_key" not in server_info  # the secret is never shown
        router = stack.enter_context(running_router(workers, "round_robin"))
        before = [_finished_requests(w) for w in workers]

        client = openai.OpenAI(base_url=f"{router}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        for _ in range(2):
            completion = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"ignore_eos": True})
            assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 4
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True, extra_body={"ignore_eos": True}
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        generated = httpx.post(
            f"{router}/generate",
            json={"text": "hello", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
            headers=_auth(),
            timeout=60,
        ).json()
        assert len(generated["output_ids"]) == 3 and generated["meta_info"]["finish_reason"]["type"] == "length"
        assert httpx.post(f"{router}/generate", json={"text": "hi"}, timeout=10).status_code == 401  # no key

        after = [_finished_requests(w) for w in workers]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # both workers served requests
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="another-model", prompt="hi", max_tokens=1)
