"""The feature spec, made by librosa and scipy themselves.

The runtime computes MFCCs in numpy (:mod:`soundwatch.features`) from two
matrices that carry librosa's conventions. They are made here, once, by the
libraries that define them, and travel in the bundle.
"""

from __future__ import annotations

import hashlib

import numpy as np

from soundwatch.features import FeatureSpec

SAMPLE_RATE_HZ = 22050
N_FFT = 2048
N_MELS = 128
N_MFCC = 40
TRAIN_RATE_HZ = 16000


def make_feature_spec(n_mfcc: int = N_MFCC) -> FeatureSpec:
    """The reference service's feature spec: ``librosa.feature.mfcc(sr=22050, n_mfcc=40)``.

    ``n_mfcc`` keeps more of the DCT (the reference service kept 40 of 128); everything
    else is the reference service's definition.
    """
    import librosa
    import scipy.fft

    mel = librosa.filters.mel(sr=SAMPLE_RATE_HZ, n_fft=N_FFT, n_mels=N_MELS)
    dct = scipy.fft.dct(np.eye(N_MELS), type=2, norm="ortho", axis=0)[:n_mfcc]
    return FeatureSpec(
        mel_basis=mel.astype(np.float32),
        dct_matrix=dct.astype(np.float32),
        sample_rate_hz=SAMPLE_RATE_HZ,
        n_fft=N_FFT,
        n_mels=N_MELS,
        n_mfcc=n_mfcc,
        # MIMII (and the simulator's dataset) is recorded at 16 kHz.
        train_rate_hz=TRAIN_RATE_HZ,
    )


def spec_digest(spec: FeatureSpec) -> str:
    """A short hash of everything that defines the features (for cache keys)."""
    h = hashlib.sha256()
    h.update(repr(sorted(spec.scalars().items())).encode())
    h.update(np.ascontiguousarray(spec.mel_basis).tobytes())
    h.update(np.ascontiguousarray(spec.dct_matrix).tobytes())
    return h.hexdigest()[:16]


def real_frames(spec: FeatureSpec, n_samples: int) -> int:
    """How many of the window's columns hold real audio (the rest is zero fill)."""
    return min(spec.n_stft_frames(n_samples), spec.n_frames)
