"""The error classification table (research/graph.md §9.1 as refined by contract §2), row by row.

Each row is a real Graph error body from ``tests/fixtures/graph`` (research/graph.md §2) with the
headers Graph sends, fed to :func:`classify_response`. The class decides the message's fate:
``TransientGraphError`` is retried, ``PermanentGraphError`` is dead-lettered as
``GraphRequestRejected``, ``AuthenticationRejected`` gets one retry with a new token.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from upgrade_handler.errors import (
    AuthenticationRejected,
    GraphError,
    PermanentGraphError,
    TransientGraphError,
    classify_response,
    parse_retry_after,
)

GRAPH_FIXTURES = Path(__file__).parent / "fixtures" / "graph"

REQUEST_ID = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
CLIENT_REQUEST_ID = "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70"
DATE = "Fri, 23 Sep 2022 11:57:49 GMT"


def body_of(name: str) -> bytes:
    return (GRAPH_FIXTURES / name).read_bytes()


def graph_headers(*, retry_after: str | None = None, **extra: str) -> httpx.Headers:
    """The headers a real Graph error response carries (research/graph.md §2.3)."""
    headers = {
        "Cache-Control": "no-store",
        "Content-Type": "application/json",
        "request-id": REQUEST_ID,
        "client-request-id": CLIENT_REQUEST_ID,
        "x-ms-ags-diagnostic": '{"ServerInfo":{"DataCenter":"West Europe","Slice":"E","Ring":"5",'
        '"ScaleUnit":"003","RoleInstance":"AM2PEPF0001B3A2"}}',
        "Strict-Transport-Security": "max-age=31536000",
        "Date": DATE,
        **extra,
    }
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return httpx.Headers(headers)


def graph_body(code: str, message: str) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": "2024-07-19T03:14:15",
                    "request-id": REQUEST_ID,
                    "client-request-id": REQUEST_ID,
                },
            }
        }
    ).encode()


PERMANENT = "permanent"
TRANSIENT = "transient"
REAUTHENTICATE = "401: one retry with a new token"

#: One row per line of the classification table: (status, body, fate).
CLASSIFICATION_TABLE = [
    pytest.param(400, body_of("400_bad_request.json"), PERMANENT, id="400 BadRequest: the request is wrong"),
    pytest.param(
        400,
        body_of("400_settings_store.json"),
        TRANSIENT,
        id="400 'Failed to execute settings store request': backend flake",
    ),
    pytest.param(
        400,
        graph_body("BadRequest", "Failed to execute backend request."),
        TRANSIENT,
        id="400 'Failed to execute backend request': backend flake",
    ),
    pytest.param(
        400,
        graph_body("BadRequest", "Invalid request body: consentedPermissionSet does not match the app definition."),
        PERMANENT,
        id="400 RSC mismatch",
    ),
    pytest.param(401, body_of("401_expired.json"), REAUTHENTICATE, id="401 InvalidAuthenticationToken: expired"),
    pytest.param(
        401,
        graph_body("InvalidAuthenticationToken", "Access token validation failure. Invalid audience."),
        REAUTHENTICATE,
        id="401 InvalidAuthenticationToken: invalid audience",
    ),
    pytest.param(403, body_of("403_missing_role.json"), PERMANENT, id="403 missing role permissions"),
    pytest.param(403, body_of("403_permanent_app.json"), PERMANENT, id="403 AccessDenied: permanent app"),
    pytest.param(
        403,
        graph_body(
            "Forbidden",
            "AAD App Id 'effe13ef-4e2e-4a4e-9bd3-2e7a1e3c5b8d' is not allowed to manage the Teams App ''",
        ),
        PERMANENT,
        id="403 Self permission vs webApplicationInfo",
    ),
    pytest.param(403, graph_body("UnknownError", ""), PERMANENT, id="403 UnknownError with empty message"),
    pytest.param(
        403,
        graph_body(
            "Forbidden",
            "Failed to get license information for the user. "
            "Ensure user has a valid Office365 license assigned to them.",
        ),
        PERMANENT,
        id="403 user not licensed",
    ),
    pytest.param(
        403,
        body_of("403_skype_backend.json"),
        PERMANENT,
        id="403 with 'Failed to execute ... backend request' stays permanent",
    ),
    pytest.param(404, body_of("404_user_not_found.json"), PERMANENT, id="404 NotFound: user"),
    pytest.param(404, graph_body("NotFound", "Not Found"), PERMANENT, id="404 NotFound: installation or app"),
    pytest.param(409, body_of("409_conflict.json"), PERMANENT, id="409 Conflict"),
    pytest.param(
        412,
        body_of("412_rsc_backend.json"),
        PERMANENT,
        id="412 'Failed to execute TeamsGraphService backend request' stays permanent",
    ),
    pytest.param(408, graph_body("RequestTimeout", "The request timed out."), TRANSIENT, id="408 request timeout"),
    pytest.param(423, graph_body("resourceLocked", "The resource is locked."), TRANSIENT, id="423 locked"),
    pytest.param(429, body_of("429_too_many_requests.json"), TRANSIENT, id="429 TooManyRequests"),
    pytest.param(500, body_of("500_internal.json"), TRANSIENT, id="500 InternalServerError"),
    pytest.param(502, body_of("502_backend.json"), TRANSIENT, id="502 BadGateway"),
    pytest.param(503, body_of("503_unavailable.json"), TRANSIENT, id="503 serviceNotAvailable"),
    pytest.param(504, body_of("504_gateway_timeout.json"), TRANSIENT, id="504 GatewayTimeout"),
    pytest.param(507, graph_body("insufficientStorage", "Insufficient storage."), TRANSIENT, id="507 unknown 5xx"),
    pytest.param(
        509, graph_body("bandwidthLimitExceeded", "Bandwidth limit exceeded."), TRANSIENT, id="509 unknown 5xx"
    ),
    pytest.param(599, b"", TRANSIENT, id="599 unknown 5xx, empty body"),
    pytest.param(410, graph_body("Gone", "The resource is gone."), PERMANENT, id="410 other 4xx"),
    pytest.param(413, graph_body("RequestEntityTooLarge", "Too large."), PERMANENT, id="413 other 4xx"),
    pytest.param(422, graph_body("UnprocessableEntity", "Unprocessable."), PERMANENT, id="422 other 4xx"),
    pytest.param(418, graph_body("ImATeapot", "Unknown."), PERMANENT, id="418 unknown 4xx"),
    pytest.param(451, graph_body("UnavailableForLegalReasons", "Unknown."), PERMANENT, id="451 unknown 4xx"),
]


def fate(error: GraphError) -> str:
    if isinstance(error, AuthenticationRejected):
        assert isinstance(error, PermanentGraphError)  # after its one retry it is permanent
        return REAUTHENTICATE
    if isinstance(error, TransientGraphError):
        assert not isinstance(error, PermanentGraphError)
        return TRANSIENT
    if isinstance(error, PermanentGraphError):
        return PERMANENT
    return f"unclassified {type(error).__name__}"


@pytest.mark.parametrize(("status", "body", "expected"), CLASSIFICATION_TABLE)
def test_classification_table_row(status: int, body: bytes, expected: str) -> None:
    # given Graph answers with this status and body
    # when the response is classified
    error = classify_response(status, graph_headers(), body)
    # then its class decides retry vs dead-letter as the table says, and it keeps the status
    assert fate(error) == expected
    assert error.failure.status == status


def test_429_keeps_code_inner_code_message_and_ids_from_headers() -> None:
    # given the documented 429 with the headers Graph sends
    headers = graph_headers(retry_after="2.128")
    body = body_of("429_too_many_requests.json")
    # when it is classified
    failure = classify_response(429, headers, body).failure
    # then the dead-letter message would carry all of this
    assert failure.status == 429
    assert failure.code == "TooManyRequests"
    assert failure.message == "Please retry again later."
    assert failure.inner_code == "429"
    assert failure.request_id == REQUEST_ID
    assert failure.client_request_id == CLIENT_REQUEST_ID
    assert failure.date == DATE
    assert failure.retry_after == pytest.approx(2.128)
    assert failure.raw_body == body.decode()


def test_403_permanent_app_keeps_the_inner_access_denied_code() -> None:
    failure = classify_response(403, graph_headers(), body_of("403_permanent_app.json")).failure
    assert failure.code == "Forbidden"
    assert failure.inner_code == "AccessDenied"
    assert failure.message.startswith("User operation (Upgrade) is not allowed on a permanent app")


def test_ids_and_date_from_headers_win_over_inner_error() -> None:
    # given a 404 whose innerError names other ids than the headers do
    failure = classify_response(404, graph_headers(), body_of("404_user_not_found.json")).failure
    # then the headers are used, the Date exactly as sent
    assert failure.request_id == REQUEST_ID
    assert failure.client_request_id == CLIENT_REQUEST_ID
    assert failure.date == DATE


def test_ids_and_date_fall_back_to_inner_error_without_headers() -> None:
    # given a 404 that came through a proxy that dropped Graph's headers
    failure = classify_response(
        404, httpx.Headers({"Content-Type": "application/json"}), body_of("404_user_not_found.json")
    ).failure
    # then the innerError's ids and date are used
    assert failure.request_id == "1dd61eec-9a2f-4b7c-8e3d-5f6a7b8c9d0e"
    assert failure.client_request_id == "1dd61eec-9a2f-4b7c-8e3d-5f6a7b8c9d0e"
    assert failure.date == "2023-05-16T05:41:28"
    assert failure.code == "NotFound"
    assert failure.message == "User Id '5b649834-7412-4cce-9e69-176e95a394f5' not found."


def test_missing_client_request_id_anywhere_is_absent_not_invented() -> None:
    failure = classify_response(502, httpx.Headers({"request-id": REQUEST_ID}), body_of("502_backend.json")).failure
    assert failure.request_id == REQUEST_ID
    assert failure.client_request_id is None
    assert failure.date == "2020-01-27T07:45:12"


def test_json_error_inside_message_is_unwrapped() -> None:
    # given a Teams error whose message is itself a whole Graph error as a JSON string
    error = classify_response(403, graph_headers(), body_of("403_json_in_message.json"))
    # then the human-readable message and the detailed inner code come from the nested error
    assert isinstance(error, PermanentGraphError)
    assert error.failure.code == "Forbidden"
    assert error.failure.message == "Sorry, you need to be an admin to do this."
    assert error.failure.inner_code == "MissingAdminPermissions"
    assert error.failure.raw_body == body_of("403_json_in_message.json").decode()


@pytest.mark.parametrize(
    ("status", "expected"),
    [(502, TRANSIENT), (503, TRANSIENT), (403, PERMANENT), (404, PERMANENT)],
)
def test_non_json_body_is_classified_by_status_and_kept(status: int, expected: str) -> None:
    # given a gateway's HTML page instead of a Graph error
    body = body_of("502_gateway.html")
    headers = graph_headers(**{"Content-Type": "text/html"})
    # when it is classified
    error = classify_response(status, headers, body)
    # then the status decides, and what is known is kept for the dead-letter message
    assert fate(error) == expected
    assert error.failure.code
    assert error.failure.message
    assert error.failure.inner_code is None
    assert error.failure.request_id == REQUEST_ID
    assert error.failure.raw_body == body.decode()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"[]",
        b'"Forbidden"',
        b'{"error":"invalid_grant"}',
        b'{"message":"x"}',
        b'{"error":{"code":5}}',
        b"\xff\xfe",
    ],
    ids=repr,
)
def test_odd_bodies_never_break_classification(body: bytes) -> None:
    error = classify_response(403, graph_headers(), body)
    assert fate(error) == PERMANENT
    assert isinstance(error.failure.code, str)
    assert error.failure.code
    assert isinstance(error.failure.message, str)


# --- Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("10", 10.0),
        ("2.128", 2.128),
        ("30,120", 120.0),
        ("120,30", 120.0),
        ("30, 120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
    ],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == pytest.approx(seconds)


def test_retry_after_as_http_date_counts_from_now() -> None:
    now = datetime(2022, 9, 23, 11, 57, 49, tzinfo=UTC).timestamp()
    assert parse_retry_after("Fri, 23 Sep 2022 11:58:19 GMT", now=now) == pytest.approx(30.0)


def test_retry_after_as_http_date_in_the_past_means_now() -> None:
    now = datetime(2022, 9, 23, 11, 57, 49, tzinfo=UTC).timestamp()
    assert parse_retry_after("Fri, 23 Sep 2022 11:50:00 GMT", now=now) == 0.0


@pytest.mark.parametrize("header", [None, "", "   ", "soon", "10 seconds", "nan", "inf", "30,soon", "Fri, 32 Foo 2022"])
def test_unreadable_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header) is None


@pytest.mark.parametrize("header", ["-5", "-0.5", "30,-120"])
def test_negative_retry_after_is_ignored(header: str) -> None:
    assert parse_retry_after(header) is None


@pytest.mark.parametrize("header", ["-5", "-0.5"])
def test_negative_retry_after_never_means_a_negative_wait(header: str) -> None:
    seconds = parse_retry_after(header)
    assert seconds is None or seconds >= 0


def test_retry_after_header_reaches_the_failure_of_a_503() -> None:
    error = classify_response(503, graph_headers(retry_after="30,120"), body_of("503_unavailable.json"))
    assert isinstance(error, TransientGraphError)
    assert error.failure.retry_after == 120.0
