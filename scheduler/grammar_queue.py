"""Requests waiting for their grammar to compile, and the cache of compiled grammars.

Compilation runs on worker threads, never on the scheduler loop, so a slow schema holds
back only its own requests (SGLang's grammar queue). Compiled grammars are kept in an
LRU keyed by the constraint's text; requests with the same schema share one compile.
With several ranks each compiles on its own, and rank 0 decides when requests leave
the queue (``ready_rids``, broadcast as ``GrammarsReady``) so every rank admits them in
the same step.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from srt.runtime.messages import FinishAbort
from srt.sampling.grammar.backend import GrammarBackend, GrammarError, GrammarKey
from srt.scheduler.req import Req

logger = logging.getLogger(__name__)


class GrammarQueue:
    def __init__(self, backend: GrammarBackend, cache_size: int, workers: int = 2) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar-compile")
        self._compiled: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._pending: dict[str, tuple[Req, Future]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, req: Req, key: GrammarKey) -> None:
        future = self._compiled.get(key)
        if future is None:
            future = self._pool.submit(self._compile, key)
            self._compiled[key] = future
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        self._pending[req.rid] = (req, future)

    def reqs(self) -> list[Req]:
        """The requests waiting for a compile."""
        return [req for req, _ in self._pending.values()]

    def ready_rids(self) -> list[str]:
        """Requests whose compile is over, in arrival order (rank 0 asks)."""
        return [rid for rid, (_, future) in self._pending.items() if future.done()]

    def take(self, rids: list[str]) -> list[Req]:
        """Remove these requests, each with its matcher, or finished with the compile error (a 400).
        A request aborted since rank 0 named it is gone already."""
        taken = []
        for rid in rids:
            if rid not in self._pending:
                continue
            req, future = self._pending.pop(rid)
            kind = req.params.constraint[0]
            try:
                req.grammar = self.backend.matcher(future.result(), req.stop_ids)  # blocks on ranks behind rank 0
            except GrammarError as e:
                req.finish_reason = FinishAbort(f"the {kind} does not compile: {e}", status_code=400)
                self._forget(future)
            except Exception as e:  # a library failing on odd input must not take the scheduler down
                logger.exception("compiling a %s grammar failed", kind)
                req.finish_reason = FinishAbort(f"the {kind} does not compile: {type(e).__name__}: {e}", status_code=400)
                self._forget(future)
            taken.append(req)
        return taken

    def abort(self, rid: str) -> Req | None:
        entry = self._pending.pop(rid, None)
        return entry[0] if entry else None

    def _compile(self, key: GrammarKey):
        start = time.perf_counter()
        compiled = self.backend.compile(key)
        logger.debug("compiled a %s grammar in %.1f ms", key.kind, 1000 * (time.perf_counter() - start))
        return compiled

    def _forget(self, future: Future) -> None:
        """A failed compile leaves the cache (the next request with that text tries again)."""
        for key, cached in list(self._compiled.items()):
            if cached is future:
                del self._compiled[key]
