"""MFCC features exactly as the reference service computed them, in numpy alone.

The reference service ran ``librosa.feature.mfcc(y, sr=22050, n_mfcc=40)`` with librosa's
defaults (n_fft 2048, hop 512, 128 Slaney mel bands, power 2, centred frames
with zero padding, ``power_to_db`` with ``top_db=80``, orthonormal DCT-II) and
then appended two zero columns and cut or filled the result to 433 frames.

librosa, numba and scipy are too heavy for the edge runtime, so this module
reproduces the computation with numpy. The two matrices that carry librosa's
exact conventions (the mel filter bank and the DCT) are not recomputed here:
the training export writes them into the model bundle, made by librosa itself,
and they arrive through :class:`FeatureSpec`. Training and serving both call
this module, so the device cannot compute features different from the ones
the model learned.

The pipeline is split into stages so that the streaming runtime can compute
only the new frames of each hop (:meth:`FeatureExtractor.log_mel`) and apply
the window-wide parts (:meth:`FeatureExtractor.mfcc_from_log_mel`) at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from soundwatch.physics import LOW_BINS, PhysicsExtractor, Signature

F32 = npt.NDArray[np.float32]
_BLOCK_FRAMES = 128
F64 = npt.NDArray[np.float64]


class FeatureSpecError(ValueError):
    """The feature spec is inconsistent with itself or with a model."""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that defines the model's input features.

    The scalar fields mirror librosa's arguments; ``mel_basis`` has shape
    ``(n_mels, n_fft // 2 + 1)`` and ``dct_matrix`` shape ``(n_mfcc, n_mels)``.
    """

    mel_basis: F32 = field(repr=False)
    dct_matrix: F32 = field(repr=False)
    sample_rate_hz: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    n_mfcc: int = 40
    top_db: float = 80.0
    amin: float = 1e-10
    pad_columns: int = 2
    n_frames: int = 433
    window: str = "hann"
    center: bool = True
    pad_mode: str = "constant"
    # The sample rate of the recordings the model was trained on (MIMII: 16 kHz).
    # Input at a higher rate is resampled through it first, so that live audio
    # has the bandwidth the model saw (a 48 kHz microphone would otherwise put
    # energy in mel bands above 8 kHz that were empty in every training clip).
    train_rate_hz: int | None = None

    def __post_init__(self) -> None:
        if self.window != "hann":
            raise FeatureSpecError(f"feature spec: window {self.window!r} unsupported (hann)")
        if self.pad_mode != "constant":
            raise FeatureSpecError(
                f"feature spec: pad_mode {self.pad_mode!r} unsupported (constant)"
            )
        n_bins = self.n_fft // 2 + 1
        if self.mel_basis.shape != (self.n_mels, n_bins):
            raise FeatureSpecError(
                f"feature spec: mel_basis has shape {self.mel_basis.shape}, "
                f"expected (n_mels, n_fft//2+1) = ({self.n_mels}, {n_bins})"
            )
        if self.dct_matrix.shape != (self.n_mfcc, self.n_mels):
            raise FeatureSpecError(
                f"feature spec: dct_matrix has shape {self.dct_matrix.shape}, "
                f"expected (n_mfcc, n_mels) = ({self.n_mfcc}, {self.n_mels})"
            )
        for name in ("mel_basis", "dct_matrix"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise FeatureSpecError(f"feature spec: {name} contains NaN or Inf")
        if self.hop_length <= 0 or self.n_fft <= 0 or self.hop_length > self.n_fft:
            raise FeatureSpecError("feature spec: need 0 < hop_length <= n_fft")
        if self.train_rate_hz is not None and self.train_rate_hz <= 0:
            raise FeatureSpecError("feature spec: train_rate_hz must be positive")

    def via_rate_hz(self, input_rate_hz: int) -> int | None:
        """The intermediate rate input at ``input_rate_hz`` must pass through, if any."""
        limit = self.train_rate_hz
        if limit is None or input_rate_hz <= limit or limit == self.sample_rate_hz:
            return None
        return limit

    @property
    def frame_rate_hz(self) -> float:
        """STFT frames per second (43.07 for the defaults)."""
        return self.sample_rate_hz / self.hop_length

    def scalars(self) -> dict[str, Any]:
        """The scalar fields, as stored in the bundle's JSON."""
        return {
            "sample_rate_hz": self.sample_rate_hz,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "n_mfcc": self.n_mfcc,
            "top_db": self.top_db,
            "amin": self.amin,
            "pad_columns": self.pad_columns,
            "n_frames": self.n_frames,
            "window": self.window,
            "center": self.center,
            "pad_mode": self.pad_mode,
            "train_rate_hz": self.train_rate_hz,
        }

    def n_stft_frames(self, n_samples: int) -> int:
        """How many STFT frames librosa makes from ``n_samples`` samples."""
        padded = n_samples + (self.n_fft if self.center else 0)
        return 1 + (padded - self.n_fft) // self.hop_length if padded >= self.n_fft else 0


def hann_window(n_fft: int) -> F64:
    """The periodic Hann window (scipy's ``get_window('hann', n, fftbins=True)``)."""
    n = np.arange(n_fft, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * n / n_fft)


class FeatureExtractor:
    """Computes the reference service's MFCCs for a :class:`FeatureSpec`.

    It caches the window and the transposed matrices so each call does only
    the arithmetic. Instances are immutable after construction and may be
    shared between threads.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._window = hann_window(spec.n_fft)
        # Time-major layout: frames are rows, so every product below is a
        # plain row-major matrix multiply.
        self._mel_t = np.ascontiguousarray(spec.mel_basis.T, dtype=np.float32)
        self._dct = np.asarray(spec.dct_matrix, dtype=np.float64)
        self._log_amin = 10.0 * math.log10(spec.amin)
        freqs = np.fft.rfftfreq(spec.n_fft, 1.0 / spec.sample_rate_hz)
        weights = spec.mel_basis.astype(np.float64)
        centres = (weights @ freqs) / np.maximum(weights.sum(axis=1), 1e-12)
        self._physics: dict[int, PhysicsExtractor] = {}
        self._mel_centres_hz = centres

    def log_mel(self, padded: npt.NDArray[np.floating[Any]]) -> F64:
        """dB mel frames ``(frames, n_mels)`` of every full frame in a padded signal.

        ``padded`` must start at a frame boundary (see :meth:`pad_signal`). The
        values are ``power_to_db`` with ref 1.0 *before* the window-wide top_db
        clip, so frames computed separately (as the streaming runtime does,
        hop by hop) are identical to frames computed together.
        """
        return self.frames(padded, 0)[0]

    def frames(
        self, padded: npt.NDArray[np.floating[Any]], low_bins: int
    ) -> tuple[F64, npt.NDArray[np.complex64]]:
        """:meth:`log_mel` and the first ``low_bins`` complex STFT bins of the same frames.

        The low bins feed the fine spectrum of :mod:`soundwatch.physics`: one
        STFT serves both.
        """
        spec = self.spec
        if padded.shape[0] < spec.n_fft:
            return (
                np.zeros((0, spec.n_mels), dtype=np.float64),
                np.zeros((0, low_bins), dtype=np.complex64),
            )
        frames = np.lib.stride_tricks.sliding_window_view(padded, spec.n_fft)[:: spec.hop_length]
        return self._spectra(frames, low_bins)

    def edge_log_mel(self, samples: npt.NDArray[np.floating[Any]]) -> F64:
        """dB mel frames of a window's edge frames (those whose STFT reaches into the
        zero padding), first the left ones, then the right ones.

        Equal to the same rows of :meth:`log_mel` of the padded window, from
        only the samples those frames see: one small STFT instead of a padded
        copy of the whole window.
        """
        spec = self.spec
        n = samples.shape[0]
        n_frames = spec.n_stft_frames(n)
        interior = self.interior(n_frames)
        edges = [*range(interior.start), *range(max(interior.stop, interior.start), n_frames)]
        half = spec.n_fft // 2 if spec.center else 0
        frames = np.zeros((len(edges), spec.n_fft), dtype=np.float64)
        for row, j in enumerate(edges):
            start = j * spec.hop_length - half
            lo, hi = max(start, 0), min(start + spec.n_fft, n)
            if hi > lo:
                frames[row, lo - start : hi - start] = samples[lo:hi]
        return self._spectra(frames, 0)[0]

    def _spectra(
        self, frames: npt.NDArray[np.floating[Any]], low_bins: int
    ) -> tuple[F64, npt.NDArray[np.complex64]]:
        """:meth:`frames` of frames already cut, ``(frames, n_fft)``."""
        spec = self.spec
        out = np.empty((frames.shape[0], spec.n_mels), dtype=np.float64)
        low = np.empty((frames.shape[0], low_bins), dtype=np.complex64)
        # Blocks of frames keep the working set in cache; that is ~30 % faster
        # than one pass over the whole window.
        for start in range(0, frames.shape[0], _BLOCK_FRAMES):
            block = frames[start : start + _BLOCK_FRAMES]
            # float32 frames times the float64 window, as in librosa, so the
            # FFT runs in double precision and parity stays tight.
            spectrum = np.fft.rfft(block * self._window, axis=1)
            power = spectrum.real**2 + spectrum.imag**2
            # librosa applies the mel basis in float32 too.
            mel = power.astype(np.float32) @ self._mel_t
            out[start : start + block.shape[0]] = 10.0 * np.log10(np.maximum(mel, spec.amin))
            low[start : start + block.shape[0]] = spectrum[:, :low_bins]
        return out, low

    def mfcc_from_log_mel(self, log_mel: F64) -> F32:
        """MFCCs ``(n_mfcc, frames)`` from time-major dB mel frames.

        The top_db clip is relative to the maximum of the whole input, as in
        librosa, so a frame's value depends on every other frame passed here.
        """
        if log_mel.shape[0] == 0:
            return np.zeros((self.spec.n_mfcc, 0), dtype=np.float32)
        floor = max(float(log_mel.max()) - self.spec.top_db, self._log_amin)
        clipped = np.maximum(log_mel, floor)
        mfcc: F32 = (self._dct @ clipped.T).astype(np.float32)
        return mfcc

    def pad_signal(self, y: npt.NDArray[np.floating[Any]]) -> F64:
        """Zero-pad by n_fft/2 on both sides, as librosa's centred STFT does."""
        half = self.spec.n_fft // 2 if self.spec.center else 0
        out = np.zeros(y.shape[0] + 2 * half, dtype=np.float64)
        out[half : half + y.shape[0]] = y
        return out

    def mfcc(self, y: npt.NDArray[np.floating[Any]]) -> F32:
        """``librosa.feature.mfcc(y, sr, n_mfcc)`` for mono audio at the spec's rate."""
        samples = _as_mono_float(y)
        return self.mfcc_from_log_mel(self.log_mel(self.pad_signal(samples)))

    def model_input(self, y: npt.NDArray[np.floating[Any]]) -> F32:
        """The reference service's model input ``(n_mfcc, n_frames)``: MFCCs padded and cut."""
        return fit_frames(self.mfcc(y), self.spec)

    @property
    def window_samples(self) -> int:
        """Samples of one model window: the reference service's 10 s clip, as long as it
        gives the frames the model takes (431 at 22.05 kHz, hop 512)."""
        spec = self.spec
        longest = (spec.n_frames - spec.pad_columns) * spec.hop_length - 1
        return min(round(CLIP_S * spec.sample_rate_hz), longest)

    def interior(self, n_frames: int) -> slice:
        """The frames of a window whose STFT sees no padding (centred frames)."""
        half = self.spec.n_fft // 2 if self.spec.center else 0
        left = -(-half // self.spec.hop_length)
        return slice(left, n_frames - left)

    def analyse(self, y: npt.NDArray[np.floating[Any]]) -> WindowFeatures:
        """One window's features from a clip: its first window's worth, a short clip looped.

        The same arithmetic as each streaming window (:meth:`window_features`).
        """
        samples = _as_mono_float(y)
        n = self.window_samples
        real_s = samples.shape[0] / self.spec.sample_rate_hz
        repeated = 0 < samples.shape[0] < n
        window = loop_fill(samples, n, self.spec.sample_rate_hz) if repeated else samples[:n]
        if window.shape[0] < n:  # empty input
            window = np.zeros(n, dtype=np.float32)
        log_mel, low = self.frames(self.pad_signal(window), LOW_BINS)
        features = self.window_features(log_mel, low[self.interior(len(low))], window)
        if repeated:
            q = features.quality
            quality = Quality(
                min(q.valid_s, real_s), q.dead_frames, q.clipped_fraction, True, q.level_steps_db
            )
            features = WindowFeatures(features.mfcc, features.signature, quality, features.log_mel)
        return features

    def window_features(
        self,
        log_mel: F64,
        low_interior: npt.NDArray[np.complex64],
        samples: npt.NDArray[np.floating[Any]],
    ) -> WindowFeatures:
        """Features of one window from its frames (log-mel of every frame, low STFT bins of
        the interior ones) and its samples."""
        repaired, n_dead = repair_dead_frames(log_mel)
        steps = level_steps(repaired)
        first_interior = self.interior(log_mel.shape[0]).start
        repaired, low_interior = undo_level_steps(repaired, low_interior, first_interior, steps)
        mfcc = fit_frames(self.mfcc_from_log_mel(repaired), self.spec)
        physics = self._physics.get(low_interior.shape[0])
        if physics is None:
            spec = self.spec
            physics = PhysicsExtractor(
                spec.sample_rate_hz,
                spec.n_fft,
                spec.hop_length,
                self._mel_centres_hz,
                low_interior.shape[0],
            )
            self._physics[low_interior.shape[0]] = physics
        signature = physics.signature(low_interior, repaired)
        frame_s = self.spec.hop_length / self.spec.sample_rate_hz
        clipped = 0.0
        # Two reductions tell most windows have no clipped sample without an |x| copy.
        if samples.size and max(float(samples.max()), -float(samples.min())) >= CLIPPED_LEVEL:
            clipped = float(np.count_nonzero(np.abs(samples) >= CLIPPED_LEVEL)) / samples.shape[0]
        quality = Quality(
            valid_s=round((log_mel.shape[0] - n_dead) * frame_s, 3),
            dead_frames=n_dead,
            clipped_fraction=round(clipped, 5),
            level_steps_db=tuple(round(j, 1) for _, j in steps),
        )
        return WindowFeatures(mfcc, signature, quality, repaired)


# -- one window's features -----------------------------------------------------

#: The reference service's clips were 10 s long: a window is that much audio.
CLIP_S = 10.0

#: A frame is dead (a dropout, digital silence, the fill after a short clip)
#: when its loudest mel band is below this, or this far below the window's
#: median frame.
DEAD_FRAME_DBFS = -95.0
DEAD_FRAME_BELOW_MEDIAN_DB = 50.0
#: A sample at or above this magnitude counts as clipped (resampling rings a
#: clipped plateau a little below full scale).
CLIPPED_LEVEL = 0.95
#: Below this much usable audio a window has no verdict.
MIN_VALID_S = 3.0
#: Above this share of clipped samples a window has no verdict.
MAX_CLIPPED_FRACTION = 0.02


@dataclass(frozen=True)
class Quality:
    """How much of a window is usable audio.

    ``valid_s``: seconds of audio that is neither dead (dropout, silence,
    the fill after a short clip) nor missing; ``repeated``: a short clip was
    looped to fill the window.
    """

    valid_s: float
    dead_frames: int
    clipped_fraction: float
    repeated: bool = False
    level_steps_db: tuple[float, ...] = ()  # gain changes taken out of the window

    @property
    def problem(self) -> str | None:
        """Why the window cannot be judged, or None."""
        if self.valid_s < MIN_VALID_S:
            return f"only {self.valid_s:.1f} s of usable audio (at least {MIN_VALID_S:g} s needed)"
        if self.clipped_fraction > MAX_CLIPPED_FRACTION:
            return f"{100 * self.clipped_fraction:.1f} % of the samples are clipped"
        return None


@dataclass(frozen=True)
class WindowFeatures:
    """Everything the model sees of one window: MFCCs, the physics, and its quality.

    ``log_mel`` is the window's log-mel frames (dB, dead frames repaired and
    level steps undone) that the MFCCs came from: the per-unit baseline reads
    its robust spectrum from them. Empty when a caller has none.
    """

    mfcc: F32 = field(repr=False)
    signature: Signature
    quality: Quality
    log_mel: F64 = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    @property
    def physics(self) -> F32:
        return self.signature.vector()


def repair_dead_frames(log_mel: F64) -> tuple[F64, int]:
    """Dead frames replaced by the window's live frames, in order, repeated as needed.

    A dropout or the silence after a short clip is not the machine: its
    frames would read as a sudden collapse of every band. Returns the
    frames and how many were dead (all live: unchanged, no copy).
    """
    level = log_mel.max(axis=1)
    floor = max(DEAD_FRAME_DBFS, float(np.median(level)) - DEAD_FRAME_BELOW_MEDIAN_DB)
    dead = level < floor
    n_dead = int(dead.sum())
    if n_dead == 0 or n_dead == len(level):
        return log_mel, n_dead
    live = np.flatnonzero(~dead)
    out = log_mel.copy()
    out[dead] = log_mel[live[np.arange(n_dead) % live.size]]
    return out, n_dead


#: A level step is a gain change: this big (dB), with the loud bands' jumps no
#: more spread than at an ordinary frame boundary, times this (a change of
#: the machine's sound moves bands unalike).
LEVEL_STEP_MIN_DB = 3.0
LEVEL_STEP_SPREAD = 1.6
MAX_LEVEL_STEPS = 2


def level_steps(log_mel: F64) -> list[tuple[int, float]]:
    """Abrupt changes of every band alike: someone touched the gain, not the machine.

    Returns ``(first frame after the step, jump in dB)``, at most
    :data:`MAX_LEVEL_STEPS`. A step is the largest jump between the mean of
    three frames before and three after a boundary (two frames either side
    left out: the STFT window smears an instant over them), at least
    :data:`LEVEL_STEP_MIN_DB`, with the loud bands moving alike (their jumps
    spread no more than at an ordinary boundary), standing out from the
    window's ordinary frame-to-frame movement.
    """
    n = log_mel.shape[0]
    # The first and last two frames reach into the window's zero padding.
    first, last = 2, n - 2
    if last - first < 20:
        return []
    window = log_mel[first:last]
    m = window.shape[0]
    band_mean = window.mean(axis=0)
    loud = band_mean > band_mean.max() - 50.0
    # Only the loud bands enter any measure below (a copy: steps are taken out of it).
    work = window[:, loud]
    # At least 15 frames (0.35 s) either side: a step is told by what lasts.
    t = np.arange(15, m - 15)
    steps: list[tuple[int, float]] = []
    for _ in range(MAX_LEVEL_STEPS):
        level = work.mean(axis=1)
        # The loud bands' mean jump (three frames after minus three before,
        # two either side left out) is the jump of their mean level: one
        # prefix sum over frames instead of one per band.
        c = np.empty(m + 1)
        c[0] = 0.0
        np.cumsum(level, out=c[1:])
        jumps = ((c[20 : m - 10] - c[17 : m - 13]) - (c[13 : m - 17] - c[10 : m - 20])) / 3.0
        k = int(np.argmax(np.abs(jumps)))
        jump, at = float(jumps[k]), int(t[k])
        if abs(jump) < LEVEL_STEP_MIN_DB:
            break
        # Each band's jump, for their spread: sums of three frames.
        threes = work[:-2] + work[1:-1] + work[2:]
        spread = ((threes[17 : m - 13] - threes[10 : m - 20]) / 3.0).std(axis=1)
        # A gain change stays: everything after differs from everything before
        # by about the jump, where an event's level comes back down.
        lasting = float(level[at + 2 :].mean() - level[: at - 2].mean())
        if (
            spread[k] > LEVEL_STEP_SPREAD * float(np.median(spread))
            or abs(jump) < 4.0 * float(np.median(np.abs(jumps)))
            or lasting * jump <= 0
            or abs(lasting) < 0.6 * abs(jump)
        ):
            break
        steps.append((at + first, jump))
        work[at:] -= jump
    return sorted(steps)


def undo_level_steps(
    log_mel: F64,
    low: npt.NDArray[np.complex64],
    low_first_frame: int,
    steps: list[tuple[int, float]],
) -> tuple[F64, npt.NDArray[np.complex64]]:
    """The frames as if the gain had not moved (later frames brought back by each jump)."""
    if not steps:
        return log_mel, low
    mel = log_mel.copy()
    bins = low.copy()
    for at, jump in steps:
        mel[at:] -= jump
        start = max(0, at - low_first_frame)
        bins[start:] *= np.float32(10.0 ** (-jump / 20.0))
    return mel, bins


def loop_fill(y: npt.NDArray[np.floating[Any]], n: int, sample_rate_hz: int) -> F32:
    """A short clip repeated to ``n`` samples, each join crossfaded over 20 ms."""
    y = np.asarray(y, dtype=np.float32)
    if y.size >= n:
        return y[:n]
    fade = min(y.size // 4, round(0.02 * sample_rate_hz))
    if fade < 1:
        return np.resize(y, n).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    period = y[fade:].copy()
    period[-fade:] = y[-fade:] * (1.0 - ramp) + y[:fade] * ramp
    body = np.concatenate([y[:fade], np.resize(period, n - fade)])
    return body[:n].astype(np.float32)


def fit_frames(mfcc: F32, spec: FeatureSpec) -> F32:
    """Append ``pad_columns`` zero columns, then cut or zero-fill to ``n_frames``.

    This is what the reference service's ``prediction.py`` did; a 10 s clip at 22.05 kHz
    gives 431 frames, so 431 + 2 = 433 exactly.
    """
    n_mfcc, frames = mfcc.shape
    out = np.zeros((n_mfcc, spec.n_frames), dtype=np.float32)
    keep = min(frames, spec.n_frames)
    out[:, :keep] = mfcc[:, :keep]
    return out


def _as_mono_float(y: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    if y.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.floating):
        raise TypeError(f"expected floating-point samples, got {y.dtype}")
    return y
