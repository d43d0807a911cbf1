"""Upgrade requests as an operator writes them: flags, JSON Lines, CSV or JSON files.

Every request is checked with the function's own parser (:func:`parse_request`) and then with the
JSON Schema, before anything is sent; :func:`prepare` reports every bad line with its number.
A message id is derived from the request's content (:func:`message_id_for`), so sending the same
file twice gives the same ids and the queue's duplicate detection drops the second copy.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from azure.servicebus import ServiceBusMessage

from ..errors import InvalidMessageError
from ..messages import parse_request
from .output import describe_request
from .schema import schema_error

#: Namespace of the content-derived message ids (a fixed, project-specific UUID; never change it,
#: or a resend after an upgrade of this tool would no longer be recognised as a duplicate).
MESSAGE_ID_NAMESPACE = uuid.UUID("9d1c5c4e-7b0a-4f3e-8a61-2f0d6b7c9e15")
CONTENT_TYPE = "application/json"
#: How many invalid lines are listed before the rest are only counted.
MAX_PROBLEMS_SHOWN = 20

#: CSV columns: the request's own field names (contract §1 and §6), plus ``permissions``.
CSV_FIELDS = (
    "userId",
    "teamId",
    "chatId",
    "userIds",
    "groupId",
    "appInstallationId",
    "teamsAppId",
    "externalId",
    "requestId",
    "ifNotInstalled",
    "permissions",
    "consentedPermissionSet",
)
FORMATS = ("jsonl", "csv", "json")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request that passed validation, ready to send."""

    where: str
    """Where it came from: ``line 3``, ``item 2``, ``flags``."""
    document: Mapping[str, Any]
    body: bytes
    message_id: str
    summary: str

    def message(
        self, *, correlation_id: str | None = None, properties: Mapping[str, Any] | None = None
    ) -> ServiceBusMessage:
        return ServiceBusMessage(
            self.body,
            message_id=self.message_id,
            content_type=CONTENT_TYPE,
            correlation_id=correlation_id,
            application_properties=dict(properties) if properties else None,  # type: ignore[arg-type]
        )


class RequestError(Exception):
    """Input that is not a valid request; ``problems`` are ``(where, why)`` pairs, all of them."""

    def __init__(self, problems: Sequence[tuple[str, str]], total: int) -> None:
        self.problems = list(problems)
        self.total = total
        super().__init__(f"{len(self.problems)} of {total} requests are invalid")

    def lines(self) -> list[str]:
        shown = [f"{where}: {why}" for where, why in self.problems[:MAX_PROBLEMS_SHOWN]]
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            shown.append(f"... and {hidden} more")
        return shown


def canonical_json(document: Any) -> str:
    """Key order and spacing do not matter: ``{"b":1,"a":2}`` and ``{ "a": 2, "b": 1 }`` are one text."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def message_id_for(document: Any) -> str:
    """``uuid5`` of the request's canonical JSON: the same request always gets the same id."""
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, canonical_json(document)))


def body_of(document: Any) -> bytes:
    """The message body: the request as given (its key order kept), compact UTF-8 JSON."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def problem_with(document: Any) -> str | None:
    """Why the function would refuse ``document`` (its own words), or what the schema objects to."""
    try:
        parse_request(body_of(document))
    except InvalidMessageError as error:
        return error.reason
    disagreement = schema_error(document)
    return f"does not match the request schema: {disagreement}" if disagreement else None


def prepare(items: Iterable[tuple[str, Any]]) -> list[PreparedRequest]:
    """Validate every ``(where, document)``; raise :class:`RequestError` listing all bad ones.

    A document that is an ``Exception`` stands for a line that could not be read at all.
    """
    prepared: list[PreparedRequest] = []
    problems: list[tuple[str, str]] = []
    total = 0
    for where, document in items:
        total += 1
        if isinstance(document, Exception):
            problems.append((where, str(document)))
            continue
        problem = problem_with(document)
        if problem is not None:
            problems.append((where, problem))
            continue
        body = body_of(document)
        prepared.append(PreparedRequest(where, document, body, message_id_for(document), describe_request(body)))
    if problems:
        raise RequestError(problems, total)
    if total == 0:
        raise RequestError([("input", "holds no request")], 0)
    return prepared


# --- reading -----------------------------------------------------------------------------------


def detect_format(path: str, given: str | None) -> str:
    if given:
        return given
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".json"):
        return suffix[1:]
    raise RequestError([(path, "cannot tell the format from the file name: give --format jsonl, csv or json")], 0)


def read_requests(stream: TextIO, fmt: str) -> Iterator[tuple[str, Any]]:
    """``(where, document)`` for each request in the stream; a line that is not one yields an exception."""
    if fmt == "jsonl":
        yield from _jsonl(stream)
    elif fmt == "csv":
        yield from _csv(stream)
    elif fmt == "json":
        yield from _json(stream)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return ValueError(f"not JSON: {error.msg} at column {error.colno}")


def _jsonl(stream: TextIO) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield f"line {number}", _loads(line.lstrip("\ufeff").rstrip("\r\n"))


def _json(stream: TextIO) -> Iterator[tuple[str, Any]]:
    document = _loads(stream.read().lstrip("\ufeff"))
    if isinstance(document, list):
        for number, item in enumerate(document, start=1):
            yield f"item {number}", item
    else:
        yield "file", document


def _csv(stream: TextIO) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(stream.read().lstrip("\ufeff")))
    columns = [name.strip() for name in reader.fieldnames or []]
    unknown = [name for name in columns if name not in CSV_FIELDS]
    if unknown:
        known = ", ".join(CSV_FIELDS)
        yield "line 1", ValueError(f"unknown column {', '.join(unknown)} (the columns are the request fields: {known})")
        return
    for row in reader:
        where = f"line {reader.line_num}"
        try:
            document = csv_row_request({key.strip() if key else key: value for key, value in row.items()})
        except ValueError as error:
            yield where, error
            continue
        if document:
            yield where, document


def csv_row_request(row: Mapping[str | None, Any]) -> dict[str, Any]:
    """One CSV row as a request: empty cells are left out, ``userIds`` and ``permissions`` are ``;``-lists."""
    document: dict[str, Any] = {}
    for column in CSV_FIELDS:
        value = row.get(column)
        if isinstance(value, list):  # a row with more cells than columns
            raise ValueError("has more cells than the header has columns")
        text = (value or "").strip()
        if not text:
            continue
        if column == "userIds":
            document["userIds"] = [item.strip() for item in text.split(";") if item.strip()]
        elif column == "permissions":
            document["consentedPermissionSet"] = permission_set(text.split(";"))
        elif column == "consentedPermissionSet":
            parsed = _loads(text)
            if isinstance(parsed, Exception):
                raise ValueError(f"consentedPermissionSet is {parsed}")
            document["consentedPermissionSet"] = parsed
        else:
            document[column] = text
    if row.get(None):
        raise ValueError("has more cells than the header has columns")
    return document


def permission_set(entries: Iterable[str]) -> dict[str, Any]:
    """``["TeamsActivity.Send.User:Application", "Chat.Read.Chat"]`` as a ``consentedPermissionSet``.

    The type after ``:`` defaults to ``Application``.
    """
    permissions = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        value, _, kind = text.partition(":")
        permissions.append({"permissionValue": value.strip(), "permissionType": kind.strip() or "Application"})
    return {"resourceSpecificPermissions": permissions}


#: ``argparse`` dest -> request field, for requests written as flags.
FLAG_FIELDS = {
    "user_id": "userId",
    "team_id": "teamId",
    "chat_id": "chatId",
    "user_ids": "userIds",
    "group_id": "groupId",
    "app_installation_id": "appInstallationId",
    "teams_app_id": "teamsAppId",
    "external_id": "externalId",
    "request_id": "requestId",
    "if_not_installed": "ifNotInstalled",
}


def request_from_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """A request from parsed flags (``user_id``, ``teams_app_id``, ``permission``, ...); absent flags are left out."""
    document: dict[str, Any] = {}
    for dest, field in FLAG_FIELDS.items():
        value = values.get(dest)
        if value is None:
            continue
        if dest == "user_ids":
            value = [item.strip() for part in value for item in part.split(",") if item.strip()]
        document[field] = value
    if values.get("permission"):
        document["consentedPermissionSet"] = permission_set(values["permission"])
    return document
