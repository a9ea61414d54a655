"""Typed messages from the decision stage to the sinks, their one wire format, and ``seq``.

Two kinds of message leave the module:

* :class:`Event`: ``anomaly_started`` / ``anomaly_ended``, schema
  ``schemas/event.schema.json``. Each has a unique ``event_id`` (uuid4) and a
  ``seq`` that only increases, across restarts too. The started event's
  ``event_id`` is the decision's ``anomaly_id``, and the ended event repeats
  it as ``started_event_id``; so the pair is linked without the factory
  keeping state, and rebuilding a started event gives the same id (a receiver
  can de-duplicate on it). ``Message``/``Probabilities`` are the reference service's fields
  and describe the anomaly the event reports: ``Probabilities`` is each
  class's mean over the anomaly's windows (so ``Probabilities[class] ==
  probability_mean``). ``Anomaly`` says whether the event leaves the machine
  anomalous: true on ``anomaly_started``, false on ``anomaly_ended``.
* :class:`State`: one per window, schema ``schemas/state.schema.json``. The
  window's own verdict is ``class`` (its most probable class),
  ``Probabilities`` and ``vote`` (the fault class it voted for, if any); the
  confirmed state is ``active_class``/``anomaly_id`` and the reference service'
  ``Anomaly``/``Message``, which follow the active anomaly: a single window
  that looks faulty is a vote, never ``"Anomaly": true``. States carry no
  ``event_id``/``seq``: they are snapshots for dashboards, not events, and
  keeping them off the counter makes ``seq`` the sequence of anomaly events
  alone, where a gap means a restart (below), never a state a sink chose not
  to keep.

:func:`to_wire` is the only place the wire format is made (key names and
order, rounding, ISO times); every sink publishes what it returns
(:func:`wire_json`). A field added later (say a per-unit novelty score) is a
new optional attribute of :class:`Event`/:class:`State` with a default of
``None``, one line in :func:`to_wire` that writes it when it is set, and an
optional property in the schema: no sink changes.

Times: ``stream_*_s`` are stream seconds from sample counts; ``time_start``/
``time_end`` are ISO 8601 UTC wall-clock times of the span's first and last
sample, or ``null`` when the source does not know them (a file);
``emitted_at`` is when the message was built.

:func:`validate_event` checks a message against its schema; it needs
``jsonschema``, which is imported lazily and is not a runtime dependency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, overload

from soundwatch.decision import (
    UNKNOWN_CLASS,
    AnomalyEnded,
    AnomalyReport,
    AnomalyStarted,
    DecisionOutput,
    EndReason,
    WindowState,
)
from soundwatch.stream_types import BaselineVerdict, LearningProgress, Level, NoveltyReading

if TYPE_CHECKING:
    from soundwatch.bundle import Bundle

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# JSON has no -inf; digital silence is reported at this floor (as the
# windowing stage does).
LEVEL_FLOOR_DBFS = -200.0
_PROB_DIGITS = 6
_TIME_DIGITS = 6
_DB_DIGITS = 2
_NOVELTY_DIGITS = 4
#: The message of an anomaly the unit's baseline found and no class names.
NOVELTY_MESSAGE = "Sound differs from this unit's normal"


class SequenceError(RuntimeError):
    """The sequence counter's file cannot be used."""


class EventValidationError(ValueError):
    """A message does not follow its JSON Schema; the text lists every violation."""


class SequenceCounter:
    """Hands out strictly increasing integers, also across process restarts.

    With a ``path``, the file holds a *ceiling*: a value above every number
    handed out so far, and no number at or above the stored ceiling is ever
    handed out. Numbers are reserved in blocks of ``block_size``, ahead of
    need: when half a block or less is left below the stored ceiling, the
    next ceiling (one block higher) is written atomically (temp file, fsync,
    rename, fsync of the directory). After a restart counting resumes at the
    stored ceiling, skipping what was left: a restart leaves a gap of at most
    one and a half blocks, and there is one fsync per ``block_size`` numbers.
    (Only anomaly events take numbers, which are rare, so this mostly bounds
    the cost if a misconfiguration makes them frequent.)

    If the next ceiling cannot be written (a full disk), counting goes on
    below the stored one, which leaves up to half a block of room to recover,
    and every later number retries the write. Once the stored ceiling is
    reached, :meth:`next` raises :class:`SequenceError` instead of handing
    out a number that a restart would hand out again: the caller holds the
    event until a number can be had (:attr:`last_error` says why meanwhile).

    Without a ``path`` the counter lives in memory and restarts at 1. If the
    stored file is unreadable, counting starts from the wall clock in
    milliseconds, which is above any value a sane counter reached, and an
    error is logged. Thread-safe.
    """

    def __init__(self, path: Path | str | None = None, *, block_size: int = 100) -> None:
        if block_size < 1:
            raise ValueError(f"block_size is {block_size}; it must be >= 1")
        self._lock = threading.Lock()
        self._path = None if path is None else Path(path)
        self._block = block_size
        self.last_error: str | None = None
        if self._path is None:
            self._next = 1
            self._ceiling: float = math.inf
        else:
            self._next = self._load(self._path)
            # Nothing reserved yet: the first next() writes the first block,
            # so a run that emits no event does not touch the disk.
            self._ceiling = self._next
        self._last: int | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def last(self) -> int | None:
        """The last number handed out by this instance, if any."""
        return self._last

    def next(self) -> int:
        """The next number; strictly greater than every earlier one, here and before a restart.

        Raises :class:`SequenceError` when the number would reach the stored
        ceiling and a higher one cannot be written.
        """
        with self._lock:
            if self._ceiling - self._next <= self._block // 2:
                self._reserve(max(self._ceiling, self._next) + self._block)
            if self._next >= self._ceiling:
                raise SequenceError(
                    f"{self.last_error}; seq {self._next} is not handed out: a restart "
                    "could hand it out again"
                )
            value = self._next
            self._next += 1
            self._last = value
            return value

    def _reserve(self, ceiling: int | float) -> None:
        assert self._path is not None  # an in-memory counter never runs out
        try:
            _write_atomic(self._path, f"{int(ceiling)}\n")
        except OSError as e:
            if self.last_error is None:  # once per episode: every event retries
                logger.error(
                    "cannot persist sequence ceiling to %s: %s; %d number(s) left below "
                    "the stored ceiling, then events wait until it can be written",
                    self._path,
                    e,
                    max(0, int(self._ceiling) - self._next),
                )
            self.last_error = f"cannot persist sequence ceiling to {self._path}: {e}"
            return
        if self.last_error is not None:
            logger.warning("sequence ceiling persisted to %s again", self._path)
        self.last_error = None
        self._ceiling = ceiling

    @staticmethod
    def _load(path: Path) -> int:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 1
        except (OSError, UnicodeDecodeError) as e:
            return _fallback_start(path, e)
        try:
            value = int(text.strip())
        except ValueError as e:
            return _fallback_start(path, e)
        if value < 1:
            return _fallback_start(path, ValueError(f"stored ceiling {value} < 1"))
        return value


def _fallback_start(path: Path, error: Exception) -> int:
    start = int(time.time() * 1000)
    logger.error("sequence file %s unusable (%s); starting at %d", path, error, start)
    return start


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself is durable only once the directory is synced.
    with contextlib.suppress(OSError):  # some filesystems refuse O_RDONLY dirs
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def iso_utc(t: float | None) -> str | None:
    """``time.time()`` value as ISO 8601 UTC with milliseconds and ``Z``."""
    if t is None:
        return None
    stamp = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


EventKind = Literal["anomaly_started", "anomaly_ended"]


@dataclass(frozen=True)
class Origin:
    """Who reports: the same on every message of one pipeline."""

    device_id: str
    module_id: str
    model_version: str


@dataclass(frozen=True)
class Ending:
    """What only an ``anomaly_ended`` event carries."""

    started_event_id: str
    reason: EndReason
    duration_s: float


@dataclass(frozen=True)
class Event:
    """An anomaly event (see the module docstring; wire: ``event.schema.json``).

    Times are seconds: ``wall_*`` and ``emitted_at`` are ``time.time()``
    values (``wall_*`` ``None`` without a wall clock), the rest stream time.
    ``ending`` is set exactly on ``anomaly_ended`` events.
    """

    kind: EventKind
    seq: int
    event_id: str
    origin: Origin
    class_name: str
    anomaly: bool
    message: str
    probabilities: Mapping[str, float]
    probability_max: float
    probability_mean: float
    stream_start_s: float
    stream_end_s: float
    decided_stream_s: float
    wall_start: float | None
    wall_end: float | None
    emitted_at: float
    first_window_index: int
    last_window_index: int
    window_count: int
    level: Level
    ending: Ending | None = None
    # The unit's baseline: None when it is off (the keys are left out);
    # otherwise its id and the anomaly's highest novelty, both None while
    # the baseline is being learned (the classifier decided).
    baseline: BaselineVerdict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "probabilities", MappingProxyType(dict(self.probabilities)))
        if (self.kind == "anomaly_ended") != (self.ending is not None):
            raise ValueError(f"{self.kind} event: `ending` is set exactly on anomaly_ended")


@dataclass(frozen=True)
class State:
    """The state after one window (see the module docstring; wire: ``state.schema.json``).

    ``class_name``/``probabilities``/``vote`` are this window's verdict;
    ``active_class``/``anomaly_id`` and ``anomaly``/``message`` the confirmed state.
    """

    origin: Origin
    window_index: int
    class_name: str
    anomaly: bool
    message: str
    probabilities: Mapping[str, float]
    vote: str | None
    active_class: str | None
    anomaly_id: str | None
    warming_up: bool
    stream_start_s: float
    stream_end_s: float
    wall_start: float | None
    wall_end: float | None
    emitted_at: float
    level: Level
    # The unit's baseline on this window: None when it is off (the keys are
    # left out); while learning, its progress.
    baseline: BaselineVerdict | None = None

    kind: ClassVar[str] = "state"

    def __post_init__(self) -> None:
        object.__setattr__(self, "probabilities", MappingProxyType(dict(self.probabilities)))


Message: TypeAlias = Event | State


# --- the wire format ---------------------------------------------------------------


def _db(value: float) -> float:
    return (
        round(max(value, LEVEL_FLOOR_DBFS), _DB_DIGITS)
        if not math.isnan(value)
        else LEVEL_FLOOR_DBFS
    )


def _level(level: Level) -> dict[str, Any]:
    return {
        "rms_dbfs": _db(level.rms_dbfs),
        "peak_dbfs": _db(level.peak_dbfs),
        "clipping": bool(level.clipping),
        "silent": bool(level.silent),
    }


def _p(value: float) -> float:
    # Float rounding may put a softmax output a hair outside [0, 1].
    return round(min(max(value, 0.0), 1.0), _PROB_DIGITS)


def _s(value: float) -> float:
    return round(value, _TIME_DIGITS)


def _novelty(novelty: NoveltyReading | None) -> dict[str, float] | None:
    if novelty is None:
        return None
    return {
        "score": round(novelty.score, _NOVELTY_DIGITS),
        "threshold": round(novelty.threshold, _NOVELTY_DIGITS),
    }


def _learning(progress: LearningProgress | None) -> dict[str, float] | None:
    if progress is None:
        return None
    return {"learned_s": round(progress.learned_s, 1), "learn_s": round(progress.learn_s, 1)}


def _origin(origin: Origin) -> dict[str, Any]:
    return {
        "device_id": origin.device_id,
        "module_id": origin.module_id,
        "model_version": origin.model_version,
    }


def to_wire(message: Message) -> dict[str, Any]:
    """The JSON document for a message: the module's one wire format.

    Key names and order, rounding (probabilities 6 digits, clamped to [0, 1];
    times 6 digits; levels 2 digits with -200 dBFS for silence) and ISO times
    are made here and nowhere else.
    """
    if isinstance(message, State):
        state = {
            "schema_version": SCHEMA_VERSION,
            "type": "state",
            **_origin(message.origin),
            "window_index": message.window_index,
            "class": message.class_name,
            "Anomaly": message.anomaly,
            "Message": message.message,
            "Probabilities": {c: _p(p) for c, p in message.probabilities.items()},
            "vote": message.vote,
            "active_class": message.active_class,
            "anomaly_id": message.anomaly_id,
            "warming_up": message.warming_up,
            "stream_start_s": _s(message.stream_start_s),
            "stream_end_s": _s(message.stream_end_s),
            "time_start": iso_utc(message.wall_start),
            "time_end": iso_utc(message.wall_end),
            "emitted_at": iso_utc(message.emitted_at),
            "level": _level(message.level),
        }
        if message.baseline is not None:
            state["novelty"] = _novelty(message.baseline.novelty)
            state["baseline_id"] = message.baseline.baseline_id
            state["learning"] = _learning(message.baseline.learning)
        return state
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": message.kind,
        "seq": message.seq,
        **_origin(message.origin),
        "class": message.class_name,
        "Anomaly": message.anomaly,
        "Message": message.message,
        "Probabilities": {c: _p(p) for c, p in message.probabilities.items()},
        "probability_max": _p(message.probability_max),
        "probability_mean": _p(message.probability_mean),
        "stream_start_s": _s(message.stream_start_s),
        "stream_end_s": _s(message.stream_end_s),
        "decided_stream_s": _s(message.decided_stream_s),
        "time_start": iso_utc(message.wall_start),
        "time_end": iso_utc(message.wall_end),
        "emitted_at": iso_utc(message.emitted_at),
        "first_window_index": message.first_window_index,
        "last_window_index": message.last_window_index,
        "window_count": message.window_count,
        "level": _level(message.level),
        "event_id": message.event_id,
    }
    if message.ending is not None:
        doc["started_event_id"] = message.ending.started_event_id
        doc["duration_s"] = _s(message.ending.duration_s)
        doc["reason"] = message.ending.reason
    if message.baseline is not None:
        doc["novelty"] = _novelty(message.baseline.novelty)
        doc["baseline_id"] = message.baseline.baseline_id
    return doc


def json_bytes(doc: Any) -> bytes:
    """Compact UTF-8 JSON, as everything the module publishes is written.

    Raises ``ValueError`` for NaN or infinity (not JSON) and ``TypeError``
    for values JSON has no form for.
    """
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def wire_json(message: Message) -> bytes:
    """:func:`to_wire` as compact UTF-8 JSON: the payload every sink publishes."""
    return json_bytes(to_wire(message))


# --- building messages from decision outputs -------------------------------------------


class EventFactory:
    """Builds the module's typed messages from decision outputs.

    ``messages`` maps every class to its human message (the reference service'
    ``Message``). ``clock`` gives ``emitted_at`` (default ``time.time``).
    Building an anomaly event takes a number from ``sequence``; use one
    factory per pipeline so that ``seq`` follows emission order. With
    ``baseline``, messages carry the unit's baseline (``novelty``,
    ``baseline_id``, and for states ``learning``), and an ``unknown`` anomaly
    says :data:`NOVELTY_MESSAGE`.
    """

    def __init__(
        self,
        device_id: str,
        module_id: str,
        model_version: str,
        class_names: Sequence[str],
        messages: Mapping[str, str],
        sequence: SequenceCounter,
        *,
        normal_class: str = "normal",
        clock: Callable[[], float] = time.time,
        baseline: bool = False,
    ) -> None:
        missing = [c for c in class_names if c not in messages]
        if missing:
            raise ValueError(f"no message for classes {missing}")
        if normal_class not in class_names:
            raise ValueError(f"normal_class {normal_class!r} is not in {list(class_names)}")
        for label, value in (("device_id", device_id), ("module_id", module_id)):
            if not value:
                raise ValueError(f"{label} must not be empty")
        self.origin = Origin(device_id, module_id, model_version)
        self._names = tuple(class_names)
        self._messages = {c: messages[c] for c in self._names}
        self._baseline = baseline
        self._messages.setdefault(UNKNOWN_CLASS, NOVELTY_MESSAGE)
        self._normal = normal_class
        self._sequence = sequence
        self._clock = clock

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        device_id: str,
        module_id: str,
        sequence: SequenceCounter,
        *,
        clock: Callable[[], float] = time.time,
        baseline: bool = False,
    ) -> EventFactory:
        """A factory for a loaded bundle's classes, messages and version."""
        normal = [c.name for c in bundle.classes if not c.anomaly]
        if len(normal) != 1:
            raise ValueError(
                f"bundle {bundle.name} must have exactly one normal class, has {normal}"
            )
        return cls(
            device_id,
            module_id,
            bundle.model_version,
            bundle.class_names,
            {c.name: c.message for c in bundle.classes},
            sequence,
            normal_class=normal[0],
            clock=clock,
            baseline=baseline,
        )

    @property
    def sequence_error(self) -> str | None:
        """Why event numbers cannot be persisted right now (``None`` when they can)."""
        return self._sequence.last_error

    @overload
    def build(self, output: WindowState) -> State: ...
    @overload
    def build(self, output: AnomalyStarted | AnomalyEnded) -> Event: ...
    def build(self, output: DecisionOutput) -> Message:
        """The message for any decision output.

        Raises :class:`SequenceError` for an event when no sequence number can
        be had (:class:`SequenceCounter`); state messages take none.
        """
        if isinstance(output, AnomalyStarted):
            return self._event("anomaly_started", output, output.anomaly_id, None)
        if isinstance(output, AnomalyEnded):
            ending = Ending(output.anomaly_id, output.reason, output.duration_s)
            return self._event("anomaly_ended", output, str(uuid.uuid4()), ending)
        return self._state(output)

    def ended(self, state: State) -> State:
        """``state`` once the stream has ended: the same last window, no anomaly active.

        The decision closes an active anomaly at the end of a stream (an
        ``anomaly_ended`` with reason ``stream_end``); this is the state that
        goes with it, so a retained state never outlives its process showing
        an anomaly.
        """
        return replace(
            state,
            anomaly=False,
            message=self._messages[self._normal],
            active_class=None,
            anomaly_id=None,
            emitted_at=self._clock(),
        )

    def _state(self, state: WindowState) -> State:
        w = state.window
        shown = state.active_class or self._normal
        return State(
            origin=self.origin,
            window_index=w.index,
            class_name=state.top_class,
            anomaly=state.active_class is not None,
            message=self._messages[shown],
            probabilities=self._probabilities(w.probabilities),
            vote=state.vote,
            active_class=state.active_class,
            anomaly_id=state.anomaly_id,
            warming_up=state.warming_up,
            stream_start_s=w.start_s,
            stream_end_s=w.end_s,
            wall_start=w.wall_start,
            wall_end=w.captured_at,
            emitted_at=self._clock(),
            level=w.level,
            baseline=(w.baseline or BaselineVerdict(None, None)) if self._baseline else None,
        )

    def _probabilities(self, values: Sequence[float]) -> dict[str, float]:
        return dict(zip(self._names, values, strict=True))

    def _event(
        self, kind: EventKind, r: AnomalyReport, event_id: str, ending: Ending | None
    ) -> Event:
        return Event(
            kind=kind,
            seq=self._sequence.next(),
            event_id=event_id,
            origin=self.origin,
            class_name=r.class_name,
            # An end leaves the machine as the next state says, never anomalous.
            anomaly=ending is None and r.class_name != self._normal,
            message=self._messages[r.class_name],
            probabilities=self._probabilities(r.mean_probabilities),
            probability_max=r.probability_max,
            probability_mean=r.probability_mean,
            stream_start_s=r.stream_start_s,
            stream_end_s=r.stream_end_s,
            decided_stream_s=r.decided_stream_s,
            wall_start=r.wall_start,
            wall_end=r.wall_end,
            emitted_at=self._clock(),
            first_window_index=r.first_window_index,
            last_window_index=r.last_window_index,
            window_count=r.window_count,
            level=r.level,
            ending=ending,
            baseline=BaselineVerdict(r.baseline_id, r.novelty) if self._baseline else None,
        )


SchemaKind = Literal["event", "state"]


@cache
def _schema_text(kind: SchemaKind) -> str:
    ref = resources.files("soundwatch") / "schemas" / f"{kind}.schema.json"
    return ref.read_text(encoding="utf-8")


def load_schema(kind: SchemaKind) -> dict[str, Any]:
    """A fresh copy of the JSON Schema for anomaly events or state messages."""
    schema: dict[str, Any] = json.loads(_schema_text(kind))
    return schema


@cache
def _validator(kind: SchemaKind) -> Any:
    try:
        import jsonschema
    except ImportError as e:  # a dev/test tool, not a runtime dependency
        raise ImportError("validate_event needs jsonschema: pip install jsonschema") from e
    cls = jsonschema.Draft202012Validator
    return cls(load_schema(kind), format_checker=cls.FORMAT_CHECKER)


def validate_event(message: Mapping[str, Any] | Message) -> None:
    """Check a message (typed, or its wire document) against its schema.

    Raises :class:`EventValidationError` naming every violation and where it
    is. For tests and tools; needs ``jsonschema``.
    """
    doc = message if isinstance(message, Mapping) else to_wire(message)
    kind: SchemaKind = "state" if doc.get("type") == "state" else "event"
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors
        )
        raise EventValidationError(f"{kind} message does not follow {kind}.schema.json: {details}")
