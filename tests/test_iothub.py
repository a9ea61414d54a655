"""The IoT Hub sink with the real azure-iot-device SDK against a fake edgeHub.

The fake edgeHub (verified-recipes §2) is a real mosquitto with a TLS listener
(server certificate for ``localhost``, no client certificate: the SDK
authenticates with a SAS token as MQTT password, which mosquitto ignores) and a
plain listener. The module's client is made by
``IoTHubModuleClient.create_from_edge_environment()`` from the IoT Edge
simulator variables ``EdgeHubConnectionString`` / ``EdgeModuleCACertificateFile``.
A small paho client on the plain listener plays the hub's side: it answers
``$iothub/twin/GET`` with a twin, acknowledges reported-property patches, sends
desired-property patches and direct-method requests, and records the
messages the module sends on ``devices/<d>/modules/<m>/messages/events/...``.

The SDK always connects to port 8883; so that tests can run side by side, the
test redirects paho's connect to 8883 on localhost to the broker's free TLS
port. Nothing else of the SDK is touched.

Runs only where azure-iot-device is installed: ``tools/paho1-venv.sh`` builds
that venv (the SDK pins paho-mqtt < 2); elsewhere the module is skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.iot.device")

import paho.mqtt.client as paho

from soundwatch.channels.iothub import IotHubChannel
from soundwatch.config import (
    RESTART_ONLY,
    Config,
    ConfigError,
    IotHubSinkConfig,
    apply_patch,
    validate,
)
from soundwatch.control import ControlPlane
from soundwatch.decision import AnomalyEnded, AnomalyStarted
from soundwatch.events import Event, EventFactory, Origin, SequenceCounter, State, to_wire
from soundwatch.sinks import make_sink
from soundwatch.sinks.iothub import (
    MAX_MESSAGE_BYTES,
    IotHubSink,
    message_properties,
    severity,
)
from soundwatch.stream_types import Level
from tests.mosquitto import Certs, Mosquitto, make_certs, tools_available
from tests.mqtt_driver import CLASSES, MESSAGES, report

pytestmark = pytest.mark.skipif(
    not tools_available(), reason="needs mosquitto, mosquitto-clients and openssl"
)
DEVICE, MODULE = "dev1", "soundwatch"
SDK_PORT = 8883


class EdgeHubBroker(Mosquitto):
    """mosquitto as edgeHub: TLS without client certificates (SAS tokens are passwords)."""

    def _config(self) -> str:
        c = self.certs
        return "\n".join(
            [
                *[line for line in super()._config().splitlines() if line.startswith("user ")],
                "per_listener_settings false",
                "allow_anonymous true",
                # edgeHub keeps sessions (the SDK connects with clean_session=False
                # and does not resubscribe after a reconnect).
                "persistence true",
                f"persistence_location {self.workdir / 'data'}/",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                f"listener {self.ports['plain']} 127.0.0.1",
                f"listener {self.ports['tls']} 127.0.0.1",
                f"cafile {c.ca}",
                f"certfile {c.server_cert}",
                f"keyfile {c.server_key}",
                f"listener {self.ports['auth']} 127.0.0.1",
                "",
            ]
        )


@dataclass
class Sent:
    topic: str
    output: str | None
    properties: dict[str, str]
    body: Any


class FakeHub:
    """The hub's side of twin, methods and module messages (a paho client on the broker)."""

    def __init__(self, port: int, desired: dict[str, Any]) -> None:
        self.desired = dict(desired)
        self.reported: list[dict[str, Any]] = []
        self.messages: list[Sent] = []
        self.twin_gets = 0
        self._responses: dict[str, tuple[int, Any]] = {}
        self._cond = threading.Condition()
        self._client = paho.Client(client_id=f"fake-hub-{uuid.uuid4().hex[:6]}")
        self._subscribed = threading.Event()
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._subscribed.wait(5), "the fake hub could not subscribe"

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        """(Re)subscribe on every connect: the broker may have been restarted."""
        topics = (
            "$iothub/twin/GET/#",
            "$iothub/twin/PATCH/properties/reported/#",
            "$iothub/methods/res/#",
            f"devices/{DEVICE}/modules/{MODULE}/messages/events/#",
        )
        client.subscribe([(t, 1) for t in topics])

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        query = dict(urllib.parse.parse_qsl(topic.partition("?")[2]))
        rid = query.get("$rid", "")
        if topic.startswith("$iothub/twin/GET/"):
            self.twin_gets += 1
            twin = {"desired": self.desired, "reported": {"$version": len(self.reported) + 1}}
            self._client.publish(f"$iothub/twin/res/200/?$rid={rid}", json.dumps(twin), qos=1)
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            with self._cond:
                self.reported.append(json.loads(msg.payload))
                self._cond.notify_all()
            version = len(self.reported) + 1
            self._client.publish(f"$iothub/twin/res/204/?$rid={rid}&$version={version}", b"", qos=1)
        elif topic.startswith("$iothub/methods/res/"):
            status = int(topic.split("/")[3])
            with self._cond:
                self._responses[rid] = (status, json.loads(msg.payload) if msg.payload else None)
                self._cond.notify_all()
        elif "/messages/events/" in topic:
            props = dict(
                urllib.parse.parse_qsl(
                    topic.split("/messages/events/", 1)[1], keep_blank_values=True
                )
            )
            sent = Sent(topic, props.pop("$.on", None), props, json.loads(msg.payload))
            with self._cond:
                self.messages.append(sent)
                self._cond.notify_all()

    def send_desired_patch(self, patch: dict[str, Any]) -> None:
        version = int(self.desired.get("$version", 1)) + 1
        self.desired = {**_merge(self.desired, patch), "$version": version}
        body = {**patch, "$version": version}
        self._client.publish(
            f"$iothub/twin/PATCH/properties/desired/?$version={version}", json.dumps(body), qos=1
        ).wait_for_publish(5)

    def call(self, method: str, payload: Any, timeout_s: float = 10.0) -> tuple[int, Any]:
        rid = uuid.uuid4().hex[:8]
        self._client.publish(
            f"$iothub/methods/POST/{method}/?$rid={rid}", json.dumps(payload), qos=1
        ).wait_for_publish(5)
        with self._cond:
            assert self._cond.wait_for(lambda: rid in self._responses, timeout_s), (
                f"no answer to {method}"
            )
            return self._responses.pop(rid)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout_s), "timed out"


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


class FakeRuntime:
    """What the control plane needs of the runtime, with the real config validation."""

    def __init__(self, state_dir: Path) -> None:
        self.config = Config(device_id=DEVICE, state_dir=state_dir)
        self.sources: list[str] = []
        self.events: list[Event] = []

    def apply_patch(self, patch: Mapping[str, Any], source: str = "<patch>") -> Config:
        self.config = apply_patch(self.config, patch, source)
        self.sources.append(source)
        return self.config

    def health(self) -> dict[str, Any]:
        return {"healthy": True, "windows": 7}

    def recent_events(self, limit: int = 50, before_seq: int | None = None) -> list[Event]:
        items = list(reversed(self.events))
        if before_seq is not None:
            items = [e for e in items if e.seq < before_seq]
        return items[:limit]

    def model_info(self) -> dict[str, Any]:
        return {"name": "fan", "version": "fan@test", "classes": list(CLASSES)}

    def counters(self) -> dict[str, Any]:
        return {"windows": 7, "events": {"anomaly_started:imbalance": 1}}


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[EdgeHubBroker]:
    b = EdgeHubBroker(tmp_path_factory.mktemp("edgehub"), certs)
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def edge_env(monkeypatch: pytest.MonkeyPatch, broker: EdgeHubBroker, certs: Certs) -> None:
    key = base64.b64encode(b"not-a-real-key-0123456789abcdef").decode()
    monkeypatch.setenv(
        "EdgeHubConnectionString",
        f"HostName=hub.local;GatewayHostName=localhost;DeviceId={DEVICE};"
        f"ModuleId={MODULE};SharedAccessKey={key}",
    )
    monkeypatch.setenv("EdgeModuleCACertificateFile", str(certs.ca))
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    real_connect = paho.Client.connect
    tls_port = broker.ports["tls"]

    def connect(self: paho.Client, host: str, port: int = 1883, *a: Any, **kw: Any) -> Any:
        if host == "localhost" and port == SDK_PORT:
            port = tls_port
        return real_connect(self, host, port, *a, **kw)

    monkeypatch.setattr(paho.Client, "connect", connect)


@pytest.fixture
def hub(broker: EdgeHubBroker) -> Iterator[FakeHub]:
    h = FakeHub(broker.ports["plain"], {"decision": {"confirm_k": 2}, "$version": 3})
    yield h
    h.close()


@pytest.fixture
def make_iothub(edge_env: None, tmp_path: Path) -> Iterator[Callable[..., IotHubSink]]:
    made: list[IotHubSink] = []

    def make(**options: Any) -> IotHubSink:
        config = Config.model_validate(
            {
                "device_id": DEVICE,
                "state_dir": str(tmp_path),
                "sinks": [
                    {
                        "type": "iothub",
                        "state_min_interval_s": 0.2,
                        "connect_timeout_s": 3.0,
                        "reconnect": {"min_delay_s": 0.2, "max_delay_s": 1.0},
                        **options,
                    }
                ],
            }
        )
        sink = make_sink(config.sinks[0])
        assert isinstance(sink, IotHubSink)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(1.0)


Commands = Callable[[IotHubSink, FakeRuntime], IotHubChannel]


@pytest.fixture
def commands() -> Iterator[Commands]:
    """Twin and methods of a sink, through a control plane over a runtime (closed after)."""
    made: list[tuple[ControlPlane, IotHubChannel]] = []

    def open_(sink: IotHubSink, runtime: FakeRuntime) -> IotHubChannel:
        control = ControlPlane(runtime).start()
        made.append((control, IotHubChannel(sink, control)))
        return made[-1][1]

    yield open_
    for control, channel in made:
        channel.close()
        control.close()


def _factory(tmp_path: Path) -> EventFactory:
    return EventFactory(
        DEVICE, MODULE, "fan@test", CLASSES, MESSAGES, SequenceCounter(tmp_path / "seq")
    )


def _started(factory: EventFactory, index: int, p_max: float = 0.97) -> Event:
    r = {**report(index, str(uuid.uuid4())), "probability_max": p_max}
    return factory.build(AnomalyStarted(**r))


def _wait(predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- unit: properties -------------------------------------------------------------------


def test_severity_and_properties(tmp_path: Path) -> None:
    f = _factory(tmp_path)
    assert severity(_started(f, 0, 0.95)) == "high"
    assert severity(_started(f, 0, 0.75)) == "medium"
    assert severity(_started(f, 0, 0.5)) == "low"
    ended = f.build(AnomalyEnded(**report(1, str(uuid.uuid4())), reason="cleared"))
    assert message_properties(ended) == {
        "type": "anomaly_ended",
        "anomaly": "false",  # an end is not an anomaly (on purpose; was "true")
        "class": ended.class_name,
        "severity": "info",
    }


def test_config_defaults_and_outbox_path(tmp_path: Path) -> None:
    config = Config.model_validate({"state_dir": str(tmp_path), "sinks": [{"type": "iothub"}]})
    sink = config.sinks[0]
    assert sink.outbox.path == tmp_path / "outbox-iothub.sqlite3"
    with pytest.raises(ConfigError, match="share the outbox"):
        validate(
            {"sinks": [{"type": "iothub", "name": "a"}, {"type": "mqtt", "host": "h", "name": "a"}]}
        )
    with pytest.raises(ConfigError, match=r"sinks\.0\.event_output"):
        validate({"sinks": [{"type": "iothub", "event_output": "x"}]})


def test_no_identity_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from soundwatch.sinks import SinkConfigError

    for name in ("EdgeHubConnectionString", "IOTEDGE_MODULEID", "IOTHUB_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SinkConfigError, match="no connection string"):
        IotHubSink(IotHubSinkConfig(outbox={"path": tmp_path / "o.sqlite3"}))


# -- end to end against the fake edgeHub --------------------------------------------------


def test_events_reach_the_anomalies_output_with_properties(
    make_iothub: Callable[..., IotHubSink], hub: FakeHub, tmp_path: Path
) -> None:
    sink = make_iothub()
    f = _factory(tmp_path)
    events = [_started(f, 0, 0.95), _started(f, 1, 0.75)]
    futures = [sink.publish(e) for e in events]
    for future in futures:
        assert future.result(20) is None
    assert sink.outbox.depth() == 0
    hub.wait_for(lambda: len([m for m in hub.messages if m.output == "anomalies"]) >= 2)
    got = [m for m in hub.messages if m.output == "anomalies"]
    assert got[0].topic.startswith(f"devices/{DEVICE}/modules/{MODULE}/messages/events/")
    assert [m.body for m in got] == [to_wire(e) for e in events]
    assert got[0].properties["$.ct"] == "application/json"
    assert got[0].properties["$.ce"] == "utf-8"
    assert {k: got[0].properties[k] for k in ("anomaly", "class", "severity", "type")} == {
        "anomaly": "true",
        "class": events[0].class_name,
        "severity": "high",
        "type": "anomaly_started",
    }
    assert got[1].properties["severity"] == "medium"
    health = sink.health()
    assert health["connected"] and health["published"] == 2 and health["outbox"]["depth"] == 0


def test_state_goes_to_telemetry_and_oversized_events_are_refused(
    make_iothub: Callable[..., IotHubSink], hub: FakeHub, tmp_path: Path
) -> None:
    sink = make_iothub()
    state = State(
        origin=Origin(DEVICE, MODULE, "fan@test"),
        window_index=1,
        class_name="imbalance",
        anomaly=False,
        message=MESSAGES["normal"],
        probabilities=dict.fromkeys(CLASSES, 0.25),
        vote="imbalance",
        active_class=None,
        anomaly_id=None,
        warming_up=False,
        stream_start_s=1.0,
        stream_end_s=11.0,
        wall_start=None,
        wall_end=None,
        emitted_at=1_714_564_813.1,
        level=Level(rms_dbfs=-23.4, peak_dbfs=-8.0, clipping=False, silent=False),
    )
    assert sink.publish(state).result(1) is None
    hub.wait_for(lambda: any(m.output == "telemetry" for m in hub.messages))
    sent = next(m for m in hub.messages if m.output == "telemetry")
    assert sent.properties["type"] == "state" and sent.properties["severity"] == "info"
    assert sent.body == to_wire(state)

    big = _started(_factory(tmp_path), 0)
    huge = dataclasses.replace(big, message="x" * MAX_MESSAGE_BYTES)
    future = sink.publish(huge)
    with pytest.raises(Exception, match="too_large"):
        future.result(1)
    assert sink.health()["dropped_too_large"] == 1
    assert sink.outbox.depth() == 0


def test_twin_is_applied_on_connect_and_patches_change_thresholds_live(
    make_iothub: Callable[..., IotHubSink],
    hub: FakeHub,
    tmp_path: Path,
    commands: Commands,
) -> None:
    runtime = FakeRuntime(tmp_path)
    sink = make_iothub()
    channel = commands(sink, runtime)
    # The full twin, fetched on connect: desired $version 3 applied and reported.
    hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 3 for r in hub.reported))
    assert runtime.config.decision.confirm_k == 2
    first = next(r["soundwatch"] for r in hub.reported if r["soundwatch"]["desired_version"] == 3)
    assert first["status"] == "applied" and first["error"] is None
    assert first["config"]["decision"]["confirm_k"] == 2
    assert hub.twin_gets >= 1

    # A desired-property patch from the hub changes the thresholds live.
    hub.send_desired_patch({"decision": {"thresholds": {"imbalance": {"on": 0.8, "off": 0.6}}}})
    hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 4 for r in hub.reported))
    assert runtime.config.decision.thresholds["imbalance"].on == 0.8
    assert runtime.config.decision.confirm_k == 2
    rep = next(r["soundwatch"] for r in hub.reported if r["soundwatch"]["desired_version"] == 4)
    assert rep["status"] == "applied"
    assert rep["config"]["decision"]["thresholds"]["imbalance"] == {"on": 0.8, "off": 0.6}

    # An invalid patch is rejected as a whole and the reason reported.
    hub.send_desired_patch({"decision": {"confirm_k": 9, "cooldown_s": 1.0}})
    hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 5 for r in hub.reported))
    rep = next(r["soundwatch"] for r in hub.reported if r["soundwatch"]["desired_version"] == 5)
    assert rep["status"] == "rejected"
    assert "confirm_k" in json.dumps(rep["error"])
    assert runtime.config.decision.cooldown_s == 10.0  # all or nothing
    assert channel.health()["twin"]["rejected"] == 1


def test_direct_methods(
    make_iothub: Callable[..., IotHubSink],
    hub: FakeHub,
    tmp_path: Path,
    commands: Commands,
) -> None:
    runtime = FakeRuntime(tmp_path)
    f = _factory(tmp_path)
    runtime.events = [_started(f, i) for i in range(5)]
    sink = make_iothub()
    channel = commands(sink, runtime)
    _wait(lambda: sink.health()["connected"], what="connect")
    hub.wait_for(lambda: bool(hub.reported))  # the twin sync is done

    status, body = hub.call("getStatus", None)
    assert status == 200
    assert body["model"]["version"] == "fan@test"
    assert body["health"]["healthy"] is True
    assert body["counters"]["windows"] == 7
    assert body["config"]["decision"]["confirm_k"] == 2

    status, body = hub.call("setThresholds", {"clogging": {"on": 0.7, "off": 0.5}})
    assert status == 200, body
    assert runtime.config.decision.thresholds["clogging"].on == 0.7
    assert body["thresholds"]["clogging"] == {"on": 0.7, "off": 0.5}

    status, body = hub.call("setThresholds", {"clogging": {"on": 0.5, "off": 0.7}})
    assert status == 400 and "off" in json.dumps(body)
    assert runtime.config.decision.thresholds["clogging"].on == 0.7
    status, body = hub.call("setThresholds", "high")
    assert status == 400 and "JSON object" in body["error"]

    status, body = hub.call("getRecentEvents", {"limit": 2})
    assert status == 200
    assert [e["seq"] for e in body["events"]] == [
        runtime.events[4].seq,
        runtime.events[3].seq,
    ]
    status, body = hub.call("getRecentEvents", {"limit": 0})
    assert status == 400 and "limit" in body["error"]

    status, body = hub.call("reboot", {})
    assert status == 404 and "getStatus" in body["error"]
    assert channel.health()["methods"]["errors"] == 4


def test_reconnect_refetches_the_twin_and_delivers_events_from_the_outbox(
    make_iothub: Callable[..., IotHubSink],
    hub: FakeHub,
    broker: EdgeHubBroker,
    tmp_path: Path,
    commands: Commands,
) -> None:
    runtime = FakeRuntime(tmp_path)
    sink = make_iothub()
    commands(sink, runtime)
    hub.wait_for(lambda: hub.twin_gets >= 1 and bool(hub.reported))
    gets = hub.twin_gets
    broker.stop()
    _wait(lambda: not sink.health()["connected"], what="the disconnect")
    # Changed while the module was offline: picked up by the full fetch on reconnect.
    hub.desired = {"decision": {"cooldown_s": 3.0}, "$version": 9}
    event = _started(_factory(tmp_path), 0)
    future = sink.publish(event)
    assert sink.outbox.depth() == 1
    broker.start()
    assert future.result(30) is None
    hub.wait_for(lambda: any(m.body.get("event_id") == event.event_id for m in hub.messages))
    hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 9 for r in hub.reported))
    assert hub.twin_gets > gets
    assert runtime.config.decision.cooldown_s == 3.0
    assert sink.health()["connects"] >= 2


def test_the_real_runtime_takes_twin_patches_through_its_control_plane(
    edge_env: None, hub: FakeHub, tmp_path: Path
) -> None:
    """Runtime wiring: the iothub sink from config, its channel, the runtime's control plane.

    log_level applies live (the logger's level changes); a restart-only key is
    rejected and reported, and nothing of that patch is applied.
    """
    from soundwatch.app import Runtime
    from soundwatch.config import load_config
    from tests.httpkit import bundle_dir, write_wav

    wav = write_wav(tmp_path / "fan.wav", 12.0)
    config = load_config(
        None,
        env={},
        overrides={
            "device_id": DEVICE,
            "state_dir": str(tmp_path / "state"),
            "model": {"bundle": str(bundle_dir())},
            "source": {"type": "file", "path": str(wav)},
            "sinks": [
                {
                    "type": "iothub",
                    "connect_timeout_s": 3.0,
                    "reconnect": {"min_delay_s": 0.2, "max_delay_s": 1.0},
                }
            ],
        },
    )
    logger = logging.getLogger("soundwatch")
    level = logger.level
    runtime = Runtime(config)  # built, not run: the control plane is live already
    try:
        hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 3 for r in hub.reported))
        assert runtime.config.decision.confirm_k == 2  # the twin fetched on connect
        hub.send_desired_patch({"log_level": "DEBUG"})
        hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 4 for r in hub.reported))
        rep = next(r["soundwatch"] for r in hub.reported if r["soundwatch"]["desired_version"] == 4)
        assert rep["status"] == "applied" and rep["config"]["log_level"] == "DEBUG"
        assert logger.getEffectiveLevel() == logging.DEBUG
        hub.send_desired_patch({"window": {"window_s": 5.0}, "decision": {"confirm_k": 1}})
        hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 5 for r in hub.reported))
        rep = next(r["soundwatch"] for r in hub.reported if r["soundwatch"]["desired_version"] == 5)
        assert rep["status"] == "rejected"
        assert {"key": "window.window_s", "message": RESTART_ONLY} in rep["error"]["problems"]
        assert runtime.config.window.window_s == 10.0 and runtime.config.decision.confirm_k == 2
        health = runtime.health()["control"]
        assert health["commands"]["iothub"] == {"applied": 2, "refused": 1}
        assert health["channels"]["iothub"]["twin"]["rejected"] == 1
    finally:
        runtime.run(threading.Event())  # runs the short file, then closes channels and sinks
        logger.setLevel(level)


def test_relearn_baseline_and_mark_false_alarm_as_direct_methods(
    edge_env: None, hub: FakeHub, tmp_path: Path
) -> None:
    """The operator's baseline commands as IoT Hub direct methods, through the real runtime.

    The unit learns its baseline from a minute of its normal sound (a looped file,
    as fast as it goes); ``relearnBaseline`` drops it and learning starts again,
    after which ``markFalseAlarm`` is refused until there is a baseline again.
    """
    import soundfile as sf

    from soundwatch.app import Runtime
    from soundwatch.config import load_config
    from soundwatch.sim import typical_recording
    from tests.httpkit import bundle_dir

    wav = tmp_path / "normal.wav"
    sf.write(wav, typical_recording(7, [("normal", 75.0)], 6.0, 3, 16000), 16000)
    config = load_config(
        None,
        env={},
        overrides={
            "device_id": DEVICE,
            "state_dir": str(tmp_path / "state"),
            "model": {"bundle": str(bundle_dir())},
            "source": {"type": "file", "path": str(wav), "loop": True, "realtime": False},
            "baseline": {"learn_s": 60},
            "sinks": [
                {
                    "type": "iothub",
                    "include_state": False,
                    "connect_timeout_s": 3.0,
                    "reconnect": {"min_delay_s": 0.2, "max_delay_s": 1.0},
                }
            ],
        },
    )
    runtime = Runtime(config)
    assert runtime.unit is not None
    unit = runtime.unit
    stop = threading.Event()
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    worker.start()
    try:
        _wait(lambda: unit.baseline is not None, 120, "the learned baseline")
        assert unit.baseline is not None
        learned = unit.baseline.baseline_id
        hub.wait_for(lambda: any(r["soundwatch"]["desired_version"] == 3 for r in hub.reported))

        status, body = hub.call("relearnBaseline", {})
        assert status == 200, body
        assert body["dropped"] == learned and body["learning"]["learn_s"] == 60
        assert unit.learning and not (tmp_path / "state" / "baseline.npz").exists()

        status, body = hub.call("markFalseAlarm", {"seq": 1})
        assert status == 400 and "no baseline yet" in body["error"], body
        status, body = hub.call("relearnBaseline", {"now": True})
        assert status == 400 and "takes no arguments" in body["error"], body
        counts = runtime.health()["control"]["commands"]["iothub"]
        assert counts["applied"] >= 2 and counts["refused"] == 2  # the twin's, relearn; two refused
    finally:
        stop.set()
        worker.join(30)
