from __future__ import annotations

import time

import jwt
import pytest

from gateway.auth import WATCH_AUDIENCE, AuthError, TokenVerifier, bearer, mint
from notify import config

SECRET = "k" * 40
SETTINGS = config.load_jwt(
    {"NOTIFY_JWT_SECRET": SECRET, "NOTIFY_JWT_AUDIENCE": "app", "NOTIFY_JWT_ISSUER": "backend"}
)


def encode(claims: dict[str, object], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def valid_claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    # Tokens are minted at import (parametrize): the expiry must outlast a slow run.
    return {"sub": "s1", "exp": now + 3600, "aud": "app", "iss": "backend", **extra}


async def test_minted_token_verifies() -> None:
    claims = await TokenVerifier(SETTINGS).verify(mint(SETTINGS, "s1", 60))
    assert claims.user_id == "s1"
    assert claims.expires_at > time.time()
    assert claims.watch is False


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (encode(valid_claims(), key="w" * 40), "InvalidSignatureError"),
        (encode(valid_claims(exp=int(time.time()) - 5)), "expired"),
        (encode(valid_claims(nbf=int(time.time()) + 600)), "ImmatureSignatureError"),
        (encode(valid_claims(iat=int(time.time()) + 600)), "ImmatureSignatureError"),
        (encode(valid_claims(aud="other")), "InvalidAudienceError"),
        (encode(valid_claims(iss="other")), "InvalidIssuerError"),
        (encode({k: v for k, v in valid_claims().items() if k != "sub"}), "MissingRequiredClaim"),
        (encode({k: v for k, v in valid_claims().items() if k != "exp"}), "MissingRequiredClaim"),
        (encode(valid_claims(sub="a{b}")), "sub is not a valid user id"),
        (jwt.encode(valid_claims(), "", algorithm="none"), "InvalidAlgorithmError"),
        ("x" * 5000, "too large"),
    ],
)
async def test_bad_tokens_are_refused(token: str, reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as refused:
        await TokenVerifier(SETTINGS).verify(token)
    assert token not in str(refused.value)


async def test_a_few_seconds_of_clock_difference_are_tolerated() -> None:
    """Review item 11: minted on a host whose clock runs ahead, used at once."""
    ahead = int(time.time()) + 3
    claims = await TokenVerifier(SETTINGS).verify(encode(valid_claims(iat=ahead, nbf=ahead)))
    assert claims.user_id == "s1"
    strict = config.load_jwt({"NOTIFY_JWT_SECRET": SECRET, "NOTIFY_JWT_LEEWAY": "0"})
    with pytest.raises(AuthError, match="ImmatureSignatureError"):
        await TokenVerifier(strict).verify(encode({"sub": "s1", "exp": ahead + 60, "nbf": ahead}))


async def test_watch_tokens_have_an_audience_of_their_own() -> None:
    """Review item 3: a watch token must not pass for a student's login elsewhere."""
    token = mint(SETTINGS, "s1", 60, audience=WATCH_AUDIENCE)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == WATCH_AUDIENCE
    claims = await TokenVerifier(SETTINGS).verify(token)
    assert claims.watch is True
    # A service that expects its own audience, or none, refuses it (PyJWT's behaviour).
    for audience in ("app", None):
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(token, SECRET, algorithms=["HS256"], audience=audience)
    # And this gateway without an audience of its own refuses another service's tokens.
    plain = config.load_jwt({"NOTIFY_JWT_SECRET": SECRET})
    with pytest.raises(AuthError, match="InvalidAudienceError"):
        await TokenVerifier(plain).verify(encode(valid_claims(aud="billing")))


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
