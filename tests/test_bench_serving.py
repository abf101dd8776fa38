"""`scripts/bench_serving.py` against a real server: every request completes through both
backends, the metrics are positive and one JSON line per run is appended."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from server_process import running_server
from tiny_models import build_tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_serving.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_both_backends_complete_every_request_and_append_a_result_line(tmp_path):
    bench = load_script()
    model_dir = build_tiny_model("llama", str(tmp_path / "llama"))
    output = tmp_path / "results.jsonl"
    workload = ["--num-prompts", "8", "--random-input-len", "32", "--random-output-len", "8", "--random-range-ratio", "1"]
    with running_server(model_dir, "--max-total-tokens", "4096") as (base_url, _):
        for backend in ("srt", "openai"):
            argv = ["--backend", backend, "--base-url", base_url, *workload, "--request-rate", "16", "--output-file", str(output)]
            assert bench.main(argv) == 0

    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["backend"] for r in lines] == ["srt", "openai"]
    for r in lines:
        assert (r["completed"], r["failed"]) == (8, 0)
        assert r["total_input_tokens"] == 8 * 32  # the text prompts re-tokenize to the ids sent to srt
        assert r["total_output_tokens"] == 8 * 8  # ignore_eos: exactly the lengths asked for
        for key in ("duration", "request_throughput", "output_throughput", "mean_ttft_ms", "mean_e2e_latency_ms", "mean_tpot_ms", "concurrency"):
            assert r[key] > 0, key
        assert r["mean_ttft_ms"] <= r["mean_e2e_latency_ms"]
