"""The three pages a person decides with, opened in a real browser (Debian's chromium via
Playwright) over the real servers, as docs/screenshots/*.png:

- eval_report.png: the evaluation report of a trained candidate against the registered
  champion (the gate's decision first, per-category recall with CIs, improved/regressed);
- mlflow_training_run.png: the training run's MLflow page (dataset inputs with digests,
  the per-epoch curves, system metrics), served by `mlflow ui` over the same store;
- rollout_trigger_form.png: the rollout DAG's trigger form in Airflow's own UI
  (`airflow api-server`), which leads with the model to roll out.

    .venv/bin/python bench/screenshots.py            # ~4 min on 2 cores (tiny world)

Everything runs under a scratch folder (--work); nothing outside it or docs/screenshots is
written. Library logs go to <work>/screenshots.log.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "docs" / "screenshots"
VIEWPORT = {"width": 1400, "height": 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def train_and_evaluate(work: Path, uri: str) -> tuple[Path, str]:
    """Tiny world -> harvest -> run_train (its own MLflow run) -> run_evaluate against the
    frozen champion; returns the report's path and the training run id."""
    from pipelines.evaluate import EvaluateConfig, run_evaluate
    from pipelines.harvest import HarvestConfig, harvest
    from pipelines.pretrained import register_frozen_embedder
    from pipelines.train import TrainConfig, run_train
    from pipelines.world import generate_world

    world = work / "world"
    if not (world / "tables" / "catalog.parquet").is_file():
        generate_world("tiny", 0, world)
    print("  world: tiny, generated", flush=True)
    pairs = harvest(world, work / "harvest", HarvestConfig(bootstrap=20),
                    quarantine_dir=work / "quarantine").out_dir / "pairs_debiased.parquet"
    print("  harvest: position-debiased pairs", flush=True)
    register_frozen_embedder(uri)
    cfg = TrainConfig(backbone="efficientnet-lite0", tuned_blocks=0, tune_conv_head=False,
                      views=2, batch_size=64, max_epochs=6, patience=100, progress_bar=False)
    trained = run_train(cfg, world, pairs, work / "train", cache_dir=work / "cache",
                        tracking_uri=uri, system_metrics_interval_s=1.0)
    print(f"  train: {cfg.max_epochs} epochs, MLflow run {trained.metrics['mlflow_run_id']}",
          flush=True)
    evaluated = run_evaluate(EvaluateConfig(), world, trained.export_dir, {}, work / "eval",
                             train_json=work / "train" / "train.json", tracking_uri=uri)
    print(f"  evaluate: candidate {evaluated.published.model_version}, "
          f"recall@10 {evaluated.report.headline:.3f}", flush=True)
    return work / "eval" / "eval_report.html", trained.metrics["mlflow_run_id"]


def shoot_report(page, report: Path) -> Path:
    page.goto(report.as_uri())
    page.wait_for_load_state("networkidle")
    out = OUT / "eval_report.png"
    page.screenshot(path=str(out), full_page=True)
    return out


def shoot_mlflow(page, uri: str, run_id: str, work: Path, log: Path) -> Path:
    from mlflow import MlflowClient

    from pipelines.registry import mlflow_ui_command

    experiment = MlflowClient(uri, uri).get_run(run_id).info.experiment_id
    port = _free_port()
    proc = _spawn(mlflow_ui_command(uri, port), dict(os.environ), log)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", 120, proc, log)
        page.goto(f"{base}/#/experiments/{experiment}/runs/{run_id}")
        page.get_by_text("train_loss_epoch").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)  # the charts draw after the data arrives
        out = OUT / "mlflow_training_run.png"
        page.screenshot(path=str(out), full_page=True)
        page.goto(f"{base}/#/experiments/{experiment}/runs/{run_id}/model-metrics")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(OUT / "mlflow_training_curves.png"), full_page=True)
        page.goto(f"{base}/#/experiments/{experiment}/runs/{run_id}/system-metrics")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(OUT / "mlflow_system_metrics.png"), full_page=True)
        return out
    finally:
        _stop(proc)


def shoot_trigger_form(page, work: Path, log: Path) -> Path:
    """Airflow 3's api-server on a SQLite home holding only the rollout DAG (serialised by
    `airflow dags reserialize`); the Trigger button opens the form."""
    home = work / "airflow_home"
    dags = work / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    for name in ("loupe_model_rollout.py",):
        link = dags / name
        if not link.exists():
            link.symlink_to(REPO / "dags" / name)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
                "AIRFLOW__API_AUTH__JWT_SECRET": "screenshots-only",
                "PYTHONPATH": str(REPO),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    airflow = str(Path(sys.executable).parent / "airflow")
    with log.open("ab") as sink:
        for args in (("db", "migrate"), ("dags", "reserialize")):
            subprocess.run([airflow, *args], env=env, stdout=sink, stderr=subprocess.STDOUT,
                           check=True, timeout=600)
    proc = _spawn([airflow, "api-server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/v2/version", 180, proc, log)
        page.goto(f"{base}/dags/loupe_model_rollout")
        page.get_by_role("button", name="Trigger").first.click(timeout=60_000)
        page.get_by_text("Model to roll out").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        out = OUT / "rollout_trigger_form.png"
        page.screenshot(path=str(out))
        return out
    finally:
        _stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed: `make browser` installs it")
    work = (args.work or Path(tempfile.mkdtemp(prefix="loupe-shots-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "screenshots.log"
    uri = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: scratch {work}, library logs {log}", flush=True)
    report, run_id = train_and_evaluate(work, uri)

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        shots = [shoot_report(page, report), shoot_mlflow(page, uri, run_id, work, log),
                 shoot_trigger_form(page, work, log)]
        browser.close()
    for shot in shots:
        print(f"  {shot.relative_to(REPO)}: {shot.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
