"""Start and stop the real `tritonserver` binary shipped in the nvidia-pytriton wheel.

The recipe (verified on CPU, see the project's shared notes): a runtime backend directory of
symlinks with the Python 3.11 stub, the interpreter's own lib/ first on LD_LIBRARY_PATH (else
the stub picks up the system libpython and model load fails), the venv first on PATH so the
python backend imports numpy/torch from it, and loopback-only binds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.triton.repository import MODELS

REPO_ROOT = Path(__file__).resolve().parents[2]


def triton_home() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend_dir(run_dir: Path) -> Path:
    ts = triton_home()
    py = run_dir / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": ts / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": ts / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": ts / "python_backend_stubs/3.11/triton_python_backend_stub",
    }
    for name, target in links.items():
        link = py / name
        if not link.exists():
            link.symlink_to(target)
    return run_dir / "backends"


@dataclass
class TritonServer:
    """One tritonserver process over a model repository; use as a context manager."""

    model_repository: Path
    run_dir: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    # explicit model control: versions are (re)loaded on demand at a model-version switch
    explicit_models: tuple[str, ...] | None = MODELS
    process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        ts = triton_home()
        cmd = [
            str(ts / "bin/tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={_backend_dir(self.run_dir)}",
            f"--cache-directory={ts / 'caches'}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=true", "--log-verbose=0",
        ]
        if self.explicit_models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in self.explicit_models]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(Path(sys.base_prefix) / "lib"), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        # the python models import the shared preprocessing from this checkout
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(":")
        return env

    def start_process(self) -> TritonServer:
        """Launch without waiting (a caller can start other processes meanwhile)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / "tritonserver.log", "ab")  # noqa: SIM115 (owned by process)
        self.process = subprocess.Popen(self.command(), env=self.env(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        self.start_process()
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self.process.returncode}; log tail:\n"
                    + self.log_tail())
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s; log tail:\n"
                           + self.log_tail())

    def log_tail(self, n: int = 40) -> str:
        path = self.run_dir / "tritonserver.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
