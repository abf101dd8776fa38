"""The wire format of ``srt.runtime.messages``: msgpack of ``{"__t": class name, field: value, ...}``.

Only the dataclasses registered here decode, so a peer can never make a process build
an arbitrary object (no pickle).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from srt.runtime import messages
from srt.sampling.sampling_params import SamplingParams

_TYPES: dict[str, type] = {
    name: cls for name, cls in vars(messages).items() if isinstance(cls, type) and dataclasses.is_dataclass(cls)
}
_TYPES[SamplingParams.__name__] = SamplingParams


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
