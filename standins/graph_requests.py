"""Graph's request semantics for the simulated routes, as pure functions, minus HTTP.

Routing on decoded path segments (:func:`parse_route`), the upgrade body's shape, the JSON of an
installation, group paging tokens. They raise :class:`GraphError` with the status, code and message
Graph uses; the simulator turns that into a response with Graph's headers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .graph_tenant import InstallationView, Scope


@dataclass(frozen=True)
class Route:
    kind: str | None  # "upgrade" | "list" | "installation" | "catalog" | "group" | None (unroutable)
    version: str = "v1.0"
    scope: Scope = "user"
    target: str = ""
    installation: str = ""
    error: tuple[int, str, str] | None = None  # status, code, message


# Path patterns; None = an id segment, a frozenset = one of these (lower-case) literals.
_UPGRADE_ACTION = frozenset({"upgrade", "microsoft.graph.upgrade"})
_PATTERNS: list[tuple[str, str, Scope, tuple[str | frozenset[str] | None, ...]]] = [
    ("list", "GET", "user", ("users", None, "teamwork", "installedapps")),
    ("installation", "GET", "user", ("users", None, "teamwork", "installedapps", None)),
    ("upgrade", "POST", "user", ("users", None, "teamwork", "installedapps", None, _UPGRADE_ACTION)),
    ("list", "GET", "team", ("teams", None, "installedapps")),
    ("installation", "GET", "team", ("teams", None, "installedapps", None)),
    ("upgrade", "POST", "team", ("teams", None, "installedapps", None, _UPGRADE_ACTION)),
    ("list", "GET", "chat", ("chats", None, "installedapps")),
    ("installation", "GET", "chat", ("chats", None, "installedapps", None)),
    ("upgrade", "POST", "chat", ("chats", None, "installedapps", None, _UPGRADE_ACTION)),
    ("catalog", "GET", "user", ("appcatalogs", "teamsapps")),
    ("group", "GET", "user", ("groups", None, "transitivemembers", "microsoft.graph.user")),
    ("group", "GET", "user", ("groups", None, "transitivemembers")),
]


def parse_route(method: str, segments: tuple[str, ...]) -> Route:
    """Route on decoded segments: an id can never add, remove or climb a path level."""
    if not segments or segments[0].lower() not in ("v1.0", "beta"):
        return Route(None, error=(400, "BadRequest", f"Invalid version: {segments[0] if segments else ''}"))
    version, rest = segments[0], segments[1:]
    if rest and rest[0].lower() == "me":
        msg = "/me request is only valid with delegated authentication flow."
        return Route(None, version, error=(400, "BadRequest", msg))
    deepest = 0  # how many segments some pattern accepted, to name the first unknown one
    for kind, verb, scope, pattern in _PATTERNS:
        matched = 0
        for want, got in zip(pattern, rest, strict=False):
            if not _segment_matches(want, got):
                break
            matched += 1
        deepest = max(deepest, matched)
        if matched == len(pattern) == len(rest):
            if method != verb:
                msg = "Specified HTTP method is not allowed for the request target."
                return Route(None, version, error=(405, "BadRequest", msg))
            installation = rest[pattern.index(None, 2)] if kind in ("upgrade", "installation") else ""
            return Route(kind, version, scope, rest[1], installation)
    unknown = rest[deepest] if deepest < len(rest) else (rest[-1] if rest else version)
    return Route(None, version, error=(400, "BadRequest", f"Resource not found for the segment '{unknown}'."))


def _segment_matches(want: str | frozenset[str] | None, got: str) -> bool:
    if want is None:
        return bool(got)  # an empty id ("/users//teamwork") is no id
    if isinstance(want, frozenset):
        return got.lower() in want
    return got.lower() == want  # Graph's fixed segments are case-insensitive


class GraphError(Exception):
    """A Graph error answer: status, ``error.code``, ``error.message``, extra headers, innerError extras."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        inner: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.inner = dict(inner or {})


_DEFAULT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Bad Request"),
    401: ("InvalidAuthenticationToken", "Access token has expired or is not yet valid."),
    403: ("Forbidden", "Forbidden"),
    404: ("NotFound", "Not Found"),
    409: ("Conflict", "Conflict"),
    423: ("Locked", "The resource that is being accessed is locked."),
    500: ("InternalServerError", "Failed to execute request."),
    502: ("BadGateway", "Failed to execute backend request."),
    503: ("serviceNotAvailable", "The service is temporarily unavailable. Please retry after some time."),
    504: ("GatewayTimeout", "The request timed out."),
}


def default_error(status: int) -> tuple[str, str]:
    """The ``error.code`` and ``error.message`` Graph typically sends with ``status``."""
    if status in _DEFAULT_ERRORS:
        return _DEFAULT_ERRORS[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return phrase.replace(" ", "").replace("-", ""), phrase


def target_not_found(scope: Scope, target: str) -> str:
    if scope == "user":
        return f"User Id '{target}' not found."
    if scope == "team":
        return f"No team found with Group Id {target}"
    return f"Chat '{target}' not found."  # GUESS: Graph's wording for an unknown chat


def installation_json(view: InstallationView, expand: set[str]) -> dict[str, Any]:
    item: dict[str, Any] = {"id": view.installation_id}
    if "teamsapp" in expand:
        item["teamsApp"] = {
            "id": view.teams_app_id,
            "externalId": view.external_id,
            "displayName": view.display_name,
            "distributionMethod": "organization",
        }
    if "teamsappdefinition" in expand:
        item["teamsAppDefinition"] = definition_json(
            view.teams_app_id, view.display_name, view.version, view.publishing_state
        )
    return item


def definition_json(teams_app_id: str, display_name: str, version: str, state: str) -> dict[str, Any]:
    """A ``teamsAppDefinition`` as installations and the catalog show it; its id is Graph's
    observed scheme, base64 of ``{teamsAppId}##{version}##{PublishingState}`` (research §3.1)."""
    definition_id = f"{teams_app_id}##{version}##{state.capitalize()}"
    return {
        "id": base64.b64encode(definition_id.encode()).decode("ascii"),
        "teamsAppId": teams_app_id,
        "azureADAppId": None,
        "displayName": display_name,
        "version": version,
        "requiredResourceSpecificApplicationPermissions": [],
        "publishingState": state,
        "shortDescription": "",
        "description": "",
        "lastModifiedDateTime": None,
        "createdBy": None,
    }


def encode_skiptoken(group_id: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"sim|{group_id.lower()}|{offset}".encode()).decode("ascii")


def decode_skiptoken(token: str, group_id: str) -> int:
    try:
        tag, group, offset = base64.urlsafe_b64decode(token.encode("ascii")).decode().split("|")
        if tag == "sim" and group == group_id.lower() and int(offset) >= 0:
            return int(offset)
    except (ValueError, UnicodeError):
        pass
    msg = "The specified page token value has expired and can no longer be included in your request."
    raise GraphError(400, "Directory_ExpiredPageToken", msg)


_PERMISSION_TYPES = {"application", "delegated"}


def check_upgrade_body(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    """Validate the optional upgrade body; the consentedPermissionSet (or None) when valid."""
    if not body.strip():
        return None
    if content_type is None:
        msg = "Write requests (excluding DELETE) must contain the Content-Type header declaration."
        raise GraphError(400, "BadRequest", msg)
    if content_type.split(";")[0].strip().lower() != "application/json":
        # GUESS: Graph's exact answer to a non-JSON content type is not documented.
        raise GraphError(415, "UnsupportedMediaType", f"Content type '{content_type}' is not supported.")
    unreadable = (
        "Unable to read JSON request payload. Please ensure Content-Type header is set "
        "and payload is of valid JSON format."
    )
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise GraphError(400, "BadRequest", unreadable) from None
    if not isinstance(payload, dict):
        raise GraphError(400, "BadRequest", unreadable)
    for key in payload:
        if key != "consentedPermissionSet":
            msg = f"The parameter '{key}' in the request payload is not a valid parameter for the operation 'upgrade'."
            raise GraphError(400, "BadRequest", msg)
    permission_set = payload.get("consentedPermissionSet")
    if permission_set is None:
        return None
    _check_object(permission_set, "teamsAppPermissionSet", {"resourceSpecificPermissions"})
    permissions = permission_set.get("resourceSpecificPermissions")
    if permissions is None:
        return dict(permission_set)
    if not isinstance(permissions, list):
        raise GraphError(400, "BadRequest", "Invalid value for property 'resourceSpecificPermissions'.")
    for permission in permissions:
        _check_object(permission, "teamsAppResourceSpecificPermission", {"permissionValue", "permissionType"})
        for name in ("permissionValue", "permissionType"):
            if not isinstance(permission.get(name), str):
                msg = (
                    f"Invalid value for property '{name}' of type 'microsoft.graph.teamsAppResourceSpecificPermission'."
                )
                raise GraphError(400, "BadRequest", msg)
        if permission["permissionType"].lower() not in _PERMISSION_TYPES:
            raise GraphError(400, "BadRequest", f"Requested value '{permission['permissionType']}' was not found.")
    return dict(permission_set)


def _check_object(value: object, type_name: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise GraphError(400, "BadRequest", f"Invalid value for an object of type 'microsoft.graph.{type_name}'.")
    for key in value:
        if key not in allowed and key != "@odata.type":
            msg = (
                f"The property '{key}' does not exist on type 'microsoft.graph.{type_name}'. "
                "Make sure to only use property names that are defined by the type."
            )
            raise GraphError(400, "BadRequest", msg)
