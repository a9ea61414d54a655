"""Command line: render the simulated fan line to disk.

    python -m soundwatch.sim clips --out data/fan --units 4 --per-class 20 --snrs -6,0,6
    python -m soundwatch.sim recording --out rec.wav --unit 7 --snr 6 \\
        --schedule "normal:600,imbalance:60,normal:120,bearing:60,normal:60"

``clips`` writes a MIMII-layout tree with ``metadata.csv`` (clean clips at the
given SNRs; ``--real-line`` adds what a real line has: background events,
dropouts, level steps, clipping, clips that straddle a change of state).
``recording`` writes one long recording block by block, with a JSON sidecar
of its segments and background events.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from soundwatch.sim.dataset import ClipPlan, RecordingPlan, plan_clips, write_clips, write_recording
from soundwatch.sim.fan import STATES
from soundwatch.sim.world import Mixture


def _schedule(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        name, sep, seconds = (p.strip() for p in item.partition(":"))
        if not sep or name not in STATES:
            raise argparse.ArgumentTypeError(
                f"bad schedule item {item.strip()!r}: expected 'state:seconds' with state one of "
                f"{', '.join(STATES)}"
            )
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise argparse.ArgumentTypeError(
                f"bad schedule item {item.strip()!r}: seconds must be > 0"
            )
        out.append((name, value))
    return out


def _snrs(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad SNR list {text!r}") from e


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m soundwatch.sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("clips", help="a MIMII-layout clip set")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--units", type=int, default=4, help="units id_00, id_02, ...")
    c.add_argument("--first-unit", type=int, default=0)
    c.add_argument("--per-class", type=int, default=20, help="clips per unit, class and SNR")
    c.add_argument("--snrs", type=_snrs, default=[-6.0, 0.0, 6.0], help="e.g. -6,0,6")
    c.add_argument("--classes", default="normal,imbalance,clogging,voltage_change")
    c.add_argument("--real-line", action="store_true", help="events, dropouts, steps, clipping")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=1)
    r = sub.add_parser("recording", help="one long recording of one unit")
    r.add_argument(
        "--out", type=Path, required=True, help="WAV path (a .json sidecar is written too)"
    )
    r.add_argument("--schedule", type=_schedule, required=True)
    r.add_argument("--unit", type=int, default=7)
    r.add_argument("--snr", type=float, default=6.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--rate", type=int, default=16000)
    r.add_argument("--ramp", type=float, default=2.0, help="seconds a change of state takes")
    r.add_argument("--events-per-min", type=float, default=1.5)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.what == "clips":
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        unknown = [c for c in classes if c not in STATES]
        if unknown:
            raise SystemExit(f"unknown classes {unknown} (one of {', '.join(STATES)})")
        plan = ClipPlan(
            units=tuple(range(args.first_unit, args.first_unit + 2 * args.units, 2)),
            per_class=args.per_class,
            snrs_db=args.snrs,
            mixture=Mixture() if args.real_line else None,
            straddle=0.12 if args.real_line else 0.0,
            classes=classes,
        )
        write_clips(plan_clips(args.out, plan, args.seed), args.out, args.workers)
        return 0
    truth = write_recording(
        args.out,
        RecordingPlan(
            unit_number=args.unit,
            schedule=args.schedule,
            snr_db=args.snr,
            seed=args.seed,
            ramp_s=args.ramp,
            events_per_min=args.events_per_min,
            sample_rate_hz=args.rate,
        ),
    )
    logging.info(
        "wrote %s (%.0f s) and %s", args.out, truth["duration_s"], json.dumps(truth["families"])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
