"""Experiment front door: arms by user hash, interleaved grids with teams, every grid
logged before it is served, upstream failures passed on with their reason."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.api.experiments import DEFAULT_CONFIG, ExperimentConfig, assign_arm
from serving.api.impressions import ImpressionLog
from serving.api.online import RankerBackend, UpstreamError, create_online_app

CFG = replace(ExperimentConfig.load(DEFAULT_CONFIG), rankers={},
              traffic={"champion": 0.4, "challenger": 0.3, "interleaved": 0.3},
              randomised_share=0.3)
ITEMS = [f"it{k:07d}" for k in range(40)]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _backends():
    champion = RankerBackend(lambda img, k: [(i, 1.0 - n / 100) for n, i in
                                             enumerate(ITEMS[:k])], "loupe-embedder/1", "v1")
    challenger = RankerBackend(lambda img, k: [(i, 1.0 - n / 100) for n, i in
                                               enumerate(ITEMS[::-1][:k])],
                               "loupe-embedder/2", "v2")
    return {"champion": champion, "challenger": challenger}


@pytest.fixture
def front(tmp_path):
    log = ImpressionLog(tmp_path / "log")
    return TestClient(create_online_app(CFG, _backends(), log)), log


def _search(client, user: str, **extra):
    return client.post("/v1/search", data={"user_id": user, **extra},
                       files={"image": ("q.jpg", _jpeg(), "image/jpeg")})


def test_arms_follow_the_user_hash_and_every_grid_is_logged(front):
    client, log = front
    users = [f"u{n}" for n in range(60)]
    bodies = [_search(client, u).json() for u in users]
    assert [b["arm"] for b in bodies] == [assign_arm(CFG, u) for u in users]
    assert {b["arm"] for b in bodies} == {"champion", "challenger", "interleaved"}
    assert log.counts()["requests"] == 60 and log.counts()["shown"] == 60 * 20
    frame = log.frame()
    for b in bodies:
        items = [it["item_id"] for it in b["items"]]
        logged = frame[frame["request_id"] == b["request_id"]].sort_values("position")
        assert logged["item_id"].tolist() == items
        if b["arm"] == "interleaved":
            assert set(logged["team"]) == {"A", "B"}
            assert b["model_version"] == "A=loupe-embedder/1|B=loupe-embedder/2"
            continue
        expected = ITEMS[:20] if b["arm"] == "champion" else ITEMS[::-1][:20]
        if b["logging_policy"] == "shuffle_top20":  # same top 20, another order
            assert sorted(items) == sorted(expected) and items != expected
        else:
            assert items == expected
    assert {b["logging_policy"] for b in bodies if b["arm"] != "interleaved"} == {
        "ranker", "shuffle_top20"}


def test_interleaved_grid_credits_clicks_to_the_ranker_that_placed_them(front):
    client, log = front
    user = next(f"u{n}" for n in range(100) if assign_arm(CFG, f"u{n}") == "interleaved")
    body = _search(client, user).json()
    for it in body["items"]:  # A (champion) ranks it0000000.. first, B the reverse
        assert it["team"] == ("A" if it["item_id"] in ITEMS[:20] else "B")
    first = body["items"][0]
    ok = client.post("/v1/events", json={"request_id": body["request_id"], "position": 1,
                                         "item_id": first["item_id"], "type": "click"})
    assert ok.status_code == 201
    assert log.frame().query("clicked")["team"].tolist() == [first["team"]]


def test_bad_requests_are_refused_and_not_logged(front):
    client, log = front
    assert _search(client, "u1", k="50").status_code == 422
    assert _search(client, " ").status_code == 422
    bad_image = client.post("/v1/search", data={"user_id": "u1"},
                            files={"image": ("q.jpg", b"not an image", "image/jpeg")})
    assert bad_image.status_code == 422 and "decodable" in bad_image.json()["detail"]
    assert log.counts()["requests"] == 0


def test_upstream_failures_pass_their_reason_and_log_nothing(tmp_path):
    class Down:
        async def search(self, image, box, k, region):
            raise UpstreamError(503, "search stack http://x unreachable")

    cfg = replace(CFG, traffic={"champion": 1.0}, randomised_share=0.0)
    log = ImpressionLog(tmp_path / "log")
    client = TestClient(create_online_app(cfg, {"champion": Down()}, log))
    r = _search(client, "u1")
    assert r.status_code == 503 and "unreachable" in r.json()["detail"]
    assert log.counts()["requests"] == 0


def test_a_grid_that_cannot_be_logged_is_not_served(tmp_path):
    log = ImpressionLog(tmp_path / "log")
    client = TestClient(create_online_app(CFG, _backends(), log))
    log.close()
    r = _search(client, "u1")
    assert r.status_code == 503 and "impression log unavailable" in r.json()["detail"]


def test_missing_backends_are_a_startup_error(tmp_path):
    with pytest.raises(ValueError, match="no search backend"):
        create_online_app(CFG, {"champion": _backends()["champion"]},
                          ImpressionLog(tmp_path / "log"))


def test_front_door_logs_export_like_world_logs(tmp_path, tiny_world: Path):
    from serving.api.impressions import export_impressions

    catalog = tiny_world / "tables/catalog.parquet"
    log = ImpressionLog(tmp_path / "log")
    client = TestClient(create_online_app(CFG, _backends(), log))
    for n in range(10):
        _search(client, f"u{n}")
    items = set(pd.read_parquet(catalog)["item_id"])
    assert set(ITEMS) <= items  # the stub rankers rank real catalog items
    paths = export_impressions(log, tmp_path / "export", catalog)
    assert len(pd.read_parquet(paths["impressions"])) == 200


def test_http_backend_maps_the_search_api_answer_and_its_failures():
    """HttpSearchBackend against an app answering like serving/api/app.py's /v1/search."""
    import asyncio

    import httpx
    from fastapi import FastAPI, Form, HTTPException

    from serving.api.online import HttpSearchBackend

    upstream = FastAPI()

    @upstream.post("/v1/search")
    async def search(k: int = Form(...), box: str | None = Form(None)):
        if box == "bad":
            raise HTTPException(422, "box must be normalised")
        if box == "crash":
            raise HTTPException(500, "boom")
        return {"request_id": "x", "model_version": "loupe-embedder/3",
                "index_version": ["v1", "v2"], "box": [0.1, 0.1, 0.9, 0.9],
                "items": [{"item_id": f"it{n}", "score": 1 - n / 10} for n in range(k)]}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(upstream)) as client:
            backend = HttpSearchBackend("http://stack", client)
            ok = await backend.search(_jpeg(), None, 3, None)
            errors = []
            for box in ("bad", "crash"):
                try:
                    await backend.search(_jpeg(), box, 3, None)
                except UpstreamError as err:
                    errors.append((err.status, err.detail))
            return ok, errors

    ok, errors = asyncio.run(scenario())
    assert ok.items == [("it0", 1.0), ("it1", 0.9), ("it2", 0.8)]
    assert (ok.model_version, ok.index_version, ok.box) == ("loupe-embedder/3", "v1+v2",
                                                           (0.1, 0.1, 0.9, 0.9))
    assert errors[0] == (422, "search stack http://stack: box must be normalised")
    assert errors[1][0] == 503
