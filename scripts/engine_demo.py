"""Generate with the default model (or --model-path) through srt.Engine and print the results."""

import argparse
import logging

import srt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("prompts", nargs="*", default=["The capital of France is", "Once upon a time,"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with srt.Engine(model_path=args.model_path) as engine:
        outs = engine.generate(args.prompts, {"temperature": 0, "max_new_tokens": args.max_new_tokens})
    for prompt, out in zip(args.prompts, outs):
        print(f"{prompt!r} -> {out['text']!r}")


if __name__ == "__main__":
    main()
