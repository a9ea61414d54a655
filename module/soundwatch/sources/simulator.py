"""The fan simulator (:mod:`soundwatch.fansim`) as a live source.

It plays a scripted fault schedule, for example normal 60 s, imbalance 30 s,
normal 30 s, and (with ``loop=True``) starts over; each pass is a fresh
recording joined without a gap, so there is no discontinuity at the wrap.
:meth:`SimulatorSource.fault_at` gives the ground truth for any sample
position, for demos and end-to-end tests.

The samples depend only on the arguments, never on ``block_s`` or on timing.
With ``realtime=True`` blocks are paced like a microphone (released when
their last sample would have been captured, from sample counts against a
monotonic clock); otherwise they come as fast as the consumer takes them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence

from soundwatch import fansim
from soundwatch.sources.base import Source, wait_until_due
from soundwatch.stream_types import AudioBlock

logger = logging.getLogger(__name__)

Schedule = list[tuple[str, float]]
DEFAULT_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("normal", 60),
    ("imbalance", 30),
    ("normal", 30),
)


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
                f"schedule item {number} {item.strip()!r}: expected 'class:seconds', "
                "e.g. 'imbalance:30'"
            )
        if name not in fansim.CLASSES:
            raise ValueError(
                f"schedule item {number} {item.strip()!r}: unknown class {name!r} "
                f"(one of {', '.join(fansim.CLASSES)})"
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
    """A simulated fan unit playing ``schedule`` (a list or a ``"class:s,..."`` string)."""

    def __init__(
        self,
        schedule: str | Sequence[tuple[str, float]] = DEFAULT_SCHEDULE,
        unit_id: int = 0,
        snr_db: float = 6.0,
        seed: int = 0,
        sample_rate_hz: int = 48000,
        realtime: bool = True,
        loop: bool = True,
        block_s: float = 0.1,
    ) -> None:
        if block_s <= 0:
            raise ValueError(f"block_s must be positive, got {block_s}")
        self.schedule: Schedule = (
            parse_schedule(schedule)
            if isinstance(schedule, str)
            else [(str(name), float(seconds)) for name, seconds in schedule]
        )
        super().__init__(name=f"simulator:unit{unit_id}", sample_rate_hz=int(sample_rate_hz))
        self.unit_id = unit_id
        self.snr_db = snr_db
        self.seed = seed
        self.realtime = realtime
        self.loop = loop
        self.block_frames = max(1, round(block_s * self.sample_rate_hz))
        self._unit = fansim.make_unit(unit_id, seed)
        # Validates the schedule now; renders nothing until read.
        self._truth = self._new_stream()
        self._update_health(device=self.name, device_rate_hz=self.sample_rate_hz)

    def _new_stream(self) -> fansim.ScheduleStream:
        return fansim.ScheduleStream(
            self._unit,
            self.schedule,
            self.snr_db,
            self.seed,
            sample_rate_hz=self.sample_rate_hz,
            loop=self.loop,
        )

    @property
    def cycle_samples(self) -> int:
        """Samples in one pass through the schedule."""
        return self._truth.cycle_samples

    def fault_at(self, sample_index: int) -> str:
        """The class playing at ``sample_index`` (a block position); ground truth.

        Raises ``IndexError`` for negative positions, and past the end when not looping.
        """
        return self._truth.fault_at(sample_index)

    def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
        """Blocks from the start of the schedule; ends on ``stop`` (or after one
        pass when not looping)."""
        stream = self._new_stream()
        end = None if self.loop else self.cycle_samples
        started = time.monotonic()
        self._update_health(healthy=True, state="running", detail="", samples=0)
        try:
            yield from self._generate(stream, stop, end, started)
        finally:
            self._update_health(state="ended")

    def _generate(
        self, stream: fansim.ScheduleStream, stop: threading.Event, end: int | None, started: float
    ) -> Iterator[AudioBlock]:
        position = 0
        while not self._stopping(stop):
            n = self.block_frames if end is None else min(self.block_frames, end - position)
            if n <= 0:
                break
            samples = stream.read(n)
            block_end = position + n
            if self.realtime and wait_until_due(started, block_end, self.sample_rate_hz, stop):
                break
            yield AudioBlock(
                samples=samples,
                start_sample=position,
                sample_rate_hz=self.sample_rate_hz,
                captured_at=time.time() if self.realtime else None,
            )
            position = block_end
            self._update_health(samples=position)
