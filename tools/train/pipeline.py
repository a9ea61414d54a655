"""The stages, wired: each takes the run's :class:`TrainConfig` and reads what
the earlier stages left in the work directory (recomputing it, from cache
where possible, if it is missing)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from soundwatch.bundle import Typical
from soundwatch.physics import FEATURE_NAMES
from tools.train import evaluate as ev
from tools.train.dataset import FeatureSet, compute_features
from tools.train.evaluate import Inputs
from tools.train.export import copy_file, export_bundle, git_commit, library_versions
from tools.train.fit import FitResult, FitSettings, InputGrid, Normaliser, PhysicsNorm, load_grid
from tools.train.labels import LabelSet, make_labels
from tools.train.layout import StageTimer, TrainConfig
from tools.train.scan import ClipRecord, read_records, report, scan_tree, write_records
from tools.train.spec import make_feature_spec

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
REPO = Path(__file__).resolve().parents[2]
SIMULATION_JSON = "simulation.json"
#: The share of training windows whose distance from the training world
#: may exceed the "unknown" threshold, and the ramp above it (as a share of it).
TYPICAL_QUANTILE = 0.999
TYPICAL_RAMP = 0.25


@dataclass(frozen=True)
class Splits:
    """Boolean masks over the scan's records."""

    train: npt.NDArray[np.bool_]
    val: npt.NDArray[np.bool_]
    test: npt.NDArray[np.bool_]


def split_by_unit(
    records: list[ClipRecord],
    val_units: tuple[str, ...],
    test_units: tuple[str, ...],
    hold_out: Mapping[str, tuple[str, ...]] | None = None,
) -> Splits:
    """Whole units for validation and for the final test; the rest train.

    ``hold_out`` leaves families of the simulated world out of training and
    validation (``{"room": ("live",)}``): their clips are used by nobody
    here, and a held-out-family study tests on a set rendered from them alone.
    """
    units = np.asarray([r.unit for r in records])
    for role, chosen in (("validation", val_units), ("test", test_units)):
        missing = sorted(set(chosen) - set(units))
        if missing:
            raise ValueError(f"{role} units {missing} are not in the data ({sorted(set(units))})")
    val, test = np.isin(units, val_units), np.isin(units, test_units)
    held = np.zeros(len(records), dtype=bool)
    for key, values in (hold_out or {}).items():
        held |= np.asarray([r.family.get(key) in values for r in records])
    return Splits(train=~(val | test) & ~held, val=val & ~held, test=test)


# -- stages -------------------------------------------------------------------


def simulate(cfg: TrainConfig) -> None:
    """Render the simulated world to ``cfg.data`` unless it already holds a tree.

    A render that was interrupted (its marker file is still there) starts again.
    """
    marker = cfg.data / ".rendering"
    if marker.exists():
        logger.info("simulate: %s holds an interrupted render; starting again", cfg.data)
        shutil.rmtree(cfg.data)
    elif (cfg.data / "metadata.csv").exists() or any(cfg.data.glob("*_dB_*")):
        logger.info("simulate: %s already holds data; skipped", cfg.data)
        return
    from soundwatch.sim.dataset import ClipPlan, plan_clips, write_clips
    from soundwatch.sim.world import Mixture

    sim = cfg.sim
    mixture = Mixture(
        events_per_clip=sim.events_per_clip,
        dropout=sim.dropout,
        level_step=sim.level_step,
        clipping=sim.clipping,
    )
    train = ClipPlan(
        units=sim.train_units,
        per_class=sim.per_class,
        mixture=mixture,
        straddle=sim.straddle,
        short=sim.short,
    )
    held_out = ClipPlan(
        units=(*sim.val_units, *sim.test_units),
        per_class=sim.test_per_class,
        snrs_db=sim.snrs_db,
    )
    # Different seeds per plan: the held-out units' clips share nothing with training.
    jobs = plan_clips(cfg.data, train, cfg.seed) + plan_clips(cfg.data, held_out, cfg.seed + 1)
    logger.info("simulate: %d clips to %s (%s)", len(jobs), cfg.data, sim.as_dict())
    cfg.data.mkdir(parents=True, exist_ok=True)
    marker.touch()
    write_clips(jobs, cfg.data, workers=cfg.workers)
    doc = {"generator": "soundwatch.sim.dataset", "seed": cfg.seed, **sim.as_dict()}
    (cfg.data / SIMULATION_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    marker.unlink()


def scan(cfg: TrainConfig) -> list[ClipRecord]:
    """Scan the tree, write ``scan.csv`` and the header report."""
    records = scan_tree(cfg.data)
    lines = report(records).lines()
    write_records(records, cfg.layout.scan_csv)
    cfg.layout.scan_report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines[:6]:
        logger.info("scan: %s", line)
    return records


def _records(cfg: TrainConfig) -> list[ClipRecord]:
    path = cfg.layout.scan_csv
    return read_records(path) if path.exists() else scan(cfg)


_FEATURE_CACHE: dict[tuple[Any, ...], FeatureSet] = {}


def features(cfg: TrainConfig, records: list[ClipRecord] | None = None) -> FeatureSet:
    """Windows of every clip, plus augmented copies of the training units' clips.

    The result stays in memory for the later stages of the same process
    (``all``): reloading a few GB of cached shards costs tens of seconds.
    """
    records = records if records is not None else _records(cfg)
    paths = tuple(r.rel_path for r in records)
    key: tuple[Any, ...] = (cfg.data, cfg.work, cfg.seed, cfg.val_units, cfg.test_units)
    key += (cfg.augment, cfg.n_mfcc, paths)
    if key in _FEATURE_CACHE:
        return _FEATURE_CACHE[key]
    _FEATURE_CACHE.clear()
    splits = split_by_unit(records, cfg.val_units, cfg.test_units)
    _FEATURE_CACHE[key] = compute_features(
        records,
        cfg.data,
        make_feature_spec(cfg.n_mfcc),
        cfg.layout.features_dir,
        augment=splits.train.tolist(),
        config=cfg.augment,
        seed=cfg.seed,
        workers=cfg.workers,
        progress=cfg.progress,
    )
    return _FEATURE_CACHE[key]


def _n_real_frames() -> int:
    spec = make_feature_spec()
    return spec.n_frames - spec.pad_columns


def labels(
    cfg: TrainConfig, records: list[ClipRecord] | None = None, feats: FeatureSet | None = None
) -> LabelSet:
    """Fault labels (soft, for clips that straddle a change) from metadata, or pseudo-labels."""
    records = records if records is not None else _records(cfg)
    needs_features = cfg.labels == "pseudo" or (
        cfg.labels == "auto" and not all(r.fault for r in records)
    )
    x = idx = None
    if needs_features:
        orig = (feats if feats is not None else features(cfg, records)).originals()
        x, idx = orig.x, orig.clip
    result = make_labels(
        records,
        x,
        idx,
        mode=cfg.labels,
        n_clusters=cfg.n_clusters,
        n_real_frames=_n_real_frames(),
        seed=cfg.seed,
        relative_to_normal=cfg.relative_to_normal,
    )
    result.write(cfg.layout.labels_json)
    return result


def _labels(cfg: TrainConfig, records: list[ClipRecord], feats: FeatureSet) -> LabelSet:
    """``labels.json`` if it was made for these clips and settings, else new labels."""
    path = cfg.layout.labels_json
    if path.exists():
        found = LabelSet.read(path)
        if len(found.labels) == len(records) and _label_settings_match(cfg, records, found):
            return found
    return labels(cfg, records, feats)


def _label_settings_match(cfg: TrainConfig, records: list[ClipRecord], found: LabelSet) -> bool:
    pseudo = cfg.labels == "pseudo" or (cfg.labels == "auto" and not all(r.fault for r in records))
    if not pseudo:
        return found.source == "metadata"
    return (
        found.source == "pseudo"
        and found.details.get("n_clusters") == cfg.n_clusters
        and found.details.get("relative_to_normal") == cfg.relative_to_normal
        and found.details.get("n_mfcc") == cfg.n_mfcc
    )


@dataclass(frozen=True)
class _Data:
    records: list[ClipRecord]
    feats: FeatureSet
    labels: LabelSet
    splits: Splits

    def part(
        self, name: str, originals_only: bool
    ) -> tuple[Inputs, I32, F32, npt.NDArray[np.int64]]:
        """Raw inputs, hard labels, soft labels and SNRs of one split."""
        mask = getattr(self.splits, name)[self.feats.clip]
        if originals_only:
            mask &= self.feats.copy == 0
        clips = self.feats.clip[mask]
        snr = np.asarray([self.records[i].snr_db for i in clips], dtype=np.int64)
        inputs = Inputs(self.feats.x[mask], self.feats.p[mask])
        return inputs, self.labels.labels[clips], self.labels.soft_labels()[clips], snr


_DATA_CACHE: dict[tuple[Any, ...], _Data] = {}


def _data(cfg: TrainConfig) -> _Data:
    """Records, windows, labels and splits (kept in memory for the next stage)."""
    key = (
        cfg.data,
        cfg.work,
        cfg.seed,
        cfg.val_units,
        cfg.test_units,
        tuple(sorted(cfg.hold_out.items())),
        cfg.labels,
        cfg.augment,
        cfg.n_mfcc,
    )
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = _load_data(cfg)
    return _DATA_CACHE[key]


def _load_data(cfg: TrainConfig) -> _Data:
    records = _records(cfg)
    feats = features(cfg, records)
    return _Data(
        records,
        feats,
        _labels(cfg, records, feats),
        split_by_unit(records, cfg.val_units, cfg.test_units, cfg.hold_out),
    )


def _normalised(cfg: TrainConfig, raw: Inputs) -> Inputs:
    """Raw inputs normalised as the device does (the run's saved normalisers)."""
    return Inputs(
        Normaliser.load(cfg.layout.norm_npz).apply(raw.x),
        PhysicsNorm.load(cfg.layout.physics_norm_npz).apply(raw.p),
    )


def fit(cfg: TrainConfig) -> FitResult:
    """Fit the normalisers and the network; keep the best checkpoint."""
    from tools.train import fit as fit_mod

    data = _data(cfg)
    train, _, y_soft, _ = data.part("train", originals_only=False)
    val, y_val, _, _ = data.part("val", originals_only=True)
    norm = (
        Normaliser.fit(train.x, _n_real_frames()) if cfg.norm == "coef" else Normaliser.identity()
    )
    physics_norm = PhysicsNorm.fit(train.p)
    x_train = norm.apply_in_place(train.x)
    grid = InputGrid.fit(x_train, _n_real_frames()) if cfg.input_grid else None
    norm.save(cfg.layout.norm_npz, grid)
    physics_norm.save(cfg.layout.physics_norm_npz)
    logger.info(
        "fit: input grid %s",
        f"+-{grid.limit:g} in steps of {grid.step:.4f}" if grid else "off",
    )
    logger.info(
        "fit: %d training windows (%d clips), %d validation windows",
        len(train),
        int(np.sum(data.splits.train)),
        len(val),
    )
    settings = FitSettings(
        arch=cfg.arch,
        n_classes=len(data.labels.class_names),
        n_physics=len(FEATURE_NAMES),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        grid_limit=grid.limit if grid else None,
    )
    result = fit_mod.fit(
        Inputs(x_train, physics_norm.apply(train.p)),
        y_soft,
        Inputs(norm.apply(val.x), physics_norm.apply(val.p)),
        y_val,
        settings,
        cfg.layout.ckpt_dir,
        resume=cfg.resume,
        progress=cfg.progress,
    )
    logger.info(
        "fit: kept epoch %d of %d (validation balanced accuracy %.4f), %d parameters",
        result.best_epoch,
        result.epochs_run,
        result.best_score,
        result.params,
    )
    return result


def typical_world(embeddings: F32, labels: I32, n_classes: int) -> Typical:
    """What each class's training windows look like: class means, one shrunk within-class
    precision, and per class the threshold beyond which a window is unknown.

    Ledoit-Wolf shrinkage keeps the covariance of ~90 correlated dimensions
    well conditioned; each threshold is a high quantile of the class's own
    training distances, so that few windows of the training world read as
    unknown.
    """
    from sklearn.covariance import LedoitWolf

    data = embeddings.astype(np.float64)
    means = np.stack([data[labels == c].mean(axis=0) for c in range(n_classes)])
    fitted = LedoitWolf(assume_centered=True).fit(data - means[labels])
    precision = fitted.precision_
    thresholds, ramps = [], []
    for c in range(n_classes):
        d = data[labels == c] - means[c]
        distances = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))
        threshold = float(np.quantile(distances, TYPICAL_QUANTILE))
        thresholds.append(round(threshold, 4))
        ramps.append(round(TYPICAL_RAMP * threshold, 4))
    return Typical(means, precision, tuple(thresholds), tuple(ramps))


def convert(cfg: TrainConfig) -> None:
    """Best checkpoint -> int8 and float32 TFLite, the training world, a candidate bundle."""
    from tools.train import convert as conv
    from tools.train.fit import load_best, seed_everything

    seed_everything(cfg.seed)
    data = _data(cfg)
    norm = Normaliser.load(cfg.layout.norm_npz)
    physics_norm = PhysicsNorm.load(cfg.layout.physics_norm_npz)
    train, y_train, _, _ = data.part("train", originals_only=False)
    spec = make_feature_spec(cfg.n_mfcc)
    grid = load_grid(cfg.layout.norm_npz)
    model = load_best(
        cfg.layout.ckpt_dir,
        cfg.arch,
        (spec.n_mfcc, spec.n_frames),
        len(FEATURE_NAMES),
        len(data.labels.class_names),
        grid.limit if grid else None,
    )
    rep = conv.representative_windows(train, y_train, cfg.seed, conv.REPRESENTATIVE_WINDOWS)
    val = data.part("val", originals_only=True)[0]
    choice = conv.to_int8_tflite(model, _normalised(cfg, rep), _normalised(cfg, val))
    int8 = choice.model
    ev.write_json(cfg.layout.int8_layout_json, choice.to_json())
    flt = conv.to_float_tflite(model)
    cfg.layout.int8_tflite.write_bytes(int8)
    cfg.layout.float_tflite.write_bytes(flt)
    cfg.layout.float_clean_tflite.write_bytes(conv.to_float_tflite(model, rounded=False))
    _check_input_scale(cfg.layout.int8_tflite, grid)
    typical = typical_world(
        _embeddings(norm.apply(train.x), physics_norm.apply(train.p)),
        y_train,
        len(data.labels.class_names),
    )
    np.savez(
        cfg.layout.typical_npz,
        means=typical.means,
        precision=typical.precision,
        thresholds=np.asarray(typical.thresholds),
        ramps=np.asarray(typical.ramps),
    )
    logger.info("convert: unknown beyond distances %s", typical.thresholds)
    export_bundle(
        cfg.layout.candidate_dir,
        int8_model=int8,
        spec=spec,
        class_names=data.labels.class_names,
        messages=data.labels.messages,
        input_mean=norm.mean,
        input_std=norm.std,
        physics_mean=physics_norm.mean,
        physics_std=physics_norm.std,
        typical=typical,
        thresholds={},
        provenance={},
        metrics={},
        version=cfg.version,
    )
    logger.info("convert: int8 %d bytes, float %d bytes", len(int8), len(flt))


def _embeddings(x_norm: F32, p_norm: F32) -> F32:
    """What :meth:`Classifier.embedding` computes, for many normalised windows at once."""
    from soundwatch.model import EDGE_FRAMES

    means = x_norm[:, :, EDGE_FRAMES[0] : x_norm.shape[2] - EDGE_FRAMES[1]].mean(axis=2)
    out: F32 = np.concatenate([p_norm, means], axis=1).astype(np.float32)
    return out


def _load_typical(cfg: TrainConfig) -> Typical:
    with np.load(cfg.layout.typical_npz) as npz:
        return Typical(
            npz["means"],
            npz["precision"],
            tuple(float(t) for t in npz["thresholds"]),
            tuple(float(r) for r in npz["ramps"]),
        )


def _check_input_scale(int8_path: Path, grid: InputGrid | None) -> None:
    """Warn if the converter did not calibrate the MFCC input to the training grid."""
    if grid is None:
        return
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(int8_path)).get_input_details()
    scale, zero_point = next(d for d in details if len(d["shape"]) == 4)["quantization"]
    if abs(scale - grid.step) > 1e-6 * grid.step or zero_point != 0:
        logger.warning(
            "convert: int8 input scale %.6g / zero point %d differ from the training grid "
            "(%.6g / 0)",
            scale,
            zero_point,
            grid.step,
        )
    else:
        logger.info("convert: int8 input grid matches training (step %.5f)", scale)


def evaluate(cfg: TrainConfig) -> dict[str, Any]:
    """Float vs int8 on the held-out units (and thresholds from the validation units)."""
    data = _data(cfg)
    names = data.labels.class_names
    lay = cfg.layout
    doc: dict[str, Any] = {"class_names": list(names), "test_units": list(cfg.test_units)}
    for part in ("val", "test"):
        raw, y, _, snr = data.part(part, originals_only=True)
        norm = _normalised(cfg, raw)
        probs = {
            "int8": ev.predict_int8(lay.candidate_dir, raw),
            "float": ev.predict_tflite(lay.float_tflite, norm),
            "float_clean": ev.predict_tflite(lay.float_clean_tflite, norm),
        }
        distances = ev.typical_distances(lay.candidate_dir, raw, probs["int8"])
        doc[part] = {
            "units": list(cfg.val_units if part == "val" else cfg.test_units),
            "windows": len(y),
            "int8": ev.score(y, probs["int8"], snr, names).to_json(),
            "float": ev.score(y, probs["float"], snr, names).to_json(),
            "float_clean": ev.score(y, probs["float_clean"], snr, names).to_json(),
            "int8_vs_float": ev.agreement(probs["int8"], probs["float"]),
            "int8_vs_float_clean": ev.agreement(probs["int8"], probs["float_clean"]),
            "unknown_share": ev.unknown_share(distances, probs["int8"], _load_typical(cfg)),
        }
        if part == "val":
            thresholds, achieved = ev.choose_thresholds(y, probs["int8"], names)
            doc["thresholds"] = thresholds
            doc["thresholds_on_validation"] = achieved
    for name, root in cfg.extra_sets:
        doc.setdefault("extra", {})[name] = evaluate_clip_set(cfg, root, names)
    x_test = data.part("test", originals_only=True)[0]
    doc["ms_per_window"] = {
        "int8_invoke": round(ev.ms_per_window(lay.int8_tflite), 3),
        "float_invoke": round(ev.ms_per_window(lay.float_tflite), 3),
        "int8_classifier_predict": round(
            ev.ms_per_predict(lay.candidate_dir, x_test.x[0], x_test.p[0]), 3
        ),
    }
    doc["model_bytes"] = {
        "int8": lay.int8_tflite.stat().st_size,
        "float": lay.float_tflite.stat().st_size,
    }
    doc["arch"], doc["norm"] = cfg.arch, cfg.norm
    state_path = lay.ckpt_dir / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        doc["fit"] = {
            "best_epoch": state["best_epoch"],
            "epochs": state["epoch"],
            "val_balanced_accuracy_float_keras": state["best_score"],
        }
    ev.write_json(lay.eval_json, doc)
    ev.write_json(
        lay.confusion_json,
        {
            "class_names": list(names),
            "rows": "true class",
            "columns": "predicted class",
            "units": list(cfg.test_units),
            "all": doc["test"]["int8"]["confusion"],
            **doc["test"]["int8"]["confusion_per_snr"],
        },
    )
    title = (
        f"int8 on held-out units {', '.join(cfg.test_units)} "
        f"(accuracy {doc['test']['int8']['accuracy']:.3f})"
    )
    ev.plot_confusion(ev.Scores(**doc["test"]["int8"]), names, title, lay.confusion_png)
    for line in ev.markdown_tables(doc, names):
        logger.info("evaluate: %s", line)
    logger.info(
        "evaluate: int8 vs float reference %s; vs unrounded float %s; ms %s",
        doc["test"]["int8_vs_float"],
        doc["test"]["int8_vs_float_clean"],
        doc["ms_per_window"],
    )
    return doc


def evaluate_clip_set(cfg: TrainConfig, root: Path, class_names: tuple[str, ...]) -> dict[str, Any]:
    """The candidate bundle on a labelled clip set rendered elsewhere.

    ``root/metadata.csv`` names each clip (``path``) and its class (``label``
    or ``fault``) and SNR (``snr_db``). Windows come from the same
    :meth:`FeatureExtractor.analyse` the device runs; a clip read as unknown
    counts as wrong.
    """
    from soundwatch.audio import decode_audio
    from soundwatch.features import FeatureExtractor

    extractor = FeatureExtractor(make_feature_spec(cfg.n_mfcc))
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("label") or r.get("fault")) in class_names]
    xs, ps, y, snr, valid, clipped = [], [], [], [], [], []
    for row in rows:
        path = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
        window = extractor.analyse(decode_audio(path, extractor.spec.sample_rate_hz).samples)
        xs.append(window.mfcc)
        ps.append(window.physics)
        valid.append(window.quality.problem is None)
        clipped.append(window.quality.clipped_fraction)
        y.append(class_names.index(row.get("label") or row["fault"]))
        snr.append(round(float(row["snr_db"])))
    raw = Inputs(np.stack(xs), np.stack(ps))
    probs = ev.predict_int8(cfg.layout.candidate_dir, raw)
    distances = ev.typical_distances(cfg.layout.candidate_dir, raw, probs)
    typical = _load_typical(cfg)
    chosen = probs.argmax(axis=1)
    unknown = (
        np.asarray(
            [typical.unknown(float(d), int(c)) for d, c in zip(distances, chosen, strict=True)]
        )
        >= 0.5
    ) | ~np.asarray(valid)
    y_arr, snr_arr = np.asarray(y, dtype=np.int32), np.asarray(snr, dtype=np.int64)
    return {
        "root": str(root),
        "clips": len(y),
        "int8": ev.score(y_arr, probs, snr_arr, class_names).to_json(),
        "with_unknown": ev.score_with_unknown(y_arr, probs, unknown, snr_arr, class_names),
    }


def export(cfg: TrainConfig, timings: dict[str, float] | None = None) -> Path:
    """Write the bundle to ``cfg.out`` with thresholds, provenance and metrics."""
    lay = cfg.layout
    records = _records(cfg)
    lab = LabelSet.read(lay.labels_json)
    doc = json.loads(lay.eval_json.read_text(encoding="utf-8"))
    norm = Normaliser.load(lay.norm_npz)
    physics_norm = PhysicsNorm.load(lay.physics_norm_npz)
    splits = split_by_unit(records, cfg.val_units, cfg.test_units, cfg.hold_out)
    state = json.loads((lay.ckpt_dir / "state.json").read_text(encoding="utf-8"))
    typical = _load_typical(cfg)
    provenance = {
        "git_commit": git_commit(REPO),
        "command": " ".join(["python -m tools.train", *_portable_args(sys.argv[1:])]),
        "seed": cfg.seed,
        "data": _describe_data(cfg, records, splits, lab),
        "arch": cfg.arch,
        "input_normalisation": "per-coefficient mean/std over training windows"
        if cfg.norm == "coef"
        else "none",
        "physics_normalisation": "per-feature mean/std over training windows",
        "params": state.get("params"),
        "n_mfcc": cfg.n_mfcc,
        "input_grid": _grid_doc(load_grid(lay.norm_npz)),
        "int8_layout": _read_json(lay.int8_layout_json),
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "optimizer": "Adam",
        "loss": "categorical cross-entropy on soft labels (share of the clip each state fills)",
        "augmentation": cfg.augment.as_dict(),
        "checkpoint_selection": f"lowest cross-entropy on validation units {list(cfg.val_units)}",
        "thresholds_rule": (
            "on-threshold per fault class: smallest t >= 0.5 (0.01 grid) with at most 1% of "
            "validation-unit windows of other classes at p >= t (int8 model)"
        ),
        "unknown_rule": f"distance from the chosen class's training windows above the "
        f"{TYPICAL_QUANTILE} quantile of their own ({list(typical.thresholds)}), "
        f"full at +{TYPICAL_RAMP:.0%}",
        "versions": library_versions(),
        "stage_seconds": timings or {},
    }
    metrics = {
        "held_out_units": list(cfg.test_units),
        "int8": _brief(doc["test"]["int8"]),
        "float": _brief(doc["test"]["float"]),
        "float_unrounded_input": _brief(doc["test"]["float_clean"]),
        "int8_vs_float": doc["test"]["int8_vs_float"],
        "int8_vs_float_unrounded_input": doc["test"]["int8_vs_float_clean"],
        "unknown_share": doc["test"]["unknown_share"],
        "confusion_int8": {
            "class_names": doc["class_names"],
            "all": doc["test"]["int8"]["confusion"],
            **doc["test"]["int8"]["confusion_per_snr"],
        },
        "validation_units": {"units": list(cfg.val_units), "int8": _brief(doc["val"]["int8"])},
        "thresholds_on_validation": doc["thresholds_on_validation"],
        "ms_per_window_1_thread": doc["ms_per_window"],
    }
    path = export_bundle(
        cfg.out,
        int8_model=lay.int8_tflite.read_bytes(),
        spec=make_feature_spec(cfg.n_mfcc),
        class_names=lab.class_names,
        messages=lab.messages,
        input_mean=norm.mean,
        input_std=norm.std,
        physics_mean=physics_norm.mean,
        physics_std=physics_norm.std,
        typical=typical,
        thresholds=doc["thresholds"],
        provenance=provenance,
        metrics=metrics,
        version=cfg.version,
    )
    copy_file(lay.float_tflite, cfg.float_copy)
    copy_file(lay.confusion_png, cfg.confusion_copy)
    return path


def _portable_args(args: list[str]) -> list[str]:
    """Command-line arguments with this machine's paths made relative to the repository."""
    out = []
    for arg in args:
        path = Path(arg)
        if path.is_absolute():
            try:
                arg = path.resolve().relative_to(REPO).as_posix()
            except ValueError:
                arg = path.name
        out.append(arg)
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _grid_doc(grid: InputGrid | None) -> dict[str, Any] | None:
    if grid is None:
        return None
    return {
        "limit": grid.limit,
        "step": grid.step,
        "training": "the network's first layer fake-quantises its input to this int8 grid",
        "float_reference": "tests/data/fan-float.tflite keeps that rounding (QUANTIZE/DEQUANTIZE)",
    }


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {
        k: s[k] for k in ("accuracy", "balanced_accuracy", "per_class", "per_snr", "per_class_snr")
    }


def _describe_data(
    cfg: TrainConfig, records: list[ClipRecord], splits: Splits, lab: LabelSet
) -> dict[str, Any]:
    units = sorted({r.unit for r in records})
    sim = cfg.data / SIMULATION_JSON
    root = cfg.data.resolve()
    try:
        root_text = root.relative_to(REPO).as_posix()
    except ValueError:
        root_text = root.name
    return {
        "root": root_text,
        "fault_metadata": (cfg.data / "metadata.csv").exists(),
        "simulation": json.loads(sim.read_text(encoding="utf-8")) if sim.exists() else None,
        "clips": len(records),
        "units": len(units),
        "snrs_db_folders": sorted({r.snr_db for r in records}),
        "train_clips": int(splits.train.sum()),
        "validation_units": list(cfg.val_units),
        "test_units": list(cfg.test_units),
        "held_out_families": {k: list(v) for k, v in cfg.hold_out.items()},
        "labels": lab.source,
        "label_details": lab.details,
    }


STAGES: dict[str, Callable[[TrainConfig], Any]] = {
    "simulate": simulate,
    "scan": scan,
    "features": features,
    "labels": labels,
    "fit": fit,
    "convert": convert,
    "evaluate": evaluate,
}


def run_all(cfg: TrainConfig) -> dict[str, float]:
    """Every stage in order; returns seconds per stage (also in ``timings.json``)."""
    timer = StageTimer(cfg.layout.timings_json)
    total = time.perf_counter()
    for name, stage in STAGES.items():
        t0 = time.perf_counter()
        stage(cfg)
        timer.record(name, time.perf_counter() - t0)
    t0 = time.perf_counter()
    seconds = dict(timer.seconds)
    seconds["total_before_export"] = round(time.perf_counter() - total, 1)
    export(cfg, seconds)
    timer.record("export", time.perf_counter() - t0)
    timer.record("total", time.perf_counter() - total)
    return dict(timer.seconds)
