"""The checks every request gets in the TokenizerManager, the only place a request is validated.

A mixin of ``TokenizerManager``: it reads the manager's tokenizer, the schedulers' limits
(``info``), the server arguments, the requests in flight (``states``) and the LoRA adapters
held (``lora_adapters``). Each check raises ``InvalidRequestError`` naming the field at fault,
or ``ServerOverloadedError`` when too many requests are in flight.
"""

from __future__ import annotations

from typing import Any

from srt.multimodal.images import load_image
from srt.runtime.image_inputs import MultimodalInputs
from srt.multimodal.processor import ImageProcessor
from srt.runtime.embedding_request import EmbeddingItem
from srt.runtime.generate_request import GenerateReqInput, InvalidRequestError, ServerOverloadedError
from srt.runtime.messages import SchedulerInfo, TokenizedEmbeddingReq, TokenizedGenerateReq
from srt.runtime.runtime import Runtime
from srt.sampling.sampling_params import SamplingParams, is_valid_unicode

_MAX_CHARS_PER_TOKEN = 64


class RequestChecks:
    runtime: Runtime
    tokenizer: Any
    info: SchedulerInfo
    states: dict[str, Any]
    lora_adapters: dict[str, str]
    images: ImageProcessor | None

    def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        self._check_texts(texts)
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []

    def _check_texts(self, texts: list[str]) -> None:
        if self.tokenizer is None:
            raise InvalidRequestError("this server runs with --skip-tokenizer-init: send input_ids, not text", param="text")
        if not all(is_valid_unicode(text) for text in texts):
            raise InvalidRequestError("the prompt is not valid Unicode (it holds a lone surrogate)", param="text")
        # No token is longer than this, so a longer text is too long for the model: refused
        # before tokenizing it costs anything.
        max_chars = self.info.max_req_input_len * _MAX_CHARS_PER_TOKEN
        if any(len(text) > max_chars for text in texts):
            raise InvalidRequestError(f"the prompt is longer than this server accepts ({max_chars} characters)", "text")

    def process_images(self, text: str, sources: list[str], add_special_tokens: bool, param: str) -> tuple[list[int], MultimodalInputs]:
        """A prompt with image placeholders and its images (URLs or base64) through the model's
        processor: the token ids with each placeholder expanded, and the images' inputs."""
        refusal = self.info.image_refusal
        if refusal is None and self.images is None:
            refusal = "the model's folder has no image processor (preprocessor_config.json)"
        if refusal is not None:
            raise InvalidRequestError(f"{param}: this server does not take images: {refusal}", param=param)
        self._check_texts([text])
        allowed = self.runtime.server_args.allowed_local_media_path
        images = [load_image(source, allowed, param) for source in sources]
        return self.images.process(text, images, add_special_tokens, param)

    def check(self, obj: GenerateReqInput, images: MultimodalInputs | None = None) -> list[TokenizedGenerateReq]:
        """Tokenize and validate every prompt of ``obj`` (``images``: those of every prompt, which the
        chat route has processed); InvalidRequestError says what is wrong, and ServerOverloadedError
        that too many generations are in flight already."""
        self.check_generates()
        items = obj.normalize()
        self._check_count(len(items), "generations", "text")
        limits = self.runtime.server_args
        if obj.top_logprobs_num > limits.max_logprobs:
            message = f"top_logprobs_num is {obj.top_logprobs_num}, more than the {limits.max_logprobs} allowed"
            raise InvalidRequestError(message, param="top_logprobs_num")
        self._check_rids_free([item.rid for item in items])
        texts = [item.text for item in items if item.text is not None and item.image_data is None]
        tokenized = iter(self.tokenize(texts)) if texts else iter(())
        reqs = []
        for item in items:
            multimodal = images
            if item.image_data is not None:
                input_ids, multimodal = self.process_images(item.text, item.image_data, True, "image_data")
            else:
                input_ids = next(tokenized) if item.text is not None else item.input_ids
            params = self._check_prompt(input_ids, item.sampling_params)
            self.check_lora(item.lora_name)
            start = obj.logprob_start_len if obj.return_logprob else -1
            if start >= len(input_ids):
                message = f"logprob_start_len ({start}) must be less than the prompt length ({len(input_ids)})"
                raise InvalidRequestError(message, param="logprob_start_len")
            reqs.append(
                TokenizedGenerateReq(
                    item.rid, input_ids, params, obj.return_logprob, obj.top_logprobs_num, obj.stream, start, item.lora_name,
                    multimodal,
                )  # fmt: skip
            )
        return reqs

    def check_lora(self, name: str | None) -> None:
        """Refuse an adapter this server does not hold (None, the base model, is always there)."""
        if name is None:
            return
        if not self.runtime.server_args.enable_lora:
            raise InvalidRequestError(f"LoRA adapter {name!r} asked for, but this server runs without --enable-lora", param="lora_path")
        if name not in self.lora_adapters:
            message = f"LoRA adapter {name!r} is not loaded (loaded: {', '.join(self.lora_adapters) or 'none'})"
            raise InvalidRequestError(message, param="lora_path", code="model_not_found")

    def check_generates(self) -> None:
        """Refuse generation on a server whose model pools (embeddings, scores)."""
        if self.info.task != "generate":
            message = f"this server runs a pooling model ({self.info.task}): it does not generate; use /v1/embeddings, /classify or /v1/score"
            raise InvalidRequestError(message, param="model", code="model_not_generative")

    def _check_count(self, n: int, what: str, param: str) -> None:
        limits = self.runtime.server_args
        if n > limits.max_prompts_per_request:
            raise InvalidRequestError(f"{n} {what} in one request, more than the {limits.max_prompts_per_request} allowed", param=param)
        if len(self.states) + n > limits.max_queued_requests:
            raise ServerOverloadedError(f"{len(self.states)} {what} are in flight (--max-queued-requests {limits.max_queued_requests})")

    def check_embedding(self, items: list[EmbeddingItem]) -> list[TokenizedEmbeddingReq]:
        """Tokenize and validate pooling inputs (texts, text pairs or token ids)."""
        if self.info.task == "generate":
            message = "this server runs a generation model: it returns no embeddings or scores (serve an embedding model, or a causal LM with --is-embedding)"
            raise InvalidRequestError(message, param="model", code="model_not_pooling")
        if not items:
            raise InvalidRequestError("the request has no input", param="input")
        self._check_count(len(items), "inputs", "input")
        self._check_rids_free([item.rid for item in items])
        reqs = []
        for item in items:
            token_types = None
            if item.text is not None:
                self._check_texts([item.text] + ([item.text_pair] if item.text_pair is not None else []))
                encoded = self.tokenizer(item.text, item.text_pair) if item.text_pair is not None else self.tokenizer(item.text)
                input_ids, token_types = encoded["input_ids"], encoded.get("token_type_ids")
            else:
                input_ids = item.input_ids
            if not input_ids:
                raise InvalidRequestError("an input is empty", param="input")
            if min(input_ids) < 0 or max(input_ids) >= self.info.vocab_size:
                raise InvalidRequestError(f"token ids must be integers in [0, {self.info.vocab_size})", param="input")
            if len(input_ids) > self.info.max_req_input_len:
                message = f"an input has {len(input_ids)} tokens, more than the {self.info.max_req_input_len} this model accepts"
                raise InvalidRequestError(message, param="input", code="context_length_exceeded")
            reqs.append(TokenizedEmbeddingReq(item.rid, list(input_ids), token_types))
        return reqs

    def _check_prompt(self, input_ids: list[int], sampling_params: dict[str, Any]) -> SamplingParams:
        info = self.info
        try:
            params = SamplingParams.from_dict(sampling_params, info.vocab_size)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="sampling_params") from e
        if len(params.logit_bias) > self.runtime.server_args.max_logit_bias_entries:
            limit = self.runtime.server_args.max_logit_bias_entries
            raise InvalidRequestError(f"logit_bias names {len(params.logit_bias)} tokens, more than the {limit} allowed", "logit_bias")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer (this server runs with --skip-tokenizer-init)", "stop")
        if params.constraint is not None:
            self._check_grammar_served(params.constraint[0])
        if not input_ids:
            raise InvalidRequestError("the prompt is empty", param="input_ids")
        if min(input_ids) < 0 or max(input_ids) >= info.vocab_size:
            raise InvalidRequestError(f"input_ids must be integers in [0, {info.vocab_size})", param="input_ids")
        if len(input_ids) > info.max_req_input_len:
            message = f"the prompt has {len(input_ids)} tokens, more than the {info.max_req_input_len} this server accepts"
            raise InvalidRequestError(message, param="input_ids", code="context_length_exceeded")
        if len(input_ids) + params.max_new_tokens > info.context_length:
            message = (
                f"the prompt ({len(input_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the context length ({info.context_length})"
            )
            raise InvalidRequestError(message, param="max_new_tokens", code="context_length_exceeded")
        return params

    def _check_grammar_served(self, kind: str) -> None:
        if self.runtime.server_args.grammar_backend == "none":
            raise InvalidRequestError(f"{kind} needs a grammar backend (this server runs with --grammar-backend none)", kind)
        if self.tokenizer is None:
            raise InvalidRequestError(f"{kind} needs the tokenizer (this server runs with --skip-tokenizer-init)", kind)

    def _check_rids_free(self, rids: list[str]) -> None:
        taken = next((rid for rid in rids if rid in self.states), None)
        if taken is not None:
            raise InvalidRequestError(f"request id {taken!r} is already in use", param="rid")
