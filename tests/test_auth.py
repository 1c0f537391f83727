from __future__ import annotations

import time

import jwt
import pytest

from gateway.auth import AuthError, TokenVerifier, bearer, mint
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


def test_minted_token_verifies() -> None:
    claims = TokenVerifier(SETTINGS).verify(mint(SETTINGS, "s1", 60))
    assert claims.user_id == "s1"
    assert claims.expires_at > time.time()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (encode(valid_claims(), key="w" * 40), "InvalidSignatureError"),
        (encode(valid_claims(exp=int(time.time()) - 5)), "expired"),
        (encode(valid_claims(nbf=int(time.time()) + 600)), "ImmatureSignatureError"),
        (encode(valid_claims(aud="other")), "InvalidAudienceError"),
        (encode(valid_claims(iss="other")), "InvalidIssuerError"),
        (encode({k: v for k, v in valid_claims().items() if k != "sub"}), "MissingRequiredClaim"),
        (encode({k: v for k, v in valid_claims().items() if k != "exp"}), "MissingRequiredClaim"),
        (encode(valid_claims(sub="a{b}")), "sub is not a valid user id"),
        (jwt.encode(valid_claims(), "", algorithm="none"), "InvalidAlgorithmError"),
        ("x" * 5000, "too large"),
    ],
)
def test_bad_tokens_are_refused(token: str, reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as refused:
        TokenVerifier(SETTINGS).verify(token)
    assert token not in str(refused.value)


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
