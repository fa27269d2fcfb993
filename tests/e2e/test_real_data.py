"""Real photographs through the index path on a catalog with one listing per product:
import -> embed (frozen pretrained baseline) -> build -> canary -> cutover (issue 16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines.embed import embed_fn_from_export, reembed
from pipelines.import_catalog import ImportConfig, run_import
from pipelines.index import CanaryFailed, IndexParams, build_index, canary, publish
from pipelines.train import export_baseline
from serving.shards import pointer

pytestmark = pytest.mark.e2e
BASELINE = "frozen/efficientnet-lite0"


@pytest.fixture(scope="module")
def real_world(real_photos, tmp_path_factory) -> Path:
    """A world imported from real photographs: one listing per product, no scenes/boards."""
    root = tmp_path_factory.mktemp("real")
    rows = []
    for i, (name, (path, category)) in enumerate(sorted(real_photos.items())):
        (root / "photos").mkdir(exist_ok=True)
        shutil.copy(path, root / "photos" / name)
        rows.append({"item_id": f"sku-{i:03d}", "image_path": name, "category": category,
                     "price": 10 + i, "available": True, "region": "eu"})
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    run_import(ImportConfig(root / "photos", root / "catalog.csv", root / "world"))
    return root / "world"


@pytest.fixture(scope="module")
def embedded(real_world, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("embedded")
    export = export_baseline(work / "frozen")
    reembed(real_world, BASELINE, embed_fn_from_export(export, real_world), work / "emb",
            n_partitions=2, show_progress=False)
    return export, work / "emb"


def test_one_listing_catalog_canaries_on_self_and_reshot_probes(real_world, embedded,
                                                                tmp_path):
    """Issue 16: the canary failed 'no product has two listings', so nothing could go live.
    Each listing's jittered vector and an off-centre crop of its real photo must find it."""
    export, emb = embedded
    params = IndexParams.load()
    verdict = publish(emb, tmp_path / "index", real_world, params,
                      query_embed_fn=embed_fn_from_export(export, real_world),
                      expected_model_version=BASELINE)
    m = verdict.metrics
    assert verdict.passed and m["probe_kind"] == "self", verdict.reasons
    assert m["n_probes"] == m["n_reshot_probes"] == m["items"] == 16
    assert m["self_recall"] == 1.0 and m["exact_overlap"] >= 0.9
    assert m["reshot_recall"] >= m["reshot_recall_floor"] == 0.95  # 16 items: 5 x random
    assert pointer.read(tmp_path / "index") == verdict.index_version


def test_reshot_probes_catch_a_query_model_that_disagrees_with_the_index(real_world,
                                                                         embedded, tmp_path):
    """Vectors of one model and queries of another: the self probes pass (the index is
    intact), the re-shot probes fail, and nothing goes live."""
    from pipelines.embed import attribute_embed_fn

    _, emb = embedded
    params = IndexParams.load()
    vdir = build_index(emb, tmp_path / "index", params)
    other = attribute_embed_fn(real_world, 0)  # a different "model" for the queries
    verdict = canary(tmp_path / "index", vdir.name, real_world, params.canary,
                     query_embed_fn=lambda paths, boxes: other(paths, None))
    assert verdict.metrics["self_recall"] == 1.0
    assert not verdict.passed and any("re-shot" in r for r in verdict.reasons)
    with pytest.raises(CanaryFailed, match="re-shot"):
        publish(emb, tmp_path / "index2", real_world, params,
                query_embed_fn=lambda paths, boxes: other(paths, None))
    assert pointer.read(tmp_path / "index2") is None


def test_real_photo_shop_runs_every_stage(tmp_path):
    """Issue 16's run (bench/real_data.py, reports/real_data.json): a shop export of real
    photographs, one listing per product, 12-slot grids, category-level judgments, no scenes
    or boards, no truth/: import -> validate -> harvest -> train -> evaluate -> embed -> build
    -> canary -> cutover, with nothing NaN, empty or silently dropped on the way."""
    import numpy as np

    from bench.real_data import GRID, RATER_QUERIES, REAL_PHOTOS, SESSIONS, run

    report = run(tmp_path, max_epochs=3)
    assert report["import"]["rows"]["catalog"] == len(REAL_PHOTOS)
    assert report["import"]["rows"]["impressions"] == SESSIONS * GRID
    assert report["import"]["refused"] == {"catalog": {"photo file missing": 1,
                                                      "price is empty": 1}}
    assert all(report["validate"].values())
    assert any("read as UTC" in c for c in report["import"]["coerced"])
    harvest = report["harvest"]
    assert harvest["propensity_depth"] == GRID and harvest["randomised_sessions"] >= 100
    theta = np.asarray(harvest["theta"])
    assert np.isfinite(theta).all() and theta[0] == 1.0 and (np.diff(theta) <= 0).all()
    assert sum(harvest["sessions_by_fate"].values()) == SESSIONS
    assert harvest["products_by_split"]["val"] >= 1 and harvest["pairs_by_split"]["train"] > 50
    assert report["train"]["best_epoch"] is not None
    assert report["evaluate"]["baseline_recall_at_10"] > 0
    assert report["model_version"] == "loupe-embedder/1" and report["promoted"]
    canary = report["canary"]
    assert canary["passed"] and canary["metrics"]["probe_kind"] == "self"
    assert canary["metrics"]["n_rater_probes"] == len(RATER_QUERIES)
    assert report["live_index"]
