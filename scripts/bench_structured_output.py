"""What grammar-constrained decoding costs: the decode step with every request of the batch
constrained by a JSON schema against the same batch unconstrained, plus the compile time
of the schemas and the per-step mask fill.

The decode step is measured through ``srt.Engine`` (the whole runtime, the model the server
serves by default) as the slope of batch time over generated tokens: two runs of each
kind, ``--short`` and ``--long`` tokens per request, so prefill, compilation and start-up
cancel out; the median over alternating rounds. The constrained schema is an array that
cannot close within ``--long`` tokens, so every request decodes to the end, as the
unconstrained ones do with ignore_eos.

    python scripts/bench_structured_output.py [--batch 32] [--grammar-backend xgrammar]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import srt
from srt.model_loader.default_model import resolve_model_path
from srt.model_loader.tokenizer import load_tokenizer
from srt.sampling.grammar.backend import GrammarKey, create_grammar_backend

logger = logging.getLogger("bench_structured_output")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}
# The schema the decode runs use: it cannot end before minItems people.
PEOPLE = {"type": "array", "items": PERSON, "minItems": 1000}
COMPILED = {
    "person": PERSON,
    "people": PEOPLE,
    "order": {
        "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}},
        "type": "object",
        "properties": {"id": {"type": "string"}, "items": {"type": "array", "items": {"$ref": "#/$defs/item"}}, "total": {"type": "number"}},
        "required": ["id", "items"],
    },
    "choice": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}, {"type": "null"}]},
}


def compile_times(args: argparse.Namespace, model_path: str) -> None:
    tokenizer = load_tokenizer(model_path, trust_remote_code=False)
    start = time.perf_counter()
    backend = create_grammar_backend(args.grammar_backend, tokenizer, len(tokenizer), [tokenizer.eos_token_id], True)
    print(f"{args.grammar_backend}: tokenizer set-up {1000 * (time.perf_counter() - start):.0f} ms (once, at server start)")
    for name, schema in COMPILED.items():
        start = time.perf_counter()
        compiled = backend.compile(GrammarKey("json_schema", json.dumps(schema)))
        compile_ms = 1000 * (time.perf_counter() - start)
        matchers = [backend.matcher(compiled, [tokenizer.eos_token_id]) for _ in range(args.batch)]
        bitmask = backend.allocate_bitmask(args.batch)
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)
        fill_ms = 1000 * (time.perf_counter() - start)
        print(f"  schema {name:<7} compile {compile_ms:7.1f} ms | first mask of {args.batch} requests {fill_ms:6.2f} ms")


def decode_steps_ms(engine: srt.Engine, args: argparse.Namespace) -> tuple[float, float]:
    """Median decode-step slope of the unconstrained and the constrained batch. The two kinds
    alternate round by round after a warm-up of each, so that the machine's drift (single
    runs vary by 15% here) falls on both alike."""
    prompts = [f"List {1000 + i} people as JSON records with name, age and email:" for i in range(args.batch)]

    def batch_seconds(tokens: int, constrained: bool) -> float:
        params = {"temperature": 1.0, "max_new_tokens": tokens, "ignore_eos": True}
        if constrained:
            params["json_schema"] = json.dumps(PEOPLE)
        params_per_request = [{**params, "seed": i} for i in range(args.batch)]
        start = time.perf_counter()
        outs = engine.generate(prompts, params_per_request)
        elapsed = time.perf_counter() - start
        assert all(o["meta_info"]["completion_tokens"] == tokens for o in outs), "a request ended early"
        return elapsed

    slopes: dict[bool, list[float]] = {False: [], True: []}
    for constrained in (False, True):
        batch_seconds(args.short, constrained)
    for _ in range(args.rounds):
        for constrained in (False, True):
            short, long = batch_seconds(args.short, constrained), batch_seconds(args.long, constrained)
            slopes[constrained].append(1000 * (long - short) / (args.long - args.short))
    return statistics.median(slopes[False]), statistics.median(slopes[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the default model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grammar-backend", default="xgrammar", choices=["xgrammar", "llguidance"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_path = resolve_model_path(args.model_path)
    compile_times(args, model_path)
    engine = srt.Engine(model_path=model_path, grammar_backend=args.grammar_backend, log_level="warning")
    try:
        plain, constrained = decode_steps_ms(engine, args)
    finally:
        engine.shutdown()
    overhead = 100 * (constrained / plain - 1)
    print(f"batch {args.batch} decode step: unconstrained {plain:.2f} ms, JSON-schema constrained {constrained:.2f} ms")
    print(f"grammar overhead: {overhead:+.1f}% of the step ({constrained - plain:+.2f} ms)")
    print(f"(median of {args.rounds} alternating rounds; slopes between {args.short} and {args.long} tokens per request)")


if __name__ == "__main__":
    main()
