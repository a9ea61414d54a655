"""Signal-processing pieces the simulator is built from.

Everything that colours or reverberates sound here is a FIR filter run by one
streaming overlap-add convolver (:class:`Fir`), so a clip rendered in one
piece and a stream rendered 0.5 s at a time go through the same arithmetic,
and noise is white noise through such a filter: stationary, seamless across
blocks and cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Default length of designed filters, in seconds: long enough to shape the
#: spectrum down to ~10 Hz, short enough to keep block convolutions cheap.
FILTER_S: Final = 0.128


def rng_for(*keys: int) -> np.random.Generator:
    """An independent random generator for the non-negative integer ``keys``."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def db_amp(db: float) -> float:
    """Linear amplitude factor of ``db`` decibels."""
    return float(10.0 ** (db / 20.0))


def db_pow(db: float) -> float:
    """Power ratio of ``db`` decibels."""
    return float(10.0 ** (db / 10.0))


def power(x: npt.NDArray[np.floating]) -> float:
    """Mean square, accumulated in float64."""
    return float(np.square(x, dtype=np.float64).mean()) if x.size else 0.0


def fast_len(n: int) -> int:
    """Smallest 2^a·3^b·5^c >= n (pocketfft is several times faster on such sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p2 = 1 << max(0, (-(-n // p35) - 1).bit_length())
            best = min(best, p2 * p35)
            p35 *= 3
        p5 *= 5
    return best


def phasor(cycles: F64) -> npt.NDArray[np.complex64]:
    """exp(2πi·cycles), reduced in float64 first so that long phases stay exact."""
    angle = ((cycles - np.floor(cycles)) * (2.0 * np.pi)).astype(np.float32)
    z = np.empty(angle.shape, dtype=np.complex64)
    z.real = np.cos(angle)
    z.imag = np.sin(angle)
    return z


def design_fir(magnitude_db: F64, n_taps: int) -> F64:
    """A linear-phase FIR whose gain follows ``magnitude_db`` on ``n_taps // 2 + 1`` bins.

    Frequency sampling with a Hann window: smooth responses (slopes, band
    limits, resonances of a few bins) come out within a fraction of a dB.
    """
    n_bins = n_taps // 2 + 1
    if magnitude_db.shape != (n_bins,):
        raise ValueError(f"magnitude has {magnitude_db.shape}, expected ({n_bins},)")
    impulse = np.fft.irfft(10.0 ** (magnitude_db / 20.0), n_taps)
    return np.asarray(np.roll(impulse, n_taps // 2) * np.hanning(n_taps + 1)[:n_taps], np.float64)


def bin_freqs(n_taps: int, sample_rate_hz: int) -> F64:
    """Bin centres in Hz of a filter designed with ``n_taps`` taps."""
    return np.asarray(np.fft.rfftfreq(n_taps, 1.0 / sample_rate_hz), np.float64)


def filter_taps(sample_rate_hz: int, seconds: float = FILTER_S) -> int:
    """An even tap count of about ``seconds``."""
    return 2 * max(16, round(seconds * sample_rate_hz / 2))


class Fir:
    """A streaming FIR filter: :meth:`process` blocks of any size, same output as one pass.

    Overlap-add with FFTs sized to the block; the tail past each block is kept
    and added to the next.
    """

    def __init__(self, taps: npt.NDArray[np.floating]) -> None:
        self.taps = np.asarray(taps, dtype=np.float64)
        self._tail: F64 = np.zeros(max(0, self.taps.size - 1))
        self._spectra: dict[int, npt.NDArray[np.complex128]] = {}

    def process(self, x: npt.NDArray[np.floating]) -> F32:
        n = x.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        n_fft = fast_len(n + self.taps.size - 1)
        spectrum = self._spectra.get(n_fft)
        if spectrum is None:
            if len(self._spectra) > 4:  # block sizes settle; never grow without bound
                self._spectra.clear()
            spectrum = self._spectra[n_fft] = np.fft.rfft(self.taps, n_fft)
        y = np.fft.irfft(np.fft.rfft(np.asarray(x, dtype=np.float64), n_fft) * spectrum, n_fft)
        y = y[: n + self.taps.size - 1]
        y[: self._tail.size] += self._tail  # y is never shorter than the tail
        self._tail = y[n:].copy()
        return y[:n].astype(np.float32)


class ColouredNoise:
    """Unit-power stationary noise with a given spectrum; any block sizes give the same samples.

    Overlap-added frames of Gaussian noise shaped in the frequency domain,
    each windowed by a sine window at 50 % overlap (power-complementary, so
    the sum is stationary with no seams). Frame ``k`` covers samples
    ``[k·hop, k·hop + frame)``; frames are drawn in order from one generator
    as reads move forward, so the samples never depend on read sizes. The
    spectrum is resolved to ``rate / frame`` Hz: long frames for narrow bands.
    """

    def __init__(self, key: Sequence[int], magnitude_db: F64, frame: int) -> None:
        if magnitude_db.shape != (frame // 2 + 1,):
            raise ValueError(f"magnitude has {magnitude_db.shape}, expected ({frame // 2 + 1},)")
        amplitude = 10.0 ** (magnitude_db / 20.0)
        amplitude[0] = 0.0
        # Complex Gaussian bins of unit variance per part give a frame of mean
        # square 4·sum(A²)/frame² (one-sided); the window halves it and the
        # overlap of two frames restores it.
        scale = frame / math.sqrt(4.0 * float(np.square(amplitude[1:]).sum()) or 1.0)
        self._amplitude = (amplitude * scale).astype(np.float32)
        self._window = np.sin(np.pi * (np.arange(frame) + 0.5) / frame).astype(np.float32)
        self._rng = rng_for(*key)
        self._frame = frame
        self._hop = frame // 2
        self._n = 0
        self._made = -2  # index of the last frame made
        self._bank: F32 = np.zeros((0, frame), dtype=np.float32)  # the latest frames made

    def _frames(self, first: int, last: int) -> F32:
        """Frames ``first..last`` (rows); new ones are made in one batch, in order."""
        count = last - self._made
        if count > 0:
            bins = self._rng.standard_normal((count, 2 * self._amplitude.size), dtype=np.float32)
            spectra = bins.view(np.complex64) * self._amplitude
            new = np.fft.irfft(spectra, self._frame, axis=1).astype(np.float32) * self._window
            self._bank = np.concatenate([self._bank, new])[-(last - first + 2) :]
            self._made = last
        return self._bank[
            len(self._bank) - (self._made - first + 1) : len(self._bank) - (self._made - last)
        ]

    def read(self, n: int) -> F32:
        s0, s1 = self._n, self._n + n
        self._n = s1
        out = np.zeros(n, dtype=np.float32)
        hop = self._hop
        first, last = s0 // hop - 1, (s1 - 1) // hop
        frames = self._frames(first, last)
        for i, k in enumerate(range(first, last + 1)):
            start = k * hop
            a, b = max(s0, start), min(s1, start + self._frame)
            if a < b:
                out[a - s0 : b - s0] += frames[i, a - start : b - start]
        return out


def noise_frame(sample_rate_hz: int, resolution_hz: float) -> int:
    """An even frame length (a power of two) resolving ``resolution_hz``."""
    return 1 << max(8, math.ceil(math.log2(sample_rate_hz / resolution_hz)))


def tilt_db(freqs_hz: F64, slope: float, corner_hz: float) -> F64:
    """Power response ∝ (f² + corner²)^(−slope/2) in dB (slope 1 pink, 2 brown)."""
    return -5.0 * slope * np.log10(freqs_hz**2 + corner_hz**2)


def highpass_db(freqs_hz: F64, corner_hz: float, order: int) -> F64:
    """Butterworth-like high-pass magnitude in dB."""
    ratio = np.maximum(freqs_hz, 1e-3) / corner_hz
    return -10.0 * np.log10(1.0 + ratio ** (-2 * order))


def lowpass_db(freqs_hz: F64, corner_hz: float, order: int) -> F64:
    """Butterworth-like low-pass magnitude in dB."""
    return -10.0 * np.log10(1.0 + (freqs_hz / corner_hz) ** (2 * order))


def bumps_db(freqs_hz: F64, bumps: Sequence[tuple[float, float, float]]) -> F64:
    """Smooth peaks/dips on a log-frequency axis: ``(centre_hz, gain_db, width_octaves)``."""
    out = np.zeros_like(freqs_hz)
    log_f = np.log2(np.maximum(freqs_hz, 1.0))
    for centre, gain, width in bumps:
        out += gain * np.exp(-0.5 * ((log_f - math.log2(centre)) / max(width, 1e-3)) ** 2)
    return out


def band_db(freqs_hz: F64, centre_hz: float, width_hz: float) -> F64:
    """A Gaussian band in dB (−3 dB full width ``width_hz``), floor −120 dB."""
    sigma = max(width_hz, 1e-3) / 2.3548
    return np.maximum(
        -120.0, 10.0 * np.log10(np.exp(-0.5 * ((freqs_hz - centre_hz) / sigma) ** 2) + 1e-12)
    )


class Smoothed:
    """A random control signal, smoothly interpolated: slow wander of speed or level.

    An AR(1) process drawn every ``step_s`` and linearly interpolated between
    draws; stationary with rms ``rms`` and correlation time ``tau_s``. Reads
    advance through time; their sizes never change the values.
    """

    def __init__(
        self, rng: np.random.Generator, rms: float, tau_s: float, sample_rate_hz: int, step_s: float
    ) -> None:
        self._rng = rng
        self._step = max(1, round(step_s * sample_rate_hz))
        self._rho = math.exp(-step_s / max(tau_s, 1e-6))
        self._innov = rms * math.sqrt(1.0 - self._rho * self._rho)
        self._points: list[float] = [float(rng.standard_normal() * rms)]
        self._first = 0  # control-point index of self._points[0]
        self._n = 0

    def read(self, n: int) -> F64:
        s0, s1 = self._n, self._n + n
        self._n = s1
        last = (s1 - 1) // self._step + 1
        need = last - (self._first + len(self._points) - 1)
        if need > 0:
            noise = self._rng.standard_normal(need) * self._innov
            value = self._points[-1]
            for e in noise:
                value = self._rho * value + float(e)
                self._points.append(value)
        first = s0 // self._step
        points = np.asarray(self._points[first - self._first : last - self._first + 1])
        out: F64 = np.interp(
            np.arange(s0, s1, dtype=np.float64), self._step * np.arange(first, last + 1), points
        )
        # Keep only the control points a later read can still need.
        keep = s1 // self._step
        self._points = self._points[keep - self._first :]
        self._first = keep
        return out


@dataclass(frozen=True)
class NoiseShape:
    """A broadband spectrum: tilt, band limits and smooth bumps (dB, octaves)."""

    slope: float  # power ∝ f^−slope above the knee (1 = pink)
    highpass_hz: float
    lowpass_hz: float
    bumps: tuple[tuple[float, float, float], ...] = ()
    knee_hz: float = 1.0  # flat below it

    def magnitude_db(self, freqs_hz: F64) -> F64:
        return (
            tilt_db(freqs_hz, self.slope, self.knee_hz)
            + highpass_db(freqs_hz, self.highpass_hz, 2)
            + lowpass_db(freqs_hz, self.lowpass_hz, 2)
            + bumps_db(freqs_hz, self.bumps)
        )
