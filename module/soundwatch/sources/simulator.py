"""The simulated fan line (:mod:`soundwatch.sim`) as a live source.

It plays a scripted schedule of states, for example normal 60 s, imbalance
30 s, normal 30 s, and (with ``loop``) starts over without a gap; a change
of state takes ``ramp_s`` seconds, as a real fault comes in. The scene (room,
microphone, background, and background events if asked for) is a typical
one of the simulated world and stays put, as a microphone does.
:meth:`SimulatorSource.fault_at` gives the ground truth at any sample.

The samples depend only on the configuration, never on ``block_s`` or on
timing. With ``realtime`` blocks are paced like a microphone (released when
their last sample would have been captured, from sample counts against a
monotonic clock); otherwise they come as fast as the consumer takes them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from soundwatch.config import SimulatorSourceConfig
from soundwatch.sim import TYPICAL
from soundwatch.sim.dataset import RecordingPlan, recording_take
from soundwatch.sim.fan import STATES
from soundwatch.sim.recording import Stream
from soundwatch.sim.world import Take
from soundwatch.sources.base import Source, wait_until_due
from soundwatch.stream_types import AudioBlock

logger = logging.getLogger(__name__)

Schedule = list[tuple[str, float]]


def parse_schedule(text: str) -> Schedule:
    """``"normal:60,imbalance:30,normal:30"`` as ``[("normal", 60.0), ...]``.

    Raises ``ValueError`` saying which item is wrong and what is expected.
    """
    if not text.strip():
        raise ValueError("schedule is empty; expected e.g. 'normal:60,imbalance:30,normal:30'")
    schedule: Schedule = []
    for number, item in enumerate(text.split(","), start=1):
        name, sep, seconds_text = (part.strip() for part in item.partition(":"))
        if not sep or not name or not seconds_text:
            raise ValueError(
                f"schedule item {number} {item.strip()!r}: expected 'state:seconds', "
                "e.g. 'imbalance:30'"
            )
        if name not in STATES:
            raise ValueError(
                f"schedule item {number} {item.strip()!r}: unknown state {name!r} "
                f"(one of {', '.join(STATES)})"
            )
        try:
            seconds = float(seconds_text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(
                f"schedule item {number} {item.strip()!r}: seconds must be a positive number"
            )
        schedule.append((name, seconds))
    return schedule


class SimulatorSource(Source):
    """A simulated fan unit playing its configured schedule."""

    def __init__(self, config: SimulatorSourceConfig) -> None:
        self.config = config
        self.schedule = parse_schedule(config.schedule)
        super().__init__(name=f"simulator:unit{config.unit}", sample_rate_hz=config.rate_hz)
        self.block_frames = max(1, round(config.block_s * self.sample_rate_hz))
        self._take = self._scene()
        # Validates the schedule now; renders nothing until read.
        self._truth = self._new_stream()
        self._update_health(device=self.name, device_rate_hz=self.sample_rate_hz)

    def _scene(self) -> Take:
        c = self.config
        plan = RecordingPlan(
            unit_number=c.unit,
            schedule=self.schedule,
            snr_db=c.snr_db,
            seed=c.seed,
            events_per_min=c.events_per_min,
            sample_rate_hz=c.rate_hz,
        )
        take, _ = recording_take(plan, only=TYPICAL)
        if c.events_per_min <= 0:
            take = replace(take, scene=replace(take.scene, events=()))
        return take

    def _new_stream(self) -> Stream:
        c = self.config
        return Stream(self._take, self.schedule, c.seed, c.rate_hz, ramp_s=c.ramp_s, loop=c.loop)

    @property
    def cycle_samples(self) -> int:
        """Samples in one pass through the schedule."""
        return self._truth.cycle_samples

    def fault_at(self, sample_index: int) -> str:
        """The state playing at ``sample_index`` (a block position); ground truth.

        Raises ``IndexError`` for negative positions, and past the end when not looping.
        """
        return self._truth.state_at(sample_index)

    def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
        """Blocks from the start of the schedule; ends on ``stop`` (or after one
        pass when not looping)."""
        stream = self._new_stream()
        end = None if self.config.loop else self.cycle_samples
        started = time.monotonic()
        self._update_health(healthy=True, state="running", detail="", samples=0)
        try:
            yield from self._generate(stream, stop, end, started)
        finally:
            self._update_health(state="ended")

    def _generate(
        self, stream: Stream, stop: threading.Event, end: int | None, started: float
    ) -> Iterator[AudioBlock]:
        position = 0
        realtime = self.config.realtime
        while not self._stopping(stop):
            n = self.block_frames if end is None else min(self.block_frames, end - position)
            if n <= 0:
                break
            samples = stream.read(n)
            block_end = position + n
            if realtime and wait_until_due(started, block_end, self.sample_rate_hz, stop):
                break
            yield AudioBlock(
                samples=samples,
                start_sample=position,
                sample_rate_hz=self.sample_rate_hz,
                captured_at=time.time() if realtime else None,
            )
            position = block_end
            self._update_health(samples=position)
