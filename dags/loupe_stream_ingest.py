"""Streaming ingest in micro-batches: consume the catalog change feed into the live index's
delta (new and updated listings embedded with the live model, removed and sold-out ones
tombstoned) until caught up or out of time, then alert when the feed lags.

The indexer checkpoints with every batch, so an interrupted run loses and repeats nothing;
one run at a time. Skips while nothing is live.

Configuration only: task bodies live in `pipelines/ingest.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from pipelines.orchestration import config_params, default_args


@dag(
    dag_id="loupe_stream_ingest",
    schedule=timedelta(minutes=5),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1, retry_delay=timedelta(seconds=20)),
    params={
        **config_params(),
        "max_seconds": Param(240, type="number", minimum=1,
                             description="time budget of one micro-batch run"),
        "max_pending_events": Param(1000, type="integer", minimum=0,
                                    description="alert when more events wait after the run"),
        "max_lag_s": Param(300, type="number", minimum=0,
                           description="alert when the oldest waiting event is older"),
    },
    tags=["loupe", "index", "streaming"],
    doc_md=__doc__,
)
def loupe_stream_ingest():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task(execution_timeout=timedelta(minutes=10))
    def ingest(config: dict, params=None) -> dict:
        from pipelines.ingest import ingest_micro_batch
        from pipelines.orchestration import skip_if_nothing_live
        from pipelines.run_config import LoupeConfig

        return skip_if_nothing_live(ingest_micro_batch, LoupeConfig(**config),
                                    params["max_seconds"])

    @task(execution_timeout=timedelta(minutes=2))
    def check_lag(result: dict, params=None) -> dict:
        from pipelines.ingest import check_ingest_lag

        return check_ingest_lag(result, params["max_pending_events"], params["max_lag_s"])

    check_lag(ingest(configure()))


loupe_stream_ingest()
