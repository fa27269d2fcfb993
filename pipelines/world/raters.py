"""The rater set: user photos of products from held-out style clusters, with graded judgments."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from data_contracts import schemas
from pipelines.world.catalog import CATEGORIES
from pipelines.world.render import render_photo
from pipelines.world.spec import WORLD_END, WorldSize, entity_rng


def make_rater_set(items: pd.DataFrame, products: pd.DataFrame, size: WorldSize, seed: int):
    """Rater queries on a held-out share of style clusters, judged by docs/rater_guidelines.md.

    Grades: 2 = the same product; 1 = same category and the same style (shape family, palette,
    pattern, material: what our raters call "would happily buy instead"); unjudged = 0.
    """
    rng = entity_rng(seed, "rater", 0)
    clusters = np.array(sorted(products["cluster_id"].unique()))
    n_held = max(len(CATEGORIES), int(round(len(clusters) * size.rater_cluster_share)))
    # stratified: equal share of held-out clusters in every category
    held = []
    for cat in CATEGORIES:
        cat_clusters = np.sort(products.loc[products.category == cat, "cluster_id"].unique())
        k = max(1, n_held // len(CATEGORIES))
        held.extend(rng.choice(cat_clusters, min(k, len(cat_clusters)), replace=False).tolist())
    held_products = products[products["cluster_id"].isin(held)].reset_index(drop=True)
    q_rows, j_rows, t_rows, images = [], [], [], []
    for q in range(size.n_rater_queries):
        qrng = entity_rng(seed, "rater_query", q)
        target = held_products.iloc[int(qrng.integers(0, len(held_products)))]
        rid = f"rq{q:05d}"
        path = f"images/rater/{rid}.jpg"
        if size.render_images:
            images.append((path, render_photo(target.to_dict(), qrng, user=True)))
        q_rows.append({"rater_query_id": rid, "image_path": path, "query_x0": 0.0,
                       "query_y0": 0.0, "query_x1": 1.0, "query_y1": 1.0,
                       "category": target["category"],
                       "created_at": WORLD_END + timedelta(days=float(qrng.uniform(1, 14)))})
        t_rows.append({"rater_query_id": rid, "target_product_id": target["product_id"],
                       "cluster_id": target["cluster_id"]})
        similar = items[items["cluster_id"] == target["cluster_id"]]
        for it in similar.itertuples():
            j_rows.append({"rater_query_id": rid, "item_id": it.item_id,
                           "grade": 2 if it.product_id == target["product_id"] else 1,
                           "rater_id": f"r{int(qrng.integers(0, 12)):02d}"})
    return (pd.DataFrame(q_rows, columns=schemas.RATER_QUERIES.names),
            pd.DataFrame(j_rows, columns=schemas.RATER_JUDGMENTS.names),
            pd.DataFrame(t_rows), images)
