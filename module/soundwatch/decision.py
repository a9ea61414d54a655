"""Decision stage: per-window class probabilities in, anomaly events out.

:class:`DecisionState` is an explicit, resettable state machine. It needs no
model: feed it :class:`WindowResult` values (probabilities plus input level)
and it returns, per window, zero or more :class:`AnomalyEnded` /
:class:`AnomalyStarted` values followed by exactly one :class:`WindowState`.

Semantics (K = ``confirm_k``, N = ``confirm_n``, "last N" = the last N windows
seen since start or :meth:`DecisionState.reset`, fewer at first):

* **Vote.** A window votes for fault class *c* when ``p(c) >= on_threshold[c]``;
  if several fault classes pass, it votes for the most probable one. The normal
  class never votes. Windows in warm-up and (with ``suppress_when_silent``)
  windows flagged silent do not vote.
* **Present.** Class *c* is present in a window when
  ``p(c) >= off_threshold[c]`` and the window is not suppressed as silent.
  Every vote for *c* is also a presence of *c* (``off <= on``).
* **Start.** An anomaly of *c* starts at the window where at least K of the
  last N windows voted *c*, provided that window is past warm-up, is not
  silent, and is not within ``cooldown_s`` (stream time) of the decision that
  ended the previous anomaly of *c*. If several classes qualify, the one with
  the most votes wins (ties: the larger summed probability).
* **End ("cleared").** An active anomaly of *c* ends at the first window where
  fewer than K of the last N windows have *c* present. This is the start rule
  with the off threshold (a Schmitt trigger over a K-of-N vote): the start and
  end conditions can never hold at once, unlike "K of N below off", which for
  ``2K <= N`` can be true together with the start rule and so flaps. With
  ``K == N`` a single window below the off threshold ends the anomaly.
* **End ("class_change").** If another fault class *d* qualifies to start while
  *c* is active, *c* ends and *d* starts on the same window (ended first).
* **End ("reset" / "stream_end").** :meth:`~DecisionState.reset` (called by the
  pipeline on a source discontinuity) and :meth:`~DecisionState.finish` close
  an active anomaly and return its :class:`AnomalyEnded`; an anomaly is never
  dropped silently.
* **Span.** An anomaly's windows run from its first confirming window (the
  earliest window among the last N that voted *c*) through the last window in
  which *c* was present. ``stream_start_s``/``stream_end_s``, wall times,
  ``probability_max``/``probability_mean`` (of *c*), ``mean_probabilities``
  (every class) and the aggregated level are over those windows. A started
  report covers the span up to the confirming window; the ended report covers
  the whole anomaly. Because windows are long and overlap, the span is "stream
  time the evidence covers", and ``duration_s`` is at least one window long.
  ``decided_stream_s`` is the end of the window at which the decision was made
  (an end is decided up to N windows after the anomaly's last present window).
* **Warm-up.** The first ``warmup_windows`` windows after construction or
  :meth:`~DecisionState.reset` emit state but do not vote, so the first
  possible start is at window ``warmup_windows + K``.
* **Cooldown.** Every end of *c* starts *c*'s cooldown; cooldowns survive
  :meth:`~DecisionState.reset` (so a flapping source cannot flood events) but
  not :meth:`~DecisionState.finish`. Votes still count during a cooldown, so a
  fault that persists starts again as soon as it expires. If stream time goes
  backwards (a source that restarts its clock), the cooldown no longer applies.
* **Silence.** With ``suppress_when_silent`` a silent window neither votes nor
  counts as present: a machine that falls silent ends its anomaly rather than
  keeping it open on whatever the model says about silence. Clipping is only
  reported, never acted on.

All times are stream times from sample counts, so results do not depend on the
wall clock. A :class:`DecisionState` is owned by one pipeline thread; its
:attr:`~DecisionState.current` snapshot may be read from any thread.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from soundwatch.config import BaselineConfig, ClassThreshold, DecisionConfig
from soundwatch.stream_types import BaselineVerdict, Level, NoveltyReading

if TYPE_CHECKING:
    from soundwatch.bundle import Bundle

logger = logging.getLogger(__name__)

EndReason = Literal["cleared", "class_change", "reset", "stream_end"]

# Model outputs are softmax/dequantised values; allow float rounding slightly
# outside [0, 1] but refuse anything that signals a wiring error.
_PROBABILITY_SLACK = 1e-3


class DecisionConfigError(ValueError):
    """The decision settings do not fit the model's classes; the message lists every problem."""


@dataclass(frozen=True)
class WindowResult:
    """The model's verdict on one window, with where the window sits.

    ``start_s``/``end_s`` are stream times (sample counts / rate since the
    source started). ``captured_at`` is the wall-clock time (``time.time()``)
    of the window's last sample when the source knows it.
    ``probabilities`` follow :attr:`ModelClasses.names`.
    """

    index: int
    start_s: float
    end_s: float
    probabilities: tuple[float, ...]
    level: Level
    captured_at: float | None = None
    # Why the window cannot be judged at all (a dropout, clipping), if so.
    no_verdict: str | None = None
    # The unit's baseline on this window (None when the baseline is off).
    baseline: BaselineVerdict | None = None

    @property
    def novelty(self) -> NoveltyReading | None:
        return None if self.baseline is None else self.baseline.novelty

    @property
    def wall_start(self) -> float | None:
        """Wall-clock time of the window's first sample, if known."""
        if self.captured_at is None:
            return None
        return self.captured_at - (self.end_s - self.start_s)


# A fault class without thresholds of its own votes at its bundle threshold
# (or this, if the bundle has none) and stays present down to `on - 0.2`.
DEFAULT_ON_THRESHOLD = 0.7
OFF_BELOW_ON = 0.2


@dataclass(frozen=True)
class ModelClasses:
    """What the decision needs from the model: its classes and their default thresholds.

    ``default_on`` holds the bundle's ``on`` threshold per fault class; a
    class it lacks uses :data:`DEFAULT_ON_THRESHOLD`.
    """

    names: tuple[str, ...]
    normal: str = "normal"
    default_on: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "default_on", MappingProxyType(dict(self.default_on)))
        problems = []
        if len(set(self.names)) != len(self.names):
            problems.append(f"class names {list(self.names)} contain duplicates")
        if self.normal not in self.names:
            problems.append(f"normal class {self.normal!r} is not one of {list(self.names)}")
        if not self.fault_classes:
            problems.append("the model needs at least one fault class besides the normal class")
        if problems:
            raise DecisionConfigError("invalid model classes: " + "; ".join(problems))

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelClasses:
        """The classes, normal class and thresholds a model bundle declares."""
        normal = [c.name for c in bundle.classes if not c.anomaly]
        if len(normal) != 1:
            raise DecisionConfigError(
                f"bundle {bundle.name} must have exactly one normal class, has {normal}"
            )
        return cls(bundle.class_names, normal[0], dict(bundle.thresholds))

    @property
    def fault_classes(self) -> tuple[str, ...]:
        """Every class except the normal one, in model order."""
        return tuple(c for c in self.names if c != self.normal)


def class_thresholds(
    config: DecisionConfig, classes: ModelClasses
) -> dict[str, tuple[float, float]]:
    """``(on, off)`` per fault class: the config's, else the bundle's ``on`` and ``on - 0.2``.

    Raises :class:`DecisionConfigError` when the config names a class the
    model does not have, or the normal class (which never starts an anomaly).
    """
    problems = []
    for name in config.thresholds:
        if name == classes.normal:
            problems.append(
                f"thresholds name the normal class {name!r}; it never starts an anomaly, remove it"
            )
        elif name not in classes.names:
            problems.append(
                f"thresholds name unknown class {name!r}; known: {list(classes.fault_classes)}"
            )
    if problems:
        raise DecisionConfigError("; ".join(problems))
    out: dict[str, tuple[float, float]] = {}
    for name in classes.fault_classes:
        pair = config.thresholds.get(name)
        if pair is not None:
            out[name] = (pair.on, pair.off)
        else:
            on = float(classes.default_on.get(name, DEFAULT_ON_THRESHOLD))
            out[name] = (on, max(0.0, round(on - OFF_BELOW_ON, 3)))
    return out


def learning_config(
    config: DecisionConfig, baseline: BaselineConfig, classes: ModelClasses
) -> DecisionConfig:
    """The classifier's decision controls while the unit's baseline is being learned.

    Every fault class votes at ``max(on, during_learning.on)`` and stays
    present down to ``max(off, during_learning.off)`` (never above its own
    ``on``); K of N are ``during_learning``'s. Cooldown, warm-up, silence and
    ``enabled`` are ``config``'s. Raises :class:`DecisionConfigError` as
    :func:`class_thresholds` does.
    """
    strict = baseline.during_learning
    thresholds = {}
    for name, (on, off) in class_thresholds(config, classes).items():
        strict_on = max(on, strict.on)
        thresholds[name] = ClassThreshold(on=strict_on, off=min(strict_on, max(off, strict.off)))
    return config.model_copy(
        update={
            "thresholds": thresholds,
            "confirm_k": strict.confirm_k,
            "confirm_n": strict.confirm_n,
        }
    )


@dataclass(frozen=True)
class AnomalyReport:
    """What is known about one anomaly over its span (see the module docstring)."""

    anomaly_id: str
    class_name: str
    first_window_index: int
    last_window_index: int
    window_count: int
    stream_start_s: float
    stream_end_s: float
    wall_start: float | None
    wall_end: float | None
    probability_max: float
    probability_mean: float
    mean_probabilities: tuple[float, ...]
    level: Level
    decided_stream_s: float
    # The highest novelty over the span against the threshold in force at the
    # decision, and the baseline that decided; None when the classifier did.
    novelty: NoveltyReading | None = field(default=None, kw_only=True)
    baseline_id: str | None = field(default=None, kw_only=True)

    @property
    def duration_s(self) -> float:
        """Stream time covered by the anomaly's windows."""
        return self.stream_end_s - self.stream_start_s


@dataclass(frozen=True)
class AnomalyStarted(AnomalyReport):
    """An anomaly was confirmed; the span runs up to the confirming window."""


@dataclass(frozen=True)
class AnomalyEnded(AnomalyReport):
    """An anomaly is over; same ``anomaly_id`` as its :class:`AnomalyStarted`."""

    reason: EndReason


@dataclass(frozen=True)
class WindowState:
    """The per-window state for dashboards, after this window's decisions."""

    window: WindowResult
    top_class: str
    vote: str | None
    active_class: str | None
    anomaly_id: str | None
    warming_up: bool


DecisionOutput: TypeAlias = AnomalyStarted | AnomalyEnded | WindowState


@dataclass(frozen=True)
class DecisionSnapshot:
    """A read-only view of the decision state, safe to read from any thread."""

    active_class: str | None = None
    anomaly_id: str | None = None
    active_since_s: float | None = None
    active_since_wall: float | None = None
    windows_seen: int = 0
    warming_up: bool = True
    last_window_index: int | None = None


class _Span:
    """Running aggregates over a run of windows, for one class.

    ``class_idx`` is the class whose probability the span follows; for an
    ``unknown`` anomaly (:class:`NoveltyDecision`) it is ``None`` and the span
    follows the share the classifier gives to any fault, ``1 - p(normal)``.
    """

    def __init__(self, class_idx: int | None, n_classes: int, normal_idx: int = 0) -> None:
        self.class_idx = class_idx
        self.normal_idx = normal_idx
        self.first: WindowResult | None = None
        self.last: WindowResult | None = None
        self.count = 0
        self.prob_sums = [0.0] * n_classes
        self.max_p = 0.0
        self.power_sum = 0.0
        self.peak_dbfs = -math.inf
        self.clipping = False
        self.silent = True
        self.strength_sum = 0.0
        self.novelty_max: float | None = None

    def strength(self, w: WindowResult) -> float:
        """The probability this span follows, in one window."""
        if self.class_idx is None:
            return max(0.0, 1.0 - w.probabilities[self.normal_idx])
        return w.probabilities[self.class_idx]

    def add(self, w: WindowResult) -> None:
        if self.first is None:
            self.first = w
        self.last = w
        self.count += 1
        for i, p in enumerate(w.probabilities):
            self.prob_sums[i] += p
        strength = self.strength(w)
        self.strength_sum += strength
        self.max_p = max(self.max_p, strength)
        if w.novelty is not None:
            self.novelty_max = max(self.novelty_max or 0.0, w.novelty.score)
        # Average RMS as power, the way a level meter over the span would.
        self.power_sum += 10.0 ** (w.level.rms_dbfs / 10.0)
        self.peak_dbfs = max(self.peak_dbfs, w.level.peak_dbfs)
        self.clipping = self.clipping or w.level.clipping
        self.silent = self.silent and w.level.silent

    def absorb(self, later: _Span) -> None:
        """Append a span of windows that came after this one."""
        if later.first is None:
            return
        if self.first is None:
            self.first = later.first
        self.last = later.last
        self.count += later.count
        self.prob_sums = [a + b for a, b in zip(self.prob_sums, later.prob_sums, strict=True)]
        self.max_p = max(self.max_p, later.max_p)
        self.strength_sum += later.strength_sum
        if later.novelty_max is not None:
            self.novelty_max = max(self.novelty_max or 0.0, later.novelty_max)
        self.power_sum += later.power_sum
        self.peak_dbfs = max(self.peak_dbfs, later.peak_dbfs)
        self.clipping = self.clipping or later.clipping
        self.silent = self.silent and later.silent

    def level(self) -> Level:
        mean_power = self.power_sum / self.count
        return Level(
            rms_dbfs=10.0 * math.log10(mean_power) if mean_power > 0 else -math.inf,
            peak_dbfs=self.peak_dbfs,
            clipping=self.clipping,
            silent=self.silent,
        )


def _spans_from_first_vote(
    history: Iterable[tuple[WindowResult, bool, bool]], new_span: Callable[[], _Span]
) -> tuple[_Span, _Span]:
    """An anomaly's spans at its start, from ``(window, voted, present)`` entries.

    The anomaly begins at its first vote. From there, windows up to the last
    one where the fault is present are committed; those after it are pending
    (they join the anomaly only if the fault shows again).
    """
    committed, pending = new_span(), new_span()
    started = False
    for window, voted, present in history:
        started = started or voted
        if not started:
            continue
        if present:
            committed.absorb(pending)
            committed.add(window)
            pending = new_span()
        else:
            pending.add(window)
    return committed, pending


@dataclass
class _Active:
    anomaly_id: str
    class_idx: int
    # Windows through the last one where the class was present ...
    committed: _Span
    # ... and the windows after it, which join the span only if the class is
    # present again before the anomaly ends.
    pending: _Span


class DecisionState:
    """The decision state machine (semantics in the module docstring).

    ``config`` is the ``decision`` section of the config as it is;
    ``classes`` says what the model's outputs are. Raises
    :class:`DecisionConfigError` if the thresholds name a class the model does
    not have. ``new_anomaly_id`` makes anomaly ids (default: uuid4 strings);
    tests may inject a deterministic one.
    """

    def __init__(
        self,
        config: DecisionConfig,
        classes: ModelClasses,
        *,
        new_anomaly_id: Callable[[], str] | None = None,
    ) -> None:
        self._classes = classes
        self._new_id = new_anomaly_id or (lambda: str(uuid.uuid4()))
        names = classes.names
        self._names = names
        self._normal_idx = names.index(classes.normal)
        self._fault_idx = tuple(i for i, n in enumerate(names) if i != self._normal_idx)
        self._config = config
        self._set_thresholds(config)
        # class index -> (stream time the end was decided, cooldown end)
        self._cooldowns: dict[int, tuple[float, float]] = {}
        self._history: deque[tuple[WindowResult, int | None]]
        self._windows_seen: int
        self._active: _Active | None
        self._last_window: WindowResult | None
        self._snapshot: DecisionSnapshot
        self._clear()

    def _set_thresholds(self, config: DecisionConfig) -> None:
        pairs = class_thresholds(config, self._classes)
        never = (math.inf, math.inf)  # the normal class never votes
        self._on = tuple(pairs.get(n, never)[0] for n in self._names)
        self._off = tuple(pairs.get(n, never)[1] for n in self._names)

    @property
    def config(self) -> DecisionConfig:
        return self._config

    @property
    def classes(self) -> ModelClasses:
        return self._classes

    def reconfigure(self, config: DecisionConfig) -> None:
        """Apply new controls live (a config patch), keeping the stream's state.

        The active anomaly, the recent windows and cooldowns are kept; the new
        thresholds and K/N apply from the next window. Votes already recorded
        keep the thresholds they were cast under. Raises
        :class:`DecisionConfigError` (and changes nothing) if the thresholds
        name a class the model does not have.
        """
        self._set_thresholds(config)
        self._config = config
        self._history = deque(self._history, maxlen=config.confirm_n)

    @property
    def current(self) -> DecisionSnapshot:
        """The state after the last window (replaced atomically, never mutated)."""
        return self._snapshot

    def would_vote(self, probabilities: tuple[float, ...]) -> str | None:
        """The fault class these probabilities vote for at the thresholds in force, if any."""
        vote = self._vote(probabilities)
        return None if vote is None else self._names[vote]

    def update(self, window: WindowResult) -> list[DecisionOutput]:
        """Decide on one window.

        Returns, in order: an :class:`AnomalyEnded` if an anomaly ended, an
        :class:`AnomalyStarted` if one started, and always one
        :class:`WindowState` last. Raises ``ValueError`` if the probabilities do
        not match the configured classes.
        """
        self._check(window)
        cfg = self._config
        probs = window.probabilities
        self._windows_seen += 1
        warming = self._windows_seen <= cfg.warmup_windows
        muted = cfg.suppress_when_silent and window.level.silent
        vote = None if warming or muted else self._vote(probs)
        self._history.append((window, vote))
        self._last_window = window
        out: list[DecisionOutput] = []

        active = self._active
        if active is not None:
            c = active.class_idx
            if self._present(window, c):
                active.committed.absorb(active.pending)
                active.committed.add(window)
                active.pending = _Span(c, len(self._names))
            else:
                active.pending.add(window)
            if sum(self._present(w, c) for w, _ in self._history) < cfg.confirm_k:
                out.append(self._end(window, "cleared"))

        if not warming and not muted:
            candidate = self._candidate(window)
            if candidate is not None:
                if self._active is not None:
                    out.append(self._end(window, "class_change"))
                out.append(self._start(candidate, window))

        active = self._active
        out.append(
            WindowState(
                window=window,
                top_class=_top_class(probs, self._names),
                vote=None if vote is None else self._names[vote],
                active_class=None if active is None else self._names[active.class_idx],
                anomaly_id=None if active is None else active.anomaly_id,
                warming_up=warming,
            )
        )
        self._publish_snapshot(warming=warming)
        return out

    def reset(self) -> list[AnomalyEnded]:
        """Forget the stream (after a source discontinuity); warm-up starts again.

        Returns the :class:`AnomalyEnded` (reason ``"reset"``) of the anomaly
        that was active, if any. Cooldowns are kept.
        """
        out = self._close("reset")
        self._clear()
        return out

    def finish(self) -> list[AnomalyEnded]:
        """The stream ended: close any active anomaly (reason ``"stream_end"``).

        Afterwards the state is as new (cooldowns included), ready for another
        stream.
        """
        out = self._close("stream_end")
        self._clear()
        self._cooldowns.clear()
        return out

    # -- internals ---------------------------------------------------------

    def _clear(self) -> None:
        self._history = deque(maxlen=self._config.confirm_n)
        self._windows_seen = 0
        self._active = None
        self._last_window = None
        self._publish_snapshot(warming=self._config.warmup_windows > 0)

    def _close(self, reason: EndReason) -> list[AnomalyEnded]:
        if self._active is None or self._last_window is None:
            return []
        ended = self._end(self._last_window, reason)
        logger.debug("anomaly %s closed on %s", ended.class_name, reason)
        return [ended]

    def _check(self, window: WindowResult) -> None:
        _check_probabilities(window, self._names)

    def _vote(self, probs: tuple[float, ...]) -> int | None:
        best: int | None = None
        for i in self._fault_idx:
            if probs[i] >= self._on[i] and (best is None or probs[i] > probs[best]):
                best = i
        return best

    def _present(self, window: WindowResult, class_idx: int) -> bool:
        if self._config.suppress_when_silent and window.level.silent:
            return False
        return window.probabilities[class_idx] >= self._off[class_idx]

    def _in_cooldown(self, class_idx: int, now_s: float) -> bool:
        entry = self._cooldowns.get(class_idx)
        if entry is None:
            return False
        ended_s, until_s = entry
        return ended_s <= now_s < until_s

    def _candidate(self, window: WindowResult) -> int | None:
        """The fault class that qualifies to start on this window, if any."""
        votes: dict[int, int] = {}
        weight: dict[int, float] = {}
        for w, v in self._history:
            if v is not None:
                votes[v] = votes.get(v, 0) + 1
                weight[v] = weight.get(v, 0.0) + w.probabilities[v]
        active = None if self._active is None else self._active.class_idx
        qualified = [
            c
            for c, n in votes.items()
            if n >= self._config.confirm_k
            and c != active
            and not self._in_cooldown(c, window.end_s)
        ]
        if not qualified:
            return None
        return max(qualified, key=lambda c: (votes[c], weight[c]))

    def _start(self, class_idx: int, window: WindowResult) -> AnomalyStarted:
        n = len(self._names)
        committed, pending = _spans_from_first_vote(
            ((w, v == class_idx, self._present(w, class_idx)) for w, v in self._history),
            lambda: _Span(class_idx, n),
        )
        active = _Active(self._new_id(), class_idx, committed, pending)
        self._active = active
        report = AnomalyStarted(**self._report_fields(active, window))
        # DEBUG: the runtime reports each event once (a console sink prints it).
        logger.debug(
            "anomaly started: %s at window %d (stream %.1f-%.1f s, p_max %.2f)",
            report.class_name,
            window.index,
            report.stream_start_s,
            report.stream_end_s,
            report.probability_max,
        )
        return report

    def _end(self, window: WindowResult, reason: EndReason) -> AnomalyEnded:
        active = self._active
        assert active is not None  # callers check
        report = AnomalyEnded(**self._report_fields(active, window), reason=reason)
        self._cooldowns[active.class_idx] = (window.end_s, window.end_s + self._config.cooldown_s)
        self._active = None
        logger.debug(
            "anomaly ended (%s): %s at window %d (stream %.1f-%.1f s)",
            reason,
            report.class_name,
            window.index,
            report.stream_start_s,
            report.stream_end_s,
        )
        return report

    def _report_fields(self, active: _Active, window: WindowResult) -> dict[str, Any]:
        span = active.committed
        assert span.first is not None and span.last is not None  # a span starts with a vote
        c = active.class_idx
        return {
            "anomaly_id": active.anomaly_id,
            "class_name": self._names[c],
            "first_window_index": span.first.index,
            "last_window_index": span.last.index,
            "window_count": span.count,
            "stream_start_s": span.first.start_s,
            "stream_end_s": span.last.end_s,
            "wall_start": span.first.wall_start,
            "wall_end": span.last.captured_at,
            "probability_max": span.max_p,
            "probability_mean": span.prob_sums[c] / span.count,
            "mean_probabilities": tuple(s / span.count for s in span.prob_sums),
            "level": span.level(),
            "decided_stream_s": window.end_s,
        }

    def _publish_snapshot(self, *, warming: bool) -> None:
        active = self._active
        first = None if active is None else active.committed.first
        self._snapshot = DecisionSnapshot(
            active_class=None if active is None else self._names[active.class_idx],
            anomaly_id=None if active is None else active.anomaly_id,
            active_since_s=None if first is None else first.start_s,
            active_since_wall=None if first is None else first.wall_start,
            windows_seen=self._windows_seen,
            warming_up=warming,
            last_window_index=None if self._last_window is None else self._last_window.index,
        )


def _check_probabilities(window: WindowResult, names: tuple[str, ...]) -> None:
    """Refuse probabilities that do not match the classes (a wiring error)."""
    probs = window.probabilities
    if len(probs) != len(names):
        raise ValueError(
            f"window {window.index}: {len(probs)} probabilities for "
            f"{len(names)} classes {list(names)}"
        )
    for name, p in zip(names, probs, strict=True):
        if not (math.isfinite(p) and -_PROBABILITY_SLACK <= p <= 1.0 + _PROBABILITY_SLACK):
            raise ValueError(f"window {window.index}: p({name}) = {p} is not a probability")


def _top_class(probs: tuple[float, ...], names: tuple[str, ...]) -> str:
    return names[max(range(len(probs)), key=probs.__getitem__)]


# --- decisions on the unit's baseline ------------------------------------------------------

#: The class of an anomaly that the baseline found and the classifier does not name.
UNKNOWN_CLASS = "unknown"


@dataclass(frozen=True)
class _Judged:
    """One judged window in a :class:`NoveltyDecision`'s history."""

    window: WindowResult
    novel: bool  # votes: novelty above the threshold
    present: bool  # novelty above the off level
    named: int | None  # the fault class the classifier is confident of, if it votes


@dataclass
class _NoveltyActive:
    anomaly_id: str
    class_idx: int | None  # None: unknown
    committed: _Span
    pending: _Span


#: What a unit's shaft speed over its own nominal speed says about a departure, by
#: the fan's physics (docs/baseline.md): clogging raises the speed 5-15 %, a voltage
#: change moves it to 0.65-0.80 or 1.20-1.35 of nominal, imbalance and the faults no
#: class names leave it. Rows up to each ratio: the classes consistent with the
#: departure, and the class the speed alone names (the margins allow somewhat
#: weaker and stronger faults than stated).
SPEED_EVIDENCE: Final[tuple[tuple[float, tuple[str, ...], str | None], ...]] = (
    (0.88, ("voltage_change",), "voltage_change"),
    (0.96, ("voltage_change",), None),
    (1.03, ("imbalance",), None),
    (1.04, ("clogging",), None),
    (1.12, ("clogging",), "clogging"),
    (1.20, ("clogging", "voltage_change"), None),
    (math.inf, ("voltage_change",), "voltage_change"),
)


def _speed_rows(
    names: tuple[str, ...],
) -> tuple[tuple[float, frozenset[int], int | None], ...] | None:
    """:data:`SPEED_EVIDENCE` in class indices; None for a model without the fan's classes."""
    wanted = {c for _, consistent, _ in SPEED_EVIDENCE for c in consistent}
    if not wanted <= set(names):
        return None
    return tuple(
        (
            upper,
            frozenset(names.index(c) for c in consistent),
            None if named is None else names.index(named),
        )
        for upper, consistent, named in SPEED_EVIDENCE
    )


class NoveltyDecision:
    """Decisions on the unit's baseline, once it is learned (semantics below).

    K = ``baseline.confirm_k``, N = ``baseline.confirm_n``; the last N are the
    last N *judged* windows since start or :meth:`reset`.

    * **Judged.** A window with a ``no_verdict`` (dropout, clipping: the
      classifier's unknown for bad quality) or without a novelty reading casts
      no vote either way: it does not enter the last N at all.
    * **Vote.** A judged window votes when its novelty score is above the
      baseline's threshold (and it is past warm-up and, with
      ``suppress_when_silent``, not silent). A voting window also *names* a
      fault class when the classifier is confident of it: its probability
      reaches ``max(on, baseline.name_on)`` (``on``: the class's threshold in
      ``decision.thresholds``, else the bundle's); the most probable such class.
    * **Present.** While an anomaly is active, a judged window keeps it
      present when its novelty is above ``off_ratio`` x threshold (hysteresis)
      and it is not muted as silent.
    * **Start.** An anomaly starts when at least K of the last N windows vote,
      unless it is within ``decision.cooldown_s`` of the end of the previous
      one. Its class is the fault class named by most (more than half) of
      the voting windows among the last N; otherwise ``unknown``.
    * **Naming later.** While an anomaly is active, if at least K of the last N
      windows vote and more than half of them name a fault class other than
      the active one, the anomaly ends (``class_change``) and one of that class
      starts on the same window. It never changes back to ``unknown``.
    * **End.** ``cleared`` when fewer than K of the last N windows are present;
      ``reset`` / ``stream_end`` as in :class:`DecisionState`.
    * **Span and reports** as in :class:`DecisionState`, from the first voting
      window in the last N. The followed probability is the named class's, or
      ``1 - p(normal)`` for ``unknown``. Reports carry the highest novelty
      over the span with the threshold in force, and the baseline's id.

    A fault the classifier names while the novelty stays low raises nothing:
    the unit's own normal wins.
    """

    def __init__(
        self,
        config: DecisionConfig,
        baseline: BaselineConfig,
        classes: ModelClasses,
        *,
        new_anomaly_id: Callable[[], str] | None = None,
    ) -> None:
        self._classes = classes
        self._names = classes.names
        self._normal_idx = classes.names.index(classes.normal)
        self._new_id = new_anomaly_id or (lambda: str(uuid.uuid4()))
        self._cooldown_until: tuple[float, float] | None = None
        self.reconfigure(config, baseline)
        self._history: deque[_Judged]
        self._windows_seen: int
        self._active: _NoveltyActive | None
        self._last_window: WindowResult | None
        self._snapshot: DecisionSnapshot
        self._clear()

    def reconfigure(self, config: DecisionConfig, baseline: BaselineConfig) -> None:
        """New controls from the next window on; the state of the stream is kept."""
        pairs = class_thresholds(config, self._classes)
        self._on = tuple(
            max(pairs[n][0], baseline.name_on) if n in pairs else math.inf for n in self._names
        )
        self._config = config
        self._baseline = baseline
        self._speed_rows = _speed_rows(self._names) if baseline.name_by_speed else None
        if hasattr(self, "_history"):
            self._history = deque(self._history, maxlen=baseline.confirm_n)

    @property
    def current(self) -> DecisionSnapshot:
        return self._snapshot

    def update(self, window: WindowResult) -> list[DecisionOutput]:
        """Decide on one window: ends, starts, then always one :class:`WindowState`."""
        _check_probabilities(window, self._names)
        cfg, base = self._config, self._baseline
        novelty = window.novelty
        self._windows_seen += 1
        warming = self._windows_seen <= cfg.warmup_windows
        out: list[DecisionOutput] = []
        vote: str | None = None
        if window.no_verdict is None and novelty is not None:
            muted = cfg.suppress_when_silent and window.level.silent
            novel = not warming and not muted and novelty.score > novelty.threshold
            named = self._named(window.probabilities, novelty) if novel else None
            present = not muted and novelty.score > base.off_ratio * novelty.threshold
            self._history.append(_Judged(window, novel, present, named))
            self._last_window = window
            if novel:
                vote = UNKNOWN_CLASS if named is None else self._names[named]
            out.extend(self._decide(window, present))
        active = self._active
        out.append(
            WindowState(
                window=window,
                top_class=_top_class(window.probabilities, self._names),
                vote=vote,
                active_class=None if active is None else self._class_name(active.class_idx),
                anomaly_id=None if active is None else active.anomaly_id,
                warming_up=warming,
            )
        )
        self._publish_snapshot(warming)
        return out

    def reset(self) -> list[AnomalyEnded]:
        """Forget the stream (a source gap, another baseline); the cooldown is kept."""
        out = self._close("reset")
        self._clear()
        return out

    def finish(self) -> list[AnomalyEnded]:
        """The stream ended: close any active anomaly (``stream_end``); as new afterwards."""
        out = self._close("stream_end")
        self._clear()
        self._cooldown_until = None
        return out

    # -- internals ---------------------------------------------------------------------------

    def _decide(self, window: WindowResult, present: bool) -> list[DecisionOutput]:
        out: list[DecisionOutput] = []
        k = self._baseline.confirm_k
        active = self._active
        if active is not None:
            if present:
                active.committed.absorb(active.pending)
                active.committed.add(window)
                active.pending = self._span(active.class_idx)
            else:
                active.pending.add(window)
            if sum(j.present for j in self._history) < k:
                out.append(self._end(window, "cleared"))
        votes = [j for j in self._history if j.novel]
        if len(votes) < k:
            return out
        named = self._majority(votes)
        if self._active is None:
            if not self._in_cooldown(window.end_s):
                out.append(self._start(named, window))
        elif named is not None and named != self._active.class_idx:
            out.append(self._end(window, "class_change"))
            out.append(self._start(named, window))
        return out

    def _named(self, probs: tuple[float, ...], novelty: NoveltyReading) -> int | None:
        sure = [i for i, p in enumerate(probs) if i != self._normal_idx and p >= self._on[i]]
        consistent, identified = self._speed_evidence(novelty.speed_ratio)
        if identified is not None:
            # The speed names it unless the classifier is sure of another fault: the
            # speed estimate of a window can fail (a harmonic taken for the shaft).
            return identified if all(i == identified for i in sure) else None
        best: int | None = None
        for i in sure:
            if consistent is not None and i not in consistent:
                continue
            if best is None or probs[i] > probs[best]:
                best = i
        return best

    def _speed_evidence(self, ratio: float | None) -> tuple[frozenset[int] | None, int | None]:
        """The classes a window's speed ratio is consistent with, and the one it names.

        ``(None, None)``: the speed says nothing (off, unmeasured, or a model
        without the fan's classes).
        """
        if ratio is None or self._speed_rows is None:
            return None, None
        for upper, consistent, identified in self._speed_rows:
            if ratio <= upper:
                return consistent, identified
        return None, None

    @staticmethod
    def _majority(votes: list[_Judged]) -> int | None:
        counts: dict[int, int] = {}
        for j in votes:
            if j.named is not None:
                counts[j.named] = counts.get(j.named, 0) + 1
        for c, n in counts.items():
            if 2 * n > len(votes):
                return c
        return None

    def _class_name(self, class_idx: int | None) -> str:
        return UNKNOWN_CLASS if class_idx is None else self._names[class_idx]

    def _span(self, class_idx: int | None) -> _Span:
        return _Span(class_idx, len(self._names), self._normal_idx)

    def _in_cooldown(self, now_s: float) -> bool:
        if self._cooldown_until is None:
            return False
        ended_s, until_s = self._cooldown_until
        return ended_s <= now_s < until_s

    def _start(self, class_idx: int | None, window: WindowResult) -> AnomalyStarted:
        committed, pending = _spans_from_first_vote(
            ((j.window, j.novel, j.present) for j in self._history),
            lambda: self._span(class_idx),
        )
        active = _NoveltyActive(self._new_id(), class_idx, committed, pending)
        self._active = active
        report = AnomalyStarted(**self._report_fields(active, window))
        logger.debug(
            "novelty anomaly started: %s at window %d (novelty %s)",
            report.class_name,
            window.index,
            report.novelty,
        )
        return report

    def _end(self, window: WindowResult, reason: EndReason) -> AnomalyEnded:
        active = self._active
        assert active is not None  # callers check
        report = AnomalyEnded(**self._report_fields(active, window), reason=reason)
        self._cooldown_until = (window.end_s, window.end_s + self._config.cooldown_s)
        self._active = None
        logger.debug("novelty anomaly ended (%s): %s", reason, report.class_name)
        return report

    def _close(self, reason: EndReason) -> list[AnomalyEnded]:
        if self._active is None or self._last_window is None:
            return []
        return [self._end(self._last_window, reason)]

    def _report_fields(self, active: _NoveltyActive, window: WindowResult) -> dict[str, Any]:
        span = active.committed
        assert span.first is not None and span.last is not None  # a span starts with a vote
        threshold = window.novelty.threshold if window.novelty is not None else math.nan
        novelty = None if span.novelty_max is None else NoveltyReading(span.novelty_max, threshold)
        return {
            "anomaly_id": active.anomaly_id,
            "class_name": self._class_name(active.class_idx),
            "first_window_index": span.first.index,
            "last_window_index": span.last.index,
            "window_count": span.count,
            "stream_start_s": span.first.start_s,
            "stream_end_s": span.last.end_s,
            "wall_start": span.first.wall_start,
            "wall_end": span.last.captured_at,
            "probability_max": span.max_p,
            "probability_mean": span.strength_sum / span.count,
            "mean_probabilities": tuple(x / span.count for x in span.prob_sums),
            "level": span.level(),
            "decided_stream_s": window.end_s,
            "novelty": novelty,
            "baseline_id": None if window.baseline is None else window.baseline.baseline_id,
        }

    def _clear(self) -> None:
        self._history = deque(maxlen=self._baseline.confirm_n)
        self._windows_seen = 0
        self._active = None
        self._last_window = None
        self._publish_snapshot(self._config.warmup_windows > 0)

    def _publish_snapshot(self, warming: bool) -> None:
        active = self._active
        first = None if active is None else active.committed.first
        self._snapshot = DecisionSnapshot(
            active_class=None if active is None else self._class_name(active.class_idx),
            anomaly_id=None if active is None else active.anomaly_id,
            active_since_s=None if first is None else first.start_s,
            active_since_wall=None if first is None else first.wall_start,
            windows_seen=self._windows_seen,
            warming_up=warming,
            last_window_index=None if self._last_window is None else self._last_window.index,
        )
