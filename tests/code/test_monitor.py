"""The monitoring checks on a small live index built from the tiny world's catalog: PSI
numbers on known histograms, drift of streamed vectors, index age, shard latency, the
canary replay and the health report that fails loudly on any breach."""

from __future__ import annotations

import json
import math
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, new_version_id, write_manifest
from pipelines.monitor import (
    BASELINE_QUERIES,
    NEIGHBOUR_BINS,
    NORM_EDGES,
    HealthBreach,
    HealthThresholds,
    embedding_drift,
    health_params,
    index_age,
    population_stability,
    replay_canary,
    report_health,
    shard_latency,
    thresholds_from,
)
from pipelines.run_config import LoupeConfig, resolve_config
from serving.shards import layout, pointer
from serving.shards.delta import UPSERT, DeltaLog
from serving.shards.kinds import build_shard_from_arrays

MODEL = "attributes/0"
PARAMS = IndexParams.load()


# --------------------------------------------------------------------------- PSI
def test_population_stability_of_known_histograms():
    assert population_stability([5, 3, 2], [5, 3, 2]) == 0.0
    assert population_stability([5, 3, 2], [50, 30, 20]) == 0.0  # shares, not counts
    # shares (.5, .5) -> (.9, .1): 0.4 ln 1.8 + 0.4 ln 5
    assert population_stability([50, 50], [90, 10]) == pytest.approx(
        0.4 * math.log(1.8) + 0.4 * math.log(5), rel=1e-12)
    assert population_stability([50, 50], [90, 10]) == pytest.approx(0.878890, abs=1e-6)
    # symmetric in the two histograms
    assert population_stability([90, 10], [50, 50]) == pytest.approx(
        population_stability([50, 50], [90, 10]))
    # an empty bin counts as eps, so a new bin is a large but finite shift
    assert population_stability([10, 0], [5, 5]) == pytest.approx(
        -0.5 * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4), rel=1e-12)
    assert population_stability([10, 0], [5, 5]) == pytest.approx(4.604318, abs=1e-6)


def test_population_stability_refuses_empty_histograms():
    with pytest.raises(ValueError, match="two non-empty histograms"):
        population_stability([0, 0], [1, 2])
    with pytest.raises(ValueError, match="two non-empty histograms"):
        population_stability([1, 2], [0, 0])


# --------------------------------------------------------------------------- thresholds
def test_thresholds_from_dag_params_cast_to_the_field_types():
    th = thresholds_from({"max_drift_psi": "0.5", "min_drift_samples": 10.0,
                          "not_a_threshold": 3})
    assert th == HealthThresholds(max_drift_psi=0.5, min_drift_samples=10)
    assert isinstance(th.min_drift_samples, int) and isinstance(th.max_drift_psi, float)
    assert thresholds_from({}) == HealthThresholds()


def test_health_params_default_to_the_thresholds():
    params = health_params()
    defaults = HealthThresholds()
    assert set(params) == {"max_probe_recall_drop", "max_drift_psi", "min_drift_samples",
                           "max_index_age_h", "max_shard_p99_ms"}
    for name, param in params.items():
        assert param.value == getattr(defaults, name), name


# --------------------------------------------------------------------------- a live index
@pytest.fixture(scope="module")
def catalog(tiny_world) -> pd.DataFrame:
    return pd.read_parquet(tiny_world / "tables" / "catalog.parquet").sort_values("item_id")


def _config(root: Path, world: Path) -> LoupeConfig:
    return resolve_config({"loupe_root": str(root), "world_root": str(world)}, {}, {})


def _build(cfg: LoupeConfig, catalog: pd.DataFrame, seed: int = 0) -> str:
    vectors = attribute_vectors(catalog, seed=seed)
    vdir = layout.version_dir(cfg.index, new_version_id(MODEL))
    for s in range(PARAMS.n_shards):
        build_shard_from_arrays(np.asarray(catalog["item_id"]), vectors, MODEL, s, PARAMS,
                                vdir)
    write_manifest(vdir, PARAMS.n_shards, {"test": True})
    return vdir.name


@pytest.fixture(scope="module")
def live_root(tiny_world, catalog, tmp_path_factory) -> Path:
    """attributes/0 built, canaried and cut over; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("live")
    cfg = _config(root, tiny_world)
    version = _build(cfg, catalog)
    assert canary(cfg.index, version, tiny_world, PARAMS.canary).passed
    pointer.cutover(cfg.index, version)
    return root


@pytest.fixture
def live(live_root, tiny_world, tmp_path) -> tuple[LoupeConfig, str]:
    root = tmp_path / "root"
    shutil.copytree(live_root, root, symlinks=True)
    cfg = _config(root, tiny_world)
    return cfg, pointer.read(cfg.index)


def _stream(cfg: LoupeConfig, items: list[str], vectors: np.ndarray) -> None:
    """Upserts labelled with the live model, as the streaming indexer writes them."""
    delta = DeltaLog(cfg.index / layout.DELTA_DB)
    try:
        delta.append([(i + 1, item, UPSERT, MODEL, v)
                      for i, (item, v) in enumerate(zip(items, vectors, strict=True))],
                     "test", len(items))
    finally:
        delta.close()


# --------------------------------------------------------------------------- drift
def test_drift_without_streamed_vectors_writes_the_baseline_once(live, catalog):
    cfg, version = live
    th = HealthThresholds()
    assert len(catalog) == 217
    result = embedding_drift(cfg, version, th)
    assert result == {"metrics": {"baseline_rows": 217, "streamed_items": 0, "norm_psi": None,
                                  "neighbour_psi": None}, "breaches": []}
    path = cfg.runs / "monitoring" / "baselines" / f"{version}.json"
    baseline = json.loads(path.read_text())
    assert baseline["model_version"] == MODEL and baseline["rows_sampled"] == min(
        BASELINE_QUERIES, 217)
    hist = baseline["histograms"]
    assert len(hist["norm"]) == len(NORM_EDGES) + 1 and sum(hist["norm"]) == 217
    assert len(hist["neighbour"]) == NEIGHBOUR_BINS and sum(hist["neighbour"]) == 217
    # unit vectors: every norm lands in the two bins around 1.0
    assert sum(hist["norm"][4:6]) == 217
    stamp = path.stat().st_mtime_ns
    assert embedding_drift(cfg, version, th) == result
    assert path.stat().st_mtime_ns == stamp  # computed once per live version


def test_another_models_streamed_vectors_breach_drift(live, catalog):
    cfg, version = live
    items = catalog["item_id"].tolist()[:60]
    _stream(cfg, items, attribute_vectors(catalog, seed=1)[:60])  # swapped embedder
    result = embedding_drift(cfg, version, HealthThresholds())
    metrics = result["metrics"]
    assert metrics["streamed_items"] == 60
    # still unit vectors (norms only split differently around 1.0): the neighbours tell
    assert metrics["norm_psi"] < 0.05
    assert metrics["neighbour_psi"] > 1.0
    assert result["breaches"] == [f"streamed embeddings drifted from the live build: "
                                  f"neighbour PSI {metrics['neighbour_psi']:.3f} > 0.25"]
    # too few samples to judge: measured, not judged
    quiet = embedding_drift(cfg, version, HealthThresholds(min_drift_samples=61))
    assert quiet == {"metrics": {**metrics, "norm_psi": None, "neighbour_psi": None},
                     "breaches": []}


# --------------------------------------------------------------------------- age
def test_index_age_counts_streamed_rows_and_breaches_on_an_old_build(live, catalog):
    cfg, version = live
    result = index_age(cfg, version, HealthThresholds())
    metrics = result["metrics"]
    assert 0.0 <= metrics["live_age_h"] < 1.0 and metrics["previous_age_h"] is None
    assert (metrics["base_items"], metrics["delta_rows_since_build"]) == (217, 0)
    assert result["breaches"] == []

    _stream(cfg, catalog["item_id"].tolist()[:7], attribute_vectors(catalog)[:7])
    manifest_path = layout.version_dir(cfg.index, version) / layout.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["built_at"] = (datetime.now(UTC) - timedelta(hours=240)).isoformat()
    manifest_path.write_text(json.dumps(manifest))
    result = index_age(cfg, version, HealthThresholds())
    assert result["metrics"]["live_age_h"] == pytest.approx(240.0, abs=0.01)
    assert result["metrics"]["delta_rows_since_build"] == 7
    assert result["breaches"] == ["live index built 240 h ago (> 192 h): is the weekly "
                                  "compaction running?"]


# --------------------------------------------------------------------------- latency
def test_shard_latency_times_every_shard_and_breaches_on_its_p99(live):
    cfg, version = live
    result = shard_latency(cfg, version, HealthThresholds(), n_queries=20, k=5)
    metrics = result["metrics"]
    assert (metrics["queries"], metrics["k"]) == (20, 5)
    assert set(metrics["shards"]) == {str(s) for s in range(PARAMS.n_shards)}
    for s in metrics["shards"].values():
        assert 0.0 < s["p50_ms"] <= s["p99_ms"]
    assert result["breaches"] == []
    strict = shard_latency(cfg, version, HealthThresholds(max_shard_p99_ms=0.0), n_queries=20)
    assert [b.split(" p99 ")[0] for b in strict["breaches"]] == [
        f"shard {s}" for s in range(PARAMS.n_shards)]


# --------------------------------------------------------------------------- canary replay
def test_replay_canary_matches_the_cutover_verdict_and_leaves_it_alone(live):
    cfg, version = live
    verdict = layout.verdict_path(cfg.index, version)
    before = verdict.read_text()
    recorded = json.loads(before)["metrics"]
    result = replay_canary(cfg, version, HealthThresholds())
    assert result["breaches"] == []
    assert result["metrics"]["probe_recall"] == result["metrics"]["recorded_probe_recall"] \
        == recorded["probe_recall"] > 0.9
    assert result["metrics"]["n_probes"] == recorded["n_probes"]
    assert verdict.read_text() == before


# --------------------------------------------------------------------------- report
def test_report_health_writes_every_metric_then_raises_on_breaches(tmp_path, tiny_world):
    cfg = _config(tmp_path, tiny_world)
    ok = {"index_age": {"metrics": {"live_age_h": 1.5}, "breaches": []}}
    got = report_health(cfg, tmp_path / "run1", "v1", ok)
    assert got == {"healthy": True, "report": str(tmp_path / "run1" / "health.json")}
    report = json.loads((tmp_path / "run1" / "health.json").read_text())
    assert report["healthy"] and report["breaches"] == []
    assert report["metrics"] == {"index_age": {"live_age_h": 1.5}}
    assert report["index_version"] == "v1"

    checks = {**ok, "shard_latency": {"metrics": {"k": 10}, "breaches": ["shard 0 p99 slow"]},
              "replay_canary": None}
    with pytest.raises(HealthBreach, match=r"2 health breach\(es\) on v1: shard 0 p99 slow; "
                                           r"replay_canary did not report"):
        report_health(cfg, tmp_path / "run2", "v1", checks)
    report = json.loads((tmp_path / "run2" / "health.json").read_text())
    assert not report["healthy"]
    assert report["breaches"] == ["shard 0 p99 slow", "replay_canary did not report (the task "
                                                      "failed; see its log)"]
    assert report["metrics"] == {"index_age": {"live_age_h": 1.5},
                                 "shard_latency": {"k": 10}, "replay_canary": None}
    latest = json.loads((cfg.runs / "monitoring" / "latest.json").read_text())
    assert latest == report  # the exporter reads the newest report, breaches included
