"""The control plane: the one way in for commands, whatever channel carries them.

Channels only translate between their transport and this module:

* MQTT: ``<prefix>/set`` (a config patch) and ``<prefix>/command`` (any
  command), answered on ``.../result`` (:mod:`soundwatch.channels.mqtt`);
* IoT Hub: desired properties (a config patch) and direct methods (any
  command by name) (:mod:`soundwatch.channels.iothub`);
* HTTP: ``PATCH /config`` and ``POST /commands/<name>`` (:mod:`soundwatch.http.app`).

Here, once for all of them:

* **Parsing at the boundary.** :func:`parse_json` takes raw bytes with a size
  limit (:data:`MAX_COMMAND_BYTES`) and a nesting limit
  (:data:`MAX_NESTING`) checked before the JSON parser runs, and turns every
  failure into a :class:`CommandError`; :func:`check_nesting` bounds documents
  a channel's library parsed already. :func:`request_from` reads the one
  envelope: ``{"command": name, "args": ..., "request_id": ...}``, or, for
  config patches, ``{"patch": {...}, "request_id": ...}`` or the bare patch.
* **One registry** (:data:`COMMANDS`): a command is a name, a summary and a
  function of the :class:`ControlTarget` (the runtime) and its arguments.
  Adding one (say ``relearnBaseline`` or ``markFalseAlarm``) is one
  :func:`command` function here; every channel offers it at once.
* **One error shape**: a :class:`CommandResult` with a status and, when refused,
  ``errors``: ``[{"key", "message"}]`` naming each problem.
* **Commands never delay events.** They run on the control plane's own thread
  (:meth:`ControlPlane.submit`) or the caller's (:meth:`ControlPlane.call`),
  never on a sink's worker; each channel has a token bucket (``rate_per_s``,
  ``burst``) and the queue is bounded. A command over the limit is answered
  at once with status ``busy`` (and ``retry_after_s``), and counted.
* **Logging**: every command that changes something is logged with its
  channel and request id (INFO when applied, WARNING when refused); queries
  at DEBUG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from soundwatch.config import Config, ConfigError

if TYPE_CHECKING:
    from soundwatch.events import Event

logger = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
# Deeper than any real command (a config patch is 4 levels); bounded before
# parsing, so a crafted document cannot exhaust the parser's recursion.
MAX_NESTING = 32
MAX_REQUEST_ID_CHARS = 128
DEFAULT_RATE_PER_S = 5.0
DEFAULT_BURST = 20
DEFAULT_QUEUE = 32
MAX_RECENT_EVENTS = 100
DEFAULT_RECENT_EVENTS = 20

Status = Literal["ok", "invalid", "unknown", "busy", "failed"]
RequestId = str | int | None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a command: where (a key path, or ``(message)``) and what."""

    key: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "message": self.message}


class CommandError(Exception):
    """A command refused at the boundary or by its own checks; becomes a result."""

    def __init__(
        self, status: Status, problems: list[Problem], request_id: RequestId = None
    ) -> None:
        super().__init__("; ".join(f"{p.key}: {p.message}" for p in problems))
        self.status = status
        self.problems = tuple(problems)
        self.request_id = request_id


def invalid(key: str, message: str) -> CommandError:
    return CommandError("invalid", [Problem(key, message)])


@dataclass(frozen=True)
class CommandRequest:
    """One command as a channel received it.

    ``channel`` names the kind of channel (``mqtt``, ``iothub``, ``http``: the
    rate limit is per kind); ``origin`` where exactly it came from, for logs.
    """

    command: str
    args: Any
    channel: str
    origin: str
    request_id: RequestId = None


@dataclass(frozen=True)
class CommandResult:
    """What a command did: ``data`` when it succeeded, ``problems`` when not."""

    command: str
    status: Status
    request_id: RequestId = None
    data: Mapping[str, Any] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def errors(self) -> list[dict[str, str]]:
        return [p.to_json() for p in self.problems]

    def to_json(self) -> dict[str, Any]:
        """The answer every channel without a format of its own sends."""
        doc: dict[str, Any] = {
            "ok": self.ok,
            "command": self.command,
            "request_id": self.request_id,
            "status": self.status,
        }
        if self.ok:
            doc["data"] = dict(self.data)
        else:
            doc["errors"] = self.errors()
        if self.retry_after_s is not None:
            doc["retry_after_s"] = self.retry_after_s
        return doc


class ControlTarget(Protocol):
    """What commands act on: the runtime (:class:`soundwatch.app.Runtime`)."""

    @property
    def config(self) -> Config: ...

    def apply_patch(self, patch: Mapping[str, Any], source: str) -> Config: ...

    def health(self) -> dict[str, Any]: ...

    def recent_events(self, limit: int, before_seq: int | None = None) -> list[Event]: ...

    def model_info(self) -> dict[str, Any]: ...

    def counters(self) -> dict[str, Any]: ...

    def relearn_baseline(self, origin: str) -> dict[str, Any]: ...

    def mark_false_alarm(self, seq: int, origin: str) -> dict[str, Any]: ...


# --- parsing at the boundary ------------------------------------------------------------


def parse_json(payload: bytes | str) -> Any:
    """A command document from raw bytes, or :class:`CommandError`; never anything else.

    Refuses more than :data:`MAX_COMMAND_BYTES`, text that is not UTF-8, nesting
    deeper than :data:`MAX_NESTING` (checked before parsing) and invalid JSON.
    """
    size = len(payload.encode("utf-8") if isinstance(payload, str) else payload)
    if size > MAX_COMMAND_BYTES:
        raise invalid("(message)", f"larger than {MAX_COMMAND_BYTES} bytes ({size})")
    try:
        text = payload if isinstance(payload, str) else payload.decode("utf-8")
        depth = _nesting(text)
        if depth > MAX_NESTING:
            raise invalid("(message)", f"nested {depth} levels deep; at most {MAX_NESTING}")
        return json.loads(text)
    except CommandError:
        raise
    except UnicodeDecodeError as e:
        raise invalid("(message)", f"not UTF-8 text: {e.reason}") from None
    except ValueError as e:
        raise invalid("(message)", f"not valid JSON: {e}") from None
    except Exception as e:  # whatever a parser may raise, the boundary answers
        raise invalid("(message)", f"cannot parse: {type(e).__name__}") from None


def _nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting outside strings, in one pass without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_nesting(doc: Any) -> None:
    """Refuse a document (parsed by someone else) nested deeper than :data:`MAX_NESTING`."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_NESTING:
                raise invalid("(message)", f"nested more than {MAX_NESTING} levels deep")
            children = value.values() if isinstance(value, Mapping) else value
            stack.extend((child, depth + 1) for child in children)


# A dropped command's request_id is read only from a payload this small: a
# flood of large documents must not be parsed on the thread that receives it.
PEEK_BYTES = 4096


def peek_request_id(payload: bytes) -> RequestId:
    """The ``request_id`` of a small command document, for the answer to a dropped one.

    Never raises; ``None`` for a large, malformed or bare document.
    """
    if len(payload) > PEEK_BYTES:
        return None
    try:
        doc = parse_json(payload)
        return request_id_of(doc) if isinstance(doc, Mapping) else None
    except CommandError:
        return None


def request_id_of(doc: Mapping[str, Any]) -> RequestId:
    """The envelope's ``request_id``: a string or an integer, or ``None``."""
    rid = doc.get("request_id")
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    raise invalid(
        "request_id", f"must be a string of at most {MAX_REQUEST_ID_CHARS} characters or an integer"
    )


def request_from(
    doc: Any, *, channel: str, origin: str, default_command: str | None = None
) -> CommandRequest:
    """Read the envelope (module docstring) into a request, or :class:`CommandError`.

    ``default_command`` is what a document without ``"command"`` means
    (``setConfig`` on a config patch topic); without it, ``"command"`` is required.
    """
    if not isinstance(doc, Mapping):
        raise invalid("(message)", "must be a JSON object")
    check_nesting(doc)
    enveloped = "command" in doc or "patch" in doc
    rid = request_id_of(doc) if enveloped else None
    if "command" in doc:
        allowed, name, args = {"command", "args", "request_id"}, doc["command"], doc.get("args")
        if not isinstance(name, str) or not name:
            raise CommandError(
                "invalid", [Problem("command", "must be a command name, e.g. getStatus")], rid
            )
    elif default_command is None:
        raise invalid("command", f"missing; one of {sorted(COMMANDS)}")
    elif "patch" in doc:
        allowed, name, args = {"patch", "request_id"}, default_command, doc["patch"]
    else:
        return CommandRequest(default_command, dict(doc), channel, origin)
    extra = sorted(set(doc) - allowed)
    if extra:
        problems = [Problem(k, "unknown key in a command envelope") for k in extra]
        raise CommandError("invalid", problems, rid)
    return CommandRequest(name, args, channel, origin, rid)


# --- the registry -------------------------------------------------------------------------

CommandFunction = Callable[["ControlTarget", Any, str], dict[str, Any]]


@dataclass(frozen=True)
class Command:
    """A command: ``run(target, args, origin)`` returns the answer's data or raises."""

    name: str
    summary: str
    run: CommandFunction
    changes: bool


COMMANDS: dict[str, Command] = {}


def command(
    name: str, summary: str, *, changes: bool
) -> Callable[[CommandFunction], CommandFunction]:
    """Register a command under ``name`` (IoT Hub's method name, MQTT's and HTTP's too)."""

    def register(run: CommandFunction) -> CommandFunction:
        COMMANDS[name] = Command(name, summary, run, changes)
        return run

    return register


def config_report(config: Config) -> dict[str, Any]:
    """The config, JSON-ready, for answers and reported properties.

    Sinks are reduced to their names and types (their options may hold secrets).
    """
    doc: dict[str, Any] = config.model_dump(mode="json")
    doc["sinks"] = [{"name": s["name"], "type": s["type"]} for s in doc["sinks"]]
    return doc


def _object(args: Any, example: str, *, empty_ok: bool = False) -> Mapping[str, Any]:
    if args is None and empty_ok:
        return {}
    if not isinstance(args, Mapping) or (not args and not empty_ok):
        kind = "a JSON object" if empty_ok else "a non-empty JSON object"
        raise invalid("args", f"must be {kind} like {example}")
    return args


def _config_problems(e: ConfigError) -> CommandError:
    return CommandError("invalid", [Problem(key, msg) for key, _line, msg in e.problems])


@command("setConfig", "apply a config patch live, all or nothing", changes=True)
def _set_config(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    patch = _object(args, '{"decision": {"confirm_k": 2}}')
    try:
        config = target.apply_patch(patch, origin)
    except ConfigError as e:
        raise _config_problems(e) from None
    return {"applied": dict(patch), "config": config_report(config)}


@command("setThresholds", "set per-class on/off thresholds live", changes=True)
def _set_thresholds(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    example = '{"imbalance": {"on": 0.8, "off": 0.6}}'
    doc = _object(args, example)
    thresholds = doc["thresholds"] if set(doc) == {"thresholds"} else doc
    thresholds = _object(thresholds, example)
    for cls, value in thresholds.items():
        if not isinstance(value, Mapping):
            raise invalid(str(cls), f'expected {{"on": p, "off": p}}, got {value!r}')
    try:
        config = target.apply_patch({"decision": {"thresholds": dict(thresholds)}}, origin)
    except ConfigError as e:
        raise _config_problems(e) from None
    current = config.decision.model_dump(mode="json")["thresholds"]
    return {"applied": dict(thresholds), "thresholds": current, "config": config_report(config)}


@command("getStatus", "health, model, config, counters and the commands", changes=False)
def _get_status(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    _object(args, "{}", empty_ok=True)
    return {
        "health": target.health(),
        "model": target.model_info(),
        "config": config_report(target.config),
        "counters": target.counters(),
        "commands": {name: spec.summary for name, spec in sorted(COMMANDS.items())},
    }


@command("getRecentEvents", "recent anomaly events, newest first", changes=False)
def _get_recent_events(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    from soundwatch.events import to_wire

    doc = _object(args, '{"limit": 20, "before_seq": 100}', empty_ok=True)
    extra = sorted(set(doc) - {"limit", "before_seq"})
    if extra:
        raise invalid(extra[0], "unknown key; use limit and before_seq")
    limit = doc.get("limit", DEFAULT_RECENT_EVENTS)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_RECENT_EVENTS:
        raise invalid("limit", f"limit must be an integer from 1 to {MAX_RECENT_EVENTS}")
    before = doc.get("before_seq")
    if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
        raise invalid("before_seq", "before_seq must be an integer or null")
    events = [to_wire(e) for e in target.recent_events(limit, before)]
    return {"events": events, "count": len(events)}


@command(
    "relearnBaseline",
    "drop this unit's baseline and learn its normal sound again",
    changes=True,
)
def _relearn_baseline(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    from soundwatch.unit_baseline import UnitBaselineError

    doc = _object(args, "{}", empty_ok=True)
    if doc:
        raise invalid(sorted(doc)[0], "unknown key; relearnBaseline takes no arguments")
    try:
        return target.relearn_baseline(origin)
    except UnitBaselineError as e:
        raise invalid(e.key, str(e)) from None


@command(
    "markFalseAlarm",
    "an anomaly event was a false alarm: its windows join this unit's baseline",
    changes=True,
)
def _mark_false_alarm(target: ControlTarget, args: Any, origin: str) -> dict[str, Any]:
    from soundwatch.unit_baseline import UnitBaselineError

    doc = _object(args, '{"seq": 17}')
    extra = sorted(set(doc) - {"seq"})
    if extra:
        raise invalid(extra[0], "unknown key; markFalseAlarm takes seq")
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise invalid("seq", "seq must be the positive integer seq of an anomaly event")
    try:
        return target.mark_false_alarm(seq, origin)
    except UnitBaselineError as e:
        raise invalid(e.key, str(e)) from None


# --- the plane ------------------------------------------------------------------------------


class _Bucket:
    """A token bucket: ``burst`` at once, refilled at ``rate_per_s``."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


Reply = Callable[[CommandResult], None]
# Turns what a channel received into a request; runs after the rate limit, on
# the thread that executes the command, and may raise CommandError.
Parse = Callable[[], CommandRequest]


class ControlPlane:
    """Runs commands for a :class:`ControlTarget` (module docstring). Thread-safe."""

    def __init__(
        self,
        target: ControlTarget,
        *,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: int = DEFAULT_BURST,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        self._target = target
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # guards the buckets and counters
        self._run_lock = threading.Lock()  # one command at a time
        self._queue: queue.Queue[tuple[str, str, Parse, Reply] | None] = queue.Queue(queue_size)
        self._counts: dict[str, dict[str, int]] = {}
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> Config:
        """The config in force."""
        return self._target.config

    def start(self) -> ControlPlane:
        """Start the thread that runs submitted commands (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking commands; the one running finishes. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:  # make room for the stop marker; what is dropped never started
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
        thread.join(timeout_s)

    def call(self, channel: str, origin: str, parse: Parse) -> CommandResult:
        """Parse and run a command in this thread (after the rate limit); its result."""
        wait_s = self._admit(channel)
        if wait_s > 0:
            return self._busy(channel, origin, wait_s, "too many commands")
        return self._run(channel, origin, parse)

    def submit(
        self,
        channel: str,
        origin: str,
        parse: Parse,
        reply: Reply,
        request_id: Callable[[], RequestId] = lambda: None,
    ) -> None:
        """Queue a command for the control thread, which parses and runs it and calls ``reply``.

        Never blocks and does not parse here: over the rate limit or with a
        full queue, ``reply`` is called at once (on this thread) with status
        ``busy`` and what ``request_id`` (a cheap peek, see
        :func:`peek_request_id`) finds.
        """
        wait_s = self._admit(channel)
        if wait_s > 0:
            reply(self._busy(channel, origin, wait_s, "too many commands", request_id()))
            return
        try:
            self._queue.put_nowait((channel, origin, parse, reply))
        except queue.Full:
            reply(self._busy(channel, origin, 1.0, "the command queue is full", request_id()))

    def health(self) -> dict[str, Any]:
        with self._lock:
            counts = {channel: dict(c) for channel, c in self._counts.items()}
        return {
            "rate_per_s": self._rate_per_s,
            "burst": self._burst,
            "queued": self._queue.qsize(),
            "commands": counts,
        }

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, channel: str) -> float:
        with self._lock:
            bucket = self._buckets.get(channel)
            if bucket is None:
                bucket = self._buckets[channel] = _Bucket(self._rate_per_s, self._burst)
            return bucket.take()

    def _busy(
        self, channel: str, origin: str, wait_s: float, why: str, rid: RequestId = None
    ) -> CommandResult:
        self._count(channel, "busy")
        retry = math.ceil(wait_s * 10) / 10
        logger.warning(
            "command from %s dropped: %s (at most %g per second, bursts of %d)",
            origin,
            why,
            self._rate_per_s,
            self._burst,
        )
        problem = Problem(
            "(busy)",
            f"{why}: at most {self._rate_per_s:g} per second on {channel}, "
            f"bursts of {self._burst}; retry in {retry:g} s",
        )
        return CommandResult("(not read)", "busy", rid, problems=(problem,), retry_after_s=retry)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            channel, origin, parse, reply = item
            result = self._run(channel, origin, parse)
            try:
                reply(result)
            except Exception:  # a channel's answer must never stop the plane
                logger.exception("answering a command from %s failed", origin)

    def _run(self, channel: str, origin: str, parse: Parse) -> CommandResult:
        try:
            request = parse()
        except CommandError as e:
            self._count(channel, "refused")
            logger.warning("command from %s refused: %s", origin, e)
            return CommandResult("(not read)", e.status, e.request_id, problems=e.problems)
        except Exception as e:  # whatever reading the message raised, the boundary answers
            self._count(channel, "refused")
            logger.warning("command from %s could not be read: %s", origin, e)
            problem = Problem("(message)", f"cannot read the command: {type(e).__name__}")
            return CommandResult("(not read)", "invalid", problems=(problem,))
        return self._execute(request)

    def _execute(self, request: CommandRequest) -> CommandResult:
        spec = COMMANDS.get(request.command)
        where = f"{request.origin}" + (
            f" (request {request.request_id})" if request.request_id is not None else ""
        )
        if spec is None:
            self._count(request.channel, "refused")
            logger.warning("unknown command %r from %s", request.command, where)
            problem = Problem(
                "command", f"unknown command {request.command!r}; available: {sorted(COMMANDS)}"
            )
            return CommandResult(
                request.command, "unknown", request.request_id, problems=(problem,)
            )
        try:
            with self._run_lock:
                data = spec.run(self._target, request.args, request.origin)
        except CommandError as e:
            self._count(request.channel, "refused")
            logger.warning("command %s from %s refused: %s", spec.name, where, e)
            return CommandResult(spec.name, e.status, request.request_id, problems=e.problems)
        except Exception as e:  # a command must never take a channel's thread down
            self._count(request.channel, "failed")
            logger.exception("command %s from %s failed", spec.name, where)
            problem = Problem("(internal)", f"{type(e).__name__}: {e}")
            return CommandResult(spec.name, "failed", request.request_id, problems=(problem,))
        self._count(request.channel, "applied" if spec.changes else "answered")
        if spec.changes:
            logger.info("command %s from %s applied: %s", spec.name, where, request.args)
        else:
            logger.debug("command %s from %s answered", spec.name, where)
        return CommandResult(spec.name, "ok", request.request_id, data=data)

    def _count(self, channel: str, outcome: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(channel, {})
            counts[outcome] = counts.get(outcome, 0) + 1
