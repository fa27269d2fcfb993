"""The soak bench's short variant: 45 s of the real stack with traffic, a growing feed,
replica kills, a rollout, a rollback and a compaction; every invariant of bench/soak.py holds
(`make soak` runs the 20-minute one that `reports/soak.json` records)."""

from __future__ import annotations

import pytest

from bench.soak import SoakConfig, SoakWorld, plot, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_short_soak_keeps_every_invariant(tiny_world, tiny_harvest, tiny_detector, tmp_path):
    cfg = SoakConfig(minutes=0.75, search_qps=8.0, feed_events_first_minute=60,
                     kill_every_s=(8.0, 14.0))
    report = run_soak(cfg, tmp_path / "soak",
                      SoakWorld(tiny_world, tiny_harvest, tiny_detector.export_dir))
    assert report["invariants"] == {k: True for k in report["invariants"]}, {
        k: report.get(k) for k in ("invariants", "totals", "events", "restarts", "per_minute")}
    kinds = [e["kind"] for e in report["events"]]
    assert [k for k in kinds if k != "kill -9"] == ["rollout", "rollback", "compaction"]
    assert kinds.count("kill -9") >= 1 and len(report["restarts"]) >= kinds.count("kill -9")
    assert all(r["restart_s"] < 30 for r in report["restarts"])
    totals, feed = report["totals"], report["feed"]
    assert totals["requests"] >= 0.8 * cfg.minutes * 60 * cfg.search_qps
    assert totals["errors"] == 0 and totals["partial"] == 0
    assert feed["events"] >= 35 and feed["lost"] == feed["duplicated"] == 0
    [minute] = report["per_minute"]
    assert minute["requests"] == totals["requests"] and minute["p99_ms"] > 0
    assert {"api", "tritonserver"} <= set(minute["processes"])
    assert plot(report, tmp_path / "soak.png").stat().st_size > 20_000
