"""Glue between the Airflow DAGs (`dags/`) and the stages: where a run reads and writes, the
task defaults and failure alert every DAG shares, the retrain's task bodies, and the skip of
upkeep tasks while nothing is live. Rollout and upkeep task bodies are in pipelines/rollout.py,
health checks in pipelines/monitor.py, local DAG runs in pipelines/airflow_local.py.

A run's paths are resolved by pipelines/run_config.py (`configure` task).

DAG files import this module while the DAG processor parses them, so it imports only the
standard library (and the stdlib-only data_contracts.durable) at module level; stage modules
(pandas, faiss, GE, MLflow, torch) are imported inside the functions that use them, i.e. on
the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from data_contracts.durable import write_json_atomic
from pipelines.run_config import (
    CONFIG_ENV,
    VARIABLE_PREFIX,
    LoupeConfig,
    resolve_config,
    slug,
)

log = logging.getLogger("loupe.orchestration")

CHAMPION_ASSET_URI = "loupe://models/embedder/champion"
# what a rollout's canary decided and what went live (rollout or rollback): asset events
# whose extra the DAG run's page shows, so an operator reads the verdict there
CANARY_ASSET_URI = "loupe://serving/canary"
LIVE_ASSET_URI = "loupe://serving/live"
SHARD_BUILD_POOL = "loupe_shard_builds"

T = TypeVar("T")


def live_event(action: str, smoke: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The `loupe://serving/live` event's extra: what serves now, how it got there and that
    the smoke query found every shard's listings."""
    return {"action": action, "index_version": smoke["index_version"],
            "model_version": smoke["model_version"],
            "smoke_self_hits": f"{smoke['self_hits']}/{smoke['queries']}", **extra}


# --------------------------------------------------------------------------- configure task
def configure_run(params: Mapping[str, Any]) -> dict[str, str]:
    """The `configure` task: resolve this run's paths, reading `loupe_*` Airflow Variables."""
    from airflow.sdk import Variable

    variables = {key: Variable.get(VARIABLE_PREFIX + key, default=None) for key in CONFIG_ENV}
    return resolve_config(params, variables).as_dict()


def run_owner(dag_run: Any) -> str:
    """The DAG run as the holder of a lease (pipelines.rollout.claim_rollout)."""
    return f"airflow:{dag_run.dag_id}/{dag_run.run_id}"


def for_run(config: Mapping[str, str], dag_run: Any) -> tuple[LoupeConfig, Path]:
    """The resolved config of a run (the `configure` task's output) and its run directory."""
    cfg = LoupeConfig(**config)
    return cfg, cfg.run_dir(dag_run.dag_id, dag_run.run_id)


PATHS_SECTION = "Paths and serving (leave empty: Variables, environment, LOUPE_ROOT)"


def config_params() -> dict[str, Any]:
    """DAG params for every path (empty: Variable / environment / default, see module doc),
    in a collapsed section of the trigger form: what an operator decides comes first."""
    from airflow.sdk import Param

    return {key: Param(None, type=["null", "string"], section=PATHS_SECTION,
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

    from pipelines.monitor import HealthBreach
    from pipelines.rollout import NothingLive, RolloutInProgress

    args = {
        "owner": "loupe",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
        "retry_policy": ExceptionRetryPolicy([RetryRule(
            [ValueError, FileNotFoundError, NothingLive, HealthBreach, RolloutInProgress],
            RetryAction.FAIL, reason="bad input, a health breach or another rollout running: "
                                     "retrying reads the same state")]),
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
        write_json_atomic(cfg.alerts_dir / f"{name}.json", alert)
    except Exception:  # noqa: BLE001 - an alert that cannot be written is still logged
        log.exception("could not write the alert file")


def skip_if_nothing_live(task: Callable[..., T], *args: Any) -> T:
    """`task(*args)`, skipped instead of failed while no index version is live: the upkeep
    DAGs (ingest, compaction, monitoring) are scheduled before the first rollout."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pipelines.rollout import NothingLive

    try:
        return task(*args)
    except NothingLive as err:
        raise AirflowSkipException(str(err)) from err


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
    from pipelines.config import load
    from pipelines.harvest import HarvestConfig, harvest, plot_propensity

    run_dir = Path(run_dir)
    result = harvest(cfg.world, run_dir / "harvest",
                     load(HarvestConfig, Path(cfg.params_file), "harvest"),
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
    from pipelines.train import TrainConfig, export_baseline, run_train

    tcfg = TrainConfig.load(Path(cfg.params_file), progress_bar=False)
    out = Path(run_dir) / "models" / variant
    if variant == "frozen":
        return {"variant": variant, "export_dir": str(export_baseline(out, tcfg)),
                "train_json": None}
    if variant not in ("debiased", "naive"):
        raise ValueError(f"unknown training variant {variant!r}")
    resume = (out / "checkpoints" / "last.ckpt").exists()  # a retried task continues
    result = run_train(tcfg, cfg.world, Path(harvest_dir) / f"pairs_{variant}.parquet", out,
                       cache_dir=cfg.runs / "feature_cache", resume=resume,
                       tracking_uri=cfg.mlflow_tracking_uri, run_name=f"train-{variant}")
    return {"variant": variant, "export_dir": str(result.export_dir),
            "train_json": str(out / "train.json"),
            "train_seconds": result.metrics["train_seconds"]}


def serving_detector(cfg: LoupeConfig) -> tuple[Path, str] | None:
    """The detector a rollout would install (the newest registered `loupe-detector`), so the
    retrain scores what the index will answer; None, with a warning, when none is registered
    (catalog photos are then embedded whole, and the rollout will refuse until one is)."""
    from pipelines.registry import fetch_registered, resolve_detector

    try:
        version = resolve_detector(None, cfg.mlflow_tracking_uri)
    except ValueError as err:
        log.warning("evaluating on whole catalog photos: %s", err)
        return None
    return fetch_registered(cfg.mlflow_tracking_uri, version, cfg.models_dir), version


def evaluate_and_register(cfg: LoupeConfig, run_dir: Path, models: Sequence[Mapping[str, Any]],
                          harvest: Mapping[str, Any]) -> dict:
    """Rater-set recall@K of the debiased candidate next to the frozen and naive baselines
    (exact search), one MLflow run with the reports, a new `challenger` version, and the
    promotion gate; returns the version and the gate's decision."""
    from pipelines import evaluate as ev

    by_variant = {m["variant"]: m for m in models}
    labels = {ev.FROZEN_BASELINE: "frozen", ev.NAIVE: "naive"}
    missing = [v for v in ("debiased", *labels.values()) if v not in by_variant]
    if missing:
        raise ValueError(f"evaluation needs the {missing} models")
    reports = Path(run_dir) / "reports"
    done = ev.run_evaluate(
        ev.EvaluateConfig.load(Path(cfg.params_file)), cfg.world,
        Path(by_variant["debiased"]["export_dir"]),
        {label: Path(by_variant[v]["export_dir"]) for label, v in labels.items()},
        reports / "eval", engagement=Path(harvest["harvest_dir"]) / "eval_engagement.parquet",
        metrics_path=reports / "eval.json", train_json=Path(by_variant["debiased"]["train_json"]),
        propensity_png=Path(harvest["propensity_png"]), tracking_uri=cfg.mlflow_tracking_uri,
        promote=True, detector=serving_detector(cfg))
    published = done.published
    return {"model_version": published.model_version, "run_id": published.run_id,
            "promoted": bool(published.decision and published.decision["promoted"]),
            "decision": published.decision, "eval_json": str(reports / "eval.json"),
            "report_html": str(published.paths["html"])}

