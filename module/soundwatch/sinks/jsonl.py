"""JSON Lines file sink with size-based rotation and an explicit fsync policy.

One JSON object per line, UTF-8. When writing a line would take the file past
``max_bytes``, the file is fsynced and closed, ``path.1 … path.<backups-1>``
move up by one (``path.<backups>``, the oldest, is replaced: that is the
configured retention), ``path`` becomes ``path.1`` and a new ``path`` is
started. A line is never split across files, so every message written is in
exactly one file; a line longer than ``max_bytes`` gets a file of its own.
(Written here rather than with ``logging.handlers.RotatingFileHandler`` so
that write, flush and fsync happen where this sink says they do.)

Durability:

* Anomaly events (every message whose ``type`` is not ``state``) are written,
  flushed and, with ``fsync_events=True`` (default), fsynced before their
  future resolves, so an acknowledged event survives a power cut.
* State lines are written and flushed (their future resolves then) and fsynced
  in batches: when ``state_fsync_every`` lines are waiting, or when the oldest
  waiting line is ``state_fsync_interval_s`` old at the time of a later write,
  and always on an event, a rotation, :meth:`~JsonlSink.flush` and
  :meth:`~JsonlSink.close`. A power cut may lose the lines of one batch.

After a write error the file is closed and reopened on the next publish; if
the last line of a reopened file is incomplete, a newline is added first so
that a torn line cannot swallow the next one. Thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

from soundwatch.config import JsonlSinkConfig
from soundwatch.events import Message, State, wire_json
from soundwatch.sinks.base import Sink, SinkError, resolved, sink_error

logger = logging.getLogger(__name__)


class JsonlSink(Sink):
    """Appends messages to ``config.path`` (created with its parent directories).

    ``fsync_events``, ``state_fsync_every`` and ``state_fsync_interval_s`` are
    the durability policy (module docstring); they are not settings a user
    needs, so they are not in the config.
    """

    type_name = "jsonl"

    def __init__(
        self,
        config: JsonlSinkConfig,
        *,
        fsync_events: bool = True,
        state_fsync_every: int = 100,
        state_fsync_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if state_fsync_every < 1 or state_fsync_interval_s < 0:
            raise ValueError("state_fsync_every must be >= 1 and state_fsync_interval_s >= 0")
        super().__init__(name=config.name, include_state=config.include_state)
        self.path = Path(config.path)
        self._max_bytes = config.max_bytes
        self._backups = config.backups
        self._fsync_events = fsync_events
        self._state_every = state_fsync_every
        self._state_interval_s = state_fsync_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._size = 0
        self._unsynced = 0
        self._first_unsynced_at = 0.0
        self._rotations = 0
        self._closed = False
        # Open now so that a bad path shows in the log and health at start-up;
        # a failure is not fatal (a volume may be mounted later).
        with self._lock:
            try:
                self._ensure_open()
            except OSError as e:
                self._count_failed(e)
                logger.error("%s: cannot open %s: %s", self.name, self.path, e)

    def publish(self, message: Message) -> Future[None]:
        if not self.accepts(message):
            self._count_skipped()
            return resolved()
        try:
            data = wire_json(message) + b"\n"
        except ValueError as e:
            return self._fail(sink_error(f"{self.name}: message is not JSON: {e}", e))
        sync_now = self._fsync_events and not isinstance(message, State)
        with self._lock:
            if self._closed:
                return self._fail(SinkError(f"{self.name}: sink is closed"))
            try:
                self._write(data, sync_now=sync_now)
            except OSError as e:
                self._abandon_file()
                return self._fail(sink_error(f"{self.name}: cannot write {self.path}: {e}", e))
        self._count_ok()
        return resolved()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write and fsync everything published so far; ``False`` on failure or timeout."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0.0)):
            return False
        try:
            if self._file is None:
                return self._unsynced == 0
            self._sync()
            return True
        except OSError as e:
            self._abandon_file()
            self._count_failed(e)
            logger.error("%s: fsync of %s failed: %s", self.name, self.path, e)
            return False
        finally:
            self._lock.release()

    def close(self, timeout_s: float | None = None) -> None:
        self.flush(timeout_s)
        with self._lock:
            self._closed = True
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def health(self) -> dict[str, Any]:
        info = super().health()
        with self._lock:
            info.update(
                path=str(self.path),
                bytes=self._size,
                max_bytes=self._max_bytes,
                backups=self._backups,
                rotations=self._rotations,
                unsynced_lines=self._unsynced,
                open=self._file is not None,
            )
        return info

    def rotated_paths(self) -> list[Path]:
        """The current file and its backups that exist, newest first."""
        names = [self.path] + [self._backup(i) for i in range(1, self._backups + 1)]
        return [p for p in names if p.exists()]

    # -- internals (called with the lock held) -------------------------------

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _ensure_open(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "ab")  # noqa: SIM115 - kept open across calls
        try:
            size = os.fstat(f.fileno()).st_size
            if size > 0 and _last_byte(self.path) != b"\n":
                logger.warning("%s: %s ends with a torn line; terminating it", self.name, self.path)
                f.write(b"\n")
                f.flush()
                size += 1
        except OSError:
            f.close()
            raise
        if created:
            _fsync_dir(self.path.parent)
        self._file, self._size = f, size
        return f

    def _write(self, data: bytes, *, sync_now: bool) -> None:
        f = self._ensure_open()
        if self._size > 0 and self._size + len(data) > self._max_bytes:
            self._rotate()
            f = self._ensure_open()
        f.write(data)
        f.flush()
        self._size += len(data)
        now = self._clock()
        if self._unsynced == 0:
            self._first_unsynced_at = now
        self._unsynced += 1
        if (
            sync_now
            or self._unsynced >= self._state_every
            or now - self._first_unsynced_at >= self._state_interval_s
        ):
            self._sync()

    def _sync(self) -> None:
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._unsynced = 0

    def _rotate(self) -> None:
        assert self._file is not None
        self._sync()
        self._file.close()
        self._file = None
        for i in range(self._backups - 1, 0, -1):
            src = self._backup(i)
            if src.exists():
                os.replace(src, self._backup(i + 1))
        os.replace(self.path, self._backup(1))
        _fsync_dir(self.path.parent)
        self._rotations += 1
        logger.info("%s: rotated %s (%d so far)", self.name, self.path, self._rotations)

    def _abandon_file(self) -> None:
        # Reopen on the next publish; lines not yet fsynced may be lost with
        # the handle, which is what a failed write already implies.
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None
        self._unsynced = 0


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _fsync_dir(directory: Path) -> None:
    # Makes a create or rename durable; not every filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
