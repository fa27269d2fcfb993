"""Health of the live index, checked hourly by `loupe_monitoring`: the cutover canary replayed,
drift of streamed embeddings against the live build (PSI), index age and per-shard latency.

Each check returns `{"metrics": ..., "breaches": [...]}`; `report_health` writes them all
(`<runs_dir>/monitoring/latest.json`, which pipelines/health_export.py turns into gauges) and
then raises HealthBreach naming every breach. The DAG file imports this module while it is
parsed (for `health_params`), so it imports only stdlib-only modules at module level.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_contracts.durable import write_json_atomic

if TYPE_CHECKING:
    from pipelines.run_config import LoupeConfig


class HealthBreach(RuntimeError):
    """A monitored quantity crossed its threshold (ingest lag, drift, latency, age)."""


@dataclass(frozen=True)
class HealthThresholds:
    """What the hourly monitoring calls a breach (DAG params of `loupe_monitoring`)."""

    max_probe_recall_drop: float = 0.05  # canary replay vs the verdict recorded at cutover
    max_drift_psi: float = 0.25  # population stability index; > 0.25 is a major shift
    min_drift_samples: int = 50  # streamed vectors needed before drift is judged
    max_index_age_h: float = 192.0  # weekly compaction rebuilds; 8 days means it stopped
    max_shard_p99_ms: float = 50.0


def replay_canary(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """The cutover canary re-run on the live version (checksums re-verified, same probes).

    It runs against a scratch root whose `versions/` links to the real one, so the verdict
    recorded at cutover (which rollback relies on) is never rewritten by monitoring.
    """
    import tempfile

    from pipelines.index import IndexParams, canary
    from serving.shards import layout
    from serving.shards.pointer import read_verdict

    recorded = read_verdict(cfg.index, live)
    with tempfile.TemporaryDirectory(prefix="loupe-canary-replay-") as scratch:
        (Path(scratch) / layout.VERSIONS).symlink_to((cfg.index / layout.VERSIONS).resolve(),
                                                     target_is_directory=True)
        verdict = canary(Path(scratch), live, cfg.world,
                         IndexParams.load(Path(cfg.params_file)).canary)
    metrics = {k: verdict.metrics.get(k) for k in ("probe_recall", "exact_overlap", "n_probes",
                                                   "mean_vector_norm")}
    breaches = [f"canary replay fails: {r}" for r in verdict.reasons]
    if recorded is not None and "probe_recall" in recorded.metrics \
            and metrics["probe_recall"] is not None:
        metrics["recorded_probe_recall"] = recorded.metrics["probe_recall"]
        drop = recorded.metrics["probe_recall"] - metrics["probe_recall"]
        if drop > th.max_probe_recall_drop:
            breaches.append(f"probe recall fell by {drop:.3f} since cutover "
                            f"(> {th.max_probe_recall_drop})")
    return {"metrics": metrics, "breaches": breaches}


NORM_EDGES = (0.98, 0.985, 0.99, 0.995, 1.0, 1.005, 1.01, 1.015, 1.02)  # + open outer bins
NEIGHBOUR_BINS = 40  # over cosine [-1, 1]
BASELINE_QUERIES = 5000


def _drift_histograms(vectors, item_ids, base_index, base_ids) -> dict[str, list[int]]:
    """Norm histogram (every stored vector should be unit length) and the histogram of each
    vector's nearest-neighbour cosine among the live build's vectors, itself excluded: vectors
    of the build's model land next to their kind; another model's land nowhere near."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, np.float32)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    scores, labels = base_index.search(vectors / np.maximum(norms, 1e-12)[:, None].astype(
        np.float32), 2)
    own = base_ids[np.maximum(labels[:, 0], 0)] == np.asarray(item_ids)
    nearest = np.where(own, scores[:, 1], scores[:, 0])
    edges = np.concatenate([[-np.inf], NORM_EDGES, [np.inf]])
    return {"norm": np.histogram(norms, edges)[0].tolist(),
            "neighbour": np.histogram(nearest, np.linspace(-1, 1, NEIGHBOUR_BINS + 1))[0]
            .tolist()}


def population_stability(expected: list[int], actual: list[int], eps: float = 1e-4) -> float:
    """PSI = Σ (a - e) · ln(a / e) over bin shares (0 = same distribution)."""
    import numpy as np

    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() == 0 or a.sum() == 0:
        raise ValueError("population stability needs two non-empty histograms")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def embedding_drift(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """Vectors streamed in since the live build against that build (norm and nearest-
    neighbour-similarity histograms, PSI). The build's own histograms are the baseline,
    computed once per live version (on a sample of its rows) and kept beside the metrics."""
    import faiss
    import numpy as np

    from serving.shards import layout
    from serving.shards.delta import UPSERT, DeltaLog
    from serving.shards.kinds import load_version

    manifest, shards = load_version(cfg.index, live, verify=False)
    base = np.ascontiguousarray(np.concatenate([np.asarray(s.vectors, np.float32)
                                                for s in shards]))
    base_ids = np.concatenate([s.ids for s in shards])
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    baseline_path = cfg.runs / "monitoring" / "baselines" / f"{live}.json"
    if baseline_path.is_file():
        baseline = json.loads(baseline_path.read_text())
    else:
        rows = np.random.default_rng(0).permutation(len(base))[:BASELINE_QUERIES]
        baseline = {"index_version": live, "model_version": manifest["model_version"],
                    "rows_sampled": int(len(rows)),
                    "histograms": _drift_histograms(base[rows], base_ids[rows], index, base_ids),
                    "created_at": datetime.now(UTC).isoformat()}
        write_json_atomic(baseline_path, baseline)
    streamed: dict[str, Any] = {}
    delta_path = cfg.index / layout.DELTA_DB
    if delta_path.exists():
        delta = DeltaLog(delta_path, create=False)
        try:
            for row in delta.rows_after(manifest["delta_seq"]):
                if row.op == UPSERT and row.model_version == manifest["model_version"]:
                    streamed[row.item_id] = row.vector  # the latest vector of each item
        finally:
            delta.close()
    metrics: dict[str, Any] = {"baseline_rows": baseline["rows_sampled"],
                               "streamed_items": len(streamed), "norm_psi": None,
                               "neighbour_psi": None}
    breaches = []
    if len(streamed) >= th.min_drift_samples:
        now = _drift_histograms(np.stack(list(streamed.values())), list(streamed), index,
                                base_ids)
        for key in ("norm", "neighbour"):
            psi = round(population_stability(baseline["histograms"][key], now[key]), 4)
            metrics[f"{key}_psi"] = psi
            if psi > th.max_drift_psi:
                breaches.append(f"streamed embeddings drifted from the live build: {key} "
                                f"PSI {psi:.3f} > {th.max_drift_psi}")
    return {"metrics": metrics, "breaches": breaches}


def index_age(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """How old the live and previous builds are and how much of the live set streamed in
    since the build (the share a compaction would fold in)."""
    from serving.shards import layout, pointer
    from serving.shards.delta import DeltaLog

    now = datetime.now(UTC)

    def age_h(version: str | None) -> float | None:
        if version is None:
            return None
        built = layout.read_manifest(layout.version_dir(cfg.index, version))["built_at"]
        return round((now - datetime.fromisoformat(built)).total_seconds() / 3600, 3)

    manifest = layout.read_manifest(layout.version_dir(cfg.index, live))
    delta_rows = 0
    if (cfg.index / layout.DELTA_DB).exists():
        delta = DeltaLog(cfg.index / layout.DELTA_DB, create=False)
        try:
            delta_rows = len(delta.rows_after(manifest["delta_seq"]))
        finally:
            delta.close()
    metrics = {"live_age_h": age_h(live),
               "previous_age_h": age_h(pointer.read(cfg.index, layout.PREVIOUS)),
               "base_items": manifest["count"], "delta_rows_since_build": delta_rows}
    breaches = []
    if metrics["live_age_h"] > th.max_index_age_h:
        breaches.append(f"live index built {metrics['live_age_h']:.0f} h ago "
                        f"(> {th.max_index_age_h:.0f} h): is the weekly compaction running?")
    return {"metrics": metrics, "breaches": breaches}


def shard_latency(cfg: LoupeConfig, live: str, th: HealthThresholds, n_queries: int = 200,
                  k: int = 10) -> dict:
    """Per-shard search latency (p50/p99, ms) through the serving shard store (live version +
    delta + tombstones), one query at a time as the fan-out sends them."""
    import numpy as np

    from serving.shards.kinds import load_version
    from serving.shards.store import ShardStore

    manifest, shards = load_version(cfg.index, live, verify=False)
    pool = np.concatenate([np.asarray(s.vectors, np.float32) for s in shards])
    rng = np.random.default_rng(0)
    queries = pool[rng.choice(len(pool), min(n_queries, len(pool)), replace=False)]
    metrics: dict[str, Any] = {"queries": int(len(queries)), "k": k, "shards": {}}
    breaches = []
    for s in range(manifest["n_shards"]):
        store = ShardStore(cfg.index, s, manifest["model_version"], keep_previous_s=0)
        try:
            store.load()
            store.search(queries[0], k)  # warm caches before timing
            ms = []
            for q in queries:
                t0 = time.perf_counter()
                store.search(q, k)
                ms.append((time.perf_counter() - t0) * 1000)
        finally:
            store.stop()
        p50, p99 = (float(np.percentile(ms, p)) for p in (50, 99))
        metrics["shards"][str(s)] = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}
        if p99 > th.max_shard_p99_ms:
            breaches.append(f"shard {s} p99 {p99:.1f} ms > {th.max_shard_p99_ms} ms")
    return {"metrics": metrics, "breaches": breaches}


def report_health(cfg: LoupeConfig, run_dir: Path, live: str,
                  checks: Mapping[str, Mapping[str, Any] | None]) -> dict:
    """Write every check's metrics (run-scoped `health.json` and `monitoring/latest.json`),
    then raise HealthBreach naming each breach; a check that did not report is one."""
    breaches = []
    for name, result in checks.items():
        if result is None:
            breaches.append(f"{name} did not report (the task failed; see its log)")
        else:
            breaches += result["breaches"]
    report = {"index_version": live, "checked_at": datetime.now(UTC).isoformat(),
              "healthy": not breaches, "breaches": breaches,
              "metrics": {name: None if r is None else r["metrics"]
                          for name, r in checks.items()}}
    write_json_atomic(Path(run_dir) / "health.json", report)
    write_json_atomic(cfg.runs / "monitoring" / "latest.json", report)
    if breaches:
        raise HealthBreach(f"{len(breaches)} health breach(es) on {live}: "
                           + "; ".join(breaches))
    return {"healthy": True, "report": str(Path(run_dir) / "health.json")}


def health_params() -> dict[str, Any]:
    """DAG params for every health threshold, defaulting to HealthThresholds'."""
    from dataclasses import fields

    from airflow.sdk import Param

    return {f.name: Param(f.default, type="number", minimum=0) for f in
            fields(HealthThresholds)}


def thresholds_from(params: Mapping[str, Any]) -> HealthThresholds:
    from dataclasses import fields

    return HealthThresholds(**{f.name: type(f.default)(params[f.name])
                               for f in fields(HealthThresholds) if f.name in params})

