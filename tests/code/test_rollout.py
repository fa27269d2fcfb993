"""The rollout helpers without a server or Airflow run: version naming, the plan, the
nothing-live skip, and `rollout_local` (the rollout DAG's tasks in process) on the tiny
world with the model-free `attributes/<seed>` vectors, reruns and rollback included."""

from __future__ import annotations

import shutil
import socket
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowSkipException

from pipelines.index import CanaryFailed
from pipelines.orchestration import skip_if_nothing_live
from pipelines.rollout import (
    NothingLive,
    ServingUnavailable,
    build_shard_once,
    call_api,
    compact_once,
    index_version_for_run,
    live_index_version,
    plan_rollout,
    rollback_live,
    rollout_local,
    run_canary,
)
from pipelines.run_config import LoupeConfig, resolve_config
from serving.shards import layout, pointer

MODEL = "attributes/0"
RUN_AFTER = datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)


def _config(root: Path, world: Path, **extra) -> LoupeConfig:
    return resolve_config({"loupe_root": str(root), "world_root": str(world), **extra}, {}, {})


def _pointers(cfg: LoupeConfig) -> tuple[str | None, str | None]:
    return pointer.read(cfg.index, layout.CURRENT), pointer.read(cfg.index, layout.PREVIOUS)


# --------------------------------------------------------------------------- naming + plan
def test_index_version_is_derived_from_the_run_not_the_clock():
    assert index_version_for_run(RUN_AFTER, MODEL) == "20260301T123005123456Z-attributes-0"
    assert index_version_for_run(RUN_AFTER, "loupe-embedder/3", kind="compact") == \
        "20260301T123005123456Z-compact-loupe-embedder-3"
    cet = RUN_AFTER.astimezone(timezone(timedelta(hours=1)))  # the same instant elsewhere
    assert index_version_for_run(cet, MODEL) == index_version_for_run(RUN_AFTER, MODEL)
    later = index_version_for_run(RUN_AFTER + timedelta(microseconds=1), MODEL)
    assert sorted([later, index_version_for_run(RUN_AFTER, MODEL)])[-1] == later


def test_plan_lists_partitions_shards_and_run_scoped_paths_and_writes_nothing(tmp_path,
                                                                           tiny_world):
    cfg = _config(tmp_path, tiny_world)
    run_dir = tmp_path / "run"
    plan = plan_rollout(cfg, run_dir, MODEL, RUN_AFTER, None, None)
    version = "20260301T123005123456Z-attributes-0"
    assert plan == {"model_version": MODEL, "treatment": None, "index_version": version,
                    "version_dir": str(cfg.index / layout.VERSIONS / version),
                    "embeddings_dir": str(run_dir / "embeddings" / "attributes-0"),
                    "n_shards": 2, "partitions": list(range(8)), "shards": [0, 1]}
    assert plan_rollout(cfg, run_dir, MODEL, RUN_AFTER, 3, None)["shards"] == [0, 1, 2]
    assert not cfg.index.exists() and not run_dir.exists()
    with pytest.raises(ValueError, match="shard count must be >= 1, got -1"):
        plan_rollout(cfg, run_dir, MODEL, RUN_AFTER, -1, None)


# --------------------------------------------------------------------------- nothing live
def test_nothing_live_is_a_skip_for_upkeep_tasks_and_nothing_else(tmp_path, tiny_world):
    cfg = _config(tmp_path, tiny_world)
    with pytest.raises(NothingLive, match="no index version is live yet"):
        live_index_version(cfg)
    with pytest.raises(NothingLive):
        compact_once(cfg, RUN_AFTER)
    with pytest.raises(AirflowSkipException, match="no index version is live yet"):
        skip_if_nothing_live(live_index_version, cfg)
    with pytest.raises(AirflowSkipException):
        skip_if_nothing_live(compact_once, cfg, RUN_AFTER)
    assert skip_if_nothing_live(lambda a, b: a + b, 2, 3) == 5

    def broken(_cfg):
        raise ValueError("bad input stays a failure")

    with pytest.raises(ValueError, match="bad input stays a failure"):
        skip_if_nothing_live(broken, cfg)
    assert not cfg.index.exists()


def test_an_absent_api_is_serving_unavailable(tmp_path, tiny_world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = _config(tmp_path, tiny_world, api_url=f"http://127.0.0.1:{port}")
    with pytest.raises(ServingUnavailable, match=f"GET http://127.0.0.1:{port}/readyz"):
        call_api(cfg, "GET", "/readyz", timeout_s=5)


# --------------------------------------------------------------------------- rollout_local
@pytest.fixture(scope="module")
def rolled_out(tiny_world, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rollout")
    return root, rollout_local(_config(root, tiny_world), MODEL, RUN_AFTER)


@pytest.fixture
def root(rolled_out, tmp_path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(rolled_out[0], copy, symlinks=True)
    return copy


def test_rollout_local_embeds_builds_canaries_cuts_over_and_smoke_queries(rolled_out,
                                                                          tiny_world):
    root, done = rolled_out
    cfg = _config(root, tiny_world)
    plan = done["plan"]
    version = plan["index_version"]
    assert version == index_version_for_run(RUN_AFTER, MODEL)
    assert "export_triton" not in done  # attribute vectors have no model for Triton
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    assert sum(p["embedded"] for p in done["embed_partition"]) == len(catalog) == 217
    assert [b["shard_id"] for b in done["build_shard"]] == [0, 1]
    assert sum(b["count"] for b in done["build_shard"]) == 217
    assert done["finalize_index"] == {"index_version": version, "model_version": MODEL,
                                      "count": 217, "n_shards": 2}
    assert done["canary"]["passed"] and done["canary"]["metrics"]["probe_recall"] > 0.9
    assert (done["cutover"]["to"], done["cutover"]["via"]) == (version, "pointer")
    assert done["cutover"]["triton_versions"] == []
    assert done["smoke_query"] == {"index_version": version, "model_version": MODEL,
                                   "queries": 10, "self_hits": 10}
    assert _pointers(cfg) == (version, None)
    assert Path(plan["embeddings_dir"]).is_relative_to(cfg.runs / "rollout_local" / version)


def test_rerunning_rollout_local_writes_nothing_twice(root, tiny_world):
    cfg = _config(root, tiny_world)
    version = pointer.read(cfg.index)
    files = sorted(p for p in layout.version_dir(cfg.index, version).rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    history = (cfg.index / layout.HISTORY).read_text()
    again = rollout_local(cfg, MODEL, RUN_AFTER)
    assert again["plan"]["index_version"] == version
    assert [p["embedded"] for p in again["embed_partition"]] == [0] * 8  # resumed
    assert again["cutover"]["already_live"] is True
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (cfg.index / layout.HISTORY).read_text() == history
    with pytest.raises(ValueError, match="is finalised with 2 shards, not 3"):
        build_shard_once(cfg, again["plan"]["embeddings_dir"], again["plan"]["version_dir"],
                         0, 3)


def test_second_model_cuts_over_then_rolls_back_one_step(root, tiny_world):
    cfg = _config(root, tiny_world)
    first, _ = _pointers(cfg)
    later = RUN_AFTER + timedelta(days=1)
    dry = rollout_local(cfg, "attributes/2", later, dry_run=True)
    assert dry["canary"]["passed"] and "cutover" not in dry and "smoke_query" not in dry
    assert _pointers(cfg) == (first, None)
    second = rollout_local(cfg, "attributes/1", later, n_shards=3)
    assert len(second["build_shard"]) == 3 and second["smoke_query"]["self_hits"] == 15
    assert _pointers(cfg) == (second["plan"]["index_version"], first)
    assert rollback_live(cfg)["to"] == first
    assert _pointers(cfg) == (first, None)
    with pytest.raises(ValueError, match="no previous index version to roll back to"):
        rollback_live(cfg)


def test_a_failing_canary_raises_and_leaves_live_untouched(root, tiny_world):
    cfg = _config(root, tiny_world)
    live = pointer.read(cfg.index)
    with pytest.raises(CanaryFailed, match="live traffic untouched: model version "
                                           "'attributes/0' is not the expected 'attributes/7'"):
        run_canary(cfg, live, "attributes/7")
    assert pointer.read(cfg.index) == live
