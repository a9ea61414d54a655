"""A real ``soundwatch run`` process that raises anomaly events steadily, for fault tests.

The module plays a looping 12 s fault clip with the lowest thresholds the
config allows and one-vote confirmation, so every loop of the file starts an
anomaly and the wrap (a discontinuity) ends it: two events per loop, with the
shipped model or an untrained one alike. ``speed`` paces the file (1 = real
time; ``None`` = as fast as the machine goes, tens of events a second).

Every event the module emits is also written to a JSON Lines *ledger* on a
disk the faults do not touch: it is what was emitted, the collector
(``mosquitto_sub``) is what was delivered, and the two are compared by
``event_id``. The ledger is the *last* sink: the runtime hands an event to
its sinks in order and an MQTT sink has stored it in its outbox before
``publish`` returns, so an event in the ledger was handed to every sink and
is in the outbox. (A ``kill -9`` between two sinks leaves an event in the
earlier sinks only; with the ledger first, such an event would count as lost
although the module never finished emitting it.) The ledger and the log
survive restarts of the module (each run appends).

:func:`small_disk` mounts a size-limited tmpfs (root only; tests skip
without it) and :func:`fill` fills it, for "disk full".
"""

from __future__ import annotations

import contextlib
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

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("imbalance", "clogging", "voltage_change")


def event_clip(path: Path) -> Path:
    """The 12 s clogging clip the module loops (made once)."""
    if not path.exists():
        from tests.httpkit import write_wav

        write_wav(path, 12.0, 16000)
    return path


LEDGER = "ledger"


def module_config(
    directory: Path,
    *,
    state_dir: Path,
    sinks: list[dict[str, Any]],
    speed: float | None = None,
    device_id: str = "faults",
) -> dict[str, Any]:
    """A config that raises events steadily (module docstring); the ledger comes last."""
    clip = event_clip(directory / "loop.wav")
    source: dict[str, Any] = {"type": "file", "path": str(clip), "loop": True}
    source["realtime"] = speed is not None
    if speed is not None:
        source["speed"] = speed
    ledger = {"type": "jsonl", "name": LEDGER, "path": str(directory / "ledger.jsonl")}
    return {
        "device_id": device_id,
        "state_dir": str(state_dir),
        "log_level": "INFO",
        "source": source,
        "decision": {
            "thresholds": {c: {"on": 0.05, "off": 0.05} for c in CLASSES},
            "confirm_k": 1,
            "confirm_n": 1,
            "cooldown_s": 0.0,
        },
        # The classifier decides at once (a fresh unit would first learn its
        # baseline, deciding strictly meanwhile: no steady events).
        "baseline": {"enabled": False},
        "sinks": [*sinks, ledger],
    }


def mqtt_sink(port: int, prefix: str, **extra: Any) -> dict[str, Any]:
    """An MQTT sink with quick reconnects (the outage tests wait on them)."""
    sink: dict[str, Any] = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "include_state": False,
        "connect_timeout_s": 2.0,
        "health_interval_s": 3600,
        "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5},
    }
    sink.update(extra)
    return sink


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only (a torn last line of a killed process is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class Module:
    """One ``soundwatch run`` process (restartable) on a config, with its ledger and log."""

    def __init__(self, directory: Path, config: dict[str, Any], *, http: bool = False) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"config-{uuid.uuid4().hex[:8]}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.ledger_path = Path(next(s["path"] for s in config["sinks"] if s.get("name") == LEDGER))
        self.log_path = directory / "module.log"
        self.http = http
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self._log_offset = 0

    def start(self) -> Module:
        argv = [sys.executable, "-m", "soundwatch", "run", "--config", str(self.config_path)]
        if self.http:
            argv += ["--http", "127.0.0.1:0"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.directory
            )
        if self.http:
            wait_until(lambda: self._url() is not None, 60, "the HTTP API to listen")
            self.url = self._url()
        return self

    def _url(self) -> str | None:
        self._check_running()
        for line in self.run_log().splitlines():
            if "HTTP API on http://" in line:
                return line.split("HTTP API on ", 1)[1].split()[0]
        return None

    def _check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"soundwatch exited ({self.proc.returncode}):\n{self.run_log()[-3000:]}"
            )

    def run_log(self) -> str:
        """The log of the current (or last) run only."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[dict[str, Any]]:
        """Every event emitted so far, by every run, in emission order."""
        return [m for m in read_jsonl(self.ledger_path) if m.get("type") != "state"]

    def wait_events(self, n: int, timeout_s: float = 60.0) -> None:
        """Wait until the ledger holds at least ``n`` events (while the process runs)."""

        def enough() -> bool:
            self._check_running()
            return len(self.events()) >= n

        wait_until(enough, timeout_s, f"{n} events in the ledger")

    def wait_log(self, text: str, timeout_s: float = 60.0) -> None:
        def seen() -> bool:
            self._check_running()
            return text in self.run_log()

        wait_until(seen, timeout_s, f"{text!r} in the log")

    def health(self) -> dict[str, Any]:
        assert self.url is not None, "start the module with http=True"
        doc: dict[str, Any] = requests.get(self.url + "/health", timeout=10).json()
        return doc

    def terminate(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to exit after it."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            log = self.run_log()[-3000:]
            raise AssertionError(f"no exit {timeout_s} s after SIGTERM:\n{log}") from None
        return code, time.monotonic() - t0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Clean-up: end the process whatever its state."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN)."""
    return os.geteuid() == 0 and Path("/proc/mounts").exists()


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB mounted at ``path`` (unmounted afterwards)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Fill the filesystem of ``disk`` to the last byte with one file; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):  # ENOSPC: on to a smaller chunk
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler
