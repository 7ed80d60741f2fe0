"""The request log's spool and shipper on a real folder: every record once in the store, whatever dies when."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from cloudml_os.serving.request_log import RequestLog


class Store:
    """Objects by (project, key), and how many times each was written."""

    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}
        self.writes = 0
        self.fail = False

    def put(self, project: str, key: str, data: bytes) -> None:
        if self.fail:
            raise ConnectionError("the store is down")
        self.objects[project, key] = data
        self.writes += 1

    def records(self) -> list[dict]:
        return [json.loads(line) for data in self.objects.values() for line in data.splitlines()]


def a_log(tmp_path: Path, store: Store, **kwargs) -> RequestLog:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return RequestLog(spool, store.put, **{"max_bytes": 1 << 20, "segment_seconds": 3600, **kwargs})


def record(log: RequestLog, n: int, version: str = "v1") -> None:
    assert log.record("p", "census", version, f"req-{n}", json.dumps({"instances": [[n]]}).encode(),
                      json.dumps({"predictions": [[n * 2]]}).encode())


def test_records_reach_the_store_as_v1_columns_one_object_per_version_and_hour(tmp_path):
    store = Store()
    log = a_log(tmp_path, store)
    for n in range(5):
        record(log, n, "v1" if n % 2 else "v2")
    log.close()  # closes the open segment and ships it
    keys = sorted(key for _, key in store.objects)
    assert len(keys) == 2 and all(key.startswith("request-logs/census/") and key.endswith(".jsonl") for key in keys)
    assert keys[0].split("/")[2] == "v1" and keys[1].split("/")[2] == "v2"
    assert len(keys[0].split("/")) == 8  # request-logs/MODEL/VERSION/YYYY/MM/DD/HH/SEGMENT.jsonl
    first = next(r for r in store.records() if r["request_id"] == "req-1")
    assert set(first) == {"model", "model_version", "time", "request_id", "raw_data", "raw_prediction",
                          "groundtruth"}
    assert first["groundtruth"] is None and json.loads(first["raw_data"]) == {"instances": [[1]]}
    assert (first["model"], first["model_version"]) == ("census", "v1") and first["time"].endswith("Z")
    assert sorted(r["request_id"] for r in store.records()) == [f"req-{n}" for n in range(5)]
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_segment_shipped_again_after_a_crash_writes_the_same_objects(tmp_path):
    store = Store()
    log = a_log(tmp_path, store)
    for n in range(3):
        record(log, n)
    with log._lock:
        log._rotate()
    segment = next((tmp_path / "spool").iterdir())
    data = segment.read_bytes()
    log.ship()
    first = dict(store.objects)
    segment.write_bytes(data)  # as if the shipper died between the store's write and the segment's removal
    log.ship()
    assert store.objects == first and len(store.records()) == 3


def test_an_open_segment_is_left_to_its_live_writer_and_a_dead_writers_is_shipped(tmp_path):
    store = Store()
    log = a_log(tmp_path, store)
    record(log, 1)
    assert log.ship() == 0 and store.objects == {}  # our own open segment: locked
    orphan = tmp_path / "spool" / "otherhost-99999-1-000001.open"  # a killed process's, unlocked
    orphan.write_bytes((tmp_path / "spool").joinpath(log._path.name).read_bytes().replace(b"req-1", b"req-9")
                       + b'{"model": "census", "cut in the mid')  # its last write cut short
    assert log.ship() == 1
    assert [r["request_id"] for r in store.records()] == ["req-9"]
    held = os.open(orphan.parent / "held.jsonl", os.O_CREAT | os.O_WRONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another shipper's
    assert log.ship() == 0
    os.close(held)


def test_a_store_that_is_down_keeps_the_segments_for_the_next_pass(tmp_path):
    store = Store()
    log = a_log(tmp_path, store)
    record(log, 1)
    with log._lock:
        log._rotate()
    store.fail = True
    with pytest.raises(ConnectionError):
        log.ship()
    assert len(list((tmp_path / "spool").iterdir())) == 1
    store.fail = False
    assert log.ship() == 1 and len(store.records()) == 1


def test_a_full_spool_drops_and_counts_instead_of_growing(tmp_path):
    store = Store()
    dropped = []
    log = a_log(tmp_path, store, max_bytes=600, on_dropped=lambda *args: dropped.append(args))
    kept = sum(log.record("p", "census", "v1", f"r{n}", b"x" * 100, b"y" * 100) for n in range(10))
    assert 0 < kept < 10
    assert sum(path.stat().st_size for path in (tmp_path / "spool").iterdir()) <= 600
    log.close()
    assert dropped == [("p", "census", "v1", 10 - kept)]
    assert len(store.records()) == kept


def test_segments_rotate_by_size(tmp_path):
    store = Store()
    log = a_log(tmp_path, store, segment_bytes=300)
    for n in range(6):
        record(log, n)
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) >= 2
    log.close()
    assert sorted(r["request_id"] for r in store.records()) == [f"req-{n}" for n in range(6)]
