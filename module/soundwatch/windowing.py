"""Ring buffer, windowing and incremental features.

The stream is cut into windows of ``window_s`` (10 s) every ``hop_frames``
STFT frames. Hops are whole frames so that consecutive windows share their
frames exactly: at 22 050 Hz and hop_length 512, a "1 s" hop is 43 frames,
22 016 samples, 0.998 s; a "10 s" hop is 431 frames (10.008 s), which makes
the windows non-overlapping as the reference service's were.

Each window's features equal what :meth:`FeatureExtractor.model_input` gives
for the window's 10 s of samples taken as a clip, i.e. what the reference service computed
for a 10 s recording. A centred STFT zero-pads a clip at both ends, so the two
frames at each edge of a window see padding while every interior frame sees
only real samples. Interior frames are therefore computed once per stream
frame and kept in a ring of log-mel frames; per hop only the new frames and the
four edge frames are computed. The window-wide top_db clip and the DCT are
applied when the window is emitted.

All positions are sample counts at the model rate, never wall-clock time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from soundwatch.audio import CLIP_PEAK_DBFS, dbfs
from soundwatch.features import FeatureExtractor, WindowFeatures
from soundwatch.physics import LOW_BINS
from soundwatch.stream_types import AudioBlock, Level

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=np.generic)


@dataclass(frozen=True)
class FeatureWindow:
    """One model input and where it sits in the stream."""

    index: int
    start_sample: int
    end_sample: int
    sample_rate_hz: int
    features: WindowFeatures = field(repr=False)
    level: Level
    captured_at: float | None = None
    # The window's audio at the model rate, kept for recording event windows.
    samples: npt.NDArray[np.float32] | None = field(default=None, repr=False)

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate_hz

    @property
    def end_s(self) -> float:
        return self.end_sample / self.sample_rate_hz


def window_level(samples: npt.NDArray[np.float32], silence_rms_dbfs: float) -> Level:
    """RMS and peak in dBFS, with clipping and silence flags."""
    peak = max(float(samples.max()), -float(samples.min())) if samples.size else 0.0
    rms = math.sqrt(float(np.dot(samples, samples)) / samples.size) if samples.size else 0.0
    rms_db, peak_db = dbfs(rms), dbfs(peak)
    return Level(
        rms_dbfs=round(rms_db, 2) if math.isfinite(rms_db) else -200.0,
        peak_dbfs=round(peak_db, 2) if math.isfinite(peak_db) else -200.0,
        clipping=peak_db >= CLIP_PEAK_DBFS,
        silent=rms_db < silence_rms_dbfs,
    )


def hop_frames_for(hop_s: float, sample_rate_hz: int, hop_length: int) -> int:
    """Whole STFT frames nearest to ``hop_s`` (at least one)."""
    return max(1, round(hop_s * sample_rate_hz / hop_length))


class StreamingFeatures:
    """Turns contiguous model-rate audio blocks into feature windows.

    Feed blocks of any size with :meth:`push`; it returns every window that
    became complete. Results do not depend on how the audio was chunked.
    :meth:`reset` forgets everything (used on a source discontinuity).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        window_s: float = 10.0,
        hop_frames: int = 43,
        silence_rms_dbfs: float = -70.0,
    ) -> None:
        spec = extractor.spec
        if not spec.center:
            raise ValueError("streaming features assume centred frames (librosa's default)")
        self._fx = extractor
        self._rate = spec.sample_rate_hz
        self._hop_len = spec.hop_length
        self._half = spec.n_fft // 2
        self.window_samples = round(window_s * self._rate)
        self.window_frames = spec.n_stft_frames(self.window_samples)
        if self.window_samples < spec.n_fft or self.window_frames < 5:
            raise ValueError(f"window of {window_s} s is too short for n_fft={spec.n_fft}")
        self.hop_frames = hop_frames
        self.hop_samples = hop_frames * self._hop_len
        # Window frames j in [left, right] see only real samples of the window.
        self._left = -(-self._half // self._hop_len)  # ceil(half / hop)
        self._right = (self.window_samples - self._half) // self._hop_len
        self._silence = silence_rms_dbfs
        self._capacity = 2 * (self.window_samples + spec.n_fft + self.hop_samples)
        # Pushes are processed at most one hop at a time, so the ring needs to
        # hold one window of frames plus one hop of frames computed ahead.
        self._ring_frames = self.window_frames + self.hop_frames + 2
        self._window_index = 0  # keeps counting across resets
        self.reset()

    @property
    def hop_s(self) -> float:
        return self.hop_samples / self._rate

    def reset(self) -> None:
        """Drop all buffered audio and frames; the next window starts afresh."""
        self._buf = np.zeros(self._capacity, dtype=np.float32)
        self._buf_start = 0  # stream sample index of _buf[0]
        self._buf_len = 0
        self._origin = 0  # stream sample index where the current segment began
        self._n = 0  # samples received in the current segment
        # Log-mel ring of stream frames: frame f of the segment is centred at
        # sample f * hop_length and kept at row f % ring.
        self._ring = np.zeros((self._ring_frames, self._fx.spec.n_mels), dtype=np.float64)
        # The low STFT bins of the same frames, for the fine spectrum (physics).
        self._ring_low = np.zeros((self._ring_frames, LOW_BINS), dtype=np.complex64)
        self._next_frame = 0
        self._next_window = 0
        self._captured_at: float | None = None

    def push(self, block: AudioBlock) -> list[FeatureWindow]:
        """Add samples; return the windows completed by them, in order."""
        if block.sample_rate_hz != self._rate:
            raise ValueError(f"block at {block.sample_rate_hz} Hz, expected {self._rate} Hz")
        if block.discontinuity and self._n:
            self.reset()
        if self._n == 0:
            self._origin = block.start_sample
        self._captured_at = block.captured_at
        out: list[FeatureWindow] = []
        samples = block.samples
        for i in range(0, samples.shape[0], self.hop_samples):
            self._append(samples[i : i + self.hop_samples])
            self._compute_frames()
            out.extend(self._emit_windows())
        return out

    def _append(self, samples: npt.NDArray[np.float32]) -> None:
        if self._buf_len + samples.shape[0] > self._buf.shape[0]:
            self._compact(samples.shape[0])
        self._buf[self._buf_len : self._buf_len + samples.shape[0]] = samples
        self._buf_len += samples.shape[0]
        self._n += samples.shape[0]

    def _compact(self, incoming: int) -> None:
        """Drop samples no future frame or window needs; grow only if a block is huge."""
        keep_from = min(
            self._next_window * self.hop_samples,
            self._next_frame * self._hop_len - self._half,
        )
        drop = max(0, keep_from - self._buf_start)
        kept = self._buf_len - drop
        if kept + incoming > self._buf.shape[0]:
            new = np.zeros(kept + incoming + self._capacity, dtype=np.float32)
            new[:kept] = self._buf[drop : self._buf_len]
            self._buf = new
        else:
            self._buf[:kept] = self._buf[drop : self._buf_len]
        self._buf_start += drop
        self._buf_len = kept

    def _segment(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """Samples [start, stop) of the segment, zero outside what was received."""
        out = np.zeros(stop - start, dtype=np.float32)
        lo, hi = max(start, self._buf_start), min(stop, self._buf_start + self._buf_len)
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo - self._buf_start : hi - self._buf_start]
        return out

    def _compute_frames(self) -> None:
        # Frames are computed in groups whose bounds depend only on the window
        # grid (the interior frames that window k adds), never on how the audio
        # was chunked: a float32 matrix product may round the last bit
        # differently for a different number of rows, and we want identical
        # results at any block size.
        while True:
            first = self._next_frame
            last = self._right if first == 0 else first + self.hop_frames - 1
            if last * self._hop_len + self._half > self._n:
                return
            start = first * self._hop_len - self._half
            segment = self._segment(start, last * self._hop_len + self._half)
            log_mel, low = self._fx.frames(segment, LOW_BINS)
            rows = np.arange(first, last + 1) % self._ring_frames
            self._ring[rows] = log_mel
            self._ring_low[rows] = low
            self._next_frame = last + 1

    def _emit_windows(self) -> list[FeatureWindow]:
        out = []
        while self._next_window * self.hop_samples + self.window_samples <= self._n:
            out.append(self._make_window(self._next_window))
            self._next_window += 1
        return out

    def _make_window(self, k: int) -> FeatureWindow:
        start = k * self.hop_samples
        first_frame = k * self.hop_frames
        frames = np.empty((self.window_frames, self._ring.shape[1]), dtype=np.float64)
        frames[self._left : self._right + 1] = _ring_rows(
            self._ring, first_frame + self._left, first_frame + self._right + 1
        )
        samples = self._segment(start, start + self.window_samples)
        # Edge frames: as in a clip, the STFT sees zeros beyond the window.
        edges = self._fx.edge_log_mel(samples)
        frames[: self._left] = edges[: self._left]
        frames[self._right + 1 :] = edges[self._left :]
        low = _ring_rows(self._ring_low, first_frame + self._left, first_frame + self._right + 1)
        features = self._fx.window_features(frames, low, samples)
        self._window_index += 1
        return FeatureWindow(
            index=self._window_index - 1,
            start_sample=self._origin + start,
            end_sample=self._origin + start + self.window_samples,
            sample_rate_hz=self._rate,
            features=features,
            level=window_level(samples, self._silence),
            captured_at=self._captured_at,
            samples=samples,
        )


def _ring_rows(ring: npt.NDArray[T], first: int, stop: int) -> npt.NDArray[T]:
    """Rows ``first .. stop - 1`` of the stream, kept at ``row % len(ring)``, in order.

    Two slices at most (where the ring wraps), not a gather of every row.
    """
    size = ring.shape[0]
    lo, n = first % size, stop - first
    if lo + n <= size:
        return ring[lo : lo + n].copy()
    return np.concatenate([ring[lo:], ring[: lo + n - size]])
