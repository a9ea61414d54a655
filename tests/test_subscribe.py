"""tools/subscribe.py against a real mosquitto: what a dashboard builder would see.

A broker is started on a free loopback port; the module's topics are
published the way the MQTT sink publishes them (retained status, health and
state; events at QoS 1), and the subscriber must show them in each view.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSCRIBE = REPO / "tools" / "subscribe.py"
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed")
if MOSQUITTO is None:
    pytest.skip("mosquitto is not installed (apt-get install mosquitto)", allow_module_level=True)

DEVICE = "line-3-fan-7"
HEALTH = {
    "healthy": True,
    "source": {"healthy": True, "state": "running", "overflows": 2},
    "model": {"healthy": True, "version": "fan@1"},
    "sinks": {"mqtt": {"healthy": True, "outbox_depth": 3}},
}
STATE = {
    "type": "state",
    "class": "imbalance",
    "Message": "Component is imbalanced",
    "Anomaly": True,
    "Probabilities": {"normal": 0.05, "imbalance": 0.9, "clogging": 0.03, "voltage_change": 0.02},
    "active_class": "imbalance",
    "level": {"rms_dbfs": -31.2, "peak_dbfs": -18.4, "clipping": False, "silent": False},
}
EVENT = {
    "type": "anomaly_started",
    "seq": 42,
    "class": "imbalance",
    "Message": "Component is imbalanced",
    "emitted_at": "2026-11-22T10:00:00Z",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    d = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    assert MOSQUITTO is not None
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("mosquitto did not start")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _publish(port: int) -> None:
    import paho.mqtt.publish as publish

    prefix = f"soundwatch/{DEVICE}"
    publish.multiple(
        [
            {"topic": f"{prefix}/status", "payload": "online", "qos": 1, "retain": True},
            {"topic": f"{prefix}/health", "payload": json.dumps(HEALTH), "qos": 1, "retain": True},
            {"topic": f"{prefix}/state", "payload": json.dumps(STATE), "qos": 1, "retain": True},
        ],
        hostname="127.0.0.1",
        port=port,
    )


def _subscribe(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUBSCRIBE), "--host", "127.0.0.1", "--port", str(port), *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_json_view_shows_retained_topics_and_live_events(broker: int) -> None:
    import paho.mqtt.publish as publish

    _publish(broker)
    argv = [sys.executable, str(SUBSCRIBE), "--host", "127.0.0.1", "--port", str(broker)]
    proc = subprocess.Popen(
        [*argv, "--view", "json", "--count", "4", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "subscribed to soundwatch/+/#" in proc.stderr.readline()
    publish.single(
        f"soundwatch/{DEVICE}/events", json.dumps(EVENT), qos=1, hostname="127.0.0.1", port=broker
    )
    out, _ = proc.communicate(timeout=25)
    assert proc.returncode == 0
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    by_topic = {d["topic"].rsplit("/", 1)[1]: d for d in lines}
    assert set(by_topic) == {"status", "health", "state", "events"}
    assert by_topic["status"]["payload"] == "online" and by_topic["status"]["retained"]
    assert by_topic["state"]["payload"] == STATE
    assert by_topic["events"]["payload"] == EVENT and not by_topic["events"]["retained"]


def test_live_and_log_views_render_the_device(broker: int) -> None:
    _publish(broker)
    log = _subscribe(broker, "--view", "log", "--count", "3", "--timeout", "20")
    assert log.returncode == 0, log.stderr
    assert f"soundwatch/{DEVICE}/health (retained)" in log.stdout
    assert '"outbox_depth": 3' in log.stdout

    live = _subscribe(broker, "--view", "live", "--count", "3", "--timeout", "20", "--no-color")
    assert live.returncode == 0, live.stderr
    screen = live.stdout.rsplit("\x1b[2J", 1)[-1]
    assert f"{DEVICE}  status online  health healthy  source running (2 overflows)" in screen
    assert "mqtt outbox 3" in screen
    assert "ACTIVE ANOMALY: imbalance" in screen
    assert "imbalance" in screen and "0.900" in screen
    assert "last payload" in screen


def test_unreachable_broker_exits_1() -> None:
    proc = _subscribe(_free_port(), "--view", "json", "--timeout", "5")
    assert proc.returncode == 1
    assert "cannot connect" in proc.stderr
