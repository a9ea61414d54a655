"""Whole-clip classification: the seeds' ``/inference`` behaviour.

A clip is decoded, turned into the seeds' MFCC x 433 window (its first
~10 s), and classified once. The answer keeps the seeds' JSON shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from soundwatch.audio import Clip, decode_audio
from soundwatch.bundle import Bundle
from soundwatch.features import FeatureExtractor
from soundwatch.model import Classifier

# A little more than the 433-frame window, so that the whole window is real
# audio and nothing beyond it is decoded.
_DECODE_MARGIN_S = 0.5


@dataclass(frozen=True)
class Classification:
    """The model's verdict on one clip."""

    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    label: str
    message: str
    anomaly: bool
    timing_ms: dict[str, float]
    source_rate_hz: int
    channels: int
    source_duration_s: float
    analysed_s: float

    def seed_response(self) -> dict[str, Any]:
        """The seeds' exact JSON shape."""
        return {
            "Anomaly": self.anomaly,
            "Details": {"Message": self.message, "Probabilities": list(self.probabilities)},
        }

    def to_json(self) -> dict[str, Any]:
        """The seeds' shape plus class names, label and timing."""
        return {
            **self.seed_response(),
            "Classes": list(self.class_names),
            "Label": self.label,
            "Audio": {
                "source_rate_hz": self.source_rate_hz,
                "channels": self.channels,
                "duration_s": round(self.source_duration_s, 3),
                "analysed_s": round(self.analysed_s, 3),
            },
            "TimingMs": {k: round(v, 3) for k, v in self.timing_ms.items()},
        }


class ClipClassifier:
    """Decodes, featurises and classifies whole clips with one bundle."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        self.bundle = bundle
        self.extractor = FeatureExtractor(bundle.spec)
        self.model = Classifier(bundle, threads=threads)
        spec = bundle.spec
        self.window_s = (
            (spec.n_frames - spec.pad_columns - 1) * spec.hop_length / spec.sample_rate_hz
        )

    def classify_source(self, source: str | Path | bytes | BinaryIO) -> Classification:
        """Classify a file path, bytes or a binary stream; raises AudioError on bad input."""
        t0 = time.perf_counter()
        spec = self.bundle.spec
        clip = decode_audio(
            source,
            spec.sample_rate_hz,
            max_seconds=self.window_s + _DECODE_MARGIN_S,
            via_rate_hz=spec.train_rate_hz,
        )
        t1 = time.perf_counter()
        return self.classify_clip(clip, decode_ms=(t1 - t0) * 1e3)

    def classify_clip(self, clip: Clip, decode_ms: float = 0.0) -> Classification:
        t1 = time.perf_counter()
        features = self.extractor.model_input(clip.samples)
        t2 = time.perf_counter()
        probs = self.model.predict(features)
        t3 = time.perf_counter()
        return self._verdict(
            probs,
            clip,
            {"decode": decode_ms, "features": (t2 - t1) * 1e3, "inference": (t3 - t2) * 1e3},
        )

    def _verdict(
        self, probs: npt.NDArray[np.float32], clip: Clip, timing: dict[str, float]
    ) -> Classification:
        # The seeds' rule: the most probable class decides, and any class
        # other than "normal" is an anomaly.
        best = int(np.argmax(probs))
        info = self.bundle.classes[best]
        return Classification(
            class_names=self.bundle.class_names,
            probabilities=tuple(round(float(p), 6) for p in probs),
            label=info.name,
            message=info.message,
            anomaly=info.anomaly,
            timing_ms=timing,
            source_rate_hz=clip.source_rate_hz,
            channels=clip.channels,
            source_duration_s=clip.source_duration_s,
            analysed_s=min(clip.duration_s, self.window_s),
        )
