"""The detokenizer process: token ids from the scheduler in, text deltas to the TokenizerManager out.

Control replies (flush, internal state) pass through unchanged, so the
TokenizerManager listens on one socket for everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from srt.detokenizer.incremental import IncrementalDetokenizer
from srt.model_loader.tokenizer import load_tokenizer
from srt.runtime.child import ChildSpec
from srt.runtime.ipc import Receiver, Sender
from srt.runtime.messages import BatchStrOut, BatchTokenOut, ChildReady, FinishStop, ReqOutput, TokenOutput

logger = logging.getLogger(__name__)


class DetokenizerManager:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, IncrementalDetokenizer] = {}

    def handle(self, batch: BatchTokenOut) -> BatchStrOut:
        for init in batch.new_requests:
            self.states[init.rid] = IncrementalDetokenizer(
                self.tokenizer,
                init.prompt_tail,
                init.skip_special_tokens,
                init.spaces_between_special_tokens,
                init.stop,
                init.no_stop_trim,
            )
        return BatchStrOut([self._with_text(out) for out in batch.outputs])

    def _with_text(self, out: TokenOutput) -> ReqOutput:
        reason = out.finish_reason
        state = self.states.get(out.rid)
        if state is None:
            text = ""
        else:
            stop = reason.matched if isinstance(reason, FinishStop) and isinstance(reason.matched, str) else None
            text = state.step(out.new_token_ids, reason is not None, stop).text_delta
        if reason is not None:
            self.states.pop(out.rid, None)
        return ReqOutput(**vars(out), text=text)


def run_detokenizer(spec: ChildSpec, report: Callable[[ChildReady], None]) -> None:
    manager = DetokenizerManager(load_tokenizer(spec.options["tokenizer_path"], spec.server_args.trust_remote_code))
    context = zmq.Context()
    inbox = Receiver(context, spec.endpoints.scheduler_output)
    outbox = Sender(context, spec.endpoints.tokenizer_input)
    report(ChildReady())
    while True:
        msg = inbox.recv()
        outbox.send(manager.handle(msg) if isinstance(msg, BatchTokenOut) else msg)
