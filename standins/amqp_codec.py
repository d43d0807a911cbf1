"""Messages as AMQP 1.0 sections: split, read, rewrite and encode them with python-qpid-proton.

The broker keeps each message as its encoded sections, so whatever the SDK encoded (int32 vs int64,
timestamps, symbols) goes back out byte for byte; only the header and the annotations are rewritten.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from proton import Array, Data, Described, timestamp, ulong

# AMQP 1.0 message section descriptors.
HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78
BODY_SECTIONS = (DATA, AMQP_SEQUENCE, AMQP_VALUE)

# Properties section field positions.
MESSAGE_ID, SUBJECT, CORRELATION_ID, CONTENT_TYPE = 0, 3, 5, 6

Section = tuple[int, bytes]  # (descriptor, encoded section)


def own(value: Any) -> Any:
    """Deep-copy proton's memoryviews, which point into buffers proton reuses for the next frame."""
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, Described):
        return Described(value.descriptor, own(value.value))
    if isinstance(value, dict):
        return {own(k): own(v) for k, v in value.items()}
    if isinstance(value, list):
        return [own(v) for v in value]
    if isinstance(value, Array):
        return Array(value.descriptor, value.type, *(own(v) for v in value.elements))
    return value


def decode_one(raw: bytes) -> tuple[Any, int]:
    """The first AMQP value encoded in ``raw`` and how many bytes it took."""
    data = Data()
    consumed = data.decode(raw)
    data.rewind()
    data.next()
    # Copied while ``data`` is alive: its binaries are memoryviews into memory freed along with it.
    return own(data.get_object()), consumed


def split_sections(raw: bytes) -> list[Section]:
    """Split an encoded message into its sections; raises if ``raw`` is not a sequence of sections."""
    sections: list[Section] = []
    offset = 0
    while offset < len(raw):
        described, consumed = decode_one(raw[offset:])
        if not isinstance(described, Described):
            raise ValueError("not a message section")
        descriptor = int(cast(int, described.descriptor))
        if not HEADER <= descriptor <= FOOTER:
            raise ValueError(f"unknown section descriptor {descriptor:#x}")
        sections.append((descriptor, raw[offset : offset + consumed]))
        offset += consumed
    return sections


def section_value(sections: list[Section], descriptor: int) -> Any:
    for kind, raw in sections:
        if kind == descriptor:
            return decode_one(raw)[0].value
    return None


def encode_section(descriptor: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(descriptor), value))
    return bytes(data.encode())


def replace_section(sections: list[Section], descriptor: int, value: Any) -> list[Section]:
    """Return ``sections`` with the ``descriptor`` section set to ``value``, keeping AMQP section order."""
    kept = [s for s in sections if s[0] != descriptor]
    new = (descriptor, encode_section(descriptor, value))
    position = next((i for i, (kind, _) in enumerate(kept) if kind > descriptor), len(kept))
    return [*kept[:position], new, *kept[position:]]


def unpack_batch(sections: list[Section]) -> list[list[Section]] | None:
    """The messages inside a batch transfer, or None if ``sections`` is an ordinary message.

    proton does not expose the transfer's message-format (0x80013700 for batches), so a batch is
    recognised by its shape: a body of data sections that each decode as a whole message.
    """
    bodies = [raw for kind, raw in sections if kind in BODY_SECTIONS]
    if not bodies or any(kind in (AMQP_VALUE, AMQP_SEQUENCE) for kind, _ in sections):
        return None
    messages: list[list[Section]] = []
    for raw in bodies:
        payload = section_value([(DATA, raw)], DATA)
        if not isinstance(payload, bytes) or not payload.startswith(b"\x00S"):
            return None
        try:
            inner = split_sections(payload)
        except Exception:
            return None
        if not any(kind in BODY_SECTIONS for kind, _ in inner):
            return None
        messages.append(inner)
    return messages


def plain(value: Any) -> Any:
    """proton's typed values as plain Python values, for snapshots."""
    if isinstance(value, timestamp):
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    if isinstance(value, bool | None):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def body_bytes(sections: list[Section]) -> bytes:
    parts: list[bytes] = []
    for kind, raw in sections:
        if kind not in BODY_SECTIONS:
            continue
        value = section_value([(kind, raw)], kind)
        if isinstance(value, bytes):
            parts.append(value)
        elif isinstance(value, str):
            parts.append(value.encode())
        else:
            parts.append(repr(plain(value)).encode())
    return b"".join(parts)


def as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def to_ms(seconds: float) -> timestamp:
    return timestamp(round(seconds * 1000))


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
