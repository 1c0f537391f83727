"""How a gateway process is served: one uvicorn configuration for the CLI and the tests."""

from __future__ import annotations

import socket

import uvicorn
from starlette.applications import Starlette

from notify import logs
from notify.config import GatewaySettings

from . import supervisor
from .app import create_app
from .ws import bind


def uvicorn_config(app: Starlette, settings: GatewaySettings) -> uvicorn.Config:
    logs.install()
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Upgraded connections go to the gateway's own protocol (frame size limit, keepalive
        # and no compression are set there): notifications are small and encoded once per
        # process, and deflate would cost CPU and memory per connection for little gain.
        ws=bind(app.state.gateway, app.state.gateway.batch),
        # uvicorn's own HTTP protocol, with a deadline and limits before the request.
        http=app.state.gateway.intake.protocol(),
        # The access log would print every query string, and ?token= carries a credential;
        # what uvicorn still logs goes through logs.RedactSecrets.
        access_log=False,
        loop="auto",
        lifespan="on",
        timeout_graceful_shutdown=10,
        log_config=None,
    )


def listen(settings: GatewaySettings) -> socket.socket:
    """The listening socket, shareable: several gateway processes may bind the same port.

    With SO_REUSEPORT (Linux, BSD) the kernel spreads new connections over every process
    bound to the port, so ``notify gateway --processes N``, or N gateways started by a
    Procfile runner or systemd on one host, need no load balancer in front of them.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    return sock


def serve(settings: GatewaySettings, processes: int) -> int:
    """Serve until SIGTERM: this process, or ``processes`` children sharing the port."""
    if processes > 1:
        return supervisor.run(processes)
    app = create_app(settings)
    uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[listen(settings)])
    return 0
