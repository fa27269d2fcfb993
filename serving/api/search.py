"""The search service: detect, pick a box, embed (the crop happens in Triton), fan out to
the shards, merge, re-rank. With no box chosen by the user, detect -> pick -> crop -> embed
is one Triton call (`detect_embed`: one decode, one request). Plain Python: the HTTP routes
(serving/api/app.py) only parse the form and answer what this returns or raises.

Failure policy, so the camera feature degrades instead of erroring: bad input -> `Rejected`
(422, 413 for too large) before any model runs where the upload header is enough to tell;
Triton down -> `Unavailable`; a shard past the deadline or with every replica down -> a
result with `partial` and the missing shard ids; a shard answering from another model's
index is treated as missing. Every Triton call pins the live Triton version and checks the
MODEL_VERSION it returns, and every shard query names the model, so no answer mixes two
models.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd

from data_contracts.constants import GRID_SIZE
from models.detector import pick_salient
from models.preprocessing import check_box
from serving.api.errors import Rejected, Unavailable
from serving.api.fanout import Fanout
from serving.api.metrics import Metrics
from serving.api.rerank import RerankConfig, Reranker
from serving.api.triton_client import (
    BadModelInput,
    DetectEmbedOutput,
    DetectorOutput,
    ModelUnavailable,
)
from serving.api.uploads import check_image
from serving.switch import Live

MAX_K = 100
Box = tuple[float, float, float, float]
T = TypeVar("T")


class Models(Protocol):
    """The detector and the embedder (serving/api/triton_client.py's `TritonModels`)."""

    async def detect(self, image: bytes, version: int) -> DetectorOutput: ...

    async def detect_embed(self, image: bytes, version: int) -> DetectEmbedOutput: ...

    async def embed(self, images: list[bytes], boxes: np.ndarray, version: int
                    ) -> tuple[np.ndarray, str]: ...


@dataclass(frozen=True)
class SearchQuery:
    image: bytes
    box: Sequence[float] | None = None  # x0,y0,x1,y1 normalised; None: detect and pick
    box_index: int | None = None  # which detected box; None: the most salient one
    k: int = GRID_SIZE
    region: str | None = None
    request_id: str | None = None  # the request log's id (serving/api/metrics.py); else new


@dataclass(frozen=True)
class Detection:
    box: list[float]
    score: float
    category: str


@dataclass(frozen=True)
class DetectResult:
    boxes: list[Detection]
    default_box: int | None
    model_version: str
    latency_ms: float


@dataclass(frozen=True)
class ResultItem:
    item_id: str
    score: float
    similarity: float
    price: float
    region: str
    category: str | None
    image_url: str


@dataclass(frozen=True)
class SearchResult:
    request_id: str
    model_version: str
    index_version: str | list[str]  # a list only while the shards are mid-cutover
    box: list[float]
    detected: list[Detection]
    partial: bool
    missing_shards: list[int]
    hedges_fired: int
    items: list[ResultItem]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The response body: the fields as they are (plain JSON types already), with no
        deep copy (`dataclasses.asdict` cost 0.2 ms a search, 5% of the API's CPU)."""
        return {**vars(self), "detected": [vars(d) for d in self.detected],
                "items": [vars(i) for i in self.items]}


@dataclass(frozen=True)
class Tables:
    """The catalog rows the result grid shows and the re-ranker's features."""

    catalog: dict[str, dict]  # item_id -> {"category", "image_path"}
    reranker: Reranker

    @classmethod
    def load(cls, world_root: Path, features_path: Path, rerank: RerankConfig) -> Tables:
        catalog = pd.read_parquet(Path(world_root) / "tables/catalog.parquet")
        return cls(catalog.set_index("item_id")[["category", "image_path"]].to_dict("index"),
                   Reranker.from_parquet(Path(features_path), rerank))


class SearchService:
    """One search API's query path over its models, shard fan-out and tables."""

    def __init__(self, models: Models, fanout: Fanout, tables: Tables,
                 live: Callable[[], Live], metrics: Metrics, deadline_s: float = 0.15,
                 candidates_per_shard: int = 50):
        self.models, self.fanout, self.tables, self.live = models, fanout, tables, live
        self.metrics, self.deadline_s = metrics, deadline_s
        self.candidates_per_shard = candidates_per_shard

    async def _model_call(self, stage: str, call: Awaitable[T]) -> tuple[T, float]:
        t0 = time.perf_counter()
        try:
            out = await call
        except BadModelInput as err:
            raise Rejected(f"not a decodable image: {err}") from err
        except ModelUnavailable as err:
            raise Unavailable(f"{stage} unavailable: {err}") from err
        seconds = time.perf_counter() - t0
        self.metrics.stage.labels(stage).observe(seconds)
        return out, seconds * 1000

    async def _detect(self, image: bytes, live: Live) -> DetectResult:
        det, ms = await self._model_call("detect", self.models.detect(image,
                                                                      live.triton_version))
        return DetectResult(_detections(det, live), pick_salient(det.boxes, det.scores),
                            live.model_version, ms)

    async def detect(self, image: bytes) -> DetectResult:
        """The detected boxes and the one a search would crop by default."""
        check_image(image)
        found = await self._detect(image, self.live())
        return replace(found, latency_ms=round(found.latency_ms, 2))

    async def search(self, query: SearchQuery) -> SearchResult:
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        if not 1 <= query.k <= MAX_K:
            raise Rejected(f"k must be within 1..{MAX_K}, got {query.k}")
        if query.box is not None and query.box_index is not None:
            raise Rejected("give either box or box_index, not both")
        check_image(query.image)
        chosen = None if query.box is None else _checked_box(query.box)
        live = self.live()  # one consistent triple for the whole request
        detected: list[Detection] = []
        if chosen is None and query.box_index is None:
            out, timings["detect_embed_ms"] = await self._model_call(
                "detect_embed", self.models.detect_embed(query.image, live.triton_version))
            detected, chosen = _detections(out, live), _rounded(out.box)
            vectors, model_version = out.vector[None], out.model_version
        else:
            if chosen is None:  # the user picked one of the detected boxes
                det = await self._detect(query.image, live)
                detected, timings["detect_ms"] = det.boxes, det.latency_ms
                if not 0 <= query.box_index < len(detected):
                    raise Rejected(f"box_index {query.box_index} out of range "
                                   f"(detected {len(detected)} boxes)")
                chosen = tuple(detected[query.box_index].box)
            (vectors, model_version), timings["embed_ms"] = await self._model_call(
                "embed", self.models.embed([query.image], np.asarray([chosen]),
                                           live.triton_version))
        if model_version != live.model_version:  # never search an index with another model
            raise Unavailable(f"embedder answered with {model_version!r}, the live index "
                              f"needs {live.model_version!r}")
        tables = self.tables  # one consistent pair, even during an /admin/reload
        t0 = time.perf_counter()
        fan = await self.fanout.search(
            vectors[0], self.candidates_per_shard, self.deadline_s,
            expect_model_version=live.model_version,
            filters={"available_only": tables.reranker.cfg.drop_unavailable})
        timings["fanout_ms"] = (time.perf_counter() - t0) * 1000
        self.metrics.stage.labels("fanout").observe(timings["fanout_ms"] / 1000)
        for a in fan.answers:
            self.metrics.shard.labels(str(a.shard_id)).observe(a.latency_ms / 1000)
        self.metrics.hedges.inc(fan.hedges_fired)
        if fan.partial:
            self.metrics.partial.inc()
        if not fan.answers:
            raise Unavailable(f"no shard answered within {self.deadline_s * 1000:.0f} ms")
        t0 = time.perf_counter()
        ranked = tables.reranker.rerank([(h.item_id, h.score) for h in fan.hits], query.k,
                                        query.region)
        timings["rerank_ms"] = (time.perf_counter() - t0) * 1000
        self.metrics.stage.labels("rerank").observe(timings["rerank_ms"] / 1000)
        items = [ResultItem(r.item_id, round(r.score, 5), round(r.similarity, 5), r.price,
                            r.region, tables.catalog.get(r.item_id, {}).get("category"),
                            "/world/" + tables.catalog.get(r.item_id, {}).get("image_path", ""))
                 for r in ranked]
        index_versions = sorted({a.index_version for a in fan.answers})
        total = time.perf_counter() - t_start
        timings["total_ms"] = total * 1000
        self.metrics.stage.labels("total").observe(total)
        return SearchResult(
            request_id=query.request_id or uuid.uuid4().hex, model_version=live.model_version,
            index_version=index_versions[0] if len(index_versions) == 1 else index_versions,
            box=[round(float(v), 4) for v in chosen], detected=detected,
            partial=fan.partial, missing_shards=fan.missing_shards,
            hedges_fired=fan.hedges_fired, items=items,
            timings_ms={key: round(v, 3) for key, v in timings.items()})


def _rounded(box) -> Box:
    return tuple(round(float(v), 4) for v in box)


def _detections(det: DetectorOutput | DetectEmbedOutput, live: Live) -> list[Detection]:
    return [Detection(list(_rounded(b)), round(float(s), 4), live.categories[int(lbl)])
            for b, s, lbl in zip(det.boxes, det.scores, det.labels, strict=True)]


def _checked_box(box: Sequence[float]) -> Box:
    try:
        return check_box(box)
    except ValueError as err:  # BadImage included
        raise Rejected(f"box must be 'x0,y0,x1,y1' normalised to the image with x0 < x1 and "
                       f"y0 < y1 inside [0, 1]: {','.join(map(str, box))!r}") from err
