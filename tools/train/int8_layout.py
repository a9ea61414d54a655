"""``statpool`` rearranged for per-tensor int8: the same function, better ranges.

Full-integer int8 gives every activation tensor one scale. Converted as
trained, ``statpool`` lost most of its int8 precision in the movement
statistics (time means of learned filters, one per row and filter):
measured on the previous bundle, 42 % relative error after the batch
normalisation, int8/float top-1 agreement 0.968 on the held-out unit and
-6 dB accuracy 0.825. Two things caused it, and the network handed to the
converter computes exactly what the trained one computes but avoids both:

* **The centre was rounded per frame.** ``RunningCentre`` subtracts a
  constant per statistic from every frame; on the per-frame int8 grid that
  constant is rounded, and for a filter that is mostly off the rounding
  error is the same in every frame, so it shifts the statistic for every
  window. Here a depthwise convolution over blocks of 5 frames (weights
  ``1 / 5``, bias ``-centre``) takes the centre off in its int32
  accumulator, and a MEAN over the centred block means follows, on a grid
  that only has to span the movement.
* **One scale for statistics of very different ranges** (on the shipped
  network the widest of the 504 statistics of c1..c63 spans 10x the
  narrowest). The rows become channels (a TRANSPOSE) and the filters, shared
  across rows in training, a depthwise convolution whose weights differ per
  row and filter by a positive gain ``g``: ``relu(g z) = g relu(z)``, so
  each statistic is scaled by its ``g``, and int8 weights are quantised per
  channel, so the gain costs no weight precision. ``g = range ** -strength``:
  0 leaves the ranges alone, 1 makes them all equal. Equal ranges are not
  always best (the per-frame tensor of a strongly amplified filter then sets
  everyone's step), and the int8 outcome is not smooth in ``strength``, so
  :func:`best_layout` converts a few strengths and keeps the one whose int8
  model agrees best with the float network on the *validation* unit.

The batch normalisation (an affine map per statistic) is folded, with
``1 / g``, into the dense layer behind it. The float reference models are
converted from the trained network itself, so the int8/float comparison
measures this rearrangement too, and :func:`rearranged` checks on the
representative windows that the Keras outputs agree before anything is
converted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.train.arch import _layer_classes
from tools.train.evaluate import Inputs, as_model_inputs, predict_tflite

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
# Each statistic's range is its largest absolute value over the representative
# windows; a statistic that hardly moves (a filter dead on one row) would get
# an enormous gain and set the range of the per-frame tensors, so gains are
# capped at this multiple of the median gain.
MAX_GAIN_RATIO = 30.0
# Keras outputs of the rearranged network must match the trained one's.
MAX_PROBABILITY_DIFFERENCE = 1e-4
MOVEMENT_PATHS = ("c0", "rest")
BATCH = 50
# Frames per block of the centring convolution (see _movement).
MIN_BLOCK = 4
# Strengths tried by best_layout (a coarse grid: a finer one would mostly
# pick validation noise, the outcome jumps by a point between neighbours).
STRENGTHS = (0.0, 0.5, 1.0)


def applies(model: Any) -> bool:
    """Whether ``model`` has the movement paths this module rearranges (``statpool``)."""
    names = {layer.name for layer in model.layers}
    return all(f"{path}_filters" in names for path in MOVEMENT_PATHS)


PHYSICS_PATH = (
    "physics_int8",
    "physics_dense1",
    "physics_dropout1",
    "physics_dense2",
    "physics_dropout2",
    "physics_logits",
)


def rearranged(model: Any, windows: Inputs, strength: float = 1.0) -> Any:
    """``model`` with its movement paths rearranged for int8 (other archs: unchanged).

    ``windows``: normalised representative inputs, ``(n, rows, frames)`` MFCC
    windows and ``(n, n_physics)`` physics vectors. ``strength`` in [0, 1]:
    how far the gains equalise the statistics' ranges (0: no gains, 1: every
    statistic spans the same range). The physics branch is taken as it is.
    """
    if not applies(model):
        return model
    import keras

    x = as_model_inputs(windows)
    gains = {path: _gains(_statistics(model, path, x), strength) for path in MOVEMENT_PATHS}

    mfcc_shape = next(i.shape for i in model.inputs if len(i.shape) == 4)
    physics_shape = next(i.shape for i in model.inputs if len(i.shape) == 2)
    inputs = keras.Input(shape=mfcc_shape[1:], name="mfcc")
    physics = keras.Input(shape=physics_shape[1:], name="physics")
    core = model.get_layer("core_frames")(_maybe(model, "int8_input")(inputs))
    envelope = _reuse(model, ("means", "envelope_flat", "envelope_bn", "envelope_logits"), core)
    c0 = _movement(model, "c0", "loudness_movement", model.get_layer("c0")(core), gains["c0"])
    rest = _movement(model, "rest", "shape_movement", model.get_layer("c1_up")(core), gains["rest"])
    phys = physics
    for name in PHYSICS_PATH:
        phys = _maybe(model, name)(phys)
    logits = model.get_layer("logits")([envelope, c0, rest, phys])
    out = keras.Model(
        [inputs, physics], model.get_layer("probs")(logits), name=f"{model.name}_int8_layout"
    )

    _check_same_function(model, out, x)
    for path, g in gains.items():
        logger.info(
            "int8 layout: %s gains %.3g..%.3g over %d statistics", path, g.min(), g.max(), g.size
        )
    return out


def _maybe(model: Any, name: str) -> Any:
    """The layer ``name``, or the identity if the network has none."""
    try:
        return model.get_layer(name)
    except ValueError:
        return lambda t: t


def _reuse(model: Any, names: tuple[str, ...], x: Any) -> Any:
    for name in names:
        x = model.get_layer(name)(x)
    return x


def _statistics(model: Any, path: str, x: list[F32]) -> F32:
    """The path's time-mean statistics ``(n, rows, filters)`` of the trained network."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer(f"{path}_stats").output)
    return _batched(probe, x)[:, :, 0, :]


def _gains(stats: F32, strength: float) -> F32:
    """Per (row, filter): ``1 / range ** strength`` (capped, see above)."""
    peak = np.max(np.abs(stats), axis=0)
    floor = float(np.median(peak)) / MAX_GAIN_RATIO
    g: F32 = (np.maximum(peak, floor) ** -strength).astype(np.float32)
    return g


def _centred(model: Any, path: str, x: Any) -> Any:
    """The trained network's two-pass centring of ``x`` (its own layers)."""
    mean = _maybe(model, f"{path}_mean1_int8")(model.get_layer(f"{path}_mean1")(x))
    coarse = model.get_layer(f"{path}_centre1")([x, mean])
    return model.get_layer(f"{path}_centre2")([coarse, model.get_layer(f"{path}_mean2")(coarse)])


def _movement(model: Any, path: str, head: str, x: Any, gains: F32) -> Any:
    """Centre, per-row filters with gains, block centring, time mean, folded BN + dense."""
    from keras import layers

    filters = gains.shape[1]
    # (rows, time, 1) -> (1, time, rows): rows become channels.
    h = layers.Permute((3, 2, 1), name=f"{path}_rows_to_channels")(_centred(model, path, x))
    conv = layers.DepthwiseConv2D(
        (1, 3), depth_multiplier=filters, activation="relu", name=f"{path}_row_filters"
    )
    frames = int(conv.compute_output_shape(h.shape)[2])
    # Time mean minus running centre, in two steps. A depthwise convolution
    # over blocks of a few frames (weights 1/B, bias -centre) takes the
    # centre off in its int32 accumulator: on an int8 grid the constant would
    # be rounded the same way in every frame and shift the statistic of every
    # window. Its output is centred, so the MEAN over the block means behind
    # it gets a grid as fine as the movement, and averages the blocks'
    # rounding errors away. (One kernel over all 425 frames was about as
    # accurate, but its weights are 214 KB.)
    block = _block_size(frames)
    # Equal strides (TF's CPU kernel takes no other); the row axis has size 1.
    blocks = layers.DepthwiseConv2D((1, block), strides=(block, block), name=f"{path}_row_blocks")
    stats = _layer_classes()["TimeMean"](name=f"{path}_row_stats")
    flat = layers.Flatten(name=f"{path}_row_flat")
    dense = layers.Dense(int(model.get_layer(f"{head}_logits").units), name=f"{path}_row_logits")
    out = dense(flat(stats(blocks(conv(h)))))

    kernel, bias = model.get_layer(f"{path}_filters").get_weights()  # (1, 3, 1, F), (F,)
    # Depthwise output channel r * F + f is row r, filter f: the trained
    # Flatten of (rows, 1, F) orders the statistics the same way.
    conv.set_weights([kernel[:, :, 0:1, :] * gains[None, None], (bias[None] * gains).ravel()])
    (centre,) = model.get_layer(f"{path}_offset").get_weights()  # (rows, 1, F)
    blocks.set_weights(
        [
            np.full((1, block, gains.size, 1), 1.0 / block, dtype=np.float32),
            -(centre[:, 0, :] * gains).ravel(),
        ]
    )
    gamma, beta, mean, var = model.get_layer(f"{head}_bn").get_weights()
    scale = gamma / np.sqrt(var + model.get_layer(f"{head}_bn").epsilon)
    shift = beta - scale * mean
    w, b = model.get_layer(f"{head}_logits").get_weights()
    dense.set_weights([(scale / gains.ravel())[:, None] * w, shift @ w + b])
    return out


def _block_size(frames: int) -> int:
    """The smallest divisor of ``frames`` from :data:`MIN_BLOCK` on (5 for 425 frames)."""
    return next(d for d in range(MIN_BLOCK, frames + 1) if frames % d == 0)


def _batched(model: Any, x: list[F32]) -> F32:
    """``model(x)`` in inference mode, :data:`BATCH` windows at a time."""
    n = len(x[0])
    parts = [
        np.asarray(model([a[i : i + BATCH] for a in x], training=False)) for i in range(0, n, BATCH)
    ]
    return np.concatenate(parts).astype(np.float32)


def _check_same_function(model: Any, out: Any, x: list[F32]) -> None:
    diff = float(np.max(np.abs(_batched(model, x) - _batched(out, x))))
    if diff > MAX_PROBABILITY_DIFFERENCE:
        raise RuntimeError(
            f"int8 layout: the rearranged network differs from the trained one "
            f"(max probability difference {diff:.2g})"
        )
    logger.info("int8 layout: same function as the trained network (max diff %.1g)", diff)


@dataclass(frozen=True)
class LayoutChoice:
    """The int8 model kept, and what each strength scored on the validation unit."""

    model: bytes
    strength: float | None
    agreement: dict[str, float]
    mean_abs_prob_diff: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "tried": list(STRENGTHS) if self.strength is not None else [],
            "validation_top1_agreement": self.agreement,
            "validation_mean_abs_prob_diff": self.mean_abs_prob_diff,
            "rule": "highest int8/float top-1 agreement on the validation unit, "
            "ties to the lower mean |p_int8 - p_float|",
        }


def best_layout(
    model: Any, representative: Inputs, validation: Inputs, convert: Callable[[Any], bytes]
) -> LayoutChoice:
    """Convert ``statpool`` at each of :data:`STRENGTHS`, keep the best on ``validation``.

    ``convert`` turns a Keras model into int8 TFLite bytes; ``validation``
    holds normalised windows of the validation unit (never the held-out one).
    Other networks are converted once, as they are.
    """
    if not applies(model):
        return LayoutChoice(convert(model), None, {}, {})
    reference = _batched(model, as_model_inputs(validation))
    best: tuple[float, float, float, bytes] | None = None
    agreement, diff = {}, {}
    for strength in STRENGTHS:
        data = convert(rearranged(model, representative, strength))
        probs = predict_tflite(data, validation)
        key = f"{strength:g}"
        agreement[key] = round(float(np.mean(probs.argmax(1) == reference.argmax(1))), 4)
        diff[key] = round(float(np.mean(np.abs(probs - reference))), 5)
        logger.info(
            "int8 layout: strength %s: validation agreement %.4f, mean |dp| %.4f",
            key,
            agreement[key],
            diff[key],
        )
        if best is None or (agreement[key], -diff[key]) > (best[0], -best[1]):
            best = (agreement[key], diff[key], strength, data)
    assert best is not None
    logger.info("int8 layout: kept strength %g", best[2])
    return LayoutChoice(best[3], best[2], agreement, diff)
