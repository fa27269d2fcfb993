"""Boards: users save style-themed sets of items (the co-saves the harvester pairs)."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from pipelines.world.spec import HISTORY_DAYS, WORLD_END, WorldSize, entity_rng


def make_boards(items: pd.DataFrame, size: WorldSize, seed: int) -> pd.DataFrame:
    rows = []
    clusters = items["cluster_id"].unique()
    by_cluster = {c: g["item_id"].to_numpy() for c, g in items.groupby("cluster_id")}
    by_cat = {c: g["item_id"].to_numpy() for c, g in items.groupby("category")}
    cat_of = items.groupby("cluster_id")["category"].first()
    for u in range(size.n_users):
        rng = entity_rng(seed, "boards", u)
        for b in range(int(rng.integers(1, 4))):
            theme = clusters[int(rng.integers(0, len(clusters)))]
            for _ in range(int(rng.integers(3, 9))):
                pool = by_cluster[theme] if rng.random() < 0.8 else by_cat[cat_of[theme]]
                rows.append({
                    "board_id": f"b{u:06d}_{b}", "user_id": f"u{u:06d}",
                    "item_id": str(pool[int(rng.integers(0, len(pool)))]),
                    "saved_at": WORLD_END - timedelta(days=float(rng.uniform(0, HISTORY_DAYS))),
                })
    return pd.DataFrame(rows).drop_duplicates(["board_id", "item_id"]).reset_index(drop=True)
