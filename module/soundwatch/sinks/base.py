"""The sink interface: where messages go, and what "delivered" means.

A sink takes the plain JSON-ready dicts built by :mod:`soundwatch.events`
(anomaly events and, if it wants them, per-window state messages).

Delivery is reported honestly through a :class:`concurrent.futures.Future`:
:meth:`Sink.publish` returns at once, and the future resolves (result
``None``) only when the destination has acknowledged the message: for a file,
once it is written and flushed (and fsynced, if the sink's policy says so); for
MQTT, on the broker's PUBACK; for IoT Hub, when the SDK's send completes. On
failure the future holds a :class:`SinkError`. ``publish`` itself does not
raise for delivery problems, so the pipeline thread is never taken down by a
sink.

A sink may be configured to skip kinds of message (``accepts``); publishing a
message it skips resolves at once. Events are never dropped silently: a sink
either stores/delivers them or fails their future.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any


class SinkError(Exception):
    """A sink could not deliver or store a message.

    Third-party errors (``OSError``, paho, azure-iot-device) are converted to
    this at the sink's boundary with ``raise SinkError(...) from e``.
    """


class SinkConfigError(SinkError, ValueError):
    """A sink was configured with an unknown type or invalid options."""


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


def is_state(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` is a per-window state message (not an event)."""
    return message.get("type") == "state"


class Sink(ABC):
    """One destination for messages. Implementations must be thread-safe.

    Subclasses set :attr:`type_name` (the ``type:`` used in config) and
    implement :meth:`publish`, :meth:`flush`, :meth:`close` and
    :meth:`health`. ``close`` must be idempotent; publishing after ``close``
    fails the future with :class:`SinkError`.
    """

    type_name: str = "sink"

    def __init__(self, *, name: str | None = None, include_state: bool = False) -> None:
        self.name = name or self.type_name
        self.include_state = include_state
        self._stats_lock = threading.Lock()
        self._published = 0
        self._failed = 0
        self._skipped = 0
        self._last_error: str | None = None

    def accepts(self, message: Mapping[str, Any]) -> bool:
        """Whether this sink delivers ``message`` (state only if ``include_state``)."""
        return self.include_state or not is_state(message)

    @abstractmethod
    def publish(self, message: Mapping[str, Any]) -> Future[None]:
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
