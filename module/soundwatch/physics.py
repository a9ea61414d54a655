"""Rotating-machine features from the same STFT as the MFCCs, in numpy alone.

MFCCs at 43 frames per second describe the spectral envelope; they cannot see
a modulation at the shaft rate (20–24 Hz sits at the frame rate's Nyquist
limit) and place tones only to within a 10.8 Hz bin. The fan's physics lives
exactly there: the blade-pass comb at 7·f_r, the sidebands at BPF ± f_r that
imbalance puts on it, the mains hum lines, a speed that moves with a fault.

So the low STFT bins of a window's frames are turned into a **fine spectrum**
(0.2 Hz resolution up to 775 Hz) without another transform of the audio: each
bin's frames form a slow complex signal around the bin's centre frequency;
demodulated and transformed over the frames it resolves ±5.4 Hz around that
centre, and the central slices of neighbouring bins tile the axis. The two
halves of the window are transformed separately and their powers averaged
(Welch), which halves the noise's spread for the same cost.

From that spectrum and the log-mel frames a short :class:`Signature` is read:
the shaft rate, how clear the blade-pass comb is, the shaft line, the
imbalance sidebands, each hum harmonic, a whistle and slow surging. All are
level-free (dB over a local floor, or dB re another line), so loudness and
microphone gain never enter. The same code runs for training, for whole clips
and for each streaming window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
C64 = npt.NDArray[np.complex64]

BLADES: Final = 7
MAINS_HZ: Final = 50.0
HUM_HARMONICS: Final = 7
#: Shaft rates searched (Hz): the stated 20–24 Hz, every voltage change and a margin.
SHAFT_RANGE_HZ: Final = (12.0, 36.0)
#: STFT bins kept per frame for the fine spectrum (72 × 10.77 Hz = 775 Hz).
LOW_BINS: Final = 72
#: Whistle band (Hz), a little wider than the stated 1.2–3 kHz.
WHISTLE_HZ: Final = (1100.0, 3300.0)
#: Surging band (Hz), a little wider than the stated 0.3–2 Hz.
SURGE_HZ: Final = (0.25, 2.4)
#: Band edges of the baseline's spectra: 1/12 octave from 15 to 760 Hz; 24
#: log-spaced bands of level modulation from 0.3 to 20 Hz.
LOW_BAND_EDGES_HZ: Final = 15.0 * 2.0 ** (np.arange(0, 12 * math.log2(760 / 15) + 1) / 12)
MODULATION_EDGES_HZ: Final = np.geomspace(0.3, 20.0, 25)
#: Mel band groups whose level envelopes are compared (surging, imbalance).
ENVELOPE_GROUPS: Final = 16
#: The envelope measures take the k-th strongest group: a whole-sound
#: modulation shows wherever the machine rises above the background, while a
#: beeper or a truck moves at most a few groups.
ENVELOPE_RANK: Final = 4

_COMB_WEIGHTS: Final = np.array([1.0, 0.8, 0.6, 0.4])
#: Bumped whenever a feature's definition changes: a bundle records the
#: version its model was trained on and is refused by any other.
PHYSICS_VERSION: Final = 1

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "shaft_hz",
    "comb_db",
    "bpf_db",
    "shaft_db",
    "shaft_re_bpf_db",
    "sideband_db",
    "sideband_re_bpf_db",
    *(f"hum{h}_db" for h in range(1, HUM_HARMONICS + 1)),
    "hum2_re_hum1_db",
    "hum3_re_hum1_db",
    "whistle_db",
    "surge_pct",
    "surge_re_other_db",
    "surge_peak_db",
    "am_shaft_db",
    "tonality_db",
)


@dataclass(frozen=True)
class Signature:
    """The physics of one window: named values, the model's input vector, and two
    short spectra for the per-unit baseline.

    ``low``: the fine spectrum in 1/12-octave bands from 15 to 760 Hz, dB re
    its own mean (the shape of the machine's lines and floor, not its level).
    ``modulation``: how fast the whole sound's level moves, 0.3–20 Hz in
    24 log-spaced bands, dB (the median over band groups).
    """

    values: dict[str, float]
    low: F32 = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    modulation: F32 = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)

    @property
    def shaft_hz(self) -> float:
        return self.values["shaft_hz"]

    def vector(self) -> F32:
        return np.asarray([self.values[n] for n in FEATURE_NAMES], dtype=np.float32)


class PhysicsExtractor:
    """Computes :class:`Signature` values from a window's STFT frames.

    ``n_frames`` interior frames of ``LOW_BINS`` complex bins, and the
    window's log-mel frames. The zoom needs hop = n_fft / 4 (librosa's
    default), so that each bin's slice is a whole number of fine bins.
    """

    def __init__(
        self,
        sample_rate_hz: int,
        n_fft: int,
        hop_length: int,
        mel_centres_hz: F64,
        n_frames: int,
    ) -> None:
        if n_fft != 4 * hop_length:
            raise ValueError("the fine spectrum needs hop_length = n_fft / 4")
        if n_frames < 64:
            raise ValueError(f"the fine spectrum needs at least 64 frames, got {n_frames}")
        self.n_frames = n_frames
        self.frame_rate_hz = sample_rate_hz / hop_length
        self._half_frames = n_frames // 2
        self.n_zoom = _fast_multiple_of_4(self._half_frames)
        self.per_bin = self.n_zoom // 4
        self.fine_hz = self.frame_rate_hz / self.n_zoom
        half = self.per_bin // 2
        self._rows = (np.arange(-half, self.per_bin - half) % self.n_zoom).astype(np.intp)
        m = np.arange(self._half_frames)[:, None]
        k = np.arange(LOW_BINS)[None, :]
        window = np.hanning(self._half_frames + 2)[1:-1][:, None]
        window /= math.sqrt(float(np.square(window).sum()))
        # Bin k turns by k/4 of a cycle per frame at its centre frequency.
        self._demod = (window * np.exp(-0.5j * np.pi * ((k * m) % 4))).astype(np.complex64)
        # The STFT window's gain across a slice (−1.4 dB at its edges) is divided out.
        offsets = np.arange(-half, self.per_bin - half) * self.fine_hz
        n = np.arange(n_fft)
        hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
        response = np.abs(np.exp(-2j * np.pi * np.outer(offsets, n) / sample_rate_hz) @ hann)
        self._slice_gain = (response / response.max()) ** -2
        self._offset = half
        self._floor_bins = max(3, round(4.0 / self.fine_hz))
        self._whistle_bands = np.flatnonzero(
            (mel_centres_hz >= WHISTLE_HZ[0]) & (mel_centres_hz <= WHISTLE_HZ[1])
        )
        # A coarse grid is enough: the search matches each line within ±1 %.
        self._candidates = np.arange(SHAFT_RANGE_HZ[0], SHAFT_RANGE_HZ[1], 0.05)
        # Fine bins where each 1/12-octave band of the baseline's spectrum starts;
        # every band holds at least one bin.
        edges = np.round(LOW_BAND_EDGES_HZ / self.fine_hz + half).astype(np.intp)
        self._low_edges = np.unique(np.maximum(edges, np.arange(edges.size) + edges[0]))
        n_fine = self.per_bin * LOW_BINS
        freqs = (np.arange(n_fine) - half) * self.fine_hz
        self._top_hz = float(freqs[-1])
        # Mains lines are exact: masking only their core (±0.3 Hz) from the comb
        # search leaves a jittered blade-pass line that sits on one visible.
        self._hum_core = np.zeros(n_fine, dtype=bool)
        for h in range(1, int(self._top_hz // MAINS_HZ) + 1):
            self._hum_core |= np.abs(freqs - MAINS_HZ * h) <= 0.3
        # Smoothing half-width: ±0.4 % of frequency, a jittered line's width;
        # the floor: a running mean over ±4 Hz. Both as prefix-sum index pairs.
        i = np.arange(n_fine)
        half_smooth = np.clip(np.round(0.004 * np.abs(freqs) / self.fine_hz), 1, 40).astype(np.intp)
        self._smooth_lo = np.maximum(i - half_smooth, 0)
        self._smooth_hi = np.minimum(i + half_smooth + 1, n_fine)
        self._floor_lo = np.maximum(i - self._floor_bins, 0)
        self._floor_hi = np.minimum(i + self._floor_bins + 1, n_fine)

    # -- the fine spectrum --------------------------------------------------

    def fine_power(self, low: C64) -> F64:
        """Power at ``fine_hz`` from ``(n_frames, LOW_BINS)`` STFT bins (Welch, 2 halves)."""
        if low.shape != (self.n_frames, LOW_BINS):
            raise ValueError(f"expected STFT bins {(self.n_frames, LOW_BINS)}, got {low.shape}")
        h = self._half_frames
        halves = np.stack([low[:h], low[h : 2 * h]]) * self._demod
        zoom = np.fft.fft(halves, n=self.n_zoom, axis=1)[:, self._rows]  # (2, per_bin, bins)
        power = (zoom.real.astype(np.float64) ** 2 + zoom.imag.astype(np.float64) ** 2).mean(axis=0)
        power *= self._slice_gain[:, None]
        out: F64 = power.T.reshape(-1)
        return out

    # -- the signature ------------------------------------------------------

    def signature(self, low: C64, log_mel: F64) -> Signature:
        """All features of one window from its interior frames' low bins and its log-mel frames."""
        power = self.fine_power(low)
        lines = _Lines(power, self)
        values = self._comb(lines)
        values.update(self._lines(lines, values["shaft_hz"]))
        values["whistle_db"] = self._whistle(log_mel)
        envelope, modulation = self._envelope(log_mel, values["shaft_hz"])
        values.update(envelope)
        values["tonality_db"] = lines.tonality(values["shaft_hz"])
        return Signature(values, self._low_bands(power), modulation)

    def _low_bands(self, power: F64) -> F32:
        bands = np.add.reduceat(power, self._low_edges)[:-1] / np.diff(self._low_edges)
        level = 10.0 * np.log10(bands + 1e-30)
        out: F32 = (level - level.mean()).astype(np.float32)
        return out

    def _comb(self, lines: _Lines) -> dict[str, float]:
        """The shaft rate whose blade-pass comb (7, 14, 21, 28 × f_r) stands out most.

        Hum cores are masked from the search (at f_r = 100/7 Hz the comb
        would land on hum harmonics). A half-rate candidate fits the even
        harmonics too; it is replaced by twice itself when its odd
        harmonics are not there.
        """
        best = float(self._candidates[int(np.argmax(self._score(lines, self._candidates)))])
        shaft = self._refine(lines, best)
        if 2 * shaft <= SHAFT_RANGE_HZ[1]:
            heights = lines.line_db(BLADES * shaft * np.arange(1.0, 5.0), comb=True)
            odd, even = float(heights[0::2].mean()), float(heights[1::2].mean())
            if odd < 3.0 and even > odd + 3.0:
                shaft = self._refine(lines, 2 * shaft)
        return {"shaft_hz": shaft, "comb_db": float(self._score(lines, np.array([shaft]))[0])}

    def _refine(self, lines: _Lines, around: float) -> float:
        """The best rate near ``around``, by the comb's height exactly at each candidate
        (within ±1 % every candidate would see the same peaks: a tie, and a bias)."""
        # The coarse search matches within ±1 %: look that far either side.
        fine = np.arange(around * 0.985, around * 1.015, 0.0025)
        return float(fine[int(np.argmax(self._score(lines, fine, exact=True)))])

    def _score(self, lines: _Lines, shaft: F64, exact: bool = False) -> F64:
        """How well a blade-pass comb at each candidate shaft rate fits (dB, weighted mean).

        Each line's height is capped at 10 dB so one strong unrelated tone
        cannot outweigh a whole comb, and lower harmonics count more: the
        stated comb weakens with each harmonic.
        """
        f = BLADES * np.arange(1.0, 5.0)[:, None] * shaft[None, :]
        weight = np.where(f + _tol(f).reshape(f.shape) < self._top_hz, _COMB_WEIGHTS[:, None], 0.0)
        tol = np.zeros(f.size) if exact else None
        heights = np.minimum(lines.line_db(f.reshape(-1), tol, comb=True).reshape(f.shape), 10.0)
        out: F64 = (weight * heights).sum(axis=0) / np.maximum(weight.sum(axis=0), 1e-9)
        return out

    def _lines(self, lines: _Lines, shaft: float) -> dict[str, float]:
        """Shaft line, sidebands and hum, measured against the comb at ``shaft``.

        A hum harmonic with a shaft-locked line on it reads 0 (not measurable).
        """
        bpf = BLADES * shaft
        hum = MAINS_HZ * np.arange(1.0, HUM_HARMONICS + 1)
        # shaft, bpf, 2bpf, 3bpf, the sidebands k·bpf ∓ f (k = 1..3), then the hum lines
        carriers = bpf * np.arange(1.0, 4.0)
        sides = np.stack([carriers - shaft, carriers + shaft], axis=1).ravel()
        f = np.concatenate([[shaft], carriers, sides, hum])
        n_locked = 4 + sides.size
        tol = np.concatenate([_tol(f[:n_locked]), np.full(hum.size, 0.3)])
        height = lines.line_db(f, tol)
        excess = np.array([_db(float(e)) for e in lines.excess(f, tol)])
        side_heights = height[4:n_locked].reshape(3, 2).max(axis=1)
        side_re = [
            _db(10 ** (excess[4 + 2 * k] / 10) + 10 ** (excess[5 + 2 * k] / 10)) - excess[1 + k]
            for k in range(3)
        ]
        locked = np.concatenate(
            [
                [shaft],
                (bpf * np.arange(1.0, 5.0))[:, None] + np.array([-shaft, 0.0, shaft])[None, :],
            ],
            axis=None,
        )
        out = {
            "bpf_db": float(height[1]),
            "shaft_db": float(height[0]),
            "shaft_re_bpf_db": float(np.clip(excess[0] - excess[1], -60.0, 30.0)),
            "sideband_db": float(np.mean(side_heights)),
            "sideband_re_bpf_db": float(np.clip(np.mean(side_re), -60.0, 30.0)),
        }
        for h, fh in enumerate(hum, start=1):
            clash = bool(np.any(np.abs(fh - locked) < np.maximum(1.5, 0.01 * locked)))
            out[f"hum{h}_db"] = (
                0.0 if clash else float(np.clip(height[n_locked + h - 1], 0.0, 50.0))
            )
        hum_excess = excess[n_locked:]
        out["hum2_re_hum1_db"] = float(np.clip(hum_excess[1] - hum_excess[0], -40.0, 40.0))
        out["hum3_re_hum1_db"] = float(np.clip(hum_excess[2] - hum_excess[0], -40.0, 40.0))
        return out

    def _whistle(self, log_mel: F64) -> float:
        """Height of the most prominent mel band in the whistle range over its neighbours.

        On each band's 30th percentile over time, so that what sounds less
        than 70 % of the window (a beeper's on/off, a knock) cannot raise it.
        Neighbours are 3–5 bands away: adjacent mel triangles overlap.
        """
        lo, hi = int(self._whistle_bands[0]) - 5, int(self._whistle_bands[-1]) + 6
        part = log_mel[:, lo:hi]
        q = int(0.3 * part.shape[0])
        steady = np.partition(part, q, axis=0)[q]
        centre = steady[5:-5]
        sides = (
            steady[:-10] + steady[1:-9] + steady[2:-8] + steady[8:-2] + steady[9:-1] + steady[10:]
        ) / 6
        return float(np.clip(np.max(centre - sides), 0.0, 30.0))

    def _envelope(self, log_mel: F64, shaft_hz: float) -> tuple[dict[str, float], F32]:
        """How the whole sound's level moves: slow surging, and breathing at the shaft rate.

        Per group of mel bands, the level (dB) over the window's frames is
        transformed. Surging (0.25–2.4 Hz) and the once-per-revolution
        modulation of imbalance move every band the machine dominates; a
        beeper or a truck moves a few, so the measure is the
        :data:`ENVELOPE_RANK`-th strongest group, not the strongest.
        The STFT window smooths the level over 93 ms, which at the shaft rate
        (20–24 Hz, near the 21.5 Hz Nyquist limit of 43 frames per second,
        so it may appear mirrored) leaves roughly a sixth of the modulation:
        too little for the MFCCs, but a clear line over 10 s.
        """
        n = log_mel.shape[0]
        groups = log_mel.reshape(n, ENVELOPE_GROUPS, -1).mean(axis=2)
        envelope = groups - groups.mean(axis=0)
        window = np.hanning(n)[:, None]
        size = 1 << (n - 1).bit_length()
        spectrum = np.abs(np.fft.rfft(envelope * window, n=size, axis=0)) * (2.0 / window.sum())
        freqs = np.fft.rfftfreq(size, 1.0 / self.frame_rate_hz)
        band = (freqs >= SURGE_HZ[0]) & (freqs <= SURGE_HZ[1])
        other = (freqs > 3.0) & (freqs <= 10.0)
        peaks = spectrum[band].max(axis=0)
        depth_db = _ranked(peaks)
        ref_db = _ranked(np.sqrt(np.mean(spectrum[other] ** 2, axis=0)))
        # A surge is one steady rate: a line among its neighbours, where a
        # level that wanders or flutters spreads over the whole band.
        spread = np.sqrt(np.mean(spectrum[band] ** 2, axis=0))
        peakiness = _ranked(peaks / np.maximum(spread, 1e-12))
        nyquist = self.frame_rate_hz / 2
        alias = shaft_hz if shaft_hz <= nyquist else self.frame_rate_hz - shaft_hz
        near = np.abs(freqs - alias) <= max(0.15, 0.01 * shaft_hz)
        around = (np.abs(freqs - alias) > 0.6) & (freqs >= 5.0) & (freqs < nyquist - 0.2)
        floors = np.sqrt(np.mean(spectrum[around] ** 2, axis=0))
        lines = spectrum[near].max(axis=0) if near.any() else np.zeros(floors.size)
        am = _ranked(lines / np.maximum(floors, 1e-9))
        edges = np.searchsorted(freqs, MODULATION_EDGES_HZ)
        per_band = np.add.reduceat(spectrum, edges, axis=0)[:-1] / np.diff(edges)[:, None]
        modulation = (20.0 * np.log10(np.median(per_band, axis=1) + 1e-9)).astype(np.float32)
        return {
            # Amplitude modulation of depth d moves the level by ±8.7·d dB.
            "surge_pct": float(np.clip(100.0 * depth_db / 8.69, 0.0, 100.0)),
            "surge_re_other_db": float(np.clip(_db20(depth_db / max(ref_db, 1e-9)), -20.0, 40.0)),
            "surge_peak_db": float(np.clip(_db20(peakiness), 0.0, 30.0)),
            "am_shaft_db": float(np.clip(_db20(am), -20.0, 40.0)),
        }, modulation


class _Lines:
    """Line measurements on one fine power spectrum.

    The floor is a running mean of log-power over ±4 Hz (twice, lines clipped
    out), turned back into mean power. ``line_db`` is the highest power,
    smoothed over a jittered line's width, over the floor within ±1 % of a
    frequency: 0–3 dB for noise alone, and alike for sharp and smeared lines.
    """

    def __init__(self, power: F64, px: PhysicsExtractor) -> None:
        self._px = px
        level = 10.0 * np.log10(power + 1e-30)
        lo, hi = px._floor_lo, px._floor_hi
        floor_db = _window_mean(level, lo, hi)
        floor_db = _window_mean(np.minimum(level, floor_db + 3.0), lo, hi)
        # The mean of log-power of noise sits 2.5 dB below its mean power.
        floor = 10.0 ** ((floor_db + 2.507) / 10.0)
        self._cp = np.concatenate([[0.0], np.cumsum(power)])
        self._cf = np.concatenate([[0.0], np.cumsum(floor)])
        comb_power = np.where(px._hum_core, floor, power)
        cc = np.concatenate([[0.0], np.cumsum(comb_power)])
        lo, hi = px._smooth_lo, px._smooth_hi
        width_floor = (hi - lo) * floor
        self._smooth = (self._cp[hi] - self._cp[lo]) / width_floor
        self._smooth_comb = (cc[hi] - cc[lo]) / width_floor

    def _range(
        self, f: F64 | float, tol: F64 | None
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        centre = np.atleast_1d(np.asarray(f, dtype=np.float64))
        tol = _tol(centre) if tol is None else tol
        n = self._smooth.size
        fine, offset = self._px.fine_hz, self._px._offset
        lo = np.clip(np.floor((centre - tol) / fine) + offset, 0, n - 1).astype(np.intp)
        hi = np.clip(np.ceil((centre + tol) / fine) + offset + 1, 1, n).astype(np.intp)
        return lo, np.maximum(hi, lo + 1)

    def line_db(self, f: F64 | float, tol: F64 | None = None, comb: bool = False) -> F64:
        values = self._smooth_comb if comb else self._smooth
        if tol is not None and not np.any(tol):
            # Exactly at f: the nearest fine bin (the smoothing gives it the line's width).
            centre = np.atleast_1d(np.asarray(f, dtype=np.float64))
            idx = np.clip(
                np.round(centre / self._px.fine_hz).astype(np.intp) + self._px._offset,
                0,
                values.size - 1,
            )
            exact: F64 = 10.0 * np.log10(np.maximum(values[idx], 1e-3))
            return exact
        lo, hi = self._range(f, tol)
        idx = np.empty(2 * lo.size, dtype=np.intp)
        idx[0::2], idx[1::2] = lo, hi
        # reduceat over (lo, hi) pairs: the maxima of arbitrary, overlapping ranges.
        peak = np.maximum.reduceat(np.append(values, 0.0), idx)[0::2]
        out: F64 = 10.0 * np.log10(np.maximum(peak, 1e-3))
        return out

    def excess(self, f: F64 | float, tol: F64 | None = None) -> F64:
        """Power within ``f ± tol`` above the floor (linear, never below a tiny value)."""
        lo, hi = self._range(f, tol)
        out: F64 = np.maximum((self._cp[hi] - self._cp[lo]) - (self._cf[hi] - self._cf[lo]), 1e-30)
        return out

    def tonality(self, shaft_hz: float) -> float:
        """Share of the 30–770 Hz power in the shaft-locked comb (dB)."""
        lo, _ = self._range(30.0, np.zeros(1))
        _, hi = self._range(self._px._top_hz - 5.0, np.zeros(1))
        total = float(self._cp[hi[0]] - self._cp[lo[0]])
        f = np.array([shaft_hz, *(k * BLADES * shaft_hz for k in range(1, 5))])
        f = f[f + _tol(f) < self._px._top_hz]
        return float(np.clip(_db(float(self.excess(f).sum())) - _db(total), -40.0, 0.0))


def _ranked(values: F64) -> float:
    """The :data:`ENVELOPE_RANK`-th largest value."""
    return float(np.partition(values, -ENVELOPE_RANK)[-ENVELOPE_RANK])


def _db20(x: float) -> float:
    return 20.0 * math.log10(max(x, 1e-30))


def _db(x: float) -> float:
    return 10.0 * math.log10(max(x, 1e-30))


def _tol(f: F64 | float) -> F64:
    """Half-width around a shaft-locked line: speed jitter smears it over about ±1 %."""
    return np.maximum(0.3, 0.01 * np.atleast_1d(np.asarray(f, dtype=np.float64)))


def _fast_multiple_of_4(n: int) -> int:
    """The smallest multiple of 4 >= n whose other factors are 2, 3 or 5 (a fast FFT size)."""
    m = 4 * math.ceil(n / 4)
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 4


def _window_mean(x: F64, lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp]) -> F64:
    """Mean of ``x[lo[i]:hi[i]]`` for every ``i``, by prefix sums."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    out: F64 = (c[hi] - c[lo]) / (hi - lo)
    return out
