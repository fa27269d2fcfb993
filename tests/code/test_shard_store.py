"""Shard store: hot-swap under concurrent queries, rollback from warm, version guard."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, write_manifest
from serving.shards import NotReady, ShardIndex, ShardStore, VersionMismatch, layout
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover, rollback

MODEL, OTHER = "attributes/0", "attributes/1"
PARAMS = IndexParams.load()


@pytest.fixture(scope="module")
def catalog(tiny_world) -> pd.DataFrame:
    return pd.read_parquet(tiny_world / "tables/catalog.parquet").sort_values("item_id")


@pytest.fixture(scope="module")
def vectors(catalog) -> dict[str, np.ndarray]:
    return {MODEL: attribute_vectors(catalog, seed=0), OTHER: attribute_vectors(catalog, seed=1)}


def _version(root: Path, tiny_world: Path, name: str, ids, vecs, model: str = MODEL) -> str:
    vdir = layout.version_dir(root, name)
    for s in range(PARAMS.n_shards):
        build_shard_from_arrays(np.asarray(ids), vecs, model, s, PARAMS, vdir)
    write_manifest(vdir, PARAMS.n_shards, {"test": True})
    assert canary(root, name, tiny_world, PARAMS.canary).passed
    return name


@pytest.fixture()
def two_versions(tmp_path, tiny_world, catalog, vectors):
    """Versions "a" and "b" over disjoint halves of the catalog (split by product, so each
    half keeps its same-product probes): any hit names the version it came from."""
    half = catalog["product_id"].map(lambda p: layout.stable_bucket(p, 2, "test")).to_numpy()
    items = {}
    for name, side in (("a", 0), ("b", 1)):
        keep = half == side
        _version(tmp_path, tiny_world, name, catalog["item_id"][keep], vectors[MODEL][keep])
        items[name] = set(catalog["item_id"][keep])
    return tmp_path, items


def test_store_serves_its_shard_of_the_live_version(two_versions, catalog, vectors):
    root, items = two_versions
    with pytest.raises(FileNotFoundError, match="not set"):
        ShardStore(root, 0, MODEL).load()
    cutover(root, "a")
    stores = [ShardStore(root, s, MODEL) for s in range(PARAMS.n_shards)]
    for store in stores:
        store.load()
    query = vectors[MODEL][catalog["item_id"].tolist().index(sorted(items["a"])[0])]
    results = [s.search(query, 5) for s in stores]
    assert {(r.index_version, r.model_version) for r in results} == {("a", MODEL)}
    top = max((h for r in results for h in r.hits), key=lambda h: h.score)
    assert top.item_id == sorted(items["a"])[0] and top.score == pytest.approx(1.0, abs=2e-3)
    for store, result in zip(stores, results, strict=True):
        assert all(layout.shard_of(h.item_id, PARAMS.n_shards) == store.shard_id
                   for h in result.hits)
    with pytest.raises(ValueError, match="query vectors must be"):
        stores[0].search(query[:10], 5)
    stores[0].start().start()  # a server may load() and then start(): one load, one watcher
    assert stores[0].swaps == 1 and stores[0].status()["warm_versions"] == []
    stores[0].stop()


def test_cutover_under_concurrent_queries_has_no_failed_or_mixed_answers(two_versions,
                                                                         catalog, vectors):
    root, items = two_versions
    cutover(root, "a")
    store = ShardStore(root, 0, MODEL, poll_s=0.01, keep_previous_s=60).start()
    queries = vectors[MODEL][:64]
    answers: list[tuple[str, str, list[str]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                r = store.search(queries[i % len(queries)], 10)
                answers.append((r.index_version, r.model_version, [h.item_id for h in r.hits]))
            except BaseException as err:  # noqa: BLE001 - every failure is counted
                failures.append(err)
            i += 1

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        moves = []
        for action in ("b", "rollback", "b", "rollback", "b"):
            time.sleep(0.25)
            n_before = len(answers)
            moves.append(rollback(root) if action == "rollback" else cutover(root, action))
            want = moves[-1]["to"]
            t0 = time.monotonic()
            while store.status()["index_version"] != want:
                assert time.monotonic() - t0 < 2.0, "store did not follow the pointer"
                time.sleep(0.005)
            assert len(answers) > n_before  # queries kept flowing across the swap
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.stop()
    assert failures == []
    assert len(answers) > 200
    seen = {v for v, _, _ in answers}
    assert seen == {"a", "b"}
    for version, model, hits in answers:
        assert model == MODEL and set(hits) <= items[version], "mixed-version answer"
    assert answers[-1][0] == "b"
    assert store.swaps == 6  # initial load + 5 pointer moves


def test_rollback_swaps_back_to_the_warm_version_without_reloading(two_versions, monkeypatch):
    root, _ = two_versions
    cutover(root, "a")
    store = ShardStore(root, 0, MODEL, keep_previous_s=60)
    loads = []
    real_load = ShardIndex.load.__func__
    monkeypatch.setattr(ShardIndex, "load", classmethod(
        lambda cls, *a, **k: loads.append(a[0].name) or real_load(cls, *a, **k)))
    store.load()
    cutover(root, "b")
    store.refresh()
    assert store.status()["warm_versions"] == ["a"] and loads == ["a", "b"]
    rollback(root)
    store.refresh()
    status = store.status()
    assert status["index_version"] == "a" and status["warm_versions"] == ["b"]
    assert loads == ["a", "b"]  # served from the warm copy


def test_previous_version_is_dropped_after_keep_time(two_versions):
    root, _ = two_versions
    cutover(root, "a")
    store = ShardStore(root, 0, MODEL, keep_previous_s=0.2)
    store.load()
    cutover(root, "b")
    store.refresh()
    assert store.status()["warm_versions"] == ["a"]
    time.sleep(0.25)
    store.refresh()
    assert store.status()["warm_versions"] == []


def test_version_guard(tmp_path, tiny_world, catalog, vectors):
    ids = catalog["item_id"]
    _version(tmp_path, tiny_world, "old", ids, vectors[MODEL])
    _version(tmp_path, tiny_world, "new", ids, vectors[OTHER], model=OTHER)
    cutover(tmp_path, "old")
    with pytest.raises(VersionMismatch, match="refusing to serve"):
        ShardStore(tmp_path, 0, OTHER).load()  # a server misconfigured at start fails fast
    with pytest.raises(NotReady):
        ShardStore(tmp_path, 0, OTHER).search(vectors[OTHER][0], 5)

    store = ShardStore(tmp_path, 0, MODEL, keep_previous_s=60)
    store.load()
    cutover(tmp_path, "new")  # the index moved to another model before the embedder did
    store.refresh()
    status = store.status()
    assert status["index_version"] == "old" and "new" in status["refused"]
    assert store.search(vectors[MODEL][0], 5).index_version == "old"
    with pytest.raises(VersionMismatch, match="attributes/1"):
        store.search(vectors[OTHER][0], 5, model_version=OTHER)

    store.expect_model_version(OTHER)  # the embedder switched: now the new index is served
    assert store.search(vectors[OTHER][0], 5).index_version == "new"
    # a query still embedded by the old model is answered by the warm old version, never
    # by the new one
    assert store.search(vectors[MODEL][0], 5, model_version=MODEL).index_version == "old"
    with pytest.raises(VersionMismatch):
        store.search(vectors[MODEL][0], 5, model_version="attributes/7")


def test_corrupted_version_is_refused_and_the_live_one_kept(two_versions):
    root, _ = two_versions
    cutover(root, "a")
    store = ShardStore(root, 0, MODEL)
    store.load()
    victim = layout.shard_dir(layout.version_dir(root, "b"), 0) / layout.INDEX_FILE
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-10])
    cutover(root, "b")
    store.refresh()
    status = store.status()
    assert status["index_version"] == "a" and "sha256" in status["refused"]["b"]
