"""Audio augmentation: the reference service's three (white noise, roll, time stretch) plus level.

The reference service added ``0.005 * randn`` noise, rolled the signal and time-stretched
it, each making one extra copy of a training clip. Here each transform takes
its amount explicitly (noise as an SNR, stretch as a rate) so it can be tested,
and every augmented copy also gets a random level: recordings arrive at any
level (peaks from about -35 to -6 dBFS) and c0 of the MFCCs carries loudness,
so the model must see the same sound at many levels to learn to ignore it.

All randomness comes from a ``numpy.random.Generator`` the caller seeds, so a
copy depends only on (seed, clip, copy number), never on worker scheduling.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

KINDS: tuple[str, ...] = ("noise", "roll", "stretch")


@dataclass(frozen=True)
class AugmentConfig:
    """How many augmented copies of a training clip to make, and how strong.

    Copy ``j`` of a clip applies ``KINDS[(h + j) % 3]``, ``h`` a stable hash of
    the clip's path, and then a random level; so with two copies every clip
    gets two different transforms, and the three kinds are used about equally
    often over the dataset.
    """

    copies: int = 1
    noise_snr_db: tuple[float, float] = (10.0, 30.0)
    stretch_rate: tuple[float, float] = (0.8, 1.25)
    peak_dbfs: tuple[float, float] = (-40.0, -3.0)

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError("copies must be >= 0")
        lo, hi = self.stretch_rate
        if not 0 < lo <= hi:
            raise ValueError("stretch_rate must satisfy 0 < lo <= hi")
        if self.peak_dbfs[1] > 0:
            raise ValueError("peak_dbfs must stay at or below 0 dBFS (no clipping)")

    def as_dict(self) -> dict[str, Any]:
        return {
            "copies": self.copies,
            "noise_snr_db": list(self.noise_snr_db),
            "stretch_rate": list(self.stretch_rate),
            "peak_dbfs": list(self.peak_dbfs),
        }


def power(y: F32) -> float:
    """Mean square of a signal."""
    return float(np.mean(np.square(y, dtype=np.float64)))


def add_white_noise(y: F32, snr_db: float, rng: np.random.Generator) -> F32:
    """Add white Gaussian noise whose power is ``snr_db`` below the signal's."""
    noise = rng.standard_normal(y.shape[0])
    scale = np.sqrt(power(y) / 10.0 ** (snr_db / 10.0))
    out: F32 = (y + scale * noise).astype(np.float32)
    return out


def roll(y: F32, shift_samples: int) -> F32:
    """Rotate the signal in time (content preserved, start point moved)."""
    return np.roll(y, shift_samples)


def change_level(y: F32, gain_db: float) -> F32:
    """Scale the signal by ``gain_db``."""
    out: F32 = (y * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)
    return out


def peak_dbfs(y: F32) -> float:
    """Peak level in dB relative to full scale (-inf for silence)."""
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def time_stretch(y: F32, rate: float) -> F32:
    """Phase-vocoder time stretch (librosa's): ``rate > 1`` is faster and shorter.

    The result has about ``len(y) / rate`` samples; use :func:`fit_length`
    to bring it back to the window length.
    """
    import librosa

    out: F32 = librosa.effects.time_stretch(y.astype(np.float32), rate=rate).astype(np.float32)
    return out


def fit_length(y: F32, n_samples: int) -> F32:
    """Crop, or repeat from the start, to exactly ``n_samples``.

    Repeating instead of zero-filling keeps the window full of machine sound:
    a serving window is never partly silent, and the MFCCs of digital silence
    (c0 = -1131) would be a cue no real clip has.
    """
    if y.shape[0] >= n_samples:
        return y[:n_samples]
    reps = -(-n_samples // max(y.shape[0], 1))
    return np.tile(y, reps)[:n_samples]


def augment(y: F32, kind: str, rng: np.random.Generator, config: AugmentConfig) -> F32:
    """One augmented copy of ``y``: the transform ``kind`` and then a random level."""
    if kind == "noise":
        out = add_white_noise(y, float(rng.uniform(*config.noise_snr_db)), rng)
    elif kind == "roll":
        out = roll(y, int(rng.integers(1, max(y.shape[0], 2))))
    elif kind == "stretch":
        lo, hi = np.log(config.stretch_rate)
        rate = float(np.exp(rng.uniform(lo, hi)))
        out = fit_length(time_stretch(y, rate), y.shape[0])
    else:
        raise ValueError(f"unknown augmentation {kind!r} (choose from {', '.join(KINDS)})")
    target = float(rng.uniform(*config.peak_dbfs))
    current = peak_dbfs(out)
    return change_level(out, target - current) if np.isfinite(current) else out


def clip_seed(rel_path: str) -> int:
    """A stable 32-bit id for a clip (the same on every machine and run)."""
    return zlib.crc32(rel_path.encode("utf-8"))


def copy_rng(seed: int, rel_path: str, copy: int) -> np.random.Generator:
    """The generator for copy ``copy`` of one clip: independent of sharding."""
    return np.random.default_rng(np.random.SeedSequence([seed, clip_seed(rel_path), copy]))


def augmented_copies(y: F32, rel_path: str, seed: int, config: AugmentConfig) -> Sequence[F32]:
    """The ``config.copies`` augmented copies of one training clip."""
    first = clip_seed(rel_path)
    return [
        augment(y, KINDS[(first + j) % len(KINDS)], copy_rng(seed, rel_path, j), config)
        for j in range(config.copies)
    ]
