"""Multi-LoRA throughput: the same requests through the base model alone, and spread over
several adapters mixed in every batch, in one run (the ratio is what serving adapters costs).

    MODEL=$(python scripts/make_random_llama.py --output /tmp/llama-125m)
    python scripts/bench_lora.py --model-path $MODEL --dtype bfloat16 --num-adapters 8 --rank 16

The adapters are random PEFT adapters of ``--rank`` on every linear layer (``all-linear``),
written with PEFT itself. Configurations run in alternating rounds (``--rounds``) so that a
noisy neighbour slows all alike; the median of each is reported:

- ``base``: srt without ``--enable-lora``;
- ``lora on, base requests``: ``--enable-lora`` with the adapters loaded, no request using one;
- ``N adapters mixed``: request i uses adapter i mod N (every batch holds all N).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

import torch

from bench_offline import Request, make_requests, run_srt


def write_adapters(model_path: str, directory: str, count: int, rank: int) -> list[str]:
    """``count`` random PEFT adapters of ``model_path`` (A and B drawn like PEFT's init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        path = os.path.join(directory, f"adapter{i}")
        get_peft_model(model, config).save_pretrained(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="a transformers folder (make_random_llama.py writes one)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--random-input-len", type=int, default=128)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.dataset_name, args.max_total_tokens = "fixed", None
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(args.model_path).vocab_size
    requests: list[Request] = make_requests(args, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(args.model_path, tmp, args.num_adapters, args.rank)
        names = [f"adapter{i}" for i in range(args.num_adapters)]
        lora = {"lora_paths": [f"{n}={p}" for n, p in zip(names, paths)], "max_loras_per_batch": args.num_adapters}
        mixed = [names[i % len(names)] for i in range(len(requests))]
        configs = {
            "base": ({}, None),
            "lora on, base requests": (lora, None),
            f"{args.num_adapters} adapters mixed": (lora, mixed),
        }
        runs: dict[str, list] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, (overrides, lora_path) in configs.items():
                runs[name].append(run_srt(args, args.model_path, requests, name, lora_path=lora_path, **overrides))
    print(f"model {args.model_path}, {args.dtype}, {len(requests)} requests x {args.random_input_len} in / "
          f"{args.random_output_len} out, {args.num_adapters} adapters of rank {args.rank} (all-linear), {args.rounds} rounds")  # fmt: skip
    base = statistics.median(r.total_throughput for r in runs["base"])
    print(f"{'configuration':<28} {'total tok/s (median)':>22} {'runs':>20} {'vs base':>8}")
    for name, results in runs.items():
        median = statistics.median(r.total_throughput for r in results)
        each = " ".join(f"{r.total_throughput:.0f}" for r in results)
        print(f"{name:<28} {median:>22.1f} {each:>20} {median / base:>7.2f}x")


if __name__ == "__main__":
    main()
