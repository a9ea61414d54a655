"""A persistent, bounded outbox: events wait here until a destination acknowledges them.

The outbox knows nothing of MQTT or IoT Hub. A sink :meth:`~Outbox.enqueue`\\ s
each event (an opaque ``payload`` plus a ``key``, the event id, and optional
string ``attributes`` such as IoT Hub message properties) *before* it tries to
send it, :meth:`~Outbox.peek`\\ s batches in enqueue order, and
:meth:`~Outbox.ack`\\ s items once the destination has acknowledged them (for
MQTT: the broker's PUBACK). An item leaves the outbox only through ``ack`` or
through an explicit, counted and logged drop, so events survive broker outages
and process restarts (including ``kill -9``): delivery is at least once, in
enqueue order, and a receiver de-duplicates on ``key``.

Storage is one SQLite file in WAL mode with ``synchronous=FULL``: a committed
enqueue survives a power cut. The write-ahead log is checkpointed every
:data:`WAL_CHECKPOINT_PAGES` pages and kept to :data:`WAL_SIZE_LIMIT` bytes
(the outbox is small and events are rare); when the disk is full, a write
that fails is tried once more after checkpointing the log and truncating it
to nothing, which frees what the log held. (SQLite's default checkpoints at
1000 pages, 4 MiB: on a small state disk the log alone could fill it, and
with every commit failing no checkpoint would ever come to free it.)

Schema (``PRAGMA user_version`` = 1)::

    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- delivery order, never reused
        key         TEXT NOT NULL,                      -- event_id, for de-duplication
        payload     BLOB NOT NULL,                      -- the bytes to send
        attributes  TEXT,                               -- JSON object of strings, or NULL
        enqueued_at REAL NOT NULL                       -- time.time() at enqueue
    );
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    -- counters: dropped:<reason>, totals kept across restarts

Bounds and the drop policy, applied on every enqueue (and by
:meth:`~Outbox.purge_expired`, which a sink calls periodically):

* ``max_age_s``: items older than this are dropped (reason ``expired``): an
  anomaly reported a week late is noise, and the bound keeps a dead link from
  growing the file forever.
* ``max_events`` and ``max_bytes`` (sum of payload sizes): when a new item
  would exceed either, ``overflow="drop_oldest"`` (the default) drops the
  oldest items until it fits (reason ``overflow``); ``overflow="reject_new"``
  refuses the new item instead (:class:`OutboxFull`, reason ``rejected``).
* A payload larger than ``max_bytes`` on its own is refused
  (:class:`OutboxFull`, reason ``too_large``).
* A sink may drop an item its destination can never take (:meth:`~Outbox.drop`,
  reason of its choosing, e.g. ``undeliverable``).

Every drop is logged at WARNING with the keys dropped, counted per reason
(persisted, so the totals survive restarts) and returned to the caller so that
it can fail the matching futures.

One process owns an outbox file at a time (an ``flock`` on ``<path>.lock``); a
second one gets :class:`OutboxError`. A file that SQLite cannot read is moved
aside to ``<path>.corrupt-<unix time>`` (logged at ERROR) and a new one is
started. All methods are thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TypeVar

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OverflowPolicy = Literal["drop_oldest", "reject_new"]
OVERFLOW_POLICIES: tuple[OverflowPolicy, ...] = ("drop_oldest", "reject_new")
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_MAX_BYTES = 50_000_000
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
_T = TypeVar("_T")
WAL_CHECKPOINT_PAGES = 100
WAL_SIZE_LIMIT = 1024 * 1024
# How many dropped keys one log line names; the count is always complete.
_LOG_KEYS = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL,
    payload     BLOB NOT NULL,
    attributes  TEXT,
    enqueued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class OutboxError(Exception):
    """The outbox cannot be opened or written (disk full, locked, unreadable)."""


class OutboxFull(OutboxError):
    """The item was refused by the drop policy; it was counted as dropped."""

    def __init__(self, message: str, dropped: Dropped) -> None:
        super().__init__(message)
        self.dropped = dropped


@dataclass(frozen=True)
class OutboxItem:
    """One stored item, as :meth:`Outbox.peek` returns it."""

    id: int
    key: str
    payload: bytes
    attributes: Mapping[str, str]
    enqueued_at: float


@dataclass(frozen=True)
class Dropped:
    """An item that left the outbox without being acknowledged, and why.

    ``id`` is ``None`` for an item refused at enqueue (it was never stored).
    """

    id: int | None
    key: str
    reason: str
    enqueued_at: float


@dataclass(frozen=True)
class Enqueued:
    """The stored item's id, and the items dropped to make room for it."""

    id: int
    dropped: tuple[Dropped, ...] = ()


@dataclass(frozen=True)
class OutboxStats:
    """Depth and drop counters, for health reports."""

    path: str
    depth: int
    bytes: int
    oldest_age_s: float | None
    dropped_total: int
    dropped: dict[str, int] = field(default_factory=dict)
    max_events: int = DEFAULT_MAX_EVENTS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age_s: float = DEFAULT_MAX_AGE_S
    overflow: str = "drop_oldest"

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "depth": self.depth,
            "bytes": self.bytes,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 1),
            "dropped_total": self.dropped_total,
            "dropped": dict(self.dropped),
            "max_events": self.max_events,
            "max_bytes": self.max_bytes,
            "max_age_s": self.max_age_s,
            "overflow": self.overflow,
        }


class Outbox:
    """A durable FIFO of items awaiting acknowledgement (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        overflow: OverflowPolicy = "drop_oldest",
        clock: Callable[[], float] = time.time,
    ) -> None:
        problems = []
        if max_events < 1:
            problems.append(f"max_events is {max_events}; it must be >= 1")
        if max_bytes < 1:
            problems.append(f"max_bytes is {max_bytes}; it must be >= 1")
        if not max_age_s > 0:
            problems.append(f"max_age_s is {max_age_s}; it must be > 0")
        if overflow not in OVERFLOW_POLICIES:
            problems.append(f"overflow is {overflow!r}; choose one of {list(OVERFLOW_POLICIES)}")
        if problems:
            raise ValueError("outbox: " + "; ".join(problems))
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age_s = float(max_age_s)
        self.overflow: OverflowPolicy = overflow
        self._clock = clock
        self._lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None
        self._db: sqlite3.Connection | None = None
        self._depth = 0
        self._bytes = 0
        self._dropped: dict[str, int] = {}
        self._open()

    # -- public API ------------------------------------------------------------

    def enqueue(
        self, key: str, payload: bytes, attributes: Mapping[str, str] | None = None
    ) -> Enqueued:
        """Store one item durably (committed and fsynced) before returning.

        Applies the age and size bounds first; raises :class:`OutboxFull` if
        the policy refuses the item and :class:`OutboxError` if it cannot be
        written.
        """
        size = len(payload)
        attrs = json.dumps(dict(attributes), sort_keys=True) if attributes else None
        with self._lock:
            db = self._conn()
            now = self._clock()
            if size > self.max_bytes:
                refused = Dropped(None, key, "too_large", now)
                self._write(lambda: self._count_drops(db, [refused]))
                self._log_drops([refused])
                raise OutboxFull(
                    f"outbox: event {key} is {size} bytes, more than max_bytes "
                    f"({self.max_bytes}); dropped",
                    refused,
                )

            def txn() -> tuple[int | None, list[Dropped]]:
                dropped = self._expire(db, now)
                over = self._overflow_victims(db, size)
                if over and self.overflow == "reject_new":
                    # Commit the expiries and count the refusal; store nothing.
                    dropped.append(Dropped(None, key, "rejected", now))
                    self._count_drops(db, dropped)
                    return None, dropped
                dropped += self._delete(db, over, "overflow")
                cur = db.execute(
                    "INSERT INTO outbox (key, payload, attributes, enqueued_at) VALUES (?,?,?,?)",
                    (key, payload, attrs, now),
                )
                self._depth += 1
                self._bytes += size
                self._count_drops(db, dropped)
                return cur.lastrowid, dropped

            item_id, dropped = self._write(txn)
        self._log_drops(dropped)
        if item_id is None:
            raise OutboxFull(
                f"outbox: full ({self.max_events} events / {self.max_bytes} bytes); "
                f"overflow policy reject_new refused event {key}",
                dropped[-1],
            )
        return Enqueued(item_id, tuple(dropped))

    def peek(self, limit: int, after_id: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` items with ``id > after_id``, oldest first; nothing is removed."""
        if limit < 1:
            return []
        with self._lock:
            rows = self._read(
                lambda db: db.execute(
                    "SELECT id, key, payload, attributes, enqueued_at FROM outbox "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            )
        return [
            OutboxItem(
                id=r[0],
                key=r[1],
                payload=bytes(r[2]),
                attributes=json.loads(r[3]) if r[3] else {},
                enqueued_at=r[4],
            )
            for r in rows
        ]

    def ack(self, ids: Iterable[int]) -> int:
        """Remove acknowledged items (one transaction); how many were still there.

        Acknowledging an id that is gone (dropped meanwhile, or acked twice) is
        not an error.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            db = self._conn()
            removed = self._write(lambda: self._delete(db, wanted, "acked"))
        return len(removed)

    def drop(self, ids: Iterable[int], reason: str) -> list[Dropped]:
        """Remove items that can never be delivered; counted and logged under ``reason``."""
        wanted = sorted(set(ids))
        if not wanted:
            return []
        with self._lock:
            db = self._conn()

            def txn() -> list[Dropped]:
                dropped = self._delete(db, wanted, reason)
                self._count_drops(db, dropped)
                return dropped

            dropped = self._write(txn)
        self._log_drops(dropped)
        return dropped

    def purge_expired(self) -> list[Dropped]:
        """Drop items older than ``max_age_s`` now (also done on every enqueue)."""
        with self._lock:
            db = self._conn()

            def txn() -> list[Dropped]:
                dropped = self._expire(db, self._clock())
                self._count_drops(db, dropped)
                return dropped

            dropped = self._write(txn)
        self._log_drops(dropped)
        return dropped

    def depth(self) -> int:
        """How many items wait for acknowledgement."""
        with self._lock:
            return self._depth

    def pending_through(self, item_id: int) -> int:
        """How many items with ``id <= item_id`` are still waiting."""
        with self._lock:
            row = self._read(
                lambda db: db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE id <= ?", (item_id,)
                ).fetchone()
            )
        return int(row[0])

    def last_id(self) -> int:
        """The largest id ever handed out (0 if none): a flush target."""
        with self._lock:
            row = self._read(
                lambda db: db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'"
                ).fetchone()
            )
        return int(row[0])

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = None
            if self._db is not None:
                row = self._read(
                    lambda db: db.execute(
                        "SELECT enqueued_at FROM outbox ORDER BY id LIMIT 1"
                    ).fetchone()
                )
                oldest = None if row is None else max(0.0, self._clock() - row[0])
            return OutboxStats(
                path=str(self.path),
                depth=self._depth,
                bytes=self._bytes,
                oldest_age_s=oldest,
                dropped_total=sum(self._dropped.values()),
                dropped=dict(self._dropped),
                max_events=self.max_events,
                max_bytes=self.max_bytes,
                max_age_s=self.max_age_s,
                overflow=self.overflow,
            )

    def close(self) -> None:
        """Close the database and release the file lock. Idempotent."""
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None
            if self._lock_file is not None:
                with contextlib.suppress(OSError):
                    self._lock_file.close()  # closing releases the flock
                self._lock_file = None

    @property
    def closed(self) -> bool:
        return self._db is None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Outbox {str(self.path)!r} depth={self._depth}>"

    # -- opening ---------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.path.with_name(self.path.name + ".lock")
            lock_file = open(lock_path, "ab")  # noqa: SIM115 - held for the outbox's life
        except OSError as e:
            raise OutboxError(f"outbox: cannot create {self.path}: {e}") from e
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            lock_file.close()
            raise OutboxError(
                f"outbox: {self.path} is in use by another process (lock {lock_path} is held); "
                "give each module or sink its own outbox path"
            ) from e
        self._lock_file = lock_file
        try:
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and not _is_corruption(e):
                    raise
                self._quarantine(e)
                self._db = self._connect()
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise OutboxError(f"outbox: cannot open {self.path}: {e}") from e
        if self._depth:
            logger.info(
                "outbox %s: %d event(s) (%d bytes) waiting from an earlier run",
                self.path,
                self._depth,
                self._bytes,
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.OperationalError(
                    f"schema version {version} is newer than this soundwatch's "
                    f"({SCHEMA_VERSION}); use the newer soundwatch or move the file away"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("PRAGMA quick_check").fetchone()
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            counters = db.execute("SELECT name, value FROM counters").fetchall()
        except BaseException:
            db.close()
            raise
        self._depth, self._bytes = int(depth), int(size)
        self._dropped = {
            name.removeprefix("dropped:"): int(value)
            for name, value in counters
            if name.startswith("dropped:")
        }
        return db

    def _quarantine(self, error: BaseException) -> None:
        stamp = int(time.time())
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                dst = Path(f"{self.path}.corrupt-{stamp}{suffix}")
                os.replace(src, dst)
                moved.append(dst.name)
        logger.error(
            "outbox %s is unreadable (%s); moved it aside (%s) and started a new one: "
            "events stored in it were NOT sent",
            self.path,
            error,
            ", ".join(moved),
        )

    # -- internals (called with self._lock held) -------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._db

    def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return fn(self._conn())
        except sqlite3.Error as e:
            raise OutboxError(f"outbox {self.path}: read failed: {e}") from e

    def _write(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in one immediate transaction; restore counters on failure.

        A transaction the full disk refused is run once more after the
        write-ahead log is checkpointed and truncated (module docstring).
        """
        try:
            return self._write_once(fn)
        except OutboxError as e:
            if not _is_disk_full(e.__cause__) or not self._truncate_wal():
                raise
        return self._write_once(fn)

    def _truncate_wal(self) -> bool:
        """Checkpoint the write-ahead log and truncate it; whether that fully worked."""
        try:
            busy, _log, _done = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as e:
            logger.debug("outbox %s: checkpoint failed: %s", self.path, e)
            return False
        return int(busy) == 0

    def _write_once(self, fn: Callable[[], _T]) -> _T:
        db = self._conn()
        saved = (self._depth, self._bytes, dict(self._dropped))
        try:
            db.execute("BEGIN IMMEDIATE")
            result = fn()
            db.execute("COMMIT")
        except BaseException as e:
            self._depth, self._bytes, self._dropped = saved
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise OutboxError(f"outbox {self.path}: write failed: {e}") from e
            raise
        return result

    def _expire(self, db: sqlite3.Connection, now: float) -> list[Dropped]:
        cutoff = now - self.max_age_s
        ids = [
            r[0]
            for r in db.execute(
                "SELECT id FROM outbox WHERE enqueued_at < ? ORDER BY id", (cutoff,)
            ).fetchall()
        ]
        return self._delete(db, ids, "expired")

    def _overflow_victims(self, db: sqlite3.Connection, incoming: int) -> list[int]:
        """The oldest ids that must go so that ``incoming`` more bytes fit."""
        if self._depth + 1 <= self.max_events and self._bytes + incoming <= self.max_bytes:
            return []
        victims: list[int] = []
        depth, size = self._depth, self._bytes
        for item_id, length in db.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id"):
            if depth + 1 <= self.max_events and size + incoming <= self.max_bytes:
                break
            victims.append(item_id)
            depth -= 1
            size -= length
        return victims

    def _delete(self, db: sqlite3.Connection, ids: Sequence[int], reason: str) -> list[Dropped]:
        """Delete ``ids`` (those that exist); adjusts depth/bytes, not drop counters."""
        out: list[Dropped] = []
        for chunk_start in range(0, len(ids), 500):
            chunk = list(ids[chunk_start : chunk_start + 500])
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT id, key, enqueued_at, LENGTH(payload) FROM outbox WHERE id IN ({marks})",
                chunk,
            ).fetchall()
            if not rows:
                continue
            db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            for item_id, key, enqueued_at, length in rows:
                self._depth -= 1
                self._bytes -= int(length)
                out.append(Dropped(item_id, key, reason, enqueued_at))
        return out

    def _count_drops(self, db: sqlite3.Connection, dropped: Sequence[Dropped]) -> None:
        by_reason: dict[str, int] = {}
        for d in dropped:
            by_reason[d.reason] = by_reason.get(d.reason, 0) + 1
        for reason, n in by_reason.items():
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (f"dropped:{reason}", n),
            )
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def _log_drops(self, dropped: Sequence[Dropped]) -> None:
        by_reason: dict[str, list[str]] = {}
        for d in dropped:
            by_reason.setdefault(d.reason, []).append(d.key)
        for reason, keys in by_reason.items():
            more = f" and {len(keys) - _LOG_KEYS} more" if len(keys) > _LOG_KEYS else ""
            logger.warning(
                "outbox %s: dropped %d event(s) undelivered (%s): %s%s",
                self.path,
                len(keys),
                reason,
                ", ".join(keys[:_LOG_KEYS]),
                more,
            )


def _is_disk_full(error: BaseException | None) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_FULL)
    return isinstance(error, sqlite3.Error) and "disk is full" in str(error)


def _is_corruption(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return any(s in text for s in ("not a database", "malformed", "corrupt"))
