"""srt.Engine: offline generation through the runtime, without HTTP.

    with srt.Engine(model_path="...") as engine:
        out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
        print(out["text"])
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

from transformers import AutoTokenizer

from srt.default_model import resolve_model_path
from srt.detokenizer.incremental import IncrementalDetokenizer
from srt.messages import InternalState, ReqOutput, TokenizedGenerateReq
from srt.model_runner import ModelRunner
from srt.sampling_params import SamplingParams
from srt.scheduler.scheduler import Scheduler
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        path = resolve_model_path(self.server_args.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(self.server_args.tokenizer_path) if self.server_args.tokenizer_path else path,
            trust_remote_code=self.server_args.trust_remote_code,
        )
        self.runner = ModelRunner(self.server_args, path)
        self.scheduler = Scheduler(self.server_args, self.runner, self.tokenizer)

    # ---- public API ----------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict | list[dict] | Iterator[dict]:
        """One prompt gives one result dict, a list gives a list (``stream=True``: an iterator of
        incremental results, each with the new ``text`` and ``output_ids`` since the last)."""
        prompts, single = self._normalize_prompts(prompt, input_ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        requests = [self._request(p, sp, return_logprob, top_logprobs_num) for p, sp in zip(prompts, params)]
        events = self._run(requests)
        if stream:
            return events
        results: dict[str, dict] = {}
        for rid, delta in events:
            _merge(results.setdefault(rid, _empty_result(rid)), delta)
        outs = [results[r.rid] for r, _ in requests]
        return outs[0] if single else outs

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def get_internal_state(self) -> InternalState:
        return self.scheduler.internal_state()

    def shutdown(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------

    def _normalize_prompts(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if single else list(prompt)
            return [self.tokenizer.encode(t) for t in texts], single
        single = bool(input_ids) and isinstance(input_ids[0], int)
        return ([list(input_ids)] if single else [list(x) for x in input_ids]), single

    def _request(self, ids: list[int], params: dict | None, return_logprob: bool, top_n: int):
        msg = TokenizedGenerateReq(uuid.uuid4().hex, ids, dict(params or {}), return_logprob, top_n)
        sp = SamplingParams.from_dict(msg.sampling_params)
        detok = IncrementalDetokenizer(
            self.tokenizer, ids, sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.stop, sp.no_stop_trim
        )
        return msg, detok

    def _run(self, requests) -> Iterator[tuple[str, dict]]:
        detoks = {}
        for msg, detok in requests:
            detoks[msg.rid] = detok
            error = self.scheduler.add_request(msg)
            if error is not None:
                raise ValueError(error.finish_reason["message"])
        pending = set(detoks)
        while pending:
            for out in self.scheduler.step():
                if out.rid in pending:
                    yield out.rid, _delta(out, detoks[out.rid])
                    if out.finish_reason is not None:
                        pending.discard(out.rid)


def _delta(out: ReqOutput, detok: IncrementalDetokenizer) -> dict:
    step = detok.step(out.new_token_ids, out.finish_reason is not None)
    meta = {
        "id": out.rid,
        "finish_reason": out.finish_reason,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
    }
    if out.logprobs:
        meta["output_token_logprobs"] = [(lp, t) for lp, t in zip(out.logprobs, out.new_token_ids)]
        meta["output_top_logprobs"] = out.top_logprobs
    return {"text": step.text_delta, "output_ids": out.new_token_ids, "meta_info": meta}


def _empty_result(rid: str) -> dict:
    return {"text": "", "output_ids": [], "meta_info": {"id": rid}}


def _merge(result: dict, delta: dict) -> None:
    result["text"] += delta["text"]
    result["output_ids"] += delta["output_ids"]
    meta, new = result["meta_info"], delta["meta_info"]
    for key in ("output_token_logprobs", "output_top_logprobs"):
        if key in new:
            meta.setdefault(key, []).extend(new[key])
    meta.update({k: v for k, v in new.items() if k not in ("output_token_logprobs", "output_top_logprobs")})
