"""Where each stage reads and writes, and the settings shared by all stages.

``build/train`` (the work directory) holds::

    scan.csv               one row per clip (scan)
    scan-report.txt        the WavFileHelper-style summary (scan)
    features/shard-*.npz   cached windows (features)
    labels.json            one label per clip (labels)
    runs/<arch>-<norm>/    one per network variant:
        ckpt/              last.keras, best.weights.h5, state.json (fit)
        norm.npz           per-coefficient input mean/std (fit)
        model-int8.tflite, model-float.tflite, candidate/ (convert)
        eval.json, confusion-int8.{png,json} (evaluate)
    timings.json           seconds per stage of the last runs
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.train.augment import AugmentConfig

ARCHS = ("seed", "tpool", "statpool")
NORMS = ("coef", "none")


@dataclass(frozen=True)
class SimConfig:
    """What ``simulate`` asks the fan-line simulator for.

    Clip counts are per unit, SNR and class (normal and each fault alike).
    Generalising to an unseen unit is the hard part, so the training side gets
    many units with fewer clips each, and the two held-out units (validation
    and test) get enough clips (50 per class and SNR) for their per-SNR
    accuracies to mean something.
    """

    n_units: int = 30
    per_class: int = 30
    test_per_class: int = 50
    snrs_db: tuple[int, ...] = (-6, 0, 6)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_units": self.n_units,
            "per_class": self.per_class,
            "test_per_class": self.test_per_class,
            "snrs_db": list(self.snrs_db),
        }


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the CLI builds one from its flags)."""

    data: Path
    work: Path
    out: Path
    seed: int = 0
    arch: str = "statpool"
    norm: str = "coef"
    n_mfcc: int = 64
    input_grid: bool = True
    test_unit: str = "id_06"
    val_unit: str = "id_04"
    labels: str = "auto"
    n_clusters: int = 3
    relative_to_normal: bool = True
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    workers: int = 2
    resume: bool = False
    progress: bool = True
    sim: SimConfig = field(default_factory=SimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    version: str = "1.0.0"
    float_copy: Path | None = None
    confusion_copy: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (choose from {', '.join(NORMS)})")
        if self.test_unit == self.val_unit:
            raise ValueError("the test unit and the validation unit must differ")

    @property
    def run_name(self) -> str:
        """``<arch>-<norm>`` (plus ``-mfcc<N>`` when not the seeds' 40 coefficients)."""
        suffix = "" if self.n_mfcc == 40 else f"-mfcc{self.n_mfcc}"
        return f"{self.arch}-{self.norm}{suffix}"

    @property
    def layout(self) -> Layout:
        return Layout(self.work, self.run_name)


@dataclass(frozen=True)
class Layout:
    """Paths inside the work directory."""

    work: Path
    run_name: str

    @property
    def scan_csv(self) -> Path:
        return self.work / "scan.csv"

    @property
    def scan_report(self) -> Path:
        return self.work / "scan-report.txt"

    @property
    def features_dir(self) -> Path:
        return self.work / "features"

    @property
    def labels_json(self) -> Path:
        return self.work / "labels.json"

    @property
    def run_dir(self) -> Path:
        return self.work / "runs" / self.run_name

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "ckpt"

    @property
    def norm_npz(self) -> Path:
        return self.run_dir / "norm.npz"

    @property
    def int8_tflite(self) -> Path:
        return self.run_dir / "model-int8.tflite"

    @property
    def float_tflite(self) -> Path:
        return self.run_dir / "model-float.tflite"

    @property
    def float_clean_tflite(self) -> Path:
        return self.run_dir / "model-float-clean.tflite"

    @property
    def int8_layout_json(self) -> Path:
        return self.run_dir / "int8-layout.json"

    @property
    def candidate_dir(self) -> Path:
        return self.run_dir / "candidate"

    @property
    def eval_json(self) -> Path:
        return self.run_dir / "eval.json"

    @property
    def confusion_png(self) -> Path:
        return self.run_dir / "confusion-int8.png"

    @property
    def confusion_json(self) -> Path:
        return self.run_dir / "confusion-int8.json"

    @property
    def timings_json(self) -> Path:
        return self.work / "timings.json"


class StageTimer:
    """Records wall-clock seconds per stage into ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(seconds, 1)
        doc: dict[str, Any] = {}
        if self.path.exists():
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        doc[stage] = {"seconds": round(seconds, 1), "finished": time.strftime("%FT%T%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
