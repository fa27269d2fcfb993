"""`dvc repro` runs the offline pipeline from dvc.yaml + params.yaml on the tiny world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_dvc_repro_tiny_world(tmp_path):
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    for pkg in ("pipelines", "data_contracts", "models"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"]["size"] = "tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the copied packages, not the editable install of the checkout, and a store of its own:
    # the tiny world's model must not be registered in the user's registry
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               LOUPE_ROOT=str(tmp_path))

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    from pipelines.pretrained import register_frozen_embedder
    from pipelines.registry import CHALLENGER, CHAMPION, RegistryConfig, version_for_alias

    serving = register_frozen_embedder(env["MLFLOW_TRACKING_URI"])  # a champion in service
    run = dvc("repro", "evaluate")  # online_study is tested in tests/code (minutes of replications)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = json.loads((tmp_path / "reports/harvest.json").read_text())
    assert metrics["propensity_mae"] < 0.12
    assert json.loads((tmp_path / "reports/validate_tiny.json").read_text())
    assert (tmp_path / "runs/tiny/harvest/pairs_debiased.parquet").exists()
    assert (tmp_path / "dvc.lock").exists()
    # train (debiased + naive), baseline and evaluate: the metrics file the closing note quotes
    evaluation = json.loads((tmp_path / "reports/eval.json").read_text())
    assert {"recall_at_10", "baseline_recall_at_10", "naive_recall_at_10", "recall_at_k",
            "train_seconds"} <= set(evaluation)
    assert set(evaluation["recall_at_k"]) == {"1", "5", "10", "50"}
    assert (tmp_path / "reports/eval/eval_report.html").stat().st_size > 10_000
    # the candidate was registered as challenger in the test's own store; champion untouched
    # (promotion is the retrain DAG's gate or `loupe promote`, never a pipeline stage)
    store = RegistryConfig(env["MLFLOW_TRACKING_URI"])
    assert version_for_alias(store, CHAMPION).model_version == serving == "loupe-embedder/1"
    assert version_for_alias(store, CHALLENGER).model_version == "loupe-embedder/2"
    # rater recall@K as a data series DVC plots (and `dvc plots diff` compares)
    shown = dvc("plots", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    series = json.loads(shown.stdout)["data"]["rater recall@K"][0]["content"]["data"][
        "values"]
    assert {(row["k"], row["rev"]) for row in series} >= {("1", "workspace"),
                                                         ("50", "workspace")}
    assert {row["field"] for row in series} == {"model", "frozen_pretrained", "naive_click"}
    # the train run records its per-epoch curve and the resolved package versions
    trained = json.loads((tmp_path / "runs/tiny/train_debiased/train.json").read_text())
    assert trained["curve"] and trained["versions"]["torch"].startswith("2.13.0")
    # nothing changed: a second repro runs no stage
    again = dvc("repro", "evaluate")
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr
    # the retrain DAG on the same world and params.yaml, in a root of its own (cold caches,
    # its own MLflow store): the same headline numbers as `dvc repro` (issue 21)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.initdb()
    dag_root = tmp_path / "dag_root"
    dag = DagBag(str(REPO / "dags" / "loupe_monthly_retrain.py")).dags["loupe_monthly_retrain"]
    dr = dag.test(run_conf={"loupe_root": str(dag_root), "world_root": str(tmp_path / "data/tiny"),
                            "params_file": str(tmp_path / "params.yaml"),
                            "mlflow_tracking_uri": f"sqlite:///{dag_root / 'mlflow.db'}"})
    assert str(dr.state) in ("success", "DagRunState.SUCCESS"), dr.state
    [by_dag] = list(dag_root.rglob("reports/eval.json"))
    by_dag = json.loads(by_dag.read_text())
    for key in ("recall_at_10", "naive_recall_at_10", "baseline_recall_at_10", "recall_at_k"):
        assert by_dag[key] == evaluation[key], key
