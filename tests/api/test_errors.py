"""Domain errors become HTTP answers in one place (``api.main``): the status by class, the message kept."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from privads.api.main import create_app
from privads.infra.errors import (
    Conflict,
    Forbidden,
    InvalidEvent,
    InvalidInput,
    LogError,
    NotFound,
    PrivAdsError,
    StartError,
)
from privads.infra.errors import Unavailable as Down
from privads.infra.settings import Settings


@pytest.fixture
def client() -> TestClient:
    app = create_app(Settings(kafka="unused:1", redis="redis://unused"))
    errors = {"invalid": InvalidInput("k: must be at most 100"), "event": InvalidEvent("ts: not a number"),
              "log": LogError("logs.jsonl:3: not JSON"), "missing": NotFound("model v9: no such version"),
              "down": Down("redis: connection refused"), "race": Conflict("partition 3: seq 7 != 6"),
              "start": StartError("tansu did not start"),
              "forbidden": Forbidden("impression_id: not an impression served to this user_id and ad_id")}

    @app.get("/raise/{name}")
    async def _raise(name: str) -> None:
        raise errors[name]

    return TestClient(app)  # no lifespan: nothing is connected, and these routes need nothing


@pytest.mark.parametrize(("name", "status"), [("invalid", 422), ("event", 422), ("log", 422), ("missing", 404),
                                              ("down", 503), ("race", 503), ("start", 500), ("forbidden", 403)])
def test_each_domain_error_gets_its_status_and_its_message(client: TestClient, name: str, status: int) -> None:
    r = client.get(f"/raise/{name}")
    assert r.status_code == status
    body = r.json()
    assert body["error"] and body["detail"].endswith(("Input", "Event", "Error", "Found", "Unavailable",
                                                      "Conflict", "Forbidden"))
    assert ("Retry-After" in r.headers) == (status == 503)


def test_every_error_is_a_privads_error_and_input_errors_are_value_errors() -> None:
    for cls in (InvalidInput, InvalidEvent, LogError, NotFound, Down, Conflict, StartError, Forbidden):
        assert issubclass(cls, PrivAdsError)
    assert issubclass(InvalidEvent, ValueError) and issubclass(LogError, InvalidInput)
