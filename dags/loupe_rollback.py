"""Rollback (manual): point the live index back at the previous version in one step, then
smoke-query it. The previous version's shards and Triton model stay loaded and warm for a
while after a cutover, so serving flips without a reload. With serving attached (`api_url`
+ admin token, as for `loupe_model_rollout`) the flip is the search API's /admin/rollback,
which moves the model and the index together, and the smoke query goes through its search.
What serves afterwards is the run's asset event `loupe://serving/live`.

Configuration only: task bodies live in `pipelines/rollout.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from pipelines.orchestration import LIVE_ASSET_URI, config_params, default_args

LIVE = Asset(LIVE_ASSET_URI)


@dag(
    dag_id="loupe_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=0),
    params=config_params(),
    tags=["loupe", "index", "serving"],
    doc_md=__doc__,
)
def loupe_rollback():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task(execution_timeout=timedelta(minutes=5))
    def rollback(config: dict) -> dict:
        from pipelines.rollout import rollback_live
        from pipelines.run_config import LoupeConfig

        return rollback_live(LoupeConfig(**config))

    @task(execution_timeout=timedelta(minutes=10), outlets=[LIVE])
    def smoke_query(config: dict, moved: dict, outlet_events=None) -> dict:
        """What serves after the flip, as the run's `loupe://serving/live` event."""
        from pipelines.orchestration import live_event
        from pipelines.rollout import smoke_query
        from pipelines.run_config import LoupeConfig

        smoke = smoke_query(LoupeConfig(**config), moved["to"])
        outlet_events[LIVE].extra = live_event("rollback", smoke,
                                               rolled_back_from=moved.get("from"))
        return smoke

    config = configure()
    smoke_query(config, rollback(config))


loupe_rollback()
