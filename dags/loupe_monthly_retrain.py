"""Monthly retrain: validate the logs, harvest position-debiased training pairs, train,
evaluate on the rater set, register the `challenger` and run the promotion gate; a newly
promoted `champion` emits the asset `loupe://models/embedder/champion`, which starts
`loupe_model_rollout`.

Configuration only: each task calls one function of `pipelines/orchestration.py`, imported
when the task runs (that module itself is standard-library-only at import), and tasks hand
each other paths, never data.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from pipelines.orchestration import config_params, default_args


@dag(
    dag_id="loupe_monthly_retrain",
    schedule="@monthly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params=config_params(),
    tags=["loupe", "training"],
    doc_md=__doc__,
)
def loupe_monthly_retrain():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task(execution_timeout=timedelta(minutes=30))
    def validate_logs(config: dict, dag_run=None) -> dict:
        from pipelines.orchestration import for_run, validate_logs

        return validate_logs(*for_run(config, dag_run))

    @task(execution_timeout=timedelta(minutes=60))
    def harvest_pairs(config: dict, dag_run=None) -> dict:
        from pipelines.orchestration import for_run, harvest_pairs

        return harvest_pairs(*for_run(config, dag_run))

    config = configure()
    validate_logs(config) >> harvest_pairs(config)


loupe_monthly_retrain()
