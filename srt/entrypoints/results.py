"""One request's outputs, accumulated: what every front returns or streams.

``GenerateResult.add`` takes each ``ReqOutput`` as it arrives; ``to_dict`` is SGLang's
result shape (``text``, ``output_ids``, ``meta_info``), which the Engine and
``/generate`` return and the OpenAI routes read their fields from.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from srt.runtime.messages import FinishReason, ReqOutput, TokenizedGenerateReq
from srt.tokenizer_manager.manager import TokenizerManager


@dataclass
class GenerateResult:
    rid: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_token_logprobs: list[tuple[float | None, int]] | None = None  # prompt logprobs, when asked for
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    has_text: bool = True  # False when the server has no tokenizer (``skip_tokenizer_init``)
    start: float = field(default_factory=time.perf_counter)
    end: float = 0.0  # when the last output arrived

    def add(self, out: ReqOutput) -> None:
        self.text += out.text
        self.output_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        if out.input_token_logprobs is not None:
            self.input_token_logprobs, self.input_top_logprobs = out.input_token_logprobs, out.input_top_logprobs
        self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = out.prompt_tokens, out.completion_tokens, out.cached_tokens
        self.end = time.perf_counter()

    @classmethod
    def of(cls, out: ReqOutput, has_text: bool, start: float) -> GenerateResult:
        """One output alone, as a result (a streamed delta of a request sent at ``start``)."""
        result = cls(out.rid, has_text=has_text, start=start)
        result.add(out)
        return result

    def to_dict(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": None if self.finish_reason is None else self.finish_reason.to_json(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.finish_reason is not None:
            meta["e2e_latency"] = self.end - self.start
        if self.logprobs:
            meta["output_token_logprobs"] = [[lp, t] for lp, t in zip(self.logprobs, self.output_ids)]
            meta["output_top_logprobs"] = self.top_logprobs
        if self.input_token_logprobs is not None:
            meta["input_token_logprobs"] = [list(pair) for pair in self.input_token_logprobs]
            meta["input_top_logprobs"] = self.input_top_logprobs
        result: dict[str, Any] = {"text": self.text} if self.has_text else {}
        return {**result, "output_ids": list(self.output_ids), "meta_info": meta}


async def collect(tm: TokenizerManager, reqs: list[TokenizedGenerateReq]) -> list[GenerateResult]:
    """Run ``reqs`` to the end; one result each, in order."""
    results = [GenerateResult(req.rid, has_text=tm.tokenizer is not None) for req in reqs]
    async with aclosing(tm.generate(reqs)) as outputs:
        async for index, out in outputs:
            results[index].add(out)
    return results
