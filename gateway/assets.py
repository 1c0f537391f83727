"""Static files the gateway serves: the JS client and the operator console.

An explicit table rather than a mounted directory: only these files are public, each with
a content type that does not depend on the host's mimetypes database (browsers refuse an
ES module served as anything but JavaScript).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).parent / "static"

_JS = "text/javascript; charset=utf-8"
_FILES = {
    "/client/notify-client.js": ("notify-client.js", _JS),
    "/console/": ("console/index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console/console.js", _JS),
    "/console/console.css": ("console/console.css", "text/css; charset=utf-8"),
}

# The console holds an API key in its page: it talks only to this origin, runs only its own
# scripts, and cannot be framed by another site.
_CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Revalidate every time (the ETag makes that cheap), so a deploy is picked up at once.
_COMMON_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _file(url: str, name: str, media_type: str) -> Route:
    path = STATIC / name
    headers = dict(_COMMON_HEADERS)
    if url.startswith("/console/"):
        headers.update(_CONSOLE_HEADERS)

    async def endpoint(_request: Request) -> Response:
        return FileResponse(path, media_type=media_type, headers=headers)

    return Route(url, endpoint, methods=["GET", "HEAD"])


async def _console(_request: Request) -> Response:
    # Relative, so that it still lands on the console behind a proxy that adds a prefix;
    # the console's own files are addressed relative to /console/.
    return RedirectResponse("console/", status_code=308)


def routes() -> list[BaseRoute]:
    return [
        Route("/console", _console, methods=["GET", "HEAD"]),
        *(_file(url, name, media_type) for url, (name, media_type) in _FILES.items()),
    ]
