"""An audio file (WAV, FLAC, OGG: anything libsndfile reads) as a source.

Blocks are read with soundfile, mixed down to mono, and yielded either as
fast as the consumer takes them or paced at real time (or ``speed`` times
faster, for fault drills and demos). Pacing compares the
sample count with a monotonic clock started at the first block: a block is
released when its last sample "would have been captured", so a slow consumer
never makes the stream drift (it catches up instead).

With ``loop=True`` the file restarts at its end; the first block after the
wrap has ``discontinuity=True`` and positions keep counting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from soundwatch.config import FileSourceConfig
from soundwatch.sources.base import Source, SourceError, wait_until_due
from soundwatch.stream_types import AudioBlock

logger = logging.getLogger(__name__)


class FileSource(Source):
    """Blocks of ``config.block_s`` from an audio file at the file's own rate."""

    def __init__(self, config: FileSourceConfig) -> None:
        self.path = Path(config.path)
        try:
            info = sf.info(str(self.path))
        except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
            raise SourceError(f"cannot read audio file {self.path}: {e}") from e
        if info.frames <= 0:
            raise SourceError(f"audio file {self.path} has no samples")
        super().__init__(name=f"file:{self.path.name}", sample_rate_hz=int(info.samplerate))
        self.loop = config.loop
        self.realtime = config.realtime
        self.speed = config.speed
        self.block_frames = max(1, round(config.block_s * self.sample_rate_hz))
        self.channels = int(info.channels)
        self.frames = int(info.frames)
        self._update_health(device=str(self.path), device_rate_hz=self.sample_rate_hz)

    def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
        """Blocks from the start of the file; ends at EOF (unless looping) or on ``stop``.

        Raises :class:`SourceError` if the file becomes unreadable mid-stream.
        """
        position = 0
        discontinuity = False
        started = time.monotonic()
        self._update_health(healthy=True, state="running", detail="", samples=0)
        try:
            with sf.SoundFile(str(self.path)) as f:
                while not self._stopping(stop):
                    data = f.read(self.block_frames, dtype="float32", always_2d=True)
                    if data.shape[0] == 0:
                        if not self.loop or position == 0:
                            break
                        f.seek(0)
                        discontinuity = True
                        logger.debug("%s: looped at sample %d", self.name, position)
                        continue
                    samples = (
                        data.mean(axis=1, dtype=np.float32)
                        if data.shape[1] > 1
                        else np.ascontiguousarray(data[:, 0])
                    )
                    end = position + int(samples.shape[0])
                    due_rate_hz = self.sample_rate_hz * self.speed
                    if self.realtime and wait_until_due(started, end, due_rate_hz, stop):
                        break
                    yield AudioBlock(
                        samples=samples,
                        start_sample=position,
                        sample_rate_hz=self.sample_rate_hz,
                        discontinuity=discontinuity,
                        captured_at=time.time() if self.realtime else None,
                    )
                    discontinuity = False
                    position = end
                    self._update_health(samples=position)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            self._update_health(healthy=False, state="failed", detail=str(e))
            raise SourceError(f"reading {self.path} failed: {e}") from e
        finally:
            if self.health().state == "running":
                self._update_health(state="ended", samples=position)
