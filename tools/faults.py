"""``make faults``: inject faults into a real ``soundwatch run`` and count every event.

Usage::

    python -m tools.faults                  # every scenario (about 4 minutes)
    python -m tools.faults --quick          # shorter outages, fewer flaps (about 1.5 minutes)
    python -m tools.faults --only flapping  # one scenario (repeat --only for more)

Everything is real: mosquitto (with persistence, as a production broker
runs), the module as ``soundwatch run`` with an MQTT sink and its outbox, a
``mosquitto_sub`` collector with a persistent session (a back end), and, for
"disk full", a small tmpfs as the module's state directory. The module plays
a fault recording at 20 times real time with thresholds that make every loop
of it an anomaly (tests/modulekit.py): about three events a second.

Per scenario: *emitted* is what the module's own ledger (a JSON Lines sink on
an untouched disk, the last of its sinks) holds, *delivered* the distinct ``event_id``\\ s the
collector received, *lost* the emitted events never delivered plus the
decided events the module reported it could not emit, *duplicated* the
extra copies the collector received (QoS 1 redeliveries; a consumer
de-duplicates on ``event_id``), *shutdown* how long the module took to exit
after SIGTERM at the end (during the fault where it says so). After each
scenario a short run on a silent file with the same state directory sends
what the outbox kept, as the next start of the module would.

Prints one table. Exits 1 if any event was lost or a scenario could not run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from tests.modulekit import (
    Module,
    can_mount,
    fill,
    module_config,
    mqtt_sink,
    small_disk,
    wait_until,
)
from tests.mosquitto import Mosquitto, Subscriber, make_certs, tools_available

SPEED = 20.0
NEVER_EMITTED = re.compile(r"(\d+) decided event\(s\) were never emitted")


@dataclass
class Row:
    scenario: str
    emitted: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    shutdown_s: float | None = None
    note: str = ""
    failed: str | None = None


@dataclass(frozen=True)
class Settings:
    outage_s: float
    flaps: int
    kills: int
    freeze_s: float
    disk_full_s: float
    commands: int


# disk_full_s: long enough for the 50 numbers left below the stored ceiling to run out.
FULL = Settings(outage_s=60, flaps=15, kills=3, freeze_s=15, disk_full_s=40, commands=3000)
QUICK = Settings(outage_s=10, flaps=5, kills=2, freeze_s=5, disk_full_s=8, commands=1000)


class Drill:
    """One scenario's module, broker topics, collector and accounting."""

    def __init__(self, name: str, root: Path, broker: Mosquitto, state_dir: Path | None = None):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.broker = broker
        self.prefix = f"faults/{name}-{uuid.uuid4().hex[:6]}"
        self.state_dir = state_dir or self.dir / "state"
        self.sink = mqtt_sink(broker.ports["plain"], self.prefix)
        self.collector = broker.subscribe(
            [f"{self.prefix}/events"],
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            persistent=True,
        )
        config = module_config(self.dir, state_dir=self.state_dir, sinks=[self.sink], speed=SPEED)
        self.module = Module(self.dir, config)
        self.shutdown_s: float | None = None
        self.exit_code: int | None = None

    def events_received(self) -> list[str]:
        return [
            m.payload["event_id"]
            for m in self.collector.on(f"{self.prefix}/events")
            if isinstance(m.payload, dict)
        ]

    def emitted_ids(self) -> set[str]:
        return {e["event_id"] for e in self.module.events()}

    def wait_delivered(self, timeout_s: float = 60.0) -> None:
        """Wait until the collector has every event emitted so far (or give up quietly)."""
        wanted = self.emitted_ids()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: wanted <= set(self.events_received()), timeout_s, "delivery")

    def terminate(self) -> None:
        code, elapsed = self.module.terminate()
        self.shutdown_s = elapsed
        self.exit_code = code
        if code not in (0, 1):  # 1: the module counted an event it could not deliver or store
            raise RuntimeError(
                f"exit status {code} after SIGTERM:\n{self.module.run_log()[-2000:]}"
            )

    def drain(self) -> None:
        """The next start: a silent file with the same state directory sends what was kept."""
        silence = self.dir / "silence.wav"
        sf.write(silence, np.zeros(16000, dtype=np.float32), 16000)
        config = module_config(self.dir, state_dir=self.state_dir, sinks=[self.sink])
        config["source"] = {"type": "file", "path": str(silence)}
        path = self.dir / "drain.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [sys.executable, "-m", "soundwatch", "run", "--config", str(path)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        self.wait_delivered(30)

    def row(self, note: str = "") -> Row:
        emitted = self.emitted_ids()
        received = self.events_received()
        delivered = set(received)
        never = sum(int(n) for n in NEVER_EMITTED.findall(self.module.log_path.read_text()))
        # A kill -9 after the outbox stored an event and before the ledger (the
        # last sink) wrote it: delivered, never "emitted" here. Said, not hidden.
        beyond = len(delivered - emitted)
        if beyond:
            note += f"; {beyond} delivered that the ledger missed (killed between sinks)"
        return Row(
            scenario=self.name,
            emitted=len(emitted),
            delivered=len(delivered & emitted),
            lost=len(emitted - delivered) + never,
            duplicated=len(received) - len(delivered),
            shutdown_s=self.shutdown_s,
            note=note + (f"; exit status {self.exit_code}" if self.exit_code else ""),
        )

    def close(self) -> None:
        self.module.stop()
        self.collector.stop()


# --- the scenarios ------------------------------------------------------------------------


def outage(root: Path, broker: Mosquitto, s: Settings) -> Row:
    drill = Drill("broker-outage", root, broker)
    try:
        drill.module.start()
        drill.module.wait_events(6)
        broker.stop()
        before = len(drill.module.events())
        time.sleep(s.outage_s)  # the fault itself lasts this long
        during = len(drill.module.events()) - before
        broker.start()
        drill.wait_delivered()
        drill.terminate()
        drill.drain()
        return drill.row(f"broker stopped {s.outage_s:g} s; {during} events meanwhile")
    finally:
        drill.close()


def kill9(root: Path, broker: Mosquitto, s: Settings) -> Row:
    drill = Drill("kill-9-restart", root, broker)
    try:
        for _ in range(s.kills):
            drill.module.start()
            drill.module.wait_events(len(drill.module.events()) + 7)
            drill.module.kill9()  # mid-stream: events in flight and in the outbox
        drill.module.start()
        drill.module.wait_events(len(drill.module.events()) + 4)
        drill.wait_delivered()
        drill.terminate()
        drill.drain()
        return drill.row(f"kill -9 {s.kills}x mid-stream, restarted each time")
    finally:
        drill.close()


def flapping(root: Path, broker: Mosquitto, s: Settings) -> Row:
    drill = Drill("broker-flapping", root, broker)
    try:
        drill.module.start()
        drill.module.wait_events(4)
        for _ in range(s.flaps):
            broker.stop()
            time.sleep(1.0)
            broker.start()
            time.sleep(1.5)
        drill.wait_delivered()
        drill.terminate()
        drill.drain()
        return drill.row(f"{s.flaps} broker restarts, 1 s down / 1.5 s up")
    finally:
        drill.close()


def frozen(root: Path, broker: Mosquitto, s: Settings) -> Row:
    drill = Drill("broker-frozen", root, broker)
    try:
        drill.module.start()
        drill.module.wait_events(4)
        broker.pause()
        try:
            time.sleep(s.freeze_s)
            drill.terminate()  # while the broker answers nothing
        finally:
            broker.resume()
        drill.drain()
        return drill.row(f"SIGSTOP {s.freeze_s:g} s, SIGTERM during it (shutdown)")
    finally:
        drill.close()


def disk_full(root: Path, broker: Mosquitto, s: Settings) -> Row:
    if not can_mount():
        return Row("disk-full", failed="needs root to mount a small tmpfs")
    disk = root / "disk-full-state"
    with small_disk(disk, 2048) as state:
        drill = Drill("disk-full", root, broker, state_dir=state)
        try:
            drill.module.start()
            drill.module.wait_events(6)
            filler = fill(state)
            before = len(drill.module.events())
            time.sleep(s.disk_full_s)
            during = len(drill.module.events()) - before
            log = drill.module.run_log()
            filler.unlink()
            held = "holding events in memory" in log
            unstored_seq = "cannot persist sequence ceiling" in log
            waited = "event held, not emitted yet" in log
            drill.module.wait_events(len(drill.module.events()) + 4)
            drill.wait_delivered()
            drill.terminate()
            drill.drain()
            what = (
                ("outbox held events in memory", held),
                ("seq ceiling not stored", unstored_seq),
                ("events waited for a seq", waited),
            )
            how = ", ".join(w for w, on in what if on)
            return drill.row(
                f"state disk full {s.disk_full_s:g} s; {during} emitted meanwhile ({how})"
            )
        finally:
            drill.close()


def flood(root: Path, broker: Mosquitto, s: Settings) -> Row:
    drill = Drill("command-flood", root, broker)
    answers: Subscriber | None = None
    try:
        answers = broker.subscribe([f"{drill.prefix}/set/result"])
        drill.module.start()
        drill.module.wait_events(4)
        # One client, as fast as it can: valid patches that change nothing.
        lines = "\n".join('{"decision": {"cooldown_s": 0}}' for _ in range(s.commands)) + "\n"
        pub = ["mosquitto_pub", *broker.client_args("plain"), "-t", f"{drill.prefix}/set"]
        before = len(drill.module.events())
        subprocess.run([*pub, "-q", "1", "-l"], input=lines.encode(), check=True, timeout=120)
        drill.module.wait_events(before + 6)  # events keep coming after the flood
        topic = f"{drill.prefix}/set/result"
        got = answers
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(got.on(topic)) >= s.commands, 30, "every answer")
        results = collections.Counter(
            "ok" if m.payload.get("ok") else "busy"
            for m in got.on(topic)
            if isinstance(m.payload, dict)
        )
        drill.wait_delivered()
        drill.terminate()
        drill.drain()
        return drill.row(
            f"{s.commands} set commands at once: {results['ok']} applied, "
            f"{results['busy']} answered busy"
        )
    finally:
        if answers is not None:
            answers.stop()
        drill.close()


SCENARIOS: dict[str, Callable[[Path, Mosquitto, Settings], Row]] = {
    "outage": outage,
    "kill9": kill9,
    "flapping": flapping,
    "frozen": frozen,
    "disk-full": disk_full,
    "flood": flood,
}


# --- the table ------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    header = ("scenario", "emitted", "delivered", "lost", "duplicated", "shutdown", "what happened")
    body = []
    for r in rows:
        if r.failed is not None:
            body.append((r.scenario, "-", "-", "-", "-", "-", f"NOT RUN: {r.failed}"))
            continue
        shutdown = "-" if r.shutdown_s is None else f"{r.shutdown_s:.2f} s"
        body.append(
            (
                r.scenario,
                str(r.emitted),
                str(r.delivered),
                str(r.lost),
                str(r.duplicated),
                shutdown,
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)])


@contextlib.contextmanager
def running_broker(root: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(root / "broker", make_certs(root / "certs"))
    broker.start()
    try:
        yield broker
    finally:
        broker.resume()
        broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.faults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="shorter faults (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if not tools_available():
        print("faults: needs mosquitto, mosquitto-clients and openssl (make setup-test)")
        return 1
    settings = QUICK if args.quick else FULL
    names = args.only or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="soundwatch-faults-"))
    rows: list[Row] = []
    with running_broker(root) as broker:
        for name in names:
            print(f"faults: {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                rows.append(SCENARIOS[name](root, broker, settings))
            except Exception as e:  # one scenario failing must not hide the others
                rows.append(Row(name, failed=f"{type(e).__name__}: {e}"[:300]))
            print(f"faults: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(format_table(rows))
    print(f"\nwork directory: {root}" + ("" if args.keep else " (removed)"), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r for r in rows if r.failed is not None or r.lost]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
