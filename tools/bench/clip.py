"""Section "clip": the cost of classifying one 10 s clip, stage by stage.

Both paths run in this one process on one core (BLAS, numba, TensorFlow and
LiteRT pinned to one thread), interleaved clip by clip and in alternating
order, so a burst of load from elsewhere hits both alike.
"""

from __future__ import annotations

import time
from typing import Any

from tools.bench.core import Context, Row, Stat, Target, time_ms
from tools.bench.reference_service import (
    load_reference_model,
    pin_tf_threads,
    reference_call,
    reference_features,
    reference_load,
    reference_predict,
)

TARGET_RATIO = Target(on="ratio", op=">=", value=20.0)


def _limit_blas() -> dict[str, Any]:
    """Belt and braces over the env pins: threadpoolctl, if installed; what is loaded."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return {"threadpoolctl": "not installed"}
    threadpool_limits(1)
    return {
        "threadpools": [
            {k: p.get(k) for k in ("user_api", "internal_api", "num_threads")}
            for p in threadpool_info()
        ]
    }


def run(ctx: Context) -> list[Row]:
    pin_tf_threads(1)
    import librosa  # noqa: F401  (imported before timing, as the reference service's process had it)

    from soundwatch.bundle import load_bundle
    from soundwatch.classify import ClipClassifier

    fx = ctx.fixtures
    model = load_reference_model(fx.reference_model)
    classifier = ClipClassifier(load_bundle(fx.bundle_dir), threads=1)
    clips = fx.clips[: ctx.reps(len(fx.clips), 5)]
    rounds = ctx.reps(4, 3)

    reference: dict[str, list[float]] = {"load": [], "features": [], "predict": [], "call": []}
    sw: dict[str, list[float]] = {"decode": [], "features": [], "inference": [], "total": []}

    def run_reference(path: Any, record: bool) -> None:
        y: Any = None
        x: Any = None

        def load() -> None:
            nonlocal y
            y = reference_load(path)

        def features() -> None:
            nonlocal x
            x = reference_features(y)

        times = {
            "load": time_ms(load),
            "features": time_ms(features),
            "predict": time_ms(lambda: reference_predict(model, x)),
            "call": time_ms(lambda: reference_call(model, x)),
        }
        if record:
            for k, v in times.items():
                reference[k].append(v)

    def run_soundwatch(path: Any, record: bool) -> None:
        t0 = time.perf_counter()
        result = classifier.classify_source(path)
        total = (time.perf_counter() - t0) * 1e3
        if record:
            for k in ("decode", "features", "inference"):
                sw[k].append(result.timing_ms[k])
            sw["total"].append(total)

    for _ in range(3):  # warm-up: first-call costs (numba JIT, TF graph tracing, caches)
        run_reference(clips[0], record=False)
        run_soundwatch(clips[0], record=False)
    for r in range(rounds):
        for i, path in enumerate(clips):
            if (r + i) % 2 == 0:
                run_reference(path, record=True)
                run_soundwatch(path, record=True)
            else:
                run_soundwatch(path, record=True)
                run_reference(path, record=True)

    base = [a + b for a, b in zip(reference["load"], reference["features"], strict=True)]
    reference_total_predict = [a + b for a, b in zip(base, reference["predict"], strict=True)]
    reference_total_call = [a + b for a, b in zip(base, reference["call"], strict=True)]
    extra = {"clips": len(clips), "rounds": rounds, **_limit_blas()}
    return [
        Row(
            "decode: read + resample",
            "ms",
            Stat.of(reference["load"]),
            Stat.of(sw["decode"]),
            "reference: librosa.load(path, sr=22050) (libsndfile + soxr HQ); soundwatch: "
            "soundfile read of the first 10.5 s + mono + silence check + soxr HQ to 22.05 kHz",
        ),
        Row(
            "features: MFCC x 433",
            "ms",
            Stat.of(reference["features"]),
            Stat.of(sw["features"]),
            "reference: librosa.feature.mfcc(n_mfcc=40) + pad 2 columns + fit to 433; "
            "soundwatch: numpy STFT/mel/dB/DCT (soundwatch.features) for the bundle's 64 "
            "coefficients + the same padding",
        ),
        Row(
            "inference: Keras predict vs LiteRT int8",
            "ms",
            Stat.of(reference["predict"]),
            Stat.of(sw["inference"]),
            "reference: model.predict(x) of its CNN (TF, 1 thread); soundwatch: "
            "Classifier.predict = checks + quantise + LiteRT int8 invoke (1 thread) + dequantise",
        ),
        Row(
            "inference: Keras model(x) vs LiteRT int8",
            "ms",
            Stat.of(reference["call"]),
            Stat.of(sw["inference"]),
            "as above, with the direct Keras call model(x, training=False) instead of predict",
        ),
        Row(
            "total per clip (reference with predict)",
            "ms",
            Stat.of(reference_total_predict),
            Stat.of(sw["total"]),
            "reference: load + features + predict for the same clip; soundwatch: wall time of "
            "ClipClassifier.classify_source(path) (decode + features + inference + verdict)",
            TARGET_RATIO,
            extra,
        ),
        Row(
            "total per clip (reference with model(x))",
            "ms",
            Stat.of(reference_total_call),
            Stat.of(sw["total"]),
            "as above, with model(x) in the reference service's path",
            TARGET_RATIO,
        ),
    ]
