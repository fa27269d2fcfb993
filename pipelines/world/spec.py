"""What a world is made of: its sizes, its clock, and the seeded stream of each entity.

Deterministic: every entity draws from its own RNG seeded by (seed, kind, index), so output
bytes depend only on (size, seed) and not on process count or ordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from pipelines.world.behaviour import LoggingPolicy

WORLD_END = datetime(2026, 10, 31, tzinfo=UTC)  # last logged session; rater set comes after
HISTORY_DAYS = 120


@dataclass(frozen=True)
class WorldSize:
    """How big a world to make; `render_images=False` makes metadata only (benchmarks)."""

    name: str
    n_clusters_per_category: int
    products_per_cluster: int
    listings_per_product: tuple[int, int]
    n_sessions: int
    n_users: int
    n_scenes: int
    n_rater_queries: int
    shuffle_share: float = 0.15
    rater_cluster_share: float = 0.12
    render_images: bool = True
    logging: LoggingPolicy = LoggingPolicy()


SIZES: dict[str, WorldSize] = {
    "tiny": WorldSize("tiny", 3, 3, (2, 4), 800, 60, 60, 24),
    "demo": WorldSize("demo", 40, 16, (3, 5), 20000, 800, 1500, 300),
    "large": WorldSize(
        "large", 1250, 10, (1, 2), 20000, 5000, 0, 0, render_images=False
    ),
}


def entity_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """The RNG of one entity (a product, a session, a photo...) of a world."""
    return np.random.default_rng([seed, sum(map(ord, kind)) * 7919 + len(kind), index])
