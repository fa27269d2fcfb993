"""Experiment front door: assigns each user an arm, serves that arm's grid, logs it.

Two model versions can never share an index (vectors carry their model version), so each
ranker of an experiment is its own Loupe search stack (serving/api/app.py with its embedder
and shards); this thin app sits in front of them. Per request it hashes the user to an arm
(serving/experiments.yaml), asks that arm's stack for results, or, in the interleaved arm,
both stacks concurrently and team-drafts their grids, then commits the grid to the
impression log before answering, so every click can be attributed. Clicks and saves come
back through `POST /v1/events` on the same app.

Failures: an upstream's bad-input answer (4xx) is passed on with its reason; an upstream
that is down or times out, or a log that cannot commit, is a 503 (a grid that cannot be
logged is not served: its clicks would be lost).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import httpx
from fastapi import FastAPI, File, Form, HTTPException, UploadFile

from data_contracts.constants import GRID_SIZE, RANDOMISED_POLICY, RANKER_POLICY
from serving.api.errors import ApiError, answer_api_error
from serving.api.events import events_router
from serving.api.experiments import (
    DEFAULT_CONFIG,
    INTERLEAVED,
    ExperimentConfig,
    assign_arm,
    is_randomised,
    seeded_coin,
    shuffle_top,
    team_draft,
)
from serving.api.impressions import Grid, ImpressionLog, ShownItem
from serving.api.uploads import BodyLimit, check_image

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Ranked:
    """One ranker's answer: (item_id, score) best first, and the versions that made it."""

    items: list[tuple[str, float]]
    model_version: str
    index_version: str
    box: Box = WHOLE_IMAGE


class UpstreamError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class SearchBackend(Protocol):
    async def search(self, image: bytes, box: str | None, k: int,
                     region: str | None) -> Ranked: ...


class HttpSearchBackend:
    """A Loupe search API (serving/api/app.py) reached over HTTP."""

    def __init__(self, base_url: str, client: httpx.AsyncClient, timeout_s: float = 2.0):
        self.base_url, self.client, self.timeout_s = base_url.rstrip("/"), client, timeout_s

    async def search(self, image: bytes, box: str | None, k: int,
                     region: str | None) -> Ranked:
        data = {"k": str(k)} | ({"box": box} if box else {}) | (
            {"region": region} if region else {})
        try:
            r = await self.client.post(f"{self.base_url}/v1/search", data=data,
                                       files={"image": ("query.jpg", image, "image/jpeg")},
                                       timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise UpstreamError(503, f"search stack {self.base_url} unreachable: {err}") from err
        if r.status_code != 200:
            detail = r.json().get("detail", r.text) if r.headers.get(
                "content-type", "").startswith("application/json") else r.text
            status = r.status_code if 400 <= r.status_code < 500 else 503
            raise UpstreamError(status, f"search stack {self.base_url}: {detail}")
        body = r.json()
        index_version = body["index_version"]
        if isinstance(index_version, list):  # the stack was mid-cutover: say so, don't pick
            index_version = "+".join(index_version)
        return Ranked([(it["item_id"], float(it["score"])) for it in body["items"]],
                      str(body["model_version"]), str(index_version),
                      tuple(float(v) for v in body["box"]))


class RankerBackend:
    """An in-process ranker with the search interface (tests, simulations, studies)."""

    def __init__(self, rank: Callable[[bytes, int], list[tuple[str, float]]],
                 model_version: str, index_version: str):
        self.rank, self.model_version, self.index_version = rank, model_version, index_version

    async def search(self, image: bytes, box: str | None, k: int,
                     region: str | None) -> Ranked:
        return Ranked(self.rank(image, k), self.model_version, self.index_version)


def _interleave(a: Ranked, b: Ranked, k: int, request_id: str
                ) -> tuple[list[ShownItem], str, str]:
    score = dict(a.items) | {i: s for i, s in b.items if i not in dict(a.items)}
    drafted = team_draft([i for i, _ in a.items], [i for i, _ in b.items], k,
                         seeded_coin(request_id))
    shown = [ShownItem(item, pos, score[item], team)
             for pos, (item, team) in enumerate(drafted, start=1)]
    return (shown, f"A={a.model_version}|B={b.model_version}",
            f"A={a.index_version}|B={b.index_version}")


def create_online_app(cfg: ExperimentConfig, backends: Mapping[str, SearchBackend],
                      log: ImpressionLog) -> FastAPI:
    """The front door over one search backend per ranker named in `cfg`."""
    missing = {r for arm in cfg.traffic for r in cfg.arm_rankers(arm)} - set(backends)
    if missing:
        raise ValueError(f"no search backend for rankers {sorted(missing)}")
    app = FastAPI(title="Loupe experiment front door", version="1")
    app.add_middleware(BodyLimit)
    app.add_exception_handler(ApiError, answer_api_error)
    app.include_router(events_router(log))

    async def ranked(names: Sequence[str], image: bytes, box: str | None, k: int,
                     region: str | None) -> list[Ranked]:
        try:
            return list(await asyncio.gather(
                *(backends[n].search(image, box, k, region) for n in names)))
        except UpstreamError as err:
            raise HTTPException(err.status, err.detail) from err

    @app.post("/v1/search")
    async def search(image: UploadFile = File(...), user_id: str = Form(...),
                     session_id: str | None = Form(None), box: str | None = Form(None),
                     k: int = Form(GRID_SIZE), region: str | None = Form(None)):
        if not 1 <= k <= GRID_SIZE:
            raise HTTPException(422, f"k must be within 1..{GRID_SIZE} (logged grids), got {k}")
        if not user_id.strip():
            raise HTTPException(422, "user_id must not be blank")
        data = await image.read()
        check_image(data)
        request_id = uuid.uuid4().hex
        arm = assign_arm(cfg, user_id)
        answers = await ranked(cfg.arm_rankers(arm), data, box, k, region)
        policy = RANKER_POLICY
        if arm == INTERLEAVED:
            shown, model_version, index_version = _interleave(*answers, k, request_id)
        else:
            items = answers[0].items[:k]
            if is_randomised(cfg, request_id):
                items = shuffle_top(items, request_id, GRID_SIZE)
                policy = RANDOMISED_POLICY
            shown = [ShownItem(i, pos, s) for pos, (i, s) in enumerate(items, start=1)]
            model_version, index_version = answers[0].model_version, answers[0].index_version
        if not shown:
            raise HTTPException(503, f"arm {arm!r} returned no results")
        grid = Grid(request_id=request_id, user_id=user_id,
                    client_session_id=session_id or user_id, ts=datetime.now(UTC),
                    query_image=data, box=answers[0].box, experiment=cfg.experiment, arm=arm,
                    logging_policy=policy, model_version=model_version,
                    index_version=index_version, items=shown)
        try:
            await asyncio.to_thread(log.log_grid, grid)
        except Exception as err:  # an unlogged grid must not be served: its clicks are lost
            raise HTTPException(503, f"impression log unavailable: {err}") from err
        return {"request_id": request_id, "experiment": cfg.experiment, "arm": arm,
                "model_version": model_version, "index_version": index_version,
                "logging_policy": policy,
                "items": [{"item_id": s.item_id, "position": s.position,
                           "score": round(s.score, 5), "team": s.team} for s in shown]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "experiment": cfg.experiment}

    app.state.impression_log = log
    app.state.experiment = cfg
    return app


def serve(config: Path, log_dir: Path, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Run the front door over the search stacks named in the config's `rankers`."""
    import uvicorn

    cfg = ExperimentConfig.load(config)
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256))
    backends = {name: HttpSearchBackend(url, client) for name, url in cfg.rankers.items()}
    uvicorn.run(create_online_app(cfg, backends, ImpressionLog(log_dir)), host=host, port=port)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Loupe experiment front door")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    serve(args.config, args.log_dir, args.host, args.port)
