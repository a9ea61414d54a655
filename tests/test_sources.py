"""Sources: microphone through real PortAudio + ALSA, file, simulator, factory.

Microphone tests capture from the ALSA file-plugin microphone of
``tests/fakemic.py``. They run in-process: the fixture points
``ALSA_CONFIG_PATH`` at the fake device and re-initialises PortAudio (the same
rescan MicSource does before a reopen). The one scenario that can block a
PortAudio thread for good (a device that stops delivering) runs in a
subprocess with a hard timeout, which also checks that the process exits.

The fake device is not clock-paced (a second of audio arrives in about a
millisecond), so the tests reason in sample counts, and use short watchdog,
flat-line and backoff settings.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from fakemic import FakeMic, activate, make_fake_mic
from soundwatch.config import FileSourceConfig, MicSourceConfig, SimulatorSourceConfig
from soundwatch.sources import (
    FileSource,
    MicSource,
    Source,
    SourceError,
    list_input_devices,
    open_source,
    rescan_devices,
)
from soundwatch.sources.mic import _to_mono_float32, match_input_device
from soundwatch.sources.simulator import SimulatorSource, parse_schedule
from soundwatch.stream_types import SourceHealth


def mic_config(device: str | int | None, **settings: Any) -> MicSourceConfig:
    return MicSourceConfig(device=device, **settings)


REPO = Path(__file__).resolve().parent.parent
ALSA_CONF = Path("/usr/share/alsa/alsa.conf")


def _portaudio_available() -> bool:
    try:
        rescan_devices()
    except SourceError:
        return False
    return ALSA_CONF.exists()


needs_alsa = pytest.mark.skipif(
    not _portaudio_available(), reason="needs libportaudio2 and ALSA (make setup installs them)"
)


def _noise(seconds: float, rate: int, seed: int = 0, level: float = 0.2) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = level * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.clip(x, -0.99, 0.99).astype(np.float32)


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class Consumer:
    """Runs ``source.blocks()`` in a thread and records what comes out.

    ``segments`` splits the stream at discontinuities and keeps up to
    ``keep_samples`` samples of each; ``spans`` has (start, end, discontinuity)
    of every block (bounded); ``healths`` every distinct health seen.
    """

    def __init__(
        self,
        source: Source,
        keep_samples: int = 0,
        max_samples: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.source = source
        self.keep_samples = keep_samples
        self.max_samples = max_samples
        self.delay_s = delay_s
        self.stop = threading.Event()
        self.spans: list[tuple[int, int, bool]] = []
        self.segments: list[list[npt.NDArray[np.float32]]] = []
        self.healths: list[SourceHealth] = []
        self.rates: set[int] = set()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)
        self._watch = threading.Thread(target=self._watch_health, name="test-health", daemon=True)

    def start(self) -> Consumer:
        self._thread.start()
        self._watch.start()
        return self

    def _run(self) -> None:
        try:
            for block in self.source.blocks(self.stop):
                if len(self.spans) < 100_000:
                    self.spans.append((block.start_sample, block.end_sample, block.discontinuity))
                self.rates.add(block.sample_rate_hz)
                if block.discontinuity or not self.segments:
                    self.segments.append([])
                kept = sum(len(s) for s in self.segments[-1])
                if kept < self.keep_samples:
                    self.segments[-1].append(block.samples.copy())
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self.max_samples is not None and block.end_sample >= self.max_samples:
                    break
        except BaseException as e:  # the test asserts there is none
            self.error = e

    def _watch_health(self) -> None:
        while self._thread.is_alive():
            h = self.source.health()
            if not self.healths or h != self.healths[-1]:
                self.healths.append(h)
            time.sleep(0.002)

    def segment(self, index: int) -> npt.NDArray[np.float32]:
        return (
            np.concatenate(self.segments[index])
            if self.segments[index]
            else np.zeros(0, np.float32)
        )

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop_and_join(self, timeout_s: float = 3.0) -> float:
        """Set stop; return how long ``blocks()`` took to return (fails if it hung)."""
        t0 = time.monotonic()
        self.stop.set()
        self._thread.join(timeout_s)
        elapsed = time.monotonic() - t0
        assert not self._thread.is_alive(), f"blocks() did not return {timeout_s} s after stop"
        self._watch.join(1.0)
        assert self.error is None, f"blocks() raised {self.error!r}"
        return elapsed


@pytest.fixture
def fake_alsa(tmp_path: Path) -> Iterator[Callable[..., FakeMic]]:
    """Makes virtual microphones visible to this process's PortAudio."""
    old = os.environ.get("ALSA_CONFIG_PATH")
    count = 0

    def make(audio: Any, rate_hz: int | None = 48000, **kwargs: Any) -> FakeMic:
        nonlocal count
        count += 1
        mic = make_fake_mic(tmp_path / f"mic{count}", audio, rate_hz, **kwargs)
        activate(mic)
        return mic

    yield make
    if old is None:
        os.environ.pop("ALSA_CONFIG_PATH", None)
    else:
        os.environ["ALSA_CONFIG_PATH"] = old
    rescan_devices()


# --- microphone ------------------------------------------------------------------


def test_match_input_device_rules() -> None:
    devices = [
        {"index": 0, "name": "USB PnP Sound Device: Audio (hw:1,0)"},
        {"index": 3, "name": "pulse"},
        {"index": 4, "name": "Pulse"},
        {"index": 5, "name": "Pulse Monitor"},
    ]
    assert match_input_device("usb pnp", devices)["index"] == 0  # case-insensitive substring
    assert match_input_device(3, devices)["name"] == "pulse"
    # Several exact (case-insensitive) matches: the remembered index decides.
    assert match_input_device("PULSE", devices, prefer_index=4)["index"] == 4
    with pytest.raises(SourceError, match="several input devices"):
        match_input_device("pulse", devices)
    with pytest.raises(SourceError, match="matches several"):
        match_input_device("ul", devices)
    with pytest.raises(SourceError, match=r"no input device matching 'webcam'.*USB PnP"):
        match_input_device("webcam", devices)
    with pytest.raises(SourceError, match="no input device with index 9"):
        match_input_device(9, devices)


def test_multichannel_capture_is_mixed_down() -> None:
    stereo = np.array([[1000, 3000], [-32768, 32767]], dtype=np.int16)
    np.testing.assert_allclose(
        _to_mono_float32(stereo, 1 / 32768), [2000 / 32768, -0.5 / 32768], rtol=1e-6
    )
    mono = np.array([[0.5], [-0.25]], dtype=np.float32)
    assert _to_mono_float32(mono, 1.0).tolist() == [0.5, -0.25]


@needs_alsa
def test_list_input_devices_shows_the_fake_mic(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(np.zeros(4800), 48000)
    devices = {d["name"]: d for d in list_input_devices()}
    assert mic.name in devices
    info = devices[mic.name]
    assert info["max_input_channels"] >= 1
    assert info["hostapi"] == "ALSA"
    assert set(info) >= {"index", "name", "max_input_channels", "default_samplerate", "hostapi"}


@needs_alsa
@pytest.mark.parametrize("rate", [48000, 44100])
def test_mic_captures_the_device_samples_in_order(
    fake_alsa: Callable[..., FakeMic], tmp_path: Path, rate: int
) -> None:
    wav = tmp_path / f"tone{rate}.wav"
    sf.write(wav, _noise(1.0, rate), rate, subtype="PCM_16")
    mic = fake_alsa(wav, None)  # the WAV's own rate
    assert mic.rate_hz == rate
    # The fake's plug PCM claims every rate (ALSA would resample), so the
    # preferred order decides; a real device accepts only its own rates.
    source = MicSource(mic_config("FakeMic", block_s=0.05, preferred_rates_hz=(rate, 48000, 44100)))
    assert source.sample_rate_hz == rate  # probed at construction
    consumer = Consumer(source, keep_samples=len(mic.samples), max_samples=2 * rate).start()
    assert wait_for(lambda: consumer.done, 5.0)
    consumer.stop_and_join()

    assert consumer.rates == {rate}
    got = consumer.segment(0)[: len(mic.samples)]
    np.testing.assert_array_equal(got, mic.expected)  # exact: int16 capture, /32768
    starts = [s for s, _, _ in consumer.spans]
    assert starts[0] == 0
    assert all(prev[1] == cur[0] for prev, cur in itertools.pairwise(consumer.spans))
    assert not any(d for _, _, d in consumer.spans)
    h = source.health()
    assert h.device == mic.name and h.device_rate_hz == rate and h.reopens == 0
    assert h.samples >= 2 * rate


@needs_alsa
def test_mic_default_device(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(_noise(0.3, 48000), 48000, as_default=True)
    source = MicSource(mic_config(None, block_s=0.05))
    consumer = Consumer(source, keep_samples=len(mic.samples), max_samples=48000).start()
    assert wait_for(lambda: consumer.done, 5.0)
    consumer.stop_and_join()
    np.testing.assert_array_equal(consumer.segment(0)[: len(mic.samples)], mic.expected)


@needs_alsa
def test_mic_warns_when_no_preferred_rate_works(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(_noise(0.3, 48000), 48000)
    default_rate = int(
        next(d for d in list_input_devices() if d["name"] == mic.name)["default_samplerate"]
    )
    # ALSA refuses rates below 4 kHz and above 200 kHz.
    source = MicSource(mic_config(mic.name, block_s=0.05, preferred_rates_hz=(1000, 400000)))
    consumer = Consumer(source, max_samples=default_rate).start()
    assert wait_for(lambda: consumer.done, 5.0)
    consumer.stop_and_join()
    assert source.sample_rate_hz == default_rate
    assert "wrong rate" in source.health().detail
    assert source.health().healthy


@needs_alsa
def test_mic_drops_newest_blocks_and_counts_them_when_the_consumer_lags(
    fake_alsa: Callable[..., FakeMic],
) -> None:
    mic = fake_alsa(_noise(5.0, 48000, seed=3), 48000)
    # The unpaced fake device overflows far faster than a real one can; the
    # storm rule (test_mic_storm.py) is kept out of this test's way.
    source = MicSource(mic_config(mic.name, block_s=0.01, queue_blocks=4, overflow_storm_s=600))
    consumer = Consumer(source, max_samples=2 * len(mic.samples), delay_s=0.0005).start()
    assert wait_for(lambda: consumer.done, 5.0)
    consumer.stop_and_join()
    assert source.health().overflows > 0
    jumps = [
        (prev, cur)
        for prev, cur in itertools.pairwise(consumer.spans)
        if cur[2] and cur[0] > prev[1]
    ]
    assert jumps, "dropped blocks must show as a discontinuity with a position jump"
    assert all(cur[0] >= prev[1] for prev, cur in itertools.pairwise(consumer.spans))


@needs_alsa
def test_mic_positions_account_for_dropped_samples_exactly(
    fake_alsa: Callable[..., FakeMic],
) -> None:
    """A block's position is where its samples are in the device's stream."""
    mic = fake_alsa(_noise(5.0, 48000, seed=4), 48000)
    source = MicSource(mic_config(mic.name, block_s=0.01, queue_blocks=4, overflow_storm_s=600))
    checked = 0

    stop = threading.Event()
    for block in source.blocks(stop):
        if block.end_sample > len(mic.samples):
            break
        np.testing.assert_array_equal(
            block.samples, mic.expected[block.start_sample : block.end_sample]
        )
        checked += 1
        time.sleep(0.0005)
    stop.set()
    assert checked >= 4
    assert source.health().overflows > 0


@needs_alsa
def test_mic_flat_line_is_reported_and_reopened(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(np.zeros(24000), 48000)  # all zeros; after EOF the plugin repeats them
    source = MicSource(
        mic_config(mic.name, block_s=0.05, flatline_s=0.2, watchdog_s=2.0), backoff_s=(0.05, 0.1)
    )
    consumer = Consumer(source).start()
    assert wait_for(lambda: source.health().reopens >= 2, 5.0), source.health()
    elapsed = consumer.stop_and_join()
    assert elapsed < 1.0
    flat = [h for h in consumer.healths if "flat line" in h.detail]
    assert flat and not flat[0].healthy and flat[0].state == "reopening"
    # A reopened device's first block continues the count and is flagged.
    spans = consumer.spans
    reopened = [i for i, (_, _, disc) in enumerate(spans) if disc]
    assert reopened
    assert all(spans[i][0] == spans[i - 1][1] for i in reopened)
    assert source.health().state == "ended"


@needs_alsa
def test_mic_unplugged_device_is_found_again_by_name(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(np.zeros(24000), 48000)
    index_before = next(d["index"] for d in list_input_devices() if d["name"] == mic.name)
    source = MicSource(mic_config("fakemic", block_s=0.05, flatline_s=0.2), backoff_s=(0.05, 0.1))
    consumer = Consumer(source, keep_samples=24000).start()
    assert wait_for(lambda: any("flat line" in h.detail for h in consumer.healths), 3.0)

    mic.unplug()  # the next reopen rescans and no longer finds it
    assert wait_for(
        lambda: any("no input device matching 'fakemic'" in h.detail for h in consumer.healths),
        3.0,
    ), consumer.healths[-3:]
    assert not source.health().healthy
    reopens = source.health().reopens

    # It comes back with sound, behind another device, so its index changes.
    # No blocks flow while it is away, so the next segment starts at the reopen
    # (later ones start where the flood of the looping plugin overflows the queue).
    reopened = len(consumer.segments)
    tone = _noise(0.5, 48000, seed=5)
    mic.replug(tone, devices_before=("soundwatch_othermic",))
    assert wait_for(lambda: source.health().healthy and source.health().samples > 0, 3.0)
    assert wait_for(
        lambda: (
            len(consumer.segments) > reopened
            and sum(len(b) for b in consumer.segments[reopened]) >= 24000
        ),
        3.0,
    )
    consumer.stop_and_join()

    index_after = next(d["index"] for d in list_input_devices() if d["name"] == mic.name)
    assert index_after != index_before
    assert source.health().reopens > reopens
    assert source.health().device == mic.name
    np.testing.assert_array_equal(consumer.segment(reopened)[:24000], mic.expected[:24000])


@needs_alsa
@pytest.mark.parametrize("mode", ["bogus", "missing"])
def test_mic_broken_device_never_raises_and_stops_promptly(
    fake_alsa: Callable[..., FakeMic], mode: str
) -> None:
    fake_alsa(np.zeros(4800), 48000, mode=mode)
    source = MicSource(
        mic_config("soundwatch_fakemic"), backoff_s=(0.05, 0.1, 0.5)
    )  # does not raise
    consumer = Consumer(source).start()
    assert wait_for(lambda: source.health().reopens >= 3, 5.0), source.health()
    h = source.health()
    assert not h.healthy and h.state == "reopening"
    assert "no input device matching" in h.detail
    assert consumer.stop_and_join() < 1.0
    assert consumer.spans == []


@needs_alsa
def test_mic_close_ends_a_running_stream(fake_alsa: Callable[..., FakeMic]) -> None:
    mic = fake_alsa(_noise(0.2, 48000), 48000)
    source = MicSource(mic_config(mic.name, block_s=0.05))
    consumer = Consumer(source).start()
    assert wait_for(lambda: source.health().samples > 0, 3.0)
    source.close()
    assert wait_for(lambda: consumer.done, 2.0)
    consumer.stop_and_join()


_STALL_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from fakemic import FifoFeeder, make_fake_mic

    mic = make_fake_mic(sys.argv[2], np.zeros(1), 48000, mode="fifo")
    feeder = FifoFeeder(mic)  # before PortAudio starts: its device scan opens the pipe
    os.environ.update(mic.env)
    from soundwatch.config import MicSourceConfig
    from soundwatch.sources.mic import MicSource

    rng = np.random.default_rng(0)
    def audio(seconds):
        return (0.1 * rng.standard_normal(int(48000 * seconds))).astype(np.float32)

    feeder.feed(audio(0.5))
    config = MicSourceConfig(device="fakemic", block_s=0.05, watchdog_s=0.4)
    source = MicSource(config, close_timeout_s=0.3, backoff_s=(0.05,))
    stop = threading.Event()
    consumer = threading.Thread(target=lambda: [b for b in source.blocks(stop)], daemon=True)
    consumer.start()
    details = []
    def watch():
        while consumer.is_alive():
            d = source.health().detail
            if not details or details[-1] != d:
                details.append(d)
            time.sleep(0.002)
    threading.Thread(target=watch, daemon=True).start()
    def wait_for(predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.005)
        return predicate()

    out = {}
    out["first_data"] = wait_for(lambda: source.health().samples > 0, 3)
    out["stalled"] = wait_for(lambda: any("no samples" in d for d in details), 3)
    out["reopened"] = wait_for(lambda: source.health().reopens >= 1, 3)
    before = source.health().samples
    feeder.feed(audio(1.0))
    out["resumed"] = wait_for(lambda: source.health().samples > before, 3)
    reopens = source.health().reopens
    out["stalled_again"] = wait_for(lambda: source.health().reopens > reopens, 3)
    t0 = time.monotonic()
    stop.set()
    consumer.join(3)
    out["stop_s"] = time.monotonic() - t0
    out["returned"] = not consumer.is_alive()
    out["health"] = dataclasses.asdict(source.health())
    print(json.dumps(out), flush=True)
    # Exit with the pipe still open: a PortAudio thread is blocked in read().
    """
)


@needs_alsa
def test_mic_that_stops_delivering_is_reopened_and_the_process_still_exits(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'module'}{os.pathsep}{REPO}"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _STALL_SCRIPT, str(REPO / "tests"), str(tmp_path / "fifo")],
        capture_output=True,
        text=True,
        timeout=15,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first_data"] and out["stalled"] and out["reopened"], out
    assert out["resumed"] and out["stalled_again"], out
    assert out["returned"] and out["stop_s"] < 1.5, out
    assert out["health"]["reopens"] >= 2
    assert time.monotonic() - t0 < 15


# --- file ---------------------------------------------------------------------------


def _collect(source: Source, stop: threading.Event | None = None, limit: int = 10_000) -> list[Any]:
    stop = stop or threading.Event()
    blocks = []
    for block in source.blocks(stop):
        blocks.append(block)
        if len(blocks) >= limit:
            break
    return blocks


def test_file_source_reads_in_order_mixes_down_and_ends(tmp_path: Path) -> None:
    rate = 16000
    stereo = np.stack([_noise(1.03, rate, 1), _noise(1.03, rate, 2)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    source = FileSource(FileSourceConfig(path=path, block_s=0.1))
    assert source.sample_rate_hz == rate
    blocks = _collect(source)
    assert [b.start_sample for b in blocks] == list(range(0, len(stereo), 1600))
    assert len(blocks[-1].samples) == len(stereo) % 1600  # the short last block
    y = np.concatenate([b.samples for b in blocks])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, stereo.mean(axis=1), atol=1e-7)
    assert not any(b.discontinuity for b in blocks)
    h = source.health()
    assert h.state == "ended" and h.healthy and h.samples == len(stereo)


def test_file_source_reads_flac(tmp_path: Path) -> None:
    x = _noise(0.5, 44100)
    path = tmp_path / "a.flac"
    sf.write(path, x, 44100, subtype="PCM_16")
    y = np.concatenate([b.samples for b in _collect(FileSource(FileSourceConfig(path=path)))])
    np.testing.assert_allclose(y, x, atol=1 / 32768)


def test_file_loop_wraps_with_a_discontinuity(tmp_path: Path) -> None:
    x = _noise(0.25, 8000)  # 2000 samples: blocks of 800, 800, 400
    path = tmp_path / "loop.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    blocks = _collect(FileSource(FileSourceConfig(path=path, loop=True, block_s=0.1)), limit=8)
    assert [b.start_sample for b in blocks] == [0, 800, 1600, 2000, 2800, 3600, 4000, 4800]
    assert [b.discontinuity for b in blocks] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    np.testing.assert_array_equal(blocks[3].samples, x[:800])


def test_file_realtime_pacing_follows_the_clock_without_drifting(tmp_path: Path) -> None:
    path = tmp_path / "rt.wav"
    sf.write(path, _noise(0.6, 8000), 8000)
    t0 = time.monotonic()
    n = 0
    for block in FileSource(FileSourceConfig(path=path, realtime=True, block_s=0.1)).blocks(
        threading.Event()
    ):
        if n == 0:
            time.sleep(0.5)  # a slow consumer once: the source catches up afterwards
        n += 1
        assert block.captured_at is not None
    elapsed = time.monotonic() - t0
    assert n == 6
    # The first block is due at 0.1 s, the last at 0.6 s. Drifting by the
    # consumer's 0.5 s would end at 1.1 s; catching up ends at about 0.6 s.
    assert 0.55 <= elapsed < 0.95, elapsed


def test_file_realtime_stops_promptly(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, _noise(30.0, 8000), 8000)
    consumer = Consumer(
        FileSource(FileSourceConfig(path=path, realtime=True, loop=True, block_s=1.0))
    ).start()
    time.sleep(0.2)
    assert consumer.stop_and_join() < 0.5


def test_close_ends_a_file_source(tmp_path: Path) -> None:
    path = tmp_path / "loop.wav"
    sf.write(path, _noise(0.1, 8000), 8000)
    source = FileSource(FileSourceConfig(path=path, loop=True))
    consumer = Consumer(source).start()
    assert wait_for(lambda: source.health().samples > 8000, 2.0)
    source.close()
    assert wait_for(lambda: consumer.done, 1.0)
    consumer.stop_and_join()
    assert source.health().state == "ended"


def test_unreadable_files_raise_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read audio file"):
        FileSource(FileSourceConfig(path=tmp_path / "missing.wav"))
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(SourceError, match="cannot read audio file") as info:
        FileSource(FileSourceConfig(path=text))
    assert info.value.__cause__ is not None
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(SourceError, match="no samples"):
        FileSource(FileSourceConfig(path=empty))


# --- simulator ----------------------------------------------------------------------


def _simulate(block_s: float, **kwargs: Any) -> npt.NDArray[np.float32]:
    config = SimulatorSourceConfig(
        schedule="normal:0.5,imbalance:0.3,normal:0.2",
        rate_hz=16000,
        realtime=False,
        loop=False,
        block_s=block_s,
        **kwargs,
    )
    blocks = _collect(SimulatorSource(config))
    assert all(b.start_sample == a.end_sample for a, b in itertools.pairwise(blocks))
    return np.concatenate([b.samples for b in blocks])


def test_simulator_is_deterministic_and_independent_of_block_size() -> None:
    a = _simulate(0.1)
    assert a.dtype == np.float32 and len(a) == 16000  # one pass, then it ends
    np.testing.assert_array_equal(a, _simulate(0.1))
    # Block sizes change the FFT sizes of the streaming convolutions, so the
    # float64 arithmetic rounds differently: the same samples to within one
    # float32 step at the signal's peak, not bit for bit.
    step = float(np.spacing(np.float32(np.max(np.abs(a)))))
    np.testing.assert_allclose(_simulate(0.037), a, rtol=0, atol=step)
    assert not np.array_equal(a, _simulate(0.1, seed=1))
    assert float(np.max(np.abs(a))) > 0.001


def test_simulator_fault_at_follows_the_schedule() -> None:
    source = SimulatorSource(
        SimulatorSourceConfig(
            schedule="normal:0.5,imbalance:0.3,normal:0.2", rate_hz=16000, realtime=False
        )
    )
    assert source.cycle_samples == 16000
    assert source.fault_at(0) == "normal"
    assert source.fault_at(7999) == "normal"
    assert source.fault_at(8000) == "imbalance"
    assert source.fault_at(12799) == "imbalance"
    assert source.fault_at(12800) == "normal"
    assert source.fault_at(16000 + 8000) == "imbalance"  # looping
    # Looping runs past the cycle without a discontinuity.
    blocks = _collect(source, limit=15)
    assert blocks[-1].end_sample == 24000
    assert not any(b.discontinuity for b in blocks)


def test_parse_schedule_and_its_errors() -> None:
    assert parse_schedule(" normal:60, imbalance:30 ,normal:2.5") == [
        ("normal", 60.0),
        ("imbalance", 30.0),
        ("normal", 2.5),
    ]
    with pytest.raises(ValueError, match="schedule is empty"):
        parse_schedule(" ")
    with pytest.raises(ValueError, match=r"item 2 'imbalance': expected 'state:seconds'"):
        parse_schedule("normal:60,imbalance")
    with pytest.raises(ValueError, match=r"unknown state 'wobble' \(one of normal, imbalance"):
        parse_schedule("wobble:3")
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        parse_schedule("normal:-1")
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        parse_schedule("normal:soon")


# --- factory ------------------------------------------------------------------------


def test_open_source_builds_each_kind_from_its_config_model(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _noise(0.1, 8000), 8000)
    file_source = open_source(FileSourceConfig(path=path, loop=True))
    assert isinstance(file_source, FileSource) and file_source.loop
    sim = open_source(
        SimulatorSourceConfig(schedule="normal:1", unit=3, rate_hz=16000, realtime=False)
    )
    assert isinstance(sim, SimulatorSource)
    assert (sim.config.unit, sim.sample_rate_hz) == (3, 16000)
    mic = open_source(MicSourceConfig(device="no such mic", preferred_rates_hz=(16000,)))
    assert isinstance(mic, MicSource) and mic.preferred_rates_hz == (16000,)
    mic.close()


def test_source_settings_are_checked_by_the_config() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="block_s"):
        FileSourceConfig(path="x.wav", block_s=0)
    with pytest.raises(ValidationError, match="queue_blocks"):
        MicSourceConfig(queue_blocks=1)
    with pytest.raises(ValidationError, match="preferred_rates_hz"):
        MicSourceConfig(preferred_rates_hz=())
    with pytest.raises(SourceError, match="cannot read audio file"):
        open_source(FileSourceConfig(path="no-such.wav"))
