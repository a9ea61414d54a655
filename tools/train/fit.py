"""Training: Adam, one epoch at a time, checkpointing the best validation score.

Determinism: Keras and TensorFlow are seeded and TF's deterministic ops are on;
each epoch's shuffle comes from a generator seeded by (seed, epoch), so an
epoch's order does not depend on whether the run was resumed before it.
``last.keras`` (weights and optimizer state) and ``state.json`` are written
after every epoch; ``--resume`` continues from there.

The checkpoint kept is the epoch with the lowest cross-entropy on the
validation unit's non-augmented windows (a whole unit the network never
trains on); its balanced accuracy is logged too. The held-out test unit plays
no part in training or selection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from tools.train.arch import build_model, compile_model
from tools.train.evaluate import Inputs

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Normaliser:
    """Per-coefficient input normalisation, exactly as ``Classifier.prepare`` does it."""

    mean: F32 | None
    std: F32 | None

    @classmethod
    def fit(cls, x: F32, n_real_frames: int) -> Normaliser:
        """Mean and std of each coefficient over the real (not zero-filled) frames."""
        real = x[:, :, :n_real_frames].astype(np.float64)
        mean = real.mean(axis=(0, 2))
        std = np.sqrt(((real - mean[None, :, None]) ** 2).mean(axis=(0, 2)))
        return cls(mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))

    @classmethod
    def identity(cls) -> Normaliser:
        return cls(None, None)

    def apply(self, x: F32) -> F32:
        """Normalise windows ``(n, n_mfcc, n_frames)`` (float32 arithmetic as at serving)."""
        if self.mean is None or self.std is None:
            return x
        inv = (1.0 / self.std).astype(np.float32)
        out: F32 = ((x - self.mean[None, :, None]) * inv[None, :, None]).astype(np.float32)
        return out

    def apply_in_place(self, x: F32) -> F32:
        """:meth:`apply` without a copy (for the multi-GB training array)."""
        if self.mean is not None and self.std is not None:
            x -= self.mean[None, :, None]
            x *= (1.0 / self.std).astype(np.float32)[None, :, None]
        return x

    def save(self, path: Path, grid: InputGrid | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, npt.NDArray[Any]] = {}
        if self.mean is not None and self.std is not None:
            arrays.update(input_mean=self.mean, input_std=self.std)
        if grid is not None:
            arrays["input_limit"] = np.asarray(grid.limit)
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> Normaliser:
        with np.load(path) as npz:
            if "input_mean" not in npz.files:
                return cls.identity()
            return cls(npz["input_mean"], npz["input_std"])


def load_grid(path: Path) -> InputGrid | None:
    """The input grid saved with the normaliser, if any."""
    with np.load(path) as npz:
        return InputGrid(float(npz["input_limit"])) if "input_limit" in npz.files else None


@dataclass(frozen=True)
class InputGrid:
    """The int8 grid of the model input: ``[-limit, limit]`` in steps of ``2 limit / 255``.

    The int8 input has one scale for the whole window, and c0's movement
    within a clip (the amplitude modulation of imbalance and clogging) is
    only about one step of it. The network's first layer fake-quantises its
    input to this grid, so it trains on what the device will feed it, and the
    converter takes the int8 input scale from it.
    """

    limit: float

    @property
    def step(self) -> float:
        return 2.0 * self.limit / 255.0

    @classmethod
    def fit(cls, x: F32, n_real_frames: int, quantile: float = 1e-5) -> InputGrid:
        """Range covering all but ``quantile`` of the real frames at each end (0.5 steps)."""
        sample = x[:: max(1, len(x) // 2000), :, :n_real_frames].ravel()
        lo, hi = np.quantile(sample, [quantile, 1.0 - quantile])
        return cls(float(np.ceil(max(-lo, hi) * 2.0) / 2.0))

    def round(self, x: F32) -> F32:
        """Round to the grid (TF's fake quantisation nudges it to levels -128..127)."""
        levels = np.clip(np.round(x / self.step), -128, 127)
        out: F32 = (levels * self.step).astype(np.float32)
        return out


@dataclass(frozen=True)
class PhysicsNorm:
    """Standardisation of the physics vector, exactly as ``Classifier.prepare_physics`` does."""

    mean: F32
    std: F32

    @classmethod
    def fit(cls, p: F32) -> PhysicsNorm:
        mean = p.astype(np.float64).mean(axis=0)
        std = p.astype(np.float64).std(axis=0)
        return cls(mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))

    def apply(self, p: F32) -> F32:
        inv = (1.0 / self.std).astype(np.float32)
        out: F32 = ((p - self.mean) * inv).astype(np.float32)
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, physics_mean=self.mean, physics_std=self.std)

    @classmethod
    def load(cls, path: Path) -> PhysicsNorm:
        with np.load(path) as npz:
            return cls(npz["physics_mean"], npz["physics_std"])


@dataclass(frozen=True)
class FitSettings:
    arch: str
    n_classes: int
    n_physics: int
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    grid_limit: float | None = None


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    params: int
    history: list[dict[str, float]]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, Keras and TF, and make TF's kernels deterministic."""
    import keras
    import tensorflow as tf

    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def balanced_accuracy(y_true: I32, y_pred: I32, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    recalls = [
        float(np.mean(y_pred[y_true == c] == c)) for c in range(n_classes) if np.any(y_true == c)
    ]
    return float(np.mean(recalls)) if recalls else 0.0


def class_weights(y: I32, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights (real MIMII has far more normal than abnormal clips)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    total = counts.sum()
    return {
        c: float(total / (n_classes * counts[c])) if counts[c] else 0.0 for c in range(n_classes)
    }


def _sample_weights(y: I32, n_classes: int) -> F32:
    weights = class_weights(y, n_classes)
    out: F32 = np.asarray([weights[c] for c in range(n_classes)], dtype=np.float32)[y]
    return out


def _batches(x: Inputs, y: F32, w: F32, order: npt.NDArray[np.int64], batch_size: int) -> Any:
    """The epoch's batches, gathered on demand (no shuffled copy of the whole set)."""
    import keras

    class _Batches(keras.utils.PyDataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return math.ceil(len(order) / batch_size)

        def __getitem__(self, i: int) -> tuple[tuple[F32, F32], F32, F32]:
            idx = order[i * batch_size : (i + 1) * batch_size]
            return (x.x[idx][..., None], x.p[idx]), y[idx], w[idx]

    return _Batches()


def _run_key(settings: FitSettings, y_train: F32, y_val: I32, x_train: Inputs) -> str:
    """Identifies a run, so ``--resume`` never continues a different one."""
    h = hashlib.sha256(json.dumps(settings.__dict__, sort_keys=True).encode())
    h.update(y_train.tobytes())
    h.update(y_val.tobytes())
    step = max(1, len(x_train) // 64)
    h.update(np.ascontiguousarray(x_train.x[::step]).tobytes())
    h.update(np.ascontiguousarray(x_train.p[::step]).tobytes())
    return h.hexdigest()[:16]


class _BatchBar:
    """A Keras callback driving a tqdm bar over the batches of one epoch."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        import keras

        bar = tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled)

        class _Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                bar.update(1)
                if logs and batch % 20 == 0:
                    bar.set_postfix(loss=f"{float(logs.get('loss', math.nan)):.3f}")

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                bar.close()

        self.callback = _Callback()


def fit(
    x_train: Inputs,
    y_train: F32,
    x_val: Inputs,
    y_val: I32,
    settings: FitSettings,
    ckpt_dir: Path,
    *,
    resume: bool,
    progress: bool = True,
) -> FitResult:
    """Train, keep the best epoch's weights in ``ckpt_dir/best.weights.h5``.

    ``y_train`` holds soft labels ``(n, n_classes)`` (rows sum to 1); ``y_val``
    hard labels.
    """
    import keras

    seed_everything(settings.seed)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state_path, last_path = ckpt_dir / "state.json", ckpt_dir / "last.keras"
    best_path = ckpt_dir / "best.weights.h5"
    key = _run_key(settings, y_train, y_val, x_train)
    state = _load_state(state_path) if resume else None
    if state is not None and state.get("key") == key and last_path.exists():
        model = keras.models.load_model(last_path)
        logger.info("resuming %s after epoch %d", settings.arch, state["epoch"])
    else:
        if resume:
            logger.info("no matching checkpoint in %s: training from scratch", ckpt_dir)
        state = {"key": key, "epoch": 0, "best_epoch": 0, "best_score": -1.0, "history": []}
        model = build_model(
            settings.arch,
            x_train.x.shape[1:3],
            settings.n_physics,
            settings.n_classes,
            settings.grid_limit,
        )
        steps_total = settings.epochs * math.ceil(len(x_train) / settings.batch_size)
        compile_model(model, settings.learning_rate, steps_total)
    params = int(model.count_params())
    state["params"] = params
    sample_weight = _sample_weights(y_train.argmax(axis=1).astype(np.int32), settings.n_classes)
    steps = math.ceil(len(x_train) / settings.batch_size)
    x_val_in = (x_val.x[..., None], x_val.p)
    epochs = tqdm(
        range(state["epoch"] + 1, settings.epochs + 1),
        desc=f"fit {settings.arch}",
        unit="epoch",
        disable=not progress,
        initial=state["epoch"],
        total=settings.epochs,
    )
    for epoch in epochs:
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(x_train))
        bar = _BatchBar(steps, f"epoch {epoch}", progress)
        batches = _batches(x_train, y_train, sample_weight, order, settings.batch_size)
        hist = model.fit(batches, epochs=1, shuffle=False, verbose=0, callbacks=[bar.callback])
        probs = model.predict(x_val_in, batch_size=256, verbose=0)
        val_loss = float(np.mean(-np.log(np.maximum(probs[np.arange(len(y_val)), y_val], 1e-7))))
        score = balanced_accuracy(y_val, probs.argmax(axis=1).astype(np.int32), settings.n_classes)
        row = {
            "epoch": epoch,
            "loss": float(hist.history["loss"][0]),
            "accuracy": float(hist.history["categorical_accuracy"][0]),
            "val_loss": val_loss,
            "val_balanced_accuracy": score,
        }
        state["history"].append(row)
        # Select on validation cross-entropy: on a few hundred windows it is
        # far steadier from epoch to epoch than accuracy, which jumps by a
        # few windows and once picked epoch 3 of 20 on a lucky spike.
        if val_loss < _best_loss(state):
            state["best_score"], state["best_epoch"] = score, epoch
            model.save_weights(best_path)
        state["epoch"] = epoch
        model.save(last_path)
        _save_state(state_path, state)
        epochs.set_postfix(loss=f"{row['loss']:.3f}", val=f"{score:.3f}")
        logger.info(
            "epoch %d: loss %.4f acc %.4f val_loss %.4f val_bal_acc %.4f%s",
            epoch,
            row["loss"],
            row["accuracy"],
            val_loss,
            score,
            " (best)" if state["best_epoch"] == epoch else "",
        )
    return FitResult(
        best_epoch=int(state["best_epoch"]),
        best_score=float(state["best_score"]),
        epochs_run=int(state["epoch"]),
        params=params,
        history=list(state["history"]),
    )


def load_best(
    ckpt_dir: Path,
    arch: str,
    input_shape: tuple[int, int],
    n_physics: int,
    n_classes: int,
    input_limit: float | None,
) -> Any:
    """The best epoch's network (for conversion)."""
    model = build_model(arch, input_shape, n_physics, n_classes, input_limit)
    model.load_weights(ckpt_dir / "best.weights.h5")
    return model


def _best_loss(state: dict[str, Any]) -> float:
    for row in state["history"]:
        if row["epoch"] == state["best_epoch"]:
            return float(row["val_loss"])
    return math.inf


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
