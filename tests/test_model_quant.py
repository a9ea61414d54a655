"""The shipped int8 bundle against its float32 twin, on fan units it never heard.

``tests/data/fan-float.tflite`` is the float32 TFLite model converted from the
same checkpoint as the bundle's int8 model, with the same inputs (normalised
MFCC window and standardised physics vector; the bundle's normalisation is
applied outside). No TensorFlow is needed: both run in LiteRT.

Bounds, and why:

* top-1 agreement >= 0.95 and max |p_int8 - p_float| <= 0.3 on a few dozen
  fresh clips: int8 rounding should flip a decision only where the float model
  is nearly undecided, and the int8 softmax moves in steps of 1/256; a wrong
  scale or a missing normalisation gives differences near 1.
* the held-out units are rendered again from the bundle's provenance and
  run through both models: the recorded accuracy per SNR and agreement must
  come out again (within a clip), and must meet the targets (int8 >= 0.95 at
  +6 and 0 dB, >= 0.85 at -6 dB; int8/float top-1 agreement >= 0.99).
* loudness: the same clip at peaks from -40 to -3 dBFS gets the same verdict.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from soundwatch import sim
from soundwatch.audio import decode_audio, resample
from soundwatch.bundle import DEFAULT_BUNDLE_DIR, BundleError, load_bundle
from soundwatch.features import FeatureExtractor, WindowFeatures
from soundwatch.model import Classifier

FLOAT_MODEL = Path(__file__).parent / "data" / "fan-float.tflite"
# Odd unit ids: no training set has one (training units are id_00, id_02, ...).
UNSEEN_UNIT_ID = 97
AGREEMENT_MIN = 0.95
MAX_PROB_DIFF = 0.3
CLIPS_PER_CLASS_SNR = 3


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_bundle(DEFAULT_BUNDLE_DIR), threads=1)


@pytest.fixture(scope="module")
def float_model() -> object:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(FLOAT_MODEL), num_threads=1)
    interp.allocate_tensors()
    return interp


def _float_probs(interp: object, clf: Classifier, w: WindowFeatures) -> np.ndarray:
    details = interp.get_input_details()  # type: ignore[attr-defined]
    mfcc = next(d for d in details if len(d["shape"]) == 4)
    physics = next(d for d in details if len(d["shape"]) == 2)
    out = interp.get_output_details()[0]  # type: ignore[attr-defined]
    assert mfcc["dtype"] == np.float32 and out["dtype"] == np.float32
    x = clf.prepare(w.mfcc)[None, :, :, None].astype(np.float32)
    interp.set_tensor(mfcc["index"], x)  # type: ignore[attr-defined]
    p = clf.prepare_physics(w.physics)[None, :].astype(np.float32)
    interp.set_tensor(physics["index"], p)  # type: ignore[attr-defined]
    interp.invoke()  # type: ignore[attr-defined]
    return interp.get_tensor(out["index"]).reshape(-1)  # type: ignore[attr-defined,no-any-return]


def _windows(
    classifier: Classifier, snrs: tuple[float, ...], per: int, seed0: int
) -> list[WindowFeatures]:
    """Windows of fresh clips of an unseen unit in the middle of the simulated world."""
    extractor = FeatureExtractor(classifier.bundle.spec)
    rate = classifier.bundle.spec.sample_rate_hz
    out = []
    for ci, fault in enumerate(classifier.class_names):
        for snr in snrs:
            for k in range(per):
                seed = seed0 + 1000 * ci + 100 * int(snr + 10) + k
                y16 = sim.typical_clip(UNSEEN_UNIT_ID, fault, snr, seed)
                out.append(extractor.analyse(resample(y16, 16000, rate)))
    return out


def test_bundle_classes_match_the_simulator(classifier: Classifier) -> None:
    assert classifier.class_names == sim.CLASSES


def test_int8_agrees_with_float_on_an_unseen_unit(
    classifier: Classifier, float_model: object
) -> None:
    windows = _windows(classifier, (-6.0, 0.0, 6.0), CLIPS_PER_CLASS_SNR, seed0=500_000)
    assert len(windows) == 4 * 3 * CLIPS_PER_CLASS_SNR
    p_int8 = np.stack([classifier.probabilities(w.mfcc, w.physics) for w in windows])
    p_float = np.stack([_float_probs(float_model, classifier, w) for w in windows])
    agreement = float(np.mean(p_int8.argmax(1) == p_float.argmax(1)))
    diff = float(np.abs(p_int8 - p_float).max())
    assert agreement >= AGREEMENT_MIN, f"top-1 agreement {agreement:.3f}"
    assert diff <= MAX_PROB_DIFF, f"max |p_int8 - p_float| = {diff:.3f}"


# fan@2.0.0 misses these targets (docs/model.md, "What falls short"); strict, so
# a bundle that meets one makes its test fail until the mark comes off.
MISSED_BY_THE_SHIPPED_MODEL = pytest.mark.xfail(strict=True, reason="fan@2.0.0 misses it")


@pytest.mark.xfail(
    strict=True,
    reason="fan@2.0.0: the imbalance clip is a near tie (normal 0.32, clogging 0.35, "
    "imbalance 0.30) whose leader changes at one level; probabilities move by <= 0.04",
)
def test_verdict_does_not_follow_loudness(classifier: Classifier) -> None:
    """The same clip at peaks from -40 to -3 dBFS gets the same verdict: not loudness.

    c0 carries loudness, and the physics features are level-free by design.
    """
    extractor = FeatureExtractor(classifier.bundle.spec)
    rate = classifier.bundle.spec.sample_rate_hz
    for ci, fault in enumerate(classifier.class_names):
        y = sim.typical_clip(UNSEEN_UNIT_ID, fault, 6.0, seed=33_000 + 10 * ci)
        y = y / np.abs(y).max()
        probs = np.stack(
            [
                classifier.probabilities(w.mfcc, w.physics)
                for w in (
                    extractor.analyse(
                        resample((y * 10 ** (peak / 20)).astype(np.float32), 16000, rate)
                    )
                    for peak in (-40, -30, -20, -10, -3)
                )
            ]
        )
        assert len(set(probs.argmax(1).tolist())) == 1, (fault, probs)
        assert float(np.abs(probs - probs[2]).max()) <= 0.15, (fault, probs)


def test_training_normalisation_is_the_serving_one(classifier: Classifier) -> None:
    """The trainer's normalisers and the Classifier's give the same bits."""
    from tools.train.fit import Normaliser, PhysicsNorm

    bundle = classifier.bundle
    rng = np.random.default_rng(3)
    x = rng.normal(-100, 80, (2, *bundle.input_shape[1:3])).astype(np.float32)
    norm = Normaliser(bundle.input_mean, bundle.input_std)
    assert np.array_equal(norm.apply(x)[0], classifier.prepare(x[0]))
    assert np.array_equal(norm.apply_in_place(x.copy())[1], classifier.prepare(x[1]))
    assert bundle.physics_mean is not None and bundle.physics_std is not None
    p = rng.normal(0, 10, (2, bundle.physics_mean.size)).astype(np.float32)
    physics = PhysicsNorm(bundle.physics_mean, bundle.physics_std)
    assert np.array_equal(physics.apply(p)[1], classifier.prepare_physics(p[1]))


def test_int8_input_grid_is_the_training_grid(classifier: Classifier) -> None:
    """The int8 MFCC input scale is the grid the network was trained on (bundle provenance)."""
    from tools.train.fit import InputGrid

    limit = classifier.bundle.provenance["input_grid"]["limit"]
    grid = InputGrid(limit)
    scale, zero_point = classifier._in_q.scale, classifier._in_q.zero_point
    assert scale == pytest.approx(grid.step, rel=1e-6)
    assert zero_point == 0
    x = np.linspace(-1.2 * limit, 1.2 * limit, 1001, dtype=np.float32)
    served = classifier._in_q.dequantize(classifier._in_q.quantize(x))
    np.testing.assert_allclose(grid.round(x), served, atol=1e-5)


def test_bundle_is_small_and_documented() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.iterdir() if p.is_file())
    assert size < 200_000
    assert bundle.input_dtype == "int8" and bundle.output_dtype == "int8"
    assert bundle.input_mean is not None and bundle.typical is not None
    for key in ("seed", "arch", "params", "epochs", "versions", "data", "git_commit"):
        assert key in bundle.provenance, key
    assert "+dirty" not in str(bundle.provenance["git_commit"])
    assert "/work/" not in json.dumps(bundle.provenance) and "/root/" not in json.dumps(
        bundle.provenance
    )
    assert set(bundle.thresholds) == {"imbalance", "clogging", "voltage_change"}
    assert all(0.5 <= t < 1 for t in bundle.thresholds.values())
    agreement = bundle.metrics["int8_vs_float"]["top1_agreement"]
    assert 0.0 < agreement <= 1.0


@dataclass(frozen=True)
class HeldOut:
    """The held-out units, rendered again, through the int8 bundle and the float model."""

    y: np.ndarray
    snr_db: np.ndarray
    p_int8: np.ndarray
    p_float: np.ndarray

    def accuracy(self, snr_db: int) -> float:
        at = self.snr_db == snr_db
        return float(np.mean(self.p_int8[at].argmax(1) == self.y[at]))

    @property
    def agreement(self) -> float:
        return float(np.mean(self.p_int8.argmax(1) == self.p_float.argmax(1)))


@pytest.fixture(scope="module")
def held_out(
    classifier: Classifier, float_model: object, tmp_path_factory: pytest.TempPathFactory
) -> HeldOut:
    """Every clip of the held-out units, rendered again from the bundle's provenance.

    The training pipeline renders the validation and test units with one
    plan (``test_per_class`` clips per class and SNR, 16 kHz, 10 s, seed + 1;
    ``tools.train.pipeline.simulate``), writes them as 16-bit WAV and decodes
    them as the device does; so does this, for the test units.
    """
    from soundwatch.sim.dataset import ClipPlan, plan_clips, render_job, unit_dir
    from tools.train.layout import SimConfig

    data = classifier.bundle.provenance["data"]
    doc = data["simulation"]
    config = SimConfig(
        n_units=doc["n_units"],
        eval_units=doc["eval_units"],
        test_per_class=doc["test_per_class"],
        snrs_db=tuple(doc["snrs_db"]),
    )
    plan = ClipPlan(
        units=(*config.val_units, *config.test_units),
        per_class=config.test_per_class,
        snrs_db=config.snrs_db,
    )
    root = tmp_path_factory.mktemp("held-out")
    jobs = [
        job
        for job in plan_clips(root, plan, doc["seed"] + 1)
        if unit_dir(job.unit_number) in data["test_units"]
    ]
    extractor = FeatureExtractor(classifier.bundle.spec)
    rate = classifier.bundle.spec.sample_rate_hz
    p_int8, p_float, y, snr = [], [], [], []
    for job in jobs:
        row = render_job(job)
        window = extractor.analyse(decode_audio(root / job.rel_path, rate).samples)
        p_int8.append(classifier.probabilities(window.mfcc, window.physics))
        p_float.append(_float_probs(float_model, classifier, window))
        y.append(classifier.class_names.index(row["fault"]))
        snr.append(round(float(row["snr_db"])))
    return HeldOut(np.asarray(y), np.asarray(snr), np.stack(p_int8), np.stack(p_float))


def test_held_out_metrics_are_reproduced(held_out: HeldOut) -> None:
    """The bundle's recorded held-out figures come out again from the committed files.

    Allowed slack: one clip per SNR (features here may run with other BLAS
    threads than training's, so an input on the edge of an int8 step may
    round the other way).
    """
    metrics = load_bundle(DEFAULT_BUNDLE_DIR).metrics
    per_snr = len(held_out.y) // 3
    for snr in (-6, 0, 6):
        recorded = metrics["int8"]["per_snr"][f"{snr:+d} dB"]
        assert held_out.accuracy(snr) == pytest.approx(recorded, abs=1 / per_snr + 1e-9), snr
    recorded = metrics["int8_vs_float"]["top1_agreement"]
    assert held_out.agreement == pytest.approx(recorded, abs=3 / len(held_out.y))


@MISSED_BY_THE_SHIPPED_MODEL
def test_held_out_agreement_meets_the_target(held_out: HeldOut) -> None:
    """int8/float top-1 agreement >= 0.99 on the held-out units (fan@2.0.0: 0.970)."""
    assert held_out.agreement >= 0.99


@MISSED_BY_THE_SHIPPED_MODEL
def test_held_out_accuracy_meets_the_targets(held_out: HeldOut) -> None:
    """int8 >= 0.95 at +6 and 0 dB and >= 0.85 at -6 dB on the held-out units
    (fan@2.0.0: 0.88, 0.80, 0.675)."""
    assert held_out.accuracy(6) >= 0.95
    assert held_out.accuracy(0) >= 0.95
    assert held_out.accuracy(-6) >= 0.85


# -- load_bundle refuses a damaged bundle ---------------------------------------


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "fan"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def _edit_json(bundle_dir: Path, edit: object) -> None:
    path = bundle_dir / "bundle.json"
    doc = json.loads(path.read_text())
    edit(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


def test_load_bundle_refuses_a_modified_model(bundle_copy: Path) -> None:
    model = bundle_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model file .*model\.tflite is corrupt: sha256"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("array", "shape_fn"),
    [
        ("mel_basis", lambda a: a[:-1]),
        ("dct_matrix", lambda a: a[:, :-1]),
        ("input_mean", lambda a: a[:-1]),
        ("physics_std", lambda a: a[:-1]),
        ("typical_mean", lambda a: a[:, :-1]),
    ],
)
def test_load_bundle_refuses_feature_arrays_of_the_wrong_shape(
    bundle_copy: Path, array: str, shape_fn: object
) -> None:
    feat = bundle_copy / "features.npz"
    with np.load(feat) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[array] = shape_fn(arrays[array])  # type: ignore[operator]
    np.savez_compressed(feat, **arrays)
    digest = hashlib.sha256(feat.read_bytes()).hexdigest()
    _edit_json(bundle_copy, lambda d: d["features"].__setitem__("sha256", digest))
    with pytest.raises(BundleError, match=array.replace("typical_mean", "typical")):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_an_input_shape_that_disagrees_with_the_spec(
    bundle_copy: Path,
) -> None:
    n_mfcc = load_bundle(bundle_copy).spec.n_mfcc
    wrong = [1, n_mfcc, 432, 1]
    _edit_json(bundle_copy, lambda d: d["model"].__setitem__("input_shape", wrong))
    with pytest.raises(BundleError, match=rf"input_shape \[1, {n_mfcc}, 432, 1\] disagrees"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_other_physics_features(bundle_copy: Path) -> None:
    _edit_json(bundle_copy, lambda d: d["physics"].__setitem__("version", 0))
    with pytest.raises(BundleError, match="physics features version 0"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_an_older_format(bundle_copy: Path) -> None:
    _edit_json(bundle_copy, lambda d: d.__setitem__("format", "soundwatch-bundle/1"))
    with pytest.raises(BundleError, match="another soundwatch version"):
        load_bundle(bundle_copy)
