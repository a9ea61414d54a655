"""The stages, wired: each takes the run's :class:`TrainConfig` and reads what
the earlier stages left in the work directory (recomputing it, from cache
where possible, if it is missing)."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from tools.train import evaluate as ev
from tools.train.dataset import FeatureSet, compute_features
from tools.train.export import copy_file, export_bundle, git_commit, library_versions
from tools.train.fit import FitResult, FitSettings, InputGrid, Normaliser, load_grid
from tools.train.labels import LabelSet, make_labels
from tools.train.layout import StageTimer, TrainConfig
from tools.train.scan import ClipRecord, read_records, report, scan_tree, write_records
from tools.train.spec import make_feature_spec

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
REPO = Path(__file__).resolve().parents[2]
SIMULATION_JSON = "simulation.json"


@dataclass(frozen=True)
class Splits:
    """Boolean masks over the scan's records."""

    train: npt.NDArray[np.bool_]
    val: npt.NDArray[np.bool_]
    test: npt.NDArray[np.bool_]


def split_by_unit(records: list[ClipRecord], val_unit: str, test_unit: str) -> Splits:
    """Whole units: one for validation, one held out for the final test, the rest train."""
    units = np.asarray([r.unit for r in records])
    for role, unit in (("validation", val_unit), ("test", test_unit)):
        if unit not in units:
            raise ValueError(f"{role} unit {unit} is not in the data ({sorted(set(units))})")
    val, test = units == val_unit, units == test_unit
    return Splits(train=~(val | test), val=val, test=test)


# -- stages -------------------------------------------------------------------


def simulate(cfg: TrainConfig) -> None:
    """Write the simulated fan line to ``cfg.data`` unless it already holds a tree.

    Uses the simulator's own planner and renderer (``tools.fansim``), asking
    for more clips of the held-out units than of the others (its
    ``write_dataset`` gives every unit the same count).
    """
    if (cfg.data / "metadata.csv").exists() or any(cfg.data.glob("*_dB_*")):
        logger.info("simulate: %s already holds data; skipped", cfg.data)
        return
    from tools import fansim as sim_tool

    sim = cfg.sim
    jobs = _simulation_plan(cfg)
    logger.info("simulate: %d clips to %s (%s)", len(jobs), cfg.data, sim.as_dict())
    for directory in sorted({(cfg.data / j.rel_path).parent for j in jobs}):
        directory.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(jobs), desc="simulate", unit="clip", disable=not cfg.progress)
    if cfg.workers <= 1:
        rows = [_tick(bar, sim_tool.render_job(j)) for j in jobs]
    else:
        # spawn, as tools.fansim does: no inherited state in the workers.
        with get_context("spawn").Pool(cfg.workers) as pool:
            rows = [_tick(bar, r) for r in pool.imap(sim_tool.render_job, jobs, chunksize=8)]
    bar.close()
    with (cfg.data / sim_tool.METADATA_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=sim_tool.METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    doc = {"generator": "tools.fansim.plan_dataset/render_job", "seed": cfg.seed, **sim.as_dict()}
    (cfg.data / SIMULATION_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _simulation_plan(cfg: TrainConfig) -> list[Any]:
    """Clip jobs: ``test_per_class`` for the validation and test units, else ``per_class``.

    The validation unit gets as many clips as the test unit because it picks
    the checkpoint and the thresholds: a small set makes both choices noisy.
    """
    from tools import fansim as sim_tool

    sim = cfg.sim

    def plan(per_class: int) -> list[Any]:
        return list(
            sim_tool.plan_dataset(
                cfg.data, sim.n_units, per_class, per_class, sim.snrs_db, cfg.seed, 16000, 10.0
            )
        )

    jobs = [j for j in plan(sim.per_class) if sim_tool.unit_dir(j.unit_number) != cfg.test_unit]
    jobs += [
        j for j in plan(sim.test_per_class) if sim_tool.unit_dir(j.unit_number) == cfg.test_unit
    ]
    return sorted(jobs, key=lambda j: j.rel_path)


def _tick(bar: tqdm[Any], row: dict[str, str]) -> dict[str, str]:
    bar.update(1)
    return row


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
    key: tuple[Any, ...] = (cfg.data, cfg.work, cfg.seed, cfg.val_unit, cfg.test_unit)
    key += (cfg.augment, cfg.n_mfcc, paths)
    if key in _FEATURE_CACHE:
        return _FEATURE_CACHE[key]
    _FEATURE_CACHE.clear()
    splits = split_by_unit(records, cfg.val_unit, cfg.test_unit)
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
    """Fault labels from metadata, or pseudo-labels; written to ``labels.json``."""
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

    def part(self, name: str, originals_only: bool) -> tuple[F32, I32, npt.NDArray[np.int64]]:
        """Windows, labels and SNRs of one split."""
        mask = getattr(self.splits, name)[self.feats.clip]
        if originals_only:
            mask &= self.feats.copy == 0
        clips = self.feats.clip[mask]
        snr = np.asarray([self.records[i].snr_db for i in clips], dtype=np.int64)
        return self.feats.x[mask], self.labels.labels[clips], snr


_DATA_CACHE: dict[tuple[Any, ...], _Data] = {}


def _data(cfg: TrainConfig) -> _Data:
    """Records, windows, labels and splits (kept in memory for the next stage)."""
    key = (
        cfg.data,
        cfg.work,
        cfg.seed,
        cfg.val_unit,
        cfg.test_unit,
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
        split_by_unit(records, cfg.val_unit, cfg.test_unit),
    )


def fit(cfg: TrainConfig) -> FitResult:
    """Fit the normaliser and the network; keep the best checkpoint."""
    from tools.train import fit as fit_mod

    data = _data(cfg)
    x_train, y_train, _ = data.part("train", originals_only=False)
    x_val, y_val, _ = data.part("val", originals_only=True)
    norm = (
        Normaliser.fit(x_train, _n_real_frames()) if cfg.norm == "coef" else Normaliser.identity()
    )
    x_train = norm.apply_in_place(x_train)
    grid = InputGrid.fit(x_train, _n_real_frames()) if cfg.input_grid else None
    norm.save(cfg.layout.norm_npz, grid)
    logger.info(
        "fit: input grid %s",
        f"+-{grid.limit:g} in steps of {grid.step:.4f}" if grid else "off",
    )
    logger.info(
        "fit: %d training windows (%d clips), %d validation windows",
        len(x_train),
        int(np.sum(data.splits.train)),
        len(x_val),
    )
    settings = FitSettings(
        arch=cfg.arch,
        n_classes=len(data.labels.class_names),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        grid_limit=grid.limit if grid else None,
    )
    result = fit_mod.fit(
        x_train,
        y_train,
        norm.apply(x_val),
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


def convert(cfg: TrainConfig) -> None:
    """Best checkpoint -> int8 and float32 TFLite, and a candidate bundle to evaluate."""
    from tools.train import convert as conv
    from tools.train.fit import load_best, seed_everything

    seed_everything(cfg.seed)
    data = _data(cfg)
    norm = Normaliser.load(cfg.layout.norm_npz)
    x_train, y_train, _ = data.part("train", originals_only=False)
    spec = make_feature_spec(cfg.n_mfcc)
    grid = load_grid(cfg.layout.norm_npz)
    model = load_best(
        cfg.layout.ckpt_dir,
        cfg.arch,
        (spec.n_mfcc, spec.n_frames),
        len(data.labels.class_names),
        grid.limit if grid else None,
    )
    rep = conv.representative_windows(x_train, y_train, cfg.seed, conv.REPRESENTATIVE_WINDOWS)
    x_val = data.part("val", originals_only=True)[0]
    choice = conv.to_int8_tflite(model, norm.apply(rep), norm.apply(x_val))
    int8 = choice.model
    ev.write_json(cfg.layout.int8_layout_json, choice.to_json())
    flt = conv.to_float_tflite(model)
    cfg.layout.int8_tflite.write_bytes(int8)
    cfg.layout.float_tflite.write_bytes(flt)
    cfg.layout.float_clean_tflite.write_bytes(conv.to_float_tflite(model, rounded=False))
    _check_input_scale(cfg.layout.int8_tflite, grid)
    export_bundle(
        cfg.layout.candidate_dir,
        int8_model=int8,
        spec=spec,
        class_names=data.labels.class_names,
        messages=data.labels.messages,
        input_mean=norm.mean,
        input_std=norm.std,
        thresholds={},
        provenance={},
        metrics={},
        version=cfg.version,
    )
    logger.info("convert: int8 %d bytes, float %d bytes", len(int8), len(flt))


def _check_input_scale(int8_path: Path, grid: InputGrid | None) -> None:
    """Warn if the converter did not calibrate the input to the training grid."""
    if grid is None:
        return
    from ai_edge_litert.interpreter import Interpreter

    scale, zero_point = Interpreter(model_path=str(int8_path)).get_input_details()[0][
        "quantization"
    ]
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
    """Float vs int8 on the held-out unit (and thresholds from the validation unit)."""
    data = _data(cfg)
    names = data.labels.class_names
    norm = Normaliser.load(cfg.layout.norm_npz)
    lay = cfg.layout
    doc: dict[str, Any] = {"class_names": list(names), "test_unit": cfg.test_unit}
    probs: dict[str, dict[str, F32]] = {}
    for part in ("val", "test"):
        x, y, snr = data.part(part, originals_only=True)
        x_norm = norm.apply(x)
        probs[part] = {
            "int8": ev.predict_int8(lay.candidate_dir, x),
            "float": ev.predict_tflite(lay.float_tflite, x_norm),
            "float_clean": ev.predict_tflite(lay.float_clean_tflite, x_norm),
        }
        doc[part] = {
            "unit": cfg.val_unit if part == "val" else cfg.test_unit,
            "windows": len(y),
            "int8": ev.score(y, probs[part]["int8"], snr, names).to_json(),
            "float": ev.score(y, probs[part]["float"], snr, names).to_json(),
            "float_clean": ev.score(y, probs[part]["float_clean"], snr, names).to_json(),
            "int8_vs_float": ev.agreement(probs[part]["int8"], probs[part]["float"]),
            "int8_vs_float_clean": ev.agreement(probs[part]["int8"], probs[part]["float_clean"]),
        }
        if part == "val":
            thresholds, achieved = ev.choose_thresholds(y, probs[part]["int8"], names)
            doc["thresholds"] = thresholds
            doc["thresholds_on_validation"] = achieved
    x_test = data.part("test", originals_only=True)[0]
    doc["ms_per_window"] = {
        "int8_invoke": round(ev.ms_per_window(lay.int8_tflite), 3),
        "float_invoke": round(ev.ms_per_window(lay.float_tflite), 3),
        "int8_classifier_predict": round(ev.ms_per_predict(lay.candidate_dir, x_test[0]), 3),
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
            "unit": cfg.test_unit,
            "all": doc["test"]["int8"]["confusion"],
            **doc["test"]["int8"]["confusion_per_snr"],
        },
    )
    title = (
        f"int8 {cfg.arch}/{cfg.norm} on held-out unit {cfg.test_unit} "
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


def export(cfg: TrainConfig, timings: dict[str, float] | None = None) -> Path:
    """Write the bundle to ``cfg.out`` with thresholds, provenance and metrics."""
    lay = cfg.layout
    records = _records(cfg)
    lab = LabelSet.read(lay.labels_json)
    doc = json.loads(lay.eval_json.read_text(encoding="utf-8"))
    norm = Normaliser.load(lay.norm_npz)
    splits = split_by_unit(records, cfg.val_unit, cfg.test_unit)
    state = json.loads((lay.ckpt_dir / "state.json").read_text(encoding="utf-8"))
    provenance = {
        "git_commit": git_commit(REPO),
        "command": " ".join(["python -m tools.train", *sys.argv[1:]]),
        "seed": cfg.seed,
        "data": _describe_data(cfg, records, splits, lab),
        "arch": cfg.arch,
        "input_normalisation": "per-coefficient mean/std over training windows"
        if cfg.norm == "coef"
        else "none",
        "params": state.get("params"),
        "n_mfcc": cfg.n_mfcc,
        "input_grid": _grid_doc(load_grid(lay.norm_npz)),
        "int8_layout": _read_json(lay.int8_layout_json),
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "optimizer": "Adam",
        "augmentation": cfg.augment.as_dict(),
        "checkpoint_selection": f"lowest cross-entropy on validation unit {cfg.val_unit}",
        "thresholds_rule": (
            "on-threshold per fault class: smallest t >= 0.5 (0.01 grid) with at most 1% of "
            f"validation-unit ({cfg.val_unit}) windows of other classes at p >= t (int8 model)"
        ),
        "versions": library_versions(),
        "stage_seconds": timings or {},
    }
    metrics = {
        "held_out_unit": cfg.test_unit,
        "int8": _brief(doc["test"]["int8"]),
        "float": _brief(doc["test"]["float"]),
        "float_unrounded_input": _brief(doc["test"]["float_clean"]),
        "int8_vs_float": doc["test"]["int8_vs_float"],
        "int8_vs_float_unrounded_input": doc["test"]["int8_vs_float_clean"],
        "confusion_int8": {
            "class_names": doc["class_names"],
            "all": doc["test"]["int8"]["confusion"],
            **doc["test"]["int8"]["confusion_per_snr"],
        },
        "validation_unit": {"unit": cfg.val_unit, "int8": _brief(doc["val"]["int8"])},
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
        thresholds=doc["thresholds"],
        provenance=provenance,
        metrics=metrics,
        version=cfg.version,
    )
    copy_file(lay.float_tflite, cfg.float_copy)
    copy_file(lay.confusion_png, cfg.confusion_copy)
    return path


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
    return {
        "root": str(cfg.data),
        "fault_metadata": (cfg.data / "metadata.csv").exists(),
        "simulation": json.loads(sim.read_text(encoding="utf-8")) if sim.exists() else None,
        "clips": len(records),
        "units": units,
        "snrs_db": sorted({r.snr_db for r in records}),
        "train_units": sorted({r.unit for r, m in zip(records, splits.train, strict=True) if m}),
        "validation_unit": cfg.val_unit,
        "test_unit": cfg.test_unit,
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
