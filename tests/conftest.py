"""Shared fixtures. Tests run with the repo root on sys.path (pyproject)."""

from __future__ import annotations

import numpy as np
import pytest

from soundwatch.features import FeatureSpec


@pytest.fixture(scope="session")
def librosa_spec() -> FeatureSpec:
    """A feature spec made by librosa/scipy exactly as the training export makes it."""
    librosa = pytest.importorskip("librosa")
    scipy_fft = pytest.importorskip("scipy.fft")
    mel = librosa.filters.mel(sr=22050, n_fft=2048, n_mels=128)
    dct = scipy_fft.dct(np.eye(128), type=2, norm="ortho", axis=0)[:40]
    return FeatureSpec(mel_basis=mel.astype(np.float32), dct_matrix=dct.astype(np.float32))
