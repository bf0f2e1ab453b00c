"""Log records carry the request id and extra fields; JSON lines parse."""

from __future__ import annotations

import json
import logging

from gateway.logs import JsonFormatter, RequestIdFilter, request_id_var


def render(message: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    RequestIdFilter().filter(record)
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


def test_request_id_comes_from_the_context() -> None:
    assert render("outside")["request_id"] == "-"
    token = request_id_var.set("abc123")
    try:
        entry = render("inside", route="/v1/predict", status=200)
    finally:
        request_id_var.reset(token)
    assert entry["request_id"] == "abc123"
    assert entry["route"] == "/v1/predict"
    assert entry["status"] == 200
    assert entry["message"] == "inside"
    assert entry["level"] == "INFO"
