"""``soundwatch classify`` tells what ``POST /inference`` tells: the same answer and warnings.

Through the real CLI (a subprocess) and the real HTTP server on a port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from soundwatch.bundle import load_bundle
from tests.httpkit import bundle_dir, fan_clip, running_server, write_wav


def _classify(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soundwatch", "classify", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    out = {
        "short": write_wav(root / "short.wav", 3.0),
        "slow": write_wav(root / "slow.wav", 10.0, rate_hz=8000),
        "long": write_wav(root / "long.wav", 30.0),
    }
    gap = fan_clip(10.0)
    gap[3 * 16000 : 6 * 16000] = 0.0
    sf.write(root / "gap.wav", gap, 16000, subtype="PCM_16")
    out["gap"] = root / "gap.wav"
    loud = np.clip(fan_clip(10.0) * 80.0, -1.0, 1.0)
    sf.write(root / "clipped.wav", loud, 16000, subtype="PCM_16")
    out["clipped"] = root / "clipped.wav"
    (root / "empty.wav").write_bytes(b"")
    out["empty"] = root / "empty.wav"
    (root / "notes.txt").write_text("not audio\n")
    out["text"] = root / "notes.txt"
    return out


EXPECTED = {
    "short": "repeated to fill it",
    "slow": "below the 16000 Hz",
    "long": "only the first",
    "gap": "silent or dropped out",
    "clipped": "clipped",
}


def test_console_and_json_carry_the_same_warnings(clips: dict[str, Path]) -> None:
    files = [str(clips[name]) for name in EXPECTED]
    as_json = _classify("--json", *files)
    assert as_json.returncode == 0, as_json.stderr
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    console = _classify(*files)
    assert console.returncode == 0, console.stderr
    for doc, (name, fragment) in zip(docs, EXPECTED.items(), strict=True):
        assert any(fragment in w for w in doc["Warnings"]), (name, doc["Warnings"])
        for warning in doc["Warnings"]:
            assert f"warning: {warning}" in console.stdout, (name, warning)
        assert doc["Classes"][-1] == "unknown"
        assert len(doc["Details"]["Probabilities"]) == len(doc["Classes"])
        assert sum(doc["Details"]["Probabilities"]) == pytest.approx(1.0, abs=1e-3)


def test_a_clip_that_cannot_be_judged_is_unknown_with_the_reason(clips: dict[str, Path]) -> None:
    doc = json.loads(_classify("--json", str(clips["clipped"])).stdout)
    assert doc["Label"] == "unknown" and doc["Anomaly"] is False
    assert "clipped" in doc["Unknown"]["reason"]
    assert max(doc["Details"]["Probabilities"][1:4]) < 0.5


@pytest.mark.parametrize(
    ("name", "cause"),
    [("missing", "no such file"), ("empty", "empty file"), ("text", "not audio")],
)
def test_errors_name_the_real_cause(clips: dict[str, Path], name: str, cause: str) -> None:
    path = clips[name] if name in clips else clips["short"].parent / "nowhere.wav"
    result = _classify(str(path), str(clips["short"]))
    assert result.returncode == 1
    assert cause in result.stderr, result.stderr
    assert "System error" not in result.stderr and "Format not recognised" not in result.stderr
    assert "short.wav" in result.stdout  # the good file is still classified


def test_inference_answers_as_classify_does(clips: dict[str, Path]) -> None:
    cli = json.loads(_classify("--json", str(clips["gap"])).stdout)
    with running_server(load_bundle(bundle_dir())) as server, clips["gap"].open("rb") as f:
        r = requests.post(f"{server.url}/inference", files={"file": ("gap.wav", f)}, timeout=60)
    assert r.status_code == 200
    http = r.json()
    for key in ("Anomaly", "Details", "Classes", "Label", "Warnings", "Unknown"):
        assert http[key] == cli[key], key
