"""Which shard replicas answer: the redundancy `/readyz` and the metrics report.

Fan-out fails over a dead replica silently (that is its job), so without a probe a shard
running on its last replica, or on none (every answer `partial`), looks ready. The API
probes every replica's `/healthz` on each `/readyz` and every few seconds in the background,
and sets `loupe_shard_replicas_up{shard}` and `loupe_shards_missing` from the result.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from prometheus_client import Gauge

PROBE_TIMEOUT_S = 0.5  # a SIGSTOPped (stalled) replica counts as down after this


@dataclass(frozen=True)
class Redundancy:
    """Replicas answering per shard, against the configured count."""

    up: dict[int, int]
    configured: dict[int, int]

    @property
    def missing(self) -> list[int]:
        return sorted(s for s, n in self.up.items() if n == 0)

    @property
    def degraded(self) -> list[int]:
        return sorted(s for s, n in self.up.items() if 0 < n < self.configured[s])

    @property
    def status(self) -> str:
        return "missing_shards" if self.missing else "degraded" if self.degraded else "ready"

    def as_dict(self) -> dict:
        return {"status": self.status, "missing_shards": self.missing,
                "degraded_shards": self.degraded,
                "replicas_up": {str(s): f"{n}/{self.configured[s]}"
                                for s, n in sorted(self.up.items())}}


class ReplicaHealth:
    def __init__(self, replicas: dict[int, list[str]], client: httpx.AsyncClient,
                 replicas_up: Gauge, shards_missing: Gauge,
                 timeout_s: float = PROBE_TIMEOUT_S):
        self.replicas, self.client, self.timeout_s = replicas, client, timeout_s
        self.replicas_up, self.shards_missing = replicas_up, shards_missing

    async def _answers(self, url: str) -> bool:
        try:
            r = await self.client.get(f"{url}/healthz", timeout=self.timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def probe(self) -> Redundancy:
        pairs = [(s, u) for s, urls in self.replicas.items() for u in urls]
        ok = await asyncio.gather(*(self._answers(u) for _, u in pairs))
        up = {s: 0 for s in self.replicas}
        for (s, _), alive in zip(pairs, ok, strict=True):
            up[s] += alive
        result = Redundancy(up, {s: len(urls) for s, urls in self.replicas.items()})
        for s, n in up.items():
            self.replicas_up.labels(str(s)).set(n)
        self.shards_missing.set(len(result.missing))
        return result

    async def probe_forever(self, every_s: float) -> None:
        """Keeps the gauges current when nobody asks `/readyz` (cancelled at shutdown)."""
        while True:
            await self.probe()
            await asyncio.sleep(every_s)
