"""The per-unit baseline's pieces without a model: the novelty decision, the learning
decision's thresholds, the learner's bounded memory and checkpoints, and the wire."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from soundwatch.baseline import BaselineError, Layout
from soundwatch.config import BaselineConfig, DecisionConfig
from soundwatch.decision import (
    AnomalyEnded,
    AnomalyStarted,
    DecisionOutput,
    DecisionState,
    ModelClasses,
    NoveltyDecision,
    WindowResult,
    WindowState,
    learning_config,
)
from soundwatch.events import (
    NOVELTY_MESSAGE,
    EventFactory,
    SequenceCounter,
    to_wire,
    validate_event,
)
from soundwatch.physics import PHYSICS_VERSION
from soundwatch.stream_types import BaselineVerdict, LearningProgress, Level, NoveltyReading
from soundwatch.unit_baseline import MAX_LEARN_WINDOWS, Learner

CLASSES = ("normal", "imbalance", "clogging", "voltage_change")
MESSAGES = {
    "normal": "Component OK",
    "imbalance": "Component is imbalanced",
    "clogging": "Component is clogged",
    "voltage_change": "Voltage change",
}
LOUD = Level(rms_dbfs=-20.0, peak_dbfs=-6.0, clipping=False, silent=False)
SILENT = Level(rms_dbfs=-90.0, peak_dbfs=-80.0, clipping=False, silent=True)
THRESHOLD = 10.0
BASELINE_ID = "bl-0123456789ab"


def probs(**faults: float) -> tuple[float, ...]:
    values = [faults.get(c, 0.0) for c in CLASSES]
    values[0] = max(0.0, 1.0 - sum(values[1:]))
    return tuple(values)


def window(
    index: int,
    score: float | None,
    p: tuple[float, ...] | None = None,
    *,
    level: Level = LOUD,
    no_verdict: str | None = None,
    speed: float | None = None,
) -> WindowResult:
    novelty = None if score is None else NoveltyReading(score, THRESHOLD, speed)
    return WindowResult(
        index=index,
        start_s=float(index),
        end_s=index + 10.0,
        probabilities=p or probs(),
        level=level,
        no_verdict=no_verdict,
        baseline=BaselineVerdict(BASELINE_ID, novelty),
    )


def novelty_decision(**settings: float | bool) -> NoveltyDecision:
    base = BaselineConfig.model_validate(
        {"confirm_k": 3, "confirm_n": 5, "off_ratio": 0.5, "name_on": 0.8, **settings}
    )
    decision = DecisionConfig(cooldown_s=0.0)
    counter = iter(range(1, 10_000))
    return NoveltyDecision(
        decision,
        base,
        ModelClasses(CLASSES, default_on={"imbalance": 0.5, "clogging": 0.5}),
        new_anomaly_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}",
    )


def feed(decision: NoveltyDecision, windows: Sequence[WindowResult]) -> list[DecisionOutput]:
    out: list[DecisionOutput] = []
    for w in windows:
        got = decision.update(w)
        assert isinstance(got[-1], WindowState)  # always one state, last
        out.extend(got)
    return out


def events(outputs: Sequence[DecisionOutput]) -> list[tuple[str, str, int, str]]:
    return [
        (
            "started" if isinstance(o, AnomalyStarted) else "ended",
            o.class_name,
            o.decided_stream_s and int(o.decided_stream_s - 10),
            o.reason if isinstance(o, AnomalyEnded) else "",
        )
        for o in outputs
        if isinstance(o, AnomalyStarted | AnomalyEnded)
    ]


# --- the novelty decision --------------------------------------------------------------------


def test_k_of_n_novel_windows_start_an_unknown_anomaly_and_the_off_level_ends_it() -> None:
    d = novelty_decision()
    scores = [1, 12, 1, 12, 12, 8, 6, 6, 4, 4, 4, 1]
    out = feed(d, [window(i, s) for i, s in enumerate(scores)])
    # Votes at 1, 3, 4 (3 of the last 5) start it; 8 and 6 stay above the off level (5).
    assert events(out) == [("started", "unknown", 4, ""), ("ended", "unknown", 10, "cleared")]
    started = next(o for o in out if isinstance(o, AnomalyStarted))
    assert started.novelty == NoveltyReading(12, THRESHOLD)
    assert started.baseline_id == BASELINE_ID
    assert started.first_window_index == 1  # the span runs from the first voting window
    ended = next(o for o in out if isinstance(o, AnomalyEnded))
    assert ended.last_window_index == 7  # the last window above the off level
    votes = [o.vote for o in out if isinstance(o, WindowState)]
    assert votes[:5] == [None, "unknown", None, "unknown", "unknown"]


def test_windows_that_cannot_be_judged_cast_no_vote_either_way() -> None:
    d = novelty_decision()
    bad = {"no_verdict": "only 1.0 s of usable audio"}
    # Two novel windows, a run of dropouts, one more novel window: 3 of the last 5 judged.
    ws = [window(0, 12), window(1, 12)]
    ws += [window(i, 50, **bad) for i in range(2, 9)]  # type: ignore[arg-type]
    ws += [window(9, 12)]
    out = feed(d, ws)
    assert events(out) == [("started", "unknown", 9, "")]
    # ... and dropouts do not end it either, though they are not "present".
    out = feed(d, [window(i, 1, **bad) for i in range(10, 30)])  # type: ignore[arg-type]
    assert events(out) == []
    assert d.current.active_class == "unknown"


def test_the_class_is_what_most_novel_windows_name_and_unknown_otherwise() -> None:
    d = novelty_decision()
    named = probs(imbalance=0.9)
    ws = [window(0, 12, named), window(1, 12, named), window(2, 12)]
    assert events(feed(d, ws)) == [("started", "imbalance", 2, "")]
    # 2 of 3 name it: most. With 1 of 3 naming, it would be unknown.
    d = novelty_decision()
    ws = [window(0, 12, named), window(1, 12), window(2, 12)]
    assert events(feed(d, ws)) == [("started", "unknown", 2, "")]
    # name_on raises the bar above the class's own on (0.5): p = 0.6 names nothing.
    d = novelty_decision()
    ws = [window(i, 12, probs(clogging=0.6)) for i in range(3)]
    assert events(feed(d, ws)) == [("started", "unknown", 2, "")]


@pytest.mark.parametrize(
    ("speed", "p", "named"),
    [
        (0.80, probs(imbalance=0.3), "voltage_change"),  # under-voltage: the speed alone
        (1.28, probs(), "voltage_change"),  # over-voltage
        (1.08, probs(imbalance=0.3), "clogging"),  # 5-15 % faster: clogging alone does that
        (1.00, probs(clogging=0.95), "unknown"),  # clogging without its speed-up: not clogging
        (1.00, probs(imbalance=0.95), "imbalance"),  # imbalance leaves the speed
        (1.16, probs(voltage_change=0.95), "voltage_change"),  # between both: the classifier
        (1.16, probs(), "unknown"),
        (0.80, probs(imbalance=0.95), "unknown"),  # the two disagree: neither is trusted
        (None, probs(clogging=0.95), "clogging"),  # no speed measured: the classifier alone
    ],
)
def test_the_units_own_speed_names_a_departure_with_the_classifier(
    speed: float | None, p: tuple[float, ...], named: str
) -> None:
    d = novelty_decision()
    out = feed(d, [window(i, 12, p, speed=speed) for i in range(3)])
    assert events(out) == [("started", named, 2, "")]


def test_naming_by_speed_can_be_turned_off() -> None:
    d = novelty_decision(name_by_speed=False)
    out = feed(d, [window(i, 12, probs(imbalance=0.3), speed=0.8) for i in range(3)])
    assert events(out) == [("started", "unknown", 2, "")]
    d.reconfigure(DecisionConfig(cooldown_s=0.0), BaselineConfig(confirm_k=3, confirm_n=5))
    out = feed(d, [window(i, 12, probs(imbalance=0.3), speed=0.8) for i in range(3, 6)])
    assert events(out) == [
        ("ended", "unknown", 5, "class_change"),
        ("started", "voltage_change", 5, ""),
    ]


def test_an_unknown_anomaly_takes_the_classifiers_name_once_it_is_sure() -> None:
    d = novelty_decision()
    out = feed(d, [window(i, 12) for i in range(3)])
    out += feed(d, [window(i, 12, probs(clogging=0.95)) for i in range(3, 6)])
    out += feed(d, [window(i, 12, probs(imbalance=0.2)) for i in range(6, 12)])
    assert events(out) == [
        ("started", "unknown", 2, ""),
        ("ended", "unknown", 5, "class_change"),  # 3 of the last 5 name it: most
        ("started", "clogging", 5, ""),
    ]  # and never back to unknown while the novelty lasts
    assert d.current.active_class == "clogging"
    ended = [o for o in out if isinstance(o, AnomalyEnded)]
    assert ended[0].anomaly_id != d.current.anomaly_id


def test_a_classifier_fault_alone_raises_nothing_once_the_baseline_is_learned() -> None:
    d = novelty_decision()
    out = feed(d, [window(i, 2.0, probs(imbalance=0.99)) for i in range(30)])
    assert events(out) == []


def test_silence_mutes_votes_and_cooldown_holds_a_new_start() -> None:
    d = novelty_decision()
    assert events(feed(d, [window(i, 50, level=SILENT) for i in range(10)])) == []
    d = NoveltyDecision(
        DecisionConfig(cooldown_s=20.0),
        BaselineConfig(confirm_k=2, confirm_n=2, off_ratio=1.0),
        ModelClasses(CLASSES),
    )
    scores = [12, 12, 1, 1, 12, 12, 12] + [1] * 14 + [12, 12]
    out = feed(d, [window(i, s) for i, s in enumerate(scores)])
    # Ends at window 2 (decided 12 s); the novelty at 4..6 is within 20 s: no start
    # until 22 s of stream (window 12); it comes back at 21/22.
    assert [e[:2] for e in events(out)] == [
        ("started", "unknown"),
        ("ended", "unknown"),
        ("started", "unknown"),
    ]
    assert events(out)[2][2] == 22


def test_reset_and_finish_close_an_active_anomaly() -> None:
    d = novelty_decision()
    feed(d, [window(i, 12) for i in range(3)])
    (ended,) = d.reset()
    assert ended.reason == "reset" and d.current.active_class is None
    feed(d, [window(i, 12) for i in range(3, 6)])
    (ended,) = d.finish()
    assert ended.reason == "stream_end"


def test_learning_thresholds_are_the_stricter_of_both() -> None:
    classes = ModelClasses(CLASSES, default_on={"imbalance": 0.5, "voltage_change": 0.95})
    decision = DecisionConfig.model_validate(
        {"thresholds": {"clogging": {"on": 0.6, "off": 0.1}}, "cooldown_s": 7}
    )
    strict = learning_config(decision, BaselineConfig(), classes)
    assert {k: (v.on, v.off) for k, v in strict.thresholds.items()} == {
        "imbalance": (0.9, 0.7),
        "clogging": (0.9, 0.7),
        "voltage_change": (0.95, 0.75),
    }
    assert (strict.confirm_k, strict.confirm_n, strict.cooldown_s) == (12, 15, 7)
    state = DecisionState(strict, classes)
    assert state.would_vote(probs(imbalance=0.85)) is None
    assert state.would_vote(probs(imbalance=0.92)) == "imbalance"


# --- the learner ---------------------------------------------------------------------------------

LAYOUT = Layout((("envelope", 3), ("physics", 2)))


def test_a_days_learning_keeps_a_bounded_evenly_spread_sample(tmp_path: Path) -> None:
    learner = Learner(LAYOUT, "fan@test")
    n = 86_400  # a day at a 1 s hop
    for i in range(n):
        learner.add(np.full(LAYOUT.size, i / 100, dtype=np.float32), 1.0)
    kept = np.round(learner.kept[:, 0] * 100)
    assert MAX_LEARN_WINDOWS // 2 <= kept.size <= MAX_LEARN_WINDOWS
    assert learner.accepted == n and learner.learned_s == n
    gaps = np.diff(kept)
    assert gaps.min() == gaps.max() == learner.stride  # every stride-th window, in order
    assert kept[0] == 0 and kept[-1] >= n - learner.stride  # the whole day, not its start
    path = tmp_path / "learner.npz"
    learner.save(path)
    assert path.stat().st_size < 1_000_000
    again = Learner.load(path, LAYOUT, "fan@test")
    assert again.learned_s == n and np.allclose(again.kept, learner.kept, rtol=1e-3)
    assert again.stride == learner.stride


def test_a_checkpoint_of_another_model_physics_or_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "learner.npz"
    Learner(LAYOUT, "fan@1.0.0").save(path)
    with pytest.raises(BaselineError, match=r"learned with model 'fan@1\.0\.0', not 'fan@2"):
        Learner.load(path, LAYOUT, "fan@2.0.0")
    with pytest.raises(BaselineError, match="another embedding layout"):
        Learner.load(path, Layout((("envelope", 4),)), "fan@1.0.0")
    with np.load(path) as npz:
        meta = json.loads(bytes(npz["meta"]).decode())
        kept = npz["kept"]
    meta["physics_version"] = PHYSICS_VERSION + 1
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), kept=kept)
    with pytest.raises(BaselineError, match="physics features version"):
        Learner.load(path, LAYOUT, "fan@1.0.0")


# --- the wire ----------------------------------------------------------------------------------


def _factory(baseline: bool) -> EventFactory:
    return EventFactory(
        "dev1",
        "soundwatch",
        "fan@test",
        CLASSES,
        MESSAGES,
        SequenceCounter(None),
        baseline=baseline,
    )


def test_messages_carry_the_baseline_only_when_it_is_on() -> None:
    d = novelty_decision()
    out = feed(d, [window(i, 12) for i in range(3)])
    on, off = _factory(True), _factory(False)
    started = next(o for o in out if isinstance(o, AnomalyStarted))
    state = next(o for o in reversed(out) if isinstance(o, WindowState))
    doc = to_wire(on.build(started))
    assert doc["class"] == "unknown" and doc["Message"] == NOVELTY_MESSAGE
    assert doc["novelty"] == {"score": 12.0, "threshold": 10.0}
    assert doc["baseline_id"] == BASELINE_ID
    validate_event(doc)
    sdoc = to_wire(on.build(state))
    assert sdoc["active_class"] == "unknown" and sdoc["Message"] == NOVELTY_MESSAGE
    assert sdoc["learning"] is None and sdoc["novelty"]["score"] == 12.0
    validate_event(sdoc)
    # Off: not a key more than before (the golden wire test pins those bytes).
    plain = to_wire(off.build(state))
    assert not {"novelty", "baseline_id", "learning"} & set(plain)
    # While learning: the keys are there, null, and the state says how far it got.
    learning = WindowResult(
        0,
        0.0,
        10.0,
        probs(),
        LOUD,
        baseline=BaselineVerdict(None, None, LearningProgress(432.0, 600.0)),
    )
    ldoc = to_wire(
        on.build(DecisionState(DecisionConfig(), ModelClasses(CLASSES)).update(learning)[-1])
    )  # type: ignore[arg-type]
    assert ldoc["novelty"] is None and ldoc["baseline_id"] is None
    assert ldoc["learning"] == {"learned_s": 432.0, "learn_s": 600.0}
    validate_event(ldoc)
    assert LearningProgress(432.0, 600.0).describe() == "learning: 7:12 of 10:00"


def test_home_assistant_shows_novelty_and_learning_progress() -> None:
    jinja2 = pytest.importorskip("jinja2")
    from soundwatch.ha_discovery import discovery_messages

    def entities(baseline: bool) -> dict[str, dict[str, object]]:
        msgs = discovery_messages(
            device_id="dev1",
            module_id="soundwatch",
            model_version="fan@test",
            class_names=CLASSES,
            state_topic="s",
            status_topic="t",
            baseline=baseline,
        )
        return {m.topic.split("/")[-2]: m.payload for m in msgs}

    assert not {"novelty", "baseline_learned"} & set(entities(False))
    on = entities(True)
    env = jinja2.Environment()

    def render(entity: str, state: dict[str, object], key: str = "value_template") -> str:
        return env.from_string(str(on[entity][key])).render(value_json=state)

    d = novelty_decision()
    fac = _factory(True)
    novel = to_wire(fac.build(feed(d, [window(0, 12.3456)])[-1]))
    assert render("novelty", novel) == "12.3456"
    attrs = json.loads(render("novelty", novel, "json_attributes_template"))
    assert attrs == {"threshold": 10.0, "baseline_id": BASELINE_ID}
    assert render("baseline_learned", novel) == "100"
    learning = dict(
        novel, novelty=None, baseline_id=None, learning={"learned_s": 150.0, "learn_s": 600.0}
    )
    assert render("novelty", learning) == "None"  # HA: unknown
    assert render("baseline_learned", learning) == "25.0"


def test_iot_hub_properties_say_who_decided_and_novelty_sets_severity() -> None:
    from soundwatch.sinks.iothub import message_properties

    fac = _factory(True)
    d = novelty_decision()
    started = next(
        o for o in feed(d, [window(i, 25.0) for i in range(3)]) if isinstance(o, AnomalyStarted)
    )
    props = message_properties(fac.build(started))
    # 2.5 x the threshold, though the classifier says "normal": high.
    assert props["decided_by"] == "baseline" and props["severity"] == "high"
    learning_state = DecisionState(DecisionConfig(), ModelClasses(CLASSES)).update(
        WindowResult(
            0,
            0.0,
            10.0,
            probs(),
            LOUD,
            baseline=BaselineVerdict(None, None, LearningProgress(1.0, 60.0)),
        )
    )[-1]
    assert message_properties(fac.build(learning_state))["decided_by"] == "classifier"  # type: ignore[arg-type]
    assert "decided_by" not in message_properties(_factory(False).build(started))


def test_the_bench_view_says_how_far_learning_got() -> None:
    from soundwatch.micview import baseline_line

    assert baseline_line({"class": "normal"}) is None  # baseline off
    line = baseline_line({"learning": {"learned_s": 432.0, "learn_s": 600.0}})
    assert line is not None and line.startswith("baseline learning: 7:12 of 10:00 (72 %)")
    line = baseline_line(
        {"learning": None, "baseline_id": "bl-1", "novelty": {"score": 12.0, "threshold": 10.0}}
    )
    assert line == "baseline bl-1: novelty 12 (threshold 10)  ◀ differs"
