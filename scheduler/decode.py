"""Decoding: every running request gets one KV slot per step; when memory runs short, the
request with the least progress goes back to the waiting queue (retraction), its tokens
kept so that it resumes where it stopped.

Admission keeps room for the decode growth of running requests, as SGLang does:
``ratio x`` (remaining new tokens, clipped) each. The ratio decays while decoding goes
well and jumps back up after a retraction.
"""

from __future__ import annotations

import logging

from srt.scheduler.memory import RequestMemory
from srt.scheduler.req import Req

logger = logging.getLogger(__name__)

_INIT_NEW_TOKEN_RATIO = 0.7
_MIN_NEW_TOKEN_RATIO = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
_CLIP_MAX_NEW_TOKENS = 4096


class DecodeScheduler:
    def __init__(self, memory: RequestMemory) -> None:
        self.memory = memory
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0

    def reservation(self, req: Req) -> int:
        """KV slots kept free for ``req``'s future decode tokens."""
        return int(min(req.remaining_new_tokens(), _CLIP_MAX_NEW_TOKENS) * self.new_token_ratio)

    def reserved(self, reqs: list[Req]) -> float:
        return sum(min(r.remaining_new_tokens(), _CLIP_MAX_NEW_TOKENS) * self.new_token_ratio for r in reqs)

    def schedule(self, running: list[Req], waiting: list[Req]) -> list[Req]:
        """One new KV slot for every running request, retracting requests into ``waiting``
        while there are not enough; returns the requests that decode this step."""
        while self.memory.obtainable_tokens() < len(running):
            if len(running) == 1:
                break  # a lone request always fits: admission checked its prompt against the pool
            self._retract_one(running, waiting)
        for req in running:
            if not self.memory.reserve(req, 1):
                raise RuntimeError("out of KV memory for a single decoding request")
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)
        return list(running)

    def _retract_one(self, running: list[Req], waiting: list[Req]) -> None:
        victim = min(running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        running.remove(victim)
        self.memory.release(victim)
        victim.kv_len = 0
        waiting.insert(0, victim)
        self.num_retractions += 1
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        logger.info(
            "KV cache is full: retracted request %s (%d tokens kept); #retracted=%d",
            victim.rid,
            len(victim.fill_ids),
            self.num_retractions,
        )
