"""What the MQTT and IoT Hub sinks share: delivery through an outbox, written once.

Events: an event is stored in the :class:`~soundwatch.outbox.Outbox` (SQLite)
before ``publish`` returns, and its future resolves only when the destination
has acknowledged it (:meth:`OutboxSink._acknowledge_rows`). Events the outbox
drops (too old, or pushed out by its size limits) fail their futures with a
reason. On ``close`` what is still unacknowledged stays in the outbox for the
next process (their futures fail with :class:`SinkKept`: not lost).

When the outbox cannot store an event (a full disk), the event is held in
memory, in order, and the worker retries storing it every second; events
published meanwhile wait behind it. Up to :data:`MAX_UNSTORED` are held; one
more fails its future (a loss, counted and logged), and so do those still held
when the sink closes.

State: only the latest state message is kept (:meth:`OutboxSink._offer_state`)
and sent at most once per ``state_min_interval_s``, except that a change of
``class`` or ``active_class`` goes out at once (:meth:`OutboxSink._due_state`).

The worker: one thread per sink runs :meth:`OutboxSink._run`: connect (with
exponential backoff and jitter between attempts), then repeat the
subclass's :meth:`~OutboxSink._step` until the connection is lost or the sink
stops, waiting in between for new work or the next timer; expired events are
purged while connected and while waiting to reconnect. The subclass supplies
only its transport: :meth:`~OutboxSink._connect`, :meth:`~OutboxSink._step`,
:meth:`~OutboxSink._connected_now` and :meth:`~OutboxSink._end_connection`.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from soundwatch.config import IotHubSinkConfig, MqttSinkConfig, OutboxConfig
from soundwatch.events import Event, Message, State, wire_json
from soundwatch.outbox import Dropped, Outbox, OutboxError, OutboxFull
from soundwatch.sinks.base import (
    Sink,
    SinkConfigError,
    SinkError,
    SinkKept,
    resolved,
    sink_error,
)

logger = logging.getLogger(__name__)

DEFAULT_CLOSE_TIMEOUT_S = 10.0
# How often expired events are purged from the outbox (they fail their futures).
PURGE_INTERVAL_S = 60.0
# The worker re-checks its timers (and retries storing held events) at least this often.
MAX_IDLE_WAIT_S = 1.0
# Events held in memory while the outbox cannot store them (module docstring).
MAX_UNSTORED = 1000


@dataclass
class _Unstored:
    """An event the outbox could not store yet, and its caller's future."""

    key: str
    payload: bytes
    properties: dict[str, str] | None
    future: Future[None]


def now_iso() -> str:
    """The wall-clock time as ISO 8601 UTC with milliseconds (``...Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ConnectFailed(Exception):
    """One connection attempt failed; the text says why (it goes into health and the log)."""


class Backoff:
    """Exponential backoff with ±20 % jitter between ``min_s`` and ``max_s``."""

    def __init__(
        self, min_s: float, max_s: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"need 0 < min_s ({min_s}) <= max_s ({max_s})")
        self.min_s, self.max_s = min_s, max_s
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        base = min(self.max_s, self.min_s * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        return base * (0.8 + 0.4 * self._rng())

    def reset(self) -> None:
        self._attempt = 0


class OutboxSink(Sink):
    """Base of the sinks that deliver events through an :class:`Outbox` (module docstring).

    Subclasses set :attr:`destination` (how log lines and errors name the far
    end), call :meth:`_start_worker` at the end of their constructor and
    implement the transport hooks.
    """

    destination = "the destination"

    def __init__(self, config: MqttSinkConfig | IotHubSinkConfig) -> None:
        super().__init__(name=config.name, include_state=config.include_state)
        self.state_min_interval_s = config.state_min_interval_s
        reconnect = config.reconnect
        self._backoff = Backoff(reconnect.min_delay_s, reconnect.max_delay_s)
        # Shared between the callers' threads and the worker.
        self._lock = threading.Lock()  # guards _futures
        self._futures: dict[int, Future[None]] = {}  # outbox row id -> caller's future
        self._unstored: collections.deque[_Unstored] = collections.deque()  # guarded by _lock
        self._store_error: str | None = None
        self._flushed = threading.Condition()  # notified when rows are settled
        self._wake = threading.Event()  # the worker has something to do
        self._stop = threading.Event()
        self._closed = False
        self._close_deadline = math.inf
        self._next_purge = 0.0
        self._worker: threading.Thread | None = None
        # The latest state message, its "class change" key, and what was sent.
        self._state_lock = threading.Lock()
        self._pending_state: State | None = None
        self._state_urgent = False
        self._last_state: State | None = None
        self._last_state_key: tuple[str, str | None] | None = None
        self._last_state_sent = -math.inf
        self._state_sent = 0
        self._state_failed = 0
        self._state_superseded = 0
        # Connection history, for health.
        self._connected = False
        self._connects = 0
        self._connect_failures = 0
        self._disconnects = 0
        self._connected_since: str | None = None
        self._last_disconnect: str | None = None
        self.outbox = self._open_outbox(config.outbox)

    def _open_outbox(self, config: OutboxConfig) -> Outbox:
        """Open (and lock) the outbox file; errors name this sink."""
        label = f"{self.type_name} sink {self.name!r}"
        if config.path is None:  # Config fills it in from state_dir
            raise SinkConfigError(f"{label}: outbox.path is not set; build sinks from a Config")
        try:
            return Outbox(
                config.path,
                max_events=config.max_events,
                max_bytes=config.max_bytes,
                max_age_s=config.max_age_s,
                overflow=config.overflow,
            )
        except OutboxError as e:
            raise SinkError(f"{label}: {e}") from e

    def _start_worker(self) -> None:
        self._worker = threading.Thread(
            target=self._run, name=f"{self.type_name}-{self.name}", daemon=True
        )
        self._worker.start()

    # -- the transport (subclasses) ------------------------------------------------------

    @abstractmethod
    def _connect(self) -> None:
        """Make (or find) a connection; raise :class:`ConnectFailed` saying why not."""

    @abstractmethod
    def _connected_now(self) -> bool:
        """Whether the connection is up (the worker serves while it is)."""

    @abstractmethod
    def _step(self) -> None:
        """One round of work while connected: events, state, anything else due."""

    def _end_connection(self) -> None:
        """After a connection ended (lost, or the sink stopping). Default: nothing."""

    def _on_stop(self) -> None:
        """The sink is stopping while still connected (a last word). Default: nothing."""

    def _interrupt(self) -> None:
        """Unblock the worker when closing (e.g. cancel a send on a dead link)."""

    def _next_deadline(self) -> float:
        """The ``time.monotonic()`` of the subclass's next timer, or ``inf``."""
        return math.inf

    # -- Sink API (any thread) ---------------------------------------------------

    def publish(self, message: Message) -> Future[None]:
        """Events: stored in the outbox; the future resolves when the destination acknowledges.

        State messages: kept as the latest value; the future resolves at once
        (a state superseded before it is sent is never sent, by design).
        """
        if not self.accepts(message):
            self._count_skipped()
            return resolved()
        if self._closed:
            return self._fail(SinkError(f"{self.name}: sink is closed"))
        if isinstance(message, State):
            self._offer_state(message)
            return resolved()
        try:
            payload = wire_json(message)
        except ValueError as e:
            return self._fail(sink_error(f"{self.name}: message is not JSON: {e}", e))
        return self._store_event(message.event_id or str(uuid.uuid4()), payload, message)

    def _store_event(self, key: str, payload: bytes, event: Event) -> Future[None]:
        """Store one event (subclasses check or annotate it first)."""
        return self._enqueue(key, payload)

    def _enqueue(
        self, key: str, payload: bytes, properties: dict[str, str] | None = None
    ) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            if self._unstored:  # keep the order: behind the events already waiting
                return self._hold(_Unstored(key, payload, properties, future), None)
            try:
                stored = self.outbox.enqueue(key, payload, properties)
            except OutboxFull as e:
                return self._fail(sink_error(f"{self.name}: {e}", e))
            except OutboxError as e:
                return self._hold(_Unstored(key, payload, properties, future), e)
            self._futures[stored.id] = future
        self._settle_drops(stored.dropped)
        self._wake.set()
        return future

    def _hold(self, item: _Unstored, error: OutboxError | None) -> Future[None]:
        """Keep an event the outbox cannot store (called with ``_lock`` held)."""
        if error is not None and self._store_error is None:
            self._store_error = str(error)
            logger.error(
                "%s: cannot store event %s in the outbox (%s); holding events in memory "
                "and retrying every %g s",
                self.name,
                item.key,
                error,
                MAX_IDLE_WAIT_S,
            )
            self._set_error(f"outbox: {error}")
        if len(self._unstored) >= MAX_UNSTORED:
            return self._fail(
                SinkError(
                    f"{self.name}: event {item.key} lost: the outbox cannot store it "
                    f"({self._store_error}) and {MAX_UNSTORED} events are already held"
                )
            )
        self._unstored.append(item)
        self._wake.set()
        return item.future

    def _store_held(self) -> None:
        """Store the held events in order while the outbox takes them (the worker, and close)."""
        dropped: list[Dropped] = []
        refused: list[tuple[Future[None], SinkError]] = []
        stored_now = 0
        with self._lock:
            while self._unstored:
                item = self._unstored[0]
                try:
                    stored = self.outbox.enqueue(item.key, item.payload, item.properties)
                except OutboxFull as e:  # the drop policy refused it: counted there
                    refused.append((item.future, sink_error(f"{self.name}: {e}", e)))
                except OutboxError:
                    break  # still cannot write: the next round retries
                else:
                    self._futures[stored.id] = item.future
                    dropped.extend(stored.dropped)
                    stored_now += 1
                self._unstored.popleft()
            recovered = not self._unstored and self._store_error is not None
            if recovered:
                self._store_error = None
        if recovered:
            logger.warning(
                "%s: the outbox stores events again (%d were held)", self.name, stored_now
            )
            self._set_error(None)
        for future, error in refused:
            self._count_failed(error)
            logger.warning("%s", error)
            future.set_exception(error)
        self._settle_drops(dropped)
        if stored_now:
            self._wake.set()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event published so far has been acknowledged by the destination."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        target: int | None = None
        with self._flushed:
            while True:
                with self._lock:
                    held = bool(self._unstored)
                try:
                    if not held:  # held events get their row ids once stored
                        if target is None:
                            target = self.outbox.last_id()
                        if self.outbox.pending_through(target) == 0:
                            return True
                except OutboxError:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._flushed.wait(0.5 if left is None else min(left, 0.5))

    def close(self, timeout_s: float | None = None) -> None:
        """Flush, then stop the worker, all within ``timeout_s`` (default 10 s). Idempotent.

        The whole close keeps to ``timeout_s`` whatever the destination does
        (down, frozen, a handshake that never ends): the worker gets what is
        left after the flush to say its last word and is otherwise abandoned
        (a daemon thread). Events not acknowledged by then stay in the outbox
        and are sent by the next process; their futures fail with
        :class:`SinkKept`. Events the outbox could not store fail with
        :class:`SinkError`: those are lost, and logged with their keys.
        """
        if self._closed:
            return
        if timeout_s is None:  # never wait forever for a destination that may be gone
            timeout_s = DEFAULT_CLOSE_TIMEOUT_S
        deadline = time.monotonic() + timeout_s
        self._close_deadline = deadline
        self._store_held()
        # Time for the worker to stop after the flush: half the budget, at most a second.
        flushed = self.flush(max(0.0, timeout_s - min(1.0, timeout_s / 2)))
        self._closed = True
        self._stop.set()
        self._wake.set()
        # On its own thread: an SDK's shutdown may block on a dead link, and
        # the budget is kept by the join below.
        threading.Thread(target=self._interrupt, name=f"{self.name}-interrupt", daemon=True).start()
        if self._worker is not None:
            self._worker.join(max(deadline - time.monotonic(), 0.0))
            if self._worker.is_alive():
                logger.warning(
                    "%s: worker did not stop within the %.1f s close budget; leaving it",
                    self.name,
                    timeout_s,
                )
        self._fail_unstored()
        self._fail_unacknowledged(flushed)

    def _time_left_s(self, wanted_s: float) -> float:
        """``wanted_s``, or less when closing and the close budget ends sooner."""
        return max(0.0, min(wanted_s, self._close_deadline - time.monotonic()))

    def _fail_unstored(self) -> None:
        with self._lock:
            lost = list(self._unstored)
            self._unstored.clear()
        if not lost:
            return
        logger.error(
            "%s: %d event(s) LOST: the outbox could not store them (%s): %s",
            self.name,
            len(lost),
            self._store_error,
            ", ".join(item.key for item in lost),
        )
        for item in lost:
            error = SinkError(
                f"{self.name}: event {item.key} lost: the outbox could not store it "
                f"({self._store_error}) before the sink closed"
            )
            self._count_failed(error)
            item.future.set_exception(error)

    def health(self) -> dict[str, Any]:
        info = super().health()
        try:
            outbox: dict[str, Any] = self.outbox.stats().to_json()
        except OutboxError as e:
            outbox = {"error": str(e)}
        with self._state_lock:
            state = {
                "sent": self._state_sent,
                "superseded": self._state_superseded,
                "failed": self._state_failed,
                "min_interval_s": self.state_min_interval_s,
            }
        with self._lock:
            unstored = len(self._unstored)
        info.update(
            healthy=self._connected and not self.outbox.closed and not unstored,
            connected=self._connected,
            unstored=unstored,
            connects=self._connects,
            connect_failures=self._connect_failures,
            disconnects=self._disconnects,
            connected_since=self._connected_since,
            last_disconnect=self._last_disconnect,
            outbox=outbox,
            state=state,
        )
        return info

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect()
            except ConnectFailed as e:
                if self._stop.is_set():
                    break
                self._connect_failures += 1
                self._set_error(str(e))
                delay = self._backoff.next()
                logger.warning("%s: %s; retrying in %.1f s", self.name, e, delay)
                self._idle(delay)
                continue
            except Exception as e:  # a bug must not kill the worker silently
                logger.exception("%s: unexpected error while connecting", self.name)
                self._set_error(f"unexpected: {e}")
                self._idle(self._backoff.next())
                continue
            self._backoff.reset()
            try:
                self._serve()
            except Exception as e:
                logger.exception("%s: worker error; reconnecting", self.name)
                self._set_error(f"unexpected: {e}")
            finally:
                self._end_connection()
            if not self._stop.is_set():
                delay = self._backoff.next()
                logger.warning(
                    "%s: connection to %s lost (%s); reconnecting in %.1f s",
                    self.name,
                    self.destination,
                    self._last_disconnect,
                    delay,
                )
                self._idle(delay)

    def _serve(self) -> None:
        while not self._stop.is_set() and self._connected_now():
            self._wake.clear()
            self._store_held()
            self._step()
            self._purge_if_due()
            self._wake.wait(self._next_wait())
        if self._stop.is_set() and self._connected_now():
            self._step()
            self._on_stop()

    def _idle(self, seconds: float) -> None:
        """Wait while disconnected; expired events are still purged."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, MAX_IDLE_WAIT_S if self._unstored else PURGE_INTERVAL_S))
            self._store_held()
            self._purge_if_due()

    def _next_wait(self) -> float:
        now = time.monotonic()
        wait = min(MAX_IDLE_WAIT_S, self._next_deadline() - now)
        with self._state_lock:
            if self._pending_state is not None:
                wait = min(wait, self._last_state_sent + self.state_min_interval_s - now)
        return max(wait, 0.005)

    def _mark_connected(self) -> None:
        self._connected = True
        self._connects += 1
        self._connected_since = now_iso()
        self._set_error(None)

    def _mark_disconnected(self, reason: str) -> None:
        if self._connected:
            self._disconnects += 1
        self._connected = False
        self._last_disconnect = reason
        if not self._stop.is_set():
            with self._stats_lock:
                if self._last_error is None:
                    self._last_error = f"disconnected: {reason}"

    # -- events (worker) -----------------------------------------------------------------

    def _acknowledge_rows(self, rows: Iterable[int]) -> None:
        """Mark acknowledged rows delivered and resolve their futures."""
        rows = list(rows)
        try:
            self.outbox.ack(rows)
        except OutboxError as e:
            # The rows stay on disk and are sent again after a restart: a
            # duplicate, never a loss.
            logger.error("%s: cannot remove acknowledged events from the outbox: %s", self.name, e)
        with self._lock:
            futures = [self._futures.pop(row, None) for row in rows]
        for future in futures:
            self._count_ok()
            if future is not None and not future.done():
                future.set_result(None)
        with self._flushed:
            self._flushed.notify_all()

    def _purge_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL_S
        try:
            dropped = self.outbox.purge_expired()
        except OutboxError as e:
            logger.error("%s: cannot purge the outbox: %s", self.name, e)
            return
        self._settle_drops(dropped)

    def _settle_drops(self, dropped: tuple[Dropped, ...] | list[Dropped]) -> None:
        """Fail the futures of dropped events (the outbox has logged and counted them)."""
        if not dropped:
            return
        with self._lock:
            futures = [(d, self._futures.pop(d.id, None)) for d in dropped if d.id is not None]
        for d, future in futures:
            error = SinkError(f"{self.name}: event {d.key} dropped from the outbox ({d.reason})")
            self._count_failed(error)
            if future is not None and not future.done():
                future.set_exception(error)
        with self._flushed:
            self._flushed.notify_all()

    def _fail_unacknowledged(self, flushed: bool) -> None:
        """End of ``close``: fail the futures still waiting, say where their events are."""
        with self._lock:
            pending = list(self._futures.values())
            self._futures.clear()
        if pending or not flushed:
            logger.warning(
                "%s: closing with %d event(s) not acknowledged by %s; they stay in %s "
                "and are sent after the next start",
                self.name,
                self.outbox.depth(),
                self.destination,
                self.outbox.path,
            )
        error = SinkKept(
            f"{self.name}: closed before {self.destination} acknowledged the event; it stays "
            f"in the outbox {self.outbox.path} and is sent after the next start"
        )
        for future in pending:
            if not future.done():
                future.set_exception(error)
        self.outbox.close()

    # -- state (any thread in, the worker out) -------------------------------------------

    def _offer_state(self, message: State) -> None:
        key = (message.class_name, message.active_class)
        with self._state_lock:
            if self._pending_state is not None:
                self._state_superseded += 1
            self._pending_state = message
            urgent = key != self._last_state_key
            self._state_urgent = self._state_urgent or urgent
        if urgent:
            self._wake.set()

    def _resend_state(self, fallback: State | None) -> None:
        """After a (re)connect: send the latest state again at once (or ``fallback``)."""
        with self._state_lock:
            if self._pending_state is None:
                latest = self._last_state or fallback
                if latest is None:
                    return
                self._pending_state = latest
            self._state_urgent = True
        self._wake.set()

    def _due_state(self) -> State | None:
        """The state to send now, if the rate limit (or a class change) says so."""
        now = time.monotonic()
        with self._state_lock:
            message = self._pending_state
            if message is None:
                return None
            if not self._state_urgent and now - self._last_state_sent < self.state_min_interval_s:
                return None
            self._pending_state = None
            self._state_urgent = False
            self._last_state = message
            self._last_state_key = (message.class_name, message.active_class)
            self._last_state_sent = now
        return message

    def _count_state(self, sent: bool) -> None:
        with self._state_lock:
            if sent:
                self._state_sent += 1
            else:
                self._state_failed += 1
