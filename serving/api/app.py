"""Loupe search API: the HTTP face of `SearchService` (serving/api/search.py) and of the
model+index `Switcher` (serving/switch.py), one router per concern: search, admin, demo.

Every refusal is a 4xx JSON body with a `detail` reason (serving/api/errors.py). A model
version switch goes through `POST /admin/cutover` (or `/admin/rollback`), which loads the
Triton version, re-points the shard replicas and moves the index pointer together.

Run: `python -m serving.api.app --settings api.json --port 8000` (see serving/stack.py).
Other routers (impression logging, events) mount through `create_app(..., routers=[...])`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import zip_longest
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Request,
    UploadFile,
)
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel, Field

from data_contracts.constants import GRID_SIZE
from serving.api.admission import Admission
from serving.api.errors import ApiError, Rejected, answer_api_error
from serving.api.fanout import Fanout, LatencyTracker, ShardClient, ShardTopology
from serving.api.metrics import Metrics, RequestTelemetry, request_log
from serving.api.replica_health import ReplicaHealth
from serving.api.rerank import RerankConfig
from serving.api.search import DetectResult, SearchQuery, SearchResult, SearchService, Tables
from serving.api.triton_client import TritonModels
from serving.api.uploads import BodyLimit
from serving.switch import Live, Switcher

STATIC = Path(__file__).parent / "static"


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
    health_probe_every_s: float = 5.0
    # admission (serving/api/admission.py): 8 in flight is the concurrency where bench/serve.py
    # saturates two cores; past it a request waits 100 ms for a slot, then gets a 503
    max_in_flight: int = 8
    max_queue_wait_s: float = 0.1
    max_waiting: int = 32
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

    def load_tables(self) -> Tables:
        return Tables.load(Path(self.world_root), Path(self.features_path), self.rerank)


@dataclass
class ApiState:
    """What the routes reach through their dependencies; made at startup."""

    settings: ApiSettings
    metrics: Metrics
    service: SearchService
    switcher: Switcher
    triton: TritonModels
    replica_health: ReplicaHealth
    admission: Admission


# --------------------------------------------------------------------------- dependencies
# async, though they await nothing: FastAPI runs a plain `def` dependency in its thread pool,
# a hand-off that cost the search route 6% of the API's CPU
async def _state(request: Request) -> ApiState:
    return request.app.state.loupe


async def _live(state: Annotated[ApiState, Depends(_state)]) -> Live:
    return state.switcher.live


async def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def _require_admin(settings: Annotated[ApiSettings, Depends(_settings)],
                   x_admin_token: Annotated[str | None, Header()] = None) -> None:
    if not settings.admin_token or not hmac.compare_digest(
            (x_admin_token or "").encode(), settings.admin_token.encode()):
        raise HTTPException(401, "admin endpoints need a valid X-Admin-Token header")


State = Annotated[ApiState, Depends(_state)]
LiveNow = Annotated[Live, Depends(_live)]


# --------------------------------------------------------------------------- request models
class SwitchRequest(BaseModel):
    index_version: str = Field(min_length=1)


# --------------------------------------------------------------------------- search
search_router = APIRouter()


def _form_box(box: str | None) -> list[float] | None:
    if box is None or box.strip() == "":
        return None
    try:
        return [float(v) for v in box.split(",")]
    except ValueError as err:
        raise Rejected(f"box must be 'x0,y0,x1,y1' normalised to the image with x0 < x1 and "
                       f"y0 < y1 inside [0, 1]: {box!r}") from err


@search_router.post("/v1/detect", response_model=DetectResult)
async def detect(state: State, image: Annotated[UploadFile, File()]):
    async with state.admission.slot():
        found = await state.service.detect(await image.read())
    return JSONResponse(asdict(found))


@search_router.post("/v1/search", response_model=SearchResult)
async def search(state: State, request: Request, image: Annotated[UploadFile, File()],
                 box: Annotated[str | None, Form()] = None,
                 box_index: Annotated[int | None, Form()] = None,
                 k: Annotated[int, Form()] = GRID_SIZE,
                 region: Annotated[str | None, Form()] = None):
    query = SearchQuery(await image.read(), _form_box(box), box_index, k, region,
                        request.state.request_id)
    async with state.admission.slot():
        result = await state.service.search(query)
    # plain JSON types already: FastAPI's jsonable_encoder would cost ~0.2 ms per search
    return JSONResponse(result.to_json())


@search_router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@search_router.get("/readyz")
async def readyz(state: State, live: LiveNow, partial_ok: bool = False):
    """503 while Triton's live version is not loaded or a shard has no replica answering
    (every search would be `partial`); 200 `degraded` while a shard runs on fewer replicas
    than configured. `?partial_ok=true` keeps a missing shard at 200 for a load balancer
    that should go on serving flagged partial answers rather than none."""
    if not await state.triton.ready(live.triton_version):
        raise HTTPException(503, f"triton version {live.triton_version} not ready")
    redundancy = await state.replica_health.probe()
    body = {**redundancy.as_dict(), "model_version": live.model_version,
            "index_version": live.index_version}
    if redundancy.missing and not partial_ok:
        return JSONResponse(body, status_code=503)
    return body


@search_router.get("/metrics")
async def prometheus(state: State, live: LiveNow):
    state.metrics.index_age.set((datetime.now(UTC) - live.built_at).total_seconds())
    return Response(generate_latest(state.metrics.registry),
                    media_type="text/plain; version=0.0.4")


# --------------------------------------------------------------------------- admin
admin_router = APIRouter(prefix="/admin", dependencies=[Depends(_require_admin)])


@admin_router.post("/cutover")
async def cutover(state: State, body: SwitchRequest):
    return await state.switcher.cutover(body.index_version)


@admin_router.post("/rollback")
async def rollback(state: State):
    return await state.switcher.rollback()


@admin_router.post("/reload")
async def reload(state: State):
    state.service.tables = await asyncio.to_thread(state.settings.load_tables)
    return {"reloaded": ["catalog", "features"]}


# --------------------------------------------------------------------------- demo page
demo_router = APIRouter()


@demo_router.get("/", response_class=HTMLResponse)
async def demo_page():
    return HTMLResponse((STATIC / "demo.html").read_text())


IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".webp": "image/webp"}


@demo_router.get("/v1/demo-photos")
async def demo_photos(state: State, n: int = 12):
    """Room scenes to tap objects in; a shop without scenes (an imported catalog) offers its
    own catalog photos, a few of each category folder in turn, which hold real objects."""
    world = Path(state.settings.world_root)
    n = max(0, min(n, 50))
    for folder in ("images/scenes", "images/catalog"):
        by_folder: dict[Path, list[Path]] = {}
        for p in sorted((world / folder).rglob("*")):
            if p.suffix in IMAGE_TYPES:
                by_folder.setdefault(p.parent, []).append(p)
        if by_folder:
            rounds = zip_longest(*by_folder.values())
            photos = [p for row in rounds for p in row if p is not None][:n]
            return {"photos": [f"/world/{p.relative_to(world).as_posix()}" for p in photos]}
    return {"photos": []}


@demo_router.get("/world/{path:path}")
async def images(state: State, path: str):
    world = Path(state.settings.world_root)
    try:
        target = (world / path).resolve()
        found = target.is_relative_to(world.resolve()) and target.suffix in IMAGE_TYPES \
            and target.is_file()
    except (ValueError, OSError):  # a NUL byte, a name too long for the file system
        found = False
    if not found:
        raise HTTPException(404, f"no image {path[:200]!r}")
    return FileResponse(target, media_type=IMAGE_TYPES[target.suffix])


# --------------------------------------------------------------------------- app
def create_app(settings: ApiSettings, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The search API over one Triton, one index root and its shard replicas."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tables = settings.load_tables()
        triton = TritonModels(settings.triton_url)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=max(1.0, settings.deadline_s * 4),
                                     limits=limits) as http:
            switcher = Switcher(
                Path(settings.index_root), Path(settings.triton_repo),
                [u for urls in settings.shards.values() for u in urls], settings.admin_token,
                triton, http, settings.switch_timeout_s,
                on_switch=lambda live: metrics.served(live.model_version, live.index_version))
            shards = ShardClient(timeout_s=max(1.0, settings.deadline_s * 4))
            service = SearchService(
                triton, Fanout(ShardTopology(settings.shards), shards, LatencyTracker()),
                tables, lambda: switcher.live, metrics, settings.deadline_s,
                settings.candidates_per_shard)
            health = ReplicaHealth(settings.shards, http, metrics.replicas_up,
                                   metrics.shards_missing)
            prober = asyncio.create_task(health.probe_forever(settings.health_probe_every_s))
            admission = Admission(settings.max_in_flight, settings.max_queue_wait_s,
                                  settings.max_waiting, metrics.in_flight, metrics.shed)
            app.state.loupe = ApiState(settings, metrics, service, switcher, triton, health,
                                       admission)
            try:
                yield
            finally:
                prober.cancel()
                await triton.close()
                await shards.close()

    app = FastAPI(title="Loupe search API", version="1", lifespan=lifespan)

    def serving() -> tuple[str, str] | None:
        state = getattr(app.state, "loupe", None)
        if state is None:
            return None
        live = state.switcher.live
        return live.model_version, live.index_version

    app.add_middleware(BodyLimit)  # inside the telemetry, so refusals are counted
    app.add_middleware(RequestTelemetry, metrics=metrics, serving=serving)
    app.add_exception_handler(ApiError, answer_api_error)
    for router in (search_router, admin_router, demo_router, *routers):
        app.include_router(router)
    app.state.settings = settings
    app.state.metrics = metrics
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Loupe search API")
    p.add_argument("--settings", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    args = p.parse_args(argv)
    app = create_app(ApiSettings.from_json(args.settings))
    handler = logging.StreamHandler()  # the stack sends this process's stderr to its log
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
