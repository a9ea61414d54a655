"""How well a unit's baseline, learned from its normal clips, separates its other clips.

    python tools/baseline_auc.py                 # units 7 9 11 13, -6/0/+6 dB, a table
    python tools/baseline_auc.py --units 7 --snr 0 --json

For each unit (none of them trained the shipped model) and SNR, the simulator
renders clips in the typical scene as a clip set holds them (10 s, 16 kHz):
``--learn`` normal clips to learn from, then ``--test`` other normal clips and
``--test`` clips of every fault, the named classes and those no class names.
They go through the same path as ``soundwatch baseline learn`` and ``soundwatch
classify --baseline`` (WAV files, decoded and resampled as the CLI does). The
figure is the AUC of the novelty score between the unit's other normal clips
and each fault's clips, and its mean over units and faults per SNR.

A bench tool: it prints figures and exits 0 whatever they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from soundwatch.baseline import auc
from soundwatch.bundle import load_bundle
from soundwatch.features import FeatureExtractor
from soundwatch.sim import STATES, typical_clip
from soundwatch.unit_baseline import clip_embeddings, learn_from_clips

logger = logging.getLogger("baseline_auc")

RATE = 16000
BUNDLE = Path(__file__).resolve().parents[1] / "module" / "soundwatch" / "models" / "fan"


def unit_aucs(unit: int, snr: float, n_learn: int, n_test: int, work: Path) -> dict[str, float]:
    """AUC per fault for one unit at one SNR."""
    bundle = load_bundle(BUNDLE)
    extractor = FeatureExtractor(bundle.spec)

    def clip(state: str, seed: int) -> Path:
        path = work / f"u{unit}-{snr:+g}-{state}-{seed}.wav"
        sf.write(path, typical_clip(unit, state, snr, seed, 10.0, RATE), RATE)
        return path

    learn = [clip("normal", s) for s in range(n_learn)]
    baseline, _ = learn_from_clips(learn, bundle)

    def scores(state: str) -> list[float]:
        out: list[float] = []
        for seed in range(1000, 1000 + n_test):
            embs, _ = clip_embeddings(clip(state, seed), bundle, extractor, 10.0)
            out.extend(baseline.novelty(e).score for e in embs)
        return out

    normal = scores("normal")
    return {state: auc(normal, scores(state)) for state in STATES if state != "normal"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[7, 9, 11, 13])
    parser.add_argument("--snr", type=float, nargs="+", default=[-6.0, 0.0, 6.0])
    parser.add_argument("--learn", type=int, default=20, help="normal clips to learn from")
    parser.add_argument("--test", type=int, default=10, help="clips per state to score")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    table: dict[float, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="baseline-auc-") as tmp:
        for snr in args.snr:
            for unit in args.units:
                table.setdefault(snr, {})[unit] = unit_aucs(
                    unit, snr, args.learn, args.test, Path(tmp)
                )
    if args.json:
        json.dump({f"{snr:+g}": units for snr, units in table.items()}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    faults = [s for s in STATES if s != "normal"]
    lines = ["snr dB  unit  " + "  ".join(f"{f[:14]:>14}" for f in faults) + "    mean"]
    for snr, units in table.items():
        for unit, row in units.items():
            cells = "  ".join(f"{row[f]:14.2f}" for f in faults)
            lines.append(f"{snr:+6g}  {unit:4d}  {cells}  {np.mean(list(row.values())):6.3f}")
        mean = np.mean([v for row in units.values() for v in row.values()])
        lines.append(f"{snr:+6g}  mean over units and faults: {mean:.3f}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
