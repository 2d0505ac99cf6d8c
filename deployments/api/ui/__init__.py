"""The live view: one static page the ingress serves at `/ui` (no build step, no CDN).

The page holds no data: it is open like `/health`, and reads everything through the
API's own routes (`/streams`, `/health`, `/records`, `/cameras/{id}/image`, SSE
`/events`), with the bearer token when one is configured (`/ui?access_token=...`).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

LIVE_PAGE = files(__package__).joinpath("live.html").read_text(encoding="utf-8")
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Only this origin; inline script and style are the page's own (no third party).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def add_live_view(app: FastAPI) -> None:
    """Route `/ui` on the ingress's FastAPI app."""

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def live_view() -> HTMLResponse:
        return HTMLResponse(LIVE_PAGE, headers=HEADERS)
