"""Run the project's DAGs with a local Airflow: `loupe airflow-run <dag_id>` is one in-process
`dag.test()` run (tasks one after another) on a SQLite metadata DB, with per-task wall times;
`use_airflow_home` points Airflow at that DB and `dags/` before Airflow is first imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_contracts.durable import write_json_atomic
from pipelines.run_config import REPO_ROOT

DAGS_FOLDER = REPO_ROOT / "dags"


def use_airflow_home(airflow_home: Path) -> None:
    """Point Airflow at a home (SQLite metadata DB) and the project's DAGs; must run before
    the first `import airflow` of the process, which reads its configuration once."""
    import sys

    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(airflow_home):
        raise RuntimeError("airflow is already imported with another AIRFLOW_HOME; run this "
                           "in a fresh process")
    Path(airflow_home).mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(airflow_home)
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def ensure_pools() -> list[str]:
    """Create or update the pools of `dags/pools.json` (the scheduler does not run a task
    whose pool is missing)."""
    from airflow.models.pool import Pool

    pools = json.loads((DAGS_FOLDER / "pools.json").read_text())
    for name, spec in pools.items():
        Pool.create_or_update_pool(name, int(spec["slots"]), spec["description"],
                                   bool(spec.get("include_deferred", False)))
    return sorted(pools)


def run_dag(dag_id: str, conf: Mapping[str, Any]) -> dict:
    """One in-process run of a DAG (`dag.test()`: tasks one after another) on the metadata
    DB of $AIRFLOW_HOME; returns its state and per-task wall times."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.initdb()
    ensure_pools()
    path = DAGS_FOLDER / f"{dag_id}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no DAG file {path}")
    bag = DagBag(str(path))
    if bag.import_errors:
        raise ValueError(f"{path} does not import: {bag.import_errors}")
    return dag_run_summary(bag.dags[dag_id].test(run_conf=dict(conf)))


def dag_run_summary(dag_run: Any) -> dict:
    """State, wall time and each task's state and duration (mapped tasks as `task[i]`)."""
    tasks = {}
    for ti in sorted(dag_run.get_task_instances(),
                     key=lambda t: (t.start_date or dag_run.end_date, t.map_index)):
        name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tasks[name] = {"state": str(getattr(ti.state, "value", ti.state)),
                       "seconds": round(float(ti.duration or 0.0), 3)}
    return {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id,
            "state": str(getattr(dag_run.state, "value", dag_run.state)),
            "wall_seconds": round((dag_run.end_date - dag_run.start_date).total_seconds(), 3),
            "conf": dict(dag_run.conf or {}), "tasks": tasks}


def add_cli(sub) -> None:
    p = sub.add_parser("airflow-run", help="run a Loupe DAG in-process (dag.test) and report "
                                           "per-task wall times")
    p.add_argument("dag_id", help="e.g. loupe_monthly_retrain, loupe_model_rollout")
    p.add_argument("--conf", default="{}", help="run params as JSON, e.g. "
                                                "'{\"model\": \"champion\"}'")
    p.add_argument("--airflow-home", type=Path, default=None,
                   help="default: $AIRFLOW_HOME, else ./runs/airflow_home")
    p.add_argument("--report", type=Path, default=None,
                   help="merge the run's timings into this JSON file (e.g. reports/dags.json)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    conf = json.loads(args.conf)
    if not isinstance(conf, dict):
        raise ValueError(f"--conf must be a JSON object, got {args.conf!r}")
    home = args.airflow_home or Path(os.environ.get("AIRFLOW_HOME", "runs/airflow_home"))
    use_airflow_home(home.resolve())
    summary = run_dag(args.dag_id, conf)
    if args.report is not None:
        report = json.loads(args.report.read_text()) if args.report.is_file() else {}
        report[args.dag_id] = summary
        write_json_atomic(args.report, report)
    print(json.dumps(summary, indent=1))
    return 0 if summary["state"] == "success" else 1


def running_tasks(dag_id: str) -> str:
    """What the newest run of `dag_id` is doing: tasks finished of all, and which run now
    (the demo's heartbeat while `dag.test()` runs the DAG in this process)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        dr = (session.query(DagRun).filter(DagRun.dag_id == dag_id)
              .order_by(DagRun.id.desc()).first())
        if dr is None:
            return "starting"
        tis = dr.get_task_instances(session=session)
        done = sum(1 for ti in tis if str(getattr(ti.state, "value", ti.state)) in
                   ("success", "skipped", "failed", "upstream_failed"))
        running = sorted({ti.task_id for ti in tis
                          if str(getattr(ti.state, "value", ti.state)) == "running"})
    return f"{done}/{len(tis)} tasks done" + (f", running {', '.join(running)}"
                                              if running else "")
