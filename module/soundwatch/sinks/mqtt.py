"""MQTT sink: anomaly events through a persistent outbox, plus status, state, health and commands.

Topics, under ``topic_prefix`` (the config's default is ``soundwatch/<device_id>``):

``status``      retained ``online`` / ``offline``. ``offline`` is the Last Will
                (the broker publishes it when the connection dies, e.g. on
                ``kill -9``) and is also published on a clean shutdown;
                ``online`` is published on every connect.
``events``      ``anomaly_started`` / ``anomaly_ended`` events (event.schema.json),
                QoS ``qos`` (1 by default), not retained.
``state``       retained; the latest per-window state (state.schema.json),
                rate-limited to one per ``state_min_interval_s``, except that a
                change of ``class`` or ``active_class`` is published at once.
``health``      retained; the runtime's health (source, model, sinks, with this
                sink's outbox depth), every ``health_interval_s`` and on connect.
``set``         commands: a JSON config patch (or ``{"request_id": ..., "patch":
                {...}}``), applied all-or-nothing through ``Runtime.apply_patch``.
``set/result``  the answer to each command: ``ok``, ``errors`` (key and message
                for each problem), ``request_id``.

Delivery of events (the part that must not lose anything):

1. :meth:`MqttSink.publish` writes the event to the :class:`~soundwatch.outbox.Outbox`
   (SQLite, WAL, fsynced) on the caller's thread and returns a future. Nothing
   else happens on that thread: the network is never touched there.
2. The sink's worker thread ("mqtt-<name>") peeks events in outbox order and
   hands at most ``max_inflight`` at a time to paho (QoS 1).
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

Connection: the worker connects itself (so every failure is logged and shown in
health with its real cause), runs paho's network thread while connected, and
reconnects with exponential backoff and jitter (``reconnect.min_delay_s`` ..
``reconnect.max_delay_s``). TLS (CA, client certificate and key), username and
password (``password`` or the environment variable named by ``password_env``)
are configurable. Works with paho-mqtt 1.6.x and 2.x (:mod:`.mqtt_compat`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from soundwatch.ha_discovery import discovery_messages
from soundwatch.outbox import OutboxError
from soundwatch.sinks import mqtt_compat
from soundwatch.sinks.base import SinkConfigError
from soundwatch.sinks.outbox_sink import (
    DEFAULT_CLOSE_TIMEOUT_S,
    PURGE_INTERVAL_S,
    OutboxSink,
    json_bytes,
    now_iso,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
MAX_COMMAND_BYTES = 64 * 1024
# The worker re-checks its timers at least this often.
MAX_IDLE_WAIT_S = 1.0
# paho may hold a few non-event messages (status, state, health) besides events.
_PAHO_INFLIGHT_HEADROOM = 16
_OFFLINE_ACK_WAIT_S = 1.0
_RETAINED_COMMAND = "retained commands are ignored; publish set commands without the retain flag"


class CommandTarget(Protocol):
    """What the sink needs from :class:`soundwatch.app.Runtime` (given through ``attach``)."""

    @property
    def latest_state(self) -> dict[str, Any] | None: ...

    def health(self) -> dict[str, Any]: ...

    def apply_patch(self, patch: Mapping[str, Any], source: str = ...) -> Any: ...


class _ConnectFailed(Exception):
    """One connection attempt failed; the text says why."""


class Backoff:
    """Exponential backoff with ±20 % jitter between ``min_s`` and ``max_s``."""

    def __init__(
        self, min_s: float, max_s: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"need 0 < min_s ({min_s}) <= max_s ({max_s})")
        self.min_s, self.max_s = min_s, max_s
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        base = min(self.max_s, self.min_s * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        return base * (0.8 + 0.4 * self._rng())

    def reset(self) -> None:
        self._attempt = 0


class MqttSink(OutboxSink):
    """Publishes to an MQTT broker (see the module docstring). Thread-safe."""

    type_name = "mqtt"
    destination = "the broker"

    def __init__(
        self,
        *,
        host: str,
        topic_prefix: str,
        outbox: Mapping[str, Any],
        port: int | None = None,
        tls: Mapping[str, Any] | None = None,
        username: str | None = None,
        password: str | None = None,
        password_env: str | None = "MQTT_PASSWORD",
        client_id: str | None = None,
        keepalive_s: int = 30,
        qos: int = 1,
        retain: bool = True,
        include_state: bool = True,
        state_min_interval_s: float = 5.0,
        health_interval_s: float = 30.0,
        max_inflight: int = 20,
        connect_timeout_s: float = 10.0,
        reconnect: Mapping[str, Any] | None = None,
        ha_discovery: Mapping[str, Any] | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name=name, include_state=include_state)
        env = os.environ if env is None else env
        tls_opts = dict(tls or {})
        tls_enabled = bool(tls_opts.get("enabled")) or any(
            tls_opts.get(k) for k in ("ca", "cert", "key")
        )
        reconnect_opts = dict(reconnect or {})
        ha_opts = dict(ha_discovery or {})
        problems = _check_options(
            host=host,
            topic_prefix=topic_prefix,
            qos=qos,
            keepalive_s=keepalive_s,
            max_inflight=max_inflight,
            state_min_interval_s=state_min_interval_s,
            health_interval_s=health_interval_s,
            connect_timeout_s=connect_timeout_s,
            outbox=outbox,
        )
        if password is None and password_env:
            password = env.get(password_env) or None
        if password is not None and not username:
            problems.append("a password needs a username")
        if problems:
            raise SinkConfigError(f"mqtt sink {self.name!r}: " + "; ".join(problems))

        self.host = host
        self.port = port or (DEFAULT_TLS_PORT if tls_enabled else DEFAULT_PORT)
        self.tls_enabled = tls_enabled
        self.client_id = client_id or f"soundwatch-{uuid.uuid4().hex[:12]}"
        self.qos = qos
        self.retain = retain
        self.keepalive_s = keepalive_s
        self.state_min_interval_s = state_min_interval_s
        self.health_interval_s = health_interval_s
        self.max_inflight = max_inflight
        self.connect_timeout_s = connect_timeout_s
        prefix = topic_prefix.strip("/")
        self.topics = {
            "status": f"{prefix}/status",
            "events": f"{prefix}/events",
            "state": f"{prefix}/state",
            "health": f"{prefix}/health",
            "set": f"{prefix}/set",
            "set_result": f"{prefix}/set/result",
        }
        self.topic_prefix = prefix
        self.ha_enabled = bool(ha_opts.get("enabled", False))
        self.ha_prefix = str(ha_opts.get("prefix") or "homeassistant").strip("/")
        try:
            self._backoff = Backoff(
                float(reconnect_opts.get("min_delay_s", 1.0)),
                float(reconnect_opts.get("max_delay_s", 60.0)),
            )
        except ValueError as e:
            raise SinkConfigError(f"mqtt sink {self.name!r}: reconnect: {e}") from e
        ssl_context = _ssl_context(tls_opts, self.name) if tls_enabled else None

        # Shared between the caller's threads, paho's thread and the worker.
        self._stop = threading.Event()
        self._conn_change = threading.Event()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[tuple[bytes, bool]] = queue.SimpleQueue()
        self._connected = False
        self._lost = False
        self._refusal: str | None = None
        self._paho_error: str | None = None
        self._last_disconnect: str | None = None
        self._net: threading.Thread | None = None
        self._runtime: CommandTarget | None = None
        self._announce = False
        # The last state sent and when (the pending one is OutboxSink's).
        self._last_state: Mapping[str, Any] | None = None
        self._last_state_sent = -float("inf")
        # Worker-only bookkeeping.
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._cursor = 0  # highest row id handed to paho
        self._barrier: set[int] = set()  # rows paho resends after a reconnect
        self._next_health = 0.0
        # Counters for health.
        self._connects = 0
        self._disconnects = 0
        self._connected_since: str | None = None
        self._resent = 0
        self._state_published = 0
        self._commands_applied = 0
        self._commands_rejected = 0

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
            if tls_opts.get("insecure"):
                self._client.tls_insecure_set(True)
        if username:
            self._client.username_pw_set(username, password)
        self._client.will_set(self.topics["status"], "offline", qos=1, retain=self.retain)
        self._client.max_inflight_messages_set(max_inflight + _PAHO_INFLIGHT_HEADROOM)
        self._client.max_queued_messages_set(0)
        mqtt_compat.set_connect_timeout(self._client, connect_timeout_s)

        # Last: from here on the outbox file is held (and locked) by this sink.
        self._open_outbox(outbox)
        depth = self.outbox.depth()
        logger.info(
            "%s: MQTT %s:%d (%s), client id %s, topics %s/..., %d event(s) waiting in %s",
            self.name,
            self.host,
            self.port,
            "TLS" if tls_enabled else "plain",
            self.client_id,
            prefix,
            depth,
            self.outbox.path,
        )
        self._worker = threading.Thread(target=self._run, name=f"mqtt-{self.name}", daemon=True)
        self._worker.start()

    # -- Sink API (any thread) ---------------------------------------------------

    def attach(self, runtime: CommandTarget) -> None:
        """Take commands for and report the health of ``runtime`` (called by Runtime)."""
        self._runtime = runtime
        self._announce = True
        self._wake.set()

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to ``timeout_s``, default 10 s), publish ``offline``, disconnect. Idempotent.

        Events not acknowledged by then stay in the outbox and are sent by the
        next process; their futures fail with a :class:`SinkError` saying so.
        """
        if self._closed:
            return
        if timeout_s is None:  # never wait forever for a broker that may be gone
            timeout_s = DEFAULT_CLOSE_TIMEOUT_S
        deadline = time.monotonic() + timeout_s
        flushed = self.flush(timeout_s)
        self._closed = True
        self._stop.set()
        self._wake.set()
        left = max(deadline - time.monotonic(), 0.0)
        self._worker.join(left + _OFFLINE_ACK_WAIT_S + 1.0)
        if self._worker.is_alive():
            logger.warning("%s: worker did not stop in time", self.name)
        self._fail_unacknowledged(flushed)

    def health(self) -> dict[str, Any]:
        info = super().health()
        outbox = self._outbox_health()
        with self._state_lock:
            state = {
                "published": self._state_published,
                "superseded": self._state_superseded,
                "min_interval_s": self.state_min_interval_s,
            }
        info.update(
            healthy=self._connected and not self.outbox.closed,
            connected=self._connected,
            broker=f"{self.host}:{self.port}",
            tls=self.tls_enabled,
            client_id=self.client_id,
            topic_prefix=self.topic_prefix,
            connects=self._connects,
            disconnects=self._disconnects,
            connected_since=self._connected_since,
            last_disconnect=self._last_disconnect,
            inflight=len(self._inflight),
            resent_after_reconnect=self._resent,
            outbox=outbox,
            state=state,
            commands={"applied": self._commands_applied, "rejected": self._commands_rejected},
            paho=mqtt_compat.PAHO_VERSION,
        )
        return info

    # -- paho callbacks (paho's network thread: never block) -----------------------

    def _on_connect(self, accepted: bool, reason: str) -> None:
        if accepted:
            self._connected = True
            self._refusal = None
        else:
            self._refusal = f"broker refused the connection: {reason}"
        self._conn_change.set()
        self._wake.set()

    def _on_disconnect(self, reason: str) -> None:
        self._connected = False
        self._lost = True
        self._last_disconnect = self._paho_error or reason
        self._conn_change.set()
        self._wake.set()

    def _on_publish(self, mid: int) -> None:
        self._acks.put(mid)
        self._wake.set()

    def _on_paho_error(self, text: str) -> None:
        self._paho_error = text

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics["set"]:
            self._commands.put((payload, retained))
            self._wake.set()

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect()
            except _ConnectFailed as e:
                if self._stop.is_set():
                    break
                with self._stats_lock:
                    self._last_error = str(e)
                delay = self._backoff.next()
                logger.warning("%s: %s; retrying in %.1f s", self.name, e, delay)
                self._idle(delay)
                continue
            except Exception as e:  # a bug must not kill the worker silently
                logger.exception("%s: unexpected error while connecting", self.name)
                with self._stats_lock:
                    self._last_error = f"unexpected: {e}"
                self._idle(self._backoff.next())
                continue
            self._backoff.reset()
            try:
                self._serve()
            except Exception as e:
                logger.exception("%s: worker error; reconnecting", self.name)
                with self._stats_lock:
                    self._last_error = f"unexpected: {e}"
            finally:
                self._end_connection()
            if not self._stop.is_set():
                delay = self._backoff.next()
                logger.warning(
                    "%s: connection to %s:%d lost (%s); reconnecting in %.1f s",
                    self.name,
                    self.host,
                    self.port,
                    self._last_disconnect,
                    delay,
                )
                self._idle(delay)

    def _idle(self, seconds: float) -> None:
        """Wait while disconnected; expired events are still purged."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, PURGE_INTERVAL_S))
            self._purge_if_due()

    def _connect(self) -> None:
        """One attempt: TCP/TLS connect here (real errors), then wait for CONNACK."""
        self._connected = False
        self._lost = False
        self._refusal = None
        self._paho_error = None
        self._last_disconnect = None
        self._conn_change.clear()
        try:
            self._client.connect(self.host, self.port, self.keepalive_s)
        except (OSError, ValueError) as e:  # ssl.SSLError and socket.timeout are OSErrors
            raise _ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e}") from e
        self._net = threading.Thread(
            target=self._network_loop, name=f"mqtt-{self.name}-net", daemon=True
        )
        self._net.start()
        deadline = time.monotonic() + self.connect_timeout_s
        while not (self._connected or self._lost or self._stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._conn_change.wait(min(left, 0.1))
        if self._connected:
            return
        if self._refusal:
            reason = self._refusal
        elif self._lost:
            detail = self._paho_error or self._last_disconnect
            reason = f"connection to {self.host}:{self.port} closed before CONNACK ({detail})"
        elif self._stop.is_set():
            reason = "stopped while connecting"
        else:
            reason = f"no CONNACK from {self.host}:{self.port} within {self.connect_timeout_s} s"
        self._stop_network()
        raise _ConnectFailed(reason)

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
            net.join(self.connect_timeout_s)
            if net.is_alive():
                logger.error("%s: the network thread did not end", self.name)
        self._net = None

    def _serve(self) -> None:
        self._connects += 1
        self._connected_since = now_iso()
        with self._stats_lock:
            self._last_error = None
        client = self._client
        client.publish(self.topics["status"], "online", qos=1, retain=self.retain)
        client.subscribe(self.topics["set"], qos=1)
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
        while not self._stop.is_set() and not self._lost:
            self._wake.clear()
            self._step()
            self._wake.wait(self._next_wait())
        if self._stop.is_set() and not self._lost:
            self._step()
            self._say_goodbye()

    def _end_connection(self) -> None:
        self._stop_network()
        was_connected = self._connected
        self._connected = False
        if was_connected or self._lost:
            self._disconnects += 1
        with self._stats_lock:
            if self._last_error is None and not self._stop.is_set():
                self._last_error = f"disconnected: {self._last_disconnect}"
        self._drain_acks()

    def _say_goodbye(self) -> None:
        """Publish ``offline`` (the Will is not sent on a clean disconnect) and wait briefly."""
        info = self._client.publish(self.topics["status"], "offline", qos=1, retain=self.retain)
        deadline = time.monotonic() + _OFFLINE_ACK_WAIT_S
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

    def _step(self) -> None:
        self._drain_acks()
        if self._announce:
            self._announce = False
            self._publish_announcements()
        self._handle_commands()
        self._publish_state_if_due()
        self._publish_health_if_due()
        self._send_events()
        self._purge_if_due()

    def _next_wait(self) -> float:
        now = time.monotonic()
        wait = min(MAX_IDLE_WAIT_S, self._next_health - now)
        with self._state_lock:
            if self._pending_state is not None:
                wait = min(wait, self._last_state_sent + self.state_min_interval_s - now)
        return max(wait, 0.005)

    def _drain_acks(self) -> None:
        acked: list[int] = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            row = self._inflight.pop(mid, None)
            if row is not None:  # None: a status/state/health message
                acked.append(row)
                self._barrier.discard(row)
        if acked:
            self._acknowledge_rows(acked)

    def _send_events(self) -> None:
        if self._barrier or not self._connected:
            return
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        try:
            items = self.outbox.peek(room, after_id=self._cursor)
        except OutboxError as e:
            logger.error("%s: cannot read the outbox: %s", self.name, e)
            with self._stats_lock:
                self._last_error = str(e)
            return
        for item in items:
            info = self._client.publish(
                self.topics["events"], item.payload, qos=self.qos, retain=False
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

    # -- state, health, discovery, commands (worker) -------------------------------

    def _publish_state_if_due(self) -> None:
        now = time.monotonic()
        with self._state_lock:
            message = self._pending_state
            if message is None:
                return
            if not self._state_urgent and now - self._last_state_sent < self.state_min_interval_s:
                return
            self._pending_state = None
            self._state_urgent = False
            self._last_state = message
            self._last_state_key = (message.get("class"), message.get("active_class"))
            self._last_state_sent = now
            self._state_published += 1
        self._publish_json(self.topics["state"], message, retain=self.retain)

    def _publish_health_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.health_interval_s
        self._publish_json(self.topics["health"], self._health_report(), retain=self.retain)

    def _health_report(self) -> dict[str, Any]:
        runtime = self._runtime
        if runtime is None:
            report: dict[str, Any] = {"healthy": None, "sinks": {self.name: self.health()}}
        else:
            try:
                report = dict(runtime.health())
            except Exception as e:
                logger.exception("%s: runtime health failed", self.name)
                report = {"healthy": False, "error": f"health failed: {e}"}
        report["emitted_at"] = now_iso()
        return report

    def _publish_announcements(self) -> None:
        """On every connect (and attach): discovery, the latest state, health now."""
        runtime = self._runtime
        if self.ha_enabled and runtime is not None:
            for msg in self._discovery(runtime):
                self._publish_json(msg.topic, msg.payload, retain=True)
        if self.include_state:
            with self._state_lock:
                if self._pending_state is None:
                    latest = self._last_state or (runtime.latest_state if runtime else None)
                    if latest is not None:
                        self._pending_state = latest
                        self._state_urgent = True
                else:
                    self._state_urgent = True
        self._next_health = 0.0

    def _discovery(self, runtime: CommandTarget) -> list[Any]:
        from soundwatch import __version__

        config = getattr(runtime, "config", None)
        bundle = getattr(runtime, "bundle", None)
        if config is None or bundle is None:
            logger.warning("%s: HA discovery needs the runtime's config and bundle", self.name)
            return []
        return discovery_messages(
            device_id=str(config.device_id),
            module_id=str(config.module_id),
            model_version=str(bundle.model_version),
            class_names=tuple(bundle.class_names),
            state_topic=self.topics["state"],
            status_topic=self.topics["status"],
            discovery_prefix=self.ha_prefix,
            sw_version=__version__,
        )

    def _handle_commands(self) -> None:
        while True:
            try:
                payload, retained = self._commands.get_nowait()
            except queue.Empty:
                return
            result = self._apply_command(payload, retained)
            if result["ok"]:
                self._commands_applied += 1
            else:
                self._commands_rejected += 1
            self._publish_json(self.topics["set_result"], result, retain=False)

    def _apply_command(self, payload: bytes, retained: bool) -> dict[str, Any]:
        from soundwatch.config import ConfigError

        request_id: Any = None

        def rejected(errors: list[dict[str, Any]]) -> dict[str, Any]:
            logger.warning("%s: set command rejected: %s", self.name, errors)
            return {
                "ok": False,
                "request_id": request_id,
                "errors": errors,
                "emitted_at": now_iso(),
            }

        if retained:
            return rejected([{"key": "(message)", "message": _RETAINED_COMMAND}])
        if len(payload) > MAX_COMMAND_BYTES:
            return rejected(
                [{"key": "(message)", "message": f"larger than {MAX_COMMAND_BYTES} bytes"}]
            )
        try:
            doc = json.loads(payload)
        except ValueError as e:
            return rejected([{"key": "(message)", "message": f"not valid JSON: {e}"}])
        if not isinstance(doc, dict):
            return rejected([{"key": "(message)", "message": "must be a JSON object"}])
        patch: Any = doc
        if "patch" in doc:
            request_id = doc.get("request_id")
            extra = sorted(set(doc) - {"patch", "request_id"})
            if extra:
                return rejected(
                    [{"key": k, "message": "unknown key in a command envelope"} for k in extra]
                )
            patch = doc["patch"]
        if not isinstance(patch, dict) or not patch:
            return rejected([{"key": "patch", "message": "must be a non-empty JSON object"}])
        runtime = self._runtime
        if runtime is None:
            return rejected([{"key": "(runtime)", "message": "no pipeline attached to this sink"}])
        try:
            runtime.apply_patch(patch, f"mqtt:{self.topics['set']}")
        except ConfigError as e:
            return rejected([{"key": key, "message": msg} for key, _line, msg in e.problems])
        except Exception as e:  # a command must never take the worker down
            logger.exception("%s: applying a set command failed", self.name)
            return rejected([{"key": "(internal)", "message": str(e)}])
        logger.info("%s: set command applied: %s", self.name, patch)
        return {"ok": True, "request_id": request_id, "applied": patch, "emitted_at": now_iso()}

    def _publish_json(self, topic: str, doc: Mapping[str, Any], *, retain: bool) -> None:
        try:
            payload = json_bytes(doc)
        except (TypeError, ValueError) as e:
            logger.error("%s: cannot encode a message for %s: %s", self.name, topic, e)
            return
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt_compat.MQTT_ERR_SUCCESS, mqtt_compat.MQTT_ERR_NO_CONN):
            logger.warning(
                "%s: publishing to %s failed: %s",
                self.name,
                topic,
                mqtt_compat.error_text(info.rc),
            )


def _check_options(
    *,
    host: str,
    topic_prefix: str,
    qos: int,
    keepalive_s: int,
    max_inflight: int,
    state_min_interval_s: float,
    health_interval_s: float,
    connect_timeout_s: float,
    outbox: Mapping[str, Any],
) -> list[str]:
    problems = []
    if not host:
        problems.append("host is empty")
    prefix = topic_prefix.strip("/")
    if not prefix or any(c in prefix for c in "+#\0") or "{" in prefix:
        problems.append(
            f"topic_prefix {topic_prefix!r} must be a topic without wildcards (+, #) or "
            "unresolved {placeholders}"
        )
    if qos not in (1, 2):
        problems.append(f"qos is {qos}; events need a broker acknowledgement: use 1 or 2")
    if keepalive_s < 5:
        problems.append(f"keepalive_s is {keepalive_s}; use at least 5")
    if max_inflight < 1:
        problems.append(f"max_inflight is {max_inflight}; it must be >= 1")
    if state_min_interval_s < 0:
        problems.append(f"state_min_interval_s is {state_min_interval_s}; it must be >= 0")
    if health_interval_s <= 0:
        problems.append(f"health_interval_s is {health_interval_s}; it must be > 0")
    if connect_timeout_s <= 0:
        problems.append(f"connect_timeout_s is {connect_timeout_s}; it must be > 0")
    if not outbox.get("path"):
        problems.append("outbox.path is required (the config fills it in from state_dir)")
    return problems


def _ssl_context(tls: Mapping[str, Any], name: str) -> ssl.SSLContext:
    """Verify the broker (against ``ca``, else the system CAs); present ``cert``/``key``."""
    ca, cert, key = tls.get("ca"), tls.get("cert"), tls.get("key")
    if bool(cert) != bool(key):
        raise SinkConfigError(f"mqtt sink {name!r}: tls.cert and tls.key go together")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert and key:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise SinkConfigError(f"mqtt sink {name!r}: cannot load TLS files: {e}") from e
    if tls.get("insecure"):
        context.check_hostname = False
    return context
