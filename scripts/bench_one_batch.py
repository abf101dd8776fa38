"""Prefill and decode latency of one static batch, without the server (SGLang's bench_one_batch).

    python scripts/bench_one_batch.py --batch-size 1 32 --input-len 256 --output-len 32

Runs the real Scheduler and ModelRunner in this process and breaks each decode step
down into attention (metadata, KV store and gathers, attention math), the rest of the
model forward (linears, norms, rotary, activations), sampling, and scheduling
(batch building and bookkeeping). ``--engine`` also runs the same batch through the
process-based Engine: the difference per decode step is the cost of IPC and
detokenization. ``--profile`` adds an operator-level split of the forward into
matmul / attention kernels ("model math") and everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from srt.model_loader.default_model import resolve_model_path
from srt.runtime.messages import TokenizedGenerateReq
from srt.sampling.sampling_params import SamplingParams
from srt.model_executor.model_runner import ModelRunner
from srt.platform.distributed import TPGroup
from srt.scheduler import output as output_module
from srt.scheduler.scheduler import Scheduler
from srt.server_args import ServerArgs

logger = logging.getLogger("bench_one_batch")

_MATH_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product",
    "mkldnn::_linear_pointwise",
)


class Timers:
    """Wall time spent inside wrapped callables, per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, name: str, label: str) -> None:
        inner: Callable = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()


def make_requests(batch_size: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[TokenizedGenerateReq]:
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_new_tokens=output_len, ignore_eos=True)
    return [
        TokenizedGenerateReq(f"r{i}", [rng.randrange(10, vocab) for _ in range(input_len)], params) for i in range(batch_size)
    ]


def run_batch(
    scheduler: Scheduler, timers: Timers, requests: list[TokenizedGenerateReq], decoding=contextlib.nullcontext
) -> dict[str, float]:
    """Prefill the batch in one step, then decode to the end (inside ``decoding()``); per-step medians of each part."""
    scheduler.cache.reset()
    for req in requests:
        scheduler.add_request(req)
    timers.reset()
    start = time.perf_counter()
    scheduler.step()
    prefill = time.perf_counter() - start
    steps: list[dict[str, float]] = []
    with decoding():
        while scheduler.has_work():
            timers.reset()
            start = time.perf_counter()
            scheduler.step()
            scheduler.take_outputs()
            steps.append({"step": time.perf_counter() - start, **timers.seconds})
    steps = steps[1:] or steps  # the first decode step pays one-off allocations
    median = {key: statistics.median(s.get(key, 0.0) for s in steps) for key in steps[0]}
    return {"prefill": prefill, **median}


def report(batch_size: int, input_len: int, r: dict[str, float]) -> None:
    step = r["step"]
    attention = r.get("attention", 0.0)
    forward = r.get("forward", 0.0)
    sampling = r.get("sampling", 0.0)
    parts = {
        "attention (prep + store + gather + math)": attention,
        "rest of model forward (linears, norms, ...)": forward - attention,
        "sampling": sampling,
        "scheduling (batch building, bookkeeping)": step - forward - sampling,
    }
    print(f"\nbatch {batch_size} x input {input_len}")
    print(f"  prefill: {r['prefill'] * 1000:9.1f} ms  ({batch_size * input_len / r['prefill']:.0f} tok/s)")
    print(f"  decode step (median): {step * 1000:6.2f} ms  ({batch_size / step:.1f} tok/s)")
    for name, seconds in parts.items():
        print(f"    {name:46s} {seconds * 1000:7.2f} ms  {100 * seconds / step:5.1f}%")


@contextlib.contextmanager
def operator_profile(batch_size: int) -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    math = sum(e.self_cpu_time_total for e in events if e.key.startswith(_MATH_OPS))
    print(f"  decode operator profile (batch {batch_size}): GEMM + attention kernels {100 * math / total:.1f}% of profiled CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def engine_step_time(args: argparse.Namespace, model_path: str, requests: list[TokenizedGenerateReq]) -> float:
    """Median seconds between decode steps as the process-based Engine streams them (IPC and
    detokenization included): the gaps between consecutive outputs of the first request."""
    import srt

    ids = [r.input_ids for r in requests]
    params = requests[0].sampling_params
    with srt.Engine(model_path=model_path, **server_kwargs(args)) as engine:
        engine.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 2})  # warm-up
        engine.flush_cache()
        arrivals = [time.perf_counter() for item in engine.generate(input_ids=ids, sampling_params=params, stream=True) if item["index"] == 0]
    gaps = [later - earlier for earlier, later in zip(arrivals[1:], arrivals[2:])]  # after the first decode step
    return statistics.median(gaps)


def server_kwargs(args: argparse.Namespace) -> dict:
    tokens = max(args.batch_size) * (args.input_len + args.output_len) + 64
    return {
        "dtype": args.dtype,
        "max_total_tokens": tokens,
        "max_prefill_tokens": tokens,
        "chunked_prefill_size": -1,
        "attention_backend": args.attention_backend,
        "enable_torch_compile": args.enable_torch_compile,
        "log_level": "warning",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enable-torch-compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="operator-level profile of one decode run per batch size")
    parser.add_argument("--engine", action="store_true", help="also time decode steps through the process-based Engine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_path = resolve_model_path(args.model_path)
    server_args = ServerArgs(model_path=model_path, **server_kwargs(args))
    runner = ModelRunner(server_args, model_path, TPGroup())
    scheduler = Scheduler(server_args, runner)
    timers = Timers()
    timers.wrap(runner, "forward", "forward")
    for name in ("prepare", "store", "forward"):
        timers.wrap(runner.attention.backend, name, "attention")
    timers.wrap(output_module, "sample", "sampling")
    timers.wrap(output_module, "token_logprobs", "sampling")
    print(f"model {model_path} ({runner.dtype}, {runner.device}, {torch.get_num_threads()} threads)")

    for batch_size in args.batch_size:
        requests = make_requests(batch_size, args.input_len, args.output_len, runner.shape.vocab_size, args.seed)
        run_batch(scheduler, timers, requests[:1])  # warm-up
        result = run_batch(scheduler, timers, requests)
        report(batch_size, args.input_len, result)
        if args.profile:
            run_batch(scheduler, timers, requests, decoding=lambda: operator_profile(batch_size))
        if args.engine:
            per_step = engine_step_time(args, model_path, requests)
            print(f"    through the Engine: {per_step * 1000:.2f} ms per decode step (IPC + detokenizer + front: "
                  f"{(per_step - result['step']) * 1000:.2f} ms)")


if __name__ == "__main__":
    main()
