"""Pooling requests in the scheduler: a prompt in, one embedding (or row of scores) out.

A decoder pooling model runs through the paged runtime like generation: its requests are
prefilled (in chunks, their prefix reused from the radix cache) and never decode. The
forward returns hidden states instead of logits; ``DecoderPooling`` pools them per request,
chunk by chunk, and finishes the request with its embedding. Mean pooling needs every
token's hidden state, so such a request computes its whole prompt (no cached prefix); last
-token pooling needs only the last, and reuses the cache like any prompt.

An encoder has no KV cache: ``EncoderScheduler`` batches waiting requests under the token
budget and runs each batch whole (``srt.model_executor.pooling.EncoderForward``).
"""

from __future__ import annotations

import logging

import torch

from srt.model_executor.model_runner import ModelRunner
from srt.runtime.messages import (
    BatchEmbeddingOut,
    BatchTokenOut,
    EmbeddingOutput,
    FinishAbort,
    InternalState,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
    TokenOutput,
)
from srt.scheduler.req import Req
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


def output_of(rid: str, vector: torch.Tensor, prompt_tokens: int, cached_tokens: int = 0) -> EmbeddingOutput:
    return EmbeddingOutput(rid, vector.float().cpu().numpy().tobytes(), prompt_tokens, cached_tokens)


def refused_generation(msg: TokenizedGenerateReq, model_name: str) -> BatchTokenOut:
    """The answer to a generation request sent to a pooling model (the front refuses them first)."""
    reason = FinishAbort(f"{model_name} is a pooling model: it does not generate", 400)
    return BatchTokenOut([TokenOutput(msg.rid, [], reason, len(msg.input_ids), 0, 0)])


def refused(msg: TokenizedEmbeddingReq, runner: ModelRunner) -> EmbeddingOutput | None:
    """A pooling request the model cannot compute, answered at once (HTTP 400), else None."""
    problem = None
    if not runner.task.is_pooling:
        problem = f"{type(runner.model).__name__} generates: it returns no embeddings or scores"
    elif msg.token_type_ids and any(msg.token_type_ids) and not (runner.is_encoder and runner.encoder.takes_token_types):
        problem = f"{type(runner.model).__name__} takes no token_type_ids, but this input has a second segment"
    elif len(msg.input_ids) > runner.plan.context_length:
        problem = f"the input has {len(msg.input_ids)} tokens, more than the context length {runner.plan.context_length}"
    if problem is None:
        return None
    return EmbeddingOutput(msg.rid, b"", len(msg.input_ids), finish_reason=FinishAbort(problem, 400))


class DecoderPooling:
    """Pools a decoder's hidden states per request as its prompt's chunks are computed."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.pooling = runner.task.pooling

    def collect(self, reqs: list[Req], hidden: torch.Tensor, ends: list[int]) -> tuple[list[Req], list[EmbeddingOutput]]:
        """Take this forward's rows (``req.logit_positions`` of each request, ending at ``ends``);
        returns the requests whose whole prompt is pooled now, and their outputs."""
        done, pooled, outputs = [], [], []
        for req, end in zip(reqs, ends):
            rows = hidden[end - len(req.logit_positions) : end].float()
            if self.pooling == "mean":
                req.pooled_sum = rows.sum(0) if req.pooled_sum is None else req.pooled_sum + rows.sum(0)
            if req.kv_len == len(req.input_ids):  # kv_len counts this forward's tokens already
                done.append(req)
                pooled.append(req.pooled_sum / len(req.input_ids) if self.pooling == "mean" else rows[-1])
        if done:
            for req, vector in zip(done, self.runner.score(torch.stack(pooled))):
                outputs.append(output_of(req.rid, vector, len(req.input_ids), req.cached_tokens))
        return done, outputs


class EncoderScheduler:
    """The scheduler of an encoder model: prefill-only batches, no KV memory, nothing cached."""

    def __init__(self, server_args: ServerArgs, runner: ModelRunner) -> None:
        self.args = server_args
        self.runner = runner
        self.context_length = runner.plan.context_length
        self.max_req_input_len = self.context_length
        self.vocab_size = runner.shape.vocab_size
        self.waiting: list[TokenizedEmbeddingReq] = []
        self.outbox: list[EmbeddingOutput] = []
        self.refusals: list[BatchTokenOut] = []

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        self.refusals.append(refused_generation(msg, type(self.runner.model).__name__))

    def add_embedding_request(self, msg: TokenizedEmbeddingReq) -> None:
        failure = refused(msg, self.runner)
        if failure is not None:
            self.outbox.append(failure)
        else:
            self.waiting.append(msg)

    def abort(self, rid: str) -> None:
        req = next((r for r in self.waiting if r.rid == rid), None)
        if req is not None:
            self.waiting.remove(req)
            self.outbox.append(EmbeddingOutput(rid, b"", len(req.input_ids), finish_reason=FinishAbort("aborted")))

    def step(self) -> None:
        """Encode one batch: the oldest waiting request, and with it the shortest of the next
        ``--max-running-requests`` waiting ones, as many as fit ``--max-prefill-tokens`` padded
        to the longest. Inputs of like length together keep the padding small (sentence-
        transformers sorts its inputs for the same reason); the oldest always runs, so a long
        input is never passed over for ever."""
        if not self.waiting:
            return
        oldest, *window = self.waiting[: self.runner.plan.max_running_requests]
        batch, width = [oldest], len(oldest.input_ids)
        for req in sorted(window, key=lambda r: len(r.input_ids)):
            wider = max(width, len(req.input_ids))
            if wider * (len(batch) + 1) > self.args.max_prefill_tokens:
                break
            batch.append(req)
            width = wider
        chosen = {id(r) for r in batch}
        self.waiting = [r for r in self.waiting if id(r) not in chosen]
        vectors = self.runner.encoder([r.input_ids for r in batch], [r.token_type_ids for r in batch])
        self.outbox.extend(output_of(r.rid, v, len(r.input_ids)) for r, v in zip(batch, vectors))
        tokens = sum(len(r.input_ids) for r in batch)
        logger.debug("Encode batch. #seq: %d, #token: %d (padded %d), #queue-req: %d", len(batch), tokens, width * len(batch), len(self.waiting))

    def take_outputs(self) -> list[BatchTokenOut | BatchEmbeddingOut]:
        outputs, self.outbox = self.outbox, []
        refusals, self.refusals = self.refusals, []
        return refusals + ([BatchEmbeddingOut(outputs)] if outputs else [])

    def has_work(self) -> bool:
        return bool(self.waiting)

    def flush_cache(self) -> bool:
        return True  # nothing is cached

    def ready_grammars(self) -> list[str]:
        return []

    def compiling(self) -> bool:
        return False

    def admit_grammars(self, rids: list[str]) -> None:
        pass

    def internal_state(self) -> InternalState:
        return InternalState(0, 0, 0, 0, 0, len(self.waiting), 0, 0, 0, 0.0)
