"""Serve a tiny random model of every causal-LM architecture transformers has, and compare.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (or ``--types a,b,c``): build a
tiny random model (tiny_builder.py), generate greedily with transformers (eager attention,
float32) and with ``srt.Engine`` (float32), over a few prompts of which two share a prefix.
Each type runs in its own subprocess, so a crash or a hang costs only that type. Outcomes:

  ok             srt's tokens equal transformers' (a divergence only at an exact near-tie)
  mismatch       srt served other tokens: a bug
  refused        srt would not start the model, saying why
  not-buildable  transformers itself cannot build or run the type, tiny or at its own ratios
                 (proportional shrink), and srt's layer check does not refuse it first
  error / timeout / crash   anything else

    python scripts/sweep_architectures.py [--types llama,gpt_oss] [--jobs 2] [--timeout 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAX_NEW = 8
OUTCOMES = ("ok", "mismatch", "refused", "not-buildable", "error", "timeout", "crash")


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    out = [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 19)]
    out.append(out[1][:12] + [rng.randrange(3, 256) for _ in range(5)])  # shares a cached prefix with the second
    return out


def _last_error(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback (the srt child's own, where it crashed)."""
    lines = [line.strip() for line in text.splitlines() if re.match(r"\s*[\w.]*(Error|Exception): ", line)]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:400]


def _reference_greedy(model: Any, prompt: list[int]) -> list[int]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=[], pad_token_id=0)  # [] (not None): never stop early
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=MAX_NEW)
    return out[0, len(prompt) :].tolist()


def _agrees(model: Any, prompt: list[int], got: list[int], want: list[int]) -> bool:
    """Equal token for token, or diverging first at an exact near-tie of transformers' logits."""
    import torch

    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            with torch.inference_mode():
                top = model(torch.tensor([prompt + want[:i]])).logits[0, -1].topk(2)
            return set(top.indices.tolist()) == {a, b} and float(top.values[0] - top.values[1]) < 1e-4
    return len(got) == len(want)


def run_one(model_type: str, workdir: str) -> dict[str, Any]:
    """Build, reference, serve: the outcome of one model type (run inside its own process)."""
    import torch
    from transformers import AutoModelForCausalLM

    import srt
    from srt.model_loader.config import refuse_unsupported_layers
    from tiny_builder import save_tiny_model, tiny_config

    # The tiny shrink first; where transformers rejects it, the proportional one (the type's own
    # ratios), so that not-buildable means transformers cannot build or run the type at all.
    errors, config = [], None
    for shrink in ("tiny", "proportional"):
        model_dir = os.path.join(workdir, shrink)
        try:
            config = tiny_config(model_type, proportional=shrink == "proportional")
            save_tiny_model(config, model_dir)
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
            with torch.inference_mode():
                expected = [_reference_greedy(reference.eval(), p) for p in prompts()]
            break
        except Exception as e:  # noqa: BLE001 (any failure of transformers' own is the outcome)
            errors.append(f"{shrink}: {type(e).__name__}: {str(e)[:300]}")
    else:
        try:  # srt would refuse it for its layer kinds anyway: that is the outcome that matters to srt
            if config is not None:
                refuse_unsupported_layers(config)
        except ValueError as e:
            return {"outcome": "refused", "reason": f"{e} (transformers fails too: {errors[-1]})"}
        return {"outcome": "not-buildable", "reason": f"transformers fails at both shrinks; {'; '.join(errors)}"}
    try:
        engine = srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, max_prefill_tokens=24)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "refused", "reason": _last_error(str(e))}
    try:
        with engine:
            params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
            outs = engine.generate(input_ids=prompts(), sampling_params=params)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "error", "reason": _last_error(str(e))}
    got = [o["output_ids"] for o in outs]
    if all(_agrees(reference, p, g, w) for p, g, w in zip(prompts(), got, expected)):
        return {"outcome": "ok"}
    return {"outcome": "mismatch", "reason": f"srt {got} vs transformers {expected}"}


def sweep_one(model_type: str, timeout: float) -> dict[str, Any]:
    """``run_one`` in a subprocess, its result read back from a JSON file."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{model_type}-") as workdir:
        result_path = os.path.join(workdir, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--one", model_type, "--result", result_path]
        tag = uuid.uuid4().hex  # in the environment of every process the type starts, orphans included
        env = {**os.environ, _TAG: tag}
        child = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        try:
            _, stderr = child.communicate(timeout=timeout)
            if os.path.exists(result_path):
                with open(result_path) as f:
                    result = json.load(f)
            else:
                result = {"outcome": "crash", "reason": _last_error(stderr) or f"exit status {child.returncode}"}
        except subprocess.TimeoutExpired:
            result = {"outcome": "timeout", "reason": f"over {timeout:.0f}s"}
        finally:
            kill_tree(child, tag)
    return {"model_type": model_type, **result, "seconds": round(time.perf_counter() - start, 1)}


_TAG = "SRT_SWEEP_TAG"


def _tagged(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries ``tag``: the type's, whichever parent or session they ended up in."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(_TAG) == tag:
                found.append(proc)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def kill_tree(child: subprocess.Popen, tag: str) -> None:
    """Kill the type's subprocess and everything it started: its descendants (the Engine's
    children run in sessions of their own, so its process group does not reach them), each
    one's process group, and any process still carrying ``tag`` (orphaned, reparented away)."""
    procs = []
    if child.poll() is None:  # not reaped yet, so its pid is still its own
        with contextlib.suppress(psutil.NoSuchProcess):
            procs = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    procs += _tagged(tag)
    own_group = os.getpgid(0)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if (group := os.getpgid(proc.pid)) != own_group:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)
    child.communicate()
    if left := _tagged(tag):
        print(f"could not kill {[p.pid for p in left]}", file=sys.stderr)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _row(r: dict[str, Any]) -> str:
    return f"{r['model_type']:<28} {r['outcome']:<14} {r['seconds']:>6.1f}s  {r.get('reason', '')}"


def sweep(types: list[str], jobs: int = 2, timeout: float = 300, progress: bool = False) -> list[dict[str, Any]]:
    """Every type's outcome, in ``types`` order; with ``progress`` each is printed as it finishes."""

    def one(model_type: str) -> dict[str, Any]:
        result = sweep_one(model_type, timeout)
        if progress:
            print(_row(result), file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, types))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=2, help="model types run at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model type")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the per-type subprocess
        os.environ.setdefault("TRITON_INTERPRET", "1")
        result = run_one(args.one, os.path.dirname(args.result))
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    types = args.types.split(",") if args.types else causal_lm_types()
    start = time.perf_counter()
    results = sweep(types, args.jobs, args.timeout, progress=True)
    elapsed = time.perf_counter() - start
    for r in results:
        print(_row(r))
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    print(" ".join(f"{o}={n}" for o, n in counts.items() if n), f"({len(results)} types, {elapsed:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "counts": counts, "seconds": round(elapsed, 1)}, f, indent=1)


if __name__ == "__main__":
    main()
