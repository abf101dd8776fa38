"""Filling a batch's grammar bitmask on a worker thread while the forward runs.

The mask for the token about to be sampled depends only on tokens already accepted,
so it can be computed while the model computes the logits, as SGLang's overlap does:
the cost hides behind the forward instead of adding to the step. The libraries' fill
functions release the GIL, as torch's ops do.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from srt.sampling.grammar.backend import GrammarBackend, GrammarMatcher


@dataclass
class BatchBitmask:
    bitmask: torch.Tensor  # [B, words]: rows of the batch being sampled
    rows: list[int]  # the rows with a grammar; the others are not to be masked


class MaskFiller:
    def __init__(self, backend: GrammarBackend, pin_memory: bool) -> None:
        self.backend = backend
        self._pin_memory = pin_memory  # page-locked, so the copy to the GPU is one DMA
        self._buffer = backend.allocate_bitmask(0)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")

    def start(self, matchers: list[GrammarMatcher | None]) -> Future[BatchBitmask] | None:
        """Begin filling the rows of the batch's matchers (None: an unconstrained row); None when
        no row has one. The result must be taken before the next ``start``, which reuses the buffer."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._buffer.shape[0] < len(matchers):
            self._buffer = self.backend.allocate_bitmask(max(len(matchers), 2 * self._buffer.shape[0]))
            if self._pin_memory:
                self._buffer = self._buffer.pin_memory()
        bitmask = self._buffer[: len(matchers)]
        return self._thread.submit(self._fill, bitmask, [(i, matchers[i]) for i in rows])

    @staticmethod
    def _fill(bitmask: torch.Tensor, constrained: list[tuple[int, GrammarMatcher]]) -> BatchBitmask:
        for row, matcher in constrained:
            matcher.fill_bitmask(bitmask, row)
        return BatchBitmask(bitmask, [row for row, _ in constrained])
