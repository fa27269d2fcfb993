"""Fan-out: hedging past a slow replica, failover from a dead one, partial results at the
deadline, and refusal to merge another model version's answers."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from fastapi import FastAPI, Request

from serving.api.fanout import Fanout, LatencyTracker, ShardTopology
from serving.shards.server import F32_ROUTE


def _replica(shard_id: int, delay_s: float = 0.0, fail: bool = False,
             model_version: str = "m/1") -> FastAPI:
    app = FastAPI()
    app.state.calls = 0

    @app.post(F32_ROUTE)
    async def search(request: Request, k: int):
        app.state.calls += 1
        app.state.vector = np.frombuffer(await request.body(), dtype="<f4")
        app.state.params = dict(request.query_params)
        await asyncio.sleep(delay_s)
        if fail:
            raise RuntimeError("replica down")
        return {"item_ids": [f"s{shard_id}-{i}" for i in range(k)],
                "scores": [1.0 - 0.1 * i - 0.01 * shard_id for i in range(k)],
                "index_version": "v1", "model_version": model_version}

    return app


def _fanout(apps: dict[str, FastAPI], topology: dict[int, list[str]], hedge_ms: float = 20):
    mounts = {f"http://{host}": httpx.ASGITransport(app=app, raise_app_exceptions=False)
              for host, app in apps.items()}
    client = httpx.AsyncClient(mounts=mounts)
    tracker = LatencyTracker(default_ms=hedge_ms)
    return Fanout(ShardTopology(topology), client, tracker), client


def test_merges_all_shards_by_score():
    apps = {"a0": _replica(0), "a1": _replica(1)}
    fan, _ = _fanout(apps, {0: ["http://a0"], 1: ["http://a1"]})
    res = asyncio.run(fan.search([0.0] * 4, k=3, deadline_s=1.0))
    assert not res.partial and res.hedges_fired == 0
    assert [h.item_id for h in res.hits] == ["s0-0", "s1-0", "s0-1", "s1-1", "s0-2", "s1-2"]


def test_replicas_get_the_vector_as_float32_bytes_and_the_filters_as_parameters():
    app = _replica(0)
    fan, _ = _fanout({"a0": app}, {0: ["http://a0"]})
    vector = np.array([0.25, -0.5, 1e-7, 0.75], np.float32)
    asyncio.run(fan.search(vector, k=3, deadline_s=1.0, expect_model_version="m/1",
                           filters={"available_only": True, "regions": ["eu", "us"]}))
    assert app.state.vector.tobytes() == vector.tobytes()  # bit-exact, no text round trip
    assert app.state.params == {"k": "3", "model_version": "m/1", "available_only": "true",
                                "regions": "eu,us"}


def test_hedges_to_fast_replica_when_first_is_slow():
    slow, fast = _replica(0, delay_s=0.5), _replica(0)
    fan, _ = _fanout({"slow": slow, "fast": fast}, {0: ["http://slow", "http://fast"]})
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=2.0))
    assert res.hedges_fired == 1 and not res.partial
    assert res.answers[0].replica == "http://fast" and res.answers[0].hedged
    assert res.answers[0].latency_ms < 200


def test_fails_over_from_a_dead_replica_without_waiting():
    fan, _ = _fanout({"dead": _replica(0, fail=True), "ok": _replica(0)},
                     {0: ["http://dead", "http://ok"]}, hedge_ms=1000)
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=0.5))
    assert not res.partial and res.answers[0].replica == "http://ok"


def test_partial_results_name_the_missing_shard():
    apps = {"a0": _replica(0), "b0": _replica(1, delay_s=1.0), "b1": _replica(1, delay_s=1.0)}
    fan, _ = _fanout(apps, {0: ["http://a0"], 1: ["http://b0", "http://b1"]})
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=0.15))
    assert res.partial and res.missing_shards == [1]
    assert {h.shard_id for h in res.hits} == {0}


def test_other_model_version_is_never_merged():
    apps = {"a0": _replica(0), "a1": _replica(1, model_version="m/2")}
    fan, _ = _fanout(apps, {0: ["http://a0"], 1: ["http://a1"]})
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=1.0, expect_model_version="m/1"))
    assert res.missing_shards == [1] and {h.shard_id for h in res.hits} == {0}


def test_redundancy_names_missing_and_degraded_shards():
    from serving.api.replica_health import Redundancy

    whole = Redundancy({0: 2, 1: 2}, {0: 2, 1: 2})
    assert (whole.status, whole.missing, whole.degraded) == ("ready", [], [])
    one_down = Redundancy({0: 2, 1: 1}, {0: 2, 1: 2})
    assert (one_down.status, one_down.degraded) == ("degraded", [1])
    gone = Redundancy({0: 1, 1: 0, 2: 0}, {0: 2, 1: 2, 2: 2})
    assert gone.as_dict() == {"status": "missing_shards", "missing_shards": [1, 2],
                              "degraded_shards": [0],
                              "replicas_up": {"0": "1/2", "1": "0/2", "2": "0/2"}}
