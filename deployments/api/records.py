"""`GET /records`: what the actions delivered lately (the live view's list)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from ray.serve.handle import DeploymentHandle

from deployments.api.errors import with_route_exceptions


def router(actions: DeploymentHandle | None, timeout_s: float) -> APIRouter:
    """The records route over the Actions deployment (None: the app has no pipeline)."""
    api = APIRouter()

    @api.get("/records")
    @with_route_exceptions("actions unavailable")
    async def records(limit: int = Query(20, ge=1, le=1000)) -> Any:
        """The last records, images and messages the actions delivered (newest first, as
        the Actions replica that answers saw them; never image bytes): the live view's
        list. Empty when the application has no pipeline."""
        if actions is None:
            return []
        return await asyncio.wait_for(actions.recent.remote(limit), timeout_s)

    return api
