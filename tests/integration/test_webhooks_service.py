"""A webhook event survives a SIGKILL of ``palm-serve serve`` (real Triton) between the job's end and
its delivery: the outbox row was committed with the job's final status, and the restarted service
delivers it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.triton.launcher import EmbeddedTriton
from gateway.webhooks.signing import new_secret
from tests.factories import make_geotiff
from tests.integration.test_jobs_service import Service, finished
from tests.integration.waiting import wait_for
from tests.receiver import receiving

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_event_committed_before_a_sigkill_is_delivered_after_the_restart(
    triton_server: EmbeddedTriton, database_url: str, tmp_path: Path
) -> None:
    secret = new_secret()
    scene = make_geotiff(tmp_path / "one.tif", width=512, height=512, seed=3)
    with receiving([secret]) as receiver:
        # The first run delivers nothing, so the kill lands after the job's end and before any delivery.
        service = Service(
            tmp_path / "data",
            database_url,
            triton_server.grpc_url,
            PALM_WEBHOOK__SECRETS=secret,
            PALM_WEBHOOK__ALLOW_PRIVATE="true",
            PALM_WEBHOOK__POLL_S="0.2",
            PALM_WEBHOOK__DISPATCHER="false",
        )
        service.start()
        try:
            with service.client() as client:
                created = client.post(
                    "/v1/jobs",
                    files=[("files", ("one.tif", scene.read_bytes(), "image/tiff"))],
                    data={"webhook_url": receiver.url},
                )
                assert created.status_code == 202, created.text
                job_id = created.json()["id"]
            job = finished(service, job_id, timeout_s=120)
            with service.client() as client:
                (pending,) = client.get(f"/v1/jobs/{job_id}/webhooks").json()["deliveries"]
            assert (pending["status"], pending["attempts"]) == ("pending", [])
            service.kill()
            assert receiver.received == []

            service.env["PALM_WEBHOOK__DISPATCHER"] = "true"
            service.start()
            assert wait_for(lambda: len(receiver.accepted) == 1, 30), receiver.received
            with service.client() as client:
                (delivered,) = client.get(f"/v1/jobs/{job_id}/webhooks").json()["deliveries"]
        finally:
            service.stop()
    assert receiver.accepted == {pending["id"]: 1}
    assert delivered["status"] == "succeeded"
    (event,) = receiver.events()
    assert event["type"] == "job.succeeded"
    assert event["data"]["results_sha256"] == job["results"]["sha256"]
