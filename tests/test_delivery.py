"""What a run reports about delivery, through the real ``soundwatch run``.

- A file run exits 1 when any event could not be delivered or stored, and
  says how many (a JSON Lines sink on a full or read-only disk).
- ``seq`` never repeats across restarts, also after the state disk was
  full: events wait (unhealthy, logged) rather than take a number that a
  restart would hand out again, and any that never got one are reported.
- An outbox that cannot store (full disk) holds events in memory and stores
  and delivers them once there is room: nothing lost.

Disks are real: ``/dev/full``, and small tmpfs mounts where this process may
mount (root); those tests skip otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.modulekit import (
    Module,
    can_mount,
    event_clip,
    fill,
    module_config,
    mqtt_sink,
    small_disk,
    wait_until,
)
from tests.mosquitto import Certs, Mosquitto, make_certs, tools_available

needs_mount = pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")


def _file_run(tmp_path: Path, sinks: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """One 12 s fault clip, not looped: an anomaly starts and ends (two events)."""
    config = module_config(tmp_path, state_dir=tmp_path / "state", sinks=[])
    config["source"] = {"type": "file", "path": str(event_clip(tmp_path / "clip.wav"))}
    config["sinks"] = sinks
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "soundwatch", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


LOST = re.compile(r"(\d+) of (\d+) event\(s\) could not be delivered or stored \((.*)\)")


def test_a_file_run_exits_1_when_a_sink_could_not_store_its_events(tmp_path: Path) -> None:
    ok = tmp_path / "ok.jsonl"
    proc = _file_run(
        tmp_path,
        [
            {"type": "jsonl", "name": "full", "path": "/dev/full"},  # every write: ENOSPC
            {"type": "jsonl", "name": "ok", "path": str(ok)},
        ],
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = LOST.search(proc.stderr)
    assert found, proc.stderr[-2000:]
    emitted = len(ok.read_text().splitlines())
    assert emitted >= 2
    assert found.groups() == (str(emitted), str(emitted), f"full: {emitted}")


@needs_mount
def test_a_file_run_exits_1_with_jsonl_on_a_read_only_filesystem(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        proc = _file_run(tmp_path, [{"type": "jsonl", "path": str(ro / "events.jsonl")}])
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = LOST.search(proc.stderr)
    assert found and found.group(1) == found.group(2) and int(found.group(1)) >= 2, proc.stderr


def test_a_file_run_whose_events_all_arrived_exits_0(tmp_path: Path) -> None:
    proc = _file_run(tmp_path, [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not be delivered" not in proc.stderr


# --- seq across restarts with a full state disk --------------------------------------------------


def _seqs(module: Module) -> list[int]:
    return [int(e["seq"]) for e in module.events()]


@needs_mount
def test_seq_never_repeats_across_restarts_after_the_state_disk_was_full(tmp_path: Path) -> None:
    """The probe: the ceiling could not be persisted, and after a restart seq repeated.

    Run 1 fills its state disk and crashes (kill -9); run 2 starts on the still
    full disk and must emit nothing it cannot number for good: its events wait
    (logged, /health unhealthy) and, stopped like that, it exits 1 naming
    them. Run 3 gets the room back and carries on above every number used.
    """
    with small_disk(tmp_path / "state", 64) as state:
        config = module_config(tmp_path, state_dir=state, sinks=[])  # as fast as it goes
        module = Module(tmp_path, config, http=True)
        try:
            module.start()
            module.wait_events(10)
            assert (state / "sequence").read_text() == "101\n"
            filler = fill(state)
            # Events go on up to the stored ceiling (100), then wait for a number.
            module.wait_log("cannot persist sequence ceiling")
            module.wait_log("event held, not emitted yet")
            health = module.health()
            assert health["healthy"] is False
            assert health["sequence"]["held_events"] >= 1
            assert "No space left" in health["sequence"]["error"]
            first_run = _seqs(module)
            assert max(first_run) == 100, first_run[-5:]
            module.kill9()

            module.start()  # the disk is still full
            module.wait_log("event held, not emitted yet")
            assert _seqs(module) == first_run, "a run that cannot persist emitted a number"
            code, _ = module.terminate()
            assert code == 1
            log = module.run_log()
            assert "event NOT emitted: AnomalyStarted clogging" in log
            assert "decided event(s) were never emitted" in log

            filler.unlink()
            module.start()
            module.wait_events(len(first_run) + 10)
            code, _ = module.terminate()
            assert code == 0, module.run_log()[-2000:]
        finally:
            module.stop()
    seqs = _seqs(module)
    assert len(seqs) == len(set(seqs)), "a sequence number was used twice"
    assert seqs == sorted(seqs)
    assert seqs[len(first_run)] > 100


# --- an outbox on a full disk ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path, certs: Certs) -> Iterator[Mosquitto]:
    if not tools_available():
        pytest.skip("needs mosquitto, mosquitto-clients and openssl")
    b = Mosquitto(tmp_path / "broker", certs)
    b.start()
    try:
        yield b
    finally:
        b.close()


@needs_mount
def test_events_the_outbox_cannot_store_wait_in_memory_and_are_delivered(
    tmp_path: Path, broker: Mosquitto
) -> None:
    prefix = f"sw-full/{uuid.uuid4().hex[:8]}"
    collector = broker.subscribe(
        [f"{prefix}/events"], client_id=f"c-{prefix[-8:]}", persistent=True
    )
    with small_disk(tmp_path / "state", 1024) as state:
        sink = mqtt_sink(broker.ports["plain"], prefix)
        module = Module(tmp_path, module_config(tmp_path, state_dir=state, sinks=[sink], speed=20))
        try:
            module.start()
            module.wait_events(4)
            broker.stop()  # so that events must be stored to survive
            filler = fill(state)
            module.wait_log("cannot store event")
            held_from = len(module.events())
            module.wait_events(held_from + 4)  # emitted while nothing can be stored
            filler.unlink()
            broker.start()
            module.wait_log("the outbox stores events again")
            emitted = module.events()
            wanted = {e["event_id"] for e in emitted}
            wait_until(
                lambda: wanted <= {m.payload["event_id"] for m in collector.on(f"{prefix}/events")},
                60,
                "every event at the collector",
            )
            code, _ = module.terminate()
            assert code == 0, module.run_log()[-2000:]
        finally:
            module.stop()
            collector.stop()
