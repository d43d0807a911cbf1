"""The in-memory directory behind :class:`~standins.graph_simulator.GraphSimulator`.

A :class:`Tenant` holds users (addressable by object id or UPN), teams, chats, catalog apps with
their definitions (a version and a ``publishingState`` each), app installations in the three
scopes, and groups with their transitive user members. Tests seed it
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

#: ``teamsAppDefinition.publishingState`` (Graph docs, "teamsAppDefinition resource").
PublishingState = Literal["submitted", "rejected", "published"]
PUBLISHING_STATES: tuple[PublishingState, ...] = ("submitted", "rejected", "published")
#: How a catalog answer can be broken on purpose: ``appDefinitions`` left out, ``null`` or ``[]``.
DefinitionsShape = Literal["absent", "null", "empty"]
#: What a managed identity with only the upgrade permission carries (research graph §2.4).
DEFAULT_ROLES = ("TeamsAppInstallation.ReadWriteForUser.All",)

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
    publishing_state: str = "published"


@dataclass(frozen=True)
class CatalogAppView:
    """One app as ``appCatalogs/teamsApps`` shows it; ``definitions`` are (version, state) pairs."""

    teams_app_id: str
    external_id: str
    display_name: str
    definitions: tuple[tuple[str, PublishingState], ...]
    definitions_shape: DefinitionsShape | None = None


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


def version_key(text: str) -> tuple[int, ...] | None:
    """Dotted numbers compared part by part, a missing part counting as 0; None when not a version."""
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)*", text):
        return None
    parts = [int(part) for part in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def latest_published(definitions: dict[str, PublishingState]) -> str | None:
    """The highest ``published`` version (one that is not dotted numbers never counts), or None."""
    best: tuple[tuple[int, ...], str] | None = None
    for version, state in definitions.items():
        key = version_key(version)
        if state == "published" and key is not None and (best is None or key >= best[0]):
            best = (key, version)
    return None if best is None else best[1]


def _key(installation_id: str) -> str:
    # The docs show installation ids both with and without "=" padding; accept either.
    return installation_id.rstrip("=")


@dataclass
class _App:
    teams_app_id: str
    external_id: str
    display_name: str
    definitions: dict[str, PublishingState]  # version -> state, in the order they were added
    permanent: bool
    listed: bool = True
    definitions_shape: DefinitionsShape | None = None


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
        self._catalog_roles: tuple[str, ...] | None = None  # set: catalog reads answer 403

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
        """Add a catalog app whose ``versions`` are all ``published`` definitions; an upgrade moves
        to the highest of them (see :meth:`publish` for a catalog that lags)."""
        if not versions:
            raise ValueError("an app needs at least one version")
        with self._lock:
            definitions: dict[str, PublishingState] = dict.fromkeys(versions, "published")
            self._apps[teams_app_id.lower()] = _App(
                teams_app_id, external_id, display_name or external_id, definitions, permanent
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
            chosen = next(iter(app.definitions)) if version is None else version
            if chosen not in app.definitions:
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

    def set_installed_version(self, installation_id: str, version: str) -> None:
        """Make an installation report ``version`` whatever the catalog holds: a version since
        removed from the catalog, or one that is not dotted numbers (a malformed answer for a
        test). ``KeyError`` when there is no such installation."""
        with self._lock:
            self._installations[_key(installation_id)].version = version

    # --- the app catalog (test thread) ---------------------------------------------------------

    def publish(self, teams_app_id: str, version: str, state: PublishingState = "published") -> None:
        """Add the definition ``version`` to an app, or change its ``publishingState``.

        A new version submitted but not yet published makes the catalog lag: the catalog lists it
        as ``submitted`` and an upgrade does not reach it; ``publish(app, v)`` later publishes it.
        ``version`` is not checked, so a test can put one that is not dotted numbers in the
        catalog (such a definition never counts as the latest). ``ValueError`` for an unknown app
        or state."""
        if state not in PUBLISHING_STATES:
            raise ValueError(f"publishingState must be one of {PUBLISHING_STATES}, not {state!r}")
        with self._lock:
            self._app(teams_app_id).definitions[version] = state

    def hide_from_catalog(self, teams_app_id: str, hidden: bool = True) -> None:
        """Leave the app out of catalog answers (an empty ``value``), as Graph may for a while
        after publishing ("List teamsApp": policies take up to 24-48 hours); installations and
        upgrades are unaffected."""
        with self._lock:
            self._app(teams_app_id).listed = not hidden

    def set_catalog_definitions(self, teams_app_id: str, shape: DefinitionsShape | None) -> None:
        """A malformed catalog answer for this app: ``appDefinitions`` ``"absent"`` (even when
        expanded), ``"null"`` or ``"empty"`` (``[]``); None restores the real definitions."""
        if shape not in ("absent", "null", "empty", None):
            raise ValueError(f"shape must be 'absent', 'null', 'empty' or None, not {shape!r}")
        with self._lock:
            self._app(teams_app_id).definitions_shape = shape

    def deny_catalog(self, denied: bool = True, *, roles: Sequence[str] = DEFAULT_ROLES) -> None:
        """Catalog reads answer 403 as Graph does for an app without ``AppCatalog.Read.All``;
        ``roles`` are the roles the message says the request carried."""
        with self._lock:
            self._catalog_roles = tuple(roles) if denied else None

    def catalog_versions(self, teams_app_id: str) -> dict[str, PublishingState]:
        """The app's definitions, version -> ``publishingState``, in the order they were added."""
        with self._lock:
            return dict(self._app(teams_app_id).definitions)

    def _app(self, teams_app_id: str) -> _App:
        app = self._apps.get(teams_app_id.lower())
        if app is None:
            raise ValueError(f"unknown app {teams_app_id!r}: add_app it first")
        return app

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

    def installation(
        self, scope: Scope, target: str, installation_id: str
    ) -> tuple[str | None, InstallationView | None]:
        """One installation of one target: (canonical target or None when the target is unknown,
        the installation or None when the target has no such installation)."""
        with self._lock:
            canonical = self._resolve(scope, target)
            inst = self._installations.get(_key(installation_id))
            # An installation of another user, team or chat is as invisible as a missing one.
            if canonical is None or inst is None or inst.scope != scope or inst.target_id != canonical:
                return canonical, None
            return canonical, self._view(inst)

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
            app.definitions.get(inst.version, "published"),
        )

    def catalog_denied(self) -> tuple[str, ...] | None:
        """The roles to name in the 403 when catalog reads are denied, else None."""
        with self._lock:
            return self._catalog_roles

    def catalog_apps(self) -> list[CatalogAppView]:
        """Every app the catalog lists, in the order they were added."""
        with self._lock:
            return [
                CatalogAppView(
                    app.teams_app_id,
                    app.external_id,
                    app.display_name,
                    tuple(app.definitions.items()),
                    app.definitions_shape,
                )
                for app in self._apps.values()
                if app.listed
            ]

    def upgrade(self, scope: Scope, target: str, installation_id: str) -> UpgradeOutcome:
        """Move an installation to the catalog's latest published version: a no-op when it is
        already there or past it, or when nothing is published."""
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
            previous, latest = inst.version, latest_published(app.definitions)
            installed = version_key(previous)
            latest_key = None if latest is None else version_key(latest)
            if latest is not None and latest_key is not None and (installed is None or installed < latest_key):
                inst.version = latest
            return UpgradeOutcome("ok", canonical, app.teams_app_id, previous, inst.version)

    def group_members(self, group_id: str) -> tuple[str, ...] | None:
        with self._lock:
            return self._groups.get(group_id.lower())
