"""A real mosquitto broker and real ``mosquitto_sub`` subscribers for tests.

:func:`make_certs` makes a CA, a server certificate for ``localhost`` /
``127.0.0.1`` and a client certificate with ``openssl``. :class:`Mosquitto`
writes a config with three listeners on free loopback ports:

* ``plain``: anonymous MQTT;
* ``tls``: TLS with ``require_certificate true`` (client certificates signed by
  the test CA are the authentication);
* ``auth``: plain MQTT with a password file made by ``mosquitto_passwd``
  (user :data:`USER`, password :data:`PASSWORD`), anonymous refused.

It runs with persistence on, so a stop/start (an outage) keeps persistent
sessions and retained messages, as a production broker would. ``stop()``,
``start()``, ``pause()`` and ``kill()`` make outages; the ports stay the same.

:class:`Subscriber` runs ``mosquitto_sub -F %j`` and parses each line, so tests
check what a real subscriber receives.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "soundwatch"
PASSWORD = "s3cret-test-password"
LISTENERS = ("plain", "tls", "auth")
PROBE_PREFIX = "soundwatch-test/probe"


def tools_available() -> bool:
    """Whether mosquitto, mosquitto_sub, mosquitto_passwd and openssl are installed."""
    names = ("mosquitto", "mosquitto_sub", "mosquitto_passwd", "openssl")
    return all(_which(n) for n in names)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Certs:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verification against it fails


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def make_certs(directory: Path) -> Certs:
    """CA, server (CN/SAN localhost, 127.0.0.1) and client certificates (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    for ca in ("ca", "other-ca"):
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{ca}.key", cwd=d)
        _openssl(
            "req", "-x509", "-new", "-key", f"{ca}.key", "-sha256", "-days", "2",
            "-subj", f"/CN=soundwatch test {ca}", "-out", f"{ca}.pem", cwd=d,
        )  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "soundwatch-test-client")):
        _openssl(
            "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d
        )
        _openssl(
            "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=d
        )
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem", cwd=d,
        )  # fmt: skip
    for p in d.iterdir():  # mosquitto may drop privileges; keys are test-only
        p.chmod(0o644)
    return Certs(
        directory=d,
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


class Mosquitto:
    """One mosquitto process (restartable) with the three listeners above."""

    def __init__(self, workdir: Path, certs: Certs) -> None:
        self.workdir = workdir
        self.certs = certs
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in LISTENERS}
        self.log_path = workdir / "mosquitto.log"
        self.passwd = workdir / "passwd"
        passwd_tool = _which("mosquitto_passwd") or "mosquitto_passwd"
        subprocess.run(
            [passwd_tool, "-b", "-c", str(self.passwd), USER, PASSWORD],
            check=True,
            capture_output=True,
        )
        self.passwd.chmod(0o644)
        (workdir / "data").mkdir(exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(self._config())
        self._proc: subprocess.Popen[bytes] | None = None
        self._subscribers: list[Subscriber] = []

    def _config(self) -> str:
        c = self.certs
        # As root, mosquitto drops to the `mosquitto` user, who cannot read a
        # test's private temporary directory: stay the user we are.
        user = [f"user {pwd.getpwuid(os.geteuid()).pw_name}"] if os.geteuid() == 0 else []
        return "\n".join(
            [
                *user,
                "per_listener_settings true",
                "persistence true",
                f"persistence_location {self.workdir / 'data'}/",
                "autosave_interval 1",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "log_timestamp_format %H:%M:%S",
                "max_queued_messages 100000",
                f"listener {self.ports['plain']} 127.0.0.1",
                "allow_anonymous true",
                f"listener {self.ports['tls']} 127.0.0.1",
                "allow_anonymous true",
                f"cafile {c.ca}",
                f"certfile {c.server_cert}",
                f"keyfile {c.server_key}",
                "require_certificate true",
                f"listener {self.ports['auth']} 127.0.0.1",
                "allow_anonymous false",
                f"password_file {self.passwd}",
                "",
            ]
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> None:
        """Start mosquitto and wait until every listener accepts connections."""
        if self.running:
            return
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [_which("mosquitto") or "mosquitto", "-c", str(self.conf)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited:\n{self.log()}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.2),
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {port}:\n{self.log()}")
                time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        """A clean shutdown (SIGTERM): persistent sessions are saved."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the broker holds its connections but answers nothing (no PUBACK)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: the broker reads what waited in its sockets."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a crash; what was not yet saved (autosave every second) is lost."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def wait_for_autosave(self, timeout_s: float = 5.0) -> None:
        """Wait until the broker has saved its in-memory database anew (so that
        sessions survive a crash). mosquitto writes ``mosquitto.db.new`` and
        renames it: a new inode means a complete save."""
        db = self.workdir / "data" / "mosquitto.db"

        def stamp() -> tuple[int, int] | None:
            try:
                st = db.stat()
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_mtime_ns)

        before = stamp()
        deadline = time.monotonic() + timeout_s
        while stamp() == before or stamp() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not autosave in {timeout_s} s")
            time.sleep(0.02)

    def stop_subscribers(self) -> None:
        """Stop every ``mosquitto_sub`` started through :meth:`subscribe`."""
        for sub in self._subscribers:
            sub.stop()
        self._subscribers.clear()

    def close(self) -> None:
        """Stop the subscribers and the broker."""
        self.stop_subscribers()
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def client_args(self, listener: str = "plain") -> list[str]:
        """mosquitto_sub/pub arguments that connect to ``listener``."""
        args = ["-h", "127.0.0.1" if listener != "tls" else "localhost"]
        args += ["-p", str(self.ports[listener])]
        if listener == "tls":
            c = self.certs
            args += [
                "--cafile",
                str(c.ca),
                "--cert",
                str(c.client_cert),
                "--key",
                str(c.client_key),
            ]
        elif listener == "auth":
            args += ["-u", USER, "-P", PASSWORD]
        return args

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        listener: str = "plain",
        client_id: str | None = None,
        persistent: bool = False,
        qos: int = 1,
    ) -> Subscriber:
        """A running ``mosquitto_sub``; returns once its subscriptions are granted."""
        argv = [_which("mosquitto_sub") or "mosquitto_sub", *self.client_args(listener)]
        argv += ["-q", str(qos), "-F", "%j", "-k", "5"]
        if client_id:
            argv += ["-i", client_id]
        if persistent:
            argv.append("-c")
        probe = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
        for t in (*topics, probe):
            argv += ["-t", t]
        sub = Subscriber(argv)
        self._subscribers.append(sub)
        try:
            sub.wait_ready(self, probe)
        except BaseException:
            sub.stop()
            raise
        return sub

    def publish(
        self,
        topic: str,
        payload: str,
        *,
        retain: bool = False,
        qos: int = 1,
        client_id: str | None = None,
    ) -> None:
        """Publish with ``mosquitto_pub`` (an empty payload is a zero-length message).

        With ``client_id`` of a connected client, the broker disconnects that
        client (session takeover): a way to make a module reconnect.
        """
        argv = [_which("mosquitto_pub") or "mosquitto_pub", *self.client_args("plain")]
        argv += ["-t", topic, "-q", str(qos)]
        argv += ["-m", payload] if payload else ["-n"]
        if client_id:
            argv += ["-i", client_id]
        if retain:
            argv.append("-r")
        subprocess.run(argv, check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Received:
    topic: str
    retain: bool
    payload: Any  # parsed JSON, or the text when it is not JSON
    at: float  # time.time() when the line was read


class Subscriber:
    """A ``mosquitto_sub`` process whose output lines are parsed as they arrive."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._errors: list[str] = []
        self._probes = 0
        self._reader = threading.Thread(target=self._read, name="mosquitto_sub", daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, name="sub-err", daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            now = time.time()
            if not raw.strip():
                continue
            doc = json.loads(raw)
            payload = _parse_payload(doc.get("payload"))
            with self._cond:
                if doc["topic"].startswith(PROBE_PREFIX + "/"):
                    self._probes += 1
                    self._cond.notify_all()
                    continue
                self._messages.append(Received(doc["topic"], bool(doc.get("retain")), payload, now))
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            self._errors.append(raw.decode(errors="replace").rstrip())

    def wait_ready(self, broker: Mosquitto, probe_topic: str, timeout_s: float = 5.0) -> None:
        """Publish probes on ``probe_topic`` until this subscriber receives one.

        Once it has, its other subscriptions are in place too (one SUBSCRIBE).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto_sub exited: {self._errors}\n{broker.log()}")
            broker.publish(probe_topic, "probe", qos=0)
            with self._cond:
                if self._cond.wait_for(lambda: self._probes > 0, timeout=0.2):
                    return
        raise RuntimeError(f"mosquitto_sub did not subscribe in {timeout_s} s: {self._errors}")

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; the messages, or AssertionError."""
        if not self.wait_until(predicate, timeout_s):
            with self._cond:
                raise AssertionError(
                    f"timed out after {timeout_s} s; got {len(self._messages)} messages: "
                    f"{[(m.topic, m.payload) for m in self._messages][-10:]}; "
                    f"stderr {self._errors[-5:]}"
                )
        return self.messages

    def wait_until(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> bool:
        """Wait (woken by each message) until ``predicate(messages)`` holds; whether it did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(list(self._messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(2)
        self._err_reader.join(2)


def _parse_payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or deeper than the parser goes
        return text


@contextlib.contextmanager
def running_broker(workdir: Path, certs: Certs) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir, certs)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
