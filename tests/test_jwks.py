"""Student tokens verified with the keys an identity provider publishes (NOTIFY_JWKS_URL).

The provider is a real HTTP server on loopback serving a JWKS the test changes, as a key
rotation does: a new key is published beside the old one, tokens are signed with it, then
the old key is withdrawn.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.auth import AuthError, Jwks, TokenVerifier
from notify import config

from .support import open_client, start_gateway


class Provider:
    """An identity provider: its JWKS, and the private keys it signs with."""

    def __init__(self) -> None:
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self.published: list[str] = []
        self.fetches = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = orjson.dumps({"keys": [provider.jwk(kid) for kid in provider.published]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/.well-known/jwks.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def jwk(self, kid: str) -> dict[str, Any]:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(
            self.private_key(kid).public_key(), as_dict=True
        )
        return {**public, "kid": kid, "alg": "RS256", "use": "sig"}

    def token(self, kid: str, user: str = "s1") -> str:
        claims = {"sub": user, "exp": int(time.time()) + 600}
        return jwt.encode(claims, self.private_key(kid), algorithm="RS256", headers={"kid": kid})

    def private_key(self, kid: str) -> rsa.RSAPrivateKey:
        if kid not in self._private:
            self._private[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._private[kid]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def provider() -> Iterator[Provider]:
    server = Provider()
    yield server
    server.stop()


def verifier(provider: Provider, refresh: float, min_interval: float) -> TokenVerifier:
    settings = config.load_jwt({"NOTIFY_JWKS_URL": provider.url})
    return TokenVerifier(settings, Jwks(provider.url, refresh, min_interval))


async def test_a_key_rotation_through_a_jwks_with_two_keys(provider: Provider) -> None:
    provider.published = ["old"]
    tokens = verifier(provider, refresh=1.0, min_interval=0.2)
    assert (await tokens.verify(provider.token("old"))).user_id == "s1"
    with pytest.raises(AuthError, match="no published key"):
        await tokens.verify(provider.token("new"))

    # The new key is published beside the old one, then used: a token naming a key the
    # verifier does not know fetches the JWKS again (at most every min_interval).
    provider.published = ["old", "new"]
    await asyncio.sleep(0.25)
    assert (await tokens.verify(provider.token("new"))).user_id == "s1"
    assert (await tokens.verify(provider.token("old"))).user_id == "s1"

    # The old key is withdrawn: refused from the next refresh on.
    provider.published = ["new"]
    await asyncio.sleep(1.1)
    with pytest.raises(AuthError, match="no published key"):
        await tokens.verify(provider.token("old"))
    assert (await tokens.verify(provider.token("new"))).user_id == "s1"


async def test_unknown_key_ids_do_not_hammer_the_provider(provider: Provider) -> None:
    provider.published = ["k1"]
    tokens = verifier(provider, refresh=300, min_interval=10)
    await tokens.verify(provider.token("k1"))
    for n in range(50):
        with pytest.raises(AuthError):
            await tokens.verify(provider.token(f"forged-{n}"))
    assert provider.fetches == 1


async def test_a_token_signed_with_the_public_key_as_an_hmac_secret_is_refused(
    provider: Provider,
) -> None:
    """Algorithm confusion: each key verifies with its own algorithm only."""
    provider.published = ["k1"]
    public = (
        provider.private_key("k1")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # By hand: PyJWT itself refuses to sign with a public key as an HMAC secret.
    header = base64url(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}))
    payload = base64url(orjson.dumps({"sub": "s1", "exp": int(time.time()) + 60}))
    signature = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64url(signature)}"
    with pytest.raises(AuthError, match="InvalidAlgorithmError"):
        await verifier(provider, 300, 10).verify(forged)


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_the_gateway_verifies_student_tokens_from_a_jwks(
    provider: Provider, redis_url: str, student: str
) -> None:
    provider.published = ["k1"]
    async with start_gateway(
        redis_url, NOTIFY_JWT_SECRET="", NOTIFY_JWKS_URL=provider.url
    ) as gateway:
        url = f"{gateway.url.replace('http', 'ws', 1)}/ws?token="
        ws, welcome = await open_client(url + provider.token("k1", student))
        assert welcome["user"] == student
        await ws.close()
        # The provider down: the keys already fetched still serve.
        provider.stop()
        ws, _ = await open_client(url + provider.token("k1", student))
        await ws.close()


async def test_no_signing_keys_at_all_is_a_503_not_a_401(redis_url: str, student: str) -> None:
    """The client must not throw its token away for the provider's outage."""
    async with start_gateway(
        redis_url, NOTIFY_JWT_SECRET="", NOTIFY_JWKS_URL="http://127.0.0.1:9/jwks.json"
    ) as gateway:
        claims = {"sub": student, "exp": int(time.time()) + 60}
        token = jwt.encode(claims, "k" * 32, algorithm="HS256", headers={"kid": "k1"})
        url = f"{gateway.url.replace('http', 'ws', 1)}/ws?token={token}"
        with pytest.raises(InvalidStatus) as refused:
            await connect(url)
        assert refused.value.response.status_code == 503
