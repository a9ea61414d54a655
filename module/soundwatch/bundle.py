"""The model bundle: a TFLite file plus everything needed to feed and read it.

A bundle is a directory::

    bundle.json     format, classes and messages, feature spec scalars, the
                    physics features' version and names, the model's two inputs,
                    the rule for "unknown", thresholds, provenance, metrics
    model.tflite    the int8 model
    features.npz    mel_basis, dct_matrix (made by librosa at export time),
                    per-coefficient input_mean / input_std, physics_mean /
                    physics_std, and the training world's typical windows
                    per class (typical_mean, typical_precision) for "unknown"

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
from soundwatch.physics import FEATURE_NAMES, PHYSICS_VERSION

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "soundwatch-bundle/2"
DEFAULT_BUNDLE_DIR = Path(__file__).parent / "models" / "fan"

# The reference service's class order and messages; kept here so that the
# training export and any tooling agree on them.
REFERENCE_CLASSES: tuple[str, ...] = ("normal", "imbalance", "clogging", "voltage_change")
REFERENCE_MESSAGES: dict[str, str] = {
    "normal": "Component OK",
    "imbalance": "Component is imbalanced",
    "clogging": "Component is clogged",
    "voltage_change": "Voltage change",
}
#: The verdict for a window unlike anything the model knows, or one it cannot judge.
UNKNOWN = "unknown"
UNKNOWN_MESSAGE = "Sound unlike anything the model knows"


class BundleError(ValueError):
    """The bundle is missing, corrupt, or disagrees with itself."""


@dataclass(frozen=True)
class ClassInfo:
    """One output class of the model."""

    name: str
    message: str
    anomaly: bool


@dataclass(frozen=True)
class Typical:
    """What windows of each class look like in training, to tell when one looks like none.

    The distance is Mahalanobis (one shared, shrunk within-class covariance)
    from the window's standardised physics and normalised MFCC means to the
    training mean of the class the model chose. Each class's ``threshold``
    is a high quantile of its own training windows' distances; ``unknown``
    rises from 0 there to 1 at ``threshold + ramp``.
    """

    means: npt.NDArray[np.float64] = field(repr=False)  # (classes, dims)
    precision: npt.NDArray[np.float64] = field(repr=False)
    thresholds: tuple[float, ...]
    ramps: tuple[float, ...]

    def distance(self, embedding: npt.NDArray[np.float32], class_index: int) -> float:
        d = embedding.astype(np.float64) - self.means[class_index]
        return float(np.sqrt(max(0.0, float(d @ self.precision @ d))))

    def unknown(self, distance: float, class_index: int) -> float:
        over = (distance - self.thresholds[class_index]) / self.ramps[class_index]
        return float(min(1.0, max(0.0, over)))


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
    physics_mean: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    physics_std: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    typical: Typical | None = None
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
            "physics": {"version": PHYSICS_VERSION, "names": list(FEATURE_NAMES)},
            "input_normalisation": self.input_mean is not None,
            "unknown": None
            if self.typical is None
            else {"thresholds": list(self.typical.thresholds), "ramps": list(self.typical.ramps)},
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
        raise BundleError(
            f"{where}: format {fmt!r} is not {BUNDLE_FORMAT!r} (a bundle from another "
            "soundwatch version: retrain it with this one, or use the shipped bundle)"
        )
    physics_doc = _require(doc, "physics", dict, where)
    if physics_doc.get("version") != PHYSICS_VERSION or physics_doc.get("names") != list(
        FEATURE_NAMES
    ):
        raise BundleError(
            f"{where}: physics features version {physics_doc.get('version')!r} differ from this "
            f"soundwatch's ({PHYSICS_VERSION}): the model was trained on other inputs; retrain it"
        )

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

    physics_mean, physics_std = arrays.get("physics_mean"), arrays.get("physics_std")
    n_physics = len(FEATURE_NAMES)
    for name, values in (("physics_mean", physics_mean), ("physics_std", physics_std)):
        if values is None or values.shape != (n_physics,) or not np.all(np.isfinite(values)):
            raise BundleError(f"{feat_path}: {name} must be {n_physics} finite values")
    assert physics_mean is not None and physics_std is not None
    if np.any(physics_std <= 0):
        raise BundleError(f"{feat_path}: physics_std must be positive")
    typical = _typical(doc, arrays, n_physics + spec.n_mfcc, where)

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
        physics_mean=physics_mean.astype(np.float32),
        physics_std=physics_std.astype(np.float32),
        typical=typical,
        thresholds={k: float(v) for k, v in thresholds.items()},
        provenance=doc.get("provenance", {}),
        metrics=doc.get("metrics", {}),
    )


def _typical(
    doc: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]], dims: int, where: str
) -> Typical | None:
    rule = doc.get("unknown")
    if rule is None:
        return None
    if not isinstance(rule, dict):
        raise BundleError(f"{where}: 'unknown' must be an object")
    n_classes = len(doc.get("classes", []))
    means, precision = arrays.get("typical_mean"), arrays.get("typical_precision")
    if (
        means is None
        or precision is None
        or means.shape != (n_classes, dims)
        or precision.shape != (dims, dims)
    ):
        raise BundleError(
            f"{where}: typical_mean/typical_precision missing or not ({n_classes}, {dims})"
        )
    thresholds = _require(rule, "thresholds", list, f"{where}: unknown")
    ramps = _require(rule, "ramps", list, f"{where}: unknown")
    if len(thresholds) != n_classes or len(ramps) != n_classes or min(ramps) <= 0:
        raise BundleError(f"{where}: unknown: one threshold and one positive ramp per class")
    if not np.all(np.isfinite(precision)):
        raise BundleError(f"{where}: unknown: the precision matrix is not finite")
    return Typical(
        means.astype(np.float64),
        precision.astype(np.float64),
        tuple(float(t) for t in thresholds),
        tuple(float(r) for r in ramps),
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
    classes: Sequence[str] = REFERENCE_CLASSES,
    messages: Mapping[str, str] = REFERENCE_MESSAGES,
    normal_class: str = "normal",
    input_mean: npt.NDArray[np.floating[Any]] | None = None,
    input_std: npt.NDArray[np.floating[Any]] | None = None,
    physics_mean: npt.NDArray[np.floating[Any]] | None = None,
    physics_std: npt.NDArray[np.floating[Any]] | None = None,
    typical: Typical | None = None,
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
    n_physics = len(FEATURE_NAMES)
    arrays["physics_mean"] = np.asarray(
        np.zeros(n_physics) if physics_mean is None else physics_mean, dtype=np.float32
    )
    arrays["physics_std"] = np.asarray(
        np.ones(n_physics) if physics_std is None else physics_std, dtype=np.float32
    )
    if typical is not None:
        arrays["typical_mean"] = np.asarray(typical.means, dtype=np.float32)
        arrays["typical_precision"] = np.asarray(typical.precision, dtype=np.float32)
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
            "physics_shape": [1, n_physics],
            "input_dtype": input_dtype,
            "output_dtype": output_dtype,
        },
        "features": {"file": feat_path.name, "sha256": sha256_file(feat_path), **spec.scalars()},
        "physics": {"version": PHYSICS_VERSION, "names": list(FEATURE_NAMES)},
        "unknown": None
        if typical is None
        else {
            "thresholds": [round(t, 4) for t in typical.thresholds],
            "ramps": [round(r, 4) for r in typical.ramps],
            "rule": "Mahalanobis distance of the window's standardised physics and MFCC "
            "means from the training windows of the class the model chose; unknown rises "
            "from 0 at that class's threshold (a high quantile of its training windows' "
            "distances) to 1 at threshold + ramp",
        },
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
