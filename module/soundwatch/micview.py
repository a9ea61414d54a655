"""Local mic test mode: a live terminal view for an engineer at the bench.

It shows the input level, per-class probability bars, the current decision,
recent events and warnings (clipping, silence, an odd device rate, an
unhealthy source). :func:`render` is a pure function of a
:class:`MicSnapshot`, so the screen can be tested without a terminal.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

METER_WIDTH = 40
BAR_WIDTH = 30
METER_FLOOR_DBFS = -80.0
TYPICAL_RATES_HZ = (16000, 22050, 32000, 44100, 48000)


@dataclass(frozen=True)
class MicSnapshot:
    """Everything the view shows, gathered from the runtime at one instant."""

    device: str
    device_rate_hz: int
    source_state: str
    source_healthy: bool
    source_detail: str
    overflows: int
    block_peak_dbfs: float
    block_rms_dbfs: float
    state: Mapping[str, Any] | None
    events: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    hop_s: float = 1.0
    recording_dir: str | None = None
    train_rate_hz: int = 16000


def warnings_for(snap: MicSnapshot) -> list[str]:
    """Human warnings about the input, most important first."""
    out = []
    if not snap.source_healthy:
        out.append(f"source {snap.source_state}: {snap.source_detail or 'no audio'}")
    level = (snap.state or {}).get("level") or {}
    if level.get("clipping") or snap.block_peak_dbfs >= -0.1:
        out.append("CLIPPING: input reaches full scale; lower the gain or move the mic away")
    if level.get("silent"):
        out.append(
            "SILENCE: window RMS below the silence threshold; is the mic muted or unplugged?"
        )
    if snap.device_rate_hz and snap.device_rate_hz not in TYPICAL_RATES_HZ:
        out.append(f"unusual device rate {snap.device_rate_hz} Hz (resampled to 22050 Hz)")
    elif snap.device_rate_hz and snap.device_rate_hz < snap.train_rate_hz:
        out.append(
            f"device rate {snap.device_rate_hz} Hz is below the {snap.train_rate_hz} Hz the "
            "model was trained on: its high bands will be empty"
        )
    if snap.overflows:
        out.append(f"{snap.overflows} capture overflow(s): the pipeline fell behind")
    return out


def _meter(dbfs: float, width: int = METER_WIDTH) -> str:
    if not math.isfinite(dbfs):
        dbfs = METER_FLOOR_DBFS
    frac = min(1.0, max(0.0, (dbfs - METER_FLOOR_DBFS) / -METER_FLOOR_DBFS))
    n = round(frac * width)
    return "█" * n + "·" * (width - n)


def _bar(p: float, width: int = BAR_WIDTH) -> str:
    n = round(min(1.0, max(0.0, p)) * width)
    return "█" * n + " " * (width - n)


def event_line(ev: Mapping[str, Any]) -> str:
    """One event for a person: what, which class, how sure, and for an end why and how long."""
    kind = str(ev.get("type", "?")).replace("anomaly_", "")
    line = (
        f"#{ev.get('seq')} {kind} {ev.get('class')} p_max={ev.get('probability_max', 0):.2f} "
        f"(stream {ev.get('stream_start_s', 0):.1f}–{ev.get('stream_end_s', 0):.1f} s)"
    )
    novelty = ev.get("novelty")
    if novelty:
        line += f" novelty {novelty['score']:.3g}/{novelty['threshold']:.3g}"
    if ev.get("type") == "anomaly_ended":
        line += f" {ev.get('reason')} after {ev.get('duration_s', 0):.1f} s"
    return line


def baseline_line(state: Mapping[str, Any] | None) -> str | None:
    """The unit's baseline in a line: ``learning: 7:12 of 10:00``, or the window's novelty.

    ``None`` when the baseline is off (the state has no ``learning`` key).
    """
    if not state or "learning" not in state:
        return None
    learning = state.get("learning")
    if learning:
        from soundwatch.stream_types import LearningProgress

        progress = LearningProgress(learning["learned_s"], learning["learn_s"])
        return (
            f"baseline {progress.describe()} ({100 * progress.fraction:.0f} %); "
            "until then the classifier alone decides, strictly"
        )
    novelty = state.get("novelty")
    if not novelty:
        return f"baseline {state.get('baseline_id')}: novelty – (window not judged)"
    mark = "  ◀ differs" if novelty["score"] > novelty["threshold"] else ""
    return (
        f"baseline {state.get('baseline_id')}: novelty {novelty['score']:.3g} "
        f"(threshold {novelty['threshold']:.3g}){mark}"
    )


def _wrapped(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest) or [first]


def render(snap: MicSnapshot, width: int = 78) -> str:
    """The whole screen as text (no escape codes), no line wider than ``width``."""
    meter = max(10, min(METER_WIDTH, width - 27))
    lines = [
        "soundwatch mic test".ljust(width - 24) + "Ctrl-C to stop".rjust(24),
        f"device: {snap.device or '?'} @ {snap.device_rate_hz or '?'} Hz   "
        f"source: {snap.source_state}",
        "",
        f"level  [{_meter(snap.block_peak_dbfs, meter)}] peak {_db(snap.block_peak_dbfs)} dBFS",
        f"       [{_meter(snap.block_rms_dbfs, meter)}] rms  {_db(snap.block_rms_dbfs)} dBFS",
        "",
    ]
    state = snap.state
    if state is None:
        lines.append(f"collecting the first 10 s window (a new verdict every {snap.hop_s:.3f} s)…")
    elif (state.get("level") or {}).get("silent"):
        # The model still answers for a silent window, but the decision ignores
        # it: bars pointing at a fault class here would only mislead.
        for name in state.get("Probabilities", {}):
            lines.append(f"{name:>15} {'·' * BAR_WIDTH}   –")
        lines.append("")
        lines.extend(
            _wrapped(
                "decision: no verdict, the window is silent (below window.silence_rms_dbfs)"
                + (f"; still active: {state['active_class']}" if state.get("active_class") else ""),
                width,
                "",
                "  ",
            )
        )
    else:
        probs: Mapping[str, float] = state.get("Probabilities", {})
        top = state.get("class")
        for name, p in probs.items():
            mark = "◀" if name == top else " "
            lines.append(f"{name:>15} {_bar(p)} {p:5.2f} {mark}")
        lines.append("")
        active = state.get("active_class")
        verdict = (
            f"ANOMALY: {active}" if active else ("warming up" if state.get("warming_up") else "OK")
        )
        lines.append(
            f"decision: {verdict}   window #{state.get('window_index')} "
            f"({state.get('stream_start_s', 0):.1f}–{state.get('stream_end_s', 0):.1f} s)"
        )
    baseline = baseline_line(state)
    if baseline:
        lines.extend(_wrapped(baseline, width, "", "  "))
    warns = warnings_for(snap)
    lines.append("")
    if warns:
        for w in warns:  # wrapped, never cut: the end of a warning says what to do
            lines.extend(_wrapped(w, width, "! ", "  "))
    else:
        lines.append("input looks fine")
    lines.append("")
    lines.append(
        "recent events:" + (f"  (recording to {snap.recording_dir})" if snap.recording_dir else "")
    )
    if not snap.events:
        lines.append("  none yet")
    for ev in list(snap.events)[:6]:
        lines.extend(_wrapped(event_line(ev), width, "  ", "    "))
    return "\n".join(line[:width] for line in lines)


def _db(value: float) -> str:
    return f"{value:6.1f}" if math.isfinite(value) else "  -inf"
