"""Command line: ``python -m tools.train <stage> [options]``.

``all`` runs simulate (only if ``--data`` holds no tree), scan, features,
labels, fit, convert, evaluate and export, and reports the time of each.
Every stage can also run alone; it reuses what earlier stages left in
``--work`` (features from the cache, labels.json, checkpoints).

Retrain the shipped model from scratch (see the README, "The model and its training")::

    python -m tools.train all --seed 0
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
from tools.train.layout import ARCHS, NORMS, SimConfig, StageTimer, TrainConfig

REPO = pipeline.REPO
STAGE_NAMES = ("simulate", "scan", "features", "labels", "fit", "convert", "evaluate", "export")


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


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
    g.add_argument("--version", default="1.0.0", help="bundle version")
    g = common.add_argument_group("simulation (only when --data holds no tree)")
    g.add_argument("--units", type=int, default=SimConfig.n_units, help="id_00, id_02, ...")
    g.add_argument(
        "--per-class",
        type=int,
        default=SimConfig.per_class,
        help="clips per unit, SNR and class (training and validation units)",
    )
    g.add_argument(
        "--test-per-class",
        type=int,
        default=SimConfig.test_per_class,
        help="clips per SNR and class of the validation and test units",
    )
    g = common.add_argument_group("splits and labels")
    g.add_argument("--test-unit", default="id_06", help="held-out unit, evaluated once at the end")
    g.add_argument("--val-unit", default="id_04", help="unit used to pick the checkpoint")
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
        help="MFCCs kept of the 128-band DCT (the seeds kept 40)",
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
    g.add_argument("--augment-copies", type=int, default=AugmentConfig.copies)
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
    "simulate": "write the simulated fan line (tools.fansim) to --data",
    "scan": "scan --data, report sample rates / channels / bit depths",
    "features": "compute (or load cached) windows, with augmented copies",
    "labels": "fault labels from metadata.csv, or PCA + k-means pseudo-labels",
    "fit": "train, checkpointing the best validation score",
    "convert": "best checkpoint -> int8 and float TFLite",
    "evaluate": "int8 vs float on the held-out unit",
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
        test_unit=args.test_unit,
        val_unit=args.val_unit,
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
