"""Drawing the shop: product cut-outs, seller and user photos, room scenes (JPEG bytes)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.world.catalog import PALETTES, SHAPE_FAMILIES

LIGHTING = ("daylight", "dusk", "studio")
PHOTO_PX = 128
SCENE_PX = 256


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

