"""MLflow's tracking server dies in the middle of a registration, a promotion and a rollout's
lookups: each fails with RegistryUnavailable naming the server, nothing is left
half-registered once the retry has run, and the retry succeeds when the server is back.

The server is a real `mlflow server` (sqlite store, file artifacts). The outage is cut at an
exact point by a forwarding proxy on the client's path: it relays each request to the
server and, once the armed endpoint has answered, kills the server with SIGKILL and stops
listening, so every later call meets a refused connection, as after a crash.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from airflow.sdk import RetryAction
from mlflow import MlflowClient

from pipelines import orchestration
from pipelines import registry as reg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a sqlite file: started, SIGKILLed and restarted on its port."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
               "--default-artifact-root", (self.root / "mlruns").as_uri()]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(
            self.root / "server.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                log = (self.root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited: {log}")
            time.sleep(0.3)
        raise RuntimeError("mlflow server did not answer /health in 90 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class CuttingProxy:
    """Relays HTTP to the server; after the armed endpoint answers, the server dies and the
    proxy stops listening (requests in flight get no answer)."""

    def __init__(self, server: MlflowServer):
        self.server, self.port, self.armed, self.cut = server, _free_port(), None, False
        self.seen: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def listen(self) -> None:
        proxy = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a cut is clean

            def _relay(self) -> None:
                if proxy.cut:
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up = http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=30)
                up.request(self.command, self.path, body=body, headers={
                    k: v for k, v in self.headers.items() if k.lower() != "connection"})
                answer = up.getresponse()
                data = answer.read()
                proxy.seen.append(self.path.split("?")[0])
                cut_here = proxy.armed == (self.command,
                                           self.path.split("?")[0].rsplit("/mlflow", 1)[-1])
                if cut_here:  # before the answer leaves: the client's next call must not pass
                    proxy.cut = True
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if cut_here:
                    proxy.outage()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _relay

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Relay)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def arm(self, endpoint: str, method: str = "POST") -> None:
        """Cut right after `method` `endpoint` (the part after `/mlflow`) has answered."""
        self.armed, self.cut = (method, endpoint), False

    def outage(self) -> None:
        self.cut, self.armed = True, None
        self.server.kill()
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def back(self) -> None:
        """The server restarts on the same store, the path opens again."""
        self.server.start()
        self.cut = False
        self.listen()


@pytest.fixture()
def mlflow_path(tmp_path, monkeypatch):
    # fail fast instead of MLflow's default minutes of client retries: the outage is real
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = MlflowServer(tmp_path)
    server.start()
    proxy = CuttingProxy(server)
    proxy.listen()
    yield proxy
    proxy.server.kill()
    if not proxy.cut:
        proxy._stop()


def _logged_run(cfg: reg.RegistryConfig, tmp_path: Path, recall: float) -> reg.LoggedRun:
    model = tmp_path / f"embedder-{recall}.onnx"
    model.write_bytes(f"onnx bytes {recall}".encode())
    return reg.log_run(cfg, run_name=f"evaluate-{recall}", params={"backbone": "tiny_cnn"},
                       metrics={reg.HEADLINE: recall}, artifacts={}, model_files=[model])


def test_mlflow_killed_mid_registration_and_promotion_leaves_nothing_half_registered(
        mlflow_path, tmp_path, counts):
    counts.tried("real `mlflow server` SIGKILLed right after model-versions/create answered, "
                 "then right after `champion` moved; retried when it came back")
    cfg = reg.RegistryConfig(mlflow_path.uri, promotion_margin=0.01)
    client = MlflowClient(cfg.uri, cfg.uri)

    first = _logged_run(cfg, tmp_path, 0.70)
    mlflow_path.arm("/model-versions/create")
    with pytest.raises(reg.RegistryUnavailable) as err:
        reg.register_model_version(cfg, first, 0.70, "fp-a")
    assert mlflow_path.uri in str(err.value) and "registering a model version" in str(err.value)
    assert "retry" in str(err.value)
    assert mlflow_path.seen[-1].endswith("/model-versions/create")
    # the Airflow task is retried for it (bad input fails at once; this is not bad input)
    policy = orchestration.default_args()["retry_policy"]
    assert policy.evaluate(err.value, 1, 3).action != RetryAction.FAIL

    mlflow_path.back()
    assert reg.half_registered(client, cfg.model_name) == ["1"]  # the outage hit mid-way
    with pytest.raises(ValueError, match="not fully registered"):
        reg.download_model(cfg, "loupe-embedder/1", tmp_path / "fetch-pending")

    retry = _logged_run(cfg, tmp_path, 0.70)  # the retried task logs its run again
    ref = reg.register_model_version(cfg, retry, 0.70, "fp-a")
    versions = {mv.version: mv for mv in client.search_model_versions(
        f"name='{cfg.model_name}'")}
    assert list(versions) == [ref.version] == ["2"]
    assert versions["2"].tags[reg.REGISTRATION] == reg.COMPLETE
    assert versions["2"].tags["model_version"] == "loupe-embedder/2"
    assert reg.version_for_alias(cfg, reg.CHALLENGER) == ref
    assert client.get_run(first.run_id).info.status == "FINISHED"  # its run is kept
    registration_left = len(reg.half_registered(client, cfg.model_name))

    # promotion: `champion` moves, then the server dies before the decision is recorded
    mlflow_path.arm("/registered-models/alias")
    with pytest.raises(reg.RegistryUnavailable, match="promotion gate"):
        reg.promotion_gate(cfg, ref)
    mlflow_path.back()
    assert reg.half_registered(client, cfg.model_name) == ["2"]
    tags = client.get_model_version("loupe-embedder", "2").tags
    assert tags.get(reg.DECISION) == reg.PROMOTING, (tags, mlflow_path.seen[-8:])
    again = reg.promotion_gate(cfg, ref)  # the retry settles the interrupted one first
    assert not again.promoted and "already champion" in again.reason
    tags = client.get_model_version("loupe-embedder", "2").tags
    assert tags.get(reg.DECISION) == "promoted", (tags, mlflow_path.seen[-8:])
    assert reg.version_for_alias(cfg, reg.CHAMPION) == ref

    # a promotion interrupted before `champion` moved is recorded as rejected, not promoted
    better = reg.register_model_version(cfg, _logged_run(cfg, tmp_path, 0.90), 0.90, "fp-a")
    mlflow_path.arm("/model-versions/set-tag")  # the `promoting` record answered
    with pytest.raises(reg.RegistryUnavailable):
        reg.promotion_gate(cfg, better)
    mlflow_path.back()
    tags = client.get_model_version(better.name, better.version).tags
    assert tags.get(reg.DECISION) == reg.PROMOTING, (tags, mlflow_path.seen[-8:])
    settled = reg.settle_interrupted(client, cfg.model_name)
    assert len(settled) == 1 and "recorded as rejected" in settled[0]
    assert reg.version_for_alias(cfg, reg.CHAMPION) == ref
    decision = reg.promotion_gate(cfg, better)
    assert decision.promoted and reg.version_for_alias(cfg, reg.CHAMPION) == better
    left = len(reg.half_registered(client, cfg.model_name))
    assert registration_left == left == 0
    counts.add(mlflow_down_half_registered=registration_left + left)


def test_rollout_lookups_fail_as_unavailable_not_as_unregistered_and_work_when_back(
        mlflow_path, tmp_path, counts):
    counts.tried("a rollout's model lookups and fetch while `mlflow server` is killed, then "
                 "after it restarts")
    cfg = reg.RegistryConfig(mlflow_path.uri)
    ref = reg.register_model_version(cfg, _logged_run(cfg, tmp_path, 0.5), 0.5, "fp")
    reg.promotion_gate(cfg, ref)
    mlflow_path.outage()
    for call in (lambda: reg.resolve_model("champion", cfg.uri),
                 lambda: reg.resolve_model(ref.model_version, cfg.uri),
                 lambda: reg.resolve_detector(None, cfg.uri),
                 lambda: reg.fetch_registered(cfg.uri, ref.model_version, tmp_path / "models")):
        with pytest.raises(reg.RegistryUnavailable, match="did not answer"):
            call()
    assert not (tmp_path / "models" / "loupe-embedder-1").exists()  # nothing half-fetched
    mlflow_path.back()
    assert reg.resolve_model("champion", cfg.uri) == ref.model_version
    fetched = reg.fetch_registered(cfg.uri, ref.model_version, tmp_path / "models")
    assert (fetched / "embedder-0.5.onnx").read_bytes() == b"onnx bytes 0.5"
    counts.add(mlflow_down_rollout_lookups_unavailable=4)
