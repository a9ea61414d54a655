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

from soundwatch.bundle import Bundle, BundleError

logger = logging.getLogger(__name__)

_NP_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float32": np.float32}


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


class Classifier:
    """A loaded model that maps one feature window to class probabilities.

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
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(
                f"{bundle.model_path}: expected 1 input and 1 output, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        inp, out = inputs[0], outputs[0]
        shape = tuple(int(v) for v in inp["shape"])
        if shape != bundle.input_shape:
            raise BundleError(
                f"{bundle.model_path}: model input shape {list(shape)} disagrees with "
                f"bundle.json input_shape {list(bundle.input_shape)}"
            )
        for what, detail, declared in (
            ("input", inp, bundle.input_dtype),
            ("output", out, bundle.output_dtype),
        ):
            actual = np.dtype(detail["dtype"]).name
            if _NP_DTYPES.get(declared) is None or actual != declared:
                raise BundleError(
                    f"{bundle.model_path}: model {what} dtype {actual} disagrees with "
                    f"bundle.json {what}_dtype {declared!r}"
                )
        n_out = int(np.prod(out["shape"]))
        if n_out != len(bundle.classes):
            raise BundleError(
                f"{bundle.model_path}: model has {n_out} outputs but the bundle names "
                f"{len(bundle.classes)} classes"
            )
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_q, self._out_q = _quant_of(inp), _quant_of(out)
        self._lock = threading.Lock()
        self._mean = bundle.input_mean
        self._inv_std = None if bundle.input_std is None else (1.0 / bundle.input_std)
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

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities for one ``(n_mfcc, n_frames)`` window."""
        expected = self.bundle.input_shape[1:3]
        if features.shape != expected:
            raise ValueError(f"features have shape {features.shape}, model wants {expected}")
        if not np.all(np.isfinite(features)):
            raise ValueError("features contain NaN or Inf")
        x = self._in_q.quantize(self.prepare(features)).reshape(self.bundle.input_shape)
        with self._lock:
            self._interp.set_tensor(self._in_index, x)
            self._interp.invoke()
            raw = self._interp.get_tensor(self._out_index)
        probs = self._out_q.dequantize(raw).reshape(-1)
        # int8 softmax outputs are multiples of 1/256 and need not sum to 1
        # exactly; renormalise so callers can rely on a distribution.
        total = float(probs.sum())
        if total > 0:
            probs = probs / total
        return probs.astype(np.float32)
