"""The training pipeline's data stages, on tiny hand-made MIMII trees (no TensorFlow).

The trees are written here, not by the simulator, so the expected answers
are known by construction: each fault kind adds one unmistakable change to
a unit's healthy sound (a strong low tone, a 2 kHz whistle, shifted tones
with rich hum).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundwatch.features import FeatureExtractor, FeatureSpec
from tools.train import augment as aug
from tools.train.dataset import compute_features
from tools.train.labels import LabelError, labels_from_metadata, make_labels, pseudo_labels
from tools.train.pipeline import split_by_unit
from tools.train.scan import (
    ClipRecord,
    ScanError,
    read_records,
    report,
    scan_tree,
    write_records,
)

SR = 16000
Windows = tuple[list[ClipRecord], np.ndarray, np.ndarray]
FAULTS = ("imbalance", "clogging", "voltage_change")
N_REAL = 431  # frames of a 10 s window; shorter clips are looped to fill it


def fan_clip(kind: str, unit: int, rng: np.random.Generator, seconds: float = 3.0) -> np.ndarray:
    """A crude fan: blade-pass tones and noise, plus one obvious change per fault."""
    t = np.arange(int(seconds * SR)) / SR
    f_r = 20.0 + unit  # each unit its own shaft rate
    if kind == "voltage_change":
        f_r *= 0.7
    y = 0.3 * rng.standard_normal(t.size)
    for k in range(1, 4):
        y += (0.6 / k) * np.sin(2 * np.pi * 7 * f_r * k * t + rng.uniform(0, 6))
    hum = range(1, 8) if kind == "voltage_change" else range(1, 3)
    for k in hum:
        y += 0.4 * np.sin(2 * np.pi * 50 * k * t)
    if kind == "imbalance":
        y += 3.0 * np.sin(2 * np.pi * f_r * t) * (1 + 0.5 * np.sin(2 * np.pi * f_r * t))
    if kind == "clogging":
        y += 1.0 * np.sin(2 * np.pi * 2000 * t)
    out: np.ndarray = (0.05 * y / np.max(np.abs(y))).astype(np.float32)
    return out


def write_tree(
    root: Path,
    *,
    units: tuple[int, ...] = (0, 2),
    snrs: tuple[int, ...] = (6,),
    normal: int = 3,
    per_fault: int = 3,
    metadata: bool = True,
    seconds: float = 3.0,
) -> list[tuple[str, str]]:
    """A MIMII-layout tree; returns ``(rel_path, fault)`` for every clip."""
    rng = np.random.default_rng(7)
    rows = []
    for snr in snrs:
        for unit in units:
            kinds = ["normal"] * normal + [f for f in FAULTS for _ in range(per_fault)]
            for n, kind in enumerate(kinds):
                cond = "normal" if kind == "normal" else "abnormal"
                rel = f"{snr}_dB_fan/fan/id_{unit:02d}/{cond}/{n:08d}.wav"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, fan_clip(kind, unit, rng, seconds), SR, subtype="PCM_16")
                rows.append((rel, kind))
    if metadata:
        with (root / "metadata.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "snr_db", "unit", "split", "fault"])
            for rel, kind in rows:
                parts = rel.split("/")
                w.writerow([rel, parts[0].split("_")[0], parts[2], "train", kind])
    return rows


@pytest.fixture(scope="module")
def labelled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_tree(root)
    return root


@pytest.fixture(scope="module")
def unlabelled_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("mimii")
    rows = write_tree(root, metadata=False, per_fault=4)
    return root, [fault for _, fault in sorted(rows)]


# -- scan -----------------------------------------------------------------------


def test_scan_reads_layout_headers_and_metadata(labelled_tree: Path, tmp_path: Path) -> None:
    records = scan_tree(labelled_tree)
    assert len(records) == 2 * (3 + 3 * 3)
    assert {r.unit for r in records} == {"id_00", "id_02"}
    assert {r.snr_db for r in records} == {6}
    assert {r.fault for r in records} == {"normal", *FAULTS}
    assert all((r.condition == "normal") == (r.fault == "normal") for r in records)
    rep = report(records)
    assert rep.sample_rates_hz == {SR: 24}
    assert rep.channels == {1: 24}
    assert rep.bit_depths == {"16-bit PCM_16": 24}
    assert rep.fault_labels
    assert rep.min_duration_s == pytest.approx(3.0)
    # The CSV round trip is lossless.
    write_records(records, tmp_path / "scan.csv")
    assert read_records(tmp_path / "scan.csv") == records


def test_scan_reports_mixed_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = tmp_path / "-6_dB_fan/fan/id_00"
    (base / "normal").mkdir(parents=True)
    (base / "abnormal").mkdir(parents=True)
    sf.write(base / "normal/a.wav", fan_clip("normal", 0, rng, 1.0), SR, subtype="PCM_16")
    stereo = np.stack([fan_clip("normal", 0, rng, 2.0)] * 2, axis=1)
    sf.write(base / "normal/b.wav", stereo, 48000, subtype="PCM_24")
    sf.write(base / "abnormal/c.wav", fan_clip("clogging", 0, rng, 1.0), 44100, subtype="FLOAT")
    rep = report(scan_tree(tmp_path))
    assert rep.sample_rates_hz == {16000: 1, 44100: 1, 48000: 1}
    assert rep.channels == {1: 2, 2: 1}
    assert rep.bit_depths == {"16-bit PCM_16": 1, "24-bit PCM_24": 1, "32-bit FLOAT": 1}
    assert not rep.fault_labels  # no metadata.csv: the abnormal clip has no fault
    assert any("sample rates" in line and "48000" in line for line in rep.lines())


def test_scan_rejects_a_tree_outside_the_layout(tmp_path: Path) -> None:
    bad = tmp_path / "fan/id_00/normal"
    bad.mkdir(parents=True)
    with pytest.raises(ScanError, match="no WAV files"):
        scan_tree(tmp_path)
    (tmp_path / "6_dB_fan/fan/unit0/normal").mkdir(parents=True)
    sf.write(tmp_path / "6_dB_fan/fan/unit0/normal/x.wav", np.zeros(100), SR)
    with pytest.raises(ScanError, match="unit0"):
        scan_tree(tmp_path)


def test_scan_requires_a_metadata_row_per_clip(tmp_path: Path) -> None:
    write_tree(tmp_path, units=(0,), normal=1, per_fault=1)
    meta = tmp_path / "metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:-1]) + "\n")  # drop the last abnormal row
    with pytest.raises(ScanError, match="no row for"):
        scan_tree(tmp_path)


# -- labels -------------------------------------------------------------------------


def test_labels_from_metadata_keep_the_reference_class_order(labelled_tree: Path) -> None:
    records = scan_tree(labelled_tree)
    labels = labels_from_metadata(records)
    assert labels.class_names == ("normal", "imbalance", "clogging", "voltage_change")
    assert labels.source == "metadata"
    for r, y in zip(records, labels.labels, strict=True):
        assert labels.class_names[y] == r.fault
    assert labels.messages["clogging"] == "Component is clogged"


@pytest.fixture(scope="module")
def unlabelled_windows(
    unlabelled_tree: tuple[Path, list[str]],
    librosa_spec: FeatureSpec,
    tmp_path_factory: pytest.TempPathFactory,
) -> Windows:
    root, _ = unlabelled_tree
    records = scan_tree(root)
    feats = compute_features(
        records,
        root,
        librosa_spec,
        tmp_path_factory.mktemp("cache"),
        augment=[False] * len(records),
        config=aug.AugmentConfig(copies=0),
        seed=0,
        progress=False,
    )
    return records, feats.x, feats.clip


def test_pseudo_labels_recover_the_fault_kinds_without_metadata(
    unlabelled_tree: tuple[Path, list[str]], unlabelled_windows: Windows
) -> None:
    _, truth = unlabelled_tree
    records, x, clip = unlabelled_windows
    with pytest.raises(LabelError):
        labels_from_metadata(records)
    labels = make_labels(records, x, clip, mode="auto", n_clusters=3, n_real_frames=N_REAL, seed=0)
    assert labels.source == "pseudo"
    assert labels.class_names == ("normal", "fault_1", "fault_2", "fault_3")
    got = labels.labels
    assert all((y == 0) == (r.condition == "normal") for r, y in zip(records, got, strict=True))
    # Each cluster holds exactly one true fault kind (the tree makes them obvious).
    for k in (1, 2, 3):
        kinds = {t for t, y in zip(truth, got, strict=True) if y == k}
        assert len(kinds) == 1, f"cluster {k} mixes {kinds}"
    assert labels.details["n_clusters"] == 3
    # Deterministic for a seed.
    again = make_labels(records, x, clip, mode="pseudo", n_clusters=3, n_real_frames=N_REAL, seed=0)
    assert np.array_equal(again.labels, got)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_pseudo_label_cluster_count_is_configurable(unlabelled_windows: Windows, k: int) -> None:
    records, x, clip = unlabelled_windows
    labels = pseudo_labels(records, x, clip, n_clusters=k, n_real_frames=N_REAL, seed=0)
    assert len(labels.class_names) == k + 1
    assert set(np.unique(labels.labels)) == set(range(k + 1))
    sizes = labels.details["cluster_sizes"]
    assert sizes == sorted(sizes, reverse=True)  # numbered by size, largest first
    assert sum(sizes) == sum(r.condition == "abnormal" for r in records)


def test_pseudo_labels_refuse_more_clusters_than_clips(
    unlabelled_windows: Windows,
) -> None:
    records, x, clip = unlabelled_windows
    with pytest.raises(LabelError, match="cannot make"):
        pseudo_labels(records, x, clip, n_clusters=100, n_real_frames=N_REAL, seed=0)


# -- augmentation ------------------------------------------------------------------


def _signal(n: int = 22050, seed: int = 3) -> np.ndarray:
    return fan_clip("normal", 0, np.random.default_rng(seed), n / SR)


def test_roll_preserves_content() -> None:
    y = _signal()
    r = aug.roll(y, 1234)
    assert r.shape == y.shape
    assert np.array_equal(np.sort(r), np.sort(y))
    assert np.array_equal(np.roll(r, -1234), y)
    assert not np.array_equal(r, y)


@pytest.mark.parametrize("gain_db", [-20.0, -6.0, 0.0, 10.0])
def test_level_change_scales_by_the_gain(gain_db: float) -> None:
    y = _signal()
    out = aug.change_level(y, gain_db)
    assert aug.peak_dbfs(out) - aug.peak_dbfs(y) == pytest.approx(gain_db, abs=1e-4)
    np.testing.assert_allclose(out, y * 10 ** (gain_db / 20), rtol=1e-6)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_white_noise_is_added_at_the_requested_snr(snr_db: float) -> None:
    y = _signal(SR * 4)
    out = aug.add_white_noise(y, snr_db, np.random.default_rng(1))
    noise = out - y
    measured = 10 * np.log10(aug.power(y) / aug.power(noise))
    assert measured == pytest.approx(snr_db, abs=0.1)
    # White: flat spectrum (low and high halves carry about the same power).
    spec = np.abs(np.fft.rfft(noise)) ** 2
    half = spec.size // 2
    assert spec[:half].sum() / spec[half:].sum() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_time_stretch_changes_length_then_fits(rate: float) -> None:
    y = _signal(22050 * 2)
    stretched = aug.time_stretch(y, rate)
    assert stretched.shape[0] == pytest.approx(y.shape[0] / rate, rel=0.01)
    fitted = aug.fit_length(stretched, y.shape[0])
    assert fitted.shape == y.shape
    # Shorter results are filled by repeating, never by silence.
    if rate > 1:
        tail = fitted[stretched.shape[0] :]
        assert np.array_equal(tail, stretched[: tail.shape[0]])


def test_augmented_copies_are_seeded_and_level_varied() -> None:
    y = _signal(22050 * 2)
    cfg = aug.AugmentConfig(copies=3)
    a = aug.augmented_copies(y, "x/y.wav", seed=5, config=cfg)
    b = aug.augmented_copies(y, "x/y.wav", seed=5, config=cfg)
    c = aug.augmented_copies(y, "x/y.wav", seed=6, config=cfg)
    assert len(a) == 3
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    peaks = [aug.peak_dbfs(p) for p in a]
    assert all(cfg.peak_dbfs[0] - 1e-3 <= p <= cfg.peak_dbfs[1] + 1e-3 for p in peaks)


def test_augment_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug.augment(_signal(), "reverse", np.random.default_rng(0), aug.AugmentConfig())


# -- featurisation -----------------------------------------------------------------


def test_featurisation_is_deterministic_and_cached(
    labelled_tree: Path, librosa_spec: FeatureSpec, tmp_path: Path
) -> None:
    records = scan_tree(labelled_tree)[:10]
    flags = [i % 2 == 0 for i in range(len(records))]
    cfg = aug.AugmentConfig(copies=2)

    def run(cache: Path, workers: int, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fs = compute_features(
            records,
            labelled_tree,
            librosa_spec,
            cache,
            augment=flags,
            config=cfg,
            seed=0,
            workers=workers,
            shard_clips=shard,
            progress=False,
        )
        return fs.x, fs.clip, fs.copy

    x1, clip1, copy1 = run(tmp_path / "a", 1, 4)
    x2, clip2, copy2 = run(tmp_path / "b", 2, 3)  # other worker count and sharding
    assert np.array_equal(x1, x2) and np.array_equal(clip1, clip2) and np.array_equal(copy1, copy2)
    assert x1.shape == (5 * 3 + 5, 40, 433)
    assert np.bincount(copy1).tolist() == [10, 5, 5]
    # Originals are the serving path's features of the decoded file (up to
    # float32 rounding: the workers run BLAS on one thread, summing in
    # another order than a multi-threaded call may).
    from soundwatch.audio import decode_audio

    clip = decode_audio(labelled_tree / records[1].rel_path, 22050)
    expected = FeatureExtractor(librosa_spec).analyse(clip.samples)
    np.testing.assert_allclose(x1[(clip1 == 1) & (copy1 == 0)][0], expected.mfcc, rtol=0, atol=1e-3)
    # A second run loads the cache and gives the same arrays.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    x3, _, _ = run(tmp_path / "a", 1, 4)
    assert np.array_equal(x1, x3)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes


def test_split_holds_out_whole_units(labelled_tree: Path) -> None:
    records = scan_tree(labelled_tree)
    splits = split_by_unit(records, val_units=("id_00",), test_units=("id_02",))
    assert not np.any(splits.train)
    assert {r.unit for r, m in zip(records, splits.test, strict=True) if m} == {"id_02"}
    with pytest.raises(ValueError, match="id_09"):
        split_by_unit(records, val_units=("id_09",), test_units=("id_02",))


# -- the simulated world in the pipeline ----------------------------------------------


@pytest.fixture(scope="module")
def simulated_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree from the simulated world: straddling clips and families in metadata."""
    from soundwatch.sim.dataset import ClipPlan, plan_clips, write_clips
    from soundwatch.sim.world import Mixture

    root = tmp_path_factory.mktemp("simulated")
    plan = ClipPlan(units=(0, 2, 4), per_class=2, mixture=Mixture(), straddle=0.5)
    write_clips(plan_clips(root, plan, seed=1), root)
    return root


def test_straddling_clips_get_soft_labels_in_reference_class_order(simulated_tree: Path) -> None:
    records = scan_tree(simulated_tree)
    labels = labels_from_metadata(records)
    assert labels.class_names == ("normal", "imbalance", "clogging", "voltage_change")
    soft = labels.soft_labels()
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(soft.argmax(axis=1), labels.labels)
    mixed = soft.max(axis=1) < 1.0
    assert mixed.any() and labels.details["straddling_clips"] == int(mixed.sum())
    assert np.all(soft.max(axis=1) >= 0.5)


def test_a_held_out_family_leaves_training_and_validation(simulated_tree: Path) -> None:
    records = scan_tree(simulated_tree)
    assert all(r.family for r in records)
    splits = split_by_unit(
        records, val_units=("id_02",), test_units=("id_04",), hold_out={"room": ("live",)}
    )
    live = np.asarray([r.family["room"] == "live" for r in records])
    assert live.any()
    assert not np.any(splits.train & live) and not np.any(splits.val & live)
    assert np.any(splits.test & live)  # the test units keep every family
    assert np.any(splits.train)
