"""The per-unit baseline through the real module: ``soundwatch run`` and ``soundwatch
baseline`` as a user runs them, with real files, a real mosquitto and the real HTTP API.

Audio comes from the fan simulator at 16 kHz (unit 7, which no model trained on);
``baseline.learn_s`` is a minute or two, and files are read with ``--fast``, so a
learning period takes seconds. Every wait is on something the module publishes
(a state, an event, an answer, a file), never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
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

import numpy as np
import pytest
import requests
import soundfile as sf

from tests.httpkit import TOKEN, bundle_dir
from tests.mosquitto import Certs, Mosquitto, make_certs, running_broker, tools_available

RATE = 16000
UNIT = 7


def _env(learn_s: float, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OPENBLAS_NUM_THREADS="1",
        SOUNDWATCH__BASELINE__LEARN_S=f"{learn_s:g}",
        **extra,
    )
    return env


def _render(path: Path, schedule: list[tuple[str, float]], seed: int) -> Path:
    from soundwatch.sim import typical_recording

    sf.write(path, typical_recording(UNIT, schedule, 6.0, seed, RATE), RATE, subtype="PCM_16")
    return path


def _with_noise(path: Path, normal: Path, noise_s: float) -> Path:
    """The unit's normal sound, then broadband noise: a sound unlike the unit's normal
    (no class names it), then the unit again."""
    fan, _ = sf.read(normal, dtype="float32")
    noise = np.random.default_rng(0).standard_normal(round(noise_s * RATE)) * 0.05
    sf.write(path, np.concatenate([fan, noise.astype(np.float32), fan[: 30 * RATE]]), RATE)
    return path


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    out = {
        "a": _render(d / "normal-a.wav", [("normal", 75.0)], 3),
        "b": _render(d / "normal-b.wav", [("normal", 75.0)], 4),
        "long": _render(d / "normal-long.wav", [("normal", 100.0)], 5),
        # A fault the model hears at p >= 0.9 on this unit, from the first second.
        "fault_first": _render(d / "fault-first.wav", [("clogging", 40.0), ("normal", 100.0)], 6),
    }
    out["noise"] = _with_noise(d / "normal-noise.wav", out["a"], 30.0)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def _config(tmp_path: Path, *, source: str, state: Path, extra: str = "", sinks: str = "") -> Path:
    config = tmp_path / f"module-{uuid.uuid4().hex[:6]}.yaml"
    jsonl = f"  - {{type: jsonl, path: {tmp_path / 'messages.jsonl'}, include_state: true}}\n"
    config.write_text(
        f"state_dir: {state}\n"
        f"model: {{bundle: {bundle_dir()}}}\n"
        f"source: {source}\n" + extra + "sinks:\n" + jsonl + sinks
    )
    return config


def _run(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "soundwatch", "-v", "run", "--config", str(config), *args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start(config: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """The module in the background; its log in a file (a pipe nobody reads would block it)."""
    argv = [sys.executable, "-m", "soundwatch", "-v", "run", "--config", str(config), *args]
    with log.open("wb") as f:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=f)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _until(what: str, check: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """Poll ``check`` until it returns something truthy; that, or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _states(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "state"]


# --- learning, restarts, kill -9, a stale baseline ------------------------------------------------


def test_learning_survives_a_restart_then_the_baseline_decides(
    audio: dict[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = _env(110)
    # First run: 75 s of audio, 110 s to learn. Not done; the progress is kept. The
    # last 15 windows are still held back (the classifier could yet confirm a fault
    # in them) when the file ends: about 60 s are learned.
    _run(_config(tmp_path, source=f"{{type: file, path: {audio['a']}}}", state=state), env)
    first = _states(_read_jsonl(tmp_path / "messages.jsonl"))
    learned = [s["learning"]["learned_s"] for s in first]
    assert learned == sorted(learned) and 55 <= learned[-1] <= 61, learned[-5:]
    assert all(s["baseline_id"] is None and s["novelty"] is None for s in first)
    assert (state / "baseline-learning.npz").exists() and not (state / "baseline.npz").exists()
    # Second run: resumes where it was, completes at 110 s, then judges by novelty.
    (tmp_path / "messages.jsonl").unlink()
    proc = _run(_config(tmp_path, source=f"{{type: file, path: {audio['b']}}}", state=state), env)
    assert "learning resumed from" in proc.stderr
    second = _states(_read_jsonl(tmp_path / "messages.jsonl"))
    assert second[0]["learning"]["learned_s"] >= learned[-1]  # not from the start
    done = next(i for i, s in enumerate(second) if s["learning"] is None)
    # 110 s minus what the first run learned, plus the 15 windows held back.
    assert 60 <= second[done]["stream_end_s"] <= 70
    baseline_id = second[done]["baseline_id"]
    assert baseline_id and all(s["baseline_id"] == baseline_id for s in second[done:])
    assert all(s["novelty"]["threshold"] > 0 for s in second[done:])
    assert (state / "baseline.npz").exists() and not (state / "baseline-learning.npz").exists()
    # Third run: the baseline is loaded; no learning at all.
    (tmp_path / "messages.jsonl").unlink()
    proc = _run(_config(tmp_path, source=f"{{type: file, path: {audio['b']}}}", state=state), env)
    assert f"baseline {baseline_id} loaded" in proc.stderr
    third = _states(_read_jsonl(tmp_path / "messages.jsonl"))
    assert all(s["learning"] is None and s["baseline_id"] == baseline_id for s in third)
    shown = subprocess.run(
        [sys.executable, "-m", "soundwatch", "baseline", "show", str(state / "baseline.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert shown.returncode == 0 and f"baseline {baseline_id}" in shown.stdout


def test_kill_9_while_learning_loses_at_most_the_last_minute(
    audio: dict[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = _env(600)
    source = f"{{type: file, path: {audio['a']}, loop: true}}"
    proc = _start(_config(tmp_path, source=source, state=state), env, tmp_path / "log", "--fast")
    try:
        seen = _until(
            "two minutes learned",
            lambda: [
                s["learning"]["learned_s"]
                for s in _states(_read_jsonl(tmp_path / "messages.jsonl"))
                if s["learning"]["learned_s"] >= 130
            ],
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        _stop(proc)
    with np.load(state / "baseline-learning.npz") as npz:
        checkpoint = json.loads(bytes(npz["meta"]).decode())
    # A checkpoint every 60 s of stream: at most a minute (and a window) is lost.
    assert checkpoint["learned_s"] >= max(60.0, seen[0] - 61.0)
    # A restart resumes from the checkpoint.
    (tmp_path / "messages.jsonl").unlink()
    proc2 = _run(_config(tmp_path, source=f"{{type: file, path: {audio['b']}}}", state=state), env)
    assert "learning resumed from" in proc2.stderr
    states = _states(_read_jsonl(tmp_path / "messages.jsonl"))
    assert states[0]["learning"]["learned_s"] >= checkpoint["learned_s"]


def test_a_baseline_from_another_model_is_refused_and_the_unit_learns_again(
    audio: dict[str, Path], tmp_path: Path
) -> None:
    from soundwatch.baseline import LAYOUT as layout
    from soundwatch.baseline import fit, peek
    from soundwatch.bundle import load_bundle
    from soundwatch.unit_baseline import Learner

    bundle = load_bundle(bundle_dir())
    state = tmp_path / "state"
    stale = fit(
        np.random.default_rng(1).normal(size=(40, layout.size)).astype(np.float32),
        layout,
        "fan@0.0.1-other",
    )
    stale.save(state / "baseline.npz")
    Learner(layout, "fan@0.0.1-other").save(state / "baseline-learning.npz")
    proc = _run(
        _config(tmp_path, source=f"{{type: file, path: {audio['long']}}}", state=state), _env(60)
    )
    assert (
        f"baseline refused: {state / 'baseline.npz'}: learned with model 'fan@0.0.1-other', "
        f"not '{bundle.model_version}'; learning this unit's normal sound again"
    ) in proc.stderr
    assert "learning checkpoint refused" in proc.stderr
    states = _states(_read_jsonl(tmp_path / "messages.jsonl"))
    # From the start: the first window (10 s) is learned once 15 more have come.
    assert [s["learning"]["learned_s"] for s in states[14:16]] == pytest.approx([0.0, 10.0])
    assert states[-1]["baseline_id"] not in (None, stale.baseline_id)
    assert peek(state / "baseline.npz")["model_version"] == bundle.model_version


def test_a_fault_from_the_start_is_the_classifiers_to_raise_and_is_not_learned(
    audio: dict[str, Path], tmp_path: Path
) -> None:
    """Clogging for 40 s from the first second, then normal running; 60 s to learn.

    While learning, the classifier alone decides at its strict thresholds: it
    raises the fault (no baseline, no novelty). The fault's windows are not
    learned, so learning waits for the normal sound and completes later.
    """
    proc = _run(
        _config(
            tmp_path, source=f"{{type: file, path: {audio['fault_first']}}}", state=tmp_path / "s"
        ),
        _env(60),
    )
    messages = _read_jsonl(tmp_path / "messages.jsonl")
    started = [m for m in messages if m["type"] == "anomaly_started"]
    assert [e["class"] for e in started] == ["clogging"], proc.stderr[-2000:]
    assert started[0]["baseline_id"] is None and started[0]["novelty"] is None
    assert started[0]["decided_stream_s"] <= 30
    states = _states(messages)
    during = [s for s in states if s["stream_end_s"] <= 40]
    assert during[-1]["learning"]["learned_s"] < 15  # at most the first windows, before it votes
    learned = next(s for s in states if s["learning"] is None)
    assert learned["stream_end_s"] > 100  # 60 s of normal running after the fault
    assert not [m for m in messages if m["type"] == "anomaly_started" and m["baseline_id"]]


# --- operations over MQTT ------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if not tools_available():
        pytest.skip("needs mosquitto, mosquitto-clients and openssl")
    certs: Certs = make_certs(tmp_path_factory.mktemp("certs"))
    with running_broker(tmp_path_factory.mktemp("broker"), certs) as b:
        yield b


class _Client:
    """Commands to the module's command topic, each answer awaited (a real paho client)."""

    def __init__(self, broker: Mosquitto, base: str) -> None:
        from tests.test_control import paho_client

        self.base = base
        self.client = paho_client(f"tester-{uuid.uuid4().hex[:6]}")
        self.client.connect("127.0.0.1", broker.ports["plain"])
        self.client.loop_start()

    def command(self, sub: Any, doc: dict[str, Any]) -> dict[str, Any]:
        rid = f"{doc['command']}-{uuid.uuid4().hex[:6]}"
        self.client.publish(
            f"{self.base}/command", json.dumps({**doc, "request_id": rid}), qos=1
        ).wait_for_publish(5)
        topic = f"{self.base}/command/result"
        got = sub.wait_for(
            lambda m: any(x.topic == topic and x.payload.get("request_id") == rid for x in m),
            timeout_s=30,
        )
        answer: dict[str, Any] = next(
            x.payload for x in got if x.topic == topic and x.payload.get("request_id") == rid
        )
        return answer

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_false_alarm_and_relearn_over_mqtt(
    audio: dict[str, Path], broker: Mosquitto, tmp_path: Path
) -> None:
    device = f"bl-{uuid.uuid4().hex[:6]}"
    base = f"soundwatch/{device}"
    sinks = (
        f"  - {{type: mqtt, host: 127.0.0.1, port: {broker.ports['plain']}, "
        "health_interval_s: 3600, reconnect: {min_delay_s: 0.1, max_delay_s: 0.5}}\n"
    )
    config = _config(
        tmp_path,
        source=f"{{type: file, path: {audio['noise']}, loop: true, realtime: false}}",
        state=tmp_path / "state",
        extra=f"device_id: {device}\n",
        sinks=sinks,
    )
    sub = broker.subscribe([f"{base}/#"])
    proc = _start(config, _env(60), tmp_path / "module.log")
    client = _Client(broker, base)
    try:
        got = sub.wait_for(
            lambda m: (
                proc.poll() is not None
                or any(x.topic == f"{base}/events" and x.payload.get("baseline_id") for x in m)
            ),
            timeout_s=120,
        )
        assert proc.poll() is None, (tmp_path / "module.log").read_text()[-3000:]
        event = next(x.payload for x in got if x.topic == f"{base}/events")
        assert event["class"] == "unknown", event
        assert event["Message"] == "Sound differs from this unit's normal"
        assert event["novelty"]["score"] > event["novelty"]["threshold"]

        answer = client.command(sub, {"command": "markFalseAlarm", "args": {"seq": event["seq"]}})
        assert answer["ok"], answer
        data = answer["data"]
        assert data["seq"] == event["seq"] and data["windows"] > 0
        assert data["previous"]["baseline_id"] == event["baseline_id"]
        new_id = data["baseline"]["baseline_id"]
        assert new_id != event["baseline_id"] and data["saved"] is True

        for args, key, words in (
            ({"seq": 987654}, "seq", "no anomaly event #987654"),
            ({"seq": "7"}, "seq", "positive integer"),
            ({"seq": 1, "why": "x"}, "why", "unknown key"),
        ):
            refused = client.command(sub, {"command": "markFalseAlarm", "args": args})
            assert refused["status"] == "invalid" and refused["errors"][0]["key"] == key
            assert words in refused["errors"][0]["message"]

        status = client.command(sub, {"command": "getStatus"})
        assert status["data"]["health"]["baseline"]["baseline_id"] == new_id
        assert status["data"]["health"]["baseline"]["false_alarms_marked"] == 1

        answer = client.command(sub, {"command": "relearnBaseline"})
        assert answer["ok"] and answer["data"]["dropped"] == new_id, answer
        sub.wait_for(
            lambda m: any(
                x.topic == f"{base}/state" and x.payload.get("learning") for x in m[-50:]
            ),
            timeout_s=30,
        )
        status = client.command(sub, {"command": "getStatus"})
        assert status["data"]["health"]["baseline"]["state"] == "learning"
        refused = client.command(sub, {"command": "markFalseAlarm", "args": {"seq": event["seq"]}})
        assert refused["status"] == "invalid" and "no baseline yet" in json.dumps(refused)
    finally:
        client.close()
        code = _stop(proc)
        sub.stop()
    log = (tmp_path / "module.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert f"event #{event['seq']} marked as a false alarm (mqtt:" in log
    assert f"baseline {new_id} dropped (mqtt:" in log


# --- operations over HTTP, with the CLI ------------------------------------------------------


def _url_from(log: Path) -> str:
    def find() -> str | None:
        for line in log.read_text(errors="replace").splitlines():
            if "HTTP API on http://" in line:
                return line.split("HTTP API on ", 1)[1].split()[0]
        return None

    url: str = _until("the HTTP API's address", find, 60)
    return url


def _baseline_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soundwatch", "baseline", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_false_alarm_and_relearn_over_http_from_the_cli(
    audio: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(
        tmp_path,
        source=f"{{type: file, path: {audio['noise']}, loop: true, realtime: false}}",
        state=tmp_path / "state",
    )
    env = _env(60, SOUNDWATCH_HTTP_TOKEN=TOKEN)
    proc = _start(config, env, tmp_path / "module.log", "--http", "127.0.0.1:0")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client_env = _env(60)  # no token: the CLI must be given one
    try:
        url = _url_from(tmp_path / "module.log")

        def novelty_event() -> dict[str, Any] | None:
            events = requests.get(url + "/events", headers=auth, timeout=5).json()["events"]
            return next((e for e in events if e.get("baseline_id")), None)

        event = _until("an event of the baseline", novelty_event)
        seq = str(event["seq"])

        denied = _baseline_cli("false-alarm", "--seq", seq, "--http", url, env=client_env)
        assert denied.returncode == 1 and "Bearer" in denied.stderr, denied.stderr
        done = _baseline_cli(
            "false-alarm", "--seq", seq, "--http", url, "--http-token", TOKEN, env=client_env
        )
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["seq"] == event["seq"] and data["windows"] > 0
        assert data["baseline"]["baseline_id"] != event["baseline_id"]
        unknown = _baseline_cli(
            "false-alarm", "--seq", "987654", "--http", url, "--http-token", TOKEN, env=client_env
        )
        assert unknown.returncode == 1
        assert "seq: no anomaly event #987654" in unknown.stderr

        # The token from the environment, as elsewhere in the CLI; a URL without a scheme.
        relearn = _baseline_cli(
            "relearn",
            "--http",
            url.removeprefix("http://"),
            env=_env(60, SOUNDWATCH_HTTP_TOKEN=TOKEN),
        )
        assert relearn.returncode == 0, relearn.stderr
        assert json.loads(relearn.stdout)["dropped"] == data["baseline"]["baseline_id"]

        def learning_state() -> dict[str, Any] | None:
            state = requests.get(url + "/state", headers=auth, timeout=5).json()["state"]
            return state if state and state.get("learning") else None

        state = _until("a state that learns again", learning_state, 30)
        assert state["baseline_id"] is None and state["learning"]["learn_s"] == 60
        # The full health report needs the token (without it: only "ok" / "degraded").
        health = requests.get(url + "/health", headers=auth, timeout=5).json()
        assert health["baseline"]["state"] == "learning"
        # The web page shows it: it reads the same /state (the element is on the page).
        assert 'id="baseline"' in requests.get(url + "/", timeout=5).text
    finally:
        code = _stop(proc)
    log = (tmp_path / "module.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "dropped (http:POST /commands/relearnBaseline)" in log


# --- offline: baseline learn, classify --baseline ----------------------------------------


def test_baseline_learn_then_classify_with_it(tmp_path: Path) -> None:
    """A baseline from normal clips of one unit; its other normal clips score below
    its abnormal ones (here the faults this unit's sound changes most with)."""
    from soundwatch.baseline import Baseline, auc
    from soundwatch.sim import typical_clip

    def clip(name: str, state: str, seed: int, seconds: float = 10.0) -> Path:
        path = tmp_path / f"{name}.wav"
        sf.write(path, typical_clip(UNIT, state, 6.0, seed, seconds, RATE), RATE)
        return path

    learn = [clip(f"learn-{s}", "normal", s) for s in range(10)]
    learn.append(clip("learn-long", "normal", 10, 30.0))  # 30 s: 3 windows at the default hop
    normal = [clip(f"normal-{s}", "normal", s) for s in range(100, 104)]
    abnormal = [
        clip(f"{f}-{s}", f, s) for f in ("clogging", "voltage_change") for s in range(100, 103)
    ]
    env = _env(60)
    out = tmp_path / "unit7.npz"
    learned = _baseline_cli(
        "learn", "--out", str(out), "--bundle", str(bundle_dir()), *map(str, learn), env=env
    )
    assert learned.returncode == 0, learned.stderr
    assert "from 13 windows of 11 clips" in learned.stdout

    argv = [sys.executable, "-m", "soundwatch", "classify", "--bundle", str(bundle_dir())]
    proc = subprocess.run(
        [*argv, "--baseline", str(out), "--json", *map(str, normal + abnormal)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    docs = {Path(d["File"]).stem: d for d in map(json.loads, proc.stdout.splitlines())}
    for d in docs.values():
        assert set(d["Novelty"]) == {"score", "threshold", "anomalous"}
        assert d["Novelty"]["anomalous"] == (d["Novelty"]["score"] > d["Novelty"]["threshold"])
    scores = {name: d["Novelty"]["score"] for name, d in docs.items()}
    normal_scores = [scores[p.stem] for p in normal]
    abnormal_scores = [scores[p.stem] for p in abnormal]
    assert auc(normal_scores, abnormal_scores) >= 0.9, scores
    # On the console too.
    console = subprocess.run(
        [*argv, "--baseline", str(out), str(normal[0])], capture_output=True, text=True, env=env
    )
    assert (
        console.returncode == 0 and "novelty " in console.stdout and "threshold" in console.stdout
    )

    # A baseline of another model is refused, naming it.
    shown = json.loads(_baseline_cli("show", "--json", str(out), env=env).stdout)
    assert shown["windows"] == 13 and shown["baseline_id"].startswith("bl-")
    learned_here = Baseline.load(out, shown["model_version"])
    dataclasses.replace(learned_here, model_version="fan@0.0.1-other").save(tmp_path / "other.npz")
    refused = subprocess.run(
        [*argv, "--baseline", str(tmp_path / "other.npz"), str(normal[0])],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 1 and "learned with model 'fan@0.0.1-other'" in refused.stderr
