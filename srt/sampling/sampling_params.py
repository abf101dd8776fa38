"""SamplingParams: per-request decoding settings, with SGLang's names and checks."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin

_MAX_SEED = 2**31 - 1
_CONSTRAINTS = ("json_schema", "regex", "ebnf")
_INT64_MAX = 2**63 - 1  # integers reach int64 tensors


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    # Constrained decoding, one at a time (SGLang's names): the output must match the JSON
    # schema (its JSON text), the regular expression, or the EBNF grammar (root rule ``root``).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, vocab_size: int | None = None) -> "SamplingParams":
        """Parse and check the parameters (token ids against ``vocab_size`` when given); ValueError says what is wrong."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        for key in ("stop", "stop_token_ids"):
            if values.get(key) is None:
                values.pop(key, None)
        try:
            if values.get("logit_bias"):
                values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
            elif "logit_bias" in values:
                values.pop("logit_bias")
            if isinstance(values.get("json_schema"), (dict, bool)):  # a schema given as JSON, not as its text
                values["json_schema"] = json.dumps(values["json_schema"])
            params = cls(**values)
            params.validate(vocab_size)
        except (TypeError, AttributeError) as e:  # a value of the wrong type, e.g. temperature: "hot"
            raise ValueError(f"invalid sampling parameters: {e}") from e
        return params

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the grammar the output must follow, if any."""
        return next(((kind, getattr(self, kind)) for kind in _CONSTRAINTS if getattr(self, kind) is not None), None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        hints = _field_types()
        for f in fields(self):
            value = getattr(self, f.name)
            require(_conforms(value, hints[f.name]), f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")

        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        require(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens, f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        require(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        require(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        require(0 < self.repetition_penalty <= 2, f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        require(isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n!r}")
        require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= _MAX_SEED), f"seed must be an integer in [0, {_MAX_SEED}], got {self.seed!r}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        given = [kind for kind in _CONSTRAINTS if getattr(self, kind) is not None]
        require(len(given) <= 1, f"only one of json_schema, regex and ebnf may be given, got {' and '.join(given)}")
        require(all(getattr(self, kind) for kind in given), f"{''.join(given)} must not be empty")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from e
        if vocab_size is not None:
            bad = [t for t in [*self.stop_token_ids, *self.logit_bias] if not 0 <= t < vocab_size]
            require(not bad, f"token ids out of the vocabulary (size {vocab_size}): {bad[:5]}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(SamplingParams)  # the annotations are strings (postponed evaluation)


def _conforms(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of ``kind``: bools only as bools, integers within int64, finite floats,
    strings that are valid Unicode (a lone surrogate cannot be encoded, tokenized or sent)."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and -_INT64_MAX <= value <= _INT64_MAX
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str) and is_valid_unicode(value)
    if kind is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    raise TypeError(f"no check for {kind}")


def _describe(kind: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    origin, args = get_origin(kind), get_args(kind)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of token ids to finite numbers"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return names[kind]


def is_valid_unicode(text: str) -> bool:
    """False for text with lone surrogates (which JSON's \\u escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
