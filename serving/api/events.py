"""`POST /v1/events`: clicks and saves on a served grid, validated before they are stored.

The router is a factory over an `ImpressionLog`, so any app that serves grids (the
experiment front door in serving/api/online.py, or the single-stack search API) mounts it
with one `include_router` line. Rejections carry the reason: 404 unknown request id, 422 bad
position or item, 409 duplicate event or a save without a click; nothing is stored then.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from serving.api.impressions import EventRejected, ImpressionLog


class EventIn(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    position: int = Field(description="1-based grid position the user acted on")
    item_id: str = Field(min_length=1, max_length=128)
    type: Literal["click", "save"]
    ts: datetime | None = Field(None, description="client time (UTC); default: receipt")


def events_router(log: ImpressionLog) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/events", status_code=201)
    async def post_event(event: EventIn):
        if event.ts is not None and event.ts.tzinfo is None:
            raise HTTPException(422, "ts must carry a timezone (e.g. 2026-11-25T10:00:00Z)")
        try:
            await asyncio.to_thread(log.record_event, event.request_id, event.position,
                                    event.item_id, event.type, event.ts)
        except EventRejected as err:
            raise HTTPException(err.status, str(err)) from err
        return {"stored": True, "request_id": event.request_id, "position": event.position,
                "type": event.type}

    return router
