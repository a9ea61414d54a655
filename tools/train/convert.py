"""Conversion to TFLite: full-integer int8 (for the device) and float32 (reference).

All models take the *normalised* window and the *standardised* physics
vector (the bundle's input_mean/input_std and physics_mean/physics_std are
applied outside, by ``Classifier``), so tests can compare them without
TensorFlow. The int8 model's input and output tensors are int8; its
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

from tools.train.evaluate import Inputs
from tools.train.int8_layout import LayoutChoice, best_layout

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
REPRESENTATIVE_WINDOWS = 400


def representative_windows(inputs: Inputs, y: npt.NDArray[np.int32], seed: int, n: int) -> Inputs:
    """A class-balanced, seeded sample of (normalised) training windows."""
    rng = np.random.default_rng([seed, 1])
    classes = np.unique(y)
    per_class = max(1, n // len(classes))
    picks = [
        rng.choice(np.flatnonzero(y == c), size=min(per_class, int(np.sum(y == c))), replace=False)
        for c in classes
    ]
    return inputs.take(np.sort(np.concatenate(picks)))


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


def to_int8_tflite(model: Any, representative: Inputs, validation: Inputs) -> LayoutChoice:
    """The full-integer model: int8 weights, activations, inputs and output.

    ``statpool`` is rearranged for per-tensor scales first (same function;
    :mod:`tools.train.int8_layout` picks the layout on ``validation``).
    """
    import tensorflow as tf

    def samples() -> Iterator[dict[str, F32]]:
        # By input name: the SavedModel signature's order is not the model's.
        for x, p in zip(representative.x, representative.p, strict=True):
            yield {
                "mfcc": x[None, :, :, None].astype(np.float32),
                "physics": p[None, :].astype(np.float32),
            }

    def configure(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    return best_layout(model, representative, validation, lambda m: _convert(m, configure))
