"""The persistent outbox: order, acks, bounds and drop policy, crash safety."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from soundwatch.outbox import Outbox, OutboxError, OutboxFull
from tests.modulekit import can_mount, fill, small_disk


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _keys(box: Outbox, limit: int = 1000) -> list[str]:
    return [item.key for item in box.peek(limit)]


def test_fifo_peek_ack_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite3"
    with Outbox(path) as box:
        ids = [box.enqueue(f"e{i}", f"payload {i}".encode()).id for i in range(5)]
        assert ids == sorted(ids)
        assert _keys(box) == ["e0", "e1", "e2", "e3", "e4"]
        assert [i.key for i in box.peek(2, after_id=ids[1])] == ["e2", "e3"]
        assert box.peek(3)[0].payload == b"payload 0"
        assert box.ack([ids[0], ids[2]]) == 2
        assert box.ack([ids[0], 999]) == 0  # gone or unknown: not an error
        assert box.depth() == 3
        assert box.pending_through(ids[1]) == 1
        assert box.last_id() == ids[-1]
    with Outbox(path) as box:  # survives a restart
        assert _keys(box) == ["e1", "e3", "e4"]
        assert box.stats().bytes == sum(len(f"payload {i}") for i in (1, 3, 4))
        # ids are never reused, so an ack from before cannot hit a new item
        assert box.enqueue("e5", b"x").id > ids[-1]
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_attributes_round_trip(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3") as box:
        box.enqueue("a", b"1", {"class": "imbalance", "$.ct": "application/json"})
        box.enqueue("b", b"2")
        first, second = box.peek(2)
        assert first.attributes == {"class": "imbalance", "$.ct": "application/json"}
        assert second.attributes == {}


def test_overflow_drops_oldest_counts_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ob.sqlite3"
    with Outbox(path, max_events=3) as box:
        for i in range(3):
            assert box.enqueue(f"e{i}", b"x").dropped == ()
        with caplog.at_level(logging.WARNING, logger="soundwatch.outbox"):
            result = box.enqueue("e3", b"x")
            result2 = box.enqueue("e4", b"x")
        assert [(d.key, d.reason) for d in result.dropped + result2.dropped] == [
            ("e0", "overflow"),
            ("e1", "overflow"),
        ]
        assert _keys(box) == ["e2", "e3", "e4"]
        assert box.stats().dropped == {"overflow": 2}
        assert "dropped 1 event(s) undelivered (overflow): e0" in caplog.text
    with Outbox(path, max_events=3) as box:  # the counters persist
        assert box.stats().dropped_total == 2


def test_reject_new_policy_keeps_the_old_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", max_events=2, overflow="reject_new") as box:
        box.enqueue("e0", b"x")
        box.enqueue("e1", b"x")
        with pytest.raises(OutboxFull) as ei:
            box.enqueue("e2", b"x")
        assert ei.value.dropped.key == "e2" and ei.value.dropped.reason == "rejected"
        assert _keys(box) == ["e0", "e1"]
        assert box.stats().dropped == {"rejected": 1}


def test_byte_bound_and_too_large(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", max_bytes=100) as box:
        box.enqueue("a", b"x" * 40)
        box.enqueue("b", b"x" * 40)
        dropped = box.enqueue("c", b"x" * 40).dropped
        assert [d.key for d in dropped] == ["a"]
        assert box.stats().bytes == 80
        with pytest.raises(OutboxFull, match="more than max_bytes"):
            box.enqueue("huge", b"x" * 101)
        assert _keys(box) == ["b", "c"]
        assert box.stats().dropped == {"overflow": 1, "too_large": 1}


def test_age_bound(tmp_path: Path) -> None:
    clock = FakeClock()
    with Outbox(tmp_path / "ob.sqlite3", max_age_s=60, clock=clock) as box:
        box.enqueue("old", b"x")
        clock.t += 30
        box.enqueue("newer", b"x")
        clock.t += 31
        assert [d.key for d in box.purge_expired()] == ["old"]
        clock.t += 30
        assert [d.key for d in box.enqueue("newest", b"x").dropped] == ["newer"]
        assert _keys(box) == ["newest"]
        assert box.stats().dropped == {"expired": 2}
        assert box.stats().oldest_age_s == 0.0


def test_drop_undeliverable(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3") as box:
        item = box.enqueue("bad", b"x").id
        assert [d.reason for d in box.drop([item], "undeliverable")] == ["undeliverable"]
        assert box.depth() == 0 and box.stats().dropped == {"undeliverable": 1}


def test_one_process_per_outbox(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite3"
    with Outbox(path), pytest.raises(OutboxError, match="in use by another process"):
        Outbox(path)
    Outbox(path).close()  # released on close


def test_unreadable_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ob.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="soundwatch.outbox"), Outbox(path) as box:
        box.enqueue("e", b"x")
        assert box.depth() == 1
    assert list(tmp_path.glob("ob.sqlite3.corrupt-*"))
    assert "were NOT sent" in caplog.text


def test_bad_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_events"):
        Outbox(tmp_path / "a", max_events=0)
    with pytest.raises(ValueError, match="overflow"):
        Outbox(tmp_path / "b", overflow="drop_newest")  # type: ignore[arg-type]


def test_closed_outbox_raises(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob.sqlite3")
    box.close()
    box.close()  # idempotent
    with pytest.raises(OutboxError, match="closed"):
        box.enqueue("e", b"x")


def test_concurrent_enqueue_and_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3") as box:

        def produce(n: int) -> None:
            for i in range(50):
                box.enqueue(f"t{n}-{i}", b"x")

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        acked = 0
        while any(t.is_alive() for t in threads) or box.depth():
            acked += box.ack(item.id for item in box.peek(16))
        for t in threads:
            t.join()
        assert acked == 200 and box.depth() == 0 and box.stats().bytes == 0


def test_committed_events_survive_kill_9(tmp_path: Path) -> None:
    """A child enqueues, then SIGKILLs itself with the outbox open."""
    path = tmp_path / "ob.sqlite3"
    script = (
        "import os, signal, sys\n"
        "from soundwatch.outbox import Outbox\n"
        "box = Outbox(sys.argv[1])\n"
        "for i in range(20): box.enqueue(f'e{i}', b'x' * 100)\n"
        "box.ack([1, 2])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert proc.returncode == -9
    with Outbox(path) as box:  # the lock died with the process
        assert _keys(box) == [f"e{i}" for i in range(2, 20)]


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")
def test_a_small_or_full_disk_never_wedges_the_outbox(tmp_path: Path) -> None:
    """On a small state disk the write-ahead log must not fill it and stay full.

    With SQLite's default (a checkpoint only at 4 MiB of log, and only after
    a commit that succeeded) the log of a steady enqueue/ack stream filled a
    1 MiB disk, and every later write failed, free space or not.
    """
    with small_disk(tmp_path / "disk", 1024) as disk, Outbox(disk / "ob.sqlite3") as box:
        for i in range(3000):  # ~3 MiB through a 1 MiB disk, as a module writes
            item = box.enqueue(f"e{i}", b"x" * 1000)
            box.ack([item.id])
        assert box.depth() == 0
        filler = fill(disk)
        with pytest.raises(OutboxError, match="disk is full"):
            for i in range(100):
                box.enqueue(f"full{i}", b"x" * 1000)
        filler.unlink()
        box.enqueue("after", b"x" * 1000)  # room again: the next write succeeds
        assert _keys(box)[-1] == "after"
