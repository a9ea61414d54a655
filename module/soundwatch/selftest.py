"""The self-test: does this installation classify like the reference machine?

Three steps, each reported as ``pass``, ``fail`` or ``skip`` with a reason:

1. ``bundle``: load the shipped model bundle and create its interpreter.
2. ``samples``: classify the sample clips shipped in ``soundwatch/samples/``.
   ``expected.json`` there maps each clip's file name to the label and the
   class probabilities measured on x86_64::

       {
         "_about": "keys starting with _ are ignored",
         "fan_imbalance.flac": {
           "label": "imbalance",
           "probabilities": {"normal": 0.02, "imbalance": 0.96, ...}
         }
       }

   (``probabilities`` may also be a list in the bundle's class order.) Labels
   must match exactly, probabilities within :data:`PROBABILITY_TOLERANCE`.
3. ``stream``: render a fan-simulator recording (normal and faulty stretches),
   stream it through the real pipeline (:class:`soundwatch.app.Runtime`, file
   source, JSONL sink, in a temporary state directory) in this process, and
   check that the events are well formed and that a fault in the recording
   was reported.

Each step reports its detailed results in :attr:`StepResult.data`, so that
``tools/arm64-check`` can compare an emulated aarch64 run with an x86_64 run.
:func:`collect` and :func:`run_selftest` need neither the command line nor
the process environment; ``soundwatch selftest`` (or ``python -m
soundwatch.selftest``) runs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from soundwatch.bundle import Bundle
    from soundwatch.config import Config

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).parent / "samples"
EXPECTED_FILE = "expected.json"
EVENT_SCHEMA = Path(__file__).parent / "schemas" / "event.schema.json"
# Two steps of an int8 output quantised over [0, 1] (1/256 each).
PROBABILITY_TOLERANCE = 1.0 / 128
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")

# The simulator recording for the stream step: the fault lasts long enough for
# ten 10 s windows to lie wholly inside it, and no longer, because under qemu
# the pipeline runs at about real time.
STREAM_SCHEDULE: tuple[tuple[str, float], ...] = (("normal", 10.0), ("imbalance", 20.0))
STREAM_RATE_HZ = 16000
STREAM_UNIT = 7  # odd: no model trained on it
STREAM_SNR_DB = 10.0
STREAM_SEED = 0

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class StepResult:
    """The outcome of one self-test step."""

    name: str
    status: Status
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "data": dict(self.data),
        }


# --- step 1 -----------------------------------------------------------------------


def check_bundle(bundle_dir: Path | None = None) -> tuple[StepResult, Bundle | None]:
    """Load the bundle and create its interpreter; skip if none is installed."""
    from soundwatch.bundle import DEFAULT_BUNDLE_DIR, BundleError, load_bundle
    from soundwatch.model import Classifier, ModelError
    from soundwatch.native_log import litert_banner_to_log

    root = bundle_dir or DEFAULT_BUNDLE_DIR
    if not (root / "bundle.json").is_file():
        return StepResult(
            "bundle", "skip", f"no model bundle at {root} (bundle.json missing)"
        ), None
    t0 = time.perf_counter()
    try:
        bundle = load_bundle(root)
        litert_banner_to_log(bundle.model_path)  # the runtime's banner goes to logging
        backend = Classifier(bundle).backend
    except (BundleError, ModelError) as e:
        return StepResult("bundle", "fail", str(e), seconds=time.perf_counter() - t0), None
    data = {"model_version": bundle.model_version, "backend": backend, **_versions()}
    detail = f"{bundle.model_version} loaded with {backend}"
    return StepResult("bundle", "pass", detail, data, time.perf_counter() - t0), bundle


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"machine": platform.machine(), "python": platform.python_version()}
    for dist in ("numpy", "ai-edge-litert"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


# --- step 2 -----------------------------------------------------------------------


def read_expected(samples_dir: Path) -> dict[str, dict[str, Any]]:
    """``expected.json`` without its ``_`` keys; raises ValueError if malformed."""
    doc = json.loads((samples_dir / EXPECTED_FILE).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{EXPECTED_FILE} must be an object mapping file names to results")
    out = {}
    for name, entry in doc.items():
        if name.startswith("_"):
            continue
        if not isinstance(entry, dict) or "label" not in entry or "probabilities" not in entry:
            raise ValueError(f"{EXPECTED_FILE}: {name!r} needs 'label' and 'probabilities'")
        out[name] = entry
    return out


def _as_vector(probabilities: Any, class_names: Sequence[str], where: str) -> list[float]:
    if isinstance(probabilities, dict):
        missing = set(class_names) - set(probabilities)
        if missing:
            raise ValueError(f"{where}: probabilities lack {sorted(missing)}")
        return [float(probabilities[c]) for c in class_names]
    if isinstance(probabilities, list) and len(probabilities) == len(class_names):
        return [float(p) for p in probabilities]
    raise ValueError(f"{where}: probabilities must name the {len(class_names)} classes")


def check_samples(bundle: Bundle | None, samples_dir: Path = SAMPLES_DIR) -> StepResult:
    """Classify the sample clips and compare them with the x86 reference."""
    from soundwatch.audio import AudioError
    from soundwatch.classify import ClipClassifier

    if bundle is None:
        return StepResult("samples", "skip", "no bundle to classify with")
    if not (samples_dir / EXPECTED_FILE).is_file():
        return StepResult("samples", "skip", f"no {EXPECTED_FILE} in {samples_dir}")
    t0 = time.perf_counter()
    try:
        expected = read_expected(samples_dir)
    except (OSError, ValueError) as e:
        return StepResult("samples", "fail", f"{samples_dir / EXPECTED_FILE}: {e}")
    if not expected:
        return StepResult("samples", "skip", f"{EXPECTED_FILE} lists no clips")
    classifier = ClipClassifier(bundle)
    results: dict[str, Any] = {}
    problems: list[str] = []
    worst = 0.0
    for name in sorted(expected):
        want = expected[name]
        try:
            got = classifier.classify_source(samples_dir / name)
            want_p = _as_vector(want["probabilities"], got.class_names, name)
        except (AudioError, OSError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        results[name] = {"label": got.label, "probabilities": list(got.probabilities)}
        diff = max(abs(a - b) for a, b in zip(got.probabilities, want_p, strict=True))
        worst = max(worst, diff)
        if got.label != want["label"]:
            problems.append(f"{name}: label {got.label!r}, expected {want['label']!r}")
        if diff > PROBABILITY_TOLERANCE:
            problems.append(
                f"{name}: probabilities differ by up to {diff:.4f} "
                f"(> {PROBABILITY_TOLERANCE:.4f}): got {_fmt(got.probabilities)}, "
                f"expected {_fmt(want_p)}"
            )
    unlisted = sorted(
        p.name
        for p in samples_dir.iterdir()
        if p.suffix in AUDIO_SUFFIXES and p.name not in expected
    )
    data = {"clips": results, "max_probability_diff": round(worst, 6), "unlisted": unlisted}
    seconds = time.perf_counter() - t0
    if problems:
        return StepResult("samples", "fail", "; ".join(problems), data, seconds)
    detail = (
        f"{len(results)} clips: labels match, probabilities within {worst:.4f} "
        f"(tolerance {PROBABILITY_TOLERANCE:.4f})"
    )
    return StepResult("samples", "pass", detail, data, seconds)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# --- step 3 -----------------------------------------------------------------------


def render_stream_recording(path: Path) -> tuple[str, list[str]]:
    """Write the simulator recording for the stream step; returns (description, faults)."""
    import numpy as np
    import soundfile as sf

    from soundwatch.sim import typical_recording

    audio = typical_recording(
        STREAM_UNIT,
        STREAM_SCHEDULE,
        snr_db=STREAM_SNR_DB,
        seed=STREAM_SEED,
        sample_rate_hz=STREAM_RATE_HZ,
    )
    sf.write(str(path), np.asarray(audio, dtype=np.float32), STREAM_RATE_HZ, subtype="FLOAT")
    schedule = ",".join(f"{c}:{s:g}" for c, s in STREAM_SCHEDULE)
    faults = sorted({c for c, _ in STREAM_SCHEDULE if c != "normal"})
    return f"fan simulator unit {STREAM_UNIT}, {schedule}, SNR {STREAM_SNR_DB:g} dB", faults


def _required_event_keys() -> list[str]:
    try:
        doc = json.loads(EVENT_SCHEMA.read_text(encoding="utf-8"))
        return [str(k) for k in doc.get("required", [])]
    except (OSError, ValueError):
        return ["type", "class", "Anomaly", "Probabilities"]


def stream_config(work_dir: Path, wav: Path, bundle: Bundle) -> Config:
    """The config of the stream step: the recording in, JSONL out, state in ``work_dir``.

    Built from defaults alone, never from the environment or a config file: a
    self-test inside a running container must not advance the real event
    sequence, use the real outbox or publish to the real broker or IoT Hub.
    """
    from soundwatch.config import load_config

    return load_config(
        None,
        env={},
        overrides={
            "device_id": "selftest",
            "state_dir": str(work_dir / "state"),
            "model": {"bundle": str(bundle.path)},
            "source": {"type": "file", "path": str(wav), "realtime": False},
            # The step checks the classifier's path; a fresh unit would first
            # learn its own baseline (a day by default) before judging by it.
            "baseline": {"enabled": False},
            "sinks": [{"type": "jsonl", "path": str(work_dir / "events.jsonl")}],
        },
    )


def check_stream(bundle: Bundle | None, work_dir: Path) -> StepResult:
    """Stream a simulator recording through the real pipeline and check its events."""
    if bundle is None:
        return StepResult("stream", "skip", "no bundle to run the pipeline with")
    from soundwatch.app import Runtime

    t0 = time.perf_counter()
    wav = work_dir / "stream.wav"
    try:
        about, faults = render_stream_recording(wav)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        return StepResult("stream", "skip", f"the fan simulator is unavailable: {e}")
    config = stream_config(work_dir, wav, bundle)
    try:
        code = Runtime(config, bundle=bundle).run(threading.Event())
    except Exception as e:  # the step reports what broke; the other steps still count
        logger.exception("selftest stream step failed")
        return StepResult(
            "stream", "fail", f"the pipeline failed: {e}", seconds=time.perf_counter() - t0
        )
    seconds = time.perf_counter() - t0
    if code != 0:
        return StepResult("stream", "fail", f"the pipeline exited {code}", seconds=seconds)
    return _judge_events(work_dir / "events.jsonl", about, faults, seconds)


def _judge_events(path: Path, about: str, faults: list[str], seconds: float) -> StepResult:
    required = _required_event_keys()
    events: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        return StepResult("stream", "fail", f"no events file: {e}", seconds=seconds)
    for n, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not JSON ({e})")
            continue
        if doc.get("type") not in ("anomaly_started", "anomaly_ended"):
            continue  # state lines, if the sink writes them
        missing = [k for k in required if k not in doc]
        if missing:
            problems.append(f"line {n}: {doc.get('type')} lacks {missing}")
        events.append(doc)
    started = [e for e in events if e.get("type") == "anomaly_started"]
    signature = [
        {
            "type": e.get("type"),
            "class": e.get("class"),
            "first_window_index": e.get("first_window_index"),
            "last_window_index": e.get("last_window_index"),
            "decided_stream_s": e.get("decided_stream_s"),
            "probabilities": e.get("Probabilities"),
        }
        for e in events
    ]
    data = {"recording": about, "events": signature}
    if not problems and faults and not any(e.get("class") in faults for e in started):
        problems.append(
            f"no anomaly_started event for the recording's faults {faults} "
            f"({len(started)} started events: {[e.get('class') for e in started]})"
        )
    if problems:
        return StepResult("stream", "fail", "; ".join(problems), data, seconds)
    classes = [str(e.get("class")) for e in started]
    detail = f"{about}: {len(events)} events, anomalies started: {', '.join(classes)}"
    return StepResult("stream", "pass", detail, data, seconds)


# --- the whole test -----------------------------------------------------------------


def collect(
    *,
    bundle_dir: Path | None = None,
    samples_dir: Path = SAMPLES_DIR,
    stream: bool = True,
    work_dir: Path | None = None,
) -> list[StepResult]:
    """Run the steps and return their results (no reporting)."""
    bundle_result, bundle = check_bundle(bundle_dir)
    results = [bundle_result, check_samples(bundle, samples_dir)]
    if not stream:
        return results
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soundwatch-")))
        results.append(check_stream(bundle, work_dir))
    return results


def summarise(results: Sequence[StepResult], *, strict: bool = False) -> int:
    """0 when nothing failed (and, if ``strict``, nothing was skipped), else 1."""
    bad = {"fail", "skip"} if strict else {"fail"}
    return 1 if any(r.status in bad for r in results) else 0


def run_selftest(
    report: Callable[[str], None] = logger.info,
    *,
    bundle_dir: Path | None = None,
    samples_dir: Path = SAMPLES_DIR,
    stream: bool = True,
    strict: bool = False,
) -> int:
    """Run every step, report one line per step; 0 if none failed.

    With ``strict``, a skipped step counts as a failure (use it where the
    bundle and samples must be present, as in the image build).
    """
    results = collect(bundle_dir=bundle_dir, samples_dir=samples_dir, stream=stream)
    for r in results:
        report(f"selftest {r.name}: {r.status.upper()} ({r.seconds:.1f} s): {r.detail}")
    code = summarise(results, strict=strict)
    report(f"selftest: {'ok' if code == 0 else 'FAILED'}")
    return code


if __name__ == "__main__":
    # `python -m soundwatch.selftest ...` is `soundwatch selftest ...` (the image build runs it).
    from soundwatch.cli import main

    sys.exit(main(["selftest", *sys.argv[1:]]))
