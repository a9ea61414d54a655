"""Export: the bundle the device loads, with provenance and held-out metrics.

The mel basis and the DCT matrix are made here by librosa and scipy
(:func:`tools.train.spec.make_feature_spec`) and written with the model,
the class names and messages, the input normalisation, default thresholds,
how the model was made, and how well it did on the held-out unit.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soundwatch.bundle import Typical, write_bundle
from soundwatch.features import FeatureSpec

logger = logging.getLogger(__name__)


def git_commit(repo: Path) -> str | None:
    """``HEAD``'s commit, with ``+dirty`` if the tree has changes; None without git.

    (Ship bundles trained from a committed tree: ``+dirty`` says the code
    that made the model is not the commit named.)"""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def library_versions() -> dict[str, str]:
    """Versions of what shaped the model (TensorFlow only if it is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "librosa", "scikit-learn", "soxr"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def export_bundle(
    out_dir: Path,
    *,
    int8_model: bytes,
    spec: FeatureSpec,
    class_names: tuple[str, ...],
    messages: Mapping[str, str],
    input_mean: np.ndarray | None,
    input_std: np.ndarray | None,
    physics_mean: np.ndarray,
    physics_std: np.ndarray,
    typical: Typical | None,
    thresholds: Mapping[str, float],
    provenance: Mapping[str, Any],
    metrics: Mapping[str, Any],
    name: str = "fan",
    version: str = "1.0.0",
) -> Path:
    """Write the bundle into ``out_dir`` (replacing a previous one)."""
    for stale in ("bundle.json", "model.tflite", "features.npz"):
        (out_dir / stale).unlink(missing_ok=True)
    path = write_bundle(
        out_dir,
        tflite_model=int8_model,
        spec=spec,
        name=name,
        version=version,
        classes=class_names,
        messages=messages,
        input_mean=input_mean,
        input_std=input_std,
        physics_mean=physics_mean,
        physics_std=physics_std,
        typical=typical,
        thresholds=thresholds,
        provenance={
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **provenance,
        },
        metrics=metrics,
    )
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    logger.info("bundle %s: %.1f KB", out_dir, size / 1024)
    return path


def copy_file(src: Path, dst: Path | None) -> None:
    """Copy an artefact next to the code that uses it (skipped when ``dst`` is None)."""
    if dst is None:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    logger.info("copied %s -> %s", src, dst)
