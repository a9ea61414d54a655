"""The decision stage on scripted probability sequences (no model)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from soundwatch.config import DecisionConfig
from soundwatch.decision import (
    AnomalyEnded,
    AnomalyStarted,
    DecisionConfigError,
    DecisionOutput,
    DecisionState,
    ModelClasses,
    WindowResult,
    WindowState,
    class_thresholds,
)
from soundwatch.stream_types import Level

CLASSES = ("normal", "imbalance", "clogging", "voltage_change")
LOUD = Level(rms_dbfs=-20.0, peak_dbfs=-6.0, clipping=False, silent=False)
SILENT = Level(rms_dbfs=-90.0, peak_dbfs=-80.0, clipping=False, silent=True)
T0 = 1_700_000_000.0  # wall clock of stream time 0
WINDOW_S = 10.0
HOP_S = 1.0


def probs(**faults: float) -> tuple[float, ...]:
    """Probabilities in CLASSES order; whatever the faults leave goes to normal."""
    values = [faults.get(c, 0.0) for c in CLASSES]
    values[0] = max(0.0, 1.0 - sum(values[1:]))
    return tuple(values)


def window(
    index: int, p: tuple[float, ...], level: Level = LOUD, *, wall: bool = True
) -> WindowResult:
    start = index * HOP_S
    end = start + WINDOW_S
    return WindowResult(
        index=index,
        start_s=start,
        end_s=end,
        probabilities=p,
        level=level,
        captured_at=T0 + end if wall else None,
    )


Setup = tuple[DecisionConfig, ModelClasses]


def config(
    *,
    class_names: tuple[str, ...] = CLASSES,
    normal_class: str = "normal",
    default_on_threshold: float = 0.7,
    default_off_threshold: float = 0.4,
    on_threshold: dict[str, float] | None = None,
    off_threshold: dict[str, float] | None = None,
    **settings: object,
) -> Setup:
    """The decision settings (every fault class's thresholds spelled out) and the classes."""
    classes = ModelClasses(class_names, normal_class, {})
    on, off = on_threshold or {}, off_threshold or {}
    thresholds = {
        c: {"on": on.get(c, default_on_threshold), "off": off.get(c, default_off_threshold)}
        for c in (*classes.fault_classes, *on, *off)
    }
    base: dict[str, object] = dict(
        thresholds=thresholds, confirm_k=3, confirm_n=5, cooldown_s=0.0, warmup_windows=0
    )
    base.update(settings)
    return DecisionConfig.model_validate(base), classes


class Runner:
    """Feeds windows with consecutive indices and collects the outputs."""

    def __init__(self, setup: Setup) -> None:
        ids = (f"anomaly-{i}" for i in itertools.count(1))
        self.state = DecisionState(*setup, new_anomaly_id=lambda: next(ids))
        self.index = 0
        self.outputs: list[DecisionOutput] = []

    def feed(self, ps: Iterable[tuple[float, ...]], level: Level = LOUD) -> list[DecisionOutput]:
        out: list[DecisionOutput] = []
        for p in ps:
            step = self.state.update(window(self.index, p, level))
            # Exactly one state output per window, always last.
            assert isinstance(step[-1], WindowState)
            assert step[-1].window.index == self.index
            assert not any(isinstance(o, WindowState) for o in step[:-1])
            out.extend(step)
            self.index += 1
        self.outputs.extend(out)
        return out


def reports(outputs: Sequence[DecisionOutput]) -> list[AnomalyStarted | AnomalyEnded]:
    return [o for o in outputs if isinstance(o, AnomalyStarted | AnomalyEnded)]


def states(outputs: Sequence[DecisionOutput]) -> list[WindowState]:
    return [o for o in outputs if isinstance(o, WindowState)]


def test_start_and_end_are_exact() -> None:
    run = Runner(config())
    imb = [0.9, 0.8, 0.95, 0.85, 0.9]
    run.feed([probs(imbalance=0.1)] * 3)  # windows 0-2
    run.feed([probs(imbalance=p) for p in imb])  # windows 3-7
    run.feed([probs(imbalance=0.1)] * 6)  # windows 8-13

    events = reports(run.outputs)
    assert [type(e) for e in events] == [AnomalyStarted, AnomalyEnded]
    started, ended = events
    assert isinstance(ended, AnomalyEnded)

    # Confirmed at window 5 (3 of windows 1-5 voted), backdated to window 3.
    assert started.class_name == "imbalance"
    assert started.anomaly_id == "anomaly-1"
    assert (started.first_window_index, started.last_window_index) == (3, 5)
    assert (started.stream_start_s, started.stream_end_s) == (3.0, 15.0)
    assert started.decided_stream_s == 15.0
    assert started.wall_start == T0 + 3.0
    assert started.wall_end == T0 + 15.0
    assert started.window_count == 3
    assert started.probability_max == pytest.approx(0.95)
    assert started.probability_mean == pytest.approx(sum(imb[:3]) / 3)
    assert started.mean_probabilities[1] == pytest.approx(started.probability_mean)
    assert started.mean_probabilities[0] == pytest.approx(1 - sum(imb[:3]) / 3)

    # Present in windows 3-7; at window 10 only 2 of windows 6-10 are present.
    assert ended.anomaly_id == started.anomaly_id
    assert ended.reason == "cleared"
    assert (ended.first_window_index, ended.last_window_index) == (3, 7)
    assert (ended.stream_start_s, ended.stream_end_s) == (3.0, 17.0)
    assert ended.duration_s == 14.0
    assert ended.decided_stream_s == 20.0
    assert ended.window_count == 5
    assert ended.probability_max == pytest.approx(0.95)
    assert ended.probability_mean == pytest.approx(sum(imb) / 5)
    assert ended.level == LOUD

    # Which window produced what.
    at = {s.window.index: (s.vote, s.active_class, s.anomaly_id) for s in states(run.outputs)}
    assert at[2] == (None, None, None)
    assert at[4] == ("imbalance", None, None)
    assert at[5] == ("imbalance", "imbalance", "anomaly-1")
    assert at[9] == (None, "imbalance", "anomaly-1")
    assert at[10] == (None, None, None)
    assert states(run.outputs)[0].top_class == "normal"
    assert states(run.outputs)[4].top_class == "imbalance"


def test_span_keeps_inner_dips_and_drops_trailing_absence() -> None:
    run = Runner(config())
    run.feed([probs(clogging=p) for p in (0.9, 0.9, 0.9, 0.2, 0.8, 0.5)])
    run.feed([probs(clogging=0.05)] * 6)
    started, ended = reports(run.outputs)
    assert isinstance(ended, AnomalyEnded)
    # The dip at window 3 lies between present windows, so it is in the span;
    # the trailing windows 6+ are not.
    assert (ended.first_window_index, ended.last_window_index) == (0, 5)
    assert ended.window_count == 6
    assert ended.probability_mean == pytest.approx((0.9 * 3 + 0.2 + 0.8 + 0.5) / 6)
    assert started.window_count == 3


def test_k_of_n_rejects_isolated_spikes() -> None:
    run = Runner(config())
    # A spike every third window: never 3 votes within 5 windows.
    pattern = [probs(imbalance=0.99), probs(imbalance=0.1), probs(imbalance=0.1)]
    run.feed(pattern * 20)
    # Two spikes in a row, then quiet.
    run.feed([probs(voltage_change=0.99)] * 2 + [probs()] * 5)
    assert reports(run.outputs) == []
    assert sum(s.vote is not None for s in states(run.outputs)) == 22


def test_hysteresis_prevents_flapping() -> None:
    flapping = [probs(imbalance=p) for p in [0.75, 0.65] * 20]
    # One threshold (off == on) and no confirmation: every crossing is an event.
    single = Runner(config(default_off_threshold=0.7, confirm_k=1, confirm_n=1))
    single.feed(flapping)
    assert len(reports(single.outputs)) == 40
    # Separate off threshold: one anomaly, which ends only below 0.4.
    hyst = Runner(config(default_off_threshold=0.4, confirm_k=1, confirm_n=1))
    hyst.feed(flapping)
    assert [type(e) for e in reports(hyst.outputs)] == [AnomalyStarted]
    hyst.feed([probs(imbalance=0.45)] * 3)
    assert len(reports(hyst.outputs)) == 1
    hyst.feed([probs(imbalance=0.39)])
    ended = reports(hyst.outputs)[-1]
    assert isinstance(ended, AnomalyEnded)
    assert ended.last_window_index == 42
    assert ended.window_count == 43


def test_cooldown_suppresses_a_restart_of_the_same_class_only() -> None:
    run = Runner(config(confirm_k=1, confirm_n=1, cooldown_s=20.0))
    run.feed([probs(imbalance=0.9), probs(imbalance=0.1)])  # start at 0, end decided at 11 s
    run.feed([probs(imbalance=0.9)] * 25)  # windows 2-26
    events = reports(run.outputs)
    assert [type(e) for e in events] == [AnomalyStarted, AnomalyEnded, AnomalyStarted]
    # Window i ends at i + 10 s; the cooldown lasts until 11 + 20 = 31 s.
    assert events[2].first_window_index == 21
    assert events[2].decided_stream_s == 31.0
    # Votes were shown throughout the cooldown.
    assert all(s.vote == "imbalance" for s in states(run.outputs)[2:])
    # Another class is not held back by imbalance's cooldown.
    other = Runner(config(confirm_k=1, confirm_n=1, cooldown_s=20.0))
    other.feed([probs(imbalance=0.9), probs(imbalance=0.1), probs(clogging=0.9)])
    assert [e.class_name for e in reports(other.outputs)] == ["imbalance", "imbalance", "clogging"]


def test_warmup_windows_never_start_and_do_not_vote() -> None:
    run = Runner(config(warmup_windows=4))
    run.feed([probs(imbalance=0.95)] * 8)
    started = reports(run.outputs)
    assert len(started) == 1
    # Windows 0-3 are warm-up; 4, 5, 6 vote.
    assert started[0].first_window_index == 4
    assert started[0].decided_stream_s == window(6, probs()).end_s
    warm = [s.window.index for s in states(run.outputs) if s.warming_up]
    assert warm == [0, 1, 2, 3]
    assert all(s.vote is None for s in states(run.outputs)[:4])
    # After a reset the warm-up starts again.
    ended = run.state.reset()
    assert [e.reason for e in ended] == ["reset"]
    assert run.state.current.warming_up
    out = run.feed([probs(imbalance=0.95)] * 6)
    assert [s.warming_up for s in states(out)] == [True] * 4 + [False] * 2
    assert reports(out) == []


def test_silent_windows_never_start_an_anomaly() -> None:
    run = Runner(config())
    run.feed([probs(imbalance=0.99)] * 10, level=SILENT)
    assert reports(run.outputs) == []
    assert all(s.vote is None for s in states(run.outputs))
    # With suppression off the model is trusted even on silence.
    trusting = Runner(config(suppress_when_silent=False))
    trusting.feed([probs(imbalance=0.99)] * 3, level=SILENT)
    assert len(reports(trusting.outputs)) == 1


def test_silence_ends_an_active_anomaly() -> None:
    run = Runner(config())
    run.feed([probs(imbalance=0.9)] * 4)
    run.feed([probs(imbalance=0.9)] * 3, level=SILENT)
    events = reports(run.outputs)
    assert [type(e) for e in events] == [AnomalyStarted, AnomalyEnded]
    ended = events[1]
    assert isinstance(ended, AnomalyEnded)
    assert ended.last_window_index == 3  # silent windows are not part of it
    # Windows 0-3 present, 4-6 silent: at window 6 only 2 of windows 2-6 are present.
    assert ended.decided_stream_s == window(6, probs()).end_s


def test_no_start_on_a_silent_window_after_a_cooldown() -> None:
    run = Runner(config(confirm_k=1, confirm_n=3, cooldown_s=5.0))
    run.feed([probs(imbalance=0.9)] + [probs(imbalance=0.1)] * 3)
    assert len(reports(run.outputs)) == 2  # ended at window 3 (13 s): cooldown to 18 s
    run.feed([probs(imbalance=0.9)] * 4)  # windows 4-7, all in the cooldown
    # Window 8 ends at 18 s, the cooldown is over and votes are in the last 3
    # windows, but window 8 is silent.
    run.feed([probs(imbalance=0.9)], level=SILENT)
    assert len(reports(run.outputs)) == 2
    run.feed([probs(imbalance=0.9)])
    restarted = reports(run.outputs)[2]
    assert isinstance(restarted, AnomalyStarted)
    assert restarted.decided_stream_s == 19.0
    # Backdated to the earliest vote in the last 3 windows; the silent window
    # between two present ones is part of the span.
    assert (restarted.first_window_index, restarted.last_window_index) == (7, 9)
    assert restarted.window_count == 3


def test_start_decided_on_an_absent_window_spans_only_present_ones() -> None:
    run = Runner(config(confirm_k=1, confirm_n=3, cooldown_s=5.0))
    run.feed([probs(imbalance=0.9)] + [probs(imbalance=0.1)] * 3)  # cooldown to 18 s
    run.feed([probs(imbalance=0.9)] * 4)  # windows 4-7 vote during the cooldown
    out = run.feed([probs(imbalance=0.1)])  # window 8 (18 s): cooldown over, class absent
    (started,) = reports(out)
    assert isinstance(started, AnomalyStarted)
    assert started.decided_stream_s == 18.0
    assert (started.first_window_index, started.last_window_index) == (6, 7)
    assert started.window_count == 2
    run.feed([probs(imbalance=0.1)] * 2)
    ended = reports(run.outputs)[-1]
    assert isinstance(ended, AnomalyEnded)
    assert (ended.last_window_index, ended.window_count, ended.decided_stream_s) == (7, 2, 20.0)


def test_class_change_ends_the_first_and_starts_the_second() -> None:
    cfg = config(confirm_k=2, confirm_n=3, default_on_threshold=0.55, default_off_threshold=0.3)
    run = Runner(cfg)
    run.feed([probs(imbalance=0.9)] * 3)  # windows 0-2, start at 1
    # Imbalance stays present (0.35 >= 0.3) while clogging votes.
    switch = run.feed([probs(clogging=0.6, imbalance=0.35)] * 2)  # windows 3-4
    events = reports(switch)
    assert [type(e) for e in events] == [AnomalyEnded, AnomalyStarted]
    ended, started = events
    assert isinstance(ended, AnomalyEnded)
    assert (ended.class_name, ended.reason) == ("imbalance", "class_change")
    assert ended.last_window_index == 4
    assert ended.decided_stream_s == started.decided_stream_s == 14.0
    assert started.class_name == "clogging"
    assert started.first_window_index == 3
    assert started.anomaly_id != ended.anomaly_id
    assert states(switch)[-1].active_class == "clogging"


def test_clearing_and_a_new_class_on_the_same_window() -> None:
    cfg = config(confirm_k=2, confirm_n=3, default_on_threshold=0.6, default_off_threshold=0.3)
    run = Runner(cfg)
    run.feed([probs(imbalance=0.9)] * 3)
    out = run.feed([probs(clogging=0.7, imbalance=0.25)] * 2)
    events = reports(out)
    assert [(type(e), e.class_name) for e in events] == [
        (AnomalyEnded, "imbalance"),
        (AnomalyStarted, "clogging"),
    ]
    assert isinstance(events[0], AnomalyEnded) and events[0].reason == "cleared"


def test_votes_go_to_the_most_probable_qualifying_class() -> None:
    cfg = config(
        confirm_k=1,
        confirm_n=1,
        on_threshold={"imbalance": 0.3, "clogging": 0.3},
        off_threshold={"imbalance": 0.2, "clogging": 0.2},
    )
    run = Runner(cfg)
    out = run.feed([probs(imbalance=0.35, clogging=0.45)])
    assert states(out)[0].vote == "clogging"
    assert [e.class_name for e in reports(out)] == ["clogging"]


def test_stream_end_and_reset_close_the_active_anomaly() -> None:
    run = Runner(config())
    run.feed([probs(voltage_change=0.9)] * 4)
    assert run.state.current.active_class == "voltage_change"
    assert run.state.current.active_since_s == 0.0
    assert run.state.current.active_since_wall == T0
    assert run.state.current.anomaly_id == "anomaly-1"
    (ended,) = run.state.finish()
    assert ended.reason == "stream_end"
    assert ended.anomaly_id == "anomaly-1"
    assert ended.last_window_index == 3
    assert ended.decided_stream_s == 13.0
    assert run.state.current.active_class is None
    assert run.state.finish() == []
    assert run.state.reset() == []

    run.feed([probs(voltage_change=0.9)] * 3)
    (ended,) = run.state.reset()
    assert ended.reason == "reset"
    assert ended.anomaly_id == "anomaly-2"
    assert run.state.current.windows_seen == 0


def test_cooldown_survives_reset_but_not_finish() -> None:
    run = Runner(config(confirm_k=1, confirm_n=1, cooldown_s=100.0))
    run.feed([probs(imbalance=0.9)])
    (ended,) = run.state.reset()  # ended at 10 s: cooldown to 110 s
    assert ended.reason == "reset"
    assert reports(run.feed([probs(imbalance=0.9)] * 5)) == []
    assert run.state.finish() == []
    assert [type(e) for e in reports(run.feed([probs(imbalance=0.9)]))] == [AnomalyStarted]


def test_stream_time_going_backwards_lifts_the_cooldown() -> None:
    state = DecisionState(*config(confirm_k=1, confirm_n=1, cooldown_s=100.0))
    state.update(window(50, probs(imbalance=0.9)))
    state.reset()
    out = state.update(window(0, probs(imbalance=0.9)))  # a source restarting its clock
    assert [type(o) for o in out] == [AnomalyStarted, WindowState]


def test_wall_clock_is_optional() -> None:
    state = DecisionState(*config(confirm_k=1, confirm_n=1))
    out = state.update(window(0, probs(imbalance=0.9), wall=False))
    started = out[0]
    assert isinstance(started, AnomalyStarted)
    assert started.wall_start is None and started.wall_end is None
    assert started.stream_start_s == 0.0


def test_level_over_an_anomaly_is_aggregated() -> None:
    state = DecisionState(*config(confirm_k=2, confirm_n=2))
    quiet = Level(rms_dbfs=-30.0, peak_dbfs=-20.0, clipping=False, silent=False)
    loud = Level(rms_dbfs=-20.0, peak_dbfs=0.0, clipping=True, silent=False)
    state.update(window(0, probs(imbalance=0.9), quiet))
    out = state.update(window(1, probs(imbalance=0.9), loud))
    started = out[0]
    assert isinstance(started, AnomalyStarted)
    # Power mean of -30 and -20 dBFS; peak is the max; clipping if any window clipped.
    assert started.level.rms_dbfs == pytest.approx(-22.596, abs=1e-3)
    assert started.level.peak_dbfs == 0.0
    assert started.level.clipping is True
    assert started.level.silent is False


def test_bad_windows_are_refused() -> None:
    state = DecisionState(*config())
    with pytest.raises(ValueError, match="3 probabilities for 4 classes"):
        state.update(window(0, (0.5, 0.25, 0.25)))
    with pytest.raises(ValueError, match="not a probability"):
        state.update(window(0, (float("nan"), 0.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="not a probability"):
        state.update(window(0, (1.5, 0.0, 0.0, 0.0)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"off_threshold": {"imbalance": 0.8}}, r"off \(0.8\) must not exceed on \(0.7\)"),
        ({"confirm_k": 6, "confirm_n": 5}, r"confirm_k \(6\) must not exceed confirm_n \(5\)"),
        ({"on_threshold": {"wobble": 0.5}}, r"unknown class 'wobble'"),
        ({"on_threshold": {"normal": 0.5}}, r"name the normal class 'normal'"),
        ({"normal_class": "ok"}, r"normal class 'ok' is not one of"),
        ({"class_names": ("normal",)}, r"at least one fault class"),
        ({"class_names": ("normal", "a", "a")}, r"duplicates"),
        ({"default_on_threshold": 1.2}, r"less than or equal to 0.99"),
        ({"default_off_threshold": 0.0}, r"greater than or equal to 0.05"),
        ({"confirm_k": 0}, r"confirm_k\n.*greater than or equal to 1"),
        ({"cooldown_s": -1.0}, r"cooldown_s\n.*greater than or equal to 0"),
        ({"warmup_windows": -2}, r"warmup_windows\n.*greater than or equal to 0"),
    ],
)
def test_config_errors_say_what_to_fix(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises((DecisionConfigError, ValidationError), match=message):
        DecisionState(*config(**overrides))


def test_config_reports_every_problem_and_is_immutable() -> None:
    with pytest.raises(ValidationError) as info:
        config(confirm_k=0, cooldown_s=-1.0)
    assert {e["loc"] for e in info.value.errors()} == {("confirm_k",), ("cooldown_s",)}
    thresholds = {"imbalance": 0.8}
    setup = config(on_threshold=thresholds)
    state = DecisionState(*setup)
    thresholds["imbalance"] = 0.1  # the caller's dict was copied
    assert setup[0].thresholds["imbalance"].on == 0.8
    assert setup[1].fault_classes == CLASSES[1:]
    with pytest.raises(ValidationError):
        setup[0].confirm_k = 1  # type: ignore[misc]
    # A window at 0.5 does not vote imbalance (on 0.8), whatever happened to the dict.
    out = state.update(window(0, probs(imbalance=0.5)))
    assert isinstance(out[-1], WindowState) and out[-1].vote is None


def test_thresholds_default_to_the_bundle_with_off_below_on() -> None:
    classes = ModelClasses(CLASSES, "normal", {"imbalance": 0.9, "clogging": 0.6})
    custom = DecisionConfig.model_validate({"thresholds": {"clogging": {"on": 0.5, "off": 0.45}}})
    assert class_thresholds(custom, classes) == {
        "imbalance": (0.9, 0.7),  # the bundle's on, off 0.2 below
        "clogging": (0.5, 0.45),  # the config's own
        "voltage_change": (0.7, 0.5),  # no bundle threshold: 0.7 / 0.5
    }
    # One default each: the config's.
    assert (DecisionConfig().cooldown_s, DecisionConfig().warmup_windows) == (10.0, 0)
