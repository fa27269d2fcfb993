"""The rollout DAG on the Celery deployment while its infrastructure restarts under it: the
Redis broker is killed (SIGKILL) and restarted while partitions are being re-embedded, then
PostgreSQL (metadata DB + result backend) is restarted while shards are built. The run
completes, or fails cleanly and completes when its failed tasks are cleared: the live index
is then the one the run planned, every item once, of one model.

The broker is a Redis of this test's own, run as docker-compose runs it (`--appendonly yes`),
so the machine's shared Redis is left alone; PostgreSQL is the machine's, restarted with
`pg_ctlcluster` (it is back before the test ends, whatever happens). Components that exit
are restarted, as compose's `restart: unless-stopped` does, and counted.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest
import redis

from pipelines.run_config import REPO_ROOT, resolve_config
from serving.shards import layout, pointer
from serving.shards.kinds import load_version

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]
MODEL = "attributes/0"
DAG_ID = "loupe_model_rollout"


def _load_cluster_module():
    path = REPO_ROOT / "infra" / "airflow-celery" / "local_cluster.py"
    spec = importlib.util.spec_from_file_location("loupe_local_cluster", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Broker:
    """A redis-server with an append-only file, killed and restarted on its port."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.proc = root, None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=open(self.root / "redis.log", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis("127.0.0.1", self.port).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not answer in 20 s")

    def crash(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _pg_version() -> str:
    return Path(sorted(glob.glob("/etc/postgresql/*/main"))[-1]).parent.name


def _restart_postgres(down_s: float) -> None:
    subprocess.run(["pg_ctlcluster", _pg_version(), "main", "stop", "-m", "fast"], check=True,
                   capture_output=True)
    time.sleep(down_s)
    subprocess.run(["pg_ctlcluster", _pg_version(), "main", "start"], check=True,
                   capture_output=True)


def _states(cluster, task_id: str) -> list[str] | None:
    """States of a task's instances in this run; None while the metadata DB is down."""
    try:
        return [r[0] for r in cluster.sql(
            "SELECT state FROM task_instance WHERE dag_id = %s AND task_id = %s",
            (DAG_ID, task_id))]
    except psycopg2.OperationalError:
        return None


def _wait_for(cluster, ready, what: str, timeout_s: float = 300) -> float:
    t0 = time.monotonic()
    while not ready():
        cluster._check_alive()  # restarts what exited
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - t0


@pytest.fixture
def postgres_back():
    yield
    lc = _load_cluster_module()
    lc.ensure_postgres()  # the machine's Postgres is up again for whatever runs next


def test_rollout_survives_redis_and_postgres_restarts_mid_run(tiny_world, tmp_path, counts,
                                                              postgres_back):
    lc = _load_cluster_module()
    counts.tried("rollout DAG on Celery (2 workers + 1 GPU-queue worker): SIGKILL the Redis "
                 "broker mid re-embed (down 3 s), restart PostgreSQL mid shard build (down 3 s)")
    broker = Broker(tmp_path / "redis")
    broker.start()
    root = tmp_path / "root"
    resumed = 0
    try:
        with lc.LocalCeleryCluster((DAG_ID,), workers=2, concurrency=1, gpu_workers=1,
                                   gpu_concurrency=2, workdir=tmp_path / "cluster",
                                   redis_port=broker.port, restart_exited=True) as cluster:
            run_id = cluster.trigger(DAG_ID, {"loupe_root": str(root),
                                              "world_root": str(tiny_world), "model": MODEL})
            _wait_for(cluster, lambda: (_states(cluster, "embed_partition") or []).count(
                "success") >= 2, "two partitions embedded")
            broker.crash()
            crashed_at = datetime.now(UTC)
            time.sleep(3)
            broker.start()
            _wait_for(cluster, lambda: any(s in ("running", "success") for s in
                                           _states(cluster, "build_shard") or []),
                      "a shard build to start", timeout_s=600)
            _restart_postgres(3)
            state = cluster.wait_run(DAG_ID, run_id, timeout_s=600)
            failed = [(t["task_id"], t["map_index"]) for t in
                      cluster.task_instances(DAG_ID, run_id) if t["state"] == "failed"]
            print(f"after the restarts the run is {state}; failed tasks: {failed}; "
                  f"components restarted: {cluster.restarts}")
            if state == "failed":  # cleanly failed: clearing the failed tasks resumes it
                resumed = 1
                cluster._airflow("tasks", "clear", DAG_ID, "--only-failed", "--yes")
                state = cluster.wait_run(DAG_ID, run_id, timeout_s=600)
            tis = cluster.task_instances(DAG_ID, run_id)
            plan = cluster.sql("SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND "
                               "task_id = 'plan' AND key = 'return_value'",
                               (DAG_ID, run_id))[0][0]
            restarts = list(cluster.restarts)
    finally:
        broker.crash()
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    print("tries:", {f"{t['task_id']}[{t['map_index']}]": t["try_number"] for t in tis})
    # every worker reconnected to the restarted broker and took tasks from it
    after = {t["worker"].split("@")[0] for t in tis
             if t["worker"] and t["start_date"] and t["start_date"] > crashed_at}
    print("workers that ran tasks after the broker restart:", sorted(after))
    assert after == {"g1", "w1", "w2"}
    counts.add(celery_infra_restart_run_succeeded=int(state == "success"),
               celery_infra_restart_needed_clear=resumed,
               celery_infra_restart_components_restarted=len(restarts))
    assert state == "success", states
    assert set(states.values()) <= {"success", "skipped"}, states

    cfg = resolve_config({"loupe_root": str(root), "world_root": str(tiny_world)}, {}, {})
    assert pointer.read(cfg.index, layout.CURRENT) == plan["index_version"]
    manifest, indexes = load_version(cfg.index, plan["index_version"], verify=True)
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    assert manifest["model_version"] == MODEL and manifest["count"] == len(catalog)
    ids = np.concatenate([s.ids for s in indexes])
    assert len(ids) == len(set(ids.tolist())) == len(catalog)
