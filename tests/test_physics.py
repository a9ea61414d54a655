"""The rotating-machine features read the physics they claim to, from synthetic sounds.

Each test builds a sound whose physics is known exactly (numpy, at 22.05 kHz)
and checks what :meth:`FeatureExtractor.analyse` reads from it.
"""

from __future__ import annotations

import numpy as np
import pytest

from soundwatch.features import FeatureExtractor, FeatureSpec
from soundwatch.physics import FEATURE_NAMES

SR = 22050
N = 10 * SR


@pytest.fixture(scope="module")
def fx(librosa_spec: FeatureSpec) -> FeatureExtractor:
    return FeatureExtractor(librosa_spec)


def _noise(seed: int, slope: float = 1.0) -> np.ndarray:
    """Unit-power noise with power ∝ f^-slope."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(N))
    f = np.fft.rfftfreq(N, 1 / SR)
    spec[1:] /= f[1:] ** (slope / 2)
    spec[0] = 0
    x = np.fft.irfft(spec, N)
    return x / np.sqrt(np.mean(x**2))


def _fan(
    shaft_hz: float = 21.7,
    am_depth: float = 0.0,
    hum: tuple[float, ...] = (0.3, 0.15, 0.08),
    noise_db: float = -6.0,
    seed: int = 0,
) -> np.ndarray:
    """A 7-blade comb (shaft tone, BPF × 1..4) with 0.3 % speed jitter, hum, pink noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(N) / SR
    wander = np.interp(t, np.linspace(0, 10, 200), rng.standard_normal(200)) * 0.003
    phase = 2 * np.pi * np.cumsum(shaft_hz * (1 + wander)) / SR
    x = 0.1 * np.sin(phase)
    for k, a in enumerate((1.0, 0.6, 0.35, 0.2), start=1):
        x += a * np.sin(7 * k * phase + k)
    for h, a in enumerate(hum, start=1):
        x += a * np.sin(2 * np.pi * 50 * h * t + h)
    x += _noise(seed + 1) * np.sqrt(np.mean(x**2) * 10 ** (noise_db / 10))
    if am_depth:
        x *= 1 + am_depth * np.cos(phase)
    return (0.05 * x / np.max(np.abs(x))).astype(np.float32)


def test_the_feature_vector_has_one_value_per_name(fx: FeatureExtractor) -> None:
    features = fx.analyse(_fan())
    assert features.physics.shape == (len(FEATURE_NAMES),)
    assert set(features.signature.values) == set(FEATURE_NAMES)
    assert np.all(np.isfinite(features.physics))


@pytest.mark.parametrize("shaft_hz", [13.4, 20.3, 21.43, 23.9, 31.2])
def test_the_shaft_rate_is_read_from_the_blade_pass_comb(
    fx: FeatureExtractor, shaft_hz: float
) -> None:
    # 21.43 Hz puts the blade pass on the hum's 3rd harmonic (150 Hz).
    values = fx.analyse(_fan(shaft_hz)).signature.values
    assert values["shaft_hz"] == pytest.approx(shaft_hz, abs=max(0.1, 0.005 * shaft_hz))
    assert values["comb_db"] > 6.0


def test_an_unrelated_tone_with_harmonics_does_not_take_over_the_comb(fx: FeatureExtractor) -> None:
    x = _fan(22.4).astype(np.float64)
    t = np.arange(N) / SR
    for h, a in enumerate((0.02, 0.01, 0.005), start=1):
        x += a * np.sin(2 * np.pi * 113.0 * h * t)
    values = fx.analyse(x.astype(np.float32)).signature.values
    assert values["shaft_hz"] == pytest.approx(22.4, abs=0.1)


def test_imbalance_shows_as_breathing_at_the_shaft_rate_and_sidebands(fx: FeatureExtractor) -> None:
    healthy = fx.analyse(_fan(22.0)).signature.values
    imbalanced = fx.analyse(_fan(22.0, am_depth=0.4)).signature.values
    assert imbalanced["am_shaft_db"] > healthy["am_shaft_db"] + 10
    assert imbalanced["sideband_db"] > healthy["sideband_db"] + 6
    assert imbalanced["sideband_re_bpf_db"] > -20 > healthy["sideband_re_bpf_db"]


def test_each_hum_harmonic_is_measured(fx: FeatureExtractor) -> None:
    # At 22.3 Hz no shaft-locked line (comb, sidebands) sits on a hum line.
    rich = fx.analyse(_fan(22.3, hum=(0.3, 0.3, 0.3, 0.2, 0.2, 0.15, 0.1))).signature.values
    plain = fx.analyse(_fan(22.3, hum=(0.3, 0.15, 0.08))).signature.values
    for h in range(4, 8):
        assert rich[f"hum{h}_db"] > 10, h
        assert plain[f"hum{h}_db"] < 3, h
    assert rich["hum2_re_hum1_db"] == pytest.approx(0.0, abs=1.5)


def test_a_whistle_is_found_and_a_beeper_is_not(fx: FeatureExtractor) -> None:
    base = _fan(22.0).astype(np.float64)
    t = np.arange(N) / SR
    rng = np.random.default_rng(5)
    band = np.fft.rfft(rng.standard_normal(N))
    f = np.fft.rfftfreq(N, 1 / SR)
    band[np.abs(f - 2100) > 15] = 0
    whistle = np.fft.irfft(band, N)
    whistle *= 0.3 * np.sqrt(np.mean(base**2) / np.mean(whistle**2))
    gate = (np.floor(t / 0.5) % 2 == 0).astype(float)  # on and off every half second
    beeper = 0.5 * np.sqrt(np.mean(base**2)) * np.sin(2 * np.pi * 1250 * t) * gate
    with_whistle = fx.analyse((base + whistle).astype(np.float32)).signature.values
    with_beeper = fx.analyse((base + beeper).astype(np.float32)).signature.values
    assert with_whistle["whistle_db"] > 6
    assert with_beeper["whistle_db"] < 3


def test_surging_is_a_steady_slow_modulation_and_wandering_is_not(fx: FeatureExtractor) -> None:
    base = _fan(22.0).astype(np.float64)
    t = np.arange(N) / SR
    surging = base * (1 + 0.2 * np.sin(2 * np.pi * 0.8 * t))
    rng = np.random.default_rng(2)
    wander = np.interp(t, np.linspace(0, 10, 40), rng.standard_normal(40))
    wandering = base * 10 ** (1.0 * wander / 20)
    s = fx.analyse(surging.astype(np.float32)).signature.values
    w = fx.analyse(wandering.astype(np.float32)).signature.values
    assert s["surge_pct"] == pytest.approx(20, abs=6)
    assert s["surge_peak_db"] > w["surge_peak_db"] + 3


def test_the_features_do_not_depend_on_the_level(fx: FeatureExtractor) -> None:
    x = _fan(22.7, am_depth=0.3)
    loud = fx.analyse(x).physics
    quiet = fx.analyse(x * np.float32(0.01)).physics
    np.testing.assert_allclose(quiet, loud, atol=0.05)


def test_a_dropout_is_left_out_and_noted(fx: FeatureExtractor) -> None:
    x = _fan(21.1)
    gapped = x.copy()
    gapped[4 * SR : 6 * SR] = 0.0
    features = fx.analyse(gapped)
    assert features.quality.dead_frames == pytest.approx(2 * SR / 512, abs=5)
    assert features.quality.problem is None
    assert features.signature.values["shaft_hz"] == pytest.approx(21.1, abs=0.1)
    # The repaired MFCCs look like the fan, not like a collapse of every band.
    whole = fx.analyse(x).mfcc
    shift = np.abs(features.mfcc[:, 2:-4].mean(axis=1) - whole[:, 2:-4].mean(axis=1))
    assert shift[0] < 3.0  # c0, the loudness: 0.2 dB
    assert shift[1:].max() < 1.0


def test_a_short_clip_is_looped_and_too_little_audio_has_no_verdict(fx: FeatureExtractor) -> None:
    x = _fan(22.0)
    five = fx.analyse(x[: 5 * SR])
    assert five.quality.repeated and five.quality.valid_s == pytest.approx(5.0, abs=0.01)
    assert five.quality.problem is None
    assert five.signature.values["shaft_hz"] == pytest.approx(22.0, abs=0.15)
    one = fx.analyse(x[:SR])
    assert one.quality.problem is not None and "usable audio" in one.quality.problem


def test_a_clipped_window_has_no_verdict(fx: FeatureExtractor) -> None:
    x = np.clip(_fan(22.0) * 60, -1.0, 1.0).astype(np.float32)
    features = fx.analyse(x)
    assert features.quality.clipped_fraction > 0.02
    assert features.quality.problem is not None and "clipped" in features.quality.problem


def test_a_gain_step_is_taken_out_and_a_change_of_the_machine_is_not(fx: FeatureExtractor) -> None:
    x = _fan(22.5, am_depth=0.0).astype(np.float64)
    stepped = x.copy()
    stepped[6 * SR :] *= 10 ** (9.0 / 20)
    steady = fx.analyse(x.astype(np.float32))
    features = fx.analyse(stepped.astype(np.float32))
    assert features.quality.level_steps_db == pytest.approx((9.0,), abs=1.0)
    assert abs(features.signature.values["surge_pct"] - steady.signature.values["surge_pct"]) < 2
    shift = np.abs(features.mfcc[1:, 2:-4].mean(axis=1) - steady.mfcc[1:, 2:-4].mean(axis=1))
    assert shift.max() < 1.0
    # The blade-pass tones alone grow by 9 dB: the machine changed, not the gain.
    t = np.arange(N) / SR
    louder_tones = x + (t >= 6) * 2.0 * np.sin(2 * np.pi * 7 * 22.5 * t)
    assert fx.analyse(louder_tones.astype(np.float32)).quality.level_steps_db == ()
