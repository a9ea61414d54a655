"""Section "startup": a whole process that classifies one file, from exec to exit.

Processes are started the way a user starts them (no thread pins), one after
another, alternating soundwatch and the reference service's path. Wall time is measured
around the child; peak RSS is the child's own ``ru_maxrss`` from ``os.wait4``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.bench.core import Context, Row, Stat, Target
from tools.bench.reference_service import REFERENCE_LOAD_ONLY_SCRIPT, REFERENCE_PROCESS_SCRIPT

TARGET_STARTUP = Target(on="soundwatch", op="<", value=0.5, unit="s")
TARGET_RSS = Target(on="soundwatch", op="<", value=100.0, unit="MB")

SOUNDWATCH_LOAD_ONLY_SCRIPT = """\
import sys
from soundwatch.bundle import load_bundle
from soundwatch.classify import ClipClassifier
classifier = ClipClassifier(load_bundle(sys.argv[1]))
"""


class ChildFailed(RuntimeError):
    """A measured process exited non-zero."""


@dataclass(frozen=True)
class ChildRun:
    wall_s: float
    cpu_s: float
    max_rss_mb: float


def run_child(argv: list[str], env: dict[str, str]) -> ChildRun:
    """Run ``argv`` to completion; its wall time, CPU time and own peak RSS."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            tail = out.read().decode(errors="replace")[-2000:]
            raise ChildFailed(f"{argv[:3]}… exited {proc.returncode}:\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return ChildRun(
        wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, max_rss_mb=usage.ru_maxrss / 1024.0
    )


def run(ctx: Context) -> list[Row]:
    fx = ctx.fixtures
    env = dict(ctx.user_env)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    clip = str(fx.clips[0])
    bundle = str(fx.bundle_dir)
    cli = str(Path(ctx.python).parent / "soundwatch")
    commands = {
        "sw_classify": [cli, "classify", "--bundle", bundle, clip],
        "reference_classify": [
            ctx.python,
            "-c",
            REFERENCE_PROCESS_SCRIPT,
            str(fx.reference_model),
            clip,
        ],
        "sw_load": [ctx.python, "-c", SOUNDWATCH_LOAD_ONLY_SCRIPT, bundle],
        "reference_load": [ctx.python, "-c", REFERENCE_LOAD_ONLY_SCRIPT, str(fx.reference_model)],
        "bare": [ctx.python, "-c", "pass"],
    }
    envs = {key: env for key in commands}
    # The same soundwatch command with OpenBLAS pinned, as a deployment could
    # set it: numpy otherwise starts one BLAS thread per core at import.
    commands["sw_classify_blas1"] = commands["sw_classify"]
    envs["sw_classify_blas1"] = {**env, "OPENBLAS_NUM_THREADS": "1"}
    runs = ctx.reps(7, 2)
    results: dict[str, list[ChildRun]] = {k: [] for k in commands}
    # One untimed run fills the page cache, as on a device that has run before.
    # Not for the reference service's processes (5 s each): preparing the fixtures has just
    # read TensorFlow from disk, and a median is robust to one cold run.
    for key, argv in commands.items():
        if not key.startswith("reference"):
            run_child(argv, envs[key])
    for i in range(runs):
        order = list(commands) if i % 2 == 0 else list(reversed(commands))
        for key in order:
            results[key].append(run_child(commands[key], envs[key]))
            print(f"  startup {i + 1}/{runs}: {key} done", file=sys.stderr, flush=True)

    def wall(key: str) -> Stat:
        return Stat.of(r.wall_s for r in results[key])

    def cpu(key: str) -> Stat:
        return Stat.of(r.cpu_s for r in results[key])

    def rss(key: str) -> Stat:
        return Stat.of(r.max_rss_mb for r in results[key])

    bare = wall("bare")
    bare_note = (
        f" Both include the bare interpreter start-up, median {bare.median * 1e3:.0f} ms "
        f"(`python -c pass`, {rss('bare').median:.0f} MB)."
    )
    return [
        Row(
            "start-up + classify one file",
            "s",
            wall("reference_classify"),
            wall("sw_classify"),
            "wall time of the whole process, exec to exit. soundwatch: the console script "
            "`soundwatch classify --bundle B FILE` (imports, bundle load with hash checks, "
            "LiteRT interpreter, decode, features, inference, print); reference: `python -c` "
            "importing numpy + librosa + keras, keras.models.load_model(.keras), "
            "librosa.load, mfcc, pad, model.predict, print." + bare_note,
            TARGET_STARTUP,
        ),
        Row(
            "the same, soundwatch with OPENBLAS_NUM_THREADS=1",
            "s",
            None,
            wall("sw_classify_blas1"),
            "the soundwatch command above with OPENBLAS_NUM_THREADS=1 in its environment "
            "(numpy's BLAS pool otherwise has one thread per core); no reference counterpart",
        ),
        Row(
            "CPU time (user + sys) of that process",
            "s",
            cpu("reference_classify"),
            cpu("sw_classify"),
            "ru_utime + ru_stime of the child, summed over its threads; above the wall "
            "time means the process kept more than one core busy",
        ),
        Row(
            "peak RSS of that process",
            "MB",
            rss("reference_classify"),
            rss("sw_classify"),
            "the child's own ru_maxrss (os.wait4), resident set at its peak, in MiB",
            TARGET_RSS,
        ),
        Row(
            "import + load model (no audio)",
            "s",
            wall("reference_load"),
            wall("sw_load"),
            "wall time of a process that only imports and loads the model. soundwatch: "
            "import soundwatch.bundle + .classify, load_bundle(), ClipClassifier() "
            "(LiteRT interpreter allocated); reference: import numpy + librosa + keras, "
            "load_model()." + bare_note,
        ),
        Row(
            "peak RSS, import + load model",
            "MB",
            rss("reference_load"),
            rss("sw_load"),
            "ru_maxrss of the import-and-load process above",
        ),
    ]
