"""Why the search API refuses or cannot serve a request, as plain exceptions.

The services (serving/api/search.py, serving/switch.py, the upload check) raise these
without knowing about HTTP; both front doors answer them as `status` with a JSON `detail`.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class ApiError(Exception):
    status = 500

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status


class Rejected(ApiError):
    """Bad input: 422, or 413 for an upload over a size limit."""

    status = 422


class Conflict(ApiError):
    """The request cannot apply to the current state (a switch to a version that cannot be
    served, nothing to roll back to)."""

    status = 409


class Unavailable(ApiError):
    """A dependency (Triton, the shards) is down or too slow."""

    status = 503


async def answer_api_error(_: Request, exc: ApiError) -> JSONResponse:
    """The exception handler both front doors install for `ApiError`."""
    retry = getattr(exc, "retry_after_s", None)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status,
                        headers={"Retry-After": str(retry)} if retry is not None else None)
