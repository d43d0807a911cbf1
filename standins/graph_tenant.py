"""The in-memory directory behind :class:`~standins.graph_simulator.GraphSimulator`.

A :class:`Tenant` holds users (addressable by object id or UPN), teams, chats, catalog apps, app
installations in the three scopes, and groups with their transitive user members. Tests seed it
from their own thread while the simulator reads and changes it from the server's thread, so every
method takes the tenant's lock and hands out copies, never live objects.

Ids compare case-insensitively (Graph treats GUIDs and UPNs that way; for chat ids it does not
matter in practice), but are reported back exactly as they were added.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
