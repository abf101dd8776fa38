"""The detokenizer process: token ids from the scheduler in, text deltas to the TokenizerManager out.

Control replies (flush, internal state) pass through unchanged, so the
TokenizerManager listens on one socket for everything.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

import zmq
from transformers import AutoTokenizer

from srt.detokenizer.incremental import IncrementalDetokenizer
from srt.runtime.ipc import IpcEndpoints, Receiver, Sender
from srt.runtime.messages import BatchTokenOut, ReqOutput

logger = logging.getLogger(__name__)


class DetokenizerManager:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, IncrementalDetokenizer] = {}

    def handle(self, batch: BatchTokenOut) -> BatchTokenOut:
        for out in batch.outputs:
            self._add_text(out)
        return batch

    def _add_text(self, out: ReqOutput) -> None:
        finished = out.finish_reason is not None
        if self.tokenizer is None:
            return
        if out.detok_init is not None:
            init = out.detok_init
            self.states[out.rid] = IncrementalDetokenizer(
                self.tokenizer,
                init.prompt_tail,
                init.skip_special_tokens,
                init.spaces_between_special_tokens,
                init.stop,
                init.no_stop_trim,
            )
            out.detok_init = None
        state = self.states.get(out.rid)
        if state is None:  # outputs after a stop string ended the request here
            return
        step = state.step(out.new_token_ids, finished)
        out.text = step.text_delta
        if step.matched_stop is not None:
            out.finish_reason = {"type": "stop", "matched": step.matched_stop}
            finished = True
        if finished:
            del self.states[out.rid]


def run_detokenizer(tokenizer_path: str, trust_remote_code: bool, skip_tokenizer_init: bool, endpoints: IpcEndpoints, ready: Connection) -> None:
    tokenizer = None if skip_tokenizer_init else AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    manager = DetokenizerManager(tokenizer)
    context = zmq.Context()
    inbox = Receiver(context, endpoints.detokenizer_input)
    outbox = Sender(context, endpoints.tokenizer_input)
    ready.send({"status": "ready"})
    while True:
        msg = inbox.recv()
        outbox.send(manager.handle(msg) if isinstance(msg, BatchTokenOut) else msg)
