"""Memory stays flat: after warm-up, thousands of tokens of traffic leave every process's RSS where it was.

Each request has a prompt of its own, so the radix cache keeps every finished request's K/V
in slots no earlier request used; memory the processes hold per request (or per step)
would show as steady growth. The KV pool is far larger than the whole run's tokens, so
nothing is evicted and growth could not hide behind reuse.
"""

from __future__ import annotations

import concurrent.futures
import logging

import httpx
import psutil

from server_process import running_server

logger = logging.getLogger(__name__)

CLIENTS = 8
WARMUP = 32
MEASURED = 128
MAX_GROWTH = 0.03  # of the RSS after warm-up (before the fix, the scheduler grew ~7% over 200 requests)


def _process_rss(server: psutil.Process) -> dict[str, int]:
    """RSS by role: the main (HTTP + tokenizer) process and each child, named by its module."""
    rss = {"main": server.memory_info().rss}
    for child in server.children(recursive=True):
        rss[child.cmdline()[-1]] = child.memory_info().rss
    return rss


def _send(client: httpx.Client, model: str, requests: range) -> None:
    for i in requests:
        prompt = f"Request {i}: " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(24))
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.8})
        assert r.status_code == 200, r.text


def _run(client: httpx.Client, model: str, start: int, count: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(_send, client, model, range(start + k, start + count, CLIENTS)) for k in range(CLIENTS)]:
            f.result()


def test_rss_stays_flat_over_hundreds_of_distinct_requests(default_model_dir):
    with running_server(None, "--max-total-tokens", "65536") as (url, proc), httpx.Client(base_url=url, timeout=120) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        server = psutil.Process(proc.pid)
        _run(c, model, 0, WARMUP)
        before = _process_rss(server)
        _run(c, model, WARMUP, MEASURED)
        after = _process_rss(server)
        assert c.get("/get_load").json()[0]["num_reqs"] == 0
    growth = {role: (after[role] - before[role]) / before[role] for role in before}
    logger.info("RSS after warm-up %s MiB, growth %s", {r: before[r] >> 20 for r in before}, growth)
    assert all(g < MAX_GROWTH for g in growth.values()), (before, after)
