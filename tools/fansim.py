"""Write the simulated fan line to disk: a MIMII-layout dataset, or one scheduled recording.

Dataset mode writes exactly MIMII's layout::

    <root>/<snr>_dB_fan/fan/id_XX/{normal,abnormal}/NNNNNNNN.wav   (16 kHz mono int16)
    <root>/metadata.csv                                             (one row per file)

Units are id_00, id_02, id_04, … as in MIMII; a unit is the same machine
(:func:`soundwatch.fansim.make_unit` with the dataset seed) at every SNR. Each
clip has its own seed derived from (dataset seed, SNR, unit, split, index), so
no clip's machine sound or noise is reused across SNRs (a model evaluated on
a held-out clip has never heard it at another SNR). Abnormal files interleave
the three faults (imbalance, clogging, voltage change, imbalance, …) so any
prefix of a directory is balanced; ``metadata.csv`` records each file's fault.

Schedule mode writes one continuous recording with known fault intervals
(:func:`soundwatch.fansim.render_schedule`) plus a JSON sidecar with them.

    python -m tools.fansim --out data/fan --units 4 --normal 60 --abnormal-per-fault 20
    python -m tools.fansim --schedule "normal:60,imbalance:30,normal:30" \\
        --wav out/rec.wav --unit 0 --snr 6 --rate 48000
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

from soundwatch import fansim

logger = logging.getLogger("tools.fansim")

MACHINE = "fan"
FAULTS: tuple[str, ...] = tuple(c for c in fansim.CLASSES if c != "normal")
METADATA_FILE = "metadata.csv"
METADATA_COLUMNS: tuple[str, ...] = (
    "path",
    "snr_db",
    "unit_id",
    "split",
    "fault",
    "shaft_hz",
    "seed",
    "peak_dbfs",
)
_SPLIT_CODE = {"normal": 0, "abnormal": 1}
_T = TypeVar("_T")


def unit_dir(unit_number: int) -> str:
    """MIMII's name for a unit: ``id_00``, ``id_02`` …"""
    return f"id_{unit_number:02d}"


def snr_dir(snr_db: int) -> str:
    """MIMII's name for an SNR directory: ``-6_dB_fan``, ``0_dB_fan``, ``6_dB_fan``."""
    return f"{snr_db}_dB_{MACHINE}"


def clip_seed(seed: int, snr_db: int, unit_number: int, split: str, index: int) -> int:
    """The seed of one dataset clip: a hash of where it sits, independent of ``workers``."""
    key = [seed, snr_db + 1000, unit_number, _SPLIT_CODE[split], index]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@dataclass(frozen=True)
class ClipJob:
    """Everything a worker needs to render and write one file."""

    root: str
    rel_path: str
    snr_db: int
    unit_number: int
    split: str
    fault: str
    seed: int
    dataset_seed: int
    sample_rate_hz: int
    duration_s: float


def plan_dataset(
    root: Path,
    n_units: int,
    normal_per_unit: int,
    abnormal_per_fault: int,
    snrs: Sequence[int],
    seed: int,
    sample_rate_hz: int,
    duration_s: float,
) -> list[ClipJob]:
    """Every file of the dataset, in the order ``metadata.csv`` lists them."""
    jobs = []
    for snr in snrs:
        for u in range(n_units):
            number = 2 * u  # MIMII numbers its fan units 00, 02, 04, 06
            split_faults: list[tuple[str, list[str]]] = [
                ("normal", ["normal"] * normal_per_unit),
                ("abnormal", [f for _ in range(abnormal_per_fault) for f in FAULTS]),
            ]
            for split, faults in split_faults:
                for index, fault in enumerate(faults):
                    rel = f"{snr_dir(snr)}/{MACHINE}/{unit_dir(number)}/{split}/{index:08d}.wav"
                    jobs.append(
                        ClipJob(
                            root=str(root),
                            rel_path=rel,
                            snr_db=int(snr),
                            unit_number=number,
                            split=split,
                            fault=fault,
                            seed=clip_seed(seed, int(snr), number, split, index),
                            dataset_seed=seed,
                            sample_rate_hz=sample_rate_hz,
                            duration_s=duration_s,
                        )
                    )
    return jobs


def to_pcm16(audio: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Float −1…1 to int16, rounded and clipped (explicit, so every writer agrees)."""
    scaled = np.round(np.asarray(audio, dtype=np.float64) * 32767.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def render_job(job: ClipJob) -> dict[str, str]:
    """Render and write one clip (creating its directory); returns its ``metadata.csv`` row."""
    unit = fansim.make_unit(job.unit_number, job.dataset_seed)
    rendering = fansim.synth_parts(
        unit,
        job.fault,
        job.snr_db,
        job.seed,
        duration_s=job.duration_s,
        sample_rate_hz=job.sample_rate_hz,
    )
    path = Path(job.root) / job.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)  # safe when workers race
    sf.write(str(path), to_pcm16(rendering.mix), job.sample_rate_hz, subtype="PCM_16")
    return {
        "path": job.rel_path,
        "snr_db": str(job.snr_db),
        "unit_id": unit_dir(job.unit_number),
        "split": job.split,
        "fault": job.fault,
        "shaft_hz": f"{rendering.shaft_hz(job.fault):.4f}",
        "seed": str(job.seed),
        "peak_dbfs": f"{rendering.peak_dbfs:.2f}",
    }


def _progress(items: Iterable[_T], total: int, desc: str) -> Iterator[_T]:
    """tqdm on an interactive terminal, otherwise a log line every ~10 %."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, unit="clip")
            return
    step = max(1, math.ceil(total / 10))
    for done, item in enumerate(items, start=1):
        if done % step == 0 or done == total:
            logger.info("%s: %d/%d clips", desc, done, total)
        yield item


def write_dataset(
    root: Path,
    n_units: int = 4,
    normal_per_unit: int = 60,
    abnormal_per_fault: int = 20,
    snrs: Sequence[int] = fansim.SNRS_DB,
    seed: int = 0,
    workers: int = 1,
    sample_rate_hz: int = 16000,
    duration_s: float = 10.0,
) -> Path:
    """Write the simulated fan line under ``root`` in MIMII's layout; returns ``root``.

    Per SNR and unit: ``normal_per_unit`` normal clips and ``abnormal_per_fault``
    clips of each fault. The files and ``metadata.csv`` are identical for any
    ``workers`` (each clip's seed depends only on its place in the dataset).
    """
    if n_units < 1 or normal_per_unit < 0 or abnormal_per_fault < 0 or workers < 1:
        raise ValueError("n_units and workers must be >= 1, clip counts >= 0")
    root = Path(root)
    jobs = plan_dataset(
        root,
        n_units,
        normal_per_unit,
        abnormal_per_fault,
        snrs,
        seed,
        sample_rate_hz,
        duration_s,
    )
    root.mkdir(parents=True, exist_ok=True)
    logger.info(
        "writing %d clips (%d units, SNRs %s) to %s with %d worker(s)",
        len(jobs),
        n_units,
        list(snrs),
        root,
        workers,
    )
    rows: list[dict[str, str]] = []
    if workers == 1:
        rows = list(_progress(map(render_job, jobs), len(jobs), "fansim"))
    else:
        # spawn, not fork: the caller may hold threads (TensorFlow, tqdm).
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            results = pool.imap(render_job, jobs, chunksize=8)  # ordered: deterministic rows
            rows = list(_progress(results, len(jobs), "fansim"))
    with (root / METADATA_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def parse_schedule(text: str) -> list[tuple[str, float]]:
    """``"normal:60,imbalance:30"`` → ``[("normal", 60.0), ("imbalance", 30.0)]``."""
    schedule = []
    for item in text.split(","):
        name, sep, seconds = (p.strip() for p in item.partition(":"))
        if not sep or name not in fansim.CLASSES:
            raise ValueError(
                f"bad schedule item {item.strip()!r}: expected 'class:seconds' with class "
                f"one of {', '.join(fansim.CLASSES)}"
            )
        value = float(seconds)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"bad schedule item {item.strip()!r}: seconds must be positive")
        schedule.append((name, value))
    return schedule


def write_schedule(
    wav: Path,
    schedule: Sequence[tuple[str, float]],
    unit_number: int = 0,
    snr_db: float = 6.0,
    seed: int = 0,
    sample_rate_hz: int = 16000,
) -> Path:
    """Write one scheduled recording (16-bit WAV) and ``<wav>.json``; returns the JSON path.

    The unit is ``make_unit(unit_number, seed)``: the same machine as
    ``id_XX`` of a dataset written with that seed (odd numbers are units no
    dataset contains). The sidecar lists the classes and each interval in
    seconds and samples (``[start, end)``; fault changes at ``start``).
    """
    unit = fansim.make_unit(unit_number, seed)
    rendering = fansim.render_parts(unit, schedule, snr_db, seed, sample_rate_hz)
    wav.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(wav), to_pcm16(rendering.mix), sample_rate_hz, subtype="PCM_16")
    intervals = [
        {
            "fault": s.fault,
            "start_s": s.start / sample_rate_hz,
            "end_s": s.stop / sample_rate_hz,
            "start_sample": s.start,
            "end_sample": s.stop,
            "shaft_hz": round(rendering.shaft_hz(s.fault), 4),
        }
        for s in rendering.segments
    ]
    doc = {
        "wav": wav.name,
        "generator": "soundwatch.fansim.render_schedule",
        "classes": list(fansim.CLASSES),
        "sample_rate_hz": sample_rate_hz,
        "n_samples": int(rendering.mix.size),
        "unit_id": unit_dir(unit_number),
        "unit_number": unit_number,
        "snr_db": snr_db,
        "seed": seed,
        "peak_dbfs": round(rendering.peak_dbfs, 2),
        "transition_s": fansim.TRANSITION_S,
        "intervals": intervals,
    }
    sidecar = wav.with_suffix(".json")
    sidecar.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return sidecar


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.fansim",
        description="Write the simulated fan line (MIMII layout) or one scheduled recording.",
    )
    p.add_argument("--out", type=Path, help="dataset root to write (dataset mode)")
    p.add_argument("--units", type=int, default=4, help="units id_00, id_02, … (default 4)")
    p.add_argument("--normal", type=int, default=60, help="normal clips per unit and SNR")
    p.add_argument("--abnormal-per-fault", type=int, default=20, help="per fault, unit and SNR")
    p.add_argument(
        "--snrs", default=",".join(str(s) for s in fansim.SNRS_DB), help="e.g. -6,0,6 (dataset)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="clip seconds (dataset)")
    p.add_argument("--workers", type=int, default=1, help="processes (dataset)")
    p.add_argument("--seed", type=int, default=0, help="line seed (units and clips)")
    p.add_argument("--rate", type=int, default=16000, help="sample rate in Hz")
    p.add_argument("--schedule", help="schedule mode: e.g. 'normal:60,imbalance:30,normal:30'")
    p.add_argument("--wav", type=Path, help="schedule mode: output WAV (sidecar: same name .json)")
    p.add_argument("--unit", type=int, default=0, help="schedule mode: unit number (0 = id_00)")
    p.add_argument("--snr", type=float, default=6.0, help="schedule mode: SNR in dB")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.schedule is not None:
            if args.wav is None:
                parser.error("--schedule needs --wav")
            sidecar = write_schedule(
                args.wav,
                parse_schedule(args.schedule),
                unit_number=args.unit,
                snr_db=args.snr,
                seed=args.seed,
                sample_rate_hz=args.rate,
            )
            logger.info("wrote %s and %s", args.wav, sidecar)
            return 0
        if args.out is None:
            parser.error("give --out DIR (dataset) or --schedule ... --wav FILE")
        snrs = [int(s) for s in args.snrs.split(",") if s.strip()]
        write_dataset(
            args.out,
            n_units=args.units,
            normal_per_unit=args.normal,
            abnormal_per_fault=args.abnormal_per_fault,
            snrs=snrs,
            seed=args.seed,
            workers=args.workers,
            sample_rate_hz=args.rate,
            duration_s=args.duration,
        )
        logger.info("wrote %s", args.out / METADATA_FILE)
        return 0
    except ValueError as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
