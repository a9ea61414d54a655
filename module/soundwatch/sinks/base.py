"""The sink interface: where messages go, and what "delivered" means.

A sink takes the typed messages built by :mod:`soundwatch.events`
(:class:`~soundwatch.events.Event` and, if it wants them, per-window
:class:`~soundwatch.events.State`) and publishes their one wire format
(:func:`~soundwatch.events.wire_json`). Sinks publish and do nothing else:
commands reach the module through :mod:`soundwatch.control`, never through a
sink.

Delivery is reported honestly through a :class:`concurrent.futures.Future`:
:meth:`Sink.publish` returns at once, and the future resolves (result
``None``) only when the destination has acknowledged the message: for a file,
once it is written and flushed (and fsynced, if the sink's policy says so); for
MQTT, on the broker's PUBACK; for IoT Hub, when the SDK's send completes. On
failure the future holds a :class:`SinkError`. ``publish`` itself does not
raise for delivery problems, so the pipeline thread is never taken down by a
sink.

A sink may be configured to skip state messages (``include_state``);
publishing a message it skips resolves at once. Events are never dropped
silently: a sink either stores/delivers them or fails their future.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from soundwatch.events import Message, Origin, State

logger = logging.getLogger(__name__)


class SinkError(Exception):
    """A sink could not deliver or store a message.

    Third-party errors (``OSError``, paho, azure-iot-device) are converted to
    this at the sink's boundary with ``raise SinkError(...) from e``.
    """


class SinkKept(SinkError):
    """Not delivered before the sink closed, but stored durably: sent after the next start.

    Not a loss: the run that ends with it still counts the event as kept.
    """


class SinkConfigError(SinkError, ValueError):
    """A sink cannot be built from its configuration (a missing package, a bad file)."""


def sink_error(message: str, cause: BaseException) -> SinkError:
    """A :class:`SinkError` chained to ``cause``, as ``raise ... from cause`` would be.

    For sinks that report failures through futures instead of raising.
    """
    error = SinkError(message)
    error.__cause__ = cause
    return error


def resolved(error: BaseException | None = None) -> Future[None]:
    """A future that is already done: with ``None``, or failed with ``error``."""
    future: Future[None] = Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know of the module it publishes for (given through :meth:`Sink.bind`).

    ``health`` returns the module's health report and ``latest_state`` the
    last per-window state; both may be called from any thread.
    """

    origin: Origin
    class_names: tuple[str, ...]
    health: Callable[[], Mapping[str, Any]]
    latest_state: Callable[[], State | None]
    # Whether the module learns and judges against the unit's own baseline
    # (its messages then carry novelty, baseline_id and learning).
    baseline: bool = False


class Sink(ABC):
    """One destination for messages. Implementations must be thread-safe.

    Subclasses set :attr:`type_name` (the ``type:`` used in config) and
    implement :meth:`publish`, :meth:`flush` and :meth:`close`; :meth:`health`
    may add keys. ``close`` must be idempotent; publishing after ``close``
    fails the future with :class:`SinkError`.
    """

    type_name: str = "sink"

    def __init__(self, *, name: str, include_state: bool) -> None:
        self.name = name
        self.include_state = include_state
        self._stats_lock = threading.Lock()
        self._published = 0
        self._failed = 0
        self._skipped = 0
        self._last_error: str | None = None
        self.context: SinkContext | None = None

    def bind(self, context: SinkContext) -> None:
        """Learn about the module (identity, health, the latest state), before the first message."""
        self.context = context

    def accepts(self, message: Message) -> bool:
        """Whether this sink delivers ``message`` (state only if ``include_state``)."""
        return self.include_state or not isinstance(message, State)

    @abstractmethod
    def publish(self, message: Message) -> Future[None]:
        """Queue or deliver one message; the future resolves on acknowledgement."""

    @abstractmethod
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every message published so far is acknowledged.

        Returns ``True`` if all were, ``False`` on timeout or failure (never
        raises for delivery problems).
        """

    @abstractmethod
    def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to ``timeout_s``), then release resources. Idempotent."""

    def health(self) -> dict[str, Any]:
        """A JSON-ready summary for ``/health``; subclasses add their own keys."""
        with self._stats_lock:
            return {
                "name": self.name,
                "type": self.type_name,
                "healthy": self._last_error is None,
                "published": self._published,
                "failed": self._failed,
                "skipped": self._skipped,
                "last_error": self._last_error,
            }

    # Bookkeeping helpers for subclasses.
    def _count_ok(self) -> None:
        with self._stats_lock:
            self._published += 1
            self._last_error = None

    def _count_failed(self, error: BaseException) -> None:
        with self._stats_lock:
            self._failed += 1
            self._last_error = str(error)

    def _count_skipped(self) -> None:
        with self._stats_lock:
            self._skipped += 1

    def _set_error(self, text: str | None) -> None:
        with self._stats_lock:
            self._last_error = text

    def _fail(self, error: SinkError) -> Future[None]:
        """Count and log a failed message; its future, already failed."""
        self._count_failed(error)
        logger.warning("%s", error)
        return resolved(error)

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
