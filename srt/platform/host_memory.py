"""How the host allocator hands out memory in a scheduler process.

A scheduler keeps small allocations for as long as their requests or the prefix cache
live (a cached prefix's KV slot indices, request state), while every forward step
allocates and frees large activations whose sizes change with each batch. glibc's
malloc raises its mmap threshold whenever such a large block is freed, so after the
first steps those activations come from the heap too; the long-lived small blocks
between them then keep the freed space from being reused for the next, differently
sized batch, and from being returned to the system. The heap grew with every request
(0.75 MiB per request on SmolLM2-135M, 8 concurrent clients, prompts of ~100 tokens),
without bound. A fixed threshold keeps large blocks in their own mappings, returned to the
system when freed, and the process's memory flat (tests/test_soak.py).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, fixed


def fix_mmap_threshold() -> None:
    """Fix glibc's mmap threshold (which also stops its dynamic raising) unless the operator set
    ``MALLOC_MMAP_THRESHOLD_``; other C libraries are left as they are."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.debug("no glibc mallopt: the host allocator is left as it is")
        return
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD) failed: the scheduler's memory may grow under load")
