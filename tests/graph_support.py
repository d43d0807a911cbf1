"""What the Graph simulator's own tests share: one tenant's ids, the token they accept, and paths
and error bodies as a client on the wire sees them."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

USER = "5b649834-7412-4cce-9e69-176e95a394f5"
OTHER_USER = "c527a470-a882-481c-981c-ee6efaba85c7"
TEAM = "02bd9fd6-8f93-4758-87c3-1fb73740a315"
CHAT = "19:561082c0f3f847a58069deb8eb300807@thread.v2"
APP = "a6b63365-31a4-4f43-92ec-710b71557af9"
EXTERNAL_ID = "cf1ba4c7-f94e-4d80-ba90-5594b641a8ee"
GOOD_TOKEN = "good-token"
AUTH = {"Authorization": f"Bearer {GOOD_TOKEN}"}
TARGETS = {"user": USER, "team": TEAM, "chat": CHAT}


def seg(value: str) -> str:
    """One path segment, percent-encoded the way the function encodes ids."""
    return quote(value, safe="")


def apps_path(scope: str, target: str, version: str = "v1.0") -> str:
    owner = {"user": f"users/{seg(target)}/teamwork", "team": f"teams/{seg(target)}", "chat": f"chats/{seg(target)}"}
    return f"/{version}/{owner[scope]}/installedApps"


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of a Graph error body, which holds nothing else."""
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    return error
