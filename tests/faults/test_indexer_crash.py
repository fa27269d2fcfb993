"""kill -9 the streaming indexer mid-batch, again and again, while the change feed grows;
restart it each time: no insert, update or delete is lost and none is applied twice.

Workers are forked from a warm "zygote" process (each restart costs milliseconds) and run
`StreamingIndexer.run` over the real change feed and delta log (SQLite, WAL). Two kinds of
kills: after a random delay, and deterministically inside the delta transaction (a SQLite
trace callback SIGKILLs the worker as its k-th COMMIT starts, after the batch's rows are
inserted). Each worker logs "step" / "stepped" around every batch, so a kill between the
two landed mid-batch.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, write_manifest
from pipelines.ingest import ChangeFeed, FeedEvent
from serving.shards import ShardStore, layout
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover

pytestmark = [pytest.mark.faults, pytest.mark.slow]
MODEL = "attributes/0"
PARAMS = IndexParams.load()
RANDOM_KILLS, COMMIT_KILLS, ROUNDS_EVENTS = 12, 6, 120

_ZYGOTE = r"""
import hashlib, os, signal, sys, time
import numpy as np
from pipelines.ingest import ChangeFeed, StreamingIndexer

feed_path, root, phases = sys.argv[1], sys.argv[2], sys.argv[3]
signal.signal(signal.SIGCHLD, signal.SIG_IGN)

def phase(name):
    fd = os.open(phases, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (name + "\n").encode())
    os.close(fd)

def embed(paths, boxes):
    time.sleep(0.002 * len(paths))  # a model's cost per photo keeps batches in flight
    out = []
    for p in paths:
        seed = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)

def work(mode, k):
    indexer = StreamingIndexer(ChangeFeed(feed_path), root, embed, "attributes/0",
                               batch_size=16)
    if mode == "commit":
        commits = [0]
        def trace(sql):
            if sql.strip().upper() == "COMMIT":
                commits[0] += 1
                if commits[0] == k:
                    phase("commit-kill")
                    os.kill(os.getpid(), signal.SIGKILL)
        indexer.delta._db.set_trace_callback(trace)
    step = indexer.step
    def logged_step():
        phase("step")
        n = step()
        phase("stepped")
        return n
    indexer.step = logged_step
    indexer.run(poll_s=0.005, until_caught_up=(mode == "catchup"))
    phase("caught-up")

print("ready", flush=True)
for line in sys.stdin:
    mode, k = line.split()
    pid = os.fork()
    if pid == 0:
        work(mode, int(k))
        os._exit(0)
    print(pid, flush=True)
"""


def path_vector(path: str) -> np.ndarray:
    """The workers' embedder, recomputed here to check stored vectors."""
    seed = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture()
def live(tmp_path, tiny_world) -> tuple[Path, pd.DataFrame]:
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet").sort_values("item_id")
    root = tmp_path / "index"
    vdir = layout.version_dir(root, "base")
    vecs = attribute_vectors(catalog, seed=0)
    for s in range(PARAMS.n_shards):
        build_shard_from_arrays(catalog["item_id"].to_numpy(), vecs, MODEL, s, PARAMS, vdir)
    write_manifest(vdir, PARAMS.n_shards, {"fault": "indexer"})
    assert canary(root, "base", tiny_world, PARAMS.canary).passed
    cutover(root, "base")
    return root, catalog


def _round(rng: random.Random, r: int, catalog: pd.DataFrame) -> list[FeedEvent]:
    """New listings, new photos of earlier ones, and removals (new and catalog items)."""
    events = [FeedEvent("new", f"new{r:02d}{i:03d}", f"images/new/{r}-{i}.jpg")
              for i in range(ROUNDS_EVENTS // 2)]
    for _ in range(ROUNDS_EVENTS // 4):
        q, i = rng.randrange(r + 1), rng.randrange(ROUNDS_EVENTS // 2)
        events.append(FeedEvent("updated", f"new{q:02d}{i:03d}", f"images/new/{q}-{i}-r{r}.jpg"))
    for _ in range(ROUNDS_EVENTS // 8):
        q, i = rng.randrange(r + 1), rng.randrange(ROUNDS_EVENTS // 2)
        events.append(FeedEvent(rng.choice(["removed", "sold_out"]), f"new{q:02d}{i:03d}"))
    events += [FeedEvent("removed", str(catalog["item_id"].iloc[rng.randrange(len(catalog))]))
               for _ in range(ROUNDS_EVENTS // 8)]
    rng.shuffle(events)
    return events


def test_kill9_indexer_mid_batch_then_restart_loses_and_duplicates_nothing(live, tmp_path,
                                                                           counts):
    root, catalog = live
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    phases = tmp_path / "phases.log"
    rng = random.Random(9)
    counts.tried(f"{RANDOM_KILLS} SIGKILLs of the indexer after random delays and "
                 f"{COMMIT_KILLS} inside the delta transaction (at a COMMIT), each followed "
                 f"by a restart, while {ROUNDS_EVENTS} feed events arrive per kill; then a "
                 "final restart catches up")
    zygote = subprocess.Popen(
        [sys.executable, "-c", _ZYGOTE, str(feed.path), str(root), str(phases)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2], env={**os.environ, "OMP_NUM_THREADS": "1"})

    def start(mode: str, k: int = 0) -> int:
        phases.write_text("")
        zygote.stdin.write(f"{mode} {k}\n")
        zygote.stdin.flush()
        return int(zygote.stdout.readline())

    def wait_gone(pid: int, limit_s: float = 60.0) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            assert time.monotonic() < deadline, f"indexer {pid} did not stop"
            time.sleep(0.002)

    events: list[FeedEvent] = []
    mid_batch = in_transaction = 0
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for i in range(RANDOM_KILLS + COMMIT_KILLS):
            batch = _round(rng, i, catalog)
            feed.append(batch)
            events += batch
            if i < RANDOM_KILLS:
                pid = start("random")
                time.sleep(rng.uniform(0.05, 0.4))
                os.kill(pid, signal.SIGKILL)
            else:  # dies as its 1st..3rd COMMIT starts, the batch's rows inserted
                pid = start("commit", 1 + i % 3)
            wait_gone(pid)
            entered = phases.read_text().split()
            mid_batch += bool(entered) and entered[-1] in ("step", "commit-kill")
            in_transaction += bool(entered) and entered[-1] == "commit-kill"
        wait_gone(start("catchup", 0))
        assert phases.read_text().split()[-1] == "caught-up"
    finally:
        zygote.kill()
        zygote.wait()

    # the log: checkpoint at the feed's end, each offset at most once, and every item's
    # newest delta row is its newest feed event (op, and the vector of its newest photo)
    db = sqlite3.connect(root / layout.DELTA_DB)
    checkpoint = db.execute("SELECT feed_offset FROM checkpoint").fetchone()[0]
    offsets = [o for (o,) in db.execute("SELECT feed_offset FROM delta")]
    newest = {item: (op, blob) for item, op, blob in db.execute(
        "SELECT item_id, op, vector FROM delta d WHERE seq = "
        "(SELECT MAX(seq) FROM delta WHERE item_id = d.item_id)")}
    db.close()
    last: dict[str, FeedEvent] = {}
    for e in events:
        last[e.item_id] = e
    alive = {item: e.image_path for item, e in last.items() if e.op in ("new", "updated")}
    lost = []
    for item, e in last.items():
        op, blob = newest.get(item, (None, None))
        if item in alive:
            if op != "upsert" or not np.allclose(np.frombuffer(blob, np.float32),
                                                 path_vector(e.image_path), atol=1e-6):
                lost.append(item)
        elif op != "delete":
            lost.append(item)
    duplicated_offsets = len(offsets) - len(set(offsets))

    # what a freshly started shard store serves: every live listing once, by its newest
    # photo; every removed one gone
    stores = [ShardStore(root, s, MODEL) for s in range(PARAMS.n_shards)]
    for store in stores:
        store.load()
    not_found, duplicated_hits, resurrected = [], [], []
    base = dict(zip(catalog["item_id"], attribute_vectors(catalog, seed=0), strict=True))
    photo = {e.item_id: e.image_path for e in events if e.image_path}  # newest photo
    for item in last:
        store = stores[layout.shard_of(item, PARAMS.n_shards)]
        vector = path_vector(photo[item]) if item in photo else base[item]
        hits = [h.item_id for h in store.search(vector, 10).hits]
        if len(hits) != len(set(hits)):
            duplicated_hits.append(item)
        if item in alive and (not hits or hits[0] != item):
            not_found.append(item)
        if item not in alive and item in hits:
            resurrected.append(item)
    counts.add(indexer_crash_kills=RANDOM_KILLS + COMMIT_KILLS,
               indexer_crash_kills_mid_batch=mid_batch,
               indexer_crash_kills_in_transaction=in_transaction,
               indexer_crash_feed_events=len(events), indexer_crash_items=len(last),
               indexer_crash_lost=len(lost) + len(not_found) + len(resurrected),
               indexer_crash_duplicated=duplicated_offsets + len(duplicated_hits))
    assert checkpoint == feed.last_offset() == len(events)
    assert lost == [] and not_found == [] and resurrected == [], (lost, not_found, resurrected)
    assert duplicated_offsets == 0 and duplicated_hits == []
    assert in_transaction == COMMIT_KILLS and mid_batch >= COMMIT_KILLS + RANDOM_KILLS // 2
    feed.close()
