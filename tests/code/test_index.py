"""Shard builds, manifest, canary, cutover and rollback."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import cli
from pipelines.embed import attribute_embed_fn, attribute_vectors, reembed
from pipelines.index import (
    CanaryParams,
    IndexParams,
    build_index,
    build_shard,
    canary,
    new_version_id,
    write_manifest,
)
from serving.shards import ShardIndex, layout, pointer
from serving.shards.kinds import build_shard_from_arrays, load_version, search_shards
from serving.shards.pointer import cutover, index_status, rollback

MODEL = "attributes/0"
PARAMS = IndexParams.load()  # the defaults in params.yaml


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact,
                                                                         strict=True)]))


def _noisy(vectors: np.ndarray, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = vectors + scale * rng.standard_normal(vectors.shape).astype(np.float32) / 16
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, n_clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres with a spread that keeps neighbours close."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, 256)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)] + \
        0.08 * rng.standard_normal((n, 256)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog(tiny_world) -> pd.DataFrame:
    return pd.read_parquet(tiny_world / "tables/catalog.parquet").sort_values("item_id")


@pytest.fixture(scope="module")
def vectors(catalog) -> np.ndarray:
    return attribute_vectors(catalog, seed=0)


def _build(root: Path, ids, vecs, model=MODEL, params=PARAMS, version=None) -> str:
    vdir = layout.version_dir(root, version or new_version_id(model))
    for s in range(params.n_shards):
        build_shard_from_arrays(np.asarray(ids), vecs, model, s, params, vdir)
    write_manifest(vdir, params.n_shards, {"test": True})
    return vdir.name


# --------------------------------------------------------------------------- builds
def test_per_shard_recall_at_10_vs_exact_on_tiny_world(tmp_path, catalog, vectors):
    version = _build(tmp_path, catalog["item_id"], vectors)
    manifest, shards = load_version(tmp_path, version)
    assert manifest["kind"] == "hnsw_fp16" and len(shards) == PARAMS.n_shards
    for shard in shards:
        own = np.asarray(shard.vectors)
        queries = _noisy(own, 0.5, seed=shard.shard_id)
        _, labels = shard.search(queries, 10)
        recall = _recall(labels, _exact(own, queries, 10))
        assert recall >= 0.95, (shard.shard_id, recall)


def test_hnsw_fp16_on_20k_vectors_recall_and_bytes(tmp_path):
    x = _clustered(20000, 400, seed=0)
    ids = np.array([f"s{i:06d}" for i in range(len(x))])
    params = replace(PARAMS, n_shards=1)
    vdir = tmp_path / "v"
    meta = build_shard_from_arrays(ids, x, MODEL, 0, params, vdir)
    write_manifest(vdir, 1, {})
    shard = ShardIndex.load(vdir, 0, layout.read_manifest(vdir))
    queries = _noisy(x[::40], 1.0, seed=1)
    scores, labels = shard.search(queries, 10)
    recall = _recall(labels, _exact(x, queries, 10))
    assert recall >= 0.95, recall
    exact_scores = np.einsum("qkd,qd->qk", x[labels], queries)
    np.testing.assert_allclose(scores, exact_scores, atol=2e-3)  # fp16 storage, cosine scores
    bytes_per_vector = (vdir / "shard-000" / layout.INDEX_FILE).stat().st_size / len(x)
    assert 512 < bytes_per_vector <= 768, bytes_per_vector  # fp16 payload + graph links
    assert meta["count"] == len(x)


def test_ivfpq_rescores_candidates_exactly(tmp_path):
    x = _clustered(20000, 400, seed=2)
    ids = np.array([f"s{i:06d}" for i in range(len(x))])
    params = replace(PARAMS, kind="ivfpq", n_shards=1, ivf_nlist=128, nprobe=16)
    vdir = tmp_path / "v"
    build_shard_from_arrays(ids, x, MODEL, 0, params, vdir)
    write_manifest(vdir, 1, {})
    shard = ShardIndex.load(vdir, 0, layout.read_manifest(vdir))
    queries = _noisy(x[::40], 1.0, seed=3)
    scores, labels = shard.search(queries, 10)
    assert _recall(labels, _exact(x, queries, 10)) >= 0.95
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[labels], queries), atol=1e-5)
    assert (vdir / "shard-000" / layout.INDEX_FILE).stat().st_size / len(x) < 100
    with pytest.raises(ValueError, match="needs >= "):
        build_shard_from_arrays(ids[:500], x[:500], MODEL, 0, params, tmp_path / "small")


def test_shards_are_independent_units_with_stable_assignment(tmp_path, tiny_world, catalog):
    emb = tmp_path / "emb"
    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), emb, None, 64, n_partitions=2,
            validate=False, show_progress=False)
    vdir = layout.version_dir(tmp_path / "root", "v1")
    metas = [build_shard(emb, s, 2, PARAMS, vdir) for s in (1, 0)]  # any order, any process
    manifest = write_manifest(vdir, 2, {"embeddings_dir": str(emb)})
    assert sum(m["count"] for m in metas) == manifest["count"] == len(catalog)
    _, shards = load_version(tmp_path / "root", "v1")
    for shard in shards:
        assert all(layout.shard_of(i, 2) == shard.shard_id for i in shard.ids)
    assert sorted(np.concatenate([s.ids for s in shards])) == sorted(catalog["item_id"])
    again = build_index(emb, tmp_path / "root", PARAMS, "v2")
    assert [json.loads((again / f"shard-00{s}/shard.json").read_text())["count"]
            for s in (0, 1)] == [m["count"] for m in sorted(metas, key=lambda m: m["shard_id"])]


def test_manifest_is_last_checksummed_and_freezes_the_version(tmp_path, catalog, vectors):
    version = _build(tmp_path, catalog["item_id"], vectors)
    vdir = layout.version_dir(tmp_path, version)
    manifest = layout.read_manifest(vdir)
    assert manifest["model_version"] == MODEL and manifest["count"] == len(catalog)
    assert manifest["params"] == PARAMS.build_params() and manifest["index_version"] == version
    for shard in manifest["shards"]:
        for name, info in shard["files"].items():
            assert layout.sha256_file(layout.shard_dir(vdir, shard["shard_id"]) / name) == \
                info["sha256"]
    with pytest.raises(ValueError, match="immutable"):
        build_shard_from_arrays(catalog["item_id"].to_numpy(), vectors, MODEL, 0, PARAMS, vdir)
    with pytest.raises(ValueError, match="already has a manifest"):
        write_manifest(vdir, PARAMS.n_shards, {})
    victim = layout.shard_dir(vdir, 0) / layout.VECTORS_FILE
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_version(tmp_path, version)


def test_unfinished_and_mixed_versions_are_refused(tmp_path, catalog, vectors):
    vdir = layout.version_dir(tmp_path, "mixed")
    ids = catalog["item_id"].to_numpy()
    build_shard_from_arrays(ids, vectors, MODEL, 0, PARAMS, vdir)
    with pytest.raises(FileNotFoundError, match="shard 1 of 2 is not built"):
        write_manifest(vdir, 2, {})
    with pytest.raises(ValueError, match="refusing to add"):
        build_shard_from_arrays(ids, vectors, "attributes/1", 1, PARAMS, vdir)
    with pytest.raises(FileNotFoundError, match="not finalised"):
        load_version(tmp_path, "mixed")


# --------------------------------------------------------------------------- canary
def _rater_query_fn(world: Path, seed: int):
    """Query embedder of the attribute "model" `seed`: a rater photo embeds like a fresh
    listing of its target product (tests may read truth/)."""
    truth = pd.read_parquet(world / "truth/rater_queries.parquet")
    queries = pd.read_parquet(world / "tables/rater_queries.parquet").drop(
        columns="category").merge(truth)
    products = pd.read_parquet(world / "truth/products.parquet")
    rows = queries.merge(products, left_on="target_product_id", right_on="product_id")
    rows["item_id"] = rows["rater_query_id"]
    vecs = attribute_vectors(rows, seed=seed)
    row_of = {p: i for i, p in enumerate(rows["image_path"])}
    return lambda paths, boxes: vecs[[row_of[p] for p in paths]]


def test_canary_passes_a_good_version_and_rejects_shuffled_vectors(tmp_path, tiny_world,
                                                                   catalog, vectors):
    good = _build(tmp_path, catalog["item_id"], vectors)
    verdict = canary(tmp_path, good, tiny_world, PARAMS.canary, _rater_query_fn(tiny_world, 0),
                     expected_model_version=MODEL)
    assert verdict.passed, verdict.reasons
    assert verdict.metrics["probe_recall"] > 0.9 and verdict.metrics["exact_overlap"] > 0.95
    assert verdict.metrics["rater_recall"] > 0.5

    shuffled = np.random.default_rng(0).permutation(len(vectors))
    bad = _build(tmp_path, catalog["item_id"], vectors[shuffled])
    verdict = canary(tmp_path, bad, tiny_world, PARAMS.canary)
    assert not verdict.passed
    assert verdict.metrics["probe_recall"] < 0.2
    assert any("probe recall" in r for r in verdict.reasons)
    saved = json.loads(layout.verdict_path(tmp_path, bad).read_text())
    assert saved["passed"] is False and saved["reasons"] == verdict.reasons


def test_canary_rejects_another_models_vectors(tmp_path, tiny_world, catalog):
    """Mislabelled vectors of another model pass the same-product probes (they are
    self-consistent); the rater queries, embedded by the serving model, find nothing."""
    other = attribute_vectors(catalog, seed=1)
    mislabelled = _build(tmp_path, catalog["item_id"], other, model=MODEL)
    verdict = canary(tmp_path, mislabelled, tiny_world, PARAMS.canary,
                     _rater_query_fn(tiny_world, 0), expected_model_version=MODEL)
    assert not verdict.passed and verdict.metrics["probe_recall"] > 0.9
    assert verdict.metrics["rater_recall"] < 0.2
    assert verdict.reasons == [f"rater-set recall@10 {verdict.metrics['rater_recall']:.3f} "
                               "< 0.3"]

    labelled = _build(tmp_path, catalog["item_id"], other, model="attributes/1")
    verdict = canary(tmp_path, labelled, tiny_world, PARAMS.canary,
                     expected_model_version=MODEL)
    assert verdict.reasons == ["model version 'attributes/1' is not the expected "
                               "'attributes/0'"]


def test_canary_rejects_collapsed_and_unnormalised_embeddings(tmp_path, tiny_world, catalog,
                                                              vectors):
    direction = np.random.default_rng(0).standard_normal(vectors.shape[1]).astype(np.float32)
    collapsed = vectors + 4.0 * direction / np.linalg.norm(direction)
    collapsed /= np.linalg.norm(collapsed, axis=1, keepdims=True)
    version = _build(tmp_path, catalog["item_id"], collapsed.astype(np.float32))
    verdict = canary(tmp_path, version, tiny_world, PARAMS.canary)
    assert any("collapsed" in r for r in verdict.reasons), verdict.reasons

    version = _build(tmp_path, catalog["item_id"], 1.1 * vectors)
    verdict = canary(tmp_path, version, tiny_world, PARAMS.canary)
    assert any("norms span" in r for r in verdict.reasons), verdict.reasons


def test_canary_cli_exit_code(tmp_path, tiny_world, catalog, vectors):
    good = _build(tmp_path, catalog["item_id"], vectors)
    bad = _build(tmp_path, catalog["item_id"],
                 vectors[np.random.default_rng(1).permutation(len(vectors))])
    args = ["canary", "--index-root", str(tmp_path), "--world", str(tiny_world), "--version"]
    assert cli.main([*args, good]) == 0
    assert cli.main([*args, bad]) == 1


# --------------------------------------------------------------------------- cutover
def test_cutover_needs_a_passing_canary_and_rollback_is_one_step(tmp_path, tiny_world, catalog,
                                                                 vectors):
    ids = catalog["item_id"]
    canary_params = CanaryParams()
    v1, v2 = (_build(tmp_path, ids, vectors) for _ in range(2))
    bad = _build(tmp_path, ids, vectors[np.random.default_rng(0).permutation(len(vectors))])
    with pytest.raises(ValueError, match="no canary verdict"):
        cutover(tmp_path, v1)
    for v in (v1, v2, bad):
        canary(tmp_path, v, tiny_world, canary_params)
    with pytest.raises(ValueError, match="failed its canary"):
        cutover(tmp_path, bad)
    with pytest.raises(ValueError, match="no previous"):
        rollback(tmp_path)

    cutover(tmp_path, v1)
    assert pointer.read(tmp_path) == v1 and pointer.read(tmp_path, "previous") is None
    with pytest.raises(ValueError, match="already live"):
        cutover(tmp_path, v1)
    cutover(tmp_path, v2)
    assert (pointer.read(tmp_path), pointer.read(tmp_path, "previous")) == (v2, v1)
    assert (tmp_path / "current").is_symlink()
    assert layout.read_manifest(tmp_path / "current")["index_version"] == v2

    assert cli.main(["rollback", "--index-root", str(tmp_path)]) == 0
    assert pointer.read(tmp_path) == v1 and pointer.read(tmp_path, "previous") is None
    with pytest.raises(ValueError, match="no previous"):
        rollback(tmp_path)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("cutover", None, v1), ("cutover", v1, v2), ("rollback", v2, v1)]
    status = index_status(tmp_path)
    assert status["current"] == v1 and status["versions"][bad]["canary"] == "fail"


def test_end_to_end_cli_embed_build_canary_cutover(tmp_path, tiny_world):
    emb, root = tmp_path / "emb", tmp_path / "root"
    assert cli.main(["embed", "--world", str(tiny_world), "--out", str(emb),
                     "--attribute-vectors", "0"]) == 0
    assert cli.main(["build-index", "--embeddings", str(emb), "--index-root", str(root),
                     "--version", "v1"]) == 0
    assert cli.main(["canary", "--index-root", str(root), "--version", "v1", "--world",
                     str(tiny_world), "--expect-model", MODEL]) == 0
    assert cli.main(["cutover", "--index-root", str(root), "--version", "v1"]) == 0
    _, shards = load_version(root, pointer.read(root))
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    hits = search_shards(shards, attribute_vectors(catalog.iloc[:1], seed=0), 3)[0]
    assert hits[0][0] == catalog["item_id"].iloc[0]
    assert cli.main(["cutover", "--index-root", str(root), "--version", "nope"]) == 2
