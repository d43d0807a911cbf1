"""Offline checks of the deployment (infra/, azure.yaml, .funcignore) against the code.

Bicep cannot be compiled here (no Bicep CLI, and the Graph extension comes from a registry), so
these tests read the files and hold them to what the code and the contract need: every app
setting the code reads is set or left out on purpose, no keys or connection strings, only
least-privilege roles on the narrowest scope, queue settings that agree with host.json and the
settings' limits, the same Graph permissions in the Bicep module and in the script, and a deployed
package that holds what the function imports and nothing else (read the way azd reads .funcignore).

Each check is a function that returns a list of problems. The tests run every check on the real
files (no problems allowed) and on broken copies (the check must complain), so that a check
that could never fail shows up as a failing test.

A small reader for the Bicep subset used in infra/ sits at the top: it masks comments and string
contents so that braces and keywords are found only in code, then reads parameters with their
decorators, variables, resources (with nested child resources), modules and outputs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeAlias

import pytest

from upgrade_handler.settings import DEFAULTS, GRAPH_CLOUD_ROOTS, ConfigurationError, Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SCRIPT_NAME = "infra/scripts/grant-graph-permission.sh"
SCRIPT = ROOT / SCRIPT_NAME

# ------------------------------------------------------------------------------------------------
# What the infra is held to
# ------------------------------------------------------------------------------------------------

#: Settings of upgrade_handler.settings.DEFAULTS that Azure must NOT set, with the reason.
NOT_SET_IN_AZURE = {
    "ServiceBusConnection": "a connection string: the local-development alternative to the "
    "identity connection (ServiceBusConnection__fullyQualifiedNamespace); Azure uses no secrets",
    "AzureWebJobsStorage": "a connection string (an account key, or Azurite's): Azure reaches the "
    "storage account by identity (AzureWebJobsStorage__tableServiceUri and __blobServiceUri)",
    "AzureWebJobsStorage__accountName": "names an account in the global cloud only; the service URIs "
    "the deployment sets come from the account itself, in every cloud",
}

#: App settings that are not read by the package but by the Functions host or platform.
HOST_SETTINGS = {
    "AzureWebJobsStorage__credential": "host storage by managed identity",
    "AzureWebJobsStorage__clientId": "which user-assigned identity reaches host storage",
    "AzureWebJobsStorage__blobServiceUri": "host storage account (blob service)",
    "AzureWebJobsStorage__tableServiceUri": "the table service: the host's, and the app's budget and ledger",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "where telemetry goes (no secret once local auth is off)",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "telemetry with an Entra token",
    "ServiceBusConnection__credential": "the trigger's identity connection",
    "AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls": "per-instance concurrency",
}

#: Settings Flex Consumption rejects or ignores (runtime and deployment live in functionAppConfig).
FLEX_DEPRECATED_SETTINGS = (
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
    "AzureWebJobsStorage",
)

# Built-in role definition ids (Microsoft's built-in roles list; the same in every tenant).
SERVICE_BUS_DATA_OWNER = "090c5cfd-751d-490a-894a-3ce6f1109419"
SERVICE_BUS_DATA_RECEIVER = "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0"
SERVICE_BUS_DATA_SENDER = "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39"
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
STORAGE_TABLE_DATA_READER = "76199698-9eea-4c19-bc75-cec21354c6b6"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"

QUEUE = "Microsoft.ServiceBus/namespaces/queues"
TABLE = "Microsoft.Storage/storageAccounts/tableServices/tables"

#: The only Azure roles the deployment may assign, and the resource type each must be scoped to.
#: Data Owner on the upgrade queue is a decision (docs/deploying.md, "Scale"): target-based scaling
#: reads the queue's length, which needs Manage; check_least_privilege_roles keeps it on that queue.
ALLOWED_ROLES = {
    SERVICE_BUS_DATA_OWNER: QUEUE,
    SERVICE_BUS_DATA_RECEIVER: QUEUE,
    SERVICE_BUS_DATA_SENDER: QUEUE,
    STORAGE_BLOB_DATA_OWNER: "Microsoft.Storage/storageAccounts",
    STORAGE_TABLE_DATA_CONTRIBUTOR: TABLE,
    STORAGE_TABLE_DATA_READER: TABLE,
    MONITORING_METRICS_PUBLISHER: "Microsoft.Insights/components",
}

#: Roles that must never appear anywhere in infra/.
FORBIDDEN_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
    "17d1049b-9a84-46fb-8f53-869881c3d3ab": "Storage Account Contributor",
}

#: Microsoft Graph application permissions and their app role ids (research/graph.md §1.1 and the
#: Graph permissions reference). The Bicep module and the script must both use exactly these.
GRAPH_APP_ROLE_IDS = {
    "TeamsAppInstallation.ReadWriteForUser.All": "74ef0291-ca83-4d02-8c7e-d2391e6a444f",
    "TeamsAppInstallation.ReadWriteAndConsentForUser.All": "32ca478f-f89e-41d0-aaf8-101deb7da510",
    "TeamsAppInstallation.ReadWriteForTeam.All": "5dad17ba-f6cc-4954-a5a2-a0dcc95154f0",
    "TeamsAppInstallation.ReadWriteAndConsentForTeam.All": "b0c13be0-8e20-4bc5-8c55-963c23a39ce9",
    "TeamsAppInstallation.ReadWriteForChat.All": "9e19bae1-2623-4c4f-ab6e-2664615ff9a0",
    "TeamsAppInstallation.ReadWriteAndConsentForChat.All": "6e74eff9-4a21-45d6-bc03-3a20f61f8281",
    "GroupMember.Read.All": "98830695-27a2-44f7-8c18-0c3ebc9698f6",
    "AppCatalog.Read.All": "e12dae10-5a57-4817-b79d-dfbec5348930",
}
DEFAULT_USER_SCOPE_PERMISSION = "TeamsAppInstallation.ReadWriteForUser.All"
MICROSOFT_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"

#: contract §2: the whole-request timeout of one Graph request.
GRAPH_REQUEST_TIMEOUT_SECONDS = 30
#: The largest UPGRADE_MAX_INLINE_WAIT_SECONDS the code accepts (checked against the code below).
MAX_INLINE_WAIT_LIMIT_SECONDS = 120
#: Service Bus's upper bound for a queue's lockDuration.
SERVICE_BUS_MAX_LOCK_SECONDS = 300
#: "A long time to live" for the dead-letter queue.
DEADLETTER_MIN_TTL_SECONDS = 30 * 24 * 3600
#: The lowest maximumInstanceCount Flex Consumption accepts in most regions (research/fleet.md §1):
#: the default, so that the template deploys in every region.
FLEX_LOWEST_MAXIMUM_INSTANCE_COUNT = 40

#: Regions of Microsoft's Flex Consumption azd templates (Azure-Samples/functions-quickstart-python-http-azd,
#: infra/main.bicep). main.bicep may offer these (the canary eastus2euap is left out on purpose).
FLEX_CONSUMPTION_REGIONS = frozenset(
    (
        *("australiaeast", "australiasoutheast", "brazilsouth", "canadacentral", "centralindia", "centralus"),
        *("eastasia", "eastus", "eastus2", "francecentral", "germanywestcentral", "italynorth", "japaneast"),
        *("koreacentral", "northcentralus", "northeurope", "norwayeast", "southafricanorth", "southcentralus"),
        *("southeastasia", "southindia", "spaincentral", "swedencentral", "uaenorth", "uksouth", "ukwest"),
        *("westcentralus", "westeurope", "westus", "westus2", "westus3"),
    )
)

AZD_SERVICE_NAME = "upgrader"

# ------------------------------------------------------------------------------------------------
# A reader for the Bicep used in infra/
# ------------------------------------------------------------------------------------------------

Node: TypeAlias = "str | dict[str, Node]"
"""A property value: a nested object, or the raw text of any other expression."""

_OPEN = {"{": "}", "[": "]", "(": ")"}


def mask(text: str) -> str:
    """``text`` with comments blanked and string contents replaced by ``x`` (same length).

    The quotes of a string stay, so ``'...'`` still marks one; newlines stay, so lines line up.
    Interpolations (``${...}``) are string content, strings nested in them included.
    """
    out = list(text)
    n = len(text)
    # Innermost first: "string", or the brace depth (an int) inside an open interpolation.
    stack: list[str | int] = []

    def hide(a: int, b: int, by: str) -> None:
        for k in range(a, b):
            if text[k] != "\n":
                out[k] = by

    i = 0
    while i < n:
        top = stack[-1] if stack else None
        c = text[i]
        if top == "string":
            if c == "\\" and i + 1 < n:  # \' \\ \$ and the like
                hide(i, i + 2, "x")
                i += 2
            elif text.startswith("${", i):
                hide(i, i + 2, "x")
                stack.append(0)
                i += 2
            else:
                if c == "'":
                    stack.pop()
                if c != "'" or stack:
                    hide(i, i + 1, "x")
                i += 1
            continue
        inside = top is not None  # code of an interpolation: all of it is string content
        blank = "x" if inside else " "
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            hide(i, end, blank)
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            hide(i, end, blank)
            i = end
        elif text.startswith("'''", i):
            end = text.find("'''", i + 3)
            end = n if end < 0 else end
            hide(i + 3, end, "x")
            if inside:
                hide(i, min(end + 3, n), "x")
            i = end + 3
        elif c == "'":
            if inside:
                hide(i, i + 1, "x")
            stack.append("string")
            i += 1
        else:
            if isinstance(top, int):
                hide(i, i + 1, "x")
                if c == "{":
                    stack[-1] = top + 1
                elif c == "}":
                    if top == 0:
                        stack.pop()
                    else:
                        stack[-1] = top - 1
            i += 1
    return "".join(out)


def strip_comments(text: str) -> str:
    """``text`` with Bicep comments blanked; strings untouched."""
    masked = mask(text)
    return "".join(" " if m == " " and not t.isspace() else t for t, m in zip(text, masked, strict=True))


def _match(masked: str, open_at: int) -> int:
    """Index of the bracket closing the one at ``open_at`` (in masked text)."""
    want = _OPEN[masked[open_at]]
    stack = [want]
    for i in range(open_at + 1, len(masked)):
        c = masked[i]
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c in ")]}":
            if c != stack.pop():
                raise ValueError(f"unbalanced {c!r} at offset {i}")
            if not stack:
                return i
    raise ValueError(f"no closing bracket for offset {open_at}")


def _expression_end(masked: str, start: int, limit: int) -> int:
    """End of an expression starting at ``start``: the first newline outside brackets."""
    i = start
    while i < limit:
        c = masked[i]
        if c in _OPEN:
            i = _match(masked, i) + 1
            continue
        if c == "\n":
            return i
        i += 1
    return limit


def literal(raw: str) -> str | int | bool | None:
    """A plain Bicep literal as Python (``None`` for anything that is an expression)."""
    raw = raw.strip()
    if re.fullmatch(r"'[^'$\\]*'", raw):
        return raw[1:-1]
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    if raw in ("true", "false"):
        return raw == "true"
    return None


def array_items(raw: str) -> list[str]:
    """Raw items of a Bicep array literal ``[ ... ]`` (newline- or comma-separated)."""
    raw = raw.strip()
    if not (raw.startswith("[") and raw.endswith("]")):
        raise ValueError(f"not an array literal: {raw!r}")
    inner, masked = raw[1:-1], mask(raw)[1:-1]
    items, start, i = [], 0, 0
    while i < len(masked):
        c = masked[i]
        if c in _OPEN:
            i = _match(masked, i) + 1
            continue
        if c in "\n,":
            items.append(inner[start:i].strip())
            start = i + 1
        i += 1
    items.append(inner[start:].strip())
    return [item for item in items if item]


@dataclass
class Param:
    name: str
    type: str
    default: str | None
    decorators: dict[str, str]

    def allowed(self) -> list[str | int | bool | None]:
        raw = self.decorators.get("allowed")
        return [] if raw is None else [literal(item) for item in array_items(raw)]

    def bound(self, decorator: str) -> int | None:
        raw = self.decorators.get(decorator)
        value = None if raw is None else literal(raw)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class Resource:
    symbol: str
    type: str
    body: dict[str, Node]
    condition: str | None
    loop: str | None
    parent: str | None = None


@dataclass
class BicepFile:
    """The parts of one Bicep file the checks need."""

    text: str  # without comments
    params: dict[str, Param] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    objects: dict[str, dict[str, Node]] = field(default_factory=dict)
    resources: dict[str, Resource] = field(default_factory=dict)
    modules: dict[str, Resource] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extensions: list[str] = field(default_factory=list)
    target_scope: str | None = None

    @classmethod
    def parse(cls, text: str) -> BicepFile:
        """Read ``text``; the values kept are its code, comments removed."""
        parsed = cls(strip_comments(text))
        parsed._read(mask(parsed.text))
        return parsed

    def _read(self, masked: str) -> None:
        decorators: dict[str, str] = {}
        i, n = 0, len(masked)
        while i < n:
            if masked[i].isspace():
                i += 1
                continue
            if masked[i] == "@":
                m = re.compile(r"@(\w+)").match(masked, i)
                assert m, masked[i : i + 40]
                j = m.end()
                if j < n and masked[j] == "(":
                    close = _match(masked, j)
                    decorators[m.group(1)] = self.text[j + 1 : close].strip()
                    j = close + 1
                else:
                    decorators[m.group(1)] = ""
                i = j
                continue
            end = _expression_end(masked, i, n)
            self._statement(masked, i, end, decorators)
            decorators = {}
            i = end + 1

    def _statement(self, masked: str, start: int, end: int, decorators: dict[str, str]) -> None:
        code, text = masked[start:end], self.text[start:end]
        keyword = code.split(None, 1)[0]
        if keyword == "param":
            m = re.match(r"param\s+(\w+)\s+(\w+)(?:\s*=\s*)?", code)
            assert m, text
            default = text[m.end() :].strip() if "=" in code[: m.end()] else None
            self.params[m.group(1)] = Param(m.group(1), m.group(2), default, decorators)
        elif keyword == "var":
            m = re.match(r"var\s+(\w+)\s*=\s*", code)
            assert m, text
            self.variables[m.group(1)] = text[m.end() :].strip()
            if code[m.end() :].startswith("{"):
                self.objects[m.group(1)] = self._object(masked, start + m.end())
        elif keyword == "output":
            m = re.match(r"output\s+(\w+)\s+\w+\s*=\s*", code)
            assert m, text
            self.outputs[m.group(1)] = text[m.end() :].strip()
        elif keyword in ("resource", "module"):
            self._resource(masked, start, end, parent=None)
        elif keyword == "extension":
            self.extensions.append(code.split()[1])
        elif keyword == "targetScope":
            self.target_scope = str(literal(text.split("=", 1)[1]))
        else:
            raise AssertionError(f"unexpected Bicep statement: {text[:60]!r}")

    def _resource(self, masked: str, start: int, end: int, parent: Resource | None) -> None:
        code = masked[start:end]
        m = re.match(r"(resource|module)\s+(\w+)\s+'(x*)'\s*(?:existing\s*)?=\s*", code)
        assert m, self.text[start:end][:80]
        kind, symbol = m.group(1), m.group(2)
        type_ = self.text[start + m.start(3) : start + m.end(3)]
        if parent is not None:
            type_ = f"{parent.type.split('@')[0]}/{type_}"
        rest, offset = code[m.end() :], start + m.end()
        condition = loop = None
        if_m = re.match(r"if\s*\(", rest)
        if if_m:
            open_at = offset + if_m.end() - 1
            condition = self.text[open_at + 1 : _match(masked, open_at)].strip()
        loop_m = re.match(r"\[\s*for\s+(.*?):\s*\{", rest, re.S)
        if loop_m:
            loop = self.text[offset + loop_m.start(1) : offset + loop_m.end(1)].strip()
        resource = Resource(symbol, type_, {}, condition, loop, parent.symbol if parent else None)
        (self.modules if kind == "module" else self.resources)[symbol] = resource
        resource.body = self._object(masked, masked.index("{", offset), owner=resource)

    def _object(self, masked: str, open_at: int, owner: Resource | None = None) -> dict[str, Node]:
        close = _match(masked, open_at)
        result: dict[str, Node] = {}
        i = open_at + 1
        key_re = re.compile(r"(\w+|'x*')\s*:\s*")
        child_re = re.compile(r"resource\s+\w+\s+'")
        while i < close:
            if masked[i].isspace() or masked[i] == ",":
                i += 1
                continue
            if owner is not None and child_re.match(masked, i):
                end = _expression_end(masked, i, close)
                self._resource(masked, i, end, parent=owner)
                i = end
                continue
            m = key_re.match(masked, i)
            assert m, f"cannot read property at {self.text[i : i + 60]!r}"
            key = self.text[m.start(1) : m.end(1)].strip("'")
            j = m.end()
            if masked[j] == "{":
                result[key] = self._object(masked, j)
                i = _match(masked, j) + 1
            else:
                end = _expression_end(masked, j, close)
                result[key] = self.text[j:end].strip()
                i = end
        return result

    def of_type(self, type_prefix: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.type.split("@")[0] == type_prefix]


# ------------------------------------------------------------------------------------------------
# The files, as one object (so that broken copies can be checked too)
# ------------------------------------------------------------------------------------------------


@dataclass
class Infra:
    texts: dict[str, str]
    #: The project folder azd packages (azure.yaml ``project: .``): what .funcignore is checked against.
    root: Path = ROOT

    @classmethod
    def load(cls) -> Infra:
        names = [
            "infra/main.bicep",
            "infra/resources.bicep",
            "infra/graph-permission.bicep",
            "infra/main.parameters.json",
            "infra/bicepconfig.json",
            "infra/scripts/grant-graph-permission.sh",
            "azure.yaml",
            ".funcignore",
            "host.json",
        ]
        texts = {name: (ROOT / name).read_text(encoding="utf-8") for name in names}
        # Any other file someone adds under infra/ is scanned for secrets too.
        for path in sorted(INFRA.rglob("*")):
            name = path.relative_to(ROOT).as_posix()
            if path.is_file() and name not in texts:
                texts[name] = path.read_text(encoding="utf-8", errors="replace")
        return cls(texts)

    def replaced(self, name: str, old: str, new: str) -> Infra:
        """A copy with one edit, for checking that a check notices it."""
        assert self.texts[name].count(old) == 1, f"{old!r} is not in {name} exactly once"
        return Infra({**self.texts, name: self.texts[name].replace(old, new)}, self.root)

    def bicep(self, name: str) -> BicepFile:
        return BicepFile.parse(self.texts[f"infra/{name}"])

    @cached_property
    def main(self) -> BicepFile:
        return self.bicep("main.bicep")

    @cached_property
    def resources(self) -> BicepFile:
        return self.bicep("resources.bicep")

    @cached_property
    def graph(self) -> BicepFile:
        return self.bicep("graph-permission.bicep")

    def app_settings(self) -> dict[str, Node]:
        """The object deployed as the function app's app settings."""
        res = self.resources
        configs = [
            r for r in res.of_type("Microsoft.Web/sites/config") if literal(str(r.body.get("name"))) == "appsettings"
        ]
        assert len(configs) == 1, "expected one Microsoft.Web/sites/config 'appsettings' resource"
        properties = configs[0].body["properties"]
        if isinstance(properties, dict):
            return properties
        assert properties in res.objects, f"app settings {properties!r} is not an object variable"
        return res.objects[properties]

    def main_param(self, resources_expression: str) -> Param | None:
        """The main.bicep parameter behind an expression of resources.bicep (``p``, ``string(p)``,
        ``queue.name``), followed through the ``resources`` module's parameters."""
        m = re.fullmatch(r"string\((\w+)\)|(\w+)\.name|(\w+)", resources_expression.strip())
        if m is None:
            return None
        res = self.resources
        if m.group(2):
            resource = res.resources.get(m.group(2))
            return None if resource is None else self.main_param(str(resource.body.get("name", "")))
        name = m.group(1) or m.group(3)
        passed = self.main.modules["resources"].body.get("params")
        if name not in res.params or not isinstance(passed, dict):
            return None
        return self.main.params.get(str(passed.get(name, "")))

    def queue(self, setting: str) -> Resource:
        """The queue resource whose name is the app setting ``setting``."""
        return self.named_by(setting, QUEUE)

    def named_by(self, setting: str, type_: str) -> Resource:
        """The resource of type ``type_`` whose name is the app setting ``setting``."""
        value = str(self.app_settings()[setting])
        m = re.fullmatch(r"(\w+)\.name", value)
        assert m, f"{setting} should be the name of a {type_} resource, is {value!r}"
        resource = self.resources.resources[m.group(1)]
        assert resource.type.startswith(f"{type_}@"), resource.type
        return resource


Check = Callable[[Infra], list[str]]

# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def iso_seconds(duration: str) -> float:
    """Seconds in an ISO 8601 duration (``PT2M30S``, ``P14D``)."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", duration)
    if not m or duration in ("P", "PT") or duration.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {duration!r}")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def timespan_seconds(value: str) -> float:
    """Seconds in a .NET TimeSpan string as host.json uses it (``00:05:00``, ``1.00:00:00``)."""
    m = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2}(?:\.\d+)?)", value)
    if not m:
        raise ValueError(f"not a TimeSpan: {value!r}")
    days, hours, minutes = (int(g) if g else 0 for g in m.groups()[:3])
    return ((days * 24 + hours) * 60 + minutes) * 60 + float(m.group(4))


def azd_default(parameters_json: str, name: str) -> str | None:
    """The ``${VAR=default}`` default azd substitutes for parameter ``name`` (None: no default)."""
    value = json.loads(parameters_json)["parameters"][name]["value"]
    m = re.fullmatch(r"\$\{\w+(?:=(.*))?\}", value)
    assert m, f"{name}: {value!r} is not an azd ${{VAR}} reference"
    return m.group(1)


def environment_for(setting: str, value: str) -> dict[str, str]:
    return {"ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net", setting: value}


def code_accepts(setting: str, value: str) -> bool:
    try:
        Settings.from_environment(environment_for(setting, value))
    except ConfigurationError:
        return False
    return True


def script_role_table(script: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*([\w.]+)\)\s*echo\s+([0-9a-f-]{36})\s*;;", script, re.M))


def default_graph_roles(main: BicepFile) -> list[str]:
    """The Graph permissions main.bicep grants with every parameter at its default."""
    roles = []
    for name in ("userScopePermission", "teamScopePermission", "chatScopePermission"):
        default = literal(main.params[name].default or "")
        if default != "none":
            roles.append(str(default))
    if literal(main.params["enableGroupFanOut"].default or "") is True:
        roles.append("GroupMember.Read.All")
    if literal(main.params["enableVersionChecks"].default or "") is True:
        roles.append("AppCatalog.Read.All")
    return roles


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------


def check_app_settings_cover_the_code(infra: Infra) -> list[str]:
    """Every setting the code reads is set, or listed in NOT_SET_IN_AZURE (and then not set)."""
    settings = infra.app_settings()
    problems = []
    for name in DEFAULTS:
        if name in NOT_SET_IN_AZURE and name in settings:
            problems.append(f"{name} must not be set in Azure: {NOT_SET_IN_AZURE[name]}")
        if name not in NOT_SET_IN_AZURE and name not in settings:
            problems.append(f"{name} is read by the code but not set in the function's app settings")
    for name in settings:
        if name not in DEFAULTS and name not in HOST_SETTINGS:
            problems.append(f"app setting {name} is read by neither the code nor the host (a typo?)")
    for name in FLEX_DEPRECATED_SETTINGS:
        if name in settings:
            problems.append(f"{name} must not be set on Flex Consumption")
    return problems


def _keys(node: Node | None) -> list[str]:
    return list(node) if isinstance(node, dict) else []


def check_identity_connections(infra: Infra) -> list[str]:
    """Service Bus, host storage, Graph and telemetry all use the one user-assigned identity."""
    settings = infra.app_settings()
    client_id = "identity.properties.clientId"
    expected = {
        "ServiceBusConnection__credential": "'managedidentity'",
        "ServiceBusConnection__clientId": client_id,
        "AZURE_CLIENT_ID": client_id,
        "AzureWebJobsStorage__credential": "'managedidentity'",
        "AzureWebJobsStorage__clientId": client_id,
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "'ClientId=${identity.properties.clientId};Authorization=AAD'",
    }
    problems = [
        f"{name} = {settings.get(name)!r}, expected {value!r}"
        for name, value in expected.items()
        if settings.get(name) != value
    ]
    namespace = str(settings.get("ServiceBusConnection__fullyQualifiedNamespace", ""))
    if "serviceBus" not in namespace:
        problems.append(f"ServiceBusConnection__fullyQualifiedNamespace {namespace!r} is not the namespace's")
    identities = infra.resources.of_type("Microsoft.ManagedIdentity/userAssignedIdentities")
    if [r.symbol for r in identities] != ["identity"]:
        problems.append("expected exactly one user-assigned identity, symbol 'identity'")
    sites = infra.resources.of_type("Microsoft.Web/sites")
    for site in sites:
        ident = site.body.get("identity")
        if not isinstance(ident, dict) or ident.get("type") != "'UserAssigned'":
            problems.append(f"function app {site.symbol} must use only its user-assigned identity")
        elif "${identity.id}" not in _keys(ident.get("userAssignedIdentities")):
            problems.append(f"function app {site.symbol} does not carry the identity")
    if not sites:
        problems.append("no function app")
    return problems


_SECRET_PATTERNS = (
    r"listKeys",
    r"listConnectionStrings",
    r"listAccountSas",
    r"listServiceSas",
    r"SharedAccessKey",
    r"AccountKey",
    r"authorizationRules",
    r"primaryKey",
    r"secondaryKey",
    r"DefaultEndpointsProtocol",
    r"Endpoint=sb://",
    r"UseDevelopmentStorage",
    r"connection_?string",
)
#: The one connection string allowed: Application Insights', which carries no secret once the
#: resource refuses local authentication (checked in check_local_auth_disabled).
_ALLOWED_CONNECTION_STRINGS = ("APPLICATIONINSIGHTS_CONNECTION_STRING", "appInsights.properties.ConnectionString")


def check_no_keys_or_connection_strings(infra: Infra) -> list[str]:
    problems = []
    scanned = [name for name, text in infra.texts.items() if name.endswith(".bicep") and "resource " in text]
    if len(scanned) < 3:
        problems.append(f"expected three Bicep files with resources to scan, found {scanned}")
    for name, text in infra.texts.items():
        if not (name.startswith("infra/") or name == "azure.yaml"):
            continue
        # Comments may talk about connection strings; code and strings may not contain them.
        code = text
        if name.endswith(".bicep"):
            code = strip_comments(text)
        elif name.endswith(".sh") or name.endswith(".yaml"):
            code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for allowed in _ALLOWED_CONNECTION_STRINGS:
            code = code.replace(allowed, "")
        for pattern in _SECRET_PATTERNS:
            for m in re.finditer(pattern, code, re.I):
                line = code.count("\n", 0, m.start()) + 1
                problems.append(f"{name}:{line}: {m.group(0)!r}")
    return problems


def check_local_auth_disabled(infra: Infra) -> list[str]:
    """Keys are switched off on every resource that has them."""
    res = infra.resources
    wanted = {
        "Microsoft.ServiceBus/namespaces": ("disableLocalAuth", "true"),
        "Microsoft.Insights/components": ("DisableLocalAuth", "true"),
        "Microsoft.Storage/storageAccounts": ("allowSharedKeyAccess", "false"),
    }
    problems = []
    for type_, (prop, value) in wanted.items():
        found = res.of_type(type_)
        if not found:
            problems.append(f"no {type_} resource")
        for resource in found:
            properties = resource.body.get("properties")
            actual = properties.get(prop) if isinstance(properties, dict) else None
            if actual != value:
                problems.append(f"{resource.symbol}: properties.{prop} is {actual!r}, must be {value}")
    return problems


def _role_id(infra: Infra, raw: str) -> str | None:
    m = re.fullmatch(r"subscriptionResourceId\('Microsoft\.Authorization/roleDefinitions',\s*(.+)\)", raw)
    if not m:
        return None
    expression = m.group(1).strip()
    if literal(expression) is not None:
        return str(literal(expression))
    ref = re.fullmatch(r"(\w+)\.(\w+)", expression)
    if ref and ref.group(1) in infra.resources.objects:
        value = infra.resources.objects[ref.group(1)].get(ref.group(2))
        return None if value is None else str(literal(str(value)))
    return None


def role_assignments(infra: Infra) -> list[tuple[Resource, str | None, Resource | None]]:
    """(assignment, role definition id, scope resource) for every role assignment."""
    res = infra.resources
    found = []
    for bicep in (infra.main, res, infra.graph):
        for assignment in bicep.of_type("Microsoft.Authorization/roleAssignments"):
            properties = assignment.body.get("properties")
            raw = properties.get("roleDefinitionId", "") if isinstance(properties, dict) else ""
            scope = bicep.resources.get(str(assignment.body.get("scope", "")))
            found.append((assignment, _role_id(infra, str(raw)), scope))
    return found


def check_least_privilege_roles(infra: Infra) -> list[str]:
    problems = []
    assignments = role_assignments(infra)
    used = {role for _, role, _ in assignments}
    if used != set(ALLOWED_ROLES):
        problems.append(f"roles used {sorted(map(str, used))} differ from the allowed set {sorted(ALLOWED_ROLES)}")
    for assignment, role, scope in assignments:
        if role not in ALLOWED_ROLES:
            problems.append(f"{assignment.symbol}: role {role} is not allowed")
            continue
        scope_type = scope.type.split("@")[0] if scope else None
        if scope_type != ALLOWED_ROLES[role]:
            problems.append(f"{assignment.symbol}: scoped to {scope_type}, must be a {ALLOWED_ROLES[role]}")
    for name, text in infra.texts.items():
        code = strip_comments(text) if name.endswith(".bicep") else text
        for role, title in FORBIDDEN_ROLES.items():
            if role in code.lower():
                problems.append(f"{name} mentions the {title} role ({role})")
    # The function's identity: Data Owner on the upgrade queue (receive, send, and the queue length
    # that target-based scaling reads; it subsumes Receiver and Sender), Sender on the dead-letter
    # queue. Data Owner anywhere else, or for anyone else, is a privilege nobody decided on.
    upgrade = infra.queue("UPGRADE_QUEUE_NAME").symbol
    deadletter = infra.queue("DEADLETTER_QUEUE_NAME").symbol
    queue_grants = {
        (role, scope.symbol if scope else None)
        for assignment, role, scope in assignments
        if principal(assignment) == IDENTITY_PRINCIPAL and (scope.symbol if scope else None) in (upgrade, deadletter)
    }
    expected = {(SERVICE_BUS_DATA_OWNER, upgrade), (SERVICE_BUS_DATA_SENDER, deadletter)}
    if queue_grants != expected:
        problems.append(f"the identity's queue roles are {sorted(map(str, queue_grants))}, expected {sorted(expected)}")
    for assignment, role, scope in assignments:
        if role == SERVICE_BUS_DATA_OWNER and (
            principal(assignment) != IDENTITY_PRINCIPAL or scope is None or scope.symbol != upgrade
        ):
            problems.append(f"{assignment.symbol}: Data Owner is for the function's identity on the upgrade queue only")
    return problems


IDENTITY_PRINCIPAL = "identity.properties.principalId"


def principal(assignment: Resource) -> str | None:
    properties = assignment.body.get("properties")
    return str(properties.get("principalId")) if isinstance(properties, dict) else None


def check_tables(infra: Infra) -> list[str]:
    """The budget and ledger tables exist, are the app settings', and the identity may read and
    write exactly those two (contract §7, §8); the deployer may only read the ledger."""
    problems = []
    settings = infra.app_settings()
    tables = {setting: infra.named_by(setting, TABLE) for setting in ("GRAPH_BUDGET_TABLE", "ROLLOUT_TABLE")}
    if len({table.symbol for table in tables.values()}) != 2:
        problems.append("GRAPH_BUDGET_TABLE and ROLLOUT_TABLE must be two tables")
    for setting, table in tables.items():
        if not str(table.body.get("parent", "")).startswith("storage::"):
            problems.append(f"{setting}: table {table.symbol} is not in the host storage account")
    grants = {
        (principal(assignment), role, scope.symbol if scope else None)
        for assignment, role, scope in role_assignments(infra)
        if role in (STORAGE_TABLE_DATA_CONTRIBUTOR, STORAGE_TABLE_DATA_READER)
    }
    expected = {(IDENTITY_PRINCIPAL, STORAGE_TABLE_DATA_CONTRIBUTOR, table.symbol) for table in tables.values()}
    expected.add(("deployerPrincipalId", STORAGE_TABLE_DATA_READER, tables["ROLLOUT_TABLE"].symbol))
    if grants != expected:
        problems.append(f"table roles are {sorted(map(str, grants))}, expected {sorted(map(str, expected))}")
    # The identity form of AzureWebJobsStorage the deployment sets is one the code accepts.
    uri = settings.get("AzureWebJobsStorage__tableServiceUri")
    if uri != "storage.properties.primaryEndpoints.table":
        problems.append(f"AzureWebJobsStorage__tableServiceUri is {uri!r}, not the storage account's table endpoint")
    environment = {
        **environment_for("AzureWebJobsStorage__tableServiceUri", "https://upgraderabc.table.core.windows.net/"),
        "AzureWebJobsStorage__credential": str(literal(str(settings.get("AzureWebJobsStorage__credential")))),
        "AzureWebJobsStorage__clientId": "11111111-2222-3333-4444-555555555555",
    }
    try:
        storage = Settings.from_environment(environment).storage
    except ConfigurationError as error:
        problems.append(f"the code refuses the deployment's storage settings: {error}")
    else:
        if storage is None or storage.table_service_uri is None:
            problems.append("with the deployment's storage settings the code has no shared budget")
    return problems


def check_location(infra: Infra) -> list[str]:
    """azd offers only regions with Flex Consumption (as Microsoft's own azd templates do)."""
    location = infra.main.params.get("location")
    if location is None:
        return ["main.bicep has no location parameter"]
    problems = []
    allowed = location.allowed()
    if not allowed:
        problems.append("location accepts any region; allow only regions with Flex Consumption")
    unknown = sorted(str(region) for region in allowed if region not in FLEX_CONSUMPTION_REGIONS)
    if unknown:
        problems.append(f"location allows regions without Flex Consumption (as far as we know): {unknown}")
    if location.default is not None:
        problems.append("location must have no default: azd asks for it")
    metadata = location.decorators.get("metadata", "")
    if not re.search(r"azd\s*:\s*\{\s*type\s*:\s*'location'\s*\}", metadata):
        problems.append("location needs @metadata({azd: {type: 'location'}}) so that azd offers the allowed regions")
    return problems


def check_name_prefix(infra: Infra) -> list[str]:
    """An upper-case namePrefix cannot break the storage account name: every name uses it lowered."""
    main = infra.main
    problems = []
    if "namePrefix" not in main.params:
        return ["main.bicep has no namePrefix parameter"]
    code = main.text  # strings included: '${namePrefix}...' is a use too
    for m in re.finditer(r"\bnamePrefix\b", code):
        if code.startswith("param namePrefix", m.start() - len("param ")):
            continue
        if not code.endswith("toLower(", 0, m.start()):
            line = code.count("\n", 0, m.start()) + 1
            problems.append(f"main.bicep:{line}: namePrefix used without toLower()")
    passed = main.modules["resources"].body.get("params")
    lowered = [name for name, raw in main.variables.items() if raw.replace(" ", "") == "toLower(namePrefix)"]
    for name in ("baseName", "storageAccountName"):
        raw = str(passed.get(name, "")) if isinstance(passed, dict) else ""
        if not any(f"${{{var}}}" in raw for var in lowered):
            problems.append(f"{name} = {raw!r} does not start from the lowered prefix")
    return problems


def check_deployer_access(infra: Infra) -> list[str]:
    """azd always fills AZURE_PRINCIPAL_ID, so the deployer's roles have an explicit opt-out."""
    main, res = infra.main, infra.resources
    problems = []
    opt_in = main.params.get("grantDeployerAccess")
    if opt_in is None or opt_in.type != "bool" or literal(opt_in.default or "") is not True:
        problems.append("main.bicep needs grantDeployerAccess (bool, default true)")
    mapped = json.loads(infra.texts["infra/main.parameters.json"])["parameters"]
    if mapped.get("grantDeployerAccess", {}).get("value") != "${GRANT_DEPLOYER_ACCESS=true}":
        problems.append("main.parameters.json must map grantDeployerAccess to ${GRANT_DEPLOYER_ACCESS=true}")
    passed = main.modules["resources"].body.get("params")
    given = passed.get("deployerPrincipalId") if isinstance(passed, dict) else None
    if given != "grantDeployerAccess ? deployerPrincipalId : ''":
        problems.append(f"the resources module gets deployerPrincipalId = {given!r}, regardless of grantDeployerAccess")
    if res.variables.get("deployerHasAccess") != "!empty(deployerPrincipalId)":
        problems.append("resources.bicep must give the deployer roles only when deployerPrincipalId is set")
    deployer = [a for a, _, _ in role_assignments(infra) if principal(a) == "deployerPrincipalId"]
    if not deployer:
        problems.append("the deployer gets no role at all (no first request, no dead letters to read)")
    problems += [
        f"{a.symbol} is not conditional on deployerHasAccess" for a in deployer if a.condition != "deployerHasAccess"
    ]
    return problems


def check_upgrade_queue(infra: Infra) -> list[str]:
    queue = infra.queue("UPGRADE_QUEUE_NAME")
    properties = queue.body.get("properties")
    assert isinstance(properties, dict)
    problems = []
    delivery = literal(str(properties.get("maxDeliveryCount")))
    guard_default = int(DEFAULTS["UPGRADE_MAX_DELIVERY_COUNT"] or 0)
    guard_max = infra.main.params["maxDeliveryCount"].bound("maxValue")
    if not isinstance(delivery, int) or delivery <= guard_default:
        problems.append(f"maxDeliveryCount {delivery} must be above UPGRADE_MAX_DELIVERY_COUNT ({guard_default})")
    elif guard_max is None or delivery <= guard_max:
        problems.append(f"maxDeliveryCount {delivery} must be above the largest poison guard allowed ({guard_max})")
    lock_raw = literal(str(properties.get("lockDuration")))
    lock = iso_seconds(lock_raw) if isinstance(lock_raw, str) else 0.0
    needed = MAX_INLINE_WAIT_LIMIT_SECONDS + GRAPH_REQUEST_TIMEOUT_SECONDS
    if not needed <= lock <= SERVICE_BUS_MAX_LOCK_SECONDS:
        problems.append(
            f"lockDuration {lock_raw} must cover {needed} s (inline waits + one Graph timeout), at most PT5M"
        )
    host = json.loads(infra.texts["host.json"])["extensions"]["serviceBus"]
    if lock > timespan_seconds(host["maxAutoLockRenewalDuration"]):
        problems.append("lockDuration is longer than host.json maxAutoLockRenewalDuration")
    if properties.get("requiresDuplicateDetection") != "true":
        problems.append("the upgrade queue must detect duplicates (retry and fan-out message ids rely on it)")
    window_raw = literal(str(properties.get("duplicateDetectionHistoryTimeWindow", "'PT10M'")))
    window = iso_seconds(window_raw) if isinstance(window_raw, str) else 0.0
    if window < guard_default * lock:
        problems.append(f"duplicate detection window {window_raw} is shorter than the redeliveries of a crash")
    if properties.get("deadLetteringOnMessageExpiration") != "true":
        problems.append("expired requests must be dead-lettered, not dropped")
    if properties.get("requiresSession") == "true":
        problems.append("the function does not use sessions")
    return problems


def check_deadletter_queue(infra: Infra) -> list[str]:
    queue = infra.queue("DEADLETTER_QUEUE_NAME")
    properties = queue.body.get("properties")
    assert isinstance(properties, dict)
    problems = []
    if properties.get("requiresDuplicateDetection") != "true":
        problems.append("the dead-letter queue must detect duplicates (failures keep the original message id)")
    ttl_raw = literal(str(properties.get("defaultMessageTimeToLive")))
    if not isinstance(ttl_raw, str) or iso_seconds(ttl_raw) < DEADLETTER_MIN_TTL_SECONDS:
        problems.append(f"dead-letter time to live {ttl_raw} is short; failed requests wait for a person")
    if infra.queue("UPGRADE_QUEUE_NAME").symbol == queue.symbol:
        problems.append("the two queues must differ")
    return problems


def check_setting_defaults_match_the_code(infra: Infra) -> list[str]:
    """Defaults in main.bicep and main.parameters.json equal the code's; the code accepts the
    bounds main.bicep allows."""
    problems = []
    settings = infra.app_settings()
    parameters = infra.texts["infra/main.parameters.json"]
    checked = 0
    for name, code_default in DEFAULTS.items():
        if code_default is None or name == "GRAPH_BASE_URL" or name not in settings:
            continue  # GRAPH_BASE_URL: check_graph_base_url
        param = infra.main_param(str(settings[name]))
        if param is None or param.default is None:
            problems.append(f"{name} is not traced to a main.bicep parameter with a default")
            continue
        checked += 1
        if str(literal(param.default)) != code_default:
            problems.append(f"{name}: main.bicep default {param.default} differs from the code's {code_default!r}")
        if azd_default(parameters, param.name) != code_default:
            problems.append(f"{name}: main.parameters.json default differs from the code's {code_default!r}")
        for bound in ("minValue", "maxValue"):
            value = param.bound(bound)
            if value is not None and not code_accepts(name, str(value)):
                problems.append(f"{name}: the code refuses the value main.bicep allows as @{bound}({value})")
    if checked < 6:
        problems.append(f"only {checked} settings with code defaults were traced to main.bicep")
    return problems


def check_graph_base_url(infra: Infra) -> list[str]:
    main = infra.main
    problems = []
    urls = {k: literal(str(v)) for k, v in main.objects.get("graphBaseUrls", {}).items()}
    cloud = main.params.get("graphCloud")
    if cloud is None or not urls:
        return ["main.bicep needs a graphCloud parameter and a graphBaseUrls map"]
    if set(urls) != set(cloud.allowed()):
        problems.append(f"graphBaseUrls covers {sorted(urls)}, graphCloud allows {cloud.allowed()}")
    for key, url in urls.items():
        if url not in GRAPH_CLOUD_ROOTS:
            problems.append(f"graphBaseUrls.{key} = {url!r} is not a root the code accepts")
    if urls.get(str(literal(cloud.default or ""))) != DEFAULTS["GRAPH_BASE_URL"]:
        problems.append("the default cloud's Graph root differs from the code's default GRAPH_BASE_URL")
    if urls.get("usgov") != "https://graph.microsoft.us":
        problems.append("US Government (GCC High) must use https://graph.microsoft.us")
    passed = main.modules["resources"].body["params"]
    if not isinstance(passed, dict) or passed.get("graphBaseUrl") != "graphBaseUrls[graphCloud]":
        problems.append("GRAPH_BASE_URL is not taken from graphBaseUrls[graphCloud]")
    if infra.app_settings().get("GRAPH_BASE_URL") != "graphBaseUrl":
        problems.append("the GRAPH_BASE_URL app setting is not the graphBaseUrl parameter")
    return problems


def check_function_app(infra: Infra) -> list[str]:
    """Flex Consumption, Python 3.11, identity-based deployment storage, azd's service tag."""
    res = infra.resources
    problems = []
    plans = res.of_type("Microsoft.Web/serverfarms")
    if not plans or any(p.body.get("sku") != {"name": "'FC1'", "tier": "'FlexConsumption'"} for p in plans):
        problems.append("the plan must be Flex Consumption (FC1)")
    sites = res.of_type("Microsoft.Web/sites")
    if len(sites) != 1:
        return [*problems, "expected one function app"]
    site = sites[0]
    properties = site.body.get("properties")
    config = properties.get("functionAppConfig") if isinstance(properties, dict) else None
    if not isinstance(config, dict):
        return [*problems, "no functionAppConfig (Flex Consumption)"]
    runtime = config.get("runtime")
    if runtime != {"name": "'python'", "version": "'3.11'"}:
        problems.append(f"runtime is {runtime}, must be python 3.11")
    deployment = config.get("deployment")
    storage = deployment.get("storage") if isinstance(deployment, dict) else None
    auth = storage.get("authentication") if isinstance(storage, dict) else None
    if auth != {"type": "'UserAssignedIdentity'", "userAssignedIdentityResourceId": "identity.id"}:
        problems.append(f"deployment storage must be reached with the user-assigned identity, is {auth}")
    scale = config.get("scaleAndConcurrency")
    if not isinstance(scale, dict) or scale.get("maximumInstanceCount") != "maximumInstanceCount":
        problems.append("maximumInstanceCount must come from the parameter")
    if "kind" not in site.body or "functionapp,linux" not in str(site.body["kind"]):
        problems.append("kind must be functionapp,linux")
    # Below 40 Flex Consumption refuses the deployment in most regions; above it, nothing needs more
    # (the shared budget holds Graph's pace, not the instance count).
    default = literal(infra.main.params["maximumInstanceCount"].default or "")
    if default != FLEX_LOWEST_MAXIMUM_INSTANCE_COUNT:
        problems.append(
            f"maximumInstanceCount default {default} must be {FLEX_LOWEST_MAXIMUM_INSTANCE_COUNT}, "
            "the lowest Flex Consumption accepts in every region"
        )
    tags = str(site.body.get("tags"))
    tag_source = res.variables.get(tags, tags)
    if f"'azd-service-name': '{AZD_SERVICE_NAME}'" not in tag_source:
        problems.append(f"the function app needs the tag azd-service-name: {AZD_SERVICE_NAME}")
    return problems


def check_concurrency_agrees_with_host_json(infra: Infra) -> list[str]:
    host = json.loads(infra.texts["host.json"])
    service_bus = host["extensions"]["serviceBus"]
    problems = []
    default = literal(infra.main.params["perInstanceConcurrency"].default or "")
    if default != service_bus["maxConcurrentCalls"]:
        problems.append(
            f"perInstanceConcurrency default {default} differs from host.json maxConcurrentCalls "
            f"{service_bus['maxConcurrentCalls']}"
        )
    override = "AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls"
    node: object = host
    for part in override.split("__")[1:]:
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        problems.append(f"{override} names no host.json setting")
    if infra.app_settings().get(override) != "string(perInstanceConcurrency)":
        problems.append(f"{override} must carry the perInstanceConcurrency parameter")
    if timespan_seconds(host["functionTimeout"]) > timespan_seconds(service_bus["maxAutoLockRenewalDuration"]):
        problems.append("an invocation may outlive the lock renewal (functionTimeout > maxAutoLockRenewalDuration)")
    return problems


def check_graph_permissions(infra: Infra) -> list[str]:
    main, graph = infra.main, infra.graph
    problems = []
    table = {k: literal(str(v)) for k, v in graph.objects.get("graphAppRoleIds", {}).items()}
    if table != GRAPH_APP_ROLE_IDS:
        problems.append(f"graph-permission.bicep role ids differ from the reference: {table}")
    script = script_role_table(infra.texts["infra/scripts/grant-graph-permission.sh"])
    if script != GRAPH_APP_ROLE_IDS:
        problems.append(f"the script's role ids differ from the reference: {script}")
    user = main.params.get("userScopePermission")
    if user is None or literal(user.default or "") != DEFAULT_USER_SCOPE_PERMISSION:
        problems.append(f"the user-scope permission must default to {DEFAULT_USER_SCOPE_PERMISSION}")
    for name in ("userScopePermission", "teamScopePermission", "chatScopePermission"):
        param = main.params.get(name)
        allowed = [] if param is None else [a for a in param.allowed() if a != "none"]
        if not allowed:
            problems.append(f"{name}: no allowed permissions")
        for value in allowed:
            if value not in GRAPH_APP_ROLE_IDS or "Self" in str(value):
                problems.append(f"{name} allows {value!r}")
    fan_out = main.params.get("enableGroupFanOut")
    if fan_out is None or literal(fan_out.default or "") is not True:
        problems.append("enableGroupFanOut must exist and default to true")
    if "enableGroupFanOut ? ['GroupMember.Read.All']" not in main.variables.get("graphAppRoles", ""):
        problems.append("GroupMember.Read.All must be added when enableGroupFanOut")
    versions = main.params.get("enableVersionChecks")
    if versions is None or literal(versions.default or "") is not True:
        problems.append("enableVersionChecks must exist and default to true (contract §8 reads the catalog)")
    if "enableVersionChecks ? ['AppCatalog.Read.All']" not in main.variables.get("graphAppRoles", ""):
        problems.append("AppCatalog.Read.All must be added when enableVersionChecks")
    defaults = re.search(r'^readonly DEFAULT_APP_ROLES="([^"]*)"', infra.texts[SCRIPT_NAME], re.M)
    if defaults is None or defaults.group(1).split(",") != default_graph_roles(main):
        problems.append("the script's default permissions differ from main.bicep's defaults")
    # Optional, and left out when there is nothing to grant (an empty grant list is no error).
    module = main.modules.get("graphPermission")
    if module is None or module.condition != "grantGraphPermissions && !empty(graphAppRoles)":
        problems.append(
            "the Graph grant must be an optional module (if (grantGraphPermissions && !empty(graphAppRoles)))"
        )
    elif module.body.get("params") != {
        "principalId": "resources.outputs.identityPrincipalId",
        "appRoles": "graphAppRoles",
    }:
        problems.append(f"the Graph module grants {module.body.get('params')}")
    if main.outputs.get("GRAPH_APP_ROLES") != "join(graphAppRoles, ',')":
        problems.append("main.bicep must output GRAPH_APP_ROLES for the script")
    grants = graph.of_type("Microsoft.Graph/appRoleAssignedTo")
    if len(grants) != 1 or grants[0].body.get("appRoleId") != "graphAppRoleIds[appRole]":
        problems.append("graph-permission.bicep must grant graphAppRoleIds[appRole] for each role")
    sps = graph.of_type("Microsoft.Graph/servicePrincipals")
    if [sp.body.get("appId") for sp in sps] != [f"'{MICROSOFT_GRAPH_APP_ID}'"]:
        problems.append("the grant must target the Microsoft Graph service principal")
    config = json.loads(infra.texts["infra/bicepconfig.json"])
    for alias in graph.extensions:
        if "microsoftgraph" not in config.get("extensions", {}).get(alias, ""):
            problems.append(f"bicepconfig.json does not declare the extension {alias}")
    if not graph.extensions:
        problems.append("graph-permission.bicep declares no Microsoft Graph extension")
    return problems


def check_parameters_file(infra: Infra) -> list[str]:
    """azd's parameter file maps onto main.bicep, with the same defaults."""
    main = infra.main
    parameters = infra.texts["infra/main.parameters.json"]
    mapped = json.loads(parameters)["parameters"]
    problems = [f"main.parameters.json sets unknown parameter {name}" for name in mapped if name not in main.params]
    for name, param in main.params.items():
        if param.default is None and name not in mapped:
            problems.append(f"required parameter {name} is not in main.parameters.json")
        if name in mapped and param.default is not None:
            default = azd_default(parameters, name)
            if default is not None and str(literal(param.default)).lower() != default.lower():
                problems.append(f"{name}: azd default {default!r} differs from main.bicep {param.default!r}")
    for name, env in (("environmentName", "AZURE_ENV_NAME"), ("location", "AZURE_LOCATION")):
        if mapped.get(name, {}).get("value") != f"${{{env}}}":
            problems.append(f"{name} must be ${{{env}}}")
    if main.target_scope != "subscription":
        problems.append("main.bicep must deploy at subscription scope (it creates the resource group)")
    return problems


def check_outputs(infra: Infra) -> list[str]:
    """Outputs a user, the docs and the script rely on exist."""
    needed = (
        "AZURE_RESOURCE_GROUP",
        "AZURE_FUNCTION_APP_NAME",
        "AZURE_MANAGED_IDENTITY_PRINCIPAL_ID",
        "AZURE_MANAGED_IDENTITY_CLIENT_ID",
        "ServiceBusConnection__fullyQualifiedNamespace",
        "UPGRADE_QUEUE_NAME",
        "DEADLETTER_QUEUE_NAME",
        "GRAPH_BASE_URL",
        "GRAPH_APP_ROLES",
        "APPLICATIONINSIGHTS_NAME",
    )
    outputs = infra.main.outputs
    problems = [f"main.bicep lacks output {name}" for name in needed if name not in outputs]
    script = infra.texts[SCRIPT_NAME]
    for variable in ("AZURE_MANAGED_IDENTITY_PRINCIPAL_ID", "GRAPH_APP_ROLES", "GRAPH_BASE_URL"):
        if f"${{{variable}:-}}" not in script:
            problems.append(f"the script does not read {variable}")
    return problems


def simple_yaml(text: str) -> dict[str, Node]:
    """The block-style mappings of azure.yaml (no lists, no flow style, as written there)."""
    root: dict[str, Node] = {}
    open_maps: list[tuple[int, dict[str, Node]]] = [(-1, root)]
    for line in text.splitlines():
        content = "" if line.lstrip().startswith("#") else line.split(" #", 1)[0].rstrip()
        if not content.strip():
            continue
        indent = len(content) - len(content.lstrip())
        m = re.fullmatch(r"([\w.-]+):\s*(.*)", content.strip())
        assert m, f"azure.yaml line not understood: {line!r}"
        while open_maps[-1][0] >= indent:
            open_maps.pop()
        parent = open_maps[-1][1]
        if m.group(2):
            parent[m.group(1)] = m.group(2)
        else:
            child: dict[str, Node] = {}
            parent[m.group(1)] = child
            open_maps.append((indent, child))
    return root


def _path(node: Node | None, path: str) -> Node | None:
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def check_azure_yaml(infra: Infra) -> list[str]:
    """azd deploys the repository root as a Python function, from infra/main.bicep."""
    text = infra.texts["azure.yaml"]
    config = simple_yaml(text)
    service = f"services.{AZD_SERVICE_NAME}"
    expected = {
        f"{service}.project": ".",
        f"{service}.language": "python",
        f"{service}.host": "function",
        "infra.provider": "bicep",
        "infra.path": "infra",
        "infra.module": "main",
    }
    problems = [
        f"azure.yaml {path} is {_path(config, path)!r}, expected {value!r}"
        for path, value in expected.items()
        if _path(config, path) != value
    ]
    project = ROOT / str(_path(config, f"{service}.project"))
    for needed in ("host.json", "requirements.txt", "upgrade_handler/settings.py"):
        if not (project / needed).is_file():
            problems.append(f"the service project has no {needed}")
    scripts = re.findall(r"\./(infra/scripts/[\w.-]+)", text)
    problems += [f"azure.yaml runs {script}, which does not exist" for script in scripts if script not in infra.texts]
    return problems


# .funcignore, read the way azd reads it. azd (pkg/azdext dotignore, used when it zips a service)
# parses the file with github.com/denormal/go-gitignore and asks Relative(path, isDir) about every
# entry it copies; an ignored directory is skipped with everything in it. The rules below are that
# library's (pattern.go, ignore.go), which differ from git's in two places worth knowing:
# - a pattern with a slash inside but not at the start (``a/b``) matches the LAST components of a
#   path, so it also matches ``x/a/b``; a leading slash anchors it at the .funcignore's folder;
# - a pattern with a leading slash and no other slash (``/*.md``) is matched against the whole
#   path without FNM_PATHNAME, so its ``*`` crosses ``/``: ``/*.md`` leaves out every .md file.
# Elsewhere ``*``, ``?`` and ``[...]`` stay within one path component, ``**`` spans any number of
# them, a trailing slash matches directories only, ``!`` re-includes, and the last match wins.


def fnmatch_regex(pattern: str, *, pathname: bool) -> re.Pattern[str]:
    """BSD fnmatch(3) as go-gitignore calls it (danwakefield/fnmatch, no FNM_PERIOD): with
    ``pathname`` the wildcards never match ``/``."""
    one = "[^/]" if pathname else "."
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append(f"{one}*")
            continue
        if c == "?":
            out.append(one)
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] in "!^"
            j += negate
            close = pattern.find("]", j + 1)
            if close < 0:  # fnmatch: an unclosed bracket matches nothing
                return re.compile(r"(?!)")
            members = "".join("\\" + m if m in "\\^[]" else m for m in pattern[j:close])
            out.append(("(?!/)" if pathname else "") + f"[{'^' if negate else ''}{members}]")
            i = close
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


@dataclass(frozen=True)
class IgnorePattern:
    """One line of a .funcignore, compiled as go-gitignore compiles it."""

    line: str
    negated: bool
    anchored: bool
    directory: bool
    body: str  # without the leading ``!`` and ``/`` and the trailing ``/``

    @classmethod
    def parse(cls, line: str) -> IgnorePattern | None:
        text = line.rstrip("\r\n").rstrip()
        if not text or text.startswith("#"):
            return None
        body = text
        negated = body.startswith("!")
        body = body[negated:]
        anchored = body.startswith("/")
        body = body[anchored:]
        directory = body.endswith("/")
        body = body[: len(body) - directory]
        return cls(line, negated, anchored, directory, body) if body else None

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether this pattern matches ``path`` (relative to the .funcignore, ``/``-separated)."""
        if self.directory and not is_dir:
            return False
        segments = self.body.split("/")
        if "**" in segments:  # go-gitignore's "wildcard" pattern: component by component
            tokens = [s for s in segments if s]
            if not self.anchored and tokens[0] != "**":
                tokens.insert(0, "**")
            return _match_components(path.split("/"), tokens)
        if len(segments) > 1:  # a "path" pattern
            if self.anchored:
                return bool(fnmatch_regex(self.body, pathname=True).fullmatch(path))
            parts = path.split("/")
            if len(parts) < len(segments):
                return False
            tail = "/".join(parts[-len(segments) :])
            return bool(fnmatch_regex(self.body, pathname=True).fullmatch(tail))
        # a "name" pattern: the last component, or (anchored) the whole path without FNM_PATHNAME
        subject = path if self.anchored else path.rsplit("/", 1)[-1]
        return bool(fnmatch_regex(self.body, pathname=False).fullmatch(subject))


def _match_components(parts: list[str], tokens: list[str]) -> bool:
    if not tokens:
        return not parts
    if tokens[0] == "**":
        return _match_components(parts, tokens[1:]) or (bool(parts) and _match_components(parts[1:], tokens))
    return (
        bool(parts)
        and bool(fnmatch_regex(tokens[0], pathname=True).fullmatch(parts[0]))
        and _match_components(parts[1:], tokens[1:])
    )


def ignore_patterns(text: str) -> list[IgnorePattern]:
    return [pattern for line in text.splitlines() if (pattern := IgnorePattern.parse(line))]


def funcignored(patterns: list[IgnorePattern], path: str) -> bool:
    """Whether azd leaves ``path`` out of the package (a trailing ``/`` marks a directory): when the
    last pattern matching it, or one of its parent directories, is not a ``!`` pattern."""
    parts = path.rstrip("/").split("/")
    for depth in range(1, len(parts) + 1):
        is_dir = depth < len(parts) or path.endswith("/")
        candidate = "/".join(parts[:depth])
        last = next((p for p in reversed(patterns) if p.matches(candidate, is_dir)), None)
        if last is not None and not last.negated:
            return True
    return False


def imported_files(root: Path, entry: str) -> set[str]:
    """``entry`` and every file of ``root`` it imports, directly or through other modules (any
    import statement, at module level or inside a function), as paths relative to ``root``."""
    found: set[str] = set()
    todo = [root / entry]
    while todo:
        path = todo.pop()
        relative = path.relative_to(root).as_posix()
        if relative in found:
            continue
        found.add(relative)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = path.parent
                    for _ in range(node.level - 1):
                        package = package.parent
                    prefix = ".".join(package.relative_to(root).parts)
                    base = f"{prefix}.{base}" if base else prefix
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for k in range(1, len(parts) + 1):
                    stem = root.joinpath(*parts[:k])
                    for candidate in (stem / "__init__.py", stem.with_suffix(".py")):
                        if candidate.is_file():
                            todo.append(candidate)
    return found


#: Files the Functions host reads besides the Python the function imports.
HOST_FILES = ("host.json", "requirements.txt")


def check_funcignore(infra: Infra) -> list[str]:
    """The package holds what the function imports (and the host's files) and nothing else: every
    other top-level entry of the project folder, every sub-package the function never imports,
    and compiled caches are left out."""
    patterns = ignore_patterns(infra.texts[".funcignore"])
    root = infra.root
    needed = sorted(imported_files(root, "function_app.py") | set(HOST_FILES))
    problems = [
        f".funcignore leaves out {path}, which the function needs" for path in needed if funcignored(patterns, path)
    ]
    needed_dirs = {"/".join(path.split("/")[:k]) for path in needed for k in range(1, path.count("/") + 1)}
    needed_top = {path.split("/")[0] for path in needed}
    for entry in sorted(root.iterdir()):
        name = entry.name + ("/" if entry.is_dir() else "")
        if entry.name not in needed_top and not funcignored(patterns, name):
            problems.append(f".funcignore does not leave out {name}, which the function does not need")
    for package in sorted(needed_dirs):
        for sub in sorted((root / package).iterdir()):
            relative = f"{package}/{sub.name}"
            unused_package = sub.is_dir() and relative not in needed_dirs and any(sub.rglob("*.py"))
            if unused_package and not funcignored(patterns, f"{relative}/"):
                problems.append(f".funcignore does not leave out {relative}/, which the function never imports")
    for cache in (f"{needed_top_dir}/__pycache__/x.cpython-311.pyc" for needed_top_dir in sorted(needed_dirs)):
        if not funcignored(patterns, cache):
            problems.append(f".funcignore does not leave out {cache}")
    return problems


CHECKS: list[Check] = [
    check_app_settings_cover_the_code,
    check_identity_connections,
    check_no_keys_or_connection_strings,
    check_local_auth_disabled,
    check_least_privilege_roles,
    check_tables,
    check_location,
    check_name_prefix,
    check_deployer_access,
    check_upgrade_queue,
    check_deadletter_queue,
    check_setting_defaults_match_the_code,
    check_graph_base_url,
    check_function_app,
    check_concurrency_agrees_with_host_json,
    check_graph_permissions,
    check_parameters_file,
    check_outputs,
    check_azure_yaml,
    check_funcignore,
]

# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infra() -> Infra:
    return Infra.load()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_infra_passes(infra: Infra, check: Check) -> None:
    assert check(infra) == []


MAIN, RES, GRAPH, PARAMS = (
    f"infra/{n}" for n in ("main.bicep", "resources.bicep", "graph-permission.bicep", "main.parameters.json")
)
SETTING = "  GRAPH_BASE_URL: graphBaseUrl\n"  # a line of the app settings to add after
SENDER_ID = "subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)"

#: (check, file, text in it, replacement): each edit breaks the deployment in one way, and the
#: check must say so. This is what keeps every check able to fail.
BREAKAGES: list[tuple[Check, str, str, str]] = [
    (check_app_settings_cover_the_code, RES, SETTING, ""),
    (check_app_settings_cover_the_code, RES, SETTING, SETTING + "  ServiceBusConnection: 'x'\n"),
    (check_app_settings_cover_the_code, RES, SETTING, SETTING + "  FUNCTIONS_WORKER_RUNTIME: 'python'\n"),
    (check_app_settings_cover_the_code, RES, "UPGRADE_MAX_ATTEMPTS:", "UPGRADE_MAX_ATTEMPT:"),
    (check_identity_connections, RES, "ServiceBusConnection__credential: 'managedidentity'", "X: 'y'"),
    (check_identity_connections, RES, "Authorization=AAD", "Authorization=Key"),
    (check_no_keys_or_connection_strings, RES, SETTING, SETTING + "  X: serviceBus.listKeys().primaryKey\n"),
    (check_no_keys_or_connection_strings, RES, SETTING, SETTING + "  X: 'Endpoint=sb://ns/;SharedAccessKey=a'\n"),
    (check_no_keys_or_connection_strings, MAIN, "output AZURE_LOCATION", "output storageConnectionString"),
    (check_local_auth_disabled, RES, "  allowSharedKeyAccess: false\n", "  allowSharedKeyAccess: true\n"),
    (check_local_auth_disabled, RES, "    disableLocalAuth: true\n", ""),
    (check_local_auth_disabled, RES, "DisableLocalAuth: true", "DisableLocalAuth: false"),
    (
        check_least_privilege_roles,
        RES,
        f"scope: deadLetterQueue\n  properties: {{\n    roleDefinitionId: {SENDER_ID}",
        f"scope: serviceBus\n  properties: {{\n    roleDefinitionId: {SENDER_ID}",
    ),
    (
        # Data Owner for the deployer too.
        check_least_privilege_roles,
        RES,
        "guid(upgradeQueue.id, deployerPrincipalId, roleIds.serviceBusDataSender)\n  scope: upgradeQueue\n"
        f"  properties: {{\n    roleDefinitionId: {SENDER_ID}",
        "guid(upgradeQueue.id, deployerPrincipalId, roleIds.serviceBusDataSender)\n  scope: upgradeQueue\n"
        f"  properties: {{\n    roleDefinitionId: {SENDER_ID.replace('Sender', 'Owner')}",
    ),
    (
        # Data Owner on the dead-letter queue instead of the upgrade queue.
        check_least_privilege_roles,
        RES,
        "identity.id, roleIds.serviceBusDataOwner)\n  scope: upgradeQueue",
        "identity.id, roleIds.serviceBusDataOwner)\n  scope: deadLetterQueue",
    ),
    (
        # Data Receiver instead of Data Owner: the scale controller cannot read the queue's length.
        check_least_privilege_roles,
        RES,
        "serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'",
        "serviceBusDataOwner: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'",
    ),
    (check_tables, RES, "  scope: graphBudgetTable\n", "  scope: storage\n"),
    (
        check_tables,
        RES,
        "  scope: rolloutTable\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataReader)",
        "  scope: graphBudgetTable\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataReader)",
    ),
    (check_tables, RES, "ROLLOUT_TABLE: rolloutTable.name", "ROLLOUT_TABLE: graphBudgetTable.name"),
    (
        check_tables,
        RES,
        "  AzureWebJobsStorage__credential: 'managedidentity'",
        "  AzureWebJobsStorage__credential: 'key'",
    ),
    (
        check_tables,
        RES,
        "AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table",
        "AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.blob",
    ),
    (check_location, MAIN, "  'westus3'\n])", "  'westus3'\n  'chinanorth3'\n])"),
    (check_location, MAIN, "    type: 'location'\n", "    type: 'string'\n"),
    (check_name_prefix, MAIN, "var prefix = toLower(namePrefix)", "var prefix = namePrefix"),
    (check_name_prefix, MAIN, "storageAccountName: take('${prefix}", "storageAccountName: take('${namePrefix}"),
    (
        check_deployer_access,
        MAIN,
        "deployerPrincipalId: grantDeployerAccess ? deployerPrincipalId : ''",
        "deployerPrincipalId: deployerPrincipalId",
    ),
    (check_deployer_access, PARAMS, "${GRANT_DEPLOYER_ACCESS=true}", "${GRANT_DEPLOYER_ACCESS=false}"),
    (
        check_deployer_access,
        RES,
        "deployerRolloutTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (deployerHasAccess)",
        "deployerRolloutTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' =",
    ),
    (check_upgrade_queue, RES, "maxDeliveryCount: 10\n    // How long", "maxDeliveryCount: 5\n    // How long"),
    (check_upgrade_queue, RES, "lockDuration: 'PT2M30S'", "lockDuration: 'PT1M'"),
    (check_upgrade_queue, RES, "lockDuration: 'PT2M30S'", "lockDuration: 'PT6M'"),
    (check_upgrade_queue, RES, "    deadLetteringOnMessageExpiration: true\n", ""),
    (check_upgrade_queue, RES, "TimeWindow: 'PT1H'\n    // A request", "TimeWindow: 'PT1M'\n    // A request"),
    (check_upgrade_queue, MAIN, "@maxValue(9)", "@maxValue(12)"),
    (check_deadletter_queue, RES, "defaultMessageTimeToLive: 'P90D'", "defaultMessageTimeToLive: 'P1D'"),
    (
        check_deadletter_queue,
        RES,
        "requiresDuplicateDetection: true\n    duplicateDetectionHistoryTimeWindow: 'PT1H'\n    // Failed",
        "requiresDuplicateDetection: false\n    duplicateDetectionHistoryTimeWindow: 'PT1H'\n    // Failed",
    ),
    (
        check_setting_defaults_match_the_code,
        MAIN,
        "upgradeQueueName string = 'teams-app-upgrades'",
        "upgradeQueueName string = 'upgrades'",
    ),
    (check_setting_defaults_match_the_code, PARAMS, "UPGRADE_MAX_ATTEMPTS=8", "UPGRADE_MAX_ATTEMPTS=9"),
    (check_setting_defaults_match_the_code, MAIN, "@minValue(2)\n@maxValue(9)", "@minValue(1)\n@maxValue(9)"),
    (check_setting_defaults_match_the_code, MAIN, "@minValue(0)\n@maxValue(120)", "@minValue(0)\n@maxValue(600)"),
    (check_graph_base_url, MAIN, "usgov: 'https://graph.microsoft.us'", "usgov: 'https://graph.microsoft.com'"),
    (check_graph_base_url, MAIN, "param graphCloud string = 'global'", "param graphCloud string = 'usgov'"),
    (check_function_app, RES, "version: '3.11'", "version: '3.12'"),
    (check_function_app, RES, "tier: 'FlexConsumption'", "tier: 'Dynamic'"),
    (check_function_app, MAIN, "param maximumInstanceCount int = 40", "param maximumInstanceCount int = 4"),
    (check_function_app, RES, "'azd-service-name': 'upgrader'", "'azd-service-name': 'api'"),
    (
        check_concurrency_agrees_with_host_json,
        MAIN,
        "perInstanceConcurrency int = 16",
        "perInstanceConcurrency int = 32",
    ),
    (
        check_concurrency_agrees_with_host_json,
        "host.json",
        '"maxAutoLockRenewalDuration": "00:05:00"',
        '"maxAutoLockRenewalDuration": "00:01:00"',
    ),
    (
        check_graph_permissions,
        GRAPH,
        "'98830695-27a2-44f7-8c18-0c3ebc9698f6'",
        "'98830695-27a2-44f7-8c18-0c3ebc9698f7'",
    ),
    (check_graph_permissions, SCRIPT_NAME, "echo 32ca478f-f89e-41d0-aaf8-101deb7da510", "echo 32ca478f"),
    (
        check_graph_permissions,
        MAIN,
        "userScopePermission string = 'TeamsAppInstallation.ReadWriteForUser.All'",
        "userScopePermission string = 'TeamsAppInstallation.ReadWriteAndConsentForUser.All'",
    ),
    (check_graph_permissions, MAIN, "param enableGroupFanOut bool = true", "param enableGroupFanOut bool = false"),
    (check_graph_permissions, SCRIPT_NAME, ',AppCatalog.Read.All"', '"'),
    (check_graph_permissions, GRAPH, "'AppCatalog.Read.All': 'e12dae10-5a57-4817-b79d-dfbec5348930'\n", ""),
    (check_graph_permissions, MAIN, "param enableVersionChecks bool = true", "param enableVersionChecks bool = false"),
    (
        check_graph_permissions,
        MAIN,
        "ConsentForUser.All'\n  'none'",
        "ConsentForUser.All'\n  'x.ReadWriteSelfForUser.All'",
    ),
    (
        check_graph_permissions,
        MAIN,
        "= if (grantGraphPermissions && !empty(graphAppRoles)) {",
        "= if (grantGraphPermissions) {",
    ),
    (check_parameters_file, PARAMS, '"${AZURE_LOCATION}"', '"${LOCATION}"'),
    (check_parameters_file, PARAMS, "${MAXIMUM_INSTANCE_COUNT=40}", "${MAXIMUM_INSTANCE_COUNT=4}"),
    (check_outputs, MAIN, "output GRAPH_APP_ROLES string", "output GRAPH_ROLES string"),
    (check_azure_yaml, "azure.yaml", "language: python", "language: js"),
    (check_azure_yaml, "azure.yaml", "project: .", "project: ./src"),
    (check_funcignore, ".funcignore", "tests/\n", ""),
    (check_funcignore, ".funcignore", "build/\n", "build/\n*.py\n"),
]


@pytest.mark.parametrize(
    ("check", "name", "old", "new"),
    BREAKAGES,
    ids=[f"{b[0].__name__.removeprefix('check_')}-{i}" for i, b in enumerate(BREAKAGES)],
)
def test_check_notices_breakage(infra: Infra, check: Check, name: str, old: str, new: str) -> None:
    assert check(infra) == [], "the unbroken files must pass first"
    assert check(infra.replaced(name, old, new)) != []


def test_every_check_has_a_breakage() -> None:
    assert {b[0] for b in BREAKAGES} == set(CHECKS)


def test_every_check_fails_on_empty_files(infra: Infra) -> None:
    # Given every deployment file empty, then no check passes (it complains or cannot read).
    empty = Infra(
        {name: "{}" if name.endswith(".json") and name != "infra/main.parameters.json" else "" for name in infra.texts}
    )
    empty.texts["host.json"] = infra.texts["host.json"]
    empty.texts["infra/main.parameters.json"] = '{"parameters": {}}'
    for check in CHECKS:
        try:
            problems = check(empty)
        except (AssertionError, KeyError, ValueError, TypeError, StopIteration):
            continue
        assert problems, f"{check.__name__} passes on empty files"


def test_the_limits_used_here_are_the_codes() -> None:
    # Given the largest inline wait the checks assume, when the code reads it and one step more,
    # then the code accepts the first and refuses the second: the lock duration check is current.
    assert code_accepts("UPGRADE_MAX_INLINE_WAIT_SECONDS", str(MAX_INLINE_WAIT_LIMIT_SECONDS))
    assert not code_accepts("UPGRADE_MAX_INLINE_WAIT_SECONDS", str(MAX_INLINE_WAIT_LIMIT_SECONDS + 0.5))
    assert int(DEFAULTS["UPGRADE_MAX_DELIVERY_COUNT"] or 0) > 0


def test_graph_timeout_is_the_codes() -> None:
    # The lock duration check assumes one Graph request takes at most GRAPH_REQUEST_TIMEOUT_SECONDS.
    from upgrade_handler.graph import TIMEOUT

    assert (
        max(t for t in (TIMEOUT.connect, TIMEOUT.read, TIMEOUT.write, TIMEOUT.pool) if t)
        <= GRAPH_REQUEST_TIMEOUT_SECONDS
    )


def test_mask_hides_comments_and_strings_only() -> None:
    text = "var a = 'it\\'s {x}' // a comment with { and '\nvar b = '${c['d']}' /* { */ { }\n"
    masked = mask(text)
    assert len(masked) == len(text)
    assert "{" not in masked.split("\n")[0]
    assert masked.split("\n")[1].rstrip().endswith("{ }")
    assert "comment" not in masked


def test_duration_parsers() -> None:
    assert iso_seconds("PT2M30S") == 150
    assert iso_seconds("P14D") == 14 * 86400
    assert timespan_seconds("00:05:00") == 300
    assert timespan_seconds("1.00:00:00.5") == 86400.5
    for bad in ("P", "PT", "2M", "P1DT"):
        with pytest.raises(ValueError, match="ISO 8601"):
            iso_seconds(bad)


#: (.funcignore lines, path, whether azd leaves the path out): go-gitignore's rules as azd applies
#: them (see the comment above fnmatch_regex). A trailing "/" on the path marks a directory.
FUNCIGNORE_CASES: list[tuple[list[str], str, bool]] = [
    # A name pattern matches the last component, at any depth.
    (["*.pyc"], "upgrade_handler/__pycache__/settings.cpython-311.pyc", True),
    (["Makefile"], "bench/Makefile", True),
    (["*.pyc"], "upgrade_handler/settings.py", False),
    # A trailing slash: directories only, and everything in them.
    (["tests/"], "tests/test_infra.py", True),
    (["tests/"], "tests", False),
    (["build/"], "upgrade_handler/build/x.py", True),
    # A slash inside: the path's last components, so a multi-segment directory pattern works
    # (issue 13 item 6: the old matcher deployed upgrade_handler/cli/app.py).
    (["upgrade_handler/cli/"], "upgrade_handler/cli/app.py", True),
    (["upgrade_handler/cli/"], "upgrade_handler/client.py", False),
    (["upgrade_handler/cli/"], "upgrade_handler/cli", False),
    (["upgrade_handler/__main__.py"], "upgrade_handler/__main__.py", True),
    (["a/b"], "x/a/b", True),  # go-gitignore; git would anchor it
    (["a/b"], "b", False),
    # `*` does not cross `/` in a path pattern.
    (["upgrade_handler/*.py"], "upgrade_handler/cli/app.py", False),
    (["upgrade_handler/*.py"], "upgrade_handler/settings.py", True),
    # A leading slash anchors at the .funcignore's folder.
    (["/a/*.py"], "x/a/c.py", False),
    (["/a/*.py"], "a/c.py", True),
    (["/tests/"], "bench/tests/x.py", False),
    # A leading slash and no other: the whole path without FNM_PATHNAME, so `*` crosses `/`.
    (["/*.md"], "README.md", True),
    (["/*.md"], "upgrade_handler/samples/README.md", True),
    (["/*.md"], "upgrade_handler/settings.py", False),
    # `**` spans any number of components (none included).
    (["**/build"], "x/y/build", True),
    (["a/**/b"], "a/b", True),
    (["a/**/b"], "a/x/y/b", True),
    (["a/**/b"], "a/x/y/c", False),
    (["docs/**"], "docs/deploying.md", True),
    # `?` and brackets stay in one component.
    (["?.py"], "a.py", True),
    (["a?b"], "a/b", False),
    (["*.py[co]"], "x/y.pyc", True),
    (["*.py[!co]"], "x/y.pyc", False),
    # `!` re-includes; the last matching line wins; an ignored directory keeps its contents out.
    (["*.md", "!README.md"], "README.md", False),
    (["*.md", "!README.md"], "docs/x.md", True),
    (["!x.py", "*.py"], "x.py", True),
    (["docs/", "!docs/keep.md"], "docs/keep.md", True),
    # Comments and blank lines are no patterns.
    (["# tests/", "", "   "], "tests/x.py", False),
]


@pytest.mark.parametrize(("lines", "path", "left_out"), FUNCIGNORE_CASES)
def test_funcignore_matches_like_azd(lines: list[str], path: str, left_out: bool) -> None:
    assert funcignored(ignore_patterns("\n".join(lines)), path) is left_out


def test_imported_files_follows_every_import(tmp_path: Path) -> None:
    # Given an entry module that imports a package, which imports a sibling relatively and another
    # inside a function, and a package nobody imports, then exactly the imported files are found.
    files = {
        "entry.py": "import pkg.a\n",
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import json\n",
        "pkg/unused.py": "",
        "other/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    found = imported_files(tmp_path, "entry.py")
    assert found == {"entry.py", "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py"}


def test_funcignore_check_notices_a_new_package_left_in(infra: Infra, tmp_path: Path) -> None:
    # Given the project with one more top-level package (new test equipment, say), and another
    # sub-package of the deployed package that the function never imports, when .funcignore is
    # unchanged, then the check names both: whatever they are called, they would be deployed.
    for entry in infra.root.iterdir():
        (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (tmp_path / "equipment").mkdir()
    (tmp_path / "equipment" / "__init__.py").write_text("", encoding="utf-8")
    package = tmp_path / "deployed"
    (package / "tools").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "tools" / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "function_app.py").unlink()
    (tmp_path / "function_app.py").write_text(
        (infra.root / "function_app.py").read_text(encoding="utf-8") + "\nimport deployed\n", encoding="utf-8"
    )
    problems = check_funcignore(Infra(infra.texts, tmp_path))
    assert any("equipment/" in problem for problem in problems), problems
    assert any("deployed/tools/" in problem for problem in problems), problems
    assert not any("deployed/__init__.py" in problem for problem in problems), problems


# ------------------------------------------------------------------------------------------------
# The grant script, run against a stand-in for `az` that records what it would send to Graph
# ------------------------------------------------------------------------------------------------

_FAKE_AZ = """\
#!{python}
import json, os, sys
args = sys.argv[1:]
log = os.environ["FAKE_AZ_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["account", "show"]:
    sys.exit(0)
def arg(name):
    return args[args.index(name) + 1] if name in args else ""
url, query, method = arg("--url"), arg("--query"), arg("--method")
tenant_roles = json.loads(os.environ["FAKE_TENANT_ROLES"])
if method == "get" and "servicePrincipals(appId='00000003-0000-0000-c000-000000000000')" in url:
    print("graph-sp-object-id")
elif method == "get" and url.endswith("servicePrincipals/graph-sp-object-id?$select=appRoles"):
    name = query.split("'")[1]
    print(tenant_roles.get(name, ""))
elif method == "get" and url.endswith("/appRoleAssignments"):
    print("\\n".join(os.environ.get("FAKE_EXISTING", "").split(",")))
elif method == "post":
    pass
else:
    sys.exit("unexpected az call: " + " ".join(args))
"""

IDENTITY = "11111111-2222-3333-4444-555555555555"


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    posted: list[dict[str, str]]


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., ScriptRun]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    az = bin_dir / "az"
    az.write_text(_FAKE_AZ.format(python=sys.executable), encoding="utf-8")
    az.chmod(0o755)

    def run(
        *args: str, existing: str = "", roles: str | None = None, tenant: dict[str, str] | None = None
    ) -> ScriptRun:
        log = tmp_path / "az.log"
        log.write_text("", encoding="utf-8")
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            "FAKE_AZ_LOG": str(log),
            "FAKE_TENANT_ROLES": json.dumps(GRAPH_APP_ROLE_IDS if tenant is None else tenant),
            "FAKE_EXISTING": existing,
            "AZURE_MANAGED_IDENTITY_PRINCIPAL_ID": IDENTITY,
        }
        if roles is not None:
            env["GRAPH_APP_ROLES"] = roles
        done = subprocess.run(  # noqa: S603 - a fixed script in this repository
            [bash, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        calls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
        posted = [json.loads(c[c.index("--body") + 1]) for c in calls if "post" in c]
        return ScriptRun(done.returncode, done.stdout, done.stderr, posted)

    return run


def test_script_grants_what_the_bicep_grants_by_default(infra: Infra, run_script: Callable[..., ScriptRun]) -> None:
    # Given no GRAPH_APP_ROLES (the script's defaults), when it runs, then it posts one app role
    # assignment per permission main.bicep grants by default, with the reference ids.
    result = run_script()
    assert result.returncode == 0, result.stderr
    expected = [GRAPH_APP_ROLE_IDS[role] for role in default_graph_roles(infra.main)]
    assert [p["appRoleId"] for p in result.posted] == expected
    assert {p["principalId"] for p in result.posted} == {IDENTITY}
    assert {p["resourceId"] for p in result.posted} == {"graph-sp-object-id"}


def test_script_grants_the_roles_the_deployment_output_names(run_script: Callable[..., ScriptRun]) -> None:
    roles = "TeamsAppInstallation.ReadWriteAndConsentForUser.All,TeamsAppInstallation.ReadWriteForTeam.All"
    result = run_script(roles=roles)
    assert result.returncode == 0, result.stderr
    assert [p["appRoleId"] for p in result.posted] == [GRAPH_APP_ROLE_IDS[r] for r in roles.split(",")]


def test_script_is_idempotent(run_script: Callable[..., ScriptRun]) -> None:
    already = GRAPH_APP_ROLE_IDS["TeamsAppInstallation.ReadWriteForUser.All"]
    result = run_script(existing=already)
    assert result.returncode == 0, result.stderr
    assert [p["appRoleId"] for p in result.posted] == [
        GRAPH_APP_ROLE_IDS["GroupMember.Read.All"],
        GRAPH_APP_ROLE_IDS["AppCatalog.Read.All"],
    ]


def test_script_check_only_reports(run_script: Callable[..., ScriptRun]) -> None:
    missing = run_script("--check")
    assert (missing.returncode, missing.posted) == (2, [])
    assert "Privileged Role Administrator" in missing.stderr
    complete = run_script("--check", existing=",".join(GRAPH_APP_ROLE_IDS.values()))
    assert (complete.returncode, complete.posted) == (0, [])


def test_script_refuses_unknown_permissions_and_ids(run_script: Callable[..., ScriptRun]) -> None:
    assert run_script(roles="Directory.ReadWrite.All").returncode == 1
    assert run_script("--principal-id", "not-a-guid/../x").returncode == 1


def test_script_grants_nothing_when_the_tenant_disagrees_with_its_table(run_script: Callable[..., ScriptRun]) -> None:
    # Given a Microsoft Graph whose GroupMember.Read.All has another id (a stale table, a wrong
    # cloud), when the script runs, then it stops before granting anything.
    tenant = {**GRAPH_APP_ROLE_IDS, "GroupMember.Read.All": "00000000-0000-0000-0000-000000000001"}
    result = run_script(tenant=tenant)
    assert (result.returncode, result.posted) == (1, [])
    assert "GroupMember.Read.All" in result.stderr


def test_docs_query_the_events_the_code_logs() -> None:
    # The KQL in docs/deploying.md looks for these event names; the function must log them.
    docs = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
    code = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "upgrade_handler").glob("*.py"))
    for event in ("upgrade.succeeded", "upgrade.retry_scheduled", "upgrade.dead_lettered", "upgrade.skipped"):
        assert event in docs, event
        assert f'"{event}"' in code, f"{event} is not logged by upgrade_handler"


def test_docs_name_the_deploy_steps() -> None:
    # The deploy section the README links to covers what the issue asks for.
    text = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
    for needed in (
        "azd up",
        "Privileged Role Administrator",
        "grant-graph-permission.sh",
        "python -m upgrade_handler send",
        "upgrade.dead_lettered",
        "traces",
        "GroupMember.Read.All",
        "TeamsAppInstallation.ReadWriteForUser.All",
        "GCC High",
        "AppCatalog.Read.All",
        "Azure Service Bus Data Owner",
        "Storage Table Data Contributor",
        "GRANT_DEPLOYER_ACCESS",
        "Not a valid reference update",
        "budget.degraded",
        "graphbudget",
    ):
        assert needed in text, needed


_EXAMPLE = textwrap.dedent(
    """\
    targetScope = 'subscription'
    @description('it\\'s a {brace}')
    param p string = 'x' // trailing { comment
    var o = {
      a: 'b'
      nested: {
        c: string(p)
      }
    }
    resource r 'A/b@2020-01-01' = if (p == 'x') {
      name: 'n'
      properties: {
        k: '${p}-y'
      }
      resource child 'c' = {
        name: 'd'
      }
    }
    output out string = r.name
    """
)


def test_reader_reads_the_bicep_subset() -> None:
    parsed = BicepFile.parse(_EXAMPLE)
    assert parsed.target_scope == "subscription"
    assert parsed.params["p"].default == "'x'"
    assert parsed.params["p"].decorators == {"description": "'it\\'s a {brace}'"}
    assert parsed.objects["o"] == {"a": "'b'", "nested": {"c": "string(p)"}}
    assert parsed.resources["r"].condition == "p == 'x'"
    assert parsed.resources["r"].body["properties"] == {"k": "'${p}-y'"}
    assert parsed.resources["child"].type == "A/b/c"
    assert parsed.outputs == {"out": "r.name"}
