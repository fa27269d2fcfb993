"""Start the whole serving stack as real processes: tritonserver, shard replicas, search API.

One `ServingStack` = one tritonserver over a Loupe model repository, `replicas` HTTP
processes per index shard (serving/shards/server.py) and the search API
(serving/api/app.py), all bound to 127.0.0.1 on free ports. `loupe serve`, the end-to-end
tests and bench/serve.py all start it this way, so what is tested and measured is what runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.api.app import ApiSettings
from serving.api.rerank import RerankConfig
from serving.shards import pointer
from serving.triton.server import REPO_ROOT, TritonServer, free_port


def _get_json(url: str, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None


@dataclass
class ServiceProcess:
    """One HTTP service process (shard replica or API) with its log and controls."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str]
    ready_path: str = "/healthz"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child)
        self.process = subprocess.Popen([sys.executable, *self.args, "--port", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=REPO_ROOT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; log tail:\n{self.log_tail()}")
            if _get_json(self.url + self.ready_path) is not None:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process holds its connections but answers nothing (a stalled host)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        os.kill(self.process.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crashed host."""
        if self.alive():
            self.process.kill()
            self.process.wait()


@dataclass
class ServingStack:
    triton_repo: Path
    index_root: Path
    world_root: Path
    features_path: Path
    run_dir: Path
    admin_token: str
    replicas: int = 2
    deadline_s: float = 0.15
    rerank: RerankConfig = field(default_factory=RerankConfig)
    supervise: bool = True  # restart what dies (see Supervisor); fault tests drive it by hand
    triton: TritonServer | None = None
    shards: dict[int, list[ServiceProcess]] = field(default_factory=dict)
    api: ServiceProcess | None = None
    supervisor: Supervisor | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LOUPE_ADMIN_TOKEN"] = self.admin_token
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")  # FAISS per query: one thread, many processes
        return env

    def shard_process(self, shard_id: int, replica: int, model_version: str,
                      port: int | None = None) -> ServiceProcess:
        return ServiceProcess(
            f"shard{shard_id}-r{replica}",
            ["-m", "serving.shards.server", "--index-root", str(self.index_root),
             "--shard", str(shard_id), "--model-version", model_version,
             "--features", str(self.features_path)],
            port or free_port(), self.run_dir / f"shard{shard_id}-r{replica}.log", self._env())

    def start(self, timeout_s: float = 180.0) -> ServingStack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = pointer.live_manifest(self.index_root)
        try:
            self.triton = TritonServer(self.triton_repo, self.run_dir / "triton")
            self.triton.start_process()  # boots while the shard replicas load
            self.shards = {s: [self.shard_process(s, r, manifest["model_version"]).start()
                               for r in range(self.replicas)]
                           for s in range(manifest["n_shards"])}
            self.triton.wait_ready(timeout_s)
            for procs in self.shards.values():
                for proc in procs:
                    proc.wait_ready(timeout_s)
            settings = ApiSettings(
                triton_url=self.triton.grpc_url, triton_repo=str(self.triton_repo),
                index_root=str(self.index_root),
                shards={s: [p.url for p in procs] for s, procs in self.shards.items()},
                world_root=str(self.world_root), features_path=str(self.features_path),
                admin_token=self.admin_token, deadline_s=self.deadline_s, rerank=self.rerank)
            settings_path = settings.to_json(self.run_dir / "api.json")
            self.api = ServiceProcess("api", ["-m", "serving.api.app", "--settings",
                                              str(settings_path)],
                                      free_port(), self.run_dir / "api.log", self._env(),
                                      ready_path="/readyz").start()
            self.api.wait_ready(timeout_s)
            if self.supervise:
                self.supervisor = Supervisor(self).start()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_replica(self, shard_id: int, replica: int, model_version: str | None = None,
                        timeout_s: float = 90.0) -> None:
        """Bring a killed replica back on its old port (the API's topology is static),
        serving the live model version unless told otherwise."""
        old = self.shards[shard_id][replica]
        old.kill()
        version = model_version or pointer.live_manifest(self.index_root)["model_version"]
        proc = self.shard_process(shard_id, replica, version, port=old.port).start()
        self.shards[shard_id][replica] = proc
        proc.wait_ready(timeout_s)

    @property
    def url(self) -> str:
        return self.api.url

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.api is not None:
            self.api.stop()
        for procs in self.shards.values():
            for proc in procs:
                proc.stop()
        if self.triton is not None:
            self.triton.stop()

    def __enter__(self) -> ServingStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Restart:
    name: str
    died_at: float  # monotonic time the supervisor saw the process gone
    serving_at: float | None  # when it answered its readiness probe again; None: failed
    error: str = ""


class Supervisor:
    """Restarts a shard replica or tritonserver that exited (kill -9, OOM, crash) on its
    old ports, as Kubernetes' controllers do for the manifests in infra/k8s. A process that
    dies again soon after a restart waits twice as long before the next try (up to
    `max_backoff_s`), so a crash loop does not spin. Only exits are seen: a stalled process
    keeps its slot (readiness reports it; see serving/api/replica_health.py)."""

    def __init__(self, stack: ServingStack, every_s: float = 0.2, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0):
        self.stack, self.every_s = stack, every_s
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.restarts: list[Restart] = []
        self._wait: dict[str, float] = {}  # name -> backoff before its next restart
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loupe-supervisor",
                                        daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(120)

    def _dead(self) -> list[tuple[str, object]]:
        out = []
        triton = self.stack.triton
        if triton is not None and triton.process is not None and triton.process.poll() is not None:
            out.append(("tritonserver", None))
        for shard_id, procs in self.stack.shards.items():
            for replica, proc in enumerate(procs):
                if not proc.alive():
                    out.append((proc.name, (shard_id, replica)))
        return out

    def _restart(self, name: str, slot: tuple[int, int] | None) -> None:
        died_at = time.monotonic()
        wait = self._wait.get(name, 0.0)
        if self._stop.wait(wait):
            return
        try:
            if slot is None:
                triton = self.stack.triton
                triton.stop()
                triton.start_process()
                triton.wait_ready(180)
            else:
                self.stack.restart_replica(*slot)
            self.restarts.append(Restart(name, died_at, time.monotonic()))
        except (OSError, RuntimeError, TimeoutError, KeyError, ValueError) as err:
            self.restarts.append(Restart(name, died_at, None, str(err)[:500]))
            print(f"supervisor: restarting {name} failed: {err}", file=sys.stderr)
        previous = [r for r in self.restarts[:-1] if r.name == name]
        crash_loop = previous and previous[-1].serving_at is not None and (
            died_at - previous[-1].serving_at < self.stable_s)
        self._wait[name] = (min(self.max_backoff_s, max(self.backoff_s, 2 * wait))
                            if crash_loop or self.restarts[-1].serving_at is None else 0.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for name, slot in self._dead():
                if self._stop.is_set():
                    return
                self._restart(name, slot)
