"""HTTP probes of the bridge and the outbox relay: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class Probed(Protocol):
    """A process's work loop, as its probes see it."""

    @property
    def ready(self) -> bool: ...

    @property
    def registry(self) -> CollectorRegistry: ...


def create_app(probed: Probed) -> Starlette:
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        ready = probed.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(probed.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
    )


class ProbeServer(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the work loop, which must
    finish and commit its batch before the probes go away."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server(probed: Probed, host: str, port: int) -> ProbeServer:
    config = uvicorn.Config(
        create_app(probed), host=host, port=port, lifespan="off", access_log=False, log_config=None
    )
    return ProbeServer(config)
