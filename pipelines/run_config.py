"""Where one run reads and writes: `LoupeConfig` and how it is resolved.

Every path comes from the run's params, else an Airflow Variable `loupe_<key>`, else an
environment variable, else a default derived from `LOUPE_ROOT` (the repository) and
params.yaml's `world.size`. A DAG's `configure` task resolves it once per run and the other
tasks receive the resolved strings, so a run never mixes two configurations. `api_url`
attaches a running search API (serving/api/app.py) that serves this `index_root` and
`triton_repo` (pipelines/rollout.py says what changes when it is set).

DAG files import this module while the DAG processor parses them: standard library only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIABLE_PREFIX = "loupe_"

# run param / Variable key -> environment variable consulted when neither sets it
CONFIG_ENV = {
    "loupe_root": "LOUPE_ROOT",
    "params_file": "LOUPE_PARAMS_FILE",
    "world_root": "LOUPE_WORLD_ROOT",
    "runs_dir": "LOUPE_RUNS_DIR",
    "index_root": "LOUPE_INDEX_ROOT",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "change_feed": "LOUPE_CHANGE_FEED",
    "triton_repo": "LOUPE_TRITON_REPO",
    "api_url": "LOUPE_API_URL",
}

@dataclass(frozen=True)
class LoupeConfig:
    """Resolved paths of one DAG run (strings, so it travels through XCom as-is)."""

    loupe_root: str
    params_file: str
    world_root: str
    runs_dir: str
    index_root: str
    mlflow_tracking_uri: str
    change_feed: str
    triton_repo: str
    api_url: str | None = None  # the live search API; None: no serving attached

    @property
    def world(self) -> Path:
        return Path(self.world_root)

    @property
    def runs(self) -> Path:
        return Path(self.runs_dir)

    @property
    def index(self) -> Path:
        return Path(self.index_root)

    @property
    def quarantine_dir(self) -> Path:
        return Path(self.loupe_root) / "quarantine"

    @property
    def alerts_dir(self) -> Path:
        return self.runs / "alerts"

    @property
    def triton_repository(self) -> Path:
        return Path(self.triton_repo)

    @property
    def models_dir(self) -> Path:
        """Registered versions fetched from MLflow (pipelines.registry.fetch_registered)."""
        return self.runs / "models"

    def run_dir(self, dag_id: str, run_id: str) -> Path:
        """Where one DAG run writes: re-running its tasks rewrites the same files."""
        return self.runs / "airflow" / dag_id / slug(run_id)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def slug(text: str) -> str:
    """A file-name-safe form of a run id or model version."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    if not out:
        raise ValueError(f"cannot make a path component of {text!r}")
    return out


def resolve_config(params: Mapping[str, Any], variables: Mapping[str, Any] | None = None,
                   env: Mapping[str, str] | None = None) -> LoupeConfig:
    """Run params, else Airflow Variables, else environment, else defaults (module doc)."""
    from pipelines.config import load_section
    from pipelines.registry import resolve_tracking_uri

    variables = variables or {}
    env = os.environ if env is None else env

    def pick(key: str) -> str | None:
        for value in (params.get(key), variables.get(key), env.get(CONFIG_ENV[key])):
            if value not in (None, ""):
                return str(value)
        return None

    root = Path(pick("loupe_root") or REPO_ROOT).resolve()
    params_file = Path(pick("params_file") or (
        root / "params.yaml" if (root / "params.yaml").is_file() else REPO_ROOT / "params.yaml"))
    size = load_section(params_file, "world").get("size", "demo")
    runs = Path(pick("runs_dir") or root / "runs" / size)
    return LoupeConfig(
        loupe_root=str(root), params_file=str(params_file),
        world_root=str(pick("world_root") or root / "data" / size), runs_dir=str(runs),
        index_root=str(pick("index_root") or runs / "index"),
        mlflow_tracking_uri=resolve_tracking_uri(
            pick("mlflow_tracking_uri") or f"sqlite:///{root / 'mlflow.db'}"),
        change_feed=str(pick("change_feed") or runs / "change_feed.sqlite"),
        triton_repo=str(pick("triton_repo") or runs / "triton"),
        api_url=(pick("api_url") or "").rstrip("/") or None)
