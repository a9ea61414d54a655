"""What the MQTT and IoT Hub sinks share: events kept in an outbox until acknowledged.

An event is stored in the :class:`~soundwatch.outbox.Outbox` (SQLite) before
``publish`` returns, and its future resolves only when the destination has
acknowledged it; a worker thread of the subclass sends stored rows and calls
:meth:`OutboxSink._acknowledge_rows`. Events the outbox drops (too old, or
pushed out by its size limits) fail their futures with a reason. On ``close``
what is still unacknowledged stays in the outbox for the next process.

State messages are not stored: only the latest one is kept
(:meth:`OutboxSink._offer_state`), and the subclass sends it at its own pace,
at once when the class or the active anomaly changes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from soundwatch.outbox import Dropped, Outbox, OutboxError, OutboxFull
from soundwatch.sinks.base import Sink, SinkConfigError, SinkError, is_state, resolved, sink_error

logger = logging.getLogger(__name__)

DEFAULT_CLOSE_TIMEOUT_S = 10.0
# How often expired events are purged from the outbox (they fail their futures).
PURGE_INTERVAL_S = 60.0


def now_iso() -> str:
    """The wall-clock time as ISO 8601 UTC with milliseconds (``...Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_bytes(doc: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused (ValueError)."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class OutboxSink(Sink):
    """Base of the sinks that deliver events through an :class:`Outbox`.

    Subclasses set :attr:`destination` (how log lines and errors name the far
    end), open the outbox with :meth:`_open_outbox` in their constructor, run
    a worker that sends rows, and call :meth:`_acknowledge_rows`,
    :meth:`_purge_if_due` and :meth:`_fail_unacknowledged` (in ``close``).
    """

    destination = "the destination"

    def __init__(self, *, name: str | None = None, include_state: bool = False) -> None:
        super().__init__(name=name, include_state=include_state)
        self.outbox: Outbox
        # Shared between the callers' threads and the subclass's threads.
        self._lock = threading.Lock()  # guards _futures
        self._futures: dict[int, Future[None]] = {}  # outbox row id -> caller's future
        self._flushed = threading.Condition()  # notified when rows are settled
        self._wake = threading.Event()  # the worker has something to do
        self._closed = False
        self._next_purge = 0.0
        # The latest state message and its "class change" key.
        self._state_lock = threading.Lock()
        self._pending_state: Mapping[str, Any] | None = None
        self._state_urgent = False
        self._last_state_key: tuple[Any, Any] | None = None
        self._state_superseded = 0

    def _open_outbox(self, options: Mapping[str, Any]) -> None:
        """Open (and lock) the outbox file; config errors name this sink."""
        label = f"{self.type_name} sink {self.name!r}"
        try:
            self.outbox = Outbox(
                Path(options["path"]),
                max_events=int(options.get("max_events", 10_000)),
                max_bytes=int(options.get("max_bytes", 50_000_000)),
                max_age_s=float(options.get("max_age_s", 7 * 24 * 3600.0)),
                overflow=options.get("overflow", "drop_oldest"),
            )
        except ValueError as e:
            raise SinkConfigError(f"{label}: {e}") from e
        except OutboxError as e:
            raise SinkError(f"{label}: {e}") from e

    # -- Sink API (any thread) ---------------------------------------------------

    def publish(self, message: Mapping[str, Any]) -> Future[None]:
        """Events: stored in the outbox; the future resolves when the destination acknowledges.

        State messages: kept as the latest value; the future resolves at once
        (a state superseded before it is sent is never sent, by design).
        """
        if not self.accepts(message):
            self._count_skipped()
            return resolved()
        if self._closed:
            return self._fail(SinkError(f"{self.name}: sink is closed"))
        if is_state(message):
            self._offer_state(message)
            return resolved()
        try:
            payload = json_bytes(message)
        except (TypeError, ValueError) as e:
            return self._fail(sink_error(f"{self.name}: message is not JSON: {e}", e))
        key = str(message.get("event_id") or uuid.uuid4())
        return self._store_event(key, payload, message)

    def _store_event(self, key: str, payload: bytes, message: Mapping[str, Any]) -> Future[None]:
        """Store one event (subclasses check or annotate it first)."""
        return self._enqueue(key, payload)

    def _enqueue(
        self, key: str, payload: bytes, properties: Mapping[str, str] | None = None
    ) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            try:
                stored = self.outbox.enqueue(key, payload, properties)
            except OutboxFull as e:
                return self._fail(sink_error(f"{self.name}: {e}", e))
            except OutboxError as e:
                return self._fail(sink_error(f"{self.name}: cannot store event {key}: {e}", e))
            self._futures[stored.id] = future
        self._settle_drops(stored.dropped)
        self._wake.set()
        return future

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event stored so far has been acknowledged by the destination."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            target = self.outbox.last_id()
        except OutboxError:
            return False
        with self._flushed:
            while True:
                try:
                    if self.outbox.pending_through(target) == 0:
                        return True
                except OutboxError:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._flushed.wait(0.5 if left is None else min(left, 0.5))

    def _outbox_health(self) -> dict[str, Any]:
        try:
            return self.outbox.stats().to_json()
        except OutboxError as e:
            return {"error": str(e)}

    # -- for the subclasses' threads ---------------------------------------------

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

    def _offer_state(self, message: Mapping[str, Any]) -> None:
        key = (message.get("class"), message.get("active_class"))
        with self._state_lock:
            if self._pending_state is not None:
                self._state_superseded += 1
            self._pending_state = message
            urgent = key != self._last_state_key
            self._state_urgent = self._state_urgent or urgent
        if urgent:
            self._wake.set()

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
        error = SinkError(
            f"{self.name}: closed before {self.destination} acknowledged the event; it stays "
            f"in the outbox {self.outbox.path} and is sent after the next start"
        )
        for future in pending:
            if not future.done():
                future.set_exception(error)
        self.outbox.close()

    def _fail(self, error: SinkError) -> Future[None]:
        self._count_failed(error)
        logger.warning("%s", error)
        return resolved(error)
