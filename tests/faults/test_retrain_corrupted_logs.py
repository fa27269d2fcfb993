"""Corrupted impression logs into the monthly retrain DAG (real Airflow `dag.test()`, real
GE contracts, real MLflow on SQLite): every corruption stops the run at `validate_logs`,
on its first try, before harvesting or training, and nothing reaches MLflow.

The null-position case is in tests/e2e/test_dags.py and every expectation has a unit test
in tests/data/test_contracts.py; here, one DAG run (~12 s each) for each of two ways an
export goes wrong as a whole: a truncated file (unreadable), and rows naming items the
catalog does not know (readable, contract broken). Each bad file must end in quarantine
with its report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def _replace(table: pa.Table, column: str, values) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(column),
                            pa.array(values, type=table.schema.field(column).type))


def _corruptions(table: pa.Table, raw: bytes) -> dict[str, bytes | pa.Table]:
    every = np.arange(table.num_rows) % 50 == 0
    items = table.column("item_id").to_numpy(zero_copy_only=False).copy()
    items[every] = "ghost-item"
    return {
        "truncated parquet": raw[: len(raw) // 2],
        "unknown item ids": _replace(table, "item_id", items),
    }


def test_corrupted_impression_logs_stop_the_retrain_before_training(tiny_world, tmp_path,
                                                                     counts):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db
    from mlflow import MlflowClient

    from pipelines.run_config import REPO_ROOT, resolve_config

    db.initdb()
    world = tmp_path / "world"
    shutil.copytree(tiny_world / "tables", world / "tables")
    (world / "images").symlink_to(tiny_world / "images")
    impressions = world / "tables" / "impressions.parquet"
    original = impressions.read_bytes()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    conf = {"loupe_root": str(tmp_path / "root"), "world_root": str(world),
            "mlflow_tracking_uri": tracking}
    cfg = resolve_config(conf, {}, {})
    cases = _corruptions(pq.read_table(impressions), original)
    counts.tried(f"{len(cases)} corrupted impression logs ({', '.join(cases)}) into "
                 "loupe_monthly_retrain via dag.test()")
    stopped, leaked, quarantined = [], [], 0
    for name, corrupt in cases.items():
        if isinstance(corrupt, bytes):
            impressions.write_bytes(corrupt)
        else:
            pq.write_table(corrupt, impressions)
        corrupted = impressions.read_bytes()
        dag = DagBag(str(REPO_ROOT / "dags" / "loupe_monthly_retrain.py")).dags[
            "loupe_monthly_retrain"]
        dr = dag.test(run_conf=conf)
        state: dict[str, set[str]] = {}  # task id -> states (of every map index)
        for ti in dr.get_task_instances():
            state.setdefault(ti.task_id, set()).add(str(getattr(ti.state, "value", ti.state)))
        tries = {ti.try_number for ti in dr.get_task_instances() if ti.task_id == "validate_logs"}
        run_dir = cfg.run_dir(dr.dag_id, dr.run_id)
        if (dr.state == "failed" and state["validate_logs"] == {"failed"} and tries == {1}
                and state["harvest_pairs"] == state["train_embedder"] == {"upstream_failed"}
                and state["evaluate_and_register"] == {"upstream_failed"}):
            stopped.append(name)
        if (run_dir / "harvest").exists() or (run_dir / "models").exists():
            leaked.append(name)
        # a copy quarantined with its report; the user's file untouched
        copies = list(cfg.quarantine_dir.glob("*_impressions/impressions.parquet"))
        moved = (impressions.read_bytes() == corrupted
                 and any(c.read_bytes() == corrupted for c in copies))
        quarantined += moved
        impressions.write_bytes(original)
        print(f"  {name}: run {dr.state}, validate_logs {state['validate_logs']}, "
              f"quarantined {moved}")
    client = MlflowClient(tracking, tracking)
    registered = client.search_registered_models()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments) if experiments else []
    counts.add(retrain_corruptions=len(cases), retrain_stopped_at_validation=len(stopped),
               retrain_reached_harvest_or_training=len(leaked),
               retrain_logs_quarantined=quarantined,
               retrain_mlflow_registered=len(registered), retrain_mlflow_runs=len(runs))
    assert stopped == list(cases), set(cases) - set(stopped)
    assert leaked == [] and registered == [] and runs == []
    assert quarantined == len(cases)  # a truncated file included (pipelines/validate.py)
    alerts = sorted(Path(cfg.alerts_dir).glob("*validate_logs*.json"))
    assert len(alerts) == len(cases)
