"""Console sink: one human-readable line per message.

Lines look like this (wrapped here; each is one line)::

    12:00:03  ANOMALY STARTED  imbalance  "Component is imbalanced"  p_max=0.97 p_mean=0.93
        (stream 61.0–71.0 s)
    12:00:33  ANOMALY ENDED    imbalance  "Component is imbalanced"  p_max=0.97 p_mean=0.91
        30.0 s cleared (stream 61.0–91.0 s)
    12:00:04  state #62  imbalance 0.81  vote=imbalance  active=imbalance  -23.4 dBFS  CLIP

State lines only with ``show_state``. The time shown is the wall-clock time of
the message's last sample (``time_end``), or when it was built if the source
has no wall clock; local time unless ``utc=True``.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import TextIO

from soundwatch.config import ConsoleSinkConfig
from soundwatch.events import LEVEL_FLOOR_DBFS, Event, Message, State
from soundwatch.sinks.base import Sink, SinkError, resolved, sink_error


class ConsoleSink(Sink):
    """Writes one line per message to ``stream`` (default: the current stdout).

    The future is already resolved when :meth:`publish` returns: the line has
    been written and the stream flushed. Thread-safe: lines never interleave.
    The stream is not closed by :meth:`close` (it is not ours).
    """

    type_name = "console"

    def __init__(
        self,
        config: ConsoleSinkConfig | None = None,
        *,
        stream: TextIO | None = None,
        utc: bool = False,
    ) -> None:
        config = config or ConsoleSinkConfig()
        super().__init__(name=config.name, include_state=config.show_state)
        self._stream = stream
        self._utc = utc
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, message: Message) -> Future[None]:
        if not self.accepts(message):
            self._count_skipped()
            return resolved()
        try:
            line = format_message(message, utc=self._utc)
            with self._lock:
                if self._closed:
                    raise SinkError(f"{self.name}: sink is closed")
                # Resolved at write time so that a redirected sys.stdout (tests,
                # a supervisor) is honoured.
                stream = self._stream if self._stream is not None else sys.stdout
                stream.write(line + "\n")
                stream.flush()
        except SinkError as e:
            self._count_failed(e)
            return resolved(e)
        except (OSError, ValueError) as e:
            error = sink_error(f"{self.name}: cannot write message: {e}", e)
            self._count_failed(error)
            return resolved(error)
        self._count_ok()
        return resolved()

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._lock:
            if self._closed:
                return True
            stream = self._stream if self._stream is not None else sys.stdout
            try:
                stream.flush()
            except (OSError, ValueError):
                return False
        return True

    def close(self, timeout_s: float | None = None) -> None:
        self.flush(timeout_s)
        with self._lock:
            self._closed = True


def _clock(wall_end: float | None, emitted_at: float, utc: bool) -> str:
    when = datetime.fromtimestamp(wall_end if wall_end is not None else emitted_at, timezone.utc)
    return (when if utc else when.astimezone()).strftime("%H:%M:%S")


def _stream_span(message: Message) -> str:
    return f"(stream {message.stream_start_s:.1f}–{message.stream_end_s:.1f} s)"


def format_message(message: Message, *, utc: bool = False) -> str:
    """The console line for one message (without the newline)."""
    clock = _clock(message.wall_end, message.emitted_at, utc)
    quoted = json.dumps(message.message, ensure_ascii=False)
    if isinstance(message, State):
        cls = message.class_name
        parts = [f"{clock}  state #{message.window_index}  {cls} {message.probabilities[cls]:.2f}"]
        if message.vote:
            parts.append(f"vote={message.vote}")
        if message.active_class:
            parts.append(f"active={message.active_class}")
        parts.append(f"{max(message.level.rms_dbfs, LEVEL_FLOOR_DBFS):.1f} dBFS")
        if message.level.clipping:
            parts.append("CLIP")
        if message.level.silent:
            parts.append("SILENT")
        if message.warming_up:
            parts.append("warm-up")
        return "  ".join(parts)
    return _event_line(clock, quoted, message)


def _event_line(clock: str, quoted: str, event: Event) -> str:
    head = "ANOMALY STARTED" if event.ending is None else "ANOMALY ENDED  "
    line = (
        f"{clock}  {head}  {event.class_name}  {quoted}  "
        f"p_max={event.probability_max:.2f} p_mean={event.probability_mean:.2f} "
    )
    if event.ending is not None:
        line += f"{event.ending.duration_s:.1f} s {event.ending.reason} "
    return line + _stream_span(event)
