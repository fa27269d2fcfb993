"""Re-ranker: visual similarity first, then what makes a result buyable and wanted.

score = similarity + w_region * [item ships to the shopper's region]
                   + w_engagement * log(debiased_ctr / median debiased_ctr)
Sold-out items are dropped (a grid of things you cannot buy is a bad grid); the feature
table comes from `pipelines.features` so offline analysis and serving read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RerankConfig:
    w_region: float = 0.05
    w_engagement: float = 0.02
    drop_unavailable: bool = True


@dataclass
class RankedItem:
    item_id: str
    score: float
    similarity: float
    available: bool
    region: str
    price: float


class Reranker:
    """Feature lookups are plain dicts built once: per request the re-ranker touches ~100
    candidates, and pandas row access would cost milliseconds of the latency budget."""

    def __init__(self, features: pd.DataFrame, cfg: RerankConfig | None = None):
        self.cfg = cfg or RerankConfig()
        ctr = features["debiased_ctr"].to_numpy(dtype=np.float64)
        median = float(np.median(ctr)) if len(ctr) else 1.0
        engagement = np.log(np.clip(ctr, 1e-6, None) / max(median, 1e-6))
        self._features = {
            item_id: (bool(available), str(region), float(price), float(eng))
            for item_id, available, region, price, eng in zip(
                features["item_id"], features["available"], features["region"],
                features["price"], engagement, strict=True)}

    @classmethod
    def from_parquet(cls, path: Path, cfg: RerankConfig | None = None) -> Reranker:
        return cls(pd.read_parquet(path), cfg)

    def rerank(self, hits: list[tuple[str, float]], k: int, region: str | None = None
               ) -> list[RankedItem]:
        """hits: (item_id, similarity) from the shards; unknown items are dropped."""
        out: list[RankedItem] = []
        for item_id, sim in hits:
            row = self._features.get(item_id)
            if row is None:
                continue
            available, item_region, price, engagement = row
            if self.cfg.drop_unavailable and not available:
                continue
            score = sim + self.cfg.w_engagement * engagement
            if region is not None and item_region == region:
                score += self.cfg.w_region
            out.append(RankedItem(item_id, float(score), float(sim), available, item_region,
                                  price))
        out.sort(key=lambda r: -r.score)
        return out[:k]
