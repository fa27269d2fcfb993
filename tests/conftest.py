"""Shared fixtures. Airflow reads its environment at first import, so set it here, first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="loupe-airflow-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).parents[1] / "dags"))
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest  # noqa: E402

from pipelines.world import generate_world  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """The tiny world (seed 0), generated once per test session; treat it as read-only."""
    out = tmp_path_factory.mktemp("world") / "tiny"
    generate_world("tiny", 0, out)
    return out


@pytest.fixture(scope="session")
def tiny_harvest(tiny_world, tmp_path_factory) -> Path:
    """Harvest output for the tiny world (pairs_debiased/naive.parquet, ...); read-only."""
    from pipelines.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("harvest") / "tiny"
    return harvest(tiny_world, out, HarvestConfig(bootstrap=20),
                   quarantine_dir=out.parent / "quarantine").out_dir
