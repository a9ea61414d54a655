"""Section "inference": the model alone, one window (reference: 40x433 Keras; soundwatch: int8).

TensorFlow cannot resize its thread pools once started, so each thread count
gets its own child process (``python -m tools.bench.inference``). In it, the
the reference service's Keras model and LiteRT's interpreters run in alternating blocks, so a
burst of load from elsewhere hits both sides alike. (Having TensorFlow loaded
in the same process does not change LiteRT's invoke time; checked here.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.core import ONE_CORE_ENV, QUIET_ENV, Context, Row, Stat, Target

TARGET_INVOKE = Target(on="soundwatch", op="<=", value=2.0, unit="ms")


class _Invoker:
    """One interpreter fed one fixed window; ``once()`` is set_tensor + invoke + get_tensor."""

    def __init__(self, model_path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(model_path), num_threads=threads)
        self.interp.allocate_tensors()
        self.out_index = self.interp.get_output_details()[0]["index"]
        rng = np.random.default_rng(0)
        # Every input (the MFCC window and, since format 2, the physics vector).
        self.inputs: list[tuple[int, Any]] = []
        for inp in self.interp.get_input_details():
            if inp["dtype"] == np.float32:
                x: Any = (rng.standard_normal(inp["shape"]) * 20).astype(np.float32)
            else:
                x = rng.integers(-128, 128, size=inp["shape"]).astype(inp["dtype"])
            self.inputs.append((inp["index"], x))

    def once(self) -> None:
        for index, x in self.inputs:
            self.interp.set_tensor(index, x)
        self.interp.invoke()
        self.interp.get_tensor(self.out_index)


def _time_blocks(
    fns: dict[str, tuple[Callable[[], object], int]], blocks: int
) -> dict[str, list[float]]:
    """Per-call times in ms; each block runs every function ``n`` times, order alternating."""
    for fn, _ in fns.values():
        for _ in range(5):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for b in range(blocks):
        keys = list(fns) if b % 2 == 0 else list(reversed(fns))
        for key in keys:
            fn, n = fns[key]
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out[key].append((time.perf_counter() - t0) * 1e3)
    return out


def measure(ctx: Context, threads: int) -> dict[str, list[float]]:
    """Everything at one thread count, in this process (TensorFlow must not have started)."""
    from tools.bench.reference_service import (
        REFERENCE_INPUT_SHAPE,
        load_reference_model,
        pin_tf_threads,
        reference_call,
        reference_predict,
    )

    pin_tf_threads(threads)
    from soundwatch.bundle import load_bundle
    from soundwatch.model import Classifier
    from soundwatch.physics import FEATURE_NAMES

    fx = ctx.fixtures
    bundle = load_bundle(fx.bundle_dir)
    classifier = Classifier(bundle, threads=threads)
    rng = np.random.default_rng(1)
    window = (rng.standard_normal(bundle.input_shape[1:3]) * 20).astype(np.float32)
    physics = np.zeros(len(FEATURE_NAMES), np.float32)
    model = load_reference_model(fx.reference_model)
    x = (rng.standard_normal((1, *REFERENCE_INPUT_SHAPE)) * 20).astype(np.float32)
    int8 = _Invoker(bundle.model_path, threads)
    lite_n = ctx.reps(100, 50)
    fns: dict[str, tuple[Callable[[], object], int]] = {
        "keras_predict": (lambda: reference_predict(model, x), ctx.reps(10, 5)),
        "keras_call": (lambda: reference_call(model, x), ctx.reps(20, 10)),
        "int8": (int8.once, lite_n),
        "classifier_probabilities": (lambda: classifier.probabilities(window, physics), lite_n),
    }
    if fx.float_tflite is not None:
        fns["float32"] = (_Invoker(fx.float_tflite, threads).once, lite_n)
    return _time_blocks(fns, blocks=ctx.reps(10, 4))


def _child(ctx: Context, threads: int) -> dict[str, list[float]]:
    env = {**ctx.user_env, **QUIET_ENV, **ONE_CORE_ENV}
    if threads != 1:  # TF's pools are set by pin_tf_threads(); BLAS stays pinned
        env.pop("TF_NUM_INTRAOP_THREADS")
        env.pop("TF_NUM_INTEROP_THREADS")
    with tempfile.TemporaryDirectory() as tmp:
        ctx_path, out = Path(tmp) / "ctx.json", Path(tmp) / "times.json"
        ctx_path.write_text(json.dumps(ctx.to_json()), encoding="utf-8")
        argv = [ctx.python, "-m", "tools.bench.inference", "--threads", str(threads)]
        argv += ["--ctx", str(ctx_path), "--out", str(out)]
        proc = subprocess.run(
            argv, cwd=ctx.repo_root, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tail = proc.stderr[-3000:]
            raise RuntimeError(f"inference child ({threads} threads) failed:\n{tail}")
        doc: dict[str, list[float]] = json.loads(out.read_text(encoding="utf-8"))
        return doc


def run(ctx: Context) -> list[Row]:
    from soundwatch.bundle import load_bundle

    fx = ctx.fixtures
    int8_kb = os.path.getsize(load_bundle(fx.bundle_dir).model_path) / 1024
    t: dict[int, dict[str, Stat]] = {}
    for threads in (1, 2):
        print(f"  inference: {threads} thread(s) …", file=sys.stderr, flush=True)
        t[threads] = {k: Stat.of(v) for k, v in _child(ctx, threads).items()}
    invoke = (
        f"set_tensor + invoke + get_tensor of one int8 window on the bundle's model "
        f"({int8_kb:.1f} KB, XNNPACK)"
    )
    keras = "the reference service's CNN on one window, TF intra- and inter-op pools"
    rows = [
        Row(
            "1 thread: int8 invoke vs Keras predict",
            "ms",
            t[1]["keras_predict"],
            t[1]["int8"],
            f"soundwatch: {invoke}, num_threads=1; reference: model.predict(x) of {keras} 1",
            TARGET_INVOKE,
        ),
        Row(
            "1 thread: int8 invoke vs Keras model(x)",
            "ms",
            t[1]["keras_call"],
            t[1]["int8"],
            "as above, reference with the direct call model(x, training=False)",
            TARGET_INVOKE,
        ),
        Row(
            "1 thread: Classifier.predict vs Keras model(x)",
            "ms",
            t[1]["keras_call"],
            t[1]["classifier_probabilities"],
            "soundwatch: soundwatch.model.Classifier(threads=1).predict(window): shape and "
            "finite checks, normalisation if the bundle has one, quantise, invoke, dequantise",
        ),
        Row(
            "2 threads: int8 invoke vs Keras predict",
            "ms",
            t[2]["keras_predict"],
            t[2]["int8"],
            f"soundwatch: {invoke}, num_threads=2; reference: model.predict(x), TF pools 2",
        ),
        Row(
            "2 threads: int8 invoke vs Keras model(x)",
            "ms",
            t[2]["keras_call"],
            t[2]["int8"],
            "as above, reference with model(x)",
        ),
    ]
    if fx.float_tflite is not None:
        float_kb = os.path.getsize(fx.float_tflite) / 1024
        rows += [
            Row(
                f"{n} thread{'s' if n > 1 else ''}: float32 invoke vs Keras model(x)",
                "ms",
                t[n]["keras_call"],
                t[n]["float32"],
                f"soundwatch column: the float32 reference ({fx.float_tflite_source}, "
                f"{float_kb:.1f} KB), set_tensor + invoke + get_tensor, num_threads={n}; "
                f"reference: model(x), TF pools {n}",
            )
            for n in (1, 2)
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.inference")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ctx", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    ctx = Context.from_json(json.loads(args.ctx.read_text(encoding="utf-8")))
    times = measure(ctx, args.threads)
    args.out.write_text(json.dumps(times), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
