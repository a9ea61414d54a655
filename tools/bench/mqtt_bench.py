"""Section "mqtt": publish throughput and end-to-end latency to a subscriber, QoS 1, loopback.

A private mosquitto runs on a free loopback port; a real ``mosquitto_sub``
(its own process) timestamps every message as it prints it (``@s.@N``).

* Throughput: a burst of anomaly events through :class:`MqttSink`: each is
  written to the SQLite outbox (fsynced) on the calling thread, sent with QoS 1
  and counted when the broker's PUBACK has removed it from the outbox.
  Also the cost of one ``publish()`` call on the pipeline thread.
* Latency: the real :class:`~soundwatch.app.Runtime` (resampling, streaming
  features, LiteRT inference, decision, events, outbox, MQTT) on a source that
  delivers 0.1 s blocks at twice real time and stamps each with the time it
  was handed over, like a live microphone. The classifier's output is
  scripted (after running the real model) so that every window starts or ends
  an anomaly: an event per window. Latency = the subscriber's timestamp minus
  an ``anomaly_started`` event's ``time_end`` (the wall-clock end of the
  window that decided it, millisecond resolution).

There is no the reference service's counterpart (the reference service printed to stdout).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.bench.core import Context, Row, Stat

if TYPE_CHECKING:
    from soundwatch.events import Event

BLOCK_S = 0.1
SPEED = 2.0  # blocks arrive at twice real time, so windows come every 125 ms at hop 0.25 s
HOP_S = 0.25


def run(ctx: Context) -> list[Row]:
    missing = [t for t in ("mosquitto", "mosquitto_sub") if not _which(t)]
    if missing:
        print(f"  mqtt: {missing} not installed; skipping", file=sys.stderr, flush=True)
        return _skipped(f"skipped: {', '.join(missing)} not installed (apt-get install "
                        "mosquitto mosquitto-clients)")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="sw-bench-mqtt-"))
    broker = _Broker(workdir)
    try:
        burst = ctx.reps(2000, 300)
        reps = ctx.reps(3, 2)
        rates, calls = _throughput(broker, workdir, burst, reps)
        events = ctx.reps(50, 15)  # anomaly starts; as many ends come with them
        latencies, delivery = _latency(ctx, broker, workdir, events)
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return [
        Row(
            "MQTT publish throughput (QoS 1)",
            "events/s",
            None,
            Stat.of(rates),
            f"a burst of {burst} anomaly events (~1 KB JSON) through MqttSink, "
            f"from the first publish() to the last PUBACK (outbox empty); {reps} bursts. "
            "Each event is fsynced into the SQLite outbox first; up to max_inflight=20 "
            "await PUBACK at once. Loopback mosquitto 2.0.",
            extra={"events_per_burst": burst},
        ),
        Row(
            "publish() on the pipeline thread",
            "ms",
            None,
            Stat.of(calls),
            "one MqttSink.publish(event): JSON encode + SQLite insert (WAL, synchronous=FULL, "
            "so one fsync) + waking the sink's worker; no network on this thread",
        ),
        Row(
            "end-to-end: window end → subscriber",
            "ms",
            None,
            Stat.of(latencies),
            f"{len(latencies)} anomaly_started events from the real Runtime (resample 16→22.05 "
            "kHz, "
            "streaming features, LiteRT int8 inference, decision, event, outbox, QoS 1) "
            "to a mosquitto_sub process on the same host: its print timestamp minus the "
            "event's time_end (the end of the window that decided it; ms resolution). "
            f"Source at 2× real time, hop {HOP_S} s, an event (start or end) per window.",
        ),
        Row(
            "  of which event built → subscriber",
            "ms",
            None,
            Stat.of(delivery),
            f"{len(delivery)} events (starts and ends): subscriber timestamp minus emitted_at "
            "(the message's build time): outbox, worker, paho, broker, mosquitto_sub",
        ),
    ]


def _skipped(note: str) -> list[Row]:
    return [Row("MQTT publish throughput (QoS 1)", "events/s", None, None, note)]


# -- throughput --------------------------------------------------------------------------


def _throughput(
    broker: _Broker, workdir: Path, burst: int, reps: int
) -> tuple[list[float], list[float]]:
    from soundwatch.config import MqttSinkConfig
    from soundwatch.sinks.mqtt import MqttSink

    rates: list[float] = []
    calls: list[float] = []
    for rep in range(reps):
        prefix = f"bench/{uuid.uuid4().hex[:8]}"
        sub = _Subscriber(broker, f"{prefix}/events")
        config = MqttSinkConfig(
            host="127.0.0.1",
            port=broker.port,
            topic_prefix=prefix,
            client_id=f"bench-{uuid.uuid4().hex[:8]}",
            outbox={"path": workdir / f"tp-{rep}.sqlite3"},
            health_interval_s=3600,
        )
        sink = MqttSink(config, env={})
        try:
            _wait(lambda s=sink: bool(s.health()["connected"]), 10)
            events = [_event(i) for i in range(burst + 20)]
            for f in [sink.publish(e) for e in events[:20]]:  # warm-up
                f.result(30)
            futures = []
            t0 = time.perf_counter()
            for e in events[20:]:
                c0 = time.perf_counter()
                futures.append(sink.publish(e))
                calls.append((time.perf_counter() - c0) * 1e3)
            for f in futures:
                f.result(120)
            rates.append(burst / (time.perf_counter() - t0))
            sub.wait_count(burst + 20, 60)
        finally:
            sink.close(10)
            sub.stop()
        print(f"  mqtt throughput {rep + 1}/{reps}: {rates[-1]:.0f} events/s",
              file=sys.stderr, flush=True)  # fmt: skip
    return rates, calls


def _event(i: int) -> Event:
    """An anomaly event of the real schema's size (the values do not matter here)."""
    from soundwatch.events import Event, Origin
    from soundwatch.stream_types import Level

    return Event(
        kind="anomaly_started",
        seq=i + 1,
        event_id=str(uuid.uuid4()),
        origin=Origin("bench", "soundwatch", "fan@bench"),
        class_name="imbalance",
        anomaly=True,
        message="Component is imbalanced",
        probabilities={"normal": 0.05, "imbalance": 0.91, "clogging": 0.02, "voltage_change": 0.02},
        probability_max=0.97,
        probability_mean=0.91,
        stream_start_s=100.0 + i,
        stream_end_s=114.0 + i,
        decided_stream_s=114.0 + i,
        wall_start=1_714_564_803.0,
        wall_end=1_714_564_813.0,
        emitted_at=1_714_564_813.1,
        first_window_index=i,
        last_window_index=i + 4,
        window_count=5,
        level=Level(rms_dbfs=-23.4, peak_dbfs=-8.0, clipping=False, silent=False),
    )


# -- end-to-end latency ------------------------------------------------------------------


def _latency(
    ctx: Context, broker: _Broker, workdir: Path, events: int
) -> tuple[list[float], list[float]]:
    import soundfile as sf

    from soundwatch.app import Runtime
    from soundwatch.bundle import load_bundle
    from soundwatch.config import Config

    bundle = load_bundle(ctx.fixtures.bundle_dir)
    fault = next(c.name for c in bundle.classes if c.anomaly)
    normal = next(c.name for c in bundle.classes if not c.anomaly)
    device = f"bench-{uuid.uuid4().hex[:6]}"
    config = Config.model_validate(
        {
            "device_id": device,
            "state_dir": str(workdir / "state"),
            "model": {"bundle": str(ctx.fixtures.bundle_dir), "threads": 1},
            "window": {"hop_s": HOP_S},
            "decision": {
                "confirm_k": 1,
                "confirm_n": 1,
                "cooldown_s": 0,
                "thresholds": {fault: {"on": 0.5, "off": 0.3}},
            },
            "sinks": [
                {
                    "type": "mqtt",
                    "host": "127.0.0.1",
                    "port": broker.port,
                    "health_interval_s": 3600,
                    "include_state": False,
                }
            ],
        }
    )
    audio, rate = sf.read(str(ctx.fixtures.clips[0]), dtype="float32", always_2d=True)
    source = _paced_source(audio[:, 0], int(rate))
    runtime = Runtime(config, bundle=bundle, source=source)
    real_predict = runtime.classifier.predict
    n = len(bundle.class_names)
    scripted = [np.full(n, 0.02, dtype=np.float32) for _ in range(2)]
    scripted[0][bundle.class_names.index(fault)] = 0.9
    scripted[1][bundle.class_names.index(normal)] = 0.9
    windows = [0]

    def predict(features: Any) -> Any:
        real_predict(features)  # the real inference cost, then a scripted verdict
        windows[0] += 1
        return scripted[windows[0] % 2]

    runtime.classifier.predict = predict  # type: ignore[method-assign]
    sub = _Subscriber(broker, f"soundwatch/{device}/events")
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), name="bench-pipeline")
    thread.start()
    try:
        got = sub.wait_count(2 * events, 60 + events)
    finally:
        stop.set()
        thread.join(30)
        sub.stop()
    latencies: list[float] = []
    delivery: list[float] = []
    seen: set[str] = set()
    for received_at, doc in got:
        if doc["event_id"] in seen:
            continue
        seen.add(doc["event_id"])
        delivery.append((received_at - _epoch(doc["emitted_at"])) * 1e3)
        # An anomaly_started event's time_end is the end of the window that
        # decided it; an anomaly_ended's is the last window with the anomaly,
        # one hop before the deciding one, so only starts measure this.
        if doc["type"] == "anomaly_started":
            latencies.append((received_at - _epoch(doc["time_end"])) * 1e3)
    print(f"  mqtt latency: {len(latencies)} events", file=sys.stderr, flush=True)
    return latencies, delivery


def _paced_source(samples: Any, rate_hz: int) -> Any:
    """A live-like source: 0.1 s blocks at SPEED × real time, stamped when handed over."""
    from soundwatch.sources.base import Source
    from soundwatch.stream_types import AudioBlock

    class PacedSource(Source):
        def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
            self._update_health(healthy=True, state="running")
            step = int(self.sample_rate_hz * BLOCK_S)
            position = 0
            next_at = time.monotonic()
            while not self._stopping(stop):
                start = position % len(samples)
                chunk = np.take(samples, range(start, start + step), mode="wrap")
                next_at += BLOCK_S / SPEED
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                yield AudioBlock(
                    chunk.astype(np.float32), position, self.sample_rate_hz, False, time.time()
                )
                position += step

    return PacedSource("bench-paced", rate_hz)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- a private broker and subscriber -------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


class _Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        conf = workdir / "mosquitto.conf"
        user = [f"user {pwd.getpwuid(os.geteuid()).pw_name}"] if os.geteuid() == 0 else []
        conf.write_text("\n".join([*user, f"listener {self.port} 127.0.0.1",
                                   "allow_anonymous true", "max_queued_messages 100000",
                                   "log_dest none", ""]))  # fmt: skip
        self._proc = subprocess.Popen(
            [_which("mosquitto") or "mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(self._listening, 5)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


class _Subscriber:
    """mosquitto_sub printing ``<epoch seconds>.<ns> <payload>`` per message."""

    def __init__(self, broker: _Broker, topic: str) -> None:
        import json

        self._json = json
        self._proc = subprocess.Popen(
            [_which("mosquitto_sub") or "mosquitto_sub", "-h", "127.0.0.1", "-p",
             str(broker.port), "-q", "1", "-t", topic, "-F", "@s.@N %p"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="bench-sub", daemon=True)
        self._reader.start()
        time.sleep(0.2)  # let it subscribe before the first publish

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            stamp, _, payload = line.partition(" ")
            with self._cond:
                self.messages.append((float(stamp), self._json.loads(payload)))
                self._cond.notify_all()

    def wait_count(self, n: int, timeout_s: float) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout_s):
                raise RuntimeError(f"subscriber got {len(self.messages)} of {n} messages")
            return list(self.messages)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
