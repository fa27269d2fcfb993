"""Airflow cluster policy of the Loupe deployments, installed as `airflow_local_settings.py`
(docker compose mounts it into $AIRFLOW_HOME/config/; the Helm values embed it as
`airflowLocalSettings`). The DAGs stay executor-agnostic; this file decides where tasks run:

- the catalog re-embedding (`loupe_model_rollout.embed_partition`, one task per partition)
  runs on GPU: on the `gpu` Celery queue (CeleryExecutor; workers started with
  `--queues gpu`), or in a pod from the GPU pod template (KubernetesExecutor);
- every other task keeps the default queue / pod template (CPU).
"""

from __future__ import annotations

import os

GPU_TASKS = {("loupe_model_rollout", "embed_partition")}
GPU_QUEUE = os.environ.get("LOUPE_GPU_QUEUE", "gpu")
GPU_POD_TEMPLATE = os.environ.get("LOUPE_GPU_POD_TEMPLATE",
                                  "/opt/airflow/pod_templates/gpu-pod-template.yaml")


def task_policy(task) -> None:
    """Route the GPU tasks; the executor decides how (queue or pod template)."""
    if (task.dag_id, task.task_id) not in GPU_TASKS:
        return
    from airflow.configuration import conf

    if "KubernetesExecutor" in conf.get("core", "executor"):
        config = {"pod_template_file": GPU_POD_TEMPLATE}
        if hasattr(task, "partial_kwargs"):  # mapped: executor_config has no setter
            task.partial_kwargs["executor_config"] = config
        else:
            task.executor_config = config
    else:
        task.queue = GPU_QUEUE
