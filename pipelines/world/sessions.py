"""Engagement logs: each session is one user's query photo, the grid the logging ranker showed
and what the user clicked and saved there (`pipelines.world.behaviour`)."""

from __future__ import annotations

from datetime import timedelta

from pipelines.world.behaviour import TRUTH_COLUMNS, relevance, respond, wanted_product
from pipelines.world.catalog import CATEGORIES
from pipelines.world.render import render_photo
from pipelines.world.spec import HISTORY_DAYS, WORLD_END, entity_rng


def session_rows(args: tuple) -> tuple[list[dict], list[tuple[str, bytes]]]:
    """Impression rows (plus `_target_product`, the truth) and query photos of sessions
    [start, stop); one process-pool job."""
    (seed, start, stop, items, products, size, render) = args
    policy = size.logging
    rows: list[dict] = []
    images: list[tuple[str, bytes]] = []
    pop = products.set_index("product_id")["popularity"]
    popularity = products["popularity"].to_numpy()
    wanted_truth = products[list(TRUTH_COLUMNS)].to_numpy()
    pools = {}  # per category: the candidates' columns the session needs
    for c in CATEGORIES:
        pool = items[items["category"] == c]
        pools[c] = {"truth": pool[list(TRUTH_COLUMNS)].to_numpy(),
                    "cluster_id": pool["cluster_id"].to_numpy(),
                    "palette": pool["palette"].to_numpy(),
                    "item_id": pool["item_id"].to_numpy(),
                    "popularity": pop.loc[pool["product_id"]].to_numpy()}
    prod_records = products.to_dict("records")
    for s in range(start, stop):
        rng = entity_rng(seed, "session", s)
        t_idx = wanted_product(popularity, rng)
        target = prod_records[t_idx]
        pool = pools[target["category"]]
        rel = relevance(wanted_truth[t_idx], pool["truth"])
        grid = policy.fill_grid(rel, pool["cluster_id"] == target["cluster_id"],
                                pool["palette"] == target["palette"], pool["popularity"],
                                size.shuffle_share, rng, entity_rng(seed, "promoted", s))
        ts = WORLD_END - timedelta(days=float(rng.uniform(0, HISTORY_DAYS)))
        qid = f"q{s:07d}"
        qpath = f"images/queries/{qid}.jpg"
        box = (0.0, 0.0, 1.0, 1.0)
        if render:
            images.append((qpath, render_photo(target, rng, user=True)))
        user = f"u{int(rng.integers(0, size.n_users)):06d}"
        clicks, saves = respond(rel[grid.order], pool["popularity"][grid.order], rng,
                                appeal=grid.appeal)
        for k, (item_id, sc, c, sv) in enumerate(
            zip(pool["item_id"][grid.order], grid.scores, clicks, saves, strict=True), start=1
        ):
            rows.append({
                "impression_id": f"{qid}-{k:02d}", "session_id": f"ss{s:07d}", "user_id": user,
                "ts": ts, "query_id": qid, "query_image_path": qpath,
                "query_x0": box[0], "query_y0": box[1], "query_x1": box[2], "query_y1": box[3],
                "item_id": item_id, "position": k, "logging_policy": grid.policy,
                "ranker_score": float(round(sc, 5)), "clicked": bool(c), "saved": bool(sv),
                "_target_product": target["product_id"],
            })
    return rows, images
