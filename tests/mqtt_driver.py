"""A module process for the MQTT tests: real anomaly events through MqttSink and its outbox.

Run as ``python tests/mqtt_driver.py CONFIG_JSON STATE_DIR``. CONFIG_JSON is an
``MqttSinkConfig`` mapping (validated by the real config schema and resolved
against STATE_DIR, as ``soundwatch run`` does). The driver builds events with
the real :class:`~soundwatch.events.EventFactory` and a persistent sequence
counter in STATE_DIR, so ``seq`` continues across restarts, exactly like the
module. It reads commands on stdin and answers with one JSON line each:

``emit N``      build and publish N events (alternating anomaly_started and
                anomaly_ended); answers ``{"enqueued": [{"seq", "event_id"}, ...]}``
``wait_connected T``  ``{"connected": bool}`` once connected (or after T s)
``flush T``     ``{"flushed": bool}``
``health``      ``{"health": {...}}``
``close T``     close the sink and exit 0

The driver does not stop on its own: tests end it with ``close`` or ``kill -9``.
:class:`Driver` starts and talks to one from a test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from soundwatch.config import Config
from soundwatch.decision import AnomalyEnded, AnomalyStarted
from soundwatch.events import EventFactory, SequenceCounter
from soundwatch.sinks import make_sink
from soundwatch.stream_types import Level

CLASSES = ("normal", "imbalance", "clogging", "voltage_change")
MESSAGES = {
    "normal": "Fan operating normally",
    "imbalance": "Component is imbalanced",
    "clogging": "Air flow is clogged",
    "voltage_change": "Voltage changed",
}


class Driver:
    """A running driver process (see the module docstring)."""

    def __init__(self, sink_config: dict[str, Any], state_dir: Path) -> None:
        repo = Path(__file__).resolve().parents[1]
        self.stderr_path = state_dir / f"driver-{time.monotonic_ns()}.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__)), json.dumps(sink_config), str(state_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=repo,
                env={**os.environ, "PYTHONPATH": str(repo)},
            )

    def ask(self, command: str) -> dict[str, Any]:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver exited ({proc.wait()}):\n{self.log()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def emit(self, n: int) -> list[dict[str, Any]]:
        enqueued: list[dict[str, Any]] = self.ask(f"emit {n}")["enqueued"]
        return enqueued

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Ends the process whatever its state (for test clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


def report(index: int, anomaly_id: str) -> dict[str, Any]:
    t0 = 100.0 + 30.0 * index
    return {
        "anomaly_id": anomaly_id,
        "class_name": CLASSES[1 + index % 3],
        "first_window_index": 10 * index,
        "last_window_index": 10 * index + 4,
        "window_count": 5,
        "stream_start_s": t0,
        "stream_end_s": t0 + 14.0,
        "wall_start": time.time() - 14.0,
        "wall_end": time.time(),
        "probability_max": 0.97,
        "probability_mean": 0.91,
        "mean_probabilities": (0.05, 0.91, 0.02, 0.02),
        "level": Level(rms_dbfs=-23.0, peak_dbfs=-6.0, clipping=False, silent=False),
        "decided_stream_s": t0 + 14.0,
    }


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s driver %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    sink_config = json.loads(sys.argv[1])
    state_dir = Path(sys.argv[2])
    config = Config.model_validate(
        {"device_id": "driver", "state_dir": str(state_dir), "sinks": [sink_config]}
    )
    sink = make_sink(config.sinks[0])
    factory = EventFactory(
        "driver",
        "soundwatch",
        "fan@test",
        CLASSES,
        MESSAGES,
        SequenceCounter(state_dir / "sequence", block_size=1),
    )
    count = 0
    open_anomaly: str | None = None

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "emit":
            out = []
            for _ in range(int(arg)):
                if open_anomaly is None:
                    open_anomaly = str(uuid.uuid4())
                    msg = factory.build(AnomalyStarted(**report(count, open_anomaly)))
                else:
                    msg = factory.build(
                        AnomalyEnded(**report(count, open_anomaly), reason="cleared")
                    )
                    open_anomaly = None
                count += 1
                sink.publish(msg)
                out.append({"seq": msg.seq, "event_id": msg.event_id, "type": msg.kind})
            answer({"enqueued": out})
        elif cmd == "wait_connected":
            deadline = time.monotonic() + float(arg or 10)
            while not sink.health()["connected"] and time.monotonic() < deadline:
                time.sleep(0.02)
            answer({"connected": bool(sink.health()["connected"])})
        elif cmd == "flush":
            answer({"flushed": sink.flush(float(arg or 10))})
        elif cmd == "health":
            answer({"health": sink.health()})
        elif cmd == "close":
            sink.close(float(arg or 10))
            answer({"closed": True})
            return 0
        else:
            answer({"error": f"unknown command {cmd!r}"})
    sink.close(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
