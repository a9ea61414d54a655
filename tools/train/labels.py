"""Class labels: fault types from metadata, or the reference service's PCA + k-means pseudo-labels.

Simulated clips carry their fault type and, for a clip that straddles a
change of state, the share of the clip each state fills: that share is its
soft label (a clip half normal and half imbalanced is labelled 0.5 / 0.5),
so the model's probability follows how much of the window holds the fault
rather than jumping at an arbitrary point of a ramp.

Real MIMII says only normal / abnormal. The reference service clustered the abnormal
clips (PCA, then k-means with k = 3) and called each cluster a fault type.
That path is kept for data without fault types, with two choices made
explicit and measurable on the simulator, where the truth is known:

* each clip is summarised by the mean and standard deviation over time of
  each coefficient (the reference service flattened the 40x433 image, which makes the
  time position of a stationary sound a feature);
* optionally, each (unit, SNR) group's mean normal summary is subtracted
  first, because a fault is a change relative to that unit's own healthy
  sound, and without it clusters tend to follow units rather than faults.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from soundwatch.bundle import REFERENCE_CLASSES, REFERENCE_MESSAGES
from tools.train.scan import ClipRecord, has_fault_labels

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
NORMAL = "normal"


class LabelError(ValueError):
    """Labels cannot be made from this data as asked."""


@dataclass(frozen=True)
class LabelSet:
    """One label per scanned clip: the class it mostly is, and its soft label."""

    class_names: tuple[str, ...]
    labels: npt.NDArray[np.int32]
    source: str
    messages: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    soft: npt.NDArray[np.float32] | None = None  # (clips, classes); None: one-hot

    def soft_labels(self) -> npt.NDArray[np.float32]:
        """``(clips, classes)`` targets; one-hot where the data has no shares."""
        if self.soft is not None:
            return self.soft
        out = np.zeros((len(self.labels), len(self.class_names)), dtype=np.float32)
        out[np.arange(len(self.labels)), self.labels] = 1.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "messages": self.messages,
            "source": self.source,
            "labels": self.labels.tolist(),
            "soft": None if self.soft is None else np.round(self.soft, 4).tolist(),
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LabelSet:
        soft = doc.get("soft")
        return cls(
            class_names=tuple(doc["class_names"]),
            labels=np.asarray(doc["labels"], dtype=np.int32),
            source=doc["source"],
            messages=dict(doc["messages"]),
            details=dict(doc.get("details", {})),
            soft=None if soft is None else np.asarray(soft, dtype=np.float32),
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> LabelSet:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def labels_from_metadata(records: Sequence[ClipRecord]) -> LabelSet:
    """Labels from the fault types the data carries (the simulator's metadata)."""
    if not has_fault_labels(records):
        raise LabelError("some abnormal clips have no fault type; use pseudo-labels")
    faults = sorted({r.fault for r in records} - {NORMAL})
    if set(faults) <= set(REFERENCE_CLASSES):
        # Keep the reference service's class order so the bundle's outputs mean what they did.
        names = tuple(c for c in REFERENCE_CLASSES if c == NORMAL or c in faults)
    else:
        names = (NORMAL, *faults)
    index = {name: i for i, name in enumerate(names)}
    labels = np.asarray([index[r.fault] for r in records], dtype=np.int32)
    soft = np.zeros((len(records), len(names)), dtype=np.float32)
    soft[np.arange(len(records)), labels] = 1.0
    straddling = 0
    for i, r in enumerate(records):
        if not r.fractions:
            continue
        shares = json.loads(r.fractions)
        if len(shares) > 1:
            straddling += 1
        unknown = set(shares) - set(index)
        if unknown:
            raise LabelError(f"{r.rel_path}: states {sorted(unknown)} are not classes {names}")
        soft[i] = 0.0
        for state, share in shares.items():
            soft[i, index[state]] = float(share)
        soft[i] /= soft[i].sum()
    messages = {n: REFERENCE_MESSAGES.get(n, f"Fault: {n}") for n in names}
    details = {"straddling_clips": straddling}
    return LabelSet(names, labels, "metadata", messages, details, soft)


def clip_summary(x: F32, n_real_frames: int) -> F32:
    """Per-coefficient mean and std over a window's real frames: ``(n, 2 * n_mfcc)``."""
    real = x[:, :, :n_real_frames]
    out: F32 = np.concatenate([real.mean(axis=2), real.std(axis=2)], axis=1).astype(np.float32)
    return out


def _relative_to_normal(
    summary: F32, records: Sequence[ClipRecord], clip_idx: npt.NDArray[np.int32]
) -> F32:
    """Subtract each (unit, SNR) group's mean normal summary from its clips."""
    groups = [(records[i].unit, records[i].snr_db) for i in clip_idx]
    out = summary.copy()
    for group in sorted(set(groups)):
        members = np.asarray([g == group for g in groups])
        normal = members & np.asarray([records[i].condition == NORMAL for i in clip_idx])
        if not normal.any():
            raise LabelError(f"no normal clips for unit {group[0]} at {group[1]} dB")
        out[members] -= summary[normal].mean(axis=0)
    return out


def pseudo_labels(
    records: Sequence[ClipRecord],
    x: F32,
    clip_idx: npt.NDArray[np.int32],
    *,
    n_clusters: int,
    n_real_frames: int,
    seed: int,
    pca_components: int = 16,
    relative_to_normal: bool = True,
) -> LabelSet:
    """The reference service's pseudo fault labels: PCA then k-means on the abnormal clips.

    ``x`` holds the non-augmented windows of the clips ``clip_idx`` (every
    clip needs one). Normal clips get label 0; abnormal clips get
    ``1 + cluster``. Cluster numbering is made deterministic by sorting the
    clusters by size (largest first).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if n_clusters < 1:
        raise LabelError("need at least one cluster")
    if sorted(clip_idx.tolist()) != list(range(len(records))):
        raise LabelError("pseudo-labels need exactly one window per clip")
    summary = clip_summary(x, n_real_frames)
    if relative_to_normal:
        summary = _relative_to_normal(summary, records, clip_idx)
    abnormal = np.asarray([records[i].condition != NORMAL for i in clip_idx])
    if abnormal.sum() < n_clusters:
        raise LabelError(f"{abnormal.sum()} abnormal clips cannot make {n_clusters} clusters")
    z = StandardScaler().fit_transform(summary[abnormal])
    n_comp = min(pca_components, z.shape[0], z.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed)
    z = pca.fit_transform(z)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z)
    order = np.argsort(-np.bincount(km.labels_, minlength=n_clusters), kind="stable")
    rank = np.empty(n_clusters, dtype=np.int32)
    rank[order] = np.arange(n_clusters, dtype=np.int32)
    per_clip = np.zeros(len(records), dtype=np.int32)
    per_clip[clip_idx[abnormal]] = 1 + rank[km.labels_]
    names = (NORMAL, *(f"fault_{k + 1}" for k in range(n_clusters)))
    messages = {NORMAL: REFERENCE_MESSAGES[NORMAL]}
    messages.update({n: f"Component abnormal ({n}, unsupervised cluster)" for n in names[1:]})
    details: dict[str, Any] = {
        "method": "PCA + k-means on abnormal, non-augmented clips",
        "summary": "per-coefficient mean and std over time",
        "relative_to_normal": relative_to_normal,
        "pca_components": n_comp,
        "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
        "n_clusters": n_clusters,
        "n_mfcc": int(x.shape[1]),
        "cluster_sizes": np.bincount(per_clip, minlength=n_clusters + 1)[1:].tolist(),
    }
    if has_fault_labels(records):
        details["agreement_with_metadata"] = _agreement(records, per_clip, names)
    return LabelSet(names, per_clip, "pseudo", messages, details)


def _agreement(
    records: Sequence[ClipRecord], labels: npt.NDArray[np.int32], names: Sequence[str]
) -> dict[str, Any]:
    """How well clusters match the true faults (only when the data has them)."""
    from sklearn.metrics import adjusted_rand_score

    abnormal = np.asarray([r.condition != NORMAL for r in records])
    truth = [r.fault for r, a in zip(records, abnormal, strict=True) if a]
    got = labels[abnormal]
    table: dict[str, dict[str, int]] = {}
    for t, g in zip(truth, got, strict=True):
        row = table.setdefault(names[g], {})
        row[t] = row.get(t, 0) + 1
    return {"adjusted_rand_index": float(adjusted_rand_score(truth, got)), "table": table}


def make_labels(
    records: Sequence[ClipRecord],
    x: F32 | None,
    clip_idx: npt.NDArray[np.int32] | None,
    *,
    mode: str,
    n_clusters: int,
    n_real_frames: int,
    seed: int,
    relative_to_normal: bool = True,
) -> LabelSet:
    """Labels by ``mode``: ``metadata``, ``pseudo``, or ``auto`` (metadata if present)."""
    if mode not in ("auto", "metadata", "pseudo"):
        raise LabelError(f"unknown label mode {mode!r}")
    if mode == "metadata" or (mode == "auto" and has_fault_labels(records)):
        labels = labels_from_metadata(records)
    else:
        if x is None or clip_idx is None:
            raise LabelError("pseudo-labels need the clips' features")
        labels = pseudo_labels(
            records,
            x,
            clip_idx,
            n_clusters=n_clusters,
            n_real_frames=n_real_frames,
            seed=seed,
            relative_to_normal=relative_to_normal,
        )
    counts = np.bincount(labels.labels, minlength=len(labels.class_names))
    logger.info(
        "labels from %s: %s",
        labels.source,
        ", ".join(f"{n} {c}" for n, c in zip(labels.class_names, counts, strict=True)),
    )
    return labels
