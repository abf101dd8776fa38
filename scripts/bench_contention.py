"""Decode speed of srt.Engine on a quiet CPU and with another process busy on one core, with
the CPU thread tuner on and off, in one run (issue 14's contention goal: losing one of N
cores may cost at most about N/(N-1), not the 3-4x an OpenMP team waiting on a shared core costs).

    python scripts/make_random_llama.py --output /tmp/llama-125m
    python scripts/bench_contention.py --model-path /tmp/llama-125m --dtype bfloat16

The busy process is a Python spin loop pinned to the last core. Each configuration starts its
own Engine, warms up, then times ``--rounds`` batch-``--batch-size`` generations of
``--output-len`` tokens (ignoring EOS): output tokens per second. The four configurations run
in turn ``--repeats`` times and each reports its median (single runs on a small VM vary by 20%).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger("bench_contention")

_SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


@contextlib.contextmanager
def busy_core(core: int) -> Iterator[None]:
    """Another process keeping ``core`` busy for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", _SPIN, str(core)])
    try:
        time.sleep(0.5)
        yield
    finally:
        hog.kill()
        hog.wait()


def decode_throughput(args: argparse.Namespace, tuning: bool) -> float:
    import srt

    rng = random.Random(0)
    prompts = [[rng.randrange(10, 30000) for _ in range(args.input_len)] for _ in range(args.batch_size * (args.rounds + 1))]
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    with srt.Engine(model_path=args.model_path, dtype=args.dtype, disable_cpu_thread_tuning=not tuning, log_level="warning") as engine:
        engine.generate(input_ids=prompts[: args.batch_size], sampling_params=params)  # warm-up (and the tuner's first trials)
        start = time.perf_counter()
        for r in range(1, args.rounds + 1):
            engine.generate(input_ids=prompts[r * args.batch_size : (r + 1) * args.batch_size], sampling_params=params)
        seconds = time.perf_counter() - start
    return args.rounds * args.batch_size * args.output_len / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = os.cpu_count() or 1
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for load in ("quiet", "one core busy"):
            for tuning in (False, True):
                name = "tuner on" if tuning else "tuner off"
                with busy_core(cores - 1) if load != "quiet" else contextlib.nullcontext():
                    runs.setdefault((load, name), []).append(decode_throughput(args, tuning))
                logger.info("%-14s %-9s %7.1f tok/s", load, name, runs[(load, name)][-1])
    results = {key: statistics.median(values) for key, values in runs.items()}
    print(f"\nbatch {args.batch_size}, {args.input_len} prompt / {args.output_len} output tokens, {args.dtype}, {cores} cores, median of {args.repeats}")
    print(f"{'':14} {'tuner off':>10} {'tuner on':>10}")
    for load in ("quiet", "one core busy"):
        print(f"{load:14} {results[(load, 'tuner off')]:10.1f} {results[(load, 'tuner on')]:10.1f}")
    for name in ("tuner off", "tuner on"):
        slowdown = results[("quiet", name)] / results[("one core busy", name)]
        print(f"{name}: one busy core slows decode {slowdown:.2f}x (goal <= {cores / max(cores - 1, 1) * 1.25:.2f}x)")


if __name__ == "__main__":
    main()
