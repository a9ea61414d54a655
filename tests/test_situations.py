"""A normal fan in the situations of a real line gets no fault verdict it does not have.

``fan-line.md`` ("On a real line"): faults ramp in and out, so some windows
hold two states; audio drops out, clips and changes level when someone
touches the gain; clips may be short; and the background has events that are
no fault of the fan (knocks, a reversing beeper, a passing truck, speech, a
door, and the simulator's other kinds). None of these may make the module
name a fault that is not there: no clip's verdict (its label) may be one,
and no anomaly event may name one. A fault label always carries probability
0.5 or more (the bundle's thresholds start there), so a verdict below that
is no verdict: a window the model leans on but is not sure of is labelled
``unknown``. A fault that really is in
the audio (the one a window straddles) may be named; ``normal`` and
``unknown`` always may.

Every situation is rendered by the simulator (:mod:`soundwatch.sim`) for
units the model never saw in training (it trains on even ids), at 0 and
+6 dB SNR, with fixed seeds, and played through the real CLI both ways:

* ``soundwatch classify --json`` on 10 s clips (one subprocess for all of
  them), each situation next to a ``clean`` clip of the same take, which
  differs from it only by the situation;
* ``soundwatch run`` on longer recordings, a file source at full speed, hop
  1 s, into a JSON Lines sink with the per-window states.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from soundwatch import sim
from soundwatch.bundle import DEFAULT_BUNDLE_DIR
from soundwatch.config import Config
from soundwatch.sim.scene import Event, Impairment
from soundwatch.sim.world import draw_event

# The module renders ~30 minutes of audio and runs the CLI 13 times (~65 s of CPU).
pytestmark = pytest.mark.slow

RATE = 16000
CLIP_S = 10.0
#: No fault class may reach this probability unless the fault is in the audio.
VERDICT_P = 0.5
FAULTS: tuple[str, ...] = tuple(c for c in sim.CLASSES if c != "normal")
#: (unit id, SNR dB): units the model never trained on (it trains on even ids).
CLIP_SCENES: tuple[tuple[int, float], ...] = tuple(
    (unit, snr) for unit in (7, 9, 11) for snr in (0.0, 6.0)
)
RUN_SCENES: tuple[tuple[int, float], ...] = ((7, 0.0), (9, 6.0))
#: How far above the fan a background event is (its power while it sounds, dB).
EVENT_OVER_FAN_DB = 12.0
#: A change of state ramps over this long (s).
RAMP_S = 2.0
#: The share of samples a clipped stretch drives into full scale.
CLIP_SHARE = 0.05
LEVEL_STEP_DB = 10.0

Audio = npt.NDArray[np.float32]


def _seed(unit_id: int, snr_db: float) -> int:
    return 100 * unit_id + round(snr_db)


def _take(
    unit_id: int,
    snr_db: float,
    duration_s: float,
    *,
    events: Iterable[Event] = (),
    impairments: Iterable[Impairment] = (),
    max_peak_dbfs: float = 0.0,
) -> sim.Take:
    """The scene's take (the TYPICAL scene: no AGC to undo a level step) with extras."""
    take = sim.draw_take(
        sim.draw_unit(unit_id), _seed(unit_id, snr_db), duration_s, snr_db, only=sim.TYPICAL
    )
    scene = replace(
        take.scene,
        events=tuple(events),
        impairments=tuple(impairments),
        peak_dbfs=min(take.scene.peak_dbfs, max_peak_dbfs),
    )
    return replace(take, scene=scene)


def _event(kind: str, index: int, unit_id: int, snr_db: float, start_s: float) -> Event:
    """A ``kind`` event of its usual duration, ``EVENT_OVER_FAN_DB`` above the fan."""
    rng = np.random.default_rng([_seed(unit_id, snr_db), index])
    level = snr_db + EVENT_OVER_FAN_DB  # re the steady background, which is snr_db below the fan
    return draw_event(rng, kind, start_s, level_db=(level, level))


def _clip_gain_db(audio: Audio) -> float:
    """The drive that puts ``CLIP_SHARE`` of ``audio``'s samples at full scale."""
    return -20.0 * math.log10(float(np.quantile(np.abs(audio), 1.0 - CLIP_SHARE)))


def _full_scale_share(audio: Audio) -> float:
    return float(np.mean(np.abs(audio) >= 0.999))


def _peak(x: Audio) -> float:
    return float(np.max(np.abs(x)))


# -- clips: one 10 s window each ------------------------------------------------


@dataclass(frozen=True)
class ClipSituation:
    """One clip situation: its states, and what happens around the fan."""

    name: str
    schedule: tuple[tuple[str, float], ...] = (("normal", CLIP_S),)
    ramp_s: float = 0.02
    event_kind: str | None = None
    impairments: tuple[Impairment, ...] = ()
    clipped: bool = False

    @property
    def present(self) -> frozenset[str]:
        return frozenset(state for state, _ in self.schedule if state in FAULTS)


CLIP_SITUATIONS: tuple[ClipSituation, ...] = (
    # The control: the same take with nothing happening.
    ClipSituation("clean"),
    *(
        ClipSituation(f"straddle_normal_to_{fault}", (("normal", 4.0), (fault, 6.0)), RAMP_S)
        for fault in FAULTS
    ),
    *(
        ClipSituation(f"straddle_{fault}_to_normal", ((fault, 4.0), ("normal", 6.0)), RAMP_S)
        for fault in FAULTS
    ),
    ClipSituation("dropout_2s", impairments=(Impairment("dropout", 4.0, 2.0),)),
    ClipSituation("clipped_5pct", clipped=True),
    ClipSituation("short_1s", (("normal", 1.0),)),
    ClipSituation("level_step_up_10dB", impairments=(Impairment("level_step", 5.0, 0.0, 10.0),)),
    ClipSituation("level_step_down_10dB", impairments=(Impairment("level_step", 5.0, 0.0, -10.0),)),
    *(ClipSituation(f"event_{kind}", event_kind=kind) for kind in sim.EVENT_KINDS),
)


def _render_clip(situation: ClipSituation, unit_id: int, snr_db: float) -> Audio:
    seed = _seed(unit_id, snr_db)
    duration = float(sum(s for _, s in situation.schedule))
    events: tuple[Event, ...] = ()
    if situation.event_kind is not None:
        event = _event(situation.event_kind, 0, unit_id, snr_db, 0.0)
        events = (replace(event, start_s=max(0.0, (duration - event.duration_s) / 2)),)
    impairments = situation.impairments
    # Every clip of a scene is one take, with room for the step up (it must not clip too).
    take = _take(unit_id, snr_db, duration, events=events, max_peak_dbfs=-LEVEL_STEP_DB - 4.0)
    if situation.clipped:
        clean = sim.render_clip(take, situation.schedule, seed, RATE, situation.ramp_s).mix
        impairments = (Impairment("clip", 0.0, duration, _clip_gain_db(clean)),)
    take = replace(take, scene=replace(take.scene, impairments=impairments))
    rendering = sim.render_clip(take, situation.schedule, seed, RATE, situation.ramp_s)
    audio = rendering.mix
    # The situation is what it says it is.
    if situation.clipped:
        assert 0.03 <= _full_scale_share(audio) <= 0.08, _full_scale_share(audio)
    else:
        assert _full_scale_share(audio) == 0.0, situation.name
    if situation.event_kind is not None:  # the event stands well above the fan
        assert _peak(rendering.background) >= 1.5 * _peak(rendering.machine), situation.name
    if situation.name.startswith("dropout"):
        assert np.count_nonzero(audio[4 * RATE : 6 * RATE]) == 0
    return audio


def _write_clip(situation: ClipSituation, unit_id: int, snr_db: float, path: Path) -> None:
    sf.write(path, _render_clip(situation, unit_id, snr_db), RATE, subtype="PCM_16")


def _classify(bundle: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """``soundwatch classify --json`` on every file in one process: the verdict per file."""
    result = subprocess.run(
        [sys.executable, "-m", "soundwatch", "classify", "--json", "--bundle", str(bundle)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [d["File"] for d in docs] == [str(f) for f in files]
    return {d["File"]: d for d in docs}


def _probabilities(doc: dict[str, Any]) -> dict[str, float]:
    classes, probs = doc["Classes"], doc["Details"]["Probabilities"]
    assert len(classes) == len(probs) and set(FAULTS) <= set(classes), doc
    return dict(zip(classes, probs, strict=True))


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The bundle under test: the shipped one, or ``$SOUNDWATCH_TEST_BUNDLE``."""
    path = Path(os.environ.get("SOUNDWATCH_TEST_BUNDLE") or DEFAULT_BUNDLE_DIR)
    assert (path / "bundle.json").is_file(), f"no model bundle at {path}"
    return path


@pytest.fixture(scope="module")
def clip_verdicts(
    bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int, float], dict[str, Any]]:
    """Every clip situation in every clip scene, classified: (situation, unit, SNR) -> JSON."""
    root = tmp_path_factory.mktemp("clips")
    jobs = [
        (situation, unit_id, snr_db, root / f"{situation.name}_unit{unit_id}_{snr_db:+.0f}dB.wav")
        for situation in CLIP_SITUATIONS
        for unit_id, snr_db in CLIP_SCENES
    ]
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_write_clip, *zip(*jobs, strict=True)))
    paths = {(situation.name, unit_id, snr_db): path for situation, unit_id, snr_db, path in jobs}
    docs = _classify(bundle, list(paths.values()))
    return {key: docs[str(path)] for key, path in paths.items()}


# Where fan@2.0.0 names a fault on a normal fan (docs/model.md, "What falls
# short"), with the worst probability measured. Strict: a bundle that no
# longer does makes the test fail until its entry goes.
MISSED_BY_THE_SHIPPED_MODEL = {
    "clean": "unit 11 at 0 dB: voltage change 0.91, with nothing happening",
    "event_beeper": "unit 11 at 0 dB: voltage change 0.90",
    "event_truck": "units 7 and 11: imbalance 0.93, clogging 0.93, voltage change 0.98",
    "event_speech": "unit 7 at +6 dB: clogging 0.76",
    "event_door": "unit 9 at +6 dB: clogging 0.84",
    "event_hiss": "unit 7 at +6 dB: clogging 0.66",
    "event_clatter": "units 7 and 11: clogging 0.73, voltage change 0.91",
    "event_siren": "units 7 and 9 at +6 dB: clogging 0.73, 0.70",
}


def _clip_params() -> list[Any]:
    return [
        pytest.param(
            s,
            id=s.name,
            marks=pytest.mark.xfail(strict=True, reason=MISSED_BY_THE_SHIPPED_MODEL[s.name])
            if s.name in MISSED_BY_THE_SHIPPED_MODEL
            else (),
        )
        for s in CLIP_SITUATIONS
    ]


@pytest.mark.parametrize("situation", _clip_params())
def test_classify_names_no_fault_that_is_not_there(
    situation: ClipSituation, clip_verdicts: dict[tuple[str, int, float], dict[str, Any]]
) -> None:
    failures = []
    for unit_id, snr_db in CLIP_SCENES:
        doc = clip_verdicts[situation.name, unit_id, snr_db]
        probs = _probabilities(doc)
        label = doc["Label"]
        if label in FAULTS and label not in situation.present:
            assert probs[label] >= VERDICT_P, doc  # a fault verdict is a sure one
            clean = _probabilities(clip_verdicts["clean", unit_id, snr_db])
            failures.append(
                f"unit {unit_id} at {snr_db:+.0f} dB: label {doc['Label']!r}, "
                f"probabilities {probs}, warnings {doc['Warnings']}; the clean clip: {clean}"
            )
    may = sorted(situation.present) or "no fault"
    assert not failures, f"{situation.name} (may name {may}):\n" + "\n".join(failures)


# -- recordings: soundwatch run on a stream -----------------------------------


@dataclass(frozen=True)
class Recording:
    """A recording rendered as one stream, and what is in it (for the failure message)."""

    duration_s: float
    present: frozenset[str]
    timeline: tuple[tuple[float, float, str], ...]  # (start s, end s, what happens)


def _stream(
    take: sim.Take, schedule: list[tuple[str, float]], unit_id: int, snr_db: float
) -> Audio:
    stream = sim.Stream(take, schedule, _seed(unit_id, snr_db), RATE, ramp_s=RAMP_S, loop=False)
    return stream.read(stream.cycle_samples)


def _straddle_recording(fault: str) -> Callable[[int, float], tuple[Audio, Recording]]:
    def render(unit_id: int, snr_db: float) -> tuple[Audio, Recording]:
        schedule = [("normal", 15.0), (fault, 20.0), ("normal", 15.0)]
        audio = _stream(_take(unit_id, snr_db, 50.0), schedule, unit_id, snr_db)
        timeline = ((15.0, 35.0 + RAMP_S, fault),)
        return audio, Recording(audio.size / RATE, frozenset({fault}), timeline)

    return render


def _events_recording(unit_id: int, snr_db: float) -> tuple[Audio, Recording]:
    """A normal fan with every event kind in turn, a few seconds apart."""
    events, t = [], 6.0
    for index, kind in enumerate(sim.EVENT_KINDS):
        event = _event(kind, index, unit_id, snr_db, t)
        events.append(event)
        t += event.duration_s + 3.0
    duration = t + 5.0
    take = _take(unit_id, snr_db, duration, events=events)
    audio = _stream(take, [("normal", duration)], unit_id, snr_db)
    timeline = tuple((e.start_s, e.start_s + e.duration_s, e.kind) for e in events)
    return audio, Recording(audio.size / RATE, frozenset(), timeline)


def _impairments_recording(unit_id: int, snr_db: float) -> tuple[Audio, Recording]:
    """A normal fan with a 2 s dropout, a clipped stretch and a level step up and back."""
    duration = 58.0
    clip_s, dropout_s, up_s, down_s = (2.0, 12.0), (22.0, 24.0), 34.0, 46.0
    take = _take(unit_id, snr_db, duration, max_peak_dbfs=-LEVEL_STEP_DB - 4.0)
    # A stream is rendered in order: its first seconds do not depend on what comes after.
    head = _stream(take, [("normal", clip_s[1])], unit_id, snr_db)
    drive_db = _clip_gain_db(head[round(clip_s[0] * RATE) :])
    impairments = (
        Impairment("clip", clip_s[0], clip_s[1] - clip_s[0], drive_db),
        Impairment("dropout", dropout_s[0], dropout_s[1] - dropout_s[0]),
        Impairment("level_step", up_s, 0.0, LEVEL_STEP_DB),
        Impairment("level_step", down_s, 0.0, -LEVEL_STEP_DB),
    )
    take = replace(take, scene=replace(take.scene, impairments=impairments))
    audio = _stream(take, [("normal", duration)], unit_id, snr_db)
    clipped = round(clip_s[0] * RATE), round(clip_s[1] * RATE)
    assert 0.03 <= _full_scale_share(audio[slice(*clipped)]) <= 0.08
    assert _full_scale_share(audio[clipped[1] :]) == 0.0
    assert np.count_nonzero(audio[round(dropout_s[0] * RATE) : round(dropout_s[1] * RATE)]) == 0
    timeline = (
        (*clip_s, "clipped"),
        (*dropout_s, "dropout"),
        (up_s, down_s, f"+{LEVEL_STEP_DB:g} dB (a step up, then back down)"),
    )
    return audio, Recording(audio.size / RATE, frozenset(), timeline)


def _short_recording(unit_id: int, snr_db: float) -> tuple[Audio, Recording]:
    take = _take(unit_id, snr_db, 1.0)
    audio = sim.render_clip(take, [("normal", 1.0)], _seed(unit_id, snr_db)).mix
    return audio, Recording(audio.size / RATE, frozenset(), ())


RECORDINGS: dict[str, Callable[[int, float], tuple[Audio, Recording]]] = {
    **{f"straddle_{fault}": _straddle_recording(fault) for fault in FAULTS},
    "events": _events_recording,
    "impairments": _impairments_recording,
    "short_1s": _short_recording,
}


def _write_recording(name: str, unit_id: int, snr_db: float, path: Path) -> Recording:
    audio, recording = RECORDINGS[name](unit_id, snr_db)
    sf.write(path, audio, RATE, subtype="PCM_16")
    return recording


@dataclass(frozen=True)
class RunResult:
    recording: Recording
    messages: list[dict[str, Any]]

    @property
    def states(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "state"]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] != "state"]

    def what_happens(self, start_s: float, end_s: float) -> list[str]:
        return [w for a, b, w in self.recording.timeline if a < end_s and b > start_s]


def _env() -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if "baseline" in Config.model_fields:  # judge the classifier, not a per-unit baseline
        env["SOUNDWATCH__BASELINE__ENABLED"] = "false"
    return env


def _run(bundle: Path, wav: Path, work: Path) -> list[dict[str, Any]]:
    """``soundwatch run`` on ``wav`` until the file ends: every message its sink wrote."""
    jsonl = work / "messages.jsonl"
    config = work / "config.yaml"
    config.write_text(
        f"""
device_id: situations
state_dir: {work / "state"}
sinks: [{{type: jsonl, path: {jsonl}, include_state: true}}]
"""
    )
    argv = [sys.executable, "-m", "soundwatch", "run", "--config", str(config)]
    argv += ["--bundle", str(bundle), "--source", f"file:{wav}", "--fast", "--hop", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    if not jsonl.exists():
        return []
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_results(
    bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int, float], RunResult]:
    """Every recording in every run scene through ``soundwatch run``.

    Each run starts as soon as its recording is written, while others render.
    """
    root = tmp_path_factory.mktemp("runs")
    renders: dict[Future[Recording], tuple[tuple[str, int, float], Path]] = {}
    runs: dict[tuple[str, int, float], tuple[Recording, Future[list[dict[str, Any]]]]] = {}
    with ProcessPoolExecutor(max_workers=2) as render_pool, ThreadPoolExecutor(2) as run_pool:
        for name in RECORDINGS:
            for unit_id, snr_db in RUN_SCENES:
                work = root / f"{name}_unit{unit_id}_{snr_db:+.0f}dB"
                work.mkdir()
                wav = work / "recording.wav"
                job = render_pool.submit(_write_recording, name, unit_id, snr_db, wav)
                renders[job] = ((name, unit_id, snr_db), work)
        for job in as_completed(renders):
            key, work = renders[job]
            runs[key] = (job.result(), run_pool.submit(_run, bundle, work / "recording.wav", work))
        return {key: RunResult(recording, run.result()) for key, (recording, run) in runs.items()}


@pytest.mark.parametrize("name", list(RECORDINGS))
def test_run_raises_no_anomaly_for_a_fault_that_is_not_there(
    name: str, run_results: dict[tuple[str, int, float], RunResult]
) -> None:
    failures = []
    present: frozenset[str] = frozenset()
    for unit_id, snr_db in RUN_SCENES:
        result = run_results[name, unit_id, snr_db]
        present = result.recording.present
        # The run judged the whole recording, window after window (a 1 s file holds none).
        ends = [s["stream_end_s"] for s in result.states]
        windows = max(0.0, result.recording.duration_s - CLIP_S)
        assert len(ends) >= 0.9 * windows, (name, unit_id, snr_db, len(ends))
        assert not ends or ends[-1] > result.recording.duration_s - 1.0, (name, unit_id, snr_db)
        for event in result.events:
            if event["class"] in FAULTS and event["class"] not in result.recording.present:
                start, end = event["stream_start_s"], event["stream_end_s"]
                failures.append(
                    f"unit {unit_id} at {snr_db:+.0f} dB: {event['type']} {event['class']!r} "
                    f"over {start:.1f}-{end:.1f} s (p max {event['probability_max']:.2f}; "
                    f"there: {result.what_happens(start, end) or 'normal fan only'})"
                )
    may = sorted(present) or "no fault"
    assert not failures, f"{name} (may name {may}):\n" + "\n".join(failures)
