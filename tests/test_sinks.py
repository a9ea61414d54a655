"""Console and JSON Lines sinks, and choosing a sink by its type."""

from __future__ import annotations

import io
import json
import os
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

import soundwatch.sinks as sinks_pkg
from soundwatch.config import ConsoleSinkConfig, JsonlSinkConfig
from soundwatch.events import Ending, Event, Message, Origin, State, to_wire
from soundwatch.sinks import (
    Sink,
    SinkConfigError,
    SinkError,
    available_sink_types,
    make_sink,
    register_sink,
    resolved,
)
from soundwatch.sinks.console import ConsoleSink, format_message
from soundwatch.sinks.jsonl import JsonlSink
from soundwatch.stream_types import Level


def jsonl(path: Path, **options: Any) -> JsonlSink:
    """A JSONL sink from its config model; the fsync policy knobs are keyword arguments."""
    policy = {
        k: options.pop(k)
        for k in ("fsync_events", "state_fsync_every", "state_fsync_interval_s", "clock")
        if k in options
    }
    return JsonlSink(JsonlSinkConfig(path=path, **options), **policy)


CLASSES = ("normal", "imbalance", "clogging", "voltage_change")
ORIGIN = Origin("dev1", "soundwatch", "fan@test")
LOUD = Level(rms_dbfs=-23.4, peak_dbfs=-8.0, clipping=False, silent=False)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def event(seq: int, kind: str = "anomaly_started", **extra: Any) -> Event:
    """An event as EventFactory builds them (``duration_s``/``reason`` make it an end)."""
    ending = None
    if kind == "anomaly_ended":
        ending = Ending(
            str(uuid.uuid4()), extra.pop("reason", "cleared"), extra.pop("duration_s", 10.0)
        )
    fields: dict[str, Any] = {
        "kind": kind,
        "seq": seq,
        "event_id": str(uuid.uuid4()),
        "origin": ORIGIN,
        "class_name": "imbalance",
        "anomaly": kind == "anomaly_started",
        "message": "Component is imbalanced",
        "probabilities": {
            "normal": 0.05,
            "imbalance": 0.93,
            "clogging": 0.01,
            "voltage_change": 0.01,
        },
        "probability_max": 0.97,
        "probability_mean": 0.93,
        "stream_start_s": 61.0,
        "stream_end_s": 71.0,
        "decided_stream_s": 71.0,
        "wall_start": _epoch("2024-05-01T12:00:03.000Z"),
        "wall_end": _epoch("2024-05-01T12:00:13.000Z"),
        "emitted_at": _epoch("2024-05-01T12:00:13.100Z"),
        "first_window_index": 61,
        "last_window_index": 61,
        "window_count": 1,
        "level": LOUD,
        "ending": ending,
    }
    fields.update(extra)
    return Event(**fields)


def state(index: int, **extra: Any) -> State:
    fields: dict[str, Any] = {
        "origin": ORIGIN,
        "window_index": index,
        "class_name": "imbalance",
        "anomaly": False,
        "message": "Component OK",
        "probabilities": {
            "normal": 0.19,
            "imbalance": 0.81,
            "clogging": 0.0,
            "voltage_change": 0.0,
        },
        "vote": "imbalance",
        "active_class": None,
        "anomaly_id": None,
        "warming_up": False,
        "stream_start_s": float(index),
        "stream_end_s": index + 10.0,
        "wall_start": None,
        "wall_end": None,
        "emitted_at": _epoch("2024-05-01T12:00:04.000Z"),
        "level": Level(rms_dbfs=-23.44, peak_dbfs=-8.0, clipping=True, silent=False),
    }
    fields.update(extra)
    return State(**fields)


def read_lines(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        for line in p.read_text(encoding="utf-8").splitlines():
            out.append(json.loads(line))
    return out


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records fsync calls (file and directory) made by the JSONL sink."""
    calls: list[int] = []
    real: Callable[[int], None] = os.fsync

    def recording(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr("soundwatch.sinks.jsonl.os.fsync", recording)
    return calls


# -- JSON Lines ---------------------------------------------------------------


def test_jsonl_rotation_keeps_every_event_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "events.jsonl"
    sink = jsonl(path, max_bytes=4000, backups=50)
    assert path.exists()  # created with its parents at start-up
    sent = [event(i) for i in range(1, 121)]
    futures = [sink.publish(m) for m in sent]
    assert all(f.done() and f.result() is None for f in futures)
    sink.close()

    files = sink.rotated_paths()
    assert len(files) > 3
    assert all(p.stat().st_size <= 4000 for p in files)
    # Oldest file last: read back in publishing order.
    got = read_lines(list(reversed(files)))
    assert [m["event_id"] for m in got] == [m.event_id for m in sent]
    assert got == [to_wire(m) for m in sent]  # the wire format, unchanged
    assert sink.health()["rotations"] == len(files) - 1


def test_jsonl_retention_drops_only_the_oldest_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = jsonl(path, max_bytes=2000, backups=2, fsync_events=False)
    sent = [event(i) for i in range(1, 61)]
    for m in sent:
        sink.publish(m).result()
    sink.close()
    files = sink.rotated_paths()
    assert [p.name for p in files] == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert not (tmp_path / "events.jsonl.3").exists()
    got = [m["seq"] for m in read_lines(list(reversed(files)))]
    # What is kept is the newest, contiguous and in order.
    assert got == list(range(61 - len(got), 61))


def test_jsonl_appends_across_restarts_and_repairs_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with jsonl(path) as sink:
        sink.publish(event(1)).result()
    with open(path, "ab") as f:
        f.write(b'{"torn": ')  # a crash in the middle of a line
    with jsonl(path) as sink:
        sink.publish(event(2)).result()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["seq"] == 1
    assert lines[1] == '{"torn": '
    assert json.loads(lines[2])["seq"] == 2


def test_jsonl_fsync_policy(tmp_path: Path, fsyncs: list[int]) -> None:
    now = [0.0]
    sink = jsonl(
        tmp_path / "e.jsonl",
        include_state=True,
        state_fsync_every=5,
        state_fsync_interval_s=30.0,
        clock=lambda: now[0],
    )
    fsyncs.clear()  # ignore the directory sync at creation
    for i in range(4):
        sink.publish(state(i)).result()  # resolved on write + flush
    assert fsyncs == [] and sink.health()["unsynced_lines"] == 4
    sink.publish(state(4)).result()  # the 5th state line completes a batch
    assert len(fsyncs) == 1 and sink.health()["unsynced_lines"] == 0
    sink.publish(state(5)).result()
    now[0] = 31.0
    sink.publish(state(6)).result()  # the oldest waiting line is 31 s old
    assert len(fsyncs) == 2
    sink.publish(event(1)).result()  # events are fsynced before they resolve
    assert len(fsyncs) == 3
    sink.publish(state(7)).result()
    assert len(fsyncs) == 3
    sink.close()  # close flushes what is waiting
    assert len(fsyncs) == 4 and sink.health()["unsynced_lines"] == 0


def test_jsonl_flush_returns_true_when_everything_is_on_disk(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    sink = jsonl(tmp_path / "e.jsonl", include_state=True, state_fsync_every=1000)
    fsyncs.clear()
    sink.publish(state(0)).result()
    assert sink.flush(timeout_s=1.0) is True
    assert len(fsyncs) == 1
    assert sink.flush() is True and len(fsyncs) == 1  # nothing waiting: no fsync
    sink.close()
    sink.close()  # idempotent


def test_jsonl_concurrent_publishes(tmp_path: Path) -> None:
    sink = jsonl(tmp_path / "e.jsonl", max_bytes=20_000, backups=100, fsync_events=False)
    per_thread, n_threads = 150, 8
    barrier = threading.Barrier(n_threads)
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            future = sink.publish(event(t * per_thread + i + 1))
            if future.exception() is not None:
                failures.append(future.exception())  # type: ignore[arg-type]

    threads = [
        threading.Thread(target=worker, args=(t,), name=f"pub-{t}") for t in range(n_threads)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    sink.close()
    assert failures == []
    got = read_lines(sink.rotated_paths())  # every line parses: none interleaved
    assert sorted(m["seq"] for m in got) == list(range(1, n_threads * per_thread + 1))
    assert sink.health()["published"] == n_threads * per_thread


def test_jsonl_failures_resolve_the_future_with_a_sink_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = jsonl(blocker / "events.jsonl")  # its parent is a file
    assert broken.health()["healthy"] is False
    future = broken.publish(event(1))
    error = future.exception()
    assert isinstance(error, SinkError) and isinstance(error.__cause__, OSError)
    assert broken.health()["failed"] == 2

    sink = jsonl(tmp_path / "ok.jsonl")
    not_json = sink.publish(event(1, probability_max=float("nan")))
    assert isinstance(not_json.exception(), SinkError)
    sink.close()
    late = sink.publish(event(2))
    assert isinstance(late.exception(), SinkError)
    assert "closed" in str(late.exception())


def test_jsonl_can_skip_state(tmp_path: Path) -> None:
    sink = jsonl(tmp_path / "e.jsonl", include_state=False)
    assert sink.publish(state(0)).result() is None
    sink.publish(event(1)).result()
    sink.close()
    assert [m["type"] for m in read_lines([tmp_path / "e.jsonl"])] == ["anomaly_started"]
    assert sink.health()["skipped"] == 1


def test_jsonl_config_errors(tmp_path: Path) -> None:
    """Bad settings are refused by the config model, before a sink exists."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="backups"):
        JsonlSinkConfig(path=tmp_path / "x", backups=0)
    with pytest.raises(ValidationError, match="max_bytes"):
        JsonlSinkConfig(path=tmp_path / "x", max_bytes=0)


# -- console ----------------------------------------------------------------


def test_console_lines() -> None:
    started = format_message(event(1), utc=True)
    assert started == (
        '12:00:13  ANOMALY STARTED  imbalance  "Component is imbalanced"  '
        "p_max=0.97 p_mean=0.93 (stream 61.0–71.0 s)"
    )
    ended = format_message(
        event(2, "anomaly_ended", stream_end_s=91.0, duration_s=30.0, reason="cleared"),
        utc=True,
    )
    assert ended == (
        '12:00:13  ANOMALY ENDED    imbalance  "Component is imbalanced"  '
        "p_max=0.97 p_mean=0.93 30.0 s cleared (stream 61.0–91.0 s)"
    )
    # No wall clock for the window: the time it was built is shown.
    assert format_message(state(62, active_class="imbalance"), utc=True) == (
        "12:00:04  state #62  imbalance 0.81  vote=imbalance  active=imbalance  -23.4 dBFS  CLIP"
    )


def test_console_sink_writes_events_and_optionally_state(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = make_sink(ConsoleSinkConfig())
    assert sink.publish(state(1)).result() is None  # skipped: show_state is off
    assert sink.publish(event(1)).result() is None
    sink.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "ANOMALY STARTED" in out[0]
    assert isinstance(sink.publish(event(2)).exception(), SinkError)

    buffer = io.StringIO()
    chatty = ConsoleSink(ConsoleSinkConfig(show_state=True), stream=buffer, utc=True)
    chatty.publish(state(5)).result()
    assert buffer.getvalue().startswith("12:00:04  state #5  ")
    health = chatty.health()
    assert health["type"] == "console" and health["published"] == 1 and health["healthy"]


def test_console_sink_lines_do_not_interleave() -> None:
    buffer = io.StringIO()
    sink = ConsoleSink(stream=buffer, utc=True)
    threads = [
        threading.Thread(target=lambda: [sink.publish(event(i)) for i in range(200)])
        for _ in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 800
    assert set(lines) == {format_message(event(1), utc=True)}


def test_console_reports_a_failed_write_through_the_future() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    sink = ConsoleSink(stream=Broken())
    future = sink.publish(event(1))
    assert isinstance(future.exception(), SinkError)
    assert "No space left" in str(future.exception())
    assert sink.health()["healthy"] is False


# -- choosing a sink -----------------------------------------------------------


def test_make_sink_by_type(tmp_path: Path) -> None:
    assert {"console", "jsonl", "mqtt", "iothub"} <= set(available_sink_types())
    sink = make_sink(JsonlSinkConfig(path=tmp_path / "e.jsonl", max_bytes=1024))
    assert isinstance(sink, JsonlSink) and sink.path == tmp_path / "e.jsonl"
    sink.close()

    class Kafka(BaseModel):
        type: Literal["kafka"] = "kafka"

    with pytest.raises(SinkConfigError, match=r"unknown sink type 'kafka'; choose one of"):
        make_sink(Kafka())


def test_register_sink_for_a_new_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registrations made here must not leak into other tests.
    monkeypatch.setattr(sinks_pkg, "_registry", dict(sinks_pkg._registry))

    class RecordingConfig(BaseModel):
        type: Literal["recording"] = "recording"
        topic: str

    class Recording(Sink):
        type_name = "recording"

        def __init__(self, config: RecordingConfig) -> None:
            super().__init__(name="recording", include_state=False)
            self.topic = config.topic
            self.got: list[Message] = []

        def publish(self, message: Message) -> Any:
            self.got.append(message)
            return resolved()

        def flush(self, timeout_s: float | None = None) -> bool:
            return True

        def close(self, timeout_s: float | None = None) -> None:
            pass

    register_sink("recording", Recording)
    sink = make_sink(RecordingConfig(topic="t"))
    assert isinstance(sink, Recording) and sink.topic == "t"
    sink.publish(event(1)).result()
    assert sink.got[0].seq == 1

    class BrokenConfig(BaseModel):
        type: Literal["broken"] = "broken"

    register_sink("broken", "soundwatch.sinks.no_such_module:Nothing")
    with pytest.raises(SinkConfigError, match="needs a package that is not installed"):
        make_sink(BrokenConfig())
