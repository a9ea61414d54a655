"""The MQTT sink against a real mosquitto (plain, TLS with client certificates, passwords),
checked with a real ``mosquitto_sub``.

Runs against whichever paho-mqtt is installed; ``tools/paho1-venv.sh`` makes a
venv with paho-mqtt 1.6.1 to run the same tests there (set
``SOUNDWATCH_EXPECT_PAHO=1`` to make the run prove which one it used).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from soundwatch.channels.mqtt import RETAINED, MqttChannel
from soundwatch.cli import _parse_sink
from soundwatch.config import Config, ConfigError, MqttSinkConfig, apply_patch, load_config
from soundwatch.control import ControlPlane
from soundwatch.decision import AnomalyEnded, AnomalyStarted
from soundwatch.events import (
    Event,
    EventFactory,
    Origin,
    SequenceCounter,
    State,
    to_wire,
    validate_event,
)
from soundwatch.ha_discovery import discovery_messages, node_id
from soundwatch.sinks import SinkContext, make_sink
from soundwatch.sinks.mqtt import MqttSink
from soundwatch.sinks.mqtt_compat import PAHO_MAJOR, PAHO_VERSION
from soundwatch.sinks.outbox_sink import Backoff
from soundwatch.stream_types import Level
from tests.mosquitto import (
    PASSWORD,
    USER,
    Certs,
    Mosquitto,
    Received,
    make_certs,
    running_broker,
    tools_available,
)
from tests.mqtt_driver import CLASSES, MESSAGES, Driver, report

pytestmark = pytest.mark.skipif(
    not tools_available(), reason="needs mosquitto, mosquitto-clients and openssl"
)
REPO = Path(__file__).resolve().parents[1]


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Mosquitto]:
    with running_broker(tmp_path_factory.mktemp("broker"), certs) as b:
        yield b


@pytest.fixture(autouse=True)
def _no_leftover_subscribers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "broker" in request.fixturenames:
        request.getfixturevalue("broker").stop_subscribers()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own for each test (the broker is shared)."""
    return f"sw-test/{uuid.uuid4().hex[:10]}"


SinkMaker = Callable[..., MqttSink]


@pytest.fixture
def make_mqtt(broker: Mosquitto, tmp_path: Path, prefix: str) -> Iterator[SinkMaker]:
    made: list[MqttSink] = []

    def make(listener: str = "plain", **options: Any) -> MqttSink:
        opts: dict[str, Any] = {
            "host": "localhost" if listener == "tls" else "127.0.0.1",
            "port": broker.ports[listener],
            "topic_prefix": prefix,
            "outbox": {"path": tmp_path / f"outbox-{len(made)}.sqlite3"},
            "client_id": f"sw-test-{uuid.uuid4().hex[:8]}",
            "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5},
            "connect_timeout_s": 3.0,
            "env": {},
        }
        opts.update(options)
        env = opts.pop("env")
        sink = MqttSink(MqttSinkConfig.model_validate(opts), env=env)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(0.5)


def _factory(tmp_path: Path) -> EventFactory:
    return EventFactory(
        "dev1", "soundwatch", "fan@test", CLASSES, MESSAGES, SequenceCounter(tmp_path / "seq")
    )


def _events(factory: EventFactory, n: int) -> list[Event]:
    out: list[Event] = []
    for i in range(n):
        anomaly = str(uuid.uuid4()) if i % 2 == 0 else out[-1].event_id
        if i % 2 == 0:
            out.append(factory.build(AnomalyStarted(**report(i, anomaly))))
        else:
            out.append(factory.build(AnomalyEnded(**report(i, anomaly), reason="cleared")))
    return out


def _state(index: int, cls: str = "normal", active: str | None = None) -> State:
    return State(
        origin=Origin("dev1", "soundwatch", "fan@test"),
        window_index=index,
        class_name=cls,
        anomaly=active is not None,
        message=MESSAGES[active or "normal"],
        probabilities={c: (0.91 if c == cls else 0.03) for c in CLASSES},
        vote=None,
        active_class=active,
        anomaly_id=None if active is None else str(uuid.uuid4()),
        warming_up=False,
        stream_start_s=float(index),
        stream_end_s=index + 10.0,
        wall_start=None,
        wall_end=None,
        emitted_at=1_714_564_813.1,
        level=Level(rms_dbfs=-23.4, peak_dbfs=-8.0, clipping=False, silent=False),
    )


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def _payloads(messages: list[Received], topic: str) -> list[Any]:
    return [m.payload for m in messages if m.topic == topic]


class FakeRuntime:
    """What the control plane and the sink's context need, with the real patch validation."""

    def __init__(self) -> None:
        self.config = Config(device_id="dev1")
        self.latest_state: State | None = None
        self.sinks: list[MqttSink] = []

    def health(self) -> dict[str, Any]:
        return {"healthy": True, "sinks": {s.name: s.health() for s in self.sinks}}

    def apply_patch(self, patch: dict[str, Any], source: str = "<patch>") -> Config:
        self.config = apply_patch(self.config, patch, source)
        return self.config

    def recent_events(self, limit: int, before_seq: int | None = None) -> list[Event]:
        return []

    def model_info(self) -> dict[str, Any]:
        return {"name": "fan", "version": "test"}

    def counters(self) -> dict[str, Any]:
        return {"windows": 0}

    def context(self) -> SinkContext:
        return SinkContext(
            origin=Origin("dev1", "soundwatch", "fan@test"),
            class_names=CLASSES,
            health=self.health,
            latest_state=lambda: self.latest_state,
        )


def _commands(sink: MqttSink, runtime: FakeRuntime) -> ControlPlane:
    """The control plane over ``runtime``, taking commands on ``sink``'s topics."""
    control = ControlPlane(runtime).start()
    MqttChannel(sink, control)
    return control


def _await_command_topics(broker: Mosquitto, prefix: str) -> None:
    """Wait until the module answers commands: its subscriptions are granted."""
    sub = broker.subscribe([f"{prefix}/command/result"])
    try:
        deadline = time.monotonic() + 10
        while not any(m.payload.get("request_id") == "probe" for m in sub.messages):
            assert time.monotonic() < deadline, "the module never answered a command"
            broker.publish(f"{prefix}/command", '{"command": "getStatus", "request_id": "probe"}')
            sub.wait_until(lambda m: bool(m), timeout_s=0.5)
    finally:
        sub.stop()


# -- events -----------------------------------------------------------------------------


def test_paho_version_is_the_expected_one() -> None:
    expected = os.environ.get("SOUNDWATCH_EXPECT_PAHO")
    if expected:
        assert str(PAHO_MAJOR) == expected, f"running on paho-mqtt {PAHO_VERSION}"
    assert PAHO_MAJOR in (1, 2)


def test_events_arrive_with_the_documented_schema(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str, tmp_path: Path
) -> None:
    sub = broker.subscribe([f"{prefix}/events"])
    try:
        sink = make_mqtt()
        events = _events(_factory(tmp_path), 6)
        futures = [sink.publish(e) for e in events]
        for f in futures:
            f.result(10)  # resolved on PUBACK
        assert sink.outbox.depth() == 0
        got = sub.wait_for(lambda m: len(m) >= 6)
    finally:
        sub.stop()
    payloads = _payloads(got, f"{prefix}/events")
    assert [p["event_id"] for p in payloads] == [e.event_id for e in events]
    assert payloads == [to_wire(e) for e in events]  # the one wire format
    for p in payloads:
        validate_event(p)
    assert [p["type"] for p in payloads[:2]] == ["anomaly_started", "anomaly_ended"]
    assert payloads[1]["started_event_id"] == payloads[0]["event_id"]
    assert not any(m.retain for m in got)
    health = sink.health()
    assert health["published"] == 6 and health["outbox"]["depth"] == 0 and health["connected"]


def test_tls_with_client_certificate(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str, certs: Certs, tmp_path: Path
) -> None:
    sub = broker.subscribe([f"{prefix}/#"], listener="tls")
    try:
        sink = make_mqtt(
            "tls", tls={"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}
        )
        event = _events(_factory(tmp_path), 1)[0]
        sink.publish(event).result(10)
        got = sub.wait_for(lambda m: any(x.topic == f"{prefix}/events" for x in m))
    finally:
        sub.stop()
    assert _payloads(got, f"{prefix}/events") == [to_wire(event)]
    assert "online" in _payloads(got, f"{prefix}/status")
    assert sink.health()["tls"] is True


@pytest.mark.parametrize(
    ("tls_kind", "expected"),
    [("wrong_ca", "CERTIFICATE_VERIFY_FAILED"), ("no_client_cert", "CERTIFICATE_REQUIRED")],
)
def test_tls_failures_keep_events_in_the_outbox(
    make_mqtt: SinkMaker, certs: Certs, tmp_path: Path, tls_kind: str, expected: str
) -> None:
    tls: dict[str, Any] = (
        {"ca": certs.other_ca, "cert": certs.client_cert, "key": certs.client_key}
        if tls_kind == "wrong_ca"
        else {"ca": certs.ca}
    )
    sink = make_mqtt("tls", tls=tls)
    future = sink.publish(_events(_factory(tmp_path), 1)[0])
    # Two failed attempts: it retried (with backoff) and failed again, for the same reason.
    _wait(lambda: sink.health()["connect_failures"] >= 2, what="two failed connections")
    health = sink.health()
    assert not health["connected"] and not health["healthy"]
    assert expected in health["last_error"]
    assert not future.done() and sink.outbox.depth() == 1


def test_password_auth(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str, tmp_path: Path
) -> None:
    # The password comes from the environment variable that password_env names.
    sink = make_mqtt("auth", username=USER, env={"MQTT_PASSWORD": PASSWORD})
    sink.publish(_events(_factory(tmp_path), 1)[0]).result(10)
    bad = make_mqtt("auth", username=USER, password="wrong")
    _wait(lambda: bad.health()["last_error"] is not None, what="a refusal")
    assert "not authori" in bad.health()["last_error"].lower()
    assert not bad.health()["connected"]


# -- status and the Last Will --------------------------------------------------------


def _driver(broker: Mosquitto, prefix: str, state_dir: Path) -> Driver:
    config = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": broker.ports["plain"],
        "topic_prefix": prefix,
        "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5},
        "health_interval_s": 60,
    }
    return Driver(config, state_dir)


def test_status_online_then_offline_by_last_will_on_kill_9(
    broker: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    status = f"{prefix}/status"
    sub = broker.subscribe([status])
    driver = _driver(broker, prefix, tmp_path)
    try:
        assert driver.ask("wait_connected 10") == {"connected": True}
        sub.wait_for(lambda m: _payloads(m, status)[-1:] == ["online"])
        driver.kill9()
        got = sub.wait_for(lambda m: _payloads(m, status)[-1:] == ["offline"], timeout_s=5)
    finally:
        driver.stop()
        sub.stop()
    assert _payloads(got, status) == ["online", "offline"]
    late = broker.subscribe([status])  # the Will was retained
    try:
        assert late.wait_for(lambda m: len(m) >= 1)[0] == Received(
            status, True, "offline", late.messages[0].at
        )
    finally:
        late.stop()


def test_clean_close_publishes_offline(broker: Mosquitto, prefix: str, tmp_path: Path) -> None:
    status = f"{prefix}/status"
    sub = broker.subscribe([status])
    driver = _driver(broker, prefix, tmp_path)
    try:
        assert driver.ask("wait_connected 10") == {"connected": True}
        assert driver.ask("close 5") == {"closed": True}
        assert driver.proc.wait(10) == 0
        got = sub.wait_for(lambda m: _payloads(m, status)[-1:] == ["offline"], timeout_s=5)
    finally:
        driver.stop()
        sub.stop()
    assert _payloads(got, status) == ["online", "offline"]


# -- state, health, commands, discovery ------------------------------------------------


def test_state_is_rate_limited_retained_and_reaches_late_subscribers(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str
) -> None:
    """Counted, not timed: what was sent, what was superseded, in which order."""
    topic = f"{prefix}/state"
    sub = broker.subscribe([topic])
    try:
        # An interval far longer than the test: only a class change can go out again.
        sink = make_mqtt(state_min_interval_s=30, health_interval_s=60)
        _wait(lambda: sink.health()["connected"], what="connect")
        sink.publish(_state(0))  # the first value goes out at once
        sub.wait_for(lambda m: len(_payloads(m, topic)) == 1, timeout_s=5)
        for i in (1, 2):  # same class within the interval: held back, 1 superseded by 2
            assert sink.publish(_state(i)).done()
        sink.publish(_state(3, "imbalance", active="imbalance"))  # a change: at once
        got = sub.wait_for(lambda m: len(_payloads(m, topic)) == 2, timeout_s=5)
    finally:
        sub.stop()
    assert [p["window_index"] for p in _payloads(got, topic)] == [0, 3]
    assert sink.health()["state"]["superseded"] == 2  # 1 and 2 were never sent
    late = broker.subscribe([topic])
    try:
        first = late.wait_for(lambda m: len(m) >= 1)[0]
    finally:
        late.stop()
    assert first.retain and first.payload["window_index"] == 3
    validate_event(first.payload)


def test_held_back_state_goes_out_when_the_interval_is_over(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str
) -> None:
    topic = f"{prefix}/state"
    sub = broker.subscribe([topic])
    try:
        sink = make_mqtt(state_min_interval_s=0.3, health_interval_s=60)
        _wait(lambda: sink.health()["connected"], what="connect")
        sink.publish(_state(0))  # at once
        sub.wait_for(lambda m: len(_payloads(m, topic)) == 1, timeout_s=5)
        for i in (1, 2):  # held back; only the latest goes out, once the interval is over
            sink.publish(_state(i))
        got = sub.wait_for(lambda m: len(_payloads(m, topic)) == 2, timeout_s=5)
    finally:
        sub.stop()
    assert [p["window_index"] for p in _payloads(got, topic)] == [0, 2]
    assert sink.health()["state"] == {**sink.health()["state"], "sent": 2, "superseded": 1}


def test_health_is_retained_and_shows_the_outbox_depth(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str
) -> None:
    runtime = FakeRuntime()
    topic = f"{prefix}/health"
    first_sub = broker.subscribe([topic])
    try:
        sink = make_mqtt(health_interval_s=0.3, name="uplink")
        runtime.sinks.append(sink)
        sink.bind(runtime.context())
        first_sub.wait_for(lambda m: bool(_payloads(m, topic)), timeout_s=5)
    finally:
        first_sub.stop()
    sub = broker.subscribe([topic])  # a late subscriber: the retained copy comes first
    try:
        got = sub.wait_for(lambda m: len(_payloads(m, topic)) >= 2, timeout_s=5)
    finally:
        sub.stop()
    first = got[0]
    assert first.retain  # the retained copy, for a late subscriber
    report_ = _payloads(got, topic)[-1]
    assert report_["healthy"] is True
    uplink = report_["sinks"]["uplink"]
    assert uplink["connected"] is True and uplink["outbox"]["depth"] == 0
    assert uplink["outbox"]["dropped_total"] == 0 and "emitted_at" in report_


def test_set_command_applies_valid_patches_and_rejects_invalid_ones_whole(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str
) -> None:
    runtime = FakeRuntime()
    sink = make_mqtt(health_interval_s=60)
    control = _commands(sink, runtime)
    _wait(lambda: sink.health()["connected"], what="connect")
    results = f"{prefix}/set/result"
    sub = broker.subscribe([results])
    before = runtime.config
    commands = [
        '{"decision": {"confirm_k": 2}}',
        json.dumps({"request_id": "r2", "patch": {"decision": {"confirm_k": 9, "cooldown_s": 1}}}),
        '{"window": {"hop": 2}}',
        "not json",
        '{"sinks": []}',
        json.dumps({"request_id": 7, "patch": {"decision": {"enabled": False}}}),
    ]
    try:
        _await_command_topics(broker, prefix)
        for payload in commands:
            broker.publish(f"{prefix}/set", payload)
        got = sub.wait_for(lambda m: len(m) >= len(commands), timeout_s=10)
    finally:
        sub.stop()
        control.close()
    answers = _payloads(got, results)
    by_id = {a["request_id"]: a for a in answers if a["request_id"] is not None}
    plain = [a for a in answers if a["request_id"] is None]
    assert plain[0]["ok"] is True and plain[0]["applied"] == {"decision": {"confirm_k": 2}}
    assert by_id["r2"]["ok"] is False
    assert by_id["r2"]["errors"][0]["key"] == "decision"
    assert "confirm_k (9) must not exceed confirm_n (5)" in by_id["r2"]["errors"][0]["message"]
    assert plain[1]["errors"][0]["key"] == "window.hop"
    assert "not valid JSON" in plain[2]["errors"][0]["message"]
    assert plain[3]["errors"][0]["key"] == "sinks"
    assert by_id[7]["ok"] is True
    # Only the valid patches were applied, and nothing of the invalid one.
    assert runtime.config.decision.confirm_k == 2
    assert runtime.config.decision.cooldown_s == before.decision.cooldown_s
    assert runtime.config.decision.enabled is False
    counts = control.health()["commands"]["mqtt"]
    assert (counts["applied"], counts["refused"]) == (2, 4)


def test_a_retained_command_is_refused_the_same_way_whenever_it_arrives(
    broker: Mosquitto, make_mqtt: SinkMaker, prefix: str
) -> None:
    """A retained `set` would re-apply on every reconnect: it is refused on first delivery
    (published while connected) and after a reconnect alike; clearing it is no error."""
    runtime = FakeRuntime()
    sink = make_mqtt()
    control = _commands(sink, runtime)
    results = f"{prefix}/set/result"
    sub = broker.subscribe([results])
    retained = '{"request_id": "kept", "patch": {"decision": {"enabled": false}}}'
    try:
        _await_command_topics(broker, prefix)
        broker.publish(f"{prefix}/set", retained, retain=True)  # live: first delivery
        first = sub.wait_for(lambda m: len(m) >= 1)[0].payload
        # Reconnect (another client takes over the module's client id, once): the new
        # connection's subscription is delivered the retained message again.
        connects = sink.health()["connects"]
        broker.publish(f"{prefix}/kick", "x", client_id=sink.client_id)
        _wait(lambda: sink.health()["connects"] > connects, what="a reconnect")
        again = sub.wait_for(lambda m: len(m) >= 2)[1].payload
        # Clearing it (an empty retained message) is not a command: no answer, nothing counted.
        broker.publish(f"{prefix}/set", "", retain=True)
        _await_command_topics(broker, prefix)  # the clear was processed before this probe
        _wait(lambda: control.health()["queued"] == 0, what="the queue to drain")
        answers = _payloads(sub.messages, results)
    finally:
        broker.publish(f"{prefix}/set", "", retain=True)
        sub.stop()
        control.close()
    for answer in (first, again):
        assert answer["ok"] is False and answer["request_id"] is None
        assert answer["errors"] == [{"key": "(message)", "message": RETAINED}]
    assert len(answers) == 2, answers
    assert runtime.config.decision.enabled is True
    assert control.health()["commands"]["mqtt"]["refused"] == 2


def test_home_assistant_discovery(broker: Mosquitto, make_mqtt: SinkMaker, prefix: str) -> None:
    ha_prefix = f"ha-{uuid.uuid4().hex[:8]}"
    runtime = FakeRuntime()
    sub = broker.subscribe([f"{ha_prefix}/#"])
    try:
        sink = make_mqtt(ha_discovery={"enabled": True, "prefix": ha_prefix})
        sink.bind(runtime.context())
        got = sub.wait_for(lambda m: len(m) >= 2 + len(CLASSES), timeout_s=5)
    finally:
        sub.stop()
    node = node_id("dev1", "soundwatch")
    topics = sorted(m.topic for m in got)
    assert topics == sorted(
        [
            f"{ha_prefix}/binary_sensor/{node}/anomaly/config",
            f"{ha_prefix}/sensor/{node}/level/config",
            *(f"{ha_prefix}/sensor/{node}/probability_{c}/config" for c in CLASSES),
        ]
    )
    for m in got:
        assert m.payload["state_topic"] == f"{prefix}/state"
        assert m.payload["availability_topic"] == f"{prefix}/status"
        assert m.payload["device"]["identifiers"] == [node]
    assert len({m.payload["unique_id"] for m in got}) == len(got)
    late = broker.subscribe([f"{ha_prefix}/#"])  # retained: HA finds them after a restart
    try:
        assert all(m.retain for m in late.wait_for(lambda m: len(m) >= len(got)))
    finally:
        late.stop()


def test_discovery_templates_render_against_a_state_message() -> None:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    state = to_wire(_state(5, "imbalance", active="imbalance"))
    msgs = discovery_messages(
        device_id="dev1",
        module_id="soundwatch",
        model_version="fan@1",
        class_names=CLASSES,
        state_topic="s",
        status_topic="t",
    )
    rendered = {
        m.topic.split("/")[-2]: env.from_string(m.payload["value_template"]).render(
            value_json=state
        )
        for m in msgs
    }
    assert rendered["anomaly"] == "ON"
    assert rendered["probability_imbalance"] == "91.0"
    assert rendered["probability_normal"] == "3.0"
    assert rendered["level"] == "-23.4"
    attrs = env.from_string(msgs[0].payload["json_attributes_template"]).render(value_json=state)
    assert json.loads(attrs)["active_class"] == "imbalance"
    quiet = env.from_string(msgs[0].payload["value_template"]).render(value_json=to_wire(_state(6)))
    assert quiet == "OFF"


# -- config, CLI and wiring ----------------------------------------------------------


def test_config_builds_a_working_sink(broker: Mosquitto, tmp_path: Path) -> None:
    """make_sink(config) as app.py does; placeholders and the outbox path resolved."""
    device = f"fan-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        None,
        env={},
        overrides={
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "sinks": [
                _parse_sink(f"mqtt://{USER}@127.0.0.1:{broker.ports['auth']}")
                | {"password": PASSWORD, "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5}}
            ],
        },
    )
    sink_cfg = cfg.sinks[0]
    assert sink_cfg.type == "mqtt"
    assert sink_cfg.topic_prefix == f"soundwatch/{device}"
    assert sink_cfg.client_id == f"soundwatch-{device}"
    assert sink_cfg.outbox.path == tmp_path / "state" / "outbox-mqtt.sqlite3"
    assert PASSWORD not in repr(sink_cfg) and "password=" not in repr(sink_cfg)
    # A live patch round-trips the resolved config unchanged.
    assert apply_patch(cfg, {"decision": {"confirm_k": 2}}).sinks == cfg.sinks
    sub = broker.subscribe([f"soundwatch/{device}/events"])
    sink = make_sink(sink_cfg)
    try:
        event = _events(_factory(tmp_path), 1)[0]
        sink.publish(event).result(10)
        assert _payloads(sub.wait_for(lambda m: len(m) >= 1), f"soundwatch/{device}/events") == [
            to_wire(event)
        ]
    finally:
        sink.close(2)
        sub.stop()
    assert (tmp_path / "state" / "outbox-mqtt.sqlite3").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt://broker", {"type": "mqtt", "host": "broker"}),
        (
            "mqtt://bob@10.0.0.5:1884",
            {"type": "mqtt", "host": "10.0.0.5", "port": 1884, "username": "bob"},
        ),
        ("mqtts://hub.local", {"type": "mqtt", "host": "hub.local", "tls": {"enabled": True}}),
        ("mqtt://[::1]:1883", {"type": "mqtt", "host": "::1", "port": 1883}),
    ],
)
def test_cli_sink_shortcut(text: str, expected: dict[str, Any]) -> None:
    assert _parse_sink(text) == expected
    load_config(None, env={}, overrides={"sinks": [expected]})  # and the schema takes it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mqtt://bob:secret@broker", "MQTT_PASSWORD"),
        ("mqtt://broker/topic", "no path"),
        ("mqtt://broker:70000", "bad port"),
        ("mqtt:broker", "unknown sink"),
    ],
)
def test_cli_sink_shortcut_errors(text: str, message: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _parse_sink(text)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(
            None,
            env={},
            overrides={
                "sinks": [
                    {"type": "mqtt", "host": "h", "qos": 0, "topic_prefix": "a/#"},
                    {"type": "mqtt", "host": "h", "tls": {"cert": "c.pem"}},
                ]
            },
        )
    keys = {key for key, _line, _msg in ei.value.problems}
    assert {"sinks.0.qos", "sinks.0.topic_prefix", "sinks.1.tls"} <= keys
    with pytest.raises(ConfigError, match="needs include_state"):
        load_config(
            None,
            env={},
            overrides={
                "sinks": [
                    {
                        "type": "mqtt",
                        "host": "h",
                        "include_state": False,
                        "ha_discovery": {"enabled": True},
                    }
                ]
            },
        )
    with pytest.raises(ConfigError, match="share the outbox"):
        load_config(None, env={}, overrides={"sinks": [{"type": "mqtt", "host": "a"}] * 2})


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(1.0, 8.0, rng=lambda: 0.5)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert low.next() == pytest.approx(0.8)


def test_publish_never_blocks_while_the_broker_is_unreachable(
    make_mqtt: SinkMaker, tmp_path: Path
) -> None:
    # A closed port: every connection attempt fails, publish() still returns at once.
    from tests.mosquitto import free_port

    sink = make_mqtt(port=free_port())
    events = _events(_factory(tmp_path), 20)
    t0 = time.perf_counter()
    futures = [sink.publish(e) for e in events]
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0  # 20 fsynced inserts, no network wait
    assert not any(f.done() for f in futures) and sink.outbox.depth() == 20
    sink.close(0.5)
    # Not acknowledged before close: the futures say so, the events stay on disk.
    assert all("stays in the outbox" in str(f.exception()) for f in futures)


def _test_bundle() -> Path | None:
    """The shipped model, or one named by $SOUNDWATCH_TEST_BUNDLE."""
    named = os.environ.get("SOUNDWATCH_TEST_BUNDLE")
    candidates = [Path(named)] if named else []
    candidates.append(REPO / "module" / "soundwatch" / "models" / "fan")
    return next((c for c in candidates if (c / "bundle.json").is_file()), None)


def test_cli_run_end_to_end(broker: Mosquitto, tmp_path: Path) -> None:
    """`soundwatch run --sink mqtt://...`: status, retained state and health, a set
    command, and `offline` on SIGTERM, as a real subscriber sees them."""
    bundle = _test_bundle()
    if bundle is None:
        pytest.skip("no model bundle (shipped one or $SOUNDWATCH_TEST_BUNDLE)")
    device = f"e2e-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    argv = [sys.executable, "-m", "soundwatch", "run", "--bundle", str(bundle)]
    argv += ["--source", "simulator", "--fast", "--state-dir", str(tmp_path / "state")]
    argv += ["--sink", f"mqtt://127.0.0.1:{broker.ports['plain']}"]
    env = {**os.environ, "SOUNDWATCH__DEVICE_ID": device}
    sub = broker.subscribe([f"{base}/#"])
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        sub.wait_for(lambda m: bool(_payloads(m, f"{base}/state")), timeout_s=30)
        broker.publish(f"{base}/set", '{"request_id": "e2e", "patch": {"window": {"hop_s": 2}}}')
        got = sub.wait_for(lambda m: bool(_payloads(m, f"{base}/set/result")), timeout_s=10)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        got = sub.wait_for(lambda m: _payloads(m, f"{base}/status")[-1:] == ["offline"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sub.stop()
    assert proc.returncode == 0, err[-3000:]
    assert _payloads(got, f"{base}/status") == ["online", "offline"]
    validate_event(_payloads(got, f"{base}/state")[0])
    assert _payloads(got, f"{base}/set/result")[0] == {
        "ok": True,
        "request_id": "e2e",
        "applied": {"window": {"hop_s": 2}},
        "emitted_at": _payloads(got, f"{base}/set/result")[0]["emitted_at"],
    }
    health = _payloads(got, f"{base}/health")[0]
    assert health["sinks"]["mqtt"]["outbox"]["depth"] == 0 and "source" in health
    late = broker.subscribe([f"{base}/state"])
    try:
        assert late.wait_for(lambda m: len(m) >= 1)[0].retain
    finally:
        late.stop()


def test_default_yaml_documents_the_mqtt_defaults() -> None:
    """The commented mqtt example in config/default.yaml must not drift from the schema."""
    import yaml

    from soundwatch.config import MqttSinkConfig

    lines = (REPO / "config" / "default.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  # - type: mqtt"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("  # "):
            break
        block.append(ln[4:])
    doc = yaml.safe_load("\n".join(block))[0]
    documented = MqttSinkConfig.model_validate(doc)
    expected = MqttSinkConfig(
        host="broker.local", username="soundwatch", tls={"ca": "/certs/ca.pem"}
    )
    assert documented.model_dump() == expected.model_dump()
