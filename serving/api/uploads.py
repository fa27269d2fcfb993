"""The checks every upload passes before anything else touches it.

Both front doors (serving/api/app.py, serving/api/online.py) mount `BodyLimit` and call
`check_image`. `BodyLimit` refuses an oversized request body while it streams, so a
multi-GB upload is never held in memory nor spooled to disk. `check_image` reads the
photo's header alone (the full decode happens once, in Triton): empty, too many bytes, not
an image, too many pixels. PIL refuses decompression bombs at twice its own pixel limit; the
limit here is far lower, so a bomb is refused by the pixel count before any decode.
"""

from __future__ import annotations

import io

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.preprocessing import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from serving.api.errors import Rejected

MAX_REQUEST_BYTES = MAX_IMAGE_BYTES + 64 * 1024  # the photo plus the form's other fields


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 at the route's first read
    of it when its Content-Length says so, else as soon as the bytes received pass the limit
    (chunked uploads); nothing past the limit is read. Refusing inside the route, not before
    routing, keeps the refusal counted under its endpoint."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refuse(self, status: int, size: str | None = None) -> HTTPException:
        detail = ("Content-Length is not a byte count" if size is None else
                  f"request body is {size} bytes; the limit is {self.max_bytes} "
                  f"(a photo of at most {MAX_IMAGE_BYTES} bytes plus the form)")
        return HTTPException(status, detail, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        received = 0

        async def counted() -> Message:
            nonlocal received
            if declared is not None and not declared.isdigit():
                raise self._refuse(400)
            if declared is not None and int(declared) > self.max_bytes:
                raise self._refuse(413, declared.decode())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._refuse(413, f"over {received}")
            return message

        await self.app(scope, counted, send)


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
