"""A throwaway Airflow 3.3 CeleryExecutor deployment on one machine, for tests and try-outs.

It runs the production settings of `airflow.env` with local endpoints: a fresh Postgres
database as the metadata DB and Celery result backend (created per run, dropped after), a
dedicated Redis db number as the broker with a per-run queue (two runs never steal each
other's tasks), and the real components as processes: api-server (Execution API for the
workers), scheduler, dag-processor and N `airflow celery worker`s named w1..wN, plus
optional `gpu` workers g1..gM that consume only the GPU queue the cluster policy
(infra/airflow_local_settings.py, installed in $AIRFLOW_HOME/config) routes the catalog
re-embedding to.

Postgres (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are started with
`pg_ctlcluster` / `redis-server` when they do not answer; when that is impossible the run stops
with a message saying what to start.

    python infra/airflow-celery/local_cluster.py run --workers 2 --dag loupe_model_rollout \
        --conf '{"model": "attributes/0", "loupe_root": "/tmp/x", "world_root": "data/tiny"}'

`restart_exited=True` restarts a component that exits (the scheduler and dag-processor exit
when the metadata DB goes away), as docker-compose's `restart: unless-stopped` does;
`redis_port` points the cluster at a broker of the caller's own (the restart fault test).

This module never imports Airflow (a caller such as pytest may have Airflow configured for
another metadata DB); it talks to the metadata DB with plain SQL.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENV_FILE = HERE / "airflow.env"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13  # db 13: kept for these clusters
DB_PREFIX = "loupe_airflow_"  # + <unix time>_<tag>: a run's metadata DB
STALE_DB_S = 3600  # a run's DB older than this with no connection is left over: dropped


class ClusterError(RuntimeError):
    """The local cluster could not start or a component died."""


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as docker compose reads them."""
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{n}: not KEY=VALUE: {line!r}")
        env[key.strip()] = value
    return env


# --------------------------------------------------------------------------- services
def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return True
        time.sleep(0.3)
    return False


def ensure_redis() -> str:
    """Redis on 127.0.0.1:6379, started as a daemon when absent; returns what was done."""
    if _port_open(REDIS_HOST, REDIS_PORT):
        return "running"
    exe = shutil.which("redis-server")
    if exe is None:
        raise ClusterError("Redis does not answer on 127.0.0.1:6379 and redis-server is not "
                           "installed: install it (apt-get install redis-server) or start one")
    subprocess.run([exe, "--bind", REDIS_HOST, "--port", str(REDIS_PORT), "--daemonize", "yes",
                    "--save", "", "--appendonly", "no"], check=True, capture_output=True)
    if not _wait_port(REDIS_HOST, REDIS_PORT, 10):
        raise ClusterError("started redis-server but 127.0.0.1:6379 does not answer")
    return "started"


def ensure_postgres() -> str:
    """Postgres on 127.0.0.1:5432, started with pg_ctlcluster (Debian) when absent."""
    if _port_open(PG_HOST, PG_PORT):
        return "running"
    clusters = sorted(glob.glob("/etc/postgresql/*/main"))
    if not clusters or shutil.which("pg_ctlcluster") is None:
        raise ClusterError("Postgres does not answer on 127.0.0.1:5432 and no Debian cluster "
                           "(pg_ctlcluster, /etc/postgresql/*/main) is there to start: start a "
                           "server with trust auth for user postgres on 127.0.0.1:5432")
    version = Path(clusters[-1]).parent.name
    subprocess.run(["pg_ctlcluster", version, "main", "start"], check=True,
                   capture_output=True)
    if not _wait_port(PG_HOST, PG_PORT, 30):
        raise ClusterError(f"started Postgres {version}/main but 127.0.0.1:5432 does not answer")
    return "started"


def _admin_sql(statement: str) -> None:
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def drop_stale_databases(now: float | None = None) -> list[str]:
    """Drop metadata DBs of earlier runs that were killed before their teardown: older than
    STALE_DB_S and without a connection (a live cluster always holds some)."""
    now = time.time() if now is None else now
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT d.datname FROM pg_database d WHERE d.datname LIKE %s AND NOT "
                        "EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
                        (DB_PREFIX + "%",))
            names = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    stale = []
    for name in names:
        stamp = name[len(DB_PREFIX):].split("_")[0]
        if stamp.isdigit() and now - int(stamp) > STALE_DB_S:
            _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            stale.append(name)
    return stale


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the process that started it dies, so a
    killed test run leaves no scheduler or worker behind (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the cluster
@dataclass
class LocalCeleryCluster:
    """Start with `with LocalCeleryCluster(...) as c:`; everything is torn down on exit."""

    dags: tuple[str, ...] = ("loupe_model_rollout",)
    workers: int = 2
    concurrency: int = 1
    gpu_workers: int = 0
    gpu_concurrency: int = 1
    workdir: Path | None = None
    redis_db: int = REDIS_DB
    redis_port: int = REDIS_PORT  # another port: a broker of the caller's own (fault tests)
    keep_db: bool = False
    # restart a component that exits, as docker-compose's `restart: unless-stopped` does
    restart_exited: bool = False
    run_tag: str = field(default_factory=lambda: secrets.token_hex(4))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per start-up phase
    restarts: list[str] = field(default_factory=list)  # components restarted, in order

    def __post_init__(self) -> None:
        if self.workers < 1 or self.concurrency < 1 or self.gpu_workers < 0:
            raise ValueError("workers and concurrency must be >= 1, gpu_workers >= 0")
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="loupe-celery-"))
        self.db = f"{DB_PREFIX}{int(time.time())}_{self.run_tag}"
        self.queue = f"loupe-{self.run_tag}"
        self.gpu_queue = f"{self.queue}-gpu"
        self.api_port = _free_port()
        self.home = self.workdir / "airflow_home"
        self.logs = self.workdir / "logs"
        self.dags_folder = self.workdir / "dags"
        self._args: dict[str, tuple[str, ...]] = {}

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db}"

    def env(self) -> dict[str, str]:
        """airflow.env with this machine's endpoints; the caller's Airflow settings dropped."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(read_env_file())
        api = f"http://127.0.0.1:{self.api_port}"
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN":
                f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{self.redis_port}/"
                                           f"{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.dsn}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "LOUPE_GPU_QUEUE": self.gpu_queue,  # read by the cluster policy
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            # the supervisor notices some task processes' exit only at its next wake-up
            # (at most this many seconds): 1 s frees a finished task's worker slot sooner
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        return env

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCeleryCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 180) -> LocalCeleryCluster:
        t0 = time.monotonic()
        ensure_postgres()
        if self.redis_port == REDIS_PORT:
            ensure_redis()
        redis.Redis(REDIS_HOST, self.redis_port, db=self.redis_db).ping()
        drop_stale_databases()
        _admin_sql(f'CREATE DATABASE "{self.db}"')
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dags_folder.mkdir(parents=True, exist_ok=True)
        (self.home / "config").mkdir(parents=True, exist_ok=True)  # on sys.path in Airflow
        shutil.copy(HERE.parent / "airflow_local_settings.py", self.home / "config")
        for dag_id in self.dags:  # only these DAGs exist here: the others would run on cron
            src = REPO / "dags" / f"{dag_id}.py"
            if not src.is_file():
                raise FileNotFoundError(f"no DAG file {src}")
            (self.dags_folder / src.name).symlink_to(src)
        self._env = self.env()
        self._airflow("db", "migrate")
        self.timings["db_migrate_s"] = round(time.monotonic() - t0, 1)
        self._airflow("pools", "import", str(REPO / "dags" / "pools.json"))
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port",
                    str(self.api_port), "--workers", "1")
        self._spawn("scheduler", "scheduler")
        self._spawn("dag-processor", "dag-processor")
        workers = [(f"w{i}", self.queue, self.concurrency) for i in range(1, self.workers + 1)]
        workers += [(f"g{i}", self.gpu_queue, self.gpu_concurrency)
                    for i in range(1, self.gpu_workers + 1)]
        for name, queue, slots in workers:
            self._spawn(name, "celery", "worker", "--celery-hostname", f"{name}@%h",
                        "--queues", queue, "--concurrency", str(slots),
                        "--skip-serve-logs", "--without-gossip", "--without-mingle")
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{self.api_port}/api/v2/version"),
                   deadline, "the api-server to answer")
        self._wait(lambda: len(self.celery_workers()) == len(workers), deadline,
                   f"{len(workers)} celery workers to answer a ping")
        self.timings["start_s"] = round(time.monotonic() - t0, 1)
        return self

    def stop(self) -> None:
        """SIGTERM every component's process group, SIGKILL what is left after 20 s, then
        drop the run's database and broker keys."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        try:
            r = redis.Redis(REDIS_HOST, self.redis_port, db=self.redis_db)
            keys = list(r.scan_iter(f"*{self.queue}*"))  # the gpu queue's name contains it
            if keys:
                r.delete(*keys)
        except redis.RedisError:
            pass  # the broker is gone: nothing of this run is left in it
        if not self.keep_db and _port_open(PG_HOST, PG_PORT):
            _admin_sql(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def _airflow(self, *args: str, timeout_s: float = 300) -> str:
        cmd = [str(Path(sys.executable).parent / "airflow"), *args]
        out = subprocess.run(cmd, env=self._env, capture_output=True, text=True,
                             timeout=timeout_s, cwd=self.workdir)
        if out.returncode != 0:
            raise ClusterError(f"`airflow {' '.join(args)}` failed ({out.returncode}):\n"
                               f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def _spawn(self, name: str, *args: str) -> None:
        self._args[name] = args
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), *args], env=self._env,
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            if not self.restart_exited:
                raise ClusterError(f"{name} exited with {proc.returncode}:\n{tail}")
            self.restarts.append(name)
            print(f"local cluster: {name} exited with {proc.returncode}; restarting it "
                  f"(log: {self.logs / f'{name}.log'})", file=sys.stderr)
            self._spawn(name, *self._args[name])

    def _wait(self, ready, deadline: float, what: str) -> None:
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what} (logs: {self.logs})")
            time.sleep(0.5)

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def celery_workers(self) -> list[str]:
        """Names of the workers that answer a ping on this run's broker."""
        from celery import Celery

        app = Celery(broker=self._env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=1.0) or []
        except Exception:  # noqa: BLE001 - broker not ready yet counts as "no workers"
            return []
        finally:
            app.close()
        return sorted(name for reply in replies for name in reply)

    # ------------------------------------------------------------------ DAG runs
    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def trigger(self, dag_id: str, conf: dict, timeout_s: float = 120) -> str:
        """Wait until the dag-processor has serialized the DAG, then trigger it (CLI)."""
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: bool(self.sql("SELECT 1 FROM serialized_dag WHERE dag_id = %s",
                                         (dag_id,))),
                   deadline, f"the dag-processor to serialize {dag_id}")
        run_id = f"celery__{self.run_tag}"
        self._airflow("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
        return run_id

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 600) -> str:
        deadline = time.monotonic() + timeout_s

        def finished() -> bool:
            rows = self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                            (dag_id, run_id))
            return bool(rows) and rows[0][0] in ("success", "failed")

        self._wait(finished, deadline, f"run {run_id} of {dag_id} to finish")
        return self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                        (dag_id, run_id))[0][0]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of the run with the Celery worker that executed it (from the
        result backend's extended rows, matched by the TI's external executor id)."""
        rows = self.sql(
            """SELECT ti.task_id, ti.map_index, ti.state, ti.start_date, ti.end_date,
                      ti.queue, ti.pool, ti.try_number, ti.external_executor_id, m.worker
               FROM task_instance ti
               LEFT JOIN celery_taskmeta m ON m.task_id = ti.external_executor_id
               WHERE ti.dag_id = %s AND ti.run_id = %s
               ORDER BY ti.start_date NULLS LAST, ti.task_id, ti.map_index""",
            (dag_id, run_id))
        keys = ("task_id", "map_index", "state", "start_date", "end_date", "queue", "pool",
                "try_number", "celery_task_id", "worker")
        return [dict(zip(keys, row, strict=True)) for row in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the cluster, run one DAG, print its task "
                                     "instances with their workers, tear down")
    run.add_argument("--dag", default="loupe_model_rollout")
    run.add_argument("--conf", default="{}", help="run conf as JSON")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--concurrency", type=int, default=1)
    run.add_argument("--gpu-workers", type=int, default=0,
                     help="workers that consume only the GPU queue (re-embedding)")
    run.add_argument("--gpu-concurrency", type=int, default=1)
    run.add_argument("--workdir", type=Path, default=None)
    run.add_argument("--keep-db", action="store_true", help="keep the metadata DB after")
    sub.add_parser("services", help="only make sure Postgres and Redis answer")
    args = p.parse_args(argv)
    if args.cmd == "services":
        print(json.dumps({"postgres": ensure_postgres(), "redis": ensure_redis()}))
        return 0
    with LocalCeleryCluster((args.dag,), args.workers, args.concurrency, args.gpu_workers,
                            args.gpu_concurrency, args.workdir,
                            keep_db=args.keep_db) as cluster:
        run_id = cluster.trigger(args.dag, json.loads(args.conf))
        state = cluster.wait_run(args.dag, run_id)
        tis = cluster.task_instances(args.dag, run_id)
        print(json.dumps({"dag_id": args.dag, "run_id": run_id, "state": state,
                          "database": cluster.db, "timings": cluster.timings,
                          "task_instances": tis}, indent=1,
                         default=str))
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
