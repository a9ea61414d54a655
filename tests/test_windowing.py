"""Incremental features equal the offline features of the same 10 s clip: MFCCs and physics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from soundwatch.features import FeatureExtractor, FeatureSpec
from soundwatch.stream_types import AudioBlock
from soundwatch.windowing import StreamingFeatures, hop_frames_for, window_level

SR = 22050
# Same bound as the feature-parity test's reasoning: only float32 BLAS
# blocking differs between a 43-frame and a 128-frame product.
ATOL = 1e-3


def _stream(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    # A sound whose spectrum changes over time, so misplaced frames would show.
    y = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (100 + 40 * t) * t)
    y[int(5.5 * SR) : int(6 * SR)] *= 8  # a loud burst moves the top_db floor
    return y.astype(np.float32)


def _feed(sf: StreamingFeatures, y: np.ndarray, block: int, start: int = 0) -> list:
    out = []
    for i in range(0, y.shape[0], block):
        out.extend(sf.push(AudioBlock(y[i : i + block], start + i, SR)))
    return out


@pytest.fixture(scope="module")
def fx(librosa_spec: FeatureSpec) -> FeatureExtractor:
    return FeatureExtractor(librosa_spec)


@pytest.mark.parametrize("block", [1000, 4410, 22050, 100_000])
def test_windows_equal_offline_clip_features(fx: FeatureExtractor, block: int) -> None:
    y = _stream(16.0)
    sf = StreamingFeatures(fx, window_s=10.0, hop_frames=43)
    windows = _feed(sf, y, block)
    expected_count = 1 + (y.shape[0] - sf.window_samples) // sf.hop_samples
    assert len(windows) == expected_count == 7
    for k, w in enumerate(windows):
        assert w.index == k
        assert w.start_sample == k * 22016 and w.end_sample == w.start_sample + 220500
        clip = y[w.start_sample : w.end_sample]
        np.testing.assert_allclose(w.features.mfcc, fx.model_input(clip), rtol=0, atol=ATOL)
        offline = fx.analyse(clip)
        np.testing.assert_allclose(w.features.mfcc, offline.mfcc, rtol=0, atol=ATOL)
        np.testing.assert_allclose(w.features.physics, offline.physics, rtol=0, atol=1e-3)
        assert w.features.quality == offline.quality


def test_block_size_does_not_change_features(fx: FeatureExtractor) -> None:
    y = _stream(13.0, seed=3)
    runs = []
    for block in (256, 1024, 4410, 48000):
        sf = StreamingFeatures(fx, hop_frames=43)
        windows = _feed(sf, y, block)
        runs.append(
            (
                np.stack([w.features.mfcc for w in windows]),
                np.stack([w.features.physics for w in windows]),
            )
        )
    for mfcc, physics in runs[1:]:
        np.testing.assert_array_equal(mfcc, runs[0][0])
        np.testing.assert_array_equal(physics, runs[0][1])


def _fan_with_faults(seconds: float, seed: int = 5) -> np.ndarray:
    """A steady tonal sound with a gain step (+8 dB at 6.3 s) and a dropout (11.0-11.6 s)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    y = 0.02 * rng.standard_normal(n)
    for k, a in enumerate((0.1, 0.06, 0.03), start=1):
        y += a * np.sin(2 * np.pi * 152.0 * k * t + k)
    y[int(6.3 * SR) :] *= 2.5
    y[int(11.0 * SR) : int(11.6 * SR)] = 0.0
    return y.astype(np.float32)


def test_windows_with_steps_and_dropouts_equal_offline_clip_features(fx: FeatureExtractor) -> None:
    # The streaming path builds a window from its frame rings and a separate
    # STFT of the edge frames; the level-step and dead-frame repairs must see
    # the same frames as a whole-clip analysis of the window's samples.
    y = _fan_with_faults(16.5)
    sf = StreamingFeatures(fx, hop_frames=43)
    windows = _feed(sf, y, 5000)
    assert len(windows) == 7
    assert any(w.features.quality.level_steps_db for w in windows)
    assert any(w.features.quality.dead_frames for w in windows)
    for w in windows:
        offline = fx.analyse(y[w.start_sample : w.end_sample])
        np.testing.assert_allclose(w.features.mfcc, offline.mfcc, rtol=0, atol=ATOL)
        np.testing.assert_allclose(w.features.physics, offline.physics, rtol=0, atol=1e-3)
        np.testing.assert_allclose(w.features.signature.low, offline.signature.low, atol=1e-3)
        np.testing.assert_allclose(
            w.features.signature.modulation, offline.signature.modulation, atol=1e-3
        )
        assert w.features.quality == offline.quality


def test_hop_is_whole_frames() -> None:
    assert hop_frames_for(1.0, SR, 512) == 43  # 0.998 s
    assert hop_frames_for(10.0, SR, 512) == 431  # non-overlapping, as the reference service
    assert hop_frames_for(0.001, SR, 512) == 1


def test_ten_second_hop_is_non_overlapping(fx: FeatureExtractor) -> None:
    y = _stream(31.0)
    sf = StreamingFeatures(fx, hop_frames=431)
    windows = _feed(sf, y, 5000)
    assert [w.start_sample for w in windows] == [0, 220672, 441344 - 0][: len(windows)]
    for a, b in itertools.pairwise(windows):
        assert b.start_sample >= a.end_sample


def test_discontinuity_resets_and_positions_follow_the_source(fx: FeatureExtractor) -> None:
    y = _stream(11.0)
    sf = StreamingFeatures(fx)
    first = _feed(sf, y, 4096, start=0)
    assert len(first) == 1 + (y.shape[0] - 220500) // 22016
    later = 10_000_000
    blocks = [AudioBlock(y[:4096], later, SR, discontinuity=True)]
    blocks += [AudioBlock(y[i : i + 4096], later + i, SR) for i in range(4096, y.shape[0], 4096)]
    second = [w for b in blocks for w in sf.push(b)]
    assert len(second) == len(first)
    assert second[0].start_sample == later
    assert second[0].index == len(first)  # indices keep counting
    np.testing.assert_array_equal(second[0].features.mfcc, first[0].features.mfcc)
    np.testing.assert_array_equal(second[0].features.physics, first[0].features.physics)


def test_level_flags() -> None:
    loud = np.ones(1000, dtype=np.float32)
    quiet = np.full(1000, 1e-5, dtype=np.float32)
    lv = window_level(loud, -70.0)
    assert lv.clipping and not lv.silent and lv.peak_dbfs == 0.0
    lq = window_level(quiet, -70.0)
    assert lq.silent and not lq.clipping and lq.rms_dbfs == pytest.approx(-100.0)
    assert window_level(np.zeros(10, dtype=np.float32), -70.0).rms_dbfs == -200.0
