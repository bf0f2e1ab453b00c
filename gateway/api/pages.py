"""``/``: the web page (upload, jobs, results map, try ``/v1/predict``), static files from the package.

The page is plain HTML, CSS and JavaScript under ``gateway/static/app/``, with MapLibre GL JS vendored
beside it (``gateway/static/maplibre-gl/VENDORED.md``): nothing is fetched from the internet.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gateway.api.docs import STATIC_DIR

MAPLIBRE_VERSION = "5.24.1"
"""The vendored ``maplibre-gl`` release (see ``gateway/static/maplibre-gl/VENDORED.md``)."""
INDEX = STATIC_DIR / "app" / "index.html"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(INDEX, media_type="text/html", headers={"Cache-Control": "no-cache"})
