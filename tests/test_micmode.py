"""`soundwatch mic`, the bench engineer's view, through the real CLI.

The microphone is the ALSA file-plugin device of tests/fakemic.py, captured
through real PortAudio; the terminal is a real pseudo-terminal of a given
width, so the screen is what a person would see.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.fakemic import FakeMic, make_fake_mic
from tests.httpkit import bundle_dir, fan_clip

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/alsa/alsa.conf").exists(), reason="ALSA is not installed"
)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH")}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _mic(*argv: str) -> list[str]:
    return [sys.executable, "-m", "soundwatch", "mic", "--bundle", str(bundle_dir()), *argv]


@pytest.fixture
def fakemic(tmp_path: Path) -> FakeMic:
    """30 s of an imbalanced fan at 48 kHz, one the model hears as such (tests/test_e2e_stream)."""
    from soundwatch.sim import typical_recording

    audio = typical_recording(7, [("imbalance", 30.0)], 6.0, 11, sample_rate_hz=48000)
    return make_fake_mic(tmp_path / "alsa", audio, 48000)


def test_a_device_that_matches_nothing_is_named_and_the_devices_listed(
    fakemic: FakeMic, tmp_path: Path
) -> None:
    proc = subprocess.run(
        _mic("--device", "no-such-mic", "--plain", "--state-dir", str(tmp_path / "s")),
        env=_env(fakemic.env),
        capture_output=True,
        text=True,
        timeout=60,  # before: it retried in the background, silently, forever
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert fakemic.name in proc.stdout  # the list, to pick from
    assert "no input device matching 'no-such-mic'" in proc.stderr
    assert "soundwatch mic --device NAME|INDEX" in proc.stderr


def test_events_show_reason_and_duration(tmp_path: Path) -> None:
    clip = np.concatenate([fan_clip(30.0, 16000, "imbalance"), fan_clip(30.0, 16000, "normal")])
    wav = tmp_path / "fault-then-normal.wav"
    sf.write(wav, clip, 16000, subtype="PCM_16")
    argv = _mic("--source", f"file:{wav}", "--fast", "--plain", "--state-dir", str(tmp_path / "s"))
    # The classifier's own decisions (a fresh unit would first learn its baseline).
    env = _env({"SOUNDWATCH__BASELINE__ENABLED": "false"})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ended = [line for line in proc.stdout.splitlines() if " ended imbalance " in line]
    assert ended, proc.stdout[-2000:]
    assert re.search(r" cleared after \d+\.\d s$", ended[0]), ended[0]


def _run_on_terminal(argv: list[str], env: dict[str, str], columns: int) -> str:
    """Run ``argv`` with stdout on a pseudo-terminal ``columns`` wide; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, env=env, stdout=slave, stdin=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other side closed: the process is done
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_the_screen_fits_the_terminal_and_silence_points_at_no_fault(tmp_path: Path) -> None:
    quiet = fan_clip(12.0, 16000, "clogging")
    quiet = quiet / np.sqrt(np.mean(quiet**2)) * 10 ** (-85 / 20)  # -85 dBFS RMS: silent
    wav = tmp_path / "quiet.wav"
    sf.write(wav, quiet, 16000, subtype="FLOAT")
    columns = 50
    argv = _mic("--source", f"file:{wav}", "--realtime", "--state-dir", str(tmp_path / "s"))
    out = _run_on_terminal(argv, _env(), columns)
    frames = [f for f in out.split("\x1b[H\x1b[2J") if f.strip()]
    assert frames, out[-2000:]
    for frame in frames:
        for line in frame.splitlines():
            assert len(line) <= columns, repr(line)
    silent = [f for f in frames if "SILENCE" in f]
    assert silent, frames[-1]
    screen = silent[-1]
    assert "◀" not in screen  # no class is pointed at
    assert "no verdict, the window is silent" in screen
    # The warning is wrapped, not cut: its advice is all there.
    words = " ".join(line.strip("! ").strip() for line in screen.splitlines())
    assert "is the mic muted or unplugged?" in words


@pytest.mark.slow
def test_record_keeps_the_device_audio_beside_what_the_model_heard(
    fakemic: FakeMic, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    argv = _mic("--device", fakemic.name, "--record", str(rec), "--plain")
    argv += ["--state-dir", str(tmp_path / "s")]
    # The classifier's own decisions (a fresh unit would first learn its baseline).
    env = _env({**fakemic.env, "SOUNDWATCH__BASELINE__ENABLED": "false"})
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not list(rec.glob("*.device.wav")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        time.sleep(0.5)  # the event's JSON is written right after the audio
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    device_wavs = sorted(rec.glob("*.device.wav"))
    assert device_wavs, f"nothing recorded: {sorted(p.name for p in rec.iterdir())}"
    device_path = device_wavs[0]
    model_path = device_path.with_name(device_path.name.replace(".device.wav", ".wav"))
    assert model_path.is_file() and model_path.with_suffix(".json").is_file()

    device_info, model_info = sf.info(str(device_path)), sf.info(str(model_path))
    assert (device_info.samplerate, device_info.channels) == (48000, 1)  # the device's own
    assert device_info.subtype == "PCM_16"
    assert model_info.samplerate == 22050 and model_info.channels == 1  # what the model heard
    assert abs(device_info.duration - model_info.duration) < 0.05

    # Sample for sample what the device delivered, from where the window starts.
    got, _ = sf.read(str(device_path), dtype="int16")
    samples = fakemic.samples
    starts = np.flatnonzero(samples[: len(samples) - len(got) + 1] == got[0])
    offsets = [int(i) for i in starts if np.array_equal(samples[i : i + len(got)], got)]
    assert offsets, "the recording is not a stretch of the device's samples"
    window_start_s = float(re.search(r"_(\d+\.\d)s\.device\.wav$", device_path.name)[1])  # type: ignore[index]
    assert abs(offsets[0] / 48000 - window_start_s) <= 0.06
