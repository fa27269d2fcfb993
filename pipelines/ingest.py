"""Ingest stage: the catalog change feed and the streaming indexer that consumes it.

The feed is a durable append-only SQLite table (new, updated, removed, sold-out listings) with
a monotonically increasing offset; SQLite has one writer at a time, so offsets commit in
order and a consumer reading "offset > checkpoint" never skips a late commit.

The indexer reads a batch after its checkpoint, keeps the last event per item (idempotent by
item id), embeds new and updated listings (with the live index's catalog treatment, see
`ingest_micro_batch`), and appends upserts and tombstones to the index root's delta log
(serving/shards/delta.py) together with the new checkpoint, in one
transaction: a crash before the commit loses nothing (the batch is read again), a crash after
it duplicates nothing (the checkpoint moved with the rows). Shard stores tail the delta log,
so a new listing is searchable, and a removed one hidden, within a couple of poll intervals.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import load_section
from pipelines.embed import EmbedFn, require_unit_vectors
from serving.shards import layout, pointer
from serving.shards.delta import DELETE, UPSERT, DeltaLog

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pipelines.run_config import LoupeConfig

log = logging.getLogger("loupe.ingest")

FEED_OPS = {"new": UPSERT, "updated": UPSERT, "removed": DELETE, "sold_out": DELETE}
CONSUMER = "indexer"

_FEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('new', 'updated', 'removed', 'sold_out')),
    item_id TEXT NOT NULL,
    image_path TEXT
);
"""


@dataclass(frozen=True)
class IngestParams:
    batch_size: int = 64
    poll_s: float = 0.1

    @classmethod
    def load(cls, params_path: Path | None = None) -> IngestParams:
        return cls(**load_section(params_path, "ingest"))


@dataclass(frozen=True)
class FeedEvent:
    op: str  # new | updated | removed | sold_out
    item_id: str
    image_path: str | None = None  # needed by new / updated (relative to the image root)
    offset: int = 0  # assigned by the feed
    ts: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in FEED_OPS:
            raise ValueError(f"feed op must be one of {sorted(FEED_OPS)}, got {self.op!r}")
        if not self.item_id:
            raise ValueError("feed event without item_id")
        if FEED_OPS[self.op] == UPSERT and not self.image_path:
            raise ValueError(f"{self.op} event for {self.item_id} needs an image_path")


class ChangeFeed:
    """The catalog's change feed (one SQLite file); producers append, the indexer reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_FEED_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def append(self, events: Iterable[FeedEvent]) -> list[int]:
        """Append events in one transaction; returns their offsets."""
        now = time.time()
        events = list(events)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                offsets = [self._db.execute(
                    "INSERT INTO changes (ts, op, item_id, image_path) VALUES (?, ?, ?, ?)",
                    (now, e.op, e.item_id, e.image_path)).lastrowid for e in events]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return offsets

    def read(self, after: int, limit: int) -> list[FeedEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT offset, ts, op, item_id, image_path FROM changes WHERE offset > ? "
                "ORDER BY offset LIMIT ?", (after, limit)).fetchall()
        return [FeedEvent(op, item, path, off, ts) for off, ts, op, item, path in rows]

    def last_offset(self) -> int:
        with self._lock:
            return int(self._db.execute(
                "SELECT COALESCE(MAX(offset), 0) FROM changes").fetchone()[0])


def catalog_changes(before: pd.DataFrame, after: pd.DataFrame) -> list[FeedEvent]:
    """Feed events that turn catalog `before` into `after`: new listings, changed photos (or
    back in stock), removed listings and listings that went out of stock."""
    b = before.set_index("item_id")
    a = after.set_index("item_id")
    events = []
    for item in sorted(set(a.index) | set(b.index)):
        if item not in a.index:
            events.append(FeedEvent("removed", item))
            continue
        row = a.loc[item]
        if not bool(row["available"]):
            if item in b.index and bool(b.loc[item, "available"]):
                events.append(FeedEvent("sold_out", item))
        elif item not in b.index:
            events.append(FeedEvent("new", item, row["image_path"]))
        elif row["image_path"] != b.loc[item, "image_path"] or not bool(
                b.loc[item, "available"]):
            events.append(FeedEvent("updated", item, row["image_path"]))
    return events


@dataclass
class IndexerStats:
    events: int = 0
    upserts: int = 0
    deletes: int = 0
    batches: int = 0
    checkpoint: int = 0


class StreamingIndexer:
    """Feed -> embed -> delta log, from a durable checkpoint; see the module docstring."""

    def __init__(self, feed: ChangeFeed, index_root: Path, embed_fn: EmbedFn,
                 model_version: str, batch_size: int = 64, consumer: str = CONSUMER):
        if not model_version:
            raise ValueError("model_version is required: delta vectors carry their model")
        self.feed, self.embed_fn = feed, embed_fn
        self.model_version, self.batch_size, self.consumer = model_version, batch_size, consumer
        self.index_root = Path(index_root)
        self.delta = DeltaLog(self.index_root / layout.DELTA_DB)
        self.stats = IndexerStats(checkpoint=self.delta.checkpoint(consumer))
        live = pointer.read(self.index_root)
        if live is not None:
            live_model = layout.read_manifest(
                layout.version_dir(self.index_root, live))["model_version"]
            if live_model != model_version:
                log.warning("indexer embeds with %s but the live index is %s: its upserts "
                            "wait for an index of that model", model_version, live_model)

    def close(self) -> None:
        self.delta.close()

    def step(self) -> int:
        """Apply one batch; returns how many feed events it consumed (0: caught up)."""
        checkpoint = self.delta.checkpoint(self.consumer)
        events = self.feed.read(checkpoint, self.batch_size)
        if not events:
            return 0
        latest: dict[str, FeedEvent] = {}
        for e in events:  # the last event of an item in the batch decides its state
            latest.pop(e.item_id, None)
            latest[e.item_id] = e
        upserts = [e for e in latest.values() if FEED_OPS[e.op] == UPSERT]
        vectors = np.zeros((0, 0), np.float32)
        if upserts:
            vectors = require_unit_vectors(
                self.embed_fn([e.image_path for e in upserts], None), len(upserts),
                f"feed offsets {events[0].offset}..{events[-1].offset}")
        vec_of = {e.item_id: vectors[i] for i, e in enumerate(upserts)}
        rows = [(e.offset, e.item_id, FEED_OPS[e.op],
                 self.model_version if e.item_id in vec_of else None, vec_of.get(e.item_id))
                for e in sorted(latest.values(), key=lambda e: e.offset)]
        self.delta.append(rows, self.consumer, events[-1].offset)
        s = self.stats
        s.events += len(events)
        s.upserts += len(upserts)
        s.deletes += len(latest) - len(upserts)
        s.batches += 1
        s.checkpoint = events[-1].offset
        return len(events)

    def run(self, stop: threading.Event | None = None, poll_s: float = 0.1,
            until_caught_up: bool = False) -> IndexerStats:
        """Consume the feed until `stop` is set (or, with `until_caught_up`, it is empty)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.step() == 0:
                if until_caught_up:
                    break
                stop.wait(poll_s)
        return self.stats


# --------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    p = sub.add_parser("ingest", help="streaming indexer: change feed -> delta log")
    p.add_argument("--feed", type=Path, required=True, help="change feed (SQLite)")
    p.add_argument("--index-root", type=Path, required=True)
    p.add_argument("--world", type=Path, required=True, help="root the image paths are under")
    p.add_argument("--attribute-vectors", type=int, default=None, metavar="SEED",
                   help="model-free vectors from catalog attributes (benchmarks); default: "
                        "the live index's registered model and catalog treatment")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the live model (default: $MLFLOW_TRACKING_URI, else "
                        "./mlflow.db)")
    p.add_argument("--follow", action="store_true", help="keep polling (default: catch up)")
    p.add_argument("--params", type=Path, default=None)
    p.set_defaults(func=_ingest_cli)

    p = sub.add_parser("publish-changes", help="append a catalog diff to the change feed")
    p.add_argument("--feed", type=Path, required=True)
    p.add_argument("--before", type=Path, required=True, help="catalog parquet before")
    p.add_argument("--after", type=Path, required=True, help="catalog parquet after")
    p.set_defaults(func=_publish_cli)


def _ingest_cli(args) -> int:
    from pipelines.embed import attribute_embed_fn, attribute_model_version
    from pipelines.rollout import catalog_embed_fn
    from pipelines.run_config import resolve_config

    if args.attribute_vectors is not None:
        model_version = attribute_model_version(args.attribute_vectors)
        embed_fn = attribute_embed_fn(args.world, args.attribute_vectors)
    else:  # what the live index holds: its model version, detector and pick policy
        manifest = pointer.live_manifest(args.index_root)
        model_version = manifest["model_version"]
        cfg = resolve_config({"world_root": str(args.world), "index_root": str(args.index_root),
                              "mlflow_tracking_uri": args.tracking_uri})
        embed_fn = catalog_embed_fn(cfg, model_version, manifest.get("treatment"))
    params = IngestParams.load(args.params)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    indexer = StreamingIndexer(ChangeFeed(args.feed), args.index_root, embed_fn, model_version,
                               params.batch_size)
    try:
        stats = indexer.run(poll_s=params.poll_s, until_caught_up=not args.follow)
    except KeyboardInterrupt:
        stats = indexer.stats
    finally:
        indexer.close()
    print(json.dumps(stats.__dict__, indent=1))
    return 0


def _publish_cli(args) -> int:
    events = catalog_changes(pd.read_parquet(args.before), pd.read_parquet(args.after))
    offsets = ChangeFeed(args.feed).append(events)
    print(json.dumps({"events": len(events), "offsets": [offsets[0], offsets[-1]]
                      if offsets else []}))
    return 0


# --------------------------------------------------------------------------- DAG tasks
def ingest_micro_batch(cfg: LoupeConfig, max_seconds: float) -> dict:
    """Consume the change feed into the live index's delta until caught up or out of time,
    then measure what is still waiting. New listings get the live index's catalog treatment
    (its manifest's model version, detector and pick policy), so they match its vectors."""
    from pipelines.rollout import catalog_embed_fn, live_index_version

    live = live_index_version(cfg)
    manifest = layout.read_manifest(layout.version_dir(cfg.index, live))
    model = manifest["model_version"]
    feed = ChangeFeed(Path(cfg.change_feed))
    indexer = StreamingIndexer(feed, cfg.index,
                               catalog_embed_fn(cfg, model, manifest.get("treatment")), model,
                               IngestParams.load(Path(cfg.params_file)).batch_size)
    try:
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline and indexer.step() > 0:
            pass
        stats = indexer.stats
        waiting = feed.read(stats.checkpoint, 1)
        return {"model_version": model, "events": stats.events, "upserts": stats.upserts,
                "deletes": stats.deletes, "batches": stats.batches,
                "checkpoint": stats.checkpoint,
                "pending_events": feed.last_offset() - stats.checkpoint,
                "oldest_pending_age_s": round(time.time() - waiting[0].ts, 3) if waiting
                else 0.0}
    finally:
        indexer.close()
        feed.close()


def check_ingest_lag(result: Mapping[str, Any], max_pending_events: int,
                     max_lag_s: float) -> dict:
    """The `ingest_micro_batch` result, or HealthBreach when the feed lags behind."""
    from pipelines.monitor import HealthBreach

    breaches = []
    if result["pending_events"] > max_pending_events:
        breaches.append(f"{result['pending_events']} feed events wait to be indexed "
                        f"(> {max_pending_events})")
    if result["oldest_pending_age_s"] > max_lag_s:
        breaches.append(f"the oldest waiting event is {result['oldest_pending_age_s']:.0f} s "
                        f"old (> {max_lag_s:.0f} s)")
    if breaches:
        raise HealthBreach("ingest lags: " + "; ".join(breaches))
    return {"ok": True, **result}
