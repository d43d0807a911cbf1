"""The Azure Function: a Service Bus queue trigger that hands each message to the upgrade handler.

Importing this module reads and validates the app settings, so a bad setting stops the app from
starting with an error naming it. Clients are opened on the first message and reused after.
"""

import azure.functions as func

from upgrade_handler import UpgradeHandler

app = func.FunctionApp()
handler = UpgradeHandler.from_environment()


@app.function_name(name="UpgradeTeamsApp")
@app.service_bus_queue_trigger(
    arg_name="message",
    queue_name="%UPGRADE_QUEUE_NAME%",
    connection="ServiceBusConnection",
)
async def upgrade_teams_app(message: func.ServiceBusMessage) -> None:
    await handler.handle_function_message(message)
