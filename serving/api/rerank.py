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
    def __init__(self, features: pd.DataFrame, cfg: RerankConfig | None = None):
        self.cfg = cfg or RerankConfig()
        f = features.set_index("item_id")
        median = float(np.median(f["debiased_ctr"])) if len(f) else 1.0
        self._engagement = np.log(f["debiased_ctr"].clip(lower=1e-6) / max(median, 1e-6))
        self._features = f

    @classmethod
    def from_parquet(cls, path: Path, cfg: RerankConfig | None = None) -> Reranker:
        return cls(pd.read_parquet(path), cfg)

    def rerank(self, hits: list[tuple[str, float]], k: int, region: str | None = None
               ) -> list[RankedItem]:
        """hits: (item_id, similarity) from the shards; unknown items are dropped."""
        out: list[RankedItem] = []
        for item_id, sim in hits:
            if item_id not in self._features.index:
                continue
            row = self._features.loc[item_id]
            if self.cfg.drop_unavailable and not bool(row["available"]):
                continue
            score = sim + self.cfg.w_engagement * float(self._engagement.loc[item_id])
            if region is not None and row["region"] == region:
                score += self.cfg.w_region
            out.append(RankedItem(item_id, float(score), float(sim), bool(row["available"]),
                                  str(row["region"]), float(row["price"])))
        out.sort(key=lambda r: -r.score)
        return out[:k]
