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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import RedisCluster
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from notify import names
from notify.config import GatewaySettings, Role
from notify.keys import Keys
from notify.publish import Notification, Publisher
from notify.redis_client import UNAVAILABLE, Client

from . import audit, history, openapi, presence, schema
from .auth import WATCH_AUDIENCE, bearer, mint
from .metrics import GatewayMetrics
from .ratelimit import AddressLimiter
from .schema import WATCH_TOKEN_TTL, ApiError

log = logging.getLogger(__name__)

PUBLISHER, OPERATOR = Role.PUBLISHER, Role.OPERATOR

# Wrong keys answered per client address per second (in bursts of twice that) before 429:
# guessing keys is slow. Counted in memory: a refused caller costs Redis nothing.
AUTH_FAILURES_PER_SECOND = 10


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
        self._guessing = AddressLimiter(AUTH_FAILURES_PER_SECOND, 2 * AUTH_FAILURES_PER_SECOND)
        self._rate_limit = settings.api_rate_limit
        self._cache_keys = settings.cache_keys
        self._jwt = settings.jwt
        self._redis = redis
        self._keys = keys
        self._publisher = publisher

    def routes(self) -> list[Route]:
        return [
            Route("/api/publish", self._guard(self.publish, PUBLISHER), methods=["POST"]),
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

    def _caller(self, request: Request) -> tuple[str, Role] | None:
        """The name and role of the key presented, or None; every key is compared in
        constant time."""
        presented = (bearer(request.headers.get("authorization")) or "").encode()
        found = None
        for name, key, role in self._api_keys:
            if hmac.compare_digest(presented, key):
                found = name, role
        return found

    def _guard(
        self, endpoint: Callable[[Request, str], Awaitable[Response]], needs: Role
    ) -> Callable[[Request], Awaitable[Response]]:
        action = endpoint.__name__.replace("_", "-")

        async def guarded(request: Request) -> Response:
            try:
                caller = self._caller(request)
                if caller is None:
                    client = request.client.host if request.client else "unknown"
                    if not self._guessing.allow(client):
                        raise ApiError(429, "rate_limited", "too many requests with wrong keys")
                    raise ApiError(401, "unauthorized", "a valid API key is required")
                name, role = caller
                if needs is OPERATOR and role is not OPERATOR:
                    raise ApiError(403, "forbidden", f"{action} needs an operator key")
                await self._count(f"key:{name}", self._rate_limit)
                return await endpoint(request, name)
            except ApiError as exc:
                self._refused.labels(action, str(exc.status)).inc()
                return _error(exc)
            except UNAVAILABLE as exc:
                log.warning("api request failed, Redis unavailable: %s", exc)
                return _error(ApiError(503, "unavailable", "storage unavailable, retry later"))

        return guarded

    async def _count(self, bucket: str, limit: int) -> None:
        """Fixed one-second windows in Redis, so the limit holds across gateway processes."""
        key = self._keys.rate(bucket, int(time.time()))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2)
            count, _ = await pipe.execute()
        if count > limit:
            raise ApiError(429, "rate_limited", f"over {limit} requests per second")

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > schema.MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"the body is over {schema.MAX_BODY_BYTES} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > schema.MAX_BODY_BYTES:
                raise ApiError(413, "too_large", f"the body is over {schema.MAX_BODY_BYTES} bytes")
        return schema.parse_json(raw)

    async def publish(self, request: Request, caller: str) -> Response:
        notifications = schema.publish_request(await self._body(request))
        # One MULTI/EXEC: the batch is published whole or not at all. A cluster runs a
        # transaction inside one slot only, so there a batch for several students is
        # published student by student; a failure midway answers 503, and the caller's
        # retry with idempotency keys delivers nothing twice.
        students = {notification.user_id for notification in notifications}
        atomic = len(students) == 1 or not isinstance(self._redis, RedisCluster)
        sent = await self._publisher.invalidate_then_publish((), notifications, atomic=atomic)
        ids = []
        for result in sent.results:
            if isinstance(result, Exception):
                raise result
            ids.append(str(result.id))
        log.info("%s published %d notification(s)", caller, len(ids))
        return JSONResponse({"ids": ids}, status_code=202)

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
