"""``python -m tools.bench``: run the bench's sections and print them side by side.

Usage::

    python -m tools.bench                 # every section (a few minutes)
    python -m tools.bench --quick         # fewer repetitions (under a minute)
    python -m tools.bench --only clip     # one section (repeat --only for more)
    python -m tools.bench --temp-bundle   # an untrained int8 bundle made on the fly

Prints one table per section and writes every figure to ``build/bench.json``.
The figures are comparisons, not pass/fail tests: a missed target is shown,
and the exit status is non-zero only if a section could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tools.bench.core import (
    ONE_CORE_ENV,
    QUIET_ENV,
    Context,
    Fixtures,
    Row,
    Section,
    format_table,
    load_average,
)
from tools.bench.registry import SECTIONS

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_BUNDLE = REPO_ROOT / "module" / "soundwatch" / "models" / "fan"
DEFAULT_OUT = REPO_ROOT / "build" / "bench.json"
# TensorFlow's C++ start-up lines, which TF_CPP_MIN_LOG_LEVEL no longer hides.
_NOISE = (
    "I0000 ",
    "W0000 ",
    "WARNING: All log messages before absl",
    "INFO: Created TensorFlow Lite XNNPACK delegate",
)
PACKAGES = (
    "soundwatch",
    "numpy",
    "ai-edge-litert",
    "soxr",
    "soundfile",
    "librosa",
    "tensorflow-cpu",
    "keras",
)


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_start": load_average(),
        "versions": _versions(),
    }


def _prepare(args: argparse.Namespace, workdir: Path) -> Fixtures:
    out = workdir / "fixtures.json"
    log = workdir / "fixtures.log"
    argv = [
        sys.executable,
        "-m",
        "tools.bench.fixtures",
        "--workdir",
        str(workdir),
        "--clips",
        "5" if args.quick else "10",
        "--repo-root",
        str(REPO_ROOT),
        "--shipped-bundle",
        str(args.bundle),
        "--out",
        str(out),
    ]
    if args.temp_bundle:
        argv.append("--temp-bundle")
    env = {**os.environ, **QUIET_ENV}
    with log.open("wb") as fh:
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdout=fh, stderr=fh, check=False)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-5000:])
        raise SystemExit(f"bench: preparing fixtures failed (exit {proc.returncode})")
    return Fixtures.from_json(json.loads(out.read_text(encoding="utf-8")))


def _run_section(section: Section, ctx: Context, workdir: Path) -> tuple[list[Row], str | None]:
    """Run one section in its own child process; its rows, or an error message."""
    ctx_path = workdir / f"{section.name}.ctx.json"
    result_path = workdir / f"{section.name}.rows.json"
    ctx_path.write_text(json.dumps(ctx.to_json()), encoding="utf-8")
    env = {**ctx.user_env, **QUIET_ENV}
    if section.one_core:
        env.update(ONE_CORE_ENV)
    argv = [sys.executable, "-m", "tools.bench", "--worker", section.name]
    argv += ["--ctx", str(ctx_path), "--result", str(result_path)]
    with subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not line.startswith(_NOISE):
                sys.stderr.write(line)
    if proc.returncode != 0 or not result_path.is_file():
        return [], f"section {section.name!r} failed (exit {proc.returncode}); see stderr above"
    docs = json.loads(result_path.read_text(encoding="utf-8"))
    return [Row.from_json(d) for d in docs], None


def _worker(args: argparse.Namespace) -> int:
    section = _section(args.worker)
    ctx = Context.from_json(json.loads(Path(args.ctx).read_text(encoding="utf-8")))
    rows = section.load()(ctx)
    Path(args.result).write_text(json.dumps([r.to_json() for r in rows]), encoding="utf-8")
    return 0


def _section(name: str) -> Section:
    for s in SECTIONS:
        if s.name == name:
            return s
    names = ", ".join(s.name for s in SECTIONS)
    raise SystemExit(f"bench: no section {name!r}; sections are: {names}")


def _print_header(machine: dict[str, Any], fixtures: Fixtures, quick: bool) -> None:
    v = machine["versions"]
    one, five, fifteen = machine["load_average_start"]
    print(f"# soundwatch bench — {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {machine['platform']}, {machine['cpus_usable']} usable CPUs, "
        f"Python {machine['python']}; load average at start {one} / {five} / {fifteen} "
        "(1/5/15 min)"
    )
    print(
        f"versions: numpy {v['numpy']}, ai-edge-litert {v['ai-edge-litert']}, soxr {v['soxr']}, "
        f"librosa {v['librosa']}, tensorflow-cpu {v['tensorflow-cpu']}, keras {v['keras']}"
    )
    print(f"bundle: {fixtures.bundle_kind}")
    print(
        f"clips: {len(fixtures.clips)} x 10 s, 16 kHz mono 16-bit WAV ({fixtures.clip_generator})"
    )
    print(f"the reference service's CNN: {fixtures.reference_model_source}")
    print(
        f"mode: {'quick (fewer repetitions)' if quick else 'full'}. Cells: median (p95, n). "
        "reference/soundwatch = ratio of medians; > 1 means soundwatch costs less."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this section (repeatable): {', '.join(s.name for s in SECTIONS)}",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 1 min)")
    parser.add_argument(
        "--temp-bundle",
        action="store_true",
        help="time an untrained reference-CNN int8 bundle made on the fly, not the shipped one "
        "(also used automatically while no bundle is shipped)",
    )
    parser.add_argument(
        "--bundle", type=Path, default=SHIPPED_BUNDLE, help="bundle directory to time"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    selected = [_section(n) for n in args.only] if args.only else list(SECTIONS)
    started = time.perf_counter()
    machine = _machine()
    workdir = Path(tempfile.mkdtemp(prefix="soundwatch-bench-"))
    print(
        "preparing clips, the reference service's model and the bundle …",
        file=sys.stderr,
        flush=True,
    )
    try:
        fixtures = _prepare(args, workdir)
        _print_header(machine, fixtures, args.quick)
        user_env = dict(os.environ)
        results: list[dict[str, Any]] = []
        failed = False
        for number, section in enumerate(selected, start=1):
            ctx = Context(
                quick=args.quick,
                fixtures=fixtures,
                repo_root=REPO_ROOT,
                python=sys.executable,
                one_core=section.one_core,
                user_env=user_env,
            )
            print(f"running section {section.name} …", file=sys.stderr, flush=True)
            load_before = load_average()
            t0 = time.perf_counter()
            rows, error = _run_section(section, ctx, workdir)
            elapsed = time.perf_counter() - t0
            load_after = load_average()
            pins = (
                "Thread pins: BLAS/OpenMP/numba/TF pools at 1 unless a row says otherwise."
                if section.one_core
                else "No thread pins."
            )
            print()
            print(f"## {number}. {section.title}")
            print(f"{section.what[:1].upper()}{section.what[1:]}. {pins}")
            print()
            print(
                f"Load average {load_before[0]} before, {load_after[0]} after; "
                f"section took {elapsed:.0f} s."
            )
            print()
            if error:
                failed = True
                print(f"FAILED: {error}")
            else:
                for line in format_table(rows):
                    print(line)
            results.append(
                {
                    "name": section.name,
                    "title": section.title,
                    "what": section.what,
                    "one_core": section.one_core,
                    "elapsed_s": round(elapsed, 2),
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "error": error,
                    "rows": [r.to_json() for r in rows],
                }
            )
            sys.stdout.flush()

        missed = [
            (s["title"], Row.from_json(r)) for s in results for r in s["rows"] if r["met"] is False
        ]
        print()
        print("## Targets")
        for s in results:
            for r in s["rows"]:
                row = Row.from_json(r)
                if row.target is not None:
                    verdict = "met" if row.met else "MISSED"
                    print(
                        f"- {s['title']} / {row.figure}: target {row.target.text()}, "
                        f"reached {row.target.reached_text(row)} — {verdict}"
                    )
        machine["load_average_end"] = load_average()
        total = time.perf_counter() - started
        print(
            f"\nLoad average at end {' / '.join(map(str, machine['load_average_end']))}; "
            f"bench took {total:.0f} s"
        )
        doc = {
            "generated": dt.datetime.now().isoformat(timespec="seconds"),
            "options": {"quick": args.quick, "only": args.only, "temp_bundle": args.temp_bundle},
            "machine": machine,
            "fixtures": {
                "bundle": fixtures.bundle_kind,
                "clips": len(fixtures.clips),
                "clip_generator": fixtures.clip_generator,
                "reference_model": fixtures.reference_model_source,
                "float_reference": fixtures.float_tflite_source,
            },
            "elapsed_s": round(total, 1),
            "sections": results,
            "targets_missed": [
                {
                    "section": title,
                    "figure": row.figure,
                    "target": row.target.text() if row.target else None,
                    "reached": row.target.reached_text(row) if row.target else None,
                }
                for title, row in missed
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
