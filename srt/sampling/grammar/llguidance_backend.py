"""The llguidance backend: grammars as lazily built lexer + Earley parser, masks computed on
the fly (no compile step worth the name, so huge or deeply nested schemas start fast)."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import llguidance.torch

from srt.sampling.grammar.backend import GrammarBackend, GrammarError, GrammarKey, GrammarMatcher

_FORMATS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf"}


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: set[int]) -> None:
        self._matcher = matcher
        self._stop_ids = stop_ids
        self._terminated = False

    def accept(self, token: int) -> bool:
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            return False
        # llguidance stops as soon as nothing can follow; srt's "terminated" is xgrammar's, after the stop token.
        self._terminated = token in self._stop_ids and self._matcher.is_stopped()
        return True

    def fill_bitmask(self, bitmask, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._terminated


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], any_whitespace: bool) -> None:
        super().__init__(vocab_size)
        # The grammar's end is one of the model's EOS tokens (llguidance fixes them per tokenizer).
        self._eos_ids = set(eos_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids or None)
        self._any_whitespace = any_whitespace

    def compile(self, key: GrammarKey) -> str:
        text = key.text
        if key.kind == "json_schema":
            text = self._with_whitespace_option(text)
        try:
            grammar = llguidance.grammar_from(_FORMATS[key.kind], text)
            error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(str(e)) from e
        if error:
            raise GrammarError(error.strip())
        return grammar

    def matcher(self, compiled: str, stop_ids: list[int]) -> GrammarMatcher:
        return LLGuidanceMatcher(llguidance.LLMatcher(self._tokenizer, compiled), self._eos_ids)

    def _with_whitespace_option(self, text: str) -> str:
        """The schema with llguidance's ``x-guidance`` whitespace option set as srt's flag says."""
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            return text  # true / false schemas: llguidance judges them
        options = {"whitespace_flexible": self._any_whitespace, **schema.get("x-guidance", {})}
        return json.dumps({**schema, "x-guidance": options})
