"""The per-unit baseline's arithmetic on made-up numbers: what its embedding keeps and
drops, how a departure scores against the unit's own spread, and the speed ratio."""

from __future__ import annotations

import numpy as np
import pytest

from soundwatch.baseline import (
    LAYOUT,
    PHYSICS_KEYS,
    SPECTRUM_BANDS,
    BaselineError,
    fit,
    robust_spectrum,
)

N_FRAMES, N_MELS = 433, 128
SHAFT = LAYOUT.slices()["physics"].start + PHYSICS_KEYS.index("shaft_hz")


def steady_frames(seed: int) -> np.ndarray:
    """A steady machine's log-mel frames: a sloping spectrum and frame-to-frame noise (dB)."""
    rng = np.random.default_rng(seed)
    slope = np.linspace(-20.0, -60.0, N_MELS)
    return slope[None, :] + rng.normal(0.0, 2.0, size=(N_FRAMES, N_MELS))


def test_an_event_on_half_the_frames_leaves_the_spectrum_a_lasting_change_moves_it() -> None:
    frames = steady_frames(0)
    clean = robust_spectrum(frames)
    assert clean.shape == (SPECTRUM_BANDS,) and abs(float(clean.mean())) < 1e-4

    beeper = frames.copy()
    beeper[::2, 40:48] += 25.0  # on and off every other frame, 25 dB over the machine
    # The percentile now falls among fewer clean frames: a bias of about half the
    # frame noise's spread, against the 12.5 dB a mean over the frames would move.
    assert np.abs(robust_spectrum(beeper) - clean).max() < 1.5
    assert np.abs(beeper.mean(axis=0) - frames.mean(axis=0)).max() > 10

    whistle = frames.copy()
    whistle[:, 40:48] += 6.0  # a new narrow-band sound that persists
    moved = robust_spectrum(whistle) - clean
    assert moved[10:12].min() > 5.0

    louder = robust_spectrum(frames + 12.0)  # a gain change is not a departure
    assert np.abs(louder - clean).max() < 1e-3


def test_the_spectrum_needs_whole_bands() -> None:
    with pytest.raises(BaselineError, match="multiple of 32"):
        robust_spectrum(np.zeros((N_FRAMES, 100)))


def learning_windows(n: int = 300, seed: int = 1) -> np.ndarray:
    """Embeddings of a unit's normal windows: quiet dimensions, and one (the first
    spectrum band) that background events often move by up to 8 dB."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 0.4, size=(n, LAYOUT.size))
    data[:, SHAFT] = 22.0 + rng.normal(0.0, 0.05, size=n)
    events = rng.random(n) < 0.08
    data[events, 0] += rng.uniform(2.0, 8.0, size=int(events.sum()))
    return data.astype(np.float32)


def test_a_departure_counts_against_what_the_unit_itself_does() -> None:
    data = learning_windows()
    baseline = fit(data, LAYOUT, "fan@test")
    normal = [baseline.novelty(w).score for w in learning_windows(200, seed=2)]
    assert np.mean(np.array(normal) > baseline.threshold) < 0.05

    typical = np.median(data, axis=0)
    quiet = typical.copy()
    quiet[5] += 6.0  # a quiet band moves by 6 dB: far outside the unit's normal
    noisy = typical.copy()
    noisy[0] += 6.0  # the same step where events often go: inside it
    assert baseline.novelty(quiet).score > 3 * baseline.threshold
    assert baseline.novelty(noisy).score < baseline.threshold
    assert baseline.novelty(quiet).groups["spectrum"] > baseline.novelty(quiet).groups["physics"]


def test_one_dimension_alone_cannot_outweigh_everything() -> None:
    data = learning_windows()
    baseline = fit(data, LAYOUT, "fan@test")
    typical = np.median(data, axis=0)
    one = typical.copy()
    one[PHYSICS_KEYS.index("hum5_db") + 32] += 1e6  # absent in normal running, then present
    two = typical.copy()
    two[3] += 1e6
    two[7] += 1e6
    assert baseline.novelty(one).score < baseline.novelty(two).score


def test_the_speed_ratio_is_against_the_units_own_nominal_speed() -> None:
    data = learning_windows()
    baseline = fit(data, LAYOUT, "fan@test")
    window = np.median(data, axis=0)
    window[SHAFT] = 22.0 * 0.8
    assert baseline.novelty(window).speed_ratio == pytest.approx(0.8, abs=0.005)
    comb = LAYOUT.slices()["physics"].start + PHYSICS_KEYS.index("comb_db")
    window[comb] -= 20.0  # the comb the speed is read from is gone: noise, not the fan
    assert baseline.novelty(window).speed_ratio is None
    window[comb] += 20.0
    window[SHAFT] = 0.0  # not measured
    assert baseline.novelty(window).speed_ratio is None
