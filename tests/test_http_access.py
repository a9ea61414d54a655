"""Who may use the HTTP API, through the real ``soundwatch run`` on a real port.

- The routes that change the module (``PATCH /config``, ``POST /commands/*``)
  need a token even on a loopback server started without one: the module
  writes one to its state directory (mode 0600) and logs where.
- With a token set, ``/health`` without it says only ``ok`` / ``degraded``:
  no broker host and port, client id, topic prefix or paths.
- The ``Host`` header must be an IP address or a name the server answers to,
  so a page whose DNS name is rebound to 127.0.0.1 cannot use a loopback API.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.httpkit import TOKEN, bundle_dir, write_wav
from tests.mosquitto import free_port

PATCH = {"decision": {"cooldown_s": 3}}


class Module:
    """A ``soundwatch run --http 127.0.0.1:0`` on a looping clip; its URL and log."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        wav = write_wav(tmp_path / "line.wav", 12.0)
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / "module.log"
        argv = [sys.executable, "-m", "soundwatch", "run", "--source", f"file:{wav}", "--loop"]
        argv += ["--realtime", "--sink", f"jsonl:{tmp_path / 'events.jsonl'}"]
        argv += ["--state-dir", str(self.state_dir), "--bundle", str(bundle_dir())]
        argv += ["--http", "127.0.0.1:0", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL, env=env)
        self.url = self._wait_for_url()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_url(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.log().splitlines():
                if "HTTP API on http://" in line:
                    return line.split("HTTP API on ", 1)[1].split()[0]
            time.sleep(0.05)
        raise AssertionError("the server never said where it listens:\n" + self.log()[-3000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def open_module(tmp_path: Path) -> Iterator[Module]:
    """Loopback, no token configured: the case where commands used to be open."""
    module = Module(tmp_path)
    try:
        yield module
    finally:
        assert module.stop() == 0, module.log()[-3000:]


def test_commands_need_the_generated_token_on_an_open_loopback_server(
    open_module: Module,
) -> None:
    url = open_module.url
    r = requests.patch(url + "/config", json=PATCH, timeout=10)
    assert r.status_code == 401, r.text
    assert "state directory" in r.json()["Error"]
    r = requests.post(url + "/commands/setThresholds", json={"imbalance": {"on": 0.9}}, timeout=10)
    assert r.status_code == 401
    assert requests.post(url + "/commands/getStatus", timeout=10).status_code == 401

    path = open_module.state_dir / "http-command-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in open_module.log()  # the log says where it is
    token = path.read_text().strip()
    assert len(token) >= 32
    wrong = {"Authorization": "Bearer " + "x" * 43}
    assert requests.patch(url + "/config", json=PATCH, headers=wrong, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    r = requests.patch(url + "/config", json=PATCH, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["config"]["decision"]["cooldown_s"] == 3
    # Read-only routes keep their rule: open on a loopback server without a token.
    assert requests.get(url + "/events", timeout=10).status_code == 200
    assert "source" in requests.get(url + "/health", timeout=10).json()

    # The baseline commands of the CLI find that token in the module's state directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    relearn = [sys.executable, "-m", "soundwatch", "baseline", "relearn", "--http", url]
    elsewhere = subprocess.run(
        [*relearn, "--state-dir", str(open_module.state_dir.parent / "elsewhere")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert elsewhere.returncode == 1 and "state directory" in elsewhere.stderr, elsewhere.stderr
    done = subprocess.run(
        [*relearn, "--state-dir", str(open_module.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["learning"]["learned_s"] == 0.0


def test_the_generated_token_is_kept_across_restarts(tmp_path: Path) -> None:
    first = Module(tmp_path)
    try:
        token = (first.state_dir / "http-command-token").read_text()
    finally:
        assert first.stop() == 0
    second = Module(tmp_path)
    try:
        assert (second.state_dir / "http-command-token").read_text() == token
        auth = {"Authorization": f"Bearer {token.strip()}"}
        r = requests.post(second.url + "/commands/getStatus", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        assert second.stop() == 0


def test_health_without_the_token_says_only_ok_or_degraded(tmp_path: Path) -> None:
    # An MQTT sink whose broker is not there: the module is degraded, and the
    # full report would name the broker, the client id, the topics and the outbox path.
    port = free_port()
    module = Module(tmp_path, "--sink", f"mqtt://127.0.0.1:{port}", "--http-token", TOKEN)
    try:
        deadline = time.monotonic() + 30
        while True:
            full = requests.get(
                module.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
            )
            if full.json().get("degraded") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert full.json()["degraded"] is True
        assert f"127.0.0.1:{port}" in full.text and str(module.state_dir) in full.text
        for headers in ({}, {"Authorization": "Bearer wrong-token-123"}):
            r = requests.get(module.url + "/health", headers=headers, timeout=10)
            assert r.status_code == full.status_code
            assert r.json() == {"status": "degraded"}, r.text
        # Commands take the configured token; no file is written then.
        assert not (module.state_dir / "http-command-token").exists()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = requests.patch(module.url + "/config", json=PATCH, headers=auth, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        assert module.stop() == 0, module.log()[-3000:]


def test_a_host_name_the_server_does_not_answer_to_is_refused(open_module: Module) -> None:
    url, port = open_module.url, open_module.url.rsplit(":", 1)[1]
    # DNS rebinding: a page at http://attacker.example:PORT whose name now resolves
    # to 127.0.0.1; the browser sends its own name as the Host.
    for path in ("/health", "/events", "/info", "/"):
        r = requests.get(url + path, headers={"Host": f"attacker.example:{port}"}, timeout=10)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["Code"] == "bad_host"
        assert "--http-allowed-hosts" in r.json()["Error"]
    token = (open_module.state_dir / "http-command-token").read_text().strip()
    r = requests.patch(
        url + "/config",
        json=PATCH,
        headers={"Host": f"attacker.example:{port}", "Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert requests.get(url + "/health", headers={"Host": host}, timeout=10).ok, host


def test_allowed_host_names_are_answered(tmp_path: Path) -> None:
    module = Module(tmp_path, "--http-allowed-hosts", "edge-7.plant.example,Other.Example")
    try:
        for host in ("edge-7.plant.example", "other.example:80", "EDGE-7.plant.example."):
            r = requests.get(module.url + "/health", headers={"Host": host}, timeout=10)
            assert r.status_code != 400, (host, r.text)
        r = requests.get(module.url + "/health", headers={"Host": "third.example"}, timeout=10)
        assert r.status_code == 400
    finally:
        assert module.stop() == 0


def test_a_bad_allowed_hosts_option_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    proc = subprocess.run(
        [sys.executable, "-m", "soundwatch", "serve", "--http-allowed-hosts", "http://x:80"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "'http://x:80' is not a host name" in proc.stderr
