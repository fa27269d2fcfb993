"""The one check every uploaded query photo passes before anything else touches it.

Both front doors (serving/api/app.py, serving/api/online.py) call `check_image`. It reads
the header alone (the full decode happens once, in Triton): empty, too many bytes, not an
image, too many pixels. PIL refuses decompression bombs at twice its own pixel limit; the
limit here is far lower, so a bomb is refused by the pixel count before any decode.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from models.preprocessing import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from serving.api.errors import Rejected


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an acceptable upload; `Rejected` (422, or 413 when too large)."""
    if not data:
        raise Rejected("empty image upload")
    if len(data) > MAX_IMAGE_BYTES:
        raise Rejected(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as err:
        raise Rejected(f"image refused as a decompression bomb (too many pixels): {err}",
                       413) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise Rejected(f"not a decodable image: {err}") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise Rejected(f"image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} "
                       "pixels", 413)
    return width, height
