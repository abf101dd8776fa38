"""Prompt logprobs: what transformers' own forward gives, through the native API
(``return_logprob`` with ``logprob_start_len``) and the OpenAI API (``echo`` with ``logprobs``),
with the prompt already in the radix cache and with chunked prefill."""

from __future__ import annotations

import httpx
import pytest
import torch

import srt
from server_process import running_server
from srt.entrypoints.results import collect
from srt.runtime.generate_request import GenerateReqInput
from tiny_models import build_tiny_model, load_reference

PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def reference(model_dir) -> torch.Tensor:
    """log_softmax of a plain float32 forward over PROMPT: row p scores token p + 1."""
    with torch.inference_mode():
        logits = load_reference(model_dir)(torch.tensor([PROMPT])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def expected(reference: torch.Tensor, start: int) -> list[float | None]:
    return [None if p == 0 else reference[p - 1, PROMPT[p]].item() for p in range(start, len(PROMPT))]


@pytest.mark.parametrize("options", [{}, {"chunked_prefill_size": 7}], ids=["whole", "chunked"])
def test_native_prompt_logprobs_match_transformers_with_the_prompt_cached(model_dir, reference, options):
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, **options) as engine:
        engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2})  # now the prompt is cached
        tm = engine.tokenizer_manager
        for start in (0, 1, 5, len(PROMPT) - 1):
            obj = GenerateReqInput(
                input_ids=PROMPT,
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                logprob_start_len=start,
                top_logprobs_num=3,
            )
            (result,) = engine._call(collect(tm, tm.check(obj)))
            meta = result.to_dict()["meta_info"]
            got = meta["input_token_logprobs"]
            assert [t for _, t in got] == PROMPT[start:]
            assert [lp for lp, _ in got] == pytest.approx(expected(reference, start), abs=1e-4)
            tops = meta["input_top_logprobs"]
            for p, top in zip(range(start, len(PROMPT)), tops):
                if p == 0:
                    assert top is None
                else:
                    assert [t for t, _ in top] == reference[p - 1].topk(3).indices.tolist()
        plain = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2}, return_logprob=True)
        assert "input_token_logprobs" not in plain["meta_info"]  # logprob_start_len -1: output logprobs only
        with pytest.raises(ValueError, match="logprob_start_len"):
            tm.check(GenerateReqInput(input_ids=PROMPT, return_logprob=True, logprob_start_len=len(PROMPT)))
        assert engine.get_internal_state().running_requests == 0


def test_echo_with_logprobs_gives_the_prompt_first(model_dir, reference):
    with running_server(model_dir, "--dtype", "float32", "--max-total-tokens", "1024") as (base_url, _):
        for max_tokens in (0, 1):
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": 2, "temperature": 0}
            response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            (choice,) = response.json()["choices"]
            logprobs = choice["logprobs"]
            assert len(logprobs["tokens"]) == len(PROMPT) + max_tokens
            prompt_lps = logprobs["token_logprobs"][: len(PROMPT)]
            assert prompt_lps[0] is None and logprobs["top_logprobs"][0] is None
            assert prompt_lps[1:] == pytest.approx(expected(reference, 1), abs=1e-4)
            assert choice["text"].startswith("".join(logprobs["tokens"][: len(PROMPT)]))
        text = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hello", "max_tokens": 2, "echo": True}, timeout=60)
        assert text.json()["choices"][0]["text"].startswith("hello")
