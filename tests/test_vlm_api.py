"""Images through the OpenAI API and /generate: a real server of a tiny Qwen2-VL, spoken to
with the official openai client (base64 image parts, streaming and not) and httpx."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from server_process import running_server
from tiny_vlm_models import build_tiny_vlm, chat_text, image_uri, random_image, reference_vlm_greedy

MAX_NEW = 8
FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict:
    directory = build_tiny_vlm("qwen2_vl", str(tmp_path_factory.mktemp("vlm_api") / "qwen2_vl"))
    media = tmp_path_factory.mktemp("media")
    random_image(4).save(media / "photo.png")
    with running_server(directory, "--max-total-tokens", "2048", "--dtype", "float32", "--allowed-local-media-path", str(media), "--served-model-name", "vlm") as (url, _):
        yield {"url": url, "directory": directory, "media": media}


@pytest.fixture(scope="module")
def client(vlm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vlm['url']}/v1", api_key="none", max_retries=0)


def image_message(url: str, text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def expected_text(directory: str, image, text: str = "what is this?") -> tuple[list[int], str]:
    prompt, ids = reference_vlm_greedy(directory, chat_text(directory, 1, text), [image], MAX_NEW)
    return prompt, AutoTokenizer.from_pretrained(directory).decode(ids, skip_special_tokens=True)


def test_chat_with_a_base64_image(vlm, client) -> None:
    directory, image = vlm["directory"], random_image(0)
    prompt, want = expected_text(directory, image)
    common = {"model": "vlm", "messages": image_message(image_uri(image)), "max_tokens": MAX_NEW, "temperature": 0, "extra_body": FIXED}
    first = client.chat.completions.create(**common)
    assert first.choices[0].message.content == want
    assert first.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # The second request's prompt, its image among it, came from the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1


def test_local_file_and_native_generate(vlm, client) -> None:
    directory, image = vlm["directory"], random_image(4)
    _, want = expected_text(directory, image)
    path = str(vlm["media"] / "photo.png")
    out = client.chat.completions.create(model="vlm", messages=image_message(f"file://{path}"), max_tokens=MAX_NEW, temperature=0, extra_body=FIXED)
    assert out.choices[0].message.content == want
    body = {"text": chat_text(directory, 1, "what is this?"), "image_data": path, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, **FIXED}}
    assert httpx.post(f"{vlm['url']}/generate", json=body, timeout=60).json()["text"] == want


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot be decoded"),
        ("https://example.com/cat.png", "does not fetch images"),
        ("file:///etc/passwd", "outside --allowed-local-media-path"),
        ("ftp://example.com/cat.png", "unsupported image URL scheme"),
    ],
)
def test_bad_images_are_400s(vlm, url: str, message: str) -> None:
    body = {"model": "vlm", "messages": image_message(url), "max_tokens": 2}
    response = httpx.post(f"{vlm['url']}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "messages"
