"""The fan's physics: a healthy unit, its faults, and its dry sound block by block.

Follows ``fan-line.md``: a 7-blade fan with its own shaft rate f_r (20–24 Hz)
and a little speed jitter; a shaft tone at f_r; blade-pass tones at
BPF = 7·f_r and its harmonics up to 4·BPF, each weaker than the last; 50 Hz
mains hum with its 2nd and 3rd harmonics; pink-ish airflow noise of about
the tones' power. The faults change that sound:

* imbalance: shaft tone ×3–6, amplitude modulation of the whole sound at f_r
  (depth 25–60 %), which also puts sidebands at BPF ± f_r;
* clogging: speed ×1.05–1.15, airflow 3–8 dB quieter, slow surging (0.3–2 Hz,
  depth 15–30 %), a narrow-band whistle between 1.2 and 3 kHz;
* voltage change: speed ×0.65–0.80 or ×1.20–1.35 (every shaft-locked tone
  moves), hum richer (harmonics up to the 7th, stronger 2nd and 3rd).

Faults no class names, for the per-unit baseline and its ``unknown`` verdict:
bearing wear (impacts at a non-integer shaft order ringing a resonance),
a rubbing blade (a friction burst once per revolution) and a loose guard
(a rattle driven by the rotation).

Amplitudes are relative to the blade-pass tone (BPF = 1). How strong each
part is, within or beyond the ranges above, is drawn by :mod:`.world`; this
module only makes sound from the drawn values. Every parameter is a
:class:`Track`: one value per schedule segment, ramping linearly over the
segment's start, so a fault can come in over 20 ms or over several seconds,
and tones stay phase-continuous through any change.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Final

import numpy as np

from soundwatch.sim.dsp import (
    F32,
    F64,
    ColouredNoise,
    Fir,
    NoiseShape,
    Smoothed,
    band_db,
    bin_freqs,
    db_amp,
    db_pow,
    filter_taps,
    noise_frame,
    phasor,
    rng_for,
)

CLASSES: Final[tuple[str, ...]] = ("normal", "imbalance", "clogging", "voltage_change")
#: Faults that none of the classes names.
UNNAMED_FAULTS: Final[tuple[str, ...]] = ("bearing", "rubbing", "loose_guard")
STATES: Final[tuple[str, ...]] = CLASSES + UNNAMED_FAULTS
BLADES: Final = 7
MAINS_HZ: Final = 50.0
HUM_HARMONICS: Final = 7
BPF_HARMONICS: Final = 4

# Independent random streams per concern, so that one choice never shifts
# another's draws (adding a fault segment keeps the airflow noise the same).
TAG_PHASES: Final = 0xA1
TAG_JITTER: Final = 0xA2
TAG_AIRFLOW: Final = 0xA3
TAG_WHISTLE: Final = 0xA4
TAG_IMPACTS: Final = 0xA5
TAG_DRIFT: Final = 0xA6


@dataclass(frozen=True)
class ExtraTone:
    """A steady line of the unit besides the stated ones (motor slots, vanes, bearings' cage).

    ``order`` > 0: locked to the shaft at that (possibly non-integer) order;
    otherwise a fixed frequency ``freq_hz``. ``amp`` is re BPF.
    """

    amp: float
    order: float = 0.0
    freq_hz: float = 0.0


@dataclass(frozen=True)
class Unit:
    """One fan unit's own healthy character; fixed for its lifetime."""

    unit_id: int
    shaft_hz: float
    shaft_amp: float
    bpf_amps: tuple[float, ...]
    hum_amps: tuple[float, ...]  # harmonics 1..HUM_HARMONICS (zeros where absent)
    airflow_db: float  # airflow power re the healthy tones' power
    airflow: NoiseShape
    extra_tones: tuple[ExtraTone, ...]
    jitter_rms: float
    jitter_tau_s: float
    blades: int = BLADES
    # Blade-pass tones are not perfectly steady: their amplitude flutters
    # (relative rms) with a correlation time, as real aerodynamic tones do.
    flutter_rms: float = 0.0
    flutter_tau_s: float = 0.1

    @property
    def bpf_hz(self) -> float:
        return self.blades * self.shaft_hz

    @property
    def tone_power(self) -> float:
        """Mean square of the healthy tones (sum of A²/2)."""
        amps = (self.shaft_amp, *self.bpf_amps, *self.hum_amps, *(t.amp for t in self.extra_tones))
        return float(sum(a * a for a in amps) / 2.0)


@dataclass(frozen=True)
class Faults:
    """How each fault shows on one recording (a recurring fault is the same fault)."""

    imbalance_shaft_gain: float
    imbalance_am_depth: float
    clogging_speed: float
    clogging_airflow_db: float
    clogging_surge_hz: float
    clogging_surge_depth: float
    clogging_whistle_hz: float
    clogging_whistle_bw_hz: float
    clogging_whistle_db: float  # re the healthy airflow power
    voltage_speed: float
    voltage_hum_gains: tuple[float, ...]  # multiplies hum harmonics 1..7 (re the unit's)
    voltage_hum_new: tuple[float, ...]  # added harmonics 1..7, re the hum fundamental
    bearing_order: float  # impacts per revolution (non-integer)
    bearing_resonance_hz: float
    bearing_db: float  # impact train power re the healthy airflow power
    rubbing_db: float
    rubbing_band_hz: float
    rubbing_duty: float  # share of each revolution that rubs
    rattle_db: float
    rattle_resonance_hz: float
    rattle_order: float

    def speed(self, state: str) -> float:
        """Shaft speed in ``state`` relative to the unit's nominal speed."""
        if state == "clogging":
            return self.clogging_speed
        if state == "voltage_change":
            return self.voltage_speed
        return 1.0


@dataclass(frozen=True)
class FanState:
    """What the fan does in one state: absolute linear amplitudes (BPF = 1)."""

    speed: float
    shaft_amp: float
    am_depth: float
    airflow_amp: float
    surge_depth: float
    whistle_amp: float
    bearing_amp: float
    rub_amp: float
    rattle_amp: float
    hum_amps: tuple[float, ...]


def fan_state(unit: Unit, faults: Faults, state: str) -> FanState:
    """The sound-defining values of ``unit`` while in ``state``."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
    airflow = math.sqrt(unit.tone_power * db_pow(unit.airflow_db))
    base = FanState(
        speed=faults.speed(state),
        shaft_amp=unit.shaft_amp,
        am_depth=0.0,
        airflow_amp=airflow,
        surge_depth=0.0,
        whistle_amp=0.0,
        bearing_amp=0.0,
        rub_amp=0.0,
        rattle_amp=0.0,
        hum_amps=unit.hum_amps,
    )
    if state == "imbalance":
        return replace(
            base,
            shaft_amp=unit.shaft_amp * faults.imbalance_shaft_gain,
            am_depth=faults.imbalance_am_depth,
        )
    if state == "clogging":
        return replace(
            base,
            airflow_amp=airflow * db_amp(faults.clogging_airflow_db),
            surge_depth=faults.clogging_surge_depth,
            whistle_amp=airflow * db_amp(faults.clogging_whistle_db),
        )
    if state == "voltage_change":
        fundamental = unit.hum_amps[0]
        hum = tuple(
            a * g + fundamental * n
            for a, g, n in zip(
                unit.hum_amps, faults.voltage_hum_gains, faults.voltage_hum_new, strict=True
            )
        )
        return replace(base, hum_amps=hum)
    if state == "bearing":
        return replace(base, bearing_amp=airflow * db_amp(faults.bearing_db))
    if state == "rubbing":
        return replace(base, rub_amp=airflow * db_amp(faults.rubbing_db))
    if state == "loose_guard":
        return replace(base, rattle_amp=airflow * db_amp(faults.rattle_db))
    return base


@dataclass(frozen=True)
class Segment:
    """One stretch of a schedule, in samples: ``[start, stop)`` plays ``state``.

    The change into this segment ramps over its first ``ramp`` samples.
    """

    state: str
    start: int
    stop: int
    ramp: int = 1


class Track:
    """A value per segment, ramping linearly from the previous one over each segment's ramp."""

    __slots__ = ("_const", "_fp", "_xp")

    def __init__(
        self, values: Sequence[float], segments: Sequence[Segment], wrap: bool = False
    ) -> None:
        xp: list[float] = []
        fp: list[float] = []
        if wrap and values[-1] != values[0]:
            # A looping schedule's next pass: the change from its last state
            # into its first ramps like any other.
            xp += [float(segments[0].start), float(segments[0].start + segments[0].ramp)]
            fp += [float(values[-1]), float(values[0])]
        for i in range(1, len(segments)):
            if values[i] != values[i - 1]:
                start = segments[i].start
                xp += [float(start), float(start + segments[i].ramp)]
                fp += [float(values[i - 1]), float(values[i])]
        self._const: float | None = None if xp else float(values[0])
        self._xp = xp
        self._fp = fp

    @property
    def is_zero(self) -> bool:
        return self._const == 0.0

    @property
    def ever_nonzero(self) -> bool:
        return self._const != 0.0

    def block(self, start: int, stop: int) -> float | F64:
        """Values for samples ``[start, stop)``: a float where constant, else an array."""
        if self._const is not None:
            return self._const
        left = bisect.bisect_right(self._xp, start)
        right = bisect.bisect_left(self._xp, stop - 1)
        v0 = float(np.interp(start, self._xp, self._fp))
        if right <= left and v0 == float(np.interp(stop - 1, self._xp, self._fp)):
            return v0
        return np.interp(np.arange(start, stop, dtype=np.float64), self._xp, self._fp)


def _is_zero(value: float | F64) -> bool:
    return isinstance(value, float) and value == 0.0


def _scale(x: F32, amp: float | F64) -> F32:
    if isinstance(amp, float):
        return x * np.float32(amp)
    return (x * amp).astype(np.float32)


class Voice:
    """The dry sound of one unit through a schedule, rendered block after block.

    ``drift`` adds the slow hour-to-hour wander of a machine on a long recording
    (±``drift`` dB of airflow and tone level, a tenth of that in speed).
    """

    def __init__(
        self,
        unit: Unit,
        faults: Faults,
        segments: Sequence[Segment],
        seed: int,
        sample_rate_hz: int,
        drift_db: float = 0.0,
        start: int = 0,
    ) -> None:
        self.unit = unit
        self.faults = faults
        self.rate = sample_rate_hz
        self._states = [fan_state(unit, faults, s.state) for s in segments]
        self._segments = tuple(segments)
        self._build_tracks(wrap=False)
        rng = rng_for(TAG_PHASES, seed)
        self._phase = rng.random(8 + HUM_HARMONICS + len(unit.extra_tones))
        self._coef = np.exp(2j * np.pi * self._phase).astype(np.complex64)
        self._cycles = float(rng.random())  # shaft position, in revolutions
        self._surge_phase = float(rng.random())
        self._jitter = Smoothed(
            rng_for(TAG_JITTER, seed), unit.jitter_rms, unit.jitter_tau_s, sample_rate_hz, 0.05
        )
        self._flutter = (
            Smoothed(
                rng_for(TAG_DRIFT, seed, 1),
                unit.flutter_rms,
                unit.flutter_tau_s,
                sample_rate_hz,
                0.01,
            )
            if unit.flutter_rms > 0
            else None
        )
        self._drift = (
            Smoothed(rng_for(TAG_DRIFT, seed), drift_db / 2.0, 600.0, sample_rate_hz, 1.0)
            if drift_db > 0
            else None
        )
        frame = noise_frame(sample_rate_hz, 4.0)
        self._airflow = ColouredNoise(
            (TAG_AIRFLOW, seed), unit.airflow.magnitude_db(bin_freqs(frame, sample_rate_hz)), frame
        )
        self._whistle = None
        if self.tracks["whistle_amp"].ever_nonzero:
            frame = noise_frame(sample_rate_hz, faults.clogging_whistle_bw_hz / 4)
            shape = band_db(
                bin_freqs(frame, sample_rate_hz),
                faults.clogging_whistle_hz,
                faults.clogging_whistle_bw_hz,
            )
            self._whistle = ColouredNoise((TAG_WHISTLE, seed), shape, frame)
        self._impacts = _Impacts(faults, seed, sample_rate_hz, self.tracks)
        self._n = start  # negative: a pre-roll in the first state before sample 0

    def _build_tracks(self, wrap: bool) -> None:
        states, segments = self._states, self._segments
        self.tracks = {
            f.name: Track([float(getattr(s, f.name)) for s in states], segments, wrap)
            for f in fields(FanState)
            if f.name != "hum_amps"
        }
        self.hum_tracks = [
            Track([s.hum_amps[h] for s in states], segments, wrap) for h in range(HUM_HARMONICS)
        ]

    def next_cycle(self) -> None:
        """Start the schedule again (phases, noises and drift carry on)."""
        if self._n and not hasattr(self, "_looping"):
            self._looping = True
            self._build_tracks(wrap=True)
            self._impacts.retrack(self.tracks)
        self._n = 0

    def read(self, n: int) -> F32:
        """The next ``n`` samples of the dry fan."""
        s0, s1 = self._n, self._n + n
        self._n = s1
        t = self.tracks
        jitter = self._jitter.read(n)
        drift = self._drift.read(n) if self._drift is not None else None
        increments = (self.unit.shaft_hz / self.rate) * (1.0 + jitter)
        if drift is not None:
            increments *= 1.0 + drift * 0.01  # a tenth of the level drift, in percent
        increments *= t["speed"].block(s0, s1)
        cycles = np.cumsum(increments)
        cycles += self._cycles
        self._cycles = float(cycles[-1])  # not wrapped: non-integer orders need the count
        acc = self._tones(cycles, s0, s1)
        acc += _scale(self._airflow.read(n), t["airflow_amp"].block(s0, s1))
        if self._whistle is not None:
            noise = self._whistle.read(n)  # read always: the noise must stay continuous
            amp = t["whistle_amp"].block(s0, s1)
            if not _is_zero(amp):
                acc += _scale(noise, amp)
        self._impacts.add(acc, cycles, s0, s1)
        if not _is_zero(depth := t["am_depth"].block(s0, s1)):
            # Imbalance: the whole sound breathes once per revolution.
            am = 1.0 + depth * np.cos(2.0 * np.pi * (cycles + self._phase[0]))
            acc = (acc * am).astype(np.float32)
        if not _is_zero(depth := t["surge_depth"].block(s0, s1)):
            surge_cycles = np.arange(s0, s1) * (self.faults.clogging_surge_hz / self.rate)
            surge = 1.0 + depth * np.sin(2.0 * np.pi * (surge_cycles + self._surge_phase))
            acc = (acc * surge).astype(np.float32)
        if drift is not None:
            acc = (acc * 10.0 ** (drift / 20.0)).astype(np.float32)
        return acc

    def _tones(self, cycles: F64, s0: int, s1: int) -> F32:
        """Shaft tone, blade-pass harmonics, other lines and hum.

        Harmonics are powers of one phasor (a complex multiply is far cheaper
        than a sine), each turned by its own random phase.
        """
        unit, t, coef = self.unit, self.tracks, self._coef
        acc = _scale((coef[0] * phasor(cycles)).imag, t["shaft_amp"].block(s0, s1))
        base = phasor(cycles * unit.blades)
        zk = base
        blade = np.zeros(cycles.size, dtype=np.float32)
        for k, amp in enumerate(unit.bpf_amps, start=1):
            if k > 1:
                zk = zk * base
            blade += np.float32(amp) * (coef[k] * zk).imag
        if self._flutter is not None:
            blade *= (1.0 + self._flutter.read(cycles.size)).astype(np.float32)
        acc += blade
        for i, tone in enumerate(unit.extra_tones):
            where = np.asarray(
                cycles * tone.order
                if tone.order > 0
                else np.arange(s0, s1) * (tone.freq_hz / self.rate),
                np.float64,
            )
            acc += np.float32(tone.amp) * (coef[8 + HUM_HARMONICS + i] * phasor(where)).imag
        hum = phasor(np.arange(s0, s1, dtype=np.float64) * (MAINS_HZ / self.rate))
        zh = hum
        for h, track in enumerate(self.hum_tracks, start=1):
            if h > 1:
                zh = zh * hum
            level = track.block(s0, s1)
            if not _is_zero(level):
                acc += _scale((coef[7 + h] * zh).imag, level)
        return acc


class _Impacts:
    """Bearing impacts, rubbing bursts and guard rattle: shaft-driven, rung through resonances."""

    def __init__(self, faults: Faults, seed: int, rate: int, tracks: dict[str, Track]) -> None:
        self._rng = rng_for(TAG_IMPACTS, seed)
        self._faults = faults
        self._tracks = tracks
        taps = filter_taps(rate)
        self._bearing = self._rattle = self._rub = None
        if tracks["bearing_amp"].ever_nonzero:
            self._bearing = _ImpactTrain(
                faults.bearing_order,
                Fir(_resonator(rate, faults.bearing_resonance_hz, 0.15, taps)),
                0.05,
            )
        if tracks["rattle_amp"].ever_nonzero:
            self._rattle = _ImpactTrain(
                faults.rattle_order,
                Fir(_resonator(rate, faults.rattle_resonance_hz, 0.4, taps)),
                0.35,
            )
        if tracks["rub_amp"].ever_nonzero:
            frame = noise_frame(rate, 16.0)
            shape = band_db(
                bin_freqs(frame, rate), faults.rubbing_band_hz, faults.rubbing_band_hz * 0.8
            )
            self._rub = ColouredNoise((TAG_IMPACTS, seed, 1), shape, frame)

    def retrack(self, tracks: dict[str, Track]) -> None:
        self._tracks = tracks

    def add(self, acc: F32, cycles: F64, s0: int, s1: int) -> None:
        for train, name in ((self._bearing, "bearing_amp"), (self._rattle, "rattle_amp")):
            if train is not None:
                out = train.read(cycles, self._rng)
                amp = self._tracks[name].block(s0, s1)
                if not _is_zero(amp):
                    acc += _scale(out, amp)
        if self._rub is not None:
            noise = self._rub.read(cycles.size)
            amp = self._tracks["rub_amp"].block(s0, s1)
            if not _is_zero(amp):
                # Friction over a share of each revolution, with soft edges.
                pos = cycles % 1.0
                duty = self._faults.rubbing_duty
                gate = np.clip(1.0 - np.abs(pos - 0.5) / (duty / 2.0), 0.0, 1.0) ** 0.5
                acc += _scale(noise * gate.astype(np.float32), amp * math.sqrt(1.0 / duty))


class _ImpactTrain:
    """Impacts ``order`` times per revolution with random strength, through a resonance.

    The train is normalised to about unit power.
    """

    def __init__(self, order: float, resonance: Fir, spread: float) -> None:
        self._order = order
        self._fir = resonance
        self._spread = spread
        self._next = 0.0  # impact position in (order-scaled) cycles

    def read(self, cycles: F64, rng: np.random.Generator) -> F32:
        scaled = cycles * self._order
        x = np.zeros(cycles.size)
        if self._next < scaled[0]:
            self._next = math.ceil(scaled[0])
        while self._next <= scaled[-1]:
            i = int(np.searchsorted(scaled, self._next))
            if i < x.size:
                x[i] += 1.0 + self._spread * float(rng.standard_normal())
            self._next += 1.0 + self._spread * 0.2 * float(rng.standard_normal())
        rate_per_sample = max(float(scaled[-1] - scaled[0]) / max(1, cycles.size - 1), 1e-9)
        return (self._fir.process(x) / math.sqrt(rate_per_sample)).astype(np.float32)


def _resonator(rate: int, centre_hz: float, relative_width: float, taps: int) -> F64:
    """A resonance's impulse response (unit energy): a decaying sine, ringing after the hit."""
    n = np.arange(taps, dtype=np.float64)
    decay = math.pi * centre_hz * relative_width / rate  # −3 dB bandwidth → decay per sample
    h = np.exp(-decay * n) * np.sin(2.0 * np.pi * centre_hz / rate * n)
    return h / math.sqrt(float(np.square(h).sum()) or 1.0)
