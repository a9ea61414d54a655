#!/usr/bin/env python3
"""Watch a soundwatch module over MQTT: live events, state, status and health.

    python tools/subscribe.py                          # localhost:1883, soundwatch/+/#
    python tools/subscribe.py --host broker --port 8883 --tls --cafile ca.pem
    python tools/subscribe.py --view log               # every message, pretty JSON
    python tools/subscribe.py --view json --count 10   # JSON lines, stop after 10

The module publishes under ``soundwatch/<device_id>/``: ``status`` (retained
``online``/``offline``), ``health`` (retained JSON), ``state`` (retained JSON,
the latest window) and ``events`` (anomaly events, QoS 1). The ``live`` view
(the default on a terminal) shows each device's status, health, current
class probabilities and recent events, and the last payload received as it
arrived, for people building dashboards. ``log`` prints every message with
its topic; ``json`` prints one JSON object per message for other programs.

Works with paho-mqtt 1.6 and 2.x. Exit status: 0 on Ctrl-C, --count or
--timeout; 1 when the broker cannot be reached or refuses the connection;
2 for bad usage. The password comes from the environment variable named by
--password-env (default MQTT_PASSWORD), never from the command line.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import queue
import signal
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

try:
    import paho.mqtt.client as mqtt
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("tools/subscribe.py needs paho-mqtt: pip install paho-mqtt")

DEFAULT_TOPIC = "soundwatch/+/#"
KNOWN = ("status", "health", "state", "events")
BAR_WIDTH = 24
RECENT_EVENTS = 8


@dataclass
class Message:
    topic: str
    payload: bytes
    retained: bool
    qos: int
    received_at: float

    def parsed(self) -> Any:
        """The payload as JSON if it is JSON, else as text."""
        text = self.payload.decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def device_and_kind(self) -> tuple[str, str]:
        """``soundwatch/<device>/<kind...>`` -> (device, kind); other topics keep their name."""
        parts = self.topic.split("/")
        if len(parts) >= 3:
            return parts[1], "/".join(parts[2:])
        return self.topic, ""


@dataclass
class Device:
    status: str = "?"
    health: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    events: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_EVENTS)
    )
    last_seen: float = 0.0


class Board:
    """What the live view shows, updated message by message."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.last: Message | None = None
        self.count = 0

    def update(self, msg: Message) -> None:
        self.count += 1
        self.last = msg
        device_id, kind = msg.device_and_kind()
        device = self.devices.setdefault(device_id, Device())
        device.last_seen = msg.received_at
        value = msg.parsed()
        if kind == "status":
            device.status = value if isinstance(value, str) else json.dumps(value)
        elif kind == "health" and isinstance(value, dict):
            device.health = value
        elif kind == "state" and isinstance(value, dict):
            device.state = value
        elif kind == "events" and isinstance(value, dict):
            device.events.appendleft(value)


# --- rendering ------------------------------------------------------------------


class Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text


def _bar(p: float) -> str:
    filled = max(0, min(BAR_WIDTH, round(p * BAR_WIDTH)))
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def _clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def render(board: Board, style: Style, payload_lines: int = 20) -> str:
    """The live view as text (one screen)."""
    out: list[str] = []
    out.append(
        style("soundwatch · live MQTT view", "1") + f"   {board.count} messages · Ctrl-C quits"
    )
    if not board.devices:
        out.append("")
        out.append("waiting for messages … (is the module publishing to this broker and topic?)")
    for device_id, d in sorted(board.devices.items()):
        out.append("")
        status = style(d.status, "32;1" if d.status == "online" else "31;1")
        line = f"{style(device_id, '1')}  status {status}"
        if d.health is not None:
            healthy = d.health.get("healthy")
            line += "  health " + (
                style("healthy", "32") if healthy else style("UNHEALTHY", "31;1")
            )
            source = d.health.get("source") or {}
            if source:
                line += f"  source {source.get('state', '?')}"
                if source.get("overflows"):
                    line += f" ({source['overflows']} overflows)"
            for name, sink in (d.health.get("sinks") or {}).items():
                if isinstance(sink, dict) and "outbox_depth" in sink:
                    line += f"  {name} outbox {sink['outbox_depth']}"
        out.append(line)
        s = d.state
        if s is not None:
            active = s.get("active_class")
            head = f"  now {style(str(s.get('class')), '1')}: {s.get('Message', '')}"
            if active:
                head += "   " + style(f"ACTIVE ANOMALY: {active}", "41;97;1")
            level = s.get("level") or {}
            if level:
                head += f"   rms {level.get('rms_dbfs')} dBFS peak {level.get('peak_dbfs')} dBFS"
                if level.get("clipping"):
                    head += style(" CLIPPING", "33;1")
            out.append(head)
            probs = s.get("Probabilities") or {}
            best = max(probs, key=lambda k: float(probs[k])) if probs else None
            for name, p in probs.items():
                row = f"    {name:<16} {_bar(float(p))} {float(p):6.3f}"
                out.append(style(row, "1") if name == best else row)
        if d.events:
            out.append("  recent events:")
            for ev in d.events:
                kind = "started" if ev.get("type") == "anomaly_started" else "ended  "
                color = "31" if kind == "started" else "32"
                extra = f" after {ev['duration_s']:.1f} s" if "duration_s" in ev else ""
                out.append(
                    f"    #{ev.get('seq', '?'):<5} {style(kind, color)} {ev.get('class', '?'):<16} "
                    f"{ev.get('Message', '')}{extra}  ({ev.get('emitted_at', '')})"
                )
    if board.last is not None:
        m = board.last
        out.append("")
        flag = " retained" if m.retained else ""
        out.append(
            style(f"last payload · {m.topic} · qos {m.qos}{flag} · {_clock(m.received_at)}", "2")
        )
        value = m.parsed()
        text = json.dumps(value, indent=2) if not isinstance(value, str) else value
        lines = text.splitlines()
        out.extend(lines[:payload_lines])
        if len(lines) > payload_lines:
            out.append(style(f"… {len(lines) - payload_lines} more lines (see --view log)", "2"))
    return "\n".join(out)


def log_block(msg: Message) -> str:
    flag = " (retained)" if msg.retained else ""
    value = msg.parsed()
    body = json.dumps(value, indent=2) if not isinstance(value, str) else value
    return f"{_clock(msg.received_at)} {msg.topic}{flag}\n{body}\n"


def json_line(msg: Message) -> str:
    return json.dumps(
        {
            "topic": msg.topic,
            "retained": msg.retained,
            "qos": msg.qos,
            "received_at": dt.datetime.fromtimestamp(msg.received_at, dt.timezone.utc).isoformat(),
            "payload": msg.parsed(),
        }
    )


# --- MQTT ------------------------------------------------------------------------


def make_client(client_id: str) -> Any:
    """A paho client on 1.6 or 2.x (2.x versions its callback signatures)."""
    version = getattr(mqtt, "CallbackAPIVersion", None)
    if version is not None:
        return mqtt.Client(version.VERSION2, client_id=client_id, clean_session=True)
    return mqtt.Client(client_id=client_id, clean_session=True)


def _failed(rc: Any) -> bool:
    # paho 2.x gives a ReasonCode, 1.6 an int.
    failure = getattr(rc, "is_failure", None)
    return bool(failure) if failure is not None else int(rc) != 0


def connect(args: argparse.Namespace, inbox: queue.Queue[Any]) -> Any:
    client = make_client(f"soundwatch-subscribe-{uuid.uuid4().hex[:8]}")

    def on_connect(client: Any, _userdata: Any, _flags: Any, rc: Any, *_rest: Any) -> None:
        if _failed(rc):
            inbox.put(("refused", str(rc)))
            return
        client.subscribe([(topic, 1) for topic in args.topic])

    def on_subscribe(_client: Any, _userdata: Any, _mid: Any, *_rest: Any) -> None:
        # Reported on the SUBACK, not on connect: from here on the broker
        # routes every publish to us, so whoever waits for the line misses nothing.
        inbox.put(("connected", None))

    def on_disconnect(_client: Any, _userdata: Any, *rest: Any) -> None:
        # paho 1.6 passes (rc,), 2.x (flags, reason_code, properties).
        reason = rest[1] if len(rest) >= 3 else (rest[0] if rest else "")
        inbox.put(("disconnected", str(reason)))

    def on_message(_client: Any, _userdata: Any, m: Any) -> None:
        inbox.put(
            ("message", Message(m.topic, bytes(m.payload), bool(m.retain), m.qos, time.time()))
        )

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    if args.username:
        client.username_pw_set(args.username, os.environ.get(args.password_env))
    if args.tls or args.cafile:
        context = ssl.create_default_context(cafile=args.cafile)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/subscribe.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=None, help="default 1883, or 8883 with TLS")
    parser.add_argument(
        "--topic", action="append", help=f"topic filter (repeatable; default {DEFAULT_TOPIC})"
    )
    parser.add_argument("--username")
    parser.add_argument("--password-env", default="MQTT_PASSWORD", metavar="VAR")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--cert", help="client certificate (PEM)")
    parser.add_argument("--key", help="client key (PEM)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the broker")
    parser.add_argument(
        "--view", choices=("live", "log", "json"), help="default: live on a terminal, else log"
    )
    parser.add_argument("--count", type=int, help="exit after this many messages")
    parser.add_argument("--timeout", type=float, help="exit after this many seconds")
    parser.add_argument("--no-color", action="store_true")
    args = parser.parse_args(argv)
    args.topic = args.topic or [DEFAULT_TOPIC]
    if args.port is None:
        args.port = 8883 if (args.tls or args.cafile) else 1883
    if args.cert and not args.key:
        parser.error("--cert needs --key")
    view = args.view or ("live" if sys.stdout.isatty() else "log")
    style = Style(sys.stdout.isatty() and not args.no_color and view != "json")

    inbox: queue.Queue[Any] = queue.Queue()
    try:
        client = connect(args, inbox)
    except (OSError, ssl.SSLError, ValueError) as e:
        print(f"cannot connect to {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    board = Board()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    redraw_at = 0.0
    dirty = True
    code = 0
    try:
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                kind, value = inbox.get(timeout=0.25)
            except queue.Empty:
                kind, value = "idle", None
            if kind == "refused":
                print(f"the broker refused the connection: {value}", file=sys.stderr)
                code = 1
                break
            if kind == "connected":
                print(
                    f"subscribed to {', '.join(args.topic)} on {args.host}:{args.port}",
                    file=sys.stderr,
                )
            elif kind == "disconnected":
                print(f"disconnected ({value}); reconnecting …", file=sys.stderr)
            elif kind == "message":
                board.update(value)
                dirty = True
                if view == "log":
                    print(log_block(value), flush=True)
                elif view == "json":
                    print(json_line(value), flush=True)
                if args.count is not None and board.count >= args.count:
                    stop.set()
            if view == "live" and dirty and time.monotonic() >= redraw_at:
                sys.stdout.write("\x1b[H\x1b[2J" + render(board, style) + "\n")
                sys.stdout.flush()
                redraw_at = time.monotonic() + 0.25
                dirty = False
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    if view == "live" and board.count:
        sys.stdout.write("\x1b[H\x1b[2J" + render(board, style) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
