"""The same function written on msgraph-sdk, for the cold-start comparison (benchmark 2).

What a user would write: the SDK's ``GraphServiceClient`` built at import, and since the SDK has
no request builder for the user-scope upgrade, the raw URL through its request adapter. It
imports what our function imports besides (Functions, identity, Service Bus for its dead letters)
and does less per message (no validation, no retry or dead-letter logic), so the comparison
favours the SDK. The SDK modules are imported by name so that mypy never reads the SDK.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import azure.functions as func
import azure.servicebus.aio  # noqa: F401  # dead letters and retries, as the real function sends them
from azure.identity.aio import ManagedIdentityCredential

_msgraph: Any = importlib.import_module("msgraph")
_method: Any = importlib.import_module("kiota_abstractions.method")
_info: Any = importlib.import_module("kiota_abstractions.request_information")
_auth: Any = importlib.import_module("kiota_authentication_azure.azure_identity_authentication_provider")
_odata: Any = importlib.import_module("msgraph.generated.models.o_data_errors.o_data_error")

TEMPLATE = "{+baseurl}/users/{user%2Did}/teamwork/installedApps/{userScopeTeamsAppInstallation%2Did}/upgrade"
BASE_URL = os.environ.get("GRAPH_BASE_URL", "https://graph.microsoft.com")

app = func.FunctionApp()
credential = ManagedIdentityCredential(client_id=os.environ.get("AZURE_CLIENT_ID"))
_provider = _auth.AzureIdentityAuthenticationProvider(
    credential,
    scopes=["https://graph.microsoft.com/.default"],
    allowed_hosts=["127.0.0.1", "localhost", "graph.microsoft.com"],
)
adapter = _msgraph.GraphRequestAdapter(_provider)
adapter.base_url = f"{BASE_URL}/v1.0"
client = _msgraph.GraphServiceClient(request_adapter=adapter)


@app.function_name(name="UpgradeTeamsApp")
@app.service_bus_queue_trigger(
    arg_name="message",
    queue_name="%UPGRADE_QUEUE_NAME%",
    connection="ServiceBusConnection",
)
async def upgrade_teams_app(message: func.ServiceBusMessage) -> None:
    request = json.loads(message.get_body())
    info = _info.RequestInformation(
        _method.Method.POST,
        TEMPLATE,
        {"user%2Did": request["userId"], "userScopeTeamsAppInstallation%2Did": request["appInstallationId"]},
    )
    await adapter.send_no_response_content_async(info, {"XXX": _odata.ODataError})
