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

The console (pipelines.console) shows a plan with each stage's rough duration (measured on
this machine once a run has, runs/<size>/demo_timings.json), one line per stage, a
heartbeat at least every 30 s, and the serving banner last; every library's output goes to
runs/<size>/demo.log, named on the first line. `loupe demo --catalog DIR` is the real-photo
demo (`run_photo_demo`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import load_section

if TYPE_CHECKING:
    import pandas as pd


# rough wall times on a quiet 2-core machine, until this machine has measured its own
# (runs/<size>/demo_timings.json, written after every stage)
DEFAULT_SECONDS = {
    "tiny": {"first": 60, "world": 20, "detector": 60, "loupe_monthly_retrain": 150,
             "loupe_model_rollout": 40},
    "demo": {"first": 150, "world": 840, "detector": 1020, "loupe_monthly_retrain": 900,
             "loupe_model_rollout": 240},
}


@dataclass
class Timings:
    """Per-stage wall times of earlier demo runs on this machine (the plan's estimates)."""

    path: Path
    size: str

    def load(self) -> dict[str, float]:
        measured = json.loads(self.path.read_text()) if self.path.is_file() else {}
        return {**DEFAULT_SECONDS.get(self.size, DEFAULT_SECONDS["demo"]), **measured}

    def record(self, stage: str, seconds: float) -> None:
        from data_contracts.durable import write_json_atomic

        measured = json.loads(self.path.read_text()) if self.path.is_file() else {}
        measured[stage] = round(seconds, 1)
        write_json_atomic(self.path, measured)

    def measured(self) -> bool:
        return self.path.is_file()


def _world_ready(out: Path, seed: int) -> bool:
    """The whole world of this seed is there (not only the first shop's slice of it)."""
    meta = out / "world.json"
    if not meta.exists():
        return False
    info = json.loads(meta.read_text())
    return info.get("seed") == seed and "first_catalog" not in info


def _world(size: str, seed: int, root: Path) -> tuple[Path, str]:
    from pipelines.world import generate_world, save_samples

    out = root / "data" / size
    summary = generate_world(size, seed, out)
    save_samples(out, root / "reports" / "world_samples.png")
    counts = summary["counts"]
    return out, ", ".join(f"{v:,} {k}" for k, v in counts.items())


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

    summary = run_dag(dag_id, conf)
    timings = json.loads(report.read_text()) if report.is_file() else {}
    timings[dag_id] = summary
    write_json_atomic(report, timings)
    if summary["state"] != "success":
        failed = [t for t, v in summary["tasks"].items() if v["state"] != "success"]
        raise RuntimeError(f"{dag_id} run {summary['run_id']} ended {summary['state']}; "
                           f"tasks not successful: {failed}")
    return summary


def _detector_version(cfg) -> str | None:
    out = cfg.runs / "detector"
    version_file = out / "model_version.txt"
    if version_file.is_file() and (out / "export").is_dir():
        return version_file.read_text().strip()
    return None


def _detector(cfg, params: Path) -> str:
    """Train and register the scene detector the rollout installs into Triton, once per
    world; its metrics stay in the MLflow run and runs/ (reports/detector.json belongs to
    the DVC stage `train_detector`)."""
    from pipelines.config import load_section
    from pipelines.train_detector import DetectorTrainConfig, register_detector, train_detector

    out = cfg.runs / "detector"
    det_cfg = DetectorTrainConfig.from_params({**load_section(params, "detector"),
                                               "tracking_uri": cfg.mlflow_tracking_uri})
    result = train_detector(det_cfg, cfg.world, out)
    version = register_detector(result.run_id, cfg.mlflow_tracking_uri).model_version
    (out / "model_version.txt").write_text(version + "\n")
    return f"{version}: mAP@0.5 {result.metrics['map50']:.3f} on held-out scenes"


def _serve(cfg, harvest_dir: Path | None, say=print) -> None:
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
            "Ctrl-C stops the stack."), say=say)


FIRST_ITEMS = 3000  # listings of the first shop: searchable in ~2 min on 2 cores
FIRST_DETECTOR = {"input_size": 128, "epochs": 12, "batch_size": 8, "lr": 4e-3,
                  "latency_runs": 3, "grid_scenes": 2, "val_every_n_epochs": 12}


def _first_shop(cfg, size: str, seed: int, whole_world: bool, console) -> None:
    """The first searchable shop: FIRST_ITEMS of the world's listings
    (`generate_first_catalog`; the whole catalog when the world is already there), a
    detector trained for seconds on a tiny world's scenes, and the frozen embedder as
    champion unless one exists (`loupe bootstrap`)."""
    from pipelines.bootstrap import run_bootstrap
    from pipelines.train_detector import DetectorTrainConfig, register_detector, train_detector
    from pipelines.world import generate_first_catalog, generate_world

    if not whole_world:
        first = generate_first_catalog(size, seed, cfg.world, FIRST_ITEMS)
        console.say(f"[first] {first['first_catalog']:,} of {first['of_items']:,} listings "
                    "rendered")
    scenes = cfg.runs / "first" / "tiny_world"
    generate_world("tiny", seed, scenes)
    det = train_detector(DetectorTrainConfig.from_params({
        **FIRST_DETECTOR, "tracking_uri": cfg.mlflow_tracking_uri}), scenes,
        cfg.runs / "first" / "detector")
    version = register_detector(det.run_id, cfg.mlflow_tracking_uri).model_version
    console.say(f"[first] {version}: trained {det.metrics['seconds']:.0f} s on "
                f"{det.metrics['train_scenes']} tiny-world scenes, mAP@0.5 "
                f"{det.metrics['map50']:.2f} there")
    # not the champion: the first retrain's challenger becomes that, and rolls out with the
    # world's own detector (one Triton version serves one embedder with one detector)
    result = run_bootstrap(cfg, detector=version, champion=False)
    console.say(f"[first] {result.model_version} (frozen pretrained) -> index "
                f"{result.index_version}")


def run_demo(root: Path, params: Path | None = None, serve: bool = True,
             heartbeat_s: float = 30.0) -> dict:
    """The generated-world demo with a quiet console (pipelines.console). With `serve`, a
    first shop is searchable within minutes (a slice of the catalog, the frozen embedder, a
    quickly trained detector), and the retrain -> rollout replaces it live through the
    search API's cutover; a second run serves the live index at once."""
    import secrets

    from pipelines.airflow_local import running_tasks, use_airflow_home
    from pipelines.console import DemoConsole
    from pipelines.features import write_item_features
    from pipelines.run_config import resolve_config
    from serving.shards import pointer
    from serving.stack import ServingStack

    root = Path(root).resolve()
    params = Path(params or root / "params.yaml").resolve()
    world_cfg = load_section(params, "world")
    size, seed = world_cfg.get("size", "demo"), int(world_cfg.get("seed", 0))
    runs = root / "runs" / size
    timings = Timings(runs / "demo_timings.json", size)
    est = timings.load()
    world = root / "data" / size
    airflow_home = runs / "airflow_home"
    use_airflow_home(airflow_home)
    conf = {"loupe_root": str(root), "params_file": str(params), "world_root": str(world)}
    cfg = resolve_config(conf)
    reuse_world = _world_ready(world, seed)
    reuse_detector = reuse_world and _detector_version(cfg) is not None
    live_before = pointer.read(cfg.index) if reuse_world else None
    log_path = runs / "demo.log"
    preset = os.environ.get("LOUPE_ADMIN_TOKEN")
    token = preset or secrets.token_urlsafe(24)
    os.environ["LOUPE_ADMIN_TOKEN"] = token  # the rollout's cutover reads it (never XCom)
    stop = threading.Event()
    with DemoConsole(log_path, heartbeat_s) as console, contextlib.ExitStack() as serving:
        say = console.say
        basis = "measured here" if timings.measured() else "on a quiet 2-core machine"
        plan = ([("first search", "reuse the live index" if live_before else
                  _minutes(est["first"]))] if serve else []) + [
                ("world", "reuse" if reuse_world else _minutes(est["world"])),
                ("detector", "reuse" if reuse_detector else _minutes(est["detector"])),
                ("retrain DAG", _minutes(est["loupe_monthly_retrain"])),
                ("rollout DAG", _minutes(est["loupe_model_rollout"]))]
        say(f"Loupe demo ({size} world). Library logs go to {_rel(log_path, root)}.")
        say("Plan (" + basis + "): " + ", ".join(f"{n} {t}" for n, t in plan))
        stack = None
        if serve:
            t0 = time.perf_counter()
            if live_before is None:
                with console.stage("first", f"a first shop to search: {FIRST_ITEMS:,} "
                                            "listings, frozen embedder, a quick detector",
                                   est["first"]):
                    _first_shop(cfg, size, seed, reuse_world, console)
            else:
                say(f"[first] serving the live index {live_before} while the retrain runs")
            features = write_item_features(cfg.world, None, runs / "serve" / "features.parquet")
            stack = serving.enter_context(ServingStack(
                cfg.triton_repository, cfg.index, cfg.world, features, runs / "serve" / "run",
                token, replicas=2))
            timings.record("first", time.perf_counter() - t0)
            say(f"\nFirst search is ready: {stack.url}/  (model "
                f"{pointer.live_manifest(cfg.index)['model_version']}; the retrain below "
                "replaces it live)\n")
            conf["api_url"] = stack.url
        if reuse_world:
            say(f"[world] reusing {_rel(world, root)} (seed {seed})")
        else:
            with console.stage("world", f"generating the {size} world into "
                                        f"{_rel(world, root)}", est["world"]):
                t0 = time.perf_counter()
                world, counts = _world(size, seed, root)
                timings.record("world", time.perf_counter() - t0)
            say(f"[world] {counts}")
        version = _detector_version(cfg) if reuse_detector else None
        if version is not None:
            say(f"[detector] reusing {version} ({_rel(cfg.runs / 'detector', root)})")
        else:
            with console.stage("detector", "training the scene detector (CenterNet)",
                               est["detector"]):
                t0 = time.perf_counter()
                made = _detector(cfg, params)
                timings.record("detector", time.perf_counter() - t0)
            say(f"[detector] {made}")
        report = root / "reports" / "dags.json"
        stages = {}
        for dag_id, doing, extra in (
                ("loupe_monthly_retrain", "validate, harvest, train debiased + naive, "
                                          "evaluate, register, promotion gate", {}),
                ("loupe_model_rollout", "Triton install, re-embed, shard builds, canary, "
                                        "cutover of the champion", {"model": "champion"})):
            if dag_id == "loupe_model_rollout" and stack is not None:
                _reload_tables(cfg, stack.url, token, stages["loupe_monthly_retrain"],
                               runs / "serve" / "features.parquet")
            with console.stage(dag_id, doing, est[dag_id],
                               detail=lambda d=dag_id: running_tasks(d)):
                t0 = time.perf_counter()
                stages[dag_id] = _run(dag_id, {**conf, **extra}, report)
                timings.record(dag_id, time.perf_counter() - t0)
            if dag_id == "loupe_monthly_retrain":
                result = _xcom(stages[dag_id], "evaluate_and_register")
                metrics = json.loads(Path(result["eval_json"]).read_text())
                say(f"[evaluate] {result['model_version']}: rater recall@10 "
                    f"{metrics['recall_at_10']:.3f} (frozen "
                    f"{metrics['baseline_recall_at_10']:.3f}, naive "
                    f"{metrics['naive_recall_at_10']:.3f}); gate: "
                    f"{result['decision']['reason']}")
        live = _xcom(stages["loupe_model_rollout"], "cutover")
        say("\nWhere to look:\n"
            f"  world sample sheet     reports/world_samples.png\n"
            f"  eval report (HTML)     {result['report_html']}\n"
            f"  eval metrics           {result['eval_json']}\n"
            f"  MLflow                 loupe mlflow-ui  (http://127.0.0.1:5000)\n"
            f"  DAG timings            {_rel(report, root)}\n"
            f"  Airflow UI             AIRFLOW_HOME={airflow_home} AIRFLOW__API__HOST=127.0.0.1"
            " .venv/bin/airflow standalone  (http://127.0.0.1:8080)\n"
            f"  live index             {live['to']}\n"
            f"  library logs           {_rel(log_path, root)}")
        if stack is not None:
            # installed before the banner invites a stop (Airflow's dag.test() replaces
            # SIGTERM handlers while it runs): a SIGTERM right after it must stop the stack
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            now = pointer.live_manifest(cfg.index)
            shown = "$LOUPE_ADMIN_TOKEN" if preset else token
            say(f"\nServing {now['model_version']} (index {now['index_version']}):\n"
                f"  web demo               {stack.url}/\n"
                f"  search API             POST {stack.url}/v1/search  (docs: "
                f"{stack.url}/docs)\n"
                f"  metrics                {stack.url}/metrics\n"
                f"  Triton gRPC            {stack.triton.grpc_url}\n"
                f"  admin token            {shown}\n"
                "Ctrl-C stops the stack.")
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    return {"world": str(world), "retrain": result, "rollout": live}


def _reload_tables(cfg, api_url: str, token: str, retrain: dict, features: Path) -> None:
    """The whole world replaced the first shop's files: write the engagement features of
    this retrain's harvest and have the API reload its catalog and features, so the items the
    rollout adds are known (and ranked) before it cuts over."""
    import httpx

    from pipelines.features import write_item_features

    write_item_features(cfg.world, Path(_xcom(retrain, "harvest_pairs")["harvest_dir"]),
                        features)
    r = httpx.post(f"{api_url}/admin/reload", headers={"X-Admin-Token": token}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"the search API refused to reload its tables: {r.status_code} "
                           f"{r.text[:200]}")


def _minutes(seconds: float) -> str:
    return f"~{max(1, round(seconds / 60))} min"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


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


def run_photo_demo(root: Path, photos: Path, serve: bool = True, heartbeat_s: float = 30.0
                   ) -> dict:
    """A folder of real photos -> import -> pretrained COCO detector -> frozen champion ->
    rollout -> the serving stack: a searchable shop with no logs and no training. Its
    world, runs and MLflow store are its own (data/<name>, runs/<name>), apart from the
    generated demo's; the console shows Loupe's lines, runs/<name>/demo.log the rest."""
    from pipelines.bootstrap import config_for_world, run_bootstrap
    from pipelines.console import DemoConsole
    from pipelines.import_catalog import ImportConfig, run_import
    from pipelines.run_config import slug

    root, photos = Path(root).resolve(), Path(photos).resolve()
    name = f"photos-{slug(photos.name)}"
    world, runs = root / "data" / name, root / "runs" / name
    table = catalog_from_folder(photos)
    log_path = runs / "demo.log"
    with DemoConsole(log_path, heartbeat_s) as console:
        say = console.say
        say(f"Loupe demo over {len(table)} photos in {photos}. Library logs go to "
            f"{_rel(log_path, root)}.")
        if (world / "tables" / "catalog.parquet").is_file():
            say(f"[import] reusing {_rel(world, root)} (delete it to import {photos} again)")
        else:
            with console.stage("import", f"{len(table)} photos -> {_rel(world, root)}",
                               len(table) * 0.05):
                runs.mkdir(parents=True, exist_ok=True)
                table.to_csv(runs / "catalog_from_folder.csv", index=False)
                imported = run_import(ImportConfig(photos, runs / "catalog_from_folder.csv",
                                                   world, drop_bad_rows=True))
            say(f"[import] {imported.rows['catalog']} listings; refused "
                f"{imported.refused or 'none'}")
        cfg = config_for_world(world, runs, f"sqlite:///{runs / 'mlflow.db'}")
        with console.stage("bootstrap", "frozen champion + COCO detector -> detect, crop, "
                                        "embed, build, canary, cutover", 10 + len(table) * 0.1):
            result = run_bootstrap(cfg)
        say(f"[bootstrap] {result.model_version} (frozen pretrained) + "
            f"{result.detector_version} (COCO SSD) -> index {result.index_version}"
            + ("" if result.rolled_out else " (already live: reused)"))
        if serve:
            say("[serve] starting tritonserver, 2 shards x 2 replicas and the search API")
            _serve(cfg, None, say=say)
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
