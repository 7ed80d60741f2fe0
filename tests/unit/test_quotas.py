"""Per-project quotas through the API: limits from settings and overrides, usage from the database, 429
refusals that create nothing, platform-admin-only changes, and the lock that makes the check atomic
(proven on real PostgreSQL by a submission seen waiting on the lock)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text, update

from cloudml_os import quotas
from cloudml_os.app import create_app
from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.auth.tokens import create_token
from cloudml_os.config import load_settings
from cloudml_os.store import Job, Store, migrate
from cloudml_os.store.models import ProjectQuota, Version
from tests.unit.test_api import FakeTensorFlow, assert_v1_error
from tests.unit.test_api import migrated_db as migrated_db  # a fixture, as is store
from tests.unit.test_api import store as store
from tests.unit.test_api_models import ServingEnv

GPU_JOB = {"scaleTier": "CUSTOM", "masterType": "standard_gpu", "workerType": "complex_model_m_gpu",
           "workerCount": 1}  # 2 nodes, 1 + 4 GPUs


class QuotaEnv(ServingEnv):
    """:class:`ServingEnv` built with quota settings, a platform admin and a package to submit."""

    def __init__(self, tmp_path: Path, store: Store, **settings: Any):
        super().__init__(tmp_path, store)
        self.settings = load_settings(environ={}, data_dir=str(tmp_path), **settings)
        self.app = create_app(self.settings, store=store, artifacts=LocalArtifactStore(self.artifacts_root),
                              frameworks={"TENSORFLOW": FakeTensorFlow()}, start_job=self.start_job,
                              start_operation=self.start_operation, predict=self.predict)
        self.client = self.app.test_client()
        self.platform_admin = self.headers(self.settings.admin_project, "admin")
        self.uri = self.package_uri()

    def submit(self, job_id: str, headers: dict | None = None, client: Any = None, **training_input: Any) -> Any:
        body = {"jobId": job_id, "trainingInput": {"scaleTier": "BASIC", "packageUris": [self.uri],
                                                   "pythonModule": "trainer.task", "region": "local",
                                                   **training_input}}
        return (client or self.client).post("/v1/projects/p/jobs", headers=headers or self.admin, json=body)

    def quotas(self, project: str = "p", headers: dict | None = None) -> Any:
        return self.client.get(f"/v1/projects/{project}/quotas", headers=headers or self.admin)

    def set_quotas(self, values: dict, project: str = "p", headers: dict | None = None) -> Any:
        return self.client.patch(f"/v1/projects/{project}/quotas", headers=headers or self.platform_admin,
                                 json={"quotas": values})

    def jobs_in_db(self) -> int:
        with self.store.session() as session:
            return session.scalar(select(func.count()).select_from(Job))


@pytest.fixture
def qenv(tmp_path, store) -> QuotaEnv:
    return QuotaEnv(tmp_path, store)


def test_quotas_default_to_unlimited_and_usage_counts_unfinished_jobs_topologies(qenv):
    body = qenv.quotas().get_json()
    assert body == {"project": "p", "quotas": dict.fromkeys(quotas.QUOTAS, -1),
                    "usage": dict.fromkeys(quotas.QUOTAS, 0)}
    assert qenv.submit("gpu_job", **GPU_JOB).status_code == 200
    assert qenv.submit("cpu_job").status_code == 200
    assert qenv.quotas().get_json()["usage"] == {"gpus": 5, "nodes": 3, "jobs": 2, "replicas": 0}
    with qenv.store.session() as session:  # a finished job frees what it held
        session.execute(update(Job).where(Job.job_id == "gpu_job").values(state="SUCCEEDED"))
    assert qenv.quotas().get_json()["usage"] == {"gpus": 0, "nodes": 1, "jobs": 1, "replicas": 0}


def test_default_quotas_come_from_settings_and_a_refusal_is_429_naming_the_quota(tmp_path, store):
    qenv = QuotaEnv(tmp_path, store, default_quota_jobs=1, default_quota_gpus=4)
    assert qenv.quotas().get_json()["quotas"] == {"gpus": 4, "nodes": -1, "jobs": 1, "replicas": -1}
    message = assert_v1_error(qenv.submit("too_many_gpus", **GPU_JOB), 429, "RESOURCE_EXHAUSTED")
    assert "gpus limit is 4" in message and "usage is 0" in message and "needs 5" in message
    assert qenv.submit("first").status_code == 200
    message = assert_v1_error(qenv.submit("second"), 429, "RESOURCE_EXHAUSTED")
    assert "jobs limit is 1" in message and "usage is 1" in message
    assert qenv.jobs_in_db() == 1 and len(qenv.started) == 1  # the refused ones created and started nothing


def test_only_platform_admins_change_quotas_and_bad_values_are_400(qenv):
    project_admin = qenv.admin  # admin of project p, not of the admin project
    assert_v1_error(qenv.set_quotas({"jobs": 3}, headers=project_admin), 403, "PERMISSION_DENIED")
    admin_project_member = qenv.headers("admin", "member")
    assert_v1_error(qenv.set_quotas({"jobs": 3}, "admin", admin_project_member), 403, "PERMISSION_DENIED")
    for bad in ({"jobs": -2}, {"jobs": "3"}, {"jobs": 1.5}, {"jobs": True}, {"cpus": 3}, {"jobs": 1 << 40}):
        assert_v1_error(qenv.set_quotas(bad), 400, "INVALID_ARGUMENT")
    assert_v1_error(qenv.client.patch("/v1/projects/p/quotas", headers=qenv.platform_admin, json={}),
                    400, "INVALID_ARGUMENT")
    response = qenv.set_quotas({"jobs": 3, "gpus": 0})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["quotas"] == {"gpus": 0, "nodes": -1, "jobs": 3, "replicas": -1}
    assert qenv.quotas(headers=qenv.headers("p", "viewer")).get_json()["quotas"]["jobs"] == 3
    assert qenv.set_quotas({"gpus": None}).get_json()["quotas"]["gpus"] == -1  # null: back to the default
    assert_v1_error(qenv.quotas(headers=qenv.headers("other", "admin")), 404, "NOT_FOUND")


def test_admin_listing_shows_every_known_project_to_platform_admins_only(qenv):
    create_token(qenv.store, "lonely", "viewer")  # a project with only a token
    qenv.set_quotas({"nodes": 7}, project="quota-only")
    assert qenv.submit("j1").status_code == 200
    assert_v1_error(qenv.client.get("/v1/admin/projects", headers=qenv.admin), 403, "PERMISSION_DENIED")
    response = qenv.client.get("/v1/admin/projects", headers=qenv.platform_admin)
    assert response.status_code == 200
    listing = {entry["project"]: entry for entry in response.get_json()["projects"]}
    assert {"admin", "p", "lonely", "quota-only"} <= set(listing)
    assert listing["quota-only"]["quotas"]["nodes"] == 7
    assert listing["p"]["usage"]["jobs"] == 1


def test_version_replicas_count_against_replicas_and_nodes_and_scaling_up_is_checked(qenv):
    qenv.set_quotas({"replicas": 3})
    assert qenv.create_model().status_code == 200
    assert_v1_error(qenv.create_version(manualScaling={"nodes": 4}), 429, "RESOURCE_EXHAUSTED")
    with qenv.store.session() as session:
        assert session.scalar(select(func.count()).select_from(Version)) == 0
    qenv.deployed("v1", manualScaling={"nodes": 2})
    assert qenv.quotas().get_json()["usage"] == {"gpus": 0, "nodes": 2, "jobs": 0, "replicas": 2}
    message = assert_v1_error(qenv.patch("models/census/versions/v1", "manualScaling.nodes",
                                         {"manualScaling": {"nodes": 4}}), 429, "RESOURCE_EXHAUSTED")
    assert "replicas limit is 3" in message
    assert qenv.version("v1").replicas == 2 and qenv.version("v1").state == "READY"
    assert qenv.patch("models/census/versions/v1", "manualScaling.nodes",
                      {"manualScaling": {"nodes": 3}}).status_code == 200
    qenv.set_quotas({"replicas": 1})  # lowered below usage: scaling down is still allowed
    qenv.set_state("v1", "READY")
    assert qenv.patch("models/census/versions/v1", "manualScaling.nodes",
                      {"manualScaling": {"nodes": 1}}).status_code == 200


def test_get_config_shows_the_projects_quotas_and_usage(qenv):
    qenv.submit("j1")
    body = qenv.client.get("/v1/projects/p:getConfig", headers=qenv.admin).get_json()
    assert body["quotas"]["usage"]["jobs"] == 1 and body["quotas"]["quotas"]["jobs"] == -1


# ---- atomicity on PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def pg_env(tmp_path, own_database_url) -> QuotaEnv:
    migrate(own_database_url)
    pg_store = Store(own_database_url)
    qenv = QuotaEnv(tmp_path, pg_store)
    yield qenv
    pg_store.engine.dispose()


def _waiting_on_a_lock(database_url: str, timeout: float = 60) -> bool:
    """Whether some session of this database is (or becomes, within ``timeout``) blocked on a lock."""
    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                waiting = connection.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"))
            if waiting:
                return True
            time.sleep(0.05)
        return False
    finally:
        engine.dispose()


def test_a_concurrent_submission_waits_for_the_quota_lock_and_counts_the_first(pg_env, own_database_url):
    pg_env.set_quotas({"jobs": 1})
    results: list[Any] = []
    second = threading.Thread(target=lambda: results.append(pg_env.submit("second", client=pg_env.app.test_client())))
    with pg_env.store.session() as session:  # a first submission, holding the lock between check and insert
        quotas.check(session, pg_env.settings, "p", quotas.Demand(jobs=1))
        second.start()
        assert _waiting_on_a_lock(own_database_url), "the second submission did not wait for the quota lock"
        session.add(Job(project="p", job_id="first", state="QUEUED", step="PROVISIONING", framework="TENSORFLOW",
                        training_input={"scaleTier": "BASIC"}))
    second.join(timeout=60)
    assert len(results) == 1
    assert_v1_error(results[0], 429, "RESOURCE_EXHAUSTED")
    assert pg_env.jobs_in_db() == 1


def test_many_concurrent_submissions_never_exceed_the_quota(pg_env):
    pg_env.set_quotas({"jobs": 2})
    statuses: list[int] = []

    def submit(index: int) -> None:
        statuses.append(pg_env.submit(f"race_{index}", client=pg_env.app.test_client()).status_code)

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(statuses) == [200, 200] + [429] * 6
    assert pg_env.jobs_in_db() == 2
    with pg_env.store.session() as session:
        assert session.get(ProjectQuota, "p").jobs == 2


def test_a_batch_prediction_job_holds_max_worker_count_nodes_and_is_refused_past_the_quota(tmp_path, store):
    qenv = QuotaEnv(tmp_path, store, default_quota_nodes=4)
    export = qenv.artifacts_root / "p" / "models" / "m"
    export.mkdir(parents=True)
    (export / "saved_model.pb").write_bytes(b"model")
    (qenv.artifacts_root / "p" / "in").mkdir(parents=True)
    (qenv.artifacts_root / "p" / "in" / "a.json").write_bytes(b"[1.0]\n")

    def submit(job_id: str, workers: int) -> Any:
        body = {"jobId": job_id, "predictionInput": {"dataFormat": "JSON", "inputPaths": ["store://p/in/*.json"],
                                                     "outputPath": "store://p/out", "uri": "store://p/models/m",
                                                     "maxWorkerCount": workers}}
        return qenv.client.post("/v1/projects/p/jobs", headers=qenv.admin, json=body)

    response = submit("batch_1", 3)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["predictionOutput"]["modelUri"] == "store://p/models/m"
    assert response.get_json()["framework"] == "TENSORFLOW"  # told by saved_model.pb
    assert qenv.quotas().get_json()["usage"] == {"gpus": 0, "nodes": 3, "jobs": 1, "replicas": 0}
    refused = submit("batch_2", 2)
    assert_v1_error(refused, 429, "RESOURCE_EXHAUSTED")
    assert "nodes" in refused.get_json()["error"]["message"]
    assert qenv.jobs_in_db() == 1
