"""Schedules, clips and endless streams: one renderer, read in blocks.

A recording is a :class:`~soundwatch.sim.world.Take` (unit, faults, scene)
played through a schedule of states. :class:`Renderer` makes its three parts
at the microphone (fan, steady background, events) block by block; a clip is
one block, a stream many. What differs is only how the gains are set:

* a **clip** (:func:`render_clip`) sees its whole self, so its SNR is exact
  (machine power over steady background power, both at the microphone, over
  the clip) and its peak lands exactly on the drawn level, as in MIMII;
* a **stream** (:class:`Stream`) cannot look ahead: it measures a few seconds
  of its reference state first and keeps those gains, so the background
  stays one constant noise and the fan's own loudness changes with its state,
  as on a real line.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from soundwatch.sim.dsp import F32, Fir, db_amp, db_pow, power
from soundwatch.sim.fan import STATES, Segment, Voice
from soundwatch.sim.scene import BackgroundVoice, EventTrack, SignalChain, mic_taps, room_ir
from soundwatch.sim.world import Take

MIN_RATE_HZ: Final = 8000
#: Default ramp of a change of state (s); long recordings ramp over seconds.
DEFAULT_RAMP_S: Final = 0.02
#: A stream sets its gains from this much audio of its reference state.
CALIBRATE_S: Final = 4.0
#: RMS-to-peak allowance of a stream's level (a 10 s mixture's median crest).
STREAM_CREST_DB: Final = 13.0


def schedule_segments(
    schedule: Sequence[tuple[str, float]],
    rate: int,
    ramp_s: float | Sequence[float] = DEFAULT_RAMP_S,
) -> tuple[Segment, ...]:
    """Sample-exact segments of ``[(state, seconds), ...]``.

    Boundaries are rounded cumulative times (no drift). ``ramp_s`` is the
    length of each change (one value, or one per segment; the first is unused).
    """
    if rate < MIN_RATE_HZ:
        raise ValueError(f"sample rate must be >= {MIN_RATE_HZ} Hz, got {rate}")
    if not schedule:
        raise ValueError("schedule is empty")
    ramps = [ramp_s] * len(schedule) if isinstance(ramp_s, int | float) else list(ramp_s)
    segments: list[Segment] = []
    elapsed, start = 0.0, 0
    for (state, seconds), ramp in zip(schedule, ramps, strict=True):
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"segment duration must be positive, got {seconds!r}")
        elapsed += float(seconds)
        stop = round(elapsed * rate)
        ramp_n = max(1, min(round(ramp * rate), stop - start))
        if stop - start < 2:
            raise ValueError(f"segment {state}:{seconds} is too short")
        segments.append(Segment(state, start, stop, ramp_n))
        start = stop
    return tuple(segments)


def state_fractions(segments: Sequence[Segment], start: int, stop: int) -> dict[str, float]:
    """How much of ``[start, stop)`` each state fills; a ramp counts half to each side."""
    weights: dict[str, float] = {}
    total = max(1, stop - start)
    for i, seg in enumerate(segments):
        a, b = max(start, seg.start), min(stop, seg.stop)
        if a >= b:
            continue
        weights[seg.state] = weights.get(seg.state, 0.0) + (b - a)
        if i > 0:  # the ramp at this segment's start is half the previous state's
            r0, r1 = max(start, seg.start), min(stop, seg.start + seg.ramp)
            if r1 > r0:
                half = (r1 - r0) / 2.0
                weights[seg.state] -= half
                prev = segments[i - 1].state
                weights[prev] = weights.get(prev, 0.0) + half
    return {k: v / total for k, v in weights.items() if v > 0}


@dataclass(frozen=True)
class Parts:
    """One block at the microphone, before the scene's gains."""

    machine: F32
    background: F32
    events: F32 | None


class Renderer:
    """Makes a take's fan, background and events at the microphone, block after block."""

    def __init__(
        self,
        take: Take,
        segments: Sequence[Segment],
        seed: int,
        rate: int,
        drift_db: float = 0.0,
    ) -> None:
        if rate < MIN_RATE_HZ:
            raise ValueError(f"sample rate must be >= {MIN_RATE_HZ} Hz, got {rate}")
        scene = take.scene
        self.take = take
        self.segments = tuple(segments)
        self.rate = rate
        room = room_ir(scene.room, seed, rate)
        mic = mic_taps(scene.mic, rate)
        # Room and microphone as one filter for the fan; the background and
        # the events reach the microphone without the fan's room.
        self._machine = Fir(np.convolve(room, mic))
        self._mic_background, self._mic_events = Fir(mic), Fir(mic)
        # The voice starts a room's length before sample 0, so the first
        # sample already carries the reverberant tail of a running fan.
        pre = room.size
        self._voice = Voice(
            take.unit, take.faults, segments, seed, rate, drift_db=drift_db, start=-pre
        )
        self._machine.process(self._voice.read(pre))
        self._background = BackgroundVoice(scene.background, seed, rate)
        self._events = EventTrack(scene.events, rate)

    def next_cycle(self) -> None:
        """The schedule starts again; everything else carries on."""
        self._voice.next_cycle()

    def read(self, n: int) -> Parts:
        machine = self._machine.process(self._voice.read(n))
        background = self._mic_background.process(self._background.read(n))
        events = self._events.read(n)
        if events is not None:
            events = self._mic_events.process(events)
        else:
            self._mic_events.process(np.zeros(n, dtype=np.float32))  # keep its tail moving
        return Parts(machine, background, events)


@dataclass(frozen=True)
class Rendering:
    """A rendered clip with its parts and what it was drawn with.

    ``machine + background`` (+ events) before the signal chain; ``mix`` after
    it (AGC, level steps, clipping, dropouts) is what a file holds.
    """

    mix: F32
    machine: F32
    background: F32
    take: Take
    segments: tuple[Segment, ...]
    sample_rate_hz: int

    @property
    def peak_dbfs(self) -> float:
        peak = float(np.max(np.abs(self.mix))) if self.mix.size else 0.0
        return 20.0 * math.log10(peak) if peak > 0 else -math.inf

    def fractions(self, start_s: float = 0.0, stop_s: float | None = None) -> dict[str, float]:
        """Share of ``[start_s, stop_s)`` each state fills (the clip by default)."""
        stop = self.mix.size if stop_s is None else round(stop_s * self.sample_rate_hz)
        return state_fractions(self.segments, round(start_s * self.sample_rate_hz), stop)


def render_clip(
    take: Take,
    schedule: Sequence[tuple[str, float]],
    seed: int,
    rate: int = 16000,
    ramp_s: float | Sequence[float] = DEFAULT_RAMP_S,
) -> Rendering:
    """A clip of ``take`` through ``schedule``: exact SNR over the clip, peak at the drawn level."""
    segments = schedule_segments(schedule, rate, ramp_s)
    n = segments[-1].stop
    parts = Renderer(take, segments, seed, rate).read(n)
    scene = take.scene
    machine_power = power(parts.machine)
    background_gain = math.sqrt(
        machine_power * db_pow(-scene.snr_db) / max(power(parts.background), 1e-30)
    )
    machine = parts.machine
    background = parts.background * np.float32(background_gain)
    if parts.events is not None:
        background = background + parts.events * np.float32(background_gain)
    mix = machine + background
    peak = float(np.max(np.abs(mix))) or 1.0
    gain = db_amp(scene.peak_dbfs) / peak
    out = SignalChain(scene, rate, gain, seed).process(mix)
    return Rendering(
        mix=out,
        machine=machine * np.float32(gain),
        background=background * np.float32(gain),
        take=take,
        segments=segments,
        sample_rate_hz=rate,
    )


class Stream:
    """An endless recording of a schedule, rendered as it is read.

    One unit in one scene: the room, microphone, background and its events
    run on through every pass of the schedule (``loop``), and so do the fan's
    phases and noises; the change from the last state back into the first
    ramps like any other. Reads of any size give the same samples (to float32
    rounding: block sizes change the FFT sizes of the convolutions).
    """

    def __init__(
        self,
        take: Take,
        schedule: Sequence[tuple[str, float]],
        seed: int,
        rate: int = 16000,
        *,
        ramp_s: float | Sequence[float] = DEFAULT_RAMP_S,
        loop: bool = True,
        drift_db: float = 0.0,
    ) -> None:
        self.take = take
        self.rate = rate
        self.segments = schedule_segments(schedule, rate, ramp_s)
        self._starts = [s.start for s in self.segments]
        self.cycle_samples = self.segments[-1].stop
        self.loop = loop
        background_gain, level = self._calibrate(seed)
        self._background_gain = np.float32(background_gain)
        self._chain = SignalChain(take.scene, rate, level, seed)
        self._renderer = Renderer(take, self.segments, seed, rate, drift_db)
        self._cycle = 0
        self.position = 0

    def _calibrate(self, seed: int) -> tuple[float, float]:
        """Background gain for the SNR and the level, from the reference (first) state."""
        n = round(CALIBRATE_S * self.rate)
        quiet = replace(self.take, scene=replace(self.take.scene, events=()))
        segment = (Segment(self.segments[0].state, 0, n, 1),)
        parts = Renderer(quiet, segment, seed, self.rate).read(n)
        machine_power = power(parts.machine)
        snr_db = self.take.scene.snr_db
        background_gain = math.sqrt(
            machine_power * db_pow(-snr_db) / max(power(parts.background), 1e-30)
        )
        rms = math.sqrt(machine_power * (1.0 + db_pow(-snr_db)))
        level = db_amp(self.take.scene.peak_dbfs - STREAM_CREST_DB) / max(rms, 1e-30)
        return background_gain, level

    def state_at(self, sample_index: int) -> str:
        """The state playing at ``sample_index`` (ground truth; a ramp counts from its start)."""
        if sample_index < 0:
            raise IndexError(f"sample_index must be >= 0, got {sample_index}")
        if not self.loop and sample_index >= self.cycle_samples:
            raise IndexError(f"sample {sample_index} is past the end ({self.cycle_samples})")
        offset = sample_index % self.cycle_samples
        return self.segments[bisect.bisect_right(self._starts, offset) - 1].state

    def read(self, n: int) -> F32:
        """The next ``n`` samples (float32, −1…1); silence after the end when not looping."""
        out = np.zeros(n, dtype=np.float32)
        filled = 0
        while filled < n:
            cycle, offset = divmod(self.position, self.cycle_samples)
            if cycle > 0 and not self.loop:
                self.position += n - filled
                break
            if cycle != self._cycle:
                self._renderer.next_cycle()
                self._cycle = cycle
            take = min(n - filled, self.cycle_samples - offset)
            parts = self._renderer.read(take)
            mix = parts.machine + parts.background * self._background_gain
            if parts.events is not None:
                mix += parts.events * self._background_gain
            out[filled : filled + take] = self._chain.process(mix)
            filled += take
            self.position += take
        return out
