"""Embeddings per second: srt against transformers (and sentence-transformers, from its own venv),
same weights, same texts, same machine, one run.

    python scripts/bench_embeddings.py [--model-path DIR] [--num-requests 256] [--input-len 128] \\
        [--random-range-ratio 1.0] [--dtype float32] [--st-python /path/to/venv-st/bin/python]

Without ``--model-path`` a random BERT-base-sized embedder (12 layers, hidden 768, mean pooling,
normalised, as a sentence-transformers folder) is built first. Each text is ``input-len``
tokens (or between ``random-range-ratio`` times that and that). Rounds alternate between
the systems (``--rounds``, after a warm-up of each) and the median is reported, since one
run on a shared 2-core machine varies by 15-20%.

- srt: ``srt.Engine.encode`` of all texts at once (the scheduler batches them).
- transformers: ``AutoModel`` with SDPA attention in batches of ``--batch-size``, mean pooled
  and normalised: what sentence-transformers computes, without its wrapper.
- sentence-transformers (with ``--st-python``, a venv that has it installed: it is never a
  dependency of srt): ``SentenceTransformer.encode(texts, batch_size=...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

logger = logging.getLogger("bench_embeddings")

_BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)

# Run by --st-python: times SentenceTransformer.encode over the texts, prints the times as JSON.
_ST_PROGRAM = """
import json, sys, time, torch
from sentence_transformers import SentenceTransformer
path, texts, batch, rounds, dtype = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": getattr(torch, dtype), "attn_implementation": "sdpa"})
model.encode(texts[:batch], batch_size=batch)
times = []
for _ in range(rounds):
    start = time.perf_counter()
    out = model.encode(texts, batch_size=batch, convert_to_numpy=True)
    times.append(time.perf_counter() - start)
json.dump({"times": times, "first": out[0].tolist()}, sys.stdout)
"""


def build_model(directory: str) -> str:
    from tiny_pooling_models import build_pooling_model

    return build_pooling_model("bert", directory, sentence_transformers={"pooling": "mean"}, **_BERT_BASE, initializer_range=0.02)


def random_texts(n: int, tokens: int, range_ratio: float = 1.0, seed: int = 0) -> list[str]:
    """Texts of ``range_ratio * tokens`` to ``tokens`` tokens (uniformly, SGLang's random dataset's
    rule) for the byte tokenizer of the built model: [CLS] + bytes + [SEP]."""
    rng = random.Random(seed)
    lengths = [rng.randint(max(int(tokens * range_ratio), 3), tokens) for _ in range(n)]
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length - 2)) for length in lengths]


class TransformersEmbedder:
    def __init__(self, path: str, dtype: torch.dtype, batch_size: int) -> None:
        self.model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Batches of texts sorted by length, as sentence-transformers forms them; rows in input order."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rows = torch.empty(len(texts), self.model.config.hidden_size)
        for i in range(0, len(texts), self.batch_size):
            chosen = order[i : i + self.batch_size]
            batch = self.tokenizer([texts[j] for j in chosen], padding=True, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows[chosen] = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return rows


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=1.0, help="texts of ratio x input-len to input-len tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="the baselines' batch size (sentence-transformers' default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--st-python", help="python of a venv with sentence-transformers installed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import srt

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or build_model(os.path.join(tmp, "bert-base-random"))
        texts = random_texts(args.num_requests, args.input_len, args.random_range_ratio)
        dtype = getattr(torch, args.dtype)
        baseline = TransformersEmbedder(path, dtype, args.batch_size)
        times: dict[str, list[float]] = {"srt": [], "transformers": []}
        with srt.Engine(model_path=path, dtype=args.dtype, log_level="warning") as engine:
            engine.encode(prompt=texts[: args.batch_size])
            baseline.encode(texts[: args.batch_size])
            for _ in range(args.rounds):
                seconds, results = timed(engine.encode, texts)
                times["srt"].append(seconds)
                seconds, reference = timed(baseline.encode, texts)
                times["transformers"].append(seconds)
        got = torch.tensor([r["embedding"] for r in results])
        tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
        del baseline  # its memory, before sentence-transformers loads its own copy
        if args.st_python:
            with open(os.path.join(tmp, "texts.json"), "w") as f:
                json.dump(texts, f)
            run = subprocess.run(
                [args.st_python, "-c", _ST_PROGRAM, path, f.name, str(args.batch_size), str(args.rounds), args.dtype],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            st = json.loads(run.stdout)
            times["sentence-transformers"] = st["times"]
            st_first = torch.tensor(st["first"])
    print(f"\n{args.num_requests} requests, {tokens // len(results)} tokens on average, {args.dtype}, median of {args.rounds} rounds")
    print(f"max |srt - transformers| over all embeddings: {(got - reference).abs().max().item():.2e}")
    if args.st_python:
        print(f"max |srt - sentence-transformers| (first embedding): {(got[0] - st_first).abs().max().item():.2e}")
    print(f"{'system':<24}{'wall s':>9}{'emb/s':>9}{'srt speed-up':>14}")
    srt_s = statistics.median(times["srt"])
    for system, runs in times.items():
        median = statistics.median(runs)
        print(f"{system:<24}{median:>9.2f}{len(texts) / median:>9.1f}{median / srt_s:>13.2f}x")


if __name__ == "__main__":
    main()
