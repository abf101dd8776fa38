"""How the host allocator hands out memory in a scheduler process.

A scheduler keeps small allocations for as long as their requests or the prefix cache
live (a cached prefix's KV slot indices, request state), while every forward step
allocates and frees large activations whose sizes change with each batch. glibc's
malloc raises its mmap threshold whenever such a large block is freed, so after the
first steps those activations come from the heap too; the long-lived small blocks
between them then keep the freed space from being reused for the next, differently
sized batch, and from being returned to the system. The heap grew with every request
(0.75 MiB per request on SmolLM2-135M, 8 concurrent clients, prompts of ~100 tokens),
without bound.

Two settings keep the process's memory flat (tests/test_soak.py) and the forward fast:

- a fixed mmap threshold of 4 MiB (which also stops glibc's dynamic raising): larger
  blocks get mappings of their own, returned when freed. Not lower: a block from a fresh
  mapping is paid in page faults on every use, and the 1-4 MiB activations of a prefill
  chunk or a decode batch's logits are allocated many times a step (a 128 KiB threshold
  cost 10-25% of offline throughput, bench_offline.py on the 124.7M Llama in bf16);
- ``malloc_trim`` every few hundred steps (``HeapTrimmer``), which hands the pages of
  freed heap blocks back to the system: what fragmentation strands between two trims is
  all it can hold (without it the 4 MiB threshold let the scheduler grow 2.9% in the soak
  test; with it 0.9%).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * 2**20
_TRIM_EVERY_STEPS = 256  # a trim and the page faults after it cost milliseconds; 256 steps take seconds


def _glibc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold() -> None:
    """Fix glibc's mmap threshold (which also stops its dynamic raising) unless the operator set
    ``MALLOC_MMAP_THRESHOLD_``; other C libraries are left as they are."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        logger.debug("no glibc mallopt: the host allocator is left as it is")
        return
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD) failed: the scheduler's memory may grow under load")


class HeapTrimmer:
    """Returns freed heap pages to the system every ``_TRIM_EVERY_STEPS`` scheduler steps (glibc only)."""

    def __init__(self) -> None:
        self._trim = _glibc_function("malloc_trim")
        self._steps = 0

    def after_step(self) -> None:
        self._steps += 1
        if self._trim is not None and self._steps % _TRIM_EVERY_STEPS == 0:
            self._trim(0)
