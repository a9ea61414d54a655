"""The source interface: where audio blocks come from.

Every source yields mono float32 :class:`~soundwatch.stream_types.AudioBlock`
values at its own rate (:attr:`Source.sample_rate_hz`, the device's or file's
native rate; resampling to the model rate is the next stage's job).

Positions come from sample counts: ``start_sample`` counts samples at the
block's rate since the source started, and consecutive blocks are contiguous
unless ``discontinuity`` is set. It is set on the first block after a gap: a
microphone reopened after a fault, a file that wrapped around, audio dropped
because the consumer fell behind.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import replace
from types import TracebackType

from soundwatch.stream_types import AudioBlock, SourceHealth


class SourceError(Exception):
    """A source cannot be opened or read; the message says what to fix.

    Third-party errors (PortAudio, libsndfile) are converted to this at the
    source's boundary with ``raise SourceError(...) from e``.
    """


class Source(ABC):
    """One stream of audio blocks.

    ``blocks`` is meant for one consumer thread at a time; ``health`` and
    ``close`` may be called from any thread.
    """

    name: str
    sample_rate_hz: int

    def __init__(self, name: str, sample_rate_hz: int) -> None:
        self.name = name
        self.sample_rate_hz = sample_rate_hz
        self._health_lock = threading.Lock()
        self._health = SourceHealth(healthy=False, state="starting", device=name)
        self._closed = threading.Event()

    @abstractmethod
    def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
        """Yield mono float32 blocks until ``stop`` is set (or the source ends).

        Returns promptly (within about a block's length, or a fraction of a
        second for live sources) once ``stop`` is set.
        """

    def health(self) -> SourceHealth:
        """A thread-safe snapshot of the source's state."""
        with self._health_lock:
            return self._health

    def close(self) -> None:
        """Make a running ``blocks()`` end soon (it releases what it holds). Idempotent.

        A closed source yields nothing more.
        """
        self._closed.set()

    def _stopping(self, stop: threading.Event) -> bool:
        """Whether ``blocks()`` should end now."""
        return stop.is_set() or self._closed.is_set()

    def _update_health(self, **changes: object) -> SourceHealth:
        with self._health_lock:
            self._health = replace(self._health, **changes)  # type: ignore[arg-type]
            return self._health

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_until_due(started: float, end_sample: int, rate_hz: float, stop: threading.Event) -> bool:
    """Real-time pacing from sample counts: sleep until the block ending at
    ``end_sample`` is due (``started`` is the monotonic start time).

    Pacing by the absolute sample position, not per block, keeps a slow
    consumer from making the source drift. Returns True if ``stop`` was set.
    """
    delay = started + end_sample / rate_hz - time.monotonic()
    return delay > 0 and stop.wait(delay)
