"""lm-eval against a real `python -m srt.launch` server gives the same answers as lm-eval's
own `hf` backend on the same weights.

Two tiny local tasks (tests/lm_eval_tasks/: YAML + JSONL) are run twice: once with
`--model hf` (transformers, float32, CPU) and once with `--model local-completions` pointed
at an srt server holding the same tiny random llama in float32. For each task we assert
that the metric is equal and, stronger, that every sample's response is equal:

* generate_until (exact_match): the same generated text for every doc (greedy, `until` and
  `max_gen_toks` honoured by the server's stop strings and max_tokens);
* multiple_choice (acc): the same loglikelihood (within 1e-3) and the same is_greedy flag for
  every choice. lm-eval gets these from /v1/completions with `echo: true, logprobs: 1,
  max_tokens: 1`, i.e. from the prompt's logprobs; a direct test of that contract is here too.

Everything is local and offline: the model is built in tmp_path, the data are JSONL files,
and lm-eval runs in a subprocess with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and HF_HOME in
tmp_path (a subprocess also keeps lm-eval's imports, logging and env out of this process).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from server_process import running_server
from tiny_models import build_tiny_model, load_reference

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MC, GEN = "srt_tiny_mc", "srt_tiny_gen"
LL_TOLERANCE = 1e-3

# Runs lm-eval in a fresh interpreter: argv = model, model_args, tasks (comma separated), out.
# Writes {task: {"metrics": {...}, "samples": [{"doc_id", "filtered_resps"}, ...]}}.
RUNNER = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

model, model_args, tasks, out = sys.argv[1:]
results = lm_eval.simple_evaluate(
    model=model,
    model_args=model_args,
    tasks=tasks.split(","),
    task_manager=TaskManager(include_path=".", include_defaults=False),
    device="cpu",
    batch_size=1,
    log_samples=True,
    bootstrap_iters=0,
)
summary = {
    task: {
        "metrics": {k: v for k, v in results["results"][task].items() if k != "alias"},
        "samples": [
            {"doc_id": s["doc_id"], "filtered_resps": s["filtered_resps"]}
            for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
        ],
    }
    for task in tasks.split(",")
}
with open(out, "w") as f:
    json.dump(summary, f, default=float)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm_eval")


@pytest.fixture(scope="module")
def model_dir(workdir) -> str:
    return build_tiny_model("llama", str(workdir / "llama"))


@pytest.fixture(scope="module")
def tasks_dir(workdir) -> Path:
    """A copy of tests/lm_eval_tasks: lm-eval runs from inside it (relative data_files) and
    may write there without touching the repository."""
    return Path(shutil.copytree(TASKS_DIR, workdir / "tasks"))


def run_lm_eval(workdir: Path, tasks_dir: Path, model: str, model_args: str, tasks: list[str]) -> dict:
    out = workdir / f"{model}-{'-'.join(tasks)}.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf_home"),  # nothing cached from elsewhere, nothing left behind
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-c", RUNNER, model, model_args, ",".join(tasks), str(out)]
    proc = subprocess.run(cmd, cwd=tasks_dir, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"lm-eval --model {model} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf_results(workdir, tasks_dir, model_dir) -> dict:
    return run_lm_eval(workdir, tasks_dir, "hf", f"pretrained={model_dir},dtype=float32", [MC, GEN])


@pytest.fixture(scope="module")
def server(model_dir) -> tuple[str, str]:
    """(base_url, served model name as /v1/models reports it)."""
    with running_server(model_dir, "--dtype", "float32", "--max-total-tokens", "4096") as (base_url, _):
        (card,) = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"]
        yield base_url, card["id"]


def srt_results(workdir, tasks_dir, model_dir, server, task: str) -> dict:
    base_url, served_name = server
    model_args = ",".join(
        [
            f"model={served_name}",
            f"base_url={base_url}/v1/completions",
            f"tokenizer={model_dir}",
            "tokenizer_backend=huggingface",  # skip the /tokenizer_info probe
            "tokenized_requests=True",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    return run_lm_eval(workdir, tasks_dir, "local-completions", model_args, [task])


def test_generate_until_matches_hf(workdir, tasks_dir, model_dir, server, hf_results):
    srt = srt_results(workdir, tasks_dir, model_dir, server, GEN)[GEN]
    hf = hf_results[GEN]
    assert [s["filtered_resps"] for s in srt["samples"]] == [s["filtered_resps"] for s in hf["samples"]]
    assert len(hf["samples"]) >= 10
    assert srt["metrics"]["exact_match,none"] == hf["metrics"]["exact_match,none"]


def test_multiple_choice_matches_hf(workdir, tasks_dir, model_dir, server, hf_results):
    srt = srt_results(workdir, tasks_dir, model_dir, server, MC)[MC]
    hf = hf_results[MC]
    assert len(srt["samples"]) == len(hf["samples"]) >= 10
    for s, h in zip(srt["samples"], hf["samples"]):
        assert s["doc_id"] == h["doc_id"]
        # filtered_resps: one (loglikelihood, is_greedy) per choice
        assert len(s["filtered_resps"]) == len(h["filtered_resps"])
        for (s_ll, s_greedy), (h_ll, h_greedy) in zip(s["filtered_resps"], h["filtered_resps"]):
            assert s_ll == pytest.approx(h_ll, abs=LL_TOLERANCE), f"doc {s['doc_id']}"
            assert s_greedy == h_greedy, f"doc {s['doc_id']}"
    assert srt["metrics"]["acc,none"] == hf["metrics"]["acc,none"]


def test_echo_logprobs_cover_the_prompt_then_the_generated_token(server, model_dir):
    """The contract local-completions relies on, sent as lm-eval sends it (see its
    `_create_payload`): with `echo`, `text` and `tokens / token_logprobs / top_logprobs` hold
    the prompt, then the one generated token; the first prompt token has null logprob and null
    top_logprobs; the other prompt logprobs are transformers'; the greedy token's logprob is
    exactly the top one (lm-eval's is_greedy compares them with ==)."""
    base_url, served_name = server
    text = "Q: Ice is\nA: cold"
    prompt = list(text.encode())  # byte tokenizer: token id = byte value
    payload = {"model": served_name, "prompt": [prompt], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(f"{base_url}/v1/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["text"].startswith(text)
    logprobs = choice["logprobs"]
    n = len(prompt) + 1
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == n
    assert "".join(logprobs["tokens"][: len(prompt)]) == text
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None

    with torch.inference_mode():
        logits = load_reference(model_dir)(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert logprobs["token_logprobs"][1 : len(prompt)] == pytest.approx(expected.tolist(), abs=LL_TOLERANCE)
    for token_logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert top and all(math.isfinite(v) for v in top.values())
        assert max(top.values()) >= token_logprob - 1e-6  # the top-1 is at least the actual token
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())  # greedy
