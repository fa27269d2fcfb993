"""The rollout DAG on the scale-out deployment: Airflow 3.3 with CeleryExecutor, two Celery
workers for the default queue and one for the GPU queue, Postgres metadata DB + result
backend and Redis broker (infra/airflow-celery/), all real processes on this machine. Shows
the shard builds running in parallel on both default workers, and the cluster policy
(infra/airflow_local_settings.py) sending every re-embedding task to the GPU-queue worker.

Evidence comes from the metadata DB: task_instance rows (state, start/end, pool, queue) joined
to the Celery result backend's rows (the worker that executed each task), and the XCom the
shard builds returned; the built index is then checked on disk against them. Last, the
hourly monitoring checks run on the new live index and their report goes through the
Prometheus exporter the Grafana dashboard reads (infra/monitoring/).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pandas as pd
import pytest

from pipelines import monitor as orch
from pipelines.health_export import METRIC_NAMES, HealthReportCollector
from pipelines.run_config import REPO_ROOT, resolve_config
from serving.shards import layout, pointer
from serving.shards.kinds import load_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "attributes/0"
DAG_ID = "loupe_model_rollout"


def _load_cluster_module():
    path = REPO_ROOT / "infra" / "airflow-celery" / "local_cluster.py"
    spec = importlib.util.spec_from_file_location("loupe_local_cluster", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_rollout_on_celery_with_two_workers_builds_shards_in_parallel(tiny_world, tmp_path):
    lc = _load_cluster_module()
    root = tmp_path / "root"
    t0 = time.monotonic()
    with lc.LocalCeleryCluster((DAG_ID,), workers=2, concurrency=1, gpu_workers=1,
                               gpu_concurrency=2, workdir=tmp_path / "cluster") as cluster:
        assert [name.split("@")[0] for name in cluster.celery_workers()] == ["g1", "w1", "w2"]
        run_id = cluster.trigger(DAG_ID, {"loupe_root": str(root),
                                          "world_root": str(tiny_world), "model": MODEL})
        state = cluster.wait_run(DAG_ID, run_id, timeout_s=420)
        tis = cluster.task_instances(DAG_ID, run_id)
        built = dict(cluster.sql(
            "SELECT map_index, value FROM xcom WHERE dag_id = %s AND run_id = %s AND "
            "task_id = 'build_shard' AND key = 'return_value'", (DAG_ID, run_id)))
        plan = cluster.sql("SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND "
                           "task_id = 'plan' AND key = 'return_value'", (DAG_ID, run_id))[0][0]
        queue, gpu_queue, timings = cluster.queue, cluster.gpu_queue, dict(cluster.timings)
    wall = time.monotonic() - t0
    print(f"celery rollout: start-up {timings}, whole test {wall:.0f} s")
    for ti in tis:
        print(f"  {ti['task_id']}[{ti['map_index']}] {ti['state']} on {ti['worker']} "
              f"{ti['start_date']:%H:%M:%S.%f}..{ti['end_date']:%H:%M:%S.%f}")

    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    assert state == "success", states
    assert set(states.values()) <= {"success", "skipped"}, states
    for task in ("configure", "plan", "finalize_index", "canary", "cutover", "smoke_query"):
        assert states[(task, -1)] == "success", task
    assert [states[("embed_partition", i)] for i in range(8)] == ["success"] * 8
    # re-embedding went to the GPU queue and its worker; everything else to w1 / w2
    embeds = [t for t in tis if t["task_id"] == "embed_partition"]
    rest = [t for t in tis if t["task_id"] != "embed_partition"]
    assert {(t["queue"], t["worker"].split("@")[0]) for t in embeds} == {(gpu_queue, "g1")}
    assert {t["queue"] for t in rest} == {queue}
    workers = {t["worker"].split("@")[0] for t in rest if t["state"] == "success"}
    assert workers == {"w1", "w2"}, workers
    # the shard builds: in their pool, on different workers, at the same time
    shards = sorted((t for t in tis if t["task_id"] == "build_shard"),
                    key=lambda t: t["map_index"])
    assert [t["map_index"] for t in shards] == [0, 1]
    assert {t["pool"] for t in shards} == {"loupe_shard_builds"}
    assert shards[0]["worker"] != shards[1]["worker"]
    overlap = (min(t["end_date"] for t in shards) - max(t["start_date"] for t in shards))
    assert overlap.total_seconds() > 0, "shard builds did not run in parallel"
    print(f"  shard builds overlapped for {overlap.total_seconds():.2f} s")

    # the index on disk is the one the tasks reported: one model, every item once, live
    cfg = resolve_config({"loupe_root": str(root), "world_root": str(tiny_world)}, {}, {})
    assert pointer.read(cfg.index, layout.CURRENT) == plan["index_version"]
    manifest, indexes = load_version(cfg.index, plan["index_version"], verify=True)
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    assert manifest["model_version"] == MODEL and manifest["n_shards"] == 2
    assert manifest["count"] == len(catalog) == sum(m["count"] for m in built.values())
    assert {m["model_version"] for m in built.values()} == {MODEL}
    ids = np.concatenate([s.ids for s in indexes])
    assert len(ids) == len(set(ids.tolist())) == len(catalog)
    for s, shard in enumerate(indexes):
        assert built[s]["count"] == len(shard.ids)
        assert {layout.shard_of(i, 2) for i in shard.ids.tolist()} == {s}

    # the monitoring DAG's checks on the live index, exported as the dashboard's gauges
    from prometheus_client.registry import CollectorRegistry

    live, th = plan["index_version"], orch.HealthThresholds()
    checks = {name: getattr(orch, name)(cfg, live, th) for name in
              ("replay_canary", "embedding_drift", "index_age", "shard_latency")}
    assert orch.report_health(cfg, tmp_path / "monitoring-run", live, checks)["healthy"]
    registry = CollectorRegistry()
    registry.register(HealthReportCollector(cfg.runs / "monitoring" / "latest.json"))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in registry.collect() for s in family.samples}
    names = {name for name, _ in samples}
    # nothing streamed since the build: the drift PSIs are not computed, so not exported
    assert METRIC_NAMES - names == {"loupe_drift_norm_psi", "loupe_drift_neighbour_psi"}
    label = (("index_version", live),)
    assert samples[("loupe_health_healthy", label)] == 1.0
    assert samples[("loupe_index_base_items", label)] == len(catalog)
    assert samples[("loupe_canary_probe_recall", label)] == \
        checks["replay_canary"]["metrics"]["probe_recall"]
    assert {dict(k)["shard"] for n, k in samples if n == "loupe_shard_search_p99_ms"} == \
        {"0", "1"}
