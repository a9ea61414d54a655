"""A microphone whose feed is gone but whose stream keeps delivering, through the real CLI.

The virtual ALSA microphone reads a named pipe (tests/fakemic.py, ``fifo``
mode). While the test writes audio into it at real time, it is a live
device. When the writer closes the pipe, ALSA's file plugin does not stop: it
hands out its last buffer again and again, as fast as it is read, so the
capture queue overflows tens of thousands of times a second (the probe saw
525 000 overflows in 24 s) while the source said ``healthy`` and the model
classified that stale buffer. It must be reported unhealthy, logged, and the
device reopened; once a writer is back, capture resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from soundwatch.sources import SourceError, rescan_devices
from tests.fakemic import FifoFeeder, make_fake_mic
from tests.modulekit import wait_until

RATE = 48000


def _portaudio_available() -> bool:
    try:
        rescan_devices()
    except SourceError:
        return False
    return Path("/usr/share/alsa/alsa.conf").exists()


pytestmark = pytest.mark.skipif(
    not _portaudio_available(), reason="needs libportaudio2 and ALSA (make setup installs them)"
)


class PacedWriter:
    """Feeds the pipe 0.1 s of noise every 0.1 s (a live microphone) until stopped."""

    def __init__(self, feeder: FifoFeeder) -> None:
        self.feeder = feeder
        self._stop = threading.Event()
        self._rng = np.random.default_rng(0)
        self._thread = threading.Thread(target=self._run, name="paced-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        blocks = 0
        while not self._stop.is_set():
            self.feeder.feed((0.1 * self._rng.standard_normal(RATE // 10)).astype(np.float32))
            blocks += 1
            self._stop.wait(max(0.0, t0 + blocks * 0.1 - time.monotonic()))

    def close(self) -> None:
        """The writer goes away: its end of the pipe is closed."""
        self._stop.set()
        self._thread.join(5)
        self.feeder.close()


def _health(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = requests.get(url + "/health", timeout=10).json()
    return doc


def test_a_stream_that_keeps_delivering_after_its_writer_is_gone_is_unhealthy_and_reopened(
    tmp_path: Path,
) -> None:
    mic = make_fake_mic(tmp_path / "alsa", np.zeros(1), RATE, mode="fifo")
    writer = PacedWriter(FifoFeeder(mic))  # before PortAudio starts: its scan opens the pipe
    config = tmp_path / "mic.yaml"
    config.write_text(
        f"""
device_id: storm
state_dir: {tmp_path / "state"}
source: {{type: mic, device: {mic.name}, block_s: 0.1, preferred_rates_hz: [{RATE}]}}
sinks: [{{type: jsonl, path: {tmp_path / "events.jsonl"}}}]
"""
    )
    log_path = tmp_path / "module.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env.update(mic.env, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "soundwatch", "run", "--config", str(config)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*argv, "--http", "127.0.0.1:0"], stderr=log, stdout=subprocess.DEVNULL, env=env
        )
    second: PacedWriter | None = None
    try:

        def url() -> str | None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            for line in log_path.read_text().splitlines():
                if "HTTP API on http://" in line:
                    return line.split("HTTP API on ", 1)[1].split()[0]
            return None

        wait_until(lambda: url() is not None, 60, "the HTTP API")
        base = url()
        assert base is not None
        wait_until(lambda: _health(base)["source"]["healthy"], 30, "a healthy, live source")
        assert _health(base)["source"]["overflows"] == 0

        writer.close()  # the feed is gone; the stream is not
        wait_until(
            lambda: "overflow storm" in (_health(base)["source"]["detail"] or ""),
            30,
            "the overflow storm in /health",
        )
        source = _health(base)["source"]
        assert source["healthy"] is False
        assert source["overflows"] > 1000
        assert "overflow storm" in log_path.read_text()  # logged, at WARNING

        # A writer comes back: the reopened device is live again.
        second = PacedWriter(FifoFeeder(mic))
        wait_until(lambda: _health(base)["source"]["healthy"], 30, "the reopened source")
        assert _health(base)["source"]["reopens"] >= 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
        if second is not None:
            second.close()
    assert code == 0, log_path.read_text()[-3000:]
