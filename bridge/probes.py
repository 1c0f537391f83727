"""The bridge's HTTP probes: ``/healthz``, ``/readyz`` and ``/metrics`` on ``BRIDGE_PORT``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .consumer import Bridge


def create_app(bridge: Bridge) -> Starlette:
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        return JSONResponse({"ready": bridge.ready}, status_code=200 if bridge.ready else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(bridge.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
    )


class ProbeServer(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the bridge, which must finish
    and commit its batch before the probes go away."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server(bridge: Bridge, host: str, port: int) -> ProbeServer:
    config = uvicorn.Config(
        create_app(bridge), host=host, port=port, lifespan="off", access_log=False, log_config=None
    )
    return ProbeServer(config)
