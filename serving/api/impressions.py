"""Durable impression log: every served result grid and every click/save on it.

Served grids are next month's training data and the only evidence an online test has, so
the log must not lose or invent rows. It is one SQLite database in WAL mode with
`synchronous=FULL`: every grid and every event is one committed, fsync'd transaction, and a
restarted process reopens the same file and carries on. Rows are only ever inserted.
Query photos are written (atomically, content-addressed) before their grid is committed, so
a logged row never points at a missing image.

Event rules, checked inside the inserting transaction so nothing half-valid lands: the
request id must be logged (else 404), the position must be one the grid showed and carry the
item shown there (else 422), a click or save is recorded at most once per position, and a
save needs a click first (both 409).

`export_impressions` writes the contracted `impressions` table (data_contracts/schemas.py,
the table the harvester reads) plus `impression_context.parquet` with what the contract has
no columns for (request id, client session, experiment, arm, interleaving team, model and
index version), keyed by impression_id. Each grid is its own `session_id` there (the
request id), as in the world's logs, so (session_id, position) stays a key.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import schemas
from data_contracts.constants import LOGGING_POLICIES
from data_contracts.durable import write_bytes_atomic
from data_contracts.validation import validate_table

DB_NAME = "impressions.sqlite"
QUERY_IMAGE_DIR = "images/queries"
EVENT_KINDS = ("click", "save")
CONTEXT_COLUMNS = ["impression_id", "request_id", "client_session_id", "experiment", "arm",
                   "team", "model_version", "index_version"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    client_session_id TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    query_image_path TEXT NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL,
    experiment TEXT NOT NULL,
    arm TEXT NOT NULL,
    logging_policy TEXT NOT NULL,
    model_version TEXT NOT NULL,
    index_version TEXT NOT NULL,
    n_items INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS shown (
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    score REAL NOT NULL,
    team TEXT NOT NULL,
    PRIMARY KEY (request_id, position),
    UNIQUE (request_id, item_id)
);
CREATE TABLE IF NOT EXISTS events (
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    PRIMARY KEY (request_id, position, kind)
);
"""


class EventRejected(ValueError):
    """An event that must not be stored; `status` is the HTTP status that says why."""

    status = 422


class UnknownRequest(EventRejected):
    status = 404


class BadPosition(EventRejected):
    status = 422


class DuplicateEvent(EventRejected):
    status = 409


@dataclass(frozen=True)
class ShownItem:
    item_id: str
    position: int  # 1-based
    score: float
    team: str = ""  # interleaving: which ranker placed it ("" outside interleaving)


@dataclass(frozen=True)
class Grid:
    """One served result grid and the context an online test needs to judge it."""

    request_id: str
    user_id: str
    client_session_id: str
    ts: datetime
    query_image: bytes
    box: tuple[float, float, float, float]
    experiment: str
    arm: str
    logging_policy: str
    model_version: str
    index_version: str
    items: Sequence[ShownItem]


def _us(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got {ts.isoformat()}")
    return int(ts.timestamp() * 1_000_000)


def _check_grid(grid: Grid) -> None:
    if not grid.request_id or not grid.user_id:
        raise ValueError("a grid needs a request id and a user id")
    if grid.logging_policy not in LOGGING_POLICIES:
        raise ValueError(f"logging_policy must be one of {LOGGING_POLICIES}, "
                         f"got {grid.logging_policy!r}")
    if not grid.items:
        raise ValueError(f"grid {grid.request_id} shows no items")
    positions = sorted(i.position for i in grid.items)
    if positions != list(range(1, len(grid.items) + 1)):
        raise ValueError(f"grid {grid.request_id}: positions must be 1..{len(grid.items)}, "
                         f"got {positions}")
    if len({i.item_id for i in grid.items}) != len(grid.items):
        raise ValueError(f"grid {grid.request_id} shows an item twice")
    x0, y0, x1, y1 = grid.box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"grid {grid.request_id}: box {grid.box} is not normalised")
    if not grid.query_image:
        raise ValueError(f"grid {grid.request_id} has no query image")


class ImpressionLog:
    """Append-only grid and event log under `root` (safe to share between threads)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def log_grid(self, grid: Grid) -> str:
        """Store one grid (query photo first, then one transaction); returns the photo path."""
        _check_grid(grid)
        digest = hashlib.sha256(grid.query_image).hexdigest()[:32]
        rel_path = f"{QUERY_IMAGE_DIR}/{digest}.jpg"
        target = self.root / rel_path
        if not target.exists():
            write_bytes_atomic(target, grid.query_image)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (grid.request_id, grid.user_id, grid.client_session_id, _us(grid.ts),
                     rel_path, *map(float, grid.box), grid.experiment, grid.arm,
                     grid.logging_policy, grid.model_version, grid.index_version,
                     len(grid.items)))
                self._db.executemany(
                    "INSERT INTO shown VALUES (?,?,?,?,?)",
                    [(grid.request_id, i.position, i.item_id, float(i.score), i.team)
                     for i in grid.items])
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as err:
                self._db.execute("ROLLBACK")
                raise ValueError(f"grid {grid.request_id} is already logged: {err}") from err
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rel_path

    def record_event(self, request_id: str, position: int, item_id: str, kind: str,
                     ts: datetime | None = None) -> None:
        """Store one click or save, or raise `EventRejected` and store nothing."""
        if kind not in EVENT_KINDS:
            raise EventRejected(f"event type must be one of {EVENT_KINDS}, got {kind!r}")
        ts_us = _us(ts or datetime.now(UTC))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._check_event(request_id, position, item_id, kind, ts_us)
                self._db.execute("INSERT INTO events VALUES (?,?,?,?)",
                                 (request_id, position, kind, ts_us))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _check_event(self, request_id: str, position: int, item_id: str, kind: str,
                     ts_us: int) -> None:
        row = self._db.execute("SELECT n_items, ts_us FROM requests WHERE request_id = ?",
                               (request_id,)).fetchone()
        if row is None:
            raise UnknownRequest(f"unknown request id {request_id!r}: no grid was logged "
                                 "under it")
        n_items, served_us = row
        if not 1 <= position <= n_items:
            raise BadPosition(f"position {position} is outside the grid of request "
                              f"{request_id} (positions 1..{n_items})")
        shown_item, = self._db.execute(
            "SELECT item_id FROM shown WHERE request_id = ? AND position = ?",
            (request_id, position)).fetchone()
        if shown_item != item_id:
            raise BadPosition(f"request {request_id} showed {shown_item!r} at position "
                              f"{position}, not {item_id!r}")
        if ts_us < served_us:
            raise EventRejected(f"event time is before request {request_id} was served")
        done = {k for k, in self._db.execute(
            "SELECT kind FROM events WHERE request_id = ? AND position = ?",
            (request_id, position))}
        if kind in done:
            raise DuplicateEvent(f"duplicate {kind} on request {request_id} position "
                                 f"{position}: already recorded")
        if kind == "save" and "click" not in done:
            raise DuplicateEvent(f"save on request {request_id} position {position} without "
                                 "a click on it first")

    def counts(self) -> dict[str, int]:
        """Rows per table (grids, shown items, events); for monitoring and tests."""
        with self._lock:
            return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in ("requests", "shown", "events")}

    def frame(self) -> pd.DataFrame:
        """One row per shown item with its grid context and clicked/saved from the events."""
        with self._lock:
            frame = pd.read_sql_query(
                """
                SELECT s.request_id, s.position, s.item_id, s.score, s.team, r.user_id,
                       r.client_session_id, r.ts_us, r.query_image_path, r.x0, r.y0, r.x1,
                       r.y1, r.experiment, r.arm, r.logging_policy, r.model_version,
                       r.index_version,
                       EXISTS (SELECT 1 FROM events e WHERE e.request_id = s.request_id
                               AND e.position = s.position AND e.kind = 'click') AS clicked,
                       EXISTS (SELECT 1 FROM events e WHERE e.request_id = s.request_id
                               AND e.position = s.position AND e.kind = 'save') AS saved
                FROM shown s JOIN requests r USING (request_id)
                ORDER BY r.ts_us, s.request_id, s.position
                """, self._db)
        return frame.astype({"clicked": bool, "saved": bool})


def impressions_frames(log: ImpressionLog) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(impressions in the contracted schema, impression_context) from the log."""
    f = log.frame()
    impression_id = f["request_id"] + "-" + f["position"].map("{:02d}".format)
    impressions = pd.DataFrame({
        "impression_id": impression_id, "session_id": f["request_id"],
        "user_id": f["user_id"],
        "ts": pd.to_datetime(f["ts_us"], unit="us", utc=True),
        "query_id": f["request_id"], "query_image_path": f["query_image_path"],
        "query_x0": f["x0"], "query_y0": f["y0"], "query_x1": f["x1"], "query_y1": f["y1"],
        "item_id": f["item_id"], "position": f["position"].astype("int64"),
        "logging_policy": f["logging_policy"], "ranker_score": f["score"].astype(float),
        "clicked": f["clicked"], "saved": f["saved"],
    })
    context = pd.DataFrame({
        "impression_id": impression_id, "request_id": f["request_id"],
        "client_session_id": f["client_session_id"], "experiment": f["experiment"],
        "arm": f["arm"], "team": f["team"], "model_version": f["model_version"],
        "index_version": f["index_version"],
    })
    return impressions, context


def export_impressions(log: ImpressionLog, out_dir: Path, catalog_path: Path,
                       quarantine_dir: Path | None = None,
                       docs_dir: Path | None = None) -> dict[str, Path]:
    """Write `impressions.parquet` (validated by its GE contract before it lands) and
    `impression_context.parquet` into `out_dir`; a contract failure raises and replaces
    nothing (the rejected file goes to quarantine when `quarantine_dir` is given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    impressions, context = impressions_frames(log)
    if impressions.empty:
        raise ValueError(f"the impression log in {log.root} holds no grids yet")
    paths = {"impressions": out_dir / "impressions.parquet",
             "impression_context": out_dir / "impression_context.parquet"}
    staged = out_dir / f".impressions.{os.getpid()}.parquet"
    pq.write_table(pa.Table.from_pandas(impressions, schema=schemas.IMPRESSIONS,
                                        preserve_index=False), staged)
    try:
        validate_table("impressions", staged, quarantine_dir=quarantine_dir,
                       docs_dir=docs_dir, catalog_path=catalog_path)
    except BaseException:
        staged.unlink(missing_ok=True)  # quarantine (when given) already holds a copy
        raise
    context_staged = out_dir / f".impression_context.{os.getpid()}.parquet"
    context[CONTEXT_COLUMNS].to_parquet(context_staged, index=False)
    os.replace(staged, paths["impressions"])
    os.replace(context_staged, paths["impression_context"])
    return paths


def publish_to_data_root(log: ImpressionLog, data_root: Path,
                         quarantine_dir: Path | None = None) -> dict[str, int]:
    """Merge the served grids into `data_root/tables/impressions.parquet`, where the
    harvester reads them next to the older logs; this closes the training loop.

    Idempotent: served rows (found by impression id) are replaced by their current state
    in the log, so clicks that arrived since the last publication are picked up. Query
    photos are copied to `data_root` first; the merged table must pass the impressions
    contract before it replaces the old one.
    """
    data_root = Path(data_root)
    tables = data_root / "tables"
    target = tables / "impressions.parquet"
    served, context = impressions_frames(log)
    if served.empty:
        raise ValueError(f"the impression log in {log.root} holds no grids yet")
    history = (pd.read_parquet(target) if target.exists()
               else schemas.IMPRESSIONS.empty_table().to_pandas())
    kept = history[~history["impression_id"].isin(served["impression_id"])]
    for rel in served["query_image_path"].unique():
        if not (data_root / rel).exists():
            write_bytes_atomic(data_root / rel, (log.root / rel).read_bytes())
    merged = pd.concat([kept, served], ignore_index=True)
    staged = tables / f".impressions.{os.getpid()}.parquet"
    pq.write_table(pa.Table.from_pandas(merged, schema=schemas.IMPRESSIONS,
                                        preserve_index=False), staged)
    try:
        validate_table("impressions", staged, quarantine_dir=quarantine_dir, docs_dir=None,
                       catalog_path=tables / "catalog.parquet")
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    context_path = tables / "impression_context.parquet"
    old_context = (pd.read_parquet(context_path) if context_path.exists()
                   else pd.DataFrame(columns=CONTEXT_COLUMNS))
    context = pd.concat([old_context[~old_context["impression_id"].isin(
        context["impression_id"])], context[CONTEXT_COLUMNS]], ignore_index=True)
    context_staged = tables / f".impression_context.{os.getpid()}.parquet"
    context.to_parquet(context_staged, index=False)
    os.replace(staged, target)
    os.replace(context_staged, context_path)
    return {"history_rows": len(kept), "served_rows": len(served), "rows": len(merged)}
