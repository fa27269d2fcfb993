"""Demo product world with known ground truth.

Loupe cannot download data, so it generates a shop: products drawn procedurally in style
clusters, seller photos under varied conditions, room scenes with boxes, engagement logs from a
position-biased logging policy, board co-saves and a rater set. Everything the pipelines may
read lands in `tables/` and `images/`; what only tests and reports may read (examination
propensity, style clusters, query targets) lands in `truth/`.

Deterministic: every entity draws from its own RNG seeded by (seed, kind, index), so output
bytes depend only on (size, seed) and not on process count or ordering.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from data_contracts import schemas
from pipelines.storage import atomic_dir

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
LIGHTING = ("daylight", "dusk", "studio")
WORLD_END = datetime(2026, 10, 31, tzinfo=UTC)  # last logged session; rater set comes after
HISTORY_DAYS = 120
GRID_SIZE = 20
SHUFFLE_POLICY = "shuffle_top20"
PHOTO_PX = 128
SCENE_PX = 256


@dataclass(frozen=True)
class LoggingPolicy:
    """How the legacy ranker that logged the sessions filled the grid.

    It ranks by noisy true relevance, except that a "shop the colour" merchandising rule pins
    `promoted_slots` bestsellers of the query's category and palette (picked by
    popularity ** power, never from the query's own style cluster) to the top of the grid,
    with a badge that makes them clicked readily. They collect clicks for sitting on top, so a
    learner that ignores position learns "same colour = same style": the feedback loop that
    position-bias correction exists for. Randomised sessions shuffle the whole grid, pins
    included, so the examination estimate stays valid.
    """

    relevance_noise: float = 0.25
    promoted_slots: int = 3
    promoted_popularity_power: float = 4.0
    promoted_same_palette: bool = True  # "shop the colour": pins share the query's palette
    promoted_appeal: float = 0.3  # a pin's badge: clicked at least this readily once examined


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


def world_id(world: Path) -> str:
    """Identity of a world: caches of anything computed from its images are scoped by it,
    since paths repeat across worlds. A generated world is its world.json (size, seed,
    params, counts); a world assembled from real tables is its table files' names, sizes and
    modification times."""
    import hashlib

    world = Path(world)
    meta = world / "world.json"
    digest = hashlib.sha256()
    if meta.is_file():
        digest.update(meta.read_bytes())
    else:
        tables = sorted((world / "tables").glob("*.parquet"))
        if not tables:
            raise FileNotFoundError(f"{world} is not a Loupe world: it has neither world.json "
                                    "nor tables/*.parquet")
        for table in tables:
            st = table.stat()
            digest.update(f"{table.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def examination_propensity(position: np.ndarray | int) -> np.ndarray:
    """True probability that a user examines grid position k (1-based): k^-0.7."""
    return np.power(np.asarray(position, dtype=np.float64), -0.7)


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, kind)) * 7919 + len(kind), index])


# --------------------------------------------------------------------------- rendering
def _pattern_fill(size: int, palette: str, pattern: str, hue_shift: float) -> Image.Image:
    base, accent = (np.array(c, dtype=np.float64) for c in PALETTES[palette])
    base = np.clip(base * (1.0 + hue_shift), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if pattern == "solid":
        mask = np.zeros_like(xx)
    elif pattern == "stripes":
        mask = (np.floor(xx * 8) % 2 == 0).astype(float)
    elif pattern == "dots":
        mask = (((xx * 8) % 1 - 0.5) ** 2 + ((yy * 8) % 1 - 0.5) ** 2 < 0.06).astype(float)
    elif pattern == "checks":
        mask = ((np.floor(xx * 6) + np.floor(yy * 6)) % 2 == 0).astype(float)
    else:  # gradient
        mask = yy
    img = base[None, None, :] * (1 - mask[..., None]) + accent[None, None, :] * mask[..., None]
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _apply_material(img: Image.Image, material: str, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if material == "glossy":
        arr += 90 * np.exp(-(((xx - 0.35) ** 2 + (yy - 0.3) ** 2) / 0.01))[..., None]
    elif material == "wood":
        arr *= (0.85 + 0.15 * np.sin(yy * 60 + 3 * np.sin(xx * 9)))[..., None]
    elif material == "fabric":
        arr *= (0.9 + 0.1 * rng.random((h, w)))[..., None]
    elif material == "metal":
        arr *= (0.6 + 0.6 * xx)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shape_mask(category: str, family: str, geo: np.ndarray, size: int) -> Image.Image:
    """Silhouette of one object; `geo` (4 numbers in ~[0.8, 1.2]) jitters proportions."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s = size
    g0, g1, g2, g3 = (float(v) for v in geo)
    fi = SHAPE_FAMILIES.index(family)
    if category == "lamp":
        top = 0.15 * s
        shade_w = (0.25 + 0.08 * fi) * s * g0
        shade_h = 0.3 * s * g1
        if fi == 0:
            d.polygon([(s / 2 - shade_w / 2, top), (s / 2 + shade_w / 2, top),
                       (s / 2 + shade_w, top + shade_h), (s / 2 - shade_w, top + shade_h)], 255)
        elif fi == 1:
            d.ellipse([s / 2 - shade_w, top, s / 2 + shade_w, top + shade_h * 1.2], 255)
        else:
            d.rectangle([s / 2 - shade_w * 0.8, top, s / 2 + shade_w * 0.8, top + shade_h], 255)
        d.rectangle([s / 2 - 0.02 * s, top + shade_h, s / 2 + 0.02 * s, 0.82 * s], 255)
        d.ellipse([s / 2 - 0.16 * s * g2, 0.78 * s, s / 2 + 0.16 * s * g2, 0.88 * s], 255)
    elif category == "sofa":
        w = 0.8 * s * g0 / 1.1
        x0 = s / 2 - w / 2
        back = (0.25 + 0.1 * fi) * s * g1
        d.rounded_rectangle([x0, 0.55 * s - back, x0 + w, 0.6 * s], radius=int(0.05 * s * (fi + 1)),
                            fill=255)
        d.rectangle([x0, 0.55 * s, x0 + w, 0.75 * s], 255)
        arm = 0.09 * s * g2
        d.rounded_rectangle([x0 - arm / 2, 0.45 * s, x0 + arm, 0.78 * s], radius=int(arm / 3),
                            fill=255)
        d.rounded_rectangle([x0 + w - arm, 0.45 * s, x0 + w + arm / 2, 0.78 * s],
                            radius=int(arm / 3), fill=255)
        d.rectangle([x0 + 0.05 * s, 0.75 * s, x0 + 0.1 * s, 0.82 * s], 255)
        d.rectangle([x0 + w - 0.1 * s, 0.75 * s, x0 + w - 0.05 * s, 0.82 * s], 255)
    elif category == "chair":
        w = 0.38 * s * g0
        x0 = s / 2 - w / 2
        seat_y = 0.55 * s
        if fi == 0:
            d.rectangle([x0, 0.15 * s * g1, x0 + 0.06 * s, seat_y], 255)
            d.rectangle([x0, 0.15 * s * g1, x0 + w, 0.25 * s * g1], 255)
        elif fi == 1:
            d.rounded_rectangle([x0, 0.12 * s * g1, x0 + w, seat_y], radius=int(0.12 * s),
                                fill=255)
        else:
            for k in range(4):
                xx = x0 + k * w / 3.3
                d.rectangle([xx, 0.18 * s * g1, xx + 0.04 * s, seat_y], 255)
            d.rectangle([x0, 0.15 * s * g1, x0 + w, 0.2 * s * g1], 255)
        d.rectangle([x0, seat_y, x0 + w, seat_y + 0.07 * s], 255)
        leg = 0.04 * s * g2
        d.rectangle([x0, seat_y, x0 + leg, 0.88 * s], 255)
        d.rectangle([x0 + w - leg, seat_y, x0 + w, 0.88 * s], 255)
    elif category == "rug":
        w, h = 0.8 * s * g0 / 1.1, (0.45 + 0.1 * fi) * s * g1
        box = [s / 2 - w / 2, s / 2 - h / 2, s / 2 + w / 2, s / 2 + h / 2]
        if fi == 1:
            d.ellipse(box, 255)
        elif fi == 2:
            d.rounded_rectangle(box, radius=int(0.08 * s), fill=255)
        else:
            d.rectangle(box, 255)
    elif category == "vase":
        bw = (0.2 + 0.06 * fi) * s * g0
        if fi == 0:
            d.ellipse([s / 2 - bw, 0.35 * s, s / 2 + bw, 0.85 * s], 255)
        elif fi == 1:
            d.polygon([(s / 2 - bw * 0.6, 0.3 * s), (s / 2 + bw * 0.6, 0.3 * s),
                       (s / 2 + bw, 0.85 * s), (s / 2 - bw, 0.85 * s)], 255)
        else:
            d.rectangle([s / 2 - bw * 0.7, 0.3 * s, s / 2 + bw * 0.7, 0.85 * s], 255)
        nw = 0.07 * s * g1
        d.rectangle([s / 2 - nw, 0.15 * s * g2, s / 2 + nw, 0.4 * s], 255)
    elif category == "table":
        w = 0.75 * s * g0 / 1.1
        x0 = s / 2 - w / 2
        top_y = (0.35 + 0.05 * fi) * s
        if fi == 1:
            d.ellipse([x0, top_y - 0.05 * s, x0 + w, top_y + 0.08 * s], 255)
            d.rectangle([s / 2 - 0.03 * s, top_y, s / 2 + 0.03 * s, 0.82 * s], 255)
            d.rectangle([s / 2 - 0.15 * s, 0.8 * s, s / 2 + 0.15 * s, 0.84 * s], 255)
        else:
            d.rectangle([x0, top_y, x0 + w, top_y + 0.06 * s * g1], 255)
            leg = 0.04 * s * g2 * (1.8 if fi == 2 else 1.0)
            d.rectangle([x0 + 0.03 * s, top_y, x0 + 0.03 * s + leg, 0.85 * s], 255)
            d.rectangle([x0 + w - 0.03 * s - leg, top_y, x0 + w - 0.03 * s, 0.85 * s], 255)
    elif category == "mug":
        w = (0.3 + 0.06 * fi) * s * g0
        x0 = s / 2 - w / 2 - 0.06 * s
        if fi == 2:
            d.polygon([(x0, 0.3 * s), (x0 + w, 0.3 * s), (x0 + w * 0.85, 0.78 * s),
                       (x0 + w * 0.15, 0.78 * s)], 255)
        else:
            d.rounded_rectangle([x0, 0.3 * s * g1, x0 + w, 0.78 * s],
                                radius=int(0.03 * s * (fi + 1)), fill=255)
        hw = 0.12 * s * g2
        d.ellipse([x0 + w - hw / 3, 0.4 * s, x0 + w + hw, 0.62 * s], outline=255,
                  width=max(2, int(0.04 * s)))
    elif category == "bag":
        w = (0.45 + 0.05 * fi) * s * g0
        x0 = s / 2 - w / 2
        if fi == 0:
            d.polygon([(x0 + 0.06 * s, 0.4 * s), (x0 + w - 0.06 * s, 0.4 * s),
                       (x0 + w, 0.82 * s), (x0, 0.82 * s)], 255)
        elif fi == 1:
            d.rounded_rectangle([x0, 0.4 * s, x0 + w, 0.82 * s], radius=int(0.08 * s), fill=255)
        else:
            d.chord([x0, 0.3 * s, x0 + w, 1.1 * s], 180, 360, fill=255)
        d.arc([s / 2 - 0.13 * s * g1, 0.2 * s * g2, s / 2 + 0.13 * s * g1, 0.55 * s], 180, 360,
              fill=255, width=max(2, int(0.035 * s)))
    else:
        raise ValueError(f"unknown category {category!r}")
    return m


def render_object(product: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """RGBA cut-out of one product, alpha = silhouette; identical for every photo of it."""
    mask = _shape_mask(product["category"], product["shape_family"],
                       np.asarray(product["geo"]), size)
    fill = _pattern_fill(size, product["palette"], product["pattern"], product["hue_shift"])
    fill = _apply_material(fill, product["material"], rng)
    out = fill.convert("RGBA")
    out.putalpha(mask)
    return out


def _background(size: int, rng: np.random.Generator, studio: bool) -> Image.Image:
    if studio:
        v = int(rng.integers(225, 256))
        return Image.new("RGB", (size, size), (v, v, v))
    c0 = rng.integers(60, 230, 3).astype(np.float64)
    c1 = rng.integers(60, 230, 3).astype(np.float64)
    t = np.linspace(0, 1, size)[:, None, None]
    arr = c0 * (1 - t) + c1 * t
    arr = np.broadcast_to(arr, (size, size, 3)).copy()
    if rng.random() < 0.5:  # textured wall
        arr *= 0.9 + 0.1 * rng.random((size, size, 1))
    floor = int(size * rng.uniform(0.65, 0.85))
    arr[floor:] *= 0.7
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _light(img: Image.Image, lighting: str, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if lighting == "dusk":
        arr = arr * np.array([1.0, 0.78, 0.58]) * rng.uniform(0.55, 0.75)
    elif lighting == "daylight":
        arr = arr * np.array([0.95, 1.0, 1.08]) * rng.uniform(0.95, 1.15)
    else:
        arr = arr * rng.uniform(0.9, 1.05)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def render_photo(product: dict, rng: np.random.Generator, user: bool = False) -> bytes:
    """One photo of a product: viewpoint, scale, lighting, background, occlusion, JPEG.

    Seller photos lean to studio shots; `user=True` photos (queries) are casual shots.
    """
    size = PHOTO_PX
    obj = render_object(product, size * 2, rng)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    obj = obj.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
    scale = rng.uniform(0.65, 1.0) if not user else rng.uniform(0.55, 0.95)
    side = int(size * scale)
    obj = obj.resize((side, side), Image.Resampling.BILINEAR)
    canvas = _background(size, rng, studio=(not user and rng.random() < 0.5))
    ox = int(rng.integers(-(size - side) // 2 - 8, (size - side) // 2 + 9)) + (size - side) // 2
    oy = int(rng.integers(-(size - side) // 2 - 8, (size - side) // 2 + 9)) + (size - side) // 2
    canvas.paste(obj, (ox, oy), obj)
    if rng.random() < (0.35 if user else 0.15):
        w, h = (int(v) for v in rng.integers(size // 6, size // 3, 2))
        x, y = (int(v) for v in rng.integers(0, size - w, 2))
        ImageDraw.Draw(canvas).rectangle([x, y, x + w, y + h], fill=tuple(
            int(v) for v in rng.integers(0, 255, 3)))
    lighting = LIGHTING[int(rng.integers(0, 3))] if user else ("studio", "daylight", "dusk")[
        int(rng.choice(3, p=[0.5, 0.35, 0.15]))]
    canvas = _light(canvas, lighting, rng)
    if user and rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.2))))
    return _jpeg(canvas, int(rng.integers(50, 95) if user else rng.integers(70, 96)))


def render_scene(products: list[dict], rng: np.random.Generator
                 ) -> tuple[bytes, list[tuple[float, float, float, float]]]:
    """Room scene with the given products placed left to right; returns tight boxes in [0,1]."""
    size = SCENE_PX
    canvas = _background(size, rng, studio=False)
    boxes: list[tuple[float, float, float, float]] = []
    n = len(products)
    slot = size / n
    for i, product in enumerate(products):
        side = int(min(slot * rng.uniform(1.0, 1.5), size * rng.uniform(0.3, 0.55)))
        side = max(side, 40)
        obj = render_object(product, side, rng)
        if rng.random() < 0.5:
            obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cx = slot * (i + 0.5) + rng.uniform(-0.15, 0.15) * slot
        cy = size * rng.uniform(0.45, 0.62)
        x, y = int(cx - side / 2), int(cy - side / 2)
        canvas.paste(obj, (x, y), obj)
        bx0, by0, bx1, by1 = obj.getchannel("A").getbbox() or (0, 0, side, side)
        boxes.append(
            tuple(float(np.clip(v / size, 0, 1)) for v in (x + bx0, y + by0, x + bx1, y + by1))
        )
    canvas = _light(canvas, LIGHTING[int(rng.integers(0, 3))], rng)
    return _jpeg(canvas, int(rng.integers(70, 95))), boxes


# --------------------------------------------------------------------------- catalog
def _make_products(size: WorldSize, seed: int) -> pd.DataFrame:
    rows = []
    rng = _rng(seed, "clusters", 0)
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
                prng = _rng(seed, "product", pid)
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


def _make_catalog(products: pd.DataFrame, size: WorldSize, seed: int) -> pd.DataFrame:
    rows = []
    lo, hi = size.listings_per_product
    n_sellers = max(10, len(products) // 20)
    for p in products.itertuples():
        rng = _rng(seed, "listings", int(p.product_id[1:]))
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


# --------------------------------------------------------------------------- behaviour
def _relevance(target: pd.Series, items: pd.DataFrame) -> np.ndarray:
    """True graded relevance of catalog items to a user's intended product."""
    same_product = (items["product_id"] == target["product_id"]).to_numpy()
    same_cluster = (items["cluster_id"] == target["cluster_id"]).to_numpy()
    shared = sum((items[a] == target[a]).to_numpy().astype(int)
                 for a in ("shape_family", "palette", "pattern", "material"))
    rel = np.where(same_product, 0.95, np.where(same_cluster, 0.6,
                   np.where(shared >= 2, 0.2, 0.06)))
    return rel


def _session_rows(args: tuple) -> tuple[list[dict], list[tuple[str, bytes]]]:
    (seed, start, stop, items, products, size, render) = args
    policy = size.logging
    rows: list[dict] = []
    images: list[tuple[str, bytes]] = []
    by_cat = {c: items[items["category"] == c] for c in CATEGORIES}
    pop = products.set_index("product_id")["popularity"]
    prod_weights = (pop / pop.sum()).to_numpy()
    prod_records = products.to_dict("records")
    for s in range(start, stop):
        rng = _rng(seed, "session", s)
        t_idx = int(rng.choice(len(products), p=prod_weights))
        target = products.iloc[t_idx]
        pool = by_cat[target["category"]]
        rel = _relevance(target, pool)
        score = rel + rng.normal(0, policy.relevance_noise, len(pool))  # noisy relevance
        top = np.argsort(-score)[:GRID_SIZE]
        if policy.promoted_slots:
            prng = _rng(seed, "promoted", s)  # own stream: the rest of the session is unchanged
            outside = pool["cluster_id"].to_numpy() != target["cluster_id"]
            matched = outside & (pool["palette"].to_numpy() == target["palette"])
            if policy.promoted_same_palette and matched.sum() >= policy.promoted_slots:
                outside = matched
            outside = np.flatnonzero(outside)
            w = pop.loc[pool["product_id"].to_numpy()[outside]].to_numpy()
            w = w ** policy.promoted_popularity_power
            promoted = prng.choice(outside, policy.promoted_slots, replace=False, p=w / w.sum())
            top = np.concatenate([promoted, top[~np.isin(top, promoted)]])[:GRID_SIZE]
        shuffled = rng.random() < size.shuffle_share
        order = rng.permutation(top) if shuffled else top
        ts = WORLD_END - timedelta(days=float(rng.uniform(0, HISTORY_DAYS)))
        qid = f"q{s:07d}"
        qpath = f"images/queries/{qid}.jpg"
        box = (0.0, 0.0, 1.0, 1.0)
        if render:
            images.append((qpath, render_photo(prod_records[t_idx], rng, user=True)))
        user = f"u{int(rng.integers(0, size.n_users)):06d}"
        shown = pool.iloc[order]
        appeal = rel[order]
        if policy.promoted_slots:  # pins wear a bestseller badge, wherever they land
            appeal = np.where(np.isin(order, promoted), np.maximum(appeal, policy.promoted_appeal),
                              appeal)
        attract = appeal * (0.6 + 0.8 * pop.loc[shown["product_id"]].to_numpy())
        exam = examination_propensity(np.arange(1, len(order) + 1))
        clicks = rng.random(len(order)) < exam * np.clip(attract, 0, 1)
        saves = clicks & (rng.random(len(order)) < 0.2 + 0.5 * (rel[order] >= 0.6))
        for k, (item_id, sc, c, sv) in enumerate(
            zip(shown["item_id"], score[order], clicks, saves, strict=True), start=1
        ):
            rows.append({
                "impression_id": f"{qid}-{k:02d}", "session_id": f"ss{s:07d}", "user_id": user,
                "ts": ts, "query_id": qid, "query_image_path": qpath,
                "query_x0": box[0], "query_y0": box[1], "query_x1": box[2], "query_y1": box[3],
                "item_id": item_id, "position": k,
                "logging_policy": SHUFFLE_POLICY if shuffled else "ranker",
                "ranker_score": float(round(sc, 5)), "clicked": bool(c), "saved": bool(sv),
                "_target_product": target["product_id"],
            })
    return rows, images


def _make_boards(items: pd.DataFrame, size: WorldSize, seed: int) -> pd.DataFrame:
    rows = []
    clusters = items["cluster_id"].unique()
    by_cluster = {c: g["item_id"].to_numpy() for c, g in items.groupby("cluster_id")}
    by_cat = {c: g["item_id"].to_numpy() for c, g in items.groupby("category")}
    cat_of = items.groupby("cluster_id")["category"].first()
    for u in range(size.n_users):
        rng = _rng(seed, "boards", u)
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


# --------------------------------------------------------------------------- writing
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
    return [(r["image_path"], render_photo(r, _rng(seed, "photo", int(r["item_id"][2:]))))
            for r in records]


def _scene_images(args: tuple) -> tuple[list[tuple[str, bytes]], list[dict]]:
    seed, start, stop, prefix, items = args
    images, objects = [], []
    for s in range(start, stop):
        rng = _rng(seed, prefix, s)
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


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    step = max(1, math.ceil(n / k))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


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


def _generate_into(tmp: Path, size: WorldSize, seed: int, workers: int) -> dict:
    (tmp / "tables").mkdir()
    (tmp / "truth").mkdir()

    products = _make_products(size, seed)
    catalog = _make_catalog(products, size, seed)
    items = catalog.merge(products[["product_id", "cluster_id", "geo", "hue_shift"]],
                          on="product_id")
    records = items.to_dict("records")

    with ProcessPoolExecutor(workers) as pool:
        if size.render_images:
            jobs = [(seed, records[a:b]) for a, b in _chunks(len(records), workers * 4)]
            for imgs in pool.map(_catalog_images, jobs):
                _write_images(tmp, imgs)

        sess_jobs = [(seed, a, b, items, products, size, size.render_images)
                     for a, b in _chunks(size.n_sessions, workers * 4)]
        impressions: list[dict] = []
        for rows, imgs in pool.map(_session_rows, sess_jobs):
            impressions.extend(rows)
            _write_images(tmp, imgs)

        by_cat = {c: [r for r in records if r["category"] == c] for c in CATEGORIES}
        scene_objects: list[dict] = []
        scene_jobs = [(seed, a, b, "scenes", by_cat)
                      for a, b in _chunks(size.n_scenes, workers * 4)]
        if size.n_scenes and size.render_images:
            for imgs, objs in pool.map(_scene_images, scene_jobs):
                _write_images(tmp, imgs)
                scene_objects.extend(objs)

    impressions_df = pd.DataFrame(impressions)
    truth_queries = (impressions_df[["query_id", "_target_product"]].drop_duplicates("query_id")
                     .rename(columns={"_target_product": "target_product_id"}))
    impressions_df = impressions_df.drop(columns="_target_product")

    scenes_df = pd.DataFrame({"scene_id": pd.Series(sorted({o["scene_id"] for o in scene_objects}),
                                                 dtype=str)})
    scenes_df["image_path"] = "images/scenes/" + scenes_df["scene_id"] + ".jpg"
    scenes_df["width"] = SCENE_PX
    scenes_df["height"] = SCENE_PX
    n_sc = len(scenes_df)
    scenes_df["split"] = np.where(np.arange(n_sc) < 0.8 * n_sc, "train",
                                  np.where(np.arange(n_sc) < 0.9 * n_sc, "val", "test"))

    rater_q, rater_j, rater_truth, rater_imgs = _make_rater_set(items, products, size, seed)
    _write_images(tmp, rater_imgs)

    _write_table(catalog, schemas.CATALOG, tmp / "tables/catalog.parquet")
    _write_table(impressions_df, schemas.IMPRESSIONS, tmp / "tables/impressions.parquet")
    _write_table(_make_boards(items, size, seed), schemas.BOARDS, tmp / "tables/boards.parquet")
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
                   "sessions": size.n_sessions, "scenes": n_sc, "rater_queries": len(rater_q),
                   "rater_judgments": len(rater_j)},
        "world_end": WORLD_END.isoformat(),
    }
    (tmp / "world.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _make_rater_set(items: pd.DataFrame, products: pd.DataFrame, size: WorldSize, seed: int):
    """Rater queries on a held-out share of style clusters, judged by docs/rater_guidelines.md.

    Grades: 2 = the same product; 1 = same category and the same style (shape family, palette,
    pattern, material: what our raters call "would happily buy instead"); unjudged = 0.
    """
    rng = _rng(seed, "rater", 0)
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
        qrng = _rng(seed, "rater_query", q)
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


def add_cli(sub) -> None:
    p = sub.add_parser("world", help="generate the demo product world (known ground truth)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--samples", type=Path, default=None, help="also save a contact-sheet PNG")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    summary = generate_world(args.size, args.seed, args.out, args.workers)
    if args.samples is not None and SIZES[args.size].render_images:
        summary["samples"] = str(save_samples(args.out, args.samples))
    print(json.dumps(summary, indent=1))
    return 0
