"""Inference runtime: runs a bundle's TFLite model on feature windows.

Backends, in order of preference: LiteRT (``ai_edge_litert``), the legacy
``tflite_runtime``, then ``tensorflow.lite``. They share one ``Interpreter``
API, so the rest of the code does not care which one loaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from soundwatch.bundle import UNKNOWN, Bundle, BundleError
from soundwatch.features import WindowFeatures
from soundwatch.physics import FEATURE_NAMES

logger = logging.getLogger(__name__)

_NP_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float32": np.float32}
#: Frames at each end of a window that the network and the "unknown" check
#: leave out: the zero fill and the frames whose STFT reaches into padding
#: (2 at the start; 2 plus the 2 padding columns at the end).
EDGE_FRAMES = (2, 4)


class ModelError(RuntimeError):
    """The model could not be loaded or run."""


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError as e:
        raise ModelError(
            "no TFLite runtime found: install ai-edge-litert (or tflite-runtime / tensorflow)"
        ) from e


@dataclass(frozen=True)
class _Quant:
    scale: float
    zero_point: int
    dtype: Any

    def quantize(self, x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        if self.dtype == np.float32:
            return x.astype(np.float32)
        info = np.iinfo(self.dtype)
        q = np.round(x / self.scale) + self.zero_point
        out: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(self.dtype)
        return out

    def dequantize(self, q: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self.dtype == np.float32:
            return q.astype(np.float32)
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


def _quant_of(detail: dict[str, Any]) -> _Quant:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = detail["dtype"]
    if dtype != np.float32 and not scale:
        raise ModelError(f"tensor {detail.get('name')!r} is {dtype} but has no quantization")
    return _Quant(float(scale) or 1.0, int(zero_point), dtype)


@dataclass(frozen=True)
class Prediction:
    """The model's verdict on one window.

    ``probabilities`` are the model's, over its classes. ``unknown`` (0…1)
    is how far the window is from anything the model can judge: a window it
    cannot read (too little usable audio, clipped) or one unlike every
    window of its training world. :attr:`distribution` spreads the model's
    probabilities over what is left, with ``unknown`` as one more class.

    ``thresholds`` (one per model class, 0 for ``normal``) are the bundle's
    on-thresholds: the probability a fault needs before the label names it,
    the same a streaming window needs to vote for it. A fault that leads
    below its threshold is labelled ``unknown``: the model leans that way but
    is not sure enough to say so, and a clip verdict should say what a
    stream would.
    """

    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    unknown: float = 0.0
    reason: str | None = None
    typical_distance: float | None = None
    thresholds: tuple[float, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The model's classes, then ``unknown``."""
        return (*self.class_names, UNKNOWN)

    @property
    def distribution(self) -> tuple[float, ...]:
        """Probabilities over :attr:`names` (they sum to 1)."""
        keep = 1.0 - self.unknown
        return (*(round(p * keep, 6) for p in self.probabilities), round(self.unknown, 6))

    @property
    def label(self) -> str:
        """The most probable of :attr:`names`, or ``unknown`` for a fault below its threshold."""
        d = self.distribution
        best = max(range(len(d)), key=d.__getitem__)
        return UNKNOWN if self._below_threshold(best) else self.names[best]

    @property
    def unsure(self) -> str | None:
        """Why a leading fault is not named (``None`` if it is, or none leads)."""
        d = self.distribution
        best = max(range(len(d)), key=d.__getitem__)
        if not self._below_threshold(best):
            return None
        return (
            f"{self.class_names[best]} leads at {self.probabilities[best]:.2f}, "
            f"below the {self.thresholds[best]:.2f} it needs"
        )

    def _below_threshold(self, best: int) -> bool:
        # The model's own probability, as a streaming window's vote compares
        # it; the distance from the training world is already in `unknown`.
        return best < len(self.thresholds) and self.probabilities[best] < self.thresholds[best]


class Classifier:
    """A loaded model that maps one window's features to a :class:`Prediction`.

    ``predict`` is serialised with a lock because a TFLite interpreter is not
    re-entrant; create one Classifier per thread if you need parallelism.
    """

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.bundle = bundle
        interpreter_cls, self.backend = _interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(bundle.model_path), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"cannot load model {bundle.model_path}: {e}") from e
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 2 or len(outputs) != 1:
            raise BundleError(
                f"{bundle.model_path}: expected 2 inputs (MFCCs, physics) and 1 output, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        # The MFCC input is the 4-D one, the physics vector the 2-D one.
        mfcc_in = next((d for d in inputs if len(d["shape"]) == 4), None)
        physics_in = next((d for d in inputs if len(d["shape"]) == 2), None)
        if mfcc_in is None or physics_in is None:
            raise BundleError(
                f"{bundle.model_path}: inputs must be a 4-D MFCC and a 2-D physics tensor"
            )
        out = outputs[0]
        shape = tuple(int(v) for v in mfcc_in["shape"])
        if shape != bundle.input_shape:
            raise BundleError(
                f"{bundle.model_path}: model input shape {list(shape)} disagrees with "
                f"bundle.json input_shape {list(bundle.input_shape)}"
            )
        n_physics = len(FEATURE_NAMES)
        if tuple(int(v) for v in physics_in["shape"]) != (1, n_physics):
            raise BundleError(
                f"{bundle.model_path}: physics input shape {list(physics_in['shape'])} is not "
                f"[1, {n_physics}]"
            )
        for what, detail, declared in (
            ("input", mfcc_in, bundle.input_dtype),
            ("physics input", physics_in, bundle.input_dtype),
            ("output", out, bundle.output_dtype),
        ):
            actual = np.dtype(detail["dtype"]).name
            if _NP_DTYPES.get(declared) is None or actual != declared:
                raise BundleError(
                    f"{bundle.model_path}: model {what} dtype {actual} disagrees with "
                    f"bundle.json {declared!r}"
                )
        n_out = int(np.prod(out["shape"]))
        if n_out != len(bundle.classes):
            raise BundleError(
                f"{bundle.model_path}: model has {n_out} outputs but the bundle names "
                f"{len(bundle.classes)} classes"
            )
        self._in_index, self._physics_index = mfcc_in["index"], physics_in["index"]
        self._out_index = out["index"]
        self._in_q, self._physics_q = _quant_of(mfcc_in), _quant_of(physics_in)
        self._out_q = _quant_of(out)
        self._lock = threading.Lock()
        self._thresholds = tuple(bundle.thresholds.get(n, 0.0) for n in bundle.class_names)
        self._mean = bundle.input_mean
        self._inv_std = None if bundle.input_std is None else (1.0 / bundle.input_std)
        assert bundle.physics_mean is not None and bundle.physics_std is not None
        self._physics_mean = bundle.physics_mean
        self._physics_inv_std = (1.0 / bundle.physics_std).astype(np.float32)
        logger.info(
            "model %s loaded with %s (%d thread%s)",
            bundle.model_version,
            self.backend,
            threads,
            "" if threads == 1 else "s",
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    def prepare(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Per-coefficient normalisation, if the bundle has one."""
        if self._mean is None or self._inv_std is None:
            return features
        out: npt.NDArray[np.float32] = (
            (features - self._mean[:, None]) * self._inv_std[:, None]
        ).astype(np.float32)
        return out

    def prepare_physics(self, physics: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The physics vector standardised as in training."""
        out: npt.NDArray[np.float32] = (
            (physics - self._physics_mean) * self._physics_inv_std
        ).astype(np.float32)
        return out

    def embedding(
        self, mfcc: npt.NDArray[np.float32], physics: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Standardised physics and normalised MFCC means: where the window sits."""
        prepared = self.prepare(mfcc)
        means = prepared[:, EDGE_FRAMES[0] : mfcc.shape[1] - EDGE_FRAMES[1]].mean(axis=1)
        return np.concatenate([self.prepare_physics(physics), means]).astype(np.float32)

    def probabilities(
        self, mfcc: npt.NDArray[np.float32], physics: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """The model's class probabilities for one window."""
        expected = self.bundle.input_shape[1:3]
        if mfcc.shape != expected:
            raise ValueError(f"features have shape {mfcc.shape}, model wants {expected}")
        if not (np.all(np.isfinite(mfcc)) and np.all(np.isfinite(physics))):
            raise ValueError("features contain NaN or Inf")
        x = self._in_q.quantize(self.prepare(mfcc)).reshape(self.bundle.input_shape)
        p = self._physics_q.quantize(self.prepare_physics(physics)).reshape(1, -1)
        with self._lock:
            self._interp.set_tensor(self._in_index, x)
            self._interp.set_tensor(self._physics_index, p)
            self._interp.invoke()
            raw = self._interp.get_tensor(self._out_index)
        probs = self._out_q.dequantize(raw).reshape(-1)
        # int8 softmax outputs are multiples of 1/256 and need not sum to 1
        # exactly; renormalise so callers can rely on a distribution.
        total = float(probs.sum())
        if total > 0:
            probs = probs / total
        return probs.astype(np.float32)

    def predict(self, features: WindowFeatures) -> Prediction:
        """The verdict on one window, ``unknown`` included."""
        probs = self.probabilities(features.mfcc, features.physics)
        problem = features.quality.problem
        distance = None
        unknown = 0.0
        if problem is not None:
            unknown = 1.0
        elif self.bundle.typical is not None:
            chosen = int(np.argmax(probs))
            embedding = self.embedding(features.mfcc, features.physics)
            distance = self.bundle.typical.distance(embedding, chosen)
            unknown = self.bundle.typical.unknown(distance, chosen)
            if unknown > 0:
                problem = (
                    f"unlike the {self.bundle.class_names[chosen]} windows the model was trained on"
                )
        return Prediction(
            class_names=self.bundle.class_names,
            probabilities=tuple(float(p) for p in probs),
            unknown=unknown,
            reason=problem,
            typical_distance=None if distance is None else round(distance, 3),
            thresholds=self._thresholds,
        )
