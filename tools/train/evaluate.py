"""Evaluation of the converted models on the held-out unit, through the serving path.

The int8 model runs through :class:`soundwatch.model.Classifier` (the bundle's
normalisation, its int8 quantisation, LiteRT), i.e. exactly what the device
runs. The float model runs in LiteRT on the same normalised windows. The
result: accuracy overall, per class, per SNR and per class x SNR, confusion
matrices, int8/float top-1 agreement and probability differences, and the
time per window on one thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from soundwatch.bundle import load_bundle
from soundwatch.model import Classifier

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]

THRESHOLD_FLOOR = 0.5
MAX_FALSE_VOTE_RATE = 0.01


class Inputs(NamedTuple):
    """Model inputs of ``n`` windows: MFCCs ``(n, rows, frames)`` and physics ``(n, p)``."""

    x: F32
    p: F32

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: npt.NDArray[Any]) -> Inputs:
        return Inputs(self.x[idx], self.p[idx])


def as_model_inputs(inputs: Inputs) -> list[F32]:
    """The Keras model's inputs: ``[mfcc (n, rows, frames, 1), physics (n, p)]``."""
    return [inputs.x[..., None].astype(np.float32), inputs.p.astype(np.float32)]


def predict_int8(bundle_dir: Path, raw: Inputs) -> F32:
    """Probabilities of the bundle's int8 model for raw (unnormalised) windows."""
    clf = Classifier(load_bundle(bundle_dir), threads=1)
    out: F32 = np.stack(
        [clf.probabilities(x, p) for x, p in zip(raw.x, raw.p, strict=True)]
    ).astype(np.float32)
    return out


def typical_distances(bundle_dir: Path, raw: Inputs, probs: F32) -> F32:
    """Each window's distance from the training windows of the class the model chose."""
    bundle = load_bundle(bundle_dir)
    clf = Classifier(bundle, threads=1)
    assert bundle.typical is not None
    chosen = probs.argmax(axis=1)
    out: F32 = np.asarray(
        [
            bundle.typical.distance(clf.embedding(x, p), int(c))
            for x, p, c in zip(raw.x, raw.p, chosen, strict=True)
        ],
        dtype=np.float32,
    )
    return out


def _interpreter(model: Path | bytes, threads: int = 1) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, bytes):
        interp = Interpreter(model_content=model, num_threads=threads)
    else:
        interp = Interpreter(model_path=str(model), num_threads=threads)
    interp.allocate_tensors()
    return interp


def _quantise(detail: dict[str, Any], value: F32) -> npt.NDArray[Any]:
    if detail["dtype"] != np.int8:
        return value.astype(detail["dtype"])
    scale, zero = detail["quantization"]
    return np.clip(np.round(value / scale) + zero, -128, 127).astype(np.int8)


def predict_tflite(model: Path | bytes, normalised: Inputs) -> F32:
    """Probabilities of a TFLite model (float, or int8 in and out) for normalised inputs."""
    interp = _interpreter(model)
    details = interp.get_input_details()
    mfcc = next(d for d in details if len(d["shape"]) == 4)
    physics = next(d for d in details if len(d["shape"]) == 2)
    out = interp.get_output_details()[0]
    out_scale, out_zero = out["quantization"] if out["dtype"] == np.int8 else (0.0, 0)
    probs = []
    for x, p in zip(normalised.x, normalised.p, strict=True):
        interp.set_tensor(mfcc["index"], _quantise(mfcc, x[None, :, :, None]))
        interp.set_tensor(physics["index"], _quantise(physics, p[None, :]))
        interp.invoke()
        q = interp.get_tensor(out["index"]).reshape(-1).astype(np.float32)
        probs.append((q - out_zero) * out_scale if out_scale else q)
    result: F32 = np.stack(probs).astype(np.float32)
    return result


def ms_per_window(model_path: Path, repeats: int = 200) -> float:
    """Median milliseconds of one ``invoke`` on one thread (LiteRT)."""
    interp = _interpreter(model_path, threads=1)
    for detail in interp.get_input_details():
        interp.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    for _ in range(10):
        interp.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def ms_per_predict(bundle_dir: Path, x: F32, p: F32, repeats: int = 200) -> float:
    """Median milliseconds of ``Classifier.probabilities`` (normalise, quantise, invoke)."""
    clf = Classifier(load_bundle(bundle_dir), threads=1)
    for _ in range(10):
        clf.probabilities(x, p)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.probabilities(x, p)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


@dataclass(frozen=True)
class Scores:
    """Accuracy of one model on one labelled set, broken down."""

    accuracy: float
    balanced_accuracy: float
    per_class: dict[str, float]
    per_snr: dict[str, float]
    per_class_snr: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    confusion: list[list[int]]
    confusion_per_snr: dict[str, list[list[int]]]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def confusion_matrix(y_true: I32, y_pred: I32, n_classes: int) -> list[list[int]]:
    """Rows: true class; columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm.tolist()


def _acc(mask: npt.NDArray[np.bool_], correct: npt.NDArray[np.bool_]) -> float:
    return round(float(correct[mask].mean()), 4) if mask.any() else float("nan")


def score(
    y_true: I32, probs: F32, snr_db: npt.NDArray[np.int64], class_names: Sequence[str]
) -> Scores:
    """Accuracy overall, per class, per SNR and per class x SNR, with confusions."""
    n = len(class_names)
    y_pred = probs.argmax(axis=1).astype(np.int32)
    correct = y_pred == y_true
    snrs = sorted({int(s) for s in snr_db})
    snr_key = {s: f"{s:+d} dB" for s in snrs}
    per_class = {c: _acc(y_true == i, correct) for i, c in enumerate(class_names)}
    return Scores(
        accuracy=round(float(correct.mean()), 4),
        balanced_accuracy=round(float(np.nanmean(list(per_class.values()))), 4),
        per_class=per_class,
        per_snr={snr_key[s]: _acc(snr_db == s, correct) for s in snrs},
        per_class_snr={
            c: {snr_key[s]: _acc((y_true == i) & (snr_db == s), correct) for s in snrs}
            for i, c in enumerate(class_names)
        },
        counts={
            c: {snr_key[s]: int(np.sum((y_true == i) & (snr_db == s))) for s in snrs}
            for i, c in enumerate(class_names)
        },
        confusion=confusion_matrix(y_true, y_pred, n),
        confusion_per_snr={
            snr_key[s]: confusion_matrix(y_true[snr_db == s], y_pred[snr_db == s], n) for s in snrs
        },
    )


def unknown_share(distances: F32, probs: F32, typical: Any) -> dict[str, float]:
    """How many windows read as unknown (``unknown`` ≥ 0.5, and > 0)."""
    chosen = probs.argmax(axis=1)
    u = np.asarray(
        [typical.unknown(float(d), int(c)) for d, c in zip(distances, chosen, strict=True)]
    )
    return {
        "unknown_at_least_half": round(float(np.mean(u >= 0.5)), 4),
        "unknown_above_zero": round(float(np.mean(u > 0)), 4),
        "median_distance": round(float(np.median(distances)), 3),
    }


def score_with_unknown(
    y_true: I32,
    probs: F32,
    unknown: npt.NDArray[np.bool_],
    snr_db: npt.NDArray[np.int64],
    class_names: Sequence[str],
    normal_class: str = "normal",
) -> dict[str, Any]:
    """Accuracy when a window read as unknown counts as wrong, and the normal windows
    called a fault (unknown is not a fault)."""
    y_pred = probs.argmax(axis=1)
    correct = (y_pred == y_true) & ~unknown
    normal = class_names.index(normal_class)
    fault_called = (y_pred != normal) & ~unknown
    snrs = sorted({int(s) for s in snr_db})
    return {
        "accuracy": round(float(correct.mean()), 4),
        "per_snr": {f"{s:+d} dB": _acc(snr_db == s, correct) for s in snrs},
        "per_class": {c: _acc(y_true == i, correct) for i, c in enumerate(class_names)},
        "per_class_snr": {
            c: {f"{s:+d} dB": _acc((y_true == i) & (snr_db == s), correct) for s in snrs}
            for i, c in enumerate(class_names)
        },
        "unknown": round(float(unknown.mean()), 4),
        "normal_called_fault": _acc(y_true == normal, fault_called),
    }


def agreement(probs_a: F32, probs_b: F32) -> dict[str, float]:
    """Top-1 agreement and probability differences between two models."""
    diff = np.abs(probs_a - probs_b)
    return {
        "top1_agreement": round(float(np.mean(probs_a.argmax(1) == probs_b.argmax(1))), 4),
        "max_abs_prob_diff": round(float(diff.max()), 4),
        "mean_abs_prob_diff": round(float(diff.mean()), 5),
    }


def choose_thresholds(
    y_true: I32,
    probs: F32,
    class_names: Sequence[str],
    normal_class: str = "normal",
    max_false_vote_rate: float = MAX_FALSE_VOTE_RATE,
    floor: float = THRESHOLD_FLOOR,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per-fault-class on-thresholds, and what they achieve, from validation windows.

    A window votes for fault ``c`` when ``p(c) >= t_c`` (soundwatch.decision).
    ``t_c`` is the smallest value on a 0.01 grid, at least ``floor``, for which
    at most ``max_false_vote_rate`` of the validation windows of *other*
    classes would vote for ``c``; the largest grid value (0.99) if none does.
    The K-of-N confirmation downstream cuts false alarms further.
    """
    grid = np.round(np.arange(floor, 1.0, 0.01), 2)
    thresholds: dict[str, float] = {}
    achieved: dict[str, dict[str, float]] = {}
    for i, name in enumerate(class_names):
        if name == normal_class:
            continue
        own, others = probs[y_true == i, i], probs[y_true != i, i]
        chosen = float(grid[-1])
        for t in grid:
            if others.size == 0 or float(np.mean(others >= t)) <= max_false_vote_rate:
                chosen = float(t)
                break
        thresholds[name] = chosen
        achieved[name] = {
            "false_vote_rate": round(float(np.mean(others >= chosen)) if others.size else 0.0, 4),
            "recall": round(float(np.mean(own >= chosen)) if own.size else float("nan"), 4),
        }
    return thresholds, achieved


def plot_confusion(scores: Scores, class_names: Sequence[str], title: str, path: Path) -> None:
    """The confusion matrices (all SNRs, then each SNR) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all SNRs", scores.confusion), *scores.confusion_per_snr.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
    short = [c.replace("voltage_change", "voltage") for c in class_names]
    for ax, (name, cm) in zip(np.atleast_1d(axes), panels, strict=True):
        m = np.asarray(cm, dtype=np.float64)
        rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            ax.text(
                c,
                r,
                f"{int(v)}",
                ha="center",
                va="center",
                color="white" if rows[r, c] > 0.5 else "black",
            )
        ax.set_xticks(range(len(short)), short, rotation=30, ha="right")
        ax.set_yticks(range(len(short)), short)
        ax.set_xlabel("predicted")
        ax.set_title(name)
    np.atleast_1d(axes)[0].set_ylabel("true")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def markdown_tables(doc: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    """Per-class x SNR accuracy tables of an ``eval.json``, for the write-up."""
    lines = []
    for model in ("int8", "float", "float_clean"):
        s = doc["test"][model]
        snrs = list(s["per_snr"])
        lines.append(f"| {model} | " + " | ".join(snrs) + " | all |")
        lines.append("|---" * (len(snrs) + 2) + "|")
        for c in class_names:
            row = [f"{s['per_class_snr'][c][k]:.3f}" for k in snrs]
            lines.append(f"| {c} | " + " | ".join(row) + f" | {s['per_class'][c]:.3f} |")
        row = [f"{s['per_snr'][k]:.3f}" for k in snrs]
        lines.append("| **all** | " + " | ".join(row) + f" | {s['accuracy']:.3f} |")
        lines.append("")
    return lines
