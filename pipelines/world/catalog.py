"""The shop's catalog: products in style clusters, and the listings that sell them.

A style cluster fixes shape family, palette, pattern and material; its products jitter
proportions and shade, so "visually similar" means more than "same item".
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from pipelines.world.spec import HISTORY_DAYS, WORLD_END, WorldSize, entity_rng

CATEGORIES = ("lamp", "sofa", "chair", "rug", "vase", "table", "mug", "bag")
SHAPE_FAMILIES = ("a", "b", "c")
PALETTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "terracotta": ((196, 98, 64), (240, 214, 180)),
    "navy": ((30, 50, 110), (220, 200, 120)),
    "sage": ((120, 150, 110), (235, 235, 220)),
    "mustard": ((210, 160, 40), (70, 50, 40)),
    "blush": ((230, 160, 170), (120, 60, 80)),
    "charcoal": ((55, 55, 60), (200, 200, 205)),
    "teal": ((20, 130, 140), (250, 220, 190)),
    "ivory": ((238, 230, 210), (150, 120, 90)),
    "crimson": ((170, 25, 40), (30, 30, 30)),
    "lilac": ((160, 130, 200), (250, 250, 250)),
    "forest": ((30, 90, 50), (200, 160, 90)),
    "sky": ((120, 180, 230), (255, 255, 255)),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "gradient")
MATERIALS = ("matte", "glossy", "wood", "fabric", "metal")
REGIONS = ("EU", "US", "UK", "APAC")


def make_products(size: WorldSize, seed: int) -> pd.DataFrame:
    rows: list[dict] = []
    rng = entity_rng(seed, "clusters", 0)
    cluster_idx = 0
    for category in CATEGORIES:
        for _ in range(size.n_clusters_per_category):
            style = {
                "shape_family": SHAPE_FAMILIES[int(rng.integers(0, 3))],
                "palette": list(PALETTES)[int(rng.integers(0, len(PALETTES)))],
                "pattern": PATTERNS[int(rng.integers(0, len(PATTERNS)))],
                "material": MATERIALS[int(rng.integers(0, len(MATERIALS)))],
            }
            geo_center = rng.uniform(0.85, 1.15, 4)
            for _ in range(size.products_per_cluster):
                pid = len(rows)
                prng = entity_rng(seed, "product", pid)
                rows.append({
                    "product_id": f"p{pid:06d}",
                    "category": category,
                    "cluster_id": f"c{cluster_idx:05d}",
                    **style,
                    "geo": np.clip(geo_center + prng.normal(0, 0.04, 4), 0.75, 1.25).tolist(),
                    "hue_shift": float(prng.normal(0, 0.06)),
                    "popularity": float(prng.beta(2, 5)),
                })
            cluster_idx += 1
    return pd.DataFrame(rows)


def make_catalog(products: pd.DataFrame, size: WorldSize, seed: int) -> pd.DataFrame:
    rows: list[dict] = []
    lo, hi = size.listings_per_product
    n_sellers = max(10, len(products) // 20)
    for p in products.itertuples():
        rng = entity_rng(seed, "listings", int(p.product_id[1:]))
        base_price = float(rng.lognormal(3.5, 0.6))
        for _ in range(int(rng.integers(lo, hi + 1))):
            iid = len(rows)
            rows.append({
                "item_id": f"it{iid:07d}",
                "product_id": p.product_id,
                "category": p.category,
                "shape_family": p.shape_family,
                "palette": p.palette,
                "pattern": p.pattern,
                "material": p.material,
                "seller_id": f"s{int(rng.integers(0, n_sellers)):05d}",
                "price": round(base_price * float(rng.uniform(0.85, 1.2)), 2),
                "available": bool(rng.random() < 0.9),
                "region": REGIONS[int(rng.integers(0, len(REGIONS)))],
                "created_at": WORLD_END - timedelta(days=float(rng.uniform(HISTORY_DAYS, 400))),
                "image_path": f"images/catalog/it{iid:07d}.jpg",
            })
    return pd.DataFrame(rows)

