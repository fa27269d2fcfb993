"""Two rollouts onto one index root at once: one proceeds, the other refuses and names the
holder; a DAG run's lease blocks a local rollout; a lease whose process died is taken over.
Real rollouts (`rollout_local`, the rollout DAG's task functions) of model-free vectors."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest

from pipelines.rollout import (
    RolloutInProgress,
    claim_rollout,
    release_rollout,
    rollout_holder,
    rollout_local,
)
from pipelines.run_config import resolve_config
from serving.shards import pointer

pytestmark = [pytest.mark.faults]
RUN_AFTER = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def test_two_rollouts_at_once_one_proceeds_the_other_refuses(tiny_world, tmp_path, counts):
    cfg = resolve_config({"loupe_root": str(tmp_path), "world_root": str(tiny_world)}, {}, {})
    counts.tried("two rollout_local threads (attributes/0, attributes/1) released together "
                 "onto one index root")
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def roll(model: str, run_after: datetime) -> None:
        start.wait()
        try:
            outcomes[model] = rollout_local(cfg, model, run_after)
        except RolloutInProgress as err:
            outcomes[model] = err

    threads = [threading.Thread(target=roll, args=(m, RUN_AFTER + timedelta(minutes=i)))
               for i, m in enumerate(("attributes/0", "attributes/1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    refused = {m: o for m, o in outcomes.items() if isinstance(o, RolloutInProgress)}
    ran = {m: o for m, o in outcomes.items() if isinstance(o, dict)}
    counts.add(concurrent_rollouts_both_ran=int(len(ran) == 2),
               concurrent_rollouts_refused=len(refused))
    assert len(ran) == 1 and len(refused) == 1, outcomes
    [(winner, done)] = ran.items()
    [(loser, err)] = refused.items()
    assert f"refusing to roll out {loser}" in str(err)
    assert f"rolling out {winner}" in str(err) and "Wait for it to finish" in str(err)
    assert pointer.read(cfg.index) == done["plan"]["index_version"]
    assert rollout_holder(cfg) is None  # the winner gave its lease back
    # the loser, run again now, proceeds
    again = rollout_local(cfg, loser, RUN_AFTER + timedelta(hours=1))
    assert pointer.read(cfg.index) == again["plan"]["index_version"]


def test_a_dag_runs_lease_blocks_a_local_rollout_and_a_dead_holder_is_taken_over(
        tiny_world, tmp_path):
    cfg = resolve_config({"loupe_root": str(tmp_path), "world_root": str(tiny_world)}, {}, {})
    dag_run = "airflow:loupe_model_rollout/manual__2026-05-01T08:00:00+00:00"
    claim_rollout(cfg, dag_run, "loupe-embedder/3")
    assert claim_rollout(cfg, dag_run, "loupe-embedder/3")["owner"] == dag_run  # a retry
    with pytest.raises(RolloutInProgress, match="loupe_model_rollout/manual__.*rolling out "
                                                "loupe-embedder/3"):
        rollout_local(cfg, "attributes/0", RUN_AFTER)
    assert pointer.read(cfg.index) is None  # nothing was built or moved
    assert not release_rollout(cfg, "airflow:loupe_model_rollout/another-run")
    assert rollout_holder(cfg)["owner"] == dag_run
    assert release_rollout(cfg, dag_run) and rollout_holder(cfg) is None
    # a `loupe rollout` process that died holding the lease
    code = ("import os, socket, sys; from pipelines.rollout import claim_rollout; "
            "from pipelines.run_config import resolve_config; "
            "cfg = resolve_config({'loupe_root': sys.argv[1]}, {}, {}); "
            "claim_rollout(cfg, f'local:{socket.gethostname()}:{os.getpid()}:v', "
            "'attributes/9')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert rollout_holder(cfg)["model_version"] == "attributes/9"
    assert rollout_local(cfg, "attributes/0", RUN_AFTER)["cutover"]["to"]
    assert rollout_holder(cfg) is None
