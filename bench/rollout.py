"""Rollout wall time per stage on the `large` world: the real `loupe_model_rollout` DAG
(Airflow 3, `dag.test()` in a fresh process via `loupe airflow-run`) with the model-free
`attributes/0` embedder: re-embed (8 mapped partition tasks, contract-checked parquet),
shard builds (one mapped task per shard), finalize (checksums + manifest), canary, atomic
cutover, smoke query through `ShardStore`.

    .venv/bin/python bench/rollout.py [--work /tmp/loupe-bench-rollout]

`dag.test()` runs tasks one after another, so each stage's `sum_s` is what this run spent
and `max_s` is the stage's wall time when its mapped tasks run in parallel on enough
workers (LocalExecutor/Celery; the shard-build pool caps the parallelism). The re-embed
here computes attribute vectors, not a CNN: the real embedder's cost is bench/reembed.py's
images/s (projected to this catalog in bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.index import large_catalog  # noqa: E402

STAGE_ORDER = ("configure", "resolve_model", "plan", "embed_partition", "build_shard",
               "finalize_index", "canary", "cutover", "smoke_query")


def stage_times(tasks: dict[str, dict]) -> dict[str, dict]:
    """Task timings grouped by stage (mapped `task[i]` entries together): count, sum, max."""
    stages: dict[str, dict] = {}
    for name, info in tasks.items():
        stage = re.sub(r"\[\d+\]$", "", name)
        s = stages.setdefault(stage, {"tasks": 0, "sum_s": 0.0, "max_s": 0.0})
        s["tasks"] += 1
        s["sum_s"] = round(s["sum_s"] + info["seconds"], 3)
        s["max_s"] = round(max(s["max_s"], info["seconds"]), 3)
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    return dict(sorted(stages.items(), key=lambda kv: order.get(kv[0], len(order))))


def run(work: Path) -> dict:
    world = large_catalog(work)
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)  # a fresh index root: the full rollout runs
    report = work / "rollout_run.json"
    report.unlink(missing_ok=True)
    conf = {"loupe_root": str(root), "world_root": str(world), "model": "attributes/0",
            "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    root.mkdir(parents=True)
    load_start = os.getloadavg()  # shared machine: wall times depend on it
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "loupe"), "airflow-run", "loupe_model_rollout",
         "--conf", json.dumps(conf), "--airflow-home", str(work / "airflow_home"),
         "--report", str(report)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"rollout DAG failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    summary = json.loads(report.read_text())["loupe_model_rollout"]
    if summary["state"] != "success":
        raise RuntimeError(f"rollout DAG ended {summary['state']}: {summary['tasks']}")
    import pandas as pd

    return {"dag_id": summary["dag_id"], "state": summary["state"],
            "items": int(len(pd.read_parquet(world / "tables" / "catalog.parquet"))),
            "model": "attributes/0", "executor": "dag.test() (tasks in sequence)",
            "wall_seconds": summary["wall_seconds"], "stages": stage_times(summary["tasks"]),
            "loadavg": {"start": [round(x, 2) for x in load_start],
                        "end": [round(x, 2) for x in os.getloadavg()]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-bench-rollout"))
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    result = run(args.work)
    for stage, s in result["stages"].items():
        print(f"{stage:<16} tasks {s['tasks']:>2}  sum {s['sum_s']:8.2f} s  "
              f"max {s['max_s']:8.2f} s")
    print(f"wall {result['wall_seconds']:.1f} s for {result['items']} items")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
