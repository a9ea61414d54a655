"""A physics simulator of the reference fan line, in numpy alone.

MIMII cannot be downloaded here, so the default model is trained on this
simulation of the fan line described in ``fan-line.md``: a healthy 7-blade fan
(shaft tone, blade-pass harmonics, mains hum, pink-ish airflow noise) and its
three faults (imbalance, clogging, voltage change), recorded in a mildly
reverberant room over factory background noise at a random level.

Everything the description gives as a range is drawn uniformly from that range,
per unit (:func:`make_unit`) or per recording (:func:`draw_conditions`), so that
a model trained on this output learns the physics rather than one simulator's
constants. What the description leaves open is chosen here, and documented at
the place it is chosen (amplitude ratios of the tones, hum level, airflow
spectrum, background spectrum, the whistle's level and width).

Definitions that callers rely on:

* **SNR** is ``10·log10(P_machine / P_background)`` where ``P`` is the mean
  square over the returned recording, ``machine`` is the fan as heard at the
  microphone (room reverberation included) and ``background`` is the factory
  noise. Both parts are available from :func:`synth_parts` / :func:`render_parts`.
* **Level**: the mixture is scaled so that its absolute peak lands at a value
  drawn uniformly from −35…−6 dBFS, independent of the class.
* **Schedules**: one continuous recording whose fault state changes at exact
  sample boundaries; parameters then ramp linearly over :data:`TRANSITION_S`
  (20 ms) *after* the boundary, tones stay phase-continuous and the background
  is one continuous noise. Within one recording each fault class has one set of
  fault parameters (a recurring fault is the same fault). The machine sound is
  scaled to the same power in every segment, so every stretch has the local
  SNR a dataset clip of that class would have.
* **Determinism**: outputs are a pure function of the arguments on one numpy
  build; SIMD sin/cos may differ in the last float32 bit across CPUs.

The engine is numpy-only because it also runs on the device as a live audio
source (:class:`ScheduleStream`). A 10 s, 16 kHz clip takes ~15–20 ms of CPU;
a recording needs ~50 bytes of memory per sample while it renders.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BLADES",
    "CLASSES",
    "MAINS_HZ",
    "PEAK_DBFS_RANGE",
    "SNRS_DB",
    "TRANSITION_S",
    "BackgroundParams",
    "Conditions",
    "FaultParams",
    "Rendering",
    "RoomParams",
    "ScheduleStream",
    "Segment",
    "UnitParams",
    "draw_conditions",
    "make_unit",
    "render_parts",
    "render_schedule",
    "schedule_segments",
    "synth_clip",
    "synth_parts",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
C64 = npt.NDArray[np.complex64]
C128 = npt.NDArray[np.complex128]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("normal", "imbalance", "clogging", "voltage_change")
SNRS_DB: tuple[int, ...] = (-6, 0, 6)

BLADES: Final = 7
MAINS_HZ: Final = 50.0
PEAK_DBFS_RANGE: Final = (-35.0, -6.0)
TRANSITION_S: Final = 0.02
MIN_SAMPLE_RATE_HZ: Final = 8000
#: Highest hum harmonic any state uses (voltage change: "up to the 7th").
MAX_HUM_HARMONIC: Final = 7
#: Harmonics of BPF that are synthesised (1·BPF … 4·BPF).
BPF_HARMONICS: Final = 4

# Synthesis runs in blocks so that the complex phasors of a long recording
# never exist at full length (memory) and each block stays cache-resident.
_BLOCK: Final = 1 << 16
# Speed jitter is a smooth random wander; it is drawn at this control rate and
# interpolated, which is far cheaper than filtering per-sample noise.
_JITTER_CONTROL_S: Final = 0.05
# Spectral shapes up to this FFT size (a 16 s clip at 16 kHz) are cached.
_CACHE_MAX_FFT: Final = 1 << 18
# Probability that the factory background contains an unrelated machine tone.
_BACKGROUND_TONE_P: Final = 0.4
# Independent random streams per concern, so that e.g. adding a fault segment
# never changes the background noise drawn for the same seed.
_TAG_UNIT: Final = 0xF0
_TAG_CONDITIONS: Final = 0xF1
_TAG_PHASES: Final = 0xF2
_TAG_JITTER: Final = 0xF3
_TAG_AIRFLOW: Final = 0xF4
_TAG_WHISTLE: Final = 0xF5
_TAG_ROOM: Final = 0xF6
_TAG_BACKGROUND: Final = 0xF7
_TAG_STREAM: Final = 0xF8


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class UnitParams:
    """One fan unit's own healthy character; fixed for the unit's lifetime.

    Tone amplitudes are linear and relative to the blade-pass tone (BPF = 1).
    ``bpf_amps`` and ``hum_amps`` are strictly decreasing ("each weaker than
    the last"). Airflow noise power is ``airflow_db`` relative to the total
    power of the healthy tones, so it is "comparable in power to the tones".
    """

    unit_id: int
    shaft_hz: float
    shaft_amp: float
    bpf_amps: tuple[float, ...]
    hum_amps: tuple[float, ...]
    airflow_db: float
    airflow_slope: float
    airflow_highpass_hz: float
    airflow_lowpass_hz: float
    jitter_rms: float
    jitter_tau_s: float
    blades: int = BLADES

    @property
    def bpf_hz(self) -> float:
        """Nominal blade-pass frequency of the healthy unit."""
        return self.blades * self.shaft_hz

    @property
    def tone_power(self) -> float:
        """Mean square of the healthy tones (sum of A²/2)."""
        amps = (self.shaft_amp, *self.bpf_amps, *self.hum_amps)
        return float(sum(a * a for a in amps) / 2.0)

    @property
    def airflow_power(self) -> float:
        """Mean square of the healthy airflow noise."""
        return self.tone_power * _db_power(self.airflow_db)


@dataclass(frozen=True)
class FaultParams:
    """How each fault shows on this recording; all drawn within fan-line.md's ranges."""

    imbalance_shaft_gain: float  # shaft tone ×3–6
    imbalance_am_depth: float  # AM of the whole sound at f_r, 0.25–0.60
    clogging_speed: float  # ×1.05–1.15
    clogging_airflow_db: float  # −8…−3 dB
    clogging_surge_hz: float  # 0.3–2 Hz
    clogging_surge_depth: float  # 0.15–0.30
    clogging_whistle_hz: float  # centre, band kept inside 1.2–3 kHz
    clogging_whistle_bw_hz: float  # −3 dB width
    clogging_whistle_db: float  # whistle power re healthy airflow power
    voltage_speed: float  # ×0.65–0.80 or ×1.20–1.35
    voltage_hum2_gain: float  # 2nd hum harmonic ×
    voltage_hum3_gain: float  # 3rd hum harmonic ×
    voltage_hum_high: tuple[float, ...]  # 4th…7th hum harmonics re the hum fundamental

    def speed(self, fault: str) -> float:
        """Shaft speed of ``fault`` relative to the unit's nominal speed."""
        if fault == "clogging":
            return self.clogging_speed
        if fault == "voltage_change":
            return self.voltage_speed
        return 1.0


@dataclass(frozen=True)
class RoomParams:
    """Room between fan and microphone."""

    rt60_s: float  # 0.05–0.4 s
    drr_db: float  # direct-to-reverberant energy ratio, 3–15 dB
    predelay_s: float  # first reflection after the direct sound


@dataclass(frozen=True)
class BackgroundParams:
    """Factory background: noise with PSD ∝ (f² + corner²)^(−slope/2), plus maybe a tone."""

    slope: float  # 1 = pink, 2 = brown
    corner_hz: float  # keeps brown noise finite at DC
    tone_hz: float | None  # unrelated machine tone, 80–400 Hz, or None
    tone_db: float  # tone power re the background noise power
    tone_h2_db: float  # its 2nd harmonic re the tone


@dataclass(frozen=True)
class Conditions:
    """Everything drawn per recording (per clip, or per stream cycle)."""

    faults: FaultParams
    room: RoomParams
    background: BackgroundParams
    peak_dbfs: float


@dataclass(frozen=True)
class Segment:
    """One stretch of a schedule in samples: ``[start, stop)`` plays ``fault``."""

    fault: str
    start: int
    stop: int

    @property
    def n_samples(self) -> int:
        """Length in samples."""
        return self.stop - self.start


def _db_power(db: float) -> float:
    """Power ratio of ``db`` decibels."""
    return float(10.0 ** (db / 10.0))


def _rng(*keys: int) -> np.random.Generator:
    """An independent generator for the non-negative integer ``keys``."""
    return np.random.default_rng([int(k) for k in keys])


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _db(lo: float, hi: float, rng: np.random.Generator) -> float:
    """A linear amplitude factor drawn uniformly in dB."""
    return float(10.0 ** (rng.uniform(lo, hi) / 20.0))


def make_unit(unit_id: int, seed: int = 0) -> UnitParams:
    """The unit ``unit_id`` of the line made with ``seed``; deterministic in both.

    Choices the description leaves open (all uniform): healthy shaft tone
    −22…−14 dB re BPF (a balanced rotor has a weak 1× line, so that ×3–6 is
    audible); each BPF harmonic 0.35–0.75 of the previous; hum fundamental
    −12…−4 dB re BPF, 2nd −9…−3 dB re the fundamental, 3rd −9…−3 dB re the
    2nd; airflow −3…+3 dB re the tones with a spectral slope of 0.8–1.3
    (pink = 1), a 2nd-order high-pass at 25–60 Hz and low-pass at 2.5–6 kHz;
    speed jitter 0.3–0.7 % rms wandering with a 0.3–1.5 s correlation time.
    """
    _check_seed(seed)
    if unit_id < 0:
        raise ValueError(f"unit_id must be non-negative, got {unit_id}")
    rng = _rng(_TAG_UNIT, seed, unit_id)
    shaft_hz = float(rng.uniform(20.0, 24.0))
    shaft_amp = _db(-22.0, -14.0, rng)
    bpf = [1.0]
    for _ in range(BPF_HARMONICS - 1):
        bpf.append(bpf[-1] * float(rng.uniform(0.35, 0.75)))
    hum1 = _db(-12.0, -4.0, rng)
    hum2 = hum1 * _db(-9.0, -3.0, rng)
    hum3 = hum2 * _db(-9.0, -3.0, rng)
    return UnitParams(
        unit_id=unit_id,
        shaft_hz=shaft_hz,
        shaft_amp=shaft_amp,
        bpf_amps=tuple(bpf),
        hum_amps=(hum1, hum2, hum3),
        airflow_db=float(rng.uniform(-3.0, 3.0)),
        airflow_slope=float(rng.uniform(0.8, 1.3)),
        airflow_highpass_hz=float(rng.uniform(25.0, 60.0)),
        airflow_lowpass_hz=float(rng.uniform(2500.0, 6000.0)),
        jitter_rms=float(rng.uniform(0.003, 0.007)),
        jitter_tau_s=float(rng.uniform(0.3, 1.5)),
    )


def draw_conditions(seed: int) -> Conditions:
    """The per-recording random conditions for ``seed`` (unit-independent).

    Open choices: whistle −3 dB width 8–40 Hz at −15…−6 dB re the healthy
    airflow power (so it stands 10–20 dB above the airflow floor in its band);
    voltage change multiplies the 2nd and 3rd hum harmonics by 2–4 and adds
    the 4th at −10…−4 dB re the hum fundamental and the 5th…7th each 1–3 dB
    below the previous (clear lines, as a saturating motor core makes);
    background slope 1–2 (pink to brown) with a 10–30 Hz corner; a background
    machine tone in 40 % of recordings at −10…0 dB re the background noise,
    its 2nd harmonic −20…−6 dB below it.
    """
    _check_seed(seed)
    rng = _rng(_TAG_CONDITIONS, seed)
    u = rng.uniform
    imbalance_gain, imbalance_depth = float(u(3.0, 6.0)), float(u(0.25, 0.60))
    clog_speed, clog_air = float(u(1.05, 1.15)), float(u(-8.0, -3.0))
    surge_hz, surge_depth = float(u(0.3, 2.0)), float(u(0.15, 0.30))
    whistle_bw = float(u(8.0, 40.0))
    whistle_hz = float(u(1200.0 + whistle_bw / 2, 3000.0 - whistle_bw / 2))
    whistle_db = float(u(-15.0, -6.0))
    under = bool(rng.random() < 0.5)
    voltage_speed = float(u(0.65, 0.80) if under else u(1.20, 1.35))
    hum2_gain, hum3_gain = float(u(2.0, 4.0)), float(u(2.0, 4.0))
    hum_high = [_db(-10.0, -4.0, rng)]
    while len(hum_high) < MAX_HUM_HARMONIC - 3:
        hum_high.append(hum_high[-1] * _db(-3.0, -1.0, rng))
    faults = FaultParams(
        imbalance_shaft_gain=imbalance_gain,
        imbalance_am_depth=imbalance_depth,
        clogging_speed=clog_speed,
        clogging_airflow_db=clog_air,
        clogging_surge_hz=surge_hz,
        clogging_surge_depth=surge_depth,
        clogging_whistle_hz=whistle_hz,
        clogging_whistle_bw_hz=whistle_bw,
        clogging_whistle_db=whistle_db,
        voltage_speed=voltage_speed,
        voltage_hum2_gain=hum2_gain,
        voltage_hum3_gain=hum3_gain,
        voltage_hum_high=tuple(hum_high),
    )
    room = RoomParams(
        rt60_s=float(u(0.05, 0.4)), drr_db=float(u(3.0, 15.0)), predelay_s=float(u(0.001, 0.005))
    )
    has_tone = bool(rng.random() < _BACKGROUND_TONE_P)
    tone_hz = float(u(80.0, 400.0))  # drawn either way: keeps later draws stable
    background = BackgroundParams(
        slope=float(u(1.0, 2.0)),
        corner_hz=float(u(10.0, 30.0)),
        tone_hz=tone_hz if has_tone else None,
        tone_db=float(u(-10.0, 0.0)),
        tone_h2_db=float(u(-20.0, -6.0)),
    )
    peak = float(u(*PEAK_DBFS_RANGE))
    return Conditions(faults=faults, room=room, background=background, peak_dbfs=peak)


# --------------------------------------------------------------------------- #
# Schedules and per-sample parameter tracks
# --------------------------------------------------------------------------- #


def _ramp_samples(sample_rate_hz: int) -> int:
    return max(1, round(TRANSITION_S * sample_rate_hz))


def _check_rate(sample_rate_hz: int) -> None:
    if sample_rate_hz < MIN_SAMPLE_RATE_HZ:
        # The whistle reaches 3 kHz; below 8 kHz it would alias.
        raise ValueError(f"sample_rate_hz must be >= {MIN_SAMPLE_RATE_HZ}, got {sample_rate_hz}")


def schedule_segments(
    schedule: Sequence[tuple[str, float]], sample_rate_hz: int
) -> tuple[Segment, ...]:
    """Sample-exact segments of ``schedule`` (``[(fault, seconds), ...]``).

    Boundaries are the rounded cumulative times, so the total length is
    ``round(sum(seconds) · rate)`` with no drift. Each segment must last at
    least two transitions (40 ms) so that parameter ramps never overlap.
    """
    _check_rate(sample_rate_hz)
    if not schedule:
        raise ValueError("schedule is empty")
    min_len = 2 * _ramp_samples(sample_rate_hz)
    segments: list[Segment] = []
    elapsed = 0.0
    start = 0
    for fault, seconds in schedule:
        if fault not in CLASSES:
            raise ValueError(f"unknown fault {fault!r}; expected one of {CLASSES}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"segment duration must be positive, got {seconds!r}")
        elapsed += float(seconds)
        stop = round(elapsed * sample_rate_hz)
        if stop - start < min_len:
            raise ValueError(f"segment {fault}:{seconds} is shorter than {min_len} samples")
        segments.append(Segment(fault, start, stop))
        start = stop
    return tuple(segments)


class _Track:
    """A parameter holding one value per segment, ramping linearly after each boundary.

    Most blocks of most recordings are constant, so :meth:`block` returns a
    plain float whenever it can and only interpolates inside a ramp.
    """

    __slots__ = ("_const", "_fp", "_xp")

    def __init__(self, values: Sequence[float], segments: Sequence[Segment], ramp: int) -> None:
        xp: list[float] = []
        fp: list[float] = []
        for i in range(1, len(segments)):
            if values[i] != values[i - 1]:
                start = segments[i].start
                xp += [float(start), float(start + ramp)]
                fp += [float(values[i - 1]), float(values[i])]
        self._const: float | None = None if xp else float(values[0])
        self._xp = xp
        self._fp = fp

    @property
    def is_zero(self) -> bool:
        """True when the parameter is 0 everywhere (the component can be skipped)."""
        return self._const == 0.0

    def at(self, index: float) -> float:
        """Value at one sample index."""
        if self._const is not None:
            return self._const
        return float(np.interp(index, self._xp, self._fp))

    def block(self, start: int, stop: int) -> float | F64:
        """Values for samples ``[start, stop)``: a float if constant there, else an array."""
        if self._const is not None:
            return self._const
        # No breakpoint strictly inside → linear between the ends → constant
        # if the ends agree (breakpoints come in pairs around each ramp).
        left = bisect.bisect_right(self._xp, start)
        right = bisect.bisect_left(self._xp, stop - 1)
        v0 = self.at(start)
        if right <= left and v0 == self.at(stop - 1):
            return v0
        return np.interp(np.arange(start, stop, dtype=np.float64), self._xp, self._fp)


@dataclass(frozen=True)
class _State:
    """What the fan does during one segment (amplitudes are absolute, linear)."""

    speed: float
    shaft_amp: float
    am_depth: float
    airflow_amp: float
    surge_depth: float
    whistle_amp: float
    hum_amps: tuple[float, ...]  # harmonics 1…MAX_HUM_HARMONIC


def _state(unit: UnitParams, faults: FaultParams, fault: str) -> _State:
    """The sound-defining parameters of ``unit`` while it has ``fault``."""
    airflow = math.sqrt(unit.airflow_power)
    hum = list(unit.hum_amps) + [0.0] * (MAX_HUM_HARMONIC - len(unit.hum_amps))
    state = _State(
        speed=faults.speed(fault),
        shaft_amp=unit.shaft_amp,
        am_depth=0.0,
        airflow_amp=airflow,
        surge_depth=0.0,
        whistle_amp=0.0,
        hum_amps=tuple(hum),
    )
    if fault == "imbalance":
        return replace(
            state,
            shaft_amp=unit.shaft_amp * faults.imbalance_shaft_gain,
            am_depth=faults.imbalance_am_depth,
        )
    if fault == "clogging":
        return replace(
            state,
            airflow_amp=airflow * 10.0 ** (faults.clogging_airflow_db / 20.0),
            surge_depth=faults.clogging_surge_depth,
            whistle_amp=airflow * 10.0 ** (faults.clogging_whistle_db / 20.0),
        )
    if fault == "voltage_change":
        hum[1] *= faults.voltage_hum2_gain
        hum[2] *= faults.voltage_hum3_gain
        for h, rel in enumerate(faults.voltage_hum_high, start=3):
            hum[h] = unit.hum_amps[0] * rel
        return replace(state, hum_amps=tuple(hum))
    return state


@dataclass(frozen=True)
class _Tracks:
    speed: _Track
    shaft_amp: _Track
    am_depth: _Track
    airflow_amp: _Track
    surge_depth: _Track
    whistle_amp: _Track
    hum_amps: tuple[_Track, ...]

    @classmethod
    def build(cls, states: Sequence[_State], segments: Sequence[Segment], ramp: int) -> _Tracks:
        def track(name: str) -> _Track:
            return _Track([float(getattr(s, name)) for s in states], segments, ramp)

        hums = tuple(
            _Track([s.hum_amps[h] for s in states], segments, ramp) for h in range(MAX_HUM_HARMONIC)
        )
        return cls(
            speed=track("speed"),
            shaft_amp=track("shaft_amp"),
            am_depth=track("am_depth"),
            airflow_amp=track("airflow_amp"),
            surge_depth=track("surge_depth"),
            whistle_amp=track("whistle_amp"),
            hum_amps=hums,
        )


# --------------------------------------------------------------------------- #
# Signal components
# --------------------------------------------------------------------------- #


def _fast_len(n: int) -> int:
    """Smallest 2^a·3^b·5^c >= n: pocketfft is several times faster on such sizes."""
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


def _cis(angle: F32) -> C64:
    """exp(i·angle) in complex64 (float32 sin/cos are SIMD, ~10× float64's)."""
    z = np.empty(angle.shape, dtype=np.complex64)
    z.real = np.cos(angle)
    z.imag = np.sin(angle)
    return z


def _phasor(cycles: F64) -> C64:
    """exp(2πi·cycles); reduced in float64 first so that long phases stay exact."""
    return _cis(((cycles - np.floor(cycles)) * (2.0 * np.pi)).astype(np.float32))


def _irfft32(spectrum: C64, n_fft: int) -> F32:
    """Inverse real FFT in single precision (numpy >= 2 computes it natively, 2× faster)."""
    return np.fft.irfft(spectrum, n_fft).astype(np.float32, copy=False)


def _power(x: F32) -> float:
    """Mean square, accumulated in float64 (no BLAS: its threads fight on small boxes)."""
    return float(np.square(x).sum(dtype=np.float64)) / max(1, x.size)


def _unit_power(x: F32) -> F32:
    power = _power(x)
    return x * np.float32(1.0 / math.sqrt(power)) if power > 0 else x


def _noise_from_amplitude(rng: np.random.Generator, amplitude: F32, n_fft: int) -> F32:
    """Unit-power noise whose magnitude spectrum is ``amplitude`` (random phases).

    Drawn in the frequency domain: one inverse FFT is far cheaper than
    filtering, and the result is circular, i.e. stationary. Random phase with
    exact magnitudes (a random-phase multisine) is Gaussian in time and in
    every STFT frame, each of which mixes ~100 of these bins, and costs a
    fifth of complex-Gaussian bins.
    """
    spectrum = _cis(rng.random(amplitude.size, dtype=np.float32) * np.float32(2.0 * np.pi))
    spectrum *= amplitude
    return _unit_power(_irfft32(spectrum, n_fft))


def _airflow_amplitude(unit: UnitParams, n_fft: int, sample_rate_hz: int) -> F32:
    """Magnitude spectrum of the unit's airflow noise.

    PSD ∝ f^−slope (pink-ish, "energy falling with frequency") shaped by a
    2nd-order high-pass (a fan moves little air below its shaft rate) and a
    2nd-order low-pass (turbulence noise fades above a few kHz).
    """
    if n_fft <= _CACHE_MAX_FFT:  # dataset clips: the same few units and sizes recur
        return _airflow_amplitude_cached(unit, n_fft, sample_rate_hz)
    return _airflow_amplitude_of(unit, n_fft, sample_rate_hz)


def _airflow_amplitude_of(unit: UnitParams, n_fft: int, sample_rate_hz: int) -> F32:
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz).astype(np.float32)
    f[0] = f[1]  # avoid log(0); DC is zeroed below
    log_f = np.log(f)
    log_hp = 4.0 * (log_f - np.float32(math.log(unit.airflow_highpass_hz)))
    log_lp = 4.0 * (log_f - np.float32(math.log(unit.airflow_lowpass_hz)))
    # log PSD = −slope·log f + log(hp/(1+hp)) − log(1+lp), with hp, lp = (f/corner)^4;
    # in float32 log/exp (SIMD) rather than float64 powers.
    log_psd = -unit.airflow_slope * log_f - np.logaddexp(0.0, -log_hp) - np.logaddexp(0.0, log_lp)
    amplitude: F32 = np.exp(np.float32(0.5) * log_psd).astype(np.float32, copy=False)
    amplitude[0] = 0.0
    return amplitude


@lru_cache(maxsize=32)
def _airflow_amplitude_cached(unit: UnitParams, n_fft: int, sample_rate_hz: int) -> F32:
    amplitude = _airflow_amplitude_of(unit, n_fft, sample_rate_hz)
    amplitude.setflags(write=False)
    return amplitude


def _whistle(rng: np.random.Generator, faults: FaultParams, n_fft: int, sample_rate_hz: int) -> F32:
    """Unit-power narrow-band noise: a Gaussian band at the whistle frequency.

    Only the band's few hundred bins are drawn (complex Gaussian: with so few
    bins the envelope should fluctuate like real narrow-band noise).
    """
    bin_hz = sample_rate_hz / n_fft
    centre = faults.clogging_whistle_hz / bin_hz
    sigma = max(faults.clogging_whistle_bw_hz / 2.3548 / bin_hz, 0.25)
    lo = max(1, math.floor(centre - 4 * sigma))
    hi = min(n_fft // 2, math.ceil(centre + 4 * sigma)) + 1
    k = np.arange(lo, hi, dtype=np.float64)
    spectrum = np.zeros(n_fft // 2 + 1, dtype=np.complex64)
    band = rng.standard_normal(2 * k.size).view(np.complex128)
    spectrum[lo:hi] = band * np.exp(-0.5 * ((k - centre) / sigma) ** 2)
    return _unit_power(_irfft32(spectrum, n_fft))


def _jitter_control(
    rng: np.random.Generator, unit: UnitParams, first: int, n_total: int, sample_rate_hz: int
) -> tuple[F64, F64]:
    """Control points (sample index, relative speed deviation) of the speed wander.

    A stationary AR(1) process: the "slowly wandering" ≈0.5 % speed of a fan
    on mains, whose inertia smooths load and supply fluctuations.
    """
    step = max(1, round(_JITTER_CONTROL_S * sample_rate_hz))
    count = n_total // step + 2
    rho = math.exp(-_JITTER_CONTROL_S / unit.jitter_tau_s)
    innovations = rng.standard_normal(count) * (unit.jitter_rms * math.sqrt(1 - rho * rho))
    values = np.empty(count, dtype=np.float64)
    values[0] = rng.standard_normal() * unit.jitter_rms
    for i in range(1, count):  # ~200 points per 10 s: a Python loop is fine
        values[i] = rho * values[i - 1] + innovations[i]
    xs = first + step * np.arange(count, dtype=np.float64)
    return xs, values


def _add_tone(acc: F32, amp: float | F64, coef: complex, zk: C64) -> None:
    """acc += amp · sin(k·phase + θ), with coef = e^{iθ}: Im(coef · z^k)."""
    if isinstance(amp, float):
        if amp != 0.0:
            acc += (np.complex64(amp * coef) * zk).imag
    else:
        acc += (amp * (np.complex64(coef) * zk).imag).astype(np.float32)


class _Hum:
    """Mains hum: locked to the grid, not to the shaft, so 50 Hz stays put.

    A fixed frequency repeats exactly every ``rate / gcd(rate, 50)`` samples
    (320 at 16 kHz, 882 at 44.1 kHz), so each harmonic is one period of a
    table, looked up instead of recomputed.
    """

    def __init__(
        self, tracks: Sequence[_Track], coefs: Sequence[complex], phase: float, sample_rate_hz: int
    ) -> None:
        self._period = sample_rate_hz // math.gcd(sample_rate_hz, round(MAINS_HZ))
        cycles = np.arange(self._period, dtype=np.float64) * (MAINS_HZ / sample_rate_hz)
        w = _phasor(cycles + phase)
        wk = w
        self._parts: list[tuple[_Track, F32]] = []
        for h, (track, coef) in enumerate(zip(tracks, coefs, strict=True)):
            if h:
                wk = wk * w
            if not track.is_zero:
                self._parts.append((track, (np.complex64(coef) * wk).imag.copy()))

    def add(self, acc: F32, start: int, stop: int) -> None:
        """acc += hum for recording samples ``[start, stop)``."""
        if not self._parts:
            return
        where = np.arange(start, stop) % self._period
        amps = [track.block(start, stop) for track, _ in self._parts]
        if all(isinstance(a, float) for a in amps):
            period = sum(float(a) * table for a, (_, table) in zip(amps, self._parts, strict=True))
            acc += np.asarray(period, dtype=np.float32)[where]
            return
        for amp, (_, table) in zip(amps, self._parts, strict=True):
            acc += (amp * table[where]).astype(np.float32, copy=False)


def _random_coefs(rng: np.random.Generator, count: int) -> list[complex]:
    """``count`` random unit phasors e^{iθ} (tone phases)."""
    return [complex(np.exp(2j * np.pi * p)) for p in rng.random(count)]


def _is_zero(value: float | F64) -> bool:
    return isinstance(value, float) and value == 0.0


@dataclass(frozen=True)
class _Phases:
    """The random phases of one recording's periodic components."""

    shaft: float  # initial shaft phase, cycles
    shaft_tone: complex
    bpf: list[complex]
    hum: list[complex]
    hum_start: float  # cycles
    am: complex
    surge: float  # cycles

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Phases:
        return cls(
            shaft=float(rng.random()),
            shaft_tone=_random_coefs(rng, 1)[0],
            bpf=_random_coefs(rng, BPF_HARMONICS),
            hum=_random_coefs(rng, MAX_HUM_HARMONIC),
            hum_start=float(rng.random()),
            am=_random_coefs(rng, 1)[0],
            surge=float(rng.random()),
        )


def _add_shaft_tones(
    acc: F32, z: C64, unit: UnitParams, shaft_amp: float | F64, phases: _Phases
) -> None:
    """The shaft tone (z) and BPF harmonics (z^7, z^14, z^21, z^28), each a power of z."""
    _add_tone(acc, shaft_amp, phases.shaft_tone, z)
    z2 = z * z
    z7 = z2 * z2 * z2 * z
    z14 = z7 * z7
    powers = (z7, z14, z14 * z7, z14 * z14)
    for amp, coef, zk in zip(unit.bpf_amps, phases.bpf, powers, strict=True):
        _add_tone(acc, amp, coef, zk)


def _dry_machine(
    unit: UnitParams,
    conditions: Conditions,
    tracks: _Tracks,
    seed: int,
    first: int,
    n_total: int,
    sample_rate_hz: int,
) -> F32:
    """The fan at the source, samples ``[first, first + n_total)`` of the recording.

    Speed follows the speed track times the jitter; the shaft phase is the
    running integral of that instantaneous frequency, and every shaft-locked
    tone is a power of the shaft phasor, so all of them stay phase-continuous
    and move together when the speed changes.
    """
    sr = sample_rate_hz
    faults = conditions.faults
    phases = _Phases.draw(_rng(_TAG_PHASES, seed))
    hum = _Hum(tracks.hum_amps, phases.hum, phases.hum_start, sr)
    airflow = _noise_from_amplitude(
        _rng(_TAG_AIRFLOW, seed), _airflow_amplitude(unit, n_total, sr), n_total
    )
    whistle = None
    if not tracks.whistle_amp.is_zero:
        whistle = _whistle(_rng(_TAG_WHISTLE, seed), faults, n_total, sr)
    jitter_x, jitter_v = _jitter_control(_rng(_TAG_JITTER, seed), unit, first, n_total, sr)

    out = np.empty(n_total, dtype=np.float32)
    shaft_cycles = phases.shaft
    for a in range(0, n_total, _BLOCK):
        b = min(a + _BLOCK, n_total)
        s0, s1 = first + a, first + b  # recording coordinates
        index = np.arange(s0, s1, dtype=np.float64)

        increments = (unit.shaft_hz / sr) * (1.0 + np.interp(index, jitter_x, jitter_v))
        increments *= tracks.speed.block(s0, s1)
        cycles = np.cumsum(increments)
        cycles += shaft_cycles
        shaft_cycles = float(cycles[-1])
        z = _phasor(cycles)

        acc = np.zeros(b - a, dtype=np.float32)
        _add_shaft_tones(acc, z, unit, tracks.shaft_amp.block(s0, s1), phases)
        hum.add(acc, s0, s1)
        acc += (airflow[a:b] * tracks.airflow_amp.block(s0, s1)).astype(np.float32, copy=False)
        if whistle is not None and not _is_zero(amp := tracks.whistle_amp.block(s0, s1)):
            acc += (whistle[a:b] * amp).astype(np.float32, copy=False)

        # Imbalance: the whole sound breathes once per revolution, locked to
        # the shaft (this is also what puts sidebands at BPF ± f_r).
        if not _is_zero(depth := tracks.am_depth.block(s0, s1)):
            acc *= (1.0 + depth * (np.complex64(phases.am) * z).real).astype(np.float32)
        # Clogging: slow surging of the whole sound.
        if not _is_zero(depth := tracks.surge_depth.block(s0, s1)):
            surge = _phasor(index * (faults.clogging_surge_hz / sr) + phases.surge).imag
            acc *= (1.0 + depth * surge).astype(np.float32)
        out[a:b] = acc
    return out


def _room_ir(rng: np.random.Generator, room: RoomParams, sample_rate_hz: int) -> F64:
    """Direct impulse plus an exponentially decaying noise tail.

    The tail decays by 60 dB over RT60 and carries 1/DRR of the direct energy.
    """
    length = max(2, math.ceil(room.rt60_s * sample_rate_hz))
    delay = min(length - 1, max(1, round(room.predelay_s * sample_rate_hz)))
    n = np.arange(length - delay, dtype=np.float64)
    tail = rng.standard_normal(n.size) * 10.0 ** (-3.0 * n / (room.rt60_s * sample_rate_hz))
    tail *= math.sqrt(10.0 ** (-room.drr_db / 10.0) / float(np.square(tail).sum()))
    ir = np.zeros(length, dtype=np.float64)
    ir[0] = 1.0
    ir[delay:] = tail
    return ir


def _background(
    rng: np.random.Generator, params: BackgroundParams, n: int, sample_rate_hz: int
) -> F32:
    """Unit-power factory background: pink-to-brown noise, maybe an unrelated tone."""
    n_fft = _fast_len(n)
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz).astype(np.float32)
    # |A|² ∝ (f² + corner²)^(−slope/2), via exp/log: float32 SIMD, 3× faster than **.
    amplitude = np.exp(np.log(f * f + np.float32(params.corner_hz**2)) * (-params.slope / 4.0))
    amplitude[0] = 0.0
    noise = _unit_power(_noise_from_amplitude(rng, amplitude, n_fft)[:n])
    theta1, theta2 = (float(v) for v in rng.random(2))
    if params.tone_hz is None:
        return noise
    z = _phasor(np.arange(n, dtype=np.float64) * (params.tone_hz / sample_rate_hz) + theta1)
    h2 = 10.0 ** (params.tone_h2_db / 20.0) * complex(np.exp(2j * np.pi * theta2))
    tone = z.imag + (np.complex64(h2) * z * z).imag
    tone *= np.float32(10.0 ** (params.tone_db / 20.0) / math.sqrt(_power(tone)))
    return _unit_power(noise + tone)


def _equalise(wet: F32, segments: Sequence[Segment], ramp: int) -> F32:
    """Scale each segment of the machine sound to unit mean power.

    Each dataset clip is mixed at its own SNR, so the model learns the
    machine-to-background ratio as fixed per clip; equalising per segment
    makes every stretch of a schedule look like such a clip (same local SNR)
    while the background stays one continuous, constant noise.
    """
    gains = []
    for seg in segments:
        power = _power(wet[seg.start : seg.stop])
        gains.append(1.0 / math.sqrt(power) if power > 0 else 1.0)
    gain = _Track(gains, segments, ramp).block(0, wet.size)
    if isinstance(gain, float):
        return wet * np.float32(gain)
    return (wet * gain).astype(np.float32)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Raw:
    machine: F32  # unit power per segment, reverberant
    background: F32  # power set for the SNR
    gain: float  # to the drawn peak level
    conditions: Conditions
    segments: tuple[Segment, ...]


def _render(
    unit: UnitParams,
    segments: tuple[Segment, ...],
    snr_db: float,
    seed: int,
    sample_rate_hz: int,
) -> _Raw:
    _check_seed(seed)
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    conditions = draw_conditions(seed)
    n = segments[-1].stop
    ramp = _ramp_samples(sample_rate_hz)
    states = [_state(unit, conditions.faults, s.fault) for s in segments]
    tracks = _Tracks.build(states, segments, ramp)

    # Render a pre-roll at least as long as the room response so that the
    # first sample already carries the reverberant tail of the running fan,
    # and so the FFT convolution never wraps the end onto the start.
    ir = _room_ir(_rng(_TAG_ROOM, seed), conditions.room, sample_rate_hz)
    n_fft = _fast_len(n + ir.size)
    pre = n_fft - n
    dry = _dry_machine(unit, conditions, tracks, seed, -pre, n_fft, sample_rate_hz)
    # Forward transforms in float64 (numpy's float32 rfft is slower), the
    # inverse in complex64 (twice as fast, and float32 is all the output keeps).
    # Intermediates are dropped as soon as possible: a 3-minute 48 kHz
    # schedule holds ~70 MB per complex array.
    spectrum = np.fft.rfft(dry.astype(np.float64))
    del dry
    spectrum *= np.fft.rfft(ir, n_fft)
    wet = _irfft32(spectrum.astype(np.complex64), n_fft)[pre:]
    del spectrum
    machine = _equalise(wet, segments, ramp)

    background = _background(_rng(_TAG_BACKGROUND, seed), conditions.background, n, sample_rate_hz)
    background *= np.float32(math.sqrt(_power(machine) * 10.0 ** (-snr_db / 10.0)))

    peak = float(np.max(np.abs(machine + background)))
    gain = 10.0 ** (conditions.peak_dbfs / 20.0) / peak
    return _Raw(machine, background, gain, conditions, segments)


def _mix(raw: _Raw) -> F32:
    mix = raw.machine + raw.background
    mix *= np.float32(raw.gain)
    return mix


@dataclass(frozen=True)
class Rendering:
    """A recording with its two parts and what was drawn for it.

    ``mix`` is exactly what :func:`synth_clip` / :func:`render_schedule`
    return; ``machine + background`` equals it up to float32 rounding, and
    ``10·log10(mean(machine²)/mean(background²))`` is the requested SNR.
    """

    mix: F32
    machine: F32
    background: F32
    sample_rate_hz: int
    snr_db: float
    unit: UnitParams
    conditions: Conditions
    segments: tuple[Segment, ...]

    @property
    def peak_dbfs(self) -> float:
        """Peak of ``mix`` in dBFS (the drawn level, −35…−6)."""
        return 20.0 * math.log10(float(np.max(np.abs(self.mix))))

    def shaft_hz(self, fault: str) -> float:
        """Mean shaft rate (without jitter) while ``fault`` plays."""
        return self.unit.shaft_hz * self.conditions.faults.speed(fault)


def _rendering(unit: UnitParams, raw: _Raw, snr_db: float, sample_rate_hz: int) -> Rendering:
    return Rendering(
        mix=_mix(raw),
        machine=raw.machine * np.float32(raw.gain),
        background=raw.background * np.float32(raw.gain),
        sample_rate_hz=sample_rate_hz,
        snr_db=float(snr_db),
        unit=unit,
        conditions=raw.conditions,
        segments=raw.segments,
    )


def _clip_segments(fault: str, duration_s: float, sample_rate_hz: int) -> tuple[Segment, ...]:
    return schedule_segments([(fault, duration_s)], sample_rate_hz)


def synth_clip(
    unit: UnitParams,
    fault: str,
    snr_db: float,
    seed: int,
    duration_s: float = 10.0,
    sample_rate_hz: int = 16000,
) -> F32:
    """One MIMII-like clip of ``unit`` with ``fault``: float32 mono, deterministic.

    Length ``round(duration_s · rate)``; SNR exactly ``snr_db`` (see the module
    docstring); peak at a level drawn from −35…−6 dBFS.
    """
    segments = _clip_segments(fault, duration_s, sample_rate_hz)
    return _mix(_render(unit, segments, snr_db, seed, sample_rate_hz))


def synth_parts(
    unit: UnitParams,
    fault: str,
    snr_db: float,
    seed: int,
    duration_s: float = 10.0,
    sample_rate_hz: int = 16000,
) -> Rendering:
    """:func:`synth_clip` with its machine and background parts and its conditions."""
    segments = _clip_segments(fault, duration_s, sample_rate_hz)
    raw = _render(unit, segments, snr_db, seed, sample_rate_hz)
    return _rendering(unit, raw, snr_db, sample_rate_hz)


def render_schedule(
    unit: UnitParams,
    schedule: Sequence[tuple[str, float]],
    snr_db: float,
    seed: int,
    sample_rate_hz: int = 16000,
) -> F32:
    """One continuous recording whose fault follows ``schedule`` ``[(fault, seconds), ...]``.

    Boundaries are at :func:`schedule_segments`' samples; every stretch has
    SNR ``snr_db`` against one continuous background; one level throughout.
    """
    segments = schedule_segments(schedule, sample_rate_hz)
    return _mix(_render(unit, segments, snr_db, seed, sample_rate_hz))


def render_parts(
    unit: UnitParams,
    schedule: Sequence[tuple[str, float]],
    snr_db: float,
    seed: int,
    sample_rate_hz: int = 16000,
) -> Rendering:
    """:func:`render_schedule` with its parts, conditions and segments."""
    segments = schedule_segments(schedule, sample_rate_hz)
    raw = _render(unit, segments, snr_db, seed, sample_rate_hz)
    return _rendering(unit, raw, snr_db, sample_rate_hz)


# --------------------------------------------------------------------------- #
# Live source
# --------------------------------------------------------------------------- #


def _derive_seed(seed: int, index: int) -> int:
    state = np.random.SeedSequence([_TAG_STREAM, seed, index]).generate_state(1)
    return int(state[0])


class ScheduleStream:
    """An endless recording of ``schedule`` for live demos.

    Each cycle of the schedule is rendered whole (cycle 0 with ``seed``, later
    ones with seeds derived from it: fresh fault parameters, noise and room
    each time round), so memory is bounded by one cycle; the read that starts
    a cycle pays for rendering it (~1 s of CPU per minute at 48 kHz). Cycles
    join with a 20 ms equal-power crossfade that starts at the cycle boundary,
    like any other fault change. The level is
    fixed by the first cycle; later cycles use the same gain, and since every
    cycle has the same machine and background power the loudness is steady.

    ``read(n)`` returns exactly ``n`` samples; the output does not depend on
    how reads are sized. With ``loop=False`` the schedule plays once and is
    followed by silence, for which :meth:`fault_at` raises ``IndexError``.
    """

    def __init__(
        self,
        unit: UnitParams,
        schedule: Sequence[tuple[str, float]],
        snr_db: float,
        seed: int,
        sample_rate_hz: int = 16000,
        loop: bool = True,
    ) -> None:
        _check_seed(seed)
        self._unit = unit
        self._segments = schedule_segments(schedule, sample_rate_hz)
        self._starts = [s.start for s in self._segments]
        self._snr_db = float(snr_db)
        self._seed = seed
        self._rate = sample_rate_hz
        self._loop = loop
        self._cycle = self._segments[-1].stop
        self._xfade = _ramp_samples(sample_rate_hz) if loop else 0
        last = self._segments[-1]
        # Render each cycle a crossfade longer (the last state carries on)
        # so the join can overlap without shifting the timeline.
        self._render_segments = (
            *self._segments[:-1],
            Segment(last.fault, last.start, last.stop + self._xfade),
        )
        self._gain: float | None = None
        self._position = 0
        self._cycle_index = -1
        self._buffer: F32 = np.zeros(0, dtype=np.float32)
        self._tail: F32 = np.zeros(0, dtype=np.float32)

    @property
    def sample_rate_hz(self) -> int:
        """Output sample rate."""
        return self._rate

    @property
    def cycle_samples(self) -> int:
        """Length of one pass through the schedule."""
        return self._cycle

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The schedule's segments within one cycle."""
        return self._segments

    @property
    def position(self) -> int:
        """Absolute index of the next sample :meth:`read` returns."""
        return self._position

    def fault_at(self, sample_index: int) -> str:
        """The class playing at absolute ``sample_index`` (from the boundary on)."""
        if sample_index < 0:
            raise IndexError(f"sample_index must be >= 0, got {sample_index}")
        if not self._loop and sample_index >= self._cycle:
            raise IndexError(f"sample {sample_index} is past the end ({self._cycle})")
        offset = sample_index % self._cycle
        return self._segments[bisect.bisect_right(self._starts, offset) - 1].fault

    def read(self, n_samples: int) -> F32:
        """The next ``n_samples`` samples (float32, −1…1)."""
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        out = np.empty(n_samples, dtype=np.float32)
        filled = 0
        while filled < n_samples:
            cycle, offset = divmod(self._position, self._cycle)
            take = min(n_samples - filled, self._cycle - offset)
            if cycle > 0 and not self._loop:
                out[filled : filled + take] = 0.0
            else:
                self._ensure_cycle(cycle)
                out[filled : filled + take] = self._buffer[offset : offset + take]
            filled += take
            self._position += take
        return out

    def _ensure_cycle(self, cycle: int) -> None:
        """Make ``cycle`` the buffered one (reads only move forward, one cycle at a time)."""
        if cycle == self._cycle_index:
            return
        seed = self._seed if cycle == 0 else _derive_seed(self._seed, cycle)
        raw = _render(self._unit, self._render_segments, self._snr_db, seed, self._rate)
        if self._gain is None:
            self._gain = raw.gain
        audio = np.clip((raw.machine + raw.background) * self._gain, -1.0, 1.0)
        audio32 = audio.astype(np.float32)
        head = audio32[: self._xfade]
        if cycle > 0 and self._xfade:
            # Equal-power: the two cycles are uncorrelated noises and tones.
            t = (np.arange(self._xfade, dtype=np.float64) + 0.5) / self._xfade * (np.pi / 2)
            head[:] = head * np.sin(t) + self._tail * np.cos(t)
        self._buffer = audio32[: self._cycle]
        self._tail = audio32[self._cycle :].copy()
        self._cycle_index = cycle
        logger.debug("fansim stream: rendered cycle %d (%d samples)", cycle, self._cycle)
