"""The control plane: the one way in for commands, from MQTT, IoT Hub and HTTP.

Parsing and the registry are checked directly; the behaviour a user sees is
checked through the real module: ``soundwatch run`` against a real mosquitto
(commands on ``set`` and ``command``, a 30 000-deep document, a 3 000-command
flood while events flow), the real HTTP API of a live pipeline, and the real
CLI's console output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from soundwatch.config import RESTART_ONLY, Config, apply_patch
from soundwatch.control import (
    COMMANDS,
    MAX_COMMAND_BYTES,
    MAX_NESTING,
    CommandError,
    ControlPlane,
    parse_json,
    request_from,
)
from soundwatch.events import Event
from tests.httpkit import (
    TOKEN,
    bundle_dir,
    make_runtime,
    run_until_events,
    running_server,
    write_wav,
)
from tests.mosquitto import Certs, Mosquitto, make_certs, running_broker, tools_available

DEEP = b"[" * 30_000  # under 64 KiB: it once killed the MQTT worker with RecursionError


# --- parsing at the boundary -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (DEEP, "nested 30000 levels deep"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested 40 levels deep"),
        (b'{"x": "' + b"y" * MAX_COMMAND_BYTES + b'"}', f"larger than {MAX_COMMAND_BYTES}"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{'single': 1}", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_documents_are_refused_at_the_boundary(payload: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message) as ei:
        parse_json(payload)
    assert ei.value.status == "invalid" and ei.value.problems[0].key == "(message)"


def test_nesting_counts_brackets_outside_strings_only() -> None:
    text = json.dumps({"note": "[" * 100, "deep": [[[1]]]})
    assert parse_json(text)["deep"] == [[[1]]]
    parse_json("[" * MAX_NESTING + "]" * MAX_NESTING)


def test_one_envelope() -> None:
    def read(doc: Any, default: str | None = "setConfig") -> tuple[str, Any, Any]:
        r = request_from(doc, channel="test", origin="test", default_command=default)
        return r.command, r.args, r.request_id

    patch = {"decision": {"confirm_k": 2}}
    assert read(patch) == ("setConfig", patch, None)
    assert read({"request_id": "r1", "patch": patch}) == ("setConfig", patch, "r1")
    assert read({"command": "getStatus", "request_id": 7}, None) == ("getStatus", None, 7)
    with pytest.raises(CommandError, match="unknown key in a command envelope") as ei:
        read({"request_id": "r2", "patch": patch, "extra": 1})
    assert ei.value.request_id == "r2"  # the answer can still be matched
    with pytest.raises(CommandError, match="missing"):
        read({"args": {}}, None)
    with pytest.raises(CommandError, match="request_id"):
        read({"request_id": True, "patch": patch})
    assert {"setConfig", "setThresholds", "getStatus", "getRecentEvents"} <= set(COMMANDS)


class _Target:
    def __init__(self) -> None:
        self.config = Config(device_id="dev")

    def apply_patch(self, patch: Any, source: str) -> Config:
        self.config = apply_patch(self.config, patch, source)
        return self.config

    def health(self) -> dict[str, Any]:
        return {"healthy": True}

    def recent_events(self, limit: int, before_seq: int | None = None) -> list[Event]:
        return []

    def model_info(self) -> dict[str, Any]:
        return {}

    def counters(self) -> dict[str, Any]:
        return {}


def test_rate_limit_answers_every_command_and_counts_the_dropped_ones() -> None:
    # A refill far slower than the test: exactly the burst gets through.
    control = ControlPlane(_Target(), rate_per_s=0.01, burst=3).start()
    answers: list[Any] = []
    done = threading.Event()

    def reply(result: Any) -> None:
        answers.append(result)
        if len(answers) == 10:
            done.set()

    try:
        for i in range(10):
            doc = {"command": "getStatus", "request_id": i}
            control.submit(
                "mqtt", "test", lambda d=doc: request_from(d, channel="mqtt", origin="t"), reply
            )
        assert done.wait(5)
    finally:
        control.close()
    statuses = sorted(a.status for a in answers)
    assert statuses.count("ok") == 3 and statuses.count("busy") == 7
    busy = next(a for a in answers if a.status == "busy")
    assert busy.retry_after_s and "at most 0.01 per second on mqtt" in busy.problems[0].message
    assert control.health()["commands"]["mqtt"] == {"answered": 3, "busy": 7}
    # Another channel has its own bucket.
    assert control.call("http", "t", lambda: request_from(
        {"command": "getStatus"}, channel="http", origin="t")).ok  # fmt: skip


# --- the real module over MQTT ----------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if not tools_available():
        pytest.skip("needs mosquitto, mosquitto-clients and openssl")
    certs: Certs = make_certs(tmp_path_factory.mktemp("certs"))
    with running_broker(tmp_path_factory.mktemp("broker"), certs) as b:
        yield b


def _module(broker: Mosquitto, tmp_path: Path, device: str) -> subprocess.Popen[bytes]:
    """`soundwatch run` on the simulated line, with an event at each class change.

    Its stderr goes to ``tmp_path / "module.log"`` (a pipe nobody reads would
    fill up at DEBUG and block the module).
    """
    config = tmp_path / "module.yaml"
    config.write_text(
        f"""device_id: {device}
state_dir: {tmp_path / "state"}
model:
  bundle: {bundle_dir()}
source:
  type: simulator
  schedule: "normal:10,imbalance:10,normal:10,clogging:10"
  realtime: false
decision:
  confirm_k: 1
  confirm_n: 1
  cooldown_s: 0
baseline:
  enabled: false  # the classifier's own decisions, from the first windows
sinks:
  - type: mqtt
    host: 127.0.0.1
    port: {broker.ports["plain"]}
    health_interval_s: 3600
    reconnect: {{min_delay_s: 0.1, max_delay_s: 0.5}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    with (tmp_path / "module.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "soundwatch", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )


def paho_client(client_id: str) -> Any:
    """A plain paho client, paho 1.6 or 2.x (the tests run on both)."""
    import paho.mqtt.client as paho

    if hasattr(paho, "CallbackAPIVersion"):
        return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    return paho.Client(client_id=client_id)


class _Commands:
    """Sends commands to the module and waits for each answer (a real paho client)."""

    def __init__(self, broker: Mosquitto, base: str) -> None:
        self.base = base
        self.client = paho_client(f"tester-{uuid.uuid4().hex[:6]}")
        self.client.connect("127.0.0.1", broker.ports["plain"])
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str, qos: int = 0) -> None:
        self.client.publish(f"{self.base}/{topic}", payload, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _answer(sub: Any, topic: str, request_id: Any, timeout_s: float = 10) -> dict[str, Any]:
    got = sub.wait_for(
        lambda m: any(x.topic == topic and x.payload.get("request_id") == request_id for x in m),
        timeout_s=timeout_s,
    )
    doc: dict[str, Any] = next(
        x.payload for x in got if x.topic == topic and x.payload.get("request_id") == request_id
    )
    return doc


def _command(cmd: _Commands, sub: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """One command on the command topic; retried while the module says busy."""
    topic = f"{cmd.base}/command/result"
    for _attempt in range(50):
        rid = f"{doc['command']}-{uuid.uuid4().hex[:6]}"
        cmd.send("command", json.dumps({**doc, "request_id": rid}))
        answer = _answer(sub, topic, rid)
        if answer["status"] != "busy":
            return answer
        time.sleep(answer["retry_after_s"])  # as the answer asks
    raise AssertionError("the module stayed busy")


def test_commands_through_the_real_module(broker: Mosquitto, tmp_path: Path) -> None:
    """Bad documents, impossible and restart-only patches, a live log level, then a flood:
    every command answered, the worker never dropped, events on time throughout."""
    device = f"ctl-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    sub = broker.subscribe([f"{base}/#"])
    proc = _module(broker, tmp_path, device)
    cmd = _Commands(broker, base)
    try:
        sub.wait_for(lambda m: any(x.topic == f"{base}/events" for x in m), timeout_s=60)
        status = _command(cmd, sub, {"command": "getStatus"})
        assert status["ok"] and status["data"]["config"]["device_id"] == device
        connects = status["data"]["health"]["sinks"]["mqtt"]["connects"]

        # A 30 000-deep document: refused, and the connection survives.
        cmd.send("set", DEEP)
        results = f"{base}/set/result"
        sub.wait_for(lambda m: any(x.topic == results for x in m))
        (deep,) = [x.payload for x in sub.messages if x.topic == results]
        assert deep["ok"] is False and "nested 30000 levels deep" in deep["errors"][0]["message"]

        # The probe's patch that silenced every alarm, and a restart-only key.
        silencing = {"decision": {"confirm_n": 10**8, "confirm_k": 1}}
        cmd.send("set", json.dumps({"request_id": "n", "patch": silencing}))
        cmd.send("set", json.dumps({"request_id": "w", "patch": {"window": {"window_s": 5}}}))
        n, w = _answer(sub, results, "n"), _answer(sub, results, "w")
        assert n["ok"] is False and n["errors"][0]["key"] == "decision.confirm_n"
        assert w["ok"] is False and w["errors"] == [
            {"key": "window.window_s", "message": RESTART_ONLY}
        ]

        # log_level applies live: DEBUG lines appear from now on.
        cmd.send("set", json.dumps({"request_id": "l", "patch": {"log_level": "DEBUG"}}))
        assert _answer(sub, results, "l")["ok"] is True
        status = _command(cmd, sub, {"command": "getStatus"})
        assert status["data"]["config"]["log_level"] == "DEBUG"
        assert status["data"]["config"]["window"]["window_s"] == 10.0
        assert status["data"]["health"]["sinks"]["mqtt"]["connects"] == connects

        # A flood of 3 000 commands while events flow.
        before = len([x for x in sub.messages if x.topic == results])
        events_before = len([x for x in sub.messages if x.topic == f"{base}/events"])
        t0 = time.time()
        harmless = {"decision": {"enabled": True}}
        for i in range(3000):
            cmd.client.publish(f"{base}/set", json.dumps({"request_id": i, "patch": harmless}))
        got = sub.wait_for(
            lambda m: len([x for x in m if x.topic == results]) >= before + 3000, timeout_s=60
        )
        flood = [x.payload for x in got if x.topic == results][before:]
        t1 = time.time()
        # Events keep coming while the flood is answered, each delivered promptly.
        sub.wait_for(
            lambda m: len([x for x in m if x.topic == f"{base}/events"]) >= events_before + 3,
            timeout_s=30,
        )
        status = _command(cmd, sub, {"command": "getStatus"})
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        cmd.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.stop()
    err = (tmp_path / "module.log").read_text(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert sorted(a["request_id"] for a in flood) == list(range(3000)), "every command answered"
    busy = [a for a in flood if not a["ok"]]
    assert busy and all(a["errors"][0]["key"] == "(busy)" and a["retry_after_s"] for a in busy)
    counts = status["data"]["health"]["control"]["commands"]["mqtt"]
    assert counts["busy"] >= len(busy)  # every dropped command is counted
    assert status["data"]["health"]["sinks"]["mqtt"]["connects"] == connects
    during = [
        x
        for x in sub.messages
        if x.topic == f"{base}/events" and t0 <= _epoch(x.payload["emitted_at"]) <= t1
    ]
    delays = [x.at - _epoch(x.payload["emitted_at"]) for x in during]
    assert all(d < 2.0 for d in delays), f"events delayed by the flood: {max(delays):.1f} s"
    assert " DEBUG soundwatch.control: command getStatus" in err  # the live log level


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- the real HTTP API -----------------------------------------------------------------------


def test_http_commands_go_through_the_control_plane(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, bundle_dir())
    run_until_events(runtime, 2)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_server(runtime.bundle, runtime, token=TOKEN) as srv:
        url = srv.url
        r = requests.patch(url + "/config", json={"decision": {"confirm_k": 1, "cooldown_s": 3}})
        assert r.status_code == 401  # commands need the token
        r = requests.patch(
            url + "/config", json={"decision": {"cooldown_s": 3}}, headers=auth, timeout=5
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["applied"] == {"decision": {"cooldown_s": 3}}
        assert runtime.config.decision.cooldown_s == 3
        r = requests.patch(url + "/config", json={"window": {"window_s": 5}}, headers=auth)
        assert r.status_code == 400
        assert r.json()["errors"] == [{"key": "window.window_s", "message": RESTART_ONLY}]
        r = requests.patch(url + "/config", data=DEEP, headers=auth, timeout=5)
        assert r.status_code == 400 and "nested" in r.json()["errors"][0]["message"]
        r = requests.post(url + "/commands/getRecentEvents", json={"limit": 1}, headers=auth)
        assert r.status_code == 200 and r.json()["data"]["count"] == 1
        r = requests.post(url + "/commands/reboot", headers=auth, timeout=5)
        assert r.status_code == 404 and "getStatus" in r.json()["errors"][0]["message"]
        codes = [
            requests.post(url + "/commands/getStatus", headers=auth, timeout=5).status_code
            for _ in range(30)
        ]
        assert codes.count(429) >= 1 and set(codes) <= {200, 429}  # the HTTP bucket, counted
        assert runtime.control.health()["commands"]["http"]["busy"] == codes.count(429)


# --- each event once on the console ---------------------------------------------------------


def test_each_event_appears_once_on_the_console(tmp_path: Path) -> None:
    """With a console sink, events are printed once (not logged again); without, logged once."""
    wav = write_wav(tmp_path / "fan.wav", 24.0)
    config = tmp_path / "c.yaml"
    faults = ("imbalance", "clogging", "voltage_change")
    config.write_text(
        "decision:\n  confirm_k: 1\n  confirm_n: 1\n  cooldown_s: 0\n  thresholds:\n"
        + "".join(f"    {c}: {{on: 0.05, off: 0.05}}\n" for c in faults)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}

    def run(*sinks: str) -> tuple[str, str, list[dict[str, Any]]]:
        events = tmp_path / f"events-{len(sinks)}.jsonl"
        argv = [sys.executable, "-m", "soundwatch", "run", "--config", str(config)]
        argv += ["--source", f"file:{wav}", "--fast", "--bundle", str(bundle_dir())]
        argv += ["--state-dir", str(tmp_path / "state"), "--sink", f"jsonl:{events}"]
        argv += [arg for s in sinks for arg in ("--sink", s)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = events.read_text().splitlines()
        return proc.stdout, proc.stderr, [json.loads(line) for line in lines]

    out, err, events = run("console")
    assert events, "the clip raised no event"
    terminal = (out + err).lower()
    for kind, word in (("anomaly_started", "started"), ("anomaly_ended", "ended")):
        n = sum(e["type"] == kind for e in events)
        assert terminal.count(f"anomaly {word}") == n, (kind, n, out, err)
    assert "event #" not in err

    out, err, events = run()  # no console sink: each event is logged once
    assert out == ""
    assert err.count("event #") == len(events)
    assert "anomaly started:" not in err and "anomaly ended (" not in err
