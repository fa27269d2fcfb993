"""One catalog treatment: the rollout's re-embed, `loupe serve`'s index build, streaming
ingest and evaluation with the serving detector turn the same photo into the same vector
for one model version and detector.

Real exports (the frozen pretrained embedder, the tiny detector trained once per session),
real index build, canary, cutover, change feed and delta log; the registered versions are
placed where `pipelines.registry.fetch_registered` keeps its fetched copies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

MODEL = "loupe-embedder/1"
DETECTOR = "loupe-detector/1"
TREATMENT = {"detector_version": DETECTOR, "pick_policy": "salient>whole"}
PARAMS = Path(__file__).parents[2] / "params.yaml"


def test_rollout_serve_and_ingest_give_a_photo_the_same_vector(tiny_world, tiny_detector,
                                                                tmp_path, monkeypatch):
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines.embed import embed_fn_from_export, load_embeddings, reembed
    from pipelines.index import IndexParams
    from pipelines.ingest import ChangeFeed, FeedEvent, ingest_micro_batch
    from pipelines.rollout import catalog_embed_fn
    from pipelines.run_config import LoupeConfig
    from pipelines.serve import ServePaths, index_for_model
    from serving.shards import layout, pointer
    from serving.shards.delta import DeltaLog

    embedder_dir = export_embedder(frozen_baseline(EmbedderSpec(seed=0)).eval(),
                                   tmp_path / "embedder")
    # loupe serve: detect -> pick -> crop -> embed, build, canary, cut over
    paths = ServePaths(tmp_path / "serve")
    live = index_for_model(tiny_world, paths, MODEL, embedder_dir, tiny_detector.export_dir,
                           DETECTOR, IndexParams.load())
    served = load_embeddings(paths.embeddings(MODEL, DETECTOR))
    assert served.treatment == TREATMENT
    manifest = layout.read_manifest(layout.version_dir(paths.index_root, live))
    assert manifest["treatment"] == TREATMENT

    # the rollout: the plan's treatment, the registered exports as fetched
    cfg = LoupeConfig(loupe_root=str(tmp_path), params_file=str(PARAMS),
                      world_root=str(tiny_world), runs_dir=str(tmp_path / "runs"),
                      index_root=str(paths.index_root),
                      mlflow_tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}",
                      change_feed=str(tmp_path / "feed.sqlite"),
                      triton_repo=str(tmp_path / "triton"))
    shutil.copytree(embedder_dir, cfg.models_dir / "loupe-embedder-1")
    shutil.copytree(tiny_detector.export_dir, cfg.models_dir / "loupe-detector-1")
    rolled_dir = tmp_path / "rollout-embeddings"
    for partition in range(2):  # one mapped task per partition, as the DAG runs them
        reembed(tiny_world, MODEL, catalog_embed_fn(cfg, MODEL, TREATMENT), rolled_dir,
                [partition], 16, n_partitions=2, validate=False, show_progress=False)
    rolled = load_embeddings(rolled_dir)
    assert rolled.treatment == TREATMENT
    np.testing.assert_array_equal(rolled.item_ids, served.item_ids)
    np.testing.assert_array_equal(rolled.vectors, served.vectors)

    # streaming ingest: re-listed photos on the live index get its treatment
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet").sort_values("item_id")
    relisted = catalog.iloc[::7]
    feed = ChangeFeed(Path(cfg.change_feed))
    feed.append([FeedEvent("updated", r.item_id, r.image_path)
                 for r in relisted.itertuples(index=False)])
    feed.close()
    result = ingest_micro_batch(cfg, max_seconds=120)
    assert (result["upserts"], result["pending_events"]) == (len(relisted), 0)
    delta = DeltaLog(paths.index_root / layout.DELTA_DB, create=False)
    try:
        ingested = {r.item_id: r.vector for r in delta.rows_after(0)}
    finally:
        delta.close()
    row_of = {item: i for i, item in enumerate(served.item_ids)}
    np.testing.assert_array_equal(np.stack([ingested[i] for i in relisted["item_id"]]),
                                  served.vectors[[row_of[i] for i in relisted["item_id"]]])
    assert pointer.read(paths.index_root) == live

    # evaluation with the serving detector scores the vectors the index holds
    from pipelines.evaluate import evaluation_embed_fn

    evaluated = evaluation_embed_fn(embedder_dir, tiny_world, 16,
                                    (tiny_detector.export_dir, DETECTOR))(
        relisted["image_path"].tolist(), None)
    np.testing.assert_array_equal(evaluated,
                                  served.vectors[[row_of[i] for i in relisted["item_id"]]])

    # the treatment matters: where the detector finds the object, the whole-photo vector
    # (what the rollout and ingest stored before) is another vector
    photos = relisted["image_path"].tolist()
    cropped = (catalog_embed_fn(cfg, MODEL, TREATMENT).boxes(photos)
               != [0.0, 0.0, 1.0, 1.0]).any(axis=1)
    whole = embed_fn_from_export(embedder_dir, tiny_world)(photos, None)
    cos = (whole * served.vectors[[row_of[i] for i in relisted["item_id"]]]).sum(axis=1)
    assert cropped.sum() >= 8  # 12 of the 31 re-listed photos (the seeded tiny detector)
    assert cos[cropped].max() < 0.95
    assert cos[~cropped].min() > 0.9999

    # `loupe embed --model`: a registered embedder from the command line (issue 16), the
    # same treatment and vectors; fetched copies go under LOUPE_ROOT, not the checkout
    from pipelines import registry
    from pipelines.cli import main

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    run = registry.log_run(registry.RegistryConfig(uri), run_name="frozen", params={},
                           metrics={}, artifacts={}, model_files=sorted(embedder_dir.iterdir()))
    assert registry.register_model_version(registry.RegistryConfig(uri), run, 0.5,
                                           "fp").model_version == MODEL
    assert tiny_detector.register(uri) == DETECTOR
    monkeypatch.setenv("LOUPE_ROOT", str(tmp_path / "cli_root"))
    assert main(["embed", "--model", MODEL, "--tracking-uri", uri, "--world", str(tiny_world),
                 "--out", str(tmp_path / "cli-embeddings")]) == 0
    by_cli = load_embeddings(tmp_path / "cli-embeddings")
    assert by_cli.model_version == MODEL and by_cli.treatment == TREATMENT
    np.testing.assert_array_equal(by_cli.item_ids, served.item_ids)
    np.testing.assert_array_equal(by_cli.vectors, served.vectors)
    # `loupe ingest` without --attribute-vectors: the live index's registered model and
    # treatment, from the command line (the same feed: its offsets continue)
    feed = ChangeFeed(Path(cfg.change_feed))
    feed.append([FeedEvent("updated", r.item_id, r.image_path)
                 for r in relisted.itertuples(index=False)])
    feed.close()
    assert main(["ingest", "--feed", cfg.change_feed, "--index-root",
                 str(paths.index_root), "--world", str(tiny_world), "--tracking-uri", uri]) == 0
    delta = DeltaLog(paths.index_root / layout.DELTA_DB, create=False)
    try:
        rows = list(delta.rows_after(0))
    finally:
        delta.close()
    latest = {r.item_id: r for r in rows}  # rows come in sequence order
    assert len(rows) == 2 * len(relisted)
    assert {latest[i].model_version for i in relisted["item_id"]} == {MODEL}
    np.testing.assert_array_equal(np.stack([latest[i].vector for i in relisted["item_id"]]),
                                  served.vectors[[row_of[i] for i in relisted["item_id"]]])
