"""Tiny random-weight vision-language models, built from configs and saved as ordinary HF folders.

Nothing can be fetched from the hub, so each family's model, processor, byte tokenizer (with the
family's special tokens added) and chat template are built here, and ``AutoConfig``,
``AutoProcessor`` and ``AutoModelForImageTextToText`` load the folder as they would a real
checkpoint. Sizes follow tests/tiny_models.py; the vision towers are tiny too (32x32 inputs, 8x8
patches) so that an image is a handful of tokens. The PIL image processors are built because they
need no torchvision (the saved configs name the base class, so where torchvision is installed
AutoProcessor picks its backend instead); Qwen2-VL's processor also wants a video processor,
which needs torchvision, so without it the reference loads an images-only variant.
``reference_vlm_greedy`` is transformers' own greedy output: the oracle.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import sys
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from tiny_builder import COMMON as _COMMON, VOCAB as _BYTE_VOCAB, byte_tokenizer  # noqa: E402

VLM_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")

PATCH = 8  # vision patch size; with 32x32 crops a crop is a 4x4 grid of patches
# The vision towers get the large init too, so that image features are as spread as token
# embeddings and different images steer greedy decoding apart.
_VISION: dict[str, Any] = dict(num_attention_heads=2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.3)


def _text_kwargs(vocab_size: int) -> dict[str, Any]:
    return {**_COMMON, "vocab_size": vocab_size, "head_dim": 16}


def _tokenizer(special: list[str]) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """The byte tokenizer plus ``special`` as added special tokens (ids 256, 257, ... in order)."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in special}


# Chat templates in the style of each family's hub template. Content may be a plain string (the
# tokenizer alone renders text-only chats) or a list of {"type": "image"} / {"type": "text"} parts.
_PARTS = (
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
)
_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    + _PARTS.replace("IMAGE", "'<image>\\n'")
    + "{{ ' ' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
_QWEN2_VL_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _PARTS.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
    + "{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_IDEFICS3_TEMPLATE = (
    "{%- for message in messages -%}{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'] is not string and message['content'][0]['type'] == 'image' else ': ' }}"
    + _PARTS.replace("IMAGE", "'<image>'")
    + "{{ '<end_of_utterance>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def _llava() -> tuple[PreTrainedConfig, ProcessorMixin, list[int]]:
    tokenizer, ids = _tokenizer(["<image>"])
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION, image_size=32, patch_size=PATCH),
        text_config=LlamaConfig(**_text_kwargs(len(tokenizer))),
        image_token_id=ids["<image>"],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # CLIP prepends a CLS token (num_additional_image_tokens=1) that "default" selection drops: 16 tokens.
    processor = LlavaProcessor(
        image_processor, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE,
    )  # fmt: skip
    return config, processor, [2]


def _qwen2_vl() -> tuple[PreTrainedConfig, ProcessorMixin, list[int]]:
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer, ids = _tokenizer(specials)
    text = _text_kwargs(len(tokenizer))
    # M-RoPE: the head's 8 rotary frequency pairs split over (temporal, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.3)  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # Sides are rounded to multiples of 16 (patch x merge); 256..4096 pixels keeps an image at 1-16 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    )
    processor = _Qwen2VLImagesOnly(image_processor, tokenizer, chat_template=_QWEN2_VL_TEMPLATE)
    return config, processor, [ids["<|im_end|>"], 2]


class _Qwen2VLImagesOnly(Qwen2VLProcessor):
    """Qwen2VLProcessor less its video processor: transformers builds video processors only with
    torchvision, which this venv lacks (PyPI's CUDA build does not import against CPU torch)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


# Written into the saved processor so that, where torchvision is installed, AutoProcessor builds the
# full Qwen2VLProcessor with video frames cut into the same tiny patches as images.
_QWEN2_VL_VIDEO = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH, "temporal_patch_size": 2,
                   "merge_size": 2, "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}}  # fmt: skip


def _idefics3() -> tuple[PreTrainedConfig, ProcessorMixin, list[int]]:
    row_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer, ids = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *row_cols])
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_VISION, image_size=32, patch_size=PATCH),
        text_config=LlamaConfig(**_text_kwargs(len(tokenizer))),
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=0,
    )
    # Longest edge resized to 64, then split into 32x32 crops (up to 2x2) plus a global 32x32 view;
    # each crop is 4x4 patches pixel-shuffled by 2: 4 tokens a crop.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE)
    return config, processor, [ids["<end_of_utterance>"], 2]


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3}


def build_tiny_vlm(family: str, directory: str) -> str:
    """Save a random float32 ``family`` model, its processor (tokenizer, image processor, chat
    template) and a generation config into ``directory``."""
    config, processor, eos = _BUILDERS[family]()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        # Zero logits for the added tokens (placeholders, crop tags, turn markers): against the
        # byte tokens' spread logits greedy never picks one, so generated text never holds an
        # image placeholder that a follow-up prompt would then have to match with an image.
        model.get_output_embeddings().weight[_BYTE_VOCAB:] = 0.0
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    # On the tokenizer too, so that text-only chats render without the processor.
    processor.tokenizer.chat_template = processor.chat_template
    processor.save_pretrained(directory)
    if family == "qwen2_vl":
        path = os.path.join(directory, "processor_config.json")
        with open(path) as f:
            saved = json.load(f)
        saved.update(processor_class="Qwen2VLProcessor", video_processor=_QWEN2_VL_VIDEO)
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)
    GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=0).save_pretrained(directory)
    return directory


def random_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A random RGB image of ``size`` = (width, height), as PIL orders it."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")



def image_uri(image: Image.Image) -> str:
    """The image as an OpenAI client sends one: a base64 PNG data: URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_text(directory: str, images: int, text: str) -> str:
    """One user turn of ``images`` image parts then ``text``, rendered by the processor's chat template."""
    _, processor = _load(directory)
    content = [*([{"type": "image"}] * images), {"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


@functools.lru_cache(maxsize=None)
def _load(directory: str) -> tuple[torch.nn.Module, ProcessorMixin]:
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    if model.config.model_type == "qwen2_vl" and not is_torchvision_available():
        return model.eval(), _Qwen2VLImagesOnly.from_pretrained(directory)
    return model.eval(), AutoProcessor.from_pretrained(directory)


@torch.inference_mode()
def reference_vlm_greedy(directory: str, text: str, images: list, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """transformers' greedy generate on ``text`` (a rendered prompt holding the processor's image
    placeholders) and ``images``, never stopping early: (prompt ids after expansion, new ids)."""
    model, processor = _load(directory)
    inputs = processor(text=[text], images=list(images) or None, return_tensors="pt")
    # An empty list, not None: generate reads None as "unset" and stops at the model's own EOS.
    config = GenerationConfig(do_sample=False, eos_token_id=[], pad_token_id=0, max_new_tokens=max_new_tokens)
    out = model.generate(**inputs, generation_config=config)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()
