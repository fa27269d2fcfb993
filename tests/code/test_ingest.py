"""Streaming inserts and deletes: change feed -> indexer -> delta log -> shard stores."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, compact, prune_delta, write_manifest
from pipelines.ingest import ChangeFeed, FeedEvent, StreamingIndexer, catalog_changes
from serving.shards import ShardStore, layout
from serving.shards.delta import DeltaLog
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover

MODEL = "attributes/0"
PARAMS = IndexParams.load()
N = PARAMS.n_shards


def path_vector(path: str) -> np.ndarray:
    """The stand-in embedder for new listings: a fixed unit vector per photo path."""
    seed = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return v / np.linalg.norm(v)


class PathEmbedder:
    """embed_fn that counts the photos it embedded and can die on a given call."""

    def __init__(self, die_on_call: int | None = None, delay_s: float = 0.0):
        self.calls = self.items = 0
        self.die_on_call, self.delay_s = die_on_call, delay_s

    def __call__(self, paths, boxes):
        self.calls += 1
        if self.calls == self.die_on_call:
            raise RuntimeError("embedder crashed mid-batch")
        time.sleep(self.delay_s)
        self.items += len(paths)
        return np.stack([path_vector(p) for p in paths])


@pytest.fixture(scope="module")
def catalog(tiny_world) -> pd.DataFrame:
    return pd.read_parquet(tiny_world / "tables/catalog.parquet").sort_values("item_id")


@pytest.fixture()
def live(tmp_path, tiny_world, catalog) -> Path:
    """An index root with a canary-passed base version live."""
    vdir = layout.version_dir(tmp_path, "base")
    vecs = attribute_vectors(catalog, seed=0)
    for s in range(N):
        build_shard_from_arrays(catalog["item_id"].to_numpy(), vecs, MODEL, s, PARAMS, vdir)
    write_manifest(vdir, N, {"test": True})
    assert canary(tmp_path, "base", tiny_world, PARAMS.canary).passed
    cutover(tmp_path, "base")
    return tmp_path


def _stores(root: Path, poll_s: float = 0.05) -> list[ShardStore]:
    return [ShardStore(root, s, MODEL, poll_s=poll_s).start() for s in range(N)]


def _search(stores, item_id: str, vector: np.ndarray, k: int = 10):
    return stores[layout.shard_of(item_id, N)].search(vector, k).hits


def _new(i: int) -> FeedEvent:
    return FeedEvent("new", f"new{i:05d}", f"images/new/new{i:05d}.jpg")


def _wait(predicate, limit_s: float = 2.0) -> float:
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > limit_s:
            return float("inf")
        time.sleep(0.005)
    return time.perf_counter() - t0


def test_insert_visible_and_delete_hidden_within_2s(live, tmp_path, catalog):
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    indexer = StreamingIndexer(feed, live, PathEmbedder(), MODEL, batch_size=16)
    stop = threading.Event()
    worker = threading.Thread(target=indexer.run, args=(stop, 0.05))
    stores = _stores(live)
    worker.start()
    latencies = []
    try:
        for i in range(5):  # new listings become searchable
            e = _new(i)
            feed.append([e])
            vec = path_vector(e.image_path)
            latencies.append(_wait(lambda e=e, vec=vec: any(
                h.item_id == e.item_id for h in _search(stores, e.item_id, vec, 1))))
        vecs = attribute_vectors(catalog, seed=0)
        for row in (3, 50, 120):  # sold-out and removed listings disappear
            item = catalog["item_id"].iloc[row]
            assert _search(stores, item, vecs[row])[0].item_id == item
            feed.append([FeedEvent("sold_out" if row % 2 else "removed", item)])
            latencies.append(_wait(lambda item=item, row=row: all(
                h.item_id != item for h in _search(stores, item, vecs[row]))))
        item = catalog["item_id"].iloc[7]  # a new photo: the new vector, never the old one
        feed.append([FeedEvent("updated", item, "images/new/replacement.jpg")])
        fresh = path_vector("images/new/replacement.jpg")
        latencies.append(_wait(lambda: _search(stores, item, fresh, 1)[0].item_id == item))
        stale = [h for h in _search(stores, item, vecs[7]) if h.item_id == item]
        assert all(h.score < 0.5 for h in stale)
    finally:
        stop.set()
        worker.join()
        for s in stores:
            s.stop()
    assert max(latencies) < 2.0, latencies
    assert sum(s.status()["delta_items"] for s in stores) == 6  # 5 new + 1 updated
    assert sum(s.status()["masked_base_items"] for s in stores) == 4  # 3 removed + 1 updated


def test_search_never_races_streaming_adds(live, tmp_path):
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    feed.append([_new(i) for i in range(400)])
    feed.append([FeedEvent("removed", f"new{i:05d}") for i in range(0, 400, 4)])
    store = ShardStore(live, 0, MODEL, poll_s=0.002).start()
    indexer = StreamingIndexer(feed, live, PathEmbedder(delay_s=0.005), MODEL, batch_size=8)
    probes = np.stack([path_vector(_new(i).image_path) for i in range(400)])
    failures, answers, stop = [], [0], threading.Event()

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                hits = store.search(probes[rng.integers(0, 400)], 10).hits
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True) and len(hits) == 10
                assert len({h.item_id for h in hits}) == 10  # never two copies of an item
                answers[0] += 1
            except BaseException as err:  # noqa: BLE001 - every failure is counted
                failures.append(err)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    try:
        indexer.run(until_caught_up=True)
        time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.stop()
    assert failures == [] and answers[0] > 100
    in_shard0 = {f"new{i:05d}" for i in range(400)
                 if i % 4 and layout.shard_of(f"new{i:05d}", N) == 0}
    assert store.status()["delta_items"] == len(in_shard0)


def test_churned_delta_items_answer_with_their_latest_photo_only(live, tmp_path):
    """Many updates of the same listings leave dead delta rows behind (compacted away):
    every listing is found once, by its newest photo, and deletes stay deleted."""
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    events = [FeedEvent("updated" if r else "new", f"new{i:05d}", f"images/new/{i}-{r}.jpg")
              for r in range(12) for i in range(30)]
    events += [FeedEvent("removed", f"new{i:05d}") for i in range(0, 30, 3)]
    feed.append(events)
    StreamingIndexer(feed, live, PathEmbedder(), MODEL, batch_size=7).run(until_caught_up=True)
    stores = _stores(live)
    for s in stores:
        s.stop()
    for i in range(30):
        item = f"new{i:05d}"
        latest = _search(stores, item, path_vector(f"images/new/{i}-11.jpg"))
        older = _search(stores, item, path_vector(f"images/new/{i}-5.jpg"))
        assert [h.item_id for h in latest].count(item) == (0 if i % 3 == 0 else 1)
        assert latest[0].item_id == item or i % 3 == 0
        assert all(h.score < 0.5 for h in older if h.item_id == item)
    assert sum(s.status()["delta_items"] for s in stores) == 20


def _expected_live(events: list[FeedEvent]) -> set[str]:
    state: dict[str, bool] = {}
    for e in events:
        state[e.item_id] = e.op in ("new", "updated")
    return {i for i, alive in state.items() if alive}


def _visible_new_items(root: Path, events: list[FeedEvent]) -> set[str]:
    """Items a fresh store finds as the top hit for their latest photo's vector."""
    stores = [ShardStore(root, s, MODEL) for s in range(N)]
    for store in stores:
        store.load()
    latest = {e.item_id: e.image_path for e in events if e.image_path}
    return {item for item, path in latest.items()
            if _search(stores, item, path_vector(path), 1)[0].item_id == item}


def _events() -> list[FeedEvent]:
    events = [_new(i) for i in range(60)]
    events += [FeedEvent("removed", f"new{i:05d}") for i in range(0, 60, 5)]
    events += [_new(i) for i in range(0, 20, 2)]  # re-delivered or re-listed: idempotent
    events += [FeedEvent("updated", f"new{i:05d}", f"images/new/v2-{i}.jpg") for i in (1, 3)]
    return events


def test_indexer_crash_mid_batch_loses_and_duplicates_nothing(live, tmp_path):
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    events = _events()
    feed.append(events)
    crashing = StreamingIndexer(feed, live, PathEmbedder(die_on_call=3), MODEL, batch_size=16)
    with pytest.raises(RuntimeError, match="crashed mid-batch"):
        crashing.run(until_caught_up=True)
    assert crashing.stats.batches == 2
    crashing.close()
    delta = DeltaLog(live / layout.DELTA_DB)
    assert delta.checkpoint("indexer") == 32 and delta.count() == 32  # two whole batches

    embedder = PathEmbedder()
    restarted = StreamingIndexer(feed, live, embedder, MODEL, batch_size=16)
    stats = restarted.run(until_caught_up=True)
    assert stats.events == len(events) - 32 and embedder.items == stats.upserts
    assert delta.checkpoint("indexer") == feed.last_offset() == len(events)
    offsets = [r.feed_offset for r in delta.rows_after(0)]
    assert len(offsets) == len(set(offsets))  # no event applied twice
    assert _visible_new_items(live, events) == _expected_live(events)


_SLOW_INDEXER = """
import hashlib, sys, time
import numpy as np
from pipelines.ingest import ChangeFeed, StreamingIndexer
def embed(paths, boxes):
    time.sleep(0.1)
    out = []
    for p in paths:
        seed = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)
StreamingIndexer(ChangeFeed(sys.argv[1]), sys.argv[2], embed, "attributes/0",
                 batch_size=4).run(poll_s=0.05)
"""


def test_sigkilled_indexer_restarts_with_exact_counts(live, tmp_path):
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    events = _events()
    feed.append(events)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INDEXER, str(feed.path), str(live)],
                            cwd=Path(__file__).parents[2])
    delta = DeltaLog(live / layout.DELTA_DB)
    assert _wait(lambda: delta.checkpoint("indexer") >= 12, limit_s=30) < 30
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = delta.checkpoint("indexer")
    assert 12 <= killed_at < len(events)
    stats = StreamingIndexer(feed, live, PathEmbedder(), MODEL, batch_size=4).run(
        until_caught_up=True)
    assert stats.events == len(events) - killed_at
    offsets = [r.feed_offset for r in delta.rows_after(0)]
    assert len(offsets) == len(set(offsets))
    assert _visible_new_items(live, events) == _expected_live(events)


def test_compaction_folds_delta_drops_tombstones_then_canary_and_cutover(live, tmp_path,
                                                                         tiny_world, catalog):
    feed = ChangeFeed(tmp_path / "feed.sqlite")
    removed = catalog["item_id"].iloc[::10].tolist()
    feed.append([_new(i) for i in range(30)] + [FeedEvent("removed", i) for i in removed])
    StreamingIndexer(feed, live, PathEmbedder(), MODEL).run(until_caught_up=True)
    stores = [ShardStore(live, s, MODEL, keep_previous_s=60) for s in range(N)]
    for s in stores:
        s.load()
    queries = np.concatenate([attribute_vectors(catalog.iloc[:40], seed=0),
                              np.stack([path_vector(_new(i).image_path) for i in range(30)])])
    before = [sorted(h.item_id for st in stores for h in st.search(q, 10).hits) for q in queries]

    vdir = compact(live, PARAMS)
    manifest = layout.read_manifest(vdir)
    assert manifest["count"] == len(catalog) + 30 - len(removed)
    assert manifest["source"]["tombstones_dropped"] == len(removed)
    assert manifest["source"]["delta_upserts_folded"] == 30
    assert manifest["delta_seq"] == DeltaLog(live / layout.DELTA_DB).max_seq()
    assert canary(live, vdir.name, tiny_world, PARAMS.canary).passed
    cutover(live, vdir.name)
    for s in stores:
        s.refresh()
        status = s.status()
        assert status["index_version"] == vdir.name
        assert status["delta_items"] == status["masked_base_items"] == 0
    after = [sorted(h.item_id for st in stores for h in st.search(q, 10).hits) for q in queries]
    # the same answers, now without a delta: the rebuilt HNSW graph may swap a near-tie
    # neighbour (1 of 1,400 at efSearch 32), never an upsert or a removed item
    same = np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(after, before, strict=True)])
    assert same >= 0.99, same
    upserts_found = {i for b in before for i in b if i.startswith("new")}
    assert len(upserts_found) == 30 and upserts_found <= {i for a in after for i in a}
    assert not set(removed) & {i for b in after for i in b}
    assert prune_delta(live) == 0  # the previous version still needs every row

    feed.append([_new(100)])  # streaming goes on on top of the compacted version
    StreamingIndexer(feed, live, PathEmbedder(), MODEL).run(until_caught_up=True)
    for s in stores:
        s.refresh()
    assert sum(s.status()["delta_items"] for s in stores) == 1


def test_catalog_diff_becomes_feed_events(catalog):
    before = catalog.iloc[:6].copy()
    after = before.copy()
    after.loc[after.index[0], "available"] = False  # sold out
    after.loc[after.index[1], "image_path"] = "images/catalog/new-photo.jpg"  # new photo
    after = after.drop(after.index[2])  # delisted
    extra = catalog.iloc[6:7].assign(available=True)  # new listing
    after = pd.concat([after, extra])
    before.loc[before.index[3], "available"] = False  # back in stock in `after`
    after.loc[after.index[2], "available"] = True
    got = {(e.op, e.item_id) for e in catalog_changes(before, after)}
    ids = catalog["item_id"].tolist()
    assert got == {("sold_out", ids[0]), ("updated", ids[1]), ("removed", ids[2]),
                   ("updated", ids[3]), ("new", ids[6])}
    with pytest.raises(ValueError, match="needs an image_path"):
        FeedEvent("new", "x")
    with pytest.raises(ValueError, match="feed op"):
        FeedEvent("deleted", "x")
