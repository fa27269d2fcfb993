"""One shard replica as an HTTP process: `POST /search` answers top-k for a query vector.

The process owns a `ShardStore` (hot-swap on cutover, delta + tombstones, version guard) and
only translates HTTP; run one per shard replica:
`python -m serving.shards.server --index-root DIR --shard 0 --model-version loupe-embedder/3
--port 9100 [--host 0.0.0.0] [--features items.parquet]`. The port opens only after the live
version is loaded (startup loads it), so `GET /healthz` doubles as the readiness probe.

Filters: with an item feature table, `available_only` and `regions` are applied here, with
over-fetching, so sold-out or out-of-region items never take a candidate slot from the merge.
`POST /admin/expect-model` (token in X-Admin-Token, from $LOUPE_ADMIN_TOKEN) tells the store
which embedder's vectors to serve before a model-version cutover.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serving.shards.store import NotReady, SearchResult, ShardStore, VersionMismatch

OVERFETCH = 3  # filtered searches ask the index for this many times k


class Filters(BaseModel):
    available_only: bool = False
    regions: list[str] | None = None


class SearchRequest(BaseModel):
    vector: list[float] = Field(min_length=1, max_length=4096)
    k: int = Field(ge=1, le=1000)
    model_version: str | None = None
    filters: Filters | None = None


class ExpectModel(BaseModel):
    model_version: str = Field(min_length=1)


class ItemFilter:
    """Availability and region per item, from the shared feature table."""

    def __init__(self, features: pd.DataFrame):
        f = features.set_index("item_id")
        self.available = f["available"].astype(bool).to_dict()
        self.region = f["region"].astype(str).to_dict()

    def keep(self, item_id: str, filters: Filters) -> bool:
        if filters.available_only and not self.available.get(item_id, False):
            return False
        return not filters.regions or self.region.get(item_id) in filters.regions


def create_shard_app(store: ShardStore, item_filter: ItemFilter | None = None,
                     admin_token: str = "") -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        store.start()
        try:
            yield
        finally:
            store.stop()

    app = FastAPI(title=f"Loupe shard {store.shard_id}", lifespan=lifespan)

    def _search(vec: np.ndarray, k: int, model_version: str | None,
                filters: Filters | None) -> tuple[SearchResult, list]:
        active = filters is not None and (filters.available_only or filters.regions)
        if active and item_filter is None:
            raise ValueError("this shard has no item feature table: filters unsupported")
        res = store.search(vec, k * OVERFETCH if active else k, model_version)
        if not active:
            return res, res.hits
        return res, [h for h in res.hits if item_filter.keep(h.item_id, filters)][:k]

    @app.post("/search")
    async def search(req: SearchRequest):
        vec = np.asarray(req.vector, dtype=np.float32)
        if not np.all(np.isfinite(vec)):
            raise HTTPException(422, "vector has non-finite values")
        try:
            res, hits = await asyncio.to_thread(_search, vec, req.k, req.model_version, req.filters)
        except VersionMismatch as err:
            raise HTTPException(409, str(err)) from err
        except NotReady as err:
            raise HTTPException(503, str(err)) from err
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        # plain JSON types already: FastAPI's jsonable_encoder would cost ~0.2 ms per answer
        return JSONResponse({"shard_id": res.shard_id, "index_version": res.index_version,
                             "model_version": res.model_version,
                             "hits": [{"item_id": h.item_id, "score": h.score} for h in hits]})

    @app.get("/healthz")
    async def healthz():
        return store.status()

    @app.post("/admin/expect-model")
    async def expect_model(body: ExpectModel, x_admin_token: str | None = Header(None)):
        if not admin_token or not hmac.compare_digest((x_admin_token or "").encode(),
                                                      admin_token.encode()):
            raise HTTPException(401, "admin endpoints need a valid X-Admin-Token header")
        await asyncio.to_thread(store.expect_model_version, body.model_version)
        return store.status()

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index-root", type=Path, required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--model-version", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    p.add_argument("--features", type=Path, default=None, help="item feature table (filters)")
    p.add_argument("--keep-previous-s", type=float, default=300.0)
    args = p.parse_args(argv)
    store = ShardStore(args.index_root, args.shard, args.model_version,
                       keep_previous_s=args.keep_previous_s)
    item_filter = ItemFilter(pd.read_parquet(args.features)) if args.features else None
    app = create_shard_app(store, item_filter, os.environ.get("LOUPE_ADMIN_TOKEN", ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
