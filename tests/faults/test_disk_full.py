"""The disk fills under the Loupe root (a real 2 MiB tmpfs): a rollout's re-embed, its shard
build (FAISS's own writer) and the streaming indexer's delta append fail with ENOSPC naming
the file and the space left (SQLite's "disk I/O error" explained), the live version and the
delta log stay intact, and the same calls complete once space is freed (the rollout resumes
its run)."""

from __future__ import annotations

import errno
import os
import subprocess
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipelines.ingest import ChangeFeed, FeedEvent, ingest_micro_batch
from pipelines.rollout import (
    build_shard_once,
    embed_partition,
    plan_rollout,
    rollout_local,
)
from pipelines.run_config import resolve_config
from serving.shards import ShardIndex, layout, pointer
from serving.shards.delta import DeltaLog

pytestmark = [pytest.mark.faults]
RUN_AFTER = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk, name: str, leave_bytes: int):
    """A filler file that leaves about `leave_bytes` free on the file system."""
    filler = disk / name
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with filler.open("wb") as f:
        f.write(b"\0" * size)
    return filler


def _live_intact(cfg) -> bool:
    """Every file of the live version matches its manifest's sha256 and loads."""
    vdir = layout.version_dir(cfg.index, pointer.read(cfg.index))
    manifest = layout.read_manifest(vdir)
    return all(ShardIndex.load(vdir, s["shard_id"], manifest, verify=True).index.ntotal
               == s["count"] for s in manifest["shards"])


def test_disk_full_during_a_reembed_and_a_delta_append_loses_nothing(tiny_world, tmp_path,
                                                                   small_disk, counts):
    cfg = resolve_config({"loupe_root": str(small_disk), "world_root": str(tiny_world),
                          "change_feed": str(tmp_path / "feed.sqlite")}, {}, {})
    counts.tried("index root on a 2 MiB tmpfs: roll out attributes/0, ingest 10 feed events, "
                 "fill the disk, roll out attributes/1 and ingest 100 more; free space; retry both")
    first = rollout_local(cfg, "attributes/0", RUN_AFTER)["plan"]["index_version"]
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    feed = ChangeFeed(cfg.change_feed)
    items = catalog.itertuples()
    feed.append([FeedEvent("updated", r.item_id, r.image_path)
                 for _, r in zip(range(10), items, strict=False)])
    assert ingest_micro_batch(cfg, 30)["events"] == 10
    delta = DeltaLog(cfg.index / layout.DELTA_DB, create=False)
    rows_before, seq_before = delta.count(), delta.max_seq()
    delta.close()

    fillers = [_fill(small_disk, "filler-1", 64 * 1024)]
    with pytest.raises(OSError) as build:
        rollout_local(cfg, "attributes/1", RUN_AFTER + timedelta(hours=1))
    # 100 updates: 100 new vectors for the delta, on a disk with no room left
    feed.append([FeedEvent("updated", r.item_id, r.image_path)
                 for _, r in zip(range(100), items, strict=False)])
    fillers.append(_fill(small_disk, "filler-2", 0))
    with pytest.raises(OSError, match="the disk is full .*nothing was appended") as append:
        ingest_micro_batch(cfg, 30)
    assert append.value.errno == errno.ENOSPC and append.value.filename.endswith(
        layout.DELTA_DB)
    for filler in fillers:  # space freed: look at what the failures left, then retry
        filler.unlink()
    live_intact = pointer.read(cfg.index) == first and _live_intact(cfg)
    delta = DeltaLog(cfg.index / layout.DELTA_DB, create=False)
    assert delta.count() == rows_before and delta.max_seq() == seq_before
    assert delta.checkpoint("indexer") == 10
    delta.close()
    counts.add(disk_full_live_intact=live_intact, disk_full_build_errno=build.value.errno)
    assert build.value.errno == errno.ENOSPC and "the disk is full" in str(build.value)
    assert build.value.filename.startswith(str(small_disk))  # names the file it was writing
    assert live_intact

    second = rollout_local(cfg, "attributes/1", RUN_AFTER + timedelta(hours=1))
    assert pointer.read(cfg.index) == second["plan"]["index_version"] != first
    assert ingest_micro_batch(cfg, 60)["events"] == 100
    delta = DeltaLog(cfg.index / layout.DELTA_DB, create=False)
    applied = delta.rows_after(seq_before)
    assert delta.checkpoint("indexer") == 110
    assert sorted(r.feed_offset for r in applied) == list(range(11, 111))  # each once
    assert {r.op for r in applied} == {"upsert"}
    delta.close()
    feed.close()
    assert _live_intact(cfg)


def test_disk_full_during_a_shard_build_keeps_the_live_version_and_resumes(
        tiny_world, tmp_path, small_disk, counts):
    cfg = resolve_config({"loupe_root": str(small_disk), "world_root": str(tiny_world)}, {}, {})
    counts.tried("index root on a 2 MiB tmpfs: roll out attributes/0; re-embed attributes/1, "
                 "fill the disk, build its shards; free space; the same rollout again")
    first = rollout_local(cfg, "attributes/0", RUN_AFTER)["plan"]["index_version"]
    later = RUN_AFTER + timedelta(hours=1)
    run_dir = cfg.runs / "rollout_local" / "second"
    plan = plan_rollout(cfg, run_dir, "attributes/1", later, None, None)
    for p in plan["partitions"]:
        embed_partition(cfg, "attributes/1", plan["treatment"], plan["embeddings_dir"], p)
    filler = _fill(small_disk, "filler", 4 * 1024)
    with pytest.raises(OSError) as build:
        for s in plan["shards"]:
            build_shard_once(cfg, plan["embeddings_dir"], plan["version_dir"], s,
                             plan["n_shards"])
    filler.unlink()
    live_intact = pointer.read(cfg.index) == first and _live_intact(cfg)
    counts.add(disk_full_shard_build_live_intact=live_intact)
    assert build.value.errno == errno.ENOSPC and "the disk is full" in str(build.value)
    assert build.value.filename.startswith(plan["version_dir"])  # names the shard it built
    assert not list(small_disk.rglob("*.tmp"))  # no half-written shard left behind
    assert live_intact

    second = rollout_local(cfg, "attributes/1", later, run_dir=run_dir)
    assert pointer.read(cfg.index) == second["plan"]["index_version"] == plan["index_version"]
    assert _live_intact(cfg)
    assert sum(s["count"] for s in second["build_shard"]) == len(pd.read_parquet(
        tiny_world / "tables" / "catalog.parquet"))
