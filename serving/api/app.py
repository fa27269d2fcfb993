"""Loupe search API: detect, pick a box, embed in Triton, fan out to shards, re-rank.

Failure policy, so the camera feature degrades instead of erroring: bad input (empty, not an
image, too many bytes or pixels, a decompression bomb, a box outside [0, 1]) -> 4xx JSON
with the reason, before any model runs where a header is enough to tell; Triton down -> 503
with a reason; a shard past the deadline or with every replica down -> 200 with
`partial: true` and the missing shard ids; a shard answering from another model's index ->
treated as missing. Versions: the live index names its embedder (manifest `model_version`,
"loupe-embedder/N"); every Triton call pins version N and checks the MODEL_VERSION it
returns, and every shard query names the model too, so no answer mixes two models. A
model-version switch goes through `POST /admin/cutover` (or `/admin/rollback`), which loads
the Triton version, re-points the shard replicas and moves the index pointer together.

Run: `python -m serving.api.app --settings api.json --port 8000` (see serving/stack.py).
Other routers (impression logging, events) mount through `create_app(..., routers=[...])`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import json
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from fastapi import APIRouter, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from models.detector import pick_salient
from models.preprocessing import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, check_box
from pipelines import index as index_ops
from serving.api.fanout import Fanout, LatencyTracker, ShardTopology
from serving.api.rerank import RerankConfig, Reranker
from serving.api.triton_client import BadModelInput, ModelUnavailable, TritonModels
from serving.shards import layout
from serving.triton import repository

STATIC = Path(__file__).parent / "static"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.5, 1.0)
MAX_K = 100


@dataclass
class ApiSettings:
    """Everything the API process needs; written as JSON by the stack launcher."""

    triton_url: str
    triton_repo: str
    index_root: str
    shards: dict[int, list[str]]  # shard id -> replica base URLs
    world_root: str  # catalog table + images for the result grid and demo photos
    features_path: str
    admin_token: str
    deadline_s: float = 0.15  # shard fan-out budget inside the 250 ms p95 ceiling
    candidates_per_shard: int = 50
    switch_timeout_s: float = 30.0
    rerank: RerankConfig = field(default_factory=RerankConfig)

    @classmethod
    def from_json(cls, path: Path) -> ApiSettings:
        raw = json.loads(Path(path).read_text())
        raw["shards"] = {int(k): v for k, v in raw["shards"].items()}
        raw["rerank"] = RerankConfig(**raw.get("rerank", {}))
        return cls(**raw)

    def to_json(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=1))
        return Path(path)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.stage = Histogram("loupe_stage_seconds", "latency per serving stage", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.shard = Histogram("loupe_shard_seconds", "latency per shard answer", ["shard"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("loupe_requests_total", "requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.hedges = Counter("loupe_hedges_fired_total", "hedged shard requests", registry=r)
        self.partial = Counter("loupe_partial_responses_total", "responses missing shards",
                               registry=r)
        self.index_age = Gauge("loupe_index_age_seconds", "age of the live index build",
                               registry=r)
        self.model_version = Gauge("loupe_model_version_info", "served model and index",
                                   ["model_version", "index_version"], registry=r)


@dataclass
class Live:
    """What is served now; replaced as a whole at a switch, so a request reads one
    consistent (model, Triton version, index) triple."""

    model_version: str
    triton_version: int
    index_version: str
    built_at: datetime
    categories: list[str]


class SwitchRequest(BaseModel):
    index_version: str = Field(min_length=1)


def probe_image(data: bytes) -> tuple[int, int]:
    """Cheap checks from the header alone (the full decode happens once, in Triton):
    empty, too many bytes, not an image, too many pixels (decompression bombs included)."""
    if not data:
        raise HTTPException(422, "empty image upload")
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as err:
        raise HTTPException(413, f"image refused as a decompression bomb (too many pixels): "
                                 f"{err}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise HTTPException(422, f"not a decodable image: {err}") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise HTTPException(413, f"image is {width}x{height} pixels; the limit is "
                                 f"{MAX_IMAGE_PIXELS} pixels")
    return width, height


def parse_box(box: str | None) -> tuple[float, float, float, float] | None:
    if box is None or box.strip() == "":
        return None
    try:
        return check_box([float(v) for v in box.split(",")])
    except ValueError as err:  # BadImage included
        raise HTTPException(422, f"box must be 'x0,y0,x1,y1' normalised to the image with "
                                 f"x0 < x1 and y0 < y1 inside [0, 1]: {box!r}") from err


def _live_from_index(settings: ApiSettings, version: str) -> Live:
    manifest = layout.read_manifest(layout.version_dir(Path(settings.index_root), version))
    model_version = manifest["model_version"]
    number = repository.triton_version(model_version)
    served = repository.version_meta(Path(settings.triton_repo), number)["model_version"]
    if served != model_version:
        raise ValueError(f"Triton version {number} holds {served!r}, index {version} needs "
                         f"{model_version!r}")
    return Live(model_version, number, version, datetime.fromisoformat(manifest["built_at"]),
                repository.detector_categories(Path(settings.triton_repo), number))


def create_app(settings: ApiSettings, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The search API over one Triton, one index root and its shard replicas."""
    metrics = Metrics()
    state: dict = {"switch_lock": asyncio.Lock()}
    world = Path(settings.world_root)

    def load_tables() -> None:
        catalog = pd.read_parquet(world / "tables/catalog.parquet")
        state["catalog"] = catalog.set_index("item_id")[["category", "image_path"]].to_dict(
            "index")
        state["reranker"] = Reranker.from_parquet(Path(settings.features_path), settings.rerank)

    def set_live(live: Live) -> None:
        state["live"] = live
        metrics.model_version.clear()
        metrics.model_version.labels(live.model_version, live.index_version).set(1)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        load_tables()
        current = layout.pointer(Path(settings.index_root))
        if current is None:
            raise RuntimeError(f"{settings.index_root}: no live index version (cutover first)")
        set_live(_live_from_index(settings, current))
        state["triton"] = TritonModels(settings.triton_url)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=max(1.0, settings.deadline_s * 4),
                                     limits=limits) as http:
            state["http"] = http
            state["fanout"] = Fanout(ShardTopology(settings.shards), http, LatencyTracker())
            try:
                yield
            finally:
                await state["triton"].close()

    app = FastAPI(title="Loupe search API", version="1", lifespan=lifespan)
    for router in routers:
        app.include_router(router)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        metrics.requests.labels(request.url.path, str(exc.status_code)).inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    async def _model_call(stage: str, coro):
        t0 = time.perf_counter()
        try:
            out = await coro
        except BadModelInput as err:
            raise HTTPException(422, f"not a decodable image: {err}") from err
        except ModelUnavailable as err:
            raise HTTPException(503, f"{stage} unavailable: {err}") from err
        metrics.stage.labels(stage).observe(time.perf_counter() - t0)
        return out, (time.perf_counter() - t0) * 1000

    async def _detect(data: bytes, live: Live) -> tuple[list[dict], int | None, float]:
        det, ms = await _model_call("detect", state["triton"].detect(data, live.triton_version))
        boxes = [{"box": [round(float(v), 4) for v in b], "score": round(float(s), 4),
                  "category": live.categories[int(lbl)]}
                 for b, s, lbl in zip(det.boxes, det.scores, det.labels, strict=True)]
        default = pick_salient(det.boxes, det.scores)
        return boxes, default, ms

    @app.post("/v1/detect")
    async def detect(image: UploadFile = File(...)):
        data = await image.read()
        probe_image(data)
        live: Live = state["live"]
        boxes, default, ms = await _detect(data, live)
        metrics.requests.labels("/v1/detect", "200").inc()
        return {"boxes": boxes, "default_box": default, "model_version": live.model_version,
                "latency_ms": round(ms, 2)}

    @app.post("/v1/search")
    async def search(image: UploadFile = File(...), box: str | None = Form(None),
                     box_index: int | None = Form(None), k: int = Form(20),
                     region: str | None = Form(None)):
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be within 1..{MAX_K}, got {k}")
        if box is not None and box_index is not None:
            raise HTTPException(422, "give either box or box_index, not both")
        data = await image.read()
        probe_image(data)
        chosen = parse_box(box)
        live: Live = state["live"]  # one consistent triple for the whole request
        boxes: list[dict] = []
        if chosen is None:
            boxes, default, timings["detect_ms"] = await _detect(data, live)
            pick = default if box_index is None else box_index
            if box_index is not None and not 0 <= box_index < len(boxes):
                raise HTTPException(422, f"box_index {box_index} out of range "
                                         f"(detected {len(boxes)} boxes)")
            chosen = (0.0, 0.0, 1.0, 1.0) if pick is None else tuple(boxes[pick]["box"])
        (vectors, model_version), timings["embed_ms"] = await _model_call(
            "embed", state["triton"].embed([data], np.asarray([chosen]), live.triton_version))
        if model_version != live.model_version:  # never search an index with another model
            raise HTTPException(503, f"embedder answered with {model_version!r}, the live "
                                     f"index needs {live.model_version!r}")
        t0 = time.perf_counter()
        fan = await state["fanout"].search(
            vectors[0].tolist(), settings.candidates_per_shard, settings.deadline_s,
            expect_model_version=live.model_version,
            filters={"available_only": settings.rerank.drop_unavailable})
        timings["fanout_ms"] = (time.perf_counter() - t0) * 1000
        metrics.stage.labels("fanout").observe(timings["fanout_ms"] / 1000)
        for a in fan.answers:
            metrics.shard.labels(str(a.shard_id)).observe(a.latency_ms / 1000)
        metrics.hedges.inc(fan.hedges_fired)
        if fan.partial:
            metrics.partial.inc()
        if not fan.answers:
            raise HTTPException(503, f"no shard answered within "
                                     f"{settings.deadline_s * 1000:.0f} ms")
        t0 = time.perf_counter()
        ranked = state["reranker"].rerank([(h.item_id, h.score) for h in fan.hits], k, region)
        timings["rerank_ms"] = (time.perf_counter() - t0) * 1000
        metrics.stage.labels("rerank").observe(timings["rerank_ms"] / 1000)
        catalog = state["catalog"]
        items = [{"item_id": r.item_id, "score": round(r.score, 5),
                  "similarity": round(r.similarity, 5), "price": r.price, "region": r.region,
                  "category": catalog.get(r.item_id, {}).get("category"),
                  "image_url": "/world/" + catalog.get(r.item_id, {}).get("image_path", "")}
                 for r in ranked]
        index_versions = sorted({a.index_version for a in fan.answers})
        total = time.perf_counter() - t_start
        timings["total_ms"] = total * 1000
        metrics.stage.labels("total").observe(total)
        metrics.requests.labels("/v1/search", "200").inc()
        # plain JSON types already: FastAPI's jsonable_encoder would cost ~0.2 ms per search
        return JSONResponse({
            "request_id": uuid.uuid4().hex, "model_version": live.model_version,
            "index_version": index_versions[0] if len(index_versions) == 1 else index_versions,
            "box": [round(float(v), 4) for v in chosen], "detected": boxes,
            "partial": fan.partial, "missing_shards": fan.missing_shards,
            "hedges_fired": fan.hedges_fired, "items": items,
            "timings_ms": {key: round(v, 3) for key, v in timings.items()}})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        live: Live = state["live"]
        if not await state["triton"].ready(live.triton_version):
            raise HTTPException(503, f"triton version {live.triton_version} not ready")
        return {"status": "ready", "model_version": live.model_version,
                "index_version": live.index_version}

    @app.get("/metrics")
    async def prometheus():
        metrics.index_age.set((datetime.now(UTC) - state["live"].built_at).total_seconds())
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ admin
    def _admin(token: str | None) -> None:
        if not settings.admin_token or not hmac.compare_digest(token or "",
                                                               settings.admin_token):
            raise HTTPException(401, "admin endpoints need a valid X-Admin-Token header")

    async def _replicas(method: str, path: str, body: dict | None = None) -> list[dict]:
        http: httpx.AsyncClient = state["http"]
        urls = [u for urls in settings.shards.values() for u in urls]
        headers = {"X-Admin-Token": settings.admin_token}
        try:
            answers = await asyncio.gather(*(
                http.request(method, f"{u}{path}", json=body, headers=headers, timeout=10.0)
                for u in urls))
        except httpx.HTTPError as err:
            raise HTTPException(503, f"shard replica unreachable: {err!r}") from err
        bad = [(u, r.status_code) for u, r in zip(urls, answers, strict=True)
               if r.status_code != 200]
        if bad:
            raise HTTPException(503, f"shard replicas refused {path}: {bad}")
        return [r.json() for r in answers]

    async def _switch(target: str, move_pointer) -> dict:
        """Load the Triton version, re-point the replicas, move the index pointer, wait for
        every replica to serve it, then switch the API: in that order, so no request ever
        meets a model and an index that disagree."""
        try:
            new = _live_from_index(settings, target)
        except (ValueError, FileNotFoundError) as err:
            raise HTTPException(409, f"cannot switch to index {target}: {err}") from err
        old: Live = state["live"]
        repo = Path(settings.triton_repo)
        try:
            await asyncio.to_thread(repository.serve_versions, repo,
                                    [old.triton_version, new.triton_version])
        except ValueError as err:
            raise HTTPException(409, str(err)) from err
        await state["triton"].load_models()
        if not await state["triton"].ready(new.triton_version):
            raise HTTPException(503, f"triton version {new.triton_version} did not load")
        await _replicas("POST", "/admin/expect-model", {"model_version": new.model_version})
        try:
            moved = await asyncio.to_thread(move_pointer)
        except ValueError as err:
            raise HTTPException(409, str(err)) from err
        deadline = time.monotonic() + settings.switch_timeout_s
        while True:
            statuses = await _replicas("GET", "/healthz")
            if all(s["index_version"] == target for s in statuses):
                break
            if time.monotonic() > deadline:
                raise HTTPException(503, f"replicas did not swap to {target}: "
                                         f"{[s.get('last_error') for s in statuses]}")
            await asyncio.sleep(0.05)
        set_live(new)
        return {"switched": moved, "model_version": new.model_version,
                "triton_version": new.triton_version, "index_version": target,
                "previous": {"model_version": old.model_version,
                             "index_version": old.index_version}}

    @app.post("/admin/cutover")
    async def cutover(body: SwitchRequest, x_admin_token: str | None = Header(None)):
        _admin(x_admin_token)
        root = Path(settings.index_root)

        def move_pointer() -> dict:
            # an earlier switch moved the pointer, then timed out waiting for the replicas
            # (or its reply was lost): a retry finishes that switch instead of being refused
            if layout.pointer(root, layout.CURRENT) == body.index_version:
                return {"action": "cutover", "to": body.index_version, "resumed": True}
            return index_ops.cutover(root, body.index_version)

        async with state["switch_lock"]:
            return await _switch(body.index_version, move_pointer)

    @app.post("/admin/rollback")
    async def rollback(x_admin_token: str | None = Header(None)):
        _admin(x_admin_token)
        async with state["switch_lock"]:
            previous = layout.pointer(Path(settings.index_root), layout.PREVIOUS)
            if previous is None:
                raise HTTPException(409, "no previous index version to roll back to")
            return await _switch(previous,
                                 lambda: index_ops.rollback(Path(settings.index_root)))

    @app.post("/admin/reload")
    async def reload(x_admin_token: str | None = Header(None)):
        _admin(x_admin_token)
        await asyncio.to_thread(load_tables)
        return {"reloaded": ["catalog", "features"]}

    # ------------------------------------------------------------------ demo page
    @app.get("/", response_class=HTMLResponse)
    async def demo_page():
        return HTMLResponse((STATIC / "demo.html").read_text())

    @app.get("/v1/demo-photos")
    async def demo_photos(n: int = 12):
        scenes = sorted((world / "images/scenes").glob("*.jpg"))[: max(0, min(n, 50))]
        return {"photos": [f"/world/images/scenes/{p.name}" for p in scenes]}

    @app.get("/world/{path:path}")
    async def images(path: str):
        try:
            target = (world / path).resolve()
            found = target.is_relative_to(world.resolve()) and target.suffix == ".jpg" \
                and target.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long for the file system
            found = False
        if not found:
            raise HTTPException(404, f"no image {path[:200]!r}")
        return FileResponse(target, media_type="image/jpeg")

    app.state.loupe = state
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Loupe search API")
    p.add_argument("--settings", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    args = p.parse_args(argv)
    app = create_app(ApiSettings.from_json(args.settings))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
