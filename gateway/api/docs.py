"""``/docs``: Swagger UI served from the package (``gateway/static/swagger-ui``), so it works offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"
SWAGGER_UI_VERSION = "5.35.0"
"""The vendored ``swagger-ui-dist`` release (see ``gateway/static/swagger-ui/VENDORED.md``)."""

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The package's static assets, to mount at :data:`STATIC_PATH`."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    base = f"{request.scope.get('root_path', '')}{STATIC_PATH}/swagger-ui"
    return get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{request.app.openapi_url}",
        title=f"{request.app.title} - API",
        swagger_js_url=f"{base}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}",
        swagger_css_url=f"{base}/swagger-ui.css?v={SWAGGER_UI_VERSION}",
        swagger_favicon_url=f"{base}/favicon-32x32.png",
    )
