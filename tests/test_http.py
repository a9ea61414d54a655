"""The HTTP API on a real port: every route, auth, limits and malformed uploads.

Servers are real waitress servers on ephemeral loopback ports; the model is
the bundle under test; the pipeline behind ``run`` mode is a real Runtime
that has processed real audio. The CLI tests start ``soundwatch`` itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
import yaml

from soundwatch.app import Runtime
from soundwatch.bundle import Bundle, load_bundle
from soundwatch.classify import ClipClassifier
from soundwatch.http.app import api_of
from soundwatch.http.options import HttpConfigError, parse_address, resolve_token
from soundwatch.http.server import HttpServer
from tests.httpkit import (
    TOKEN,
    bundle_dir,
    make_runtime,
    run_until_events,
    running_server,
    write_wav,
)

REPO = Path(__file__).resolve().parents[1]
OPENAPI = REPO / "module" / "soundwatch" / "http" / "openapi.yaml"
MIB = 1024 * 1024


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return bundle_dir()


@pytest.fixture(scope="module")
def bundle(bundle_path: Path) -> Bundle:
    return load_bundle(bundle_path)


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The upload zoo: good clips in several shapes, and the malformed ones."""
    d = tmp_path_factory.mktemp("audio")
    files = {
        "ok": write_wav(d / "ok.wav", 10.0),
        "short": write_wav(d / "short.wav", 2.0),
        "eight_channels": write_wav(d / "8ch.wav", 10.0, rate_hz=48000, channels=8),
        "8khz": write_wav(d / "8k.wav", 10.0, rate_hz=8000),
        "flac": write_wav(d / "clip.flac", 10.0, subtype="PCM_16"),
    }
    # One hour at 8 kHz, 8-bit: 28.8 MB, under the default 32 MiB limit.
    clip = sf.read(files["8khz"], dtype="float32")[0]
    hour = np.tile(clip, 360)
    sf.write(d / "hour.wav", hour, 8000, subtype="PCM_U8")
    files["hour"] = d / "hour.wav"

    nan = sf.read(files["ok"], dtype="float32")[0]
    nan[1000:1010] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    files["nan"] = d / "nan.wav"
    sf.write(d / "silent.wav", np.zeros(160000, dtype=np.float32), 16000, subtype="PCM_16")
    files["silent"] = d / "silent.wav"
    sf.write(d / "noframes.wav", np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    files["no_frames"] = d / "noframes.wav"
    (d / "empty.wav").write_bytes(b"")
    files["empty"] = d / "empty.wav"
    (d / "notes.wav").write_bytes(b"these are not the samples you are looking for\n" * 50)
    files["not_audio"] = d / "notes.wav"
    return files


@pytest.fixture(scope="module")
def server(bundle: Bundle) -> Iterator[HttpServer]:
    """``serve`` mode: the model, no source, no token (loopback)."""
    with running_server(bundle) as srv:
        yield srv


@pytest.fixture(scope="module")
def live(
    bundle_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HttpServer, Runtime]]:
    """``run`` mode: a pipeline that has processed audio and built events, behind a token."""
    runtime = make_runtime(tmp_path_factory.mktemp("live"), bundle_path)
    with running_server(runtime.bundle, runtime, token=TOKEN) as srv:
        run_until_events(runtime, 7)
        yield srv, runtime


def post(url: str, path: Path, **kwargs: Any) -> requests.Response:
    with path.open("rb") as fh:
        return requests.post(url, files={"file": (path.name, fh)}, timeout=60, **kwargs)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def assert_error(r: requests.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"Error", "Code"}, doc
    assert doc["Code"] == code, doc
    for word in words:
        assert word.lower() in doc["Error"].lower(), (word, doc)
    return doc


# --- POST /inference: the reference service's contract -----------------------------------------


def test_inference_keeps_the_reference_json_shape(
    server: HttpServer, audio: dict[str, Path], bundle: Bundle
) -> None:
    r = post(server.url + "/inference", audio["ok"])
    assert r.status_code == 200, r.text
    doc = r.json()
    # The reference service's exact shape first ...
    assert isinstance(doc["Anomaly"], bool)
    assert set(doc["Details"]) == {"Message", "Probabilities"}
    probs = doc["Details"]["Probabilities"]
    # The model's classes, then "unknown" (a window unlike anything it knows).
    assert len(probs) == len(bundle.classes) + 1
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probs)
    assert math.isclose(sum(probs), 1.0, abs_tol=0.02)
    # ... plus class names, label and timing.
    assert doc["Classes"] == [*bundle.class_names, "unknown"]
    best = int(np.argmax(probs))
    assert doc["Label"] == doc["Classes"][best]
    if best < len(bundle.classes):
        assert doc["Details"]["Message"] == bundle.classes[best].message
        assert doc["Anomaly"] == bundle.classes[best].anomaly
    else:
        assert doc["Anomaly"] is False
    assert set(doc["TimingMs"]) >= {"decode", "features", "inference"}
    assert doc["File"] == "ok.wav"
    assert doc["Audio"]["source_rate_hz"] == 16000 and doc["Audio"]["channels"] == 1
    assert doc["Warnings"] == []

    # The same numbers as classifying the file in-process, and /predict agrees.
    local = ClipClassifier(bundle).classify_source(audio["ok"])
    assert probs == list(local.probabilities)
    again = post(server.url + "/predict", audio["ok"])
    assert again.status_code == 200
    assert again.json()["Details"] == doc["Details"]


def test_inference_takes_any_format_rate_channels_and_length(
    server: HttpServer, audio: dict[str, Path], bundle: Bundle
) -> None:
    r = post(server.url + "/inference", audio["eight_channels"])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["Audio"]["channels"] == 8 and doc["Audio"]["source_rate_hz"] == 48000
    assert any("8 channels" in w for w in doc["Warnings"])

    r = post(server.url + "/inference", audio["8khz"])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["Audio"]["source_rate_hz"] == 8000
    if bundle.spec.train_rate_hz is not None and bundle.spec.train_rate_hz > 8000:
        assert any("8000 Hz" in w for w in doc["Warnings"]), doc["Warnings"]

    r = post(server.url + "/inference", audio["flac"])
    assert r.status_code == 200, r.text

    r = post(server.url + "/inference", audio["short"])
    assert r.status_code == 200, r.text
    assert any("repeated to fill it" in w for w in r.json()["Warnings"])


def test_an_hour_long_upload_is_classified_from_its_first_window(
    server: HttpServer, audio: dict[str, Path]
) -> None:
    size = audio["hour"].stat().st_size
    assert 25 * MIB < size < 32 * MIB
    t0 = time.perf_counter()
    r = post(server.url + "/inference", audio["hour"])
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["Audio"]["duration_s"] == pytest.approx(3600.0, abs=0.01)
    assert doc["Audio"]["analysed_s"] < 11.0
    assert any("first" in w and "3600" in w for w in doc["Warnings"]), doc["Warnings"]
    # Decoding stops after the window: the cost is the upload, not the hour.
    assert doc["TimingMs"]["decode"] < 2000, doc["TimingMs"]
    assert elapsed < 30


@pytest.mark.parametrize(
    ("name", "status", "code", "words"),
    [
        ("not_audio", 415, "not_audio", ("notes.wav", "not an audio format")),
        ("empty", 400, "empty_file", ("empty", "0 bytes")),
        ("no_frames", 400, "bad_audio", ("empty",)),
        ("nan", 400, "bad_audio", ("nan",)),
        ("silent", 400, "bad_audio", ("silent",)),
    ],
)
def test_malformed_uploads_get_json_errors_that_name_the_problem(
    server: HttpServer,
    audio: dict[str, Path],
    name: str,
    status: int,
    code: str,
    words: tuple[str, ...],
) -> None:
    assert_error(post(server.url + "/inference", audio[name]), status, code, *words)


def test_requests_that_are_not_an_upload(server: HttpServer, audio: dict[str, Path]) -> None:
    url = server.url + "/inference"
    # Raw audio bytes instead of a form.
    r = requests.post(
        url, data=audio["ok"].read_bytes(), headers={"Content-Type": "audio/wav"}, timeout=30
    )
    assert_error(r, 415, "unsupported_media_type", "multipart/form-data", "audio/wav")
    # A JSON body.
    r = requests.post(url, json={"file": "ok.wav"}, timeout=30)
    assert_error(r, 415, "unsupported_media_type", "application/json")
    # A form whose file is in the wrong field: the error names the field received.
    with audio["ok"].open("rb") as fh:
        r = requests.post(url, files={"audio": ("ok.wav", fh)}, timeout=30)
    assert_error(r, 400, "missing_file", "'file'", "'audio'")
    # A multipart header without a boundary.
    r = requests.post(
        url, data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}, timeout=30
    )
    assert_error(r, 400, "missing_file")
    # A part whose name cannot be parsed (found by schemathesis: it used to be a 500).
    body = (
        b'--b\r\nContent-Disposition: form-data; name="\xe2\xa3\x99\\"\r\n\r\n-1e-130\r\n'
        b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n{}\r\n--b--\r\n'
    )
    r = requests.post(
        url, data=body, headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=30
    )
    assert_error(r, 400, "missing_file", "'x'")
    # Wrong method.
    r = requests.get(url, timeout=30)
    doc = assert_error(r, 405, "method_not_allowed", "GET")
    assert "POST" in r.headers["Allow"], doc


def test_uploads_over_the_limit_are_refused(bundle: Bundle, audio: dict[str, Path]) -> None:
    limit = 1 * MIB
    with running_server(bundle, max_upload_bytes=limit) as srv:
        url = srv.url + "/inference"
        # Just over: the app itself answers, in JSON, with the limit.
        just_over = b"RIFF" + bytes(limit - 3)
        r = requests.post(url, files={"file": ("big.wav", just_over)}, timeout=30)
        assert_error(r, 413, "too_large", "1048576 bytes", "1 MiB")
        # Far over: the server refuses the body before reading it.
        r = requests.post(url, files={"file": ("huge.wav", bytes(5 * limit))}, timeout=30)
        assert r.status_code == 413
        assert "max_body" in r.text or "too large" in r.text.lower()
        # Still answering afterwards.
        assert post(url, audio["ok"]).status_code == 200


def _raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_a_huge_declared_upload_is_refused_without_reading_it(server: HttpServer) -> None:
    # An hour of 16 kHz 16-bit audio: 115 MB. Only the headers are sent.
    size = 3600 * 16000 * 2 + 44
    head = (
        f"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    answer = _raw_request(server.port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.perf_counter() - t0 < 5


def test_a_stalled_upload_is_dropped_after_the_upload_timeout(bundle: Bundle) -> None:
    with running_server(bundle, upload_timeout_s=1.0) as srv:
        head = (
            b"POST /inference HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        )
        t0 = time.perf_counter()
        answer = _raw_request(srv.port, head, b"--b\r\n", wait_s=15.0)
        waited = time.perf_counter() - t0
        assert answer == b"", answer[:200]  # closed, never dispatched
        assert 0.9 <= waited < 6.0, waited
        # Other clients are unaffected.
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200


def test_concurrent_uploads_all_succeed(server: HttpServer, audio: dict[str, Path]) -> None:
    files = [audio["ok"], audio["8khz"], audio["eight_channels"], audio["flac"]] * 2
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        answers = list(pool.map(lambda p: post(server.url + "/inference", p), files))
    assert [r.status_code for r in answers] == [200] * len(files)
    # Classifiers shared between threads give each file the same answer every time.
    by_file: dict[str, list[Any]] = {}
    for path, r in zip(files, answers, strict=True):
        by_file.setdefault(path.name, []).append(r.json()["Details"])
    assert all(a == b for a, b in by_file.values()), by_file


def test_busy_classifiers_answer_503_with_retry_after(
    bundle: Bundle, audio: dict[str, Path]
) -> None:
    with running_server(bundle, classifiers=1, classifier_wait_s=0.2) as srv:
        pool = api_of(srv.app).pool
        with pool.acquire(1.0):  # the only classifier is taken
            r = post(srv.url + "/inference", audio["ok"])
        assert_error(r, 503, "busy", "retry")
        assert r.headers["Retry-After"] == "1"
        assert post(srv.url + "/inference", audio["ok"]).status_code == 200


# --- the other routes ---------------------------------------------------------------


def test_health_info_events_state_in_serve_mode(server: HttpServer, bundle: Bundle) -> None:
    r = requests.get(server.url + "/health", timeout=5)
    assert r.status_code == 200
    health = r.json()
    assert health["healthy"] is True and health["mode"] == "serve"
    assert health["source"] is None and health["sinks"] == {}
    assert health["model"]["version"] == bundle.model_version

    info = requests.get(server.url + "/info", timeout=5).json()
    for key in ("input_shape", "classes", "feature_spec", "provenance", "metrics"):
        assert key in info, key
    assert info["input_shape"] == list(bundle.input_shape)
    assert info["classes"] == list(bundle.class_names)
    assert info["feature_spec"]["n_mfcc"] == bundle.spec.n_mfcc
    assert info["server"]["mode"] == "serve" and info["server"]["auth"] is False

    events = requests.get(server.url + "/events", timeout=5).json()
    assert events == {"mode": "serve", "count": 0, "events": [], "next_before_seq": None}
    state = requests.get(server.url + "/state", timeout=5).json()
    assert state == {"mode": "serve", "level": None, "state": None, "hop_s": None}


def test_page_is_self_contained_and_has_the_upload_form(server: HttpServer) -> None:
    r = requests.get(server.url + "/", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    html = r.text
    assert 'enctype="multipart/form-data"' in html and 'name="file"' in html
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assets = [server.url + "/static/app.css", server.url + "/static/app.js"]
    for text in [html, *(requests.get(u, timeout=5).text for u in assets)]:
        # No CDN, no web font, no external script: the page works offline.
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_docs_render_the_readme(server: HttpServer, bundle: Bundle, tmp_path: Path) -> None:
    r = requests.get(server.url + "/docs", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "soundwatch" in r.text

    readme = tmp_path / "README.md"
    readme.write_text(
        "# Fan line watch\n\n| route | what |\n| --- | --- |\n| `/health` | liveness |\n\n"
        "![the page](docs/img/web-ui.png)\n\n<script>alert(1)</script>\n"
    )
    with running_server(bundle, readme_path=readme) as srv:
        html = requests.get(srv.url + "/docs", timeout=5).text
    assert '<h1 id="fan-line-watch">Fan line watch</h1>' in html  # GitHub's anchor ids
    assert "<td><code>/health</code></td>" in html
    assert "[picture: the page]" in html and "<img" not in html
    assert "<script>alert" not in html and "&lt;script&gt;" in html


def test_openapi_describes_every_route(server: HttpServer) -> None:
    r = requests.get(server.url + "/openapi.yaml", timeout=5)
    assert r.status_code == 200
    spec = yaml.safe_load(r.text)
    assert spec == yaml.safe_load(OPENAPI.read_text())
    rules = {  # Flask's <name> is OpenAPI's {name}
        (re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method)
        for rule in server.app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    described = {(path, m.upper()) for path, item in spec["paths"].items() for m in item}
    assert rules == described


def test_unknown_routes_get_json_404(server: HttpServer) -> None:
    assert_error(requests.get(server.url + "/nope", timeout=5), 404, "not_found", "/nope")


def test_metrics_in_serve_mode(server: HttpServer, audio: dict[str, Path]) -> None:
    assert post(server.url + "/inference", audio["ok"]).status_code == 200
    r = requests.get(server.url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.text
    assert "soundwatch_model_info{" in text
    assert _sample(text, "soundwatch_http_classifications_total") >= 1
    assert 'soundwatch_http_requests_total{method="POST",route="/inference",status="200"}' in text
    assert "process_resident_memory_bytes" in text


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"no sample {name} {labels}"
    return total


# --- run mode: a live pipeline behind the API ---------------------------------------


def test_events_are_paged_newest_first(live: tuple[HttpServer, Runtime]) -> None:
    srv, runtime = live
    every = runtime.recent_events(1000)
    seen: list[int] = []
    before: int | None = None
    for _ in range(20):
        params: dict[str, Any] = {"limit": 2}
        if before is not None:
            params["before_seq"] = before
        r = requests.get(srv.url + "/events", params=params, headers=auth(), timeout=5)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["mode"] == "run" and page["count"] == len(page["events"]) <= 2
        seen += [e["seq"] for e in page["events"]]
        before = page["next_before_seq"]
        if before is None:
            break
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(seen)
    assert seen == [e.seq for e in every]
    first = requests.get(srv.url + "/events", headers=auth(), timeout=5).json()["events"][0]
    assert first["type"] in ("anomaly_started", "anomaly_ended")
    assert first["class"] in runtime.bundle.class_names


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=abc", "before_seq=0"])
def test_bad_event_queries_are_400(live: tuple[HttpServer, Runtime], query: str) -> None:
    srv, _ = live
    r = requests.get(f"{srv.url}/events?{query}", headers=auth(), timeout=5)
    assert_error(r, 400, "bad_request", query.split("=")[0])


def test_state_shows_level_and_probabilities(live: tuple[HttpServer, Runtime]) -> None:
    srv, runtime = live
    doc = requests.get(srv.url + "/state", headers=auth(), timeout=5).json()
    assert doc["mode"] == "run"
    assert -90 < doc["level"]["rms_dbfs"] <= doc["level"]["peak_dbfs"] <= 0
    state = doc["state"]
    assert state["type"] == "state"
    assert set(state["Probabilities"]) == set(runtime.bundle.class_names)
    assert doc["hop_s"] == pytest.approx(runtime.hop_s, abs=1e-3)


def test_health_and_metrics_of_the_live_pipeline(live: tuple[HttpServer, Runtime]) -> None:
    srv, runtime = live
    health = requests.get(srv.url + "/health", timeout=5)  # open: no token needed
    assert health.status_code == 200, health.text
    assert health.json() == {"status": "ok"}  # the details are for token holders
    doc = requests.get(srv.url + "/health", headers=auth(), timeout=5).json()
    assert doc["mode"] == "run" and doc["source"]["device"].endswith("loop.wav")

    text = requests.get(srv.url + "/metrics", headers=auth(), timeout=5).text
    assert _sample(text, "soundwatch_windows_processed_total") == runtime.stats.windows > 0
    for stage in ("features", "inference", "decision"):
        assert _sample(text, "soundwatch_stage_seconds_count", stage=stage) > 0, stage
    started = sum(v for k, v in runtime.stats.events.items() if k.startswith("anomaly_started"))
    assert _sample(text, "soundwatch_events_total", type="anomaly_started") == started > 0
    assert _sample(text, "soundwatch_source_overflows_total") == 0
    assert _sample(text, "soundwatch_healthy") == 1
    assert "# TYPE soundwatch_publish_failures_total counter" in text
    assert "# TYPE soundwatch_outbox_depth gauge" in text


def test_health_is_503_while_the_source_is_not_delivering(
    bundle_path: Path, tmp_path: Path
) -> None:
    runtime = make_runtime(tmp_path, bundle_path)  # built, not started: source "starting"
    with running_server(runtime.bundle, runtime) as srv:
        r = requests.get(srv.url + "/health", timeout=5)
        assert r.status_code == 503, r.text
        doc = r.json()
        assert doc["healthy"] is False and doc["source"]["state"] == "starting"
        assert (
            _sample(requests.get(srv.url + "/metrics", timeout=5).text, "soundwatch_healthy") == 0
        )


def test_token_guards_every_route_but_health_page_docs_and_spec(
    live: tuple[HttpServer, Runtime], audio: dict[str, Path]
) -> None:
    srv, _ = live
    for path in ("/info", "/events", "/state", "/metrics"):
        r = requests.get(srv.url + path, timeout=5)
        assert_error(r, 401, "unauthorized", "Bearer")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = requests.get(srv.url + path, headers={"Authorization": "Bearer nope"}, timeout=5)
        assert_error(wrong, 401, "unauthorized", "wrong")
        assert requests.get(srv.url + path, headers=auth(), timeout=5).status_code == 200
    assert_error(post(srv.url + "/inference", audio["ok"]), 401, "unauthorized")
    assert post(srv.url + "/inference", audio["ok"], headers=auth()).status_code == 200
    for path in ("/health", "/", "/docs", "/openapi.yaml", "/static/app.js"):
        assert requests.get(srv.url + path, timeout=5).status_code == 200, path


def test_the_pipeline_keeps_running_while_the_api_is_abused(
    bundle_path: Path, tmp_path: Path, audio: dict[str, Path]
) -> None:
    runtime = make_runtime(tmp_path, bundle_path)
    stop = threading.Event()
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    with running_server(runtime.bundle, runtime, max_upload_bytes=MIB) as srv:
        worker.start()
        try:
            url = srv.url + "/inference"
            bad = ["not_audio", "empty", "nan", "silent", "no_frames"]
            with ThreadPoolExecutor(max_workers=4) as pool:
                answers = list(pool.map(lambda n: post(url, audio[n]), bad * 2))
                answers.append(requests.post(url, data=b"\x00" * 2 * MIB, timeout=30))
            assert all(400 <= r.status_code < 500 for r in answers), [
                (r.status_code, r.text[:80]) for r in answers
            ]
            before = runtime.stats.windows
            deadline = time.monotonic() + 10
            while runtime.stats.windows <= before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert worker.is_alive() and runtime.stats.windows > before
        finally:
            stop.set()
            worker.join(15)


# --- command line -----------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert parse_address(":5000") == ("127.0.0.1", 5000)
    for bad in ("5000", "host:port", "::1:5000", "127.0.0.1:70000", "[::1]5000"):
        with pytest.raises(HttpConfigError):
            parse_address(bad)


def test_token_rules() -> None:
    env: dict[str, str] = {}
    assert resolve_token("127.0.0.1", None, False, env) is None
    assert resolve_token("::1", None, False, env) is None
    with pytest.raises(HttpConfigError, match="SOUNDWATCH_HTTP_TOKEN"):
        resolve_token("0.0.0.0", None, False, env)
    with pytest.raises(HttpConfigError, match="not loopback"):
        resolve_token("edge-box.local", None, False, env)
    assert resolve_token("0.0.0.0", None, True, env) is None  # explicitly open
    assert resolve_token("0.0.0.0", None, False, {"SOUNDWATCH_HTTP_AUTH": "none"}) is None
    assert resolve_token("0.0.0.0", None, False, {"SOUNDWATCH_HTTP_TOKEN": TOKEN}) == TOKEN
    assert resolve_token("0.0.0.0", TOKEN, False, env) == TOKEN
    with pytest.raises(HttpConfigError, match="choose one"):
        resolve_token("0.0.0.0", TOKEN, True, env)
    with pytest.raises(HttpConfigError, match="too short"):
        resolve_token("127.0.0.1", "abc", False, env)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_for_url(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> str:
    """Read stderr until the server says where it listens."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if "HTTP API on http://" in line:
            return line.split("HTTP API on ", 1)[1].split()[0]
    proc.kill()
    raise AssertionError("the server never said where it listens:\n" + "".join(seen))


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_command(bundle_path: Path, audio: dict[str, Path], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "soundwatch", "serve", "--http", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*argv, "--bundle", str(bundle_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_cli_env(),
        cwd=tmp_path,
    )
    try:
        url = _wait_for_url(proc)
        health = requests.get(url + "/health", timeout=5).json()
        assert health["mode"] == "serve" and health["healthy"] is True
        assert post(url + "/inference", audio["ok"]).status_code == 200

        # tools/client.py against it: a table, and exit 1 when any file fails.
        client = [sys.executable, str(REPO / "tools" / "client.py"), "--url", url]
        ok = subprocess.run(
            [*client, str(audio["ok"]), str(audio["flac"])],
            capture_output=True, text=True, timeout=60, env=_cli_env(),
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        lines = ok.stdout.splitlines()
        assert lines[0].split()[:3] == ["file", "verdict", "label"]
        assert len(lines) == 4 and "ok.wav" in lines[2] and "clip.flac" in lines[3]
        bad = subprocess.run(
            [*client, "--json", "-j", "2", str(audio["ok"]), str(audio["not_audio"])],
            capture_output=True, text=True, timeout=60, env=_cli_env(),
        )  # fmt: skip
        assert bad.returncode == 1
        docs = [json.loads(line) for line in bad.stdout.splitlines()]
        assert docs[0]["Status"] == 200 and "Label" in docs[0]
        assert docs[1]["Status"] == 415 and "not an audio format" in docs[1]["Error"]
        assert "1 of 2 files failed" in bad.stderr
        unreachable = subprocess.run(
            [*client[:-1], "http://127.0.0.1:9", str(audio["ok"])],
            capture_output=True, text=True, timeout=60, env=_cli_env(),
        )  # fmt: skip
        assert unreachable.returncode == 1 and "cannot reach" in unreachable.stdout
    finally:
        assert _stop(proc) == 0


def test_serve_refuses_an_open_non_loopback_bind(bundle_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "soundwatch", "serve", "--http", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60, env=_cli_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    # One name for the option everywhere: the message names the one `serve` takes.
    assert "SOUNDWATCH_HTTP_TOKEN" in proc.stderr and "--http-no-auth" in proc.stderr
    assert "usage: soundwatch serve" in proc.stderr


def test_run_command_serves_the_api_beside_the_pipeline(bundle_path: Path, tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "line.wav", 12.0)
    argv = [sys.executable, "-m", "soundwatch", "run", "--source", f"file:{wav}", "--loop"]
    argv += ["--realtime", "--sink", f"jsonl:{tmp_path / 'events.jsonl'}"]
    argv += ["--state-dir", str(tmp_path / "state"), "--bundle", str(bundle_path)]
    argv += ["--http", "127.0.0.1:0"]
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_cli_env()
    )
    try:
        url = _wait_for_url(proc)
        deadline = time.monotonic() + 10
        while True:
            r = requests.get(url + "/health", timeout=5)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert r.json()["mode"] == "run" and r.json()["source"]["state"] == "running"
        assert requests.get(url + "/info", timeout=5).status_code == 200
        deadline = time.monotonic() + 10
        while True:  # the level is there once the first block went through
            state = requests.get(url + "/state", timeout=5).json()
            if state["level"]["peak_dbfs"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state["mode"] == "run" and -60 < state["level"]["peak_dbfs"] <= 0, state
    finally:
        assert _stop(proc) == 0
