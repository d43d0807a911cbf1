"""The app catalog and single installations, as the Graph simulator serves them (contract §8).

- ``GET /{v}/appCatalogs/teamsApps`` with ``$filter`` (``eq`` clauses on ``id``, ``externalId``,
  ``displayName`` or ``distributionMethod``, joined by ``and``) and ``$expand=appDefinitions``
  (Graph docs, "List teamsApp"): each app with its definitions, their ``version`` and
  ``publishingState``; an empty ``value`` when nothing matches; 403 "Missing role permissions"
  when the tenant is told to deny catalog reads (``Tenant.deny_catalog``), as Graph answers an app
  without ``AppCatalog.Read.All``.
- ``GET .../installedApps/{id}`` for users, teams and chats, with ``$expand=teamsApp`` and/or
  ``teamsAppDefinition`` (Graph docs, "Get installed app for user"): 404 for an installation the
  target does not have.

GUESS: an app-only caller sees every definition, ``submitted`` and ``rejected`` ones included (a
docs pull request proposing that app-only callers see published ones only was never merged).
Permanent (built-in) apps are listed with ``distributionMethod`` ``organization`` like the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .graph_requests import GraphError, Route, definition_json, installation_json, target_not_found
from .graph_tenant import CatalogAppView, Tenant

#: The application permissions "List teamsApp" documents, least privileged first.
CATALOG_ROLES = ("AppCatalog.Read.All", "AppCatalog.ReadWrite.All")

_CLAUSE = re.compile(r"(id|externalId|displayName|distributionMethod)\s+eq\s+'((?:[^']|'')*)'", re.IGNORECASE)
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_PROPS = {
    "id": "id",
    "externalid": "externalId",
    "displayname": "displayName",
    "distributionmethod": "distributionMethod",
}


def parse_catalog_filter(text: str) -> list[tuple[str, str]]:
    """``(property, literal)`` pairs of ``prop eq 'literal' [and …]``; ``ValueError`` for anything else."""
    clauses: list[tuple[str, str]] = []
    rest = text.strip()
    while True:
        clause = _CLAUSE.match(rest)
        if clause is None:
            raise ValueError(f"Invalid filter clause: {text}")
        clauses.append((_PROPS[clause[1].lower()], clause[2].replace("''", "'")))
        rest = rest[clause.end() :]
        if not rest.strip():
            return clauses
        joint = _AND.match(rest)
        if joint is None:
            raise ValueError(f"Invalid filter clause: {text}")
        rest = rest[joint.end() :]


def _matches(app: CatalogAppView, prop: str, value: str) -> bool:
    if prop == "id":
        return app.teams_app_id.lower() == value.lower()
    if prop == "externalId":
        return app.external_id == value
    if prop == "displayName":
        return app.display_name == value
    return value == "organization"


def parse_expand(text: str, allowed: Sequence[str], type_name: str) -> set[str]:
    """The lower-case navigation properties of ``$expand`` (nested options dropped); 400 for
    a property the type does not have, worded as Graph's OData parser words it."""
    names = {part.strip().lower() for part in re.sub(r"\([^()]*\)", "", text).split(",")}
    names.discard("")
    for name in sorted(names - {a.lower() for a in allowed}):
        msg = f"Could not find a property named '{name}' on type 'microsoft.graph.{type_name}'."
        raise GraphError(400, "BadRequest", msg)
    return names


def missing_role(roles: Sequence[str]) -> GraphError:
    """The 403 a token without a catalog role gets (research graph §2.4, "Missing role permissions")."""
    msg = (
        f"Missing role permissions on the request. API requires one of '{', '.join(CATALOG_ROLES)}'. "
        f"Roles on the request '{', '.join(roles)}'."
    )
    return GraphError(403, "Forbidden", msg)


def catalog_app_json(app: CatalogAppView, with_definitions: bool) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": app.teams_app_id,
        "externalId": app.external_id,
        "displayName": app.display_name,
        "distributionMethod": "organization",
    }
    if not with_definitions or app.definitions_shape == "absent":
        return item
    if app.definitions_shape == "null":
        item["appDefinitions"] = None
    elif app.definitions_shape == "empty":
        item["appDefinitions"] = []
    else:
        item["appDefinitions"] = [
            definition_json(app.teams_app_id, app.display_name, version, state) for version, state in app.definitions
        ]
    return item


def catalog_page(tenant: Tenant, query: Mapping[str, str], base: str) -> dict[str, Any]:
    """The answer to ``GET /appCatalogs/teamsApps``."""
    roles = tenant.catalog_denied()
    if roles is not None:
        raise missing_role(roles)
    expand = parse_expand(query.get("$expand", ""), ("appDefinitions",), "teamsApp")
    clauses: list[tuple[str, str]] = []
    if "$filter" in query:
        try:
            clauses = parse_catalog_filter(query["$filter"])
        except ValueError as exc:
            raise GraphError(400, "BadRequest", str(exc)) from None
    apps = [app for app in tenant.catalog_apps() if all(_matches(app, prop, value) for prop, value in clauses)]
    with_definitions = "appdefinitions" in expand
    context = f"{base}/$metadata#appCatalogs/teamsApps" + ("(appDefinitions())" if with_definitions else "")
    return {"@odata.context": context, "value": [catalog_app_json(app, with_definitions) for app in apps]}


def installation_entity(tenant: Tenant, route: Route, query: Mapping[str, str], base: str) -> dict[str, Any]:
    """The answer to ``GET .../installedApps/{id}`` for a user, team or chat."""
    expand = parse_expand(query.get("$expand", ""), ("teamsApp", "teamsAppDefinition"), "teamsAppInstallation")
    canonical, view = tenant.installation(route.scope, route.target, route.installation)
    if canonical is None:
        raise GraphError(404, "NotFound", target_not_found(route.scope, route.target))
    if view is None:
        raise GraphError(404, "NotFound", f"Teams app installation '{route.installation}' not found.")
    owner = {"user": "users('{}')/teamwork", "team": "teams('{}')", "chat": "chats('{}')"}[route.scope]
    expanded = ",".join(f"{p}()" for p in ("teamsApp", "teamsAppDefinition") if p.lower() in expand)
    context = (
        f"{base}/$metadata#{owner.format(route.target)}/installedApps"
        + (f"({expanded})" if expanded else "")
        + "/$entity"
    )
    return {"@odata.context": context, **installation_json(view, expand)}
