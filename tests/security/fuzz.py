"""A small seeded fuzzer: random JSON, random bytes, and mutations of valid inputs.

Mutating valid samples reaches deep validation branches that purely random data rarely
does, and a seeded generator makes any failure reproducible from its index.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import orjson

_KEYS = [
    "user_id", "event", "data", "invalidate", "idempotency_key", "notifications", "student_id",
    "course_id", "reason", "eventId", "eventType", "type", "occurredAt", "timestamp", "payload",
    "studentId", "courseId", "purchaseId", "trainerId", "sessionCount",
]  # fmt: skip
_TEXT = [
    "",
    "a",
    "A_B",
    "PURCHASE_CREATED",
    "home",
    "x" * 300,
    "é☃\u0000\ud7ff",
    "{u:x}",
    "0",
    "-1",
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-9, rng.random()])
    if kind in (4, 5):
        return rng.choice([*_TEXT, "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(8))])
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(_KEYS) if rng.random() < 0.8 else rng.choice(_TEXT): random_json(rng, depth + 1)
        for _ in range(rng.randrange(5))
    }


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[at % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        elif op == 2:
            del buf[at : at + rng.randrange(1, 8)]
        elif op == 3:
            buf = buf[:at]
        else:
            buf[at:at] = rng.choice([b'"', b"{", b"}", b"[", b",", b":", b"\\", b"\x00", b"null"])
    return bytes(buf)


def inputs(seed: int, samples: list[Any], count: int) -> Iterator[bytes]:
    """``count`` inputs: a third random JSON, a third mutated samples, the rest mixtures."""
    rng = random.Random(seed)
    encoded = [orjson.dumps(s) for s in samples]
    for i in range(count):
        mode = i % 3
        if mode == 0:
            yield orjson.dumps(random_json(rng))
        elif mode == 1:
            yield mutate(rng, rng.choice(encoded))
        elif rng.random() < 0.5:
            sample = dict(rng.choice(samples))
            sample[rng.choice(_KEYS)] = random_json(rng)
            yield orjson.dumps(sample)
        else:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
