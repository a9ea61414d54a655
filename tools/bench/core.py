"""The bench's shared vocabulary: statistics, rows, targets, context, tables.

This module imports only the standard library and numpy, so the runner stays
light and each section decides for itself what heavy libraries it loads.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Environment for "one core" comparisons. Set before numpy/TensorFlow load in
# a child process: OpenBLAS, OpenMP, MKL, numba and TensorFlow's own pools.
ONE_CORE_ENV: dict[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}
# Quiet TensorFlow's C++ start-up chatter in the bench's own children.
QUIET_ENV: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}


@dataclass(frozen=True)
class Stat:
    """Summary of repeated measurements of one figure."""

    median: float
    p95: float
    n: int
    minimum: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stat:
        values = np.asarray(list(samples), dtype=np.float64)
        if values.size == 0:
            raise ValueError("no samples")
        return cls(
            median=float(np.median(values)),
            p95=float(np.percentile(values, 95)),
            n=int(values.size),
            minimum=float(values.min()),
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Stat | None:
        return None if doc is None else cls(**doc)


@dataclass(frozen=True)
class Target:
    """A target: on the ratio (reference/soundwatch) or on soundwatch's median."""

    on: str  # "ratio" or "soundwatch"
    op: str  # ">=", "<=", "<"
    value: float
    unit: str = ""

    def text(self) -> str:
        if self.on == "ratio":
            return f"{self.op} {self.value:g}×"
        return f"{self.op} {self.value:g} {self.unit}".strip()

    def met_by(self, row: Row) -> bool | None:
        reached = row.ratio if self.on == "ratio" else _median(row.soundwatch)
        if reached is None:
            return None
        if self.op == ">=":
            return reached >= self.value
        if self.op == "<=":
            return reached <= self.value
        if self.op == "<":
            return reached < self.value
        raise ValueError(f"unknown target operator {self.op!r}")

    def reached_text(self, row: Row) -> str:
        if self.on == "ratio":
            return "n/a" if row.ratio is None else f"{row.ratio:.1f}×"
        med = _median(row.soundwatch)
        return "n/a" if med is None else f"{fmt_value(med)} {row.unit}"


def _median(stat: Stat | None) -> float | None:
    return None if stat is None else stat.median


@dataclass(frozen=True)
class Row:
    """One figure, measured for the reference service's path and for soundwatch.

    ``includes`` says what the figure covers; the table prints it as a note.
    Either side may be ``None`` when it has no counterpart.
    """

    figure: str
    unit: str
    reference: Stat | None
    soundwatch: Stat | None
    includes: str = ""
    target: Target | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """reference / soundwatch of the medians: how many times less soundwatch costs."""
        if self.reference is None or self.soundwatch is None or self.soundwatch.median <= 0:
            return None
        return self.reference.median / self.soundwatch.median

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met_by(self)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratio"] = self.ratio
        doc["met"] = self.met
        doc["target_text"] = None if self.target is None else self.target.text()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Row:
        target = doc.get("target")
        return cls(
            figure=doc["figure"],
            unit=doc["unit"],
            reference=Stat.from_json(doc.get("reference")),
            soundwatch=Stat.from_json(doc.get("soundwatch")),
            includes=doc.get("includes", ""),
            target=None if target is None else Target(**target),
            extra=doc.get("extra", {}),
        )


@dataclass(frozen=True)
class Fixtures:
    """Files the runner prepares once and every section may use."""

    workdir: Path
    clips: tuple[Path, ...]
    clip_generator: str
    reference_model: Path  # the reference service's CNN saved as a .keras file
    reference_model_source: str
    float_tflite: Path | None
    float_tflite_source: str
    bundle_dir: Path
    bundle_kind: str  # "shipped" or "temporary (...)"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(json.dumps(asdict(self), default=str))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Fixtures:
        return cls(
            workdir=Path(doc["workdir"]),
            clips=tuple(Path(p) for p in doc["clips"]),
            clip_generator=doc["clip_generator"],
            reference_model=Path(doc["reference_model"]),
            reference_model_source=doc["reference_model_source"],
            float_tflite=None if doc["float_tflite"] is None else Path(doc["float_tflite"]),
            float_tflite_source=doc["float_tflite_source"],
            bundle_dir=Path(doc["bundle_dir"]),
            bundle_kind=doc["bundle_kind"],
        )


@dataclass(frozen=True)
class Context:
    """What a section gets: options, fixtures and the environment it runs in."""

    quick: bool
    fixtures: Fixtures
    repo_root: Path
    python: str
    one_core: bool
    # The environment the runner itself was started with (no thread pins), for
    # sections that start processes the way a user would.
    user_env: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "fixtures": self.fixtures.to_json(),
            "repo_root": str(self.repo_root),
            "python": self.python,
            "one_core": self.one_core,
            "user_env": self.user_env,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Context:
        return cls(
            quick=doc["quick"],
            fixtures=Fixtures.from_json(doc["fixtures"]),
            repo_root=Path(doc["repo_root"]),
            python=doc["python"],
            one_core=doc["one_core"],
            user_env=dict(doc["user_env"]),
        )

    def reps(self, default: int, quick: int) -> int:
        return quick if self.quick else default


@dataclass(frozen=True)
class Section:
    """One part of the bench: ``func`` is ``"module:function"``, imported in the child."""

    name: str
    title: str
    func: str
    one_core: bool
    what: str  # one line for the table header: what is compared, on how many threads

    def load(self) -> Callable[[Context], list[Row]]:
        module_name, _, attr = self.func.partition(":")
        module = __import__(module_name, fromlist=[attr])
        fn: Callable[[Context], list[Row]] = getattr(module, attr)
        return fn


def time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def fmt_value(x: float) -> str:
    """A figure with about three significant digits."""
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(stat: Stat | None, unit: str) -> str:
    if stat is None:
        return "—"
    return f"{fmt_value(stat.median)} {unit} (p95 {fmt_value(stat.p95)}, n={stat.n})"


def format_table(rows: Sequence[Row]) -> list[str]:
    """A Markdown table, padded so it also reads well in a terminal."""
    header = [
        "figure",
        "reference service",
        "soundwatch",
        "reference/soundwatch",
        "target",
        "met",
    ]
    body: list[list[str]] = []
    for i, row in enumerate(rows, start=1):
        ratio = "—" if row.ratio is None else f"{row.ratio:.1f}×"
        met = "" if row.met is None else ("yes" if row.met else "**NO**")
        body.append(
            [
                f"{row.figure} [{i}]",
                _cell(row.reference, row.unit),
                _cell(row.soundwatch, row.unit),
                ratio,
                "" if row.target is None else row.target.text(),
                met,
            ]
        )
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in body)
    out.append("")
    out.extend(f"- [{i}] {row.includes}" for i, row in enumerate(rows, start=1) if row.includes)
    return out
