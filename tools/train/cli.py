"""Command line: ``python -m tools.train <stage> [options]``.

``all`` runs simulate (only if ``--data`` holds no tree), scan, features,
labels, fit, convert, evaluate and export, and reports the time of each.
Every stage can also run alone; it reuses what earlier stages left in
``--work`` (features from the cache, labels.json, checkpoints).

Retrain the shipped model from scratch (see docs/model.md)::

    python -m tools.train all --seed 0

Measure generalisation to a family of the simulated world the model never
saw (its training and validation leave the family out; ``--also`` evaluates
on a set rendered from it alone)::

    python -m tools.train all --hold-out room=live --out build/no-live --also live=build/live
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from tools.train import pipeline
from tools.train.augment import AugmentConfig
from tools.train.layout import (
    ARCHS,
    NORMS,
    SIM_TEST_UNITS,
    SIM_VAL_UNITS,
    SimConfig,
    StageTimer,
    TrainConfig,
    parse_hold_out,
    parse_units,
)

REPO = pipeline.REPO
STAGE_NAMES = ("simulate", "scan", "features", "labels", "fit", "convert", "evaluate", "export")


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _named_dir(item: str) -> tuple[str, Path]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--also {item!r}: expected NAME=DIR")
    return name, Path(path)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("data and output")
    g.add_argument("--data", type=Path, default=REPO / "build" / "sim", help="MIMII-layout tree")
    g.add_argument("--work", type=Path, default=REPO / "build" / "train", help="working directory")
    g.add_argument(
        "--out", type=Path, default=REPO / "module/soundwatch/models/fan", help="bundle directory"
    )
    g.add_argument(
        "--float-copy",
        type=_optional_path,
        default=REPO / "tests/data/fan-float.tflite",
        help="where export copies the float reference model ('' to skip)",
    )
    g.add_argument(
        "--confusion-copy",
        type=_optional_path,
        default=REPO / "docs/img/confusion-int8.png",
        help="where export copies the int8 confusion PNG ('' to skip)",
    )
    g.add_argument("--version", default=TrainConfig.version, help="bundle version")
    g = common.add_argument_group("simulation (only when --data holds no tree)")
    g.add_argument("--units", type=int, default=SimConfig.n_units, help="training units")
    g.add_argument(
        "--per-class",
        type=int,
        default=SimConfig.per_class,
        help="clips per training unit and class (SNR drawn per clip)",
    )
    g.add_argument(
        "--test-per-class",
        type=int,
        default=SimConfig.test_per_class,
        help="clips per SNR and class of each validation and test unit",
    )
    g = common.add_argument_group("splits and labels")
    g.add_argument(
        "--test-unit",
        default=SIM_TEST_UNITS,
        help="held-out unit(s), comma-separated, evaluated once at the end (real MIMII: id_06)",
    )
    g.add_argument(
        "--val-unit",
        default=SIM_VAL_UNITS,
        help="unit(s) that pick the checkpoint and thresholds (real MIMII: id_04)",
    )
    g.add_argument(
        "--hold-out",
        action="append",
        default=[],
        metavar="FAMILY=CHOICE[,CHOICE]",
        help="leave a family of the simulated world out of training and validation "
        "(e.g. room=live, noise=brown, strength=weak, events=speech); repeatable",
    )
    g.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="evaluate on a labelled clip set too (DIR/metadata.csv: path, label, snr_db)",
    )
    g.add_argument("--labels", choices=("auto", "metadata", "pseudo"), default="auto")
    g.add_argument("--clusters", type=int, default=3, help="k of the pseudo-label k-means")
    g.add_argument(
        "--absolute-clusters",
        action="store_true",
        help="cluster raw summaries (default: relative to each unit's normal clips)",
    )
    g = common.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--arch", choices=ARCHS, default=TrainConfig.arch)
    g.add_argument(
        "--n-mfcc",
        type=int,
        default=TrainConfig.n_mfcc,
        help="MFCCs kept of the 128-band DCT (the reference service kept 40)",
    )
    g.add_argument("--norm", choices=NORMS, default="coef", help="input normalisation")
    g.add_argument(
        "--no-input-grid",
        action="store_true",
        help="train on unrounded input only (default: half the windows on the int8 grid)",
    )
    g.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    g.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    g.add_argument(
        "--augment-copies",
        type=int,
        default=0,
        help=(
            "augmented copies per training clip (the reference service made 1; "
            "the simulated world varies more than they do)"
        ),
    )
    g.add_argument("--workers", type=int, default=2, help="feature/simulation processes")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(
        prog="python -m tools.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in (*STAGE_NAMES, "all"):
        sub.add_parser(name, parents=[common], help=_HELP[name])
    return parser


_HELP = {
    "simulate": "render the simulated world (soundwatch.sim) to --data",
    "scan": "scan --data, report sample rates / channels / bit depths",
    "features": "compute (or load cached) windows, with augmented copies",
    "labels": "fault labels from metadata.csv, or PCA + k-means pseudo-labels",
    "fit": "train, checkpointing the best validation score",
    "convert": "best checkpoint -> int8 and float TFLite",
    "evaluate": "int8 vs float on the held-out units (and --also sets)",
    "export": "write the bundle to --out",
    "all": "every stage, in order, timed",
}


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        work=args.work,
        out=args.out,
        seed=args.seed,
        arch=args.arch,
        norm=args.norm,
        n_mfcc=args.n_mfcc,
        input_grid=not args.no_input_grid,
        test_units=parse_units(args.test_unit),
        val_units=parse_units(args.val_unit),
        hold_out=parse_hold_out(args.hold_out),
        extra_sets=tuple(_named_dir(item) for item in args.also),
        labels=args.labels,
        n_clusters=args.clusters,
        relative_to_normal=not args.absolute_clusters,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        workers=args.workers,
        resume=args.resume,
        progress=not args.no_progress,
        sim=SimConfig(
            n_units=args.units,
            per_class=args.per_class,
            test_per_class=args.test_per_class,
        ),
        augment=AugmentConfig(copies=args.augment_copies),
        version=args.version,
        float_copy=args.float_copy,
        confusion_copy=args.confusion_copy,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # TensorFlow's C++ logging repeats harmless notices every epoch; Python
    # exceptions still surface. Set before TensorFlow is first imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if args.verbose else "3")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    cfg = _config(args)
    cfg.work.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("tools.train")
    if args.stage == "all":
        seconds = pipeline.run_all(cfg)
        log.info("seconds per stage: %s", json.dumps(seconds))
        return 0
    t0 = time.perf_counter()
    if args.stage == "export":
        pipeline.export(cfg)
    else:
        pipeline.STAGES[args.stage](cfg)
    elapsed = time.perf_counter() - t0
    StageTimer(cfg.layout.timings_json).record(args.stage, elapsed)
    log.info("%s took %.1f s", args.stage, elapsed)
    return 0
