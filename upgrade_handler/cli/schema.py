"""The JSON Schema of a request message (``upgrade_handler/schema/request.schema.json``).

The function's parser, :func:`upgrade_handler.messages.parse_request`, is the authority on what
is valid; the schema documents the same rules for producers (editors, other languages) and
``send`` checks it too, as a second opinion. The tests hold the two to the same verdicts.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

SCHEMA_RESOURCE = "schema/request.schema.json"


@cache
def request_schema() -> dict[str, Any]:
    text = resources.files("upgrade_handler").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> Draft202012Validator:
    schema = request_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_error(document: Any) -> str | None:
    """Why ``document`` (parsed JSON) does not match the schema, or ``None`` when it does."""
    error = best_match(_validator().iter_errors(document))
    if error is None:
        return None
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    return f"{where.lstrip('.') or 'body'}: {error.message}"
