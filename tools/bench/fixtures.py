"""Files the bench needs, made once per run in a temporary directory.

- 10 s, 16 kHz mono WAV clips (MIMII's format), from the simulator (``soundwatch.sim``)
  when it is there, else from plain noise and fan-like tones. Content does
  not change the cost of either path; only length and rate do.
- The reference service's CNN saved as a ``.keras`` file, which the reference service's path loads.
- A float32 TFLite reference: ``tests/data/fan-float.tflite`` if present,
  else the reference CNN converted here.
- With ``--temp-bundle`` (or when no bundle is shipped yet), a soundwatch
  bundle from the untrained reference CNN quantised to int8 with random features
  as the representative data set, so the bench never waits for training.

Runs in its own child process (``python -m tools.bench.fixtures``) because
it needs TensorFlow and the runner must not load it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.core import Fixtures

CLIP_RATE_HZ = 16000
CLIP_SECONDS = 10.0
FLOAT_REFERENCE = Path("tests/data/fan-float.tflite")


def _sim_clip(index: int) -> np.ndarray | None:
    """A clip from the simulator (cycling units, classes and SNRs), or None without it."""
    try:
        from soundwatch.sim import CLASSES, typical_clip
    except ImportError:
        return None
    snrs = (-6.0, 0.0, 6.0)
    y = typical_clip(
        2 * (index % 4) + 1,
        CLASSES[index % len(CLASSES)],
        snrs[index % len(snrs)],
        seed=index,
        duration_s=CLIP_SECONDS,
        sample_rate_hz=CLIP_RATE_HZ,
    )
    return np.asarray(y, dtype=np.float32)


def _tones_clip(index: int) -> np.ndarray:
    """Pink-ish noise plus a shaft tone, blade-pass harmonics and mains hum."""
    rng = np.random.default_rng(index)
    n = int(CLIP_RATE_HZ * CLIP_SECONDS)
    t = np.arange(n) / CLIP_RATE_HZ
    shaft = 20.0 + 4.0 * rng.random()
    y = 0.3 * np.sin(2 * np.pi * shaft * t)
    for k in range(1, 5):
        y += 0.2 / k * np.sin(2 * np.pi * 7 * shaft * k * t + rng.random())
    for k in range(1, 4):
        y += 0.1 / k * np.sin(2 * np.pi * 50 * k * t)
    white = rng.standard_normal(n)
    pink = np.cumsum(white) * 0.02
    pink -= np.convolve(pink, np.ones(256) / 256, mode="same")
    y += pink + 0.05 * white
    peak = 10 ** (rng.uniform(-30, -8) / 20)
    out: np.ndarray = (y / np.max(np.abs(y)) * peak).astype(np.float32)
    return out


def write_clips(out_dir: Path, count: int) -> tuple[list[Path], str]:
    import soundfile as sf

    out_dir.mkdir(parents=True, exist_ok=True)
    paths, generators = [], set()
    for i in range(count):
        y = _sim_clip(i)
        generators.add("soundwatch.sim.typical_clip" if y is not None else "noise + tones")
        if y is None:
            y = _tones_clip(i)
        path = out_dir / f"clip{i:02d}.wav"
        sf.write(path, y, CLIP_RATE_HZ, subtype="PCM_16")
        paths.append(path)
    return paths, " and ".join(sorted(generators))


def reference_spec() -> Any:
    """The reference service's feature spec, made by librosa and scipy as training exports it."""
    import librosa
    import scipy.fft

    from soundwatch.features import FeatureSpec

    mel = librosa.filters.mel(sr=22050, n_fft=2048, n_mels=128)
    dct = scipy.fft.dct(np.eye(128), type=2, norm="ortho", axis=0)[:40]
    return FeatureSpec(mel_basis=mel.astype(np.float32), dct_matrix=dct.astype(np.float32))


def convert(model: Any, int8: bool) -> bytes:
    """TFLite bytes of a Keras model: float32, or int8 in and out from random features."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)

        def representative() -> Any:
            for _ in range(32):
                yield [(rng.standard_normal((1, 40, 433, 1)) * 40.0).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    out: bytes = converter.convert()
    return out


def prepare(
    workdir: Path, n_clips: int, temp_bundle: bool, repo_root: Path, shipped_dir: Path
) -> Fixtures:
    clips, generator = write_clips(workdir / "clips", n_clips)

    from tools.bench.reference_service import build_reference_cnn

    model, model_source = build_reference_cnn()
    # One training step, so the saved file carries optimizer state as a trained
    # model's does and load_model() restores it, as the reference service's path did.
    rng = np.random.default_rng(0)
    model.train_on_batch(
        (rng.standard_normal((4, 40, 433, 1)) * 40.0).astype(np.float32),
        np.eye(4, dtype=np.float32),
    )
    reference_model = workdir / "reference_cnn.keras"
    model.save(reference_model)

    float_ref = repo_root / FLOAT_REFERENCE
    if float_ref.is_file():
        float_path, float_source = float_ref, str(FLOAT_REFERENCE)
    else:
        float_path = workdir / "reference_cnn_float.tflite"
        float_path.write_bytes(convert(model, int8=False))
        float_source = "reference CNN converted to float32 here (no tests/data/fan-float.tflite)"

    if not temp_bundle and (shipped_dir / "bundle.json").is_file():
        shown = shipped_dir.resolve()
        with contextlib.suppress(ValueError):
            shown = shown.relative_to(repo_root)
        bundle_dir, bundle_kind = shipped_dir, f"bundle at {shown}"
    else:
        from soundwatch.bundle import write_bundle

        bundle_dir = write_bundle(
            workdir / "bundle",
            tflite_model=convert(model, int8=True),
            spec=reference_spec(),
            name="bench-temp",
            version="0",
            provenance={"note": "untrained reference CNN, int8 from random features; timing only"},
        )
        why = "--temp-bundle" if temp_bundle else "no shipped bundle yet"
        bundle_kind = f"temporary: untrained reference CNN, int8 ({why})"
    return Fixtures(
        workdir=workdir,
        clips=tuple(clips),
        clip_generator=generator,
        reference_model=reference_model,
        reference_model_source=model_source,
        float_tflite=float_path,
        float_tflite_source=float_source,
        bundle_dir=bundle_dir,
        bundle_kind=bundle_kind,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.fixtures")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--clips", type=int, required=True)
    parser.add_argument("--temp-bundle", action="store_true")
    parser.add_argument("--repo-root", type=Path, required=True)
    parser.add_argument("--shipped-bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The converter prints pages of progress; the runner keeps this process's
    # output in a log and shows it only if preparing fails.
    fixtures = prepare(
        args.workdir, args.clips, args.temp_bundle, args.repo_root, args.shipped_bundle
    )
    args.out.write_text(json.dumps(fixtures.to_json()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
