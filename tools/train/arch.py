"""The networks: the reference service's CNN, two variants of it, and a statistics-pooling CNN.

``reference``: three blocks of Conv2D (16/32/64 filters, kernel 2, relu),
MaxPool 2 and Dropout 0.2, then global average pooling and a Dense layer, as
the reference service built it (:func:`reference_cnn` is that network alone).

``tpool``: the same blocks, but the final average runs over time only, so the
Dense layer still sees *which* coefficients (rows) a pattern sits at. Global
pooling throws that away, and for spectral-envelope features (MFCCs) the
row is most of the information: a whistle at 2 kHz and one at 200 Hz excite
different coefficients with similar local patterns. It adds 4 x 64 x classes
weights (about 1 k) and no measurable time.

``statpool``: a temporal CNN with statistics pooling. Measured on the
simulator, what separates the classes of an unseen unit is, per coefficient,
the window's mean (the spectral envelope) and how the coefficient moves over
time (its spread: surging, amplitude modulation, speed jitter). A linear model
on exactly those statistics beats the reference service's 2-D CNN, which over-fits to the
training units' local patterns. So the network takes, per coefficient, the
time mean, and the time mean of a few learned temporal filters (kernel 1 x 3,
ReLU) applied to the coefficient minus its mean; each group of statistics
goes through batch normalisation to its own softmax logits, which are added.

Every network starts with a fake-quantisation node on its input, fixed to
the training data's range (:class:`tools.train.fit.InputGrid`): the int8
input has one scale for the whole window and c0's movement within a clip is
about one step of it, so the network is trained on, and the float reference
computes with, exactly the input the device feeds the int8 model.

The shape of ``statpool`` is dictated by full-integer int8 inference, where
every tensor has one scale (measured: a first version lost 24 % top-1
agreement):

* c0 carries loudness, so its spread over clips is ~20x its movement within
  a clip; it gets its own path so that its tensors get their own scales;
* tensors are never concatenated (TFLite forces one scale on all inputs of a
  concatenation): the branches meet as added logits;
* time means are TFLite MEAN ops, not average pooling, whose int8 output
  must keep its input's scale and so loses the precision averaging gains;
* the centring is done twice (x - m, then minus the mean of that), because
  the first mean is rounded on the scale of the whole clip-to-clip spread,
  which leaves an offset as large as c0's movement; the first mean carries a
  fake-quantisation node with a fixed range, so the float graph rounds it as
  the int8 graph will and the second mean can take the rounding error out;
* the first 2 and last 4 frames are dropped: the zero fill and the frames
  whose STFT window reaches into librosa's zero padding are outliers that
  would set the int8 ranges.

The converter is handed an equal network laid out further for int8 (rows as
channels, per-statistic gains, the centre in an int32 bias):
:mod:`tools.train.int8_layout`.
"""

from __future__ import annotations

from typing import Any

STATPOOL_FILTERS = 8
# Batch-norm statistics must follow the pooled features as the filters learn;
# Keras' default momentum (0.99) lags so far that the validation score swings
# from epoch to epoch.
BN_MOMENTUM = 0.9


#: The standardised physics vector is clipped to ±this (its int8 range).
PHYSICS_LIMIT = 6.0
#: Each standardised physics value is read through ramps rising over
#: consecutive stretches of this grid (see :func:`_physics_logits`).
PHYSICS_RAMP_EDGES = (-2.5, 2.5)
PHYSICS_RAMPS = 8


def build_model(
    arch: str,
    input_shape: tuple[int, int],
    n_physics: int,
    n_classes: int,
    input_limit: float | None,
) -> Any:
    """An uncompiled Keras model taking ``mfcc`` ``(n_mfcc, n_frames, 1)`` and ``physics``
    ``(n_physics,)``.

    The two inputs meet as added logits: the MFCC network's, and those of an
    additive model of bounded ramps on the physics vector (the fan's own lines and
    modulations, :mod:`soundwatch.physics`). ``input_limit`` fixes the int8
    range of the MFCC input (``None``: no fake quantisation, on either input).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(*input_shape, 1), name="mfcc")
    physics = keras.Input(shape=(n_physics,), name="physics")
    x = inputs if input_limit is None else fake_quant(input_limit, "int8_input")(inputs)
    if arch == "statpool":
        logits = _statpool(x, n_classes, input_limit)
    else:
        logits = _seed_like(x, arch, n_classes)
    total = layers.Add(name="logits")([*logits, _physics_logits(physics, n_classes, input_limit)])
    return keras.Model([inputs, physics], layers.Softmax(name="probs")(total), name=f"fan_{arch}")


def _physics_logits(physics: Any, n_classes: int, input_limit: float | None) -> Any:
    """Logits of the physics vector: an additive model of bounded ramps.

    Each standardised value goes through :data:`PHYSICS_RAMPS` ramps, each
    rising from 0 to 1 over one stretch of a fixed grid, and the logits are a
    linear function of all ramps: every value gets its own learned,
    piecewise-linear, *flat beyond the grid* response. Measured on renderings
    the training never saw (independent simulators), a dense ReLU network on
    the same vector fits the training world better and generalises worse: it
    extrapolates linearly when a value leaves the range it was trained on,
    and a new room or microphone moves several values at once. Bounded ramps
    cannot: a value far outside the grid counts as much as its edge.
    """
    from keras import layers

    h = physics if input_limit is None else fake_quant(PHYSICS_LIMIT, "physics_int8")(physics)
    n = int(physics.shape[-1])
    # The ramps are a fixed dense layer with a fused ReLU6 (each output reads
    # one value): int8 then quantises them on [0, 6], 255 steps per ramp. Written
    # as clip((x - start) / width, 0, 1), the tensor before the clip spans
    # the whole grid and left about 10 steps per ramp.
    ramps = layers.Dense(
        n * PHYSICS_RAMPS, activation="relu6", trainable=False, name="physics_ramps"
    )
    h = ramps(h)
    ramps.set_weights(_ramp_weights(n))
    h = layers.Dropout(0.1, name="physics_dropout")(h)
    return layers.Dense(n_classes, name="physics_logits")(h)


def _ramp_weights(n: int) -> list[Any]:
    """Kernel and bias of the ramp layer: output ``i * k + j`` is ``6 * ramp_j(x_i)``."""
    import numpy as np

    lo, hi = PHYSICS_RAMP_EDGES
    width = (hi - lo) / PHYSICS_RAMPS
    kernel = np.zeros((n, n * PHYSICS_RAMPS), dtype=np.float32)
    bias = np.zeros(n * PHYSICS_RAMPS, dtype=np.float32)
    for i in range(n):
        for j in range(PHYSICS_RAMPS):
            kernel[i, i * PHYSICS_RAMPS + j] = 6.0 / width
            bias[i * PHYSICS_RAMPS + j] = -6.0 * (lo + j * width) / width
    return [kernel, bias]


_LAYERS: dict[str, Any] = {}


def _layer_classes() -> dict[str, Any]:
    """The custom layers, registered for saving (defined on first use: Keras is heavy)."""
    if _LAYERS:
        return _LAYERS
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="soundwatch_train")
    class TimeMean(keras.layers.Layer):  # type: ignore[misc]
        """Mean over time (axis 2); converts to TFLite MEAN."""

        def call(self, x: Any) -> Any:
            return keras.ops.mean(x, axis=2, keepdims=True)

        def compute_output_shape(self, shape: tuple[int | None, ...]) -> tuple[Any, ...]:
            return (shape[0], shape[1], 1, shape[3])

    @keras.saving.register_keras_serializable(package="soundwatch_train")
    class FakeQuant(keras.layers.Layer):  # type: ignore[misc]
        """8-bit fake quantisation on ``[-limit, limit]`` (TF's FakeQuantWithMinMaxArgs).

        The TFLite converter takes the tensor's int8 range from it, and the
        float model keeps the rounding (as QUANTIZE/DEQUANTIZE), so float and
        int8 see the same values. ``enabled = False`` makes it the identity
        (to export a float model on unrounded input, for comparison).
        """

        def __init__(self, limit: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.limit = float(limit)
            self.enabled = True

        def call(self, x: Any) -> Any:
            if not self.enabled:
                return x
            return tf.quantization.fake_quant_with_min_max_args(
                x, min=-self.limit, max=self.limit, num_bits=8
            )

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "limit": self.limit}

    @keras.saving.register_keras_serializable(package="soundwatch_train")
    class RunningCentre(keras.layers.Layer):  # type: ignore[misc]
        """Subtract a per-feature constant: the running mean over batches and time.

        It changes nothing the next batch normalisation would not undo; it is
        there for int8. A time mean of ReLU outputs sits far from zero and moves
        by about 1 % of its size from clip to clip, so on an int8 grid that has
        to reach from 0 to its size the movement is about one step, and the
        batch normalisation behind it blows that rounding up (measured: 138 %
        relative error after the normalisation). Taking the constant off
        *before* the mean leaves the mean centred on zero, and its int8 range
        is then set by the movement alone.
        """

        def __init__(self, momentum: float = BN_MOMENTUM, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.momentum = float(momentum)

        def build(self, shape: tuple[int | None, ...]) -> None:
            self.centre = self.add_weight(
                name="centre",
                shape=(shape[1], 1, shape[3]),
                initializer="zeros",
                trainable=False,
            )

        def call(self, x: Any, training: bool | None = None) -> Any:
            if training:
                batch = keras.ops.mean(x, axis=(0, 2))[:, None, :]
                self.centre.assign(self.momentum * self.centre + (1.0 - self.momentum) * batch)
            return x - keras.ops.stop_gradient(self.centre)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "momentum": self.momentum}

    _LAYERS.update(TimeMean=TimeMean, FakeQuant=FakeQuant, RunningCentre=RunningCentre)
    return _LAYERS


def fake_quant(limit: float, name: str) -> Any:
    """A :class:`FakeQuant` layer."""
    return _layer_classes()["FakeQuant"](limit, name=name)


def set_fake_quant(model: Any, enabled: bool) -> None:
    """Switch every fake-quantisation node of ``model`` on or off."""
    kind = _layer_classes()["FakeQuant"]
    for layer in model.layers:
        if isinstance(layer, kind):
            layer.enabled = enabled


# Frames dropped at each end by ``statpool`` (see the module docstring).
EDGE_FRAMES = (2, 2)


def _time_mean(x: Any, name: str) -> Any:
    """Mean over time as TFLite MEAN: fast, and its int8 output has its own scale.

    (Average pooling must keep its input's scale, which throws away the
    precision that averaging 400 frames gains; a depthwise convolution with
    1/T weights keeps it too but costs 0.6 ms.)
    """
    return _layer_classes()["TimeMean"](name=name)(x)


def _centre(x: Any, name: str, limit: float | None) -> Any:
    """``x`` minus its time mean, in two passes (see the module docstring)."""
    from keras import layers

    mean = _time_mean(x, f"{name}_mean1")
    if limit is not None:
        mean = fake_quant(limit, f"{name}_mean1_int8")(mean)
    coarse = layers.Subtract(name=f"{name}_centre1")([x, mean])
    return layers.Subtract(name=f"{name}_centre2")([coarse, _time_mean(coarse, f"{name}_mean2")])


def _movement(x: Any, name: str, limit: float | None) -> Any:
    """Time means of learned temporal filters of the centred rows: ``(rows, 1, F)``."""
    from keras import layers

    h = layers.Conv2D(
        STATPOOL_FILTERS, kernel_size=(1, 3), activation="relu", name=f"{name}_filters"
    )(_centre(x, name, limit))
    h = _layer_classes()["RunningCentre"](name=f"{name}_offset")(h)
    return _time_mean(h, f"{name}_stats")


def _logits(x: Any, n_classes: int, name: str) -> Any:
    from keras import layers

    x = layers.Flatten(name=f"{name}_flat")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    x = layers.Dropout(0.2, name=f"{name}_dropout")(x)
    return layers.Dense(n_classes, name=f"{name}_logits")(x)


def _statpool(inputs: Any, n_classes: int, limit: float | None) -> list[Any]:
    from keras import layers

    rows = int(inputs.shape[1])
    head, tail = EDGE_FRAMES
    # The zero-filled columns (spec.pad_columns = 2) come on top of the tail.
    x = layers.Cropping2D(((0, 0), (head, tail + 2)), name="core_frames")(inputs)
    c0 = layers.Cropping2D(((0, rows - 1), (0, 0)), name="c0")(x)
    rest = layers.Cropping2D(((1, 0), (0, 0)), name="c1_up")(x)
    return [
        _logits(_time_mean(x, "means"), n_classes, "envelope"),
        _logits(_movement(c0, "c0", limit), n_classes, "loudness_movement"),
        _logits(_movement(rest, "rest", limit), n_classes, "shape_movement"),
    ]


def reference_cnn(input_shape: tuple[int, int], n_classes: int) -> Any:
    """The reference service's CNN exactly: MFCCs in, softmax out (for comparisons)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(*input_shape, 1), name="mfcc")
    (logits,) = _seed_like(inputs, "reference", n_classes)
    return keras.Model(inputs, layers.Softmax(name="probs")(logits), name="reference_cnn")


def _seed_like(inputs: Any, arch: str, n_classes: int) -> list[Any]:
    from keras import layers

    x = inputs
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, kernel_size=2, activation="relu")(x)
        x = layers.MaxPooling2D(pool_size=2)(x)
        x = layers.Dropout(0.2)(x)
    if arch == "reference":
        x = layers.GlobalAveragePooling2D()(x)
    elif arch == "tpool":
        # (rows, time, channels) -> (rows, channels): average over time only.
        # AveragePooling2D over the full time extent converts to one TFLite
        # AVERAGE_POOL_2D op, which int8 kernels support well.
        rows, frames = int(x.shape[1]), int(x.shape[2])
        x = layers.AveragePooling2D(pool_size=(1, frames))(x)
        x = layers.Reshape((rows * int(x.shape[-1]),))(x)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return [layers.Dense(n_classes, name="cnn_logits")(x)]


def compile_model(model: Any, learning_rate: float, total_steps: int) -> None:
    """Adam and categorical cross-entropy on soft labels.

    The learning rate follows a cosine decay to 5 % over the whole run, so the
    last epochs settle instead of jumping between solutions; that makes the
    best-validation checkpoint a stable choice rather than a lucky epoch.
    """
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate, decay_steps=max(total_steps, 1), alpha=0.05
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        # Soft targets: a clip that straddles a change of state is labelled by
        # the share of it each state fills.
        loss="categorical_crossentropy",
        metrics=["categorical_accuracy"],
    )
