"""The per-unit baseline: each machine's own normal, and how far a window departs from it.

A classifier trained elsewhere judges a machine against other machines. A
unit's baseline judges it against itself: it learns, from a stretch of the
unit's own healthy sound, where that unit's windows usually sit and how much
they vary, and scores every later window by its distance from there.

**Embedding.** Each window is summarised by level-free pieces of what the
pipeline computes anyway, chosen to be robust to the seconds-long events of
a factory (knocks, beepers, speech, a passing truck) and not to a fault,
which persists:

* ``spectrum``: the unit's steady spectrum. Per mel band, the 20th
  percentile of the window's log-mel frames (a noise-floor estimate: an
  event that covers less than 80 % of the frames leaves it alone), in
  :data:`SPECTRUM_BANDS` bands of adjacent mel bands, less their mean (so a
  gain change is not a departure). It sees a moved blade-pass comb, quieter
  airflow, a whistle, a new resonance or rattle;
* ``physics``: the window's physics features (speed, comb, shaft tone,
  sidebands, hum harmonics, whistle, surging, breathing at the shaft rate).

**Score.** Per dimension, the departure from the baseline's median in units
of a scale that covers the learning windows' own spread *including their
tails*: the larger of 1.4826 x MAD, a floor, and the 99.5th percentile of the
absolute deviation placed at 1.96 scales (with few windows, the percentile
that leaves out the :data:`TAIL_SPARE` most extreme, placed where a normal
distribution would put it). A dimension that events often move gets a wide
scale, one that never moves a narrow one. The squared departures are capped
at :data:`Z_CAP` squared, and the novelty is the mean of the :data:`TOP_DIMS`
largest: a fault moves a few dimensions far (a tone, a band), and averaging
over all of them would dilute it. Higher means less like the unit's normal.

**Speed.** :meth:`Baseline.speed_ratio` is a window's shaft speed over the
unit's learned nominal speed: the decision stage names departures with it.

**Threshold.** Out-of-sample novelty of the learning windows (each time
block scored against a baseline fitted without it) is fitted with a gamma
distribution, and the threshold is its ``1 - false_alarm_rate`` quantile
(the DCASE baselines' rule). A single window above it means little by
design; the decision stage confirms over windows.

A baseline is tied to the bundle and physics version it was learned with:
loading it under another is refused, and the unit learns again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from soundwatch.features import WindowFeatures
from soundwatch.physics import FEATURE_NAMES, PHYSICS_VERSION

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

BASELINE_FORMAT: Final = "soundwatch-baseline/2"
#: The physics features the baseline compares (all level-free).
PHYSICS_KEYS: Final[tuple[str, ...]] = tuple(FEATURE_NAMES)
#: Bands of the robust spectrum (adjacent mel bands averaged: 4 of 128).
SPECTRUM_BANDS: Final = 32
#: Percentile of a band's frames that stands for the window's steady level.
FLOOR_PERCENTILE: Final = 20
#: Smallest scale per group (dB, or the physics features' own units): windows of
#: a steady machine can agree more closely than any real change.
SCALE_FLOOR: Final = {"spectrum": 0.3, "physics": 1.0}
#: Share of the learning windows' absolute deviation that the scale covers, so that
#: what events often do is not a departure; with few windows, all but the
#: :data:`TAIL_SPARE` most extreme (one bad speed estimate must not widen a scale).
TAIL_SHARE: Final = 0.995
TAIL_SPARE: Final = 3
#: The tail quantile lands at this many scales: 2.81 standard deviations of a normal
#: distribution at 1.96 scales, a scale 1.43 times wider than its standard deviation.
TAIL_AT: Final = 1.96
#: Largest squared departure one dimension can add (in scales): a feature that
#: is absent in normal running and appears must not outweigh the rest alone.
Z_CAP: Final = 8.0
#: Dimensions whose departures make the novelty.
TOP_DIMS: Final = 2
#: The speed is read only while the blade-pass comb is at most this many scales
#: weaker than in the unit's normal.
COMB_TRUSTED_Z: Final = 3.0
#: Windows kept to refit the baseline (a false alarm joins them); float16.
MAX_KEPT_WINDOWS: Final = 1200
#: Time blocks for the out-of-sample scores behind the threshold.
CV_BLOCKS: Final = 5


class BaselineError(ValueError):
    """A baseline that cannot be used: unreadable, or from another model."""


@dataclass(frozen=True)
class Layout:
    """Where each group sits in the embedding."""

    groups: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.groups)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, n in self.groups:
            out[name] = slice(start, start + n)
            start += n
        return out


#: Where each group sits in every window's embedding.
LAYOUT: Final = Layout((("spectrum", SPECTRUM_BANDS), ("physics", len(PHYSICS_KEYS))))


def robust_spectrum(log_mel: F64) -> F32:
    """A window's steady spectrum: per mel band the :data:`FLOOR_PERCENTILE` of its frames,
    in :data:`SPECTRUM_BANDS` bands, less their mean (see the module docstring)."""
    n_frames, n_mels = log_mel.shape
    if n_frames == 0 or n_mels % SPECTRUM_BANDS:
        raise BaselineError(
            f"the robust spectrum needs log-mel frames in a multiple of {SPECTRUM_BANDS} "
            f"bands, got {log_mel.shape}"
        )
    k = (n_frames - 1) * FLOOR_PERCENTILE // 100
    floor: F64 = np.partition(log_mel, k, axis=0)[k]
    bands = floor.reshape(SPECTRUM_BANDS, -1).mean(axis=1)
    out: F32 = (bands - bands.mean()).astype(np.float32)
    return out


def embedding(features: WindowFeatures) -> F32:
    """One window's baseline embedding (see the module docstring)."""
    sig = features.signature
    physics = np.asarray([sig.values[k] for k in PHYSICS_KEYS], dtype=np.float32)
    return np.concatenate([robust_spectrum(features.log_mel), physics]).astype(np.float32)


@dataclass(frozen=True)
class Novelty:
    """How far one window departs from the unit's normal."""

    score: float
    threshold: float
    groups: dict[str, float] = field(default_factory=dict)
    #: The shaft speed over the baseline's (the unit's nominal speed); None if unmeasured.
    speed_ratio: float | None = None

    @property
    def anomalous(self) -> bool:
        return self.score > self.threshold


@dataclass(frozen=True)
class Baseline:
    """A unit's learned normal (see the module docstring)."""

    baseline_id: str
    model_version: str
    physics_version: int
    layout: Layout
    center: F64 = field(repr=False)
    scale: F64 = field(repr=False)
    threshold: float
    false_alarm_rate: float
    gamma: tuple[float, float]
    learned_s: float
    windows: int
    created_at: float
    kept: F32 = field(repr=False)

    def novelty(self, emb: F32) -> Novelty:
        """The window's novelty, and per group its largest squared departure."""
        z2 = _departures(emb[None, :].astype(np.float64), self.center, self.scale)[0]
        return Novelty(
            round(float(_top_mean(z2[None, :])[0]), 4),
            self.threshold,
            {name: round(float(z2[part].max()), 3) for name, part in self.layout.slices().items()},
            self.speed_ratio(emb),
        )

    def speed_ratio(self, emb: F32) -> float | None:
        """The window's shaft speed over the unit's learned nominal speed.

        None when unmeasured, or when the blade-pass comb the speed is read from
        is far weaker than in the unit's normal (a sound unlike the fan: the
        "speed" would be a guess).
        """
        start = self.layout.slices()["physics"].start
        i = start + PHYSICS_KEYS.index("shaft_hz")
        c = start + PHYSICS_KEYS.index("comb_db")
        speed, nominal = float(emb[i]), float(self.center[i])
        if not (speed > 0 and nominal > 0 and math.isfinite(speed)):
            return None
        if (float(emb[c]) - self.center[c]) / self.scale[c] < -COMB_TRUSTED_Z:
            return None
        return round(speed / nominal, 4)

    def refit(self, extra: F32, learned_s: float = 0.0) -> Baseline:
        """The baseline learned again with ``extra`` windows added (a false alarm's)."""
        data = np.concatenate([self.kept.astype(np.float32), extra.astype(np.float32)])
        return fit(
            data,
            self.layout,
            self.model_version,
            false_alarm_rate=self.false_alarm_rate,
            learned_s=self.learned_s + learned_s,
        )

    # -- persistence ----------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically (a crash mid-write leaves the old file)."""
        doc = {
            "format": BASELINE_FORMAT,
            "baseline_id": self.baseline_id,
            "model_version": self.model_version,
            "physics_version": self.physics_version,
            "layout": [list(g) for g in self.layout.groups],
            "threshold": self.threshold,
            "false_alarm_rate": self.false_alarm_rate,
            "gamma": list(self.gamma),
            "learned_s": self.learned_s,
            "windows": self.windows,
            "created_at": self.created_at,
        }
        write_state(
            path,
            doc,
            center=self.center,
            scale=self.scale,
            kept=self.kept.astype(np.float16),
        )

    @classmethod
    def load(cls, path: Path, model_version: str) -> Baseline:
        """Load and check that it belongs to ``model_version`` and this physics version."""
        doc, arrays = read_state(path, BASELINE_FORMAT, model_version, "baseline")
        try:
            center, scale, kept = arrays["center"], arrays["scale"], arrays["kept"]
        except KeyError as e:
            raise BaselineError(f"{path}: unreadable baseline (no {e})") from e
        layout = Layout(tuple((str(n), int(k)) for n, k in doc["layout"]))
        if center.shape != (layout.size,) or scale.shape != (layout.size,):
            raise BaselineError(f"{path}: arrays do not match the layout")
        return cls(
            baseline_id=str(doc["baseline_id"]),
            model_version=model_version,
            physics_version=PHYSICS_VERSION,
            layout=layout,
            center=center.astype(np.float64),
            scale=scale.astype(np.float64),
            threshold=float(doc["threshold"]),
            false_alarm_rate=float(doc["false_alarm_rate"]),
            gamma=(float(doc["gamma"][0]), float(doc["gamma"][1])),
            learned_s=float(doc["learned_s"]),
            windows=int(doc["windows"]),
            created_at=float(doc["created_at"]),
            kept=kept.astype(np.float32),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "baseline_id": self.baseline_id,
            "model_version": self.model_version,
            "threshold": round(self.threshold, 4),
            "false_alarm_rate": self.false_alarm_rate,
            "learned_s": round(self.learned_s, 1),
            "windows": self.windows,
            "created_at": self.created_at,
        }


def peek(path: Path) -> dict[str, Any]:
    """A baseline file's description without loading it for a model (for people and tools).

    Raises :class:`BaselineError` for a file that is not a baseline.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            doc: dict[str, Any] = json.loads(bytes(npz["meta"]).decode())
            kept = int(npz["kept"].shape[0])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise BaselineError(f"{path}: unreadable baseline ({e})") from e
    if doc.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"{path}: format {doc.get('format')!r} is not {BASELINE_FORMAT!r}")
    return {**doc, "kept": kept, "bytes": path.stat().st_size}


def write_state(path: Path, doc: dict[str, Any], **arrays: npt.NDArray[Any]) -> None:
    """Replace ``path`` with ``doc`` (as JSON) and ``arrays``, atomically: a crash
    mid-write leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            meta = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
            np.savez_compressed(f, meta=meta, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(
    path: Path, fmt: str, model_version: str, what: str
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """A file of :func:`write_state`, checked to be ``fmt`` and made with this model and
    physics version; :class:`BaselineError` names what does not match."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            doc = json.loads(bytes(npz["meta"]).decode())
            arrays = {k: npz[k] for k in npz.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise BaselineError(f"{path}: unreadable {what} ({e})") from e
    if doc.get("format") != fmt:
        raise BaselineError(f"{path}: format {doc.get('format')!r} is not {fmt!r}")
    if doc.get("model_version") != model_version:
        raise BaselineError(
            f"{path}: learned with model {doc.get('model_version')!r}, not {model_version!r}"
        )
    if doc.get("physics_version") != PHYSICS_VERSION:
        raise BaselineError(
            f"{path}: learned with physics features version {doc.get('physics_version')!r}, "
            f"not {PHYSICS_VERSION}"
        )
    return doc, arrays


def _center_scale(data: F64, layout: Layout) -> tuple[F64, F64]:
    """Per dimension the median and a scale that covers the data's tails (module docstring)."""
    center = np.median(data, axis=0)
    deviation = np.abs(data - center)
    floor = np.empty(layout.size)
    for name, part in layout.slices().items():
        floor[part] = SCALE_FLOOR[name]
    mad = 1.4826 * np.median(deviation, axis=0)
    share = min(TAIL_SHARE, 1.0 - TAIL_SPARE / len(data))
    gauss = NormalDist()
    at = TAIL_AT * gauss.inv_cdf((1 + share) / 2) / gauss.inv_cdf((1 + TAIL_SHARE) / 2)
    tail = np.quantile(deviation, share, axis=0) / at
    return center, np.maximum(np.maximum(mad, tail), floor)


def _departures(data: F64, center: F64, scale: F64) -> F64:
    """Squared departures per dimension, in scales, capped at :data:`Z_CAP` squared."""
    return np.minimum(((data - center) / scale) ** 2, Z_CAP**2)


def _top_mean(z2: F64) -> F64:
    """Per row, the mean of the :data:`TOP_DIMS` largest squared departures."""
    top: F64 = np.sort(z2, axis=1)[:, -TOP_DIMS:]
    mean: F64 = top.mean(axis=1)
    return mean


def fit(
    embeddings: F32,
    layout: Layout,
    model_version: str,
    *,
    false_alarm_rate: float = 0.01,
    learned_s: float = 0.0,
) -> Baseline:
    """Learn a baseline from a unit's normal windows (in time order)."""
    data = np.asarray(embeddings, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != layout.size:
        raise BaselineError(f"embeddings must be (n, {layout.size}), got {data.shape}")
    if len(data) < 2 * CV_BLOCKS:
        raise BaselineError(f"need at least {2 * CV_BLOCKS} windows to learn, got {len(data)}")
    if not 0 < false_alarm_rate < 0.5:
        raise BaselineError("false_alarm_rate must be in (0, 0.5)")
    center, scale = _center_scale(data, layout)
    # Out-of-sample scores: each block of consecutive windows against the rest.
    held: list[F64] = []
    for block in np.array_split(np.arange(len(data)), CV_BLOCKS):
        rest = np.setdiff1d(np.arange(len(data)), block)
        held.append(_top_mean(_departures(data[block], *_center_scale(data[rest], layout))))
    shape, gscale = _fit_gamma(np.concatenate(held))
    threshold = _gamma_quantile(1.0 - false_alarm_rate, shape, gscale)
    keep = np.linspace(0, len(data) - 1, min(len(data), MAX_KEPT_WINDOWS)).round().astype(int)
    digest = hashlib.sha256(np.ascontiguousarray(data[keep]).tobytes()).hexdigest()[:12]
    return Baseline(
        baseline_id=f"bl-{digest}",
        model_version=model_version,
        physics_version=PHYSICS_VERSION,
        layout=layout,
        center=center,
        scale=scale,
        threshold=round(float(threshold), 4),
        false_alarm_rate=false_alarm_rate,
        gamma=(round(shape, 5), round(gscale, 5)),
        learned_s=learned_s,
        windows=len(data),
        created_at=round(time.time(), 3),
        kept=data[keep].astype(np.float32),
    )


def _fit_gamma(x: F64) -> tuple[float, float]:
    """Gamma (shape, scale) by maximum likelihood (Minka's fixed point), for positive ``x``."""
    x = np.maximum(np.asarray(x, dtype=np.float64), 1e-9)
    mean = float(x.mean())
    s = math.log(mean) - float(np.mean(np.log(x)))
    if s <= 1e-9:
        return 1e6, mean / 1e6
    k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(20):
        k -= (math.log(k) - _digamma(k) - s) / (1 / k - _trigamma(k))
        k = max(k, 1e-3)
    return k, mean / k


def _digamma(x: float) -> float:
    result = 0.0
    while x < 6:
        result -= 1 / x
        x += 1
    f = 1 / (x * x)
    return result + math.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252)))


def _trigamma(x: float) -> float:
    result = 0.0
    while x < 6:
        result += 1 / (x * x)
        x += 1
    f = 1 / (x * x)
    return result + 1 / x + f / 2 + f / x * (1 / 6 - f * (1 / 30 - f / 42))


def _gamma_quantile(p: float, shape: float, scale: float) -> float:
    """The ``p`` quantile of a gamma distribution (bisection on the regularised CDF)."""
    lo, hi = 0.0, max(1.0, shape * scale)
    while _gamma_cdf(hi, shape, scale) < p:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if _gamma_cdf(mid, shape, scale) < p:
            lo = mid
        else:
            hi = mid
    return hi


def _gamma_cdf(x: float, shape: float, scale: float) -> float:
    """P(X <= x): the regularised lower incomplete gamma function (series / continued fraction)."""
    if x <= 0:
        return 0.0
    z = x / scale
    if z < shape + 1:
        term = total = 1.0 / shape
        a = shape
        for _ in range(500):
            a += 1
            term *= z / a
            total += term
            if abs(term) < abs(total) * 1e-14:
                break
        return min(1.0, total * math.exp(-z + shape * math.log(z) - math.lgamma(shape)))
    # Continued fraction for the upper tail (Lentz).
    b = z + 1 - shape
    c = 1e300
    d = 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - shape)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-14:
            break
    return max(0.0, 1.0 - math.exp(-z + shape * math.log(z) - math.lgamma(shape)) * h)


def auc(normal: Sequence[float], abnormal: Sequence[float]) -> float:
    """Area under the ROC curve: P(abnormal score > normal score), ties half."""
    a = np.asarray(abnormal, dtype=np.float64)[:, None]
    n = np.asarray(normal, dtype=np.float64)[None, :]
    return float(np.mean((a > n) + 0.5 * (a == n)))
