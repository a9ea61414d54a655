"""Azure IoT Hub / IoT Edge sink: events through a persistent outbox, the module twin as
live config, and direct methods. Uses azure-iot-device 2.x (``pip install '.[iotedge]'``).

Identity:
    Inside IoT Edge, ``IoTHubModuleClient.create_from_edge_environment()`` (edgeHub,
    also the IoT Edge simulator variables ``EdgeHubConnectionString`` and
    ``EdgeModuleCACertificateFile``). Outside it, a device or module connection
    string (``connection_string``, else the variable ``connection_string_env``
    names). A module identity sends to module outputs; a device identity has no
    outputs, so its messages carry the output name as the custom property
    ``output`` instead.

Messages (``content_type=application/json``, ``content_encoding=utf-8``), with
the custom properties ``type``, ``anomaly`` (``true``/``false``), ``class`` and
``severity`` that edgeHub routes can filter on (``WHERE severity = 'high'``):

``anomalies``   (``events_output``) ``anomaly_started`` / ``anomaly_ended`` events.
                Severity of a start: ``high`` if ``probability_max`` >= 0.9,
                ``medium`` if >= 0.7, else ``low``; an end is ``info``.
``telemetry``   (``telemetry_output``) the latest per-window state, at most one per
                ``state_min_interval_s`` except that a class change goes at once
                (severity ``info``). Best effort: a superseded state is never sent.

Delivery of events has the MQTT sink's guarantees (:mod:`soundwatch.sinks.mqtt`):
:meth:`IotHubSink.publish` stores the event in the :class:`~soundwatch.outbox.Outbox`
(SQLite, fsynced) and returns a future; the worker thread ("iothub-<name>") sends
events in outbox order with ``send_message_to_output`` and acknowledges a row only
when that call returned without error (the SDK returns on the hub's PUBACK). Events
wait in the outbox through outages and restarts. A message larger than IoT Hub's
256 KB limit can never be sent: it is refused at ``publish`` (future failed,
counted as ``too_large``, logged at ERROR), never silently dropped.

Module twin (``twin: true``): desired properties use the YAML config's schema.
On every connect and reconnect the full twin is fetched and its desired
properties (minus ``$``-keys and nulls) applied through ``Runtime.apply_patch``,
all or nothing; each desired patch is applied the same way. Reported properties
then say ``{"soundwatch": {"status": "applied", "desired_version": n, "error":
null, "config": {...applied config...}, "applied_at": ...}}``, or ``"status":
"rejected"`` with the validation ``error`` (and the config still in force).
Patches with a ``$version`` already applied are skipped.

Direct methods (``methods: true``), answered with status 200, 400 (bad payload,
with the reason), 404 (unknown method) or 503 (no pipeline attached):

``getStatus``        health, model, config and counters.
``setThresholds``    ``{"imbalance": {"on": 0.8, "off": 0.6}, ...}`` (or the same
                     under ``"thresholds"``): applied live like a twin patch.
``getRecentEvents``  ``{"limit": 1..100 (default 20), "before_seq": n}``: newest first.

Threads: the worker sends events and state; a control thread ("iothub-<name>-control")
handles twin and methods, so a slow send never delays a method answer. SDK
callbacks only queue work. The SDK reconnects a dropped connection itself; the
worker makes the first connection (and any after the SDK gave up) with
exponential backoff and jitter, logging each failure's cause.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from soundwatch.outbox import OutboxError
from soundwatch.sinks.base import SinkConfigError, SinkError
from soundwatch.sinks.mqtt import Backoff
from soundwatch.sinks.outbox_sink import (
    DEFAULT_CLOSE_TIMEOUT_S,
    PURGE_INTERVAL_S,
    OutboxSink,
    json_bytes,
    now_iso,
)

logger = logging.getLogger(__name__)

# IoT Hub's limit for one device-to-cloud message (the SDK's own check).
MAX_MESSAGE_BYTES = 262_144
# Direct method responses are limited to 128 KB; stay below it.
MAX_METHOD_RESPONSE_BYTES = 120_000
MAX_RECENT_EVENTS = 100
DEFAULT_RECENT_EVENTS = 20
MAX_IDLE_WAIT_S = 1.0
METHODS = ("getStatus", "setThresholds", "getRecentEvents")
# The reported property that holds this module's config report.
REPORTED_KEY = "soundwatch"
HIGH_SEVERITY_P = 0.9
MEDIUM_SEVERITY_P = 0.7


class IotHubTarget(Protocol):
    """What the sink needs from :class:`soundwatch.app.Runtime` (given through ``attach``)."""

    @property
    def config(self) -> Any: ...

    @property
    def latest_state(self) -> dict[str, Any] | None: ...

    def health(self) -> dict[str, Any]: ...

    def apply_patch(self, patch: Mapping[str, Any], source: str = ...) -> Any: ...

    def recent_events(
        self, limit: int = ..., before_seq: int | None = ...
    ) -> list[dict[str, Any]]: ...


ClientFactory = Callable[[], Any]


def severity(message: Mapping[str, Any]) -> str:
    """``high``/``medium``/``low`` for an anomaly start (by ``probability_max``), else ``info``."""
    if message.get("type") != "anomaly_started":
        return "info"
    try:
        p = float(message.get("probability_max") or 0.0)
    except (TypeError, ValueError):
        return "low"
    if p >= HIGH_SEVERITY_P:
        return "high"
    if p >= MEDIUM_SEVERITY_P:
        return "medium"
    return "low"


def message_properties(message: Mapping[str, Any]) -> dict[str, str]:
    """The custom properties routes filter on: ``type``, ``anomaly``, ``class``, ``severity``."""
    return {
        "type": str(message.get("type", "")),
        "anomaly": "true" if message.get("Anomaly") else "false",
        "class": str(message.get("class", "")),
        "severity": severity(message),
    }


def _strip_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Desired properties as a config patch: no ``$``-keys (``$version``, ``$metadata``)
    and no nulls (a null deletes a twin property; the live value stays)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key.startswith("$") or value is None:
            continue
        out[key] = _strip_meta(value) if isinstance(value, Mapping) else value
    return out


def config_report(config: Any) -> dict[str, Any]:
    """The live-changeable config, JSON-ready, for reported properties and ``getStatus``.

    Sinks are reduced to their names and types (their options may hold secrets).
    """
    doc: dict[str, Any] = config.model_dump(mode="json")
    doc["sinks"] = [{"name": s.get("name", s["type"]), "type": s["type"]} for s in doc["sinks"]]
    return doc


class _Problem(Exception):
    """A bad method payload: answered with status 400 and this text."""


def _load_sdk() -> Any:
    try:
        import azure.iot.device as sdk  # type: ignore[import-untyped,unused-ignore]
    except ImportError as e:
        raise SinkConfigError(
            f"the iothub sink needs azure-iot-device 2.x: pip install 'soundwatch[iotedge]' ({e})"
        ) from e
    return sdk


def in_iot_edge(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs as an IoT Edge module (or under the IoT Edge simulator)."""
    env = os.environ if env is None else env
    return bool(env.get("IOTEDGE_MODULEID")) and bool(
        env.get("EdgeHubConnectionString") or env.get("IOTEDGE_WORKLOADURI")
    )


class IotHubSink(OutboxSink):
    """Publishes to Azure IoT Hub / edgeHub (see the module docstring). Thread-safe."""

    type_name = "iothub"
    destination = "IoT Hub"

    def __init__(
        self,
        *,
        outbox: Mapping[str, Any],
        connection_string: str | None = None,
        connection_string_env: str | None = "IOTHUB_CONNECTION_STRING",
        events_output: str = "anomalies",
        telemetry_output: str = "telemetry",
        include_state: bool = True,
        state_min_interval_s: float = 60.0,
        twin: bool = True,
        methods: bool = True,
        keepalive_s: int = 60,
        connect_timeout_s: float = 30.0,
        reconnect: Mapping[str, Any] | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        super().__init__(name=name, include_state=include_state)
        env = os.environ if env is None else env
        problems = []
        if not events_output or not telemetry_output:
            problems.append("events_output and telemetry_output must not be empty")
        if state_min_interval_s < 0:
            problems.append(f"state_min_interval_s is {state_min_interval_s}; it must be >= 0")
        if keepalive_s < 5:
            problems.append(f"keepalive_s is {keepalive_s}; use at least 5")
        if connect_timeout_s <= 0:
            problems.append(f"connect_timeout_s is {connect_timeout_s}; it must be > 0")
        if not outbox.get("path"):
            problems.append("outbox.path is required (the config fills it in from state_dir)")
        if problems:
            raise SinkConfigError(f"iothub sink {self.name!r}: " + "; ".join(problems))
        reconnect_opts = dict(reconnect or {})
        try:
            self._backoff = Backoff(
                float(reconnect_opts.get("min_delay_s", 1.0)),
                float(reconnect_opts.get("max_delay_s", 60.0)),
            )
        except ValueError as e:
            raise SinkConfigError(f"iothub sink {self.name!r}: reconnect: {e}") from e

        # The SDK re-establishes a dropped connection itself, every this many seconds.
        self._retry_options = {
            "connection_retry": True,
            "connection_retry_interval": max(1, round(self._backoff.min_s)),
        }
        self.events_output = events_output
        self.telemetry_output = telemetry_output
        self.state_min_interval_s = state_min_interval_s
        self.twin_enabled = twin
        self.methods_enabled = methods
        self.connect_timeout_s = connect_timeout_s
        self._sdk: Any = _load_sdk()
        if connection_string is None and connection_string_env:
            connection_string = env.get(connection_string_env) or None
        self._module_identity = True
        if client_factory is not None:
            self.identity = "custom client"
            factory = client_factory
        elif connection_string:
            factory, self.identity = self._connection_string_factory(connection_string, keepalive_s)
        elif in_iot_edge(env) or env.get("EdgeHubConnectionString"):
            self.identity = "IoT Edge environment"

            def factory() -> Any:
                return self._sdk.IoTHubModuleClient.create_from_edge_environment(
                    keep_alive=keepalive_s, auto_connect=False, **self._retry_options
                )
        else:
            hint = f" or ${connection_string_env}" if connection_string_env else ""
            raise SinkConfigError(
                f"iothub sink {self.name!r}: not running in IoT Edge and no connection "
                f"string: set connection_string{hint}"
            )
        try:
            self._client: Any = factory()
        except (OSError, ValueError, TypeError) as e:
            raise SinkConfigError(
                f"iothub sink {self.name!r}: cannot create the client from the {self.identity}: {e}"
            ) from e
        except Exception as e:  # the SDK's own errors
            raise SinkError(f"iothub sink {self.name!r}: cannot create the client: {e}") from e

        self._stop = threading.Event()
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._connected = False
        self._conn_lock = threading.Lock()
        self._runtime: IotHubTarget | None = None
        self._last_state_sent = -math.inf
        # Counters for health.
        self._connects = 0
        self._disconnects = 0
        self._connected_since: str | None = None
        self._last_disconnect: str | None = None
        self._too_large = 0
        self._state_sent = 0
        self._state_failed = 0
        self._desired_version: int | None = None
        self._twin_applied = 0
        self._twin_rejected = 0
        self._twin_error: str | None = None
        self._twin_fetches = 0
        self._method_calls: dict[str, int] = {}
        self._method_errors = 0

        try:
            self._open_outbox(outbox)
        except SinkError:
            self._shutdown_client()
            raise

        # Twin and method handlers subscribe at once, so they are set after connecting.
        self._handlers_set = False
        self._client.on_connection_state_change = self._on_connection_state_change
        logger.info(
            "%s: IoT Hub via %s, outputs %s/%s, %d event(s) waiting in %s",
            self.name,
            self.identity,
            events_output,
            telemetry_output,
            self.outbox.depth(),
            self.outbox.path,
        )
        self._worker = threading.Thread(target=self._run, name=f"iothub-{self.name}", daemon=True)
        self._controller = threading.Thread(
            target=self._run_control, name=f"iothub-{self.name}-control", daemon=True
        )
        self._worker.start()
        self._controller.start()

    def _connection_string_factory(
        self, connection_string: str, keepalive_s: int
    ) -> tuple[ClientFactory, str]:
        fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
        device, module = fields.get("DeviceId"), fields.get("ModuleId")
        if not fields.get("HostName") or not device:
            raise SinkConfigError(
                f"iothub sink {self.name!r}: the connection string needs HostName and DeviceId"
            )
        self._module_identity = bool(module)
        cls = self._sdk.IoTHubModuleClient if module else self._sdk.IoTHubDeviceClient
        identity = f"connection string for {device}" + (f"/{module}" if module else "")

        def factory() -> Any:
            return cls.create_from_connection_string(
                connection_string, keep_alive=keepalive_s, auto_connect=False, **self._retry_options
            )

        return factory, identity

    # -- Sink API (any thread) ---------------------------------------------------

    def attach(self, runtime: IotHubTarget) -> None:
        """Take twin patches and method calls for ``runtime`` (called by Runtime)."""
        self._runtime = runtime
        if self._connected and self.twin_enabled:
            self._control.put(("sync", None))

    def _store_event(self, key: str, payload: bytes, message: Mapping[str, Any]) -> Future[None]:
        """Events too large for IoT Hub fail here; the rest are stored with their properties."""
        properties = message_properties(message)
        size = self._new_message(payload, properties).get_size()
        if size > MAX_MESSAGE_BYTES:
            with self._stats_lock:
                self._too_large += 1
            logger.error(
                "%s: event %s is %d bytes, more than IoT Hub's %d: dropped",
                self.name,
                key,
                size,
                MAX_MESSAGE_BYTES,
            )
            return self._fail(
                SinkError(
                    f"{self.name}: event {key} is {size} bytes, more than IoT Hub's limit of "
                    f"{MAX_MESSAGE_BYTES}; dropped (too_large)"
                )
            )
        return self._enqueue(key, payload, properties)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to ``timeout_s``, default 10 s), then shut the client down. Idempotent.

        Events not acknowledged by then stay in the outbox for the next process;
        their futures fail with a :class:`SinkError` saying so.
        """
        if self._closed:
            return
        if timeout_s is None:
            timeout_s = DEFAULT_CLOSE_TIMEOUT_S
        flushed = self.flush(timeout_s)
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._control.put(("stop", None))
        # Shutting the client down also cancels a send blocked on a dead link.
        self._shutdown_client()
        for thread in (self._worker, self._controller):
            thread.join(5.0)
            if thread.is_alive():
                logger.warning("%s: thread %s did not stop in time", self.name, thread.name)
        self._fail_unacknowledged(flushed)

    def health(self) -> dict[str, Any]:
        info = super().health()
        outbox = self._outbox_health()
        with self._state_lock:
            state = {
                "sent": self._state_sent,
                "superseded": self._state_superseded,
                "failed": self._state_failed,
                "min_interval_s": self.state_min_interval_s,
            }
        with self._stats_lock:
            twin = {
                "enabled": self.twin_enabled,
                "desired_version": self._desired_version,
                "applied": self._twin_applied,
                "rejected": self._twin_rejected,
                "fetches": self._twin_fetches,
                "last_error": self._twin_error,
            }
            methods = {
                "enabled": self.methods_enabled,
                "calls": dict(self._method_calls),
                "errors": self._method_errors,
            }
            too_large = self._too_large
        info.update(
            healthy=self._connected and not self.outbox.closed,
            connected=self._connected,
            identity=self.identity,
            outputs={"events": self.events_output, "telemetry": self.telemetry_output},
            connects=self._connects,
            disconnects=self._disconnects,
            connected_since=self._connected_since,
            last_disconnect=self._last_disconnect,
            dropped_too_large=too_large,
            outbox=outbox,
            state=state,
            twin=twin,
            methods=methods,
            sdk=str(getattr(self._sdk, "__version__", "") or _sdk_version()),
        )
        return info

    # -- SDK callbacks (the SDK's handler threads: only queue work) ----------------

    def _on_connection_state_change(self) -> None:
        with self._conn_lock:
            connected = bool(self._client.connected)
            was = self._connected
            self._connected = connected
        self._connection_changed(was, connected)

    def _connection_changed(self, was: bool, connected: bool) -> None:
        if connected and not was:
            self._connects += 1
            self._connected_since = now_iso()
            logger.info("%s: connected (%s)", self.name, self.identity)
            if self.twin_enabled:
                self._control.put(("sync", None))
        elif was and not connected:
            self._disconnects += 1
            self._last_disconnect = now_iso()
            if self._stop.is_set():
                logger.info("%s: disconnected", self.name)
            else:
                logger.warning("%s: connection to IoT Hub lost; the SDK reconnects", self.name)
        self._wake.set()

    def _on_desired_patch(self, patch: Any) -> None:
        self._control.put(("patch", patch))

    def _on_method_request(self, request: Any) -> None:
        self._control.put(("method", request))

    # -- the event worker --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._client.connected:
                try:
                    self._client.connect()
                except Exception as e:  # the SDK's ConnectionFailedError, CredentialError...
                    if self._stop.is_set():
                        break
                    delay = self._backoff.next()
                    with self._stats_lock:
                        self._last_error = f"cannot connect: {_describe(e)}"
                    logger.warning(
                        "%s: cannot connect to IoT Hub (%s); retrying in %.1f s",
                        self.name,
                        _describe(e),
                        delay,
                    )
                    self._idle(delay)
                    continue
                self._backoff.reset()
                with self._stats_lock:
                    self._last_error = None
                if not self._handlers_set:
                    self._set_handlers()
                if not self._connected:  # the state callback may not have run yet
                    self._on_connection_state_change()
            try:
                self._wake.clear()
                self._send_events()
                self._send_state_if_due()
                self._purge_if_due()
            except Exception as e:  # a bug must not kill the worker silently
                logger.exception("%s: worker error", self.name)
                with self._stats_lock:
                    self._last_error = f"unexpected: {e}"
                self._idle(self._backoff.next())
                continue
            self._wake.wait(self._next_wait())

    def _set_handlers(self) -> None:
        """Subscribe to desired-property patches and method calls (the SDK resubscribes
        after reconnects)."""
        try:
            if self.twin_enabled:
                self._client.on_twin_desired_properties_patch_received = self._on_desired_patch
            if self.methods_enabled:
                self._client.on_method_request_received = self._on_method_request
        except Exception as e:  # retried after the next connect
            logger.warning("%s: cannot subscribe to twin and methods: %s", self.name, _describe(e))
            return
        self._handlers_set = True

    def _idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, PURGE_INTERVAL_S))
            self._purge_if_due()

    def _next_wait(self) -> float:
        wait = MAX_IDLE_WAIT_S
        with self._state_lock:
            if self._pending_state is not None:
                due = self._last_state_sent + self.state_min_interval_s - time.monotonic()
                wait = min(wait, due)
        return max(wait, 0.005)

    def _send_events(self) -> None:
        while not self._stop.is_set() and self._client.connected:
            try:
                items = self.outbox.peek(1)
            except OutboxError as e:
                logger.error("%s: cannot read the outbox: %s", self.name, e)
                with self._stats_lock:
                    self._last_error = str(e)
                return
            if not items:
                return
            item = items[0]
            message = self._new_message(item.payload, item.attributes)
            try:
                self._send(message, self.events_output)
            except ValueError as e:  # the SDK's size check: this item can never be sent
                self._settle_drops(self.outbox.drop([item.id], "too_large"))
                with self._stats_lock:
                    self._too_large += 1
                logger.error("%s: IoT Hub refused event %s: %s", self.name, item.key, e)
                continue
            except Exception as e:
                if self._stop.is_set():
                    return
                delay = self._backoff.next()
                with self._stats_lock:
                    self._last_error = f"send failed: {_describe(e)}"
                logger.warning(
                    "%s: sending event %s failed (%s); it stays in the outbox, retrying in %.1f s",
                    self.name,
                    item.key,
                    _describe(e),
                    delay,
                )
                self._idle(delay)
                return
            self._backoff.reset()
            self._acknowledge_rows([item.id])

    def _send(self, message: Any, output: str) -> None:
        """One message to ``output``; returns when IoT Hub acknowledged it."""
        if self._module_identity:
            self._client.send_message_to_output(message, output)
        else:
            message.custom_properties["output"] = output
            self._client.send_message(message)

    def _new_message(self, payload: bytes, properties: Mapping[str, str]) -> Any:
        message = self._sdk.Message(
            payload.decode("utf-8"),
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.custom_properties.update(properties)
        return message

    # -- state telemetry (worker) --------------------------------------------------------

    def _send_state_if_due(self) -> None:
        if not self._client.connected:
            return
        now = time.monotonic()
        with self._state_lock:
            message = self._pending_state
            if message is None:
                return
            if not self._state_urgent and now - self._last_state_sent < self.state_min_interval_s:
                return
            self._pending_state = None
            self._state_urgent = False
            self._last_state_key = (message.get("class"), message.get("active_class"))
            self._last_state_sent = now
        try:
            payload = json_bytes(message)
            self._send(
                self._new_message(payload, message_properties(message)), self.telemetry_output
            )
        except Exception as e:  # state is best effort: the next one supersedes it
            with self._state_lock:
                self._state_failed += 1
            logger.warning("%s: sending state failed: %s", self.name, _describe(e))
            return
        with self._state_lock:
            self._state_sent += 1

    # -- twin and methods (control thread) ---------------------------------------------

    def _run_control(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._control.get(timeout=MAX_IDLE_WAIT_S)
            except queue.Empty:
                continue
            try:
                if kind == "sync":
                    self._sync_twin()
                elif kind == "patch":
                    self._apply_desired(item, full=False)
                elif kind == "method":
                    self._answer(item)
            except Exception as e:
                if self._stop.is_set():
                    return
                logger.exception("%s: handling %s failed", self.name, kind)
                with self._stats_lock:
                    self._twin_error = f"{kind}: {_describe(e)}"

    def _sync_twin(self) -> None:
        """Fetch the full twin and apply its desired properties (on every (re)connect)."""
        if self._runtime is None:
            return  # attach() asks again
        try:
            twin = self._with_timeout("get_twin", self._client.get_twin)
        except Exception as e:
            logger.warning("%s: cannot fetch the module twin: %s", self.name, _describe(e))
            with self._stats_lock:
                self._twin_error = f"get_twin: {_describe(e)}"
            if not self._stop.is_set() and self._client.connected:
                threading.Timer(self._backoff.next(), self._control.put, (("sync", None),)).start()
            return
        with self._stats_lock:
            self._twin_fetches += 1
        desired = twin.get("desired", {}) if isinstance(twin, Mapping) else {}
        self._apply_desired(desired, full=True)

    def _apply_desired(self, desired: Any, *, full: bool) -> None:
        from soundwatch.config import ConfigError

        runtime = self._runtime
        if runtime is None or not isinstance(desired, Mapping):
            return
        version = desired.get("$version")
        version = version if isinstance(version, int) else None
        seen = self._desired_version
        if version is not None and seen is not None and (version, full) <= (seen, False):
            logger.debug("%s: desired $version %s already applied", self.name, version)
            return
        patch = _strip_meta(desired)
        source = f"iothub:twin desired $version {version}"
        error: dict[str, Any] | None = None
        try:
            config = runtime.apply_patch(patch, source) if patch else runtime.config
        except ConfigError as e:
            error = {
                "message": "invalid desired properties; the previous config stays in force",
                "problems": [{"key": k, "message": m} for k, _line, m in e.problems],
            }
            config = runtime.config
        except Exception as e:  # a patch must never take the control thread down
            logger.exception("%s: applying desired properties failed", self.name)
            error = {"message": f"internal error: {e}", "problems": []}
            config = runtime.config
        with self._stats_lock:
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
        else:
            logger.warning(
                "%s: desired properties $version %s rejected: %s",
                self.name,
                version,
                error["problems"],
            )
        self._report(config, version=version, error=error)

    def _report(self, config: Any, *, version: int | None, error: dict[str, Any] | None) -> None:
        reported = {
            REPORTED_KEY: {
                "status": "applied" if error is None else "rejected",
                "desired_version": version,
                "error": error,
                "config": config_report(config),
                "reported_at": now_iso(),
            }
        }
        try:
            self._with_timeout(
                "patch_twin_reported_properties",
                lambda: self._client.patch_twin_reported_properties(reported),
            )
        except Exception as e:
            logger.warning("%s: cannot update reported properties: %s", self.name, _describe(e))
            with self._stats_lock:
                self._twin_error = f"reported properties: {_describe(e)}"

    def _answer(self, request: Any) -> None:
        name = str(request.name)
        with self._stats_lock:
            self._method_calls[name] = self._method_calls.get(name, 0) + 1
        status, payload = self._call(name, request.payload)
        if status != 200:
            with self._stats_lock:
                self._method_errors += 1
            logger.warning("%s: method %s answered %d: %s", self.name, name, status, payload)
        response = self._sdk.MethodResponse.create_from_method_request(request, status, payload)
        try:
            self._client.send_method_response(response)
        except Exception as e:
            logger.warning("%s: cannot answer method %s: %s", self.name, name, _describe(e))

    def _call(self, name: str, payload: Any) -> tuple[int, Any]:
        from soundwatch.config import ConfigError

        if name not in METHODS:
            return 404, {"error": f"unknown method {name!r}; available: {list(METHODS)}"}
        runtime = self._runtime
        if runtime is None:
            return 503, {"error": "no pipeline attached to this sink"}
        try:
            if name == "getStatus":
                return 200, self._status(runtime)
            if name == "getRecentEvents":
                return 200, self._recent_events(runtime, payload)
            return 200, self._set_thresholds(runtime, payload)
        except _Problem as e:
            return 400, {"error": str(e)}
        except ConfigError as e:
            return 400, {
                "error": "invalid thresholds; nothing was changed",
                "problems": [{"key": k, "message": m} for k, _line, m in e.problems],
            }
        except Exception as e:
            logger.exception("%s: method %s failed", self.name, name)
            return 500, {"error": f"internal error: {e}"}

    def _status(self, runtime: IotHubTarget) -> dict[str, Any]:
        bundle = getattr(runtime, "bundle", None)
        stats = getattr(runtime, "stats", None)
        model = bundle.info() if bundle is not None else None
        if isinstance(model, dict):  # keep the answer small: no training metrics
            model = {k: v for k, v in model.items() if k not in ("metrics", "provenance")}
        counters: dict[str, Any] = {}
        if stats is not None:
            counters = {
                "windows": stats.windows,
                "events": dict(stats.events),
                "publish_failures": dict(stats.publish_failures),
            }
        return {
            "health": runtime.health(),
            "model": model,
            "config": config_report(runtime.config),
            "counters": counters,
        }

    def _recent_events(self, runtime: IotHubTarget, payload: Any) -> dict[str, Any]:
        doc = {} if payload is None else payload
        if not isinstance(doc, dict):
            raise _Problem('payload must be a JSON object like {"limit": 20, "before_seq": 100}')
        extra = sorted(set(doc) - {"limit", "before_seq"})
        if extra:
            raise _Problem(f"unknown key(s) {extra}; use limit and before_seq")
        limit = doc.get("limit", DEFAULT_RECENT_EVENTS)
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 1 <= limit <= MAX_RECENT_EVENTS
        ):
            raise _Problem(f"limit must be an integer from 1 to {MAX_RECENT_EVENTS}")
        before = doc.get("before_seq")
        if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
            raise _Problem("before_seq must be an integer or null")
        events = runtime.recent_events(limit, before)
        truncated = False
        while events and len(json_bytes(events)) > MAX_METHOD_RESPONSE_BYTES:
            events = events[:-1]
            truncated = True
        return {"events": events, "count": len(events), "truncated": truncated}

    def _set_thresholds(self, runtime: IotHubTarget, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or not payload:
            raise _Problem(
                "payload must be a non-empty JSON object like "
                '{"imbalance": {"on": 0.8, "off": 0.6}}'
            )
        thresholds = payload.get("thresholds", payload) if len(payload) == 1 else payload
        if not isinstance(thresholds, dict) or not thresholds:
            raise _Problem("thresholds must be a non-empty JSON object of class: {on, off}")
        for cls, value in thresholds.items():
            if not isinstance(value, dict):
                raise _Problem(f'{cls}: expected {{"on": p, "off": p}}, got {value!r}')
        config = runtime.apply_patch(
            {"decision": {"thresholds": thresholds}}, "iothub:method setThresholds"
        )
        self._report(config, version=self._desired_version, error=None)
        current = config.decision.model_dump(mode="json")["thresholds"]
        return {"applied": thresholds, "thresholds": current}

    # -- helpers -------------------------------------------------------------------------

    def _with_timeout(self, what: str, call: Callable[[], Any]) -> Any:
        """Run an SDK twin request, giving up after ``connect_timeout_s``.

        The SDK waits for twin responses without a timeout (a response lost in a
        reconnect would block the control thread forever); the abandoned call
        finishes on its own thread whenever the SDK completes or cancels it.
        """
        done = threading.Event()
        outcome: list[Any] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as e:  # handed to the caller
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=run, name=f"iothub-{self.name}-{what}", daemon=True).start()
        if not done.wait(self.connect_timeout_s):
            raise TimeoutError(f"{what}: no answer within {self.connect_timeout_s} s")
        if failure:
            raise failure[0]
        return outcome[0]

    def _shutdown_client(self) -> None:
        try:
            self._client.shutdown()
        except Exception as e:
            logger.debug("%s: client shutdown: %s", self.name, _describe(e))


def _describe(error: BaseException) -> str:
    """The SDK wraps causes (``ConnectionFailedError`` from a socket error): name both."""
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    while cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
        cause = cause.__cause__
    return text


def _sdk_version() -> str:
    try:
        from azure.iot.device.constant import (  # type: ignore[import-untyped,unused-ignore]
            VERSION,
        )
    except ImportError:
        return "unknown"
    return str(VERSION)
