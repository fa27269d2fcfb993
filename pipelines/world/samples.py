"""A contact sheet to eyeball a world."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from pipelines.world.render import PHOTO_PX, SCENE_PX


def save_samples(root: Path, out_png: Path, n: int = 8) -> Path:
    """Contact sheet to eyeball a world: one style cluster's seller photos, user query
    photos, and room scenes with their ground-truth boxes drawn."""
    root = Path(root)
    cat = pd.read_parquet(root / "tables/catalog.parquet")
    clusters = pd.read_parquet(root / "truth/products.parquet").set_index("product_id")
    cat["cluster_id"] = cat["product_id"].map(clusters["cluster_id"])
    one_cluster = cat[cat["cluster_id"] == cat["cluster_id"].iloc[0]]["image_path"][:n]
    queries = sorted((root / "images/queries").glob("*.jpg"))[:n]
    objects = pd.read_parquet(root / "tables/scene_objects.parquet")
    scenes = sorted(objects["scene_id"].unique())[: n // 2]
    sheet = Image.new("RGB", (PHOTO_PX * n, PHOTO_PX * 2 + SCENE_PX), "white")
    for i, rel in enumerate(one_cluster):
        sheet.paste(Image.open(root / rel), (PHOTO_PX * i, 0))
    for i, path in enumerate(queries):
        sheet.paste(Image.open(path), (PHOTO_PX * i, PHOTO_PX))
    for i, sid in enumerate(scenes):
        img = Image.open(root / f"images/scenes/{sid}.jpg").convert("RGB")
        draw = ImageDraw.Draw(img)
        for o in objects[objects["scene_id"] == sid].itertuples():
            box = [o.x0 * SCENE_PX, o.y0 * SCENE_PX, o.x1 * SCENE_PX, o.y1 * SCENE_PX]
            draw.rectangle(box, outline=(255, 0, 0), width=2)
            draw.text((box[0] + 2, box[1] + 1), o.category, fill=(255, 0, 0))
        sheet.paste(img, (SCENE_PX * i, PHOTO_PX * 2))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
