"""The web page: runs dashboard and chat, served from this package (no CDN, no network).

Routes (all GET; nothing here writes a file): `/` the page, `/ui/static/NAME` its few
assets (a fixed list, no path lookups), `/ui/api/info`, `/ui/api/runs`, `/ui/api/runs/ID`
(summary, resolved config, eval samples) and `/ui/api/metrics/ID?offset=N` (records
appended since byte N, for live polling). The chat part of the page talks to the
OpenAI-compatible routes of `llamaforge serve` when a model is mounted on the same app.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from ..train.metrics import METRICS_FILE
from .runs import RunIndex, RunNotFound, UnsafeRunPath, read_from

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "app.js": "text/javascript",
    "chart.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
# Only this origin's scripts, styles and connections: the page loads nothing from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return JSONResponse(body, status_code=status, headers=HEADERS)


def ui_router(index: RunIndex, *, api_key: str | None = None, chat: bool = False) -> APIRouter:
    """The page's routes over the runs in `index`; `chat` says a model is mounted too."""
    files = {name: (STATIC / name).read_bytes() for name in [*ASSETS, "index.html"]}
    router = APIRouter()

    def allowed(request: HTTPRequest) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), api_key.encode())

    def page() -> Response:
        return Response(files["index.html"], media_type="text/html", headers=HEADERS)

    router.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    router.add_api_route("/ui", page, methods=["GET"], include_in_schema=False)

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return _error(404, f"no asset {name[:80]!r}")
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    @router.get("/ui/api/info")
    async def info() -> JSONResponse:
        roots = [str(r) for r in index.roots]
        body = {"roots": roots, "chat": chat, "auth": api_key is not None}
        return JSONResponse(body, headers=HEADERS)

    async def answer(request: HTTPRequest, work) -> JSONResponse:
        """Run `work` off the event loop once the key is checked; errors in OpenAI's shape."""
        if not allowed(request):
            return _error(401, "invalid or missing API key")
        try:
            body: Any = await asyncio.to_thread(work)
        except UnsafeRunPath as e:
            return _error(400, str(e))
        except RunNotFound as e:
            return _error(404, str(e))
        except FileNotFoundError as e:  # a run folder removed while being read
            return _error(404, f"run file gone: {Path(e.filename or '').name}")
        return JSONResponse(body, headers=HEADERS)

    @router.get("/ui/api/runs")
    async def runs(request: HTTPRequest) -> JSONResponse:
        return await answer(request, lambda: {"runs": index.summaries()})

    @router.get("/ui/api/runs/{rid:path}")
    async def run(rid: str, request: HTTPRequest) -> JSONResponse:
        return await answer(request, lambda: index.get(rid).details())

    @router.get("/ui/api/metrics/{rid:path}")
    async def metrics(rid: str, request: HTTPRequest, offset: int = Query(0)) -> JSONResponse:
        def work() -> dict[str, Any]:
            r = index.get(rid)
            records, end, reset = read_from(r.path / METRICS_FILE, offset)
            return {"records": records, "offset": end, "reset": reset}

        return await answer(request, work)

    return router


def create_ui_app(index: RunIndex, *, api_key: str | None = None) -> FastAPI:
    """A stand-alone app with only the page (no model loaded: the chat tab says so)."""
    app = FastAPI(title="llamaforge ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(ui_router(index, api_key=api_key, chat=False))
    return app
