"""The DAG files are thin: they import cleanly, parse fast, load no heavy library, and carry
the operational settings (retries with backoff, bad input failing at once, timeouts, the
shard-build pool, the champion asset) the stages rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from pipelines.index import CanaryFailed
from pipelines.monitor import HealthBreach
from pipelines.orchestration import CHAMPION_ASSET_URI, SHARD_BUILD_POOL, alert_on_failure
from pipelines.rollout import NothingLive
from pipelines.run_config import CONFIG_ENV

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = {
    "loupe_monthly_retrain.py": "loupe_monthly_retrain",
    "loupe_model_rollout.py": "loupe_model_rollout",
    "loupe_rollback.py": "loupe_rollback",
    "loupe_stream_ingest.py": "loupe_stream_ingest",
    "loupe_weekly_compaction.py": "loupe_weekly_compaction",
    "loupe_monitoring.py": "loupe_monitoring",
}
HEAVY = ("torch", "faiss", "great_expectations", "mlflow", "pandas", "numpy", "pyarrow",
         "pytorch_lightning", "onnxruntime", "sklearn", "tritonclient")

# Like the DAG processor: a parent with Airflow loaded forks one child per file, so each file
# is timed with a module cache that holds Airflow but nothing the DAG files import.
_PARSE_EACH = f"""
import json, os, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
results = {{}}
for path in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        t0 = time.perf_counter()
        bag = DagBag(path)
        seconds = time.perf_counter() - t0
        os.write(w, json.dumps({{
            "seconds": seconds, "dags": sorted(bag.dag_ids),
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        results[os.path.basename(path)] = json.loads(pipe.read())
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


def test_every_dag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == sorted(DAG_FILES.values())
    assert sorted(p.name for p in DAGS.glob("*.py")) == sorted(DAG_FILES)


def test_each_file_parses_in_under_a_second_in_a_fresh_process_without_heavy_imports():
    run = subprocess.run([sys.executable, "-c", _PARSE_EACH, *(str(DAGS / n) for n in DAG_FILES)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(DAG_FILES)
    for name, result in results.items():
        assert result["errors"] == {}, result["errors"]
        assert result["dags"] == [DAG_FILES[name]]
        assert result["heavy"] == [], f"{name} imports {result['heavy']} at parse time"
        assert result["seconds"] < 1.0, f"{name} took {result['seconds']:.2f} s to parse"


def test_tasks_retry_with_backoff_but_fail_at_once_on_bad_input(dagbag):
    for dag in dagbag.dags.values():
        assert not dag.catchup and dag.max_active_runs == 1, dag.dag_id
        for task in dag.tasks:
            where = f"{dag.dag_id}.{task.task_id}"
            assert task.execution_timeout is not None and \
                task.execution_timeout <= timedelta(hours=3), where
            callbacks = task.on_failure_callback  # a list, or one function on mapped tasks
            assert (callbacks if isinstance(callbacks, list) else [callbacks]) == [
                alert_on_failure], where
            if task.retries:
                assert task.retry_exponential_backoff == 2.0, where
                assert task.max_retry_delay == timedelta(minutes=10), where
            for exc in (ValueError("bad table"), FileNotFoundError("x"), CanaryFailed("c"),
                        HealthBreach("h"), NothingLive("n")):
                assert task.retry_policy.evaluate(exc, 1, 3).action.value == "fail", where
            assert task.retry_policy.evaluate(ConnectionError("db"), 1, 3).action.value == \
                "default", where


def test_every_dag_takes_its_paths_as_params(dagbag):
    for dag in dagbag.dags.values():
        assert set(CONFIG_ENV) <= set(dag.params), dag.dag_id
        assert all(dag.params[k] is None for k in CONFIG_ENV), dag.dag_id


def test_rollout_is_asset_scheduled_mapped_and_pooled(dagbag):
    rollout = dagbag.dags["loupe_model_rollout"]
    assert [a.uri for a in rollout.timetable.asset_condition.objects] == [CHAMPION_ASSET_URI]
    assert rollout.params["model"] == "champion" and rollout.params["dry_run"] is False
    tasks = rollout.task_dict
    assert tasks["build_shard"].pool == SHARD_BUILD_POOL
    assert tasks["embed_partition"].max_active_tis_per_dagrun == 4
    assert {"embed_partition", "build_shard"} <= {t.task_id for t in rollout.tasks
                                                  if t.is_mapped}
    chain = ["plan", "list_partitions", "embed_partition", "build_shard", "finalize_index",
             "canary", "cutover", "smoke_query"]
    for up, down in zip(chain, chain[1:], strict=False):
        assert up in tasks[down].upstream_task_ids, (up, down)
    # the rollout lease taken in `plan` is given back however the run ends
    assert tasks["release_lease"].is_teardown
    assert tasks["release_lease"].upstream_task_ids == {"configure", "smoke_query"}
    # the Triton export runs beside the re-embedding and gates the cutover; a skipped export
    # (attribute vectors) does not skip the cutover, a failed one stops it
    assert {"plan"} <= tasks["export_triton"].upstream_task_ids
    assert not {"embed_partition", "build_shard", "canary"} & \
        tasks["export_triton"].upstream_task_ids
    assert {"export_triton", "canary"} <= tasks["cutover"].upstream_task_ids
    assert tasks["cutover"].trigger_rule == "none_failed"
    assert rollout.params["detector"] is None
    pools = json.loads((DAGS / "pools.json").read_text())
    assert pools[SHARD_BUILD_POOL]["slots"] >= 1 and pools[SHARD_BUILD_POOL]["description"]
    used = {t.pool for d in dagbag.dags.values() for t in d.tasks} - {"default_pool"}
    assert used <= set(pools)


def test_schedules(dagbag):
    schedules = {d.dag_id: d.schedule for d in dagbag.dags.values()}
    assert schedules["loupe_monthly_retrain"] == "@monthly"
    assert schedules["loupe_weekly_compaction"] == "@weekly"
    assert schedules["loupe_monitoring"] == "@hourly"
    assert schedules["loupe_stream_ingest"] == timedelta(minutes=5)
    assert schedules["loupe_rollback"] is None


def test_the_rollout_form_leads_with_what_the_operator_decides(dagbag):
    """The trigger form: the model first, the dry-run switch and canary thresholds next,
    paths last in their own (collapsed) section."""
    from pipelines.orchestration import PATHS_SECTION

    params = dagbag.dags["loupe_model_rollout"].params
    keys = list(params.keys())
    assert keys[:4] == ["model", "dry_run", "canary_min_rater_recall",
                        "canary_min_exact_overlap"]
    schema = {k: params.get_param(k).schema for k in keys}
    assert {"champion", "challenger"} <= set(schema["model"]["examples"])
    assert {k for k, s in schema.items() if s.get("section") == PATHS_SECTION} == set(
        CONFIG_ENV)
    assert keys[-len(CONFIG_ENV):] == list(CONFIG_ENV)
    for dag_id in ("loupe_rollback", "loupe_monthly_retrain"):
        dag_params = dagbag.dags[dag_id].params
        assert all(dag_params.get_param(k).schema["section"] == PATHS_SECTION
                   for k in CONFIG_ENV)


def test_canary_thresholds_from_the_form_override_params_yaml():
    from pipelines.index import CanaryParams
    from pipelines.rollout import canary_thresholds

    base = CanaryParams()
    chosen = canary_thresholds(base, {"min_rater_recall": 0.5, "min_exact_overlap": None})
    assert (chosen.min_rater_recall, chosen.min_exact_overlap) == (0.5,
                                                                  base.min_exact_overlap)
    assert canary_thresholds(base, None) == base
    with pytest.raises(ValueError, match="unknown canary threshold"):
        canary_thresholds(base, {"min_recal": 0.5})
