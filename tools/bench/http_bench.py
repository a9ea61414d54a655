"""Section "http": ``POST /inference`` latency and throughput with concurrent clients.

Two real servers, each in its own process, are driven by the same clients
from this process over loopback:

- soundwatch: ``soundwatch serve`` (waitress, numpy features, LiteRT int8,
  two classifiers of one thread each, the default);
- reference: a Flask app doing what the reference service's ``/inference`` did
  (``librosa.load`` at 22.05 kHz, 40 MFCCs, the reference service's padding, Keras
  ``model.predict``), served by waitress with the same thread count, so the
  difference measured is the inference path, not the WSGI server. It reads the
  upload from memory, not through a temporary file: if anything this flatters
  the reference service's side.

Each round runs one client, then N concurrent clients, against each server
in turn (the order alternates between rounds), after a warm-up. Each client
posts 10 s, 16 kHz WAV clips one after another on a keep-alive session.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.bench.core import QUIET_ENV, Context, Row, Stat

CONCURRENCY = 4
READY_TIMEOUT_S = 180.0

# The reference service's /inference, as a standalone server. Arguments: model path, port,
# waitress threads. Imports nothing of soundwatch or of this bench.
REFERENCE_SERVER_SCRIPT = """\
import io, sys
import numpy as np
import librosa
from flask import Flask, jsonify, request
from tensorflow import keras
from waitress import serve

MESSAGES = ["Component OK", "Component is imbalanced", "Component is clogged", "Voltage change"]
model = keras.models.load_model(sys.argv[1])
app = Flask(__name__)


@app.route("/")
def index():
    return "server is up"


@app.route("/inference", methods=["POST"])
def inference():
    data = request.files["file"].read()
    y, sr = librosa.load(io.BytesIO(data), sr=22050)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=40)
    mfcc = np.pad(mfcc, ((0, 0), (0, 2)))
    x = np.zeros((40, 433), dtype=np.float32)
    x[:, : min(433, mfcc.shape[1])] = mfcc[:, :433]
    probs = model.predict(x[None, :, :, None], verbose=0)[0]
    best = int(np.argmax(probs))
    return jsonify(
        {
            "Anomaly": best != 0,
            "Details": {"Message": MESSAGES[best], "Probabilities": [float(p) for p in probs]},
        }
    )


serve(app, host="127.0.0.1", port=int(sys.argv[2]), threads=int(sys.argv[3]), _quiet=True)
"""


@dataclass
class Server:
    """A server process and what the clients need to reach it."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    ready_path: str
    log: Path
    start_s: float = 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident set size in MB, from /proc."""
        fields: dict[str, float] = {}
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return (float("nan"), float("nan"))
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = float(value.split()[0]) / 1024
        return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


@dataclass
class Load:
    """Latencies (ms) of every request and the wall time of each burst."""

    latencies_ms: list[float] = field(default_factory=list)
    wall_ms_per_request: list[float] = field(default_factory=list)
    failures: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(
    name: str, argv: list[str], url: str, ready_path: str, env: dict[str, str], workdir: Path
) -> Server:
    log = workdir / f"http-{name}.log"
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=fh, env=env)
    server = Server(name, proc, url, ready_path, log)
    _wait_ready(server)
    server.start_s = time.perf_counter() - t0
    return server


def _wait_ready(server: Server) -> None:
    import requests

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{server.name} server exited ({server.proc.returncode}):\n{tail}")
        try:
            if requests.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} server not ready after {READY_TIMEOUT_S:.0f} s")


def _burst(url: str, clips: list[bytes], clients: int, per_client: int, load: Load) -> None:
    """``clients`` threads, each posting ``per_client`` clips in turn on its own session."""
    import requests

    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(index: int) -> None:
        session = requests.Session()
        mine: list[float] = []
        failed = 0
        barrier.wait()
        for k in range(per_client):
            data = clips[(index + k) % len(clips)]
            t0 = time.perf_counter()
            try:
                r = session.post(url, files={"file": ("clip.wav", data)}, timeout=120)
                ok = r.status_code == 200 and "Details" in r.json()
            except (requests.RequestException, ValueError):
                ok = False
            if ok:
                mine.append((time.perf_counter() - t0) * 1e3)
            else:
                failed += 1
        session.close()
        with lock:
            load.latencies_ms.extend(mine)
            load.failures += failed

    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(clients)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    load.wall_ms_per_request.append((time.perf_counter() - t0) * 1e3 / (clients * per_client))


def _servers(ctx: Context, workdir: Path) -> tuple[Server, Server]:
    env = {**ctx.user_env, **QUIET_ENV}
    sw_port, reference_port = _free_port(), _free_port()
    sw_argv = [ctx.python, "-m", "soundwatch", "serve", "--http", f"127.0.0.1:{sw_port}"]
    sw_argv += ["--bundle", str(ctx.fixtures.bundle_dir)]
    sw = _start("soundwatch", sw_argv, f"http://127.0.0.1:{sw_port}", "/health", env, workdir)
    try:
        reference_argv = [
            ctx.python,
            "-c",
            REFERENCE_SERVER_SCRIPT,
            str(ctx.fixtures.reference_model),
        ]
        reference_argv += [str(reference_port), "4"]
        reference = _start(
            "reference", reference_argv, f"http://127.0.0.1:{reference_port}", "/", env, workdir
        )
    except Exception:
        sw.stop()
        raise
    return sw, reference


def run(ctx: Context) -> list[Row]:
    workdir = ctx.fixtures.workdir
    clips = [p.read_bytes() for p in ctx.fixtures.clips]
    rounds = ctx.reps(4, 2)
    single_n = ctx.reps(15, 8)
    per_client = ctx.reps(8, 4)
    print("  http: starting both servers …", file=sys.stderr, flush=True)
    sw, reference = _servers(ctx, workdir)
    servers = {"soundwatch": sw, "reference": reference}
    single = {name: Load() for name in servers}
    multi = {name: Load() for name in servers}
    try:
        for server in servers.values():  # warm-up: TF graph tracing, first FFT plans
            _burst(server.url + "/inference", clips, 1, 3, Load())
            _burst(server.url + "/inference", clips, CONCURRENCY, 1, Load())
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                url = servers[name].url + "/inference"
                _burst(url, clips, 1, single_n, single[name])
                _burst(url, clips, CONCURRENCY, per_client, multi[name])
            print(f"  http: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        rss = {name: s.rss_mb() for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    failures = {name: single[name].failures + multi[name].failures for name in servers}
    extra: dict[str, Any] = {
        "rounds": rounds,
        "clients": CONCURRENCY,
        "failures": failures,
        "throughput_rps_median": {
            name: round(1e3 / Stat.of(multi[name].wall_ms_per_request).median, 2)
            for name in servers
        },
    }

    def stat(loads: dict[str, Load], name: str, get: Callable[[Load], list[float]]) -> Stat | None:
        values = get(loads[name])
        return Stat.of(values) if values else None

    lat: Callable[[Load], list[float]] = lambda load: load.latencies_ms  # noqa: E731
    wall: Callable[[Load], list[float]] = lambda load: load.wall_ms_per_request  # noqa: E731
    rps = extra["throughput_rps_median"]
    return [
        Row(
            "POST /inference latency, 1 client",
            "ms",
            stat(single, "reference", lat),
            stat(single, "soundwatch", lat),
            "one client posting 10 s, 16 kHz WAV clips one after another (keep-alive); "
            "request to parsed JSON answer. p95 is in the cell",
        ),
        Row(
            f"POST /inference latency, {CONCURRENCY} concurrent clients",
            "ms",
            stat(multi, "reference", lat),
            stat(multi, "soundwatch", lat),
            f"{CONCURRENCY} clients at once, each posting clips in turn; soundwatch classifies "
            "2 at a time (one LiteRT thread each), the reference service runs Keras in up to "
            "4 waitress threads with TensorFlow's default pools",
        ),
        Row(
            f"wall time per request, {CONCURRENCY} concurrent clients (1/throughput)",
            "ms",
            stat(multi, "reference", wall),
            stat(multi, "soundwatch", wall),
            f"burst wall time / requests in the burst; throughput {rps['reference']} req/s "
            f"(reference) vs {rps['soundwatch']} req/s (soundwatch), medians; failed requests "
            f"{failures['reference']} (reference) and {failures['soundwatch']} (soundwatch)",
            None,
            extra,
        ),
        Row(
            "server RSS after the load",
            "MB",
            Stat.of([rss["reference"][0]]),
            Stat.of([rss["soundwatch"][0]]),
            f"VmRSS of the server process; peak (VmHWM) {rss['reference'][1]:.0f} MB "
            "(reference) vs "
            f"{rss['soundwatch'][1]:.0f} MB (soundwatch)",
        ),
        Row(
            "server start to first answer",
            "s",
            Stat.of([reference.start_s]),
            Stat.of([sw.start_s]),
            "process start to the first 200 from GET / (reference) or GET /health (soundwatch); "
            "one start each, while nothing else runs in the bench",
        ),
    ]
