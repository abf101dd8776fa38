"""Convert the default model (or any GGUF) into a cached Hugging Face folder.

Run it once ahead of time (in a Docker build, before a benchmark) so that the first
server start does not spend half a minute dequantizing. Prints the folder's path.

    python scripts/prepare_default_model.py
    python scripts/prepare_default_model.py --gguf path/to/model.Q4_K_M.gguf
"""

import argparse
import logging

from srt.model_loader.default_model import default_model_path, prepare_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gguf",
        metavar="PATH",
        help="a GGUF file to convert instead of the default model (SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = prepare_gguf(args.gguf) if args.gguf else default_model_path()
    # stdout carries only the path, so that `MODEL=$(python scripts/...)` works.
    print(path)


if __name__ == "__main__":
    main()
