"""Section "stream": the cost of one 1 s hop, and of `soundwatch run` kept running.

Two parts, one after the other:

1. Per hop, in this process on one core (the runner pins the pools; TF and
   LiteRT get one thread). A long simulated fan signal is fed hop by hop, as the
   pipeline feeds it: soundwatch's incremental path (``ResampleChain`` on
   0.1 s blocks of 48 kHz capture, ``StreamingFeatures.push`` of one hop that
   completes one window, ``Classifier.predict``) against the reference service's path
   recomputing the whole 10 s window at every hop (one-shot
   ``librosa.resample`` of the window, ``librosa.feature.mfcc`` + padding,
   Keras). Hop by hop, in alternating order, so load from elsewhere hits both.
2. Whole processes in real time, started as a user would (no thread pins):
   ``soundwatch run --source simulator`` and a reference-style loop doing the
   same job the naive way (:data:`REFERENCE_LOOP_SCRIPT`), both started together
   and sampled over the same seconds: CPU time from ``/proc/PID/stat``, RSS
   from ``/proc/PID/status``.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from tools.bench.core import Context, Row, Stat, Target, load_average

TARGET_HOP_RATIO = Target(on="ratio", op=">=", value=50.0)
TARGET_CPU = Target(on="soundwatch", op="<", value=3.0, unit="%")
TARGET_RSS = Target(on="soundwatch", op="<", value=100.0, unit="MB")

CAPTURE_RATE_HZ = 48000  # the simulator's (and a typical USB microphone's) rate
CAPTURE_BLOCK_S = 0.1  # the simulator source's block size
HOP_S_NOMINAL = 1.0
SIGNAL_CLIP_S = 30.0  # simulator audio made once and tiled; content does not change the cost
CPU_WINDOW_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The reference service's way of streaming: every hop, take the last 10 s of capture and do
# what prediction.py did for a file. Arguments: model path, audio .npy at the
# capture rate, the resampling rates "48000,22050" (one-shot librosa.resample
# per step), hop in seconds. Prints "ready" after two warm-up steps, then one
# line per step: the work time in ms and how late the step started. Only
# numpy, librosa and Keras are imported, as in the reference service.
REFERENCE_LOOP_SCRIPT = """\
import sys, time
import numpy as np
import librosa
from tensorflow import keras
model = keras.models.load_model(sys.argv[1])
audio = np.load(sys.argv[2])
rates = [int(r) for r in sys.argv[3].split(",")]
hop_s = float(sys.argv[4])
window = 10 * rates[0]
step = round(hop_s * rates[0])
span = audio.shape[0] - window

def once(k):
    start = (k * step) % span
    y = audio[start : start + window]
    for a, b in zip(rates, rates[1:]):
        y = librosa.resample(y, orig_sr=a, target_sr=b)
    mfcc = librosa.feature.mfcc(y=y, sr=rates[-1], n_mfcc=40)
    mfcc = np.pad(mfcc, ((0, 0), (0, 2)))
    x = np.zeros((40, 433), dtype=np.float32)
    x[:, : min(433, mfcc.shape[1])] = mfcc[:, :433]
    return np.asarray(model(x[None, :, :, None], training=False))[0]

once(0)
once(1)
print("ready", flush=True)
t0 = time.monotonic()
k = 0
while True:
    due = t0 + k * hop_s
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    late = max(0.0, time.monotonic() - due)
    w0 = time.perf_counter()
    once(k + 2)
    print(f"{(time.perf_counter() - w0) * 1e3:.3f} {late * 1e3:.3f}", flush=True)
    k += 1
"""


# --------------------------------------------------------------------------- #
# Part 1: per hop, one core
# --------------------------------------------------------------------------- #


def _capture_signal(seconds: float) -> np.ndarray:
    """At least ``seconds`` of 48 kHz fan sound (the simulator, one clip tiled)."""
    from soundwatch.sim import typical_clip

    clip = typical_clip(
        7, "normal", 6.0, seed=0, duration_s=SIGNAL_CLIP_S, sample_rate_hz=CAPTURE_RATE_HZ
    )
    reps = int(np.ceil(seconds / SIGNAL_CLIP_S))
    return np.tile(np.asarray(clip, dtype=np.float32), reps)


def _chain_rates(spec: Any) -> list[int]:
    """The rates ``soundwatch.app.ResampleChain`` passes through from the capture rate."""
    via = spec.via_rate_hz(CAPTURE_RATE_HZ)
    return [CAPTURE_RATE_HZ, *([via] if via else []), spec.sample_rate_hz]


def _per_hop(ctx: Context) -> tuple[list[Row], np.ndarray, list[int], float]:
    """Part 1; also the capture signal, the rates and the hop in s for part 2's reference loop."""
    from tools.bench.reference_service import (
        REFERENCE_N_MFCC,
        REFERENCE_SR_HZ,
        load_reference_model,
        pin_tf_threads,
        reference_call,
        reference_fit_frames,
        reference_predict,
    )

    pin_tf_threads(1)
    import librosa

    from soundwatch.app import ResampleChain
    from soundwatch.audio import resample
    from soundwatch.baseline import CV_BLOCKS, LAYOUT, Baseline, embedding, fit
    from soundwatch.bundle import load_bundle
    from soundwatch.features import FeatureExtractor
    from soundwatch.model import Classifier
    from soundwatch.stream_types import AudioBlock
    from soundwatch.windowing import StreamingFeatures

    fx = ctx.fixtures
    bundle = load_bundle(fx.bundle_dir)
    spec = bundle.spec
    if spec.sample_rate_hz != REFERENCE_SR_HZ:
        print(f"  stream: bundle rate {spec.sample_rate_hz} Hz", file=sys.stderr)
    classifier = Classifier(bundle, threads=1)
    model = load_reference_model(fx.reference_model)
    rates = _chain_rates(spec)
    rate = spec.sample_rate_hz

    streaming = StreamingFeatures(FeatureExtractor(spec), hop_frames=43)
    hop = streaming.hop_samples  # 22016 at 22.05 kHz: 0.998 s
    window = streaming.window_samples
    fill_hops = -(-window // hop)  # pushes until the first window
    warm_hops = 3
    hops = ctx.reps(150, 24)
    total_hops = fill_hops + warm_hops + hops
    capture = _capture_signal(total_hops * HOP_S_NOMINAL + 12.0)

    # The model-rate stream as the pipeline sees it (one-shot, bit-exact with streaming).
    y = capture
    for a, b in itertools.pairwise(rates):
        y = resample(y, a, b)

    chain = ResampleChain(CAPTURE_RATE_HZ, spec)
    cap_hop = round(HOP_S_NOMINAL * CAPTURE_RATE_HZ)
    cap_block = round(CAPTURE_BLOCK_S * CAPTURE_RATE_HZ)
    cap_window = 10 * CAPTURE_RATE_HZ

    def reference_window_features(w: np.ndarray) -> np.ndarray:
        mfcc = librosa.feature.mfcc(y=w, sr=rate, n_mfcc=REFERENCE_N_MFCC)
        return reference_fit_frames(mfcc)[None, :, :, None]

    def reference_resample(w: np.ndarray) -> np.ndarray:
        for a, b in itertools.pairwise(rates):
            w = librosa.resample(w, orig_sr=a, target_sr=b)
        return w

    t: dict[str, list[float]] = {
        k: [] for k in ("sw_resample", "sw_push", "sw_predict", "s_resample", "s_mfcc")
    }
    t |= {"s_predict": [], "s_call": [], "sw_baseline": []}
    unit: list[Baseline] = []  # the baseline, fitted at the first window

    def soundwatch_hop(k: int, record: bool) -> None:
        c0 = k * cap_hop
        t0 = time.perf_counter()
        for a in range(c0, c0 + cap_hop, cap_block):
            chain.process(AudioBlock(capture[a : a + cap_block], a, CAPTURE_RATE_HZ))
        t1 = time.perf_counter()
        windows = streaming.push(AudioBlock(y[k * hop : (k + 1) * hop], k * hop, rate))
        t2 = time.perf_counter()
        for win in windows:
            classifier.predict(win.features)
        t3 = time.perf_counter()
        for win in windows:
            emb = embedding(win.features)
            if not unit:  # a baseline to score against (its content does not change the cost)
                noise = np.random.default_rng(k).normal(0, 0.1, (3 * CV_BLOCKS, emb.size))
                unit.append(fit((emb + noise).astype(np.float32), LAYOUT, "bench"))
            unit[0].novelty(emb)
        t4 = time.perf_counter()
        if record:
            if len(windows) != 1:
                raise RuntimeError(f"hop {k}: {len(windows)} windows, expected exactly 1")
            t["sw_resample"].append((t1 - t0) * 1e3)
            t["sw_push"].append((t2 - t1) * 1e3)
            t["sw_predict"].append((t3 - t2) * 1e3)
            t["sw_baseline"].append((t4 - t3) * 1e3)

    def reference_hop(k: int, record: bool) -> None:
        end = (k + 1) * hop  # the window soundwatch completed at this hop ends here
        cap_end = (k + 1) * cap_hop
        w48 = capture[cap_end - cap_window : cap_end]
        w = y[end - window : end]
        t0 = time.perf_counter()
        reference_resample(w48)
        t1 = time.perf_counter()
        x = reference_window_features(w)
        t2 = time.perf_counter()
        reference_predict(model, x)
        t3 = time.perf_counter()
        reference_call(model, x)
        t4 = time.perf_counter()
        if record:
            t["s_resample"].append((t1 - t0) * 1e3)
            t["s_mfcc"].append((t2 - t1) * 1e3)
            t["s_predict"].append((t3 - t2) * 1e3)
            t["s_call"].append((t4 - t3) * 1e3)

    for k in range(fill_hops + warm_hops):  # fill the first window; first-call costs
        soundwatch_hop(k, record=False)
        if k >= fill_hops - 1:
            reference_hop(k, record=False)
    for k in range(fill_hops + warm_hops, total_hops):
        if k % 2 == 0:
            soundwatch_hop(k, record=True)
            reference_hop(k, record=True)
        else:
            reference_hop(k, record=True)
            soundwatch_hop(k, record=True)

    def add(*keys: str) -> list[float]:
        return [float(sum(v)) for v in zip(*(t[k] for k in keys), strict=True)]

    rate_text = " -> ".join(f"{r / 1000:g}" for r in rates) + " kHz"
    hop_text = f"{hop} samples = {hop / rate:.3f} s"
    extra = {"hops": hops, "hop_samples": hop, "rates_hz": rates, "window_samples": window}
    rows = [
        Row(
            "resample per hop: 1 s of 48 kHz capture",
            "ms",
            Stat.of(t["s_resample"]),
            Stat.of(t["sw_resample"]),
            f"soundwatch: soundwatch.app.ResampleChain ({rate_text}, soxr HQ streams) on ten "
            "0.1 s blocks (the simulator's block size) = 1 s of new capture per hop; reference: "
            f"one-shot librosa.resample (soxr_hq, {rate_text}) of the whole last 10 s "
            "window at each hop, as a window-at-a-time implementation of librosa.load does",
        ),
        Row(
            "features per hop: incremental vs whole window",
            "ms",
            Stat.of(t["s_mfcc"]),
            Stat.of(t["sw_push"]),
            "soundwatch: StreamingFeatures(FeatureExtractor(spec), hop_frames=43)."
            f"push(one hop of {hop_text}) that completes one window: 43 new log-mel frames, "
            "the 4 edge frames, top_db clip, DCT, padding and the window's level; reference: "
            "librosa.feature.mfcc(y=last 10 s, sr=22050, n_mfcc=40) + pad 2 + fit to 433. "
            f"{hops} hops of a long simulated fan signal, alternating order, one core",
            TARGET_HOP_RATIO,
            extra,
        ),
        Row(
            "features + inference per hop (reference with predict)",
            "ms",
            Stat.of(add("s_mfcc", "s_predict")),
            Stat.of(add("sw_push", "sw_predict")),
            "as above plus, per hop, soundwatch: Classifier.predict(window) (LiteRT int8, "
            "1 thread); reference: Keras model.predict(x) of its CNN (TF pools 1); "
            "summed per hop",
            TARGET_HOP_RATIO,
        ),
        Row(
            "features + inference per hop (reference with model(x))",
            "ms",
            Stat.of(add("s_mfcc", "s_call")),
            Stat.of(add("sw_push", "sw_predict")),
            "as above, with the direct Keras call model(x, training=False) in the reference path",
        ),
        Row(
            "whole hop: resample + features + inference",
            "ms",
            Stat.of(add("s_resample", "s_mfcc", "s_predict")),
            Stat.of(add("sw_resample", "sw_push", "sw_predict")),
            "rows 1 + 3 summed per hop: everything done per 1 s hop from 48 kHz capture to "
            "class probabilities (reference with model.predict)",
            TARGET_HOP_RATIO,
        ),
        Row(
            "whole hop with the per-unit baseline",
            "ms",
            Stat.of(add("s_resample", "s_mfcc", "s_predict")),
            Stat.of(add("sw_resample", "sw_push", "sw_predict", "sw_baseline")),
            "the row above plus, for soundwatch, the baseline's embedding (robust spectrum "
            "and physics) and novelty of the window, on by default; the reference service "
            "has no baseline",
            TARGET_HOP_RATIO,
        ),
    ]
    return rows, capture[: int((SIGNAL_CLIP_S + 1) * CAPTURE_RATE_HZ)], rates, hop / rate


# --------------------------------------------------------------------------- #
# Part 2: whole processes in real time
# --------------------------------------------------------------------------- #


class ChildDied(RuntimeError):
    """A measured process exited before the end of its sampling."""


@dataclass
class Sampled:
    """CPU and RSS samples of one process over the measured seconds."""

    cpu_windows_pct: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0  # VmHWM since the process started, warm-up included
    rss_at_start_mb: float = 0.0
    error: str | None = None

    @property
    def mean_cpu_pct(self) -> float:
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s > 0 else float("nan")


class Proc:
    """One measured child: its /proc figures and its output files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.out_path = tmp / f"{name}.stdout"
        self.err_path = tmp / f"{name}.stderr"
        self._out: IO[bytes] = self.out_path.open("wb")
        self._err: IO[bytes] = self.err_path.open("wb")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env
        )
        self.started = time.monotonic()
        self.sampled = Sampled()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        """utime + stime of every thread of the process, in seconds."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        values: dict[str, float] = {}
        with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024.0
        return values["VmRSS"], values["VmHWM"]

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ChildDied(f"{self.name} exited {self.popen.returncode}:\n{self.stderr_tail()}")

    def stdout_lines(self) -> list[str]:
        self._out.flush()
        return self.out_path.read_text(errors="replace").splitlines()

    def stderr_tail(self, chars: int = 2000) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; only this child, by its pid."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        self._err.close()


def _wait_ready(proc: Proc, deadline: float) -> None:
    """Until the child has printed "ready" (the reference service loop after its warm-up)."""
    while time.monotonic() < deadline:
        proc.check_alive()
        if "ready" in proc.stdout_lines()[:1]:
            return
        select.select([], [], [], 0.2)
    raise ChildDied(f"{proc.name} not ready after its start-up allowance:\n{proc.stderr_tail()}")


def _sample(procs: list[Proc], seconds: float) -> None:
    """Sample every process each second for ``seconds``; CPU % per 5 s window."""
    live = [p for p in procs if p.sampled.error is None]
    first: dict[str, tuple[float, float]] = {}
    marks: dict[str, tuple[float, float]] = {}
    for p in live:
        try:
            now, cpu = time.monotonic(), p.cpu_s()
            p.sampled.rss_at_start_mb = p.memory_mb()[0]
        except (OSError, KeyError, IndexError):
            p.sampled.error = f"{p.name} vanished:\n{p.stderr_tail()}"
            continue
        first[p.name] = marks[p.name] = (now, cpu)
    t0 = time.monotonic()
    tick = 1
    while True:
        due = t0 + tick
        time.sleep(max(0.0, due - time.monotonic()))
        for p in live:
            if p.sampled.error is not None:
                continue
            try:
                p.check_alive()
                now, cpu = time.monotonic(), p.cpu_s()
                rss, hwm = p.memory_mb()
            except (ChildDied, OSError, KeyError, IndexError) as e:
                p.sampled.error = str(e) if isinstance(e, ChildDied) else p.stderr_tail()
                continue
            p.sampled.rss_mb.append(rss)
            p.sampled.peak_rss_mb = hwm
            w_start, c_start = marks[p.name]
            if now - w_start >= CPU_WINDOW_S - 0.5:
                p.sampled.cpu_windows_pct.append(100.0 * (cpu - c_start) / (now - w_start))
                marks[p.name] = (now, cpu)
            f_wall, f_cpu = first[p.name]
            p.sampled.wall_s, p.sampled.cpu_s = now - f_wall, cpu - f_cpu
        if tick >= seconds:
            return
        tick += 1


def _sustained(ctx: Context, capture: np.ndarray, rates: list[int], hop_s: float) -> list[Row]:
    fx = ctx.fixtures
    warmup_s = ctx.reps(15, 12)
    measure_s = ctx.reps(60, 20)
    env = dict(ctx.user_env)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    script = Path(ctx.python).parent / "soundwatch"
    cli = [str(script)] if script.is_file() else [ctx.python, "-m", "soundwatch"]
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp_name:
        tmp = Path(tmp_name)
        audio = tmp / "capture48k.npy"
        np.save(audio, capture)
        events = tmp / "ev.jsonl"
        sw_argv = [*cli, "run", "--source", "simulator", "--sink", f"jsonl:{events}"]
        sw_argv += ["--state-dir", str(tmp / "state"), "--bundle", str(fx.bundle_dir)]
        # The same pipeline on a recording of the same kind of audio, paced at real
        # time: what the module costs without the simulator rendering audio for it.
        import soundfile as sf

        recording = tmp / "capture48k.wav"
        sf.write(recording, capture, CAPTURE_RATE_HZ, subtype="PCM_16")
        file_config = tmp / "file.yaml"
        file_config.write_text(
            f"source: {{type: file, path: {recording}, realtime: true, loop: true}}\n",
            encoding="utf-8",
        )
        file_argv = [
            *cli,
            "run",
            "--config",
            str(file_config),
            "--sink",
            f"jsonl:{tmp / 'ev-file.jsonl'}",
        ]
        file_argv += ["--state-dir", str(tmp / "state-file"), "--bundle", str(fx.bundle_dir)]
        reference_argv = [
            ctx.python,
            "-c",
            REFERENCE_LOOP_SCRIPT,
            str(fx.reference_model),
            str(audio),
        ]
        reference_argv += [",".join(str(r) for r in rates), f"{hop_s:.6f}"]
        procs: list[Proc] = []
        try:
            sw = Proc("soundwatch-run", sw_argv, env, tmp)
            procs.append(sw)
            from_file = Proc("soundwatch-run-file", file_argv, env, tmp)
            procs.append(from_file)
            reference = Proc("reference-loop", reference_argv, env, tmp)
            procs.append(reference)
            try:
                _wait_ready(reference, time.monotonic() + 90)
            except ChildDied as e:
                reference.sampled.error = str(e)
            # The soundwatch child fills its first 10 s window before any inference.
            while time.monotonic() < sw.started + warmup_s:
                time.sleep(0.2)
            for p in procs:
                try:
                    p.check_alive()
                except ChildDied as e:
                    p.sampled.error = str(e)
            print(f"  stream: sampling {measure_s} s …", file=sys.stderr, flush=True)
            load_start = load_average()
            _sample(procs, measure_s)
            load_end = load_average()
            sw_events = _count_lines(events)
            reference_steps = [line.split() for line in reference.stdout_lines()[1:]]
        finally:
            for p in procs:
                p.stop()
        for p in procs:
            if p.sampled.error:
                print(f"  stream: {p.sampled.error}", file=sys.stderr, flush=True)
    return _sustained_rows(
        sw.sampled,
        from_file.sampled,
        reference.sampled,
        warmup_s,
        measure_s,
        load_start,
        load_end,
        sw_events,
        reference_steps,
        rates,
    )


def _count_lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except OSError:
        return 0


def _stat_or_none(values: list[float], s: Sampled) -> Stat | None:
    return Stat.of(values) if values and s.error is None else None


def _sustained_rows(
    sw: Sampled,
    from_file: Sampled,
    reference: Sampled,
    warmup_s: float,
    measure_s: float,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
    sw_events: int,
    reference_steps: list[list[str]],
    rates: list[int],
) -> list[Row]:
    def one(value: float, s: Sampled) -> Stat | None:
        return Stat.of([value]) if s.error is None and s.wall_s > 0 else None

    work = [float(parts[0]) for parts in reference_steps if len(parts) == 2]
    late = [float(parts[1]) for parts in reference_steps if len(parts) == 2]
    failed = "".join(
        f" FAILED: {_summary(s.error)} (stderr tail printed above and in build/bench.json)."
        for s in (sw, from_file, reference)
        if s.error
    )
    reference_text = (
        f"reference: a `python -c` loop (REFERENCE_LOOP_SCRIPT in tools/bench/stream.py) that "
        f"every hop takes the last 10 s of simulated capture at 48 kHz (made ahead), "
        f"librosa.resample ({' -> '.join(str(r) for r in rates)} Hz), librosa mfcc + pad, "
        f"Keras model(x) of the reference service's CNN"
    )
    if work:
        reference_text += (
            f"; its work per step was median {np.median(work):.1f} ms "
            f"(p95 {np.percentile(work, 95):.1f}), started late by median "
            f"{np.median(late):.1f} ms"
        )
    common = (
        f"After a {warmup_s:g} s warm-up (the first window fills at 10 s; the reference loop "
        f"after its imports and two warm-up steps), both processes sampled every 1 s over the "
        f"same {measure_s:g} s, started as a user would (no thread pins); load average "
        f"{load_start[0]} at the start, {load_end[0]} at the end."
    )
    extra = {
        "soundwatch": {**sw.__dict__, "mean_cpu_pct": sw.mean_cpu_pct, "events": sw_events},
        "soundwatch_file": {**from_file.__dict__, "mean_cpu_pct": from_file.mean_cpu_pct},
        "reference": {
            **reference.__dict__,
            "mean_cpu_pct": reference.mean_cpu_pct,
            "steps": len(work),
        },
        "load_start": load_start,
        "load_end": load_end,
    }
    return [
        Row(
            "`soundwatch run` in real time: CPU, % of one core",
            "%",
            one(reference.mean_cpu_pct, reference),
            one(sw.mean_cpu_pct, sw),
            "mean over the whole sampling: (utime + stime of all threads, /proc/PID/stat) / "
            "wall time. soundwatch: `soundwatch run --source simulator --sink jsonl:… "
            "--state-dir … --bundle …` (realtime simulator at 48 kHz, default schedule, 1 s "
            f"hop; it wrote {sw_events} anomaly events to the JSONL sink); "
            + reference_text
            + ". "
            + common
            + failed,
            TARGET_CPU,
            extra,
        ),
        Row(
            "the same, CPU % per 5 s",
            "%",
            _stat_or_none(reference.cpu_windows_pct, reference),
            _stat_or_none(sw.cpu_windows_pct, sw),
            "the CPU % of consecutive 5 s stretches of the same sampling (median and p95)",
        ),
        Row(
            "the same, RSS while streaming",
            "MB",
            _stat_or_none(reference.rss_mb, reference),
            _stat_or_none(sw.rss_mb, sw),
            f"VmRSS (/proc/PID/status) each second, MiB; means: reference "
            f"{_mean(reference.rss_mb)}, soundwatch {_mean(sw.rss_mb)}",
            TARGET_RSS,
        ),
        Row(
            "the same, peak RSS",
            "MB",
            one(reference.peak_rss_mb, reference),
            one(sw.peak_rss_mb, sw),
            "VmHWM at the end of the sampling: the highest RSS since the process started, "
            "warm-up included (the simulator renders audio ahead of the stream)",
            TARGET_RSS,
        ),
        Row(
            "`soundwatch run` from a recording in real time: CPU, % of one core",
            "%",
            one(reference.mean_cpu_pct, reference),
            one(from_file.mean_cpu_pct, from_file),
            "as the first run row, sampled over the same seconds, with soundwatch reading the "
            "same kind of simulated capture from a 48 kHz WAV file paced at real time "
            "(`source: {type: file, realtime: true, loop: true}`): the pipeline "
            "(resampling, features, inference, the per-unit baseline learning, decisions) "
            "without the simulator rendering audio in the same process",
            TARGET_CPU,
        ),
        Row(
            "the same, RSS while streaming from a recording",
            "MB",
            _stat_or_none(reference.rss_mb, reference),
            _stat_or_none(from_file.rss_mb, from_file),
            f"VmRSS each second, MiB; mean soundwatch {_mean(from_file.rss_mb)}",
            TARGET_RSS,
        ),
    ]


def _summary(error: str) -> str:
    """The first line of an error and the last line of the stderr tail under it."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "?"
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def _mean(values: list[float]) -> str:
    return f"{float(np.mean(values)):.1f} MB" if values else "n/a"


def run(ctx: Context) -> list[Row]:
    hop_rows, capture, rates, hop_s = _per_hop(ctx)
    return hop_rows + _sustained(ctx, capture, rates, hop_s)
