"""``statpool`` rearranged for per-tensor int8: the same function, better ranges.

Full-integer int8 gives every activation tensor one scale. The movement
statistics of ``statpool`` (time means of learned filters, one per row and
filter) have very different ranges: on the shipped network the widest of
the 504 statistics of c1..c63 spans 10x the narrowest, and c0's 8 span 20x.
On one scale the narrow ones are a step or two wide, and the batch
normalisation behind them, which divides by their spread, blows that
rounding up (measured on the bundle converted without this: 42 % relative
error after the normalisation, int8/float top-1 agreement 0.968 and -6 dB
accuracy 0.825; with it, on the same trained network: 0.992 and 0.870).

What this module builds for the converter computes exactly what the trained
network computes, laid out so that one scale fits every statistic:

* the rows become channels (a TRANSPOSE), and the filters, which training
  shares across rows, become a depthwise convolution whose weights differ
  per row and filter only by a positive gain ``g``. Since
  ``relu(g z) = g relu(z)`` for ``g > 0``, each statistic comes out
  multiplied by its own ``g``; int8 weights are quantised per output
  channel, so the gain costs no weight precision;
* ``g`` is chosen from the representative windows so that every statistic
  spans the same range;
* the batch normalisation (an affine map per statistic) is folded, together
  with ``1 / g``, into the dense layer behind it.

The float reference models are converted from the trained network itself,
so the int8/float comparison measures this rearrangement too; and
:func:`rearranged` checks on the representative windows that the Keras
outputs agree before anything is converted.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.train.arch import _layer_classes

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


def rearranged(model: Any, windows: F32) -> Any:
    """``model`` with its movement paths rearranged for int8 (other archs: unchanged).

    ``windows``: normalised ``(n, rows, frames)`` representative windows.
    """
    names = {layer.name for layer in model.layers}
    if not all(f"{path}_filters" in names for path in MOVEMENT_PATHS):
        return model
    import keras

    x = windows[..., None].astype(np.float32)
    gains = {path: _gains(_statistics(model, path, x)) for path in MOVEMENT_PATHS}

    inputs = keras.Input(shape=model.input_shape[1:], name="mfcc")
    core = model.get_layer("core_frames")(_maybe(model, "int8_input")(inputs))
    envelope = _reuse(model, ("means", "envelope_flat", "envelope_bn", "envelope_logits"), core)
    c0 = _movement(model, "c0", "loudness_movement", model.get_layer("c0")(core), gains["c0"])
    rest = _movement(model, "rest", "shape_movement", model.get_layer("c1_up")(core), gains["rest"])
    logits = model.get_layer("logits")([envelope, c0, rest])
    out = keras.Model(inputs, model.get_layer("probs")(logits), name=f"{model.name}_int8_layout")

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


def _statistics(model: Any, path: str, x: F32) -> F32:
    """The path's time-mean statistics ``(n, rows, filters)`` of the trained network."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer(f"{path}_stats").output)
    parts = [np.asarray(probe(x[i : i + BATCH], training=False)) for i in range(0, len(x), BATCH)]
    return np.concatenate(parts)[:, :, 0, :].astype(np.float32)


def _gains(stats: F32) -> F32:
    """Per (row, filter): the gain that makes its largest value 1 (capped, see above)."""
    peak = np.max(np.abs(stats), axis=0)
    floor = float(np.median(peak)) / MAX_GAIN_RATIO
    g: F32 = (1.0 / np.maximum(peak, floor)).astype(np.float32)
    return g


def _centred(model: Any, path: str, x: Any) -> Any:
    """The trained network's two-pass centring of ``x`` (its own layers)."""
    mean = _maybe(model, f"{path}_mean1_int8")(model.get_layer(f"{path}_mean1")(x))
    coarse = model.get_layer(f"{path}_centre1")([x, mean])
    return model.get_layer(f"{path}_centre2")([coarse, model.get_layer(f"{path}_mean2")(coarse)])


def _movement(model: Any, path: str, head: str, x: Any, gains: F32) -> Any:
    """Centre, per-row filters with gains, offset, time mean, folded BN + dense: logits."""
    from keras import layers

    filters = gains.shape[1]
    # (rows, time, 1) -> (1, time, rows): rows become channels.
    h = layers.Permute((3, 2, 1), name=f"{path}_rows_to_channels")(_centred(model, path, x))
    conv = layers.DepthwiseConv2D(
        (1, 3), depth_multiplier=filters, activation="relu", name=f"{path}_row_filters"
    )
    offset = _layer_classes()["RunningCentre"](name=f"{path}_row_offset")
    stats = _layer_classes()["TimeMean"](name=f"{path}_row_stats")
    flat = layers.Flatten(name=f"{path}_row_flat")
    dense = layers.Dense(int(model.get_layer(f"{head}_logits").units), name=f"{path}_row_logits")
    out = dense(flat(stats(offset(conv(h)))))

    kernel, bias = model.get_layer(f"{path}_filters").get_weights()  # (1, 3, 1, F), (F,)
    # Depthwise output channel r * F + f is row r, filter f: the trained
    # Flatten of (rows, 1, F) orders the statistics the same way.
    conv.set_weights([kernel[:, :, 0:1, :] * gains[None, None], (bias[None] * gains).ravel()])
    (centre,) = model.get_layer(f"{path}_offset").get_weights()  # (rows, 1, F)
    offset.set_weights([(centre[:, 0, :] * gains).reshape(1, 1, -1)])
    gamma, beta, mean, var = model.get_layer(f"{head}_bn").get_weights()
    scale = gamma / np.sqrt(var + model.get_layer(f"{head}_bn").epsilon)
    shift = beta - scale * mean
    w, b = model.get_layer(f"{head}_logits").get_weights()
    dense.set_weights([(scale / gains.ravel())[:, None] * w, shift @ w + b])
    return out


def _check_same_function(model: Any, out: Any, x: F32) -> None:
    diff = 0.0
    for i in range(0, len(x), BATCH):
        a = np.asarray(model(x[i : i + BATCH], training=False))
        b = np.asarray(out(x[i : i + BATCH], training=False))
        diff = max(diff, float(np.max(np.abs(a - b))))
    if diff > MAX_PROBABILITY_DIFFERENCE:
        raise RuntimeError(
            f"int8 layout: the rearranged network differs from the trained one "
            f"(max probability difference {diff:.2g})"
        )
    logger.info("int8 layout: same function as the trained network (max diff %.1g)", diff)
