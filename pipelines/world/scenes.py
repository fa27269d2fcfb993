"""Room scenes with 2-5 products and tight ground-truth boxes, for the detector."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.world.catalog import CATEGORIES
from pipelines.world.render import SCENE_PX, render_scene
from pipelines.world.spec import entity_rng


def scene_images(args: tuple) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """Photos and object rows of scenes [start, stop); one process-pool job."""
    seed, start, stop, prefix, items = args
    images, objects = [], []
    for s in range(start, stop):
        rng = entity_rng(seed, prefix, s)
        n = int(rng.integers(2, 6))
        cats = rng.choice(len(CATEGORIES), n, replace=False)
        chosen = []
        for c in cats:
            pool = items[CATEGORIES[int(c)]]
            chosen.append(pool[int(rng.integers(0, len(pool)))])
        data, boxes = render_scene(chosen, rng)
        sid = f"{prefix}{s:06d}"
        images.append((f"images/{prefix}/{sid}.jpg", data))
        for j, (r, b) in enumerate(zip(chosen, boxes, strict=True)):
            objects.append({"scene_id": sid, "object_idx": j, "item_id": r["item_id"],
                            "category": r["category"], "x0": b[0], "y0": b[1], "x1": b[2],
                            "y1": b[3]})
    return images, objects


def scenes_table(scene_objects: list[dict]) -> pd.DataFrame:
    """One row per rendered scene; the first 80 % train, the next 10 % val, the rest test."""
    scenes = pd.DataFrame({"scene_id": pd.Series(sorted({o["scene_id"] for o in scene_objects}),
                                                 dtype=str)})
    scenes["image_path"] = "images/scenes/" + scenes["scene_id"] + ".jpg"
    scenes["width"] = SCENE_PX
    scenes["height"] = SCENE_PX
    n = len(scenes)
    scenes["split"] = np.where(np.arange(n) < 0.8 * n, "train",
                               np.where(np.arange(n) < 0.9 * n, "val", "test"))
    return scenes
