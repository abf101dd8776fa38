"""The grammar backend interface, and the token bitmask both libraries fill.

A request's constraint (a JSON schema, a regex or an EBNF grammar) is compiled once per
distinct text (``GrammarKey``) into a backend object that many requests share; each
request then walks it with its own ``GrammarMatcher``. Before each sampling step a
matcher writes the tokens its grammar allows next into one row of an int32 bitmask (bit
``t % 32`` of word ``t // 32`` set when token ``t`` is allowed, xgrammar's and
llguidance's common layout), and the sampler masks a whole batch's logits with it at
once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch

from srt.kernels import cpu_kernels
from srt.platform.device import in_host_memory

GrammarKind = Literal["json_schema", "regex", "ebnf"]  # SamplingParams.constraint's kinds


class GrammarError(ValueError):
    """The constraint does not compile; the message is the library's."""


@dataclass(frozen=True)
class GrammarKey:
    kind: GrammarKind
    text: str


class GrammarMatcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance by ``token``; False when the grammar does not allow it (the matcher is then unusable:
        llguidance stops at the error)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]``."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted its stop token: nothing may follow."""


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer and vocabulary, and makes matchers of them."""

    name: str

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's vocabulary

    @abstractmethod
    def compile(self, key: GrammarKey) -> Any:
        """The compiled grammar (shared, read-only); GrammarError if it does not compile. Runs in a
        worker thread."""

    @abstractmethod
    def matcher(self, compiled: Any, stop_ids: list[int]) -> GrammarMatcher:
        """A fresh matcher whose grammar ends with one of ``stop_ids``."""

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)


def create_grammar_backend(name: str, tokenizer, vocab_size: int, eos_ids: list[int], any_whitespace: bool) -> GrammarBackend | None:
    """The backend ``--grammar-backend`` names; None for ``none``, and without a tokenizer
    (``--skip-tokenizer-init``), where the front refuses constrained requests by name."""
    if name == "none" or tokenizer is None:
        return None
    if name == "xgrammar":
        from srt.sampling.grammar.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, eos_ids, any_whitespace)
    if name == "llguidance":
        from srt.sampling.grammar.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, eos_ids, any_whitespace)
    raise ValueError(f"unknown grammar backend {name!r}")


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``logits[r, t]`` to -inf for every row ``r`` in ``rows`` and token ``t`` that
    ``bitmask[r]`` disallows, in place (the other rows are left as they are).

    Both libraries share the layout, so one kernel serves either backend: srt's C kernel on
    CPUs (it skips whole words of allowed or disallowed tokens; xgrammar's CPU loop takes
    6.5 ms for 32 sparse rows of 49152), xgrammar's CUDA or Triton kernel on GPUs."""
    if in_host_memory(logits.device) and cpu_kernels.available():
        cpu_kernels.apply_token_bitmask(logits, bitmask, rows)
        return
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
