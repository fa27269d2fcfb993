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
from airflow.sdk import Asset, dag, task

from pipelines.orchestration import CHAMPION_ASSET_URI, config_params, default_args

CHAMPION = Asset(CHAMPION_ASSET_URI)


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

    @task(execution_timeout=timedelta(minutes=60), pool="loupe_training")
    def train_embedder(config: dict, harvest: dict, variant: str, dag_run=None) -> dict:
        from pipelines.orchestration import for_run, train_embedder

        return train_embedder(*for_run(config, dag_run), harvest["harvest_dir"], variant)

    @task(execution_timeout=timedelta(minutes=60))
    def evaluate_and_register(config: dict, models: list[dict], harvest: dict,
                              dag_run=None) -> dict:
        from pipelines.orchestration import evaluate_and_register, for_run

        return evaluate_and_register(*for_run(config, dag_run), models, harvest)

    @task(outlets=[CHAMPION])
    def announce_champion(result: dict, outlet_events=None) -> str:
        """Emits the champion asset (starting the rollout) only when the gate promoted."""
        from airflow.exceptions import AirflowSkipException

        if not result["promoted"]:
            raise AirflowSkipException(f"not promoted: {result['decision']['reason']}")
        outlet_events[CHAMPION].extra = {"model_version": result["model_version"]}
        return result["model_version"]

    config = configure()
    harvest = harvest_pairs(config)
    validate_logs(config) >> harvest
    models = train_embedder.partial(config=config, harvest=harvest).expand(
        variant=["debiased", "naive", "frozen"])
    announce_champion(evaluate_and_register(config, models, harvest))


loupe_monthly_retrain()
