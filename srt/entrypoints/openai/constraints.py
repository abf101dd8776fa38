"""Structured output on the OpenAI routes: ``response_format`` and SGLang's ``regex`` /
``json_schema`` / ``ebnf`` body fields become one grammar constraint of the sampling
parameters, which the scheduler's grammar backend enforces token by token."""

from __future__ import annotations

import json
from typing import Any

from srt.entrypoints.errors import APIError
from srt.entrypoints.openai.protocol import SamplingRequest

# OpenAI's json_object: any JSON object.
ANY_JSON_OBJECT = json.dumps({"type": "object"})


def constraint_params(body: SamplingRequest) -> dict[str, Any]:
    """The sampling parameter (``json_schema``, ``regex`` or ``ebnf``) the body asks for, if any."""
    given: dict[str, Any] = {}
    for name in ("regex", "json_schema", "ebnf"):
        value = getattr(body, name)
        if value is not None:
            given[name] = value if isinstance(value, str) else json.dumps(value)
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        if given:
            raise APIError(400, f"response_format and {next(iter(given))} cannot be combined", param="response_format")
        if response_format.type == "json_object":
            given["json_schema"] = ANY_JSON_OBJECT
        else:
            if response_format.json_schema is None:
                raise APIError(400, "response_format json_schema needs its json_schema field", param="response_format")
            given["json_schema"] = json.dumps(response_format.json_schema.schema_)
    if len(given) > 1:
        raise APIError(400, f"only one of {' and '.join(given)} may be given", param=next(iter(given)))
    return given
