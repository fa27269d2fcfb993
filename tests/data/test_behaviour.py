"""The world's one behaviour model: relevance grades, clicks and saves, the logging ranker."""

from __future__ import annotations

import numpy as np
import pytest

from data_contracts.constants import GRID_SIZE, RANDOMISED_POLICY, RANKER_POLICY
from pipelines.world.behaviour import LoggingPolicy, relevance, respond, wanted_product

# truth rows: product, cluster, shape family, palette, pattern, material
WANTED = np.array([7, 3, 0, 0, 0, 0])


def test_relevance_grades_product_cluster_shared_style():
    items = np.array([[7, 3, 0, 0, 0, 0],  # the product itself
                      [8, 3, 0, 0, 0, 0],  # its style cluster
                      [9, 4, 0, 0, 1, 1],  # two shared style attributes
                      [9, 4, 0, 1, 1, 1],  # one
                      [9, 4, 1, 1, 1, 1]])  # none
    assert relevance(WANTED, items).tolist() == [0.95, 0.6, 0.2, 0.06, 0.06]


def test_wanted_product_follows_popularity():
    rng = np.random.default_rng(0)
    draws = [wanted_product(np.array([1.0, 3.0]), rng) for _ in range(8000)]
    assert np.mean(draws) == pytest.approx(0.75, abs=0.02)


def test_appeal_lifts_clicks_but_saves_follow_relevance():
    rng = np.random.default_rng(0)
    rel, pop = np.full(GRID_SIZE, 0.06), np.full(GRID_SIZE, 0.5)
    plain = np.array([respond(rel, pop, rng)[0] for _ in range(4000)])
    badge = [respond(rel, pop, rng, appeal=np.full(GRID_SIZE, 0.3)) for _ in range(4000)]
    clicked = np.array([c for c, _ in badge])
    saved = np.array([s for _, s in badge])
    # attractiveness = appeal x (0.6 + 0.8 popularity) = 0.3 vs 0.06, at every position
    assert clicked[:, 0].mean() == pytest.approx(0.3, abs=0.03)
    assert clicked.mean() / plain.mean() == pytest.approx(5.0, rel=0.15)
    assert not (saved & ~clicked).any()
    assert saved.sum() / clicked.sum() == pytest.approx(0.2, abs=0.03)  # irrelevant: 0.2


def _candidates(n: int = 60):
    rng = np.random.default_rng(1)
    rel = rng.choice([0.95, 0.6, 0.2, 0.06], n, p=[0.05, 0.15, 0.3, 0.5])
    same_cluster = rel >= 0.6
    same_palette = np.arange(n) % 3 == 0
    popularity = rng.beta(2, 5, n)
    return rel, same_cluster, same_palette, popularity


def test_ranker_pins_popular_same_palette_items_from_other_clusters_on_top():
    rel, same_cluster, same_palette, popularity = _candidates()
    policy = LoggingPolicy()
    pins = policy.promoted_slots
    for s in range(30):
        grid = policy.fill_grid(rel, same_cluster, same_palette, popularity, 0.0,
                                np.random.default_rng([s, 0]), np.random.default_rng([s, 1]))
        assert grid.policy == RANKER_POLICY and len(grid.order) == GRID_SIZE
        assert len(set(grid.order.tolist())) == GRID_SIZE
        top = grid.order[:pins]
        assert (~same_cluster[top]).all() and same_palette[top].all()
        assert (grid.appeal[:pins] >= policy.promoted_appeal).all()
        assert np.array_equal(grid.appeal[pins:], rel[grid.order[pins:]])
        assert (np.diff(grid.scores[pins:]) <= 0).all()  # organic slots by noisy relevance


def test_randomised_grids_shuffle_the_same_top_and_unpinned_policy_ranks_by_score():
    rel, same_cluster, same_palette, popularity = _candidates()
    policy = LoggingPolicy()
    ranked = policy.fill_grid(rel, same_cluster, same_palette, popularity, 0.0,
                              np.random.default_rng(5), np.random.default_rng(6))
    shuffled = policy.fill_grid(rel, same_cluster, same_palette, popularity, 1.0,
                                np.random.default_rng(5), np.random.default_rng(6))
    assert shuffled.policy == RANDOMISED_POLICY
    assert sorted(shuffled.order.tolist()) == sorted(ranked.order.tolist())
    assert not np.array_equal(shuffled.order, ranked.order)
    plain = LoggingPolicy(promoted_slots=0).fill_grid(
        rel, same_cluster, same_palette, popularity, 0.0, np.random.default_rng(5),
        np.random.default_rng(6))
    assert (np.diff(plain.scores) <= 0).all()
    assert np.array_equal(plain.appeal, rel[plain.order])
