"""LoRA adapters over HTTP: chosen by OpenAI model name (the adapter's, or base:adapter) or by
native ``lora_path``, listed by /v1/models, loaded and unloaded while the server runs."""

from __future__ import annotations

import httpx
import openai
import pytest

from server_process import running_server
from test_lora import GREEDY, MAX_NEW, lora_model, prompts  # noqa: F401 (lora_model is a fixture)

BASE = "tiny"


@pytest.fixture(scope="module")
def server(lora_model) -> str:  # noqa: F811
    paths = lora_model["paths"]
    args = ("--dtype", "float32", "--served-model-name", BASE, "--max-loras-per-batch", "2", "--max-lora-rank", "8")
    with running_server(lora_model["model_dir"], *args, "--lora-paths", f"attn={paths['attn']}", paths["mlp"]) as (base_url, _):
        yield base_url


def test_models_lists_the_adapters(server, lora_model) -> None:  # noqa: F811
    cards = {card["id"]: card for card in httpx.get(f"{server}/v1/models").json()["data"]}
    mlp_path = lora_model["paths"]["mlp"]
    assert set(cards) == {BASE, "attn", mlp_path}  # a bare path is its own name
    assert cards["attn"]["parent"] == BASE and cards["attn"]["root"] == lora_model["paths"]["attn"]


def test_openai_client_selects_the_adapter_by_model_name(server, lora_model) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    prompt = prompts()[1]
    extra = {"ignore_eos": True}
    native = httpx.post(f"{server}/generate", json={"input_ids": prompt, "sampling_params": GREEDY, "lora_path": "attn"}, timeout=60).json()
    assert native["output_ids"] == lora_model["expected"]["attn"][1][1]
    for model in ("attn", f"{BASE}:attn"):
        out = client.completions.create(model=model, prompt=[prompt], max_tokens=MAX_NEW, temperature=0, extra_body=extra)
        assert out.model == model and out.choices[0].text == native["text"]
    streamed = client.completions.create(model="attn", prompt=[prompt], max_tokens=MAX_NEW, temperature=0, extra_body=extra, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == native["text"]
    base = client.completions.create(model=BASE, prompt=[prompt], max_tokens=MAX_NEW, temperature=0, extra_body=extra)
    assert base.choices[0].text != native["text"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{BASE}:nope", prompt=[prompt], max_tokens=1)


def test_load_and_unload_over_http(server, lora_model) -> None:  # noqa: F811
    with httpx.Client(base_url=server, timeout=60) as http:
        # The slots were made for the start-up adapters' modules: "all" also adapts k_proj and up_proj.
        response = http.post("/load_lora_adapter", json={"lora_name": "all", "lora_path": lora_model["paths"]["all"]})
        assert response.status_code == 400 and "not in --lora-target-modules" in response.json()["error"]["message"]
        response = http.post("/load_lora_adapter", json={"lora_name": "again", "lora_path": lora_model["paths"]["attn"]})
        assert response.status_code == 200 and "again" in response.json()["loaded_adapters"], response.text
        body = {"input_ids": prompts()[0], "sampling_params": GREEDY}
        assert http.post("/generate", json={**body, "model": "again"}).json()["output_ids"] == lora_model["expected"]["attn"][1][0]
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
        assert response.status_code == 400 and "adapter_config.json" in response.json()["error"]["message"]
        assert http.post("/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
        assert response.status_code == 404, response.text
        response = http.post("/generate", json={**body, "lora_path": "again"})
        assert response.status_code == 400 and "not loaded" in response.json()["error"]["message"]
