"""Harvest: propensity recovery against the world's truth, IPS weights, leak-free splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts.constants import GRID_SIZE, RANKER_POLICY
from data_contracts.validation import ContractViolation
from pipelines.harvest import (
    HarvestConfig,
    _decreasing_isotonic,
    estimate_propensity,
    harvest,
    propensity_mae,
    write_report,
)


@pytest.fixture(scope="module")
def harvested(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest") / "h"
    return harvest(tiny_world, out, HarvestConfig(), quarantine_dir=out.parent / "q")


def _pairs(res, kind="debiased"):
    return pd.read_parquet(res.out_dir / f"pairs_{kind}.parquet")


def test_isotonic_hand_case():
    got = _decreasing_isotonic(np.array([1.0, 0.5, 0.7, 0.2]), np.ones(4))
    np.testing.assert_allclose(got, [1.0, 0.6, 0.6, 0.2])


def test_propensity_recovered_on_tiny_world(harvested, tiny_world):
    mae = propensity_mae(harvested.propensity, tiny_world / "truth/propensity.json")
    assert mae < 0.12  # 114 randomised sessions only; the demo world gets < 0.05
    theta = np.asarray(harvested.propensity.theta)
    assert theta[0] == 1.0 and np.all(np.diff(theta) <= 0)
    assert harvested.propensity.n_sessions > 50


def test_ips_weights_and_naive_mode(harvested):
    deb, naive = _pairs(harvested), _pairs(harvested, "naive")
    cfg = harvested.config
    engaged = deb[deb.source.isin(["click", "save"])]
    raw = np.minimum(np.where(engaged.source == "save", cfg.save_boost, 1.0)
                     / engaged["propensity"], cfg.weight_clip)
    # clipped IPS, self-normalised: mean 1 over engagement pairs, like the naive variant's
    np.testing.assert_allclose(engaged["weight"], raw / raw.mean())
    assert engaged["weight"].mean() == pytest.approx(1.0)
    clicks = deb[deb.source == "click"]
    assert (deb.loc[deb.source.isin(["cosave", "same_product"]), "weight"] == 1.0).all()
    # deeper clicks weigh more than clicks at the top
    assert clicks.loc[clicks.position >= 10, "weight"].mean() > clicks.loc[
        clicks.position == 1, "weight"].mean()
    # naive: identical rows and save boost, no propensity: the one difference is the correction
    assert naive.drop(columns="weight").equals(deb.drop(columns="weight"))
    naive_engaged = naive[naive.source.isin(["click", "save"])]
    boost = np.where(naive_engaged.source == "save", cfg.save_boost, 1.0)
    np.testing.assert_allclose(naive_engaged["weight"], boost / boost.mean())
    assert (naive.loc[naive.source.isin(["cosave", "same_product"]), "weight"] == 1.0).all()
    assert not deb.duplicated(["query_image_path", "item_id"]).any()
    assert set(deb["source"]) == {"click", "save", "cosave", "same_product"}


def test_splits_are_leak_free(harvested, tiny_world):
    deb = _pairs(harvested)
    cat = pd.read_parquet(tiny_world / "tables/catalog.parquet").set_index("item_id")
    truth_q = pd.read_parquet(tiny_world / "truth/queries.parquet").set_index("query_id")
    splits = pd.read_parquet(harvested.out_dir / "splits.parquet").set_index("product_id")
    rater_truth = pd.read_parquet(tiny_world / "truth/rater_queries.parquet")
    products = pd.read_parquet(tiny_world / "truth/products.parquet").set_index("product_id")
    held_clusters = set(rater_truth["cluster_id"])
    ev = pd.read_parquet(harvested.out_dir / "eval_engagement.parquet")

    deb["product"] = deb["item_id"].map(cat["product_id"])
    train, val = deb[deb.split == "train"], deb[deb.split == "val"]
    assert len(train) > 0 and len(val) > 0 and len(ev) > 0
    # no product on both sides, and no held-out product in training at all
    assert not set(train["product"]) & set(val["product"])
    assert splits.loc[list(set(deb["product"])), "split"].isin(["train", "val"]).all()
    assert not set(products.loc[list(set(train["product"])), "cluster_id"]) & held_clusters
    # no photo on both sides: query photos are disjoint, catalog photos follow their product
    assert not set(train["query_image_path"]) & set(val["query_image_path"])
    assert not set(deb["query_image_path"]) & set(ev["query_image_path"])
    # what a training query photo really shows (truth) is never a held-out product
    qids = train.loc[train.query_image_path.str.startswith("images/queries/"), "query_image_path"]
    targets = truth_q.loc[qids.str.extract(r"(q\d+)")[0], "target_product_id"]
    assert not set(products.loc[targets, "cluster_id"]) & held_clusters
    # time: evaluation queries postdate the training window
    imp = pd.read_parquet(tiny_world / "tables/impressions.parquet")
    ts = imp.groupby("query_image_path")["ts"].first()
    assert ts.loc[ev["query_image_path"]].min() > ts.loc[qids].max()
    # evaluation items are held-out products only
    ev_products = cat.loc[ev["item_ids"].explode(), "product_id"]
    assert splits.loc[ev_products, "split"].eq("test").all()


def test_output_is_deterministic(harvested, tiny_world, tmp_path):
    again = harvest(tiny_world, tmp_path / "again", HarvestConfig())
    for name in ("pairs_debiased.parquet", "pairs_naive.parquet", "splits.parquet",
                 "eval_engagement.parquet"):
        assert (again.out_dir / name).read_bytes() == (harvested.out_dir / name).read_bytes()


def test_report_records_estimate_clip_and_counts(harvested, tiny_world, tmp_path):
    metrics = write_report(harvested, tiny_world, tmp_path)
    saved = json.loads((tmp_path / "harvest.json").read_text())
    assert saved == metrics
    assert set(saved) >= {"propensity_mae", "pairs_by_source", "seconds"}
    assert sum(saved["pairs_by_source"].values()) == len(_pairs(harvested))
    assert (tmp_path / "propensity.png").stat().st_size > 10_000
    summary = json.loads((harvested.out_dir / "harvest.json").read_text())
    assert summary["clip"] == harvested.config.weight_clip
    assert len(summary["propensity"]["theta"]) == GRID_SIZE


def _copy_world(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "tables", dst / "tables")
    (dst / "images").symlink_to(src / "images")
    return dst


def test_contract_failure_stops_the_stage_and_keeps_previous_output(harvested, tiny_world,
                                                                     tmp_path):
    world = _copy_world(tiny_world, tmp_path / "w")
    out = tmp_path / "out"
    shutil.copytree(harvested.out_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    imp = pd.read_parquet(world / "tables/impressions.parquet")
    imp.loc[imp.index[:5], "position"] = -1
    imp.to_parquet(world / "tables/impressions.parquet", index=False)
    with pytest.raises(ContractViolation, match="position"):
        harvest(world, out, HarvestConfig(), quarantine_dir=tmp_path / "q")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    bad = (world / "tables/impressions.parquet").read_bytes()  # still the user's, as it was
    assert [p.read_bytes() for p in (tmp_path / "q").rglob("impressions.parquet")] == [bad]


def test_no_randomised_traffic_is_a_clear_error(tiny_world):
    imp = pd.read_parquet(tiny_world / "tables/impressions.parquet")
    with pytest.raises(ValueError, match="randomised"):
        estimate_propensity(imp[imp.logging_policy == RANKER_POLICY], HarvestConfig())
