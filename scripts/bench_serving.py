"""Online serving benchmark: send a synthetic workload to a running server over HTTP and
report throughput and latency, in the manner of ``python -m sglang.bench_serving``.

    python scripts/bench_serving.py --backend srt --dataset-name random \\
        --num-prompts 200 --random-input-len 512 --random-output-len 128 --request-rate 8

    python scripts/bench_serving.py --backend openai --base-url http://127.0.0.1:8000 \\
        --dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 8

Backends: ``srt`` speaks our native ``POST /generate`` (SGLang's: each streamed event
carries the whole text and ids so far); ``openai`` speaks ``POST /v1/completions`` to any
OpenAI-compatible server (vLLM, SGLang, srt). Requests arrive as a Poisson process
(``--request-rate``; ``inf`` sends them all at once), at most ``--max-concurrency`` in
flight. The metrics are SGLang's:

- TTFT: time from sending a request to the first chunk that carries an output token.
- ITL: time between consecutive chunks; a chunk carrying k tokens counts as k gaps of
  (its gap / k), so servers that batch tokens into chunks are compared fairly.
- TPOT: (E2E latency - TTFT) / (output tokens - 1), per request with more than one token.
- Concurrency: the sum of E2E latencies over the benchmark's duration.

Token counts come from the server (``meta_info`` or ``usage``) when it reports them, else
from the tokenizer. The script talks only to the given base URL: the tokenizer is read
from a local path or the local Hugging Face cache, never downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator

import httpx
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger("bench_serving")


# ---- workload -------------------------------------------------------------------------------


@dataclass
class DatasetRow:
    input_ids: list[int]  # sent as is to srt
    text: str  # the same prompt decoded, sent to OpenAI-compatible servers
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


class TokenSampler:
    """Draws random token ids that survive decode -> encode on their own (no special tokens,
    no partial UTF-8), so a prompt sent as text re-tokenizes to (nearly) the ids sent to srt."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator) -> None:
        self.tokenizer, self.rng = tokenizer, rng
        self.special = set(tokenizer.all_special_ids)
        self.clean: dict[int, bool] = {}

    def is_clean(self, token: int) -> bool:
        if token not in self.clean:
            text = self.tokenizer.decode([token])
            self.clean[token] = (
                token not in self.special
                and "\ufffd" not in text
                and self.tokenizer.encode(text, add_special_tokens=False) == [token]
            )
        return self.clean[token]

    def sample(self, n: int) -> list[int]:
        ids: list[int] = []
        for _ in range(100):
            if len(ids) >= n:
                return ids[:n]
            draws = self.rng.integers(0, len(self.tokenizer), size=2 * (n - len(ids)) + 8)
            ids += [int(t) for t in draws if self.is_clean(int(t))]
        raise ValueError("the tokenizer has too few tokens that round-trip through decode/encode")


def sample_random_requests(
    tokenizer: PreTrainedTokenizerBase,
    rng: np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
) -> list[DatasetRow]:
    """``--dataset-name random``: lengths uniform in [len * ratio, len], prompts of random tokens."""
    input_lens = rng.integers(max(int(input_len * range_ratio), 1), input_len + 1, size=num_prompts)
    output_lens = rng.integers(max(int(output_len * range_ratio), 1), output_len + 1, size=num_prompts)
    sampler = TokenSampler(tokenizer, rng)
    rows = []
    for n_in, n_out in zip(input_lens, output_lens):
        ids = sampler.sample(int(n_in))
        rows.append(DatasetRow(ids, tokenizer.decode(ids), int(n_out)))
    return rows


def sample_generated_shared_prefix_requests(
    tokenizer: PreTrainedTokenizerBase,
    rng: np.random.Generator,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
) -> list[DatasetRow]:
    """``--dataset-name generated-shared-prefix``: groups of prompts sharing a long random
    system prompt, each followed by its own short random question; shuffled."""
    sampler = TokenSampler(tokenizer, rng)
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    rows = []
    for _ in range(num_groups):
        system = sampler.sample(system_prompt_len)
        for _ in range(prompts_per_group):
            ids = system + separator + sampler.sample(question_len)
            rows.append(DatasetRow(ids, tokenizer.decode(ids), output_len))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def build_dataset(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> list[DatasetRow]:
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "random":
        rows = sample_random_requests(
            tokenizer, rng, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio
        )
    else:
        rows = sample_generated_shared_prefix_requests(
            tokenizer,
            rng,
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
        )
        logger.info("%d groups x %d prompts (as in SGLang, --num-prompts is not used)",
                    args.gsp_num_groups, args.gsp_prompts_per_group)
    if not rows:
        raise SystemExit("the dataset is empty")
    logger.info("dataset: %d prompts, %d input tokens, %d output tokens requested",
                len(rows), sum(r.prompt_len for r in rows), sum(r.output_len for r in rows))
    return rows


# ---- one request --------------------------------------------------------------------------------


@dataclass
class Chunk:
    time: float  # seconds since the request was sent
    tokens: int | None  # new output tokens it carries; None: counted from `text` after the run
    text: str = ""


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    latency: float = 0.0  # E2E, seconds
    prompt_len: int = 0
    output_len: int | None = None  # None: the server did not say; counted from the text after the run
    cached_tokens: int | None = None
    generated_text: str = ""
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return next((c.time for c in self.chunks if c.tokens), self.latency)

    @property
    def itl(self) -> list[float]:
        """Gaps between token-carrying chunks after the first, each split over its tokens."""
        gaps: list[float] = []
        previous = None
        for chunk in self.chunks:
            if not chunk.tokens:
                continue
            if previous is not None:
                gaps += [(chunk.time - previous) / chunk.tokens] * chunk.tokens
            previous = chunk.time
        return gaps


async def response_events(response: httpx.Response, stream: bool) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a response carries: each server-sent ``data:`` line up to ``[DONE]``,
    or the whole body when not streaming."""
    if not stream:
        yield json.loads(await response.aread())
        return
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def in_band_error(data: dict[str, Any]) -> str | None:
    """An error event inside a 200 response, or (srt) a generation the server aborted."""
    if "error" in data:
        return json.dumps(data["error"])
    reason = (data.get("meta_info") or {}).get("finish_reason") or {}
    if reason.get("type") == "abort":
        return f"aborted: {reason.get('message', reason)}"
    return None


async def http_error(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:500]}"


async def request_srt(
    client: httpx.AsyncClient, row: DatasetRow, output_len: int, args: argparse.Namespace
) -> RequestResult:
    """``POST /generate`` with token ids; every event carries all the ids so far."""
    sampling_params = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": not args.disable_ignore_eos}
    payload = {"input_ids": row.input_ids, "sampling_params": sampling_params, "stream": not args.disable_stream}
    result = RequestResult(prompt_len=row.prompt_len)
    data: dict[str, Any] = {}
    start = time.perf_counter()
    async with client.stream("POST", f"{args.base_url}/generate", json=payload, headers=auth_headers()) as response:
        if response.status_code != 200:
            result.error = await http_error(response)
            return result
        seen = 0
        async for data in response_events(response, not args.disable_stream):
            if error := in_band_error(data):
                result.error = error
                return result
            # Counted by ids, not text: a token that ends inside a UTF-8 character has no text yet.
            total = (data.get("meta_info") or {}).get("completion_tokens", len(data.get("output_ids") or []))
            result.chunks.append(Chunk(time.perf_counter() - start, total - seen))
            seen = total
        result.latency = time.perf_counter() - start
    meta = data.get("meta_info") or {}
    result.generated_text = data.get("text", "")
    result.output_len = seen
    result.prompt_len = meta.get("prompt_tokens", row.prompt_len)
    result.cached_tokens = meta.get("cached_tokens")
    result.success = True
    return result


async def request_openai(
    client: httpx.AsyncClient, row: DatasetRow, output_len: int, args: argparse.Namespace
) -> RequestResult:
    """``POST /v1/completions`` with text; each chunk carries the new text only."""
    payload: dict[str, Any] = {
        "model": args.model,
        "prompt": row.text,
        "max_tokens": output_len,
        "temperature": 0.0,
        "stream": not args.disable_stream,
        "ignore_eos": not args.disable_ignore_eos,  # an extension: vLLM, SGLang and srt accept it
    }
    if not args.disable_stream:
        payload["stream_options"] = {"include_usage": True}
    result = RequestResult(prompt_len=row.prompt_len)
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    async with client.stream("POST", f"{args.base_url}/v1/completions", json=payload, headers=auth_headers()) as response:
        if response.status_code != 200:
            result.error = await http_error(response)
            return result
        reported = 0  # completion tokens so far, for servers that put usage in every chunk
        async for data in response_events(response, not args.disable_stream):
            if error := in_band_error(data):
                result.error = error
                return result
            usage = data.get("usage") or usage
            text = data["choices"][0].get("text", "") if data.get("choices") else ""
            if text:  # the usage-only chunk at the end carries no token
                tokens = None
                if data.get("usage") and usage.get("completion_tokens") is not None:
                    tokens, reported = usage["completion_tokens"] - reported, usage["completion_tokens"]
                result.chunks.append(Chunk(time.perf_counter() - start, tokens, text))
                result.generated_text += text
        result.latency = time.perf_counter() - start
    result.output_len = usage.get("completion_tokens")
    result.prompt_len = usage.get("prompt_tokens", row.prompt_len)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    result.success = True
    return result


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


REQUEST_FUNCS = {"srt": request_srt, "openai": request_openai}


async def send(client: httpx.AsyncClient, row: DatasetRow, output_len: int, args: argparse.Namespace) -> RequestResult:
    """One request, bounded by ``--timeout``; any failure becomes a failed result."""
    try:
        async with asyncio.timeout(args.timeout):
            return await REQUEST_FUNCS[args.backend](client, row, output_len, args)
    except TimeoutError:
        return RequestResult(prompt_len=row.prompt_len, error=f"timed out after {args.timeout} s")
    except Exception as e:  # connection errors, bad JSON, ...: the run goes on
        return RequestResult(prompt_len=row.prompt_len, error=f"{type(e).__name__}: {e}")


def count_tokens(results: list[RequestResult], tokenizer: PreTrainedTokenizerBase) -> None:
    """Fill in what the server did not report, by tokenizing the text it sent."""
    for r in results:
        if not r.success:
            continue
        if r.output_len is None:
            r.output_len = len(tokenizer.encode(r.generated_text, add_special_tokens=False))
        unknown = [c for c in r.chunks if c.tokens is None]
        if not unknown:
            continue
        # Each chunk has at least one token; the rest of the total is shared out in proportion
        # to what re-tokenizing each chunk's text suggests (only a guess: merges, invalid bytes).
        extra = np.array([len(tokenizer.encode(c.text, add_special_tokens=False)) - 1 for c in unknown]).clip(0)
        if extra.sum() == 0:
            extra[:] = 1
        to_share = max(0, r.output_len - sum(c.tokens or 0 for c in r.chunks) - len(unknown))
        bounds = np.rint(np.cumsum(extra) * to_share / extra.sum()).astype(int)  # cumulative: the sum is kept
        for chunk, tokens in zip(unknown, np.diff(bounds, prepend=0)):
            chunk.tokens = 1 + int(tokens)


# ---- the run ------------------------------------------------------------------------------------


async def arrivals(
    rows: list[DatasetRow], request_rate: float, rng: np.random.Generator, ramp_up: float = 0.0, ramp_up_count: int = 0
) -> AsyncIterator[DatasetRow]:
    """Yield rows as a Poisson process of rate ``request_rate`` (all at once when infinite). With
    ``ramp_up`` seconds, the first ``ramp_up_count`` rows are spread evenly over that time instead:
    clients that join one after another rather than in one synchronized burst."""
    for i, row in enumerate(rows):
        if i and i < ramp_up_count:
            await asyncio.sleep(ramp_up / ramp_up_count)
        elif i and request_rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / request_rate))
        yield row


async def benchmark(args: argparse.Namespace, rows: list[DatasetRow]) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # trust_env=False: no proxy from the environment stands between us and the server.
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits, trust_env=False) as client:
        if not args.disable_warmup:
            warm = await send(client, rows[0], min(rows[0].output_len, 32), args)
            if not warm.success:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
            logger.info("warm-up done (%.2f s)", warm.latency)
        if args.flush_cache:  # drop the prefix cache (SGLang's and srt's endpoint): runs do not feed each other
            response = await client.post(f"{args.base_url}/flush_cache", headers=auth_headers())
            logger.info("POST /flush_cache: HTTP %d", response.status_code)

        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
        done, failed = 0, 0
        step = max(1, len(rows) // 10)

        async def run_one(row: DatasetRow) -> RequestResult:
            nonlocal done, failed
            async with semaphore:
                result = await send(client, row, row.output_len, args)
            done, failed = done + 1, failed + (not result.success)
            if not result.success and failed <= 3:
                logger.warning("request failed: %s", result.error)
            if done % step == 0 or done == len(rows):
                logger.info("%d/%d requests done (%d failed)", done, len(rows), failed)
            return result

        start = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        ramp_up_count = (args.max_concurrency or len(rows)) if args.ramp_up_seconds else 0
        stream = arrivals(rows, args.request_rate, rng, args.ramp_up_seconds, ramp_up_count)
        tasks = [asyncio.create_task(run_one(row)) async for row in stream]
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


# ---- metrics and report -------------------------------------------------------------------------


def _stats(name: str, values: list[float]) -> dict[str, float]:
    """Mean, median and p99 in milliseconds (0 when there is nothing to measure, as SGLang does)."""
    ms = np.asarray(values or [0.0]) * 1000
    return {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def calculate_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len or 0 for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    latencies = [r.latency for r in ok]
    return {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "total_throughput": (total_input + total_output) / duration,
        "concurrency": sum(latencies) / duration,
        **_stats("e2e_latency", latencies),
        **_stats("ttft", [r.ttft for r in ok]),
        **_stats("tpot", [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if (r.output_len or 0) > 1]),
        **_stats("itl", [gap for r in ok for gap in r.itl]),
    }


def print_report(args: argparse.Namespace, m: dict[str, Any]) -> None:
    def row(label: str, value: Any) -> None:
        print(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    def section(title: str, key: str, label: str) -> None:
        print(f"{title:-^50}")
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            row(f"{name} {label} (ms):", m[f"{stat}_{key}_ms"])

    print(f"\n{' Serving Benchmark Result ':=^50}")
    row("Backend:", args.backend)
    row("Dataset:", args.dataset_name)
    row("Traffic request rate:", args.request_rate)
    row("Max request concurrency:", args.max_concurrency or "not set")
    row("Ramp-up (s):", args.ramp_up_seconds)
    row("Streaming:", "no" if args.disable_stream else "yes")
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    if m["total_cached_tokens"] is not None:
        row("Total cached input tokens:", m["total_cached_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_throughput"])
    row("Concurrency:", m["concurrency"])
    section("End-to-End Latency", "e2e_latency", "E2E Latency")
    section("Time to First Token", "ttft", "TTFT")
    section("Time per Output Token (excl. 1st token)", "tpot", "TPOT")
    section("Inter-token Latency", "itl", "ITL")
    print("=" * 50)


def write_jsonl(args: argparse.Namespace, metrics: dict[str, Any], results: list[RequestResult]) -> None:
    settings = ("backend", "base_url", "model", "tokenizer", "dataset_name", "num_prompts", "request_rate", "max_concurrency",
                "ramp_up_seconds",
                "seed", "disable_stream", "disable_ignore_eos", "flush_cache",
                "random_input_len", "random_output_len", "random_range_ratio",
                "gsp_num_groups", "gsp_prompts_per_group", "gsp_system_prompt_len", "gsp_question_len", "gsp_output_len")
    record = {"date": datetime.now().isoformat(timespec="seconds"), **{k: getattr(args, k) for k in settings}, **metrics}
    if record["request_rate"] == float("inf"):
        record["request_rate"] = None  # JSON has no infinity; null: no limit, like max_concurrency
    if args.output_details:
        record.update(
            input_lens=[r.prompt_len for r in results],
            output_lens=[r.output_len or 0 for r in results],
            ttfts=[r.ttft if r.success else 0.0 for r in results],
            itls=[r.itl for r in results],
            e2e_latencies=[r.latency for r in results],
            generated_texts=[r.generated_text for r in results],
            errors=[r.error for r in results],
        )
    with open(args.output_file, "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info("results appended to %s", args.output_file)


# ---- set-up ---------------------------------------------------------------------------------------


def server_json(base_url: str, path: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{base_url}{path}", headers=auth_headers(), timeout=10, trust_env=False)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def resolve_model_and_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    if args.backend == "openai" and args.model is None:
        models = (server_json(args.base_url, "/v1/models") or {}).get("data") or []
        if not models:
            raise SystemExit("--model is needed: GET /v1/models gave no model")
        args.model = models[0]["id"]
        logger.info("model from /v1/models: %s", args.model)
    if args.tokenizer is None:
        info = server_json(args.base_url, "/model_info") or {}
        args.tokenizer = info.get("tokenizer_path") or args.model
        if args.tokenizer is None:
            raise SystemExit("--tokenizer is needed: the server has no /model_info and --model is not given")
    logger.info("tokenizer: %s", args.tokenizer)
    # Local files only: the benchmark talks to no one but the server.
    return AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(REQUEST_FUNCS), default="srt")
    p.add_argument("--base-url", default=None, help="the server (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name for --backend openai (default: GET /v1/models)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer (default: the server's /model_info, then --model)")
    p.add_argument("--dataset-name", choices=["random", "generated-shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths are uniform in [len * ratio, len] (default 0)")
    p.add_argument("--gsp-num-groups", type=int, default=64)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf (default): all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument(
        "--ramp-up-seconds",
        type=float,
        default=0.0,
        help="start the first --max-concurrency requests (all, if unset) evenly over this time instead of at once",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request (default 600)")
    p.add_argument("--disable-stream", action="store_true", help="non-streaming requests (TTFT = E2E latency)")
    p.add_argument("--disable-ignore-eos", action="store_true", help="let generations stop at EOS")
    p.add_argument("--disable-warmup", action="store_true")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after the warm-up")
    p.add_argument("--output-file", default=None, help="append one JSON line of settings and metrics to this file")
    p.add_argument("--output-details", action="store_true", help="add per-request details to the JSON line")
    args = p.parse_args(argv)
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return args


def _raise_open_file_limit() -> None:
    """Many concurrent requests need many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65535)), hard))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when every request failed)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    _raise_open_file_limit()
    tokenizer = resolve_model_and_tokenizer(args)
    rows = build_dataset(args, tokenizer)
    logger.info("benchmarking %s (%s): request rate %s, max concurrency %s",
                args.base_url, args.backend, args.request_rate, args.max_concurrency)
    try:
        results, duration = asyncio.run(benchmark(args, rows))
    except RuntimeError as e:  # the warm-up failed: nothing worth measuring
        logger.error("%s", e)
        return 1
    count_tokens(results, tokenizer)
    metrics = calculate_metrics(results, duration)
    print_report(args, metrics)
    if args.output_file:
        write_jsonl(args, metrics, results)
    if metrics["completed"] == 0:
        logger.error("every request failed; the first error: %s", results[0].error if results else "no requests")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
