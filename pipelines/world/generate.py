"""Generate a world: every entity, rendered in a process pool, written as tables and truth.

Everything the pipelines may read lands in `tables/` and `images/`; what only tests and
reports may read (examination propensity, style clusters, query targets) lands in `truth/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import schemas
from data_contracts.constants import GRID_SIZE
from data_contracts.durable import atomic_dir
from pipelines.world.behaviour import examination_propensity
from pipelines.world.boards import make_boards
from pipelines.world.catalog import CATEGORIES, make_catalog, make_products
from pipelines.world.raters import make_rater_set
from pipelines.world.render import render_photo
from pipelines.world.scenes import scene_images, scenes_table
from pipelines.world.sessions import session_rows
from pipelines.world.spec import SIZES, WORLD_END, WorldSize, entity_rng

log = logging.getLogger(__name__)


def generate_world(size_name: str, seed: int, out: Path, workers: int | None = None) -> dict:
    """Generate a world into `out` (replaced atomically) and return its summary."""
    if size_name not in SIZES:
        raise ValueError(f"unknown world size {size_name!r}; choose from {sorted(SIZES)}")
    t0 = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        workers = workers or min(4, os.cpu_count() or 1)
        summary = _generate_into(tmp, SIZES[size_name], seed, workers)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def generate_first_catalog(size_name: str, seed: int, out: Path, n_items: int,
                           workers: int | None = None) -> dict:
    """A first shop of the world, in seconds: `n_items` of its listings (every k-th, the same
    rows and photos the whole world will have) with their photos, and empty log tables; no
    scenes, sessions or rater set. `loupe demo` serves it while the whole world is made,
    which then replaces it in place (world.json says `first_catalog`)."""
    if size_name not in SIZES:
        raise ValueError(f"unknown world size {size_name!r}; choose from {sorted(SIZES)}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    size = SIZES[size_name]
    t0 = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        (tmp / "tables").mkdir()
        products = make_products(size, seed)
        catalog = make_catalog(products, size, seed).sort_values("item_id")
        step = max(1, math.ceil(len(catalog) / n_items))
        first = catalog.iloc[::step].reset_index(drop=True)
        items = first.merge(products[["product_id", "cluster_id", "geo", "hue_shift"]],
                            on="product_id")
        records = items.to_dict("records")
        workers = workers or min(4, os.cpu_count() or 1)
        with ProcessPoolExecutor(workers) as pool:
            jobs = [(seed, records[a:b]) for a, b in _chunks(len(records), workers * 4)]
            for imgs in pool.map(_catalog_images, jobs):
                _write_images(tmp, imgs)
        _write_table(first, schemas.CATALOG, tmp / "tables/catalog.parquet")
        for name in ("impressions", "boards", "scenes", "scene_objects", "rater_queries",
                     "rater_judgments"):  # written empty, as an imported catalog's are
            schema = schemas.TABLES[name]
            _write_table(pd.DataFrame(columns=schema.names), schema,
                         tmp / f"tables/{name}.parquet")
        summary = {"size": size.name, "seed": seed, "first_catalog": len(first),
                   "of_items": len(catalog),
                   "counts": {"catalog_items": len(first), "of_items": len(catalog)}}
        (tmp / "world.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _write_table(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path)


def _write_images(root: Path, images: list[tuple[str, bytes]]) -> None:
    for rel, data in images:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _catalog_images(args: tuple) -> list[tuple[str, bytes]]:
    seed, records = args
    return [(r["image_path"], render_photo(r, entity_rng(seed, "photo", int(r["item_id"][2:]))))
            for r in records]


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    step = max(1, math.ceil(n / k))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _generate_into(tmp: Path, size: WorldSize, seed: int, workers: int) -> dict:
    (tmp / "tables").mkdir()
    (tmp / "truth").mkdir()

    products = make_products(size, seed)
    catalog = make_catalog(products, size, seed)
    items = catalog.merge(products[["product_id", "cluster_id", "geo", "hue_shift"]],
                          on="product_id")
    records = items.to_dict("records")

    with ProcessPoolExecutor(workers) as pool:
        if size.render_images:
            jobs = [(seed, records[a:b]) for a, b in _chunks(len(records), workers * 4)]
            done = 0
            for imgs in pool.map(_catalog_images, jobs):
                _write_images(tmp, imgs)
                done += len(imgs)
                log.info("world: %s of %s listing photos rendered", f"{done:,}",
                         f"{len(records):,}")

        chunks = _chunks(size.n_sessions, workers * 4)
        sess_jobs = [(seed, a, b, items, products, size, size.render_images)
                     for a, b in chunks]
        impressions: list[dict] = []
        for (_, end), (rows, imgs) in zip(chunks, pool.map(session_rows, sess_jobs),
                                          strict=True):
            impressions.extend(rows)
            _write_images(tmp, imgs)
            log.info("world: %s of %s shopping sessions simulated", f"{end:,}",
                     f"{size.n_sessions:,}")

        by_cat = {c: [r for r in records if r["category"] == c] for c in CATEGORIES}
        scene_objects: list[dict] = []
        scene_jobs = [(seed, a, b, "scenes", by_cat)
                      for a, b in _chunks(size.n_scenes, workers * 4)]
        if size.n_scenes and size.render_images:
            for (_, _, end, _, _), (imgs, objs) in zip(scene_jobs, pool.map(scene_images,
                                                                          scene_jobs),
                                                     strict=True):
                _write_images(tmp, imgs)
                scene_objects.extend(objs)
                log.info("world: %s of %s room scenes rendered", f"{end:,}",
                         f"{size.n_scenes:,}")

    impressions_df = pd.DataFrame(impressions)
    truth_queries = (impressions_df[["query_id", "_target_product"]].drop_duplicates("query_id")
                     .rename(columns={"_target_product": "target_product_id"}))
    impressions_df = impressions_df.drop(columns="_target_product")

    scenes_df = scenes_table(scene_objects)

    rater_q, rater_j, rater_truth, rater_imgs = make_rater_set(items, products, size, seed)
    _write_images(tmp, rater_imgs)

    _write_table(catalog, schemas.CATALOG, tmp / "tables/catalog.parquet")
    _write_table(impressions_df, schemas.IMPRESSIONS, tmp / "tables/impressions.parquet")
    _write_table(make_boards(items, size, seed), schemas.BOARDS, tmp / "tables/boards.parquet")
    _write_table(scenes_df, schemas.SCENES, tmp / "tables/scenes.parquet")
    _write_table(pd.DataFrame(scene_objects, columns=schemas.SCENE_OBJECTS.names),
                 schemas.SCENE_OBJECTS, tmp / "tables/scene_objects.parquet")
    _write_table(rater_q, schemas.RATER_QUERIES, tmp / "tables/rater_queries.parquet")
    _write_table(rater_j, schemas.RATER_JUDGMENTS, tmp / "tables/rater_judgments.parquet")

    products.drop(columns=["geo"]).to_parquet(tmp / "truth/products.parquet", index=False)
    truth_queries.to_parquet(tmp / "truth/queries.parquet", index=False)
    rater_truth.to_parquet(tmp / "truth/rater_queries.parquet", index=False)
    positions = np.arange(1, GRID_SIZE + 1)
    (tmp / "truth/propensity.json").write_text(json.dumps(
        {"position": positions.tolist(),
         "examination": examination_propensity(positions).round(6).tolist()}, indent=1))

    summary = {
        "size": size.name, "seed": seed, "params": asdict(size),
        "counts": {"products": len(products), "clusters": int(products["cluster_id"].nunique()),
                   "catalog_items": len(catalog), "impressions": len(impressions_df),
                   "sessions": size.n_sessions, "scenes": len(scenes_df),
                   "rater_queries": len(rater_q), "rater_judgments": len(rater_j)},
        "world_end": WORLD_END.isoformat(),
    }
    (tmp / "world.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary

