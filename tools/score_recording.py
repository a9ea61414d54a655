"""Score ``soundwatch run`` on a long simulated recording against its truth.

    python -m soundwatch.sim recording --out day.wav --unit 7 --snr 6 \\
        --schedule "normal:600,imbalance:60,normal:120,bearing:60,normal:120" --events-per-min 1.5
    python tools/score_recording.py day.wav                 # learn_s 600, a table
    python tools/score_recording.py day.wav --json          # the same as JSON

The recording's ``.json`` sidecar (written by the simulator) holds its
segments. The module runs as a user runs it: ``soundwatch run`` on the file
(``--fast``), a fresh state directory, ``SOUNDWATCH__BASELINE__LEARN_S`` (600
by default), events and states to a JSON Lines file. Then:

* per fault segment: detected or not (an ``anomaly_started`` decided between
  the segment's start and ``--tail`` seconds after its end), the latency from
  the segment's start, and the class named: the one the anomaly settled on
  (an anomaly that starts ``unknown`` takes the classifier's class once it is
  sure, a new event); the classes before it are listed. A fault no class names
  is named right as ``unknown``;
* false alarms: ``anomaly_started`` events decided in a normal stretch more
  than ``--tail`` seconds after the previous fault ended, counted per hour of
  normal running, the learning period included (and said separately).

A bench tool: it prints figures and exits 0 whatever they are (1 only when
the module itself failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NAMED = ("imbalance", "clogging", "voltage_change")


@dataclass
class FaultScore:
    state: str
    start_s: float
    end_s: float
    detected: bool = False
    latency_s: float | None = None
    named: str | None = None
    before: list[str] = field(default_factory=list)

    @property
    def named_right(self) -> bool:
        expected = self.state if self.state in NAMED else "unknown"
        return self.named == expected


@dataclass
class Score:
    recording: str
    learn_s: float
    learned_at_s: float | None
    duration_s: float
    normal_s: float
    faults: list[FaultScore]
    false_alarms: list[dict[str, Any]]
    run_s: float

    @property
    def false_alarms_per_hour(self) -> float:
        return len(self.false_alarms) / (self.normal_s / 3600) if self.normal_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "faults": [{**asdict(f), "named_right": f.named_right} for f in self.faults],
            "false_alarms_per_hour": round(self.false_alarms_per_hour, 3),
        }


def run_module(
    wav: Path, work: Path, learn_s: float, bundle: Path | None, extra_env: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    """``soundwatch run`` on ``wav`` in ``work``; its messages and how long it took."""
    out = work / "messages.jsonl"
    shutil.rmtree(work / "state", ignore_errors=True)  # a fresh unit every time
    out.unlink(missing_ok=True)
    config = work / "score.yaml"
    config.write_text(
        f"state_dir: {json.dumps(str(work / 'state'))}\n"
        "sinks:\n"
        f"  - {{type: jsonl, path: {json.dumps(str(out))}, include_state: true,"
        " max_bytes: 10000000000}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env.update({"SOUNDWATCH__BASELINE__LEARN_S": f"{learn_s:g}", "OPENBLAS_NUM_THREADS": "1"})
    env.update(extra_env)
    argv = [sys.executable, "-m", "soundwatch", "run", "--config", str(config)]
    argv += ["--source", f"file:{wav}", "--fast"]
    if bundle is not None:
        argv += ["--bundle", str(bundle)]
    t0 = time.monotonic()
    with (work / "module.log").open("wb") as log:
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, check=False)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (work / "module.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"soundwatch run exited {proc.returncode}:\n{tail}")
    messages = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return messages, seconds


def score(
    truth: dict[str, Any],
    messages: list[dict[str, Any]],
    *,
    name: str,
    learn_s: float,
    tail_s: float,
    run_s: float,
) -> Score:
    segments = truth["segments"]
    starts = [m for m in messages if m.get("type") == "anomaly_started"]
    learned_at = next(
        (m["stream_end_s"] for m in messages if m.get("type") == "state" and not m.get("learning")),
        None,
    )
    faults: list[FaultScore] = []
    for seg in segments:
        if seg["state"] == "normal":
            continue
        f = FaultScore(seg["state"], seg["start_s"], seg["end_s"])
        inside = [e for e in starts if f.start_s <= e["decided_stream_s"] <= f.end_s + tail_s]
        if inside:
            f.detected = True
            f.latency_s = round(inside[0]["decided_stream_s"] - f.start_s, 1)
            f.named = inside[-1]["class"]
            f.before = [e["class"] for e in inside[:-1]]
        faults.append(f)
    false_alarms = []
    for e in starts:
        t = e["decided_stream_s"]
        seg = next((s for s in segments if s["start_s"] <= t < s["end_s"]), segments[-1])
        if seg["state"] != "normal":
            continue
        previous = [s for s in segments if s["state"] != "normal" and s["end_s"] <= t]
        if previous and t - previous[-1]["end_s"] <= tail_s:
            continue
        false_alarms.append(
            {
                "decided_stream_s": t,
                "class": e["class"],
                "during_learning": learned_at is None or t <= learned_at,
                "novelty": e.get("novelty"),
            }
        )
    normal_s = sum(s["end_s"] - s["start_s"] for s in segments if s["state"] == "normal")
    return Score(
        recording=name,
        learn_s=learn_s,
        learned_at_s=learned_at,
        duration_s=truth["duration_s"],
        normal_s=normal_s,
        faults=faults,
        false_alarms=false_alarms,
        run_s=round(run_s, 1),
    )


def table(s: Score, latency_s: float) -> str:
    lines = [
        f"{s.recording}: {s.duration_s / 60:.1f} min, learn_s {s.learn_s:g}, baseline learned at "
        + (f"stream {s.learned_at_s:.0f} s" if s.learned_at_s is not None else "— (never)")
        + f"; run took {s.run_s:.0f} s",
        "",
        f"{'fault':<16}{'start s':>9}{'detected':>10}{'latency s':>11}  {'named':<28}right",
    ]
    for f in s.faults:
        latency = "" if f.latency_s is None else f"{f.latency_s:.1f}"
        named = " → ".join([*f.before, f.named or "–"])
        lines.append(
            f"{f.state:<16}{f.start_s:>9.0f}{'yes' if f.detected else 'NO':>10}{latency:>11}  "
            f"{named:<28}{'yes' if f.named_right else 'no'}"
        )
    n = len(s.faults)
    detected = sum(f.detected for f in s.faults)
    prompt = sum(f.latency_s is not None and f.latency_s <= latency_s for f in s.faults)
    right = sum(f.named_right for f in s.faults)
    learning = sum(a["during_learning"] for a in s.false_alarms)
    lines += [
        "",
        f"detected {detected}/{n}, within {latency_s:g} s {prompt}/{n}, named right {right}/{n}",
        f"false alarms in normal stretches: {len(s.false_alarms)} in {s.normal_s / 3600:.2f} h "
        f"({s.false_alarms_per_hour:.2f} per hour; {learning} while learning)",
    ]
    for a in s.false_alarms:
        novelty = a["novelty"]
        nov = f" novelty {novelty['score']:.3g}/{novelty['threshold']:.3g}" if novelty else ""
        lines.append(f"  false alarm at stream {a['decided_stream_s']:.0f} s: {a['class']}{nov}")
    return "\n".join(lines)


def plot(truth: dict[str, Any], messages: list[dict[str, Any]], name: str, out: Path) -> None:
    """Novelty over threshold along the recording, its faults shaded, the anomalies marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [m for m in messages if m.get("type") == "state" and m.get("novelty")]
    t = [m["stream_end_s"] / 60 for m in states]
    ratio = [m["novelty"]["score"] / m["novelty"]["threshold"] for m in states]
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=110)
    colours = {"imbalance": "#e69f00", "clogging": "#56b4e9", "voltage_change": "#009e73"}
    for seg in truth["segments"]:
        if seg["state"] != "normal":
            colour = colours.get(seg["state"], "#bbbbbb")
            ax.axvspan(seg["start_s"] / 60, seg["end_s"] / 60, color=colour, alpha=0.35, lw=0)
            ax.text(
                (seg["start_s"] + seg["end_s"]) / 120,
                60,
                seg["state"].replace("_", " "),
                ha="center",
                va="top",
                fontsize=8,
                rotation=90,
            )
    learned = next((m["stream_end_s"] for m in states), None)
    if learned is not None:
        ax.axvspan(0, learned / 60, color="#dddddd", lw=0)
        ax.text(learned / 120, 60, "learning", ha="center", va="top", fontsize=8)
    ax.semilogy(t, ratio, lw=0.6, color="#333333", label="novelty / threshold (each window)")
    ax.axhline(1.0, color="#cc0000", lw=0.8, ls="--", label="threshold")
    for e in messages:
        if e.get("type") == "anomaly_started":
            ax.axvline(e["decided_stream_s"] / 60, color="#cc0000", lw=1.2)
    ax.plot([], [], color="#cc0000", lw=1.2, label="anomaly started")
    ax.set_ylim(0.05, 80)
    ax.set_xlim(0, truth["duration_s"] / 60)
    ax.set_xlabel("stream time (min)")
    ax.set_title(name, fontsize=9)
    ax.legend(loc="center left", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recordings", nargs="+", type=Path, help="WAVs with a .json sidecar")
    parser.add_argument("--learn-s", type=float, default=600.0, help="baseline.learn_s")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: shipped)")
    parser.add_argument("--tail", type=float, default=30.0, help="seconds after a fault's end")
    parser.add_argument("--latency", type=float, default=30.0, help="the latency to report on")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the module")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run's files here")
    parser.add_argument("--json", action="store_true", help="one JSON document per recording")
    parser.add_argument("--plot", type=Path, default=None, help="draw novelty over time (PNG)")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    for wav in args.recordings:
        truth = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
        with tempfile.TemporaryDirectory(prefix="score-") as tmp:
            work = args.keep / wav.stem if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            messages, seconds = run_module(wav, work, args.learn_s, args.bundle, extra)
        result = score(
            truth, messages, name=wav.name, learn_s=args.learn_s, tail_s=args.tail, run_s=seconds
        )
        print(json.dumps(result.to_json()) if args.json else table(result, args.latency))
        if args.plot is not None:
            many = len(args.recordings) > 1
            png = args.plot.with_stem(f"{args.plot.stem}-{wav.stem}") if many else args.plot
            plot(truth, messages, wav.stem, png)
        if not args.json and len(args.recordings) > 1:
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
