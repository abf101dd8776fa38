"""Write a random-weight Llama as an ordinary Hugging Face folder, for benchmarks.

The default shape is the 124.7M-parameter Llama the performance goals name (hidden
768, 12 layers, 12 heads, 4 KV heads, MLP 2048, vocabulary 32000, untied head); its
tokenizer is the default model's (SmolLM2), whose first 32000 ids cover the vocabulary.
Prints the folder's path.

    MODEL=$(python scripts/make_random_llama.py --output /tmp/llama-125m)
    python scripts/bench_one_batch.py --model-path $MODEL --dtype float32
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from srt.model_loader.default_model import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="dtype of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    logging.info("%.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    # stdout carries only the path, so that `MODEL=$(python scripts/...)` works.
    print(args.output)


if __name__ == "__main__":
    main()
