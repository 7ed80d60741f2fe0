"""A node whose SSH host key is not the pinned one is refused, and the job fails saying so.

The job runs through the real training workflow on real local sshd nodes with paramiko; only what the
driver reports as the nodes' host keys is replaced by another key (what a node impersonated by another
machine would look like). Nothing is ever sent to such a node: bootstrap fails at the handshake, the job
ends FAILED with a message naming the host key, and teardown still deletes the cluster and its key.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
from sqlalchemy import text

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.base import Driver
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.frameworks.tensorflow import TensorFlow
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import connect_node
from cloudml_os.states import Step
from cloudml_os.store import Job, Package, Store, migrate
from cloudml_os.workflows.train import TrainingContext, run_step


class ForgedHostKeys(Driver):
    """The local driver, except that the host keys it reports for new nodes belong to another key."""

    name = "local"

    def __init__(self, real: LocalDriver):
        self.real = real
        self.forged = generate_keypair()[1].split()[:2]

    def create_cluster(self, spec):
        forged = (" ".join(self.forged),)
        return [dataclasses.replace(info, host_keys=forged) for info in self.real.create_cluster(spec)]

    def resize_cluster(self, spec):
        raise NotImplementedError("training never resizes a cluster")

    def replace_node(self, spec, node):
        raise NotImplementedError("training never replaces a node")

    def delete_cluster(self, name):
        self.real.delete_cluster(name)

    def list_clusters(self):
        return self.real.list_clusters()


@pytest.fixture
def context(tmp_path, tf_runtime):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    settings = load_settings(environ={}, data_dir=tmp_path, local_address_prefix="127.13", local_port_base=29000,
                             ssh_connect_timeout=5, ssh_boot_retries=2, stop_grace_seconds=1)
    store = Store(url)
    driver = ForgedHostKeys(LocalDriver(settings))
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    artifacts.put_file("p", "packages/t.tar.gz", io.BytesIO(b""))
    store.add(Package(project="p", uri="store://p/packages/t.tar.gz", filename="t.tar.gz", kind="archive",
                      sha256="0" * 64, size=0))
    ctx = TrainingContext(settings=settings, store=store, driver=driver, artifacts=artifacts,
                          frameworks={"TENSORFLOW": TensorFlow()},
                          connect=lambda node, key: connect_node(node, key, settings))
    yield ctx
    for name in driver.list_clusters():  # a failed assertion must not leave sshd nodes behind
        driver.delete_cluster(name)
    store.engine.dispose()


def test_a_host_key_mismatch_fails_the_job_with_a_clear_error_and_tears_down(context):
    job = context.store.create_job(Job(
        project="p", job_id="impostor", state="QUEUED", step="PROVISIONING", framework="TENSORFLOW",
        training_input={"scaleTier": "BASIC", "packageUris": ["store://p/packages/t.tar.gz"],
                        "pythonModule": "trainer.task"}))
    message = (Step.PROVISIONING, 0, 0.0)
    for _ in range(20):
        if message is None:
            break
        message = run_step(context, job.id, message[0], message[1])
    job = context.store.get_job(job.id)
    assert (job.state, job.step) == ("FAILED", "DONE")
    assert "not the pinned key" in job.error_message and "refusing to connect" in job.error_message
    assert context.driver.forged[1] not in job.error_message  # the fingerprint is named, not the key
    assert any("BOOTSTRAPPING failed" in e.message and "host key" in e.message
               for e in context.store.events(job.id))
    assert context.driver.list_clusters() == []
    with context.store.engine.connect() as connection:
        assert connection.execute(text("SELECT state, private_key FROM clusters")).all() == [("DELETED", "")]
