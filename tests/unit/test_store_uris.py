"""``store://PROJECT/KEY`` URIs: what :func:`parse_uri` accepts and what it refuses.

The project part follows the rule the API applies to project ids in paths; the key is a relative path of
non-empty segments without ``.`` or ``..``, NUL or control characters, at most 1024 bytes. Every backend
maps a URI only after it parsed, so nothing refused here can reach a folder or container.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudml_os.artifacts import MAX_KEY_BYTES, PROJECT_ID_PATTERN, ArtifactError, make_uri, parse_uri
from cloudml_os.artifacts.local import LocalArtifactStore


@pytest.mark.parametrize(("uri", "expected"), [
    ("store://p/jobs/j/model", ("p", "jobs/j/model")),
    ("store://my-project/packages/3f2a9c0d1e4b5a67/trainer-0.1.tar.gz",
     ("my-project", "packages/3f2a9c0d1e4b5a67/trainer-0.1.tar.gz")),
    ("store://team-a/jobs/dash_train/tensorboard/chief-0/", ("team-a", "jobs/dash_train/tensorboard/chief-0")),
    ("store://team-a/jobs/train_1/logs/chief-0.log", ("team-a", "jobs/train_1/logs/chief-0.log")),
    ("store://p/x", ("p", "x")),
    ("store://p/.hidden/a..b/...", ("p", ".hidden/a..b/...")),
    ("store://p/spaces and ünïcödé/✓", ("p", "spaces and ünïcödé/✓")),
    ("store://" + "a" * 62 + "/k", ("a" * 62, "k")),
    ("store://p/" + "k" * 1024, ("p", "k" * 1024)),
])
def test_valid_uris_parse_into_project_and_key(uri, expected):
    assert parse_uri(uri) == expected


def test_uris_the_workflows_make_parse_back():
    for key in ("jobs/train_1", "jobs/train_1/model", "jobs/train_1/logs/chief-0.log",
                "jobs/train_1/tensorboard/chief-0/events.out.tfevents.1.host", "packages/abc/trainer-0.1.tar.gz"):
        assert parse_uri(make_uri("team-a", key)) == ("team-a", key)


@pytest.mark.parametrize("project", [
    "..", ".", "../x", "P", "Team-a", "1team", "-team", "team_a", "team.a", "a" * 63, "team a", "tëam",
    "team\x00", "team\n",
])
def test_projects_that_are_not_project_ids_are_refused(project):
    with pytest.raises(ArtifactError, match="not a valid artifact URI"):
        parse_uri(f"store://{project}/jobs/j/model")


def test_a_parent_project_cannot_map_outside_the_local_store(tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ArtifactError):
        store.path("store://../x")
    with pytest.raises(ArtifactError):
        store.path("store://../outside/x")


@pytest.mark.parametrize("key", [
    "", "/", "/abs", "//x", "a//b", "a/./b", "a/../b", "..", ".", "../x", "a/..", "a/b//",
    "a\x00b", "a\nb", "a\rb", "a\tb", "a\x1bb", "a\x7fb", "a\x85b", "a\ud800b",
    "k" * 1025, "é" * 513,
], ids=lambda key: repr(key)[:40])
def test_keys_with_empty_dot_or_control_segments_or_over_1024_bytes_are_refused(key):
    with pytest.raises(ArtifactError, match="not a valid artifact URI"):
        parse_uri(f"store://p/{key}")


@pytest.mark.parametrize("uri", ["p/x", "s3://p/x", "store:/p/x", "STORE://p/x", "store://p", "store://", "store:///x"])
def test_other_shapes_are_refused(uri):
    with pytest.raises(ArtifactError):
        parse_uri(uri)


def test_the_key_limit_is_1024_bytes_of_utf8():
    assert MAX_KEY_BYTES == 1024
    assert parse_uri("store://p/" + "é" * 512) == ("p", "é" * 512)


def test_the_project_rule_is_the_apis():
    """One rule for project ids: the API's path converter and its token command use the store's."""
    from cloudml_os.api import ProjectIdConverter
    from cloudml_os.auth.tokens import PROJECT_ID

    assert ProjectIdConverter.regex == PROJECT_ID_PATTERN == PROJECT_ID.pattern


def test_refusals_do_not_echo_control_characters_raw():
    with pytest.raises(ArtifactError) as raised:
        parse_uri("store://p/a\nb")
    assert "\n" not in str(raised.value)
    assert re.search(r"a\\nb", str(raised.value))


def test_local_store_keeps_objects_in_their_projects_folder(tmp_path: Path):
    store = LocalArtifactStore(tmp_path)
    assert store.path("store://team-a/jobs/j/model") == tmp_path / "team-a" / "jobs" / "j" / "model"
