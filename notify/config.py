"""Settings read from environment variables, once, at start-up.

Each process kind (gateway, bridge, CLI helpers) loads only what it needs, so a bridge host
does not have to carry the JWT secret and a gateway host does not need Kafka. Every problem
raises :class:`ConfigError` whose message is the single line the CLI prints: it starts with
the variable's name so an operator knows what to fix without reading a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from redis.asyncio.connection import parse_url

from .cache_keys import CacheKeyTemplate

DEFAULT_TOPICS = ("purchase.events", "allocation.events", "session.events")
# RFC 7518 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{0,32}$")


class ConfigError(Exception):
    """A missing or malformed setting; ``str()`` is the one line shown to the operator."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _required(env: Mapping[str, str], name: str, example: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ConfigError(name, f"is required (for example {example})")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(name, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _redis_url(env: Mapping[str, str]) -> str:
    url = _required(env, "REDIS_URL", "redis://127.0.0.1:6379/0")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ConfigError("REDIS_URL", "must be a redis://, rediss:// or unix:// URL")
    return url


def load_redis_cluster(env: Mapping[str, str]) -> bool:
    """The ``REDIS_CLUSTER`` switch alone (``notify dev`` starts a cluster on it)."""
    raw = (_get(env, "REDIS_CLUSTER") or "0").lower()
    if raw not in ("0", "1", "false", "true"):
        raise ConfigError("REDIS_CLUSTER", f"must be 1 or 0, got {raw!r}")
    return raw in ("1", "true")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the Redis of notifications is (one node, or any node of a cluster), and the
    namespace that keeps this deployment's keys and channels apart from others there."""

    url: str
    cluster: bool
    namespace: str


def load_redis(env: Mapping[str, str]) -> RedisSettings:
    url = _redis_url(env)
    cluster = load_redis_cluster(env)
    if cluster and urlsplit(url).scheme == "unix":
        raise ConfigError("REDIS_CLUSTER", "a cluster is reached over TCP, not a unix:// URL")
    db = parse_url(url).get("db", 0)
    if cluster and db != 0:
        raise ConfigError("REDIS_URL", "a cluster has database 0 only")
    # Pub/Sub ignores the database: deployments sharing a Redis through database indexes
    # would share channels without a namespace of their own.
    namespace = _get(env, "NOTIFY_NAMESPACE") or ("" if db == 0 else f"db{db}")
    if not _NAMESPACE.match(namespace):
        raise ConfigError("NOTIFY_NAMESPACE", f"must match {_NAMESPACE.pattern}, got {namespace!r}")
    return RedisSettings(url, cluster, namespace)


def _bootstrap(env: Mapping[str, str]) -> str:
    raw = _required(env, "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    for server in raw.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", f"expected host:port, got {server!r}")
    return raw


def _topic(name: str, raw: str) -> str:
    if not _TOPIC.match(raw):
        raise ConfigError(name, f"{raw!r} is not a valid Kafka topic name")
    return raw


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How student tokens are verified (and, with a shared secret, minted)."""

    # The HS256 secret or the PEM public key; None when keys come from ``jwks_url``.
    key: str | None
    algorithms: tuple[str, ...]
    audience: str | None
    issuer: str | None
    # Seconds of clock difference tolerated on exp, nbf and iat.
    leeway: int = 5
    jwks_url: str | None = None
    # Seconds a JWKS is trusted before it is fetched again.
    jwks_refresh: int = 300

    @property
    def can_mint(self) -> bool:
        return self.algorithms == ("HS256",)


def load_jwt(env: Mapping[str, str]) -> JwtSettings:
    secret = _get(env, "NOTIFY_JWT_SECRET")
    pem = _get(env, "NOTIFY_JWT_PUBLIC_KEY")
    jwks = _get(env, "NOTIFY_JWKS_URL")
    audience = _get(env, "NOTIFY_JWT_AUDIENCE")
    issuer = _get(env, "NOTIFY_JWT_ISSUER")
    leeway = _int(env, "NOTIFY_JWT_LEEWAY", 5, 0, 300)
    if sum(bool(source) for source in (secret, pem, jwks)) > 1:
        raise ConfigError(
            "NOTIFY_JWT_SECRET", "set one of it, NOTIFY_JWT_PUBLIC_KEY and NOTIFY_JWKS_URL"
        )
    if secret:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError("NOTIFY_JWT_SECRET", f"must be at least {MIN_SECRET_BYTES} bytes")
        return JwtSettings(secret, ("HS256",), audience, issuer, leeway)
    if jwks:
        if urlsplit(jwks).scheme not in ("http", "https"):
            raise ConfigError("NOTIFY_JWKS_URL", "must be an http:// or https:// URL")
        refresh = _int(env, "NOTIFY_JWKS_REFRESH", 300, 1, 86_400)
        # Each key's algorithm comes from the set; asymmetric ones only.
        return JwtSettings(
            None, ("RS256", "ES256", "EdDSA"), audience, issuer, leeway, jwks, refresh
        )
    if pem:
        # Pinning the algorithm to the key type prevents algorithm-confusion attacks
        # (an HS256 token "signed" with the public key as its secret).
        try:
            key = load_pem_public_key(pem.replace("\\n", "\n").encode())
        except ValueError:
            raise ConfigError("NOTIFY_JWT_PUBLIC_KEY", "is not a PEM public key") from None
        if isinstance(key, rsa.RSAPublicKey):
            algorithms: tuple[str, ...] = ("RS256",)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            algorithms = ("ES256",)
        else:
            raise ConfigError("NOTIFY_JWT_PUBLIC_KEY", "must be an RSA or EC (P-256) key")
        return JwtSettings(pem.replace("\\n", "\n"), algorithms, audience, issuer, leeway)
    raise ConfigError(
        "NOTIFY_JWT_SECRET",
        "is required (or NOTIFY_JWT_PUBLIC_KEY for RS256/ES256 tokens, or NOTIFY_JWKS_URL)",
    )


class Role(Enum):
    """What an API key may do. A publisher (a backend service) publishes notifications; an
    operator also fires trigger-updates, reads histories, presence and the audit log, and
    obtains watch tokens (the console)."""

    PUBLISHER = "publisher"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    role: Role


def _api_keys(env: Mapping[str, str]) -> dict[str, ApiKey]:
    raw = _get(env, "NOTIFY_API_KEYS")
    keys: dict[str, ApiKey] = {}
    if raw is None:
        return keys
    roles = {role.value: role for role in Role}
    for item in raw.split(","):
        label, sep, key = item.strip().partition("=")
        name, _, role = label.partition(":")
        if not sep or not _KEY_NAME.match(name) or len(key) < 16:
            raise ConfigError(
                "NOTIFY_API_KEYS",
                "expected name=key or name:role=key items separated by commas, names "
                "[A-Za-z0-9_.-], keys of at least 16 characters",
            )
        if role and role not in roles:
            raise ConfigError("NOTIFY_API_KEYS", f"{name}: the role must be publisher or operator")
        if name in keys:
            raise ConfigError("NOTIFY_API_KEYS", f"the name {name!r} appears twice")
        keys[name] = ApiKey(key, roles.get(role, Role.PUBLISHER))
    return keys


@dataclass(frozen=True, slots=True)
class HistorySettings:
    """How much of each student's past the publish contract keeps for resume."""

    # Events kept per student, and seconds they are kept after the student's last event.
    size: int
    ttl: int
    # Seconds a student's position (the incarnation and last sequence number) and Kafka
    # positions outlive the student's last publish or connection: a client resuming within
    # it is told exactly what it missed; a Kafka replay within it notifies nothing twice.
    position_ttl: int
    # Seconds an event id or idempotency key is remembered.
    dedupe_ttl: int


def load_history(env: Mapping[str, str]) -> HistorySettings:
    ttl = _int(env, "NOTIFY_HISTORY_TTL", 86_400, 60, 30 * 86_400)
    return HistorySettings(
        size=_int(env, "NOTIFY_HISTORY_SIZE", 100, 1, 100_000),
        ttl=ttl,
        position_ttl=_int(env, "NOTIFY_POSITION_TTL", 30 * 86_400, ttl, 365 * 86_400),
        dedupe_ttl=_int(env, "NOTIFY_DEDUPE_TTL", 86_400, 86_400, 30 * 86_400),
    )


# The backend's cached views of a student (the seeds' 5-minute keys), the same ones the
# built-in rules delete; tests/test_config.py keeps the two lists equal.
DEFAULT_CACHE_KEYS = "student:home:{studentId},student:learning:{studentId}"
_CACHE_KEY_FIELDS = {"studentId", "courseId"}


def _cache_keys(env: Mapping[str, str]) -> tuple[CacheKeyTemplate, ...]:
    """Templates of the backend cache keys a trigger-update deletes."""
    raw = _get(env, "NOTIFY_CACHE_KEYS") or DEFAULT_CACHE_KEYS
    templates = []
    for text in (t.strip() for t in raw.split(",") if t.strip()):
        try:
            template = CacheKeyTemplate.parse(text)
        except ValueError as exc:
            raise ConfigError("NOTIFY_CACHE_KEYS", str(exc)) from None
        if not template.fields <= _CACHE_KEY_FIELDS:
            raise ConfigError(
                "NOTIFY_CACHE_KEYS", f"{text!r}: only {{studentId}} and {{courseId}} exist"
            )
        templates.append(template)
    return tuple(templates)


def _host(env: Mapping[str, str]) -> str:
    return _get(env, "NOTIFY_HOST") or "0.0.0.0"  # noqa: S104 - a service binds all interfaces


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    redis: RedisSettings
    host: str
    port: int
    jwt: JwtSettings
    api_keys: dict[str, ApiKey]
    history: HistorySettings
    send_queue_bytes: int
    # Seconds.
    ping_interval: int
    ping_timeout: int
    max_connections: int
    max_connections_per_user: int
    # Connections before their request head (slowloris): seconds to deliver it, how many
    # at once per process, and new ones per second per client address (0: no limit).
    handshake_timeout: int
    max_pending_connections: int
    connect_rate: int
    presence_ttl: int
    api_rate_limit: int
    cache_keys: tuple[CacheKeyTemplate, ...]


def load_gateway(env: Mapping[str, str]) -> GatewaySettings:
    return GatewaySettings(
        redis=load_redis(env),
        host=_host(env),
        port=_int(env, "PORT", 8000, 1, 65_535),
        jwt=load_jwt(env),
        api_keys=_api_keys(env),
        history=load_history(env),
        send_queue_bytes=_int(env, "NOTIFY_SEND_QUEUE_BYTES", 1 << 20, 4096, 1 << 30),
        ping_interval=_int(env, "NOTIFY_PING_INTERVAL", 20, 1, 3600),
        ping_timeout=_int(env, "NOTIFY_PING_TIMEOUT", 20, 1, 3600),
        max_connections=_int(env, "NOTIFY_MAX_CONNECTIONS", 50_000, 1, 10_000_000),
        max_connections_per_user=_int(env, "NOTIFY_MAX_CONNECTIONS_PER_USER", 10, 1, 10_000),
        handshake_timeout=_int(env, "NOTIFY_HANDSHAKE_TIMEOUT", 10, 1, 300),
        max_pending_connections=_int(env, "NOTIFY_MAX_PENDING_CONNECTIONS", 1000, 1, 1_000_000),
        connect_rate=_int(env, "NOTIFY_CONNECT_RATE", 200, 0, 1_000_000),
        presence_ttl=_int(env, "NOTIFY_PRESENCE_TTL", 45, 3, 600),
        api_rate_limit=_int(env, "NOTIFY_API_RATE_LIMIT", 100, 1, 1_000_000),
        cache_keys=_cache_keys(env),
    )


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str
    topics: tuple[str, ...]
    group: str
    dlq_topic: str
    offset_reset: str


def load_kafka(env: Mapping[str, str]) -> KafkaSettings:
    raw_topics = _get(env, "NOTIFY_KAFKA_TOPICS")
    topics = (
        tuple(_topic("NOTIFY_KAFKA_TOPICS", t.strip()) for t in raw_topics.split(","))
        if raw_topics
        else DEFAULT_TOPICS
    )
    reset = _get(env, "NOTIFY_KAFKA_OFFSET_RESET") or "earliest"
    if reset not in ("earliest", "latest"):
        raise ConfigError("NOTIFY_KAFKA_OFFSET_RESET", "must be earliest or latest")
    group = _get(env, "NOTIFY_KAFKA_GROUP") or "notify-bridge"
    dlq = _topic("NOTIFY_DLQ_TOPIC", _get(env, "NOTIFY_DLQ_TOPIC") or "notify.dlq")
    if dlq in topics:
        raise ConfigError("NOTIFY_DLQ_TOPIC", "must not be one of NOTIFY_KAFKA_TOPICS")
    return KafkaSettings(_bootstrap(env), topics, group, dlq, reset)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    redis: RedisSettings
    kafka: KafkaSettings
    history: HistorySettings
    rules_path: str | None
    host: str
    port: int


def load_bridge(env: Mapping[str, str]) -> BridgeSettings:
    return BridgeSettings(
        redis=load_redis(env),
        kafka=load_kafka(env),
        history=load_history(env),
        rules_path=_get(env, "NOTIFY_RULES"),
        host=_host(env),
        port=_int(env, "BRIDGE_PORT", 9101, 1, 65_535),
    )


_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class OutboxTable:
    """Where the backend writes its outbox rows."""

    dsn: str
    table: str


def load_outbox_table(env: Mapping[str, str]) -> OutboxTable:
    dsn = _required(env, "NOTIFY_OUTBOX_DSN", "postgresql://app@db:5432/app")
    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise ConfigError("NOTIFY_OUTBOX_DSN", "must be a postgresql:// URL")
    table = _get(env, "NOTIFY_OUTBOX_TABLE") or "notify_outbox"
    if not _TABLE.match(table):
        raise ConfigError("NOTIFY_OUTBOX_TABLE", f"must match {_TABLE.pattern}, got {table!r}")
    return OutboxTable(dsn, table)


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    outbox: OutboxTable
    redis: RedisSettings
    kafka_bootstrap: str
    history: HistorySettings
    rules_path: str | None
    # Seconds a row both stages are done with is kept (0: deleted at once).
    retention: int
    # Forward with an idempotent producer (InitProducerId): Apache Kafka has it; a broker
    # without it (tansu, the embedded dev broker; some managed services) needs False.
    idempotent: bool
    host: str
    port: int


def load_outbox(env: Mapping[str, str]) -> OutboxSettings:
    return OutboxSettings(
        outbox=load_outbox_table(env),
        redis=load_redis(env),
        kafka_bootstrap=_bootstrap(env),
        history=load_history(env),
        rules_path=_get(env, "NOTIFY_RULES"),
        retention=_int(env, "NOTIFY_OUTBOX_RETENTION", 0, 0, 365 * 86_400),
        idempotent=_int(env, "NOTIFY_OUTBOX_IDEMPOTENT", 1, 0, 1) == 1,
        host=_host(env),
        port=_int(env, "OUTBOX_PORT", 9102, 1, 65_535),
    )
