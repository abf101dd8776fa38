"""Messages between the processes: plain dataclasses, encoded as msgpack ``[tag, fields]`` (no pickle)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = True  # False: the scheduler sends one output, when the request finishes


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class InternalState:
    free_kv_slots: int
    total_kv_slots: int
    cached_tokens: int
    evictable_tokens: int
    running_requests: int
    waiting_requests: int
    free_request_slots: int
    total_request_slots: int
    num_retractions: int
    cache_hit_rate: float

    @classmethod
    def combine(cls, states: list["InternalState"]) -> "InternalState":
        """Counts summed over data-parallel replicas; the hit rate averaged."""
        if len(states) == 1:
            return states[0]
        summed = {
            f.name: sum(getattr(s, f.name) for s in states) for f in dataclasses.fields(cls) if f.name != "cache_hit_rate"
        }
        return cls(**summed, cache_hit_rate=sum(s.cache_hit_rate for s in states) / len(states))


@dataclass
class DetokInit:
    """What the detokenizer needs to know about a request, sent with its first output."""

    prompt_tail: list[int]  # the last prompt tokens, decoding context for the first output token
    stop: list[str]
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    no_stop_trim: bool


@dataclass
class ReqOutput:
    """What one request gained in one scheduler step."""

    rid: str
    new_token_ids: list[int]
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] = field(default_factory=list)  # one per new token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # one list per new token
    detok_init: DetokInit | None = None
    text: str = ""  # filled in by the detokenizer: new text since the last output


@dataclass
class BatchTokenOut:
    """Scheduler to detokenizer: token ids. Detokenizer to TokenizerManager: the same, with text."""

    outputs: list[ReqOutput]


@dataclass
class FlushCacheDone:
    success: bool


_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        TokenizedGenerateReq,
        AbortReq,
        FlushCacheReq,
        GetInternalStateReq,
        InternalState,
        DetokInit,
        ReqOutput,
        BatchTokenOut,
        FlushCacheDone,
    )
}


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {"__t": type(obj).__name__, **{f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    return obj


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, dict):
        values = {k: _from_wire(v) for k, v in obj.items() if k != "__t"}
        tag = obj.get("__t")
        return _TYPES[tag](**values) if tag else values
    if isinstance(obj, list):
        return [_from_wire(x) for x in obj]
    return obj


def encode(message: Any) -> bytes:
    return msgpack.packb(_to_wire(message), use_bin_type=True)


def decode(data: bytes) -> Any:
    return _from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))
