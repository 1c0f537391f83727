"""The HTTP API for backend publishers and operators (``/api/...``).

Callers authenticate with ``Authorization: Bearer <api key>`` from ``NOTIFY_API_KEYS``; the
key's name is the caller recorded in the audit log, and its role says what it may do: a
publisher key (a backend service) only publishes; an operator key may do everything. What
an operator did is audited; a refused call is only counted (``/metrics``), so that nobody
can push real entries out of the bounded audit stream by being refused. Errors are always
``{"error": {"code", "message", "field"}}`` (see schema.py). A request that is refused
publishes nothing, and a batch is validated whole before any of it is published.

Publishing here goes through the same script as the bridge, so it still reaches students
when Kafka is down: the path the first incident report was missing.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from notify import names
from notify.config import GatewaySettings, Role
from notify.keys import Keys
from notify.publish import Notification, Publisher
from notify.redis_client import UNAVAILABLE, Client

from . import audit, history, openapi, presence, schema
from .auth import WATCH_AUDIENCE, bearer, mint
from .coalesce import Coalescer
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter
from .schema import WATCH_TOKEN_TTL, ApiError

log = logging.getLogger(__name__)

PUBLISHER, OPERATOR = Role.PUBLISHER, Role.OPERATOR

# Wrong keys answered per client address per second (in bursts of twice that) before 429:
# guessing keys is slow. Counted in memory: a refused caller costs Redis nothing.
AUTH_FAILURES_PER_SECOND = 10


class JSONResponse(Response):
    """A JSON body encoded by orjson: several times faster than Starlette's json.dumps,
    which on the publish path was a tenth of a request's cost."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# What a request may fail with and still be answered in JSON: what it did wrong, or an
# outage of Redis (503). Anything else is a bug, answered 500 by Starlette and logged.
_ANSWERED: tuple[type[Exception], ...] = (ApiError, *UNAVAILABLE)


class _Bare:
    """An endpoint Starlette serves as an ASGI app: no Request or Response objects."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """A request's body as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _json_body(headers: Headers, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > schema.MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body is over {schema.MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in chunks:
        raw += chunk
        if len(raw) > schema.MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"the body is over {schema.MAX_BODY_BYTES} bytes")
    return schema.parse_json(raw)


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class Api:
    def __init__(
        self,
        settings: GatewaySettings,
        redis: Client,
        keys: Keys,
        publisher: Publisher,
        metrics: GatewayMetrics,
    ) -> None:
        self._api_keys = [
            (name, api_key.key.encode(), api_key.role)
            for name, api_key in settings.api_keys.items()
        ]
        self._refused = metrics.api_refused
        self._guessing = RateLimiter(AUTH_FAILURES_PER_SECOND, 2 * AUTH_FAILURES_PER_SECOND)
        limit = settings.api_rate_limit
        self._rate_limit = limit
        self._per_key = RateLimiter(limit, limit)
        self._cache_keys = settings.cache_keys
        self._jwt = settings.jwt
        self._redis = redis
        self._keys = keys
        self._publisher = publisher
        self._coalescer = Coalescer(publisher)

    def routes(self) -> list[Route]:
        return [
            # A bare ASGI app: at thousands of requests a second, Starlette's Request and
            # Response objects cost more than the publish itself (docs/performance.md). The
            # application answers POST ahead of the router; this route answers the rest 405.
            Route("/api/publish", _Bare(self.publish), methods=["POST"]),
            Route(
                "/api/trigger-update", self._guard(self.trigger_update, OPERATOR), methods=["POST"]
            ),
            Route("/api/history/{user_id}", self._guard(self.history, OPERATOR), methods=["GET"]),
            Route("/api/presence/{user_id}", self._guard(self.presence, OPERATOR), methods=["GET"]),
            Route("/api/audit", self._guard(self.audit, OPERATOR), methods=["GET"]),
            Route(
                "/api/students/{user_id}/watch-token",
                self._guard(self.watch_token, OPERATOR),
                methods=["POST"],
            ),
            Route("/api/openapi.json", self.openapi, methods=["GET"]),
        ]

    def _admit(self, headers: Headers, client: str, needs: Role, action: str) -> str:
        """The name of the caller, if its key may do ``action`` now; every key is compared
        in constant time."""
        presented = (bearer(headers.get("authorization")) or "").encode()
        caller = None
        for name, key, role in self._api_keys:
            if hmac.compare_digest(presented, key):
                caller = name, role
        if caller is None:
            if not self._guessing.allow(client):
                raise ApiError(429, "rate_limited", "too many requests with wrong keys")
            raise ApiError(401, "unauthorized", "a valid API key is required")
        name, role = caller
        if needs is OPERATOR and role is not OPERATOR:
            raise ApiError(403, "forbidden", f"{action} needs an operator key")
        if not self._per_key.allow(name):
            raise ApiError(429, "rate_limited", f"over {self._rate_limit} requests per second")
        return name

    def _refusal(self, exc: Exception, action: str) -> ApiError:
        """The answer to a request that failed with ``exc`` (an ApiError or an outage)."""
        if isinstance(exc, ApiError):
            self._refused.labels(action, str(exc.status)).inc()
            return exc
        log.warning("api request failed, Redis unavailable: %s", exc)
        return ApiError(503, "unavailable", "storage unavailable, retry later")

    def _guard(
        self, endpoint: Callable[[Request, str], Awaitable[Response]], needs: Role
    ) -> Callable[[Request], Awaitable[Response]]:
        action = endpoint.__name__.replace("_", "-")

        async def guarded(request: Request) -> Response:
            try:
                client = request.client.host if request.client else "unknown"
                caller = self._admit(request.headers, client, needs, action)
                return await endpoint(request, caller)
            except _ANSWERED as exc:
                return _error(self._refusal(exc, action))

        return guarded

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        return await _json_body(request.headers, request.stream())

    async def publish(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, extra, answer = 202, [], b""
        try:
            headers = Headers(scope=scope)
            client = scope["client"][0] if scope.get("client") else "unknown"
            caller = self._admit(headers, client, PUBLISHER, "publish")
            answer = orjson.dumps({"ids": await self._publish(headers, receive, caller)})
        except _ANSWERED as exc:
            refusal = self._refusal(exc, "publish")
            status, answer = refusal.status, orjson.dumps(refusal.body())
            if refusal.status == 429:
                extra = [(b"retry-after", b"1")]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(answer)),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def _publish(self, headers: Headers, receive: Receive, caller: str) -> list[str]:
        notifications = schema.publish_request(await _json_body(headers, _chunks(receive)))
        # One function call on a single Redis (shared with concurrent requests): the batch
        # is published whole or not at all. A call runs inside one slot of a cluster, so
        # there a batch for students in several slots is one call per slot; a failure
        # midway answers 503, and the caller's retry with idempotency keys delivers
        # nothing twice.
        ids = []
        for result in await self._coalescer.publish(notifications):
            if isinstance(result, Exception):
                raise result
            ids.append(str(result.id))
        # Debug: at thousands of requests a second, one line each would be the log.
        log.debug("%s published %d notification(s)", caller, len(ids))
        return ids

    async def trigger_update(self, request: Request, caller: str) -> Response:
        update = schema.trigger_update_request(await self._body(request))
        values = {"studentId": update.student_id, "courseId": update.course_id}
        cache_keys = [
            template.render(values)
            for template in self._cache_keys
            if update.course_id is not None or "courseId" not in template.fields
        ]
        data: dict[str, Any] = {}
        if update.course_id is not None:
            data["courseId"] = update.course_id
        if update.reason is not None:
            data["reason"] = update.reason
        notification = Notification(update.student_id, update.event, data, update.invalidate)
        sent = await self._publisher.invalidate_then_publish(cache_keys, [notification])
        [published] = sent.results
        if isinstance(published, Exception):
            raise published
        event_id = str(published.id)
        # The push went out: from here a Redis hiccup must not turn into an error that
        # invites the operator to push twice. Presence and the audit entry are best effort.
        try:
            connections: int | None = await presence.count(
                self._redis, self._keys, update.student_id
            )
        except UNAVAILABLE as exc:
            log.warning("trigger-update: presence unavailable: %s", exc)
            connections = None
        result = {
            "id": event_id,
            "cache_keys_deleted": [k for k, n in zip(cache_keys, sent.deleted, strict=True) if n],
            "connections": connections,
        }
        entry = {
            "caller": caller,
            "action": "trigger-update",
            "student_id": update.student_id,
            "course_id": update.course_id,
            "reason": update.reason,
            "event": update.event,
            "result": result,
        }
        try:
            await audit.append(self._redis, self._keys, entry)
        except UNAVAILABLE:
            log.exception("trigger-update pushed %s but could not be audited: %s", event_id, entry)
        return JSONResponse(result)

    async def history(self, request: Request, _caller: str) -> Response:
        user = self._user(request)
        limit = schema.limit(request.query_params.get("limit"), 50, 1000)
        frames = await history.recent(self._redis, self._keys, user, limit)
        return JSONResponse({"user_id": user, "events": [orjson.loads(f) for f in frames]})

    async def presence(self, request: Request, _caller: str) -> Response:
        user = self._user(request)
        return JSONResponse(
            {"user_id": user, "connections": await presence.count(self._redis, self._keys, user)}
        )

    async def audit(self, request: Request, _caller: str) -> Response:
        limit = schema.limit(request.query_params.get("limit"), 50, 1000)
        return JSONResponse({"entries": await audit.recent(self._redis, self._keys, limit)})

    async def watch_token(self, request: Request, caller: str) -> Response:
        """A token to watch a student's live events: audited before it is handed out.

        Its audience is ``notify-watch``, which only this gateway's ``/ws`` accepts: it is
        not a student login for the platform's other services (see docs/operations.md).
        """
        user = self._user(request)
        if not self._jwt.can_mint:
            raise ApiError(
                409,
                "cannot_sign",
                "this gateway verifies student tokens with a public key and holds no key to "
                "sign one; watch tokens need NOTIFY_JWT_SECRET",
            )
        # Audited first: if the entry cannot be written (503), no token leaves the gateway.
        entry = {"caller": caller, "action": "watch-token", "student_id": user}
        await audit.append(
            self._redis, self._keys, {**entry, "result": {"expires_in": WATCH_TOKEN_TTL}}
        )
        token = mint(self._jwt, user, WATCH_TOKEN_TTL, audience=WATCH_AUDIENCE)
        log.info("%s was given a watch token for %s", caller, user)
        return JSONResponse({"user_id": user, "token": token, "expires_in": WATCH_TOKEN_TTL})

    @staticmethod
    async def openapi(_request: Request) -> Response:
        return JSONResponse(openapi.DOCUMENT)

    @staticmethod
    def _user(request: Request) -> str:
        user: str = request.path_params["user_id"]
        if not names.valid_id(user):
            raise ApiError(
                422, "invalid", f"not a valid user id ({names.shape(names.ID)})", "user_id"
            )
        return user
