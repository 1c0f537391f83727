"""The HTTP API for backend publishers and operators (``/api/...``).

Callers authenticate with ``Authorization: Bearer <api key>`` from ``NOTIFY_API_KEYS``; the
key's name is the caller recorded in logs and audit. Errors are always
``{"error": {"code", "message", "field"}}`` so that clients can show which input was wrong.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..keys import valid_user_id
from . import presence
from .auth import bearer

Endpoint = Callable[[Request], Awaitable[Response]]


def error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status
    )


class ApiKeys:
    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    def caller(self, request: Request) -> str | None:
        """The name of the key presented, or None; every key is compared in constant time."""
        presented = (bearer(request.headers.get("authorization")) or "").encode()
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(presented, key):
                found = name
        return found

    def guard(self, endpoint: Callable[[Request, str], Awaitable[Response]]) -> Endpoint:
        async def guarded(request: Request) -> Response:
            caller = self.caller(request)
            if caller is None:
                return error(401, "unauthorized", "a valid API key is required")
            return await endpoint(request, caller)

        return guarded


def routes(keys: ApiKeys, redis: Redis) -> list[Route]:
    async def get_presence(request: Request, _caller: str) -> Response:
        user = request.path_params["user_id"]
        if not valid_user_id(user):
            return error(422, "invalid", "not a valid user id", "user_id")
        return JSONResponse({"user_id": user, "connections": await presence.count(redis, user)})

    return [Route("/api/presence/{user_id}", keys.guard(get_presence), methods=["GET"])]
