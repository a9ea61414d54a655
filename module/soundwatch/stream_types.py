"""Typed values passed between the streaming stages.

source -> resample -> features -> model -> decision -> sinks. Each stage takes
and yields these frozen values and knows nothing of its neighbours.
All stream times come from sample counts, never from the wall clock, so a
file, a virtual ALSA device and a real microphone behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class AudioBlock:
    """Mono float32 samples and where they sit in the stream.

    ``start_sample`` counts samples at ``sample_rate_hz`` since the source
    started. ``discontinuity`` is set on the first block after a gap (device
    reopened, file looped): stages downstream must not join audio across it.
    """

    samples: npt.NDArray[np.float32] = field(repr=False)
    start_sample: int
    sample_rate_hz: int
    discontinuity: bool = False
    # Wall-clock time (time.time()) at which the source captured the block's
    # last sample, when the source knows it; only for reporting.
    captured_at: float | None = None

    @property
    def end_sample(self) -> int:
        return self.start_sample + int(self.samples.shape[0])


@dataclass(frozen=True)
class Level:
    """Input level of one window."""

    rms_dbfs: float
    peak_dbfs: float
    clipping: bool
    silent: bool


@dataclass(frozen=True)
class SourceHealth:
    """What a source says about itself; reported in health and the mic view."""

    healthy: bool
    state: str  # "starting" | "running" | "reopening" | "ended" | "failed"
    detail: str = ""
    device: str = ""
    device_rate_hz: int = 0
    overflows: int = 0
    reopens: int = 0
    samples: int = 0


@dataclass(frozen=True)
class NoveltyReading:
    """How far audio departs from the unit's baseline: ``score`` against ``threshold``.

    Higher is less like the unit's normal; above the threshold a window is novel.
    """

    score: float
    threshold: float
    #: The unit's shaft speed in this window over its baseline's (None: not measured).
    speed_ratio: float | None = None

    @property
    def novel(self) -> bool:
        return self.score > self.threshold


@dataclass(frozen=True)
class LearningProgress:
    """How far the unit's baseline is learned: ``learned_s`` of ``learn_s`` stream seconds."""

    learned_s: float
    learn_s: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.learned_s / self.learn_s) if self.learn_s > 0 else 1.0

    def describe(self) -> str:
        """``learning: 7:12 of 10:00`` (hours when longer)."""
        return f"learning: {clock(self.learned_s)} of {clock(self.learn_s)}"


@dataclass(frozen=True)
class BaselineVerdict:
    """What the unit's baseline says about one window.

    While learning, ``baseline_id`` and ``novelty`` are ``None`` and
    ``learning`` says how far it got; once learned, ``learning`` is ``None``.
    ``novelty`` is also ``None`` for a window that cannot be judged (dropout,
    clipping).
    """

    baseline_id: str | None
    novelty: NoveltyReading | None
    learning: LearningProgress | None = None


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss`` for a duration."""
    total = max(0, int(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
