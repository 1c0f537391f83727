"""How a gateway process is served: one uvicorn configuration for the CLI and the tests."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette

from .. import logs
from ..config import GatewaySettings
from ..protocol import MAX_CLIENT_FRAME_BYTES


def uvicorn_config(app: Starlette, settings: GatewaySettings) -> uvicorn.Config:
    logs.install()
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # websockets-sansio (uvicorn >= 0.52.1) applies send backpressure per socket.
        ws="websockets-sansio",
        # uvicorn closes with 1009 past this, before the frame reaches the application.
        ws_max_size=MAX_CLIENT_FRAME_BYTES,
        # Notifications are small and encoded once per process; deflate would cost CPU and
        # memory per connection for little gain.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        # The access log would print every query string, and ?token= carries a credential;
        # what uvicorn still logs goes through logs.RedactSecrets.
        access_log=False,
        loop="auto",
        lifespan="on",
        timeout_graceful_shutdown=10,
        log_config=None,
    )
