"""Student authentication: the JWT's ``sub`` is the student id.

Verification goes through PyJWT with the algorithm pinned by configuration (or, with a
JWKS, by the key the token names), and requires ``exp`` and ``sub``: a token that never
expires would be a credential that can never be revoked, so the gateway refuses it. A few
seconds of clock difference between the host that minted a token and this one are
tolerated (``NOTIFY_JWT_LEEWAY``): a token used at once must not be "not yet valid".

Besides student tokens, ``/ws`` accepts the watch tokens the API hands operators. Those
carry the audience ``notify-watch``, so that a service of the platform that checks ``aud``
(or rejects an unexpected one, as PyJWT does) never takes one for a student's login.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from notify.config import JwtSettings
from notify.names import valid_id

log = logging.getLogger(__name__)

# Real JWTs stay well under 1 KiB; the limit keeps the refusal a clear 401.
MAX_TOKEN_BYTES = 4096
WATCH_AUDIENCE = "notify-watch"
# A token naming a key the JWKS does not have fetches the JWKS again, at most this often:
# an identity provider publishes a new key before it signs with it, so this only matters
# when it did not, and must not let unknown key ids hammer it.
JWKS_MIN_INTERVAL = 10.0
JWKS_TIMEOUT = 5.0


class AuthError(Exception):
    """Why a token was refused; the message is safe to show and never contains the token."""


class KeysUnavailable(Exception):
    """No signing key could be fetched: the refusal is the gateway's fault, not the token's."""


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: str
    expires_at: float
    # A watch token (an operator's console), not a student's own login.
    watch: bool


class Jwks:
    """The signing keys an identity provider publishes as a JWKS, by key id."""

    def __init__(self, url: str, refresh: float, min_interval: float = JWKS_MIN_INTERVAL) -> None:
        self._url = url
        self._refresh = refresh
        self._min_interval = min_interval
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._fetching: asyncio.Task[None] | None = None

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        age = time.monotonic() - self._fetched_at
        if age >= self._refresh or (kid not in self._keys and age >= self._min_interval):
            if self._fetching is None:
                self._fetching = asyncio.create_task(self._fetch())
            fetching = self._fetching
            await asyncio.shield(fetching)
        if not self._keys:
            raise KeysUnavailable(f"no signing keys from {self._url}")
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        try:
            raw = await asyncio.to_thread(self._download)
            keys: dict[str | None, jwt.PyJWK] = {}
            for data in orjson.loads(raw).get("keys", []):
                try:
                    key = jwt.PyJWK(data)
                except jwt.PyJWKError as exc:
                    log.warning("ignoring a key of %s: %s", self._url, exc)
                    continue
                if key.key_type != "oct":  # a published secret would be no secret
                    keys[key.key_id] = key
            if len(keys) == 1:
                # A set of one key: tokens need not name it.
                keys[None] = next(iter(keys.values()))
            self._keys = keys
        except Exception as exc:  # keep the keys we had: an outage of the provider is no reason
            log.warning(
                "could not fetch the JWKS %s (%r); keeping %d keys", self._url, exc, len(self._keys)
            )
        finally:
            self._fetched_at = time.monotonic()
            self._fetching = None

    def _download(self) -> bytes:
        # The URL's scheme is http or https: config refuses any other.
        request = urllib.request.Request(self._url, headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=JWKS_TIMEOUT) as response:  # noqa: S310
            body: bytes = response.read()
        return body


class TokenVerifier:
    def __init__(self, settings: JwtSettings, jwks: Jwks | None = None) -> None:
        self._settings = settings
        if jwks is None and settings.jwks_url is not None:
            jwks = Jwks(settings.jwks_url, float(settings.jwks_refresh))
        self._jwks = jwks

    async def verify(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        settings = self._settings
        try:
            key, algorithms = await self._key(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["exp", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        watch = self._audience(claims.get("aud"))
        user = claims["sub"]
        if not isinstance(user, str) or not valid_id(user):
            raise AuthError("invalid token: sub is not a valid user id")
        return Claims(user, float(claims["exp"]), watch)

    async def _key(self, token: str) -> tuple[Any, list[str]]:
        if self._jwks is None:
            return self._settings.key, list(self._settings.algorithms)
        kid = jwt.get_unverified_header(token).get("kid")
        key = await self._jwks.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise AuthError("invalid token: no published key has its kid")
        return key.key, [key.algorithm_name]

    def _audience(self, claim: Any) -> bool:
        """Whether the token is a watch token; AuthError if its audience is not ours."""
        audiences = [claim] if isinstance(claim, str) else claim or []
        if WATCH_AUDIENCE in audiences:
            return True
        expected = self._settings.audience
        if expected is not None and expected not in audiences:
            raise AuthError("invalid token: InvalidAudienceError")
        if expected is None and audiences:
            # Meant for another service: this gateway expects no audience.
            raise AuthError("invalid token: InvalidAudienceError")
        return False


def mint(settings: JwtSettings, user_id: str, ttl: int, audience: str | None = None) -> str:
    """A token for ``user_id``; only possible with a shared secret (HS256).

    ``audience`` overrides the configured one (watch tokens).
    """
    if not settings.can_mint or settings.key is None:
        raise AuthError("minting needs NOTIFY_JWT_SECRET; a public key can only verify")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl}
    if audience or settings.audience:
        claims["aud"] = audience or settings.audience
    if settings.issuer:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, settings.key, algorithm="HS256")


def bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
