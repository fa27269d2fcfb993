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
from typing import TYPE_CHECKING

from pipelines.config import load_section

if TYPE_CHECKING:
    import pandas as pd


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


def _serve(cfg, harvest_dir: Path | None) -> None:
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


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NO_CATEGORY = "uncategorised"


def catalog_from_folder(photos: Path) -> pd.DataFrame:
    """A catalog table for a folder of photos: one listing per photo, its category the
    sub-folder it sits in (else "uncategorised"); a folder knows no prices, so each listing
    is priced 1.0 (import a catalog table, `loupe import-catalog`, for real ones)."""
    import pandas as pd

    from pipelines.run_config import slug

    photos = Path(photos)
    if not photos.is_dir():
        raise FileNotFoundError(f"--catalog {photos}: not a directory of photos")
    files = sorted(p for p in photos.rglob("*") if p.is_file()
                   and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--catalog {photos}: no photos ({', '.join(PHOTO_SUFFIXES)}) in it")
    rows = []
    for f in files:
        rel = f.relative_to(photos)
        rows.append({"item_id": slug(str(rel.with_suffix(""))), "image_path": str(rel),
                     "category": rel.parts[0] if len(rel.parts) > 1 else NO_CATEGORY,
                     "price": 1.0, "available": True, "region": "any"})
    table = pd.DataFrame(rows)
    dupes = table["item_id"][table["item_id"].duplicated()]
    if len(dupes):
        raise ValueError(f"--catalog {photos}: photos {sorted(set(dupes))} differ only in "
                         "extension or punctuation; rename one")
    return table


def run_photo_demo(root: Path, photos: Path, serve: bool = True) -> dict:
    """A folder of real photos -> import -> pretrained COCO detector -> frozen champion ->
    rollout -> the serving stack: a searchable shop with no logs and no training. Its
    world, runs and MLflow store are its own (data/<name>, runs/<name>), apart from the
    generated demo's."""
    from pipelines.bootstrap import config_for_world, run_bootstrap
    from pipelines.import_catalog import ImportConfig, run_import
    from pipelines.run_config import slug

    root, photos = Path(root).resolve(), Path(photos).resolve()
    name = f"photos-{slug(photos.name)}"
    world, runs = root / "data" / name, root / "runs" / name
    table = catalog_from_folder(photos)
    if (world / "tables" / "catalog.parquet").is_file():
        print(f"[import] reusing {world} (delete it to import {photos} again)")
    else:
        t0 = time.perf_counter()
        runs.mkdir(parents=True, exist_ok=True)
        table.to_csv(runs / "catalog_from_folder.csv", index=False)
        imported = run_import(ImportConfig(photos, runs / "catalog_from_folder.csv", world,
                                           drop_bad_rows=True))
        print(f"[import] {imported.rows['catalog']} listings from {photos} in "
              f"{time.perf_counter() - t0:.0f} s; refused {imported.refused or 'none'}")
    cfg = config_for_world(world, runs, f"sqlite:///{runs / 'mlflow.db'}")
    t0 = time.perf_counter()
    result = run_bootstrap(cfg)
    print(f"[bootstrap] {result.model_version} (frozen pretrained) + {result.detector_version} "
          f"(COCO SSD) -> index {result.index_version} in {time.perf_counter() - t0:.0f} s")
    if serve:
        _serve(cfg, None)
    return {"world": str(world), "bootstrap": result.__dict__}


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="demo world -> retrain DAG -> rollout DAG, then where to look")
    p.add_argument("--root", type=Path, default=Path.cwd())
    p.add_argument("--params", type=Path, default=None)
    p.add_argument("--catalog", type=Path, default=None,
                   help="a folder of your photos (sub-folders = categories): cold-started "
                        "with the pretrained detector and frozen embedder instead of the "
                        "generated world")
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="stop after the rollout instead of starting the serving stack")
    p.set_defaults(func=lambda a: (run_photo_demo(a.root, a.catalog, a.serve) if a.catalog
                                   else run_demo(a.root, a.params, a.serve)) and 0)
