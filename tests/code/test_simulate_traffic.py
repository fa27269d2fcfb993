"""Simulated users follow the world's behaviour model; the session-count study works."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.simulate_traffic import (
    BehaviourWorld,
    StudyConfig,
    TruthRanker,
    image_rank_fn,
    session_study,
    user_response,
)
from pipelines.world.behaviour import TRUTH_COLUMNS, relevance


@pytest.fixture(scope="module")
def world(tiny_world) -> BehaviourWorld:
    return BehaviourWorld.load(tiny_world)


def test_relevance_on_integer_codes_is_the_truths(world, tiny_world):
    """The simulator's integer-coded truth grades exactly as the world's ids do."""
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    products = pd.read_parquet(tiny_world / "truth/products.parquet")
    items = catalog.merge(products[["product_id", "cluster_id"]], on="product_id")
    columns = list(TRUTH_COLUMNS)
    for target in (0, 17, 40, len(products) - 1):
        expected = relevance(products.iloc[target][columns].to_numpy(), items[columns].to_numpy())
        assert np.array_equal(world.relevance(target, np.arange(len(catalog))), expected)
        assert set(np.unique(expected)) <= {0.95, 0.6, 0.2, 0.06} and (expected == 0.95).any()


def test_users_examine_by_position_and_save_after_clicks(world):
    target = 5
    same = np.flatnonzero(world.item_product == target)[0]
    shown = np.full(20, same)  # one equally attractive item everywhere: CTR_k ∝ k^-0.7
    rng = np.random.default_rng(0)
    clicks, saves = zip(*(user_response(world, target, shown, rng) for _ in range(20_000)),
                        strict=True)
    clicks, saves = np.array(clicks), np.array(saves)
    ratio = clicks.mean(axis=0) / clicks.mean(axis=0)[0]
    assert np.allclose(ratio[[1, 4, 9, 19]], np.array([2, 5, 10, 20]) ** -0.7, atol=0.03)
    assert not (saves & ~clicks).any()
    assert saves.sum() / clicks.sum() == pytest.approx(0.7, abs=0.02)  # relevant: 0.2 + 0.5


def test_user_activity_scales_examination_and_has_the_configured_spread(world):
    from pipelines.simulate_traffic import _activity

    target = 5
    shown = np.full(20, np.flatnonzero(world.item_product == target)[0])
    rng = np.random.default_rng(1)
    idle = np.array([user_response(world, target, shown, rng, activity=0.0)[0]
                     for _ in range(500)])
    assert not idle.any()
    keen = np.array([user_response(world, target, shown, rng, activity=2.0)[0]
                     for _ in range(20_000)])
    base = np.array([user_response(world, target, shown, rng)[0] for _ in range(20_000)])
    # deep positions are examined twice as often; position 1 is capped at certain examination
    assert keen[:, 19].mean() / base[:, 19].mean() == pytest.approx(2.0, rel=0.15)
    assert keen[:, 0].mean() / base[:, 0].mean() < 1.2
    draws = np.array([_activity(StudyConfig(user_activity_cv=1.5), rng) for _ in range(40_000)])
    assert draws.mean() == pytest.approx(1.0, abs=0.05)
    assert draws.std() / draws.mean() == pytest.approx(1.5, rel=0.1)
    assert _activity(StudyConfig(), rng) == 1.0  # the world's users: no draw, exact replay


def test_truth_ranker_orders_by_relevance_and_is_replayable(world, tiny_world):
    exact = TruthRanker(world, 0.0, 1)
    ranked = exact.rank(3, 10, "q")
    assert np.all(np.diff(world.relevance(3, ranked)) <= 0)
    noisy = TruthRanker(world, 0.5, 1)
    assert np.array_equal(noisy.rank(3, 10, "q"), noisy.rank(3, 10, "q"))
    rank = image_rank_fn(tiny_world, exact)
    photo = (tiny_world / world.queries["query_image_path"].iloc[0]).read_bytes()
    top = rank(photo, 5)
    assert len(top) == 5 and top[0][1] > top[-1][1]
    with pytest.raises(ValueError, match="knows only the world's query photos"):
        rank(b"another photo", 5)


def test_study_finds_the_worse_challenger_with_both_methods(tiny_world):
    cfg = StudyConfig(challenger_noise=1.0, max_sessions=300, replications=6)
    report = session_study(tiny_world, cfg)
    assert report["winner"] == "champion"
    assert 20 <= report["ab_sessions_needed"] <= 300
    assert 20 <= report["interleaving_sessions_needed"] <= 300
    assert report["replications_preferring_challenger_significantly"] == {
        "ab": 0, "interleaving": 0}
    assert report["ctr_relative_diff_full_run"] < 0
    curve = report["power_curve"]
    assert curve["ab"][-1] >= 0.8 and curve["interleaving"][-1] >= 0.8
