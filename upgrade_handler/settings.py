"""The app settings of the function (contract §5), read once and validated.

A bad setting is never a message's fault: :func:`Settings.from_environment` raises
:class:`ConfigurationError` naming the setting, before any connection is opened, and the
function refuses to start.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Every setting this package reads, with its default (``None``: no default). The infra tests
#: hold the Bicep to this table, so a new setting is added here first.
DEFAULTS: dict[str, str | None] = {
    "ServiceBusConnection": None,
    "ServiceBusConnection__fullyQualifiedNamespace": None,
    "ServiceBusConnection__clientId": None,
    "UPGRADE_QUEUE_NAME": "teams-app-upgrades",
    "DEADLETTER_QUEUE_NAME": "teams-app-upgrades-deadletter",
    "GRAPH_BASE_URL": "https://graph.microsoft.com",
    "AZURE_CLIENT_ID": None,
    "UPGRADE_MAX_ATTEMPTS": "8",
    "UPGRADE_MAX_INLINE_WAIT_SECONDS": "10",
    "UPGRADE_MAX_DELIVERY_COUNT": "5",
    "GRAPH_MAX_REQUESTS_PER_SECOND": "30",
    "UPGRADE_MAX_RETRY_HOURS": "24",
    "UPGRADE_MAX_BUDGET_WAIT_SECONDS": "240",
    "GRAPH_BUDGET_TABLE": "graphbudget",
    "ROLLOUT_TABLE": "rollouts",
    "AzureWebJobsStorage": None,
    "AzureWebJobsStorage__accountName": None,
    "AzureWebJobsStorage__tableServiceUri": None,
    "AzureWebJobsStorage__credential": None,
    "AzureWebJobsStorage__clientId": None,
}

#: Azurite's well-known development account (published in its README), for ``UseDevelopmentStorage=true``.
DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)

#: The Microsoft Graph cloud roots a deployment may call.
GRAPH_CLOUD_ROOTS = (
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
)
_LOCAL_HOSTS = ("localhost", "127.0.0.1")
_GLOBAL_SCOPE = "https://graph.microsoft.com/.default"
_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


class ConfigurationError(Exception):
    """An app setting is missing or invalid; ``setting`` names it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"app setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ServiceBusConnection:
    """How to reach the namespace: a connection string, or a namespace and managed identity."""

    connection_string: str | None = None
    fully_qualified_namespace: str | None = None
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class StorageConnection:
    """How to reach the app's own Table service: a connection string, or a table endpoint and identity."""

    connection_string: str | None = None
    table_service_uri: str | None = None
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    upgrade_queue: str
    deadletter_queue: str
    graph_base_url: str
    """Scheme and host (and port for a local simulator), no trailing slash."""
    graph_scope: str
    managed_identity_client_id: str | None
    max_attempts: int
    max_inline_wait_seconds: float
    max_delivery_count: int
    max_requests_per_second: float
    service_bus: ServiceBusConnection
    max_retry_hours: float = 24.0
    """No retry is scheduled to come due later than this after the first attempt (§2)."""
    max_budget_wait_seconds: float = 240.0
    """The longest one invocation waits for its turn in the shared Graph budget (§7)."""
    budget_table: str = "graphbudget"
    rollout_table: str = "rollouts"
    storage: StorageConnection | None = None
    """The app's storage account (``AzureWebJobsStorage``); ``None``: no shared budget, no ledger."""

    @property
    def graph_is_local(self) -> bool:
        return urlsplit(self.graph_base_url).hostname in _LOCAL_HOSTS

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or not value.strip():
                return DEFAULTS[name]
            return value.strip()

        base_url, scope = _graph_base_url(get("GRAPH_BASE_URL") or "")
        return cls(
            upgrade_queue=_queue_name("UPGRADE_QUEUE_NAME", get("UPGRADE_QUEUE_NAME")),
            deadletter_queue=_queue_name("DEADLETTER_QUEUE_NAME", get("DEADLETTER_QUEUE_NAME")),
            graph_base_url=base_url,
            graph_scope=scope,
            managed_identity_client_id=_client_id("AZURE_CLIENT_ID", get("AZURE_CLIENT_ID")),
            max_attempts=_integer("UPGRADE_MAX_ATTEMPTS", get("UPGRADE_MAX_ATTEMPTS"), minimum=1),
            max_inline_wait_seconds=_number(
                "UPGRADE_MAX_INLINE_WAIT_SECONDS", get("UPGRADE_MAX_INLINE_WAIT_SECONDS"), maximum=120
            ),
            max_delivery_count=_integer("UPGRADE_MAX_DELIVERY_COUNT", get("UPGRADE_MAX_DELIVERY_COUNT"), minimum=2),
            max_requests_per_second=_positive_number(
                "GRAPH_MAX_REQUESTS_PER_SECOND", get("GRAPH_MAX_REQUESTS_PER_SECOND")
            ),
            service_bus=_service_bus(
                get("ServiceBusConnection"),
                get("ServiceBusConnection__fullyQualifiedNamespace"),
                get("ServiceBusConnection__clientId"),
            ),
            max_retry_hours=_bounded_number("UPGRADE_MAX_RETRY_HOURS", get("UPGRADE_MAX_RETRY_HOURS"), 1 / 60, 24 * 14),
            max_budget_wait_seconds=_number(
                "UPGRADE_MAX_BUDGET_WAIT_SECONDS", get("UPGRADE_MAX_BUDGET_WAIT_SECONDS"), maximum=BUDGET_WAIT_LIMIT
            ),
            budget_table=_table_name("GRAPH_BUDGET_TABLE", get("GRAPH_BUDGET_TABLE")),
            rollout_table=_table_name("ROLLOUT_TABLE", get("ROLLOUT_TABLE")),
            storage=_storage(get),
        )


#: ``functionTimeout`` and ``maxAutoLockRenewalDuration`` in host.json are 5 minutes: a budget wait must end
#: well inside them, leaving time for the Graph call (30 s) and the settling send (30 s).
BUDGET_WAIT_LIMIT = 240.0
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{2,62}")


def _graph_base_url(raw: str) -> tuple[str, str]:
    """Return the normalised base URL and the token scope for it."""
    candidate = raw.rstrip("/")
    if candidate.lower() in GRAPH_CLOUD_ROOTS:
        return candidate.lower(), f"{candidate.lower()}/.default"
    try:
        parts = urlsplit(candidate)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is not None
        and parts.scheme in ("http", "https")
        and parts.hostname in _LOCAL_HOSTS
        and not parts.path
        and not parts.query
        and not parts.fragment
        and parts.username is None
        and parts.password is None
    ):
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        return f"{parts.scheme}://{netloc}", _GLOBAL_SCOPE
    allowed = ", ".join(GRAPH_CLOUD_ROOTS)
    raise ConfigurationError(
        "GRAPH_BASE_URL",
        f"{raw!r} is not a Microsoft Graph cloud root ({allowed}) "
        "nor http(s)://localhost or http(s)://127.0.0.1 with an optional port",
    )


def _client_id(setting: str, value: str | None) -> str | None:
    if value is not None and not _GUID.fullmatch(value):
        raise ConfigurationError(setting, f"{value!r} is not a managed identity client id (a GUID)")
    return value


def _queue_name(setting: str, value: str | None) -> str:
    if not value or len(value) > 260 or any(c.isspace() for c in value):
        raise ConfigurationError(setting, f"{value!r} is not a Service Bus queue name")
    return value


def _integer(setting: str, value: str | None, *, minimum: int) -> int:
    try:
        number = int(value or "")
    except ValueError:
        raise ConfigurationError(setting, f"{value!r} is not a whole number") from None
    if number < minimum:
        raise ConfigurationError(setting, f"{number} is below the minimum of {minimum}")
    return number


def _number(setting: str, value: str | None, *, maximum: float) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise ConfigurationError(setting, f"{value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number < 0 or number > maximum:
        raise ConfigurationError(setting, f"{value!r} must be between 0 and {maximum:g} seconds")
    return number


def _positive_number(setting: str, value: str | None) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise ConfigurationError(setting, f"{value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(setting, f"{value!r} must be a positive number")
    return number


def _service_bus(connection_string: str | None, namespace: str | None, client_id: str | None) -> ServiceBusConnection:
    if connection_string:
        fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
        endpoint = next((v for k, v in fields.items() if k.lower() == "endpoint"), "")
        if not endpoint.lower().startswith("sb://"):
            raise ConfigurationError(
                "ServiceBusConnection", "is not a Service Bus connection string (no Endpoint=sb://...)"
            )
        return ServiceBusConnection(connection_string=connection_string)
    if namespace:
        host = namespace.removeprefix("sb://").rstrip("/")
        if not host or "/" in host or any(c.isspace() for c in host):
            raise ConfigurationError(
                "ServiceBusConnection__fullyQualifiedNamespace",
                f"{namespace!r} is not a namespace host name (<name>.servicebus.windows.net)",
            )
        return ServiceBusConnection(
            fully_qualified_namespace=host, client_id=_client_id("ServiceBusConnection__clientId", client_id)
        )
    raise ConfigurationError(
        "ServiceBusConnection",
        "neither ServiceBusConnection (a connection string) nor "
        "ServiceBusConnection__fullyQualifiedNamespace (managed identity) is set",
    )


def _bounded_number(setting: str, value: str | None, minimum: float, maximum: float) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise ConfigurationError(setting, f"{value!r} is not a number") from None
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise ConfigurationError(setting, f"{value!r} must be between {minimum:g} and {maximum:g}")
    return number


def _table_name(setting: str, value: str | None) -> str:
    if not value or not _TABLE_NAME.fullmatch(value):
        raise ConfigurationError(setting, f"{value!r} is not a table name (3 to 63 letters and digits, a letter first)")
    return value


def _storage(get: Callable[[str], str | None]) -> StorageConnection | None:
    """``AzureWebJobsStorage`` in the forms the Functions host accepts, or ``None`` when it is not set."""
    connection_string = get("AzureWebJobsStorage")
    if connection_string:
        fields = {
            key.strip().lower(): value.strip()
            for key, _, value in (part.partition("=") for part in connection_string.split(";"))
            if key.strip()
        }
        if fields.get("usedevelopmentstorage", "").lower() == "true":
            return StorageConnection(connection_string=DEVELOPMENT_STORAGE)
        if not fields.get("accountname") or not (fields.get("accountkey") or fields.get("sharedaccesssignature")):
            raise ConfigurationError(
                "AzureWebJobsStorage", "is not a storage connection string (no AccountName and AccountKey)"
            )
        return StorageConnection(connection_string=connection_string)
    uri, account = get("AzureWebJobsStorage__tableServiceUri"), get("AzureWebJobsStorage__accountName")
    if uri is None and account is None:
        return None
    if uri is None:
        assert account is not None
        if not re.fullmatch(r"[a-z0-9]{3,24}", account):
            raise ConfigurationError(
                "AzureWebJobsStorage__accountName", f"{account!r} is not a storage account name (3 to 24 a-z 0-9)"
            )
        uri = f"https://{account}.table.core.windows.net"
    parts = urlsplit(uri)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.query:
        raise ConfigurationError("AzureWebJobsStorage__tableServiceUri", f"{uri!r} is not an https table endpoint")
    credential = get("AzureWebJobsStorage__credential")
    if credential is not None and credential.lower() != "managedidentity":
        raise ConfigurationError(
            "AzureWebJobsStorage__credential", f"{credential!r}: only managedidentity is supported"
        )
    client_id = _client_id("AzureWebJobsStorage__clientId", get("AzureWebJobsStorage__clientId"))
    return StorageConnection(table_service_uri=uri.rstrip("/"), client_id=client_id)
