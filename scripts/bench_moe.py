"""Decode-step time of a small MoE model with srt's experts against transformers' own.

One random Qwen3-MoE (8 experts, top-2, hidden 512 by default) and the same weights run
through each experts implementation in turn (``eager``: one F.linear per active expert;
``grouped_mm``: transformers' grouped GEMM; ``srt``: srt.layers.moe, on the kernel the
platform picks for the device). Everything else (attention, KV cache) is transformers'
own, so the ratios are those of the MoE layers alone, diluted by the rest of the step.

    python scripts/bench_moe.py --batch-sizes 1 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from srt.layers.moe.experts import EXPERTS_IMPLEMENTATION, is_experts_module, shard_experts
from srt.platform import device as devices
from srt.platform.distributed import TPGroup

logger = logging.getLogger("bench_moe")
IMPLEMENTATIONS = ("eager", "grouped_mm", EXPERTS_IMPLEMENTATION)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    # srt's experts hold the very same weights: at one rank the weight_loader copies them whole.
    kernel = devices.experts_kernel(device)
    for module in model.modules():
        if is_experts_module(module):
            weights = {name: getattr(module, name).detach().clone() for name in ("gate_up_proj", "down_proj")}
            shard_experts(module, dtype, device, TPGroup(), 1, kernel)
            for name, tensor in weights.items():
                getattr(module, name).weight_loader(getattr(module, name), tensor)
    return model


@torch.inference_mode()
def decode_step_ms(model: torch.nn.Module, batch: int, prompt_len: int, steps: int, device: torch.device) -> float:
    """Best time of one decode step (one new token for each of ``batch`` sequences) after a
    prefill: the least disturbed by other processes on a shared machine."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    cache = DynamicCache(config=model.config)
    next_ids = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        if device.type != "cpu":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        next_ids = model(input_ids=next_ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        next_ids.cpu()  # the sampled token reaches the host, as in serving
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="the implementations take turns this many times")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, None, device)
    model = build_model(args, device, dtype)
    logger.info("qwen3_moe %d layers, %d experts top-%d, hidden %d, expert intermediate %d, %s on %s (%s kernel)",
                args.layers, args.experts, args.top_k, args.hidden, args.intermediate, dtype, device,
                devices.experts_kernel(device))  # fmt: skip
    for batch in args.batch_sizes:
        ms = dict.fromkeys(IMPLEMENTATIONS, float("inf"))
        for _ in range(args.rounds):  # in turns, so that a noisy phase of the machine hits them all
            for name in IMPLEMENTATIONS:
                model.set_experts_implementation(name)
                ms[name] = min(ms[name], decode_step_ms(model, batch, args.prompt_len, args.steps, device))
        ours = ms[EXPERTS_IMPLEMENTATION]
        logger.info(
            "batch %3d: best decode step %s | eager/srt %.2fx, grouped_mm/srt %.2fx",
            batch,
            ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()),
            ms["eager"] / ours,
            ms["grouped_mm"] / ours,
        )


if __name__ == "__main__":
    main()
