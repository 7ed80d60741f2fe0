"""Models, versions, operations and online prediction through Flask's test client: a real Store on a
temporary SQLite file, fake framework plugins, a start_operation that records what it was asked to
start and a predict that answers what the test tells it to."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from cloudml_os.api.jobs import Condition
from cloudml_os.api.models import parse_list_filter, rpc_status, update_mask
from cloudml_os.app import create_app
from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.config import load_settings
from cloudml_os.errors import InvalidArgument, Unavailable
from cloudml_os.store import Store
from cloudml_os.store.models import Model, Operation, Replica, Version, VersionEvent
from tests.unit.test_api import Env, FakeTensorFlow, assert_v1_error
from tests.unit.test_api import migrated_db as migrated_db  # a fixture, as is store
from tests.unit.test_api import store as store

EXPORT = "store://p/jobs/train_1/model"


class FakeMXNet(FakeTensorFlow):
    name = "MXNET"
    runtimes = {"1.9": "mxnet-1.9"}
    default_runtime_version = "1.9"
    export_marker = "model-symbol.json"


class ServingEnv(Env):
    """:class:`Env` with a serving side: recorded operation starts and a scripted predict."""

    def __init__(self, tmp_path: Path, store: Store):
        super().__init__(tmp_path, store)
        self.operations: list[int] = []
        self.operation_queue_down = False
        self.predictions: list[tuple[int, str, bytes]] = []
        self.deadlines: list[float] = []
        self.answer: tuple[int, bytes] | Exception = (200, b'{"predictions": [[0.25, 0.75]]}')
        settings = load_settings(environ={}, data_dir=str(tmp_path))
        self.app = create_app(settings, store=store, artifacts=LocalArtifactStore(self.artifacts_root),
                              frameworks={"TENSORFLOW": FakeTensorFlow(), "MXNET": FakeMXNet()},
                              start_job=self.start_job, start_operation=self.start_operation, predict=self.predict)
        self.client = self.app.test_client()
        export = self.artifacts_root / "p" / "jobs" / "train_1" / "model"
        export.mkdir(parents=True)
        (export / "saved_model.pb").write_bytes(b"graph")

    def start_operation(self, operation_pk: int) -> None:
        if self.operation_queue_down:
            raise ConnectionError("broker down")
        self.operations.append(operation_pk)

    def predict(self, version_pk: int, model: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        self.predictions.append((version_pk, model, body))
        self.deadlines.append(deadline)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    # ---- requests ----

    def create_model(self, name: str = "census", **fields: Any) -> Any:
        return self.client.post("/v1/projects/p/models", headers=self.admin, json={"name": name, **fields})

    def create_version(self, name: str = "v1", model: str = "census", **fields: Any) -> Any:
        body = {"name": name, "deploymentUri": EXPORT, "runtimeVersion": "2.15", **fields}
        return self.client.post(f"/v1/projects/p/models/{model}/versions", headers=self.admin, json=body)

    def deployed(self, name: str = "v1", model: str = "census", state: str = "READY", **fields: Any) -> dict:
        """A version created through the API and moved to ``state`` (as the workflow would)."""
        if self.store_model(model) is None:
            assert self.create_model(model).status_code == 200
        response = self.create_version(name, model, **fields)
        assert response.status_code == 200, response.get_json()
        self.set_state(name, state, model)
        return response.get_json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(f"/v1/projects/p/{path}", headers=kwargs.pop("headers", self.admin), **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.post(f"/v1/projects/p/{path}", headers=kwargs.pop("headers", self.admin), **kwargs)

    def patch(self, path: str, mask: str, body: dict, **kwargs: Any) -> Any:
        return self.client.patch(f"/v1/projects/p/{path}", headers=kwargs.pop("headers", self.admin),
                                 query_string={"updateMask": mask}, json=body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.client.delete(f"/v1/projects/p/{path}", headers=kwargs.pop("headers", self.admin), **kwargs)

    # ---- the database, as the workflow sees it ----

    def store_model(self, name: str = "census") -> Model | None:
        with self.store.session() as session:
            return session.scalar(select(Model).where(Model.project == "p", Model.name == name))

    def version(self, name: str = "v1", model: str = "census") -> Version | None:
        with self.store.session() as session:
            return session.scalar(select(Version).join(Model, Model.id == Version.model_id)
                                  .where(Model.name == model, Version.name == name))

    def set_state(self, name: str, state: str, model: str = "census") -> None:
        with self.store.session() as session:
            session.execute(update(Version).where(Version.id == self.version(name, model).id).values(state=state))

    def operation(self, pk: int) -> Operation:
        with self.store.session() as session:
            return session.get(Operation, pk)

    def count(self, table: type) -> int:
        with self.store.session() as session:
            return session.scalar(select(func.count()).select_from(table))


@pytest.fixture
def env(tmp_path, store) -> ServingEnv:
    return ServingEnv(tmp_path, store)


def operation_id(operation: dict) -> str:
    match = re.fullmatch(r"projects/p/operations/([0-9a-f]{32})", operation["name"])
    assert match, operation["name"]
    return match.group(1)


# ---- models ---------------------------------------------------------------------------------------------


def test_create_model_returns_the_v1_model(env):
    response = env.create_model(description="census income", labels={"team": "ml"}, regions=["RegionOne"],
                                onlinePredictionLogging=False)
    assert response.status_code == 200, response.get_json()
    model = response.get_json()
    assert set(model) == {"name", "description", "labels", "etag"}
    assert (model["name"], model["description"], model["labels"]) == ("projects/p/models/census", "census income",
                                                                      {"team": "ml"})
    assert env.get("models/census").get_json() == model


@pytest.mark.parametrize("field", ["onlinePredictionLogging", "onlinePredictionConsoleLogging"])
def test_model_logging_flags_are_refused_rather_than_ignored(env, field):
    message = assert_v1_error(env.create_model(**{field: True}), 400, "INVALID_ARGUMENT")
    assert field in message and "requestLoggingConfig" in message
    assert env.get("models/census").status_code == 404


def test_duplicate_model_is_409(env):
    env.create_model()
    assert assert_v1_error(env.create_model(), 409, "ALREADY_EXISTS") == "projects/p/models/census already exists"


@pytest.mark.parametrize("body, fragment", [
    ({"name": "9lives"}, "name: must start with a letter"),
    ({"name": "a-b"}, "name: must start with a letter"),
    ({}, "name: Missing data"),
    ({"name": "m", "regions": ["a", "b"]}, "regions: at most one region"),
    ({"name": "m", "labels": {"Team": "x"}}, "labels.Team"),
    ({"name": "m", "colour": "red"}, "colour: Unknown field."),
])
def test_invalid_model_bodies_are_400(env, body, fragment):
    response = env.client.post("/v1/projects/p/models", headers=env.admin, json=body)
    assert fragment in assert_v1_error(response, 400, "INVALID_ARGUMENT")
    assert env.count(Model) == 0


def test_get_missing_model_is_404(env):
    assert assert_v1_error(env.get("models/nope"), 404, "NOT_FOUND") == "projects/p/models/nope not found"


def test_list_models_pages_and_filters_on_labels(env):
    for index in range(5):
        env.create_model(f"m{index}", labels={"team": "ml" if index % 2 else "data"})
    first = env.get("models?pageSize=2").get_json()
    assert [m["name"].rsplit("/", 1)[1] for m in first["models"]] == ["m0", "m1"]
    second = env.get("models", query_string={"pageSize": 2, "pageToken": first["nextPageToken"]}).get_json()
    third = env.get("models", query_string={"pageSize": 2, "pageToken": second["nextPageToken"]}).get_json()
    assert [m["name"][-2:] for m in second["models"] + third["models"]] == ["m2", "m3", "m4"]
    assert "nextPageToken" not in third
    filtered = env.get("models", query_string={"filter": 'labels.team="ml"'}).get_json()
    assert [m["name"][-2:] for m in filtered["models"]] == ["m1", "m3"]
    assert_v1_error(env.get("models", query_string={"filter": "state=READY"}), 400, "INVALID_ARGUMENT")
    assert_v1_error(env.get("models", query_string={"pageToken": "garbage"}), 400, "INVALID_ARGUMENT")


def test_patch_model_answers_a_done_operation_with_the_model(env):
    env.create_model(description="old")
    response = env.patch("models/census", "description,labels", {"description": "new", "labels": {"a": "b"}})
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    assert operation["done"] is True and operation["metadata"]["operationType"] == "UPDATE_MODEL"
    assert operation["response"]["@type"] == "type.googleapis.com/google.cloud.ml.v1.Model"
    assert (operation["response"]["description"], operation["response"]["labels"]) == ("new", {"a": "b"})
    assert env.get(f"operations/{operation_id(operation)}").get_json() == operation
    assert env.store_model().description == "new" and env.operations == []


def test_patch_model_checks_the_mask(env):
    env.create_model()
    message = assert_v1_error(env.patch("models/census", "name", {"name": "x"}), 400, "INVALID_ARGUMENT")
    assert message.startswith("updateMask: cannot update 'name'")
    message = assert_v1_error(env.patch("models/census", "description", {}), 400, "INVALID_ARGUMENT")
    assert message == "description: named in updateMask but missing from the body"
    response = env.client.patch("/v1/projects/p/models/census", headers=env.admin, json={"description": "x"})
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT").startswith("updateMask:")
    assert_v1_error(env.patch("models/nope", "description", {"description": "x"}), 404, "NOT_FOUND")


def test_patch_model_default_version_name(env):
    env.deployed("v1")
    env.deployed("v2")
    response = env.patch("models/census", "default_version.name",
                         {"defaultVersion": {"name": "projects/p/models/census/versions/v2"}})
    assert response.status_code == 200, response.get_json()
    assert env.get("models/census").get_json()["defaultVersion"]["name"] == "projects/p/models/census/versions/v2"


def test_delete_model_is_refused_while_it_has_versions(env):
    env.deployed("v1")
    message = assert_v1_error(env.delete("models/census"), 400, "FAILED_PRECONDITION")
    assert message == "projects/p/models/census still has versions (v1); delete them first"
    assert env.store_model() is not None


def test_delete_model_without_live_versions_is_a_done_operation_and_frees_the_name(env):
    env.deployed("v1", state="DELETED")
    response = env.delete("models/census")
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    assert operation["done"] is True and operation["metadata"]["operationType"] == "DELETE_MODEL"
    assert operation["metadata"]["modelName"] == "projects/p/models/census"
    assert operation["response"] == {"@type": "type.googleapis.com/google.protobuf.Empty"}
    assert_v1_error(env.get("models/census"), 404, "NOT_FOUND")
    assert env.get("models").get_json() == {"models": []}
    assert env.get(f"operations/{operation_id(operation)}").status_code == 200
    assert env.create_model().status_code == 200
    assert env.get("models/census").get_json()["name"] == "projects/p/models/census"
    assert env.count(Version) == 1  # the deleted version's row and history stay, under the old model's row


# ---- create version ----------------------------------------------------------------------------------------


def test_create_version_answers_an_operation_and_starts_it_once(env):
    env.create_model()
    response = env.create_version(description="first", labels={"stage": "prod"}, machineType="standard_gpu",
                                  manualScaling={"nodes": 2}, pythonVersion="3.11",
                                  healthCheck={"interval": 2, "timeout": 0.5, "rise": 1, "fall": 2})
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    version = env.version()
    assert env.operations == [env.operation(env.operations[0]).id]
    assert env.operation(env.operations[0]).version_id == version.id
    assert set(operation) == {"name", "metadata", "done"} and operation["done"] is False
    operation_id(operation)
    metadata = operation["metadata"]
    assert metadata["@type"] == "type.googleapis.com/google.cloud.ml.v1.OperationMetadata"
    assert (metadata["operationType"], metadata["modelName"]) == ("CREATE_VERSION", "projects/p/models/census")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", metadata["createTime"])
    assert metadata["isCancellationRequested"] is False and "endTime" not in metadata
    shown = metadata["version"]
    assert shown["name"] == "projects/p/models/census/versions/v1" and shown["state"] == "CREATING"
    assert (shown["isDefault"], shown["manualScaling"], shown["machineType"]) == (True, {"nodes": 2}, "standard_gpu")
    assert shown["healthCheck"] == {"interval": 2.0, "timeout": 0.5, "rise": 1, "fall": 2}
    assert (shown["framework"], shown["runtimeVersion"], shown["deploymentUri"]) == ("TENSORFLOW", "2.15", EXPORT)
    assert shown["replicas"] == [] and shown["labels"] == {"stage": "prod"}
    assert (version.state, version.replicas, version.health["fall"]) == ("CREATING", 2, 2)
    assert env.store_model().default_version == "v1"


def test_version_defaults(env):
    env.create_model()
    response = env.client.post("/v1/projects/p/models/census/versions", headers=env.admin,
                               json={"name": "v1", "deploymentUri": EXPORT})
    assert response.status_code == 200, response.get_json()
    version = env.version()
    assert (version.framework, version.runtime_version, version.machine_type, version.replicas) == (
        "TENSORFLOW", "2.15", "standard", 1)
    assert version.health == {"interval": 1.0, "timeout": 1.0, "rise": 2, "fall": 3}


def test_auto_scaling_starts_at_min_nodes_and_shows_its_policy_with_defaults(env):
    env.create_model()
    assert env.create_version(autoScaling={"minNodes": 3, "maxNodes": 10}).status_code == 200
    assert env.version().replicas == 3
    version = env.get("models/census/versions/v1").get_json()
    assert "manualScaling" not in version
    assert version["autoScaling"] == {"minNodes": 3, "maxNodes": 10, "stableWindow": 60.0, "panicWindow": 6.0,
                                      "metrics": [{"name": "REQUESTS_IN_FLIGHT", "target": 4.0}]}
    env.deployed("v2", autoScaling={"minNodes": 0, "metrics": [{"name": "CPU_USAGE", "target": 70}]})
    assert env.version("v2").replicas == 0 and env.version("v2").auto_scaling["maxNodes"] == 1
    gpu = env.create_version("v3", machineType="standard_gpu", autoScaling={
        "minNodes": 1, "maxNodes": 2, "metrics": [{"name": "GPU_DUTY_CYCLE", "target": 50}]})
    assert gpu.status_code == 200, gpu.get_json()
    assert env.version("v3").auto_scaling["metrics"] == [{"name": "GPU_DUTY_CYCLE", "target": 50.0}]


def test_patch_auto_scaling_lays_fields_over_the_policy_and_moves_the_count_into_the_bounds(env):
    env.deployed("v1", autoScaling={"minNodes": 1, "maxNodes": 4})
    response = env.patch("models/census/versions/v1", "autoScaling.maxNodes", {"autoScaling": {"maxNodes": 8}})
    assert response.get_json()["done"] is True, response.get_json()  # the count stays: done at once
    assert env.version().auto_scaling["maxNodes"] == 8 and env.version().auto_scaling["minNodes"] == 1
    response = env.patch("models/census/versions/v1", "autoScaling.minNodes", {"autoScaling": {"minNodes": 3}})
    assert response.get_json()["done"] is False and len(env.operations) == 2  # the create, then 1 → 3
    assert (env.version().state, env.version().replicas) == ("UPDATING", 3)
    env.set_state("v1", "READY")
    message = assert_v1_error(env.patch("models/census/versions/v1", "autoScaling.maxNodes",
                                        {"autoScaling": {"maxNodes": 2}}), 400, "INVALID_ARGUMENT")
    assert "maxNodes" in message and "at least minNodes" in message
    assert env.version().auto_scaling["maxNodes"] == 8  # unchanged
    response = env.patch("models/census/versions/v1", "manualScaling.nodes", {"manualScaling": {"nodes": 3}})
    assert response.status_code == 200 and env.version().auto_scaling is None
    version = env.get("models/census/versions/v1").get_json()
    assert version["manualScaling"] == {"nodes": 3} and "autoScaling" not in version
    both = env.patch("models/census/versions/v1", "manualScaling.nodes,autoScaling.minNodes",
                     {"manualScaling": {"nodes": 2}, "autoScaling": {"minNodes": 2}})
    assert "not both" in assert_v1_error(both, 400, "INVALID_ARGUMENT")


def test_only_the_first_version_becomes_the_default(env):
    env.deployed("v1")
    second = env.create_version("v2").get_json()
    assert second["metadata"]["version"]["isDefault"] is False
    model = env.get("models/census").get_json()
    assert model["defaultVersion"]["name"] == "projects/p/models/census/versions/v1"
    assert model["defaultVersion"]["isDefault"] is True and model["defaultVersion"]["state"] == "READY"


@pytest.mark.parametrize("fields, fragment", [
    ({"framework": "SCIKIT_LEARN"}, "framework: unknown framework 'SCIKIT_LEARN'; valid: MXNET, TENSORFLOW"),
    ({"runtimeVersion": "0.1"}, "runtimeVersion: TENSORFLOW has no runtime '0.1'; valid: 2.11, 2.15"),
    ({"framework": "MXNET", "runtimeVersion": "2.15"}, "runtimeVersion: MXNET has no runtime '2.15'; valid: 1.9"),
    ({"machineType": "mls1-c1-m2"}, "machineType: unknown machine type 'mls1-c1-m2'; valid: "),
    ({"deploymentUri": "store://q/jobs/train_1/model"}, "deploymentUri: 'store://q/jobs/train_1/model' is not"),
    ({"deploymentUri": "store://p/jobs/missing/model"}, "deploymentUri: 'store://p/jobs/missing/model' is not"),
    ({"deploymentUri": "gs://bucket/model"}, "deploymentUri: 'gs://bucket/model' is not"),
    ({"deploymentUri": "store://p/../q/x"}, "deploymentUri: "),
    ({"manualScaling": {"nodes": 0}}, "manualScaling.nodes: must be between 1 and 32"),
    ({"manualScaling": {"nodes": 33}}, "manualScaling.nodes: must be between 1 and 32"),
    ({"manualScaling": {}}, "manualScaling.nodes: Missing data"),
    ({"autoScaling": {"minNodes": -1}}, "autoScaling.minNodes: must be between 0 and 32"),
    ({"autoScaling": {"minNodes": 3, "maxNodes": 2}}, "autoScaling.maxNodes: must be at least minNodes"),
    ({"autoScaling": {"minNodes": 1, "metrics": [{"name": "GPU_DUTY_CYCLE", "target": 60}]}},
     "autoScaling.metrics: GPU_DUTY_CYCLE needs a machine type with GPUs; standard has none"),
    ({"autoScaling": {"minNodes": 1, "metrics": [{"name": "GPU_DUTY_CYCLE", "target": 160}]}},
     "autoScaling.metrics[0].target: a GPU_DUTY_CYCLE target is a percent"),
    ({"autoScaling": {"minNodes": 1, "metrics": [{"name": "QPS", "target": 60}]}},
     "autoScaling.metrics[0].name: must be REQUESTS_IN_FLIGHT"),
    ({"autoScaling": {"minNodes": 1, "metrics": [{"name": "CPU_USAGE", "target": 150}]}},
     "autoScaling.metrics[0].target: a CPU_USAGE target is a percent"),
    ({"autoScaling": {"minNodes": 1, "metrics": [{"name": "CPU_USAGE", "target": 50}] * 2}},
     "autoScaling.metrics: each metric at most once"),
    ({"autoScaling": {"minNodes": 1, "stableWindow": 10, "panicWindow": 20}},
     "autoScaling.panicWindow: must be at most stableWindow"),
    ({"autoScaling": {"minNodes": 1, "stableWindow": 2}}, "autoScaling.stableWindow: must be from 6 to 3600"),
    ({"manualScaling": {"nodes": 1}, "autoScaling": {"minNodes": 1}}, "autoScaling: give manualScaling or"),
    ({"healthCheck": {"interval": 0}}, "healthCheck.interval: must be more than 0"),
    ({"healthCheck": {"interval": 1, "timeout": 2}}, "healthCheck.timeout: must not exceed interval"),
    ({"healthCheck": {"timeout": -1}}, "healthCheck.timeout: must be more than 0"),
    ({"healthCheck": {"rise": 0}}, "healthCheck.rise: must be between 1 and 100"),
    ({"healthCheck": {"fall": 0}}, "healthCheck.fall: must be between 1 and 100"),
    ({"healthCheck": {"interval": "soon"}}, "healthCheck.interval: Not a valid number."),
    ({"healthCheck": {"port": 80}}, "healthCheck.port: Unknown field."),
    ({"name": "1st"}, "name: must start with a letter"),
    ({"name": "v-1"}, "name: must start with a letter"),
    ({"name": "v" * 129}, "name: must start with a letter"),
    ({"predictionClass": "my.Predictor"}, "predictionClass: not supported"),
    ({"container": {"image": "x"}}, "container: not supported"),
    ({"labels": {"Stage": "x"}}, "labels.Stage"),
])
def test_invalid_versions_are_400_and_create_nothing(env, fields, fragment):
    env.create_model()
    message = assert_v1_error(env.create_version(**fields), 400, "INVALID_ARGUMENT")
    assert fragment in message
    assert env.operations == [] and env.count(Version) == 0 and env.count(Operation) == 0
    assert env.store_model().default_version is None


def test_a_fetched_version_can_be_sent_back_as_a_new_one(env):
    env.deployed("v1")
    fetched = env.get("models/census/versions/v1").get_json()
    response = env.client.post("/v1/projects/p/models/census/versions", headers=env.admin,
                               json={**fetched, "name": "v2"})
    assert response.status_code == 200, response.get_json()
    assert env.version("v2").replicas == 1


def test_version_of_a_missing_model_is_404(env):
    message = assert_v1_error(env.create_version(model="nope"), 404, "NOT_FOUND")
    assert message == "projects/p/models/nope not found"


def test_duplicate_version_is_409(env):
    env.deployed("v1")
    message = assert_v1_error(env.create_version("v1"), 409, "ALREADY_EXISTS")
    assert message == "projects/p/models/census/versions/v1 already exists"
    assert len(env.operations) == 1


def test_a_deleted_versions_name_can_be_used_again(env):
    env.deployed("v1", state="DELETED")
    old = env.version()
    with env.store.session() as session:
        session.add(Replica(version_id=old.id, name="replica-0", state="DELETED"))
    assert_v1_error(env.get("models/census/versions/v1"), 404, "NOT_FOUND")
    response = env.create_version("v1")
    assert response.status_code == 200, response.get_json()
    assert env.version().id != old.id and env.version().state == "CREATING"
    assert response.get_json()["metadata"]["version"]["isDefault"] is True
    with env.store.session() as session:  # the old row and its history stay, under another name
        assert session.get(Version, old.id).name == f"~{old.id}~v1"
    assert env.operation(env.operations[0]).version_id == old.id
    listed = env.get("models/census/versions").get_json()["versions"]
    assert [v["name"] for v in listed] == ["projects/p/models/census/versions/v1"]


def test_an_operation_queue_that_is_down_is_503_and_leaves_nothing(env):
    env.create_model()
    env.operation_queue_down = True
    message = assert_v1_error(env.create_version(), 503, "UNAVAILABLE")
    assert "the version was not created" in message
    assert env.count(Version) == 0 and env.count(Operation) == 0 and env.count(VersionEvent) == 0
    assert env.store_model().default_version is None
    env.operation_queue_down = False
    assert env.create_version().status_code == 200


def test_an_app_without_an_operation_queue_or_router_answers_503(tmp_path, store):
    env = ServingEnv(tmp_path, store)
    settings = load_settings(environ={}, data_dir=str(tmp_path))
    env.app = create_app(settings, store=store, artifacts=LocalArtifactStore(env.artifacts_root),
                         frameworks={"TENSORFLOW": FakeTensorFlow()}, start_job=env.start_job)
    env.client = env.app.test_client()
    env.create_model()
    assert_v1_error(env.create_version(), 503, "UNAVAILABLE")
    with store.session() as session:
        session.add(Version(model_id=env.store_model().id, name="v1", state="READY", deployment_uri=EXPORT,
                            framework="TENSORFLOW", runtime_version="2.15", machine_type="standard"))
    response = env.post("models/census/versions/v1:predict", json={"instances": [1]})
    assert assert_v1_error(response, 503, "UNAVAILABLE") == "Online prediction is not configured on this server."


# ---- read versions ----------------------------------------------------------------------------------------


def test_get_version_shows_its_live_replicas(env):
    env.deployed("v1")
    version = env.version()
    with env.store.session() as session:
        session.add_all([
            Replica(version_id=version.id, name="replica-0", state="READY", healthy=True,
                    address="127.2.0.5", port=31000),
            Replica(version_id=version.id, name="replica-1", state="DELETED"),
            Replica(version_id=version.id, name="replica-2", state="PROVISIONING"),
        ])
    shown = env.get("models/census/versions/v1").get_json()
    assert shown["replicas"] == [
        {"name": "replica-0", "state": "READY", "healthy": True, "address": "127.2.0.5:31000"},
        {"name": "replica-2", "state": "PROVISIONING", "healthy": False},
    ]
    assert shown["state"] == "READY" and isinstance(shown["etag"], str) and "errorMessage" not in shown
    assert_v1_error(env.get("models/census/versions/v9"), 404, "NOT_FOUND")
    assert_v1_error(env.get("models/nope/versions/v1"), 404, "NOT_FOUND")


def test_list_versions_pages_and_filters_on_state(env):
    for name in ("a", "b", "c"):
        env.deployed(name)
    env.set_state("b", "FAILED")
    env.set_state("c", "DELETED")
    names = [v["name"].rsplit("/", 1)[1] for v in env.get("models/census/versions").get_json()["versions"]]
    assert names == ["a", "b"]
    first = env.get("models/census/versions?pageSize=1").get_json()
    assert len(first["versions"]) == 1 and first["nextPageToken"]
    failed = env.get("models/census/versions", query_string={"filter": "state=FAILED"}).get_json()
    assert [v["name"][-1] for v in failed["versions"]] == ["b"]
    assert_v1_error(env.get("models/census/versions", query_string={"filter": "state=RUNNING"}),
                    400, "INVALID_ARGUMENT")


def test_version_events_and_after(env):
    env.deployed("v1")
    version = env.version()
    with env.store.session() as session:
        session.add(VersionEvent(version_id=version.id, kind="EJECTED", replica="replica-0", message="gone"))
    events = env.get("models/census/versions/v1/events").get_json()["events"]
    assert [e["kind"] for e in events] == ["STATE", "EJECTED"]
    assert "replica" not in events[0] and events[1]["replica"] == "replica-0"
    assert set(events[1]) == {"id", "time", "kind", "replica", "message"}
    later = env.get(f"models/census/versions/v1/events?after={events[0]['id']}").get_json()["events"]
    assert [e["message"] for e in later] == ["gone"]


# ---- operations ---------------------------------------------------------------------------------------------


def test_get_and_list_operations(env):
    env.create_model()
    created = env.create_version().get_json()
    fetched = env.get(f"operations/{operation_id(created)}")
    assert fetched.status_code == 200 and fetched.get_json() == created
    env.patch("models/census", "description", {"description": "x"})
    listed = env.get("operations").get_json()["operations"]
    assert [o["metadata"]["operationType"] for o in listed] == ["UPDATE_MODEL", "CREATE_VERSION"]
    pending = env.get("operations", query_string={"filter": "done=false"}).get_json()["operations"]
    assert [o["name"] for o in pending] == [created["name"]]
    kinds = env.get("operations", query_string={"filter": "operationType!=CREATE_VERSION"}).get_json()
    assert [o["metadata"]["operationType"] for o in kinds["operations"]] == ["UPDATE_MODEL"]
    paged = env.get("operations?pageSize=1").get_json()
    assert len(paged["operations"]) == 1 and paged["nextPageToken"]
    assert_v1_error(env.get("operations", query_string={"filter": "done=maybe"}), 400, "INVALID_ARGUMENT")
    assert_v1_error(env.get("operations/0123abcd"), 404, "NOT_FOUND")


def test_a_finished_operation_shows_its_result_or_error(env):
    env.create_model()
    created = env.create_version().get_json()
    pk = env.operations[0]
    with env.store.session() as session:
        session.execute(update(Operation).where(Operation.id == pk).values(done=True))
        session.execute(update(Version).values(state="READY"))
    done = env.get(f"operations/{operation_id(created)}").get_json()
    assert done["done"] is True and "error" not in done
    assert done["response"]["@type"] == "type.googleapis.com/google.cloud.ml.v1.Version"
    assert done["response"]["state"] == "READY" and done["response"]["name"].endswith("/versions/v1")
    with env.store.session() as session:
        session.execute(update(Operation).where(Operation.id == pk).values(
            error={"code": 13, "message": "replica-0: the model server exited with code 1"}))
    failed = env.get(f"operations/{operation_id(created)}").get_json()
    assert failed["error"] == {"code": 13, "message": "replica-0: the model server exited with code 1",
                               "status": "INTERNAL"}
    assert "response" not in failed


def test_cancel_an_operation_records_the_request(env):
    env.create_model()
    created = env.create_version().get_json()
    response = env.post(f"operations/{operation_id(created)}:cancel")
    assert (response.status_code, response.get_json()) == (200, {})
    assert env.operation(env.operations[0]).cancel_requested is True
    assert env.get(f"operations/{operation_id(created)}").get_json()["metadata"]["isCancellationRequested"] is True
    assert env.post(f"operations/{operation_id(created)}:cancel").status_code == 200  # asking again is fine
    events = env.get("models/census/versions/v1/events").get_json()["events"]
    assert events[-1]["message"] == "Cancellation of CREATE_VERSION requested"


def test_cancel_a_done_or_delete_operation_is_a_failed_precondition(env):
    env.create_model()
    done = env.patch("models/census", "description", {"description": "x"}).get_json()
    message = assert_v1_error(env.post(f"operations/{operation_id(done)}:cancel"), 400, "FAILED_PRECONDITION")
    assert message.endswith("is already done")
    env.deployed("v1")
    deleting = env.delete("models/census/versions/v1").get_json()
    assert_v1_error(env.post(f"operations/{operation_id(deleting)}:cancel"), 400, "FAILED_PRECONDITION")
    assert_v1_error(env.post("operations/nope:cancel"), 404, "NOT_FOUND")


@pytest.mark.parametrize("error, expected", [
    ({"code": 13, "message": "boom"}, {"code": 13, "message": "boom", "status": "INTERNAL"}),
    ({"code": "CANCELLED", "message": "cancelled"}, {"code": 1, "message": "cancelled", "status": "CANCELLED"}),
    ({"message": "x"}, {"code": 13, "message": "x", "status": "INTERNAL"}),
    ({"code": 99}, {"code": 99, "message": "", "status": "UNKNOWN"}),
])
def test_rpc_status(error, expected):
    assert rpc_status(error) == expected


# ---- delete, scale, set default ---------------------------------------------------------------------------------


def test_delete_version_answers_an_operation_and_marks_it_deleting(env):
    env.deployed("v1")
    response = env.delete("models/census/versions/v1")
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    assert operation["metadata"]["operationType"] == "DELETE_VERSION" and operation["done"] is False
    assert operation["metadata"]["version"]["state"] == "DELETING"
    assert env.version().state == "DELETING" and len(env.operations) == 2
    assert env.store_model().default_version is None  # it was the last one
    again = env.delete("models/census/versions/v1")
    assert again.get_json()["name"] == operation["name"] and len(env.operations) == 2


def test_the_default_version_cannot_be_deleted_while_others_exist(env):
    env.deployed("v1")
    env.deployed("v2")
    message = assert_v1_error(env.delete("models/census/versions/v1"), 400, "FAILED_PRECONDITION")
    assert "is the default version of projects/p/models/census" in message
    assert env.delete("models/census/versions/v2").status_code == 200
    assert env.version("v1").state == "READY"


@pytest.mark.parametrize("state", ["CREATING", "UPDATING"])
def test_a_version_with_an_operation_in_progress_cannot_be_deleted(env, state):
    env.deployed("v1", state=state)
    message = assert_v1_error(env.delete("models/census/versions/v1"), 400, "FAILED_PRECONDITION")
    assert f"cannot be deleted in state {state}" in message


def test_a_failed_version_can_be_deleted_and_a_queue_failure_restores_it(env):
    env.deployed("v1", state="FAILED")
    env.operation_queue_down = True
    assert_v1_error(env.delete("models/census/versions/v1"), 503, "UNAVAILABLE")
    assert env.version().state == "FAILED" and env.store_model().default_version == "v1"
    assert env.count(Operation) == 1
    env.operation_queue_down = False
    assert env.delete("models/census/versions/v1").status_code == 200


def test_scale_with_update_mask(env):
    env.deployed("v1")
    response = env.patch("models/census/versions/v1", "manualScaling.nodes", {"manualScaling": {"nodes": 4}})
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    assert operation["metadata"]["operationType"] == "UPDATE_VERSION" and operation["done"] is False
    assert operation["metadata"]["version"]["manualScaling"] == {"nodes": 4}
    version = env.version()
    assert (version.state, version.replicas) == ("UPDATING", 4)
    assert env.operation(env.operations[-1]).kind == "UPDATE_VERSION" and len(env.operations) == 2
    message = assert_v1_error(env.patch("models/census/versions/v1", "manual_scaling.nodes",
                                        {"manualScaling": {"nodes": 2}}), 400, "FAILED_PRECONDITION")
    assert message == "projects/p/models/census/versions/v1 cannot be scaled in state UPDATING; " \
                      "wait for its operation to finish"


def test_scale_checks_nodes_and_restores_the_version_when_the_queue_is_down(env):
    env.deployed("v1")
    assert_v1_error(env.patch("models/census/versions/v1", "manualScaling.nodes", {"manualScaling": {"nodes": 0}}),
                    400, "INVALID_ARGUMENT")
    env.operation_queue_down = True
    assert_v1_error(env.patch("models/census/versions/v1", "manualScaling.nodes,description",
                              {"manualScaling": {"nodes": 3}, "description": "x"}), 503, "UNAVAILABLE")
    version = env.version()
    assert (version.state, version.replicas, version.description) == ("READY", 1, "")


def test_patch_description_and_labels_is_done_at_once(env):
    env.deployed("v1", state="CREATING")
    response = env.patch("models/census/versions/v1", "description,labels",
                         {"description": "d", "labels": {"a": "b"}, "manualScaling": {"nodes": 9}})
    assert response.status_code == 200, response.get_json()
    operation = response.get_json()
    assert operation["done"] is True and operation["response"]["description"] == "d"
    assert (env.version().description, env.version().replicas) == ("d", 1)  # unmasked fields are ignored
    assert len(env.operations) == 1
    assert_v1_error(env.patch("models/census/versions/v1", "deploymentUri", {"deploymentUri": EXPORT}),
                    400, "INVALID_ARGUMENT")


def test_set_default(env):
    env.deployed("v1")
    env.deployed("v2")
    response = env.post("models/census/versions/v2:setDefault", json={})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["isDefault"] is True and response.get_json()["name"].endswith("/v2")
    assert env.get("models/census/versions/v1").get_json()["isDefault"] is False
    assert env.post("models/census/versions/v1:setDefault").status_code == 200  # no body is fine too
    env.set_state("v2", "FAILED")
    assert_v1_error(env.post("models/census/versions/v2:setDefault", json={}), 400, "FAILED_PRECONDITION")
    assert_v1_error(env.post("models/census/versions/v9:setDefault", json={}), 404, "NOT_FOUND")


def test_a_traffic_split_names_the_default_by_its_largest_share_and_set_default_is_its_100_case(env):
    env.deployed("v1")
    env.deployed("v2")
    assert env.get("models/census").get_json()["trafficSplit"] == {"v1": 100}
    response = env.patch("models/census", "trafficSplit", {"trafficSplit": {"v1": 30, "v2": 70}})
    assert response.status_code == 200, response.get_json()
    model = env.get("models/census").get_json()
    assert model["trafficSplit"] == {"v1": 30, "v2": 70} and model["defaultVersion"]["name"].endswith("/v2")
    assert env.patch("models/census", "trafficSplit", {"trafficSplit": {"v1": 0, "v2": 100}}).status_code == 200
    assert env.get("models/census").get_json()["trafficSplit"] == {"v2": 100}
    assert env.patch("models/census", "trafficSplit", {"trafficSplit": {"v1": 50, "v2": 50}}).status_code == 200
    assert env.get("models/census").get_json()["defaultVersion"]["name"].endswith("/v2")  # the default stays
    assert env.post("models/census/versions/v1:setDefault", json={}).status_code == 200
    assert env.get("models/census").get_json()["trafficSplit"] == {"v1": 100}


@pytest.mark.parametrize("split, status, message", [
    ({"v1": 90, "v2": 20}, "INVALID_ARGUMENT", "trafficSplit: the percents sum to 110, not 100"),
    ({}, "INVALID_ARGUMENT", "trafficSplit: give at least one version and its percent"),
    ({"v1": -10, "v2": 110}, "INVALID_ARGUMENT", "trafficSplit.v1.value: Must be greater than or equal to 0"),
    ({"v1": 50.5, "v2": 49.5}, "INVALID_ARGUMENT", "trafficSplit.v1.value: Not a valid integer."),
    ({"v1": 50, "v9": 50}, "INVALID_ARGUMENT", "trafficSplit: 'v9' is not a version of projects/p/models/census"),
    ({"v1": 50, "broken": 50}, "FAILED_PRECONDITION",
     "projects/p/models/census/versions/broken cannot be the default version in state FAILED"),
])
def test_a_bad_traffic_split_is_a_400_naming_it_and_changes_nothing(env, split, status, message):
    env.deployed("v1")
    env.deployed("broken", state="FAILED")
    response = env.patch("models/census", "trafficSplit", {"trafficSplit": split})
    assert message in assert_v1_error(response, 400, status)
    assert env.get("models/census").get_json()["trafficSplit"] == {"v1": 100}
    both = env.patch("models/census", "trafficSplit,defaultVersion.name",
                     {"trafficSplit": {"v1": 100}, "defaultVersion": {"name": "v1"}})
    assert assert_v1_error(both, 400, "INVALID_ARGUMENT").startswith("updateMask: give defaultVersion.name or")


def test_a_version_with_a_share_cannot_be_deleted_and_one_without_can(env):
    env.deployed("v1")
    env.deployed("v2")
    env.deployed("v3")
    shares = {"v1": 80, "v2": 20, "v3": 0}
    assert env.patch("models/census", "trafficSplit", {"trafficSplit": shares}).status_code == 200
    message = assert_v1_error(env.delete("models/census/versions/v2"), 400, "FAILED_PRECONDITION")
    assert message.startswith("projects/p/models/census/versions/v2 answers 20 % of projects/p/models/census's")
    assert env.delete("models/census/versions/v3").status_code == 200


def test_predict_on_the_model_follows_the_split_and_a_request_id_sticks_to_one_version(env):
    env.deployed("v1")
    env.deployed("v2")
    env.patch("models/census", "trafficSplit", {"trafficSplit": {"v1": 90, "v2": 10}})
    answered = [env.post("models/census:predict", json={"instances": [1]}).headers["X-Model-Version"]
                for _ in range(1000)]
    # 10 % of 1000: 100 expected, standard deviation 9.5; 5 of them either way is one chance in a million.
    assert 52 <= answered.count("v2") <= 148 and answered.count("v1") + answered.count("v2") == 1000
    sticky = {env.post("models/census:predict", json={"instances": [1]},
                       headers={**env.admin, "X-Request-Id": "user-42"}).headers["X-Model-Version"] for _ in range(50)}
    assert len(sticky) == 1
    assert env.post("models/census/versions/v2:predict", json={"instances": [1]}).headers["X-Model-Version"] == "v2"


# ---- prediction ------------------------------------------------------------------------------------------------


def test_predict_passes_the_body_through_both_ways(env):
    env.deployed("v1")
    body = b'{"instances": [{"x": [1, 2]}], "signature_name": "serving_default"}'
    response = env.post("models/census/versions/v1:predict", data=body, content_type="application/json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_data() == b'{"predictions": [[0.25, 0.75]]}'
    assert env.predictions == [(env.version().id, "census", body)]
    assert env.post("models/census:predict", json={"instances": [1]}).get_json() == {"predictions": [[0.25, 0.75]]}
    assert env.predictions[-1][0] == env.version().id


def test_predict_uses_the_default_version(env):
    env.deployed("v1")
    env.deployed("v2")
    env.post("models/census/versions/v2:setDefault", json={})
    env.post("models/census:predict", json={"instances": [1]})
    assert env.predictions[-1][0] == env.version("v2").id


def test_a_prediction_has_the_versions_deadline_unless_the_request_asks_for_its_own(env):
    env.deployed("v1")
    assert env.get("models/census/versions/v1").get_json()["predictionDeadline"] == 5.0
    env.post("models/census:predict", json={"instances": [1]})
    response = env.patch("models/census/versions/v1", "predictionDeadline", {"predictionDeadline": 12.5})
    assert response.status_code == 200, response.get_json()
    env.post("models/census:predict", json={"instances": [1]})
    env.post("models/census:predict", json={"instances": [1]}, headers={**env.admin, "X-Prediction-Deadline": "0.5"})
    assert env.deadlines == [5.0, 12.5, 0.5]
    for bad in ("0", "601", "soon", "nan"):
        response = env.post("models/census:predict", json={"instances": [1]},
                            headers={**env.admin, "X-Prediction-Deadline": bad})
        assert assert_v1_error(response, 400, "INVALID_ARGUMENT").startswith("X-Prediction-Deadline:")
    assert len(env.deadlines) == 3
    message = assert_v1_error(env.create_version("v2", predictionDeadline=0), 400, "INVALID_ARGUMENT")
    assert message.startswith("predictionDeadline: must be from 0.1 to 600 seconds")


class RecordedLog:
    """A request log that keeps what it is given."""

    def __init__(self):
        self.records = []

    def start(self):
        pass

    def record(self, *fields):
        self.records.append(fields)
        return True


def test_sampled_predictions_go_to_the_request_log_with_the_id_their_answer_carries(env):
    import dataclasses

    from cloudml_os.api import EXTENSION

    log = RecordedLog()
    env.app.extensions[EXTENSION] = dataclasses.replace(env.app.extensions[EXTENSION], request_log=log)
    env.deployed("v1", requestLoggingConfig={"samplingPercentage": 1})
    assert env.get("models/census/versions/v1").get_json()["requestLoggingConfig"] == {"samplingPercentage": 1.0}
    body = b'{"instances": [[1]]}'
    response = env.post("models/census:predict", data=body, content_type="application/json",
                        headers={**env.admin, "X-Request-Id": "order-7"})
    assert response.headers["X-Request-Id"] == "order-7"
    generated = env.post("models/census:predict", json={"instances": [[2]]}).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert log.records[0] == ("p", "census", "v1", "order-7", body, b'{"predictions": [[0.25, 0.75]]}')
    assert [r[3] for r in log.records] == ["order-7", generated]
    response = env.patch("models/census/versions/v1", "requestLoggingConfig",
                         {"requestLoggingConfig": {"samplingPercentage": 0}})
    assert response.status_code == 200, response.get_json()
    env.post("models/census:predict", json={"instances": [[3]]})
    assert len(log.records) == 2
    env.answer = (400, b'{"error": "bad"}')
    env.patch("models/census/versions/v1", "requestLoggingConfig", {"requestLoggingConfig": {"samplingPercentage": 1}})
    env.post("models/census:predict", json={"instances": [[4]]})
    assert len(log.records) == 2  # only answered predictions are logged


@pytest.mark.parametrize("config, message", [
    ({"samplingPercentage": 1.5}, "requestLoggingConfig.samplingPercentage: Must be greater than or equal to 0"),
    ({}, "requestLoggingConfig.samplingPercentage: Missing data for required field."),
    ({"samplingPercentage": 0.5, "bigqueryTableName": "p.d.t"},
     "requestLoggingConfig.bigqueryTableName: not supported: request logs are JSON lines in the project's store"),
])
def test_a_bad_request_logging_config_is_a_400_naming_it(env, config, message):
    assert message in assert_v1_error(env.create_version(requestLoggingConfig=config), 400, "INVALID_ARGUMENT")


def test_a_model_error_is_a_v1_400_with_its_message(env):
    env.deployed("v1")
    env.answer = (400, json.dumps({"error": "Prediction failed: expected 4 features, got 2"}).encode())
    response = env.post("models/census/versions/v1:predict", json={"instances": [[1, 2]]})
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT") == "Prediction failed: expected 4 features, got 2"
    env.answer = (422, b"not json")
    response = env.post("models/census/versions/v1:predict", json={"instances": [[1, 2]]})
    assert assert_v1_error(response, 400, "INVALID_ARGUMENT") == "The model rejected the request (HTTP 422)."


@pytest.mark.parametrize("answer", [(500, b'{"error": "Traceback at /srv/model.py"}'), (502, b""), (302, b"")])
def test_a_replica_failure_is_503_without_its_details(env, answer):
    env.deployed("v1")
    env.answer = answer
    message = assert_v1_error(env.post("models/census:predict", json={"instances": [1]}), 503, "UNAVAILABLE")
    assert "Traceback" not in message and "/srv" not in message


def test_no_replica_is_503(env):
    env.deployed("v1")
    env.answer = Unavailable("No replica of this version can answer now")
    response = env.post("models/census:predict", json={"instances": [1]})
    assert assert_v1_error(response, 503, "UNAVAILABLE") == "No replica of this version can answer now"


@pytest.mark.parametrize("state", ["CREATING", "FAILED", "DELETING"])
def test_predict_with_a_version_that_is_not_ready_is_400(env, state):
    env.deployed("v1", state=state)
    message = assert_v1_error(env.post("models/census/versions/v1:predict", json={"instances": [1]}),
                              400, "FAILED_PRECONDITION")
    assert message == f"projects/p/models/census/versions/v1 is not ready (state {state})"
    assert env.predictions == []


def test_predict_while_scaling_is_served(env):
    env.deployed("v1", state="UPDATING")
    assert env.post("models/census:predict", json={"instances": [1]}).status_code == 200


def test_predict_unknown_model_or_version_is_404_and_no_default_is_400(env):
    message = assert_v1_error(env.post("models/nope:predict", json={"instances": [1]}), 404, "NOT_FOUND")
    assert message == "projects/p/models/nope not found"
    env.create_model()
    assert_v1_error(env.post("models/census/versions/v9:predict", json={"instances": [1]}), 404, "NOT_FOUND")
    message = assert_v1_error(env.post("models/census:predict", json={"instances": [1]}), 400, "FAILED_PRECONDITION")
    assert message.startswith("projects/p/models/census has no default version")
    env.deployed("v1", state="DELETED")
    assert_v1_error(env.post("models/census/versions/v1:predict", json={"instances": [1]}), 404, "NOT_FOUND")
    assert env.predictions == []


@pytest.mark.parametrize("kwargs, fragment", [
    ({"json": {}}, "instances: Missing data for required field."),
    ({"json": {"instances": []}}, "instances: must hold at least one instance"),
    ({"json": {"instances": {"x": 1}}}, "instances: Not a valid list."),
    ({"json": [1, 2]}, ""),
    ({"data": "{nope", "content_type": "application/json"}, "Invalid JSON payload"),
])
def test_predict_bodies_must_be_json_with_instances(env, kwargs, fragment):
    env.deployed("v1")
    message = assert_v1_error(env.post("models/census/versions/v1:predict", **kwargs), 400, "INVALID_ARGUMENT")
    assert fragment in message
    assert env.predictions == []


# ---- authorization, routing, OpenAPI -------------------------------------------------------------------------


def test_another_projects_token_sees_404_everywhere(env):
    created = env.deployed("v1")
    other = env.headers("q", "admin")
    for method, path, body in [
        ("GET", "models", None), ("GET", "models/census", None), ("POST", "models", {"name": "m"}),
        ("PATCH", "models/census?updateMask=description", {"description": "x"}), ("DELETE", "models/census", None),
        ("GET", "models/census/versions", None), ("GET", "models/census/versions/v1", None),
        ("POST", "models/census/versions", {"name": "v2", "deploymentUri": EXPORT}),
        ("DELETE", "models/census/versions/v1", None), ("POST", "models/census/versions/v1:setDefault", {}),
        ("GET", "models/census/versions/v1/events", None),
        ("POST", "models/census:predict", {"instances": [1]}),
        ("POST", "models/census/versions/v1:predict", {"instances": [1]}),
        ("GET", "operations", None), ("GET", f"operations/{operation_id(created)}", None),
        ("POST", f"operations/{operation_id(created)}:cancel", None),
    ]:
        response = env.client.open(f"/v1/projects/p/{path}", method=method, headers=other, json=body)
        assert_v1_error(response, 404, "NOT_FOUND")
    assert env.predictions == [] and len(env.operations) == 1 and env.version().state == "READY"


def test_viewer_reads_but_may_not_change_or_predict(env):
    env.deployed("v1")
    viewer = env.headers("p", "viewer")
    for path in ("models", "models/census", "models/census/versions/v1", "operations"):
        assert env.get(path, headers=viewer).status_code == 200
    assert_v1_error(env.post("models", headers=viewer, json={"name": "m2"}), 403, "PERMISSION_DENIED")
    assert_v1_error(env.post("models/census:predict", headers=viewer, json={"instances": [1]}),
                    403, "PERMISSION_DENIED")
    assert_v1_error(env.delete("models/census/versions/v1", headers=viewer), 403, "PERMISSION_DENIED")
    assert_v1_error(env.patch("models/census/versions/v1", "manualScaling.nodes", {"manualScaling": {"nodes": 2}},
                              headers=viewer), 403, "PERMISSION_DENIED")
    assert env.predictions == [] and env.version().state == "READY" and env.store_model("m2") is None


def test_member_may_deploy_and_predict(env):
    env.admin = env.headers("p", "member")
    env.deployed("v1")
    assert env.post("models/census:predict", json={"instances": [1]}).status_code == 200


def test_routing_of_colon_verbs(env):
    env.deployed("v1")
    assert_v1_error(env.get("models/census:predict"), 405, "UNIMPLEMENTED")
    assert_v1_error(env.post("models/census:explain", json={}), 404, "NOT_FOUND")
    assert_v1_error(env.client.put("/v1/projects/p/models/census", headers=env.admin, json={}), 405, "UNIMPLEMENTED")


def test_openapi_document_has_the_serving_paths(env):
    doc = env.client.get("/v1/openapi.json").get_json()
    paths = doc["paths"]
    base = "/v1/projects/{project}"
    assert set(paths[f"{base}/models"]) >= {"get", "post"}
    assert set(paths[f"{base}/models/{{model}}"]) >= {"get", "patch", "delete"}
    assert set(paths[f"{base}/models/{{model}}/versions"]) >= {"get", "post"}
    assert set(paths[f"{base}/models/{{model}}/versions/{{version}}"]) >= {"get", "patch", "delete"}
    for path in (f"{base}/models/{{model}}:predict", f"{base}/models/{{model}}/versions/{{version}}:predict",
                 f"{base}/models/{{model}}/versions/{{version}}:setDefault",
                 f"{base}/operations/{{operation}}:cancel"):
        assert "post" in paths[path]
    for path in (f"{base}/operations", f"{base}/operations/{{operation}}",
                 f"{base}/models/{{model}}/versions/{{version}}/events"):
        assert "get" in paths[path]
    schemas = doc["components"]["schemas"]
    assert {"healthCheck", "replicas", "manualScaling", "isDefault"} <= set(schemas["Version"]["properties"])
    assert "@type" in schemas["OperationMetadata"]["properties"]
    assert set(schemas["VersionCreate"]["required"]) == {"name", "deploymentUri"}


# ---- helpers ------------------------------------------------------------------------------------------------


def test_parse_list_filter():
    fields = {"state": ("READY", "FAILED"), "labels": ()}
    assert parse_list_filter(' state = "READY" AND labels.team!=ml ', fields) == [
        Condition("state", "=", "READY"), Condition("labels.team", "!=", "ml")]
    assert parse_list_filter("", fields) == []
    for text in ("state=BORED", "name=x", "labels=x", "state=READY OR state=FAILED", "state>READY"):
        with pytest.raises(InvalidArgument):
            parse_list_filter(text, fields)


def test_update_mask():
    supported = ("description", "manualScaling.nodes")
    assert update_mask(" manual_scaling.nodes,description,description", supported) == [
        "manualScaling.nodes", "description"]
    with pytest.raises(InvalidArgument):
        update_mask("manualScaling", supported)
