"""Broker outages: every anomaly event is delivered, in order, exactly once by event_id.

Real processes throughout: mosquitto (stopped and restarted by the test, with
persistence on, as a production broker runs), a module process
(tests/mqtt_driver.py: real events through MqttSink and its SQLite outbox) and
a real ``mosquitto_sub`` with a persistent session (``-c -q 1``) collecting the
``events`` topic, as a back-end consumer would. A QoS 1 redelivery may repeat an
event; the consumer de-duplicates on ``event_id``, and after that the stream
must be exactly the events the module emitted, in emission order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Certs, Mosquitto, Subscriber, make_certs, tools_available
from tests.mqtt_driver import Driver

pytestmark = pytest.mark.skipif(
    not tools_available(), reason="needs mosquitto, mosquitto-clients and openssl"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path, certs: Certs) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker", certs)
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def prefix() -> str:
    return f"sw-outage/{uuid.uuid4().hex[:10]}"


def _sink_config(broker: Mosquitto, prefix: str) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": broker.ports["plain"],
        "topic_prefix": prefix,
        "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.4},
        "connect_timeout_s": 2.0,
        "health_interval_s": 60,
    }


def _collector(broker: Mosquitto, prefix: str) -> Subscriber:
    return broker.subscribe(
        [f"{prefix}/events"], client_id=f"collector-{uuid.uuid4().hex[:8]}", persistent=True
    )


def _received(sub: Subscriber, prefix: str) -> list[dict[str, Any]]:
    return [m.payload for m in sub.messages if m.topic == f"{prefix}/events"]


def _wait_all(sub: Subscriber, prefix: str, sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    wanted = {e["event_id"] for e in sent}
    sub.wait_for(lambda _m: wanted <= {p["event_id"] for p in _received(sub, prefix)}, timeout_s=20)
    return _received(sub, prefix)


def _check_exactly_once_in_order(received: list[dict[str, Any]], sent: list[dict[str, Any]]) -> int:
    """De-duplicated by event_id, the stream is what was sent; returns the duplicates seen."""
    first: dict[str, dict[str, Any]] = {}
    for payload in received:
        eid = payload["event_id"]
        if eid in first:
            assert payload == first[eid], "a redelivery must be the same event"
        else:
            first[eid] = payload
    assert list(first) == [e["event_id"] for e in sent], "missing, extra or out-of-order events"
    seqs = [p["seq"] for p in first.values()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [p["seq"] for p in first.values()] == [e["seq"] for e in sent]
    return len(received) - len(first)


def _wait_health(driver: Driver, predicate: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        health: dict[str, Any] = driver.ask("health")["health"]
        if predicate(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_outage_every_event_delivered_in_order_once(
    broker: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    collector = _collector(broker, prefix)
    driver = Driver(_sink_config(broker, prefix), tmp_path / "state")
    try:
        assert driver.ask("wait_connected 10") == {"connected": True}
        sent = driver.emit(3)
        _wait_all(collector, prefix, sent)

        broker.stop()  # the outage: several anomalies start and end meanwhile
        health = _wait_health(driver, lambda h: not h["connected"])
        assert not health["connected"]
        for round_ in range(1, 4):  # each round waits on disk before the next one
            sent += driver.emit(2)
            health = _wait_health(driver, lambda h, n=round_: h["outbox"]["depth"] == 2 * n)
            assert health["outbox"]["depth"] == 2 * round_
        health = _wait_health(driver, lambda h: h["connect_failures"] >= 1)
        assert health["outbox"]["depth"] == 6, "every event waits on disk during the outage"
        assert "Connection refused" in (health["last_error"] or "")

        broker.start()
        sent += driver.emit(2)
        assert driver.ask("flush 20") == {"flushed": True}
        received = _wait_all(collector, prefix, sent)
        health = driver.ask("health")["health"]
        assert health["outbox"]["depth"] == 0 and health["outbox"]["dropped_total"] == 0
        assert health["connects"] >= 2
        assert driver.ask("close 5") == {"closed": True}
    finally:
        driver.stop()
        collector.stop()
    assert len(sent) == 11
    _check_exactly_once_in_order(received, sent)


def test_kill_9_during_the_outage_then_restart(
    broker: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"  # the module's volume: outbox and sequence counter
    collector = _collector(broker, prefix)
    first = Driver(_sink_config(broker, prefix), state_dir)
    second: Driver | None = None
    try:
        assert first.ask("wait_connected 10") == {"connected": True}
        sent = first.emit(2)
        _wait_all(collector, prefix, sent)

        broker.stop()
        _wait_health(first, lambda h: not h["connected"])
        sent += first.emit(4)  # stored in the outbox, not delivered
        first.kill9()

        second = Driver(_sink_config(broker, prefix), state_dir)
        health = second.ask("health")["health"]
        assert health["outbox"]["depth"] == 4, "the killed process's events are on disk"
        sent += second.emit(2)  # still during the outage
        broker.start()
        sent += second.emit(1)
        assert second.ask("flush 20") == {"flushed": True}
        received = _wait_all(collector, prefix, sent)
        assert second.ask("health")["health"]["outbox"]["depth"] == 0
        assert second.ask("close 5") == {"closed": True}
    finally:
        first.stop()
        if second is not None:
            second.stop()
        collector.stop()
    assert len(sent) == 9
    _check_exactly_once_in_order(received, sent)


def test_broker_crash_with_events_in_flight(broker: Mosquitto, prefix: str, tmp_path: Path) -> None:
    """Events sent but never acknowledged are resent first after reconnecting.

    The broker is frozen (SIGSTOP: it takes the PUBLISH packets into its socket
    buffer and answers nothing), then killed: the module never got a PUBACK, so
    paho must resend those events after the reconnect, ahead of newer ones.
    """
    collector = _collector(broker, prefix)
    driver = Driver(_sink_config(broker, prefix), tmp_path / "state")
    try:
        assert driver.ask("wait_connected 10") == {"connected": True}
        sent = driver.emit(2)
        _wait_all(collector, prefix, sent)
        broker.wait_for_autosave()  # so that the collector's session survives the crash

        broker.pause()
        sent += driver.emit(5)  # handed to paho and written, never acknowledged
        health = _wait_health(driver, lambda h: h["inflight"] == 5, timeout_s=5)
        assert health["inflight"] == 5 and health["outbox"]["depth"] == 5
        broker.kill()
        _wait_health(driver, lambda h: not h["connected"])
        sent += driver.emit(2)  # newer events, stored while disconnected
        broker.start()
        assert driver.ask("flush 20") == {"flushed": True}
        received = _wait_all(collector, prefix, sent)
        health = driver.ask("health")["health"]
        assert health["resent_after_reconnect"] == 5
        assert health["outbox"]["depth"] == 0
        assert driver.ask("close 5") == {"closed": True}
    finally:
        driver.stop()
        collector.stop()
    _check_exactly_once_in_order(received, sent)
