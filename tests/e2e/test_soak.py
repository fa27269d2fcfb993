"""The soak bench's short variant: 60 s of the real stack with traffic, a growing feed,
replica kills, a rollout, a rollback and a compaction; every invariant of bench/soak.py holds
(`make soak` runs the 20-minute one that `reports/soak.json` records)."""

from __future__ import annotations

import pytest

from bench.soak import SoakConfig, SoakWorld, plot, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_short_soak_keeps_every_invariant(tiny_world, tiny_harvest, tiny_detector, tmp_path):
    cfg = SoakConfig(minutes=1.0, search_qps=8.0, feed_events_first_minute=60,
                     kill_every_s=(8.0, 14.0))
    report = run_soak(cfg, tmp_path / "soak",
                      SoakWorld(tiny_world, tiny_harvest, tiny_detector.export_dir))
    print(f"soak growth: {report['growth']}")
    assert report["invariants"] == {k: True for k in report["invariants"]}, {
        k: report.get(k) for k in ("invariants", "growth", "totals", "events", "restarts")}
    kinds = [e["kind"] for e in report["events"]]
    assert [k for k in kinds if k != "kill -9"] == ["rollout", "rollback", "compaction"]
    assert kinds.count("kill -9") >= 1 and len(report["restarts"]) >= kinds.count("kill -9")
    assert all(r["restart_s"] < 30 for r in report["restarts"])
    totals, feed = report["totals"], report["feed"]
    assert totals["requests"] >= 0.8 * cfg.minutes * 60 * cfg.search_qps
    assert totals["errors"] == 0 and totals["partial"] == 0
    assert feed["events"] >= 50 and feed["lost"] == feed["duplicated"] == 0
    minutes = report["per_minute"]  # a second one only if an operation ran late
    assert [m["minute"] for m in minutes][:1] == [1] and len(minutes) <= 2
    assert sum(m["requests"] for m in minutes) == totals["requests"]
    assert all(m["p99_ms"] > 0 and {"api", "tritonserver"} <= set(m["processes"])
               for m in minutes)
    growth = report["growth"]  # Triton from before the rollout to after the compaction
    ops = {e["kind"]: e for e in report["events"]}
    assert growth["tritonserver"]["from_s"] < ops["rollout"]["t_s"]
    assert growth["tritonserver"]["to_s"] > ops["compaction"]["t_s"] + ops["compaction"]["took_s"]
    assert plot(report, tmp_path / "soak.png").stat().st_size > 20_000
