"""The search service without HTTP in front of it: box choice, version pinning, partial
answers and refusals, over a real two-shard index served by real shard stores (reached
in-process); the models are a stand-in, since no Triton runs in a unit test."""

from __future__ import annotations

import asyncio
import io
import socket
from dataclasses import asdict, replace
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.detector import pick_salient
from models.preprocessing import MAX_IMAGE_BYTES
from pipelines.embed import attribute_vectors
from pipelines.index import IndexParams, canary, write_manifest
from serving.api.admission import Admission, Overloaded
from serving.api.app import ApiSettings, ApiState, create_app
from serving.api.errors import Rejected, Unavailable, answer_api_error
from serving.api.experiments import DEFAULT_CONFIG, ExperimentConfig
from serving.api.fanout import Fanout, LatencyTracker, ShardClient, ShardTopology
from serving.api.impressions import ImpressionLog
from serving.api.metrics import Metrics
from serving.api.online import RankerBackend, create_online_app
from serving.api.rerank import RerankConfig, Reranker
from serving.api.search import SearchQuery, SearchService, Tables
from serving.api.triton_client import (
    BadModelInput,
    DetectEmbedOutput,
    DetectorOutput,
    ModelUnavailable,
)
from serving.shards import ShardStore, layout
from serving.shards.kinds import build_shard_from_arrays
from serving.shards.pointer import cutover
from serving.shards.server import F32_ROUTE, ItemFilter, create_shard_app
from serving.switch import Live

MODEL = "attributes/0"
PARAMS = IndexParams.load()
BOXES = np.array([[0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.7, 0.7]], np.float32)  # 2nd is central
SCORES = np.array([0.9, 0.8], np.float32)


def jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


class StandInModels:
    """Detects BOXES; embeds any crop as the vector of `target` (so it must come first);
    `detect_embed` picks the salient box, as the Triton model does."""

    def __init__(self, vectors: dict[str, np.ndarray], target: str, model_version=MODEL):
        self.vectors, self.target, self.model_version = vectors, target, model_version
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    async def detect(self, image: bytes, version: int) -> DetectorOutput:
        self.calls.append(("detect", version))
        if self.fail:
            raise self.fail
        return DetectorOutput(BOXES, SCORES, np.array([0, 1]), MODEL)

    async def embed(self, images, boxes, version):
        self.calls.append(("embed", tuple(float(v) for v in boxes[0]), version))
        if self.fail:
            raise self.fail
        return self.vectors[self.target][None, :], self.model_version

    async def detect_embed(self, image: bytes, version: int) -> DetectEmbedOutput:
        self.calls.append(("detect_embed", version))
        if self.fail:
            raise self.fail
        box = BOXES[pick_salient(torch.from_numpy(BOXES), torch.from_numpy(SCORES))]
        return DetectEmbedOutput(BOXES, SCORES, np.array([0, 1]), box,
                                 self.vectors[self.target], self.model_version)


@pytest.fixture(scope="module")
def index(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    vecs = attribute_vectors(catalog, seed=0)
    vdir = layout.version_dir(root, "v1")
    for s in range(PARAMS.n_shards):
        build_shard_from_arrays(catalog["item_id"].to_numpy(), vecs, MODEL, s, PARAMS, vdir)
    write_manifest(vdir, PARAMS.n_shards, {"test": True})
    assert canary(root, "v1", tiny_world, PARAMS.canary).passed
    cutover(root, "v1")
    features = catalog[["item_id", "available", "region", "price"]].assign(debiased_ctr=0.1)
    stores = [ShardStore(root, s, MODEL) for s in range(PARAMS.n_shards)]
    for store in stores:
        store.load()
    return catalog, dict(zip(catalog["item_id"], vecs, strict=True)), features, stores


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: a dead replica (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def service(index, serve, target: str | None = None, dead_shards=(), models=None,
            metrics=None):
    """The search service over the real shard apps on loopback HTTP (`serve`: the
    `http_apps` fixture); `dead_shards` get a URL nothing answers."""
    catalog, vectors, features, stores = index
    target = target or catalog.loc[catalog["available"], "item_id"].iloc[0]
    topology = ShardTopology({
        s.shard_id: [_closed_port_url() if s.shard_id in dead_shards
                     else serve(create_shard_app(s, ItemFilter(features)))] for s in stores})
    tables = Tables(catalog.set_index("item_id")[["category", "image_path"]].to_dict("index"),
                    Reranker(features, RerankConfig(w_region=0.0, w_engagement=0.0)))
    live = Live(MODEL, 1, "v1", datetime.now(UTC), ["top", "bag"])
    models = models or StandInModels(vectors, target)
    client = ShardClient(5.0)
    CLIENTS.append(client)
    svc = SearchService(models, Fanout(topology, client, LatencyTracker()), tables,
                        lambda: live, metrics or Metrics(), deadline_s=2.0)
    return svc, models, target


CLIENTS: list[ShardClient] = []  # every service's shard client, closed after each run


def run(coro):
    """`coro` on a new event loop, the shard clients' sessions on it closed after."""
    async def closing():
        try:
            return await coro
        finally:
            for client in CLIENTS:
                await client.close()

    return asyncio.run(closing())


def test_search_detects_picks_the_salient_box_and_ranks_the_nearest_item_first(index, http_apps):
    catalog = index[0]
    svc, models, target = service(index, http_apps)
    res = run(svc.search(SearchQuery(jpeg(), k=5)))
    assert [c[0] for c in models.calls] == ["detect_embed"]  # one Triton call
    assert res.box == pytest.approx(BOXES[1].tolist())  # the central box
    assert [d.category for d in res.detected] == ["top", "bag"]
    assert res.items[0].item_id == target and res.items[0].similarity == pytest.approx(1, abs=1e-3)
    assert len(res.items) == 5 and all(i.score <= res.items[0].score for i in res.items)
    row = catalog.set_index("item_id").loc[target]
    assert (res.items[0].category, res.items[0].image_url) == (
        row["category"], "/world/" + row["image_path"])
    assert (res.model_version, res.index_version, res.partial) == (MODEL, "v1", False)
    assert {"detect_embed_ms", "fanout_ms", "rerank_ms", "total_ms"} == set(res.timings_ms)
    assert res.to_json() == asdict(res)  # the response body, without asdict's deep copy


def test_a_given_box_skips_the_detector_and_box_index_picks_a_detection(index, http_apps):
    svc, models, _ = service(index, http_apps)
    res = run(svc.search(SearchQuery(jpeg(), box=[0.1, 0.2, 0.5, 0.6], k=3)))
    assert [c[0] for c in models.calls] == ["embed"] and "detect_ms" not in res.timings_ms
    assert res.box == [0.1, 0.2, 0.5, 0.6] and res.detected == []
    res = run(svc.search(SearchQuery(jpeg(), box_index=0, k=3)))
    assert [c[0] for c in models.calls[-2:]] == ["detect", "embed"]
    assert models.calls[-1][1] == pytest.approx(tuple(BOXES[0]))
    assert {"detect_ms", "embed_ms"} <= set(res.timings_ms)


@pytest.mark.parametrize(("query", "status", "reason"), [
    (SearchQuery(b""), 422, "empty"),
    (SearchQuery(b"GIF89a not really"), 422, "decodable"),
    (SearchQuery(b"\xff" * (MAX_IMAGE_BYTES + 1)), 413, "bytes"),
    (SearchQuery(jpeg(), k=0), 422, "k must be"),
    (SearchQuery(jpeg(), k=101), 422, "k must be"),
    (SearchQuery(jpeg(), box=[0, 0, 1, 1], box_index=0), 422, "either"),
    (SearchQuery(jpeg(), box=[0.6, 0.1, 0.2, 0.9]), 422, "box must be"),
    (SearchQuery(jpeg(), box=[float("nan"), 0, 1, 1]), 422, "box must be"),
    (SearchQuery(jpeg(), box_index=2), 422, "out of range"),
])
def test_bad_queries_are_refused_with_a_reason(index, query, status, reason, http_apps):
    svc, models, _ = service(index, http_apps)
    with pytest.raises(Rejected, match=reason) as err:
        run(svc.search(query))
    assert err.value.status == status
    if query.box_index is None:  # refused before any model ran
        assert models.calls == []


def test_model_failures_map_to_503_and_422(index, http_apps):
    svc, models, _ = service(index, http_apps)
    models.fail = ModelUnavailable("triton down")
    with pytest.raises(Unavailable, match="detect_embed unavailable: triton down"):
        run(svc.search(SearchQuery(jpeg())))
    models.fail = BadModelInput("truncated")
    with pytest.raises(Rejected, match="not a decodable image: truncated"):
        run(svc.search(SearchQuery(jpeg(), box=[0, 0, 1, 1])))


def test_an_embedder_of_another_model_is_never_searched(index, http_apps):
    catalog, vectors, _, _ = index
    models = StandInModels(vectors, catalog["item_id"].iloc[0], model_version="attributes/9")
    svc, _, _ = service(index, http_apps, models=models)
    with pytest.raises(Unavailable, match="attributes/9"):
        run(svc.search(SearchQuery(jpeg(), box=[0, 0, 1, 1])))


def test_a_dead_shard_gives_a_partial_answer_and_all_dead_a_503(index, http_apps):
    catalog, vectors, _, stores = index
    svc, _, target = service(index, http_apps, dead_shards=(1,))
    res = run(svc.search(SearchQuery(jpeg(), box=[0, 0, 1, 1], k=10)))
    assert res.partial and res.missing_shards == [1]
    assert {layout.shard_of(i.item_id, PARAMS.n_shards) for i in res.items} == {0}
    svc, _, _ = service(index, http_apps, dead_shards=range(len(stores)))
    with pytest.raises(Unavailable, match="no shard answered"):
        run(svc.search(SearchQuery(jpeg(), box=[0, 0, 1, 1])))


def test_detect_returns_the_boxes_and_the_default_pick(index, http_apps):
    svc, _, _ = service(index, http_apps)
    found = run(svc.detect(jpeg()))
    assert found.default_box == 1 and [d.box for d in found.boxes] == [
        pytest.approx(b) for b in BOXES.round(4).tolist()]
    assert found.model_version == MODEL


# --------------------------------------------------------------------------- both front doors
def search_api(index, tmp_path, serve) -> TestClient:
    """The search API's routes over the real shards, its startup state set by hand (no
    Triton to start); the client runs no lifespan."""
    settings = ApiSettings(triton_url="-", triton_repo="-", index_root=str(tmp_path),
                           shards={}, world_root=str(tmp_path), features_path="-",
                           admin_token="t0ken")
    app = create_app(settings)
    svc, _, _ = service(index, serve, metrics=app.state.metrics)
    switcher = SimpleNamespace(live=svc.live())  # what /metrics and /readyz read
    app.state.loupe = ApiState(settings, app.state.metrics, svc, switcher, triton=None,
                               replica_health=None, admission=Admission(8, 0.1, 32))
    return TestClient(app, raise_server_exceptions=False)


def online_front_door(index, tmp_path) -> TestClient:
    catalog = index[0]
    cfg = replace(ExperimentConfig.load(DEFAULT_CONFIG), rankers={},
                  traffic={"champion": 1.0}, randomised_share=0.0)
    ranker = RankerBackend(lambda img, k: [(i, 1.0) for i in catalog["item_id"][:k]],
                           MODEL, "v1")
    return TestClient(create_online_app(cfg, {"champion": ranker},
                                        ImpressionLog(tmp_path / "log")))


def test_both_front_doors_refuse_bombs_and_oversized_images_before_any_work(index, tmp_path,
                                                                            bomb_png, http_apps):
    bomb = bomb_png
    assert len(bomb) < 1024 * 1024  # a small file of 400 Mpx
    cases = {"bomb": (bomb, 413, "pixels"),
             "too many bytes": (jpeg() + b"\0" * MAX_IMAGE_BYTES, 413, "bytes"),
             "too many pixels": (jpeg((4097, 4097)), 413, "pixels"),
             "not an image": (b"%PDF-1.4" * 20, 422, "decodable")}
    for door, client, form in (("search", search_api(index, tmp_path, http_apps), {}),
                               ("online", online_front_door(index, tmp_path), {"user_id": "u"})):
        for name, (data, status, reason) in cases.items():
            r = client.post("/v1/search", data=form, files={"image": ("q.jpg", data)})
            assert (r.status_code, reason in r.json()["detail"]) == (status, True), (door, name)
        r = client.post("/v1/search", data=form, files={"image": ("q.jpg", jpeg())})
        assert r.status_code == 200 and r.json()["items"], door
    assert online_front_door(index, tmp_path / "2").app.state.impression_log.counts()[
        "requests"] == 0


def _requests_counted(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "loupe_requests":
            out |= {(s.labels["endpoint"], s.labels["status"]): s.value for s in family.samples
                    if s.name == "loupe_requests_total"}
    return out


def test_request_metrics_name_route_templates_count_every_status_and_stay_bounded(
        index, tmp_path, http_apps):
    client = search_api(index, tmp_path, http_apps)
    rng = np.random.default_rng(0)
    for n in range(1000):
        word = "".join(rng.choice(list("abcdefghij"), 12))
        path = f"/world/{word}.jpg" if n % 2 else f"/{word}/{n}"
        assert client.get(path).status_code == 404
    assert client.post("/v1/search", data={"k": "3"}).status_code == 422  # no image: FastAPI
    assert client.post("/v1/search", files={"image": ("q.jpg", b"")}).status_code == 422
    assert client.post("/v1/search", files={"image": ("q.jpg", jpeg())}).status_code == 200
    assert client.post("/admin/reload").status_code == 401
    state, client.app.state.loupe = client.app.state.loupe, None  # an unhandled error
    assert client.post("/v1/search", files={"image": ("q.jpg", jpeg())}).status_code == 500
    client.app.state.loupe = state
    counted = _requests_counted(client.get("/metrics").text)
    assert counted == {("unmatched", "404"): 500.0, ("/world/{path:path}", "404"): 500.0,
                       ("/v1/search", "422"): 2.0, ("/v1/search", "200"): 1.0,
                       ("/admin/reload", "401"): 1.0, ("/v1/search", "500"): 1.0}


def test_every_request_writes_one_json_log_line_with_its_id_and_versions(index, tmp_path,
                                                                         caplog, http_apps):
    import json

    client = search_api(index, tmp_path, http_apps)
    caplog.set_level("INFO", logger="loupe.requests")
    r = client.post("/v1/search", files={"image": ("q.jpg", jpeg())},
                    headers={"X-Request-ID": "shopper-42.a", "X-Admin-Token": "s3cret-token"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "shopper-42.a"
    assert r.json()["request_id"] == "shopper-42.a"  # the result carries the log's id
    r = client.get("/no/such/page", headers={"X-Request-ID": "not a plain token!"})
    minted = r.headers["x-request-id"]
    assert r.status_code == 404 and len(minted) == 32 and minted != "not a plain token!"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "loupe.requests"]
    assert [(x["request_id"], x["route"], x["status"], x["method"]) for x in lines] == [
        ("shopper-42.a", "/v1/search", 200, "POST"), (minted, "unmatched", 404, "GET")]
    live = client.app.state.loupe.switcher.live
    assert all((x["model_version"], x["index_version"]) ==
               (live.model_version, live.index_version) and x["ms"] >= 0 for x in lines)
    assert "s3cret-token" not in caplog.text and "no/such" not in caplog.text


def test_an_oversized_body_is_refused_while_it_streams(index, tmp_path, http_apps):
    """A declared Content-Length over the limit gets a 413 before the body is read; a
    chunked upload gets a 413 once the bytes received pass the limit. (The test client
    drains the body regardless; the app stops reading at the limit.)"""
    client = search_api(index, tmp_path, http_apps)
    chunk = b"\0" * (1 << 20)

    def body():
        for _ in range(64):
            yield chunk

    r = client.post("/v1/search", content=body(),
                    headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "limit is" in r.json()["detail"]
    r = client.post("/v1/search", content=b"x",
                    headers={"Content-Length": str(10**10),
                             "Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and f"{10**10} bytes" in r.json()["detail"]
    metrics = client.get("/metrics").text  # refused inside the route: counted under it
    assert 'loupe_requests_total{endpoint="/v1/search",status="413"} 2.0' in metrics


def test_admission_queues_briefly_then_sheds_with_retry_after():
    """Two slots: a third request waits for one and gets it when it frees in time; past the
    wait, or with the waiting line full, it is refused at once; the gauge counts holders."""
    import time

    metrics = Metrics()
    gauge = metrics.in_flight

    async def scenario():
        admission = Admission(max_in_flight=2, max_wait_s=0.05, max_waiting=1, in_flight=gauge,
                              shed=metrics.shed)
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        async def enter():
            async with admission.slot():
                return time.perf_counter()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gauge._value.get() == 2
        t0 = time.perf_counter()
        waiter = asyncio.create_task(enter())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="1 requests already waiting"):
            await enter()  # refused at once, while the line is full
        assert time.perf_counter() - t0 < 0.04
        with pytest.raises(Overloaded, match="no slot freed within 50 ms"):
            await waiter
        assert time.perf_counter() - t0 >= 0.05
        late = asyncio.create_task(enter())  # this one waits while a slot frees
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*holders)
        assert await late - t0 < 0.05 + 0.06
        assert gauge._value.get() == 0
        return await asyncio.gather(*(enter() for _ in range(2)))  # both slots free again

    assert len(run(scenario())) == 2
    assert metrics.shed._value.get() == 2  # the one refused at once, the one that timed out
    answer = run(answer_api_error(None, Overloaded("overloaded: test")))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"


def test_the_float32_shard_route_answers_what_the_json_route_answers(index):
    catalog, vectors, features, stores = index
    shard = stores[0]
    client = TestClient(create_shard_app(shard, ItemFilter(features)))
    query = vectors[catalog["item_id"].iloc[3]]
    for params, filters in (({}, None), ({"available_only": "true", "regions": "EU,US"},
                                          {"available_only": True, "regions": ["EU", "US"]})):
        as_json = client.post("/search", json={"vector": query.tolist(), "k": 25,
                                               "filters": filters}).json()
        as_f32 = client.post(F32_ROUTE, content=query.astype("<f4").tobytes(),
                             params={"k": 25, **params}).json()
        assert as_f32["item_ids"] == [h["item_id"] for h in as_json["hits"]]
        assert as_f32["scores"] == pytest.approx([h["score"] for h in as_json["hits"]])
        assert as_f32["index_version"] == "v1" and as_f32["model_version"] == MODEL
        assert as_f32["scores"] == sorted(as_f32["scores"], reverse=True)
    kept = set(features.loc[features["available"] & features["region"].isin(["EU", "US"]),
                            "item_id"])
    assert set(as_f32["item_ids"]) <= kept


@pytest.mark.parametrize(("body", "params", "status", "reason"), [
    (b"\x00\x00\x80", {"k": 5}, 422, "positive multiple of 4"),
    (b"", {"k": 5}, 422, "positive multiple of 4"),
    (np.full(256, np.nan, "<f4").tobytes(), {"k": 5}, 422, "non-finite"),
    (np.ones(8, "<f4").tobytes(), {"k": 5}, 422, "query vectors must be"),
    (np.ones(4097, "<f4").tobytes(), {"k": 5}, 413, "at most 4096"),
    (np.ones(256, "<f4").tobytes(), {"k": 0}, 422, "k must be an integer within 1..1000"),
    (np.ones(256, "<f4").tobytes(), {}, 422, "k must be an integer"),
    (np.ones(256, "<f4").tobytes(), {"k": 5, "available_only": "maybe"}, 422, "true or false"),
    (np.ones(256, "<f4").tobytes(), {"k": 5, "model_version": "other/1"}, 409, "other/1"),
])
def test_the_float32_shard_route_refuses_bad_vectors_with_a_reason(index, body, params,
                                                                     status, reason):
    _, _, features, stores = index
    client = TestClient(create_shard_app(stores[0], ItemFilter(features)))
    r = client.post(F32_ROUTE, content=body, params=params)
    assert r.status_code == status and reason in r.text
