"""Teams App Upgrader: upgrades Microsoft Teams app installations requested on a Service Bus queue.

The Azure Function (``function_app.py``) hands each message to :class:`UpgradeHandler`; the
command line (``python -m upgrade_handler``) runs the same handler outside Azure Functions.
"""

__version__ = "0.1.0"

from .delivery import Delivery
from .errors import (
    AuthenticationRejected,
    GraphConnectionError,
    GraphError,
    GraphFailure,
    GraphTimeout,
    HeldBack,
    InstallationNotFoundError,
    InvalidMessageError,
    PermanentGraphError,
    TokenUnavailable,
    TransientGraphError,
    UpgradeError,
)
from .handler import UpgradeHandler
from .messages import FanOutRequest, UpgradeRequest, parse_request
from .outcome import Outcome
from .settings import ConfigurationError, Settings
from .settlement import DeadLetterReason

__all__ = [
    "AuthenticationRejected",
    "ConfigurationError",
    "DeadLetterReason",
    "Delivery",
    "FanOutRequest",
    "GraphConnectionError",
    "GraphError",
    "GraphFailure",
    "GraphTimeout",
    "HeldBack",
    "InstallationNotFoundError",
    "InvalidMessageError",
    "Outcome",
    "PermanentGraphError",
    "Settings",
    "TokenUnavailable",
    "TransientGraphError",
    "UpgradeError",
    "UpgradeHandler",
    "UpgradeRequest",
    "__version__",
    "parse_request",
]
