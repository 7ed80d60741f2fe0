"""The output copy's change detection (cloudml_os.workflows.outputs): what a node's listing says, which files a
round copies, waits for, leaves out or deletes, and a copier's rounds against a fake node and a real local store.

Real nodes, TensorFlow checkpoints and a killed chief: tests/integration/test_outputs.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.config import load_settings
from cloudml_os.remote import CommandResult, RemoteError
from cloudml_os.store import Cluster, Job, Node
from cloudml_os.workflows import outputs
from cloudml_os.workflows.outputs import Listing, NodeFile, Record, Source, changes, parse_listing


def listing_bytes(files: dict[str, tuple[int, str]], now: float = 1000.0, end: str = "end 0") -> bytes:
    entries = [f"now {now:.9f}"] + [f"f {size} {mtime} {path}" for path, (size, mtime) in files.items()] + [end]
    return "".join(entry + "\0" for entry in entries).encode()


# ---- the listing ------------------------------------------------------------------------------------

def test_a_listing_gives_each_files_size_and_modification_time_as_the_node_printed_it():
    listing = parse_listing(listing_bytes({"ckpt/model.ckpt-1.index": (10, "990.1234567890"), "a b": (0, "5")}))
    assert listing == Listing({"ckpt/model.ckpt-1.index": NodeFile(10, "990.1234567890"), "a b": NodeFile(0, "5")},
                              1000.0, complete=True)


def test_a_missing_folder_is_said_apart_from_an_empty_one():
    assert parse_listing(b"missing\0").missing
    empty = parse_listing(listing_bytes({}))
    assert (empty.missing, empty.complete, empty.files) == (False, True, {})


@pytest.mark.parametrize("output", [
    listing_bytes({"a": (1, "2")})[:-3],  # cut off (the node's head -c, or a broken connection)
    listing_bytes({"a": (1, "2")}, end="end 1"),  # find failed somewhere (an unreadable folder)
    listing_bytes({"a": (1, "2")}, end=""),  # no end record
    listing_bytes({"a": (1, "2")}).replace(b"f 1 2 a", b"f x 2 a"),  # a malformed record
    b"",
    b"garbage\0",
])
def test_a_listing_that_is_cut_failed_or_malformed_is_incomplete(output):
    assert not parse_listing(output).complete


def test_names_that_are_not_plain_are_refused_and_the_rest_listed():
    raw = b"".join(entry + b"\0" for entry in [
        b"now 1000", b"f 1 2 ok/file", b"f 1 2 a/../b", b"f 1 2 a//b", b"f 1 2 bad\x1bname", b"f 1 2 \xff\xfe",
        b"f 1 2 repl\xef\xbf\xbdaced", b"f 1 2 " + b"x" * 256, b"end 0"])
    listing = parse_listing(raw)
    assert list(listing.files) == ["ok/file"]
    assert len(listing.refused) == 6 and listing.complete


def test_a_listing_stops_at_the_file_cap_and_is_then_incomplete():
    listing = parse_listing(listing_bytes({f"f{i}": (1, "2") for i in range(5)}), max_files=3)
    assert len(listing.files) == 3 and not listing.complete


# ---- what a round does --------------------------------------------------------------------------------

CHIEF = Source(node=None, root="/w/job/output", summaries="chief-0/", mirror="")
WORKER = Source(node=None, root="/w/job/output", summaries="worker-0/")


def test_complete_files_are_copied_oldest_first_and_files_still_being_written_wait():
    listing = Listing({
        "ckpt/checkpoint": NodeFile(80, "995.3"),  # TensorFlow's index, written last
        "ckpt/ckpt-2.index": NodeFile(10, "995.1"),
        "ckpt/ckpt-2.data-00000-of-00001": NodeFile(500, "995.2"),
        "ckpt/ckpt-3.index": NodeFile(10, "999.6"),  # closed 0.4 s ago: may still be written
        "ckpt/ckpt-3_temp/part-00000-of-00001.data-00000-of-00001": NodeFile(9, "990"),  # a shard being merged
        "ckpt/checkpoint.tmp0123abcd": NodeFile(3, "990"),  # an atomic write in progress
    }, now=1000.0, complete=True)
    found = changes(listing, CHIEF, {}, quiet=1.0)
    assert [c.key for c in found.copies] == ["ckpt/ckpt-2.index", "ckpt/ckpt-2.data-00000-of-00001", "ckpt/checkpoint"]
    assert found.gone == [] and found.left_out == []
    # The final round (the trainers have stopped) takes everything complete at once.
    assert "ckpt/ckpt-3.index" in [c.key for c in changes(listing, CHIEF, {}, quiet=0.0).copies]


def test_only_files_that_changed_since_their_copy_are_copied_again():
    listing = Listing({"a": NodeFile(1, "10.5"), "b": NodeFile(2, "10.5"), "c": NodeFile(3, "10.5")}, 1000.0, True)
    copied = {"a": NodeFile(1, "10.5"), "b": NodeFile(2, "9.0"), "c": NodeFile(4, "10.5")}
    assert [c.key for c in changes(listing, CHIEF, copied, 1.0).copies] == ["b", "c"]


def test_event_files_go_under_tensorboard_per_node_whenever_they_grew_and_from_every_node():
    listing = Listing({"train/events.out.tfevents.1.host": NodeFile(100, "999.9"), "ckpt/x": NodeFile(1, "1")},
                      now=1000.0, complete=True)
    chief = changes(listing, CHIEF, {}, quiet=1.0)
    assert [c.key for c in chief.copies] == ["ckpt/x", "tensorboard/chief-0/train/events.out.tfevents.1.host"]
    worker = changes(listing, WORKER, {}, quiet=1.0)  # not the owner: only its event files
    assert [c.key for c in worker.copies] == ["tensorboard/worker-0/train/events.out.tfevents.1.host"]


def test_a_trainers_files_under_the_platforms_own_names_are_left_out():
    names = ["logs/chief-0.log", "tensorboard/notes.txt", ".cloudml-os/outputs.json",
             "tensorboard/events.out.tfevents.1", "model/saved_model.pb"]
    listing = Listing({name: NodeFile(1, "1") for name in names}, now=1000.0, complete=True)
    found = changes(listing, CHIEF, {}, quiet=1.0)
    assert sorted(c.key for c in found.copies) == ["model/saved_model.pb",
                                                   "tensorboard/chief-0/tensorboard/events.out.tfevents.1"]
    assert sorted(key for key, _ in found.left_out) == [".cloudml-os/outputs.json", "logs/chief-0.log",
                                                         "tensorboard/notes.txt"]
    # In a trial's folder these are ordinary names: JOB_DIR/3/logs/…
    trial = changes(listing, dataclasses.replace(CHIEF, mirror="3/", summaries="trial-3/chief-0/"), {}, 1.0)
    assert "3/logs/chief-0.log" in [c.key for c in trial.copies] and not trial.left_out


def test_files_the_copy_made_and_the_node_deleted_are_gone_but_never_event_files():
    copied = {"ckpt/ckpt-1.index": NodeFile(1, "1"), "ckpt/ckpt-2.index": NodeFile(1, "2"),
              "tensorboard/chief-0/events.out.tfevents.1": NodeFile(1, "1"), "3/other-trial": NodeFile(1, "1")}
    listing = Listing({"ckpt/ckpt-2.index": NodeFile(1, "2")}, now=1000.0, complete=True)
    assert changes(listing, CHIEF, copied, 1.0).gone == ["3/other-trial", "ckpt/ckpt-1.index"]
    # A trial's copy looks within its own folder only.
    trial = dataclasses.replace(CHIEF, mirror="3/")
    assert changes(Listing({}, 1000.0, True), trial, copied, 1.0).gone == ["3/other-trial"]
    # Not from an incomplete listing, a missing folder, or a node that is not the owner.
    assert changes(dataclasses.replace(listing, complete=False), CHIEF, copied, 1.0).gone == []
    assert changes(Listing({}, 0.0, True, missing=True), CHIEF, copied, 1.0).gone == []
    assert changes(listing, WORKER, copied, 1.0).gone == []


def test_a_record_of_another_job_or_no_record_starts_empty():
    record = Record(7, {"a/b": NodeFile(3, "1.5")}, {"logs/x"}, "2026-12-07T00:00:00Z")
    again = Record.from_json(json.loads(record.to_json()), 7)
    assert (again.files, again.reported, again.updated, again.size) == (record.files, {"logs/x"}, record.updated, 3)
    assert Record.from_json(json.loads(record.to_json()), 8).files == {}
    assert Record.from_json({"job": 7, "files": "broken"}, 7).files == {}
    assert Record.from_json(None, 7).files == {}


# ---- a copier's rounds: a fake node, the real local store ------------------------------------------------

@dataclasses.dataclass
class FolderSession:
    """A node whose job directory is a local folder: lists it as the listing script does, reads its files."""

    root: Path
    now: float = 2_000_000_000.0
    grows: set[str] = dataclasses.field(default_factory=set)  # files that grow while they are copied

    def run(self, argv, **kwargs):
        assert argv[:2] == ["/bin/sh", "-c"] and argv[4] == "/w/job/output"
        files = {path.relative_to(self.root).as_posix(): (path.stat().st_size, f"{path.stat().st_mtime:.6f}")
                 for path in sorted(self.root.rglob("*")) if path.is_file()}
        return CommandResult(0, listing_bytes(files, self.now).decode(), "")

    def get_file(self, remote_path, target, size):
        path = self.root / remote_path.removeprefix("/w/job/output/")
        if not path.exists():
            return None
        data = path.read_bytes() + (b"more" if path.name in self.grows else b"")
        target.write(data[:size + 1])
        return min(len(data), size + 1)

    def close(self):
        pass


@pytest.fixture
def copier_world(tmp_path):
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    store = LocalArtifactStore(tmp_path / "store")
    events: list[str] = []
    session = FolderSession(node_dir)
    ctx = type("Ctx", (), {})()
    ctx.settings = load_settings(environ={}, data_dir=tmp_path)
    ctx.artifacts = store
    ctx.store = type("Events", (), {"add_event": lambda self, job, kind, message, node=None: events.append(message)})()
    ctx.connect = lambda node, key: session
    job = Job(id=7, project="p", job_id="j", training_input={})
    cluster = Cluster(private_key="key")
    source = Source(Node(name="chief-0"), "/w/job/output", "chief-0/", "")

    def copier(interval: float = 0):
        return outputs.OutputSync(ctx, job, cluster, [source], interval=interval)

    return node_dir, store.root / "p" / "jobs" / "j", session, events, copier


def write(path: Path, data: bytes, mtime: float = 1_999_999_990.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def test_rounds_copy_changes_delete_what_the_node_deleted_and_a_new_copier_goes_on_from_the_record(copier_world):
    node, stored, session, events, copier = copier_world
    write(node / "ckpt" / "ckpt-1.index", b"one")
    write(node / "train" / "events.out.tfevents.1", b"E1")
    with copier() as sync:
        sync.run()
    assert (stored / "ckpt" / "ckpt-1.index").read_bytes() == b"one"
    assert (stored / "tensorboard" / "chief-0" / "train" / "events.out.tfevents.1").read_bytes() == b"E1"
    record = json.loads((stored / ".cloudml-os" / "outputs.json").read_text())
    assert sorted(record["files"]) == ["ckpt/ckpt-1.index", "tensorboard/chief-0/train/events.out.tfevents.1"]

    (node / "ckpt" / "ckpt-1.index").unlink()  # TensorFlow keeps max_to_keep checkpoints
    (node / "train" / "events.out.tfevents.1").unlink()
    write(node / "ckpt" / "ckpt-2.index", b"two")
    with copier() as sync:  # a new window (or worker) reads the record: nothing is copied twice
        sync.run()
    assert not (stored / "ckpt" / "ckpt-1.index").exists()
    assert (stored / "ckpt" / "ckpt-2.index").read_bytes() == b"two"
    assert (stored / "tensorboard" / "chief-0" / "train" / "events.out.tfevents.1").exists()  # history stays
    with copier() as sync, pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs.OutputSync, "_copy", lambda *args: pytest.fail("copied again"))
        sync.run()
    assert events == []


def test_a_file_that_changes_while_copied_waits_and_holds_back_deletions(copier_world):
    node, stored, session, _, copier = copier_world
    write(node / "a", b"a")
    with copier() as sync:
        sync.run()
    (node / "a").unlink()
    write(node / "big", b"0123")
    session.grows.add("big")
    with copier() as sync:
        sync.run()
    assert not (stored / "big").exists() and (stored / "a").exists()  # a round that did not catch up deletes nothing
    session.grows.clear()
    with copier() as sync:
        sync.run()
    assert (stored / "big").read_bytes() == b"0123" and not (stored / "a").exists()


def test_a_record_of_another_jobs_files_in_a_reused_job_dir_is_not_this_jobs(copier_world):
    node, stored, _, _, copier = copier_world
    write(stored / "old-checkpoint", b"earlier job")
    write(stored / ".cloudml-os" / "outputs.json", json.dumps({"job": 6, "files": {"old-checkpoint": [11, "1"]}})
          .encode())
    write(node / "new", b"n")
    with copier() as sync:
        sync.run()
    assert (stored / "old-checkpoint").read_bytes() == b"earlier job"  # never deleted: another job's
    assert json.loads((stored / ".cloudml-os" / "outputs.json").read_text())["job"] == 7


def test_files_beyond_the_caps_or_under_platform_names_are_left_out_once_with_an_event(copier_world, monkeypatch):
    node, stored, _, events, copier = copier_world
    monkeypatch.setattr(outputs, "MAX_COPY_BYTES", 10)
    write(node / "small", b"12345", mtime=1_999_999_980.0)
    write(node / "large", b"123456789")
    write(node / "logs" / "mine.log", b"x")
    for _ in range(2):
        with copier() as sync:
            sync.run()
    assert (stored / "small").exists() and not (stored / "large").exists()
    assert sorted(events) == [
        "Not copied to store://p/jobs/j/: large of chief-0 (the job directory in the store would hold more than "
        "10 bytes)",
        "Not copied to store://p/jobs/j/: logs/mine.log of chief-0 (JOB_DIR/logs/ is the platform's own)"]


def test_the_final_round_says_what_the_store_holds_and_a_node_that_fails_is_an_event(copier_world):
    node, _, session, events, copier = copier_world
    write(node / "ckpt" / "a", b"a")
    write(node / "events.out.tfevents.1", b"e")
    with copier() as sync:
        sync.run(final=True)
    assert events == ["Outputs copied to store://p/jobs/j/: 1 file(s) of chief-0's job directory, 1 TensorBoard "
                      "event file(s) in store://p/jobs/j/tensorboard/"]
    session.run = lambda *args, **kwargs: (_ for _ in ()).throw(RemoteError("node chief-0: connection lost"))
    with copier() as sync:
        sync.run(final=True)
    assert events[1] == "Outputs of chief-0 could not be copied: node chief-0: connection lost"


def test_a_restart_downloads_the_recorded_copy_and_adopts_the_restored_files(copier_world, tmp_path):
    node, stored, session, _, copier = copier_world
    write(node / "ckpt" / "checkpoint", b"model_checkpoint_path: 'ckpt-2'")
    write(node / "events.out.tfevents.1", b"e")
    with copier() as sync:
        sync.run()
    restored = tmp_path / "restored"
    with copier() as sync:
        count, synced_at = sync.download(restored)
    assert (count, sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file())) == \
        (1, ["ckpt/checkpoint"])
    assert synced_at.endswith("Z")
    write(node / "ckpt" / "checkpoint", b"model_checkpoint_path: 'ckpt-2'", mtime=1_999_999_999.0)  # put back
    with copier() as sync:
        sync.adopt(Source(Node(name="chief-0"), "/w/job/output", "chief-0/", ""))
    with copier() as sync, pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs.OutputSync, "_copy", lambda *args: pytest.fail("copied back"))
        sync.run(final=True)


def test_a_deletion_waits_for_a_round_that_copied_every_change_and_a_busy_file_waits_one_round_at_most(
        copier_world):
    node, stored, session, _, copier = copier_world
    write(node / "ckpt" / "ckpt-1.index", b"1")
    write(node / "ckpt" / "checkpoint", b"ckpt-1")
    sync = copier(interval=2)  # quiet 0.5 s; rounds run by hand (not entered: no thread)
    sync.run()
    # Checkpoint 2 and its index were written 0.2 and 0.1 s ago: not complete yet; TensorFlow deleted checkpoint 1.
    (node / "ckpt" / "ckpt-1.index").unlink()
    write(node / "ckpt" / "ckpt-2.index", b"2", mtime=session.now - 0.2)
    write(node / "ckpt" / "checkpoint", b"ckpt-2", mtime=session.now - 0.1)
    sync.run()
    # The stored index still names checkpoint 1, so it stays.
    assert (stored / "ckpt" / "checkpoint").read_bytes() == b"ckpt-1" and (stored / "ckpt" / "ckpt-1.index").exists()
    session.now += 2  # the next round: the index was rewritten just now (checkpoint 3), as is a log
    write(node / "ckpt" / "ckpt-3.index", b"3", mtime=session.now - 1.0)
    write(node / "ckpt" / "checkpoint", b"ckpt-3", mtime=session.now - 0.1)
    write(node / "train.log", b"busy", mtime=session.now - 0.1)
    sync.run()  # the index waited a round already: copied as it is; the log waits (its first round)
    assert (stored / "ckpt" / "checkpoint").read_bytes() == b"ckpt-3"
    assert (stored / "ckpt" / "ckpt-1.index").exists() and not (stored / "train.log").exists()
    session.now += 2
    write(node / "train.log", b"busier", mtime=session.now - 0.1)  # written all the time
    sync.run()  # everything in: the deletion follows
    assert (stored / "train.log").read_bytes() == b"busier" and not (stored / "ckpt" / "ckpt-1.index").exists()
    sync.__exit__(None, None, None)


def test_the_stored_index_always_names_a_stored_checkpoint_whatever_the_timing(copier_world):
    """A TensorFlow-like trainer (checkpoint files, then the index naming them, the checkpoint before last
    deleted) at random moments; copy rounds every 2 s. After every round the store is restorable."""
    node, stored, session, _, copier = copier_world
    rng = random.Random(19)
    sync = copier(interval=2)
    next_write, next_round, number, most = session.now, session.now + 2, 0, 0
    for _ in range(400):
        if next_write < next_round:
            number += 1
            write(node / "ckpt" / f"ckpt-{number}.index", b"x" * number, mtime=next_write)
            write(node / "ckpt" / "checkpoint", f"ckpt-{number}".encode(), mtime=next_write + 0.001)
            if number > 2:
                (node / "ckpt" / f"ckpt-{number - 2}.index").unlink()
            next_write += rng.choice([0.05, 0.3, 0.6, 1.0, 1.9, 2.0, 3.5])
        else:
            session.now, next_round = next_round, next_round + 2
            sync.run()
            if (stored / "ckpt" / "checkpoint").exists():
                named = (stored / "ckpt" / "checkpoint").read_text()
                assert (stored / "ckpt" / f"{named}.index").exists(), (named, sorted(os.listdir(stored / "ckpt")))
            most = max(most, len(list((stored / "ckpt").glob("*.index"))))
    assert (stored / "ckpt" / "checkpoint").read_text() != "ckpt-1"
    assert most <= 12  # old checkpoints go (two of them are the trainer's own)
    sync.run(final=True)
    assert sorted(os.listdir(stored / "ckpt")) == sorted(os.listdir(node / "ckpt"))
    sync.__exit__(None, None, None)
