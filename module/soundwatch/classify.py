"""Whole-clip classification: the reference service's ``/inference``, and a little more.

A clip is decoded and its first window (10 s; a shorter clip is looped to
fill it) turned into the model's inputs by the same code every streaming
window goes through, then classified once. The answer keeps the reference
service's JSON shape (``Anomaly``, ``Details.Message``,
``Details.Probabilities``) and adds the class names, the label, the audio's
facts and the warnings a person needs to judge the answer. ``soundwatch
classify`` and ``POST /inference`` both print exactly this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from soundwatch.audio import Clip, decode_audio
from soundwatch.baseline import Baseline, embedding
from soundwatch.bundle import UNKNOWN, UNKNOWN_MESSAGE, Bundle
from soundwatch.features import FeatureExtractor, WindowFeatures
from soundwatch.model import Classifier, Prediction

# A little more than the window, so that the whole window is real audio
# and nothing beyond it is decoded.
_DECODE_MARGIN_S = 0.5


@dataclass(frozen=True)
class Classification:
    """The verdict on one clip, and what it rests on."""

    prediction: Prediction
    message: str
    timing_ms: dict[str, float]
    source_rate_hz: int
    channels: int
    source_duration_s: float
    analysed_s: float
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's classes, then ``unknown``."""
        return self.prediction.names

    @property
    def probabilities(self) -> tuple[float, ...]:
        return self.prediction.distribution

    @property
    def label(self) -> str:
        return self.prediction.label

    @property
    def anomaly(self) -> bool:
        """A named fault (``unknown`` is not a verdict of fault, and neither is ``normal``)."""
        return self.label not in (UNKNOWN, self.prediction.class_names[0])

    def reference_response(self) -> dict[str, Any]:
        """The reference service's JSON shape."""
        return {
            "Anomaly": self.anomaly,
            "Details": {"Message": self.message, "Probabilities": list(self.probabilities)},
        }

    def to_json(self) -> dict[str, Any]:
        """The reference shape plus class names, label, warnings, audio facts and timing."""
        p = self.prediction
        return {
            **self.reference_response(),
            "Classes": list(self.class_names),
            "Label": self.label,
            "Unknown": {
                "probability": round(p.unknown, 4),
                "reason": p.reason,
                "distance": p.typical_distance,
            },
            "Warnings": list(self.warnings),
            "Audio": {
                "source_rate_hz": self.source_rate_hz,
                "channels": self.channels,
                "duration_s": round(self.source_duration_s, 3),
                "analysed_s": round(self.analysed_s, 3),
            },
            "TimingMs": {k: round(v, 3) for k, v in self.timing_ms.items()},
            **self.extra,
        }


class ClipClassifier:
    """Decodes, featurises and classifies whole clips with one bundle.

    With a unit's ``baseline`` (learned with this bundle), each answer also
    says how far the clip departs from that unit's normal: ``Novelty``
    ``{"score", "threshold", "anomalous"}`` (higher is less like it), or
    ``null`` for a clip that cannot be judged (too little usable audio).
    """

    def __init__(self, bundle: Bundle, threads: int = 1, baseline: Baseline | None = None) -> None:
        self.bundle = bundle
        self.baseline = baseline
        self.extractor = FeatureExtractor(bundle.spec)
        self.model = Classifier(bundle, threads=threads)
        self.window_s = self.extractor.window_samples / bundle.spec.sample_rate_hz

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
        features = self.extractor.analyse(clip.samples)
        t2 = time.perf_counter()
        prediction = self.model.predict(features)
        t3 = time.perf_counter()
        timing = {"decode": decode_ms, "features": (t2 - t1) * 1e3, "inference": (t3 - t2) * 1e3}
        extra: dict[str, Any] = {}
        if self.baseline is not None:
            extra["Novelty"] = None
            if features.quality.problem is None:
                n = self.baseline.novelty(embedding(features))
                extra["Novelty"] = {
                    "score": n.score,
                    "threshold": n.threshold,
                    "anomalous": n.anomalous,
                }
        return Classification(
            prediction=prediction,
            message=self._message(prediction),
            timing_ms=timing,
            source_rate_hz=clip.source_rate_hz,
            channels=clip.channels,
            source_duration_s=clip.source_duration_s,
            analysed_s=min(clip.duration_s, self.window_s),
            warnings=tuple(self._warnings(clip, features, prediction)),
            extra=extra,
        )

    def _message(self, prediction: Prediction) -> str:
        if prediction.label == UNKNOWN:
            if prediction.reason is not None:
                return f"Cannot judge: {prediction.reason}"
            if prediction.unsure is not None:
                return f"Not sure: {prediction.unsure}"
            return UNKNOWN_MESSAGE
        return next(c.message for c in self.bundle.classes if c.name == prediction.label)

    def _warnings(self, clip: Clip, features: WindowFeatures, prediction: Prediction) -> list[str]:
        """What a person should know about how far to trust this answer."""
        out: list[str] = []
        trained_hz = self.bundle.spec.train_rate_hz
        if trained_hz is not None and clip.source_rate_hz < trained_hz:
            out.append(
                f"the audio is sampled at {clip.source_rate_hz} Hz, below the {trained_hz} Hz "
                f"the model was trained on: content above {clip.source_rate_hz // 2} Hz is missing"
            )
        window_s = self.window_s
        if clip.source_duration_s < window_s - 0.05:
            out.append(
                f"only {clip.source_duration_s:.2f} s of audio: the model's window is "
                f"{window_s:.2f} s, so the clip was repeated to fill it"
            )
        elif clip.source_duration_s > window_s + 0.5:
            out.append(
                f"only the first {min(clip.duration_s, window_s):.2f} s of "
                f"{clip.source_duration_s:.1f} s were analysed"
            )
        if clip.channels > 1:
            out.append(f"{clip.channels} channels were mixed down to mono")
        q = features.quality
        frame_s = self.bundle.spec.hop_length / self.bundle.spec.sample_rate_hz
        if q.dead_frames:
            out.append(
                f"{q.dead_frames * frame_s:.1f} s of the window is silent or dropped out "
                "(left out of the analysis)"
            )
        for jump in q.level_steps_db:
            out.append(
                f"the level jumps by {jump:+.1f} dB inside the window (a gain change?): "
                "taken out before the analysis"
            )
        if q.clipped_fraction > 0.001:
            out.append(f"{100 * q.clipped_fraction:.1f} % of the samples are clipped")
        out.extend(clip.notes)
        if prediction.label == UNKNOWN and prediction.reason is not None:
            out.append(f"no verdict: {prediction.reason}")
        return out
