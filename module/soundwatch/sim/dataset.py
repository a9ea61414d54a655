"""The simulated line on disk: MIMII-layout clip sets, and long recordings.

Clip sets use MIMII's layout, so the training pipeline reads simulated and
real data the same way::

    <root>/<snr>_dB_fan/fan/id_XX/{normal,abnormal}/NNNNNNNN.wav   (16 kHz mono int16)
    <root>/metadata.csv                                             (one row per file)

The SNR folder is the clip's SNR rounded to whole dB (training clips draw it
from a continuous range); ``metadata.csv`` has the exact value, the label,
the share of the clip each state fills (clips that straddle a change of
state), the families of the simulated world the clip was drawn from, and its
background events and impairments. Every clip's seed depends only on where
it sits in the plan, so the files are the same for any number of workers.

Long recordings are written block by block (bounded memory, so a simulated
day is as easy as a minute) with a JSON sidecar of their segments and events.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from soundwatch.sim.dsp import rng_for
from soundwatch.sim.fan import CLASSES, STATES
from soundwatch.sim.recording import Stream, render_clip
from soundwatch.sim.world import (
    EVENT_FAMILY,
    FAMILIES,
    Mixture,
    Take,
    draw_event,
    draw_take,
    draw_unit,
)

logger = logging.getLogger(__name__)

MACHINE = "fan"
METADATA_FILE = "metadata.csv"
METADATA_COLUMNS: tuple[str, ...] = (
    "path",
    "snr_db",
    "unit_id",
    "split",
    "fault",
    "fractions",
    "duration_s",
    "seed",
    "peak_dbfs",
    "shaft_hz",
    *(f"family_{k}" for k in FAMILIES),
    "events",
    "impairments",
)
FAULTS: tuple[str, ...] = tuple(c for c in CLASSES if c != "normal")
TAG_PLAN = 0xD1


def unit_dir(unit_number: int) -> str:
    """MIMII's name for a unit: ``id_00``, ``id_02`` …"""
    return f"id_{unit_number:02d}"


def snr_dir(snr_db: float) -> str:
    """MIMII's name for an SNR folder: ``-6_dB_fan`` (rounded to whole dB)."""
    return f"{round(snr_db)}_dB_{MACHINE}"


def to_pcm16(audio: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Float −1…1 to int16, rounded and clipped."""
    scaled = np.round(np.asarray(audio, dtype=np.float64) * 32767.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class ClipJob:
    """Everything a worker needs to render and write one clip."""

    root: str
    rel_path: str
    unit_number: int
    dataset_seed: int
    seed: int
    schedule: tuple[tuple[str, float], ...]
    ramp_s: float
    snr_db: float | None
    mixture: Mixture | None
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sample_rate_hz: int = 16000


@dataclass(frozen=True)
class ClipPlan:
    """What a clip set holds: units, clips, SNRs, and how much of a real line."""

    units: Sequence[int]
    per_class: int
    snrs_db: Sequence[float] | None = None  # None: drawn per clip in −10…+12 dB
    mixture: Mixture | None = None  # None: clean clips, as MIMII's
    straddle: float = 0.0  # share of clips whose state changes inside them
    short: float = 0.0  # share of clips shorter than 10 s
    duration_s: float = 10.0
    classes: Sequence[str] = CLASSES
    exclude: Mapping[str, Sequence[str]] = field(default_factory=dict)
    only: Mapping[str, Sequence[str]] = field(default_factory=dict)
    sample_rate_hz: int = 16000


def plan_clips(root: Path, plan: ClipPlan, seed: int) -> list[ClipJob]:
    """Every clip of ``plan``, in the order ``metadata.csv`` lists them."""
    jobs = []
    exclude = {k: tuple(v) for k, v in plan.exclude.items()}
    only = {k: tuple(v) for k, v in plan.only.items()}
    snrs: Sequence[float | None] = plan.snrs_db if plan.snrs_db is not None else [None]
    for si, snr in enumerate(snrs):
        for unit in plan.units:
            counters = {"normal": 0, "abnormal": 0}
            for index in range(plan.per_class):
                for ci, state in enumerate(plan.classes):
                    clip_seed = int(
                        np.random.SeedSequence([seed, si, unit, ci, index]).generate_state(1)[0]
                    )
                    rng = rng_for(TAG_PLAN, clip_seed)
                    schedule, ramp = _schedule(rng, state, plan)
                    snr_value = float(rng.uniform(-10.0, 12.0)) if snr is None else float(snr)
                    split = "normal" if state == "normal" else "abnormal"
                    number = counters[split]
                    counters[split] += 1
                    folder = snr_dir(snr_value)
                    rel = f"{folder}/{MACHINE}/{unit_dir(unit)}/{split}/{number:08d}.wav"
                    jobs.append(
                        ClipJob(
                            root=str(root),
                            rel_path=rel,
                            unit_number=unit,
                            dataset_seed=seed,
                            seed=clip_seed,
                            schedule=schedule,
                            ramp_s=ramp,
                            snr_db=snr_value,
                            mixture=plan.mixture,
                            exclude=exclude,
                            only=only,
                            sample_rate_hz=plan.sample_rate_hz,
                        )
                    )
    return jobs


def _schedule(
    rng: np.random.Generator, state: str, plan: ClipPlan
) -> tuple[tuple[tuple[str, float], ...], float]:
    """A clip's states: ``state`` throughout, or a change to or from it inside the clip."""
    duration = plan.duration_s
    if plan.short and rng.random() < plan.short:
        duration = float(rng.uniform(1.0, 0.9 * plan.duration_s))
    if plan.straddle and rng.random() < plan.straddle:
        # A change between normal and a fault (either way), ramping over
        # 0.5–4 s as a machine's sound does (a gain change is instant);
        # ``state`` keeps the larger share, so the clip's folder and its
        # majority label agree (its soft label has both shares).
        ramp = float(rng.uniform(0.5, min(4.0, 0.3 * duration)))
        other = "normal" if state != "normal" else str(rng.choice(FAULTS))
        if rng.random() < 0.5:
            change = float(rng.uniform(0.55, 0.9)) * duration
            return ((state, change), (other, duration - change)), ramp
        change = float(rng.uniform(0.1 * duration, 0.45 * duration - ramp / 2))
        return ((other, change), (state, duration - change)), ramp
    return ((state, duration),), 0.02


def render_job(job: ClipJob) -> dict[str, str]:
    """Render and write one clip; returns its ``metadata.csv`` row."""
    unit = draw_unit(job.unit_number, job.dataset_seed)
    duration = sum(s for _, s in job.schedule)
    take = draw_take(
        unit,
        job.seed,
        duration,
        job.snr_db,
        exclude=job.exclude,
        only=job.only,
        mixture=job.mixture,
    )
    rendering = render_clip(take, job.schedule, job.seed, job.sample_rate_hz, job.ramp_s)
    path = Path(job.root) / job.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), to_pcm16(rendering.mix), job.sample_rate_hz, subtype="PCM_16")
    fractions = rendering.fractions()
    label = max(fractions, key=lambda k: fractions[k])
    faults = take.faults
    return {
        "path": job.rel_path,
        "snr_db": f"{take.scene.snr_db:.3f}",
        "unit_id": unit_dir(job.unit_number),
        "split": "normal" if label == "normal" else "abnormal",
        "fault": label,
        "fractions": json.dumps({k: round(v, 4) for k, v in sorted(fractions.items())}),
        "duration_s": f"{duration:.3f}",
        "seed": str(job.seed),
        "peak_dbfs": f"{rendering.peak_dbfs:.2f}",
        "shaft_hz": f"{unit.shaft_hz * faults.speed(label):.4f}",
        **{f"family_{k}": v for k, v in take.families.items()},
        "events": " ".join(sorted({e.kind for e in take.scene.events})),
        "impairments": " ".join(sorted({i.kind for i in take.scene.impairments})),
    }


def write_clips(jobs: Sequence[ClipJob], root: Path, workers: int = 1) -> Path:
    """Render ``jobs`` under ``root`` and write ``metadata.csv``; same files for any ``workers``."""
    root.mkdir(parents=True, exist_ok=True)
    logger.info("writing %d clips to %s with %d worker(s)", len(jobs), root, workers)
    if workers <= 1:
        rows = list(_progress(map(render_job, jobs), len(jobs)))
    else:
        # spawn, not fork: the caller may hold threads (TensorFlow, tqdm).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = list(_progress(pool.imap(render_job, jobs, chunksize=8), len(jobs)))
    with (root / METADATA_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _progress(rows: Iterable[dict[str, str]], total: int) -> Iterator[dict[str, str]]:
    step = max(1, math.ceil(total / 10))
    for done, row in enumerate(rows, start=1):
        if done % step == 0 or done == total:
            logger.info("clips: %d/%d", done, total)
        yield row


# -- long recordings ----------------------------------------------------------


@dataclass(frozen=True)
class RecordingPlan:
    """A long recording of one unit in one scene, with events throughout."""

    unit_number: int
    schedule: Sequence[tuple[str, float]]
    snr_db: float = 6.0
    seed: int = 0
    dataset_seed: int = 0
    ramp_s: float = 2.0
    events_per_min: float = 1.5
    event_kinds: Sequence[str] = ("knock", "beeper", "truck", "speech", "door")
    sample_rate_hz: int = 16000
    drift_db: float = 0.5


def recording_take(
    plan: RecordingPlan, only: Mapping[str, Sequence[str]] | None = None
) -> tuple[Take, float]:
    """The take of ``plan`` (its scene's events placed over the whole recording)."""
    total = float(sum(s for _, s in plan.schedule))
    unit = draw_unit(plan.unit_number, plan.dataset_seed)
    take = draw_take(unit, plan.seed, total, plan.snr_db, only=only)
    rng = rng_for(TAG_PLAN, plan.seed, 1)
    events = []
    t = float(rng.exponential(60.0 / plan.events_per_min)) if plan.events_per_min > 0 else math.inf
    while t < total:
        kind = str(plan.event_kinds[int(rng.integers(0, len(plan.event_kinds)))])
        events.append(draw_event(rng, kind, t, level_db=(0.0, 12.0)))
        t += float(rng.exponential(60.0 / plan.events_per_min))
    return replace(take, scene=replace(take.scene, events=tuple(events))), total


def write_recording(wav: Path, plan: RecordingPlan, block_s: float = 10.0) -> dict[str, Any]:
    """Write ``plan`` to ``wav`` block by block, and its truth to ``wav``'s ``.json`` sidecar."""
    for state, _ in plan.schedule:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} (one of {', '.join(STATES)})")
    take, _ = recording_take(plan)
    rate = plan.sample_rate_hz
    stream = Stream(
        take, plan.schedule, plan.seed, rate, ramp_s=plan.ramp_s, loop=False, drift_db=plan.drift_db
    )
    wav.parent.mkdir(parents=True, exist_ok=True)
    n_total = stream.cycle_samples
    block = max(1, round(block_s * rate))
    with sf.SoundFile(str(wav), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for start in range(0, n_total, block):
            f.write(to_pcm16(stream.read(min(block, n_total - start))))
    truth = {
        "sample_rate_hz": rate,
        "duration_s": n_total / rate,
        "unit": unit_dir(plan.unit_number),
        "snr_db": plan.snr_db,
        "seed": plan.seed,
        "ramp_s": plan.ramp_s,
        "segments": [
            {"state": s.state, "start_s": s.start / rate, "end_s": s.stop / rate}
            for s in stream.segments
        ],
        "events": [
            {
                "kind": e.kind,
                "start_s": round(e.start_s, 3),
                "end_s": round(e.start_s + e.duration_s, 3),
            }
            for e in take.scene.events
        ],
        "families": dict(take.families),
    }
    wav.with_suffix(".json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    return truth


def event_families() -> dict[str, tuple[str, ...]]:
    """Every family key with its choices, events included."""
    from soundwatch.sim.scene import EVENT_KINDS

    return {**FAMILIES, EVENT_FAMILY: EVENT_KINDS}
