"""SamplingParams: per-request decoding settings, with SGLang's names and checks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_MAX_SEED = 2**31 - 1


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
            params = cls(**values)
            params.validate(vocab_size)
        except (TypeError, AttributeError) as e:  # a value of the wrong type, e.g. temperature: "hot"
            raise ValueError(f"invalid sampling parameters: {e}") from e
        return params

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

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
        if vocab_size is not None:
            bad = [t for t in [*self.stop_token_ids, *self.logit_bias] if not 0 <= t < vocab_size]
            require(not bad, f"token ids out of the vocabulary (size {vocab_size}): {bad[:5]}")
