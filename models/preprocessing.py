"""The one image preprocessing used by training, batch re-embedding and the Triton models.

Every network in `models/` takes RGB floats in [0, 1] and normalises inside its own graph,
so the exported file is self-contained and serving cannot forget a step. What happens
before the graph (decode, box crop, resize) lives here, once, and is imported by the
training data module, `models.embedder.embed_images` and the Triton python models: the
train/serve skew test compares exactly these paths.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

# EfficientNet-Lite's ImageNet normalisation (mean 0.498, std 0.502 on [0, 1] pixels)
LITE_MEAN = 0.498
LITE_STD = 0.502
EMBED_PX = 128  # embedder input side: the catalog photos' native size, CPU-cheap
CROP_MARGIN = 0.08  # context kept around a tapped box, as a share of its longer side
MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused, not decoded
MAX_IMAGE_BYTES = 8 * 1024 * 1024
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


class BadImage(ValueError):
    """An input that is not a decodable, reasonably sized image, or a box that is not inside it."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Bytes -> RGB image, refusing empty, oversized, truncated, non-image and bomb inputs
    before the pixels are decompressed."""
    if not data:
        raise BadImage("empty image")
    if len(data) > max_bytes:
        raise BadImage(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage(f"image is {w}x{h} pixels; the limit is {max_pixels} pixels")
        img.load()
        return img.convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage(f"image refused as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as err:
        raise BadImage(f"not a decodable image ({type(err).__name__}: {err})") from err


def check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A normalised (x0, y0, x1, y1) box inside [0, 1] with positive area, or BadImage."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise BadImage(f"box must be 4 numbers (x0, y0, x1, y1), got {box!r}") from err
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise BadImage(f"box has non-finite coordinates: {box!r}")
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise BadImage(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                       f"(normalised), got {box!r}")
    return x0, y0, x1, y1


def square_crop_box(box: Sequence[float], width: int, height: int,
                    margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """Pixel square around a normalised box: its longer side plus a margin, centred on the
    box and shifted (not shrunk) to stay inside the image where the image allows.

    Square, so a tall lamp is not squashed into the embedder's square input: shape is what
    makes two products look alike. Catalog photos are square shots of one product, so a
    square crop of a query looks like them.
    """
    x0, y0, x1, y1 = check_box(box)
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    side = max((x1 - x0) * width, (y1 - y0) * height) * (1 + 2 * margin)
    side = int(round(max(2.0, min(side, float(max(width, height))))))
    left = int(round(min(max(cx - side / 2, 0.0), max(width - side, 0.0))))
    top = int(round(min(max(cy - side / 2, 0.0), max(height - side, 0.0))))
    return left, top, left + side, top + side


def crop_to_box(image: Image.Image, box: Sequence[float] | None = None,
                margin: float = CROP_MARGIN) -> Image.Image:
    """The square crop the embedder sees for a tapped box; the whole image when box is None
    or the whole frame. Where the square is wider than the image, PIL fills black."""
    if box is None or tuple(float(v) for v in box) == WHOLE_IMAGE:
        return image
    return image.crop(square_crop_box(box, *image.size, margin=margin))


def resize_to_array(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (3, size, size) float32 in [0, 1] (the graphs normalise inside).

    numpy, not torch: on a busy 2-core host torch's intra-op pool can stall on small copies.
    """
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return np.ascontiguousarray(arr)


def embed_input(image: Image.Image, box: Sequence[float] | None = None,
                size: int = EMBED_PX) -> np.ndarray:
    """Image (+ optional normalised box) -> the embedder's (3, size, size) input."""
    return resize_to_array(crop_to_box(image, box), size)
