"""Fan-out: hedging past a slow replica, failover from a dead one, partial results at the
deadline, and refusal to merge another model version's answers."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import FastAPI, Request

from serving.api.fanout import Fanout, LatencyTracker, ShardClient, ShardTopology
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


def _fanout(serve, apps: dict[str, FastAPI], topology: dict[int, list[str]],
            hedge_ms: float = 20) -> tuple[Fanout, dict[str, str]]:
    """The API's fan-out over real HTTP replicas; `topology` names them by their `apps` key.
    Returns the fan-out and each name's URL."""
    urls = {name: serve(app) for name, app in apps.items()}
    tracker = LatencyTracker(default_ms=hedge_ms)
    topo = ShardTopology({s: [urls[n] for n in names] for s, names in topology.items()})
    return Fanout(topo, ShardClient(timeout_s=5.0), tracker), urls


def test_merges_all_shards_by_score(http_apps):
    apps = {"a0": _replica(0), "a1": _replica(1)}
    fan, _ = _fanout(http_apps, apps, {0: ["a0"], 1: ["a1"]})
    res = asyncio.run(fan.search([0.0] * 4, k=3, deadline_s=1.0))
    assert not res.partial and res.hedges_fired == 0
    assert [h.item_id for h in res.hits] == ["s0-0", "s1-0", "s0-1", "s1-1", "s0-2", "s1-2"]


def test_replicas_get_the_vector_as_float32_bytes_and_the_filters_as_parameters(http_apps):
    app = _replica(0)
    fan, _ = _fanout(http_apps, {"a0": app}, {0: ["a0"]})
    vector = np.array([0.25, -0.5, 1e-7, 0.75], np.float32)
    asyncio.run(fan.search(vector, k=3, deadline_s=1.0, expect_model_version="m/1",
                           filters={"available_only": True, "regions": ["eu", "us"]}))
    assert app.state.vector.tobytes() == vector.tobytes()  # bit-exact, no text round trip
    assert app.state.params == {"k": "3", "model_version": "m/1", "available_only": "true",
                                "regions": "eu,us"}


def test_hedges_to_fast_replica_when_first_is_slow(http_apps):
    slow, fast = _replica(0, delay_s=0.5), _replica(0)
    fan, urls = _fanout(http_apps, {"slow": slow, "fast": fast}, {0: ["slow", "fast"]})
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=2.0))
    assert res.hedges_fired == 1 and not res.partial
    assert res.answers[0].replica == urls["fast"] and res.answers[0].hedged
    assert res.answers[0].latency_ms < 200


def test_fails_over_from_a_dead_replica_without_waiting(http_apps):
    fan, urls = _fanout(http_apps, {"dead": _replica(0, fail=True), "ok": _replica(0)},
                     {0: ["dead", "ok"]}, hedge_ms=1000)
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=0.5))
    assert not res.partial and res.answers[0].replica == urls["ok"]


def test_partial_results_name_the_missing_shard(http_apps):
    apps = {"a0": _replica(0), "b0": _replica(1, delay_s=1.0), "b1": _replica(1, delay_s=1.0)}
    fan, _ = _fanout(http_apps, apps, {0: ["a0"], 1: ["b0", "b1"]})
    res = asyncio.run(fan.search([0.0] * 4, k=2, deadline_s=0.15))
    assert res.partial and res.missing_shards == [1]
    assert {h.shard_id for h in res.hits} == {0}


def test_other_model_version_is_never_merged(http_apps):
    apps = {"a0": _replica(0), "a1": _replica(1, model_version="m/2")}
    fan, _ = _fanout(http_apps, apps, {0: ["a0"], 1: ["a1"]})
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
