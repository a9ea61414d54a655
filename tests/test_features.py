"""Feature parity: soundwatch.features against librosa.feature.mfcc itself.

Tolerance: |soundwatch - librosa| <= 1e-3 on every coefficient. MFCC values
span about ±1131 (silence gives c0 = -100*sqrt(128)), so this is ~1e-6 of the
range; measured differences are <= 2.5e-4 and come from librosa computing the
mel and dB stages in float32 where we use float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from soundwatch.bundle import load_bundle
from soundwatch.features import FeatureExtractor, FeatureSpec, FeatureSpecError, fit_frames

librosa = pytest.importorskip("librosa")
SR = 22050
ATOL = 1e-3


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    t = np.arange(10 * SR) / SR
    sigs = {
        "white_noise": rng.standard_normal(10 * SR) * 0.1,
        "tone_440": 0.5 * np.sin(2 * np.pi * 440 * t),
        "tone_shaft_22hz": 0.3 * np.sin(2 * np.pi * 22 * t),
        "tones_mix": sum(0.1 / k * np.sin(2 * np.pi * 154 * k * t) for k in range(1, 5)),
        "silence": np.zeros(10 * SR),
        "clipped_noise": np.clip(rng.standard_normal(10 * SR), -0.3, 0.3),
        "square_full_scale": np.sign(np.sin(2 * np.pi * 50 * t)),
        "dc_offset": 0.25 + 0.01 * rng.standard_normal(10 * SR),
        "impulse": np.eye(1, 10 * SR, 5 * SR)[0],
        "very_quiet": rng.standard_normal(10 * SR) * 1e-7,
        "chirp": 0.5 * np.sin(2 * np.pi * (50 + 500 * t) * t),
    }
    for n in (1, 100, 2047, 2048, 2049, 12345, 220499, 220501, 300007):
        sigs[f"len_{n}"] = rng.standard_normal(n) * 0.05
    return {k: np.asarray(v, dtype=np.float32) for k, v in sigs.items()}


SIGNALS = _signals()


@pytest.fixture(scope="module")
def extractor(librosa_spec: FeatureSpec) -> FeatureExtractor:
    return FeatureExtractor(librosa_spec)


def _librosa_mfcc(y: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_fft > len(y) warning for tiny inputs
        return librosa.feature.mfcc(y=y, sr=SR, n_mfcc=40)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_mfcc_matches_librosa(extractor: FeatureExtractor, name: str) -> None:
    y = SIGNALS[name]
    ref = _librosa_mfcc(y)
    got = extractor.mfcc(y)
    assert got.shape == ref.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["white_noise", "len_12345", "len_300007", "len_1"])
def test_model_input_is_seeds_padding(extractor: FeatureExtractor, name: str) -> None:
    """Two zero columns appended, then cut or zero-filled to 433 (prediction.py)."""
    y = SIGNALS[name]
    ref = np.pad(_librosa_mfcc(y), ((0, 0), (0, 2)))
    ref = np.pad(ref, ((0, 0), (0, max(0, 433 - ref.shape[1]))))[:, :433]
    got = extractor.model_input(y)
    assert got.shape == (40, 433)
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_ten_second_clip_fills_exactly_433(extractor: FeatureExtractor) -> None:
    y = SIGNALS["white_noise"]
    assert extractor.mfcc(y).shape[1] == 431
    x = extractor.model_input(y)
    assert np.all(x[:, 431:] == 0) and np.all(x[:, :431] != 0)


def test_mfcc_depends_on_window_max_like_librosa(extractor: FeatureExtractor) -> None:
    """top_db is relative to the whole input: a loud burst changes quiet frames."""
    quiet = SIGNALS["white_noise"] * 1e-4
    loud = quiet.copy()
    loud[-SR:] = 0.9
    a, b = extractor.mfcc(quiet), extractor.mfcc(loud)
    assert not np.allclose(a[:, :100], b[:, :100])
    np.testing.assert_allclose(b, _librosa_mfcc(loud), rtol=0, atol=ATOL)


def test_stages_compose_to_mfcc(extractor: FeatureExtractor) -> None:
    """The streaming runtime relies on log-mel frames being computable in pieces."""
    y = SIGNALS["chirp"]
    padded = extractor.pad_signal(y)
    whole = extractor.log_mel(padded)
    hop = 512
    pieces = [
        extractor.log_mel(padded[i * hop : i * hop + 2048 + 42 * hop]) for i in range(0, 431, 43)
    ]
    # BLAS may block a 43-row product differently from a 128-row one, so the
    # last float32 bit can differ (measured <= 8e-6 dB); nothing larger may.
    np.testing.assert_allclose(np.concatenate(pieces)[: whole.shape[0]], whole, rtol=0, atol=1e-4)
    log_mel = extractor.log_mel(extractor.pad_signal(y))
    np.testing.assert_array_equal(extractor.mfcc_from_log_mel(log_mel), extractor.mfcc(y))


def test_shipped_bundle_matrices_are_librosas() -> None:
    """The shipped mel basis and DCT are librosa's/scipy's for the bundle's own spec."""
    import scipy.fft

    spec = load_bundle().spec
    mel = librosa.filters.mel(sr=spec.sample_rate_hz, n_fft=spec.n_fft, n_mels=spec.n_mels)
    dct = scipy.fft.dct(np.eye(spec.n_mels), type=2, norm="ortho", axis=0)[: spec.n_mfcc]
    np.testing.assert_allclose(spec.mel_basis, mel, rtol=0, atol=1e-7)
    np.testing.assert_allclose(spec.dct_matrix, dct, rtol=0, atol=1e-7)
    assert (spec.sample_rate_hz, spec.n_fft, spec.hop_length, spec.n_frames) == (
        22050,
        2048,
        512,
        433,
    )
    assert (spec.top_db, spec.pad_columns, spec.center) == (80.0, 2, True)


def test_spec_rejects_wrong_shapes(librosa_spec: FeatureSpec) -> None:
    with pytest.raises(FeatureSpecError, match="mel_basis has shape"):
        FeatureSpec(mel_basis=librosa_spec.mel_basis[:, :-1], dct_matrix=librosa_spec.dct_matrix)
    with pytest.raises(FeatureSpecError, match="dct_matrix has shape"):
        FeatureSpec(mel_basis=librosa_spec.mel_basis, dct_matrix=librosa_spec.dct_matrix[:20])
    with pytest.raises(FeatureSpecError, match="window"):
        FeatureSpec(
            mel_basis=librosa_spec.mel_basis, dct_matrix=librosa_spec.dct_matrix, window="hamming"
        )


def test_fit_frames_cuts_long_input(librosa_spec: FeatureSpec) -> None:
    m = np.arange(40 * 500, dtype=np.float32).reshape(40, 500)
    out = fit_frames(m, librosa_spec)
    np.testing.assert_array_equal(out, m[:, :433])
