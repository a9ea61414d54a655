"""paho-mqtt 1.6.x and 2.x behind one small surface, speaking MQTT 5.

paho-mqtt 2.0 versioned its user callbacks (``CallbackAPIVersion``): with
``VERSION2``, ``on_connect`` gets a ``ReasonCode`` instead of an int ``rc``,
``on_disconnect`` and ``on_publish`` gain ``flags``/``reason_code``/
``properties`` arguments, and 2.x warns that ``VERSION1`` will go away in 3.0.
azure-iot-device pins paho-mqtt < 2, so soundwatch must run on 1.6.1 as well.

:func:`new_client` builds a client for whichever paho is installed (MQTT
3.1.1, clean session, no automatic reconnect: the sink reconnects itself so
that it sees the real error of each attempt) and adapts its callbacks to
version-neutral ones (:class:`Callbacks`). Everything else the sink calls
(``publish``, ``will_set``, ``tls_set_context``, ``username_pw_set``,
``loop``, ``socket``, ``disconnect``, ``max_inflight_messages_set``) has the
same signature in both; :func:`connect` and :func:`subscribe` wrap the two
calls whose arguments differ between MQTT versions.

MQTT 5 rather than 3.1.1, for one reason: a subscription with "retain as
published". In 3.1.1 a broker clears the retain flag of a message it
forwards on an established subscription, so a retained command looked live
on first delivery and retained after a reconnect; with MQTT 5 it is
recognised the same way both times. Sessions stay clean (clean start, no
session expiry), as with 3.1.1's clean session.

The sink runs ``loop()`` on a thread of its own rather than ``loop_start()``:
paho 1.6 lets some ``ssl.SSLError``\\ s escape ``loop_start``'s thread, which
then dies without an ``on_disconnect``; a loop the sink owns sees them.

Not used on purpose: ``MQTTMessageInfo.is_published()``/``wait_for_publish()``,
which on 2.x raise ``RuntimeError`` for a message published while
disconnected even though paho has queued it and will send it after
reconnecting; the sink tracks PUBACKs through ``on_publish`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt
import paho.mqtt.client as mqtt

PAHO_VERSION: str = str(paho.mqtt.__version__)
PAHO_MAJOR: int = int(PAHO_VERSION.split(".")[0])

MQTT_ERR_SUCCESS = int(mqtt.MQTT_ERR_SUCCESS)
MQTT_ERR_NO_CONN = int(mqtt.MQTT_ERR_NO_CONN)


@dataclass(frozen=True)
class Callbacks:
    """Version-neutral callbacks; all run on paho's network thread and must not block."""

    # (accepted, reason text, the broker's Receive Maximum if it sent one)
    on_connect: Callable[[bool, str, int | None], None]
    on_disconnect: Callable[[str], None]  # reason text
    on_publish: Callable[[int], None]  # mid acknowledged (PUBACK/PUBCOMP)
    on_message: Callable[[str, bytes, bool], None]  # topic, payload, retained
    on_error_log: Callable[[str], None]  # paho's own error-level log lines


def new_client(client_id: str, callbacks: Callbacks, *, paho_logger: logging.Logger) -> Any:
    """A paho ``Client`` for the installed paho version, with ``callbacks`` attached.

    Typed ``Any``: the 1.6 and 2.x classes differ in their annotations, and
    only the calls listed in the module docstring are made on it.
    """
    client_cls = cast(Any, mqtt.Client)
    common: dict[str, Any] = {
        "client_id": client_id,
        "protocol": mqtt.MQTTv5,
        "reconnect_on_failure": False,
    }
    if PAHO_MAJOR >= 2:
        from paho.mqtt.enums import CallbackAPIVersion  # 2.x only

        client = client_cls(CallbackAPIVersion.VERSION2, **common)
        _attach_v2(client, callbacks)
    else:
        client = client_cls(**common)
        _attach_v1(client, callbacks)
    client.enable_logger(paho_logger)

    def on_log(_client: Any, _userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            callbacks.on_error_log(text)

    client.on_log = on_log
    # With a socket-write callback set, paho never writes from the thread that
    # calls publish(): only the thread running loop() touches the socket.
    client.on_socket_register_write = _ignore
    return client


def _ignore(*_args: Any) -> None:
    pass


def connect(client: Any, host: str, port: int, keepalive_s: int) -> None:
    """Open the connection with a clean start (no session kept across connections)."""
    client.connect(host, port, keepalive_s, clean_start=True)


def subscribe(client: Any, topic: str, qos: int) -> None:
    """Subscribe with "retain as published", so a retained message is always seen as such."""
    from paho.mqtt.subscribeoptions import SubscribeOptions

    client.subscribe(topic, options=SubscribeOptions(qos=qos, retainAsPublished=True))


def reason_text(code: Any) -> str:
    """A disconnect reason: paho's ``MQTT_ERR_*`` int or an MQTT 5 reason code."""
    if isinstance(code, int):
        return error_text(code) if code else "disconnected"
    return str(code)


def set_connect_timeout(client: Any, seconds: float) -> None:
    """TCP connect timeout (a property in 2.x, a private attribute in 1.6)."""
    if PAHO_MAJOR >= 2:
        client.connect_timeout = seconds
    else:
        client._connect_timeout = seconds


def error_text(rc: int) -> str:
    """paho's text for a client error code (``MQTT_ERR_*``)."""
    return str(mqtt.error_string(rc))


def _receive_maximum(props: Any) -> int | None:
    """How many QoS 1/2 messages the broker takes unacknowledged at once, if it says."""
    value = getattr(props, "ReceiveMaximum", None)
    return int(value) if isinstance(value, int) else None


def _attach_v2(client: Any, cb: Callbacks) -> None:
    def on_connect(_client: Any, _userdata: Any, _flags: Any, reason_code: Any, props: Any) -> None:
        cb.on_connect(not reason_code.is_failure, str(reason_code), _receive_maximum(props))

    def on_disconnect(
        _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        cb.on_disconnect(str(reason_code))

    def on_publish(_client: Any, _userdata: Any, mid: int, _rc: Any, _props: Any) -> None:
        cb.on_publish(mid)

    _install(client, cb, on_connect, on_disconnect, on_publish)


def _attach_v1(client: Any, cb: Callbacks) -> None:
    # paho 1.6 with MQTT 5: reason codes are ReasonCodes objects (equal to their ints).
    def on_connect(_client: Any, _userdata: Any, _flags: Any, rc: Any, props: Any) -> None:
        cb.on_connect(rc == 0, str(rc), _receive_maximum(props))

    def on_disconnect(_client: Any, _userdata: Any, rc: Any, _props: Any = None) -> None:
        cb.on_disconnect(reason_text(rc))

    def on_publish(_client: Any, _userdata: Any, mid: int) -> None:
        cb.on_publish(mid)

    _install(client, cb, on_connect, on_disconnect, on_publish)


def _install(client: Any, cb: Callbacks, *callbacks: Callable[..., None]) -> None:
    """Set the version's connect, disconnect and publish adapters; on_message is the same."""

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        cb.on_message(message.topic, bytes(message.payload), bool(message.retain))

    client.on_connect, client.on_disconnect, client.on_publish = callbacks
    client.on_message = on_message
