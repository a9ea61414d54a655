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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the held-out re-render as slow.

    Every test that uses the ``held_out`` fixture (tests/test_model_quant.py)
    needs the held-out units' 600 clips rendered again by the simulator and
    classified by both models: about 2 minutes on an idle 2-core x86_64
    machine, most of the suite's time. ``-m "not slow"`` leaves it out for a
    quick run; ``make test`` runs it.
    """
    for item in items:
        if "held_out" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
