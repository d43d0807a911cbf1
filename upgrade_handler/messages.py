"""Parsing and validation of request messages (contract §1 and §6).

:func:`parse_request` is the only place a message body is read. It either returns a typed
request whose every id has been checked against the rule for its kind, or raises
:class:`InvalidMessageError` naming the rule that was broken. Nothing else in the package
looks at raw JSON.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import InvalidMessageError
from .versions import Version

MAX_BODY_BYTES = 65_536
MAX_PERMISSIONS = 50
MAX_FAN_OUT_USERS = 1_000

_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_UPN_LOCAL = re.compile(r"[A-Za-z0-9'.\-_!#^~]+")
_DNS_NAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_INSTALLATION_ID = re.compile(r"[A-Za-z0-9+_\-=]+")
_CHAT_ID = re.compile(r"19:[A-Za-z0-9_.\-]+@(?:thread\.v2|unq\.gbl\.spaces)")
_PERMISSION_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9.]*")
_MAX_UPN = 113
_MAX_INSTALLATION_ID = 256
_MAX_CHAT_ID = 512
_MAX_EXTERNAL_ID = 256
_ROLLOUT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class Scope(Enum):
    USER = "user"
    TEAM = "team"
    CHAT = "chat"


class AppKind(Enum):
    INSTALLATION = "appInstallationId"
    TEAMS_APP_ID = "teamsAppId"
    EXTERNAL_ID = "externalId"


@dataclass(frozen=True, slots=True)
class Target:
    """Whose installation: a user (GUID or UPN), a team or a chat. ``id`` is validated."""

    scope: Scope
    id: str


@dataclass(frozen=True, slots=True)
class AppRef:
    """Which installation: its id, or the catalog app id / manifest id to look it up by."""

    kind: AppKind
    value: str


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """One installation to upgrade (contract §1)."""

    target: Target
    app: AppRef
    consented_permission_set: Mapping[str, Any] | None
    request_id: str | None
    skip_if_not_installed: bool
    version: Version | None = None
    """The version that should end up installed (§8); ``None``: upgrade to the catalog's latest."""
    rollout_id: str | None = None
    """The rollout named in the message (§8); the handler defaults it when absent."""


@dataclass(frozen=True, slots=True)
class FanOutRequest:
    """An app to upgrade for many users (contract §6): a list of users, or a group's members.

    ``next_link`` is set on a continuation message: the Graph page of the group to read next.
    """

    app: AppRef
    consented_permission_set: Mapping[str, Any] | None
    request_id: str | None
    user_ids: tuple[str, ...] = ()
    group_id: str | None = None
    next_link: str | None = None
    version: Version | None = None
    rollout_id: str | None = None


Request = UpgradeRequest | FanOutRequest

_SCOPE_FIELDS = ("userId", "teamId", "chatId", "userIds", "groupId")
_APP_FIELDS = tuple(kind.value for kind in AppKind)
#: The field a continuation message carries the group's next page in (contract §6).
NEXT_LINK_FIELD = "groupNextLink"


def parse_request(body: bytes) -> Request:
    """Read a message body into a typed request, or raise :class:`InvalidMessageError`."""
    request = _unwrap_envelope(_decode_json(body))
    scope_fields = [name for name in _SCOPE_FIELDS if request.get(name) is not None]
    app_fields = [name for name in _APP_FIELDS if request.get(name) is not None]
    if len(scope_fields) != 1:
        raise InvalidMessageError(
            "exactly one of userId, teamId, chatId, userIds, groupId is required"
            + (f", found {', '.join(scope_fields)}" if scope_fields else "")
        )
    if len(app_fields) != 1:
        raise InvalidMessageError(
            "exactly one of appInstallationId, teamsAppId, externalId is required"
            + (f", found {', '.join(app_fields)}" if app_fields else "")
        )
    scope_field, app_field = scope_fields[0], app_fields[0]
    app = _app_ref(AppKind(app_field), request[app_field])
    permissions = _permission_set(request.get("consentedPermissionSet"))
    request_id = _request_id(request.get("requestId"))
    version = _version(request.get("version"))
    rollout_id = _rollout_id(request.get("rolloutId"))

    if scope_field in ("userIds", "groupId"):
        if app.kind is AppKind.INSTALLATION:
            raise InvalidMessageError(
                f"{scope_field} needs teamsAppId or externalId: an appInstallationId belongs to one user"
            )
        if scope_field == "userIds":
            return FanOutRequest(
                app,
                permissions,
                request_id,
                user_ids=_user_ids(request["userIds"]),
                version=version,
                rollout_id=rollout_id,
            )
        return FanOutRequest(
            app,
            permissions,
            request_id,
            group_id=_guid("groupId", request["groupId"]),
            next_link=_next_link(request.get(NEXT_LINK_FIELD)),
            version=version,
            rollout_id=rollout_id,
        )

    target = {
        "userId": lambda v: Target(Scope.USER, validate_user_id("userId", v)),
        "teamId": lambda v: Target(Scope.TEAM, _guid("teamId", v)),
        "chatId": lambda v: Target(Scope.CHAT, _chat_id(v)),
    }[scope_field](request[scope_field])
    return UpgradeRequest(
        target, app, permissions, request_id, _skip_if_not_installed(request), version=version, rollout_id=rollout_id
    )


def is_rollout_id(value: str) -> bool:
    """Whether ``value`` may name a rollout: 1 to 128 of ``A-Z a-z 0-9 . _ -``."""
    return _ROLLOUT_ID.fullmatch(value) is not None


def _version(value: Any) -> Version | None:
    if value is None:
        return None
    try:
        return Version.parse(value)
    except ValueError as error:
        raise InvalidMessageError(f"version: {error}") from None


def _rollout_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_rollout_id(value):
        raise InvalidMessageError("rolloutId must be 1 to 128 characters of A-Z a-z 0-9 . _ -")
    return value


def _decode_json(body: bytes) -> Any:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessageError(f"body is {len(body)} bytes, more than the {MAX_BODY_BYTES} allowed")
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8) :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidMessageError(f"body is not UTF-8 (byte {error.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise InvalidMessageError(
            f"body is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise InvalidMessageError("body is nested too deeply") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise InvalidMessageError(f"field {key!r} appears twice")
        document[key] = value
    return document


def _no_constants(name: str) -> Any:
    raise InvalidMessageError(f"{name} is not a JSON value")


def _unwrap_envelope(document: Any) -> dict[str, Any]:
    if isinstance(document, list):
        raise InvalidMessageError("body is a JSON array; one request (or one event) per message is expected")
    if not isinstance(document, dict):
        raise InvalidMessageError("body is not a JSON object")
    if "specversion" in document:
        kind, required = "CloudEvents event", ("type", "source", "id", "data")
        if document["specversion"] != "1.0":
            raise InvalidMessageError(f"CloudEvents specversion {document['specversion']!r} is not 1.0")
    elif "eventType" in document and "data" in document:
        kind, required = "Event Grid event", ("subject", "dataVersion", "id", "data")
    else:
        return document
    missing = [name for name in required if name not in document]
    if missing:
        raise InvalidMessageError(f"{kind} lacks {', '.join(missing)}")
    data = document["data"]
    if not isinstance(data, dict):
        raise InvalidMessageError(f"{kind} data is not a JSON object")
    return data


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidMessageError(f"{field} must be a string")
    if not value:
        raise InvalidMessageError(f"{field} is empty")
    return value


def _guid(field: str, value: Any) -> str:
    text = _string(field, value)
    if not _GUID.fullmatch(text):
        raise InvalidMessageError(f"{field} is not a GUID")
    return text


def validate_user_id(field: str, value: Any) -> str:
    text = _string(field, value)
    if _GUID.fullmatch(text):
        return text
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise InvalidMessageError(f"{field} is neither a GUID nor a user principal name (local@domain)")
    if len(text) > _MAX_UPN:
        raise InvalidMessageError(f"{field} is longer than {_MAX_UPN} characters")
    if not _UPN_LOCAL.fullmatch(local):
        raise InvalidMessageError(f"{field} has characters a user principal name cannot have before the @")
    if not _DNS_NAME.fullmatch(domain) or len(domain) > 253:
        raise InvalidMessageError(f"{field} domain is not a DNS name")
    return text


def _chat_id(value: Any) -> str:
    text = _string("chatId", value)
    if len(text) > _MAX_CHAT_ID:
        raise InvalidMessageError(f"chatId is longer than {_MAX_CHAT_ID} characters")
    if not _CHAT_ID.fullmatch(text):
        raise InvalidMessageError("chatId is not of the form 19:…@thread.v2 or 19:…@unq.gbl.spaces")
    return text


def _app_ref(kind: AppKind, value: Any) -> AppRef:
    text = _string(kind.value, value)
    if kind is AppKind.INSTALLATION:
        if len(text) > _MAX_INSTALLATION_ID:
            raise InvalidMessageError(f"appInstallationId is longer than {_MAX_INSTALLATION_ID} characters")
        if not _INSTALLATION_ID.fullmatch(text):
            raise InvalidMessageError("appInstallationId may hold only A-Z a-z 0-9 + _ - = (base64 without /)")
    elif kind is AppKind.TEAMS_APP_ID:
        _guid("teamsAppId", text)
    else:
        if len(text) > _MAX_EXTERNAL_ID:
            raise InvalidMessageError(f"externalId is longer than {_MAX_EXTERNAL_ID} characters")
        if not text.isprintable():
            raise InvalidMessageError("externalId has characters that are not printable")
    return AppRef(kind, text)


def _permission_set(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("resourceSpecificPermissions"), list):
        raise InvalidMessageError("consentedPermissionSet must be an object with a resourceSpecificPermissions list")
    entries = value["resourceSpecificPermissions"]
    if len(entries) > MAX_PERMISSIONS:
        raise InvalidMessageError(f"consentedPermissionSet has more than {MAX_PERMISSIONS} permissions")
    permissions = []
    for index, entry in enumerate(entries):
        where = f"consentedPermissionSet.resourceSpecificPermissions[{index}]"
        if not isinstance(entry, dict):
            raise InvalidMessageError(f"{where} is not an object")
        permission_value = entry.get("permissionValue")
        permission_type = entry.get("permissionType")
        if not isinstance(permission_value, str) or not _PERMISSION_VALUE.fullmatch(permission_value):
            raise InvalidMessageError(f"{where}.permissionValue is not a permission name")
        if not isinstance(permission_type, str) or permission_type.lower() not in ("application", "delegated"):
            raise InvalidMessageError(f"{where}.permissionType must be Application or Delegated")
        permissions.append({"permissionValue": permission_value, "permissionType": permission_type})
    return {"resourceSpecificPermissions": permissions}


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessageError("requestId must be a string")
    # Never reaches a URL, only logs (which keep each value on one short line): no further rule.
    return value or None


def _skip_if_not_installed(request: Mapping[str, Any]) -> bool:
    value = request.get("ifNotInstalled")
    if value is None:
        return False
    if not isinstance(value, str) or value.lower() not in ("deadletter", "skip"):
        raise InvalidMessageError("ifNotInstalled must be deadletter or skip")
    return value.lower() == "skip"


def _user_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidMessageError("userIds must be an array")
    if not 1 <= len(value) <= MAX_FAN_OUT_USERS:
        raise InvalidMessageError(f"userIds must hold 1 to {MAX_FAN_OUT_USERS} users, not {len(value)}")
    ids = tuple(validate_user_id(f"userIds[{index}]", item) for index, item in enumerate(value))
    return tuple(dict.fromkeys(ids))


def _next_link(value: Any) -> str | None:
    if value is None:
        return None
    return _string(NEXT_LINK_FIELD, value)
