"""Console sink: one human-readable line per message.

Lines look like this (wrapped here; each is one line)::

    12:00:03  ANOMALY STARTED  imbalance  "Component is imbalanced"  p_max=0.97 p_mean=0.93
        (stream 61.0–71.0 s)
    12:00:33  ANOMALY ENDED    imbalance  "Component is imbalanced"  p_max=0.97 p_mean=0.91
        30.0 s cleared (stream 61.0–91.0 s)
    12:00:04  state #62  imbalance 0.81  vote=imbalance  active=imbalance  -23.4 dBFS  CLIP

State lines only with ``show_state=True``. The time shown is the wall-clock
time of the message's last sample (``time_end``), or when it was built if the
source has no wall clock; local time unless ``utc=True``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any, TextIO

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
        *,
        stream: TextIO | None = None,
        show_state: bool = False,
        utc: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, include_state=show_state)
        self._stream = stream
        self._utc = utc
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, message: Mapping[str, Any]) -> Future[None]:
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
        except (OSError, ValueError, KeyError, TypeError) as e:
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


def _clock(message: Mapping[str, Any], utc: bool) -> str:
    stamp = message.get("time_end") or message.get("emitted_at")
    if not isinstance(stamp, str):
        return "--:--:--"
    try:
        # fromisoformat() accepts "Z" only from Python 3.11.
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "--:--:--"
    when = when.astimezone(timezone.utc) if utc else when.astimezone()
    return when.strftime("%H:%M:%S")


def _stream_span(message: Mapping[str, Any]) -> str:
    return f"(stream {message['stream_start_s']:.1f}–{message['stream_end_s']:.1f} s)"


def format_message(message: Mapping[str, Any], *, utc: bool = False) -> str:
    """The console line for one message (without the newline)."""
    kind = message.get("type")
    clock = _clock(message, utc)
    quoted = json.dumps(message.get("Message", ""), ensure_ascii=False)
    if kind == "anomaly_started":
        return (
            f"{clock}  ANOMALY STARTED  {message['class']}  {quoted}  "
            f"p_max={message['probability_max']:.2f} p_mean={message['probability_mean']:.2f} "
            f"{_stream_span(message)}"
        )
    if kind == "anomaly_ended":
        return (
            f"{clock}  ANOMALY ENDED    {message['class']}  {quoted}  "
            f"p_max={message['probability_max']:.2f} p_mean={message['probability_mean']:.2f} "
            f"{message['duration_s']:.1f} s {message['reason']} {_stream_span(message)}"
        )
    if kind == "state":
        cls = message["class"]
        parts = [
            f"{clock}  state #{message['window_index']}  {cls} {message['Probabilities'][cls]:.2f}"
        ]
        if message.get("vote"):
            parts.append(f"vote={message['vote']}")
        if message.get("active_class"):
            parts.append(f"active={message['active_class']}")
        level = message.get("level") or {}
        if "rms_dbfs" in level:
            parts.append(f"{level['rms_dbfs']:.1f} dBFS")
        if level.get("clipping"):
            parts.append("CLIP")
        if level.get("silent"):
            parts.append("SILENT")
        if message.get("warming_up"):
            parts.append("warm-up")
        return "  ".join(parts)
    # Anything else (a future message type) is shown as compact JSON.
    return f"{clock}  {kind}  {json.dumps(message, ensure_ascii=False, sort_keys=True)}"
