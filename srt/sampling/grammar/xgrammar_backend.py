"""The xgrammar backend (the default): grammars compiled to token-level pushdown automata
with precomputed masks for context-independent tokens."""

from __future__ import annotations

import xgrammar

from srt.sampling.grammar.backend import GrammarBackend, GrammarError, GrammarKey, GrammarMatcher


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        return self._matcher.accept_token(token)

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], any_whitespace: bool) -> None:
        super().__init__(vocab_size)
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids or None)
        # srt keeps its own LRU of compiled grammars, so xgrammar's unbounded one stays off.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._any_whitespace = any_whitespace

    def compile(self, key: GrammarKey) -> xgrammar.CompiledGrammar:
        try:
            if key.kind == "json_schema":
                grammar = xgrammar.Grammar.from_json_schema(key.text, any_whitespace=self._any_whitespace)
                return self._compiler.compile_grammar(_without_raw_control_characters(str(grammar)))
            if key.kind == "regex":
                return self._compiler.compile_regex(key.text)
            return self._compiler.compile_grammar(key.text)
        except (RuntimeError, ValueError) as e:  # xgrammar raises RuntimeError with the parser's message
            raise GrammarError(_clean(str(e))) from e

    def matcher(self, compiled: xgrammar.CompiledGrammar, stop_ids: list[int]) -> GrammarMatcher:
        return XGrammarMatcher(xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None))


# xgrammar (0.2.9) writes the characters of strings with minLength / maxLength as this class,
# which lets raw control characters through: output no JSON parser accepts (RFC 8259 wants
# U+0000-U+001F escaped). Its other string rules exclude them; this one is made to as well.
_LENGTH_BOUNDED_CHARACTER = r'[^\"\\\r\n]'
_JSON_STRING_CHARACTER = r'[^\0-\x1f\"\\]'


def _without_raw_control_characters(ebnf: str) -> str:
    return ebnf.replace(_LENGTH_BOUNDED_CHARACTER, _JSON_STRING_CHARACTER)


def _clean(message: str) -> str:
    """The message without xgrammar's ``[time] file.cc:line:`` prefix."""
    head, sep, rest = message.partition(": ")
    return rest.strip() if sep and ".cc:" in head else message.strip()
