"""The streaming delta: an append-only SQLite log of upserts and tombstones since a base build.

The streaming indexer appends rows and moves its feed checkpoint in the same transaction, so a
crash either applied a batch completely (rows + checkpoint) or not at all: nothing is lost and
nothing is applied twice (`feed_offset` is UNIQUE as a second guard). Shard stores tail the log
by `seq`; WAL mode lets them read while the indexer writes. Every upsert carries the model
version of its vector, so a store never merges a vector of another model into its index.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_contracts.durable import disk_full, free_bytes

UPSERT, DELETE = "upsert", "delete"
LOW_DISK_BYTES = 1 << 20  # an append failing with less free than this is a full disk

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delta (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    feed_offset INTEGER NOT NULL UNIQUE,
    item_id TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    model_version TEXT,
    vector BLOB,
    applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    consumer TEXT PRIMARY KEY,
    feed_offset INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class DeltaRow:
    seq: int
    feed_offset: int
    item_id: str
    op: str
    model_version: str | None
    vector: np.ndarray | None  # float32 (dim,), upserts only


class DeltaLog:
    """One delta.sqlite file; safe to use from one thread per instance."""

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"delta log not found: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as err:  # opening creates the -wal and -shm files
            self._db.close()
            raise self._explained(err) from err

    def close(self) -> None:
        self._db.close()

    def checkpoint(self, consumer: str) -> int:
        row = self._db.execute("SELECT feed_offset FROM checkpoint WHERE consumer = ?",
                               (consumer,)).fetchone()
        return int(row[0]) if row else 0

    def append(self, rows: Iterable[tuple[int, str, str, str | None, np.ndarray | None]],
               consumer: str, checkpoint: int) -> int:
        """Apply (feed_offset, item_id, op, model_version, vector) rows and move `consumer`'s
        checkpoint to `checkpoint`, atomically. Returns the number of rows written."""
        now = time.time()
        payload = [(off, item, op, mv, None if v is None else
                    np.ascontiguousarray(v, dtype=np.float32).tobytes(), now)
                   for off, item, op, mv, v in rows]
        for off, item, op, _, vec, _ in payload:
            if op not in (UPSERT, DELETE):
                raise ValueError(f"delta op must be upsert or delete, got {op!r} ({item})")
            if (op == UPSERT) != (vec is not None):
                raise ValueError(f"feed offset {off} ({item}): an upsert needs a vector and a "
                                 "delete must not have one")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO delta (feed_offset, item_id, op, model_version, vector,"
                           " applied_at) VALUES (?, ?, ?, ?, ?, ?)", payload)
            db.execute("INSERT INTO checkpoint (consumer, feed_offset) VALUES (?, ?) "
                       "ON CONFLICT(consumer) DO UPDATE SET feed_offset = excluded.feed_offset",
                       (consumer, checkpoint))
            db.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise self._explained(err) from err
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(payload)

    def _explained(self, err: sqlite3.OperationalError) -> Exception:
        """SQLite reports a full disk under WAL as a "disk I/O error": say what it is."""
        if free_bytes(self.path.parent) >= LOW_DISK_BYTES:
            return err
        return disk_full(self.path, f"nothing was appended and no checkpoint moved; SQLite: "
                                    f"{err}")

    def rows_after(self, seq: int, upto: int | None = None) -> list[DeltaRow]:
        """Rows with `seq` < row.seq <= `upto` (no upper bound when None), in order."""
        sql = ("SELECT seq, feed_offset, item_id, op, model_version, vector FROM delta "
               "WHERE seq > ?" + (" AND seq <= ?" if upto is not None else "") + " ORDER BY seq")
        args = (seq,) if upto is None else (seq, upto)
        return [DeltaRow(s, off, item, op, mv,
                         None if blob is None else np.frombuffer(blob, dtype=np.float32))
                for s, off, item, op, mv, blob in self._db.execute(sql, args)]

    def max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM delta").fetchone()[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM delta").fetchone()[0])

    def prune(self, upto_seq: int) -> int:
        """Drop rows with seq <= `upto_seq` (already folded into every version still pointed
        to); returns how many were dropped."""
        cur = self._db.execute("DELETE FROM delta WHERE seq <= ?", (upto_seq,))
        return cur.rowcount
