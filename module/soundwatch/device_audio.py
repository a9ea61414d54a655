"""The last seconds of what the capture device delivered, as it delivered them.

The pipeline hears the device mixed to mono and resampled to the model's
rate. At the bench, an engineer also wants the device's own audio (its rate,
the channels captured, its sample format) next to what the model heard, to
tell a microphone problem from a model problem. :class:`DeviceAudioRing`
keeps that audio, keyed by the device's own sample positions, so the stretch
behind any window can be cut out exactly.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceAudio:
    """A stretch of captured audio: ``(frames, channels)`` samples at ``rate_hz``."""

    samples: npt.NDArray[np.generic]
    rate_hz: int
    start_sample: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])


class DeviceAudioRing:
    """The newest ``seconds`` of captured chunks; fed by the capture, read by the recorder.

    Thread-safe. Gaps in the positions (frames the capture dropped) come
    back as zeros, so a segment always spans exactly the times asked for.
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        self.seconds = seconds
        self._lock = threading.Lock()
        self._chunks: collections.deque[tuple[int, npt.NDArray[np.generic]]] = collections.deque()
        self._frames = 0
        self._rate_hz = 0

    def add(self, samples: npt.NDArray[np.generic], start_sample: int, rate_hz: int) -> None:
        """One captured chunk, ``(frames, channels)``, starting at ``start_sample``."""
        if samples.ndim != 2 or samples.shape[0] == 0:
            return
        with self._lock:
            if rate_hz != self._rate_hz:  # a reopened device at another rate: start over
                self._chunks.clear()
                self._frames = 0
                self._rate_hz = rate_hz
            self._chunks.append((start_sample, samples))
            self._frames += samples.shape[0]
            limit = int(self.seconds * rate_hz)
            while self._chunks and self._frames - self._chunks[0][1].shape[0] >= limit:
                self._frames -= self._chunks.popleft()[1].shape[0]

    def segment(self, start_s: float, end_s: float) -> DeviceAudio | None:
        """The audio between two stream times, or ``None`` if it is no longer (or not) here."""
        with self._lock:
            if not self._chunks or end_s <= start_s:
                return None
            rate = self._rate_hz
            first, last = round(start_s * rate), round(end_s * rate)
            oldest = self._chunks[0][0]
            newest_end = self._chunks[-1][0] + self._chunks[-1][1].shape[0]
            if first < oldest or last > newest_end:
                return None
            sample = self._chunks[0][1]
            out = np.zeros((last - first, sample.shape[1]), dtype=sample.dtype)
            for start, chunk in self._chunks:
                a, b = max(start, first), min(start + chunk.shape[0], last)
                if a < b:
                    out[a - first : b - first] = chunk[a - start : b - start]
        return DeviceAudio(out, rate, first)
