"""After a forward: sample each request's next token, decide whether it finished, and collect
what goes to the detokenizer.

Stop strings are decided here, where generation can stop at once; the detokenizer only
cuts the text at the stop string named in the finish reason.
"""

from __future__ import annotations

import torch

from srt.detokenizer.incremental import CONTEXT_TOKENS, find_stop
from srt.runtime.messages import BatchTokenOut, DetokInit, FinishAbort, FinishLength, FinishStop, TokenOutput
from srt.sampling.grammar.mask_filler import BatchBitmask
from srt.sampling.sampler import SamplingBatch, SamplingRequest, sample, token_logprobs
from srt.scheduler.req import Req


class OutputProcessor:
    def __init__(self, tokenizer, context_length: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer  # None with --skip-tokenizer-init, where requests carry no stop strings
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.outbox = BatchTokenOut([])

    def sample(self, reqs: list[Req], logits: torch.Tensor, grammar_mask: BatchBitmask | None = None) -> list[Req]:
        """Give each request its next token (within its grammar, if it has one: ``grammar_mask``
        holds the rows); returns the requests that finished."""
        sampling = SamplingBatch.build(
            # A grammar decides alone where the output may end: min_new_tokens does not hold its stop tokens back.
            [SamplingRequest(r.params, r.input_ids, r.output_ids, r.seed, [] if r.grammar else r.stop_ids) for r in reqs],
            self.vocab_size,
            logits.device,
            grammar_mask,
        )
        next_ids = sample(logits, sampling)
        logprobs = None
        if any(r.return_logprob for r in reqs):
            logprobs = token_logprobs(logits, next_ids, [r.top_logprobs_num if r.return_logprob else 0 for r in reqs])
        finished = []
        for i, (req, token) in enumerate(zip(reqs, next_ids.tolist())):
            if req.remaining_new_tokens() <= 0:  # max_new_tokens == 0: the prompt only
                req.finish_reason = FinishLength(0)
            else:
                req.output_ids.append(token)
                if logprobs is not None and req.return_logprob:
                    req.unsent_logprobs.append(logprobs.chosen[i])
                    req.unsent_top_logprobs.append(logprobs.top[i])
                if req.grammar is None or self._advance_grammar(req, token):
                    self._check_finished(req, token)
            if req.stream or req.finished:
                self.emit(req)
            if req.finished:
                finished.append(req)
        return finished

    def add_input_logprobs(self, reqs: list[Req], logits: torch.Tensor, ends: list[int]) -> None:
        """Prompt logprobs from this forward's logits: the row of position p (among
        ``req.logit_positions``, rows ``ends[i-1]:ends[i]``) gives the logprob of prompt token p + 1."""
        rows, next_ids, top_n, owners = [], [], [], []
        for i, req in enumerate(reqs):
            if not req.wants_input_logprobs:
                continue
            if req.logprob_start_len == 0 and not req.input_token_logprobs:
                req.input_token_logprobs.append((None, req.input_ids[0]))  # nothing predicts the first token
                req.input_top_logprobs.append(None)
            first_row = ends[i] - len(req.logit_positions)
            for row, position in enumerate(req.logit_positions, first_row):
                if req.first_logit_position <= position < len(req.input_ids) - 1:
                    rows.append(row)
                    next_ids.append(req.input_ids[position + 1])
                    top_n.append(req.top_logprobs_num)
                    owners.append(req)
        if rows:
            found = token_logprobs(logits[rows], torch.tensor(next_ids, device=logits.device), top_n)
            for req, token, logprob, top in zip(owners, next_ids, found.chosen, found.top):
                req.input_token_logprobs.append((logprob, token))
                req.input_top_logprobs.append(top)
        for req in reqs:
            if req.wants_input_logprobs and req.kv_len + req.extend_len >= len(req.input_ids):
                req.input_logprobs_done = True

    @staticmethod
    def _advance_grammar(req: Req, token: int) -> bool:
        """Feed the token to the request's grammar; False when that finished the request."""
        if not req.grammar.accept(token):  # the mask allowed only tokens the grammar accepts: a bug if reached
            req.finish_reason = FinishAbort(f"the grammar rejected the sampled token {token}", status_code=500)
        elif req.grammar.is_terminated():
            req.finish_reason = FinishStop(token)
        return req.finish_reason is None

    def _check_finished(self, req: Req, token: int) -> None:
        if token in req.stop_ids and len(req.output_ids) >= req.params.min_new_tokens:
            req.finish_reason = FinishStop(token)
        elif req.params.stop and (matched := self._matched_stop_string(req)):
            req.finish_reason = FinishStop(matched)
        elif req.remaining_new_tokens() <= 0:
            req.finish_reason = FinishLength(req.params.max_new_tokens)
        elif len(req.fill_ids) >= self.context_length:
            req.finish_reason = FinishLength(len(req.output_ids))

    def _matched_stop_string(self, req: Req) -> str | None:
        """The stop string the newest token completed, if any (``find_stop`` on the decoded tail)."""
        if len(req.output_ids) < req.params.min_new_tokens:
            return None
        longest = max(len(s) for s in req.params.stop)
        tail = self.tokenizer.decode(req.output_ids[-(longest + 4) :], skip_special_tokens=req.params.skip_special_tokens)
        found = find_stop(tail, req.params.stop)
        return found[1] if found else None

    def emit(self, req: Req) -> None:
        """Queue what the request generated since its last output (all of it at once for a request
        that does not stream, as SGLang does: nobody reads the steps in between)."""
        first = not req.announced
        if first:
            req.announced = True
            p = req.params
            self.outbox.new_requests.append(
                DetokInit(
                    req.rid,
                    req.input_ids[-CONTEXT_TOKENS:],
                    p.stop,
                    p.skip_special_tokens,
                    p.spaces_between_special_tokens,
                    p.no_stop_trim,
                )
            )
        self.outbox.outputs.append(
            TokenOutput(
                rid=req.rid,
                new_token_ids=req.output_ids[req.sent_len :],
                finish_reason=req.finish_reason,
                prompt_tokens=len(req.input_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                logprobs=req.unsent_logprobs,
                top_logprobs=req.unsent_top_logprobs,
                input_token_logprobs=req.input_token_logprobs if first and req.logprob_start_len >= 0 else None,
                input_top_logprobs=req.input_top_logprobs if first and req.logprob_start_len >= 0 else None,
            )
        )
        req.sent_len = len(req.output_ids)
        req.unsent_logprobs, req.unsent_top_logprobs = [], []

    def take(self) -> BatchTokenOut:
        """Everything queued since the last call."""
        batch, self.outbox = self.outbox, BatchTokenOut([])
        return batch
