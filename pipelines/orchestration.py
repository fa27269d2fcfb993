"""Glue between the Airflow DAGs (`dags/`) and the stages: where a run reads and writes, task
bodies that combine stages, idempotency guards, health checks and the failure alert.

DAG files import this module while the DAG processor parses them, so it imports only the
standard library at module level; stage modules (pandas, faiss, GE, MLflow, torch) are
imported inside the functions that use them, i.e. on the worker.

Configuration of a run: every path comes from the run's params, else an Airflow Variable
`loupe_<key>`, else an environment variable, else a default derived from `LOUPE_ROOT` (the
repository) and params.yaml's `world.size`. `configure` resolves it once per run and the
other tasks receive the resolved strings, so a run never mixes two configurations.
`api_url` attaches a running search API (serving/api/app.py) that serves this `index_root` and
`triton_repo`: cutover and rollback then go through its admin endpoints (the token comes from
the Variable `loupe_admin_token` or $LOUPE_ADMIN_TOKEN, read by the task, never in XCom).

Idempotency: outputs go to run-scoped paths (`<runs_dir>/airflow/<dag_id>/<run>/`) or to
versioned directories whose name derives from the run, written through temp-and-rename by the
stages; the guards here make a re-run task return what an earlier try already finished
instead of writing it again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("loupe.orchestration")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAMPION_ASSET_URI = "loupe://models/embedder/champion"
SHARD_BUILD_POOL = "loupe_shard_builds"
VARIABLE_PREFIX = "loupe_"
ATTRIBUTE_MODEL_PREFIX = "attributes/"  # model-free clustered vectors (pipelines/embed.py)

# run param / Variable key -> environment variable consulted when neither sets it
CONFIG_ENV = {
    "loupe_root": "LOUPE_ROOT",
    "params_file": "LOUPE_PARAMS_FILE",
    "world_root": "LOUPE_WORLD_ROOT",
    "runs_dir": "LOUPE_RUNS_DIR",
    "index_root": "LOUPE_INDEX_ROOT",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "change_feed": "LOUPE_CHANGE_FEED",
    "triton_repo": "LOUPE_TRITON_REPO",
    "api_url": "LOUPE_API_URL",
}
ADMIN_TOKEN_VARIABLE = "loupe_admin_token"  # or $LOUPE_ADMIN_TOKEN; never in XCom or logs
ADMIN_TOKEN_ENV = "LOUPE_ADMIN_TOKEN"
DETECTOR_MODEL = "loupe-detector"


class CanaryFailed(ValueError):
    """A built index version failed its canary: it must not go live (no retry helps)."""


class HealthBreach(RuntimeError):
    """A monitored quantity crossed its threshold (ingest lag, drift, latency, age)."""


class NothingLive(LookupError):
    """No index version has been cut over yet, so there is nothing to maintain or watch."""


class ServingUnavailable(RuntimeError):
    """The attached search API did not answer (down, restarting, 5xx): worth a retry."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LoupeConfig:
    """Resolved paths of one DAG run (strings, so it travels through XCom as-is)."""

    loupe_root: str
    params_file: str
    world_root: str
    runs_dir: str
    index_root: str
    mlflow_tracking_uri: str
    change_feed: str
    triton_repo: str
    api_url: str | None = None  # the live search API; None: no serving attached

    @property
    def world(self) -> Path:
        return Path(self.world_root)

    @property
    def runs(self) -> Path:
        return Path(self.runs_dir)

    @property
    def index(self) -> Path:
        return Path(self.index_root)

    @property
    def quarantine_dir(self) -> Path:
        return Path(self.loupe_root) / "quarantine"

    @property
    def alerts_dir(self) -> Path:
        return self.runs / "alerts"

    @property
    def triton_repository(self) -> Path:
        return Path(self.triton_repo)

    def run_dir(self, dag_id: str, run_id: str) -> Path:
        """Where one DAG run writes: re-running its tasks rewrites the same files."""
        return self.runs / "airflow" / dag_id / slug(run_id)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def slug(text: str) -> str:
    """A file-name-safe form of a run id or model version."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    if not out:
        raise ValueError(f"cannot make a path component of {text!r}")
    return out


def resolve_config(params: Mapping[str, Any], variables: Mapping[str, Any] | None = None,
                   env: Mapping[str, str] | None = None) -> LoupeConfig:
    """Run params, else Airflow Variables, else environment, else defaults (module doc)."""
    from pipelines.params import load_section
    from pipelines.registry import resolve_tracking_uri

    variables = variables or {}
    env = os.environ if env is None else env

    def pick(key: str) -> str | None:
        for value in (params.get(key), variables.get(key), env.get(CONFIG_ENV[key])):
            if value not in (None, ""):
                return str(value)
        return None

    root = Path(pick("loupe_root") or REPO_ROOT).resolve()
    params_file = Path(pick("params_file") or (
        root / "params.yaml" if (root / "params.yaml").is_file() else REPO_ROOT / "params.yaml"))
    size = load_section(params_file, "world").get("size", "demo")
    runs = Path(pick("runs_dir") or root / "runs" / size)
    return LoupeConfig(
        loupe_root=str(root), params_file=str(params_file),
        world_root=str(pick("world_root") or root / "data" / size), runs_dir=str(runs),
        index_root=str(pick("index_root") or runs / "index"),
        mlflow_tracking_uri=resolve_tracking_uri(
            pick("mlflow_tracking_uri") or f"sqlite:///{root / 'mlflow.db'}"),
        change_feed=str(pick("change_feed") or runs / "change_feed.sqlite"),
        triton_repo=str(pick("triton_repo") or runs / "triton"),
        api_url=(pick("api_url") or "").rstrip("/") or None)


def configure_run(params: Mapping[str, Any]) -> dict[str, str]:
    """The `configure` task: resolve this run's paths, reading `loupe_*` Airflow Variables."""
    from airflow.sdk import Variable

    variables = {key: Variable.get(VARIABLE_PREFIX + key, default=None) for key in CONFIG_ENV}
    return resolve_config(params, variables).as_dict()


def for_run(config: Mapping[str, str], dag_run: Any) -> tuple[LoupeConfig, Path]:
    """The resolved config of a run (the `configure` task's output) and its run directory."""
    cfg = LoupeConfig(**config)
    return cfg, cfg.run_dir(dag_run.dag_id, dag_run.run_id)


def config_params() -> dict[str, Any]:
    """DAG params for every path (empty: Variable / environment / default, see module doc)."""
    from airflow.sdk import Param

    return {key: Param(None, type=["null", "string"],
                       description=f"default: Variable {VARIABLE_PREFIX}{key}, ${env}, else "
                                   + ("none: no serving attached, cutover moves the index "
                                      "pointer only" if key == "api_url"
                                      else "derived from LOUPE_ROOT"))
            for key, env in CONFIG_ENV.items()}


# --------------------------------------------------------------------------- task defaults
def default_args(**overrides: Any) -> dict[str, Any]:
    """Retries with exponential backoff for transient errors; bad input fails at once.

    ValueError / FileNotFoundError are the stages' "bad input" errors (a broken contract, a
    canary verdict, a missing file): a retry would read the same input, so they fail the task
    on the first try. The failure callback writes an alert.
    """
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

    args = {
        "owner": "loupe",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
        "retry_policy": ExceptionRetryPolicy([RetryRule(
            [ValueError, FileNotFoundError, NothingLive, HealthBreach], RetryAction.FAIL,
            reason="bad input or a health breach: retrying reads the same state")]),
        "on_failure_callback": alert_on_failure,
    }
    return {**args, **overrides}


def alert_on_failure(context: Mapping[str, Any]) -> None:
    """Failure callback: log a loud line and write `<runs_dir>/alerts/<dag>__<run>__<task>.json`
    (the hook an on-call integration watches). Never raises: it runs after the failure."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", "?")
    run_id = getattr(ti, "run_id", "?")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    alert = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index,
             "try_number": getattr(ti, "try_number", None),
             "error": f"{type(context.get('exception')).__name__}: {context.get('exception')}",
             "at": datetime.now(UTC).isoformat()}
    log.error("LOUPE ALERT %s.%s[%s] failed: %s", dag_id, task_id, map_index, alert["error"])
    try:
        resolved = ti.xcom_pull(task_ids="configure") if ti is not None else None
        cfg = LoupeConfig(**resolved) if resolved else resolve_config(context.get("params", {}))
        name = "__".join([slug(dag_id), slug(run_id), slug(task_id)]
                         + ([str(map_index)] if map_index not in (None, -1) else []))
        _write_json(cfg.alerts_dir / f"{name}.json", alert)
    except Exception:  # noqa: BLE001 - an alert that cannot be written is still logged
        log.exception("could not write the alert file")


def _write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    from serving.shards.layout import write_json_atomic

    write_json_atomic(Path(path), dict(payload))
    return Path(path)


# --------------------------------------------------------------------------- retrain
def validate_logs(cfg: LoupeConfig, run_dir: Path) -> dict:
    """Every table of the world against its contract; a broken one is quarantined and stops
    the run (ContractViolation), with Data Docs under the run directory."""
    from pipelines.validate import validate_world

    reports = validate_world(cfg.world, quarantine_dir=cfg.quarantine_dir,
                             docs_dir=Path(run_dir) / "data_docs")
    return {"rows": {r.table: r.rows for r in reports}}


def harvest_pairs(cfg: LoupeConfig, run_dir: Path) -> dict:
    """Debiased + naive training pairs, splits and the engagement eval set, plus the
    propensity plot (truth overlaid only where the world has truth/)."""
    from pipelines.harvest import HarvestConfig, harvest, plot_propensity
    from pipelines.params import load_section

    run_dir = Path(run_dir)
    result = harvest(cfg.world, run_dir / "harvest",
                     HarvestConfig(**load_section(Path(cfg.params_file), "harvest")),
                     quarantine_dir=cfg.quarantine_dir)
    truth = cfg.world / "truth" / "propensity.json"
    png = plot_propensity(result.propensity, truth if truth.is_file() else None,
                          run_dir / "reports" / "propensity.png")
    return {"harvest_dir": str(result.out_dir), "propensity_png": str(png),
            "pairs_by_split": {split: sum(n.values()) for split, n in result.counts.items()}}


def train_embedder(cfg: LoupeConfig, run_dir: Path, harvest_dir: str, variant: str) -> dict:
    """Train on the `debiased` or `naive` pairs (same rows, other weights), or export the
    `frozen` pretrained baseline; returns the export directory and train.json metrics.
    Variants and runs on the same world share one frozen-feature cache (keyed by the world,
    the frozen weights and the image path), so the second variant and the next run cost
    little."""
    from pipelines.train import TrainConfig, export_baseline, train

    tcfg = TrainConfig.load(Path(cfg.params_file), progress_bar=False)
    out = Path(run_dir) / "models" / variant
    if variant == "frozen":
        return {"variant": variant, "export_dir": str(export_baseline(out, tcfg)),
                "train_json": None}
    if variant not in ("debiased", "naive"):
        raise ValueError(f"unknown training variant {variant!r}")
    resume = (out / "checkpoints" / "last.ckpt").exists()  # a retried task continues
    result = train(cfg.world, Path(harvest_dir) / f"pairs_{variant}.parquet", out, tcfg,
                   cache_dir=cfg.runs / "feature_cache", resume=resume)
    return {"variant": variant, "export_dir": str(result.export_dir),
            "train_json": str(out / "train.json"),
            "train_seconds": result.metrics["train_seconds"]}


def evaluate_and_register(cfg: LoupeConfig, run_dir: Path, models: Sequence[Mapping[str, Any]],
                          harvest: Mapping[str, Any]) -> dict:
    """Rater-set recall@K of the debiased candidate next to the frozen and naive baselines
    (exact search), one MLflow run with the reports, a new `challenger` version, and the
    promotion gate; returns the version and the gate's decision."""
    from pipelines import evaluate as ev
    from pipelines.registry import RegistryConfig

    by_variant = {m["variant"]: m for m in models}
    labels = {ev.CANDIDATE: "debiased", ev.FROZEN_BASELINE: "frozen", ev.NAIVE: "naive"}
    missing = [v for v in labels.values() if v not in by_variant]
    if missing:
        raise ValueError(f"evaluation needs the {missing} models")
    ecfg = ev.EvaluateConfig.load(Path(cfg.params_file))
    sets = [ev.load_rater_set(cfg.world),
            ev.load_engagement_set(Path(harvest["harvest_dir"]) / "eval_engagement.parquet")]
    fns = {label: ev.embed_fn_from_export(Path(by_variant[v]["export_dir"]), cfg.world,
                                          ecfg.batch_size) for label, v in labels.items()}
    report = ev.evaluate_models(fns, cfg.world, sets, ev.CANDIDATE, ecfg.ks)
    train_info = json.loads(Path(by_variant["debiased"]["train_json"]).read_text())
    params = {f"train.{k}": v for k, v in train_info["config"].items()}
    candidate_export = Path(by_variant["debiased"]["export_dir"])
    published = ev.publish(
        report, sets, cfg.world, Path(run_dir) / "reports" / "eval",
        RegistryConfig(cfg.mlflow_tracking_uri, promotion_margin=ecfg.promotion_margin),
        ev.export_files(candidate_export), params, Path(harvest["propensity_png"]),
        promote=True, n_report_queries=ecfg.report_queries,
        extra_metrics={"train_seconds": float(train_info["train_seconds"])})
    metrics = ev.eval_metrics_file(report, train_info["train_seconds"])
    _write_json(Path(run_dir) / "reports" / "eval.json", metrics)
    return {"model_version": published.model_version, "run_id": published.run_id,
            "promoted": bool(published.decision and published.decision["promoted"]),
            "decision": published.decision, "eval_json": str(Path(run_dir) / "reports" /
                                                            "eval.json"),
            "report_html": str(published.paths["html"])}


# --------------------------------------------------------------------------- models
def is_attribute_model(model_version: str) -> bool:
    return model_version.startswith(ATTRIBUTE_MODEL_PREFIX)


def resolve_model(spec: str, tracking_uri: str, promoted_version: str | None = None) -> str:
    """The model version a rollout serves: an alias (`champion`, `challenger`), a registered
    version (`loupe-embedder/3`), or `attributes/<seed>` (model-free vectors, benchmarks).

    A rollout started by the champion asset passes the promoted version, so a champion that
    moves again meanwhile cannot change what this run rolls out.
    """
    from pipelines import registry

    spec = str(spec).strip()
    if spec in (registry.CHAMPION, registry.CHALLENGER):
        if spec == registry.CHAMPION and promoted_version:
            spec = promoted_version
        else:
            cfg = registry.RegistryConfig(tracking_uri)
            ref = registry.version_for_alias(cfg, spec)
            if ref is None:
                raise ValueError(f"no version of {cfg.model_name!r} has the alias {spec!r} in "
                                 f"{tracking_uri}; run the retrain first or name a version")
            return ref.model_version
    if is_attribute_model(spec):
        seed = spec.removeprefix(ATTRIBUTE_MODEL_PREFIX)
        if not seed.isdigit():
            raise ValueError(f"attribute model must be 'attributes/<seed>', got {spec!r}")
        return spec
    ref = registry.parse_model_version(spec)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version(
            ref.name, ref.version)
    except MlflowException as err:
        raise ValueError(f"model version {spec} is not registered in {tracking_uri}: "
                         f"{err.message}") from err
    return ref.model_version


def catalog_embed_fn(cfg: LoupeConfig, model_version: str):
    """The embed_fn that turns catalog photos into vectors of `model_version`."""
    from pipelines.embed import attribute_embed_fn

    if is_attribute_model(model_version):
        return attribute_embed_fn(cfg.world, int(model_version.removeprefix(
            ATTRIBUTE_MODEL_PREFIX)))
    return registered_embed_fn(cfg, model_version)


def fetch_registered(cfg: LoupeConfig, model_version: str) -> Path:
    """A registered version's exported files in `<runs>/models/<version>/`, fetched once.

    Each caller downloads into its own temp dir and renames it into place, so parallel tasks
    (mapped partitions, the Triton export) never see or write a half-fetched directory.
    """
    import tempfile

    from pipelines.registry import RegistryConfig, download_model

    local = cfg.runs / "models" / slug(model_version)
    if local.is_dir():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        fetched = download_model(RegistryConfig(cfg.mlflow_tracking_uri), model_version, tmp)
        try:
            fetched.rename(local)
        except OSError:
            if not local.is_dir():  # not lost to a concurrent fetch of the same version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def registered_embed_fn(cfg: LoupeConfig, model_version: str):
    """Catalog photos through a registered embedder's exported graph, whole photo: a listing
    photo shows one product, as in training and evaluation."""
    from models.export import ExportedEmbedder
    from pipelines.evaluate import embed_fn_from_model

    return embed_fn_from_model(ExportedEmbedder(fetch_registered(cfg, model_version)),
                               cfg.world)


def resolve_detector(spec: str | None, tracking_uri: str) -> str:
    """The registered detector a rollout installs beside the embedder: the named
    `loupe-detector/N`, else the newest registered version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.registry import parse_model_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if spec is not None and str(spec).strip():
        ref = parse_model_version(str(spec).strip())
        if ref.name != DETECTOR_MODEL:
            raise ValueError(f"detector must be a version of {DETECTOR_MODEL!r} "
                             f"('{DETECTOR_MODEL}/N'), got {spec!r}")
        try:
            client.get_model_version(ref.name, ref.version)
        except MlflowException as err:
            raise ValueError(f"detector {ref.model_version} is not registered in "
                             f"{tracking_uri}: {err.message}") from err
        return ref.model_version
    versions = [int(mv.version) for mv in
                client.search_model_versions(f"name='{DETECTOR_MODEL}'")]
    if not versions:
        raise ValueError(f"no {DETECTOR_MODEL} version is registered in {tracking_uri}, and "
                         "Triton serves the detector beside the embedder: train one "
                         "(`loupe train-detector`), register it "
                         "(pipelines.train_detector.register_detector), or name one with the "
                         "`detector` param")
    return f"{DETECTOR_MODEL}/{max(versions)}"


def export_triton(cfg: LoupeConfig, model_version: str, detector: str | None) -> dict:
    """Install the rollout's embedder and detector as Triton version N (N = the embedder's
    registry number) before anything goes live, so the cutover only has to load it.

    Versions are immutable: a re-run finds the same files and writes nothing; a version N
    that holds other bytes (another registry's N) is an error, never served silently.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    from serving.shards.layout import sha256_file
    from serving.triton import repository

    if is_attribute_model(model_version):
        raise AirflowSkipException(f"{model_version}: model-free attribute vectors have no "
                                   "model for Triton to serve")
    detector_version = resolve_detector(detector, cfg.mlflow_tracking_uri)
    sources = {"embedder": fetch_registered(cfg, model_version),
               "detector": fetch_registered(cfg, detector_version)}
    number = repository.add_version(cfg.triton_repository, model_version,
                                    sources["embedder"], sources["detector"], detector_version)
    for name, src in sources.items():
        installed = cfg.triton_repository / name / str(number)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            there = installed / f.relative_to(src)
            if not there.is_file() or sha256_file(there) != sha256_file(f):
                raise ValueError(f"Triton version {number} in {cfg.triton_repository} holds "
                                 f"another {name} than registered {model_version} / "
                                 f"{detector_version} ({there.name} differs); refusing to "
                                 "serve it: point triton_repo at this registry's repository")
    return {"model_version": model_version, "detector_version": detector_version,
            "triton_version": number, "triton_repo": str(cfg.triton_repository)}


# --------------------------------------------------------------------------- rollout
def index_version_for_run(run_after: datetime, model_version: str, kind: str = "") -> str:
    """Index version id derived from the run (not the clock), so a re-run task finds the
    version its earlier try started; sortable like `pipelines.index.new_version_id`."""
    stamp = run_after.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return "-".join([stamp] + ([kind] if kind else []) + [slug(model_version)])


def plan_rollout(cfg: LoupeConfig, run_dir: Path, model_version: str, run_after: datetime,
                 n_shards: int | None) -> dict:
    """Everything the mapped tasks need: partitions, shards, run-scoped and versioned paths."""
    from pipelines.embed import EmbedParams
    from pipelines.index import IndexParams
    from serving.shards import layout

    embed = EmbedParams.load(Path(cfg.params_file))
    shards = int(n_shards) if n_shards else IndexParams.load(Path(cfg.params_file)).n_shards
    if shards < 1:
        raise ValueError(f"shard count must be >= 1, got {shards}")
    version = index_version_for_run(run_after, model_version)
    return {"model_version": model_version, "index_version": version,
            "version_dir": str(layout.version_dir(cfg.index, version)),
            "embeddings_dir": str(Path(run_dir) / "embeddings" / slug(model_version)),
            "n_shards": shards, "partitions": list(range(embed.n_partitions)),
            "shards": list(range(shards))}


def embed_partition(cfg: LoupeConfig, model_version: str, embeddings_dir: str,
                    partition: int) -> dict:
    """One catalog partition; resumes from its checkpoint, so a retry never re-writes."""
    from pipelines.embed import EmbedParams, reembed

    p = EmbedParams.load(Path(cfg.params_file))
    summary = reembed(cfg.world, model_version, catalog_embed_fn(cfg, model_version),
                      Path(embeddings_dir), [partition], p.batch_size,
                      n_partitions=p.n_partitions, validate=p.validate, show_progress=False)
    return {"partition": partition, "embedded": summary["embedded"][partition]}


def build_shard_once(cfg: LoupeConfig, embeddings_dir: str, version_dir: str, shard: int,
                     n_shards: int) -> dict:
    """One shard of the version; a version already finalised by an earlier try is reused."""
    from pipelines.index import IndexParams, build_shard
    from serving.shards import layout

    vdir = Path(version_dir)
    if (vdir / layout.MANIFEST).is_file():
        manifest = layout.read_manifest(vdir)
        if manifest["n_shards"] != n_shards:
            raise ValueError(f"{vdir} is finalised with {manifest['n_shards']} shards, "
                             f"not {n_shards}")
        return json.loads((layout.shard_dir(vdir, shard) / layout.SHARD_META).read_text())
    meta = build_shard(Path(embeddings_dir), shard, n_shards,
                       IndexParams.load(Path(cfg.params_file)), vdir)
    return {k: meta[k] for k in ("shard_id", "count", "model_version", "build_seconds")}


def finalize_index_once(version_dir: str, n_shards: int, source: Mapping[str, Any]) -> dict:
    """Checksums + manifest (written last); an existing manifest of this version is kept."""
    from pipelines.index import write_manifest
    from serving.shards import layout

    vdir = Path(version_dir)
    if (vdir / layout.MANIFEST).is_file():
        manifest = layout.read_manifest(vdir)
    else:
        manifest = write_manifest(vdir, n_shards, dict(source))
    return {k: manifest[k] for k in ("index_version", "model_version", "count", "n_shards")}


def run_canary(cfg: LoupeConfig, index_version: str, model_version: str) -> dict:
    """Probe the built version; a failing verdict raises CanaryFailed (nothing goes live)."""
    from pipelines.index import IndexParams, canary

    params = IndexParams.load(Path(cfg.params_file))
    queries = None if is_attribute_model(model_version) else registered_embed_fn(
        cfg, model_version)  # a real embedder also answers the rater queries
    verdict = canary(cfg.index, index_version, cfg.world, params.canary, queries,
                     expected_model_version=model_version)
    if not verdict.passed:
        raise CanaryFailed(f"index version {index_version} failed its canary, live traffic "
                           f"untouched: {'; '.join(verdict.reasons)}")
    return {"index_version": index_version, "passed": True, "metrics": verdict.metrics}


# --------------------------------------------------------------------------- serving
def admin_token() -> str:
    """The search API's admin token: Airflow Variable `loupe_admin_token`, else
    $LOUPE_ADMIN_TOKEN. Masked in task logs; callers never return it through XCom."""
    from airflow.sdk import Variable
    from airflow.sdk.log import mask_secret

    token = Variable.get(ADMIN_TOKEN_VARIABLE, default=None) or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ValueError(f"serving is attached (api_url) but no admin token is set: Variable "
                         f"{ADMIN_TOKEN_VARIABLE} or ${ADMIN_TOKEN_ENV}")
    mask_secret(token)
    return token


def call_api(cfg: LoupeConfig, method: str, path: str, token: str | None = None,
             body: Mapping[str, Any] | None = None, timeout_s: float = 30.0) -> dict:
    """One call to the attached search API. A refusal (4xx: bad token, unknown or failing
    version) is a ValueError, not retried; no answer or a 5xx is ServingUnavailable."""
    import httpx

    headers = {"X-Admin-Token": token} if token else {}
    try:
        r = httpx.request(method, f"{cfg.api_url}{path}", json=body, headers=headers,
                          timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ServingUnavailable(f"{method} {cfg.api_url}{path}: {err!r}") from err
    if 400 <= r.status_code < 500:
        raise ValueError(f"{method} {cfg.api_url}{path} refused ({r.status_code}): "
                         f"{r.text[:500]}")
    if r.status_code != 200:
        raise ServingUnavailable(f"{method} {cfg.api_url}{path} answered {r.status_code}: "
                                 f"{r.text[:500]}")
    return r.json()


def _switched(answer: Mapping[str, Any]) -> dict:
    """The API's switch answer as a move record (the pointer entry + what serves it)."""
    return {**answer["switched"], "via": "api", "model_version": answer["model_version"],
            "triton_version": answer["triton_version"]}


def cutover_once(cfg: LoupeConfig, index_version: str) -> dict:
    """Make the version live; a no-op if it already is.

    Serving attached (`api_url`): the API's POST /admin/cutover loads the Triton version the
    index names, re-points the shard replicas and moves the pointer as one switch, so the
    model and the index go live together. Not attached: the pointer moves (previous kept for
    rollback) and the Triton repository is set to serve the new model version beside the
    live one, so a serving stack started on it serves what is live.
    """
    from pipelines.index import cutover
    from serving.shards import layout

    if cfg.api_url:
        live = call_api(cfg, "GET", "/readyz")
        if live["index_version"] == index_version:
            return {"action": "cutover", "to": index_version, "already_live": True,
                    "via": "api", "model_version": live["model_version"]}
        return _switched(call_api(cfg, "POST", "/admin/cutover", admin_token(),
                                  {"index_version": index_version}, timeout_s=300))
    live = layout.pointer(cfg.index, layout.CURRENT)
    if live == index_version:
        return {"action": "cutover", "to": index_version, "already_live": True,
                "via": "pointer"}
    served = _serve_in_triton(cfg, [v for v in (live, index_version) if v is not None])
    moved = cutover(cfg.index, index_version)
    return {**moved, "via": "pointer", "triton_versions": served,
            "serving": "not attached (no api_url): moved the index pointer only"}


def _serve_in_triton(cfg: LoupeConfig, index_versions: Sequence[str]) -> list[int]:
    """Point the Triton repository's configs at the model versions these indexes name
    (attribute vectors have none); a missing Triton version is an error before any move."""
    from serving.shards import layout
    from serving.triton import repository

    models = [layout.read_manifest(layout.version_dir(cfg.index, v))["model_version"]
              for v in index_versions]
    numbers = [repository.triton_version(m) for m in models if not is_attribute_model(m)]
    if not numbers:
        return []
    installed = set(repository.installed_versions(cfg.triton_repository))
    if numbers[-1] not in installed:
        raise ValueError(f"{models[-1]} is not installed in the Triton repository "
                         f"{cfg.triton_repository} (the rollout's export_triton installs it)")
    return repository.serve_versions(cfg.triton_repository,
                                     [n for n in numbers if n in installed])


def smoke_query(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                k: int = 10) -> dict:
    """Listings of every shard must find themselves in `index_version`: through the live
    search API when serving is attached (Triton embeds, replicas answer), else through the
    shard store directly."""
    if cfg.api_url:
        return smoke_query_api(cfg, index_version, probes_per_shard, k)
    return smoke_query_shards(cfg, index_version, probes_per_shard, k)


def smoke_query_shards(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                       k: int = 10) -> dict:
    """Query every shard the way a shard server does after the pointer moved (ShardStore:
    follows `current`, verifies checksums, applies the delta, guards the model version) with
    listings of that shard; each must come back from `index_version` and find itself."""
    import numpy as np

    from pipelines.index import load_version
    from serving.shards.store import ShardStore

    manifest, shards = load_version(cfg.index, index_version, verify=False)
    model = manifest["model_version"]
    found = asked = 0
    for shard in shards:
        store = ShardStore(cfg.index, shard.shard_id, model, keep_previous_s=0)
        try:
            store.load()
            serving = store.status()["index_version"]
            if serving != index_version:
                raise HealthBreach(f"shard {shard.shard_id} serves {serving}, not "
                                   f"{index_version}: the live pointer did not move")
            probes = np.asarray(shard.vectors[:probes_per_shard], np.float32)
            for item, result in zip(shard.ids[:probes_per_shard],
                                    store.search_batch(probes, k), strict=True):
                if result.index_version != index_version or result.model_version != model:
                    raise HealthBreach(f"shard {shard.shard_id} answered from "
                                       f"{result.index_version} ({result.model_version})")
                asked += 1
                found += any(h.item_id == item for h in result.hits)
        finally:
            store.stop()
    if found < asked:
        raise HealthBreach(f"smoke query on {index_version}: only {found} of {asked} listings "
                           "found themselves")
    return {"index_version": index_version, "model_version": model, "queries": asked,
            "self_hits": found}


def smoke_query_api(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                    k: int = 10) -> dict:
    """The live API must be ready on `index_version` and its model, and the photo of each
    probe listing (available ones: the API filters sold items out; whole photo, as the
    catalog is embedded) must come back from that pair, complete, with itself among the
    results: the full query path, Triton included."""
    import httpx
    import pandas as pd

    from pipelines.index import load_version

    manifest, shards = load_version(cfg.index, index_version, verify=False)
    model = manifest["model_version"]
    ready = call_api(cfg, "GET", "/readyz")
    if (ready["model_version"], ready["index_version"]) != (model, index_version):
        raise HealthBreach(f"the API serves {ready['model_version']} / "
                           f"{ready['index_version']}, not {model} / {index_version}")
    catalog = pd.read_parquet(cfg.world / "tables" / "catalog.parquet",
                              columns=["item_id", "image_path", "available"])
    photos = catalog.set_index("item_id")["image_path"]
    listed = set(catalog.loc[catalog["available"], "item_id"])  # the API drops sold items
    probes: list[str] = []
    for shard in shards:
        probes += [i for i in map(str, shard.ids) if i in listed][:probes_per_shard]
    found = 0
    with httpx.Client(base_url=cfg.api_url, timeout=30.0) as client:
        for item in probes:
            image = (cfg.world / photos[item]).read_bytes()
            try:
                r = client.post("/v1/search", files={"image": ("probe.jpg", image)},
                                data={"box": "0,0,1,1", "k": str(k)})
            except httpx.HTTPError as err:
                raise ServingUnavailable(f"POST {cfg.api_url}/v1/search: {err!r}") from err
            if r.status_code != 200:
                raise HealthBreach(f"smoke search for {item} answered {r.status_code}: "
                                   f"{r.text[:300]}")
            body = r.json()
            if (body["model_version"], body["index_version"]) != (model, index_version) \
                    or body["partial"]:
                raise HealthBreach(f"smoke search for {item} came from "
                                   f"{body['model_version']} / {body['index_version']} "
                                   f"(partial: {body['partial']})")
            found += any(hit["item_id"] == item for hit in body["items"])
    if found < len(probes):
        raise HealthBreach(f"smoke search on {index_version} through {cfg.api_url}: only "
                           f"{found} of {len(probes)} listings found themselves")
    return {"index_version": index_version, "model_version": model, "via": "api",
            "queries": len(probes), "self_hits": found}


# --------------------------------------------------------------------------- index upkeep
def live_index_version(cfg: LoupeConfig) -> str:
    from serving.shards import layout

    live = layout.pointer(cfg.index, layout.CURRENT)
    if live is None:
        raise NothingLive(f"{cfg.index}: no index version is live yet")
    return live


def compact_once(cfg: LoupeConfig, run_after: datetime) -> dict:
    """Fold the delta into a rebuilt version named after the run (tombstones dropped)."""
    from pipelines.index import IndexParams, compact
    from serving.shards import layout

    live = live_index_version(cfg)
    model = layout.read_manifest(layout.version_dir(cfg.index, live))["model_version"]
    version = index_version_for_run(run_after, model, kind="compact")
    vdir = layout.version_dir(cfg.index, version)
    if not (vdir / layout.MANIFEST).is_file():
        compact(cfg.index, IndexParams.load(Path(cfg.params_file)), version)
    manifest = layout.read_manifest(vdir)
    return {"index_version": version, "model_version": model, "compacted_from": live,
            "count": manifest["count"], **{k: manifest["source"].get(k) for k in (
                "delta_upserts_folded", "tombstones_dropped")}}


def prune_delta_rows(cfg: LoupeConfig) -> dict:
    from pipelines.index import prune_delta

    return {"delta_rows_pruned": prune_delta(cfg.index)}


def rollback_live(cfg: LoupeConfig) -> dict:
    """One step back: through the API's /admin/rollback when serving is attached (the model
    and the index flip together), else the pointer alone."""
    from pipelines.index import rollback

    if cfg.api_url:
        return _switched(call_api(cfg, "POST", "/admin/rollback", admin_token(),
                                  timeout_s=300))
    return {**rollback(cfg.index), "via": "pointer",
            "serving": "not attached (no api_url): moved the index pointer only"}


# --------------------------------------------------------------------------- streaming ingest
def ingest_micro_batch(cfg: LoupeConfig, max_seconds: float) -> dict:
    """Consume the change feed into the live index's delta until caught up or out of time,
    then measure what is still waiting."""
    from pipelines.ingest import ChangeFeed, IngestParams, StreamingIndexer
    from serving.shards import layout

    live = live_index_version(cfg)
    model = layout.read_manifest(layout.version_dir(cfg.index, live))["model_version"]
    feed = ChangeFeed(Path(cfg.change_feed))
    indexer = StreamingIndexer(feed, cfg.index, catalog_embed_fn(cfg, model), model,
                               IngestParams.load(Path(cfg.params_file)).batch_size)
    try:
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline and indexer.step() > 0:
            pass
        stats = indexer.stats
        waiting = feed.read(stats.checkpoint, 1)
        return {"model_version": model, "events": stats.events, "upserts": stats.upserts,
                "deletes": stats.deletes, "batches": stats.batches,
                "checkpoint": stats.checkpoint,
                "pending_events": feed.last_offset() - stats.checkpoint,
                "oldest_pending_age_s": round(time.time() - waiting[0].ts, 3) if waiting
                else 0.0}
    finally:
        indexer.close()
        feed.close()


def check_ingest_lag(result: Mapping[str, Any], max_pending_events: int,
                     max_lag_s: float) -> dict:
    breaches = []
    if result["pending_events"] > max_pending_events:
        breaches.append(f"{result['pending_events']} feed events wait to be indexed "
                        f"(> {max_pending_events})")
    if result["oldest_pending_age_s"] > max_lag_s:
        breaches.append(f"the oldest waiting event is {result['oldest_pending_age_s']:.0f} s "
                        f"old (> {max_lag_s:.0f} s)")
    if breaches:
        raise HealthBreach("ingest lags: " + "; ".join(breaches))
    return {"ok": True, **result}


# --------------------------------------------------------------------------- monitoring
@dataclass(frozen=True)
class HealthThresholds:
    """What the hourly monitoring calls a breach (DAG params of `loupe_monitoring`)."""

    max_probe_recall_drop: float = 0.05  # canary replay vs the verdict recorded at cutover
    max_drift_psi: float = 0.25  # population stability index; > 0.25 is a major shift
    min_drift_samples: int = 50  # streamed vectors needed before drift is judged
    max_index_age_h: float = 192.0  # weekly compaction rebuilds; 8 days means it stopped
    max_shard_p99_ms: float = 50.0


def replay_canary(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """The cutover canary re-run on the live version (checksums re-verified, same probes).

    It runs against a scratch root whose `versions/` links to the real one, so the verdict
    recorded at cutover (which rollback relies on) is never rewritten by monitoring.
    """
    import tempfile

    from pipelines.index import IndexParams, canary, read_verdict
    from serving.shards import layout

    recorded = read_verdict(cfg.index, live)
    with tempfile.TemporaryDirectory(prefix="loupe-canary-replay-") as scratch:
        (Path(scratch) / layout.VERSIONS).symlink_to((cfg.index / layout.VERSIONS).resolve(),
                                                     target_is_directory=True)
        verdict = canary(Path(scratch), live, cfg.world,
                         IndexParams.load(Path(cfg.params_file)).canary)
    metrics = {k: verdict.metrics.get(k) for k in ("probe_recall", "exact_overlap", "n_probes",
                                                   "mean_vector_norm")}
    breaches = [f"canary replay fails: {r}" for r in verdict.reasons]
    if recorded is not None and "probe_recall" in recorded.metrics \
            and metrics["probe_recall"] is not None:
        metrics["recorded_probe_recall"] = recorded.metrics["probe_recall"]
        drop = recorded.metrics["probe_recall"] - metrics["probe_recall"]
        if drop > th.max_probe_recall_drop:
            breaches.append(f"probe recall fell by {drop:.3f} since cutover "
                            f"(> {th.max_probe_recall_drop})")
    return {"metrics": metrics, "breaches": breaches}


NORM_EDGES = (0.98, 0.985, 0.99, 0.995, 1.0, 1.005, 1.01, 1.015, 1.02)  # + open outer bins
NEIGHBOUR_BINS = 40  # over cosine [-1, 1]
BASELINE_QUERIES = 5000


def _drift_histograms(vectors, item_ids, base_index, base_ids) -> dict[str, list[int]]:
    """Norm histogram (every stored vector should be unit length) and the histogram of each
    vector's nearest-neighbour cosine among the live build's vectors, itself excluded: vectors
    of the build's model land next to their kind; another model's land nowhere near."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, np.float32)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    scores, labels = base_index.search(vectors / np.maximum(norms, 1e-12)[:, None].astype(
        np.float32), 2)
    own = base_ids[np.maximum(labels[:, 0], 0)] == np.asarray(item_ids)
    nearest = np.where(own, scores[:, 1], scores[:, 0])
    edges = np.concatenate([[-np.inf], NORM_EDGES, [np.inf]])
    return {"norm": np.histogram(norms, edges)[0].tolist(),
            "neighbour": np.histogram(nearest, np.linspace(-1, 1, NEIGHBOUR_BINS + 1))[0]
            .tolist()}


def population_stability(expected: list[int], actual: list[int], eps: float = 1e-4) -> float:
    """PSI = Σ (a - e) · ln(a / e) over bin shares (0 = same distribution)."""
    import numpy as np

    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() == 0 or a.sum() == 0:
        raise ValueError("population stability needs two non-empty histograms")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def embedding_drift(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """Vectors streamed in since the live build against that build (norm and nearest-
    neighbour-similarity histograms, PSI). The build's own histograms are the baseline,
    computed once per live version (on a sample of its rows) and kept beside the metrics."""
    import faiss
    import numpy as np

    from pipelines.index import load_version
    from serving.shards import layout
    from serving.shards.delta import UPSERT, DeltaLog

    manifest, shards = load_version(cfg.index, live, verify=False)
    base = np.ascontiguousarray(np.concatenate([np.asarray(s.vectors, np.float32)
                                                for s in shards]))
    base_ids = np.concatenate([s.ids for s in shards])
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    baseline_path = cfg.runs / "monitoring" / "baselines" / f"{live}.json"
    if baseline_path.is_file():
        baseline = json.loads(baseline_path.read_text())
    else:
        rows = np.random.default_rng(0).permutation(len(base))[:BASELINE_QUERIES]
        baseline = {"index_version": live, "model_version": manifest["model_version"],
                    "rows_sampled": int(len(rows)),
                    "histograms": _drift_histograms(base[rows], base_ids[rows], index, base_ids),
                    "created_at": datetime.now(UTC).isoformat()}
        _write_json(baseline_path, baseline)
    streamed: dict[str, Any] = {}
    delta_path = cfg.index / layout.DELTA_DB
    if delta_path.exists():
        delta = DeltaLog(delta_path, create=False)
        try:
            for row in delta.rows_after(manifest["delta_seq"]):
                if row.op == UPSERT and row.model_version == manifest["model_version"]:
                    streamed[row.item_id] = row.vector  # the latest vector of each item
        finally:
            delta.close()
    metrics: dict[str, Any] = {"baseline_rows": baseline["rows_sampled"],
                               "streamed_items": len(streamed), "norm_psi": None,
                               "neighbour_psi": None}
    breaches = []
    if len(streamed) >= th.min_drift_samples:
        now = _drift_histograms(np.stack(list(streamed.values())), list(streamed), index,
                                base_ids)
        for key in ("norm", "neighbour"):
            psi = round(population_stability(baseline["histograms"][key], now[key]), 4)
            metrics[f"{key}_psi"] = psi
            if psi > th.max_drift_psi:
                breaches.append(f"streamed embeddings drifted from the live build: {key} "
                                f"PSI {psi:.3f} > {th.max_drift_psi}")
    return {"metrics": metrics, "breaches": breaches}


def index_age(cfg: LoupeConfig, live: str, th: HealthThresholds) -> dict:
    """How old the live and previous builds are and how much of the live set streamed in
    since the build (the share a compaction would fold in)."""
    from serving.shards import layout
    from serving.shards.delta import DeltaLog

    now = datetime.now(UTC)

    def age_h(version: str | None) -> float | None:
        if version is None:
            return None
        built = layout.read_manifest(layout.version_dir(cfg.index, version))["built_at"]
        return round((now - datetime.fromisoformat(built)).total_seconds() / 3600, 3)

    manifest = layout.read_manifest(layout.version_dir(cfg.index, live))
    delta_rows = 0
    if (cfg.index / layout.DELTA_DB).exists():
        delta = DeltaLog(cfg.index / layout.DELTA_DB, create=False)
        try:
            delta_rows = len(delta.rows_after(manifest["delta_seq"]))
        finally:
            delta.close()
    metrics = {"live_age_h": age_h(live),
               "previous_age_h": age_h(layout.pointer(cfg.index, layout.PREVIOUS)),
               "base_items": manifest["count"], "delta_rows_since_build": delta_rows}
    breaches = []
    if metrics["live_age_h"] > th.max_index_age_h:
        breaches.append(f"live index built {metrics['live_age_h']:.0f} h ago "
                        f"(> {th.max_index_age_h:.0f} h): is the weekly compaction running?")
    return {"metrics": metrics, "breaches": breaches}


def shard_latency(cfg: LoupeConfig, live: str, th: HealthThresholds, n_queries: int = 200,
                  k: int = 10) -> dict:
    """Per-shard search latency (p50/p99, ms) through the serving shard store (live version +
    delta + tombstones), one query at a time as the fan-out sends them."""
    import numpy as np

    from pipelines.index import load_version
    from serving.shards.store import ShardStore

    manifest, shards = load_version(cfg.index, live, verify=False)
    pool = np.concatenate([np.asarray(s.vectors, np.float32) for s in shards])
    rng = np.random.default_rng(0)
    queries = pool[rng.choice(len(pool), min(n_queries, len(pool)), replace=False)]
    metrics: dict[str, Any] = {"queries": int(len(queries)), "k": k, "shards": {}}
    breaches = []
    for s in range(manifest["n_shards"]):
        store = ShardStore(cfg.index, s, manifest["model_version"], keep_previous_s=0)
        try:
            store.load()
            store.search(queries[0], k)  # warm caches before timing
            ms = []
            for q in queries:
                t0 = time.perf_counter()
                store.search(q, k)
                ms.append((time.perf_counter() - t0) * 1000)
        finally:
            store.stop()
        p50, p99 = (float(np.percentile(ms, p)) for p in (50, 99))
        metrics["shards"][str(s)] = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}
        if p99 > th.max_shard_p99_ms:
            breaches.append(f"shard {s} p99 {p99:.1f} ms > {th.max_shard_p99_ms} ms")
    return {"metrics": metrics, "breaches": breaches}


def report_health(cfg: LoupeConfig, run_dir: Path, live: str,
                  checks: Mapping[str, Mapping[str, Any] | None]) -> dict:
    """Write every check's metrics (run-scoped `health.json` and `monitoring/latest.json`),
    then raise HealthBreach naming each breach; a check that did not report is one."""
    breaches = []
    for name, result in checks.items():
        if result is None:
            breaches.append(f"{name} did not report (the task failed; see its log)")
        else:
            breaches += result["breaches"]
    report = {"index_version": live, "checked_at": datetime.now(UTC).isoformat(),
              "healthy": not breaches, "breaches": breaches,
              "metrics": {name: None if r is None else r["metrics"]
                          for name, r in checks.items()}}
    _write_json(Path(run_dir) / "health.json", report)
    _write_json(cfg.runs / "monitoring" / "latest.json", report)
    if breaches:
        raise HealthBreach(f"{len(breaches)} health breach(es) on {live}: "
                           + "; ".join(breaches))
    return {"healthy": True, "report": str(Path(run_dir) / "health.json")}


def health_params() -> dict[str, Any]:
    """DAG params for every health threshold, defaulting to HealthThresholds'."""
    from dataclasses import fields

    from airflow.sdk import Param

    return {f.name: Param(f.default, type="number", minimum=0) for f in
            fields(HealthThresholds)}


def thresholds_from(params: Mapping[str, Any]) -> HealthThresholds:
    from dataclasses import fields

    return HealthThresholds(**{f.name: type(f.default)(params[f.name])
                               for f in fields(HealthThresholds) if f.name in params})


# --------------------------------------------------------------------------- running DAGs
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
        _write_json(args.report, report)
    print(json.dumps(summary, indent=1))
    return 0 if summary["state"] == "success" else 1
