"""IoT Hub commands: the module twin and direct methods, translated to :mod:`soundwatch.control`.

Module twin (``twin: true``): desired properties use the YAML config's schema.
On every connect and reconnect the full twin is fetched and its desired
properties (minus ``$``-keys and nulls) applied as a ``setConfig`` command,
all or nothing; each desired patch is applied the same way. Reported
properties then say ``{"soundwatch": {"status": "applied", "desired_version":
n, "error": null, "config": {...applied config...}, "reported_at": ...}}``, or
``"status": "rejected"`` with the ``error`` (and the config still in force).
Patches with a ``$version`` already applied are skipped. Desired properties
are a config patch, so the same keys are refused live as anywhere else
(``log_level`` applies live; ``window.window_s``, sources and sinks need a
restart).

Direct methods (``methods: true``): every command of the control plane by its
name (``getStatus``, ``setThresholds``, ``getRecentEvents``, ``setConfig``,
...), answered with status 200, 400 (bad payload, with the reason), 404
(unknown method), 429 (over the rate limit), 500 or 503. Errors are
``{"error": summary, "errors": [{"key", "message"}]}``.

The SDK's callbacks only queue work; this channel's thread
("iothub-<name>-control") does the SDK calls (twin fetch, reported
properties, method responses) and runs the commands through the control
plane, so a slow send never delays a method answer and no command runs on the
sink's event worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

from soundwatch.control import (
    CommandRequest,
    CommandResult,
    ControlPlane,
    check_nesting,
    config_report,
)
from soundwatch.events import json_bytes
from soundwatch.sinks.iothub import IotHubSink, describe_error
from soundwatch.sinks.outbox_sink import MAX_IDLE_WAIT_S, now_iso

logger = logging.getLogger(__name__)

CHANNEL = "iothub"
# The reported property that holds this module's config report.
REPORTED_KEY = "soundwatch"
# Direct method responses are limited to 128 KB; stay below it.
MAX_METHOD_RESPONSE_BYTES = 120_000
HTTP_STATUS = {"ok": 200, "invalid": 400, "unknown": 404, "busy": 429, "failed": 500}


def strip_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Desired properties as a config patch: no ``$``-keys (``$version``, ``$metadata``)
    and no nulls (a null deletes a twin property; the live value stays)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key.startswith("$") or value is None:
            continue
        out[key] = strip_meta(value) if isinstance(value, Mapping) else value
    return out


def error_body(result: CommandResult) -> dict[str, Any]:
    """A refused command's answer: a one-line ``error`` and the ``errors`` list."""
    body: dict[str, Any] = {
        "error": "; ".join(p.message for p in result.problems) or result.status,
        "errors": result.errors(),
    }
    if result.retry_after_s is not None:
        body["retry_after_s"] = result.retry_after_s
    return body


class IotHubChannel:
    """The twin and direct methods of one IoT Hub sink's client."""

    def __init__(self, sink: IotHubSink, control: ControlPlane) -> None:
        self.name = sink.name
        self._sink = sink
        self._control = control
        self._twin = sink.config.twin
        self._methods = sink.config.methods
        self._work: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._handlers_set = False
        self._lock = threading.Lock()  # guards the counters
        self._desired_version: int | None = None
        self._twin_applied = 0
        self._twin_rejected = 0
        self._twin_fetches = 0
        self._twin_error: str | None = None
        self._method_calls: dict[str, int] = {}
        self._method_errors = 0
        self._thread = threading.Thread(
            target=self._run, name=f"iothub-{sink.name}-control", daemon=True
        )
        self._thread.start()
        sink.on_connected(lambda: self._work.put(("connected", None)))

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "type": CHANNEL,
                "twin": {
                    "enabled": self._twin,
                    "desired_version": self._desired_version,
                    "applied": self._twin_applied,
                    "rejected": self._twin_rejected,
                    "fetches": self._twin_fetches,
                    "last_error": self._twin_error,
                },
                "methods": {
                    "enabled": self._methods,
                    "calls": dict(self._method_calls),
                    "errors": self._method_errors,
                },
            }

    def close(self) -> None:
        self._stop.set()
        self._work.put(("stop", None))
        self._thread.join(5.0)

    # -- SDK callbacks (the SDK's handler threads: only queue work) ----------------

    def _on_desired_patch(self, patch: Any) -> None:
        self._work.put(("patch", patch))

    def _on_method_request(self, request: Any) -> None:
        self._work.put(("method", request))

    # -- this channel's thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._work.get(timeout=MAX_IDLE_WAIT_S)
            except queue.Empty:
                continue
            try:
                if kind == "connected":
                    self._set_handlers()
                    if self._twin:
                        self._sync_twin()
                elif kind == "sync":
                    self._sync_twin()
                elif kind == "patch":
                    self._apply_desired(item, full=False)
                elif kind == "method":
                    self._answer(item)
            except Exception as e:  # nothing an SDK or a document does may end this thread
                if self._stop.is_set():
                    return
                logger.exception("%s: handling %s failed", self.name, kind)
                with self._lock:
                    self._twin_error = f"{kind}: {describe_error(e)}"

    def _set_handlers(self) -> None:
        """Subscribe to desired-property patches and method calls, once connected
        (the SDK subscribes at once, and resubscribes after reconnects)."""
        if self._handlers_set:
            return
        client = self._sink.client
        try:
            if self._twin:
                client.on_twin_desired_properties_patch_received = self._on_desired_patch
            if self._methods:
                client.on_method_request_received = self._on_method_request
        except Exception as e:  # retried after the next connect
            logger.warning("%s: cannot subscribe to twin and methods: %s", self.name, e)
            return
        self._handlers_set = True

    def _sync_twin(self) -> None:
        """Fetch the full twin and apply its desired properties (on every (re)connect)."""
        sink = self._sink
        try:
            twin = sink.with_timeout("get_twin", sink.client.get_twin)
        except Exception as e:
            logger.warning("%s: cannot fetch the module twin: %s", self.name, describe_error(e))
            with self._lock:
                self._twin_error = f"get_twin: {describe_error(e)}"
            if not self._stop.is_set() and sink.client.connected:
                self._later(sink.config.reconnect.min_delay_s, "sync")
            return
        with self._lock:
            self._twin_fetches += 1
        desired = twin.get("desired", {}) if isinstance(twin, Mapping) else {}
        self._apply_desired(desired, full=True)

    def _later(self, delay_s: float, kind: str) -> None:
        timer = threading.Timer(delay_s, self._work.put, ((kind, None),))
        timer.daemon = True
        timer.start()

    def _apply_desired(self, desired: Any, *, full: bool) -> None:
        if not isinstance(desired, Mapping):
            return
        version = desired.get("$version")
        version = version if isinstance(version, int) else None
        seen = self._desired_version
        if version is not None and seen is not None and (version, full) <= (seen, False):
            logger.debug("%s: desired $version %s already applied", self.name, version)
            return
        origin = f"iothub:twin desired $version {version}"

        def parse() -> CommandRequest:
            check_nesting(desired)
            return CommandRequest("setConfig", strip_meta(desired), CHANNEL, origin)

        patch_empty = not strip_meta(desired) if isinstance(desired, Mapping) else True
        if patch_empty:
            result = CommandResult("setConfig", "ok")
        else:
            result = self._control.call(CHANNEL, origin, parse)
        if result.status == "busy":  # the twin is the truth: fetch it again shortly
            self._later(result.retry_after_s or 1.0, "sync")
            return
        error: dict[str, Any] | None = None
        if not result.ok:
            error = {
                "message": "invalid desired properties; the previous config stays in force",
                "problems": result.errors(),
            }
        with self._lock:
            self._desired_version = version
            if error is None:
                self._twin_applied += 1
                self._twin_error = None
            else:
                self._twin_rejected += 1
                self._twin_error = error["message"]
        if error is None:
            logger.info(
                "%s: desired properties $version %s applied (%s)",
                self.name,
                version,
                "full twin" if full else "patch",
            )
        self._report(version=version, error=error)

    def _report(self, *, version: int | None, error: dict[str, Any] | None) -> None:
        sink = self._sink
        reported = {
            REPORTED_KEY: {
                "status": "applied" if error is None else "rejected",
                "desired_version": version,
                "error": error,
                "config": config_report(self._control.config),
                "reported_at": now_iso(),
            }
        }
        try:
            sink.with_timeout(
                "patch_twin_reported_properties",
                lambda: sink.client.patch_twin_reported_properties(reported),
            )
        except Exception as e:
            logger.warning(
                "%s: cannot update reported properties: %s", self.name, describe_error(e)
            )
            with self._lock:
                self._twin_error = f"reported properties: {describe_error(e)}"

    def _answer(self, request: Any) -> None:
        name = str(request.name)
        payload = request.payload
        with self._lock:
            self._method_calls[name] = self._method_calls.get(name, 0) + 1
        origin = f"iothub:method {name}"

        def parse() -> CommandRequest:
            check_nesting(payload)
            return CommandRequest(name, payload, CHANNEL, origin)

        result = self._control.call(CHANNEL, origin, parse)
        status = HTTP_STATUS.get(result.status, 503)
        body: Any = self._fit(dict(result.data)) if result.ok else error_body(result)
        if not result.ok:
            with self._lock:
                self._method_errors += 1
            logger.warning("%s: method %s answered %d: %s", self.name, name, status, body)
        elif result.command in ("setConfig", "setThresholds"):
            body.pop("config", None)  # the twin's reported properties carry it
            self._report(version=self._desired_version, error=None)
        sdk = self._sink.sdk
        response = sdk.MethodResponse.create_from_method_request(request, status, body)
        try:
            self._sink.client.send_method_response(response)
        except Exception as e:
            logger.warning("%s: cannot answer method %s: %s", self.name, name, describe_error(e))

    @staticmethod
    def _fit(body: dict[str, Any]) -> dict[str, Any]:
        """Drop the oldest events until the answer fits a method response."""
        events = body.get("events")
        if not isinstance(events, list):
            return body
        truncated = False
        while events and len(json_bytes(body)) > MAX_METHOD_RESPONSE_BYTES:
            events = events[:-1]
            body = {**body, "events": events, "count": len(events)}
            truncated = True
        body["truncated"] = truncated
        return body
