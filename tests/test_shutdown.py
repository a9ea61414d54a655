"""SIGTERM ends ``soundwatch run`` within 3 s whatever the broker does, and loses nothing.

Real processes: mosquitto (up, stopped, frozen with SIGSTOP), a TLS "broker"
that accepts the connection and never answers the handshake (a listening
socket nobody serves), the real CLI with an MQTT sink and its outbox, and a
persistent ``mosquitto_sub`` collector. IoT Edge and ``docker stop`` send
SIGTERM and kill the process 10 s later; before, a broker that was away or
frozen made the module take 10-11 s.

After each stop the module is started again with the broker reachable: every
event the first run emitted (its ledger) must reach the collector. Events not
acknowledged at the stop stay in the outbox and go out then.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.modulekit import Module, module_config, mqtt_sink, wait_until
from tests.mosquitto import Certs, Mosquitto, Subscriber, make_certs, tools_available

pytestmark = pytest.mark.skipif(
    not tools_available(), reason="needs mosquitto, mosquitto-clients and openssl"
)

# The promise (docker stop's grace is 10 s): the whole process is gone within this.
STOP_WITHIN_S = 3.0


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
        b.resume()  # a paused broker could not stop
        b.close()


@pytest.fixture
def tarpit() -> Iterator[int]:
    """A port whose connections are accepted by the kernel and never served."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def _delivered(collector: Subscriber, prefix: str) -> set[str]:
    return {m.payload["event_id"] for m in collector.on(f"{prefix}/events")}


@pytest.mark.parametrize("state", ["up", "down", "frozen", "tls_handshake_hangs"])
def test_sigterm_stops_within_3_s_and_the_outbox_keeps_what_was_not_sent(
    tmp_path: Path, broker: Mosquitto, certs: Certs, tarpit: int, state: str
) -> None:
    prefix = f"sw-stop/{uuid.uuid4().hex[:8]}"
    collector = broker.subscribe(
        [f"{prefix}/events"], client_id=f"c-{prefix[-8:]}", persistent=True
    )
    plain = mqtt_sink(broker.ports["plain"], prefix)
    sink: dict[str, Any] = plain
    if state == "tls_handshake_hangs":
        # The default connect timeout (10 s) is what the handshake would hang for.
        sink = mqtt_sink(
            tarpit, prefix, tls={"enabled": True, "ca": str(certs.ca)}, connect_timeout_s=10
        )
    state_dir = tmp_path / "state"
    module = Module(tmp_path, module_config(tmp_path, state_dir=state_dir, sinks=[sink], speed=20))
    try:
        if state == "down":
            broker.stop()
        module.start()
        if state in ("up", "frozen"):
            module.wait_events(2)
            first = {e["event_id"] for e in module.events()}
            wait_until(lambda: first <= _delivered(collector, prefix), 30, "delivery")
        if state == "frozen":
            broker.pause()
        module.wait_events(len(module.events()) + 3)  # some while the broker is away
        if state == "down":
            module.wait_log("Connection refused")
        code, elapsed = module.terminate()
        assert code == 0, module.run_log()[-3000:]
        assert elapsed < STOP_WITHIN_S, f"{state}: {elapsed:.2f} s from SIGTERM to exit"
        emitted = {e["event_id"] for e in module.events()}
        if state != "up":
            assert "stay in" in module.run_log(), "the log says where the events wait"

        # Verify on restart: every event of the stopped run arrives.
        if state == "down":
            broker.start()
        elif state == "frozen":
            broker.resume()
        restarted = Module(
            tmp_path, module_config(tmp_path, state_dir=state_dir, sinks=[plain], speed=20)
        )
        module = restarted.start()
        module.wait_log("running: source=")  # its signal handling is in place
        wait_until(lambda: emitted <= _delivered(collector, prefix), 60, "every event delivered")
        code, elapsed = module.terminate()
        assert code == 0 and elapsed < STOP_WITHIN_S, (code, elapsed)
    finally:
        module.stop()
        collector.stop()
