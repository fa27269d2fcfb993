"""Weekly compaction: rebuild the live index with the streaming delta folded in (tombstones
dropped, upserts added, graph refitted), canary it, cut it over, prune the folded delta rows
and smoke-query what is live. Skips while nothing is live; a failing canary leaves the live
version in place.

Configuration only: task bodies live in `pipelines/rollout.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from pipelines.orchestration import config_params, default_args


@dag(
    dag_id="loupe_weekly_compaction",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params=config_params(),
    tags=["loupe", "index"],
    doc_md=__doc__,
)
def loupe_weekly_compaction():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task(execution_timeout=timedelta(hours=2))
    def compact(config: dict, dag_run=None) -> dict:
        from pipelines.orchestration import skip_if_nothing_live
        from pipelines.rollout import compact_once
        from pipelines.run_config import LoupeConfig

        return skip_if_nothing_live(compact_once, LoupeConfig(**config), dag_run.run_after)

    @task(execution_timeout=timedelta(minutes=30))
    def canary(config: dict, compacted: dict) -> dict:
        from pipelines.rollout import run_canary
        from pipelines.run_config import LoupeConfig

        return run_canary(LoupeConfig(**config), compacted["index_version"],
                          compacted["model_version"])

    @task(execution_timeout=timedelta(minutes=5))
    def cutover(config: dict, compacted: dict) -> dict:
        from pipelines.rollout import cutover_once
        from pipelines.run_config import LoupeConfig

        return cutover_once(LoupeConfig(**config), compacted["index_version"])

    @task(execution_timeout=timedelta(minutes=10))
    def prune_delta(config: dict) -> dict:
        from pipelines.rollout import prune_delta_rows
        from pipelines.run_config import LoupeConfig

        return prune_delta_rows(LoupeConfig(**config))

    @task(execution_timeout=timedelta(minutes=10))
    def smoke_query(config: dict, compacted: dict) -> dict:
        from pipelines.rollout import smoke_query
        from pipelines.run_config import LoupeConfig

        return smoke_query(LoupeConfig(**config), compacted["index_version"])

    config = configure()
    compacted = compact(config)
    canary(config, compacted) >> cutover(config, compacted) >> [
        prune_delta(config), smoke_query(config, compacted)]


loupe_weekly_compaction()
