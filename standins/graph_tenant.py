"""The Graph side of :class:`~standins.graph_simulator.GraphSimulator`, minus HTTP.

Two parts. The in-memory directory: a :class:`Tenant` holds users (addressable by object id or
UPN), teams, chats, catalog apps, app installations in the three scopes, and groups with their
transitive user members. Tests
seed it from their own thread while the simulator reads and changes it from the server's
thread, so every method takes the tenant's lock and hands out copies, never live objects.

Ids compare case-insensitively (Graph treats GUIDs and UPNs that way; for chat ids it does not
matter in practice), but are reported back exactly as they were added.

And Graph's request semantics for the simulated routes, as pure functions: routing on decoded
path segments (:func:`parse_route`), the lookup ``$filter``, the upgrade body's shape, the JSON
of an installation, group paging tokens. They raise :class:`GraphError` with the status, code
and message Graph uses; the simulator turns that into a response with Graph's headers.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

Scope = Literal["user", "team", "chat"]
SCOPES: tuple[Scope, ...] = ("user", "team", "chat")

UpgradeStatus = Literal["ok", "no_target", "no_installation", "permanent"]


@dataclass(frozen=True)
class InstallationView:
    """One installation as the list endpoint shows it."""

    installation_id: str
    scope: Scope
    target_id: str
    teams_app_id: str
    external_id: str
    display_name: str
    version: str


@dataclass(frozen=True)
class UpgradeOutcome:
    status: UpgradeStatus
    target_id: str = ""
    teams_app_id: str = ""
    from_version: str = ""
    version: str = ""


@dataclass(frozen=True)
class InstalledAppsFilter:
    """A parsed ``$filter`` of the installedApps list: ``<property> eq '<literal>'``."""

    prop: Literal["teamsApp/id", "teamsApp/externalId", "teamsAppDefinition/displayName"]
    value: str

    def matches(self, view: InstallationView) -> bool:
        if self.prop == "teamsApp/id":
            return view.teams_app_id.lower() == self.value.lower()
        if self.prop == "teamsApp/externalId":
            return view.external_id == self.value
        return view.display_name == self.value


_FILTER = re.compile(
    r"^\s*(?P<prop>teamsApp/id|teamsApp/externalId|teamsAppDefinition/displayName)"
    r"\s+eq\s+'(?P<literal>(?:[^']|'')*)'\s*$",
    re.IGNORECASE,
)
_FILTER_PROPS = {
    "teamsapp/id": "teamsApp/id",
    "teamsapp/externalid": "teamsApp/externalId",
    "teamsappdefinition/displayname": "teamsAppDefinition/displayName",
}


def parse_installed_apps_filter(text: str) -> InstalledAppsFilter:
    """Parse the one filter shape clients use for installation lookups.

    Raises ``ValueError`` for anything else, which the simulator answers with 400 as Graph's
    OData parser would. A literal is single-quoted with inner quotes doubled (OData), so a
    double-quoted literal, as one Microsoft sample sends, is rejected here too.
    """
    match = _FILTER.match(text)
    if match is None:
        raise ValueError(f"Invalid filter clause: {text}")
    prop = _FILTER_PROPS[match["prop"].lower()]
    literal = match["literal"].replace("''", "'")
    return InstalledAppsFilter(prop, literal)  # type: ignore[arg-type]


def installation_id_for(target_id: str, teams_app_id: str) -> str:
    """Graph's observed id scheme (research §3.1): base64 of ``{targetId}##{teamsAppId}``."""
    return base64.b64encode(f"{target_id}##{teams_app_id}".encode()).decode("ascii")


def _key(installation_id: str) -> str:
    # The docs show installation ids both with and without "=" padding; accept either.
    return installation_id.rstrip("=")


@dataclass
class _App:
    teams_app_id: str
    external_id: str
    display_name: str
    versions: tuple[str, ...]
    permanent: bool


@dataclass
class _Installation:
    installation_id: str
    scope: Scope
    target_id: str
    teams_app_id: str
    version: str


class Tenant:
    """Users, teams, chats, apps, installations and groups of one simulated tenant. Thread-safe."""

    group_page_size: int = 999

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._users: dict[str, str] = {}  # lower(id) -> id
        self._upns: dict[str, str] = {}  # lower(upn) -> id
        self._targets: dict[Scope, dict[str, str]] = {"user": self._users, "team": {}, "chat": {}}
        self._apps: dict[str, _App] = {}  # lower(teamsAppId) -> app
        self._installations: dict[str, _Installation] = {}  # _key(id) -> installation
        # (scope, canonical target) -> {lower(teamsAppId): _key(id)}: keeps lookups O(1) per target
        # so a soak test can seed tens of thousands of installations.
        self._by_target: dict[tuple[Scope, str], dict[str, str]] = {}
        self._groups: dict[str, tuple[str, ...]] = {}  # lower(groupId) -> member ids

    # --- seeding (test thread) ---------------------------------------------------------------

    def add_user(self, user_id: str, upn: str | None = None) -> None:
        with self._lock:
            self._users[user_id.lower()] = user_id
            if upn is not None:
                self._upns[upn.lower()] = user_id

    def add_team(self, team_id: str) -> None:
        with self._lock:
            self._targets["team"][team_id.lower()] = team_id

    def add_chat(self, chat_id: str) -> None:
        with self._lock:
            self._targets["chat"][chat_id.lower()] = chat_id

    def add_app(
        self,
        teams_app_id: str,
        external_id: str,
        display_name: str = "",
        *,
        versions: Sequence[str] = ("1.0.0", "1.1.0"),
        permanent: bool = False,
    ) -> None:
        """Add a catalog app. ``versions`` run oldest to latest; an upgrade moves to the last."""
        if not versions:
            raise ValueError("an app needs at least one version")
        with self._lock:
            self._apps[teams_app_id.lower()] = _App(
                teams_app_id, external_id, display_name or external_id, tuple(versions), permanent
            )

    def install(
        self,
        scope: Scope,
        target_id: str,
        teams_app_id: str,
        *,
        version: str | None = None,
        installation_id: str | None = None,
    ) -> str:
        """Install an app for a user, team or chat and return the installation id.

        ``target_id`` may be a user's UPN; the id is built from the object id, as Graph does.
        ``installation_id`` overrides the generated id, for tests that need an odd one (one
        containing ``/`` or ``..``, say). Raises ``ValueError`` for an unknown target, app or
        version, or when the app is already installed there (Graph answers 409 to that).
        """
        with self._lock:
            target = self._resolve(scope, target_id)
            if target is None:
                raise ValueError(f"unknown {scope} {target_id!r}: add it first")
            app = self._apps.get(teams_app_id.lower())
            if app is None:
                raise ValueError(f"unknown app {teams_app_id!r}: add_app it first")
            chosen = app.versions[0] if version is None else version
            if chosen not in app.versions:
                raise ValueError(f"app {teams_app_id!r} has no version {chosen!r}")
            per_target = self._by_target.setdefault((scope, target), {})
            if app.teams_app_id.lower() in per_target:
                raise ValueError(f"{app.teams_app_id} is already installed for {scope} {target}")
            iid = installation_id or installation_id_for(target, app.teams_app_id)
            if _key(iid) in self._installations:
                raise ValueError(f"installation id {iid!r} is already in use")
            self._installations[_key(iid)] = _Installation(iid, scope, target, app.teams_app_id, chosen)
            per_target[app.teams_app_id.lower()] = _key(iid)
            return iid

    def uninstall(self, installation_id: str) -> None:
        with self._lock:
            inst = self._installations.pop(_key(installation_id), None)
            if inst is not None:
                self._by_target[(inst.scope, inst.target_id)].pop(inst.teams_app_id.lower(), None)

    def installation_version(self, installation_id: str) -> str:
        """The installed version; ``KeyError`` when there is no such installation."""
        with self._lock:
            return self._installations[_key(installation_id)].version

    def add_group(self, group_id: str, member_ids: Sequence[str]) -> None:
        """A group whose transitive members are exactly these users, in this order."""
        with self._lock:
            self._groups[group_id.lower()] = tuple(member_ids)

    # --- queries used by the simulator (server thread) ---------------------------------------

    def resolve(self, scope: Scope, target: str) -> str | None:
        """The canonical id of a user (by id or UPN), team or chat, or None when unknown."""
        with self._lock:
            return self._resolve(scope, target)

    def _resolve(self, scope: Scope, target: str) -> str | None:
        found = self._targets[scope].get(target.lower())
        if found is None and scope == "user":
            found = self._upns.get(target.lower())
        return found

    def list_installations(
        self, scope: Scope, target: str, flt: InstalledAppsFilter | None = None
    ) -> list[InstallationView] | None:
        """Installations of one target matching ``flt``; None when the target is unknown."""
        with self._lock:
            canonical = self._resolve(scope, target)
            if canonical is None:
                return None
            keys = self._by_target.get((scope, canonical), {}).values()
            views = [self._view(self._installations[key]) for key in keys]
        return [v for v in views if flt is None or flt.matches(v)]

    def _view(self, inst: _Installation) -> InstallationView:
        app = self._apps[inst.teams_app_id.lower()]
        return InstallationView(
            inst.installation_id,
            inst.scope,
            inst.target_id,
            app.teams_app_id,
            app.external_id,
            app.display_name,
            inst.version,
        )

    def upgrade(self, scope: Scope, target: str, installation_id: str) -> UpgradeOutcome:
        """Move an installation to its app's latest version (a no-op when already there)."""
        with self._lock:
            canonical = self._resolve(scope, target)
            if canonical is None:
                return UpgradeOutcome("no_target")
            inst = self._installations.get(_key(installation_id))
            # An installation of another user, team or chat is as invisible as a missing one.
            if inst is None or inst.scope != scope or inst.target_id != canonical:
                return UpgradeOutcome("no_installation", canonical)
            app = self._apps[inst.teams_app_id.lower()]
            if app.permanent:
                return UpgradeOutcome("permanent", canonical, app.teams_app_id, inst.version, inst.version)
            previous, inst.version = inst.version, app.versions[-1]
            return UpgradeOutcome("ok", canonical, app.teams_app_id, previous, inst.version)

    def group_members(self, group_id: str) -> tuple[str, ...] | None:
        with self._lock:
            return self._groups.get(group_id.lower())


# --- request semantics: routing, bodies, payloads ------------------------------------------


@dataclass(frozen=True)
class Route:
    kind: str | None  # "upgrade" | "list" | "group" | None (unroutable)
    version: str = "v1.0"
    scope: Scope = "user"
    target: str = ""
    installation: str = ""
    error: tuple[int, str, str] | None = None  # status, code, message


# Path patterns; None = an id segment, a frozenset = one of these (lower-case) literals.
_UPGRADE_ACTION = frozenset({"upgrade", "microsoft.graph.upgrade"})
_PATTERNS: list[tuple[str, str, Scope, tuple[str | frozenset[str] | None, ...]]] = [
    ("list", "GET", "user", ("users", None, "teamwork", "installedapps")),
    ("upgrade", "POST", "user", ("users", None, "teamwork", "installedapps", None, _UPGRADE_ACTION)),
    ("list", "GET", "team", ("teams", None, "installedapps")),
    ("upgrade", "POST", "team", ("teams", None, "installedapps", None, _UPGRADE_ACTION)),
    ("list", "GET", "chat", ("chats", None, "installedapps")),
    ("upgrade", "POST", "chat", ("chats", None, "installedapps", None, _UPGRADE_ACTION)),
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
            installation = rest[pattern.index(None, 2)] if kind == "upgrade" else ""
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
        definition_id = f"{view.teams_app_id}##{view.version}##Published"
        item["teamsAppDefinition"] = {
            "id": base64.b64encode(definition_id.encode()).decode("ascii"),
            "teamsAppId": view.teams_app_id,
            "azureADAppId": None,
            "displayName": view.display_name,
            "version": view.version,
            "requiredResourceSpecificApplicationPermissions": [],
            "publishingState": "published",
            "shortDescription": "",
            "description": "",
            "lastModifiedDateTime": None,
            "createdBy": None,
        }
    return item


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
