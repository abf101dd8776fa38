"""Vision-language models: srt generates what transformers generates from the same images.

Three families of tiny random VLMs (LLaVA: CLIP tower and a projector; Qwen2-VL: M-RoPE
positions; Idefics3: images cut into crops whose tokens are interleaved with text tags).
One batch mixes prompts with one image, two images and none, in chunks of 16 tokens so
chunks cut through images, at TP 1 and 2. The prefix cache keys image tokens by the image:
the same image hits, another one misses from its first image token on.
"""

from __future__ import annotations

import base64
import inspect

import pytest
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig

import srt
from srt.model_executor.model_runner import _image_attention_refusal
from srt.multimodal.images import load_image
from srt.runtime.generate_request import InvalidRequestError
from tiny_vlm_models import VLM_FAMILIES, build_tiny_vlm, chat_text, image_uri, random_image, reference_vlm_greedy

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlm")
    return {family: build_tiny_vlm(family, str(root / family)) for family in VLM_FAMILIES}


def cases(directory: str) -> list[tuple[str, list]]:
    """(prompt, images): one image, two of different sizes, none, and one more."""
    return [
        (chat_text(directory, 1, "what is this?"), [random_image(0)]),
        (chat_text(directory, 2, "compare them"), [random_image(1, (48, 24)), random_image(2)]),
        (chat_text(directory, 0, "no picture here"), []),
        (chat_text(directory, 1, "and this one?"), [random_image(3, (24, 48))]),
    ]


def generate(engine: srt.Engine, prompts: list[tuple[str, list]]) -> list[dict]:
    return engine.generate(
        [text for text, _ in prompts], GREEDY, image_data=[[image_uri(i) for i in images] or None for _, images in prompts]
    )


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_greedy_matches_transformers(vlm_dirs, family: str, tp: int) -> None:
    directory = vlm_dirs[family]
    prompts = cases(directory)
    expected = [reference_vlm_greedy(directory, text, images, MAX_NEW) for text, images in prompts]
    assert len({tuple(want) for _, want in expected}) == len(expected)  # the images steer the output
    with srt.Engine(model_path=directory, dtype="float32", max_total_tokens=2048, tp_size=tp, chunked_prefill_size=16) as engine:
        for out, (prompt_ids, want) in zip(generate(engine, prompts), expected):
            assert out["output_ids"] == want
            assert out["meta_info"]["prompt_tokens"] == len(prompt_ids)
        if tp == 1:
            assert_cache_keys_images(engine, directory, prompts[0], expected[0][0])
        if tp == 1 and family == "llava":
            assert_bad_images_are_refused(engine, directory)


def assert_cache_keys_images(engine: srt.Engine, directory: str, case: tuple[str, list], prompt_ids: list[int]) -> None:
    text, images = case
    again = generate(engine, [case])[0]
    assert again["meta_info"]["cached_tokens"] == len(prompt_ids) - 1  # the whole prompt, its image too
    other = generate(engine, [(text, [random_image(9)])])[0]
    first_image_token = prompt_ids.index(engine.tokenizer_manager.images.image_token_id)
    assert other["meta_info"]["cached_tokens"] == first_image_token
    assert other["output_ids"] == reference_vlm_greedy(directory, text, [random_image(9)], MAX_NEW)[1]


def test_retracted_requests_encode_their_images_again(vlm_dirs) -> None:
    """Too little KV memory for the batch: requests are retracted while decoding and, with no
    prefix cache to keep their K/V, prefill their prompts again, images and all."""
    directory = vlm_dirs["qwen2_vl"]
    prompts = cases(directory) * 2
    params = {**GREEDY, "max_new_tokens": 24}
    expected = [reference_vlm_greedy(directory, text, images, 24)[1] for text, images in prompts[:4]] * 2
    with srt.Engine(model_path=directory, dtype="float32", max_total_tokens=400, disable_radix_cache=True) as engine:
        outs = engine.generate(
            [text for text, _ in prompts], params, image_data=[[image_uri(i) for i in images] or None for _, images in prompts]
        )
        assert engine.get_internal_state().num_retractions > 0
    assert [out["output_ids"] for out in outs] == expected


def assert_bad_images_are_refused(engine: srt.Engine, directory: str) -> None:
    text = chat_text(directory, 1, "what is this?")
    with pytest.raises(InvalidRequestError, match="1 image placeholder"):
        engine.generate(text, GREEDY, image_data=[image_uri(random_image(0))] * 2)
    with pytest.raises(InvalidRequestError, match="cannot be decoded"):
        engine.generate(text, GREEDY, image_data="data:image/png;base64," + base64.b64encode(b"not a png").decode())
    with pytest.raises(InvalidRequestError, match="does not fetch images"):
        engine.generate(text, GREEDY, image_data="https://example.com/cat.png")
    with pytest.raises(InvalidRequestError, match="needs a text prompt"):
        engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY, image_data=image_uri(random_image(0)))


def test_local_image_files_only_under_the_allowed_folder(tmp_path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    random_image(0).save(allowed / "a.png")
    random_image(0).save(tmp_path / "outside.png")
    assert load_image(f"file://{allowed / 'a.png'}", str(allowed), "image").size == (32, 32)
    assert load_image(str(allowed / "a.png"), str(allowed), "image").tobytes() == random_image(0).tobytes()
    with pytest.raises(InvalidRequestError, match="outside --allowed-local-media-path"):
        load_image(str(allowed / ".." / "outside.png"), str(allowed), "image")
    with pytest.raises(InvalidRequestError, match="local image files are off"):
        load_image(str(allowed / "a.png"), None, "image")
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        load_image("data:image/png;base64,@@@", None, "image")


def test_bidirectional_image_attention_is_refused() -> None:
    """Gemma 3 lets an image's tokens attend to each other both ways (token_type_ids); srt's
    causal paged attention would compute something else, so its images are refused by name."""
    with init_empty_weights():
        gemma3 = AutoModelForImageTextToText.from_config(AutoConfig.for_model("gemma3"))
        llava = AutoModelForImageTextToText.from_config(LlavaConfig())
    assert "token_type_ids" in inspect.signature(gemma3.forward).parameters
    assert "bidirectionally" in _image_attention_refusal(gemma3)
    assert _image_attention_refusal(llava) is None
