"""RabbitMQ and PostgreSQL restarted under a working platform (the private instances of conftest.py).

RabbitMQ: jobs in flight while the broker is down are neither lost nor stuck (durable queue, persistent
messages, and the reconciler re-sends a step whose message could not be sent), and a job submitted while
it is down is refused with 503 UNAVAILABLE instead of being lost. PostgreSQL: while it is down every API
call answers 503 with the v1 error body; once it is back the running job carries on and succeeds.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.reliability.faults import job_pk_of, job_row, record_figure, submit_overhead, wait_for

pytestmark = pytest.mark.integration

PROJECT = "team-restarts"


def assert_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == 503 and body["error"]["status"] == "UNAVAILABLE", body
    assert set(body) == {"error"} and body["error"]["message"]


def test_jobs_survive_a_rabbitmq_restart_and_a_submit_while_it_is_down_is_refused(
        platform, store, client, overhead_uri, private_rabbitmq):
    submit_overhead(client, "through_broker_restart_training", overhead_uri, 15)
    submit_overhead(client, "through_broker_restart_preparing", overhead_uri, 5)
    training = job_pk_of(store, PROJECT, "through_broker_restart_training")
    wait_for(lambda: job_row(store, training)["step"] == "TRAINING", "the first job to train")
    private_rabbitmq.stop()
    stopped = time.monotonic()
    try:
        response = client.request("POST", "/jobs", json={"jobId": "submitted_while_down", "trainingInput": {
            "packageUris": [overhead_uri], "pythonModule": "overhead_trainer.task", "args": ["--run-seconds", "1"]}})
        assert_unavailable(response)
        assert client.request("GET", "/jobs/submitted_while_down").status_code == 404  # not half-created
        time.sleep(5)
    finally:
        private_rabbitmq.start()
    restarted = time.monotonic()
    for job_id in ("through_broker_restart_training", "through_broker_restart_preparing"):
        job = client.wait(job_id, timeout=600)
        assert job["state"] == "SUCCEEDED", (job_id, job.get("errorMessage"))
    record_figure(platform, "RabbitMQ down (s)", restarted - stopped)
    record_figure(platform, "RabbitMQ back to both jobs SUCCEEDED", time.monotonic() - restarted)
    submit_overhead(client, "submitted_after_broker_restart", overhead_uri, 1)
    assert client.wait("submitted_after_broker_restart", timeout=600)["state"] == "SUCCEEDED"


def test_api_answers_503_while_postgresql_is_down_and_the_job_resumes_after(
        platform, store, client, overhead_uri, private_postgres):
    submit_overhead(client, "through_database_restart", overhead_uri, 15)
    job_pk = job_pk_of(store, PROJECT, "through_database_restart")
    wait_for(lambda: job_row(store, job_pk)["step"] == "TRAINING", "the job to train")
    private_postgres.stop()
    stopped = time.monotonic()
    try:
        assert_unavailable(client.request("GET", "/jobs/through_database_restart"))
        assert_unavailable(client.request("GET", "/jobs"))
        assert_unavailable(client.request("POST", "/jobs/through_database_restart:cancel", json={}))
        assert requests.get(f"{platform.base_url}/healthz", timeout=30).status_code == 503
        time.sleep(5)
    finally:
        private_postgres.start()
    restarted = time.monotonic()
    job = client.wait("through_database_restart", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    record_figure(platform, "PostgreSQL down (s)", restarted - stopped)
    record_figure(platform, "PostgreSQL back to job SUCCEEDED", time.monotonic() - restarted)
    submit_overhead(client, "submitted_after_database_restart", overhead_uri, 1)
    assert client.wait("submitted_after_database_restart", timeout=600)["state"] == "SUCCEEDED"
