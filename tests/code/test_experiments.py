"""Arm assignment (deterministic, balanced) and team-draft interleaving on hand examples."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from scipy.stats import chisquare

from serving.api.experiments import (
    DEFAULT_CONFIG,
    ExperimentConfig,
    assign_arm,
    interleaving_winner,
    is_randomised,
    seeded_coin,
    shuffle_top,
    team_draft,
)

CFG = ExperimentConfig.load(DEFAULT_CONFIG)
USERS = [f"u{i:06d}" for i in range(20_000)]


def test_assignment_is_deterministic_and_balanced():
    arms = [assign_arm(CFG, u) for u in USERS]
    reloaded = ExperimentConfig.load(DEFAULT_CONFIG)
    assert arms == [assign_arm(reloaded, u) for u in USERS]
    counts = Counter(arms)
    expected = [CFG.traffic[a] * len(USERS) for a in CFG.traffic]
    assert chisquare([counts[a] for a in CFG.traffic], expected).pvalue > 0.001
    for arm, share in CFG.traffic.items():
        assert abs(counts[arm] / len(USERS) - share) < 0.01


def test_new_salt_reassigns_users_independently():
    other = replace(CFG, salt="another-salt")
    same = sum(assign_arm(CFG, u) == assign_arm(other, u) for u in USERS) / len(USERS)
    independent = sum(s * s for s in CFG.traffic.values())  # 0.415 for 45/45/10
    assert abs(same - independent) < 0.02


def test_randomised_share_and_shuffle_are_per_request():
    share = sum(is_randomised(CFG, f"r{i}") for i in range(20_000)) / 20_000
    assert abs(share - CFG.randomised_share) < 0.01
    items = [f"i{k}" for k in range(25)]
    shuffled = shuffle_top(items, "r1")
    assert shuffled == shuffle_top(items, "r1") and shuffled != items
    assert sorted(shuffled[:20]) == sorted(items[:20]) and shuffled[20:] == items[20:]


def test_config_errors_are_readable(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        replace(CFG, traffic={"champion": 0.5, "challenger": 0.6})
    with pytest.raises(ValueError, match="needs `interleave"):
        replace(CFG, interleave=None)
    with pytest.raises(ValueError, match="no ranker configured"):
        replace(CFG, rankers={"champion": "http://x"})
    bad = tmp_path / "exp.yaml"
    bad.write_text("experiment: e\nsalt: s\ntraffic: {a: 1}\nsplit: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        ExperimentConfig.load(bad)


def test_team_draft_hand_examples():
    a, b = ["a", "b", "c", "d"], ["b", "a", "d", "e"]
    # A wins every coin: A takes a, B its best unshown b; then A c (b is shown), B d
    assert team_draft(a, b, 4, lambda: True) == [("a", "A"), ("b", "B"), ("c", "A"),
                                                 ("d", "B")]
    # B wins every coin: B b, A a, B d, A c
    assert team_draft(a, b, 4, lambda: False) == [("b", "B"), ("a", "A"), ("d", "B"),
                                                  ("c", "A")]
    # alternating coins, 5 items: T: A a, B b | F: B d, A c | T: A (a,b,c,d shown) nothing
    # left -> B e
    coins = itertools.cycle([True, False])
    assert team_draft(a, b, 5, lambda: next(coins)) == [
        ("a", "A"), ("b", "B"), ("d", "B"), ("c", "A"), ("e", "B")]


def test_team_draft_identical_rankings_keep_the_order_and_split_credit():
    ranking = [f"i{k}" for k in range(20)]
    grid = team_draft(ranking, ranking, 20, seeded_coin("r7"))
    assert [item for item, _ in grid] == ranking
    teams = Counter(team for _, team in grid)
    assert teams == {"A": 10, "B": 10}
    assert grid == team_draft(ranking, ranking, 20, seeded_coin("r7"))  # replayable


def test_team_draft_stops_when_both_rankings_run_out():
    assert team_draft(["x"], ["x", "y"], 5, lambda: True) == [("x", "A"), ("y", "B")]


def test_interleaving_winner_counts_clicks_per_team():
    teams = ["A", "B", "A", "B"]
    assert interleaving_winner(teams, [True, False, True, True]) == "A"
    assert interleaving_winner(teams, [False, True, False, False]) == "B"
    assert interleaving_winner(teams, [True, True, False, False]) is None
    assert interleaving_winner(teams, [False] * 4) is None
