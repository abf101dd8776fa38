"""Prompts of the OpenAI routes as token ids: completion prompts, and chat messages rendered
with the model's chat template."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jinja2

from srt.entrypoints.errors import APIError
from srt.entrypoints.offload import off_loop_if_long
from srt.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from srt.runtime.image_inputs import MultimodalInputs
from srt.runtime.generate_request import InvalidRequestError
from srt.sampling.sampling_params import is_valid_unicode
from srt.tokenizer_manager.manager import TokenizerManager


async def tokenize_prompts(tm: TokenizerManager, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (long texts tokenized off the event loop); a bad one is a 400 naming ``prompt``."""
    try:
        return await off_loop_if_long(sum(map(len, texts)), tm.tokenize, texts, add_special_tokens)
    except InvalidRequestError as e:  # its param names the native field (text), not OpenAI's
        raise APIError(400, str(e), param="prompt", code=e.code) from e


async def completion_prompts(tm: TokenizerManager, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt, given as a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
    if texts is not None:
        return await tokenize_prompts(tm, texts)
    if isinstance(prompt[0], int):
        return [prompt]
    return prompt


def chat_prompt(tm: TokenizerManager, chat_template_arg: str | None, body: ChatCompletionRequest) -> tuple[str, list[int], MultimodalInputs | None]:
    """The messages (and tools) rendered with the chat template: the text, its token ids (each
    image's placeholder expanded by the model's processor) and the images' inputs."""
    tokenizer = tm.tokenizer
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if chat_template_arg is None and tokenizer.chat_template is None:
        raise APIError(
            400,
            "this model has no chat template: use /v1/completions, or start the server with "
            "--chat-template (a Jinja file or template string)",
            param="messages",
        )
    images: list[str] = []  # the image parts' URLs, in the order the template renders them
    messages = [_template_message(i, m, images) for i, m in enumerate(body.messages)]
    # As vLLM: the template sees the tools even with tool_choice none (the model knows of them, calls none).
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=_read_chat_template(chat_template_arg) if chat_template_arg else None,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=False,
            **(body.chat_template_kwargs or {}),
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. a template that insists roles alternate
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
    if not is_valid_unicode(text):
        raise APIError(400, "the messages are not valid Unicode (they hold a lone surrogate)", param="messages")
    # The template already wrote the special tokens it wants (a BOS among them): add none.
    if images:
        try:
            return text, *tm.process_images(text, images, add_special_tokens=False, param="messages")
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="messages") from e
    return text, tokenizer(text, add_special_tokens=False)["input_ids"], None


def chat_template_text(tokenizer, chat_template_arg: str | None) -> str:
    """The chat template's source (all of them, for a tokenizer that has several by name)."""
    if chat_template_arg:
        return _read_chat_template(chat_template_arg)
    template = tokenizer.chat_template if tokenizer is not None else None
    if isinstance(template, dict):
        return "\n".join(template.values())
    return template or ""


@functools.lru_cache(maxsize=4)
def _read_chat_template(arg: str) -> str:
    """``--chat-template``: a Jinja file, else the template itself (or the name of one of the tokenizer's)."""
    if os.path.isfile(arg):
        with open(arg) as f:
            return f.read()
    return arg


def _template_message(index: int, message: ChatMessage, images: list[str]) -> dict[str, Any]:
    """The message as chat templates expect it: content as one string, or with images as the
    list of parts multimodal templates read (``{"type": "image"}`` where each image goes)."""
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type == "image_url":
                if part.image_url is None:
                    raise APIError(400, f"messages[{index}]: an image_url part has no image_url", param="messages")
            elif part.type != "text":
                error = f"messages[{index}]: content parts of type {part.type!r} are not supported (text and image_url are)"
                raise APIError(400, error, param="messages")
            elif part.text is None:
                raise APIError(400, f"messages[{index}]: a text part has no text", param="messages")
        if any(part.type == "image_url" for part in content):
            images.extend(part.image_url.url for part in content if part.type == "image_url")
            content = [{"type": "image"} if part.type == "image_url" else {"type": "text", "text": part.text} for part in content]
        else:
            content = "\n".join(part.text for part in content)
    elif content is None and not (message.role == "assistant" and message.tool_calls):
        raise APIError(400, f"messages[{index}] has no content", param="messages")
    rendered = {**message.model_dump(exclude_none=True), "content": content}
    for call in rendered.get("tool_calls", ()):
        call["function"]["arguments"] = _arguments_object(call["function"]["arguments"])
    return rendered


def _arguments_object(arguments: str | dict[str, Any]) -> str | dict[str, Any]:
    """A call's arguments as an object, as vLLM hands them to templates: Qwen's and Llama's write
    them with ``tojson`` (JSON text would come out quoted), others iterate their items."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments
