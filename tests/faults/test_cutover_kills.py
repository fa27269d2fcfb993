"""kill -9 the index lifecycle at random points, again and again: after every kill exactly
one consistent version is readable and a rollback does what it says.

A worker process (forked from a warm "zygote" so each start costs milliseconds, not a
Python import) loops over pointer moves (cutover / rollback between two finished versions
of two different models) or over whole rollouts (build shards -> manifest -> canary ->
cutover), and is SIGKILLed after a random delay. It logs the phase it enters to a file
(unbuffered), so the report shows where the kills landed.

Consistent, as a reader sees it without any repair: `current` names a finished version
(manifest present, every shard file matching its sha256, every shard of the manifest's
model, a passing canary); `previous` is unset or another finished version. After the
next pointer operation (the rollback this test runs) the history log replays to `current`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest

from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, write_manifest
from serving.shards import layout, pointer
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover, rollback

pytestmark = [pytest.mark.faults, pytest.mark.slow]
PARAMS = IndexParams.load()
MOVE_KILLS, ROLLOUT_KILLS = 24, 6

_ZYGOTE = r"""
import builtins, json, os, signal, sys
import numpy as np, pandas as pd
from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, new_version_id, write_manifest
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover, rollback
from serving.shards import layout, pointer

world, phases = sys.argv[1], sys.argv[2]
params = IndexParams.load()
catalog = pd.read_parquet(os.path.join(world, "tables/catalog.parquet"))
vectors = {s: attribute_vectors(catalog, seed=s) for s in (0, 1)}
ids = catalog["item_id"].to_numpy()
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed workers are reaped by the kernel
_open, _write, _close = os.open, os.write, os.close

def phase(name):
    fd = _open(phases, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _write(fd, (name + "\n").encode())
    _close(fd)

def moves(root, rng, a, b):
    while True:
        cur, prev = pointer.read(root), pointer.read(root, layout.PREVIOUS)
        if prev is not None and rng.random() < 0.5:
            phase("rollback")
            rollback(root)
        else:
            phase("cutover")
            cutover(root, b if cur == a else a)

def rollouts(root, rng):
    while True:
        seed = int(rng.integers(0, 2))
        model = f"attributes/{seed}"
        vdir = layout.version_dir(root, new_version_id(model))
        for s in range(params.n_shards):
            phase(f"build-shard-{s}")
            build_shard_from_arrays(ids, vectors[seed], model, s, params, vdir)
        phase("manifest")
        write_manifest(vdir, params.n_shards, {"fault": "rollout"})
        phase("canary")
        assert canary(root, vdir.name, world, params.canary).passed
        phase("cutover")
        cutover(root, vdir.name)

def crash_at(k, root, op, target):
    # SIGKILL itself just before its k-th filesystem call (open, write barrier, rename...)
    calls = [0]
    def wrap(fn):
        def inner(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return inner
    for name in ("open", "replace", "rename", "symlink", "unlink", "fsync"):
        setattr(os, name, wrap(getattr(os, name)))
    builtins.open = wrap(builtins.open)
    cutover(root, target) if op == "cutover" else rollback(root)
    phase("done")

print("ready", flush=True)
for line in sys.stdin:
    mode, root, seed, *args = line.split()
    pid = os.fork()
    if pid == 0:
        rng = np.random.default_rng(int(seed))
        if mode == "moves":
            moves(root, rng, *args)
        elif mode == "rollouts":
            rollouts(root, rng)
        else:
            crash_at(int(seed), root, *args)
        os._exit(0)
    print(pid, flush=True)
"""


class Zygote:
    """The warm process that forks one worker per command; `start` returns the worker pid."""

    def __init__(self, world: Path, phases: Path):
        self.phases = phases
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, str(world), str(phases)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, *command) -> int:
        self.phases.write_text("")
        self.proc.stdin.write(" ".join(str(c) for c in command) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def entered(self) -> list[str]:
        return self.phases.read_text().split()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still running"
        time.sleep(0.001)


def _finished(root: Path, version: str) -> list[str]:
    """Why `version` is not a finished, consistent version of one model ([] when it is)."""
    vdir = layout.version_dir(root, version)
    try:
        manifest = layout.read_manifest(vdir)
    except FileNotFoundError as err:
        return [str(err)]
    problems = []
    for shard in manifest["shards"]:
        sdir = layout.shard_dir(vdir, shard["shard_id"])
        meta = json.loads((sdir / layout.SHARD_META).read_text())
        if meta["model_version"] != manifest["model_version"]:
            problems.append(f"shard {shard['shard_id']} holds {meta['model_version']}")
        for name, info in shard["files"].items():
            if layout.sha256_file(sdir / name) != info["sha256"]:
                problems.append(f"{sdir.name}/{name} does not match its checksum")
    verdict = layout.verdict_path(root, version)
    if not verdict.is_file() or not json.loads(verdict.read_text())["passed"]:
        problems.append("no passing canary verdict")
    return problems


def _inconsistencies(root: Path) -> list[str]:
    current = pointer.read(root)
    previous = pointer.read(root, layout.PREVIOUS)
    if current is None:
        return ["nothing is live"]
    problems = [f"current {current}: {p}" for p in _finished(root, current)]
    if previous is not None:
        problems += [f"previous {previous}: {p}" for p in _finished(root, previous)]
        if previous == current:
            problems.append(f"previous == current == {current}: rollback cannot go back")
    return problems


def _history_replays(root: Path) -> bool:
    """Every move is logged once, in order: each entry starts where the last one ended and
    the last one ends at `current`."""
    entries = [json.loads(line) for line in (root / layout.HISTORY).read_text().splitlines()]
    return bool(entries) and entries[-1]["to"] == pointer.read(root) and all(
        e["from"] == before["to"] for before, e in pairwise(entries))


@pytest.fixture()
def index_root(tmp_path, tiny_world) -> tuple[Path, tuple[str, str, str]]:
    """Three finished, canary-passed versions: a and c of model attributes/0, b of
    attributes/1; a is live and c is previous."""
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    root = tmp_path / "index"
    versions = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        version = f"{name}-attributes-{seed}"
        vdir = layout.version_dir(root, version)
        vecs = attribute_vectors(catalog, seed=seed)
        for s in range(PARAMS.n_shards):
            build_shard_from_arrays(catalog["item_id"].to_numpy(), vecs, f"attributes/{seed}",
                                    s, PARAMS, vdir)
        write_manifest(vdir, PARAMS.n_shards, {"fault": "setup"})
        assert canary(root, version, tiny_world, PARAMS.canary).passed
        versions.append(version)
    a, b, c = versions
    cutover(root, c)
    cutover(root, a)
    return root, (a, b, c)


def _state(root: Path) -> tuple[str | None, str | None]:
    return pointer.read(root), pointer.read(root, layout.PREVIOUS)


def test_kill9_cutover_at_random_points_leaves_one_consistent_version(index_root, tiny_world,
                                                                       tmp_path, counts):
    root, (a, b, _) = index_root
    counts.tried(f"{MOVE_KILLS} workers looping cutover/rollback between two models' "
                 f"versions and {ROLLOUT_KILLS} looping build->manifest->canary->cutover, each "
                 "SIGKILLed after a random delay; after each kill: check what a reader sees, "
                 "then roll back")
    zygote = Zygote(tiny_world, tmp_path / "phases.log")
    rng = random.Random(20261128)
    landed: Counter = Counter()
    inconsistent, rollbacks_ok, rollbacks_refused, bad_rollbacks = [], 0, 0, []
    try:
        for i in range(MOVE_KILLS + ROLLOUT_KILLS):
            mode = "moves" if i < MOVE_KILLS else "rollouts"
            pid = zygote.start(mode, root, i, a, b)
            time.sleep(rng.uniform(0.0, 0.08 if mode == "moves" else 1.5))
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            entered = zygote.entered()
            landed[entered[-1] if entered else "start"] += 1
            problems = _inconsistencies(root)
            if problems:
                inconsistent.append((i, mode, entered[-3:], problems))
            live, previous = _state(root)
            if previous is None:
                with pytest.raises(ValueError, match="no previous"):
                    rollback(root)
                rollbacks_refused += 1
            else:
                rollback(root)
                if _state(root) != (previous, None) or not _history_replays(root):
                    bad_rollbacks.append((i, live, previous, _state(root)))
                else:
                    rollbacks_ok += 1
            problems = _inconsistencies(root)
            if problems:
                inconsistent.append((i, "after rollback", entered[-3:], problems))
    finally:
        zygote.close()
    counts.add(cutover_kills=MOVE_KILLS + ROLLOUT_KILLS,
               cutover_inconsistent=len(inconsistent),
               cutover_random_rollbacks_ok=rollbacks_ok,
               cutover_random_rollbacks_refused=rollbacks_refused,
               cutover_random_bad_rollbacks=len(bad_rollbacks),
               cutover_random_kill_phases=len(landed))
    print("kills landed in:", dict(landed))
    assert inconsistent == [], inconsistent[:3]
    assert bad_rollbacks == [], bad_rollbacks[:3]
    assert rollbacks_ok >= 10 and len(landed) >= 3  # kills spread over the lifecycle
    live = pointer.read(root)  # still fully usable: a cutover and a rollback
    cutover(root, b if live != b else a)
    rollback(root)
    assert pointer.read(root) == live and _history_replays(root)
    assert not list(root.glob(".*.tmp")) and pointer.pending_move(root) is None


def test_kill9_at_every_filesystem_step_of_cutover_and_rollback(index_root, tiny_world,
                                                                 tmp_path, counts):
    """Deterministic sweep: a worker SIGKILLs itself before its 1st, 2nd, ... filesystem
    call (open, rename, symlink, unlink, fsync) of one cutover or rollback, on a fresh copy
    of the root each time, until one runs to the end. The reader must see exactly the state
    before or after the move, and the next rollback must go where that state says."""
    template, (a, b, c) = index_root
    zygote = Zygote(tiny_world, tmp_path / "phases.log")
    # live a, previous c: cutover b -> (b, a); rollback -> (c, None)
    cases = {"cutover": ((a, c), (b, a), b), "rollback": ((a, c), (c, None), "-")}
    kills, inconsistent, bad_rollbacks, outcomes = 0, [], [], Counter()
    try:
        for op, (before, after, target) in cases.items():
            for k in range(1, 200):
                trial = tmp_path / f"{op}-{k}"
                shutil.copytree(template, trial, symlinks=True,
                                ignore=shutil.ignore_patterns(layout.VERSIONS))
                (trial / layout.VERSIONS).symlink_to(template / layout.VERSIONS)
                _wait_gone(zygote.start("crash", trial, k, op, target))
                finished = zygote.entered() == ["done"]
                kills += not finished
                state = _state(trial)
                problems = _inconsistencies(trial)
                if state not in (before, after) or problems:
                    inconsistent.append((op, k, state, problems))
                applied = "applied" if state == after else "not_applied"
                outcomes[f"cutover_sweep_{op}_{applied}"] += 1
                if state[1] is None:
                    with pytest.raises(ValueError, match="no previous"):
                        rollback(trial)
                else:
                    rollback(trial)
                    if _state(trial) != (state[1], None):
                        bad_rollbacks.append((op, k, state, _state(trial)))
                if not _history_replays(trial) or _inconsistencies(trial):
                    bad_rollbacks.append((op, k, "history or state after rollback",
                                          _inconsistencies(trial)))
                if finished:
                    break
    finally:
        zygote.close()
    counts.tried("SIGKILL before each filesystem call of a cutover and of a rollback")
    counts.add(cutover_sweep_kills=kills, cutover_sweep_inconsistent=len(inconsistent),
               cutover_sweep_bad_rollbacks=len(bad_rollbacks), **dict(outcomes))
    assert inconsistent == [], inconsistent[:3]
    assert bad_rollbacks == [], bad_rollbacks[:3]
    assert outcomes["cutover_sweep_cutover_applied"] >= 2
    assert outcomes["cutover_sweep_cutover_not_applied"] >= 3
    assert outcomes["cutover_sweep_rollback_applied"] >= 2
    assert outcomes["cutover_sweep_rollback_not_applied"] >= 3


def test_consistency_check_catches_a_mixed_version(index_root):
    """The checker above is not vacuous: a version whose shard claims another model, and so
    no longer matches its checksum, is reported."""
    root, (a, _, _) = index_root
    assert _inconsistencies(root) == []
    meta = layout.shard_dir(layout.version_dir(root, a), 1) / layout.SHARD_META
    meta.chmod(0o644)
    meta.write_text(meta.read_text().replace("attributes/0", "attributes/1"))
    problems = _inconsistencies(root)
    assert any("holds attributes/1" in p for p in problems)
    assert any("does not match its checksum" in p for p in problems)
    assert all(p.startswith(f"current {a}") for p in problems)
