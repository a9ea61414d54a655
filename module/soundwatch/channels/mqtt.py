"""MQTT commands: the ``set`` and ``command`` topics, translated to :mod:`soundwatch.control`.

Under the sink's ``topic_prefix``:

``set``             a config patch: the bare patch, or ``{"request_id": ..., "patch": {...}}``;
                    answered on ``set/result`` with ``{"ok", "request_id", "applied"}`` or
                    ``{"ok": false, "request_id", "errors": [{"key", "message"}]}``
                    (and ``retry_after_s`` when the command was dropped as over the limit).
``command``         any command: ``{"command": "getStatus", "args": {...}, "request_id": ...}``;
                    answered on ``command/result`` with the control plane's result
                    (``ok``, ``command``, ``request_id``, ``status``, ``data`` or ``errors``).

A retained command is refused, the same way whenever it is delivered (the
subscription asks for "retain as published"): a retained ``set`` would
otherwise be applied again on every reconnect. Publishing an empty retained
message to clear it is not a command and gets no answer. Answers are QoS 0:
they never take an in-flight slot from an event.

Handlers run on paho's network thread: they hand the raw payload to the
control plane's queue and return; parsing happens there, never here.
"""

from __future__ import annotations

import logging
from typing import Any

from soundwatch.control import (
    CommandError,
    CommandRequest,
    CommandResult,
    ControlPlane,
    Problem,
    invalid,
    parse_json,
    peek_request_id,
    request_from,
)
from soundwatch.sinks.mqtt import MqttSink
from soundwatch.sinks.outbox_sink import now_iso

logger = logging.getLogger(__name__)

CHANNEL = "mqtt"
RETAINED = "retained commands are refused; publish commands without the retain flag"


class MqttChannel:
    """The command topics of one MQTT sink's connection."""

    def __init__(self, sink: MqttSink, control: ControlPlane) -> None:
        self.name = sink.name
        self._sink = sink
        self._control = control
        prefix = sink.topic_prefix
        self.topics = {
            "set": f"{prefix}/set",
            "set_result": f"{prefix}/set/result",
            "command": f"{prefix}/command",
            "command_result": f"{prefix}/command/result",
        }
        self._cleared = 0
        sink.subscribe(self.topics["set"], self._on_set)
        sink.subscribe(self.topics["command"], self._on_command)

    def health(self) -> dict[str, Any]:
        return {"type": CHANNEL, "topics": dict(self.topics), "retained_cleared": self._cleared}

    def close(self) -> None:
        """Nothing to release: the subscriptions end with the sink's connection."""

    # -- paho's network thread: queue, never parse or block ----------------------------

    def _on_set(self, payload: bytes, retained: bool) -> None:
        self._take("set", payload, retained, "setConfig", self._answer_set)

    def _on_command(self, payload: bytes, retained: bool) -> None:
        self._take("command", payload, retained, None, self._answer_command)

    def _take(
        self,
        kind: str,
        payload: bytes,
        retained: bool,
        default: str | None,
        reply: Any,
    ) -> None:
        topic = self.topics[kind]
        if retained and not payload:
            self._cleared += 1  # someone cleared a retained command: nothing to do
            logger.info("%s: retained message on %s cleared", self.name, topic)
            return
        origin = f"mqtt:{topic}"

        def parse() -> CommandRequest:
            if retained:
                raise invalid("(message)", RETAINED)
            doc = parse_json(payload)
            request = request_from(doc, channel=CHANNEL, origin=origin, default_command=default)
            if default is not None and request.command != default:
                problem = Problem("command", f"use {self.topics['command']} for commands")
                raise CommandError("invalid", [problem], request.request_id)
            return request

        self._control.submit(CHANNEL, origin, parse, reply, lambda: peek_request_id(payload))

    # -- answers (the control thread, or paho's for a dropped command) --------------------

    def _answer_set(self, result: CommandResult) -> None:
        doc: dict[str, Any] = {"ok": result.ok, "request_id": result.request_id}
        if result.ok:
            doc["applied"] = result.data.get("applied")
        else:
            doc["errors"] = result.errors()
        if result.retry_after_s is not None:
            doc["retry_after_s"] = result.retry_after_s
        doc["emitted_at"] = now_iso()
        self._sink.send(self.topics["set_result"], doc, qos=0)

    def _answer_command(self, result: CommandResult) -> None:
        doc = {**result.to_json(), "emitted_at": now_iso()}
        self._sink.send(self.topics["command_result"], doc, qos=0)
