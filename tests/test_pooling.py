"""Pooling models through the runtime (srt.Engine.encode) against transformers on the same weights.

Decoders (last-token and mean pooling, a causal-LM checkpoint served with --is-embedding, a
sequence classifier) run through the paged runtime, here with prompts chunked across steps
and a cached prefix; encoders (BERT, RoBERTa, ModernBERT) run whole and padded. Every
output must equal transformers' own within 1e-4 in float32, for a batch of mixed lengths,
at TP 1 and TP 2.
"""

from __future__ import annotations

import pytest
import torch

import srt
from tiny_models import build_tiny_model
from tiny_pooling_models import CLS, SEP, build_pooling_model, reference_embeddings, reference_scores

# Mixed lengths, the longest spread over several chunks (chunked_prefill_size below); the
# second shares a 24-token prefix with the first.
PREFIX = list(range(30, 54))
INPUTS = [PREFIX + [60, 61, 62], PREFIX + [70, 71], [80, 81, 82, 83, 84], [90], list(range(100, 140))]
CHUNKED = dict(chunked_prefill_size=16, max_prefill_tokens=16)
ATOL = 1e-4


def _encoder_inputs() -> list[list[int]]:
    """The inputs framed as an encoder's tokenizer frames them ([CLS] ... [SEP])."""
    return [[CLS, *ids, SEP] for ids in INPUTS]


# name -> (build(directory) -> path, pooling of the reference, engine options, inputs)
DECODER_CASES = {
    "llama-last": (lambda d: build_pooling_model("llama", d), "last", CHUNKED),
    "qwen2-mean": (lambda d: build_pooling_model("qwen2", d, sentence_transformers={"pooling": "mean"}), "mean", CHUNKED),
    "llama-causal-lm": (lambda d: build_tiny_model("llama", d), "last", {"is_embedding": True, **CHUNKED}),
}
ENCODER_CASES = {
    # A budget of 64 padded tokens: the oldest input with the shortest others that fit
    # ([29, 3], [28, 7], [42] tokens, padded).
    "bert-cls": (lambda d: build_pooling_model("bert", d), "cls", {"max_prefill_tokens": 64}),
    "roberta-mean": (lambda d: build_pooling_model("roberta", d, sentence_transformers={"pooling": "mean"}), "mean", {}),
    "modernbert-mean": (lambda d: build_pooling_model("modernbert", d, sentence_transformers={"pooling": "mean", "normalize": False}), "mean", {}),
}


def _check_refusals(engine: srt.Engine) -> None:
    """An embedding Engine refuses generation and bad inputs by name, and carries on."""
    with pytest.raises(ValueError, match="does not generate"):
        engine.generate(input_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="not trained for truncated embeddings"):
        engine.encode(input_ids=[1, 2, 3], dimensions=8)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 256\)"):
        engine.encode(input_ids=[1, 2, 300])
    assert len(engine.encode(input_ids=[1, 2, 3])["embedding"]) == 64


def _encode(path: str, inputs: list[list[int]], check_refusals: bool = False, **options) -> tuple[torch.Tensor, list[dict]]:
    with srt.Engine(model_path=path, dtype="float32", **options) as engine:
        results = engine.encode(input_ids=inputs)
        again = engine.encode(input_ids=inputs[:2])  # now the shared prefix is in the cache
        if check_refusals:
            _check_refusals(engine)
    return torch.tensor([r["embedding"] for r in results]), results + again


# Every case at TP 1; at TP 2 one decoder (sharded by its plan) and one encoder (replicated on
# each rank): the other cases split, or replicate, the same way.
EMBEDDING_RUNS = [(case, 1) for case in [*DECODER_CASES, *ENCODER_CASES]] + [("llama-last", 2), ("bert-cls", 2)]


@pytest.mark.parametrize("case,tp", EMBEDDING_RUNS)
def test_embeddings_match_transformers(case, tp, tmp_path):
    build, pooling, options = {**DECODER_CASES, **ENCODER_CASES}[case]
    path = build(str(tmp_path / case))
    inputs = _encoder_inputs() if case in ENCODER_CASES else INPUTS
    got, results = _encode(path, inputs, check_refusals=case == "llama-last" and tp == 1, tp_size=tp, **options)
    normalize = case != "modernbert-mean"
    want = reference_embeddings(path, inputs, pooling, normalize)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(inputs)), atol=1e-5, rtol=0)
    repeated = torch.tensor([r["embedding"] for r in results[len(inputs) :]])
    torch.testing.assert_close(repeated, got[:2], atol=ATOL, rtol=0)
    cached = [r["meta_info"]["cached_tokens"] for r in results[len(inputs) :]]
    if case in ("llama-last", "llama-causal-lm"):
        assert min(cached) >= len(PREFIX), cached  # last-token pooling reuses the cached prefix
    else:
        assert cached == [0, 0], cached  # mean pooling and encoders compute every token


def test_masked_lm_checkpoint_served_with_is_embedding(tmp_path):
    """A BERT MLM checkpoint (no pooler weights, an LM head to ignore) embeds from its base model."""
    path = build_pooling_model("bert", str(tmp_path / "mlm"), head="masked_lm")
    inputs = _encoder_inputs()
    got, _ = _encode(path, inputs, is_embedding=True)
    torch.testing.assert_close(got, reference_embeddings(path, inputs, "cls"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type,tp", [("llama", 1), ("bert", 1), ("llama", 2)])  # the decoder's head at TP 2
def test_classifier_scores_match_transformers(model_type, tp, tmp_path):
    path = build_pooling_model(model_type, str(tmp_path / model_type), head="classify", num_labels=3)
    inputs = _encoder_inputs() if model_type == "bert" else INPUTS
    options = CHUNKED if model_type == "llama" else {}
    with srt.Engine(model_path=path, dtype="float32", tp_size=tp, **options) as engine:
        got = torch.tensor([r["embedding"] for r in engine.encode(input_ids=inputs)])
    torch.testing.assert_close(got, reference_scores(path, inputs), atol=ATOL, rtol=0)
