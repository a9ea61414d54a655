"""Conversion to TFLite: full-integer int8 (for the device) and float32 (reference).

All models take the *normalised* window (the bundle's input_mean/input_std
are applied outside, by ``Classifier.prepare``), so tests can compare them
without TensorFlow. The int8 model's input and output tensors are int8; its
quantisation ranges come from a representative set of training windows,
except where the network carries fake-quantisation nodes (its input, and
the first time means of ``statpool``): those fix their tensors' ranges.

Two float32 models are written. The *reference* (shipped as
``tests/data/fan-float.tflite``) keeps the fake-quantisation nodes, so it
rounds its input to the int8 grid just as the device does (the int8 input
step is part of the feature contract: c0's movement within a clip is about
one step); it isolates what conversion does to the network's arithmetic.
The *unrounded* one has them switched off; evaluation reports both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.train.int8_layout import LayoutChoice, best_layout

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
REPRESENTATIVE_WINDOWS = 400


def representative_windows(x: F32, y: npt.NDArray[np.int32], seed: int, n: int) -> F32:
    """A class-balanced, seeded sample of (normalised) training windows."""
    rng = np.random.default_rng([seed, 1])
    classes = np.unique(y)
    per_class = max(1, n // len(classes))
    picks = [
        rng.choice(np.flatnonzero(y == c), size=min(per_class, int(np.sum(y == c))), replace=False)
        for c in classes
    ]
    idx = np.sort(np.concatenate(picks))
    out: F32 = x[idx]
    return out


def _convert(model: Any, configure: Callable[[Any], None] | None = None) -> bytes:
    """Convert a Keras 3 model via a SavedModel export (``configure`` sets options)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="fan-savedmodel-") as tmp:
        # Keras 3's export() writes a serving SavedModel whose signature TF's
        # converter understands; from_keras_model on Keras 3 models is fragile.
        model.export(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if configure is not None:
            configure(converter)
        data: bytes = converter.convert()
    return data


def to_float_tflite(model: Any, rounded: bool = True) -> bytes:
    """The float32 TFLite model (``rounded=False``: fake quantisation switched off)."""
    from tools.train.arch import set_fake_quant

    set_fake_quant(model, rounded)
    try:
        return _convert(model)
    finally:
        set_fake_quant(model, True)


def to_int8_tflite(model: Any, representative: F32, validation: F32) -> LayoutChoice:
    """The full-integer model: int8 weights, activations, input and output.

    ``statpool`` is rearranged for per-tensor scales first (same function;
    :mod:`tools.train.int8_layout` picks the layout on ``validation``).
    """
    import tensorflow as tf

    def samples() -> Iterator[list[F32]]:
        for window in representative:
            yield [window[None, :, :, None].astype(np.float32)]

    def configure(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    return best_layout(model, representative, validation, lambda m: _convert(m, configure))
