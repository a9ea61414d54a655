"""Azure IoT Hub / IoT Edge sink: events through a persistent outbox, state as telemetry.
Uses azure-iot-device 2.x (``pip install '.[iotedge]'``).

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

Delivery of events has the MQTT sink's guarantees (shared in
:class:`~soundwatch.sinks.outbox_sink.OutboxSink`): :meth:`IotHubSink.publish`
stores the event in the outbox and returns a future; the worker thread
("iothub-<name>") sends events in outbox order with ``send_message_to_output``
and acknowledges a row only when that call returned without error (the SDK
returns on the hub's PUBACK). A message larger than IoT Hub's 256 KB limit can
never be sent: it is refused at ``publish`` (future failed, counted as
``too_large``, logged at ERROR), never silently dropped.

The module twin and direct methods use this sink's client but not its code:
:mod:`soundwatch.channels.iothub` translates them to :mod:`soundwatch.control`
through :attr:`IotHubSink.client`, :meth:`IotHubSink.on_connected` and
:meth:`IotHubSink.with_timeout`.

The SDK reconnects a dropped connection itself; the worker makes the first
connection (and any after the SDK gave up) with exponential backoff and
jitter, logging each failure's cause.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from soundwatch.config import IotHubSinkConfig
from soundwatch.events import Event, Message, State, wire_json
from soundwatch.outbox import OutboxError
from soundwatch.sinks.base import SinkConfigError, SinkError
from soundwatch.sinks.outbox_sink import ConnectFailed, OutboxSink, now_iso

logger = logging.getLogger(__name__)

# IoT Hub's limit for one device-to-cloud message (the SDK's own check).
MAX_MESSAGE_BYTES = 262_144
HIGH_SEVERITY_P = 0.9
MEDIUM_SEVERITY_P = 0.7

ClientFactory = Callable[[], Any]


# An anomaly the unit's baseline decided is as severe as its novelty is far
# above the threshold (an unknown fault has no class probability to go by).
HIGH_SEVERITY_NOVELTY = 2.0
MEDIUM_SEVERITY_NOVELTY = 1.25


def severity(message: Message) -> str:
    """``high``/``medium``/``low`` for an anomaly start, else ``info``.

    By ``probability_max``; for an anomaly the unit's baseline decided, by
    ``novelty.score / novelty.threshold`` too, whichever is higher.
    """
    if not isinstance(message, Event) or message.kind != "anomaly_started":
        return "info"
    novelty = message.baseline.novelty if message.baseline is not None else None
    ratio = novelty.score / novelty.threshold if novelty and novelty.threshold > 0 else 0.0
    if message.probability_max >= HIGH_SEVERITY_P or ratio >= HIGH_SEVERITY_NOVELTY:
        return "high"
    if message.probability_max >= MEDIUM_SEVERITY_P or ratio >= MEDIUM_SEVERITY_NOVELTY:
        return "medium"
    return "low"


def message_properties(message: Message) -> dict[str, str]:
    """The custom properties routes filter on: ``type``, ``anomaly``, ``class``, ``severity``;
    with the per-unit baseline on, also ``decided_by`` (``baseline`` or ``classifier``, while
    the baseline is learned)."""
    properties = {
        "type": message.kind,
        "anomaly": "true" if message.anomaly else "false",
        "class": message.class_name,
        "severity": severity(message),
    }
    if message.baseline is not None:
        learned = message.baseline.baseline_id is not None
        properties["decided_by"] = "baseline" if learned else "classifier"
    return properties


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


def describe_error(error: BaseException) -> str:
    """The SDK wraps causes (``ConnectionFailedError`` from a socket error): name both."""
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    while cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
        cause = cause.__cause__
    return text


class IotHubSink(OutboxSink):
    """Publishes to Azure IoT Hub / edgeHub (see the module docstring). Thread-safe."""

    type_name = "iothub"
    destination = "IoT Hub"

    def __init__(
        self,
        config: IotHubSinkConfig,
        *,
        env: Mapping[str, str] | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        super().__init__(config)
        self.config = config
        env = os.environ if env is None else env
        # The SDK re-establishes a dropped connection itself, every this many seconds.
        self._retry_options = {
            "connection_retry": True,
            "connection_retry_interval": max(1, round(config.reconnect.min_delay_s)),
        }
        self._listeners: list[Callable[[], None]] = []
        self._conn_lock = threading.Lock()
        self._too_large = 0
        self.identity = "custom client"
        self.module_identity = True  # a device identity has no outputs
        try:
            self.sdk: Any = _load_sdk()
            factory = client_factory or self._factory(config, env)
            self.client: Any = self._create(factory)
        except SinkError:
            self.outbox.close()
            raise
        self.client.on_connection_state_change = self._on_connection_state_change
        logger.info(
            "%s: IoT Hub via %s, outputs %s/%s, %d event(s) waiting in %s",
            self.name,
            self.identity,
            config.events_output,
            config.telemetry_output,
            self.outbox.depth(),
            self.outbox.path,
        )
        self._start_worker()

    def _factory(self, config: IotHubSinkConfig, env: Mapping[str, str]) -> ClientFactory:
        connection_string = config.connection_string
        if connection_string is None and config.connection_string_env:
            connection_string = env.get(config.connection_string_env) or None
        if connection_string:
            return self._connection_string_factory(connection_string, config.keepalive_s)
        if in_iot_edge(env) or env.get("EdgeHubConnectionString"):
            self.identity = "IoT Edge environment"

            def factory() -> Any:
                return self.sdk.IoTHubModuleClient.create_from_edge_environment(
                    keep_alive=config.keepalive_s, auto_connect=False, **self._retry_options
                )

            return factory
        hint = f" or ${config.connection_string_env}" if config.connection_string_env else ""
        raise SinkConfigError(
            f"iothub sink {self.name!r}: not running in IoT Edge and no connection "
            f"string: set connection_string{hint}"
        )

    def _create(self, factory: ClientFactory) -> Any:
        try:
            return factory()
        except (OSError, ValueError, TypeError) as e:
            raise SinkConfigError(
                f"iothub sink {self.name!r}: cannot create the client from the {self.identity}: {e}"
            ) from e
        except Exception as e:  # the SDK's own errors
            raise SinkError(f"iothub sink {self.name!r}: cannot create the client: {e}") from e

    def _connection_string_factory(self, connection_string: str, keepalive_s: int) -> ClientFactory:
        fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
        device, module = fields.get("DeviceId"), fields.get("ModuleId")
        if not fields.get("HostName") or not device:
            raise SinkConfigError(
                f"iothub sink {self.name!r}: the connection string needs HostName and DeviceId"
            )
        self.module_identity = bool(module)
        cls = self.sdk.IoTHubModuleClient if module else self.sdk.IoTHubDeviceClient
        self.identity = f"connection string for {device}" + (f"/{module}" if module else "")

        def factory() -> Any:
            return cls.create_from_connection_string(
                connection_string, keep_alive=keepalive_s, auto_connect=False, **self._retry_options
            )

        return factory

    # -- for the twin and methods channel --------------------------------------------

    def on_connected(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every (re)connect, on the SDK's thread: it must only queue."""
        self._listeners.append(listener)
        if self._connected:
            listener()

    def with_timeout(self, what: str, call: Callable[[], Any]) -> Any:
        """Run an SDK request, giving up after ``connect_timeout_s``.

        The SDK waits for twin responses without a timeout (a response lost in a
        reconnect would block the caller forever); the abandoned call finishes
        on its own thread whenever the SDK completes or cancels it.
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
        timeout_s = self.config.connect_timeout_s
        if not done.wait(timeout_s):
            raise TimeoutError(f"{what}: no answer within {timeout_s} s")
        if failure:
            raise failure[0]
        return outcome[0]

    # -- Sink API (any thread) ---------------------------------------------------

    def _store_event(self, key: str, payload: bytes, event: Event) -> Future[None]:
        """Events too large for IoT Hub fail here; the rest are stored with their properties."""
        properties = message_properties(event)
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

    def health(self) -> dict[str, Any]:
        info = super().health()
        with self._stats_lock:
            too_large = self._too_large
        info.update(
            identity=self.identity,
            outputs={
                "events": self.config.events_output,
                "telemetry": self.config.telemetry_output,
            },
            dropped_too_large=too_large,
            sdk=str(getattr(self.sdk, "__version__", "") or _sdk_version()),
        )
        return info

    # -- SDK callbacks (the SDK's handler threads: only queue work) ----------------

    def _on_connection_state_change(self) -> None:
        with self._conn_lock:
            connected = bool(self.client.connected)
            was = self._connected
            if connected and not was:
                self._mark_connected()
            elif was and not connected:
                self._mark_disconnected(f"connection lost at {now_iso()}")
        if connected and not was:
            logger.info("%s: connected (%s)", self.name, self.identity)
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    logger.exception("%s: a connection listener failed", self.name)
        elif was and not connected:
            if self._stop.is_set():
                logger.info("%s: disconnected", self.name)
            else:
                logger.warning("%s: connection to IoT Hub lost; the SDK reconnects", self.name)
        self._wake.set()

    # -- the transport hooks (worker) ----------------------------------------------

    def _connect(self) -> None:
        if not self.client.connected:
            try:
                self.client.connect()
            except Exception as e:  # the SDK's ConnectionFailedError, CredentialError...
                raise ConnectFailed(f"cannot connect to IoT Hub: {describe_error(e)}") from e
        if not self._connected:  # the state callback may not have run yet
            self._on_connection_state_change()

    def _connected_now(self) -> bool:
        return bool(self.client.connected)

    def _step(self) -> None:
        self._send_events()
        self._send_state_if_due()

    def _interrupt(self) -> None:
        # Shutting the client down also cancels a send blocked on a dead link.
        try:
            self.client.shutdown()
        except Exception as e:
            logger.debug("%s: client shutdown: %s", self.name, describe_error(e))

    def _send_events(self) -> None:
        while not self._stop.is_set() and self.client.connected:
            try:
                items = self.outbox.peek(1)
            except OutboxError as e:
                logger.error("%s: cannot read the outbox: %s", self.name, e)
                self._set_error(str(e))
                return
            if not items:
                return
            item = items[0]
            message = self._new_message(item.payload, item.attributes)
            try:
                self._send(message, self.config.events_output)
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
                self._set_error(f"send failed: {describe_error(e)}")
                logger.warning(
                    "%s: sending event %s failed (%s); it stays in the outbox, retrying in %.1f s",
                    self.name,
                    item.key,
                    describe_error(e),
                    delay,
                )
                self._idle(delay)
                return
            self._backoff.reset()
            self._acknowledge_rows([item.id])

    def _send_state_if_due(self) -> None:
        state: State | None = self._due_state()
        if state is None:
            return
        try:
            message = self._new_message(wire_json(state), message_properties(state))
            self._send(message, self.config.telemetry_output)
        except Exception as e:  # state is best effort: the next one supersedes it
            self._count_state(sent=False)
            logger.warning("%s: sending state failed: %s", self.name, describe_error(e))
            return
        self._count_state(sent=True)

    def _send(self, message: Any, output: str) -> None:
        """One message to ``output``; returns when IoT Hub acknowledged it."""
        if self.module_identity:
            self.client.send_message_to_output(message, output)
        else:
            message.custom_properties["output"] = output
            self.client.send_message(message)

    def _new_message(self, payload: bytes, properties: Mapping[str, str]) -> Any:
        message = self.sdk.Message(
            payload.decode("utf-8"),
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.custom_properties.update(properties)
        return message


def _sdk_version() -> str:
    try:
        from azure.iot.device.constant import (  # type: ignore[import-untyped,unused-ignore]
            VERSION,
        )
    except ImportError:
        return "unknown"
    return str(VERSION)
