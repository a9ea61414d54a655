"""JSON messages built from decision outputs, and the sequence counter.

Two kinds of message leave the module, both plain JSON-ready dicts:

* **Anomaly events** (``type`` ``anomaly_started`` / ``anomaly_ended``), schema
  ``schemas/event.schema.json``. Each has a unique ``event_id`` (uuid4) and a
  ``seq`` that only increases, across restarts too. The started event's
  ``event_id`` is the decision's ``anomaly_id``, and the ended event repeats
  it as ``started_event_id``; so the pair is linked without the factory
  keeping state, and rebuilding a started event gives the same id (a receiver
  can de-duplicate on it). ``Anomaly``/``Message``/``Probabilities`` are the
  seeds' fields and describe the anomaly the event reports, identically on
  both kinds: ``Probabilities`` is each class's mean over the anomaly's
  windows (so ``Probabilities[class] == probability_mean``); ``type`` says
  whether it began or ended.
* **State messages** (``type`` ``state``), one per window, schema
  ``schemas/state.schema.json``: the window's own classification in the
  seeds' fields, the vote, the active anomaly and the level. They carry
  ``window_index`` but no ``event_id``/``seq``: they are snapshots for
  dashboards, not events, and keeping them off the counter makes ``seq`` the
  sequence of anomaly events alone, where a gap means a restart (below), never
  a state message a sink chose not to keep.

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
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from soundwatch.decision import (
    AnomalyEnded,
    AnomalyReport,
    AnomalyStarted,
    DecisionOutput,
    WindowState,
)
from soundwatch.stream_types import Level

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


class SequenceError(RuntimeError):
    """The sequence counter's file cannot be used."""


class EventValidationError(ValueError):
    """A message does not follow its JSON Schema; the text lists every violation."""


class SequenceCounter:
    """Hands out strictly increasing integers, also across process restarts.

    With a ``path``, the file holds a *ceiling*: a value above every number
    handed out so far. Numbers are reserved in blocks of ``block_size``: when
    the block is used up, the new ceiling is written atomically (temp file,
    fsync, rename, fsync of the directory) *before* the next number is handed
    out. After a restart counting resumes at the stored ceiling, skipping what
    was left of the block. So a restart leaves a gap of less than
    ``block_size`` and there is one fsync per ``block_size`` numbers instead
    of one per event. (Only anomaly events take numbers, which are rare, so
    this mostly bounds the cost if a misconfiguration makes them frequent.)

    Without a ``path`` the counter lives in memory and restarts at 1.

    If the ceiling cannot be written, the counter logs an error, records it in
    :attr:`last_error` and keeps counting in memory: an event with a number
    that a later restart might repeat is better than no event. If the stored
    file is unreadable, counting starts from the wall clock in milliseconds,
    which is above any value a sane counter reached, and an error is logged.
    Thread-safe.
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
        """The next number; strictly greater than every earlier one."""
        with self._lock:
            if self._next >= self._ceiling:
                self._reserve(self._next + self._block)
            value = self._next
            self._next += 1
            self._last = value
            return value

    def _reserve(self, ceiling: int) -> None:
        assert self._path is not None  # an in-memory counter never runs out
        try:
            _write_atomic(self._path, f"{ceiling}\n")
            self.last_error = None
        except OSError as e:
            self.last_error = f"cannot persist sequence ceiling to {self._path}: {e}"
            logger.error("%s; counting on in memory", self.last_error)
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


class EventFactory:
    """Builds the module's JSON messages from decision outputs.

    ``messages`` maps every class to its human message (the seeds'
    ``Message``); ``Anomaly`` is true for every class but ``normal_class``.
    ``clock`` gives ``emitted_at`` (default ``time.time``). Building an
    anomaly event takes a number from ``sequence``; use one factory per
    pipeline so that ``seq`` follows emission order.
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
    ) -> None:
        missing = [c for c in class_names if c not in messages]
        if missing:
            raise ValueError(f"no message for classes {missing}")
        if normal_class not in class_names:
            raise ValueError(f"normal_class {normal_class!r} is not in {list(class_names)}")
        for label, value in (("device_id", device_id), ("module_id", module_id)):
            if not value:
                raise ValueError(f"{label} must not be empty")
        self._device_id = device_id
        self._module_id = module_id
        self._model_version = model_version
        self._names = tuple(class_names)
        self._messages = {c: messages[c] for c in self._names}
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
        )

    def build(self, output: DecisionOutput) -> dict[str, Any]:
        """The message for any decision output."""
        if isinstance(output, AnomalyStarted):
            return self.anomaly_started(output)
        if isinstance(output, AnomalyEnded):
            return self.anomaly_ended(output)
        return self.state(output)

    def anomaly_started(self, report: AnomalyStarted) -> dict[str, Any]:
        """An ``anomaly_started`` event (its ``event_id`` is the anomaly id)."""
        msg = self._anomaly_common("anomaly_started", report)
        msg["event_id"] = report.anomaly_id
        return msg

    def anomaly_ended(self, report: AnomalyEnded) -> dict[str, Any]:
        """An ``anomaly_ended`` event, linked to its start by ``started_event_id``."""
        msg = self._anomaly_common("anomaly_ended", report)
        msg["event_id"] = str(uuid.uuid4())
        msg["started_event_id"] = report.anomaly_id
        msg["duration_s"] = _s(report.duration_s)
        msg["reason"] = report.reason
        return msg

    def state(self, state: WindowState) -> dict[str, Any]:
        """A ``state`` message for one window."""
        w = state.window
        return {
            "schema_version": SCHEMA_VERSION,
            "type": "state",
            **self._ids(),
            "window_index": w.index,
            "class": state.top_class,
            "Anomaly": state.top_class != self._normal,
            "Message": self._messages[state.top_class],
            "Probabilities": self._probabilities(w.probabilities),
            "vote": state.vote,
            "active_class": state.active_class,
            "anomaly_id": state.anomaly_id,
            "warming_up": state.warming_up,
            "stream_start_s": _s(w.start_s),
            "stream_end_s": _s(w.end_s),
            "time_start": iso_utc(w.wall_start),
            "time_end": iso_utc(w.captured_at),
            "emitted_at": iso_utc(self._clock()),
            "level": _level(w.level),
        }

    def _ids(self) -> dict[str, Any]:
        return {
            "device_id": self._device_id,
            "module_id": self._module_id,
            "model_version": self._model_version,
        }

    def _probabilities(self, values: Sequence[float]) -> dict[str, float]:
        return {c: _p(p) for c, p in zip(self._names, values, strict=True)}

    def _anomaly_common(self, kind: str, r: AnomalyReport) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "type": kind,
            "seq": self._sequence.next(),
            **self._ids(),
            "class": r.class_name,
            "Anomaly": r.class_name != self._normal,
            "Message": self._messages[r.class_name],
            "Probabilities": self._probabilities(r.mean_probabilities),
            "probability_max": _p(r.probability_max),
            "probability_mean": _p(r.probability_mean),
            "stream_start_s": _s(r.stream_start_s),
            "stream_end_s": _s(r.stream_end_s),
            "decided_stream_s": _s(r.decided_stream_s),
            "time_start": iso_utc(r.wall_start),
            "time_end": iso_utc(r.wall_end),
            "emitted_at": iso_utc(self._clock()),
            "first_window_index": r.first_window_index,
            "last_window_index": r.last_window_index,
            "window_count": r.window_count,
            "level": _level(r.level),
        }


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


def validate_event(message: Mapping[str, Any]) -> None:
    """Check a message against its schema (state or event, by its ``type``).

    Raises :class:`EventValidationError` naming every violation and where it
    is. For tests and tools; needs ``jsonschema``.
    """
    kind: SchemaKind = "state" if message.get("type") == "state" else "event"
    errors = sorted(_validator(kind).iter_errors(message), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors
        )
        raise EventValidationError(f"{kind} message does not follow {kind}.schema.json: {details}")
