"""Where each stage reads and writes, and the settings shared by all stages.

``build/train`` (the work directory) holds::

    scan.csv               one row per clip (scan)
    scan-report.txt        the WavFileHelper-style summary (scan)
    features/shard-*.npz   cached windows (features)
    labels.json            one label per clip (labels)
    runs/<arch>-<norm>/    one per network variant:
        ckpt/              last.keras, best.weights.h5, state.json (fit)
        norm.npz           per-coefficient input mean/std (fit)
        physics-norm.npz   physics mean/std (fit); typical.npz: the training world (convert)
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

ARCHS = ("reference", "tpool", "statpool")
NORMS = ("coef", "none")


@dataclass(frozen=True)
class SimConfig:
    """What ``simulate`` asks the simulated world for (:mod:`soundwatch.sim`).

    Training units draw each clip's SNR from −10…+12 dB and its room,
    microphone, background, fault strengths and AGC from every family of the
    world; a share of training clips carries what a real line has (background
    events, dropouts, level steps, clipping), straddles a change of state, or
    is shorter than a window. Validation and test units are clean clips at
    the listed SNRs, as MIMII's are. Generalising to an unseen unit and an
    unseen world is the hard part, so training gets many units with fewer
    clips each.
    """

    n_units: int = 48
    per_class: int = 56
    eval_units: int = 2
    test_per_class: int = 25
    snrs_db: tuple[int, ...] = (-6, 0, 6)
    events_per_clip: float = 0.8
    dropout: float = 0.06
    level_step: float = 0.05
    clipping: float = 0.05
    straddle: float = 0.12
    short: float = 0.03

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @property
    def train_units(self) -> tuple[int, ...]:
        """MIMII numbers its units with even ids: id_00, id_02, …"""
        return tuple(range(0, 2 * self.n_units, 2))

    @property
    def val_units(self) -> tuple[int, ...]:
        return tuple(range(200, 200 + 2 * self.eval_units, 2))

    @property
    def test_units(self) -> tuple[int, ...]:
        return tuple(range(300, 300 + 2 * self.eval_units, 2))


SIM_VAL_UNITS = "id_200,id_202"
SIM_TEST_UNITS = "id_300,id_302"


def parse_units(text: str) -> tuple[str, ...]:
    """``"id_04,id_06"`` → ``("id_04", "id_06")``."""
    units = tuple(u.strip() for u in text.split(",") if u.strip())
    if not units:
        raise ValueError("no units given")
    return units


def parse_hold_out(items: list[str]) -> dict[str, tuple[str, ...]]:
    """``["room=live", "noise=brown,white"]`` → ``{"room": ("live",), "noise": ("brown",
    "white")}``."""
    from soundwatch.sim.dataset import event_families

    known = event_families()
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        choices = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or key not in known or not choices:
            raise ValueError(
                f"--hold-out {item!r}: expected family=choice[,choice] with family one of "
                f"{sorted(known)}"
            )
        bad = [c for c in choices if c not in known[key]]
        if bad:
            raise ValueError(f"--hold-out {item!r}: {bad} not in {key} ({', '.join(known[key])})")
        out[key] = out.get(key, ()) + choices
    return out


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
    test_units: tuple[str, ...] = parse_units(SIM_TEST_UNITS)
    val_units: tuple[str, ...] = parse_units(SIM_VAL_UNITS)
    hold_out: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(copies=0))
    version: str = "2.0.0"
    float_copy: Path | None = None
    confusion_copy: Path | None = None
    extra_sets: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (choose from {', '.join(NORMS)})")
        if set(self.test_units) & set(self.val_units):
            raise ValueError("the test units and the validation units must differ")

    @property
    def run_name(self) -> str:
        """``<arch>-<norm>`` (plus ``-mfcc<N>`` when not the reference service's 40
        coefficients, and the held-out families)."""
        suffix = "" if self.n_mfcc == 40 else f"-mfcc{self.n_mfcc}"
        held = "".join(f"-no-{k}-{'+'.join(v)}" for k, v in sorted(self.hold_out.items()))
        return f"{self.arch}-{self.norm}{suffix}{held}"

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
    def physics_norm_npz(self) -> Path:
        return self.run_dir / "physics-norm.npz"

    @property
    def typical_npz(self) -> Path:
        return self.run_dir / "typical.npz"

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
