"""What Home Assistant sees of the module, through the real CLI and a real broker.

Home Assistant's MQTT integration is played by what it does on the wire: it
reads the retained discovery, status and state topics when it subscribes,
and publishes its birth message (``<discovery prefix>/status`` ``online``)
when it starts. Each case runs ``soundwatch run`` as a process against
mosquitto and watches with ``mosquitto_sub``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.httpkit import bundle_dir, write_wav
from tests.mosquitto import Certs, Mosquitto, Received, make_certs, running_broker, tools_available

pytestmark = pytest.mark.skipif(not tools_available(), reason="mosquitto is not installed")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    certs: Certs = make_certs(tmp_path_factory.mktemp("certs"))
    with running_broker(tmp_path_factory.mktemp("broker"), certs) as b:
        yield b


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """30 s of a simulated fan, normal and imbalanced (played at real time)."""
    d = tmp_path_factory.mktemp("clips")
    return {f: write_wav(d / f"{f}.wav", 30.0, 16000, fault=f) for f in ("normal", "imbalance")}


@pytest.fixture(autouse=True)
def _no_leftover_subscribers(broker: Mosquitto) -> Iterator[None]:
    yield
    broker.stop_subscribers()


def _payloads(messages: list[Received], topic: str, *, live: bool = False) -> list[object]:
    return [m.payload for m in messages if m.topic == topic and not (live and m.retain)]


class Module:
    """``soundwatch run`` on a clip at real time, publishing to the test broker."""

    def __init__(
        self, broker: Mosquitto, tmp_path: Path, device: str, clip: Path, *extra: str
    ) -> None:
        argv = [sys.executable, "-m", "soundwatch", "run", "--bundle", str(bundle_dir())]
        argv += ["--source", f"file:{clip}", "--realtime", *extra]
        argv += ["--state-dir", str(tmp_path / "state")]
        if "--config" not in extra:
            argv += ["--sink", f"mqtt://127.0.0.1:{broker.ports['plain']}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH")}
        env["SOUNDWATCH__DEVICE_ID"] = device
        # The classifier's own decisions (a fresh unit would first learn its baseline).
        env["SOUNDWATCH__BASELINE__ENABLED"] = "false"
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def modules() -> Iterator[list[Module]]:
    started: list[Module] = []
    yield started
    for m in started:
        m.stop(signal.SIGKILL)


def _active(messages: list[Received], topic: str) -> str | None:
    states = _payloads(messages, topic, live=True)
    return states[-1].get("active_class") if states else None  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_stopped_module_leaves_no_anomaly_in_the_retained_state(
    broker: Mosquitto, tmp_path: Path, modules: list[Module], clips: dict[str, Path]
) -> None:
    device = f"ha-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    sub = broker.subscribe([f"{base}/#"])
    module = Module(broker, tmp_path, device, clips["imbalance"])
    modules.append(module)
    sub.wait_for(lambda m: _active(m, f"{base}/state") == "imbalance", timeout_s=60)
    code, err = module.stop()
    assert code == 0, err[-3000:]
    sub.wait_for(lambda m: _payloads(m, f"{base}/status")[-1:] == ["offline"])
    late = broker.subscribe([f"{base}/state", f"{base}/status"])  # as HA after a restart
    got = late.wait_for(lambda m: len(m) >= 2)
    retained = {m.topic: m.payload for m in got if m.retain}
    assert retained[f"{base}/status"] == "offline"
    state = retained[f"{base}/state"]
    assert state["active_class"] is None and state["Anomaly"] is False, state  # type: ignore[index]
    assert state["Message"] == "Component OK"  # type: ignore[index]


@pytest.mark.slow
def test_after_a_crash_the_module_is_online_only_with_a_fresh_state(
    broker: Mosquitto, tmp_path: Path, modules: list[Module], clips: dict[str, Path]
) -> None:
    device = f"ha-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    sub = broker.subscribe([f"{base}/#"])
    crashed = Module(broker, tmp_path, device, clips["imbalance"])
    modules.append(crashed)
    sub.wait_for(lambda m: _active(m, f"{base}/state") == "imbalance", timeout_s=60)
    crashed.stop(signal.SIGKILL)  # no clean shutdown: the stale state stays retained
    sub.wait_for(lambda m: _payloads(m, f"{base}/status")[-1:] == ["offline"])  # the Will
    sub.stop()

    watch = broker.subscribe([f"{base}/state", f"{base}/status"])
    watch.wait_for(lambda m: len(m) >= 2)  # the retained pair, as HA gets it
    assert {m.topic: m.payload for m in watch.messages if m.retain}[f"{base}/state"][
        "active_class"  # type: ignore[index]
    ] == "imbalance"
    restarted = Module(broker, tmp_path, device, clips["normal"])
    modules.append(restarted)
    got = watch.wait_for(
        lambda m: "online" in _payloads(m, f"{base}/status", live=True), timeout_s=60
    )
    live = [m for m in got if not m.retain]
    online_at = next(i for i, m in enumerate(live) if m.payload == "online")
    fresh = [m.payload for m in live[:online_at] if m.topic == f"{base}/state"]
    assert fresh, f"online before any state of the new run: {[m.topic for m in live]}"
    assert fresh[-1]["active_class"] is None  # type: ignore[index]
    assert fresh[-1]["window_index"] == 0  # type: ignore[index]
    code, err = restarted.stop()
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_retain_false_works_with_a_home_assistant_that_starts_later(
    broker: Mosquitto, tmp_path: Path, modules: list[Module], clips: dict[str, Path]
) -> None:
    """Discovery is retained but status and state are not: HA's birth message brings both."""
    device = f"ha-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    ha = f"ha-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "soundwatch.yaml"
    config.write_text(
        "sinks:\n"
        f"  - {{type: mqtt, host: 127.0.0.1, port: {broker.ports['plain']}, retain: false,\n"
        f"     ha_discovery: {{enabled: true, prefix: {ha}}}}}\n",
        encoding="utf-8",
    )
    early = broker.subscribe([f"{base}/status"])
    module = Module(broker, tmp_path, device, clips["normal"], "--config", str(config))
    modules.append(module)
    early.wait_for(lambda m: "online" in _payloads(m, f"{base}/status"), timeout_s=60)
    # Home Assistant starts now: it finds the discovery (retained) and nothing else ...
    hass = broker.subscribe([f"{ha}/#", f"{base}/status", f"{base}/state"])
    discovery = hass.wait_for(lambda m: len(m) >= 6)
    assert all(m.topic.startswith(f"{ha}/") and m.retain for m in discovery)
    assert not hass.wait_until(lambda m: bool(_payloads(m, f"{base}/status")), timeout_s=1.5)
    # ... and says it is there: the module answers with its status and state.
    broker.publish(f"{ha}/status", "online")
    got = hass.wait_for(
        lambda m: (
            "online" in _payloads(m, f"{base}/status") and bool(_payloads(m, f"{base}/state"))
        ),
        timeout_s=10,
    )
    state = _payloads(got, f"{base}/state")[-1]
    assert state["type"] == "state" and state["device_id"] == device  # type: ignore[index]
    code, err = module.stop()
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_ha_discovery_from_the_command_line(
    broker: Mosquitto, tmp_path: Path, modules: list[Module], clips: dict[str, Path]
) -> None:
    device = f"ha-{uuid.uuid4().hex[:6]}"
    sub = broker.subscribe([f"homeassistant/+/soundwatch_{device}/+/config"])
    module = Module(broker, tmp_path, device, clips["normal"], "--ha-discovery")
    modules.append(module)
    got = sub.wait_for(lambda m: len(m) >= 6, timeout_s=30)
    assert {m.topic.split("/")[1] for m in got} == {"binary_sensor", "sensor"}
    assert all(m.payload["state_topic"] == f"soundwatch/{device}/state" for m in got)  # type: ignore[index]
    code, err = module.stop()
    assert code == 0, err[-3000:]
    # Without an MQTT sink the flag is a usage error, not silently ignored.
    proc = subprocess.run(
        [sys.executable, "-m", "soundwatch", "run", "--source", "simulator", "--ha-discovery"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--ha-discovery applies to --sink mqtt://" in proc.stderr
