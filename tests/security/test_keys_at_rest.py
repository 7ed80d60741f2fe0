"""Clusters' SSH private keys at rest: the Store encrypts them with its key-encryption key, callers get
plaintext, a deleted cluster's key is emptied, and a bad or missing key is refused loudly.

The same promises are checked end to end on PostgreSQL with real jobs in test_secrets.py.
"""

from __future__ import annotations

import stat

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from cloudml_os.config import ConfigError, load_settings
from cloudml_os.keys import generate_keypair
from cloudml_os.store import Cluster, Store, migrate
from cloudml_os.store.encryption import KEY_FILE, KeyDecryptionError, load_key_encryption_key

KEY = Fernet.generate_key().decode()


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    return url


def _raw(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text("SELECT state, private_key FROM clusters"))]


def test_the_column_holds_a_fernet_token_and_callers_get_the_key_back(url):
    store = Store(url, KEY)
    private, public = generate_keypair()
    cluster = store.create_cluster(Cluster(job_id=None, name="c1", driver="local", state="CREATING",
                                           private_key=private, public_key=public))
    [(_, stored)] = _raw(store)
    assert "PRIVATE KEY" not in stored and Fernet(KEY.encode()).decrypt(stored.encode()).decode() == private
    assert cluster.private_key == private
    assert Store(url, KEY).create_cluster(Cluster(job_id=None, name="c1", driver="local", state="CREATING",
                                                  private_key="other", public_key="x")).private_key == private


def test_marking_a_cluster_deleted_empties_its_key_and_a_new_one_can_be_given(url):
    store = Store(url, KEY)
    private, public = generate_keypair()
    cluster = store.create_cluster(Cluster(job_id=None, name="c1", driver="local", state="READY",
                                           private_key=private, public_key=public))
    store.update_cluster(cluster.id, state="DELETED")
    assert _raw(store) == [("DELETED", "")]
    fresh, fresh_public = generate_keypair()
    assert store.rekey_cluster(cluster.id, fresh, fresh_public).private_key == fresh
    assert store.rekey_cluster(cluster.id, "loser", "loser").private_key == fresh  # only an empty key is replaced


def test_another_key_encryption_key_cannot_read_the_keys(url):
    Store(url, KEY).create_cluster(Cluster(job_id=None, name="c1", driver="local", state="READY",
                                           private_key=generate_keypair()[0], public_key="x"))
    with pytest.raises(KeyDecryptionError, match="key_encryption_key"):
        Store(url, Fernet.generate_key().decode()).create_cluster(
            Cluster(job_id=None, name="c1", driver="local", state="READY", private_key="k", public_key="x"))


def test_a_malformed_configured_key_stops_the_start(tmp_path):
    for bad in ("not-a-key", "c2hvcnQ=", KEY[:-4]):
        with pytest.raises(ConfigError, match="key_encryption_key"):
            load_settings(environ={}, data_dir=tmp_path, key_encryption_key=bad)
    assert "key_encryption_key" not in repr(load_settings(environ={}, data_dir=tmp_path, key_encryption_key=KEY))
    assert KEY not in repr(load_settings(environ={}, data_dir=tmp_path, key_encryption_key=KEY))


def test_without_a_configured_key_one_is_made_once_in_data_dir_readable_by_its_owner_only(tmp_path):
    first = load_key_encryption_key("", tmp_path)
    assert load_key_encryption_key("", tmp_path) == first
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    Fernet(first.encode())
    assert load_key_encryption_key(KEY, tmp_path) == KEY


def test_a_serving_cluster_that_lost_its_last_node_gets_a_new_keypair_when_nodes_come_back(url, tmp_path):
    from cloudml_os.store.models import Replica
    from cloudml_os.workflows.serve import ServeError, start_replica
    from tests.unit.test_serve_workflow import FakeDriver, a_context, a_version, replica, version_of

    store = Store(url, KEY)
    keys: list[str] = []

    def refused(node, private_key):  # the replica's server never starts: its node is removed again
        keys.append(private_key)
        raise OSError("connection refused")

    ctx = a_context(store, FakeDriver(), refused, tmp_path)
    version_id = a_version(store)
    for index in (0, 1):
        starting = store.add(Replica(version_id=version_id, name=f"replica-{index}", state="PROVISIONING")).id
        with pytest.raises(ServeError):
            start_replica(ctx, version_of(store, version_id), replica(store, starting))
        assert _raw(store) == [("DELETED", "")]  # its last node gone, the cluster's key went with it
    assert len(keys) == 2 and keys[0] != keys[1] and all("PRIVATE KEY" in key for key in keys)
