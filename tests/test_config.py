from __future__ import annotations

import pytest

from bridge import rules
from notify import config
from notify.config import ConfigError

BASE = {"REDIS_URL": "redis://127.0.0.1:6379/0", "NOTIFY_JWT_SECRET": "s" * 32}


def test_gateway_defaults() -> None:
    settings = config.load_gateway(BASE)
    assert settings.port == 8000
    assert settings.jwt.algorithms == ("HS256",)
    assert settings.history.size == 100
    assert settings.history.ttl == 86_400
    assert settings.api_keys == {}
    assert settings.redis.cluster is False


def test_redis_cluster_switch() -> None:
    assert config.load_gateway({**BASE, "REDIS_CLUSTER": "1"}).redis.cluster
    assert not config.load_gateway({**BASE, "REDIS_CLUSTER": "0"}).redis.cluster


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"REDIS_URL": ""}, "REDIS_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_CLUSTER": "yes"}, "REDIS_CLUSTER"),
        ({"REDIS_CLUSTER": "1", "REDIS_URL": "unix:///tmp/redis.sock"}, "REDIS_CLUSTER"),
        ({"REDIS_CLUSTER": "1", "REDIS_URL": "redis://127.0.0.1:7000/3"}, "REDIS_URL"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"NOTIFY_JWT_SECRET": ""}, "NOTIFY_JWT_SECRET"),
        ({"NOTIFY_JWT_SECRET": "short"}, "NOTIFY_JWT_SECRET"),
        ({"NOTIFY_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"}, "NOTIFY_JWT_SECRET"),
        ({"NOTIFY_API_KEYS": "nokey"}, "NOTIFY_API_KEYS"),
        ({"NOTIFY_API_KEYS": "a=0123456789abcdef,a=0123456789abcdeg"}, "NOTIFY_API_KEYS"),
        ({"NOTIFY_API_KEYS": "a:admin=0123456789abcdef"}, "NOTIFY_API_KEYS"),
        ({"NOTIFY_HISTORY_SIZE": "0"}, "NOTIFY_HISTORY_SIZE"),
    ],
)
def test_bad_gateway_values_name_the_variable(change: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.load_gateway({**BASE, **change})
    assert error.value.name == variable
    assert str(error.value).startswith(f"{variable}: ")
    assert "\n" not in str(error.value)


def test_public_key_selects_its_algorithm() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    env = {"REDIS_URL": BASE["REDIS_URL"], "NOTIFY_JWT_PUBLIC_KEY": pem}
    jwt = config.load_gateway(env).jwt
    assert jwt.algorithms == ("ES256",)
    assert not jwt.can_mint


def test_api_keys_parse() -> None:
    settings = config.load_gateway(
        {
            **BASE,
            "NOTIFY_API_KEYS": "backend=0123456789abcdef, ops:operator=fedcba9876543210",
        }
    )
    assert settings.api_keys == {
        "backend": config.ApiKey("0123456789abcdef", config.Role.PUBLISHER),
        "ops": config.ApiKey("fedcba9876543210", config.Role.OPERATOR),
    }


def test_kafka_settings() -> None:
    kafka = config.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "a:9092,b:9092"})
    assert kafka.topics == ("purchase.events", "allocation.events", "session.events")
    assert kafka.group == "notify-bridge"
    assert kafka.dlq_topic == "notify.dlq"
    with pytest.raises(ConfigError, match=r"^KAFKA_BOOTSTRAP_SERVERS"):
        config.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "nohostport"})
    with pytest.raises(ConfigError, match=r"^NOTIFY_KAFKA_TOPICS"):
        config.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "NOTIFY_KAFKA_TOPICS": "bad topic"})
    with pytest.raises(ConfigError, match=r"^NOTIFY_DLQ_TOPIC"):
        config.load_kafka(
            {"KAFKA_BOOTSTRAP_SERVERS": "a:1", "NOTIFY_KAFKA_TOPICS": "t", "NOTIFY_DLQ_TOPIC": "t"}
        )


def test_a_trigger_update_deletes_what_the_built_in_rules_delete_for_a_student() -> None:
    """NOTIFY_CACHE_KEYS defaults to the backend's cached views the rules also name."""
    defaults = {template.text for template in config.load_gateway(BASE).cache_keys}
    from_rules = {
        template.text
        for rule in rules.load(None).values()
        for template in rule.cache_keys
        if template.fields <= {"studentId", "courseId"}
    }
    assert defaults == from_rules


def test_the_namespace_comes_from_the_database_unless_set() -> None:
    def namespace(url: str, **extra: str) -> str:
        return config.load_redis({"REDIS_URL": url, **extra}).namespace

    assert namespace("redis://h:6379/0") == ""  # the names every deployment had before
    assert namespace("redis://h:6379") == ""
    assert namespace("redis://h:6379/13") == "db13"
    assert namespace("unix:///run/redis.sock?db=2") == "db2"
    assert namespace("redis://h:6379/13", NOTIFY_NAMESPACE="staging") == "staging"
    with pytest.raises(config.ConfigError, match=r"^NOTIFY_NAMESPACE"):
        namespace("redis://h:6379/0", NOTIFY_NAMESPACE="has space")
