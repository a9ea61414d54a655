"""Shared parts of the HTTP tests: a bundle, audio files, real servers, a live pipeline.

Everything runs for real: waitress on an ephemeral loopback port, the
shipped model bundle (or ``SOUNDWATCH_TEST_BUNDLE``), and a
:class:`~soundwatch.app.Runtime` that has processed real audio, so
``/events``, ``/state`` and ``/metrics`` have something to show.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from soundwatch.app import Runtime
from soundwatch.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle
from soundwatch.config import load_config
from soundwatch.http.app import HttpSettings, create_app
from soundwatch.http.server import HttpServer, ServerLimits

TOKEN = "test-token-0123456789"


def bundle_dir() -> Path:
    """The bundle under test; skips (with the reason) when there is none."""
    path = Path(os.environ.get("SOUNDWATCH_TEST_BUNDLE") or DEFAULT_BUNDLE_DIR)
    if not (path / "bundle.json").is_file():
        pytest.skip(f"no model bundle at {path} (train one, or set SOUNDWATCH_TEST_BUNDLE)")
    return path


def fan_clip(seconds: float, rate_hz: int = 16000, fault: str = "clogging") -> np.ndarray:
    """A MIMII-like fan clip from the simulator (deterministic)."""
    from soundwatch.sim import typical_clip

    return typical_clip(7, fault, 10.0, seed=3, duration_s=seconds, sample_rate_hz=rate_hz)


def write_wav(
    path: Path,
    seconds: float,
    rate_hz: int = 16000,
    channels: int = 1,
    subtype: str = "PCM_16",
    fault: str = "clogging",
) -> Path:
    mono = fan_clip(seconds, rate_hz, fault)
    data = np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono
    sf.write(path, data, rate_hz, subtype=subtype)
    return path


@contextmanager
def running_server(
    bundle: Bundle,
    runtime: Runtime | None = None,
    *,
    token: str | None = None,
    max_upload_bytes: int = 32 * 1024 * 1024,
    upload_timeout_s: float = 30.0,
    classifiers: int = 2,
    classifier_wait_s: float = 30.0,
    readme_path: Path | None = None,
) -> Iterator[HttpServer]:
    settings = HttpSettings(
        token=token,
        max_upload_bytes=max_upload_bytes,
        classifiers=classifiers,
        classifier_wait_s=classifier_wait_s,
        readme_path=readme_path,
    )
    app = create_app(bundle, runtime=runtime, settings=settings)
    limits = ServerLimits(settings.max_request_bytes, upload_timeout_s=upload_timeout_s)
    server = HttpServer(app, "127.0.0.1", 0, limits).start()
    try:
        yield server
    finally:
        server.stop()


def make_runtime(tmp: Path, bundle_path: Path, *, loop: bool = True) -> Runtime:
    """A pipeline on a looping 12 s fault clip, tuned so that it raises events quickly.

    Every fault class votes at p >= 0.05 and one vote confirms, so a window
    that looks even slightly like a fault starts an anomaly; each wrap of
    the file is a discontinuity, which ends it ("reset"). So events come
    with the shipped model and with an untrained one alike.
    """
    wav = write_wav(tmp / "loop.wav", 12.0, 16000)
    bundle = load_bundle(bundle_path)
    faults = [c.name for c in bundle.classes if c.anomaly]
    overrides: dict[str, Any] = {
        "source": {"type": "file", "path": str(wav), "loop": loop, "realtime": False},
        "sinks": [],
        "state_dir": str(tmp / "state"),
        "model.bundle": str(bundle_path),
        # The classifier's own decisions (a fresh unit would first learn its baseline).
        "baseline": {"enabled": False},
        "decision": {
            # The lowest thresholds the config allows (off >= 0.05).
            "thresholds": {name: {"on": 0.05, "off": 0.05} for name in faults},
            "confirm_k": 1,
            "confirm_n": 1,
            "cooldown_s": 0.0,
        },
    }
    return Runtime(load_config(None, env={}, overrides=overrides), bundle=bundle)


def run_until_events(runtime: Runtime, n_events: int, timeout_s: float = 30.0) -> None:
    """Run the pipeline in a thread until it has built ``n_events`` events, then stop it."""
    stop = threading.Event()
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.is_alive():
        if len(runtime.recent_events(n_events)) >= n_events:
            break
        time.sleep(0.05)
    stop.set()
    worker.join(15)
    assert not worker.is_alive(), "the pipeline did not stop"
    got = len(runtime.recent_events(1000))
    assert got >= n_events, f"the pipeline built only {got} events in {timeout_s} s"
