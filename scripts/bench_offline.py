"""Offline throughput of srt.Engine, optionally against transformers on the same weights, in one run
(SGLang's bench_offline_throughput metrics).

    python scripts/bench_offline.py --dataset-name random --num-prompts 48 \\
        --random-input-len 256 --random-output-len 128 --random-range-ratio 0.125 \\
        --dtype float32 --baseline transformers

Every request ignores EOS so that both sides generate exactly the asked lengths. The
transformers baseline runs ``generate`` in static batches of ``--baseline-batch-size``
(left-padded; a batch runs until its longest output is done, as static batching does)
and counts the same useful tokens. Throughputs and the srt / transformers ratio are
printed; ``--output-file`` appends them as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger("bench_offline")


@dataclass
class Request:
    input_ids: list[int]
    output_len: int


@dataclass
class Result:
    name: str
    seconds: float
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def request_throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def input_throughput(self) -> float:
        return self.input_tokens / self.seconds

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds

    def print(self) -> None:
        print(f"\n====== {self.name} ======")
        print(f"  duration (s):                 {self.seconds:10.2f}")
        print(f"  requests:                     {self.requests:10d}")
        print(f"  input / output tokens:        {self.input_tokens:10d} / {self.output_tokens}")
        print(f"  request throughput (req/s):   {self.request_throughput:10.2f}")
        print(f"  input token throughput (tok/s):  {self.input_throughput:8.1f}")
        print(f"  output token throughput (tok/s): {self.output_throughput:8.1f}")
        print(f"  total token throughput (tok/s):  {self.total_throughput:8.1f}")


# ---- workloads -------------------------------------------------------------------------------


def make_requests(args: argparse.Namespace, vocab_size: int) -> list[Request]:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size) for _ in range(n)]

    def length(full: int, ratio: float) -> int:
        return rng.randint(max(1, int(full * ratio)), full)

    if args.dataset_name == "random":
        output_ratio = args.random_output_range_ratio if args.random_output_range_ratio is not None else args.random_range_ratio
        return [
            Request(tokens(length(args.random_input_len, args.random_range_ratio)), length(args.random_output_len, output_ratio))
            for _ in range(args.num_prompts)
        ]
    if args.dataset_name == "fixed":
        return [Request(tokens(args.random_input_len), args.random_output_len) for _ in range(args.num_prompts)]
    requests = []
    for _ in range(args.gsp_num_groups):
        prefix = tokens(args.gsp_system_prompt_len)
        requests += [Request(prefix + tokens(args.gsp_question_len), args.gsp_output_len) for _ in range(args.gsp_prompts_per_group)]
    rng.shuffle(requests)
    return requests


# ---- runners -----------------------------------------------------------------------------------


def run_srt(
    args: argparse.Namespace, model_path: str, requests: list[Request], name: str, lora_path: list[str | None] | None = None, **overrides
) -> Result:
    """``lora_path``: each request's LoRA adapter (None: the base model)."""
    import srt

    kwargs = {"dtype": args.dtype, "log_level": "warning", **overrides}
    if args.max_total_tokens:
        kwargs["max_total_tokens"] = args.max_total_tokens
    with srt.Engine(model_path=model_path, **kwargs) as engine:
        params = [{"temperature": 0, "max_new_tokens": r.output_len, "ignore_eos": True} for r in requests]
        engine.generate(input_ids=[requests[0].input_ids[:8]], sampling_params=[{"max_new_tokens": 2}])  # warm-up
        engine.flush_cache()
        start = time.perf_counter()
        outs = engine.generate(input_ids=[r.input_ids for r in requests], sampling_params=params, lora_path=lora_path)
        seconds = time.perf_counter() - start
    output_tokens = sum(len(o["output_ids"]) for o in outs)
    return Result(name, seconds, len(requests), sum(len(r.input_ids) for r in requests), output_tokens)


@torch.inference_mode()
def run_transformers(args: argparse.Namespace, model_path: str, requests: list[Request]) -> Result:
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    for i in range(0, len(requests), args.baseline_batch_size):
        batch = requests[i : i + args.baseline_batch_size]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.tensor([[0] * (width - len(r.input_ids)) + r.input_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch])
        model.generate(ids, attention_mask=mask, generation_config=config, max_new_tokens=max(r.output_len for r in batch))
    seconds = time.perf_counter() - start
    return Result(
        f"transformers generate (static batches of {args.baseline_batch_size})",
        seconds,
        len(requests),
        sum(len(r.input_ids) for r in requests),
        sum(r.output_len for r in requests),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dataset-name", choices=["random", "generated-shared-prefix", "fixed"], default="random")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * ratio, len]")
    parser.add_argument("--random-output-range-ratio", type=float, default=None, help="default: --random-range-ratio")
    parser.add_argument("--gsp-num-groups", type=int, default=1)
    parser.add_argument("--gsp-prompts-per-group", type=int, default=32)
    parser.add_argument("--gsp-system-prompt-len", type=int, default=1024)
    parser.add_argument("--gsp-question-len", type=int, default=32)
    parser.add_argument("--gsp-output-len", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--baseline", choices=["none", "transformers"], default="none")
    parser.add_argument("--baseline-batch-size", type=int, default=16)
    parser.add_argument("--compare-radix-off", action="store_true", help="also run srt with --disable-radix-cache")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoConfig

    from srt.model_loader.default_model import resolve_model_path

    model_path = resolve_model_path(args.model_path)
    vocab_size = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
    requests = make_requests(args, vocab_size)
    print(f"model {model_path}, dtype {args.dtype}, {len(requests)} requests, dataset {args.dataset_name}")

    results = [run_srt(args, model_path, requests, "srt")]
    if args.compare_radix_off:
        results.append(run_srt(args, model_path, requests, "srt --disable-radix-cache", disable_radix_cache=True))
    if args.baseline == "transformers":
        results.append(run_transformers(args, model_path, requests))
    for result in results:
        result.print()
    ours = results[0]
    ratios = {r.name: ours.total_throughput / r.total_throughput for r in results[1:]}
    for name, ratio in ratios.items():
        print(f"\nsrt / {name}: {ratio:.2f}x (total token throughput)")
    if args.output_file:
        with open(args.output_file, "a") as f:
            record = {"args": vars(args), "results": [asdict(r) for r in results], "ratios": ratios}
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
