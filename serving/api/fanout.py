"""Fan a query vector out to every shard, hedge slow replicas, merge within a deadline.

Tail latency in a sharded search is the slowest shard's. Two standard remedies (Dean & Barroso,
"The Tail at Scale", CACM 2013): a **hedged request** to a second replica once the first has
not answered by roughly its own p95, and a **deadline** after which the merge goes ahead with
what arrived, flagging the response as partial and naming the missing shards.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from serving.shards.server import F32_ROUTE

F32_HEADERS = {"content-type": "application/octet-stream"}


@dataclass(frozen=True)
class ShardQuery:
    """One query as every replica is asked it (serving.shards.server's `/search/f32`): the
    vector's float32 bytes, encoded once per search, and the query parameters."""

    vector: bytes
    params: dict[str, str]

    @classmethod
    def of(cls, vector: Sequence[float] | np.ndarray, k: int, model_version: str | None,
           filters: dict | None) -> ShardQuery:
        params = {"k": str(k)}
        if model_version:
            params["model_version"] = model_version
        if filters and filters.get("available_only"):
            params["available_only"] = "true"
        if filters and filters.get("regions"):
            params["regions"] = ",".join(filters["regions"])
        return cls(np.asarray(vector, dtype="<f4").tobytes(), params)


class ShardClient:
    """HTTP/1.1 keep-alive client for the replicas' float32 route, on aiohttp: 0.5 ms of client
    CPU per call where httpx spent 1.4 (same shard, same loop, measured side by side; the
    API makes one call per shard per search, more when it hedges). A session belongs to one
    event loop; used from another (a test client's loop per request) it opens its own."""

    def __init__(self, timeout_s: float, max_connections: int = 256):
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self._bound: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._bound = (loop, aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                       auto_decompress=False))
        return self._bound[1]

    async def search(self, url: str, query: ShardQuery) -> dict:
        """One replica's answer to `query` (raises on a connection error or a non-2xx)."""
        async with self._session().post(f"{url}{F32_ROUTE}", data=query.vector,
                                        params=query.params, headers=F32_HEADERS) as r:
            r.raise_for_status()
            return await r.json()

    async def close(self) -> None:
        if self._bound is not None and self._bound[0] is asyncio.get_running_loop():
            await self._bound[1].close()
        self._bound = None


@dataclass
class ShardHit:
    item_id: str
    score: float
    shard_id: int


@dataclass
class ShardAnswer:
    shard_id: int
    replica: str
    hits: list[ShardHit]
    index_version: str
    model_version: str
    latency_ms: float
    hedged: bool


@dataclass
class FanoutResult:
    hits: list[ShardHit]
    answers: list[ShardAnswer]
    missing_shards: list[int]
    hedges_fired: int

    @property
    def partial(self) -> bool:
        return bool(self.missing_shards)


class LatencyTracker:
    """Rolling per-shard latency window; its p95 decides when to hedge."""

    def __init__(self, window: int = 200, default_ms: float = 20.0, floor_ms: float = 2.0):
        self._samples: dict[int, deque[float]] = {}
        self.window, self.default_ms, self.floor_ms = window, default_ms, floor_ms

    def observe(self, shard_id: int, ms: float) -> None:
        self._samples.setdefault(shard_id, deque(maxlen=self.window)).append(ms)

    def p95(self, shard_id: int) -> float:
        s = self._samples.get(shard_id)
        if not s or len(s) < 20:
            return self.default_ms
        ordered = sorted(s)
        return max(self.floor_ms, ordered[int(0.95 * (len(ordered) - 1))])


@dataclass
class ShardTopology:
    """Replica base URLs per shard id (e.g. {0: ["http://127.0.0.1:9100", ...], ...})."""

    replicas: dict[int, list[str]]
    _next: dict[int, int] = field(default_factory=dict)

    def order(self, shard_id: int) -> list[str]:
        """Replicas in round-robin order, so load spreads and the hedge goes elsewhere."""
        urls = self.replicas[shard_id]
        start = self._next.get(shard_id, 0)
        self._next[shard_id] = (start + 1) % len(urls)
        return urls[start:] + urls[:start]


class Fanout:
    def __init__(self, topology: ShardTopology, client: ShardClient,
                 tracker: LatencyTracker | None = None, hedge: bool = True):
        self.topology, self.client = topology, client
        self.tracker = tracker or LatencyTracker()
        self.hedge = hedge
        self._background: set[asyncio.Task] = set()

    def _let_finish(self, tasks) -> None:
        """Leave a hedge's loser or a shard past the deadline to finish in the background
        instead of cancelling it: a cancelled request can strand its pool connection and
        socket (httpx did, encode/httpcore#1093: the soak saw the API's fds grow ~5 a
        minute), and a finished one returns its connection to the pool for the next search.
        The client's timeout bounds how long it runs; its result is dropped."""
        for task in tasks:
            self._background.add(task)
            task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed straggler is expected, not a log line

    async def _ask(self, url: str, shard_id: int, query: ShardQuery, hedged: bool
                   ) -> ShardAnswer:
        t0 = time.perf_counter()
        body = await self.client.search(url, query)
        ms = (time.perf_counter() - t0) * 1000
        return ShardAnswer(
            shard_id=shard_id, replica=url,
            hits=[ShardHit(item, score, shard_id) for item, score in
                  zip(body["item_ids"], body["scores"], strict=True)],
            index_version=body["index_version"], model_version=body["model_version"],
            latency_ms=ms, hedged=hedged)

    async def _one_shard(self, shard_id: int, query: ShardQuery) -> tuple[ShardAnswer, int]:
        """First good answer from a replica; hedge to the next one after the shard's p95,
        and fail over at once when a replica errors (e.g. a killed process)."""
        replicas = self.topology.order(shard_id)
        pending: set[asyncio.Task] = set()
        hedges = 0
        errors: list[BaseException] = []
        nxt = 0

        def launch(hedged: bool) -> None:
            nonlocal nxt
            pending.add(asyncio.create_task(self._ask(replicas[nxt], shard_id, query, hedged)))
            nxt += 1

        launch(False)
        try:
            while pending:
                timeout = self.tracker.p95(shard_id) / 1000 if (
                    self.hedge and nxt < len(replicas)) else None
                done, pending = await asyncio.wait(pending, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:  # slow: hedge to the next replica, keep the first in flight
                    hedges += 1
                    launch(True)
                    continue
                for task in done:
                    if task.exception() is None:
                        answer = task.result()
                        self.tracker.observe(shard_id, answer.latency_ms)
                        return answer, hedges
                    errors.append(task.exception())
                if not pending and nxt < len(replicas):
                    launch(True)
            raise ConnectionError(f"shard {shard_id}: every replica failed: {errors}")
        finally:
            self._let_finish(pending)

    async def search(self, vector: Sequence[float] | np.ndarray, k: int, deadline_s: float,
                     expect_model_version: str | None = None, filters: dict | None = None
                     ) -> FanoutResult:
        query = ShardQuery.of(vector, k, expect_model_version, filters)
        shard_ids = sorted(self.topology.replicas)
        tasks = {asyncio.create_task(self._one_shard(s, query)): s for s in shard_ids}
        done, late = await asyncio.wait(tasks, timeout=deadline_s)
        self._let_finish(late)
        answers, hedges, missing = [], 0, [tasks[t] for t in late]
        for task in done:
            if task.exception() is not None:
                missing.append(tasks[task])
                continue
            answer, h = task.result()
            hedges += h
            if expect_model_version and answer.model_version != expect_model_version:
                missing.append(answer.shard_id)  # never merge vectors of another model
                continue
            answers.append(answer)
        hits = sorted((h for a in answers for h in a.hits), key=lambda h: -h.score)
        return FanoutResult(hits=hits, answers=answers, missing_shards=sorted(missing),
                            hedges_fired=hedges)
