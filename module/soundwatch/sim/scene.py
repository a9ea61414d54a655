"""Where the fan is heard: the room, the microphone, the factory around it.

A :class:`Scene` holds everything that is not the fan: the room's response
between fan and microphone, the microphone's own response and band limits,
the steady factory background (coloured noise, unrelated machine tones), the
background events of a real line (knocks, a reversing beeper, a passing
truck, speech, a door, and a few more), and what happens to the signal on its
way to the file: an automatic gain control, level steps when someone touches
the gain, short dropouts and clipping. None of these is the fan, so none of
them changes what state the fan is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from soundwatch.sim.dsp import (
    F32,
    F64,
    ColouredNoise,
    Fir,
    NoiseShape,
    Smoothed,
    bin_freqs,
    bumps_db,
    db_amp,
    design_fir,
    filter_taps,
    highpass_db,
    lowpass_db,
    noise_frame,
    phasor,
    power,
    rng_for,
)

#: Background events. The first five are those ``fan-line.md`` names.
EVENT_KINDS: Final[tuple[str, ...]] = (
    "knock",
    "beeper",
    "truck",
    "speech",
    "door",
    "hiss",
    "hammer",
    "clatter",
    "siren",
)
ROOM_MODELS: Final[tuple[str, ...]] = ("tail", "reflections", "image")
SPEED_OF_SOUND: Final = 343.0
TAG_ROOM: Final = 0xB1
TAG_BACKGROUND: Final = 0xB2
TAG_EVENT: Final = 0xB3


@dataclass(frozen=True)
class Room:
    """Fan to microphone: direct sound, maybe early reflections, an exponential tail."""

    model: str  # one of ROOM_MODELS
    rt60_s: float
    drr_db: float  # direct-to-reverberant energy ratio
    predelay_s: float
    # A hard surface close to the microphone (floor, housing, wall): one strong
    # early reflection that comb-filters the spectrum. (gain, delay in s)
    near_reflection: tuple[float, float] | None = None


@dataclass(frozen=True)
class Mic:
    """The microphone and its preamp: band limits and a few resonances (dB, octaves)."""

    highpass_hz: float
    highpass_order: int
    lowpass_hz: float
    lowpass_order: int
    bumps: tuple[tuple[float, float, float], ...] = ()
    self_noise_dbfs: float | None = None  # the preamp's own hiss in the file (rms)


@dataclass(frozen=True)
class BackgroundTone:
    """An unrelated machine's line with two harmonics; levels re the background noise."""

    freq_hz: float
    level_db: float
    h2_db: float
    h3_db: float


@dataclass(frozen=True)
class Background:
    """Steady factory background: noise of a given colour, and unrelated tones."""

    noise: NoiseShape
    tones: tuple[BackgroundTone, ...] = ()
    wander_db: float = 0.0  # slow level wander of the noise (rms, dB)
    wander_tau_s: float = 2.0


@dataclass(frozen=True)
class Event:
    """One background event at ``start_s`` for ``duration_s``; its power while it
    sounds is ``level_db`` re the steady background."""

    kind: str
    start_s: float
    duration_s: float
    level_db: float
    seed: int


@dataclass(frozen=True)
class Impairment:
    """Something that happens to the signal, not to the sound.

    ``dropout``: zeros for ``duration_s``. ``level_step``: the gain moves by
    ``gain_db`` at ``start_s`` and stays. ``clip``: from ``start_s`` for
    ``duration_s`` the signal is driven ``gain_db`` harder into full scale.
    """

    kind: str
    start_s: float
    duration_s: float = 0.0
    gain_db: float = 0.0


@dataclass(frozen=True)
class Agc:
    """A slow automatic gain control that pulls the RMS towards ``target_dbfs``."""

    target_dbfs: float
    time_s: float
    max_gain_db: float


@dataclass(frozen=True)
class Scene:
    """Everything around one recording of the fan."""

    room: Room
    mic: Mic
    background: Background
    snr_db: float
    peak_dbfs: float
    agc: Agc | None = None
    events: tuple[Event, ...] = ()
    impairments: tuple[Impairment, ...] = ()


# -- room and microphone ------------------------------------------------------


def room_ir(room: Room, seed: int, rate: int) -> F64:
    """The room's impulse response (direct sound first, at sample 0).

    ``tail``: the direct impulse and an exponentially decaying noise tail at
    the DRR. ``reflections``: a handful of discrete early reflections as well.
    ``image``: a shoebox hall by the image-source method (walls, floor and
    ceiling up to the 2nd image in each direction, absorption from Sabine's
    formula for the RT60), so near reflections comb-filter the spectrum as a
    real room does, plus a diffuse tail for what the images leave out.
    """
    rng = rng_for(TAG_ROOM, seed)
    ir = _image_source_ir(rng, room, rate) if room.model == "image" else _tail_ir(rng, room, rate)
    if room.near_reflection is not None:
        gain, delay_s = room.near_reflection
        at = max(1, round(delay_s * rate))
        if at >= ir.size:
            ir = np.concatenate([ir, np.zeros(at + 1 - ir.size)])
        ir[at] += gain
    return ir


def _tail_ir(rng: np.random.Generator, room: Room, rate: int) -> F64:
    length = max(2, math.ceil(room.rt60_s * rate))
    delay = min(length - 1, max(1, round(room.predelay_s * rate)))
    n = np.arange(length - delay, dtype=np.float64)
    tail = rng.standard_normal(n.size) * 10.0 ** (-3.0 * n / (room.rt60_s * rate))
    if room.model == "reflections":
        early = np.zeros(n.size)
        for _ in range(int(rng.integers(3, 9))):
            at = int(rng.uniform(0.0, min(0.04, room.rt60_s / 3)) * rate)
            if at < n.size:
                early[at] += float(rng.uniform(0.3, 1.5)) * float(rng.choice([-1.0, 1.0]))
        scale = math.sqrt(float(np.square(tail).sum()) / max(1e-12, float(np.square(early).sum())))
        tail = tail * 0.6 + early * scale * 0.4
    tail *= math.sqrt(10.0 ** (-room.drr_db / 10.0) / max(1e-12, float(np.square(tail).sum())))
    ir = np.zeros(length)
    ir[0] = 1.0
    ir[delay:] += tail
    return ir


def _image_source_ir(rng: np.random.Generator, room: Room, rate: int) -> F64:
    size = np.array([rng.uniform(4.0, 30.0), rng.uniform(3.0, 20.0), rng.uniform(2.5, 10.0)])
    source = np.array([rng.uniform(0.5, d - 0.5) for d in size])
    distance = float(np.exp(rng.uniform(math.log(0.3), math.log(3.0))))
    direction = rng.standard_normal(3)
    mic = np.clip(source + direction / np.linalg.norm(direction) * distance, 0.2, size - 0.2)
    direct = float(np.linalg.norm(mic - source))
    volume = float(np.prod(size))
    surface = 2.0 * float(size[0] * size[1] + size[0] * size[2] + size[1] * size[2])
    absorption = min(0.95, 0.161 * volume / (surface * room.rt60_s))
    beta = math.sqrt(1.0 - absorption)
    orders = np.arange(-2, 3)
    delays, amps = [], []
    for parity in np.ndindex(2, 2, 2):
        p = np.array(parity)
        for n in np.stack(np.meshgrid(orders, orders, orders, indexing="ij"), -1).reshape(-1, 3):
            image = (1 - 2 * p) * source + 2 * n * size
            r = float(np.linalg.norm(image - mic))
            bounces = int(np.abs(n - p).sum() + np.abs(n).sum())
            delays.append((r - direct) / SPEED_OF_SOUND * rate)
            amps.append(beta**bounces * direct / max(r, 1e-3))
    d = np.asarray(delays)
    a = np.asarray(amps)
    length = max(2, math.ceil(room.rt60_s * rate), int(d.max()) + 2)
    ir = np.zeros(length)
    # Fractional delays by linear interpolation between neighbouring samples.
    i0 = np.floor(d).astype(np.intp)
    frac = d - i0
    np.add.at(ir, i0, a * (1.0 - frac))
    np.add.at(ir, np.minimum(i0 + 1, length - 1), a * frac)
    # The diffuse tail carries what higher orders would, decaying by 60 dB over RT60.
    start = int(d[a < 0.999].min()) if np.any(a < 0.999) else 1
    after = np.arange(length - start, dtype=np.float64)
    tail = rng.standard_normal(after.size) * 10.0 ** (-3.0 * after / (room.rt60_s * rate))
    reflected = float(np.square(ir[1:]).sum())
    tail *= math.sqrt(max(reflected, 1e-6) * beta**6 / max(1e-12, float(np.square(tail).sum())))
    ir[start:] += tail
    # The drawn DRR holds exactly (the geometry sets the reflections' pattern).
    ir[1:] *= math.sqrt(10.0 ** (-room.drr_db / 10.0) / max(1e-12, float(np.square(ir[1:]).sum())))
    return ir


def mic_taps(mic: Mic, rate: int) -> F64:
    """The microphone's response as a FIR."""
    taps = filter_taps(rate)
    freqs = bin_freqs(taps, rate)
    shape = (
        highpass_db(freqs, mic.highpass_hz, mic.highpass_order)
        + lowpass_db(freqs, min(mic.lowpass_hz, 0.49 * rate), mic.lowpass_order)
        + bumps_db(freqs, mic.bumps)
    )
    return design_fir(shape, taps)


# -- the steady background ----------------------------------------------------


class BackgroundVoice:
    """Unit-power steady background (noise plus tones), block after block."""

    def __init__(self, background: Background, seed: int, rate: int) -> None:
        frame = noise_frame(rate, 4.0)
        self._noise = ColouredNoise(
            (TAG_BACKGROUND, seed), background.noise.magnitude_db(bin_freqs(frame, rate)), frame
        )
        rng = rng_for(TAG_BACKGROUND, seed, 1)
        self._tones = [
            (t, rng.random(3))
            for t in background.tones
            if t.freq_hz * 3 < rate / 2 or t.freq_hz < rate / 2
        ]
        tone_power = sum(
            db_amp(2 * t.level_db) * (1 + db_amp(2 * t.h2_db) + db_amp(2 * t.h3_db)) / 2
            for t, _ in self._tones
        )
        self._gain = 1.0 / math.sqrt(1.0 + tone_power)
        self._rate = rate
        self._n = 0
        self._wander = (
            Smoothed(
                rng_for(TAG_BACKGROUND, seed, 2),
                background.wander_db,
                background.wander_tau_s,
                rate,
                0.02,
            )
            if background.wander_db > 0
            else None
        )

    def read(self, n: int) -> F32:
        x = self._noise.read(n)
        if self._wander is not None:
            x *= (10.0 ** (self._wander.read(n) / 20.0)).astype(np.float32)
        s = np.arange(self._n, self._n + n, dtype=np.float64)
        for tone, phase in self._tones:
            z = phasor(s * (tone.freq_hz / self._rate))
            zk = z
            for k, rel_db in ((1, 0.0), (2, tone.h2_db), (3, tone.h3_db)):
                if k > 1:
                    zk = zk * z
                if tone.freq_hz * k < self._rate / 2:
                    coef = np.complex64(
                        db_amp(tone.level_db + rel_db) * np.exp(2j * np.pi * phase[k - 1])
                    )
                    x += (coef * zk).imag
        self._n += n
        return x * np.float32(self._gain)


# -- events -------------------------------------------------------------------


def render_event(event: Event, rate: int) -> F32:
    """An event's sound, unit power over its active part, ``duration_s`` long."""
    rng = rng_for(TAG_EVENT, event.seed)
    n = max(1, round(event.duration_s * rate))
    maker = _EVENT_MAKERS[event.kind]
    x = maker(rng, n, rate)
    p = power(x)
    return (x / math.sqrt(p) if p > 0 else x).astype(np.float32)


def _decay_ring(rate: int, freq: float, decay_s: float, n: int) -> F64:
    t = np.arange(n) / rate
    return np.exp(-t / decay_s) * np.sin(2 * np.pi * freq * t)


def _impact(rng: np.random.Generator, rate: int, low: float, high: float) -> F64:
    """One hit: a click and a few decaying modes."""
    n = round(rate * 0.3)
    x = np.zeros(n)
    x[: max(2, rate // 2000)] += rng.standard_normal(max(2, rate // 2000))
    for _ in range(int(rng.integers(1, 4))):
        f = float(np.exp(rng.uniform(math.log(low), math.log(high))))
        if f < rate / 2:
            x += rng.uniform(0.3, 1.0) * _decay_ring(rate, f, rng.uniform(0.01, 0.07), n)
    return x


def _place(x: F64, piece: F64, at: int) -> None:
    if at >= x.size:
        return
    k = min(piece.size, x.size - at)
    x[at : at + k] += piece[:k]


def _knock(rng: np.random.Generator, n: int, rate: int) -> F64:
    x = np.zeros(n)
    for _ in range(int(rng.integers(1, 6))):
        _place(x, _impact(rng, rate, 150.0, 4000.0), int(rng.integers(0, n)))
    return x


def _hammer(rng: np.random.Generator, n: int, rate: int) -> F64:
    x = np.zeros(n)
    period = rng.uniform(0.25, 1.0) * rate
    at = rng.uniform(0, min(period, 0.5 * n))
    hit = _impact(rng, rate, 300.0, 5000.0)
    while at < n:
        _place(x, hit * rng.uniform(0.6, 1.0), int(at))
        at += period * rng.uniform(0.9, 1.1)
    return x


def _clatter(rng: np.random.Generator, n: int, rate: int) -> F64:
    x = np.zeros(n)
    for _ in range(int(rng.integers(8, 40))):
        _place(
            x, _impact(rng, rate, 800.0, 6000.0) * rng.uniform(0.2, 1.0), int(rng.integers(0, n))
        )
    return x


def _beeper(rng: np.random.Generator, n: int, rate: int) -> F64:
    """A reversing beeper: about 1 kHz, on and off every half second."""
    f = rng.uniform(850.0, 1300.0)
    t = np.arange(n) / rate
    tone = np.sin(2 * np.pi * f * t) + rng.uniform(0.0, 0.3) * np.sin(2 * np.pi * 3 * f * t)
    period, duty = rng.uniform(0.8, 1.2), rng.uniform(0.4, 0.6)
    phase = (t / period + rng.random()) % 1.0
    edge = 0.005 / period
    gate = np.clip(np.minimum(phase, duty - phase) / edge, 0.0, 1.0)
    return tone * gate


def _siren(rng: np.random.Generator, n: int, rate: int) -> F64:
    """A warning tone sweeping up and down."""
    t = np.arange(n) / rate
    f0, depth, sweep = rng.uniform(500, 2500), rng.uniform(0.05, 0.3), rng.uniform(0.3, 2.0)
    freq = f0 * (1 + depth * np.sin(2 * np.pi * sweep * t))
    return np.sin(2 * np.pi * np.cumsum(freq) / rate)


def _envelope(n: int, rng: np.random.Generator) -> F64:
    """Rise and fall (a vehicle passing): raised cosine with its peak off-centre."""
    peak = rng.uniform(0.3, 0.7)
    u = np.linspace(0.0, 1.0, n)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.clip(u / peak, 0, 1))
    fall = 0.5 + 0.5 * np.cos(np.pi * np.clip((u - peak) / (1 - peak), 0, 1))
    return np.where(u < peak, rise, fall)


def _truck(rng: np.random.Generator, n: int, rate: int) -> F64:
    """A passing truck: low rumble and engine harmonics, rising and falling, a slight glide."""
    frame = noise_frame(rate, 4.0)
    freqs = bin_freqs(frame, rate)
    shape = -10 * np.log10(1 + (freqs / rng.uniform(80, 350)) ** 4) - 5 * np.log10(freqs**2 + 400)
    key = (TAG_EVENT, int(rng.integers(0, 2**31)))
    rumble = ColouredNoise(key, shape, frame).read(n).astype(np.float64)
    t = np.arange(n) / rate
    f0 = rng.uniform(25.0, 60.0) * (1 + rng.uniform(-0.08, 0.08) * (t / max(t[-1], 1e-9) - 0.5))
    cycles = np.cumsum(f0) / rate
    engine: F64 = sum(
        (
            rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * cycles + rng.uniform(0, 6.3))
            for k in range(1, int(rng.integers(3, 9)))
        ),
        np.zeros(n),
    )
    mix = rumble / math.sqrt(power(rumble) or 1) + rng.uniform(0.2, 1.0) * engine / math.sqrt(
        power(engine) or 1
    )
    return mix * _envelope(n, rng)


def _speech(rng: np.random.Generator, n: int, rate: int) -> F64:
    """Speech-like: a glottal pulse train through changing formants, syllable rhythm."""
    x = np.zeros(n)
    taps = filter_taps(rate, 0.032)
    freqs = bin_freqs(taps, rate)
    pitch = rng.uniform(90.0, 240.0)
    at = 0
    while at < n:
        syllable = int(rng.uniform(0.12, 0.35) * rate)
        if rng.random() < 0.2:  # a pause
            at += syllable
            continue
        k = min(syllable, n - at)
        t = np.arange(k) / rate
        f0 = pitch * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6.3)))
        cycles = np.cumsum(f0) / rate
        pulses = np.diff(np.floor(cycles), prepend=np.floor(cycles[0])) > 0
        source = pulses.astype(np.float64) + 0.05 * rng.standard_normal(k)
        formants = [
            (rng.uniform(300, 850), 12.0, 0.3),
            (rng.uniform(850, 2300), 8.0, 0.25),
            (rng.uniform(2300, 3200), 4.0, 0.2),
        ]
        shape = bumps_db(freqs, formants) - 6 * np.log2(np.maximum(freqs, 50) / 100)
        voiced = Fir(design_fir(shape, taps)).process(source).astype(np.float64)
        x[at : at + k] += voiced * np.hanning(k) ** 0.5
        at += syllable
    return x


def _door(rng: np.random.Generator, n: int, rate: int) -> F64:
    """A door: a creak (stick-slip pulses through a panel resonance) and/or a slam."""
    x = np.zeros(n)
    if rng.random() < 0.6:
        k = min(n, int(rng.uniform(0.4, 2.0) * rate))
        t = np.arange(k) / rate
        rate_hz = rng.uniform(20, 90) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        pulses = np.diff(np.floor(np.cumsum(rate_hz) / rate), prepend=0.0) > 0
        ring = _decay_ring(rate, rng.uniform(400, 1500), 0.01, rate // 20)
        x[:k] += np.convolve(pulses.astype(np.float64), ring)[:k]
    slam = _decay_ring(rate, rng.uniform(50, 150), rng.uniform(0.08, 0.25), round(rate * 0.5)) * 3
    _place(slam, _impact(rng, rate, 200.0, 3000.0), 0)
    _place(x, slam, int(rng.uniform(0.3, 0.9) * n))
    return x


def _hiss(rng: np.random.Generator, n: int, rate: int) -> F64:
    """Compressed air: bright noise with soft on/off."""
    frame = noise_frame(rate, 32.0)
    freqs = bin_freqs(frame, rate)
    shape = highpass_db(freqs, rng.uniform(800, 3000), 2) + lowpass_db(
        freqs, rng.uniform(4000, 7500), 2
    )
    key = (TAG_EVENT, int(rng.integers(0, 2**31)))
    x = ColouredNoise(key, shape, frame).read(n).astype(np.float64)
    ramp = min(n // 2, int(0.05 * rate))
    gate = np.ones(n)
    if ramp:
        gate[:ramp] = np.linspace(0, 1, ramp)
        gate[-ramp:] = np.linspace(1, 0, ramp)
    return x * gate


_EVENT_MAKERS = {
    "knock": _knock,
    "beeper": _beeper,
    "truck": _truck,
    "speech": _speech,
    "door": _door,
    "hiss": _hiss,
    "hammer": _hammer,
    "clatter": _clatter,
    "siren": _siren,
}


class EventTrack:
    """The scene's events as one signal, read block after block (each rendered when it starts)."""

    def __init__(self, events: tuple[Event, ...], rate: int) -> None:
        self._events = sorted(events, key=lambda e: e.start_s)
        self._rate = rate
        self._active: list[tuple[int, F32, float]] = []  # (start sample, audio, amplitude)
        self._next = 0
        self._n = 0

    def read(self, n: int) -> F32 | None:
        """The next ``n`` samples (unscaled: amplitude re unit background), or None if silent."""
        s0, s1 = self._n, self._n + n
        self._n = s1
        while (
            self._next < len(self._events)
            and round(self._events[self._next].start_s * self._rate) < s1
        ):
            e = self._events[self._next]
            self._active.append(
                (round(e.start_s * self._rate), render_event(e, self._rate), db_amp(e.level_db))
            )
            self._next += 1
        if not self._active:
            return None
        out = np.zeros(n, dtype=np.float32)
        keep = []
        for start, audio, amp in self._active:
            a, b = max(s0, start), min(s1, start + audio.size)
            if a < b:
                out[a - s0 : b - s0] += np.float32(amp) * audio[a - start : b - start]
            if start + audio.size > s1:
                keep.append((start, audio, amp))
        self._active = keep
        return out


# -- on the way to the file ---------------------------------------------------


class SignalChain:
    """AGC, level, level steps, clipping and dropouts, applied block after block."""

    def __init__(self, scene: Scene, rate: int, gain: float, seed: int = 0) -> None:
        self._rate = rate
        self._gain = gain
        noise = scene.mic.self_noise_dbfs
        self._hiss = None if noise is None else (rng_for(TAG_ROOM, seed, 7), db_amp(noise))
        self._agc = scene.agc
        self._agc_db = 0.0
        # The squares of the 10 ms step so far: summed only once the step is
        # whole, so the sum (and every sample after it) does not depend on
        # how the stream was cut into blocks.
        self._agc_squares = np.zeros(max(1, rate // 100))
        self._agc_pos = 0
        self._impairments = scene.impairments
        self._n = 0

    def process(self, x: F32) -> F32:
        n = x.size
        s0 = self._n
        self._n += n
        y = x.astype(np.float64) * self._gain
        if self._hiss is not None:
            y += self._hiss[0].standard_normal(n) * self._hiss[1]
        if self._agc is not None:
            y *= self._agc_gain(y)
        t = (np.arange(s0, s0 + n) + 0.5) / self._rate
        for imp in self._impairments:
            if imp.kind == "level_step":
                y *= np.where(t >= imp.start_s, db_amp(imp.gain_db), 1.0)
        for imp in self._impairments:
            if imp.kind == "clip":
                inside = (t >= imp.start_s) & (t < imp.start_s + imp.duration_s)
                if inside.any():
                    y = np.where(inside, np.clip(y * db_amp(imp.gain_db), -1.0, 1.0), y)
        for imp in self._impairments:
            if imp.kind == "dropout":
                y[(t >= imp.start_s) & (t < imp.start_s + imp.duration_s)] = 0.0
        return np.clip(y, -1.0, 1.0).astype(np.float32)

    def _agc_gain(self, y: F64) -> F64:
        """Gain per sample. It changes every 10 ms of stream time, from the level of the
        10 ms before (input level, so the loop is stable), whatever the block sizes."""
        agc = self._agc
        assert agc is not None
        step = max(1, self._rate // 100)
        alpha = 1.0 - math.exp(-0.01 / agc.time_s)
        gains = np.empty(y.size)
        squares = np.square(y)
        a = 0
        while a < y.size:
            b = min(y.size, a + step - self._agc_pos)
            gains[a:b] = db_amp(self._agc_db)
            self._agc_squares[self._agc_pos : self._agc_pos + b - a] = squares[a:b]
            self._agc_pos += b - a
            if self._agc_pos == step:
                level = 10.0 * math.log10(max(float(self._agc_squares.sum()) / step, 1e-12))
                want = min(agc.max_gain_db, max(-agc.max_gain_db, agc.target_dbfs - level))
                self._agc_db += alpha * (want - self._agc_db)
                self._agc_pos = 0
            a = b
        return gains
