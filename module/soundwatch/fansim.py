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
  noise. Both parts are available from :func:`synth_parts` / :func:`render_parts`
  (and :meth:`ScheduleStream.read_parts`, where ``P`` is the expected power).
* **Level**: the mixture is scaled so that its absolute peak lands at a value
  drawn uniformly from −35…−6 dBFS, independent of the class. (The live
  :class:`ScheduleStream` cannot see its peaks in advance: it sets one gain
  from the expected power instead, so its peaks land near the drawn level.)
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
a recording needs ~50 bytes of memory per sample while it renders. The live
stream renders 0.5 s steps as it is read instead: ~5 ms of CPU per second of
audio at 48 kHz and a few MB, whatever the schedule's length.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Sequence
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

    voice = _Voice(unit, faults, tracks, phases, hum, sr)
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
        out[a:b] = voice.block(
            index, _phasor(cycles), airflow[a:b], None if whistle is None else whistle[a:b]
        )
    return out


@dataclass(frozen=True)
class _Voice:
    """How one recording's fan turns its parameter tracks into sound, block by block.

    Shared by the whole-buffer renderer and the live stream, so both make the
    same physics from the same tracks.
    """

    unit: UnitParams
    faults: FaultParams
    tracks: _Tracks
    phases: _Phases
    hum: _Hum
    sample_rate_hz: int

    def block(self, index: F64, z: C64, airflow: F32, whistle: F32 | None) -> F32:
        """The dry fan at recording samples ``index`` (consecutive, float64).

        ``z`` is the shaft phasor there; ``airflow`` and ``whistle`` are the
        unit-power noises for the same samples (``whistle`` may be ``None``
        where its level is zero).
        """
        tracks, phases = self.tracks, self.phases
        s0 = int(index[0])
        s1 = s0 + index.size
        acc = np.zeros(index.size, dtype=np.float32)
        _add_shaft_tones(acc, z, self.unit, tracks.shaft_amp.block(s0, s1), phases)
        self.hum.add(acc, s0, s1)
        acc += (airflow * tracks.airflow_amp.block(s0, s1)).astype(np.float32, copy=False)
        if whistle is not None and not _is_zero(amp := tracks.whistle_amp.block(s0, s1)):
            acc += (whistle * amp).astype(np.float32, copy=False)

        # Imbalance: the whole sound breathes once per revolution, locked to
        # the shaft (this is also what puts sidebands at BPF ± f_r).
        if not _is_zero(depth := tracks.am_depth.block(s0, s1)):
            acc *= (1.0 + depth * (np.complex64(phases.am) * z).real).astype(np.float32)
        # Clogging: slow surging of the whole sound.
        if not _is_zero(depth := tracks.surge_depth.block(s0, s1)):
            cycles = index * (self.faults.clogging_surge_hz / self.sample_rate_hz) + phases.surge
            acc *= (1.0 + depth * _phasor(cycles).imag).astype(np.float32)
        return acc


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


def _background_amplitude(params: BackgroundParams, n_fft: int, sample_rate_hz: int) -> F32:
    """Magnitude spectrum of the background noise: |A|² ∝ (f² + corner²)^(−slope/2)."""
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz).astype(np.float32)
    # Via exp/log: float32 SIMD, 3× faster than **.
    amplitude: F32 = np.exp(np.log(f * f + np.float32(params.corner_hz**2)) * (-params.slope / 4.0))
    amplitude[0] = 0.0
    return amplitude


def _background(
    rng: np.random.Generator, params: BackgroundParams, n: int, sample_rate_hz: int
) -> F32:
    """Unit-power factory background: pink-to-brown noise, maybe an unrelated tone."""
    n_fft = _fast_len(n)
    amplitude = _background_amplitude(params, n_fft, sample_rate_hz)
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


#: Audio made per render step of :class:`ScheduleStream`, rounded up to a fast
#: FFT size. Noise frames are twice this long (1 Hz bins at 0.5 s).
_STREAM_CHUNK_S: Final = 0.5
#: Peak-to-RMS ratio the stream's level is set by: the median crest factor of a
#: 10 s mixture at 48 kHz (12–15 dB over classes, SNRs, units and rooms).
_STREAM_CREST_DB: Final = 13.0
#: Nominal peak range of a stream: −35…−6 dBFS less the spread of the crest
#: (measured over 96 segments at 48 kHz, 10 s peaks land −1.3…+1.6 dB around it).
_STREAM_PEAK_DBFS: Final = (-33.0, -9.5)
#: Gauss–Hermite nodes for averaging the room response over the speed jitter.
_JITTER_NODES: Final = 9


def _derive_seed(seed: int, index: int) -> int:
    state = np.random.SeedSequence([_TAG_STREAM, seed, index]).generate_state(1)
    return int(state[0])


def _zigzag(j: int) -> int:
    """A distinct non-negative key for every integer (0, −1, 1, −2, … → 0, 1, 2, 3, …)."""
    return 2 * j if j >= 0 else -2 * j - 1


def _stream_chunk(sample_rate_hz: int) -> int:
    """Samples per render step of :class:`ScheduleStream` at ``sample_rate_hz``."""
    return _fast_len(round(_STREAM_CHUNK_S * sample_rate_hz))


def _stream_peak_dbfs(seed: int) -> float:
    """The nominal peak of a stream: the drawn level mapped into :data:`_STREAM_PEAK_DBFS`."""
    lo, hi = PEAK_DBFS_RANGE
    new_lo, new_hi = _STREAM_PEAK_DBFS
    return new_lo + (draw_conditions(seed).peak_dbfs - lo) * (new_hi - new_lo) / (hi - lo)


class _ShapedFrames:
    """Random-phase noise frames with a fixed magnitude spectrum, unit variance per sample.

    ``amplitude`` holds the rfft bins of the frame; DC and Nyquist are dropped
    so that every sample has exactly the variance ``2·Σ A²/n²`` (set to 1).
    """

    def __init__(self, amplitude: F32) -> None:
        self._n_fft = 2 * (amplitude.size - 1)
        a = amplitude.astype(np.float64)
        a[0] = a[-1] = 0.0
        a *= self._n_fft / math.sqrt(2.0 * float(np.square(a).sum()))
        self._amplitude = a.astype(np.float32)

    def __call__(self, rng: np.random.Generator) -> F32:
        spectrum = _cis(rng.random(self._amplitude.size, dtype=np.float32) * np.float32(2 * np.pi))
        spectrum *= self._amplitude
        return _irfft32(spectrum, self._n_fft)


class _WhistleFrames:
    """Narrow-band noise frames (complex Gaussian bins, as :func:`_whistle`), unit variance."""

    def __init__(self, faults: FaultParams, n_fft: int, sample_rate_hz: int) -> None:
        bin_hz = sample_rate_hz / n_fft
        centre = faults.clogging_whistle_hz / bin_hz
        sigma = max(faults.clogging_whistle_bw_hz / 2.3548 / bin_hz, 0.25)
        self._lo = max(1, math.floor(centre - 4 * sigma))
        hi = min(n_fft // 2 - 1, math.ceil(centre + 4 * sigma)) + 1
        shape = np.exp(-0.5 * ((np.arange(self._lo, hi) - centre) / sigma) ** 2)
        # E|bin|² = shape²·scale² (each of re, im has variance ½·shape²·scale²).
        scale = n_fft / math.sqrt(2.0 * float(np.square(shape).sum()))
        self._shape = shape * (scale / math.sqrt(2.0))
        self._n_fft = n_fft

    def amplitude(self) -> F32:
        """The frames' rms magnitude per rfft bin (the whistle's spectral shape)."""
        amplitude = np.zeros(self._n_fft // 2 + 1, dtype=np.float32)
        amplitude[self._lo : self._lo + self._shape.size] = self._shape
        return amplitude

    def __call__(self, rng: np.random.Generator) -> F32:
        spectrum = np.zeros(self._n_fft // 2 + 1, dtype=np.complex64)
        band = rng.standard_normal(2 * self._shape.size).view(np.complex128)
        spectrum[self._lo : self._lo + self._shape.size] = band * self._shape
        return _irfft32(spectrum, self._n_fft)


class _NoiseStream:
    """Endless stationary noise made ``hop`` samples at a time, without seams.

    Frame ``j`` is an independent noise of ``2·hop`` samples starting at sample
    ``j·hop`` with unit variance at every sample, tapered by a sine window.
    Frames overlap by half and the window is power-complementary
    (sin² + cos² = 1), so the sum has unit variance at every sample, joins
    included, and its spectrum is the frames' smoothed by the window's main
    lobe (~1.5 frame bins). Frames are keyed by their index, so any hop can be
    made without those before it (the whistle is only made where it sounds).
    """

    def __init__(
        self, frames: Callable[[np.random.Generator], F32], keys: tuple[int, ...], hop: int
    ) -> None:
        self._frames = frames
        self._keys = keys
        self._hop = hop
        n = 2 * hop
        self._window = np.sin((np.arange(n, dtype=np.float64) + 0.5) * (np.pi / n)).astype(
            np.float32
        )
        self._last_index: int | None = None
        self._last: F32 = np.zeros(0, dtype=np.float32)

    def _frame(self, j: int) -> F32:
        if j != self._last_index:
            self._last = self._frames(_rng(*self._keys, _zigzag(j))) * self._window
            self._last_index = j
        return self._last

    def hop(self, j: int) -> F32:
        """Samples ``[j·hop, (j+1)·hop)``."""
        older = self._frame(j - 1)[self._hop :]
        return older + self._frame(j)[: self._hop]


class _JitterStream:
    """The speed wander of :func:`_jitter_control` (same AR(1) process), drawn as needed."""

    def __init__(
        self, rng: np.random.Generator, unit: UnitParams, first: int, sample_rate_hz: int
    ) -> None:
        self._rng = rng
        self._step = max(1, round(_JITTER_CONTROL_S * sample_rate_hz))
        self._rho = math.exp(-_JITTER_CONTROL_S / unit.jitter_tau_s)
        self._innovation = unit.jitter_rms * math.sqrt(1 - self._rho * self._rho)
        self._x0 = first  # sample index of self._values[0]
        self._values: F64 = np.array([rng.standard_normal() * unit.jitter_rms])

    def at(self, index: F64) -> F64:
        """Relative speed deviation at ``index`` (ascending, never before a previous call's)."""
        drop = (int(index[0]) - self._x0) // self._step
        if drop > 0:
            self._values = self._values[drop:]
            self._x0 += drop * self._step
        need = (int(index[-1]) - self._x0) // self._step + 2
        if need > self._values.size:
            innovations = self._rng.standard_normal(need - self._values.size) * self._innovation
            values = np.empty(need, dtype=np.float64)
            values[: self._values.size] = self._values
            for i in range(self._values.size, need):  # a few points per chunk
                values[i] = self._rho * values[i - 1] + innovations[i - self._values.size]
            self._values = values
        xs = self._x0 + self._step * np.arange(self._values.size, dtype=np.float64)
        return np.interp(index, xs, self._values)


class _RoomGain:
    """The room's power response |H(f)|², for the expected power of a sound after it."""

    def __init__(self, ir: F64, sample_rate_hz: int) -> None:
        n_fft = _fast_len(max(8 * ir.size, 4096))  # fine enough to interpolate linearly
        self._f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz)
        self._gain = np.square(np.abs(np.fft.rfft(ir, n_fft)))

    def at(self, f_hz: F64) -> F64:
        """|H|² at the frequencies ``f_hz`` (negative ones mirror)."""
        return np.interp(np.abs(f_hz), self._f, self._gain)

    def of_noise(self, amplitude: F32, sample_rate_hz: int) -> float:
        """Power gain for a noise whose rfft magnitudes (any grid) are ``amplitude``."""
        n_fft = 2 * (amplitude.size - 1)
        power = np.square(amplitude.astype(np.float64))
        f = np.arange(amplitude.size, dtype=np.float64) * (sample_rate_hz / n_fft)
        return float((power * self.at(f)).sum() / power.sum())


def _expected_power(
    voice: _Voice, state: _State, room: _RoomGain, airflow_gain: float, whistle_gain: float
) -> float:
    """Mean square of ``state``'s steady sound after the room, from its spectrum.

    Every line (shaft-locked tones, hum, and the sidebands that the shaft AM
    and the surge put around them) is weighted by |H|² at its frequency,
    averaged over the speed jitter; the noises by |H|² averaged over their
    spectra. This is what :func:`_equalise` would measure on a long stretch of
    ``state``, without rendering it.
    """
    unit, phases = voice.unit, voice.phases
    # Shaft-locked tones as Re(b_k·e^{ikθ}), since Im(c·z^k) = Re(−i·c·z^k).
    lines: dict[int, complex] = {1: -1j * state.shaft_amp * phases.shaft_tone}
    for m, (amp, coef) in enumerate(zip(unit.bpf_amps, phases.bpf, strict=True), start=1):
        lines[unit.blades * m] = -1j * amp * coef
    d, s = state.am_depth, state.surge_depth
    if d:  # ×(1 + d·cos(θ + ∠am)) moves d/2 of each line one order up and one down
        am = phases.am
        shaped: dict[int, complex] = {}
        for k, b in lines.items():
            for order, c in (
                (k, b),
                (k + 1, 0.5 * d * am * b),
                (k - 1, 0.5 * d * am.conjugate() * b),
            ):
                shaped[order] = shaped.get(order, 0j) + c
        lines = shaped
    # Each line as (shaft order, offset Hz, power): it sits at order·f_shaft + offset.
    parts = [(k, 0.0, abs(b) ** 2 / 2.0 if k else b.real**2) for k, b in lines.items()]
    for h, amp in enumerate(state.hum_amps, start=1):
        if amp:
            parts.append((0, MAINS_HZ * h, amp * amp / 2.0))
            if d:
                parts += [(order, MAINS_HZ * h, amp * amp * d * d / 8.0) for order in (-1, 1)]
    if s:  # ×(1 + s·sin(2π·f_s·t)) adds s/2 of each line at ±f_s (a DC line's p is c²)
        f_s = voice.faults.clogging_surge_hz
        parts += [(k, f + sign * f_s, p * s * s / 4.0) for k, f, p in parts for sign in (-1, 1)]
    nodes, weights = np.polynomial.hermite_e.hermegauss(_JITTER_NODES)
    shaft_hz = unit.shaft_hz * state.speed * (1.0 + unit.jitter_rms * nodes)
    weights = weights / weights.sum()
    tones = sum(p * float(weights @ room.at(k * shaft_hz + f)) for k, f, p in parts)
    noise = state.airflow_amp**2 * airflow_gain + state.whistle_amp**2 * whistle_gain
    return float(tones) + noise * (1.0 + d * d / 2.0) * (1.0 + s * s / 2.0)


class _CycleRenderer:
    """One pass of a schedule as a live recording, rendered ``chunk`` samples per step.

    The physics is :func:`_render`'s (same tracks, :class:`_Voice`, room and
    background), made incrementally: the shaft phase and the speed wander
    carry over from step to step, the noises come from :class:`_NoiseStream`,
    the room is an overlap-add convolution whose tail carries over, and a
    pre-roll of whole steps (at least the room's length) runs before sample 0
    so that the first sample already has the reverberant tail. Instead of
    being measured on the whole recording, the machine gain of each segment
    is :func:`_expected_power`'s, and the background's is set analytically.
    """

    def __init__(
        self,
        unit: UnitParams,
        segments: tuple[Segment, ...],
        snr_db: float,
        seed: int,
        sample_rate_hz: int,
        chunk: int,
        level: float,
        scene_seed: int | None = None,
    ) -> None:
        sr = sample_rate_hz
        conditions = draw_conditions(seed)
        faults = conditions.faults
        # The room and the background (the "scene") may come from another seed:
        # a looping stream keeps its microphone in one place, so that a cycle
        # boundary is not a jump in reverberation and factory noise that the
        # model would rightly hear as a change.
        scene_seed = seed if scene_seed is None else scene_seed
        scene = conditions if scene_seed == seed else draw_conditions(scene_seed)
        ramp = _ramp_samples(sr)
        states = [_state(unit, faults, s.fault) for s in segments]
        tracks = _Tracks.build(states, segments, ramp)
        phases = _Phases.draw(_rng(_TAG_PHASES, seed))
        hum = _Hum(tracks.hum_amps, phases.hum, phases.hum_start, sr)
        self._voice = _Voice(unit, faults, tracks, phases, hum, sr)
        self._chunk = chunk
        n_frame = 2 * chunk

        airflow = _airflow_amplitude(unit, n_frame, sr)
        self._airflow = _NoiseStream(_ShapedFrames(airflow), (_TAG_AIRFLOW, seed), chunk)
        self._whistle: _NoiseStream | None = None
        whistle = _WhistleFrames(faults, n_frame, sr)
        if not tracks.whistle_amp.is_zero:
            self._whistle = _NoiseStream(whistle, (_TAG_WHISTLE, seed), chunk)

        ir = _room_ir(_rng(_TAG_ROOM, scene_seed), scene.room, sr)
        room = _RoomGain(ir, sr)
        airflow_gain = room.of_noise(airflow, sr)
        whistle_gain = room.of_noise(whistle.amplitude(), sr)
        powers = {
            s: _expected_power(self._voice, s, room, airflow_gain, whistle_gain)
            for s in set(states)
        }
        self._gain = _Track([level / math.sqrt(powers[s]) for s in states], segments, ramp)
        self._n_fft = _fast_len(chunk + ir.size - 1)
        self._ir_spectrum = np.fft.rfft(ir, self._n_fft)
        self._tail: F32 = np.zeros(ir.size - 1, dtype=np.float32)
        self._next = -math.ceil((ir.size - 1) / chunk)  # pre-roll steps, then step 0
        self._jitter = _JitterStream(_rng(_TAG_JITTER, seed), unit, self._next * chunk, sr)
        self._shaft_cycles = phases.shaft

        params = scene.background
        self._background = _NoiseStream(
            _ShapedFrames(_background_amplitude(params, n_frame, sr)),
            (_TAG_BACKGROUND, seed),
            chunk,
        )
        self._background_tone = params.tone_hz
        theta1, theta2 = (float(v) for v in _rng(_TAG_BACKGROUND, scene_seed).random(2))
        self._tone_phase = theta1
        self._tone_h2 = 10.0 ** (params.tone_h2_db / 20.0) * complex(np.exp(2j * np.pi * theta2))
        tone_power = 0.0 if params.tone_hz is None else _db_power(params.tone_db)
        self._tone_amp = math.sqrt(tone_power / ((1.0 + abs(self._tone_h2) ** 2) / 2.0))
        # Machine at unit power, background at the SNR below it.
        self._background_gain = level * math.sqrt(_db_power(-snr_db) / (1.0 + tone_power))

        self._machine_out: F32 = np.zeros(0, dtype=np.float32)
        self._background_out: F32 = np.zeros(0, dtype=np.float32)
        self._offset = 0

    def take(self, n: int) -> tuple[F32, F32]:
        """The next ``n`` samples as (machine, background), level applied."""
        machine = np.empty(n, dtype=np.float32)
        background = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            if self._offset == self._machine_out.size:
                self._render_step()
            k = min(n - filled, self._machine_out.size - self._offset)
            machine[filled : filled + k] = self._machine_out[self._offset : self._offset + k]
            background[filled : filled + k] = self._background_out[self._offset : self._offset + k]
            filled += k
            self._offset += k
        return machine, background

    def _render_step(self) -> None:
        """Render the next step (after any pre-roll steps) into the output buffers."""
        while True:
            j = self._next
            self._next += 1
            machine = self._machine_step(j)
            if j >= 0:
                break
        s0 = j * self._chunk
        self._machine_out = machine
        self._background_out = self._background_step(s0, s0 + self._chunk)
        self._offset = 0

    def _machine_step(self, j: int) -> F32:
        voice, tracks = self._voice, self._voice.tracks
        sr = voice.sample_rate_hz
        s0, s1 = j * self._chunk, (j + 1) * self._chunk
        index = np.arange(s0, s1, dtype=np.float64)
        increments = (voice.unit.shaft_hz / sr) * (1.0 + self._jitter.at(index))
        increments *= tracks.speed.block(s0, s1)
        cycles = np.cumsum(increments)
        cycles += self._shaft_cycles
        self._shaft_cycles = float(cycles[-1]) % 1.0
        whistle = None
        if self._whistle is not None and not _is_zero(tracks.whistle_amp.block(s0, s1)):
            whistle = self._whistle.hop(j)
        dry = voice.block(index, _phasor(cycles), self._airflow.hop(j), whistle)

        # Overlap-add convolution with the room: the part past this step is
        # the tail that the next step adds on.
        spectrum = np.fft.rfft(dry.astype(np.float64), self._n_fft)
        spectrum *= self._ir_spectrum
        wet = _irfft32(spectrum.astype(np.complex64), self._n_fft)[: s1 - s0 + self._tail.size]
        wet[: self._tail.size] += self._tail
        self._tail = wet[s1 - s0 :].copy()
        gain = self._gain.block(s0, s1)
        if isinstance(gain, float):
            return wet[: s1 - s0] * np.float32(gain)
        return (wet[: s1 - s0] * gain).astype(np.float32)

    def _background_step(self, s0: int, s1: int) -> F32:
        noise = self._background.hop(s0 // self._chunk)
        if self._background_tone is not None:
            cycles = np.arange(s0, s1, dtype=np.float64) * (
                self._background_tone / self._voice.sample_rate_hz
            )
            z = _phasor(cycles + self._tone_phase)
            noise += np.float32(self._tone_amp) * (
                z.imag + (np.complex64(self._tone_h2) * z * z).imag
            )
        noise *= np.float32(self._background_gain)
        return noise


class ScheduleStream:
    """An endless recording of ``schedule`` for live demos, rendered as it is read.

    Each cycle of the schedule is a fresh take (cycle 0 with ``seed``, later
    ones with seeds derived from it: new fault parameters and noise each time
    round) in one scene: the room and the background's kind stay ``seed``'s.
    Cycles join with a 20 ms equal-power crossfade that starts at the cycle
    boundary, like any other fault change.

    Rendering is incremental: a read renders only the steps of
    :data:`_STREAM_CHUNK_S` (0.5 s) it needs, so CPU per read is proportional
    to the audio read (plus one room-length pre-roll step at each cycle start)
    and the stream holds a few MB whatever the schedule's length. Tones stay
    phase-continuous across steps, broadband noises are overlap-added
    independent frames with power-complementary windows (stationary, no seams),
    and the room's reverberant tail carries over. The samples therefore differ
    from :func:`render_schedule`'s for the same arguments, with the same
    statistics: fault changes at the same samples with the same ramps, and
    every segment at SNR ``snr_db`` within a fraction of a dB.

    **Level**: one constant gain for the whole stream, fixed without rendering:
    the machine's expected power is 1 in every segment (its per-segment gain
    comes from the room's response and the state's spectrum, see
    :func:`_expected_power`) and the background's is set by the SNR, so the
    RMS is known; it is set :data:`_STREAM_CREST_DB` (13 dB, the median crest
    of a 10 s mixture) below :attr:`peak_dbfs`, the seed's drawn level mapped
    into −33…−9.5 dBFS. Peaks over 10 s then land within about ±2 dB of it,
    inside −35…−6 dBFS.

    ``read(n)`` returns exactly ``n`` samples; the output depends only on
    (unit, schedule, snr_db, seed, sample_rate_hz, loop), never on how reads
    are sized. With ``loop=False`` the schedule plays once and is followed by
    silence, for which :meth:`fault_at` raises ``IndexError``.
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
        if not math.isfinite(snr_db):
            raise ValueError(f"snr_db must be finite, got {snr_db}")
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
        # Each cycle plays a crossfade longer (the last state carries on) so
        # the join can overlap without shifting the timeline.
        self._render_segments = (
            *self._segments[:-1],
            Segment(last.fault, last.start, last.stop + self._xfade),
        )
        self._chunk = _stream_chunk(sample_rate_hz)
        self._peak_dbfs = _stream_peak_dbfs(seed)
        rms = 10.0 ** ((self._peak_dbfs - _STREAM_CREST_DB) / 20.0)
        self._level = rms / math.sqrt(1.0 + _db_power(-self._snr_db))
        self._position = 0
        self._cycle_index = -1
        self._current: _CycleRenderer | None = None
        self._previous: _CycleRenderer | None = None  # finishing its crossfade tail

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

    @property
    def peak_dbfs(self) -> float:
        """The nominal peak level the stream's constant gain is set for (see the class doc)."""
        return self._peak_dbfs

    @property
    def chunk_samples(self) -> int:
        """Samples rendered per internal step."""
        return self._chunk

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
        machine, background = self.read_parts(n_samples)
        machine += background
        return np.clip(machine, -1.0, 1.0, out=machine)

    def read_parts(self, n_samples: int) -> tuple[F32, F32]:
        """The next ``n_samples`` as (machine, background), level applied, unclipped.

        :meth:`read` returns their sum, clipped to −1…1; a stream is read one
        way or the other (both advance :attr:`position`).
        """
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        machine = np.zeros(n_samples, dtype=np.float32)
        background = np.zeros(n_samples, dtype=np.float32)
        filled = 0
        while filled < n_samples:
            cycle, offset = divmod(self._position, self._cycle)
            if cycle > 0 and not self._loop:
                take = n_samples - filled  # silence after the end
            elif cycle > 0 and offset < self._xfade:
                take = min(n_samples - filled, self._xfade - offset)
                self._crossfade(cycle, offset, machine[filled:], background[filled:], take)
            else:
                take = min(n_samples - filled, self._cycle - offset)
                m, b = self._renderer(cycle).take(take)
                machine[filled : filled + take] = m
                background[filled : filled + take] = b
            filled += take
            self._position += take
        return machine, background

    def _crossfade(self, cycle: int, offset: int, machine: F32, background: F32, n: int) -> None:
        """Write ``n`` samples of the join into cycle ``cycle`` (equal power: the
        two cycles are uncorrelated noises and tones)."""
        new = self._renderer(cycle)
        assert self._previous is not None
        old_m, old_b = self._previous.take(n)
        new_m, new_b = new.take(n)
        t = (np.arange(offset, offset + n, dtype=np.float64) + 0.5) * (np.pi / 2 / self._xfade)
        fade_in, fade_out = np.sin(t), np.cos(t)
        machine[:n] = new_m * fade_in + old_m * fade_out
        background[:n] = new_b * fade_in + old_b * fade_out
        if offset + n == self._xfade:
            self._previous = None

    def _renderer(self, cycle: int) -> _CycleRenderer:
        """The renderer of ``cycle`` (reads only move forward, one cycle at a time)."""
        if cycle != self._cycle_index or self._current is None:
            seed = self._seed if cycle == 0 else _derive_seed(self._seed, cycle)
            self._previous = self._current if self._xfade else None
            self._current = _CycleRenderer(
                self._unit,
                self._render_segments,
                self._snr_db,
                seed,
                self._rate,
                self._chunk,
                self._level,
                scene_seed=self._seed,
            )
            self._cycle_index = cycle
            logger.debug("fansim stream: cycle %d starts at sample %d", cycle, self._position)
        return self._current
