"""`dvc repro` runs the offline pipeline from dvc.yaml + params.yaml on the tiny world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DvcProject:
    root: Path
    env: dict
    champion: str  # the registered champion in service before any repro

    def sh(self, *cmd: str, timeout: int = 900) -> str:
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def dvc(self, *args: str, timeout: int = 900) -> str:
        return self.sh(sys.executable, "-m", "dvc", *args, timeout=timeout)


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> DvcProject:
    """A git + DVC project of the copied packages on the tiny world (short training), a
    champion in service, `dvc repro evaluate` run once and committed as the baseline."""
    root = tmp_path_factory.mktemp("dvc-project")
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    for pkg in ("pipelines", "data_contracts", "models", "bench"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"]["size"] = "tiny"
    params["train"].update(max_epochs=2, views=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # the copied packages, not the editable install of the checkout, and a store of its own:
    # the tiny world's model must not be registered in the user's registry
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(root), MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db",
               LOUPE_ROOT=str(root), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n")
    from pipelines.pretrained import register_frozen_embedder

    project = DvcProject(root, env, register_frozen_embedder(env["MLFLOW_TRACKING_URI"]))
    project.sh("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("repro", "evaluate")  # online_study is tested in tests/code (minutes)
    project.sh("git", "add", "-A")
    project.sh("git", "commit", "-qm", "baseline")
    return project


@pytest.mark.e2e
def test_dvc_repro_tiny_world(repro, tmp_path):
    from pipelines.registry import CHALLENGER, CHAMPION, RegistryConfig, version_for_alias

    root, env = repro.root, repro.env
    metrics = json.loads((root / "reports/harvest.json").read_text())
    assert metrics["propensity_mae"] < 0.12
    assert json.loads((root / "reports/validate_tiny.json").read_text())
    assert (root / "runs/tiny/harvest/pairs_debiased.parquet").exists()
    assert (root / "dvc.lock").exists()
    # train (debiased + naive), baseline and evaluate: the metrics file the closing note quotes
    evaluation = json.loads((root / "reports/eval.json").read_text())
    assert {"recall_at_10", "baseline_recall_at_10", "naive_recall_at_10", "recall_at_k",
            "train_seconds"} <= set(evaluation)
    assert set(evaluation["recall_at_k"]) == {"1", "5", "10", "50"}
    assert (root / "reports/eval/eval_report.html").stat().st_size > 10_000
    # the candidate was registered as challenger in the test's own store; champion untouched
    # (promotion is the retrain DAG's gate or `loupe promote`, never a pipeline stage)
    store = RegistryConfig(env["MLFLOW_TRACKING_URI"])
    assert version_for_alias(store, CHAMPION).model_version == repro.champion \
        == "loupe-embedder/1"
    assert version_for_alias(store, CHALLENGER).model_version == "loupe-embedder/2"
    # rater recall@K as a data series DVC plots (and `dvc plots diff` compares)
    series = json.loads(repro.dvc("plots", "show", "--json"))["data"]["rater recall@K"][0][
        "content"]["data"]["values"]
    assert {(row["k"], row["rev"]) for row in series} >= {("1", "workspace"),
                                                         ("50", "workspace")}
    assert {row["field"] for row in series} == {"model", "frozen_pretrained", "naive_click"}
    # the train run records its per-epoch curve and the resolved package versions
    trained = json.loads((root / "runs/tiny/train_debiased/train.json").read_text())
    assert trained["curve"] and trained["versions"]["torch"].startswith("2.13.0")
    # nothing changed: a second repro runs no stage
    assert "didn't change" in repro.dvc("repro", "evaluate")
    # the retrain DAG on the same world and params.yaml, in a root of its own (cold caches,
    # its own MLflow store): the same headline numbers as `dvc repro` (issue 21)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.initdb()
    dag_root = tmp_path / "dag_root"
    dag = DagBag(str(REPO / "dags" / "loupe_monthly_retrain.py")).dags["loupe_monthly_retrain"]
    dr = dag.test(run_conf={"loupe_root": str(dag_root), "world_root": str(root / "data/tiny"),
                            "params_file": str(root / "params.yaml"),
                            "mlflow_tracking_uri": f"sqlite:///{dag_root / 'mlflow.db'}"})
    assert str(dr.state) in ("success", "DagRunState.SUCCESS"), dr.state
    [by_dag] = list(dag_root.rglob("reports/eval.json"))
    by_dag = json.loads(by_dag.read_text())
    for key in ("recall_at_10", "naive_recall_at_10", "baseline_recall_at_10", "recall_at_k"):
        assert by_dag[key] == evaluation[key], key


@pytest.mark.e2e
@pytest.mark.slow
def test_seed_study_runs_as_queued_dvc_experiments(repro):
    """`make seed-study`'s commands on the tiny world: one queued experiment per seed, run by
    DVC's queue (only the seed's stages re-run), summarised by bench/seed_study.py; the
    workspace's params and the registry's champion stay as they were."""
    from pipelines.registry import CHAMPION, RegistryConfig, version_for_alias

    root, env = repro.root, repro.env
    for seed in (1, 2):
        repro.dvc("exp", "run", "--queue", "evaluate", "-S", f"train.seed={seed}",
                  "-n", f"seed-{seed}")
    repro.dvc("exp", "run", "--run-all", "--jobs", "1", timeout=1800)
    repro.sh(sys.executable, "bench/seed_study.py", "--out", str(root / "seed_study.json"))
    study = json.loads((root / "seed_study.json").read_text())
    assert study["seeds"] == [1, 2]
    for row in study["per_seed"]:
        assert 0.0 < row["naive_recall_at_10"] <= 1.0 and 0.0 < row["frozen_recall_at_10"]
        assert row["gap"] == pytest.approx(row["debiased_recall_at_10"]
                                           - row["naive_recall_at_10"])
        lo, hi = row["gap_ci95_over_queries"]  # from the experiment's own eval.json
        assert lo <= row["gap"] + 1e-4 and row["gap"] - 1e-4 <= hi
    lo, hi = study["gap_ci95_over_seeds"]
    assert lo <= study["gap_mean"] <= hi
    assert study["gap_mean"] == pytest.approx(np.mean([r["gap"] for r in study["per_seed"]]),
                                              abs=1e-4)
    # experiments ran beside the workspace, not in it
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["seed"] == 0
    store = RegistryConfig(env["MLFLOW_TRACKING_URI"])
    assert version_for_alias(store, CHAMPION).model_version == repro.champion
