"""Online-eval statistics on hand numbers, and the served-logs analysis end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from data_contracts.constants import RANDOMISED_POLICY, RANKER_POLICY
from pipelines import online_eval
from pipelines.cli import main
from pipelines.simulate_traffic import BehaviourWorld, TruthRanker, drive_api, image_rank_fn
from serving.api.experiments import DEFAULT_CONFIG, ExperimentConfig
from serving.api.impressions import ImpressionLog, export_impressions
from serving.api.online import RankerBackend, create_online_app


def test_ratio_estimate_and_z_test_on_hand_numbers():
    e = online_eval.ratio_estimate(np.array([1, 2, 3, 4]), np.full(4, 10))
    assert e.value == pytest.approx(0.25)
    assert e.se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2 / 10)  # 0.0645
    a = online_eval.RatioEstimate(0.10, 0.003, 1000, 100, 1000)
    b = online_eval.RatioEstimate(0.11, 0.003, 1000, 110, 1000)
    c = online_eval.compare(a, b)
    assert c.z == pytest.approx(0.01 / (0.003 * 2**0.5))
    assert c.p_value == pytest.approx(0.0184, abs=1e-4)
    assert c.relative == pytest.approx(0.1)
    # (1.96 + 0.8416)^2 * (0.009 + 0.009) / 0.01^2
    assert online_eval.ab_users_per_arm(a, b) == pytest.approx(1412.8, rel=1e-3)


def test_sign_test_and_interleaving_sample_size_on_hand_numbers():
    r = online_eval.sign_test(60, 40, 100)
    assert (r.decided, r.grids, r.preference_a) == (100, 200, 0.6)
    assert r.p_value == pytest.approx(0.0569, abs=1e-4)
    # ((1.96 * 0.5 + 0.8416 * sqrt(0.24)) / 0.1)^2 decided grids, half the grids decide
    assert online_eval.interleaving_grids_needed(r) == pytest.approx(387.7, rel=1e-3)
    assert online_eval.sign_test(0, 0).p_value == 1.0


def _frame(rows):
    cols = ["request_id", "user_id", "arm", "team", "logging_policy", "clicked", "saved"]
    return pd.DataFrame(rows, columns=cols)


def test_interleaving_analysis_counts_team_wins_per_grid():
    rows = [("g1", "u", "interleaved", "A", RANKER_POLICY, True, False),  # A wins 1-0
            ("g1", "u", "interleaved", "B", RANKER_POLICY, False, False),
            ("g2", "u", "interleaved", "A", RANKER_POLICY, True, False),  # tie 1-1
            ("g2", "u", "interleaved", "B", RANKER_POLICY, True, False),
            ("g3", "u", "interleaved", "A", RANKER_POLICY, False, False),  # tie 0-0
            ("g4", "u", "interleaved", "B", RANKER_POLICY, True, True)]  # B wins
    r = online_eval.interleaving_analysis(_frame(rows))
    assert (r["wins_a"], r["wins_b"], r["ties"], r["grids"]) == (1, 1, 2, 4)


def test_ab_analysis_leaves_out_shuffled_grids_and_flags_the_better_arm():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(400):
        arm = "champion" if u % 2 else "challenger"
        for pos in range(20):
            click = rng.random() < (0.15 if arm == "champion" else 0.10)
            rows.append((f"g{u}", f"u{u}", arm, "", RANKER_POLICY, click, click and pos == 0))
    rows += [("gs", "u1", "challenger", "", RANDOMISED_POLICY, True, True)] * 20
    r = online_eval.ab_analysis(_frame(rows), "champion", "challenger")
    assert r["arms"]["champion"]["users"] == 200 and r["arms"]["challenger"]["grids"] == 200
    assert r["arms"]["champion"]["ctr"] == pytest.approx(0.15, abs=0.02)
    lo, hi = r["arms"]["challenger"]["ctr_ci"]
    assert lo < r["arms"]["challenger"]["ctr"] < hi and hi - lo < 0.03
    assert r["tests"]["ctr"]["diff"] < 0 and r["tests"]["ctr"]["p_value"] < 1e-6
    winner, line = online_eval.decide(r, None, ("champion", "challenger"))
    assert winner == "champion" and line.startswith("WINNER champion")


def test_served_logs_to_verdict_and_mlflow(tmp_path, tiny_world):
    """Front door over truth rankers (challenger much noisier) -> simulated users ->
    export -> `loupe online-eval` picks the champion and logs an MLflow run."""
    world = BehaviourWorld.load(tiny_world)
    cfg = replace(ExperimentConfig.load(DEFAULT_CONFIG), rankers={},
                  traffic={"champion": 0.35, "challenger": 0.35, "interleaved": 0.3})
    backends = {name: RankerBackend(image_rank_fn(tiny_world, TruthRanker(world, noise, s)),
                                    f"truth/{noise}", "world")
                for name, noise, s in (("champion", 0.25, 1), ("challenger", 2.0, 2))}
    log = ImpressionLog(tmp_path / "log")
    client = TestClient(create_online_app(cfg, backends, log))
    summary = drive_api(client, tiny_world, 300, seed=1, world=world)
    assert summary.rejected_events == 0 and sum(summary.by_arm.values()) == 300
    assert log.counts()["events"] == summary.clicks + summary.saves
    export_impressions(log, tmp_path / "export", tiny_world / "tables/catalog.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "online_eval.json"
    assert main(["online-eval", "--logs", str(tmp_path / "export"), "--out", str(out),
                 "--tracking-uri", uri]) == 0
    report = json.loads(out.read_text())
    assert report["winner"] == "champion", report["verdict"]
    ctr = {a: m["ctr"] for a, m in report["ab"]["arms"].items()}
    assert ctr["champion"] > ctr["challenger"]
    assert report["interleaving"]["preference_a"] > 0.5

    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("loupe-online-eval").experiment_id])
    assert runs[0].data.params["winner"] == "champion"
    assert runs[0].data.metrics["champion_ctr"] == pytest.approx(ctr["champion"])


def test_cli_refuses_a_missing_export(tmp_path, capsys):
    assert main(["online-eval", "--logs", str(tmp_path), "--out",
                 str(tmp_path / "r.json"), "--no-mlflow"]) == 2
    assert "export the impression log first" in capsys.readouterr().err
