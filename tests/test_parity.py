"""srt generates what transformers generates: greedy tokens equal, logprobs within 1e-4.

Each architecture is a tiny random model; the batch mixes prompt lengths, shares a
prefix between two prompts, and admits prompts over several steps (a small prefill
budget) so that new prompts join while others decode.
"""

from __future__ import annotations

import random

import pytest
import torch

import srt
from tiny_models import ARCHITECTURES, VOCAB, build_tiny_model, load_reference, reference_greedy

MAX_NEW = 10


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 23, 31, 3)]
    prompts.append(prompts[1][:15] + [rng.randrange(3, VOCAB) for _ in range(6)])  # shares a prefix
    return prompts


@torch.inference_mode()
def assert_greedy_equal(reference, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Token for token equal, except that a divergence is allowed at an exact near-tie of the
    reference (top-2 logits within 1e-4), where float rounding legitimately decides; the
    sequences are not compared after that point."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        logits = reference(torch.tensor([prompt + want[:i]])).logits[0, -1]
        top2 = logits.topk(2)
        assert set(top2.indices.tolist()) == {a, b} and float(top2.values[0] - top2.values[1]) < 1e-4, (
            f"diverged at output token {i}: got {got}, transformers {want}"
        )
        return


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model_dir(request, tmp_path_factory) -> str:
    return build_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_greedy_matches_transformers(model_dir):
    prompts = make_prompts()
    reference = load_reference(model_dir)
    expected = [reference_greedy(reference, p, MAX_NEW) for p in prompts]
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, max_prefill_tokens=40) as engine:
        outs = engine.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
        )
    for prompt, out, want in zip(prompts, outs, expected):
        assert_greedy_equal(reference, prompt, out["output_ids"], want)
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(p) for p in prompts]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_logprobs_match_log_softmax(model_type, tmp_path):
    model_dir = build_tiny_model(model_type, str(tmp_path))
    prompt = make_prompts()[1]
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=512) as engine:
        out = engine.generate(
            input_ids=prompt,
            sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
            return_logprob=True,
            top_logprobs_num=3,
        )
    reference = load_reference(model_dir)
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + out["output_ids"]])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    chosen = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
    want = expected.gather(-1, torch.tensor(out["output_ids"])[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(chosen), want, atol=1e-4)
    for row, top in zip(expected, out["meta_info"]["output_top_logprobs"]):
        values, ids = row.topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=1e-4)


def test_model_without_attention_backend_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    from tiny_models import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="BloomForCausalLM does not route its attention"):
        srt.Engine(model_path=str(tmp_path), max_total_tokens=64)
