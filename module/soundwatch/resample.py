"""Streaming resampling of audio blocks to the model's rate.

:class:`StreamResampler` wraps :class:`soxr.ResampleStream` (the same HQ
filter :func:`soundwatch.audio.resample` and ``librosa.load`` use). Its output
does not depend on how the input is chunked: for one continuous stream, the
concatenated outputs of :meth:`StreamResampler.process` plus the final
:meth:`StreamResampler.flush` equal one-shot
``soxr.resample(x, in_rate, out_rate, quality="HQ")`` sample for sample
(bit-exact, checked by ``tests/test_resample.py`` for any block size).

Positions: output blocks count output samples. Within a continuous stream
they are contiguous. On a block with ``discontinuity=True`` the filter state
is reset (the few output samples of the old segment still inside the filter
are dropped: a gap is a gap), the flag is carried to the output, and the
output position jumps to the input position mapped to the output rate, so
stream time agrees at both rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt
import soxr

from soundwatch.stream_types import AudioBlock

_EMPTY = np.zeros(0, dtype=np.float32)


class StreamResampler:
    """Stateful mono float32 resampler from ``in_rate_hz`` to ``out_rate_hz``.

    Pass-through (blocks returned unchanged) when the rates are equal.
    Not thread-safe: one stream, one consumer.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int, quality: str = "HQ") -> None:
        if in_rate_hz <= 0 or out_rate_hz <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate_hz} -> {out_rate_hz}")
        self.in_rate_hz = int(in_rate_hz)
        self.out_rate_hz = int(out_rate_hz)
        self.quality = quality
        self._stream: soxr.ResampleStream | None = (
            None
            if self.in_rate_hz == self.out_rate_hz
            else soxr.ResampleStream(
                self.in_rate_hz, self.out_rate_hz, 1, dtype="float32", quality=quality
            )
        )
        self._next_out = 0  # output position of the next output sample
        self._next_in: int | None = None  # input position expected next
        self._captured_at: float | None = None

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def _out_position(self, in_sample: int) -> int:
        return math.floor(in_sample * self.out_rate_hz / self.in_rate_hz)

    def process(self, block: AudioBlock) -> AudioBlock:
        """Resample one block; the result may be shorter or empty (filter latency)."""
        if block.sample_rate_hz != self.in_rate_hz:
            raise ValueError(
                f"block is at {block.sample_rate_hz} Hz, resampler expects {self.in_rate_hz} Hz"
            )
        if self._stream is None:
            return block
        samples = np.ascontiguousarray(block.samples, dtype=np.float32).reshape(-1)
        discontinuity = block.discontinuity
        if self._next_in is None:
            # First block of the stream (or after flush): start at its mapped position.
            self._next_out = max(self._next_out, self._out_position(block.start_sample))
        elif discontinuity:
            self._stream.clear()
            self._next_out = max(self._next_out, self._out_position(block.start_sample))
        self._next_in = block.end_sample
        self._captured_at = block.captured_at
        out = self._stream.resample_chunk(samples)
        return self._emit(out, discontinuity, block.captured_at)

    def flush(self) -> AudioBlock:
        """End of stream: the samples still inside the filter. Resets the state.

        Processing may continue afterwards; the next block starts a new segment.
        """
        if self._stream is None or self._next_in is None:
            return AudioBlock(_EMPTY, self._next_out, self.out_rate_hz, False, self._captured_at)
        out = self._stream.resample_chunk(_EMPTY, last=True)
        self._stream.clear()
        self._next_in = None
        return self._emit(out, False, self._captured_at)

    def _emit(
        self, out: npt.NDArray[np.float32], discontinuity: bool, captured_at: float | None
    ) -> AudioBlock:
        samples = np.ascontiguousarray(out, dtype=np.float32)
        block = AudioBlock(samples, self._next_out, self.out_rate_hz, discontinuity, captured_at)
        self._next_out += int(samples.shape[0])
        return block


def resampled(
    blocks: Iterable[AudioBlock], out_rate_hz: int, quality: str = "HQ"
) -> Iterator[AudioBlock]:
    """Resample a block stream to ``out_rate_hz``, flushing at its end.

    The resampler is made from the first block's rate, so the wiring does not
    need to know the source's rate in advance. If the input rate changes, the
    resampler is rebuilt and the next output block is marked as a
    discontinuity. Empty output blocks are not yielded.
    """
    resampler: StreamResampler | None = None
    for block in blocks:
        if resampler is None or resampler.in_rate_hz != block.sample_rate_hz:
            rate_changed = resampler is not None
            next_out = resampler._next_out if resampler is not None else 0
            resampler = StreamResampler(block.sample_rate_hz, out_rate_hz, quality)
            resampler._next_out = next_out
            if rate_changed:
                block = AudioBlock(
                    block.samples, block.start_sample, block.sample_rate_hz, True, block.captured_at
                )
        out = resampler.process(block)
        if out.samples.shape[0] or out.discontinuity:
            yield out
    if resampler is not None:
        tail = resampler.flush()
        if tail.samples.shape[0]:
            yield tail
