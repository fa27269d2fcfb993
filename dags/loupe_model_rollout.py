"""Model rollout: install the model version in the Triton model repository (embedder +
detector as Triton version N) while the catalog is re-embedded with it (one mapped task per
catalog partition), build the index shards in parallel (one mapped task per shard, capped by
the pool `loupe_shard_builds`), canary the new version, cut the index and the Triton model
over together and smoke-query what is live.

Triggered by hand (params: `model` = alias, registered version or `attributes/<seed>`;
`detector` = registered `loupe-detector/N`, default the newest; `n_shards`; `dry_run` builds,
exports and canaries but leaves live traffic alone; `canary_min_rater_recall` /
`canary_min_exact_overlap` override params.yaml's thresholds for this run) or by the
champion asset a promoting `loupe_monthly_retrain` emits. With serving attached (`api_url`
+ the admin token in Variable `loupe_admin_token` or $LOUPE_ADMIN_TOKEN) the cutover is the
search API's /admin/cutover and the smoke query goes through its /v1/search; without, the
pointer moves.
A failing canary or export fails the run before the cutover, so the previous version stays
live; `loupe_rollback` flips back after a cutover. The run's page shows the canary's verdict
(asset event `loupe://serving/canary`) and what went live (`loupe://serving/live`).
Attribute vectors skip the Triton export.

Configuration only: task bodies live in `pipelines/rollout.py` (run config and defaults in
`pipelines/orchestration.py`, the model lookup in `pipelines/registry.py`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task, teardown

from pipelines.orchestration import (
    CANARY_ASSET_URI,
    CHAMPION_ASSET_URI,
    LIVE_ASSET_URI,
    SHARD_BUILD_POOL,
    config_params,
    default_args,
)

CHAMPION = Asset(CHAMPION_ASSET_URI)
CANARY = Asset(CANARY_ASSET_URI)
LIVE = Asset(LIVE_ASSET_URI)


@dag(
    dag_id="loupe_model_rollout",
    schedule=[CHAMPION],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={  # the trigger form's order: what the operator decides first, paths last
        "model": Param("champion", type="string", examples=["champion", "challenger"],
                       title="Model to roll out", description=(
                           "alias (champion, challenger), registered version "
                           "(loupe-embedder/3) or attributes/<seed> (model-free vectors, "
                           "benchmarks)")),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="build, export and canary only; live traffic untouched"),
        "canary_min_rater_recall": Param(None, type=["null", "number"], minimum=0, maximum=1,
                                         section="Canary thresholds", description=(
                                             "rater recall@k the new index must reach "
                                             "(default: params.yaml index.canary)")),
        "canary_min_exact_overlap": Param(None, type=["null", "number"], minimum=0, maximum=1,
                                          section="Canary thresholds", description=(
                                              "index top-k vs exact top-k overlap (default: "
                                              "params.yaml index.canary)")),
        "detector": Param(None, type=["null", "string"], section="Serving details",
                          description=("registered detector version (loupe-detector/2) "
                                       "Triton serves beside the embedder; default: the "
                                       "newest registered")),
        "n_shards": Param(None, type=["null", "integer"], minimum=1, section="Serving details",
                          description="shard count (default: params.yaml index.n_shards)"),
        **config_params(),
    },
    tags=["loupe", "index", "serving"],
    doc_md=__doc__,
)
def loupe_model_rollout():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task(execution_timeout=timedelta(minutes=5))
    def resolve_model(config: dict, params=None, triggering_asset_events=None) -> str:
        from pipelines.registry import resolve_model
        from pipelines.run_config import LoupeConfig

        events = triggering_asset_events.get(CHAMPION, []) if triggering_asset_events else []
        promoted = events[-1].extra.get("model_version") if events else None
        return resolve_model(params["model"], LoupeConfig(**config).mlflow_tracking_uri,
                             promoted)

    @task(execution_timeout=timedelta(minutes=5))
    def plan(config: dict, model_version: str, params=None, dag_run=None) -> dict:
        """Takes the index root's rollout lease first: another rollout running refuses this
        one, its holder named in the error."""
        from pipelines.orchestration import for_run, run_owner
        from pipelines.rollout import claim_rollout, plan_rollout

        cfg, run_dir = for_run(config, dag_run)
        claim_rollout(cfg, run_owner(dag_run), model_version)
        return plan_rollout(cfg, run_dir, model_version, dag_run.run_after,
                            params["n_shards"], params["detector"])

    @task
    def list_partitions(plan: dict) -> list[int]:
        return plan["partitions"]

    @task
    def list_shards(plan: dict) -> list[int]:
        return plan["shards"]

    @task(execution_timeout=timedelta(hours=3), max_active_tis_per_dagrun=4,
          map_index_template="partition {{ partition }}")
    def embed_partition(config: dict, plan: dict, partition: int) -> dict:
        from pipelines.rollout import embed_partition
        from pipelines.run_config import LoupeConfig

        get_current_context()["partition"] = partition
        return embed_partition(LoupeConfig(**config), plan["model_version"], plan["treatment"],
                               plan["embeddings_dir"], partition)

    @task(pool=SHARD_BUILD_POOL, execution_timeout=timedelta(hours=2),
          map_index_template="shard {{ shard }}")
    def build_shard(config: dict, plan: dict, shard: int) -> dict:
        from pipelines.rollout import build_shard_once
        from pipelines.run_config import LoupeConfig

        get_current_context()["shard"] = shard
        return build_shard_once(LoupeConfig(**config), plan["embeddings_dir"],
                                plan["version_dir"], shard, plan["n_shards"])

    @task(execution_timeout=timedelta(minutes=30))
    def finalize_index(plan: dict, dag_run=None) -> dict:
        from pipelines.rollout import finalize_index_once

        return finalize_index_once(plan["version_dir"], plan["n_shards"], {
            "embeddings_dir": plan["embeddings_dir"], "dag_run": dag_run.run_id})

    @task(execution_timeout=timedelta(minutes=15))
    def export_triton(config: dict, plan: dict, params=None) -> dict:
        from pipelines.rollout import export_triton
        from pipelines.run_config import LoupeConfig

        return export_triton(LoupeConfig(**config), plan["model_version"], plan["treatment"])

    @task(execution_timeout=timedelta(minutes=30), outlets=[CANARY])
    def canary(config: dict, plan: dict, params=None, outlet_events=None) -> dict:
        """A passing verdict is the run's `loupe://serving/canary` event (a failing one
        fails this task, its reason in the log)."""
        from pipelines.rollout import run_canary
        from pipelines.run_config import LoupeConfig

        verdict = run_canary(LoupeConfig(**config), plan["index_version"],
                             plan["model_version"],
                             {"min_rater_recall": params.get("canary_min_rater_recall"),
                              "min_exact_overlap": params.get("canary_min_exact_overlap")})
        outlet_events[CANARY].extra = {"model_version": plan["model_version"], **verdict}
        return verdict

    @task(execution_timeout=timedelta(minutes=10), trigger_rule="none_failed")
    def cutover(config: dict, plan: dict, params=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipelines.rollout import cutover_once
        from pipelines.run_config import LoupeConfig

        if params["dry_run"]:
            raise AirflowSkipException(f"dry run: {plan['index_version']} is built and passed "
                                       "its canary; live traffic untouched")
        return cutover_once(LoupeConfig(**config), plan["index_version"])

    @task(execution_timeout=timedelta(minutes=10), outlets=[LIVE])
    def smoke_query(config: dict, plan: dict, outlet_events=None) -> dict:
        """What went live, as the run's `loupe://serving/live` event."""
        from pipelines.orchestration import live_event
        from pipelines.rollout import smoke_query
        from pipelines.run_config import LoupeConfig

        smoke = smoke_query(LoupeConfig(**config), plan["index_version"])
        outlet_events[LIVE].extra = live_event("rollout", smoke)
        return smoke

    @teardown
    def release_lease(config: dict, dag_run=None) -> bool:
        """Runs however the run ended; frees only this run's own lease."""
        from pipelines.orchestration import run_owner
        from pipelines.rollout import release_rollout
        from pipelines.run_config import LoupeConfig

        return release_rollout(LoupeConfig(**config), run_owner(dag_run))

    config = configure()
    rollout = plan(config, resolve_model(config))
    embedded = embed_partition.partial(config=config, plan=rollout).expand(
        partition=list_partitions(rollout))
    built = build_shard.partial(config=config, plan=rollout).expand(
        shard=list_shards(rollout))
    embedded >> built
    exported = export_triton(config, rollout)  # runs beside the re-embedding
    verdict = canary(config, rollout)
    built >> finalize_index(rollout) >> verdict
    [verdict, exported] >> cutover(config, rollout) >> smoke_query(config, rollout) \
        >> release_lease(config)


loupe_model_rollout()
