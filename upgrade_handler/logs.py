"""Structured log events: one event name per happening, stable keys, no secrets, no raw UPNs.

Each event is one line, ``event key=value ...``, so it reads well in the Functions log stream
and in Application Insights traces; the same fields are attached as ``extra={"event":...,
"fields": {...}}`` for handlers that want them structured.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

logger = logging.getLogger("upgrade_handler")


#: Anything shaped like a user principal name (guests too: ``ann_fabrikam.com#EXT#@contoso.com``),
#: wherever it stands in a value: Graph quotes the name in its error messages.
_UPN = re.compile(
    r"(?<![A-Za-z0-9._!#^~+-])[A-Za-z0-9._!#^~+-][A-Za-z0-9'._!#^~+-]*"  # the local part, not from mid-word
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"  # a dotted domain
)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    present = {key: _pseudonymous(value) for key, value in fields.items() if value is not None}
    text = " ".join(f"{key}={_clean(value)}" for key, value in present.items())
    logger.log(level, "%s %s", event, text, extra={"event": event, "fields": present})


def redact_user(user_id: str) -> str:
    """A user principal name is personal data: log a stable pseudonym, never the name itself.

    GUID object ids are not personal on their own and are logged as they are.
    """
    if "@" not in user_id:
        return user_id
    digest = hashlib.sha256(user_id.lower().encode()).hexdigest()[:12]
    return f"upn:{digest}"


def _pseudonymous(value: Any) -> Any:
    """``value`` with every user principal name in it replaced by its pseudonym."""
    if isinstance(value, str) and "@" in value:
        return _UPN.sub(lambda found: redact_user(found.group()), value)
    return value


#: Longest value written to a log line; anything a producer sends is cut there.
MAX_VALUE = 1024


def _clean(value: Any) -> str:
    text = str(value)
    # Keep one event on one line whatever a producer put into an id or a Graph message.
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > MAX_VALUE:
        text = text[: MAX_VALUE - 1] + "…"
    if not text or " " in text or "=" in text or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
