"""JSON schemas for testing constrained decoding: hand-written ones for each feature, plus
seeded random compositions of them.

Every string is bounded (maxLength, a pattern or an enum) and every array has maxItems,
so that a random-weight model, whose unconstrained choices are noise, still finishes
each object within a few hundred tokens.
"""

from __future__ import annotations

import random
from typing import Any

Schema = dict[str, Any]

LEAVES: list[Schema] = [
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "integer", "minimum": -50, "maximum": 1000},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    {"type": "number", "minimum": -1.5, "maximum": 2.5},
    {"type": "string", "maxLength": 6},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^[a-z]{1,6}$"},
    {"type": "string", "pattern": "^[A-Z][0-9]{2}-[a-f]{1,3}$"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, 2, "three", None, True]},
    {"const": "fixed"},
    {"type": "boolean"},
    {"type": "null"},
]

FEATURES: list[Schema] = [
    # nested objects, required and optional properties
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    # arrays with min / max items, of objects
    {
        "type": "array",
        "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["id"]},
        "minItems": 2,
        "maxItems": 4,
    },
    # $ref into $defs, used twice, one of them in an array
    {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]}},
        "type": "object",
        "properties": {"origin": {"$ref": "#/$defs/point"}, "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3}},
        "required": ["origin", "path"],
    },
    # anyOf, and a type list
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 3}, {"type": "null"}]},
    {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
    # an enum of objects' tag with a nested array of enums
    {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}, "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3, "uniqueItems": False}},
        "required": ["kind", "tags"],
    },
    # a tuple (prefixItems)
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 2}], "items": False},
    # a whole document, three levels deep
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 10},
            "sections": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "heading": {"type": "string", "pattern": "^[A-Z][a-z]{0,4}$"},
                        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 3},
                    },
                    "required": ["heading"],
                },
            },
        },
        "required": ["title", "sections"],
    },
]


def _random_schema(rng: random.Random, depth: int) -> Schema:
    kind = rng.choice(["leaf", "leaf", "object", "array", "anyOf"] if depth < 3 else ["leaf"])
    if kind == "leaf":
        return dict(rng.choice(LEAVES))
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _random_schema(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 2)}
    if kind == "anyOf":
        return {"anyOf": [_random_schema(rng, depth + 1) for _ in range(2)]}
    names = rng.sample(["id", "name", "value", "items", "meta", "flag", "score"], rng.randint(1, 4))
    properties = {name: _random_schema(rng, depth + 1) for name in names}
    required = [name for name in names if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def schemas(count: int, seed: int = 0) -> list[Schema]:
    """``count`` schemas: the feature schemas, then random compositions (objects at the top)."""
    rng = random.Random(seed)
    out = [dict(s) for s in FEATURES]
    while len(out) < count:
        schema = _random_schema(rng, 0)
        if schema.get("type") == "object" or len(out) % 4 == 0:
            out.append(schema)
    return out[:count]
