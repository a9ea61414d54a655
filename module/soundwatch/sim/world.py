"""The simulated world: what is drawn, from which ranges, in which families.

``fan-line.md`` fixes the fan's physics and leaves much open: how loud each
tone is, the colour of the noises, the room, the microphone, levels and SNRs
between those listed, how strong a fault is within its range. A model trained
on one choice of all that learns the choice. Here every open choice is a
random draw, so the model must learn what stays true across them.

Draws are grouped into **families** (room type, how the room is modelled,
background colour, microphone type, fault strength, AGC, background event
kinds). A family can be left out of training and used only for testing: that
is how generalisation is measured, rather than on more clips of the same
generator (:func:`draw_take` with ``exclude``).

Fault strengths are drawn per parameter at a position ``u`` along its stated
range (0 = weakest end, 1 = strongest end); the ``weak`` and ``strong``
families reach 25 % beyond the stated range on their side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from soundwatch.sim.dsp import NoiseShape, db_amp, rng_for
from soundwatch.sim.fan import BPF_HARMONICS, CLASSES, HUM_HARMONICS, ExtraTone, Faults, Unit
from soundwatch.sim.scene import (
    EVENT_KINDS,
    Agc,
    Background,
    BackgroundTone,
    Event,
    Impairment,
    Mic,
    Room,
    Scene,
)

FAMILIES: Final[dict[str, tuple[str, ...]]] = {
    "room": ("dry", "medium", "live"),
    "room_model": ("tail", "reflections", "image"),
    "noise": ("white", "pink", "brown"),
    "mic": ("flat", "bandlimited", "resonant"),
    "strength": ("weak", "stated", "strong"),
    "agc": ("off", "on"),
}
#: Each event kind is a family of its own under the key ``events``.
EVENT_FAMILY: Final = "events"

_STRENGTH_U: Final = {"weak": (-0.25, 0.34), "stated": (0.33, 0.67), "strong": (0.66, 1.25)}
TAG_UNIT: Final = 0xC1
TAG_TAKE: Final = 0xC2


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _log_u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _bumps(
    rng: np.random.Generator, count: int, lo_hz: float, hi_hz: float, gain_db: float
) -> tuple[tuple[float, float, float], ...]:
    return tuple(
        (_log_u(rng, lo_hz, hi_hz), _u(rng, -gain_db, gain_db), _u(rng, 0.2, 1.2))
        for _ in range(count)
    )


def _away_from(value: float, avoid: Sequence[float], margin: float) -> bool:
    return all(abs(value - a) > margin for a in avoid)


def draw_unit(unit_id: int, seed: int = 0) -> Unit:
    """Unit ``unit_id`` of the line made with ``seed``: its own healthy character.

    Shaft rate 20–24 Hz as stated; everything else is open in ``fan-line.md``
    and drawn wide: shaft tone −30…0 dB re BPF, each BPF harmonic 0.25–0.85
    of the one before, hum −24…0 dB re BPF with its 2nd and 3rd each 2–12 dB
    below the one before (and in a third of units faint higher harmonics,
    22–40 dB down, as real motors have), airflow −6…+6 dB re the tones,
    flat up to a knee (1–600 Hz) and falling with a slope of 0.3–1.8 above
    it, with its own band limits and bumps, up to ten other steady lines of
    the unit as real fans have (shaft-locked at orders that are not
    blade-pass sidebands, or fixed), 0.2–1 % speed jitter and 0–12 % flutter of the
    blade-pass tones.
    """
    if unit_id < 0 or seed < 0:
        raise ValueError("unit_id and seed must be non-negative")
    rng = rng_for(TAG_UNIT, seed, unit_id)
    shaft_hz = _u(rng, 20.0, 24.0)
    bpf = [1.0]
    for _ in range(BPF_HARMONICS - 1):
        bpf.append(bpf[-1] * _u(rng, 0.25, 0.85))
    hum = [db_amp(_u(rng, -24.0, 0.0))]
    for _ in range(2):
        hum.append(hum[-1] * db_amp(-_u(rng, 2.0, 12.0)))
    faint = rng.random() < 1 / 3
    hum += [
        hum[0] * db_amp(-_u(rng, 22.0, 40.0)) if faint else 0.0 for _ in range(3, HUM_HARMONICS)
    ]
    extra = []
    for _ in range(int(rng.integers(0, 11))):
        amp = db_amp(_u(rng, -32.0, -3.0))
        if rng.random() < 0.5:
            order = _u(rng, 1.5, 40.0)
            sidebands = [7 * k + d for k in range(1, 5) for d in (-1, 0, 1)] + [1.0]
            if _away_from(order, sidebands, 0.3):
                extra.append(ExtraTone(amp=amp, order=order))
        else:
            freq = _log_u(rng, 60.0, 1500.0)
            if _away_from(freq, [50.0 * k for k in range(1, 31)], 3.0):
                extra.append(ExtraTone(amp=amp, freq_hz=freq))
    return Unit(
        unit_id=unit_id,
        shaft_hz=shaft_hz,
        shaft_amp=db_amp(_u(rng, -30.0, 0.0)),
        bpf_amps=tuple(bpf),
        hum_amps=tuple(hum),
        airflow_db=_u(rng, -6.0, 6.0),
        airflow=NoiseShape(
            slope=_u(rng, 0.3, 1.8),
            highpass_hz=_u(rng, 20.0, 80.0),
            lowpass_hz=_u(rng, 1500.0, 7000.0),
            bumps=_bumps(rng, int(rng.integers(0, 4)), 100.0, 4000.0, 6.0),
            knee_hz=_log_u(rng, 1.0, 600.0),
        ),
        extra_tones=tuple(extra),
        jitter_rms=_u(rng, 0.002, 0.010),
        jitter_tau_s=_u(rng, 0.2, 2.0),
        flutter_rms=_u(rng, 0.0, 0.12),
        flutter_tau_s=_log_u(rng, 0.03, 0.5),
    )


def draw_faults(rng: np.random.Generator, strength: str) -> Faults:
    """One recording's faults, each parameter at its own position in the family's range."""
    lo, hi = _STRENGTH_U[strength]

    def along(weak: float, strong: float) -> float:
        return weak + (strong - weak) * _u(rng, lo, hi)

    whistle_bw = _log_u(rng, 4.0, 60.0)
    under = rng.random() < 0.5
    hum_new = [db_amp(along(-16.0, -4.0))]
    while len(hum_new) < HUM_HARMONICS - 3:
        hum_new.append(hum_new[-1] * db_amp(-_u(rng, 0.5, 4.0)))
    gain23 = along(1.5, 4.0)
    order = _u(rng, 2.5, 6.5)
    if abs(order - round(order)) < 0.15:
        order += 0.3
    return Faults(
        imbalance_shaft_gain=along(3.0, 6.0),
        imbalance_am_depth=along(0.25, 0.60),
        clogging_speed=along(1.05, 1.15),
        clogging_airflow_db=along(-3.0, -8.0),
        clogging_surge_hz=_u(rng, 0.3, 2.0),
        clogging_surge_depth=along(0.15, 0.30),
        clogging_whistle_hz=_u(rng, 1200.0 + whistle_bw / 2, 3000.0 - whistle_bw / 2),
        clogging_whistle_bw_hz=whistle_bw,
        clogging_whistle_db=along(-18.0, -4.0),
        voltage_speed=along(0.80, 0.65) if under else along(1.20, 1.35),
        voltage_hum_gains=(1.0, gain23, gain23 * _u(rng, 0.8, 1.25), 1.0, 1.0, 1.0, 1.0),
        voltage_hum_new=(0.0, 0.0, 0.0, *hum_new),
        bearing_order=order,
        bearing_resonance_hz=_u(rng, 1500.0, 5000.0),
        bearing_db=_u(rng, -12.0, 3.0),
        rubbing_db=_u(rng, -15.0, 0.0),
        rubbing_band_hz=_u(rng, 1000.0, 4000.0),
        rubbing_duty=_u(rng, 0.1, 0.35),
        rattle_db=_u(rng, -12.0, 0.0),
        rattle_resonance_hz=_u(rng, 300.0, 1500.0),
        rattle_order=float(rng.choice([1.0, 2.0])) * _u(rng, 0.98, 1.02),
    )


def draw_room(rng: np.random.Generator, kind: str, model: str) -> Room:
    rt60, drr = {
        "dry": ((0.02, 0.10), (10.0, 25.0)),
        "medium": ((0.10, 0.35), (3.0, 15.0)),
        "live": ((0.35, 0.80), (-2.0, 8.0)),
    }[kind]
    near = None
    if rng.random() < 0.5:
        near = (_u(rng, 0.2, 0.7) * float(rng.choice([-1.0, 1.0])), _log_u(rng, 0.0005, 0.008))
    return Room(
        model=model,
        rt60_s=_u(rng, *rt60),
        drr_db=_u(rng, *drr),
        predelay_s=_u(rng, 0.001, 0.01),
        near_reflection=near,
    )


def draw_mic(rng: np.random.Generator, kind: str) -> Mic:
    mic = _draw_mic(rng, kind)
    if rng.random() < 0.5:
        return replace(mic, self_noise_dbfs=_u(rng, -95.0, -72.0))
    return mic


def _draw_mic(rng: np.random.Generator, kind: str) -> Mic:
    if kind == "flat":
        return Mic(
            highpass_hz=_u(rng, 10.0, 40.0),
            highpass_order=int(rng.integers(1, 3)),
            lowpass_hz=_u(rng, 6500.0, 7800.0),
            lowpass_order=int(rng.integers(2, 5)),
            bumps=_bumps(rng, int(rng.integers(0, 2)), 200.0, 6000.0, 2.0),
        )
    if kind == "bandlimited":
        return Mic(
            highpass_hz=_u(rng, 60.0, 200.0),
            highpass_order=int(rng.integers(2, 5)),
            lowpass_hz=_u(rng, 2500.0, 5000.0),
            lowpass_order=int(rng.integers(2, 6)),
            bumps=_bumps(rng, int(rng.integers(0, 2)), 200.0, 4000.0, 3.0),
        )
    return Mic(
        highpass_hz=_u(rng, 20.0, 80.0),
        highpass_order=int(rng.integers(1, 4)),
        lowpass_hz=_u(rng, 5000.0, 7500.0),
        lowpass_order=int(rng.integers(2, 5)),
        bumps=_bumps(rng, int(rng.integers(2, 5)), 200.0, 5000.0, 8.0),
    )


def draw_background(rng: np.random.Generator, colour: str) -> Background:
    slope = {"white": (0.0, 0.7), "pink": (0.7, 1.4), "brown": (1.4, 2.4)}[colour]
    tones = []
    if rng.random() < 0.55:
        for _ in range(int(rng.integers(1, 4))):
            tones.append(
                BackgroundTone(
                    freq_hz=_log_u(rng, 60.0, 1500.0),
                    level_db=_u(rng, -15.0, 3.0),
                    h2_db=_u(rng, -25.0, -6.0),
                    h3_db=_u(rng, -30.0, -10.0),
                )
            )
    return Background(
        noise=NoiseShape(
            slope=_u(rng, *slope),
            highpass_hz=_u(rng, 5.0, 30.0),
            lowpass_hz=_u(rng, 3000.0, 8000.0),
            bumps=_bumps(rng, int(rng.integers(0, 4)), 60.0, 5000.0, 6.0),
            knee_hz=_log_u(rng, 1.0, 80.0),
        ),
        tones=tuple(tones),
        wander_db=_u(rng, 0.0, 2.0),
        wander_tau_s=_log_u(rng, 0.3, 20.0),
    )


_EVENT_DURATION_S: Final = {
    "knock": (0.05, 1.0),
    "beeper": (2.0, 9.0),
    "truck": (5.0, 12.0),
    "speech": (1.0, 6.0),
    "door": (0.5, 2.5),
    "hiss": (0.5, 4.0),
    "hammer": (2.0, 8.0),
    "clatter": (0.5, 3.0),
    "siren": (2.0, 8.0),
}


def draw_event(
    rng: np.random.Generator,
    kind: str,
    start_s: float,
    level_db: tuple[float, float] = (-3.0, 15.0),
) -> Event:
    """One background event of ``kind`` starting at ``start_s`` (level re the steady background)."""
    return Event(
        kind=kind,
        start_s=start_s,
        duration_s=_u(rng, *_EVENT_DURATION_S[kind]),
        level_db=_u(rng, *level_db),
        seed=int(rng.integers(0, 2**31)),
    )


@dataclass(frozen=True)
class Take:
    """Everything one recording is drawn with, and the families it belongs to."""

    unit: Unit
    faults: Faults
    scene: Scene
    families: Mapping[str, str]


@dataclass(frozen=True)
class Mixture:
    """How often the extras of a real line appear in drawn clips (probabilities per clip)."""

    events_per_clip: float = 0.8
    dropout: float = 0.06
    level_step: float = 0.05
    clipping: float = 0.05


def draw_take(
    unit: Unit,
    seed: int,
    duration_s: float,
    snr_db: float | None = None,
    *,
    exclude: Mapping[str, Sequence[str]] | None = None,
    only: Mapping[str, Sequence[str]] | None = None,
    mixture: Mixture | None = None,
) -> Take:
    """One recording's faults and scene, deterministic in ``seed``.

    ``exclude`` leaves families out (``{"room": ["live"], "events": ["speech"]}``);
    ``only`` restricts to families. ``snr_db`` None draws it in −10…+12 dB.
    ``mixture`` None gives a clean clip (no events, dropouts, steps or clipping).
    """
    rng = rng_for(TAG_TAKE, seed)
    exclude = exclude or {}
    only = only or {}

    def family(key: str, choices: Sequence[str]) -> str:
        allowed = [
            c
            for c in choices
            if c not in exclude.get(key, ()) and (key not in only or c in only[key])
        ]
        if not allowed:
            raise ValueError(f"every {key} family is excluded")
        return str(allowed[int(rng.integers(0, len(allowed)))])

    fams = {key: family(key, choices) for key, choices in FAMILIES.items()}
    faults = draw_faults(rng, fams["strength"])
    agc = None
    if fams["agc"] == "on":
        agc = Agc(
            target_dbfs=_u(rng, -32.0, -15.0),
            time_s=_u(rng, 0.3, 3.0),
            max_gain_db=_u(rng, 6.0, 20.0),
        )
    snr = _u(rng, -10.0, 12.0) if snr_db is None else float(snr_db)
    peak = _u(rng, -42.0, -3.0)
    events: list[Event] = []
    impairments: list[Impairment] = []
    if mixture is not None:
        kinds = [k for k in EVENT_KINDS if k not in exclude.get(EVENT_FAMILY, ())]
        if EVENT_FAMILY in only:
            kinds = [k for k in kinds if k in only[EVENT_FAMILY]]
        for _ in range(int(rng.poisson(mixture.events_per_clip)) if kinds else 0):
            kind = kinds[int(rng.integers(0, len(kinds)))]
            span = _EVENT_DURATION_S[kind][1]
            events.append(draw_event(rng, kind, _u(rng, -span * 0.5, duration_s)))
        if rng.random() < mixture.dropout:
            for _ in range(int(rng.integers(1, 4))):
                impairments.append(
                    Impairment("dropout", _u(rng, 0.0, duration_s), _log_u(rng, 0.01, 2.5))
                )
        if rng.random() < mixture.level_step:
            step = _u(rng, 3.0, 15.0) * float(rng.choice([-1.0, 1.0]))
            impairments.append(
                Impairment("level_step", _u(rng, 0.5, duration_s - 0.5), gain_db=step)
            )
        if rng.random() < mixture.clipping:
            start = _u(rng, 0.0, duration_s) if rng.random() < 0.5 else 0.0
            impairments.append(
                Impairment("clip", start, duration_s - start, gain_db=-peak + _u(rng, 1.0, 12.0))
            )
    scene = Scene(
        room=draw_room(rng, fams["room"], fams["room_model"]),
        mic=draw_mic(rng, fams["mic"]),
        background=draw_background(rng, fams["noise"]),
        snr_db=snr,
        peak_dbfs=peak,
        agc=agc,
        events=tuple(events),
        impairments=tuple(impairments),
    )
    return Take(unit=unit, faults=faults, scene=scene, families=fams)


def is_named(state: str) -> bool:
    """True for the classes the classifier knows."""
    return state in CLASSES
