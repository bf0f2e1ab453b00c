"""The client's own decisions, through a scripted transport: retries of 429/503 (bounded, after
``Retry-After``), problem+json to typed exceptions, bodies re-sent whole, events parsed, names kept."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import httpx
import pytest

from palm_serve import BadRequest, Client, RateLimited, ServerError, Unavailable
from palm_serve._wire import EventParser, backoff_s, collect, retry_after, submission_key, upload_batches


def scripted(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return httpx.MockTransport(handle), seen


def problem(status: int, slug: str, retry: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/problem+json", **({"Retry-After": retry} if retry else {})}
    body = {"type": f"https://palm-serve.dev/problems/{slug}", "title": slug.title(), "status": status}
    return httpx.Response(status, headers=headers, json={**body, "detail": f"{slug} here", "limit": 3})


def test_503_and_429_are_retried_after_retry_after_and_the_upload_is_sent_whole(tmp_path: Path) -> None:
    image = tmp_path / "a.tif"
    image.write_bytes(b"II*\x00" + bytes(range(256)) * 10)
    transport, seen = scripted(
        problem(503, "overloaded", "0"),
        problem(429, "rate-limited", "0"),
        httpx.Response(200, json={"ok": 1}),
    )
    with Client("http://palm.test", api_key="k-123", transport=transport) as client:
        assert client.predict(image) == {"ok": 1}
    assert len(seen) == 3
    assert all(image.read_bytes() in r.content for r in seen), "each try sends the whole file"
    assert seen[0].headers["authorization"] == "Bearer k-123"


def test_retries_are_bounded_and_the_last_problem_is_raised() -> None:
    transport, seen = scripted(problem(429, "rate-limited", "0"))
    with (
        Client("http://palm.test", transport=transport, retries=2) as client,
        pytest.raises(RateLimited) as caught,
    ):
        client.jobs.get("j")
    assert len(seen) == 3
    error = caught.value
    assert (error.status, error.slug, error.title, error.detail) == (
        429,
        "rate-limited",
        "Rate-Limited",
        "rate-limited here",
    )
    assert error.extensions == {"limit": 3}
    assert error.retry_after == 0


def test_other_errors_are_not_retried_and_keep_their_members() -> None:
    transport, seen = scripted(problem(422, "invalid-parameter"))
    with Client("http://palm.test", transport=transport) as client, pytest.raises(BadRequest) as caught:
        client.jobs.get("j")
    assert len(seen) == 1
    assert caught.value.type == "https://palm-serve.dev/problems/invalid-parameter"

    html, _ = scripted(httpx.Response(502, text="<html>502 Bad Gateway</html>"))
    with Client("http://palm.test", transport=html) as client, pytest.raises(ServerError) as proxy:
        client.jobs.get("j")
    assert proxy.value.status == 502
    assert "Bad Gateway" in proxy.value.detail


def test_a_retry_after_date_is_honoured_within_the_cap() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    response = httpx.Response(503, headers={"Retry-After": later})
    assert 100 < (retry_after(response) or 0) <= 120
    assert backoff_s(1, retry_after(response), base_s=0.5, cap_s=30) == 30
    assert 0.25 <= backoff_s(1, None, base_s=0.5, cap_s=30) <= 0.5
    assert 2 <= backoff_s(4, None, base_s=0.5, cap_s=30) <= 4
    transport, seen = scripted(problem(503, "unavailable", "0"))
    with Client("http://palm.test", transport=transport, retries=0) as client, pytest.raises(Unavailable):
        client.jobs.get("j")
    assert len(seen) == 1


def test_server_sent_events_are_parsed_line_by_line() -> None:
    parser = EventParser()
    lines = ["retry: 2000", "", ": keep-alive", "", "id: 7", "event: progress", 'data: {"files_done": 2}', ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.id, e.type, e.data) for e in events] == [(7, "progress", {"files_done": 2})]


def test_folders_keep_their_structure_in_names_and_the_key_follows_the_files(tmp_path: Path) -> None:
    (tmp_path / "north").mkdir()
    for name in ("north/a.tif", "b.TIF", "notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    files = collect(tmp_path)
    assert [f.name for f in files] == ["b.TIF", "north/a.tif"]
    key = submission_key(files, {"name": "n"}, staged=True)
    assert key == submission_key(collect(tmp_path), {"name": "n"}, staged=True)
    assert key != submission_key(files, {"name": "other"}, staged=True)
    assert key != submission_key(files, {"name": "n"}, staged=False)
    (tmp_path / "b.TIF").write_bytes(b"y" * 11)
    assert key != submission_key(collect(tmp_path), {"name": "n"}, staged=True)
    assert [[f.name for f in b] for b in upload_batches(files, 1, 100)] == [["b.TIF"], ["north/a.tif"]]
    assert [len(b) for b in upload_batches(files, 10, 15)] == [1, 1]
    with pytest.raises(ValueError, match="both be named"):
        collect([tmp_path / "north" / "a.tif", tmp_path / "north" / "a.tif"])
    with pytest.raises(FileNotFoundError):
        collect(tmp_path / "missing")
