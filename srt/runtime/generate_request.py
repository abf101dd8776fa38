"""GenerateReqInput: the one shape of a generation request, whichever front it came through.

``POST /generate`` bodies are one, ``srt.Engine.generate`` builds one from its arguments
and the OpenAI routes build one per API request (a prompt per choice). ``normalize``
checks the shape once (one prompt or a batch, one sampling-params dict or one per
prompt, request ids); the TokenizerManager then tokenizes and checks each prompt against
the model, which is the only other check a request ever gets.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from srt.sampling.sampling_params import is_valid_unicode

_INT32_MAX = 2**31 - 1


class InvalidRequestError(ValueError):
    """A request that cannot run; ``param`` names the field at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ServerOverloadedError(RuntimeError):
    """Too many generations in flight (``--max-queued-requests``): try again shortly (HTTP 503)."""


@dataclass
class GenerateItem:
    """One prompt of a request, before tokenization."""

    rid: str
    text: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any]
    lora_name: str | None = None
    image_data: list[str] | None = None  # the prompt's images (data: URIs, base64 or allowed files)


class GenerateReqInput(BaseModel):
    """SGLang's names: ``text`` or ``input_ids`` (one prompt or a list), ``sampling_params``
    (one dict for all prompts or one each), ``rid`` (one, used as a prefix for a batch, or one each)."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=_INT32_MAX)
    rid: str | list[str] | None = None
    logprob_start_len: int = Field(-1, ge=-1, le=_INT32_MAX)  # with return_logprob: prompt logprobs from this position on (-1: none)
    model: str | None = None  # sglang-router adds it; the front checks it names the served model
    # The LoRA adapter (its name) to generate with: one for all prompts or one each (None: the base model).
    lora_path: str | list[str | None] | None = None
    # Images for a text prompt holding the model's image placeholders, SGLang's shape: for one
    # prompt an image or a list of them; for a batch one entry (an image, a list or None) per prompt.
    image_data: str | list[str] | list[str | list[str] | None] | None = None

    # SGLang fields that sglang-router sends with their defaults. Hints about SGLang's own
    # logging are accepted and ignored, as they change nothing in a result.
    log_metrics: bool = True
    no_logs: bool = False
    # What srt does not do: accepted at their defaults, refused by name otherwise.
    return_text_in_logprobs: bool = False
    return_hidden_states: bool = False
    return_bytes: bool = False
    return_entropy: bool = False
    background: bool = False

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "return_text_in_logprobs",
        "return_hidden_states",
        "return_bytes",
        "return_entropy",
        "background",
    )

    @property
    def is_single(self) -> bool:
        """One prompt (answered with one result), not a batch (answered with a list)."""
        if self.text is not None:
            return isinstance(self.text, str)
        return not self.input_ids or isinstance(self.input_ids[0], int)

    def normalize(self) -> list[GenerateItem]:
        unsupported = next((name for name in self.UNSUPPORTED if getattr(self, name)), None)
        if unsupported is not None:
            raise InvalidRequestError(f"{unsupported} is not supported", param=unsupported)
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequestError("give exactly one of text and input_ids", param="text")
        single = self.is_single
        if self.text is not None:
            texts: list[str | None] = [self.text] if single else list(self.text)
            ids: list[list[int] | None] = [None] * len(texts)
        else:
            ids = [self.input_ids] if single else list(self.input_ids)
            texts = [None] * len(ids)
        n = len(ids)
        if n == 0:
            raise InvalidRequestError("the batch is empty", param="text")
        params = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params] * n
        if isinstance(self.rid, list):
            rids = self.rid
        elif single:
            rids = [self.rid or uuid.uuid4().hex]
        else:
            rids = [f"{self.rid}-{i}" if self.rid else uuid.uuid4().hex for i in range(n)]
        loras = self.lora_path if isinstance(self.lora_path, list) else [self.lora_path] * n
        images = self._images_per_prompt(single, n)
        if len(params) != n or len(rids) != n or len(loras) != n:
            raise InvalidRequestError(f"sampling_params, rid and lora_path must have one entry per prompt ({n})", param="sampling_params")
        if len(set(rids)) != n or not all(is_valid_unicode(rid) for rid in rids):
            raise InvalidRequestError("request ids must be distinct, valid Unicode strings", param="rid")
        return [GenerateItem(*item[:3], dict(item[3] or {}), *item[4:]) for item in zip(rids, texts, ids, params, loras, images)]

    def _images_per_prompt(self, single: bool, n: int) -> list[list[str] | None]:
        data = self.image_data
        if data is None:
            return [None] * n
        if self.text is None:
            raise InvalidRequestError("image_data needs a text prompt (holding the model's image placeholders)", param="image_data")
        if single:
            return [[data] if isinstance(data, str) else list(data)]
        if not isinstance(data, list) or len(data) != n:
            raise InvalidRequestError(f"image_data of a batch must have one entry per prompt ({n})", param="image_data")
        return [[entry] if isinstance(entry, str) else entry for entry in data]
