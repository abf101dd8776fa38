"""The pooling routes on real servers: /v1/embeddings through the official openai client, /encode,
/classify, /v1/score and /v1/rerank, their answers checked against transformers' own outputs,
and bad requests answered with 400s while the server carries on."""

from __future__ import annotations

import base64
import json
import os

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoTokenizer

from server_process import running_server
from tiny_pooling_models import build_pooling_model, reference_embeddings, reference_scores

EMBEDDER, RERANKER = "tiny-embedder", "tiny-reranker"
TEXTS = ["the cat sat on the mat", "a dog", "stock prices fell sharply today", "x"]
QUERY = "where did the cat sit"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> tuple[str, str]:
    path = build_pooling_model("qwen2", str(tmp_path_factory.mktemp("embed") / "qwen2"), sentence_transformers={"pooling": "mean"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "is_matryoshka": True}, f)
    with running_server(path, "--dtype", "float32", "--served-model-name", EMBEDDER) as (base_url, _):
        yield base_url, path


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> tuple[str, str]:
    path = build_pooling_model("bert", str(tmp_path_factory.mktemp("rerank") / "bert"), head="classify", num_labels=1)
    with running_server(path, "--dtype", "float32", "--served-model-name", RERANKER) as (base_url, _):
        yield base_url, path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> tuple[str, str, str]:
    """A decoder reward model (one label) with a chat template: it scores conversations."""
    tmp = tmp_path_factory.mktemp("reward")
    path = build_pooling_model("llama", str(tmp / "llama"), head="classify", num_labels=1)
    template = tmp / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    with running_server(path, "--dtype", "float32", "--chat-template", str(template)) as (base_url, _):
        yield base_url, path, template.read_text()


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)


def _reference(path: str, texts: list[str]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return reference_embeddings(path, [tokenizer(t)["input_ids"] for t in texts], "mean")


def test_openai_client_embeddings_float_and_base64(embedder):
    base_url, path = embedder
    client = _client(base_url)
    want = _reference(path, TEXTS)
    # Without encoding_format the client asks for base64 and decodes it itself; asked for
    # base64 it hands the strings over; "float" comes back as JSON numbers.
    for encoding in (openai.NOT_GIVEN, "base64", "float"):
        batch = client.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format=encoding)
        rows = [d.embedding for d in sorted(batch.data, key=lambda d: d.index)]
        if encoding == "base64":
            rows = [np.frombuffer(base64.b64decode(row), dtype="<f4").copy() for row in rows]
        torch.testing.assert_close(torch.tensor(np.array(rows, dtype=np.float32)), want, atol=1e-4, rtol=0)
    single = client.embeddings.create(model=EMBEDDER, input=TEXTS[0])
    torch.testing.assert_close(torch.tensor(single.data[0].embedding), want[0], atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model=EMBEDDER, input=ids, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in by_ids.data]), want[:2], atol=1e-4, rtol=0)
    assert by_ids.usage.prompt_tokens == by_ids.usage.total_tokens == sum(map(len, ids))
    assert by_ids.model == EMBEDDER


def test_matryoshka_dimensions_truncate_then_normalise(embedder):
    base_url, path = embedder
    got = _client(base_url).embeddings.create(model=EMBEDDER, input=TEXTS[:2], dimensions=16, encoding_format="float")
    unnormalised = reference_embeddings(path, [AutoTokenizer.from_pretrained(path)(t)["input_ids"] for t in TEXTS[:2]], "mean", False)
    want = torch.nn.functional.normalize(unnormalised[:, :16], dim=-1)
    torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), want, atol=1e-4, rtol=0)


def test_native_encode_and_embedding_similarity_scores(embedder):
    base_url, path = embedder
    want = _reference(path, TEXTS)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        one = http.post("/encode", json={"text": TEXTS[0]}).json()
        torch.testing.assert_close(torch.tensor(one["embedding"]), want[0], atol=1e-4, rtol=0)
        assert one["meta_info"]["prompt_tokens"] > 0
        scores = http.post("/v1/score", json={"model": EMBEDDER, "text_1": QUERY, "text_2": TEXTS}).json()
        query = _reference(path, [QUERY])[0]
        cosine = [float(query @ row) for row in want]
        assert [d["score"] for d in scores["data"]] == pytest.approx(cosine, abs=1e-4)
        ranked = http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 3}).json()
        assert [r["index"] for r in ranked["results"]] == sorted(range(len(TEXTS)), key=lambda i: -cosine[i])[:3]


def test_reranker_orders_documents_as_transformers(reranker):
    base_url, path = reranker
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = [tokenizer(QUERY, doc) for doc in TEXTS]
    logits = reference_scores(path, [e["input_ids"] for e in encoded], [e["token_type_ids"] for e in encoded])[:, 0]
    relevance = torch.sigmoid(logits).tolist()
    with httpx.Client(base_url=base_url, timeout=60) as http:
        ranked = http.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": TEXTS}).json()
        assert [r["index"] for r in ranked["results"]] == sorted(range(len(TEXTS)), key=lambda i: -relevance[i])
        assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx(sorted(relevance, reverse=True), abs=1e-5)
        assert ranked["results"][0]["document"]["text"] == TEXTS[ranked["results"][0]["index"]]
        assert ranked["usage"]["total_tokens"] == sum(len(e["input_ids"]) for e in encoded)
        bare = http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 2, "return_documents": False}).json()
        assert len(bare["results"]) == 2 and "document" not in bare["results"][0]
        scores = http.post("/v1/score", json={"text_1": [QUERY] * 2, "text_2": TEXTS[:2]}).json()
        assert [d["score"] for d in scores["data"]] == pytest.approx(relevance[:2], abs=1e-5)
        classified = http.post("/classify", json={"model": RERANKER, "input": TEXTS[:2]}).json()
        direct = reference_scores(path, [tokenizer(t)["input_ids"] for t in TEXTS[:2]], [tokenizer(t)["token_type_ids"] for t in TEXTS[:2]])
        assert [d["logits"][0] for d in classified["data"]] == pytest.approx(direct[:, 0].tolist(), abs=1e-4)
        assert [d["probs"][0] for d in classified["data"]] == pytest.approx(torch.sigmoid(direct[:, 0]).tolist(), abs=1e-5)
        assert classified["data"][0]["num_classes"] == 1


def test_reward_model_scores_a_conversation(reward_model):
    base_url, path, template = reward_model
    conversation = [{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "yes, on clear days"}]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False), add_special_tokens=False)["input_ids"]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        scored = http.post("/classify", json={"messages": conversation}).json()
        assert scored["usage"]["prompt_tokens"] == len(ids)
        assert scored["data"][0]["logits"] == pytest.approx(reference_scores(path, [ids])[0].tolist(), abs=1e-4)
        both = http.post("/classify", json={"messages": conversation, "input": "x"})
        assert both.status_code == 400 and "exactly one of input and messages" in both.json()["error"]["message"]


@pytest.mark.parametrize(
    "route, body, message",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "does not generate"),
        ("/v1/completions", {"prompt": "hi"}, "does not generate"),
        ("/generate", {"text": "hi"}, "does not generate"),
        ("/classify", {"input": "hi"}, "has no labels"),
        ("/v1/embeddings", {"input": []}, "input is empty"),
        ("/v1/embeddings", {"input": [[1, 2, 999]]}, "token ids must be integers"),
        ("/v1/embeddings", {"input": "hi", "dimensions": 0}, "dimensions must be in"),
        ("/v1/embeddings", {"input": [[5] * 33000]}, "more than the"),
        ("/v1/embeddings", {"input": "hi", "model": "other"}, "does not exist"),
        ("/v1/embeddings", {"input": [1.5]}, "input"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "truncate_prompt_tokens": 4}, "truncate_prompt_tokens is not supported"),
    ],
)
def test_embedder_refuses_bad_requests(embedder, route, body, message):
    base_url, _ = embedder
    with httpx.Client(base_url=base_url, timeout=60) as http:
        response = http.post(route, json=body)
        assert response.status_code in (400, 404), response.text
        assert message in response.json()["error"]["message"]
        assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_reranker_refuses_embeddings(reranker):
    base_url, _ = reranker
    with httpx.Client(base_url=base_url, timeout=60) as http:
        response = http.post("/v1/embeddings", json={"input": "hi"})
        assert response.status_code == 400 and "which returns scores" in response.json()["error"]["message"]
        assert np.isfinite(http.post("/v1/score", json={"text_1": "a", "text_2": "b"}).json()["data"][0]["score"])
