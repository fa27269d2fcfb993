"""Process faults under live search traffic: kill -9 a shard replica, a whole shard, and
Triton, against the real stack (tritonserver, shard replica processes, search API).

A "failed query" is anything but a complete answer: a non-200 status, no response, a
non-JSON body, or a 200 flagged partial.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from serving.shards import layout

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def _failed(answers) -> list:
    return [a for a in answers if a.status != 200 or a.error or a.body.get("partial")]


def test_kill9_one_replica_under_load_fails_no_query(fault_stack, load_factory, counts):
    """SIGKILL one replica of each shard in turn while 3 clients search; the fan-out fails
    over to the other replica at once, then the killed one restarts on its port."""
    stack = fault_stack.stack
    counts.tried("3 clients searching; kill -9 shard0-r0, run 1.5 s, restart it; "
                 "kill -9 shard1-r1, run 1.5 s, restart it; run 1 s more")
    with load_factory() as load:
        t_start = time.monotonic()
        load.wait_for(20, t_start)
        kills = []
        for shard_id, replica in ((0, 0), (1, 1)):
            proc = stack.shards[shard_id][replica]
            t_kill = time.monotonic()
            proc.kill()
            assert not proc.alive()
            time.sleep(1.5)
            stack.restart_replica(shard_id, replica, fault_stack.model_version)
            kills.append((t_kill, time.monotonic()))
        t_back = time.monotonic()
        load.wait_for(20, t_back)
    during = [a for t0, t1 in kills for a in load.between(t0, t1)]
    failed = _failed(load.answers)
    counts.add(replica_kill_kills=len(kills), replica_kill_queries=len(load.answers),
               replica_kill_queries_while_down=len(during),
               replica_kill_failed_queries=len(failed))
    assert len(during) >= 20, "too little traffic while a replica was down"
    assert failed == [], failed[:5]
    assert max(a.seconds for a in during) < 1.0  # refused connections fail over fast
    for procs in stack.shards.values():
        assert all(p.alive() for p in procs)


def test_whole_shard_killed_gives_flagged_partials_never_5xx(fault_stack, load_factory,
                                                            counts):
    """Both replicas of shard 1 die: every answer is a 200 flagged partial that names shard
    1, holds only shard 0's items, and comes fast; after a restart answers are whole."""
    stack = fault_stack.stack
    n_shards = len(stack.shards)
    counts.tried("3 clients searching; kill -9 both replicas of shard 1 for 2 s, restart")
    with load_factory() as load:
        load.wait_for(10, time.monotonic())
        t_kill = time.monotonic()
        for proc in stack.shards[1]:
            proc.kill()
        time.sleep(2.0)
        t_restart = time.monotonic()
        for replica in range(len(stack.shards[1])):
            stack.restart_replica(1, replica, fault_stack.model_version)
        t_back = time.monotonic()
        load.wait_for(20, t_back)
    down = load.between(t_kill + 0.2, t_restart)  # requests sent after the kill took effect
    after = load.between(t_back)
    server_errors = [a for a in load.answers if a.status >= 500 or a.status == 0]
    flagged = [a for a in down if a.status == 200 and a.body["partial"]
               and a.body["missing_shards"] == [1]]
    foreign = [i for a in flagged for i in a.body["items"]
               if layout.shard_of(i["item_id"], n_shards) != 0]
    counts.add(shard_kill_queries=len(load.answers), shard_kill_queries_while_down=len(down),
               shard_kill_flagged_partial=len(flagged), shard_kill_5xx=len(server_errors),
               shard_kill_whole_after_restart=sum(
                   1 for a in after if a.status == 200 and not a.body["partial"]))
    assert server_errors == [], server_errors[:5]
    assert len(down) >= 20 and len(flagged) == len(down), [a.body for a in down][:3]
    assert all(a.body["items"] for a in flagged) and foreign == []
    assert max(a.seconds for a in down) < 1.0
    assert after and _failed(after) == []


def test_triton_killed_under_load_gives_clear_503s_then_recovers(fault_stack, load_factory,
                                                                 counts):
    """kill -9 tritonserver (its process group: the server and its python-backend stubs, as
    a crashed host) while 3 clients search, start it again on the same ports: while
    it is down every answer is a prompt 503 with a JSON reason (no hang, no 500), /readyz
    says 503, and searches succeed again soon after Triton is ready."""
    stack = fault_stack.stack
    triton = stack.triton
    counts.tried("3 clients searching; kill -9 tritonserver, 3 s down, restart it on the "
                 "same ports, wait for the API to answer 200 again")
    with load_factory() as load:
        load.wait_for(10, time.monotonic())
        t_kill = time.monotonic()
        os.killpg(triton.process.pid, signal.SIGKILL)  # the server and its model stubs
        triton.process.wait()
        time.sleep(3.0)
        ready_while_down = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
        t_restart = time.monotonic()
        triton.start_process()
        triton.wait_ready(120)
        t_ready = time.monotonic()
        recovered_at = None
        while time.monotonic() - t_ready < 60:
            ok = [a for a in load.between(t_ready) if a.status == 200]
            if ok:
                recovered_at = min(a.at + a.seconds for a in ok)
                break
            time.sleep(0.05)
        t_end = time.monotonic()
        load.wait_for(10, t_end)
    down = load.between(t_kill + 0.5, t_restart)
    window = load.between(t_kill, t_ready)
    bad = [a for a in window if a.status not in (200, 503) or a.error]
    unclear = [a for a in window if a.status == 503 and "unavailable" not in a.body["detail"]]
    counts.add(triton_restart_queries=len(load.answers),
               triton_restart_queries_while_down=len(down),
               triton_restart_503=sum(1 for a in load.answers if a.status == 503),
               triton_restart_500=sum(1 for a in load.answers if a.status == 500),
               triton_restart_no_response=sum(1 for a in load.answers if a.status == 0),
               triton_restart_max_s_while_down=round(max(a.seconds for a in down), 3),
               triton_restart_down_s=round(t_ready - t_kill, 2),
               triton_restart_recovery_s=round((recovered_at or float("nan")) - t_ready, 2))
    assert ready_while_down.status_code == 503
    assert "not ready" in ready_while_down.json()["detail"]
    assert len(down) >= 10 and all(a.status == 503 for a in down), [
        (a.status, a.body) for a in down if a.status != 503][:5]
    assert bad == [] and unclear == [], (bad + unclear)[:5]
    assert max(a.seconds for a in down) < 2.5  # refused at once, not held to the timeout
    # the API's gRPC channel retries Triton at most 1 s apart (serving/api/triton_client.py)
    assert recovered_at is not None and recovered_at - t_ready < 3.0
    after = load.between(t_end)
    assert after and _failed(after) == []
    assert httpx.get(f"{fault_stack.url}/readyz", timeout=10).status_code == 200
