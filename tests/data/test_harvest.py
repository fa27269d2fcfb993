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


# --------------------------------------------------------------------------- other worlds
def _synthetic_randomised(theta: np.ndarray, sessions: int, seed: int = 0) -> pd.DataFrame:
    """Randomised sessions whose clicks follow theta_k x a constant relevance: grid lengths
    vary from 2 to len(theta), so no session need show the whole grid."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(sessions):
        for k in range(1, int(rng.integers(2, len(theta) + 1)) + 1):
            rows.append((f"s{s}", k, rng.random() < 0.5 * theta[k - 1]))
    frame = pd.DataFrame(rows, columns=["session_id", "position", "clicked"])
    return frame.assign(logging_policy="shuffle_top20")


def test_grids_of_any_length_give_finite_propensities():
    """Issue 16: 12-slot grids gave theta = NaN (only sessions showing all 20 positions
    counted); 30-slot grids were refused. Each position now counts the sessions that showed it."""
    for depth in (12, 30):
        theta = 1.0 / np.arange(1, depth + 1) ** 0.7
        est = estimate_propensity(_synthetic_randomised(theta, 4000),
                                  HarvestConfig(max_position=depth, bootstrap=20))
        assert est.depth == depth and est.position == list(range(1, depth + 1))
        assert np.isfinite(est.theta).all() and np.isfinite(est.ci_low).all()
        assert np.mean(np.abs(np.asarray(est.theta) - theta)) < 0.06
        assert est.n_sessions == 4000


def test_thin_randomised_traffic_says_how_much_is_needed():
    theta = 1.0 / np.arange(1, 13)
    with pytest.raises(ValueError, match=r"40 randomised sessions .* at least 100"):
        estimate_propensity(_synthetic_randomised(theta, 40), HarvestConfig())


def test_twelve_slot_world_harvests_positive_weights_and_reports_without_truth(
        tiny_world, tmp_path):
    """A real-data-shaped world: 12-slot grids and no truth/. The old estimator wrote NaN
    weights and the report needed truth/propensity.json."""
    world = _copy_world(tiny_world, tmp_path / "w")
    imp = pd.read_parquet(world / "tables/impressions.parquet")
    imp[imp["position"] <= 12].to_parquet(world / "tables/impressions.parquet", index=False)
    res = harvest(world, tmp_path / "out", HarvestConfig(bootstrap=20))
    assert res.propensity.depth == 12
    for kind in ("debiased", "naive"):
        weights = _pairs(res, kind)["weight"]
        assert np.isfinite(weights).all() and (weights > 0).all() and len(weights) > 100
    report = write_report(res, world, tmp_path / "reports")
    assert report["propensity_mae"] is None and report["randomised_sessions"] > 100
    assert (tmp_path / "reports/propensity.png").stat().st_size > 10_000


def test_judgments_covering_the_catalog_are_a_clear_error(tiny_world, tmp_path):
    """Issue 16: every product judged held out the whole catalog and harvest exited 0 with
    no pairs; it now stops and says why."""
    world = _copy_world(tiny_world, tmp_path / "w")
    judgments = pd.read_parquet(world / "tables/rater_judgments.parquet")
    catalog = pd.read_parquet(world / "tables/catalog.parquet")
    extra = catalog[["item_id"]].assign(
        rater_query_id=judgments["rater_query_id"].iloc[0], grade=1)
    for column in judgments.columns.difference(extra.columns):
        extra[column] = judgments[column].iloc[0]
    every = pd.concat([judgments, extra[judgments.columns]]).drop_duplicates(
        ["rater_query_id", "item_id"])
    every.astype(judgments.dtypes.to_dict()).to_parquet(
        world / "tables/rater_judgments.parquet", index=False)
    with pytest.raises(ValueError, match="nothing to train on.*judgments that cover"):
        harvest(world, tmp_path / "out", HarvestConfig(bootstrap=20))
    assert not (tmp_path / "out").exists()


def test_every_session_has_a_fate_and_the_guards_are_counted(harvested):
    summary = json.loads((harvested.out_dir / "harvest.json").read_text())
    fates, sides = summary["sessions_by_fate"], summary["sessions_by_side"]
    assert sum(fates.values()) == sum(sides.values())
    assert fates["train"] == sides["train"] and fates["eval"] == sides["eval"]
    assert (fates["engaged_heldout"] + fates["shown_heldout"] + fates["no_engagement"]
            == sides.get("drop", 0))
    assert fates["shown_heldout"] > 0  # the leak guard is visible, not silent


def test_validation_grows_to_rank_epochs_when_allowed(harvested, tiny_world, tmp_path):
    """Issue 16: a session validates only when it engaged validation products alone, so the
    val split can be too small to rank epochs. By default that is a loud warning; with
    max_val_share above val_share more products validate, the lowest draws first."""
    base = _pairs(harvested)["split"].value_counts()
    assert base["val"] < HarvestConfig().min_val_pairs
    grown = harvest(tiny_world, tmp_path / "grown", HarvestConfig(max_val_share=0.3))
    pairs = _pairs(grown)["split"].value_counts()
    splits = pd.read_parquet(grown.out_dir / "splits.parquet")["split"].value_counts()
    assert pairs["val"] > 2 * base["val"]
    assert splits["val"] <= 0.3 * (splits["val"] + splits["train"])
    old = pd.read_parquet(harvested.out_dir / "splits.parquet").set_index("product_id")["split"]
    new = pd.read_parquet(grown.out_dir / "splits.parquet").set_index("product_id")["split"]
    assert (new[old == "val"] == "val").all() and (new[old == "test"] == "test").all()


def test_a_world_without_boards_or_scenes_harvests(tiny_world, tmp_path):
    """Issue 16: boards, scenes and scene_objects had to exist; a shop has none of them."""
    from pipelines.validate import validate_world

    world = _copy_world(tiny_world, tmp_path / "w")
    for name in ("boards", "scenes", "scene_objects"):
        (world / "tables" / f"{name}.parquet").unlink()
    assert {r.table for r in validate_world(world)} == {
        "catalog", "impressions", "rater_queries", "rater_judgments"}
    res = harvest(world, tmp_path / "out", HarvestConfig(bootstrap=20))
    assert "cosave" not in set(_pairs(res)["source"]) and len(_pairs(res)) > 100
