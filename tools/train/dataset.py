"""Featurisation: clips (and their augmented copies) to model windows, cached.

Audio is decoded by :func:`soundwatch.audio.decode_audio` (soundfile, mono by
channel mean, soxr HQ to 22.05 kHz, i.e. what ``librosa.load`` does) and turned
into a window's MFCCs and physics by
:meth:`soundwatch.features.FeatureExtractor.analyse`: the same code the device
runs for a clip and for every streaming window. Work is cut into fixed shards
of consecutive clips; each shard is cached as an ``.npz`` whose name hashes everything its content
depends on, so a repeated or interrupted run recomputes only what is missing,
and the result is the same for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from soundwatch.audio import decode_audio
from soundwatch.features import FeatureExtractor, FeatureSpec, WindowFeatures
from soundwatch.physics import PHYSICS_VERSION
from tools.train.augment import AugmentConfig, augmented_copies
from tools.train.scan import ClipRecord
from tools.train.spec import spec_digest

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
DEFAULT_SHARD_CLIPS = 64


@dataclass(frozen=True)
class FeatureSet:
    """Model windows with the clip each came from.

    ``x`` has shape ``(n, n_mfcc, n_frames)``, ``p`` ``(n, n_physics)``;
    ``valid_s`` and ``clipped`` are each window's quality; ``clip[i]``
    indexes the scan's records; ``copy[i]`` is 0 for the clip itself and
    ``j >= 1`` for its ``j``-th augmented copy.
    """

    x: F32
    p: F32
    valid_s: F32
    clipped: F32
    clip: npt.NDArray[np.int32]
    copy: npt.NDArray[np.int8]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, mask: npt.NDArray[np.bool_]) -> FeatureSet:
        return FeatureSet(
            self.x[mask],
            self.p[mask],
            self.valid_s[mask],
            self.clipped[mask],
            self.clip[mask],
            self.copy[mask],
        )

    def originals(self) -> FeatureSet:
        """Only the non-augmented windows."""
        return self.select(self.copy == 0)


@dataclass(frozen=True)
class _ShardJob:
    root: Path
    records: tuple[ClipRecord, ...]
    first_index: int
    augment: tuple[bool, ...]
    spec: FeatureSpec
    config: AugmentConfig
    seed: int
    out_path: Path


def clip_windows(
    y: F32,
    rel_path: str,
    extractor: FeatureExtractor,
    *,
    augment: bool,
    config: AugmentConfig,
    seed: int,
) -> list[WindowFeatures]:
    """The window of a decoded clip, then those of its augmented copies."""
    copies = augmented_copies(y, rel_path, seed, config) if augment else []
    return [extractor.analyse(v) for v in (y, *copies)]


def _run_shard(job: _ShardJob) -> Path:
    """Compute one shard and write it atomically; returns its path."""
    from threadpoolctl import threadpool_limits

    extractor = FeatureExtractor(job.spec)
    xs: list[F32] = []
    ps: list[F32] = []
    quality: list[tuple[float, float]] = []
    clips: list[int] = []
    copies: list[int] = []
    # One BLAS thread per worker: the workers already use every core.
    with threadpool_limits(1):
        for offset, (rec, aug) in enumerate(zip(job.records, job.augment, strict=True)):
            clip = decode_audio(job.root / rec.rel_path, job.spec.sample_rate_hz)
            windows = clip_windows(
                clip.samples,
                rec.rel_path,
                extractor,
                augment=aug,
                config=job.config,
                seed=job.seed,
            )
            xs.extend(w.mfcc for w in windows)
            ps.extend(w.physics for w in windows)
            quality.extend((w.quality.valid_s, w.quality.clipped_fraction) for w in windows)
            clips.extend([job.first_index + offset] * len(windows))
            copies.extend(range(len(windows)))
    tmp = job.out_path.with_suffix(".tmp.npz")
    q = np.asarray(quality, dtype=np.float32).reshape(-1, 2)
    np.savez(
        tmp,
        x=np.stack(xs).astype(np.float32),
        p=np.stack(ps).astype(np.float32),
        valid_s=q[:, 0],
        clipped=q[:, 1],
        clip=np.asarray(clips, dtype=np.int32),
        copy=np.asarray(copies, dtype=np.int8),
    )
    os.replace(tmp, job.out_path)
    return job.out_path


def _shard_key(job: _ShardJob, digest: str) -> str:
    """Hash of everything a shard's content depends on."""
    items = []
    for rec, aug in zip(job.records, job.augment, strict=True):
        st = (job.root / rec.rel_path).stat()
        items.append([rec.rel_path, st.st_size, st.st_mtime_ns, aug])
    doc = {
        "spec": digest,
        "physics": PHYSICS_VERSION,
        "augment": job.config.as_dict() if any(job.augment) else None,
        "seed": job.seed if any(job.augment) else None,
        "first": job.first_index,
        "clips": items,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def compute_features(
    records: Sequence[ClipRecord],
    root: Path,
    spec: FeatureSpec,
    cache_dir: Path,
    *,
    augment: Sequence[bool],
    config: AugmentConfig,
    seed: int,
    workers: int = 1,
    shard_clips: int = DEFAULT_SHARD_CLIPS,
    progress: bool = True,
) -> FeatureSet:
    """Windows for every record (plus augmented copies where ``augment``).

    Shards already in ``cache_dir`` are loaded, not recomputed. The output is
    identical for any ``workers`` because shards are fixed by position and
    every random draw is seeded by (seed, clip path, copy).
    """
    if len(augment) != len(records):
        raise ValueError("augment must have one flag per record")
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = spec_digest(spec)
    jobs = []
    for start in range(0, len(records), shard_clips):
        stop = min(start + shard_clips, len(records))
        job = _ShardJob(
            root=root,
            records=tuple(records[start:stop]),
            first_index=start,
            augment=tuple(augment[start:stop]),
            spec=spec,
            config=config,
            seed=seed,
            out_path=Path(),
        )
        key = _shard_key(job, digest)
        jobs.append(
            _ShardJob(**{**job.__dict__, "out_path": cache_dir / f"shard-{start:06d}-{key}.npz"})
        )
    todo = [j for j in jobs if not j.out_path.exists()]
    logger.info(
        "features: %d clips in %d shards, %d cached, %d to compute with %d worker(s)",
        len(records),
        len(jobs),
        len(jobs) - len(todo),
        len(todo),
        workers,
    )
    if todo:
        _run_jobs(todo, workers, progress)
    return _load_shards([j.out_path for j in jobs])


def _run_jobs(jobs: Sequence[_ShardJob], workers: int, progress: bool) -> None:
    total = sum(len(j.records) for j in jobs)
    with tqdm(total=total, unit="clip", desc="features", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                _run_shard(job)
                bar.update(len(job.records))
            return
        # fork: workers inherit the imported modules; TensorFlow is never
        # imported before this stage, so forking is safe.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            futures = {pool.submit(_run_shard, job): job for job in jobs}
            for future in as_completed(futures):
                future.result()
                bar.update(len(futures[future].records))


def _load_shards(paths: Sequence[Path]) -> FeatureSet:
    """Concatenate shards into one preallocated array (no second full copy)."""
    clips, copies, ps, valid, clipped = [], [], [], [], []
    for path in paths:
        with np.load(path) as npz:
            clips.append(npz["clip"])
            copies.append(npz["copy"])
            ps.append(npz["p"])
            valid.append(npz["valid_s"])
            clipped.append(npz["clipped"])
    total = sum(len(c) for c in clips)
    x: F32 | None = None
    start = 0
    for path in paths:
        with np.load(path) as npz:
            part = npz["x"]
        if x is None:
            x = np.empty((total, *part.shape[1:]), dtype=np.float32)
        x[start : start + len(part)] = part
        start += len(part)
    if x is None:
        raise ValueError("no feature shards to load")
    return FeatureSet(
        x,
        np.concatenate(ps),
        np.concatenate(valid),
        np.concatenate(clipped),
        np.concatenate(clips),
        np.concatenate(copies),
    )
