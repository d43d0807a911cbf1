"""Contract §3 (the dead-letter message) and §4 (the scheduled retry message), property by property.

Deliveries are built from the real pipeline fixture; a retry copy is what :func:`retry_message`
really produced, received again, so "a copy of a copy" is the chain the broker would deliver.
"""

from __future__ import annotations

import codecs
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage

from upgrade_handler.delivery import Delivery
from upgrade_handler.errors import GraphFailure
from upgrade_handler.settlement import (
    BOOKKEEPING,
    DeadLetterReason,
    History,
    carry_property,
    dead_letter_message,
    iso_utc,
    retry_message,
    retry_message_id,
)

FIXTURES = Path(__file__).parent / "fixtures"
BODY = (FIXTURES / "pipeline_user_upn_teams_app.json").read_bytes()
THROTTLED_BODY = (FIXTURES / "graph" / "429_too_many_requests.json").read_text()

MESSAGE_ID = "release-2026.11.29-43-adele"
CORRELATION_ID = "ado-run-8812"
ENQUEUED = datetime(2026, 11, 29, 15, 4, 5, 123456, tzinfo=UTC)
FIRST_ATTEMPT = "2026-11-29T15:04:06.001Z"
FAILED_AT = datetime(2026, 11, 29, 15, 6, 7, 890123, tzinfo=UTC)
PRODUCER_PROPERTIES: dict[str, Any] = {"Source": "release-pipeline", "Stage": "prod", "Priority": 3, "Pilot": True}

DESCRIPTION = "Graph answered 429 TooManyRequests/429: Please retry again later."
KIB = 1024
PROPERTIES_LIMIT = 64 * KIB

THROTTLED = GraphFailure(
    status=429,
    code="TooManyRequests",
    message="Please retry again later.",
    inner_code="429",
    request_id="94fb3b52-452a-4535-a601-69e0a90e3aa2",
    client_request_id="d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70",
    date="Fri, 23 Sep 2022 11:57:49 GMT",
    raw_body=THROTTLED_BODY,
    retry_after=30.0,
)
TIMED_OUT = GraphFailure(status=None, code="Timeout", message="ReadTimeout", client_request_id=str(uuid.UUID(int=7)))


def producer_delivery(**overrides: Any) -> Delivery:
    """The message exactly as the release pipeline put it on the queue, first delivery."""
    fields: dict[str, Any] = {
        "body": BODY,
        "message_id": MESSAGE_ID,
        "delivery_count": 1,
        "content_type": "application/json",
        "correlation_id": CORRELATION_ID,
        "subject": "teams-app-upgrade",
        "enqueued_time_utc": ENQUEUED,
        "application_properties": dict(PRODUCER_PROPERTIES),
    }
    fields.update(overrides)
    return Delivery(**fields)


def received(message: ServiceBusMessage, *, enqueued: datetime, delivery_count: int = 1) -> Delivery:
    """``message`` as the broker delivers it after it was scheduled."""
    return Delivery(
        body=b"".join(message.body),
        message_id=str(message.message_id),
        delivery_count=delivery_count,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        subject=message.subject,
        enqueued_time_utc=enqueued,
        application_properties={str(k): v for k, v in (message.application_properties or {}).items()},
    )


def retry_of(delivery: Delivery, attempts: int, failure: GraphFailure = THROTTLED) -> ServiceBusMessage:
    return retry_message(
        delivery,
        History.of(delivery),
        attempts=attempts,
        first_attempt_utc=History.of(delivery).first_attempt_utc or FIRST_ATTEMPT,
        failure=failure,
        not_before=ENQUEUED + timedelta(minutes=attempts),
    )


def copy_of_a_copy(copies: int = 3) -> Delivery:
    """The ``copies``-th scheduled retry of the producer's message, as delivered."""
    delivery = producer_delivery()
    for attempts in range(1, copies + 1):
        copy = retry_of(delivery, attempts)
        delivery = received(copy, enqueued=ENQUEUED + timedelta(minutes=attempts))
    return delivery


def dead_letter(
    delivery: Delivery,
    *,
    reason: DeadLetterReason = DeadLetterReason.GRAPH_REQUEST_REJECTED,
    description: str = DESCRIPTION,
    attempts: int = 1,
    failed_at: datetime = FAILED_AT,
    failure: GraphFailure | None = THROTTLED,
) -> ServiceBusMessage:
    return dead_letter_message(
        delivery,
        History.of(delivery),
        reason=reason,
        description=description,
        attempts=attempts,
        failed_at=failed_at,
        failure=failure,
    )


def properties(message: ServiceBusMessage) -> dict[str, Any]:
    return {str(k): v for k, v in (message.application_properties or {}).items()}


def amqp_size(values: Mapping[str, Any]) -> int:
    """An upper bound of the AMQP-encoded size of application properties (str32/map32 encodings)."""

    def value_size(value: Any) -> int:
        if value is None or isinstance(value, bool):
            return 1
        if isinstance(value, int):
            return 9
        if isinstance(value, float | datetime):
            return 9
        if isinstance(value, uuid.UUID):
            return 17
        if isinstance(value, bytes):
            return 5 + len(value)
        return 5 + len(str(value).encode("utf-8"))

    return 9 + sum(5 + len(key.encode("utf-8")) + value_size(value) for key, value in values.items())


def producer_properties_of_size(target: int) -> dict[str, Any]:
    """Producer properties whose encoded size is about ``target`` bytes (a few bytes under)."""
    grown: dict[str, Any] = {}
    index = 0
    while amqp_size(grown) < target - 1500:
        grown[f"Tag{index:03d}"] = "v" * 1000
        index += 1
    grown["Last"] = "v" * max(0, target - amqp_size(grown) - 5 - len("Last") - 5 - 8)
    assert target - 16 <= amqp_size(grown) <= target
    return grown


# --- the dead-letter message: body and identity -------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [BODY, codecs.BOM_UTF8 + BODY, b"\xff\xfe{\x00not utf-8", b'[{"userId": "x"}]'],
    ids=["pipeline-request", "with-bom", "not-utf8", "json-array"],
)
def test_dead_letter_carries_body_content_type_and_correlation_id_byte_for_byte(body: bytes) -> None:
    # given a delivery (valid or not) with a content type and correlation id
    delivery = producer_delivery(body=body, content_type="application/json; charset=utf-8")
    # when it is dead-lettered
    message = dead_letter(delivery, reason=DeadLetterReason.INVALID_MESSAGE, failure=None, attempts=0)
    # then a replay of the dead letter is a plain resend of the original
    assert b"".join(message.body) == body
    assert message.content_type == "application/json; charset=utf-8"
    assert message.correlation_id == CORRELATION_ID


def test_dead_letter_without_content_type_or_correlation_id_has_none() -> None:
    message = dead_letter(producer_delivery(content_type=None, correlation_id=None))
    assert message.content_type is None
    assert message.correlation_id is None


def test_dead_letter_message_id_is_the_originals() -> None:
    message = dead_letter(producer_delivery())
    assert message.message_id == MESSAGE_ID


def test_dead_letter_of_a_retry_copy_has_the_first_messages_id() -> None:
    # given the third scheduled retry of the producer's message
    delivery = copy_of_a_copy(3)
    assert delivery.message_id != MESSAGE_ID
    # when it is dead-lettered
    message = dead_letter(delivery, reason=DeadLetterReason.RETRIES_EXHAUSTED, attempts=4)
    # then duplicate detection on the dead-letter queue sees the producer's message id
    assert message.message_id == MESSAGE_ID
    assert properties(message)["OriginalMessageId"] == MESSAGE_ID
    # and its body, content type and correlation id are still the producer's
    assert b"".join(message.body) == BODY
    assert message.correlation_id == CORRELATION_ID


@pytest.mark.parametrize("reason", list(DeadLetterReason))
def test_dead_letter_subject_and_reason_property_are_the_reason(reason: DeadLetterReason) -> None:
    message = dead_letter(producer_delivery(), reason=reason)
    assert message.subject == reason.value
    assert properties(message)["DeadLetterReason"] == reason.value


def test_dead_letter_reasons_are_the_four_of_the_contract() -> None:
    assert {reason.value for reason in DeadLetterReason} == {
        "InvalidMessage",
        "InstallationNotFound",
        "GraphRequestRejected",
        "RetriesExhausted",
    }


# --- the dead-letter message: properties --------------------------------------------------------


def test_dead_letter_properties_of_a_graph_rejection() -> None:
    # given the producer's message, delivered a second time, rejected by Graph on the second attempt
    delivery = producer_delivery(delivery_count=2)
    # when it is dead-lettered
    message = dead_letter(delivery, attempts=2)
    # then every property of the table is there, with its documented type
    assert properties(message) == {
        **PRODUCER_PROPERTIES,
        "DeadLetterReason": "GraphRequestRejected",
        "DeadLetterErrorDescription": DESCRIPTION,
        "UpgradeAttempts": 2,
        "DeferredAttempts": 0,
        "FailedAtUtc": "2026-11-29T15:06:07.890Z",
        "OriginalMessageId": MESSAGE_ID,
        "OriginalEnqueuedTimeUtc": "2026-11-29T15:04:05.123Z",
        "OriginalDeliveryCount": 2,
        "GraphStatus": 429,
        "GraphErrorCode": "TooManyRequests",
        "GraphErrorMessage": "Please retry again later.",
        "GraphInnerErrorCode": "429",
        "GraphRequestId": "94fb3b52-452a-4535-a601-69e0a90e3aa2",
        "GraphClientRequestId": "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70",
        "GraphDate": "Fri, 23 Sep 2022 11:57:49 GMT",
        "GraphError": THROTTLED_BODY,
    }


def test_invalid_message_has_no_graph_properties() -> None:
    message = dead_letter(
        producer_delivery(),
        reason=DeadLetterReason.INVALID_MESSAGE,
        failure=None,
        attempts=0,
        description="invalid message: userId is neither a GUID nor a user principal name (local@domain)",
    )
    found = properties(message)
    assert found["UpgradeAttempts"] == 0
    assert not [key for key in found if key.startswith("Graph")]


def test_graph_status_is_absent_for_installation_not_found() -> None:
    # given a lookup that answered 200 with no installation (its failure record still has a status)
    lookup = GraphFailure(status=200, code="InstallationNotFound", message="no installation of the app")
    message = dead_letter(producer_delivery(), reason=DeadLetterReason.INSTALLATION_NOT_FOUND, failure=lookup)
    assert "GraphStatus" not in properties(message)


def test_graph_status_is_absent_when_no_response_came() -> None:
    message = dead_letter(producer_delivery(), reason=DeadLetterReason.RETRIES_EXHAUSTED, failure=TIMED_OUT)
    found = properties(message)
    assert "GraphStatus" not in found
    assert found["GraphErrorCode"] == "Timeout"


def test_counts_and_statuses_are_integers() -> None:
    found = properties(dead_letter(producer_delivery(delivery_count=4), attempts=6))
    for key in ("UpgradeAttempts", "OriginalDeliveryCount", "GraphStatus"):
        assert type(found[key]) is int, key


def test_original_properties_are_copied_without_the_retry_bookkeeping() -> None:
    # given a retry copy carrying the producer's properties and the retry bookkeeping
    delivery = copy_of_a_copy(2)
    assert set(BOOKKEEPING) <= set(delivery.application_properties)
    # when it is dead-lettered
    found = properties(dead_letter(delivery, reason=DeadLetterReason.RETRIES_EXHAUSTED, attempts=3))
    # then the producer's properties are there and the bookkeeping only as the table defines it
    for key, value in PRODUCER_PROPERTIES.items():
        assert found[key] == value
    assert "FirstAttemptUtc" not in found
    assert "LastErrorStatus" not in found
    assert "LastErrorCode" not in found
    assert found["UpgradeAttempts"] == 3
    assert found["OriginalDeliveryCount"] == 1
    assert found["OriginalEnqueuedTimeUtc"] == "2026-11-29T15:04:05.123Z"


@pytest.mark.parametrize(
    ("value", "carried"),
    [
        (2**31, "2147483648"),
        (-(2**31) - 1, "-2147483649"),
        (9_007_199_254_740_993, "9007199254740993"),
        (2**31 - 1, 2**31 - 1),
        (-(2**31), -(2**31)),
        (True, True),
        ("text", "text"),
        (1.5, 1.5),
    ],
    ids=repr,
)
def test_property_the_encoder_cannot_carry_is_copied_as_text(value: Any, carried: Any) -> None:
    # given a producer property holding an integer outside 32 bits (or any simple value)
    delivery = producer_delivery(application_properties={"BuildNumber": value})
    # then the dead letter and the retry copy carry it, as its decimal string when it would not fit
    for message in (dead_letter(delivery), retry_of(delivery, 1)):
        found = properties(message)["BuildNumber"]
        assert found == carried
        assert type(found) is type(carried)


@pytest.mark.parametrize(
    ("failed_at", "expected"),
    [
        (FAILED_AT, "2026-11-29T15:06:07.890Z"),
        (datetime(2026, 11, 29, 17, 6, 7, 999999, tzinfo=timezone(timedelta(hours=2))), "2026-11-29T15:06:07.999Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000Z"),
    ],
    ids=["utc", "plus-two-hours", "whole-second"],
)
def test_times_are_iso_8601_utc_with_milliseconds_and_z(failed_at: datetime, expected: str) -> None:
    found = properties(dead_letter(producer_delivery(), failed_at=failed_at))
    assert found["FailedAtUtc"] == expected
    assert found["OriginalEnqueuedTimeUtc"] == "2026-11-29T15:04:05.123Z"


def test_description_is_one_line_of_at_most_1024_characters() -> None:
    # given a description built from a multi-line, very long Graph message
    description = "gave up after 8 attempts; last error:\r\n" + "Failed to execute settings store request\n\t" * 100
    found = properties(dead_letter(producer_delivery(), description=description))
    text = found["DeadLetterErrorDescription"]
    assert "\n" not in text
    assert "\r" not in text
    assert len(text) <= 1024
    assert text.startswith("gave up after 8 attempts; last error:")


def test_graph_error_message_is_at_most_1024_characters() -> None:
    failure = GraphFailure(status=400, code="BadRequest", message="Exception in CreateOrUpdate: " + "x" * 5000)
    found = properties(dead_letter(producer_delivery(), failure=failure))
    assert len(found["GraphErrorMessage"]) <= 1024
    assert found["GraphErrorMessage"].startswith("Exception in CreateOrUpdate: xxx")


def test_graph_error_is_the_raw_body_when_it_is_short() -> None:
    found = properties(dead_letter(producer_delivery()))
    assert found["GraphError"] == THROTTLED_BODY


def test_graph_error_of_a_large_ascii_body_is_at_most_8_kib() -> None:
    raw = '{"error":{"code":"BadRequest","message":"' + "x" * 20_000 + '"}}'
    failure = GraphFailure(status=400, code="BadRequest", message="x", raw_body=raw)
    found = properties(dead_letter(producer_delivery(), failure=failure))
    assert len(found["GraphError"].encode("utf-8")) <= 8 * KIB
    assert raw.startswith(found["GraphError"])


def test_graph_error_of_a_large_non_ascii_body_is_at_most_8_kib() -> None:
    # given a Graph error whose message names a Japanese display name many times
    raw = '{"error":{"code":"BadRequest","message":"' + "表示名が無効です。" * 2000 + '"}}'
    failure = GraphFailure(status=400, code="BadRequest", message="表示名が無効です。", raw_body=raw)
    found = properties(dead_letter(producer_delivery(), failure=failure))
    # then what is kept of it is at most 8 KiB
    assert len(found["GraphError"].encode("utf-8")) <= 8 * KIB


def test_graph_error_is_shortened_first_when_the_properties_would_pass_64_kib() -> None:
    # given a producer message with about 56 KiB of properties, failing with an 8 KiB Graph body
    producer = producer_properties_of_size(56 * KIB)
    raw = '{"error":{"code":"BadRequest","message":"' + "y" * 9000 + '"}}'
    failure = GraphFailure(status=400, code="BadRequest", message="Invalid request.", raw_body=raw)
    delivery = producer_delivery(application_properties=producer)
    # when it is dead-lettered
    found = properties(dead_letter(delivery, failure=failure))
    # then the properties fit, because GraphError and nothing else was shortened
    assert amqp_size(found) <= PROPERTIES_LIMIT
    for key, value in producer.items():
        assert found[key] == value
    assert found["GraphErrorMessage"] == "Invalid request."
    assert 0 < len(found["GraphError"]) < 8 * KIB
    assert raw.startswith(found["GraphError"])


def test_dead_letter_of_a_message_near_the_limit_still_fits_in_64_kib() -> None:
    # given a producer message whose own properties (63 KiB) were accepted by Service Bus
    delivery = producer_delivery(application_properties=producer_properties_of_size(63 * KIB))
    description = "gave up after 8 attempts; last error: " + "Failed to execute settings store request " * 40
    failure = GraphFailure(status=503, code="serviceNotAvailable", message="z" * 2000, raw_body="q" * 8000)
    # when it is dead-lettered
    found = properties(
        dead_letter(delivery, reason=DeadLetterReason.RETRIES_EXHAUSTED, description=description, failure=failure)
    )
    # then the dead letter can still be sent, and still says why it failed
    assert amqp_size(found) <= PROPERTIES_LIMIT
    assert found["DeadLetterReason"] == "RetriesExhausted"
    assert found["OriginalMessageId"] == MESSAGE_ID


def test_dead_letter_of_a_body_near_256_kb_keeps_the_body_and_fits_the_message() -> None:
    # given an invalid message of 250 KB (Service Bus accepted it) with 20 KiB of producer properties
    body = b"x" * (250 * 1000)
    delivery = producer_delivery(body=body, application_properties=producer_properties_of_size(20 * KIB))
    # when it is dead-lettered
    message = dead_letter(delivery, reason=DeadLetterReason.INVALID_MESSAGE, failure=None, attempts=0)
    found = properties(message)
    # then the body is whole, the message fits a Standard namespace's 256 KB, and the reason is kept
    assert b"".join(message.body) == body
    assert len(body) + amqp_size(found) <= 256 * KIB
    assert found["DeadLetterReason"] == "InvalidMessage"
    assert found["OriginalMessageId"] == MESSAGE_ID
    assert found["DeadLetterPropertiesDropped"]


def test_retry_copy_of_a_message_near_the_property_limit_still_fits_in_64_kib() -> None:
    # given a producer message whose own properties (63 KiB) were accepted by Service Bus
    delivery = producer_delivery(application_properties=producer_properties_of_size(63 * KIB))
    # when a retry is scheduled
    found = properties(retry_of(delivery, 1))
    # then the copy can be sent and keeps the bookkeeping that names it
    assert amqp_size(found) <= PROPERTIES_LIMIT
    assert (found["UpgradeAttempts"], found["OriginalMessageId"]) == (1, MESSAGE_ID)
    assert found["LastErrorCode"] == "TooManyRequests"
    assert found["DeadLetterPropertiesDropped"]


# --- the scheduled retry message ----------------------------------------------------------------


def test_first_retry_copies_the_message_and_adds_the_bookkeeping() -> None:
    # given the producer's message, throttled on its first attempt
    delivery = producer_delivery()
    not_before = datetime(2026, 11, 29, 15, 4, 40, tzinfo=UTC)
    # when a retry is scheduled
    message = retry_message(
        delivery,
        History.of(delivery),
        attempts=1,
        first_attempt_utc=FIRST_ATTEMPT,
        failure=THROTTLED,
        not_before=not_before,
    )
    # then it is the same message, due later, with the bookkeeping of §4
    assert b"".join(message.body) == BODY
    assert message.content_type == "application/json"
    assert message.correlation_id == CORRELATION_ID
    assert message.subject == "teams-app-upgrade"
    assert message.message_id == f"{MESSAGE_ID}:retry:1"
    assert message.scheduled_enqueue_time_utc == not_before
    assert properties(message) == {
        **PRODUCER_PROPERTIES,
        "UpgradeAttempts": 1,
        "OriginalMessageId": MESSAGE_ID,
        "OriginalEnqueuedTimeUtc": "2026-11-29T15:04:05.123Z",
        "FirstAttemptUtc": FIRST_ATTEMPT,
        "LastErrorStatus": 429,
        "LastErrorCode": "TooManyRequests",
        "DeferredAttempts": 0,
    }


def test_retry_of_a_copy_of_a_copy_keeps_the_first_messages_identity() -> None:
    # given the second retry copy, delivered
    delivery = copy_of_a_copy(2)
    assert delivery.message_id == f"{MESSAGE_ID}:retry:2"
    # when the third retry is scheduled
    message = retry_of(delivery, 3)
    # then its id grows from the first message's id, not from the copy's
    assert message.message_id == f"{MESSAGE_ID}:retry:3"
    found = properties(message)
    assert found["OriginalMessageId"] == MESSAGE_ID
    assert found["OriginalEnqueuedTimeUtc"] == "2026-11-29T15:04:05.123Z"
    assert found["FirstAttemptUtc"] == FIRST_ATTEMPT
    assert found["UpgradeAttempts"] == 3
    for key, value in PRODUCER_PROPERTIES.items():
        assert found[key] == value
    assert message.subject == "teams-app-upgrade"
    assert b"".join(message.body) == BODY


def test_retry_after_a_failure_without_response_has_no_last_error_status() -> None:
    # given a copy whose earlier failure was a 429, now timing out
    delivery = copy_of_a_copy(1)
    assert delivery.application_properties["LastErrorStatus"] == 429
    # when the next retry is scheduled
    found = properties(retry_of(delivery, 2, failure=TIMED_OUT))
    # then the last error is the timeout, with no status
    assert "LastErrorStatus" not in found
    assert found["LastErrorCode"] == "Timeout"


def test_retry_ids_of_a_long_message_id_fit_service_bus_and_stay_distinct() -> None:
    # given a producer message id at Service Bus's limit of 128 characters
    original = "m" * 128
    ids = [retry_message_id(original, attempts) for attempts in range(1, 9)]
    # then every retry id can be sent, differs per attempt and is the same on every computation
    assert all(len(message_id) <= 128 for message_id in ids)
    assert len(set(ids)) == len(ids)
    assert ids == [retry_message_id(original, attempts) for attempts in range(1, 9)]
    assert ids[2].endswith(":retry:3")


@pytest.mark.parametrize(("original", "attempts"), [("abc", 1), (MESSAGE_ID, 7), (str(uuid.UUID(int=1)), 12)])
def test_retry_message_id_format(original: str, attempts: int) -> None:
    assert retry_message_id(original, attempts) == f"{original}:retry:{attempts}"


# --- what a delivery says about earlier attempts ------------------------------------------------


def test_history_of_the_producers_message() -> None:
    history = History.of(producer_delivery())
    assert history == History(
        attempts=0,
        original_message_id=MESSAGE_ID,
        original_enqueued_time_utc="2026-11-29T15:04:05.123Z",
        first_attempt_utc=None,
    )


def test_history_of_a_retry_copy() -> None:
    history = History.of(copy_of_a_copy(3))
    assert history == History(
        attempts=3,
        original_message_id=MESSAGE_ID,
        original_enqueued_time_utc="2026-11-29T15:04:05.123Z",
        first_attempt_utc=FIRST_ATTEMPT,
        last_error_status=429,
    )


def test_history_reads_deferred_attempts_and_never_more_than_the_attempts() -> None:
    properties = {"UpgradeAttempts": 3, "DeferredAttempts": "2", "OriginalMessageId": "first"}
    assert History.of(producer_delivery(application_properties=properties)).deferred_attempts == 2
    properties = {"UpgradeAttempts": 1, "DeferredAttempts": 5, "OriginalMessageId": "first"}
    assert History.of(producer_delivery(application_properties=properties)).deferred_attempts == 1
    properties = {"UpgradeAttempts": 4, "DeferredAttempts": "lots", "OriginalMessageId": "first"}
    assert History.of(producer_delivery(application_properties=properties)).deferred_attempts == 0


def test_retry_and_dead_letter_carry_the_deferred_attempts() -> None:
    delivery = producer_delivery()
    retry = retry_message(
        delivery,
        History.of(delivery),
        attempts=5,
        first_attempt_utc=FIRST_ATTEMPT,
        failure=THROTTLED,
        not_before=ENQUEUED,
        deferred_attempts=4,
    )
    assert properties(retry)["DeferredAttempts"] == 4
    redelivered = received(retry, enqueued=ENQUEUED)
    letter = dead_letter_message(
        redelivered,
        History.of(redelivered),
        reason=DeadLetterReason.RETRIES_EXHAUSTED,
        description=DESCRIPTION,
        attempts=6,
        failed_at=FAILED_AT,
        deferred_attempts=5,
    )
    assert properties(letter)["DeferredAttempts"] == 5
    assert properties(letter)["UpgradeAttempts"] == 6


def test_history_reads_attempts_that_came_back_as_text() -> None:
    delivery = producer_delivery(application_properties={"UpgradeAttempts": "4", "OriginalMessageId": "first"})
    history = History.of(delivery)
    assert history.attempts == 4
    assert history.original_message_id == "first"


# --- helpers with a contract of their own -------------------------------------------------------


def test_iso_utc_matches_the_contract_example() -> None:
    assert iso_utc(datetime(2026, 11, 29, 15, 4, 5, 123000, tzinfo=UTC)) == "2026-11-29T15:04:05.123Z"


@pytest.mark.parametrize(
    ("value", "carried"),
    [(2**40, str(2**40)), (-(2**40), str(-(2**40))), (42, 42), (None, None), (b"\x01", b"\x01")],
    ids=repr,
)
def test_carry_property(value: Any, carried: Any) -> None:
    assert carry_property(value) == carried
    assert type(carry_property(value)) is type(carried)
