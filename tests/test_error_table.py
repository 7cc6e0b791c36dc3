"""The one error table: every lower-layer exception the service can meet has one HTTP answer, given by
``service.errors.error_response`` to the handlers, the middlewares and /readyz alike."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.shards import ShardUnavailableError
from service.decoding import DecodeBusyError
from service.errors import (IMAGE_REFUSALS, SHARD_RETRY_AFTER_S, NotFound, QueueFullError, as_service_error,
                            error_response, install_error_handlers)
from service.explanations import ExplanationNotFound
from service.uploads import BodyStalled, BodyTooLarge

CASES = [
    # exception, status, headers the answer must carry
    (ExplanationNotFound("no explanation for query 'q'"), 404, {}),
    (DecodeBusyError(3), 503, {"retry-after": "3"}),
    (ShardUnavailableError(1, "/shards/1", "timed out"), 503, {"retry-after": str(SHARD_RETRY_AFTER_S)}),
    (QueueFullError(7), 503, {"retry-after": "7"}),
    (NotFound("no image with id 'x'"), 404, {}),
    (BodyTooLarge(100), 413, {}),
    (BodyStalled(2.0), 408, {"connection": "close"}),
    (StarletteHTTPException(405, "Method Not Allowed"), 405, {}),
]


def _answer(response) -> tuple[int, dict, dict]:
    return response.status_code, json.loads(response.body), {k.lower(): v for k, v in response.headers.items()}


@pytest.mark.parametrize("err,status,headers", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_has_one_status_body_and_headers(err, status, headers):
    code, body, got = _answer(error_response(err))
    assert code == status
    assert body == {"detail": str(err) if not isinstance(err, StarletteHTTPException) else err.detail}
    for name, value in headers.items():
        assert got[name] == value


def test_an_error_with_no_http_meaning_is_a_logged_500(caplog):
    assert as_service_error(ValueError("a bug")) is None
    code, body, _ = _answer(error_response(ValueError("a bug")))
    assert code == 500 and body["detail"].startswith("internal error (ValueError)")
    assert "a bug" not in body["detail"]  # the message stays in the log
    assert any("unhandled error" in r.message for r in caplog.records)


def test_extra_body_and_headers_are_merged_not_replaced():
    code, body, headers = _answer(error_response(DecodeBusyError(2), headers={"Connection": "close"},
                                                 body={"status": "unavailable"}))
    assert code == 503 and body["status"] == "unavailable" and body["detail"].startswith("too many images")
    assert headers["retry-after"] == "2" and headers["connection"] == "close"


def test_image_refusals_name_real_statuses():
    assert {reason: cls.status for reason, cls in IMAGE_REFUSALS.items()} == {
        "too_large_file": 413, "decompression_bomb": 413, "bad_aspect_ratio": 422, "unsupported": 415}


def test_handlers_answer_through_the_table_and_the_app_keeps_running():
    app = FastAPI()
    install_error_handlers(app)
    def raising(err: BaseException):
        def route() -> None:
            raise err
        return route

    for i, (err, _, _) in enumerate(CASES):
        app.add_api_route(f"/raise/{i}", raising(err), methods=["GET"])
    app.add_api_route("/bug", lambda: 1 / 0, methods=["GET"])
    app.add_api_route("/ok", lambda: {"ok": True}, methods=["GET"])
    with TestClient(app, raise_server_exceptions=False) as client:
        for i, (err, status, headers) in enumerate(CASES):
            r = client.get(f"/raise/{i}")
            assert r.status_code == status, (err, r.text)
            assert set(r.json()) == {"detail"}
            for name, value in headers.items():
                assert r.headers[name] == value
        r = client.get("/bug")
        assert r.status_code == 500 and r.json()["detail"].startswith("internal error (ZeroDivisionError)")
        assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json() == {"detail": "Not Found"}
        assert client.post("/ok").status_code == 405
        assert client.get("/ok").json() == {"ok": True}  # still serving
