"""Decoding audio files into mono float32 at the model's rate.

This is what the reference service did with ``librosa.load(path, sr=22050)``: read,
average the channels, resample with soxr's HQ filter. Bad input becomes an
:class:`AudioError` that says what is wrong with it.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

# A 16-bit file's smallest step is -90.3 dBFS; anything quieter than that
# carries no sound a model could classify.
SILENCE_PEAK_DBFS = -90.0
CLIP_PEAK_DBFS = -0.1
# Float files may go past ±1; this far past it the level is surely wrong.
FLOAT_FULL_SCALE = 1.5


class AudioError(ValueError):
    """The input is not audio the model can classify; the message says why."""


@dataclass(frozen=True)
class Clip:
    """Decoded audio: mono float32 samples at ``sample_rate_hz``."""

    samples: npt.NDArray[np.float32] = field(repr=False)
    sample_rate_hz: int
    source_rate_hz: int
    channels: int
    source_duration_s: float
    format: str
    # Things about the input a person should know (e.g. float samples beyond
    # full scale); shown with the verdict, never fatal.
    notes: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return int(self.samples.shape[0]) / self.sample_rate_hz


def dbfs(amplitude: float) -> float:
    """Amplitude relative to full scale, in dB (``-inf`` for zero)."""
    return 20.0 * math.log10(amplitude) if amplitude > 0 else float("-inf")


def decode_audio(
    source: str | Path | bytes | BinaryIO,
    target_rate_hz: int,
    max_seconds: float | None = None,
    via_rate_hz: int | None = None,
) -> Clip:
    """Decode WAV, FLAC, OGG (anything libsndfile reads) into a :class:`Clip`.

    Only the first ``max_seconds`` are decoded when given, so an hour-long
    upload costs no more than the window the model looks at. ``via_rate_hz``
    band-limits input that is faster than it (see ``FeatureSpec.train_rate_hz``).
    Raises :class:`AudioError` for unreadable, empty, silent or non-finite input.
    """
    _check_exists(source)
    handle: str | BinaryIO = (
        io.BytesIO(source)
        if isinstance(source, bytes)
        else str(source)
        if isinstance(source, (str, Path))
        else source
    )
    try:
        with sf.SoundFile(handle) as f:
            rate, channels, total, fmt = f.samplerate, f.channels, f.frames, f.format
            subtype = f.subtype
            limit = total if max_seconds is None else min(total, math.ceil(max_seconds * rate))
            data = f.read(frames=limit, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = _reason(e)
        if "format not recognised" in reason.lower():
            raise AudioError(
                "not audio: no WAV, FLAC, OGG, AIFF or other format libsndfile reads"
            ) from e
        raise AudioError(f"cannot read the audio ({reason})") from e
    if data.shape[0] == 0:
        raise AudioError("audio is empty (0 samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError("audio contains NaN or Inf samples")
    mono = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    peak = float(np.max(np.abs(mono)))
    if dbfs(peak) < SILENCE_PEAK_DBFS:
        raise AudioError(f"audio is silent (peak {dbfs(peak):.1f} dBFS)")
    notes: list[str] = []
    if subtype in ("FLOAT", "DOUBLE") and peak > FLOAT_FULL_SCALE:
        notes.append(
            f"float samples reach {peak:.3g}, far beyond full scale (±1): the file's level "
            "is probably not what the recording had"
        )
    if via_rate_hz is not None and rate > via_rate_hz:
        mono, rate_now = resample(mono, rate, via_rate_hz), via_rate_hz
    else:
        rate_now = rate
    samples = resample(mono, rate_now, target_rate_hz)
    return Clip(
        samples=samples,
        sample_rate_hz=target_rate_hz,
        source_rate_hz=rate,
        channels=channels,
        source_duration_s=total / rate if total >= 0 else math.nan,
        format=fmt,
        notes=tuple(notes),
    )


def _check_exists(source: str | Path | bytes | BinaryIO) -> None:
    """Name the real cause for a missing, empty or odd file, before libsndfile guesses."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError("empty upload (0 bytes)")
        return
    if not isinstance(source, (str, Path)):
        return
    path = Path(source)
    if not path.exists():
        raise AudioError(f"no such file: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AudioError(f"cannot read {path}: {e.strerror}") from e
    if size == 0:
        raise AudioError(f"empty file (0 bytes): {path}")


def _reason(error: Exception) -> str:
    """libsndfile's message without its boilerplate ("Error opening ...: ")."""
    text = str(error)
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text


def resample(
    samples: npt.NDArray[np.float32], rate_in_hz: int, rate_out_hz: int
) -> npt.NDArray[np.float32]:
    """One-shot resampling with soxr HQ (librosa's default ``soxr_hq``)."""
    if rate_in_hz == rate_out_hz:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out: npt.NDArray[np.float32] = soxr.resample(samples, rate_in_hz, rate_out_hz, quality="HQ")
    return out.astype(np.float32, copy=False)
