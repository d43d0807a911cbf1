"""Contract §5 (app settings): defaults, validation that names the setting, and where Graph may be.

A bad setting is never a message's fault: :meth:`Settings.from_environment` raises
:class:`ConfigurationError` naming the setting, so the function refuses to start.
"""

from __future__ import annotations

from typing import Any

import pytest

from upgrade_handler.settings import ConfigurationError, Settings

NAMESPACE = "contoso-upgrades.servicebus.windows.net"
CONNECTION_STRING = (
    "Endpoint=sb://contoso-upgrades.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ=="
)
EMULATOR_CONNECTION_STRING = (
    "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
)
MANAGED_IDENTITY = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
GLOBAL_SCOPE = "https://graph.microsoft.com/.default"

#: What an Azure deployment sets when it relies on every default: the namespace, reached with managed identity.
AZURE = {"ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE}


def settings(**overrides: str) -> Settings:
    return Settings.from_environment({**AZURE, **overrides})


def refused(environ: dict[str, str]) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_environment(environ)
    return error.value


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_of_a_deployment_that_sets_only_the_namespace() -> None:
    # given only the Service Bus namespace
    configured = settings()
    # then every other setting has the documented default
    assert configured.upgrade_queue == "teams-app-upgrades"
    assert configured.deadletter_queue == "teams-app-upgrades-deadletter"
    assert configured.graph_base_url == "https://graph.microsoft.com"
    assert configured.graph_scope == GLOBAL_SCOPE
    assert configured.managed_identity_client_id is None
    assert configured.max_attempts == 8
    assert configured.max_inline_wait_seconds == 10
    assert configured.max_delivery_count == 5


def test_blank_setting_counts_as_unset() -> None:
    # the portal leaves an emptied app setting as "" rather than removing it
    configured = settings(UPGRADE_QUEUE_NAME="", UPGRADE_MAX_ATTEMPTS="  ", GRAPH_BASE_URL="")
    assert configured.upgrade_queue == "teams-app-upgrades"
    assert configured.max_attempts == 8
    assert configured.graph_base_url == "https://graph.microsoft.com"


def test_every_setting_is_read_from_the_given_environment() -> None:
    configured = settings(
        UPGRADE_QUEUE_NAME="upgrades",
        DEADLETTER_QUEUE_NAME="upgrades-failed",
        AZURE_CLIENT_ID=MANAGED_IDENTITY,
        UPGRADE_MAX_ATTEMPTS="3",
        UPGRADE_MAX_INLINE_WAIT_SECONDS="2.5",
        UPGRADE_MAX_DELIVERY_COUNT="9",
    )
    assert configured.upgrade_queue == "upgrades"
    assert configured.deadletter_queue == "upgrades-failed"
    assert configured.managed_identity_client_id == MANAGED_IDENTITY
    assert configured.max_attempts == 3
    assert configured.max_inline_wait_seconds == 2.5
    assert configured.max_delivery_count == 9


# --- each setting's validation names the setting ------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("UPGRADE_MAX_ATTEMPTS", "0"),
        ("UPGRADE_MAX_ATTEMPTS", "-1"),
        ("UPGRADE_MAX_ATTEMPTS", "eight"),
        ("UPGRADE_MAX_ATTEMPTS", "8.5"),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "-1"),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "ten"),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "nan"),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "inf"),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "10s"),
        ("UPGRADE_MAX_DELIVERY_COUNT", "0"),
        ("UPGRADE_MAX_DELIVERY_COUNT", "-5"),
        ("UPGRADE_MAX_DELIVERY_COUNT", "five"),
        # 1 would dead-letter every message on its first delivery, before any attempt
        ("UPGRADE_MAX_DELIVERY_COUNT", "1"),
        ("UPGRADE_QUEUE_NAME", "teams app upgrades"),
        ("UPGRADE_QUEUE_NAME", "q" * 261),
        ("DEADLETTER_QUEUE_NAME", "dead letters"),
    ],
)
def test_invalid_value_is_refused_naming_the_setting(setting: str, value: str) -> None:
    # given a deployment with one bad setting
    error = refused({**AZURE, setting: value})
    # then the error names it, so the operator knows which one to fix
    assert error.setting == setting
    assert setting in str(error)


@pytest.mark.parametrize(
    ("setting", "value", "attribute", "expected"),
    [
        ("UPGRADE_MAX_ATTEMPTS", "1", "max_attempts", 1),
        ("UPGRADE_MAX_ATTEMPTS", " 12 ", "max_attempts", 12),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "0", "max_inline_wait_seconds", 0),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "0.5", "max_inline_wait_seconds", 0.5),
        ("UPGRADE_MAX_INLINE_WAIT_SECONDS", "30", "max_inline_wait_seconds", 30),
        ("UPGRADE_MAX_DELIVERY_COUNT", "2", "max_delivery_count", 2),
        ("UPGRADE_MAX_DELIVERY_COUNT", "9", "max_delivery_count", 9),
    ],
)
def test_valid_value_is_taken(setting: str, value: str, attribute: str, expected: Any) -> None:
    assert getattr(settings(**{setting: value}), attribute) == expected


@pytest.mark.parametrize("value", ["upgrader-identity", "0b1c2d3e-4f50-6172-8394", "/subscriptions/x/resourceGroups/y"])
def test_managed_identity_client_id_that_is_not_a_guid_is_refused(value: str) -> None:
    error = refused({**AZURE, "AZURE_CLIENT_ID": value})
    assert error.setting == "AZURE_CLIENT_ID"


# --- GRAPH_BASE_URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root",
    [
        "https://graph.microsoft.com",
        "https://graph.microsoft.us",
        "https://dod-graph.microsoft.us",
        "https://microsoftgraph.chinacloudapi.cn",
    ],
)
def test_cloud_root_is_used_with_its_own_default_scope(root: str) -> None:
    # given a deployment in a national cloud
    configured = settings(GRAPH_BASE_URL=root)
    # then Graph is called there, with a token for that cloud
    assert configured.graph_base_url == root
    assert configured.graph_scope == f"{root}/.default"


@pytest.mark.parametrize(
    ("written", "root"),
    [
        ("https://graph.microsoft.com/", "https://graph.microsoft.com"),
        ("HTTPS://GRAPH.MICROSOFT.US", "https://graph.microsoft.us"),
        ("  https://dod-graph.microsoft.us  ", "https://dod-graph.microsoft.us"),
    ],
)
def test_cloud_root_written_loosely_is_normalised(written: str, root: str) -> None:
    configured = settings(GRAPH_BASE_URL=written)
    assert configured.graph_base_url == root
    assert configured.graph_scope == f"{root}/.default"


@pytest.mark.parametrize(
    ("written", "base"),
    [
        ("http://localhost:8080", "http://localhost:8080"),
        ("https://127.0.0.1", "https://127.0.0.1"),
        ("http://localhost", "http://localhost"),
        ("http://127.0.0.1:7071/", "http://127.0.0.1:7071"),
        ("https://localhost:44300", "https://localhost:44300"),
    ],
)
def test_local_simulator_is_allowed_with_the_global_scope(written: str, base: str) -> None:
    # given a developer pointing the function at a Graph simulator on this machine
    configured = settings(GRAPH_BASE_URL=written)
    # then calls go to the simulator, and the token asked for is the global Graph one
    assert configured.graph_base_url == base
    assert configured.graph_scope == GLOBAL_SCOPE


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com",
        "https://graph.microsoft.de",
        "https://graph.windows.net",
        "https://graph.microsoft.com.evil.com",
        "https://evilgraph.microsoft.com",
        "https://graph.microsoft.com/v1.0",
        "https://graph.microsoft.com/beta",
        "https://graph.microsoft.com:8443",
        "https://graph.microsoft.com?x=1",
        "https://graph.microsoft.com#x",
        "http://graph.microsoft.com",
        "graph.microsoft.com",
        "https://graph.microsoft.com@evil.com",
        "https://evil.com@graph.microsoft.com",
        "https://user:pass@graph.microsoft.com",
        "http://localhost.evil.com",
        "http://localhost@evil.com",
        "http://localhost:8080@evil.com",
        "http://evil.com@localhost",
        "http://127.0.0.1.nip.io",
        "http://127.0.0.2",
        "http://[::1]:8080",
        "http://localhost:8080/v1.0",
        "http://localhost/graph",
        "http://localhost:8080?tenant=x",
        "http://localhost:8080#x",
        "ftp://localhost",
        "file://localhost/etc/passwd",
        "http://localhost:notaport",
        "localhost:8080",
    ],
)
def test_any_other_graph_base_url_is_refused_naming_the_setting(url: str) -> None:
    error = refused({**AZURE, "GRAPH_BASE_URL": url})
    assert error.setting == "GRAPH_BASE_URL"


# --- Service Bus connection ---------------------------------------------------------------------


def test_namespace_is_reached_with_managed_identity() -> None:
    configured = Settings.from_environment({"ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE})
    assert configured.service_bus.fully_qualified_namespace == NAMESPACE
    assert configured.service_bus.connection_string is None
    assert configured.service_bus.client_id is None


def test_namespace_with_a_user_assigned_identity_carries_its_client_id() -> None:
    configured = Settings.from_environment(
        {
            "ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE,
            "ServiceBusConnection__clientId": MANAGED_IDENTITY,
        }
    )
    assert configured.service_bus.fully_qualified_namespace == NAMESPACE
    assert configured.service_bus.client_id == MANAGED_IDENTITY


def test_namespace_written_as_an_endpoint_is_read_as_its_host() -> None:
    configured = Settings.from_environment({"ServiceBusConnection__fullyQualifiedNamespace": f"sb://{NAMESPACE}/"})
    assert configured.service_bus.fully_qualified_namespace == NAMESPACE


@pytest.mark.parametrize(
    "connection_string", [CONNECTION_STRING, EMULATOR_CONNECTION_STRING], ids=["azure", "emulator"]
)
def test_connection_string_is_used_as_given(connection_string: str) -> None:
    configured = Settings.from_environment({"ServiceBusConnection": connection_string})
    assert configured.service_bus.connection_string == connection_string
    assert configured.service_bus.fully_qualified_namespace is None


def test_without_any_service_bus_connection_the_function_refuses_to_start() -> None:
    error = refused({})
    assert error.setting == "ServiceBusConnection"
    assert "ServiceBusConnection__fullyQualifiedNamespace" in str(error)


@pytest.mark.parametrize(
    "connection_string",
    [
        "contoso-upgrades.servicebus.windows.net",
        "Endpoint=https://contoso-upgrades.servicebus.windows.net/;SharedAccessKeyName=x;SharedAccessKey=y",
        "SharedAccessKeyName=x;SharedAccessKey=y",
    ],
)
def test_connection_string_that_is_not_one_is_refused(connection_string: str) -> None:
    error = refused({"ServiceBusConnection": connection_string})
    assert error.setting == "ServiceBusConnection"


@pytest.mark.parametrize(
    "namespace",
    ["contoso upgrades.servicebus.windows.net", "sb://", "contoso.servicebus.windows.net/queues/x"],
)
def test_namespace_that_is_not_a_host_name_is_refused(namespace: str) -> None:
    error = refused({"ServiceBusConnection__fullyQualifiedNamespace": namespace})
    assert error.setting == "ServiceBusConnection__fullyQualifiedNamespace"


def test_two_bad_settings_still_give_an_error_naming_one_of_them() -> None:
    # given two bad settings, the error names one of them rather than failing in some generic way
    error = refused({**AZURE, "GRAPH_BASE_URL": "https://evil.com", "UPGRADE_MAX_ATTEMPTS": "x"})
    assert error.setting in ("GRAPH_BASE_URL", "UPGRADE_MAX_ATTEMPTS")


# --- the app's storage account, the budget and the retry horizon (§5, §7, §8) --------------------


def test_without_a_storage_account_there_is_no_shared_store() -> None:
    configured = settings()
    assert configured.storage is None
    assert (configured.budget_table, configured.rollout_table) == ("graphbudget", "rollouts")
    assert (configured.max_retry_hours, configured.max_budget_wait_seconds) == (24, 240)


def test_use_development_storage_points_at_azurite() -> None:
    storage = settings(AzureWebJobsStorage="UseDevelopmentStorage=true").storage
    assert storage is not None and storage.connection_string is not None
    assert "AccountName=devstoreaccount1" in storage.connection_string
    assert "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1" in storage.connection_string


def test_a_storage_connection_string_is_used_as_given() -> None:
    given = "DefaultEndpointsProtocol=https;AccountName=contosoupgrader;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    storage = settings(AzureWebJobsStorage=given).storage
    assert storage is not None and storage.connection_string == given


def test_an_account_name_is_reached_with_the_managed_identity() -> None:
    storage = settings(
        AzureWebJobsStorage__accountName="contosoupgrader",
        AzureWebJobsStorage__credential="managedidentity",
        AzureWebJobsStorage__clientId=MANAGED_IDENTITY,
    ).storage
    assert storage is not None
    assert storage.table_service_uri == "https://contosoupgrader.table.core.windows.net"
    assert (storage.client_id, storage.connection_string) == (MANAGED_IDENTITY, None)


def test_a_table_service_uri_is_used_as_given() -> None:
    storage = settings(
        AzureWebJobsStorage__tableServiceUri="https://contosoupgrader.table.core.usgovcloudapi.net/"
    ).storage
    assert storage is not None
    assert storage.table_service_uri == "https://contosoupgrader.table.core.usgovcloudapi.net"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("AzureWebJobsStorage", "AccountName=contoso"),  # no key
        ("AzureWebJobsStorage__accountName", "Contoso_Upgrader"),
        ("AzureWebJobsStorage__tableServiceUri", "http://contoso.table.core.windows.net"),
        ("AzureWebJobsStorage__credential", "connectionstring"),
        ("AzureWebJobsStorage__clientId", "not-a-guid"),
        ("GRAPH_BUDGET_TABLE", "graph-budget"),
        ("ROLLOUT_TABLE", "r"),
        ("UPGRADE_MAX_RETRY_HOURS", "0"),
        ("UPGRADE_MAX_RETRY_HOURS", "1000"),
        ("UPGRADE_MAX_RETRY_HOURS", "nan"),
        ("UPGRADE_MAX_BUDGET_WAIT_SECONDS", "241"),
        ("UPGRADE_MAX_BUDGET_WAIT_SECONDS", "-1"),
    ],
)
def test_a_bad_storage_or_budget_setting_is_refused_naming_it(setting: str, value: str) -> None:
    environ = {**AZURE, setting: value}
    if setting in ("AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"):
        environ["AzureWebJobsStorage__accountName"] = "contosoupgrader"
    error = refused(environ)
    assert error.setting == setting
