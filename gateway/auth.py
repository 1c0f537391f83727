"""Student authentication: the JWT's ``sub`` is the student id.

Verification goes through PyJWT with the algorithm pinned by configuration, and requires
``exp`` and ``sub``: a token that never expires would be a credential that can never be
revoked, so the gateway refuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from notify.config import JwtSettings
from notify.names import valid_id

# Real JWTs stay well under 1 KiB. The limit also sits below the 8 KiB line length of the
# server's HTTP parser, so an oversized token gets this clear 401 rather than a dropped
# handshake.
MAX_TOKEN_BYTES = 4096


class AuthError(Exception):
    """Why a token was refused; the message is safe to show and never contains the token."""


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: str
    expires_at: float


class TokenVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings

    def verify(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        try:
            claims = jwt.decode(
                token,
                self._settings.key,
                algorithms=list(self._settings.algorithms),
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not valid_id(user):
            raise AuthError("invalid token: sub is not a valid user id")
        return Claims(user, float(claims["exp"]))


def mint(settings: JwtSettings, user_id: str, ttl: int) -> str:
    """A token for ``user_id``; only possible with a shared secret (HS256)."""
    if not settings.can_mint:
        raise AuthError("minting needs NOTIFY_JWT_SECRET; a public key can only verify")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl}
    if settings.audience:
        claims["aud"] = settings.audience
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
