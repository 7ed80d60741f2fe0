"""The /v1 API through Flask's test client: a real Store on a temporary SQLite file, a fake framework,
and a start_job that records what it was asked to start."""

from __future__ import annotations

import collections
import hashlib
import io
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cloudml_os.api.jobs import Condition, complete_utf8_length, follow_log, parse_filter
from cloudml_os.api.logwatch import LogWatch
from cloudml_os.app import create_app
from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.auth import role_allows
from cloudml_os.auth.tokens import create_token
from cloudml_os.config import load_settings
from cloudml_os.errors import InvalidArgument
from cloudml_os.frameworks.base import Framework, Member, Outcome, ProcessStatus, Role, Topology
from cloudml_os.states import JobState
from cloudml_os.store import Job, Package, Store, Token, migrate
from tests.unit.test_archives import PLAIN, SDIST, WHEEL, tar_bytes, zip_bytes


class FakeTensorFlow(Framework):
    """Just enough of a framework plugin for the API: a name and a runtime catalogue."""

    name = "TENSORFLOW"
    runtimes = {"2.15": "tf-2.15", "2.11": "tf-2.11"}
    default_runtime_version = "2.15"
    export_marker = "saved_model.pb"

    def roles(self, topology: Topology, training_input: Mapping[str, Any]) -> list[Role]:
        return []

    def environment(self, member: Member, members: list[Member], job: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def outcome(self, processes: list[ProcessStatus]) -> Outcome:
        return Outcome("RUNNING")


class Env:
    """One test's application and what it was built from."""

    def __init__(self, tmp_path: Path, store: Store, framework: Framework | None = None):
        self.store = store
        self.artifacts_root = tmp_path / "artifacts"
        self.started: list[int] = []
        self.queue_down = False
        settings = load_settings(environ={}, data_dir=str(tmp_path))
        self.app = create_app(settings, store=store, artifacts=LocalArtifactStore(self.artifacts_root),
                              frameworks={"TENSORFLOW": framework or FakeTensorFlow()}, start_job=self.start_job)
        self.app.config["LOG_FOLLOW_INTERVAL"] = 0.01
        self.client = self.app.test_client()
        self.admin = self.headers("p", "admin")

    def start_job(self, job_pk: int) -> None:
        if self.queue_down:
            raise ConnectionError("broker down")
        self.started.append(job_pk)

    def headers(self, project: str, role: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + create_token(self.store, project, role)}

    def upload(self, data: bytes, filename: str = "trainer-0.1.tar.gz", headers: dict | None = None) -> Any:
        return self.client.post("/v1/projects/p/packages", headers=headers or self.admin,
                                data={"file": (io.BytesIO(data), filename)}, content_type="multipart/form-data")

    def package_uri(self) -> str:
        response = self.upload(tar_bytes(SDIST))
        assert response.status_code == 200, response.get_json()
        return response.get_json()["uri"]

    def submit(self, job_id: str = "job_1", labels: dict | None = None, **training_input: Any) -> Any:
        ti = {"packageUris": [self.package_uri()], "pythonModule": "trainer.task", **training_input}
        return self.client.post("/v1/projects/p/jobs", headers=self.admin,
                                json={"jobId": job_id, "trainingInput": ti, "labels": labels or {}})

    def job(self, job_id: str) -> Job:
        job = self.store.find_job("p", job_id)
        assert job is not None
        return job

    def stored_files(self) -> list[Path]:
        return [p for p in self.artifacts_root.rglob("*") if p.is_file()] if self.artifacts_root.exists() else []

    def package_rows(self) -> int:
        with self.store.session() as session:
            return session.scalar(select(func.count()).select_from(Package))


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """Run the Alembic migrations once; each test copies the resulting file (fast, isolated)."""
    path = tmp_path_factory.mktemp("schema") / "template.sqlite"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path, migrated_db) -> Store:
    path = tmp_path / "db.sqlite"
    path.write_bytes(migrated_db.read_bytes())
    store = Store(f"sqlite:///{path}")
    yield store
    store.engine.dispose()


@pytest.fixture
def env(tmp_path, store) -> Env:
    return Env(tmp_path, store)


def assert_v1_error(response: Any, code: int, status: str) -> str:
    """The response is a v1 error body with this code and status; returns its message."""
    assert response.status_code == code, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "status"}
    assert body["error"]["code"] == code and body["error"]["status"] == status
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


# ---- packages -----------------------------------------------------------------------------------------


def test_upload_sdist_stores_it_by_content_and_records_it(env):
    data = tar_bytes(SDIST)
    response = env.upload(data)
    assert response.status_code == 200
    sha = hashlib.sha256(data).hexdigest()
    package = response.get_json()
    assert package["uri"] == f"store://p/packages/{sha[:16]}/trainer-0.1.tar.gz"
    assert (package["kind"], package["sha256"], package["size"]) == ("sdist", sha, len(data))
    assert (env.artifacts_root / "p" / "packages" / sha[:16] / "trainer-0.1.tar.gz").read_bytes() == data
    assert env.store.package_by_uri(package["uri"]).kind == "sdist"


def test_upload_plain_zip_is_an_archive_and_the_same_file_twice_is_one_package(env):
    first = env.upload(zip_bytes(PLAIN), "code.zip").get_json()
    second = env.upload(zip_bytes(PLAIN), "code.zip").get_json()
    assert first["kind"] == "archive" and first["uri"] == second["uri"]
    assert env.package_rows() == 1
    listed = env.client.get("/v1/projects/p/packages", headers=env.headers("p", "viewer")).get_json()
    assert [p["uri"] for p in listed["packages"]] == [first["uri"]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", listed["packages"][0]["createTime"])


def test_upload_wheel_is_a_wheel(env):
    package = env.upload(zip_bytes(WHEEL), "cmlos_helper-1.0-py3-none-any.whl").get_json()
    assert package["kind"] == "wheel" and package["uri"].endswith("/cmlos_helper-1.0-py3-none-any.whl")


@pytest.mark.parametrize("filename, data, fragment", [
    ("slip.tar.gz", tar_bytes([*PLAIN, ("../../evil.py", b"x")]), "'..'"),
    ("slip.zip", zip_bytes([*PLAIN, ("../evil.py", b"x")]), "'..'"),
    ("abs.tar.gz", tar_bytes([("/etc/cron.d/evil", b"x")]), "absolute"),
    ("link.tar.gz", tar_bytes([*PLAIN, ("trainer/etc", "symlink", "../../../etc")]), "points outside"),
    ("link.zip", zip_bytes([*PLAIN, ("trainer/etc", "symlink", "/etc")]), "points outside"),
    ("corrupt.tar.gz", b"\x1f\x8b\x08\x00garbage" * 20, "not a readable"),
    ("notazip.zip", tar_bytes(PLAIN), "not a readable"),
    ("trainer.egg", zip_bytes(PLAIN), "must be a .tar.gz"),
    ("trainer-0.1-py3-none-any.whl", zip_bytes(PLAIN), "must hold trainer-0.1.dist-info/"),
    ("../trainer.tar.gz", tar_bytes(PLAIN), "plain name"),
])
def test_unsafe_or_unreadable_uploads_are_refused_and_leave_nothing(env, filename, data, fragment):
    message = assert_v1_error(env.upload(data, filename), 400, "INVALID_ARGUMENT")
    assert message.startswith("file: ") and fragment in message
    assert env.stored_files() == [] and env.package_rows() == 0


def test_upload_over_the_size_cap_is_413(env):
    env.app.config["PACKAGE_MAX_BYTES"] = 1000
    assert_v1_error(env.upload(tar_bytes([("big", bytes(range(256)) * 40)], compressed=False), "big.tar"),
                    413, "RESOURCE_EXHAUSTED")
    assert env.stored_files() == [] and env.package_rows() == 0


def test_upload_without_a_file_field_is_400(env):
    response = env.client.post("/v1/projects/p/packages", headers=env.admin, data={"other": "x"},
                               content_type="multipart/form-data")
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT") == "file: Missing data for required field."


# ---- create -------------------------------------------------------------------------------------------


def test_create_queues_the_job_and_starts_it_once(env):
    response = env.submit(scaleTier="STANDARD_1", args=["--epochs", "3"], labels={"team": "ml"})
    assert response.status_code == 200, response.get_json()
    job = response.get_json()
    row = env.job("job_1")
    assert env.started == [row.id]
    assert (job["jobId"], job["state"], job["step"], job["framework"]) == ("job_1", "QUEUED", "PROVISIONING",
                                                                           "TENSORFLOW")
    assert job["labels"] == {"team": "ml"} and isinstance(job["etag"], str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", job["createTime"])
    assert "startTime" not in job and "endTime" not in job and "errorMessage" not in job
    assert row.training_input["framework"] == "TENSORFLOW" and row.training_input["scaleTier"] == "STANDARD_1"
    assert job["trainingInput"]["args"] == ["--epochs", "3"]


def test_args_with_shell_metacharacters_are_stored_literally(env):
    args = ["--out=$(rm -rf /)", "a; reboot", "`id`", "it's \"quoted\"", "*", "|", "&&", "\n"]
    assert env.submit(args=args).status_code == 200
    assert env.job("job_1").training_input["args"] == args
    fetched = env.client.get("/v1/projects/p/jobs/job_1", headers=env.admin).get_json()
    assert fetched["trainingInput"]["args"] == args


def test_counts_sent_as_integers_are_returned_as_v1_int64_strings(env):
    response = env.submit(scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=2)
    assert response.get_json()["trainingInput"]["workerCount"] == "2"
    assert env.job("job_1").training_input["workerCount"] == 2


def test_duplicate_job_id_is_409_and_starts_nothing_more(env):
    assert env.submit().status_code == 200
    message = assert_v1_error(env.submit(), 409, "ALREADY_EXISTS")
    assert message == "projects/p/jobs/job_1 already exists"
    assert len(env.started) == 1


def test_same_job_id_in_another_project_is_fine(env):
    assert env.submit().status_code == 200
    other = env.headers("q", "member")
    up = env.client.post("/v1/projects/q/packages", headers=other, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(tar_bytes(SDIST)), "t.tar.gz")}).get_json()
    response = env.client.post("/v1/projects/q/jobs", headers=other, json={
        "jobId": "job_1", "trainingInput": {"packageUris": [up["uri"]], "pythonModule": "trainer.task"}})
    assert response.status_code == 200


@pytest.mark.parametrize("training_input, fragment", [
    ({"scaleTier": "CUSTOM"}, "trainingInput.masterType is required when scaleTier is CUSTOM"),
    ({"scaleTier": "CUSTOM", "masterType": "huge"}, "trainingInput.masterType: unknown machine type 'huge'"),
    ({"scaleTier": "CUSTOM", "masterType": "standard", "workerCount": "2"},
     "trainingInput.workerType is required when workerCount > 0"),
    ({"runtimeVersion": "0.1"}, "trainingInput.runtimeVersion: TENSORFLOW has no runtime '0.1'; valid: 2.11, 2.15"),
    ({"framework": "PYTORCH"}, "trainingInput.framework: unknown framework 'PYTORCH'; valid: TENSORFLOW"),
    ({"scaleTier": "BASIC_TPU"}, "trainingInput.scaleTier: unknown tier 'BASIC_TPU'"),
    ({"jobDir": "store://other/out"}, "trainingInput.jobDir: 'store://other/out' is not in project p"),
])
def test_installation_checks_are_400_with_their_message(env, training_input, fragment):
    message = assert_v1_error(env.submit(**training_input), 400, "INVALID_ARGUMENT")
    assert fragment in message
    assert env.started == [] and env.store.find_job("p", "job_1") is None


@pytest.mark.parametrize("uri", ["gs://bucket/trainer.tar.gz", "store://q/packages/x/t.tar.gz",
                                 "store://p/packages/0000/missing.tar.gz", "store://p/../q/x"])
def test_package_uris_must_be_uploaded_packages_of_the_project(env, uri):
    response = env.client.post("/v1/projects/p/jobs", headers=env.admin, json={
        "jobId": "j", "trainingInput": {"packageUris": [env.package_uri(), uri], "pythonModule": "t.task"}})
    message = assert_v1_error(response, 400, "INVALID_ARGUMENT")
    assert message.startswith("trainingInput.packageUris[1]: ") and "is not a package of project p" in message


def test_schema_errors_name_every_offending_field(env):
    response = env.client.post("/v1/projects/p/jobs", headers=env.admin, json={
        "jobId": "9lives", "trainingInput": {"scaleTier": "GIANT", "workerCount": "-2", "packageUris": ["x"],
                                             "colour": "red"},
        "labels": {"Team": "x"}})
    message = assert_v1_error(response, 400, "INVALID_ARGUMENT")
    for field in ("jobId:", "trainingInput.scaleTier:", "trainingInput.workerCount:", "trainingInput.pythonModule:",
                  "trainingInput.colour: Unknown field.", "labels.Team"):
        assert field in message


def test_malformed_json_and_non_object_bodies_are_400(env):
    response = env.client.post("/v1/projects/p/jobs", headers=env.admin, data="{nope",
                               content_type="application/json")
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT").startswith("Invalid JSON payload")
    response = env.client.post("/v1/projects/p/jobs", headers=env.admin, json=[1, 2])
    assert_v1_error(response, 400, "INVALID_ARGUMENT")


def test_a_queue_that_is_down_is_503_and_the_job_id_stays_free(env):
    env.queue_down = True
    assert_v1_error(env.submit(), 503, "UNAVAILABLE")
    assert env.store.find_job("p", "job_1") is None and env.started == []
    env.queue_down = False
    assert env.submit().status_code == 200
    assert env.started == [env.job("job_1").id]


# ---- get, list ----------------------------------------------------------------------------------------


def test_get_missing_job_is_404(env):
    message = assert_v1_error(env.client.get("/v1/projects/p/jobs/nope", headers=env.admin), 404, "NOT_FOUND")
    assert message == "projects/p/jobs/nope not found"


def make_jobs(env: Env, count: int) -> list[int]:
    uri = env.package_uri()
    pks = []
    for index in range(count):
        job = env.store.create_job(Job(project="p", job_id=f"job_{index}", state="QUEUED", step="PROVISIONING",
                                       framework="TENSORFLOW", labels={"team": "ml" if index % 2 else "data"},
                                       training_input={"packageUris": [uri], "pythonModule": "t.task"}))
        pks.append(job.id)
    return pks


def list_ids(env: Env, query: str = "") -> tuple[list[str], str | None]:
    response = env.client.get(f"/v1/projects/p/jobs{query}", headers=env.admin)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    return [job["jobId"] for job in body["jobs"]], body.get("nextPageToken")


def test_list_pages_newest_first_until_no_token(env):
    make_jobs(env, 5)
    ids, token = list_ids(env, "?pageSize=2")
    assert ids == ["job_4", "job_3"] and token
    ids, token = list_ids(env, f"?pageSize=2&pageToken={token}")
    assert ids == ["job_2", "job_1"] and token
    ids, token = list_ids(env, f"?pageSize=2&pageToken={token}")
    assert ids == ["job_0"] and token is None
    assert list_ids(env) == ([f"job_{i}" for i in range(4, -1, -1)], None)


def test_list_exactly_one_full_page_has_no_token(env):
    make_jobs(env, 2)
    assert list_ids(env, "?pageSize=2") == (["job_1", "job_0"], None)


@pytest.mark.parametrize("query", ["?pageToken=bm90LWEtbnVtYmVy", "?pageToken=%%%", "?pageSize=-1",
                                   "?pageSize=ten"])
def test_bad_paging_arguments_are_400(env, query):
    assert_v1_error(env.client.get(f"/v1/projects/p/jobs{query}", headers=env.admin), 400, "INVALID_ARGUMENT")


def test_list_filters_on_state_and_labels(env):
    pks = make_jobs(env, 4)  # job_0 data, job_1 ml, job_2 data, job_3 ml
    env.store.transition(pks[1], [JobState.QUEUED], JobState.PREPARING)
    env.store.transition(pks[1], [JobState.PREPARING], JobState.RUNNING)
    env.store.transition(pks[2], [JobState.QUEUED], JobState.FAILED)
    assert list_ids(env, "?filter=state=RUNNING")[0] == ["job_1"]
    assert list_ids(env, '?filter=state="FAILED"')[0] == ["job_2"]
    assert list_ids(env, "?filter=state!=FAILED")[0] == ["job_3", "job_1", "job_0"]
    assert list_ids(env, "?filter=labels.team=ml")[0] == ["job_3", "job_1"]
    assert list_ids(env, "?filter=labels.team!=ml")[0] == ["job_2", "job_0"]
    assert list_ids(env, "?filter=labels.team=ml AND state=QUEUED")[0] == ["job_3"]
    assert list_ids(env, "?filter=labels.owner!=bob")[0] == ["job_3", "job_2", "job_1", "job_0"]


@pytest.mark.parametrize("text", ["jobId:census*", "state=RUNNING OR state=FAILED", "state=BORED",
                                  "state>RUNNING", "state=RUNNING AND", "labels=ml", "state=RUNNING state=FAILED"])
def test_unsupported_filters_are_refused_not_ignored(env, text):
    response = env.client.get("/v1/projects/p/jobs", headers=env.admin, query_string={"filter": text})
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT").startswith("filter: ")


def test_parse_filter_understands_quotes_spaces_and_and():
    assert parse_filter(' state = "RUNNING"  AND labels.team=ml ') == [
        Condition("state", "=", "RUNNING"), Condition("labels.team", "=", "ml")]
    assert parse_filter("") == []
    with pytest.raises(InvalidArgument):
        parse_filter("state=RUNNING and labels.a=b")


# ---- cancel -------------------------------------------------------------------------------------------


def cancel(env: Env, job_id: str, **kwargs: Any) -> Any:
    return env.client.post(f"/v1/projects/p/jobs/{job_id}:cancel", headers=env.admin, **kwargs)


def test_cancel_a_queued_job_cancels_it_at_once(env):
    [pk] = make_jobs(env, 1)
    response = cancel(env, "job_0", json={})
    assert (response.status_code, response.get_json()) == (200, {})
    job = env.store.get_job(pk)
    assert job.state == "CANCELLED" and job.end_time is not None


def test_cancel_a_running_job_asks_the_workflow_to_tear_down(env):
    [pk] = make_jobs(env, 1)
    env.store.transition(pk, [JobState.QUEUED], JobState.PREPARING)
    env.store.transition(pk, [JobState.PREPARING], JobState.RUNNING)
    assert cancel(env, "job_0").status_code == 200  # an empty body is fine
    assert env.store.get_job(pk).state == "CANCELLING"
    assert cancel(env, "job_0", json={}).status_code == 200  # asking again changes nothing
    assert env.store.get_job(pk).state == "CANCELLING"


@pytest.mark.parametrize("final", [JobState.FAILED, JobState.CANCELLED])
def test_cancel_a_finished_job_is_a_failed_precondition(env, final):
    [pk] = make_jobs(env, 1)
    env.store.transition(pk, [JobState.QUEUED], final)
    message = assert_v1_error(cancel(env, "job_0", json={}), 400, "FAILED_PRECONDITION")
    assert message == f"projects/p/jobs/job_0: job is already {final.value}"


def test_cancel_of_a_missing_job_is_404_and_unknown_body_fields_400(env):
    assert_v1_error(cancel(env, "nope", json={}), 404, "NOT_FOUND")
    make_jobs(env, 1)
    assert_v1_error(cancel(env, "job_0", json={"force": True}), 400, "INVALID_ARGUMENT")


# ---- events and logs ----------------------------------------------------------------------------------


def test_events_list_and_after(env):
    [pk] = make_jobs(env, 1)
    env.store.add_event(pk, "NODE", "node up", node="master-0")
    events = env.client.get("/v1/projects/p/jobs/job_0/events", headers=env.admin).get_json()["events"]
    assert [e["message"] for e in events] == ["Job queued", "node up"]
    assert "node" not in events[0] and events[1]["node"] == "master-0"
    assert set(events[1]) == {"id", "time", "kind", "node", "message"}
    later = env.client.get(f"/v1/projects/p/jobs/job_0/events?after={events[0]['id']}", headers=env.admin)
    assert [e["message"] for e in later.get_json()["events"]] == ["node up"]


def test_logs_of_every_node_and_of_one_node_from_an_offset(env):
    [pk] = make_jobs(env, 1)
    env.store.append_logs(pk, [(0, "master-0", 0, b"hello ")])
    env.store.append_logs(pk, [(0, "master-0", 6, b"world\n")])
    env.store.append_logs(pk, [(0, "worker-0", 0, b"w\xffx\n")])
    logs = env.client.get("/v1/projects/p/jobs/job_0/logs", headers=env.admin).get_json()["logs"]
    assert logs == [{"node": "master-0", "offset": 0, "nextOffset": 12, "text": "hello world\n"},
                    {"node": "worker-0", "offset": 0, "nextOffset": 4, "text": "w\ufffdx\n"}]
    one = env.client.get("/v1/projects/p/jobs/job_0/logs?node=master-0&offset=6", headers=env.admin)
    assert one.get_json()["logs"] == [{"node": "master-0", "offset": 6, "nextOffset": 12, "text": "world\n"}]


def test_a_character_split_between_reads_is_held_back_while_the_job_runs(env):
    [pk] = make_jobs(env, 1)
    snowman = "☃".encode()
    env.store.append_logs(pk, [(0, "master-0", 0, b"a" + snowman[:2])])
    first = env.client.get("/v1/projects/p/jobs/job_0/logs?node=master-0", headers=env.admin).get_json()["logs"][0]
    assert (first["text"], first["nextOffset"]) == ("a", 1)
    env.store.append_logs(pk, [(0, "master-0", 3, snowman[2:])])
    second = env.client.get("/v1/projects/p/jobs/job_0/logs?node=master-0&offset=1", headers=env.admin)
    assert second.get_json()["logs"][0]["text"] == "☃"


def test_follow_streams_until_the_job_has_ended(env):
    [pk] = make_jobs(env, 1)
    env.store.append_logs(pk, [(0, "master-0", 0, b"epoch 1\n")])

    def finish() -> None:
        time.sleep(0.1)
        env.store.append_logs(pk, [(0, "master-0", 8, b"epoch 2\n")])
        env.store.transition(pk, [JobState.QUEUED], JobState.FAILED)

    worker = threading.Thread(target=finish)
    worker.start()
    response = env.client.get("/v1/projects/p/jobs/job_0/logs?node=master-0&follow=true", headers=env.admin)
    worker.join()
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "epoch 1\nepoch 2\n"


def test_follow_log_joins_split_characters_and_flushes_at_the_end(env):
    [pk] = make_jobs(env, 1)
    snowman = "☃".encode()
    env.store.append_logs(pk, [(0, "n", 0, b"x" + snowman[:1])])
    env.store.transition(pk, [JobState.QUEUED], JobState.FAILED)
    watch = LogWatch(env.store, 0.01)
    assert "".join(follow_log(env.store, pk, "n", 0, watch)) == "x\ufffd"
    env.store.append_logs(pk, [(0, "n", 2, snowman[1:])])
    assert list(follow_log(env.store, pk, "n", 0, watch)) == ["x☃"]
    assert list(follow_log(env.store, pk, "n", 1, watch)) == ["☃"]


def test_many_idle_follows_cost_one_query_per_interval_and_all_wake_on_new_lines(env):
    [pk] = make_jobs(env, 1)
    env.store.transition(pk, [JobState.QUEUED], JobState.RUNNING)
    calls = collections.Counter()
    for name in ("log_marks", "read_log", "get_job"):
        original = getattr(env.store, name)
        setattr(env.store, name, lambda *a, _original=original, _name=name, **k: (
            calls.update([_name]), _original(*a, **k))[1])
    watch = LogWatch(env.store, 0.05)
    received = collections.defaultdict(str)

    def follow(index: int) -> None:
        for text in follow_log(env.store, pk, "n", 0, watch):
            received[index] += text

    threads = [threading.Thread(target=follow, args=(index,)) for index in range(50)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    calls.clear()
    time.sleep(1.0)  # quiet: about 20 looks of the watcher, and next to nothing from the followers
    assert 10 <= calls["log_marks"] <= 25 and calls["read_log"] == 0, calls
    env.store.append_logs(pk, [(0, "n", 0, b"epoch 1\n")])
    env.store.transition(pk, [JobState.RUNNING], JobState.SUCCEEDED)
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert set(received.values()) == {"epoch 1\n"} and len(received) == 50


@pytest.mark.parametrize("data, length", [(b"", 0), (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0),
                                          (b"a" + "€".encode()[:2], 1), (b"a" + "𝄞".encode()[:3], 1),
                                          ("𝄞".encode(), 4), (b"\x80\x80\x80\x80\x80", 5)])
def test_complete_utf8_length(data, length):
    assert complete_utf8_length(data) == length


def test_logs_follow_and_offset_need_a_node(env):
    make_jobs(env, 1)
    response = env.client.get("/v1/projects/p/jobs/job_0/logs?follow=true", headers=env.admin)
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT") == "follow: follow needs node"


# ---- authentication and roles ---------------------------------------------------------------------------


def test_missing_or_unknown_token_is_401(env):
    response = env.client.get("/v1/projects/p/jobs")
    assert_v1_error(response, 401, "UNAUTHENTICATED")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer cmlos_unknown", "Basic dXNlcjpwYXNz", "Bearer", "cmlos_x"):
        assert_v1_error(env.client.get("/v1/projects/p/jobs", headers={"Authorization": header}),
                        401, "UNAUTHENTICATED")


def test_token_of_another_project_sees_404_like_a_missing_job(env):
    make_jobs(env, 1)
    other = env.headers("q", "admin")
    existing = env.client.get("/v1/projects/p/jobs/job_0", headers=other)
    missing = env.client.get("/v1/projects/p/jobs/nope", headers=env.admin)
    assert assert_v1_error(existing, 404, "NOT_FOUND") == "projects/p/jobs/job_0 not found"
    assert missing.get_json()["error"]["message"] == "projects/p/jobs/nope not found"
    assert_v1_error(env.client.post("/v1/projects/p/jobs/job_0:cancel", headers=other, json={}), 404, "NOT_FOUND")
    assert env.store.find_job("p", "job_0").state == "QUEUED"


def test_viewer_reads_but_may_not_change(env):
    make_jobs(env, 1)
    packages = env.package_rows()
    viewer = env.headers("p", "viewer")
    assert env.client.get("/v1/projects/p/jobs/job_0", headers=viewer).status_code == 200
    assert_v1_error(env.client.post("/v1/projects/p/jobs/job_0:cancel", headers=viewer, json={}),
                    403, "PERMISSION_DENIED")
    assert_v1_error(env.upload(tar_bytes(SDIST), headers=viewer), 403, "PERMISSION_DENIED")
    assert env.store.find_job("p", "job_0").state == "QUEUED" and env.package_rows() == packages


def test_member_may_submit(env):
    env.admin = env.headers("p", "member")
    assert env.submit().status_code == 200


def test_role_rules():
    assert [role_allows(r, write=False) for r in ("admin", "member", "viewer", "guest")] == [True, True, True, False]
    assert [role_allows(r, write=True) for r in ("admin", "member", "viewer", "guest")] == [True, True, False, False]


def test_tokens_are_stored_hashed_and_validated(store):
    token = create_token(store, "p-1", "viewer", "ci")
    assert token.startswith("cmlos_") and len(token) > 40
    with store.session() as session:
        row = session.scalar(select(Token))
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest() and token not in row.token_hash
    for project, role in (("P", "viewer"), ("1p", "viewer"), ("p_1", "viewer"), ("a" * 63, "viewer"),
                          ("p", "owner")):
        with pytest.raises(ValueError):
            create_token(store, project, role)


# ---- errors, health, OpenAPI ----------------------------------------------------------------------------


def test_routing_errors_have_the_v1_body(env):
    assert_v1_error(env.client.get("/v1/projects/p/nothing", headers=env.admin), 404, "NOT_FOUND")
    assert_v1_error(env.client.get("/v1/projects/Bad_Project/jobs", headers=env.admin), 404, "NOT_FOUND")
    assert_v1_error(env.client.get("/v1/projects/p/jobs/bad-id", headers=env.admin), 404, "NOT_FOUND")
    response = env.client.delete("/v1/projects/p/jobs/job_0", headers=env.admin)
    assert_v1_error(response, 405, "UNIMPLEMENTED")
    assert "GET" in response.headers["Allow"]
    assert_v1_error(env.client.get("/v1/projects/p/jobs/j:cancel", headers=env.admin), 405, "UNIMPLEMENTED")


def test_a_body_over_the_limit_is_413(env):
    env.app.config["MAX_CONTENT_LENGTH"] = 100
    response = env.client.post("/v1/projects/p/jobs", headers=env.admin, json={"jobId": "x" * 200})
    assert_v1_error(response, 413, "RESOURCE_EXHAUSTED")


def test_unexpected_errors_are_500_without_internals(tmp_path, store):
    class Exploding(FakeTensorFlow):
        def runtime(self, runtime_version: str | None) -> str:
            raise RuntimeError("secret internals at /srv/db")

    env = Env(tmp_path, store, framework=Exploding())
    message = assert_v1_error(env.submit(), 500, "INTERNAL")
    assert message == "Internal error encountered." and "secret" not in message


def test_a_database_that_is_down_is_503(tmp_path):
    down = Store(f"sqlite:///{tmp_path}/missing-dir/db.sqlite")
    env_app = create_app(load_settings(environ={}, data_dir=str(tmp_path)), store=down,
                         artifacts=LocalArtifactStore(tmp_path), frameworks={}, start_job=lambda pk: None)
    client = env_app.test_client()
    assert_v1_error(client.get("/healthz"), 503, "UNAVAILABLE")
    response = client.get("/v1/projects/p/jobs", headers={"Authorization": "Bearer cmlos_x"})
    assert assert_v1_error(response, 503, "UNAVAILABLE") == "The service is temporarily unavailable; retry later."


def test_healthz_needs_no_token(env):
    response = env.client.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_document_is_public_valid_openapi_3_with_the_jobs_paths(env):
    response = env.client.get("/v1/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    assert set(paths["/v1/projects/{project}/jobs"]) >= {"get", "post"}
    assert "post" in paths["/v1/projects/{project}/jobs/{job}:cancel"]
    for path in ("/v1/projects/{project}/jobs/{job}", "/v1/projects/{project}/jobs/{job}/events",
                 "/v1/projects/{project}/jobs/{job}/logs", "/v1/projects/{project}/packages"):
        assert "get" in paths[path]
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    for path, item in paths.items():
        names = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            if method in methods:
                assert operation["responses"] and all(str(code).isdigit() or code == "default"
                                                      for code in operation["responses"])
    for ref in _refs(doc):
        assert ref.startswith("#/")
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert doc["security"] == [{"bearerAuth": []}]
    error = doc["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"error"}
    training_input = doc["components"]["schemas"]["TrainingInput"]
    assert set(training_input["required"]) == {"packageUris", "pythonModule"}
    assert "framework" in training_input["properties"]


# ---- project configuration ------------------------------------------------------------------------------


def test_get_config_lists_the_runtime_catalogue_and_machine_types(env):
    response = env.client.get("/v1/projects/p:getConfig", headers=env.headers("p", "viewer"))
    assert response.status_code == 200, response.get_json()
    config = response.get_json()
    assert {"framework": "TENSORFLOW", "runtimeVersion": "2.15", "default": True} in config["runtimes"]
    standard = next(m for m in config["machineTypes"] if m["name"] == "standard")
    assert standard["flavor"] and standard["gpus"] == 0
    assert any(m["gpus"] > 0 for m in config["machineTypes"])


def test_get_config_of_another_project_is_not_found(env):
    response = env.client.get("/v1/projects/other:getConfig", headers=env.admin)
    assert_v1_error(response, 404, "NOT_FOUND")
