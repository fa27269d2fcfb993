"""`loupe demo`: the demo world through Airflow's retrain and rollout DAGs, then where to look.

Steps: generate (or reuse) the world -> the scene detector (trained and registered once,
reused after) -> `loupe_monthly_retrain` (validate, harvest, train debiased + naive, frozen
baseline, evaluate, MLflow run, challenger, promotion gate) -> `loupe_model_rollout` of the
champion (Triton version, re-embed, shard builds, canary, cutover) -> the serving stack (real
tritonserver + shard replicas + search API with the web page) over what the rollout made
live, until Ctrl-C. Both DAGs run in this process with `dag.test()` on a SQLite metadata DB
under runs/<size>/, so the demo needs no scheduler. A second `make demo` reuses the world and
the detector and trains again; the gate then keeps the champion unless the new version is
better by the margin.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.config import load_section


def _world(size: str, seed: int, root: Path) -> Path:
    from pipelines.world import generate_world, save_samples

    out = root / "data" / size
    meta = out / "world.json"
    if meta.exists() and json.loads(meta.read_text()).get("seed") == seed:
        print(f"[world] reusing {out}")
        return out
    t0 = time.perf_counter()
    summary = generate_world(size, seed, out)
    save_samples(out, root / "reports" / "world_samples.png")
    print(f"[world] {summary['counts']} in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _xcom(summary: dict, task_id: str):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        dr = session.query(DagRun).filter_by(dag_id=summary["dag_id"],
                                             run_id=summary["run_id"]).one()
        ti = dr.get_task_instances(session=session)[0]
        return ti.xcom_pull(task_ids=task_id, dag_id=dr.dag_id, run_id=dr.run_id)


def _run(dag_id: str, conf: dict, report: Path) -> dict:
    from data_contracts.durable import write_json_atomic
    from pipelines.airflow_local import run_dag

    t0 = time.perf_counter()
    summary = run_dag(dag_id, conf)
    timings = json.loads(report.read_text()) if report.is_file() else {}
    timings[dag_id] = summary
    write_json_atomic(report, timings)
    print(f"[{dag_id}] {summary['state']} in {time.perf_counter() - t0:.0f} s")
    if summary["state"] != "success":
        failed = [t for t, v in summary["tasks"].items() if v["state"] != "success"]
        raise RuntimeError(f"{dag_id} run {summary['run_id']} ended {summary['state']}; "
                           f"tasks not successful: {failed}")
    return summary


def _detector(cfg, params: Path) -> None:
    """Train and register the scene detector the rollout installs into Triton, once per
    world; its metrics stay in the MLflow run and runs/ (reports/detector.json belongs to
    the DVC stage `train_detector`)."""
    from pipelines.config import load_section
    from pipelines.train_detector import DetectorTrainConfig, register_detector, train_detector

    out = cfg.runs / "detector"
    version_file = out / "model_version.txt"
    if version_file.is_file() and (out / "export").is_dir():
        print(f"[detector] reusing {out} ({version_file.read_text().strip()})")
        return
    t0 = time.perf_counter()
    det_cfg = DetectorTrainConfig.from_params({**load_section(params, "detector"),
                                               "tracking_uri": cfg.mlflow_tracking_uri})
    result = train_detector(det_cfg, cfg.world, out)
    version = register_detector(result.run_id, cfg.mlflow_tracking_uri).model_version
    version_file.write_text(version + "\n")
    print(f"[detector] {version}: mAP@0.5 {result.metrics['map50']:.3f} "
          f"in {time.perf_counter() - t0:.0f} s")


def _serve(cfg, harvest_dir: Path) -> None:
    """Triton + shard replicas + API over what the rollout made live (its index and the
    Triton repository it installed the model into), until Ctrl-C: the served embedder is the
    live index's model version, so query and catalog vectors never come from two models."""
    from pipelines.features import write_item_features
    from pipelines.serve import serve_until_stopped
    from serving.shards import pointer

    live = pointer.live_manifest(cfg.index)
    features = write_item_features(cfg.world, harvest_dir, cfg.runs / "serve" / "features.parquet")
    serve_until_stopped(
        cfg.triton_repository, cfg.index, cfg.world, features, cfg.runs / "serve" / "run", 2,
        lambda stack, token: (
            f"\nServing {live['model_version']} (index {live['index_version']}):\n"
            f"  web demo               {stack.url}/\n"
            f"  search API             POST {stack.url}/v1/search  (docs: {stack.url}/docs)\n"
            f"  metrics                {stack.url}/metrics\n"
            f"  Triton gRPC            {stack.triton.grpc_url}\n"
            f"  admin token            {token}\n"
            "Ctrl-C stops the stack."))


def run_demo(root: Path, params: Path | None = None, serve: bool = True) -> dict:
    from pipelines.airflow_local import use_airflow_home
    from pipelines.run_config import resolve_config

    root = Path(root).resolve()
    params = Path(params or root / "params.yaml").resolve()
    world_cfg = load_section(params, "world")
    size, seed = world_cfg.get("size", "demo"), int(world_cfg.get("seed", 0))
    world = _world(size, seed, root)
    airflow_home = root / "runs" / size / "airflow_home"
    use_airflow_home(airflow_home)
    conf = {"loupe_root": str(root), "params_file": str(params), "world_root": str(world)}
    cfg = resolve_config(conf)
    _detector(cfg, params)
    report = root / "reports" / "dags.json"
    retrain = _run("loupe_monthly_retrain", conf, report)
    result = _xcom(retrain, "evaluate_and_register")
    metrics = json.loads(Path(result["eval_json"]).read_text())
    print(f"[evaluate] {result['model_version']}: rater recall@10 "
          f"{metrics['recall_at_10']:.3f} (frozen {metrics['baseline_recall_at_10']:.3f}, "
          f"naive {metrics['naive_recall_at_10']:.3f}); gate: {result['decision']['reason']}")
    rollout = _run("loupe_model_rollout", {**conf, "model": "champion"}, report)
    live = _xcom(rollout, "cutover")
    print("\nWhere to look:\n"
          f"  world sample sheet     reports/world_samples.png\n"
          f"  eval report (HTML)     {result['report_html']}\n"
          f"  eval metrics           {result['eval_json']}\n"
          f"  MLflow                 loupe mlflow-ui  (http://127.0.0.1:5000)\n"
          f"  DAG timings            {report.relative_to(root)}\n"
          f"  Airflow UI             AIRFLOW_HOME={airflow_home} .venv/bin/airflow standalone"
          "  (http://127.0.0.1:8080)\n"
          f"  live index             {live['to']}")
    if serve:
        _serve(cfg, Path(_xcom(retrain, "harvest_pairs")["harvest_dir"]))
    return {"world": str(world), "retrain": result, "rollout": live}


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="demo world -> retrain DAG -> rollout DAG, then where to look")
    p.add_argument("--root", type=Path, default=Path.cwd())
    p.add_argument("--params", type=Path, default=None)
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="stop after the rollout instead of starting the serving stack")
    p.set_defaults(func=lambda a: run_demo(a.root, a.params, a.serve) and 0)
