"""Hourly monitoring of the live index: canary replay, drift of streamed embeddings against
the live build's baseline, index age, per-shard p99 latency. Writes every metric (run-scoped
`health.json` and `<runs_dir>/monitoring/latest.json`) and then fails loudly (task failure +
alert callback) on any breach. Skips while nothing is live.

Configuration only: task bodies live in `pipelines/monitor.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import TriggerRule, dag, task

from pipelines.monitor import health_params
from pipelines.orchestration import config_params, default_args

CHECKS = ("replay_canary", "embedding_drift", "index_age", "shard_latency")


@dag(
    dag_id="loupe_monitoring",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=50),
    default_args=default_args(retries=1, execution_timeout=timedelta(minutes=15)),
    params={**config_params(), **health_params()},
    tags=["loupe", "monitoring"],
    doc_md=__doc__,
)
def loupe_monitoring():
    @task(execution_timeout=timedelta(minutes=2))
    def configure(params=None) -> dict:
        from pipelines.orchestration import configure_run

        return configure_run(params)

    @task
    def find_live(config: dict) -> str:
        from pipelines.orchestration import skip_if_nothing_live
        from pipelines.rollout import live_index_version
        from pipelines.run_config import LoupeConfig

        return skip_if_nothing_live(live_index_version, LoupeConfig(**config))

    @task
    def replay_canary(config: dict, live: str, params=None) -> dict:
        from pipelines.monitor import replay_canary, thresholds_from
        from pipelines.run_config import LoupeConfig

        return replay_canary(LoupeConfig(**config), live, thresholds_from(params))

    @task
    def embedding_drift(config: dict, live: str, params=None) -> dict:
        from pipelines.monitor import embedding_drift, thresholds_from
        from pipelines.run_config import LoupeConfig

        return embedding_drift(LoupeConfig(**config), live, thresholds_from(params))

    @task
    def index_age(config: dict, live: str, params=None) -> dict:
        from pipelines.monitor import index_age, thresholds_from
        from pipelines.run_config import LoupeConfig

        return index_age(LoupeConfig(**config), live, thresholds_from(params))

    @task
    def shard_latency(config: dict, live: str, params=None) -> dict:
        from pipelines.monitor import shard_latency, thresholds_from
        from pipelines.run_config import LoupeConfig

        return shard_latency(LoupeConfig(**config), live, thresholds_from(params))

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def report_health(ti=None, dag_run=None) -> dict:
        """Runs after every check, failed ones included, so a breach is always written."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipelines.monitor import report_health
        from pipelines.orchestration import for_run

        config, live = ti.xcom_pull(task_ids="configure"), ti.xcom_pull(task_ids="find_live")
        if config is None or live is None:
            raise AirflowSkipException("nothing is live (or configure failed): no report")
        cfg, run_dir = for_run(config, dag_run)
        return report_health(cfg, run_dir, live,
                             {name: ti.xcom_pull(task_ids=name) for name in CHECKS})

    config = configure()
    live = find_live(config)
    checks = [replay_canary(config, live), embedding_drift(config, live),
              index_age(config, live), shard_latency(config, live)]
    checks >> report_health()


loupe_monitoring()
