"""The model bundle: a TFLite file plus everything needed to feed and read it.

A bundle is a directory::

    bundle.json     format, classes and messages, feature spec scalars,
                    model input/output contract, thresholds, provenance, metrics
    model.tflite    the int8 model
    features.npz    mel_basis, dct_matrix (made by librosa at export time)
                    and, optionally, per-coefficient input_mean / input_std

The loader checks the files against the hashes in ``bundle.json`` and the
arrays against the declared spec, so a corrupt or mismatched bundle is refused
with a message that names what disagrees. (The TFLite input contract is
checked again against the interpreter in :mod:`soundwatch.model`.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from soundwatch.features import FeatureSpec, FeatureSpecError

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "soundwatch-bundle/1"
DEFAULT_BUNDLE_DIR = Path(__file__).parent / "models" / "fan"

# The seeds' class order and messages; kept here so that the training export
# and any tooling agree on them.
SEED_CLASSES: tuple[str, ...] = ("normal", "imbalance", "clogging", "voltage_change")
SEED_MESSAGES: dict[str, str] = {
    "normal": "Component OK",
    "imbalance": "Component is imbalanced",
    "clogging": "Component is clogged",
    "voltage_change": "Voltage change",
}


class BundleError(ValueError):
    """The bundle is missing, corrupt, or disagrees with itself."""


@dataclass(frozen=True)
class ClassInfo:
    """One output class of the model."""

    name: str
    message: str
    anomaly: bool


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated model bundle."""

    path: Path
    name: str
    version: str
    model_path: Path
    spec: FeatureSpec
    classes: tuple[ClassInfo, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    output_dtype: str
    input_mean: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    input_std: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def model_version(self) -> str:
        """``name@version``, the identifier events and APIs report."""
        return f"{self.name}@{self.version}"

    def info(self) -> dict[str, Any]:
        """A JSON-ready description (for ``/info`` and ``getStatus``)."""
        return {
            "name": self.name,
            "version": self.version,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "classes": [c.name for c in self.classes],
            "messages": {c.name: c.message for c in self.classes},
            "feature_spec": self.spec.scalars(),
            "input_normalisation": self.input_mean is not None,
            "thresholds": dict(self.thresholds),
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
        }


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _require(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise BundleError(f"{where}: missing key {key!r}")
    value = doc[key]
    if not isinstance(value, kind):
        raise BundleError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _inside(root: Path, name: str, where: str) -> Path:
    """``root / name``, refused before it is opened unless it resolves inside ``root``.

    A bundle is a directory copied from elsewhere: its bundle.json must not
    make the module read (or block on) a file outside it.
    """
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{where}: {name!r} is outside the bundle directory; not read")
    return path


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Load and validate the bundle in ``path`` (default: the shipped one)."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    meta_path = root / "bundle.json"
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"no bundle at {root}: {meta_path.name} not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{meta_path}: unreadable ({e})") from e
    if not isinstance(doc, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    where = str(meta_path)
    fmt = _require(doc, "format", str, where)
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{where}: format {fmt!r} is not {BUNDLE_FORMAT!r}")

    model_doc = _require(doc, "model", dict, where)
    model_path = _inside(root, _require(model_doc, "file", str, f"{where}: model"), where)
    _check_hash(model_path, _require(model_doc, "sha256", str, f"{where}: model"), "model")
    input_shape = tuple(int(v) for v in _require(model_doc, "input_shape", list, f"{where}: model"))
    input_dtype = _require(model_doc, "input_dtype", str, f"{where}: model")
    output_dtype = _require(model_doc, "output_dtype", str, f"{where}: model")

    feat_doc = _require(doc, "features", dict, where)
    feat_path = _inside(root, _require(feat_doc, "file", str, f"{where}: features"), where)
    _check_hash(feat_path, _require(feat_doc, "sha256", str, f"{where}: features"), "features")
    arrays = _load_arrays(feat_path)
    scalars = {k: v for k, v in feat_doc.items() if k not in ("file", "sha256")}
    try:
        spec = FeatureSpec(
            mel_basis=arrays["mel_basis"].astype(np.float32),
            dct_matrix=arrays["dct_matrix"].astype(np.float32),
            **scalars,
        )
    except KeyError as e:
        raise BundleError(f"{feat_path}: missing array {e}") from e
    except TypeError as e:
        raise BundleError(f"{where}: features: {e}") from e
    except FeatureSpecError as e:
        raise BundleError(f"{where}: {e}") from e

    expected = (1, spec.n_mfcc, spec.n_frames, 1)
    if input_shape != expected:
        raise BundleError(
            f"{where}: model input_shape {list(input_shape)} disagrees with the feature spec "
            f"(n_mfcc={spec.n_mfcc}, n_frames={spec.n_frames} -> {list(expected)})"
        )
    mean, std = arrays.get("input_mean"), arrays.get("input_std")
    if (mean is None) != (std is None):
        raise BundleError(f"{feat_path}: input_mean and input_std must come together")
    if mean is not None and std is not None:
        for name, arr in (("input_mean", mean), ("input_std", std)):
            if arr.shape != (spec.n_mfcc,) or not np.all(np.isfinite(arr)):
                raise BundleError(
                    f"{feat_path}: {name} must be {spec.n_mfcc} finite values, got {arr.shape}"
                )
        if np.any(std <= 0):
            raise BundleError(f"{feat_path}: input_std must be positive")

    classes = tuple(
        _parse_class(c, f"{where}: classes") for c in _require(doc, "classes", list, where)
    )
    if not classes:
        raise BundleError(f"{where}: no classes")
    thresholds = doc.get("thresholds", {})
    unknown = set(thresholds) - {c.name for c in classes}
    if unknown:
        raise BundleError(f"{where}: thresholds name unknown classes {sorted(unknown)}")
    return Bundle(
        path=root,
        name=_require(doc, "name", str, where),
        version=_require(doc, "version", str, where),
        model_path=model_path,
        spec=spec,
        classes=classes,
        input_shape=input_shape,
        input_dtype=input_dtype,
        output_dtype=output_dtype,
        input_mean=None if mean is None else mean.astype(np.float32),
        input_std=None if std is None else std.astype(np.float32),
        thresholds={k: float(v) for k, v in thresholds.items()},
        provenance=doc.get("provenance", {}),
        metrics=doc.get("metrics", {}),
    )


def _parse_class(item: Any, where: str) -> ClassInfo:
    if not isinstance(item, dict):
        raise BundleError(f"{where}: each class must be an object")
    return ClassInfo(
        name=_require(item, "name", str, where),
        message=_require(item, "message", str, where),
        anomaly=_require(item, "anomaly", bool, where),
    )


def _check_hash(path: Path, expected: str, what: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise BundleError(f"{what} file {path} unreadable: {e}") from e
    if actual != expected:
        raise BundleError(
            f"{what} file {path} is corrupt: sha256 {actual[:12]}… "
            f"!= {expected[:12]}… in bundle.json"
        )


def _load_arrays(path: Path) -> dict[str, npt.NDArray[Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BundleError(f"features file {path} unreadable: {e}") from e


def write_bundle(
    out_dir: Path,
    *,
    tflite_model: bytes,
    spec: FeatureSpec,
    name: str,
    version: str,
    input_dtype: str = "int8",
    output_dtype: str = "int8",
    classes: Sequence[str] = SEED_CLASSES,
    messages: Mapping[str, str] = SEED_MESSAGES,
    normal_class: str = "normal",
    input_mean: npt.NDArray[np.floating[Any]] | None = None,
    input_std: npt.NDArray[np.floating[Any]] | None = None,
    thresholds: Mapping[str, float] | None = None,
    provenance: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle that :func:`load_bundle` accepts; returns its directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.tflite"
    model_path.write_bytes(tflite_model)
    arrays: dict[str, npt.NDArray[Any]] = {
        "mel_basis": spec.mel_basis.astype(np.float32),
        "dct_matrix": spec.dct_matrix.astype(np.float32),
    }
    if input_mean is not None and input_std is not None:
        arrays["input_mean"] = np.asarray(input_mean, dtype=np.float32)
        arrays["input_std"] = np.asarray(input_std, dtype=np.float32)
    feat_path = out_dir / "features.npz"
    np.savez_compressed(feat_path, **arrays)  # type: ignore[arg-type]
    doc = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "version": version,
        "model": {
            "file": model_path.name,
            "sha256": sha256_file(model_path),
            "input_shape": [1, spec.n_mfcc, spec.n_frames, 1],
            "input_dtype": input_dtype,
            "output_dtype": output_dtype,
        },
        "features": {"file": feat_path.name, "sha256": sha256_file(feat_path), **spec.scalars()},
        "classes": [
            {"name": c, "message": messages[c], "anomaly": c != normal_class} for c in classes
        ],
        "thresholds": dict(thresholds or {}),
        "provenance": dict(provenance or {}),
        "metrics": dict(metrics or {}),
    }
    (out_dir / "bundle.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote bundle %s (%d bytes of model)", out_dir, len(tflite_model))
    return out_dir
