"""MQTT sink: anomaly events through a persistent outbox, plus status, state and health.

Topics, under ``topic_prefix`` (the config's default is ``soundwatch/<device_id>``):

``status``      retained ``online`` / ``offline``. ``offline`` is the Last Will
                (the broker publishes it when the connection dies, e.g. on
                ``kill -9``) and is also published on a clean shutdown.
                ``online`` follows every connect, but a sink that a pipeline
                feeds states (bound, ``include_state``) first publishes a
                state of this run: the retained state of a previous run
                (an anomaly that was active when it died) is never
                announced as current. (The runtime binds each sink as soon
                as it is built, before it can have connected.)
``events``      ``anomaly_started`` / ``anomaly_ended`` events (event.schema.json),
                QoS ``qos`` (1 by default), not retained.
``state``       retained; the latest per-window state (state.schema.json),
                rate-limited to one per ``state_min_interval_s``, except that a
                change of ``class`` or ``active_class`` is published at once.
``health``      retained; the module's health (source, model, sinks, with this
                sink's outbox depth), every ``health_interval_s`` and on connect.

The command topics (``set``, ``command`` and their ``/result``) share this
sink's connection but not its code: :mod:`soundwatch.channels.mqtt` translates
them to :mod:`soundwatch.control` through :meth:`MqttSink.subscribe` and
:meth:`MqttSink.send`.

Delivery of events (the part that must not lose anything):

1. :meth:`MqttSink.publish` writes the event to the :class:`~soundwatch.outbox.Outbox`
   (SQLite, WAL, fsynced) on the caller's thread and returns a future. Nothing
   else happens on that thread: the network is never touched there.
2. The sink's worker thread ("mqtt-<name>") peeks events in outbox order and
   hands at most ``max_inflight`` at a time to paho (QoS 1), and at most half
   the broker's MQTT 5 Receive Maximum.
3. On the broker's PUBACK, paho's network thread only queues the message id;
   the worker maps it back to the outbox row, deletes acknowledged rows in one
   transaction and resolves their futures. A row leaves the outbox only there,
   or through the outbox's counted and logged drop policy (its future then
   fails).
4. When the connection drops, paho keeps the unacknowledged messages and
   resends them (same message ids, DUP set) right after the next CONNACK; the
   worker hands out no new event until those are acknowledged, so events reach
   the broker in order. After a restart (even ``kill -9``) the outbox still
   holds every unacknowledged event and the new process sends them first.
   A receiver may see an event twice (QoS 1 redelivery) and de-duplicates on
   ``event_id``.

Connection: the worker (:class:`~soundwatch.sinks.outbox_sink.OutboxSink`)
connects itself, so every failure is logged and shown in health with its real
cause, runs paho's network thread while connected, and reconnects with
exponential backoff and jitter. MQTT 5 with a clean start
(:mod:`.mqtt_compat`); TLS (CA, client certificate and key), username and
password (``password`` or the environment variable named by ``password_env``)
are configurable. Works with paho-mqtt 1.6.x and 2.x.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from soundwatch.config import MqttSinkConfig, MqttTlsConfig
from soundwatch.events import json_bytes, wire_json
from soundwatch.ha_discovery import discovery_messages
from soundwatch.outbox import OutboxError
from soundwatch.sinks import mqtt_compat
from soundwatch.sinks.base import SinkConfigError, SinkContext
from soundwatch.sinks.outbox_sink import ConnectFailed, OutboxSink, now_iso

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
# paho may hold a few non-event messages (status, state, health, answers) besides events.
_PAHO_INFLIGHT_HEADROOM = 16
_OFFLINE_ACK_WAIT_S = 1.0

# Called on paho's network thread with (payload, retained): must not block.
TopicHandler = Callable[[bytes, bool], None]


class MqttSink(OutboxSink):
    """Publishes to an MQTT broker (see the module docstring). Thread-safe."""

    type_name = "mqtt"
    destination = "the broker"

    def __init__(self, config: MqttSinkConfig, *, env: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        env = os.environ if env is None else env
        password = config.password
        if password is None and config.password_env:
            password = env.get(config.password_env) or None
        if password is not None and not config.username:
            self.outbox.close()
            raise SinkConfigError(f"mqtt sink {self.name!r}: a password needs a username")
        tls = config.tls
        self.tls_enabled = tls.enabled or any(p is not None for p in (tls.ca, tls.cert, tls.key))
        self.config = config
        self.host = config.host
        self.port = config.port or (DEFAULT_TLS_PORT if self.tls_enabled else DEFAULT_PORT)
        self.client_id = config.client_id
        self.topic_prefix = config.topic_prefix.strip("/")
        self.topics = {
            kind: f"{self.topic_prefix}/{kind}" for kind in ("status", "events", "state", "health")
        }
        try:
            ssl_context = _ssl_context(tls) if self.tls_enabled else None
        except SinkConfigError as e:
            self.outbox.close()
            raise SinkConfigError(f"mqtt sink {self.name!r}: {e}") from e

        # Shared between the caller's threads, paho's thread and the worker.
        self._conn_change = threading.Event()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._accepted = False
        self._lost = False
        self._refusal: str | None = None
        self._paho_error: str | None = None
        self._disconnect_reason: str | None = None
        self._receive_maximum: int | None = None
        self._net: threading.Thread | None = None
        self._announce = False
        # `online` is due after a connect; when it goes out, see _publish_online_if_due.
        self._online_due = False
        self._state_of_this_run = False
        self._ha_birth = False
        self._subscriptions: dict[str, TopicHandler] = {}
        self._subs_lock = threading.Lock()
        # Worker-only bookkeeping.
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._cursor = 0  # highest row id handed to paho
        self._barrier: set[int] = set()  # rows paho resends after a reconnect
        self._next_health = 0.0
        self._resent = 0

        self._client = mqtt_compat.new_client(
            self.client_id,
            mqtt_compat.Callbacks(
                on_connect=self._on_connect,
                on_disconnect=self._on_disconnect,
                on_publish=self._on_publish,
                on_message=self._on_message,
                on_error_log=self._on_paho_error,
            ),
            paho_logger=logging.getLogger(f"{__name__}.paho"),
        )
        if ssl_context is not None:
            self._client.tls_set_context(ssl_context)
            if tls.insecure:
                self._client.tls_insecure_set(True)
        if config.username:
            self._client.username_pw_set(config.username, password)
        self._client.will_set(self.topics["status"], "offline", qos=1, retain=config.retain)
        self._client.max_inflight_messages_set(config.max_inflight + _PAHO_INFLIGHT_HEADROOM)
        self._client.max_queued_messages_set(0)
        mqtt_compat.set_connect_timeout(self._client, config.connect_timeout_s)
        if config.ha_discovery.enabled:
            # Home Assistant's birth message: an HA that (re)starts must hear the
            # status and state again, which matters when they are not retained.
            ha_prefix = config.ha_discovery.prefix.strip("/")
            self.subscribe(f"{ha_prefix}/status", self._on_ha_status)
        logger.info(
            "%s: MQTT %s:%d (%s), client id %s, topics %s/..., %d event(s) waiting in %s",
            self.name,
            self.host,
            self.port,
            "TLS" if self.tls_enabled else "plain",
            self.client_id,
            self.topic_prefix,
            self.outbox.depth(),
            self.outbox.path,
        )
        self._start_worker()

    # -- Sink API (any thread) ---------------------------------------------------

    def bind(self, context: SinkContext) -> None:
        """Report this module's health and state, and announce it to Home Assistant."""
        super().bind(context)
        self._announce = True
        self._wake.set()

    def subscribe(self, topic: str, handler: TopicHandler) -> None:
        """Deliver messages on ``topic`` to ``handler``, on this and every later connection.

        ``handler`` runs on paho's network thread with the payload and whether
        the broker holds it as retained (MQTT 5 "retain as published"); it
        must only queue work.
        """
        with self._subs_lock:
            self._subscriptions[topic] = handler
        if self._connected_now() and self._accepted:
            mqtt_compat.subscribe(self._client, topic, qos=1)

    def send(
        self, topic: str, doc: Mapping[str, Any], *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish a JSON document that is not an event (no outbox: best effort)."""
        try:
            payload = json_bytes(doc)
        except (TypeError, ValueError) as e:
            logger.error("%s: cannot encode a message for %s: %s", self.name, topic, e)
            return
        self._send_bytes(topic, payload, qos=qos, retain=retain)

    def _send_bytes(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt_compat.MQTT_ERR_SUCCESS, mqtt_compat.MQTT_ERR_NO_CONN):
            logger.warning(
                "%s: publishing to %s failed: %s",
                self.name,
                topic,
                mqtt_compat.error_text(info.rc),
            )

    def health(self) -> dict[str, Any]:
        info = super().health()
        info.update(
            broker=f"{self.host}:{self.port}",
            tls=self.tls_enabled,
            client_id=self.client_id,
            topic_prefix=self.topic_prefix,
            inflight=len(self._inflight),
            resent_after_reconnect=self._resent,
            paho=mqtt_compat.PAHO_VERSION,
        )
        return info

    # -- paho callbacks (paho's network thread: never block) -----------------------

    def _on_connect(self, accepted: bool, reason: str, receive_maximum: int | None) -> None:
        if accepted:
            self._receive_maximum = receive_maximum
            self._accepted = True
            self._refusal = None
        else:
            self._refusal = f"broker refused the connection: {reason}"
        self._conn_change.set()
        self._wake.set()

    def _on_disconnect(self, reason: str) -> None:
        self._lost = True
        self._disconnect_reason = self._paho_error or reason
        self._conn_change.set()
        self._wake.set()

    def _on_publish(self, mid: int) -> None:
        self._acks.put(mid)
        self._wake.set()

    def _on_paho_error(self, text: str) -> None:
        self._paho_error = text

    def _on_ha_status(self, payload: bytes, _retained: bool) -> None:
        if payload.strip() == b"online":
            self._ha_birth = True
            self._wake.set()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._subs_lock:
            handler = self._subscriptions.get(topic)
        if handler is None:
            return
        try:
            handler(payload, retained)
        except Exception:  # a handler must never take paho's thread down
            logger.exception("%s: handling a message on %s failed", self.name, topic)

    # -- the transport hooks (worker) ------------------------------------------------

    def _connect(self) -> None:
        """One attempt: TCP/TLS connect here (real errors), then wait for CONNACK."""
        self._accepted = False
        self._lost = False
        self._refusal = None
        self._paho_error = None
        self._disconnect_reason = None
        self._conn_change.clear()
        try:
            mqtt_compat.connect(self._client, self.host, self.port, self.config.keepalive_s)
        except (OSError, ValueError) as e:  # ssl.SSLError and socket.timeout are OSErrors
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e}") from e
        self._net = threading.Thread(
            target=self._network_loop, name=f"mqtt-{self.name}-net", daemon=True
        )
        self._net.start()
        deadline = time.monotonic() + self.config.connect_timeout_s
        while not (self._accepted or self._lost or self._stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._conn_change.wait(min(left, 0.1))
        if self._accepted and not self._lost:
            self._on_connected()
            return
        if self._refusal:
            reason = self._refusal
        elif self._lost:
            detail = self._paho_error or self._disconnect_reason
            reason = f"connection to {self.host}:{self.port} closed before CONNACK ({detail})"
        elif self._stop.is_set():
            reason = "stopped while connecting"
        else:
            reason = (
                f"no CONNACK from {self.host}:{self.port} within {self.config.connect_timeout_s} s"
            )
        self._stop_network()
        raise ConnectFailed(reason)

    def _on_connected(self) -> None:
        self._mark_connected()
        client = self._client
        self._online_due = True
        self._publish_online_if_due()
        with self._subs_lock:
            topics = list(self._subscriptions)
        for topic in topics:
            mqtt_compat.subscribe(client, topic, qos=1)
        self._barrier = set(self._inflight.values())
        if self._barrier:
            self._resent += len(self._barrier)
            logger.info(
                "%s: connected; paho resends %d unacknowledged event(s) first",
                self.name,
                len(self._barrier),
            )
        else:
            logger.info("%s: connected to %s:%d", self.name, self.host, self.port)
        self._announce = True

    def _connected_now(self) -> bool:
        return self._connected and not self._lost

    def _step(self) -> None:
        self._drain_acks()
        if self._announce:
            self._announce = False
            self._publish_announcements()
        if self._ha_birth:
            self._ha_birth = False
            self._publish_announcements()
            if not self._online_due:  # already online: HA must hear it again
                self._send_status("online")
        state = self._due_state()
        if state is not None:
            retain = self.config.retain
            self._send_bytes(self.topics["state"], wire_json(state), qos=1, retain=retain)
            self._count_state(sent=True)
            self._state_of_this_run = True
        self._publish_online_if_due()
        self._publish_health_if_due()
        self._send_events()

    def _next_deadline(self) -> float:
        return self._next_health

    def _publish_online_if_due(self) -> None:
        """``online`` once this connection may be announced (see the module docstring)."""
        if not self._online_due:
            return
        fed = self.context is not None and self.include_state  # a pipeline sends states
        if not fed or self._state_of_this_run:
            self._online_due = False
            self._send_status("online")

    def _send_status(self, status: str) -> None:
        self._client.publish(self.topics["status"], status, qos=1, retain=self.config.retain)

    def _end_connection(self) -> None:
        self._stop_network()
        self._mark_disconnected(self._disconnect_reason or "disconnected")
        self._drain_acks()

    def _on_stop(self) -> None:
        """Publish ``offline`` (the Will is not sent on a clean disconnect) and wait briefly."""
        info = self._client.publish(
            self.topics["status"], "offline", qos=1, retain=self.config.retain
        )
        deadline = time.monotonic() + self._time_left_s(_OFFLINE_ACK_WAIT_S)
        others: list[int] = []
        while time.monotonic() < deadline and not self._lost:
            try:
                mid = self._acks.get(timeout=0.05)
            except queue.Empty:
                continue
            if mid == info.mid:
                break
            others.append(mid)
        for mid in others:  # events acknowledged meanwhile
            self._acks.put(mid)
        self._drain_acks()

    # -- the connection (worker) -------------------------------------------------------

    def _network_loop(self) -> None:
        """paho's network I/O for one connection (this thread alone reads and writes the socket).

        Ends when the connection does; paho 1.6 lets some ``ssl.SSLError``\\ s
        escape its loop, which end the connection here too.
        """
        client = self._client
        reason: str | None = None
        try:
            while True:
                rc = client.loop(timeout=1.0)
                if rc != mqtt_compat.MQTT_ERR_SUCCESS or client.socket() is None:
                    reason = mqtt_compat.error_text(rc) if rc else "disconnected"
                    break
        except Exception as e:
            reason = f"network error: {e}"
            logger.debug("%s: %s", self.name, reason, exc_info=True)
            with contextlib.suppress(Exception):
                client.disconnect()
        finally:
            if not self._lost:  # paho did not report it (an exception, or a clean end)
                self._on_disconnect(reason or "disconnected")

    def _stop_network(self) -> None:
        if not self._lost:
            with contextlib.suppress(Exception):
                self._client.disconnect()  # the network thread sends DISCONNECT and ends
        net = self._net
        if net is not None:
            # Closing: no longer than the close budget (the thread is a daemon).
            net.join(self._time_left_s(self.config.connect_timeout_s))
            if net.is_alive() and not self._stop.is_set():
                logger.error("%s: the network thread did not end", self.name)
        self._net = None

    def _drain_acks(self) -> None:
        acked: list[int] = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            row = self._inflight.pop(mid, None)
            if row is not None:  # None: a status/state/health message or an answer
                acked.append(row)
                self._barrier.discard(row)
        if acked:
            self._acknowledge_rows(acked)

    def _send_events(self) -> None:
        if self._barrier or not self._connected_now():
            return
        room = self._event_window() - len(self._inflight)
        if room <= 0:
            return
        try:
            items = self.outbox.peek(room, after_id=self._cursor)
        except OutboxError as e:
            logger.error("%s: cannot read the outbox: %s", self.name, e)
            self._set_error(str(e))
            return
        for item in items:
            info = self._client.publish(
                self.topics["events"], item.payload, qos=self.config.qos, retain=False
            )
            if info.rc not in (mqtt_compat.MQTT_ERR_SUCCESS, mqtt_compat.MQTT_ERR_NO_CONN):
                logger.warning(
                    "%s: paho refused event %s: %s; retrying later",
                    self.name,
                    item.key,
                    mqtt_compat.error_text(info.rc),
                )
                return
            # NO_CONN: paho keeps the message and sends it after reconnecting.
            self._inflight[info.mid] = item.id
            self._cursor = item.id

    def _event_window(self) -> int:
        """Events handed to paho at once: ``max_inflight``, and never more than half the
        broker's Receive Maximum (status, state and health share it; paho cannot
        change its own limit on a live connection)."""
        window = self.config.max_inflight
        if self._receive_maximum is not None:
            window = min(window, max(1, self._receive_maximum // 2))
        return window

    # -- health and discovery (worker) ---------------------------------------------------

    def _publish_health_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.config.health_interval_s
        self.send(self.topics["health"], self._health_report(), retain=self.config.retain)

    def _health_report(self) -> dict[str, Any]:
        context = self.context
        if context is None:
            report: dict[str, Any] = {"healthy": None, "sinks": {self.name: self.health()}}
        else:
            try:
                report = dict(context.health())
            except Exception as e:
                logger.exception("%s: the module's health report failed", self.name)
                report = {"healthy": False, "error": f"health failed: {e}"}
        report["emitted_at"] = now_iso()
        return report

    def _publish_announcements(self) -> None:
        """On every connect (and bind): discovery, the latest state, health now."""
        context = self.context
        if self.config.ha_discovery.enabled and context is not None:
            for msg in self._discovery(context):
                self.send(msg.topic, msg.payload, retain=True)
        if self.include_state:
            self._resend_state(context.latest_state() if context is not None else None)
        self._next_health = 0.0

    def _discovery(self, context: SinkContext) -> list[Any]:
        from soundwatch import __version__

        return discovery_messages(
            device_id=context.origin.device_id,
            module_id=context.origin.module_id,
            model_version=context.origin.model_version,
            class_names=context.class_names,
            state_topic=self.topics["state"],
            status_topic=self.topics["status"],
            discovery_prefix=self.config.ha_discovery.prefix.strip("/"),
            sw_version=__version__,
            baseline=context.baseline,
        )


def _ssl_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """Verify the broker (against ``ca``, else the system CAs); present ``cert``/``key``."""
    try:
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert is not None and tls.key is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as e:
        raise SinkConfigError(f"cannot load TLS files: {e}") from e
    if tls.insecure:
        context.check_hostname = False
    return context
