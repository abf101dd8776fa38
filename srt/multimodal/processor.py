"""The model's own ``AutoProcessor`` in the TokenizerManager: a prompt with image
placeholders and its images become the token ids (each placeholder expanded to the image's
tokens) and the tensors the vision tower takes, packed for the wire."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.auto.processing_auto import processor_class_from_name

from srt.multimodal.images import image_hash
from srt.runtime.image_inputs import MultimodalInputs, PackedTensor
from srt.runtime.generate_request import InvalidRequestError

logger = logging.getLogger(__name__)

# Processor outputs that are the prompt itself, not inputs of the vision tower.
_PROMPT_KEYS = frozenset({"input_ids", "attention_mask"})


class ImageProcessor:
    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def load(cls, path: str, trust_remote_code: bool = False) -> ImageProcessor | None:
        """The processor at ``path``, or None when it has no image processor (a text-only model)."""
        try:
            try:
                processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            except ImportError as e:  # a video processor needs torchvision; srt reads no videos
                processor = _images_only(path, trust_remote_code, e)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("the model's processor at %s cannot be loaded (%s): images will be refused", path, e)
            return None
        if getattr(processor, "image_processor", None) is None or getattr(processor, "image_token", None) is None:
            logger.warning("%s at %s has no image processor or image token: images will be refused", type(processor).__name__, path)
            return None
        return cls(processor)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def process(self, text: str, images: list[Image.Image], add_special_tokens: bool, param: str) -> tuple[list[int], MultimodalInputs]:
        """Token ids of ``text`` with each image placeholder expanded, and the images' inputs."""
        placeholders = text.count(self.image_token)
        if placeholders != len(images):
            raise InvalidRequestError(
                f"{param}: the prompt has {placeholders} image placeholder(s) ({self.image_token!r}) for {len(images)} image(s)",
                param=param,
            )
        try:
            out = self.processor(text=[text], images=[images], add_special_tokens=add_special_tokens, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as e:
            raise InvalidRequestError(f"{param}: the model's processor cannot take these images: {e}", param=param) from e
        ids = out["input_ids"][0].tolist()
        tensors = {k: PackedTensor.pack(v) for k, v in out.items() if k not in _PROMPT_KEYS and isinstance(v, torch.Tensor)}
        counts = self._tokens_per_image(images, ids.count(self.image_token_id))
        return ids, MultimodalInputs(tensors, [image_hash(image) for image in images], counts)

    def _tokens_per_image(self, images: list[Image.Image], total: int) -> list[int] | None:
        """How many image tokens each image has, from the processor when it says so (and its
        count adds up); None otherwise, and the prefix cache then keys all images as one."""
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return None
        try:
            counts = list(count(image_sizes=[(image.height, image.width) for image in images])["num_image_tokens"])
        except (TypeError, ValueError, KeyError, AttributeError):
            return None
        return counts if sum(counts) == total else None


def _images_only(path: str, trust_remote_code: bool, error: ImportError) -> Any:
    """The folder's processor class less its video processor: transformers builds video processors
    only with torchvision, which a CPU install often lacks, and srt takes no videos."""
    with open(os.path.join(path, "processor_config.json")) as f:
        name = json.load(f).get("processor_class")
    cls = processor_class_from_name(name) if name else None
    if cls is None or "video_processor" not in cls.get_attributes():
        raise error
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    images_only = type(f"{cls.__name__}ImagesOnly", (cls,), {"get_attributes": classmethod(lambda _: attributes)})
    logger.warning("%s loaded without its video processor, which cannot be built here (%s): images only", name, str(error).strip().split(". ")[0])
    return images_only.from_pretrained(path, trust_remote_code=trust_remote_code)
