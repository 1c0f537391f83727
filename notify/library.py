"""The Redis function library of the publish contract and the history read (library.lua).

Functions, not scripts: a function library is persisted and replicated by Redis itself, so
a restarted node or a promoted replica has it, and no call needs a SCRIPT EXISTS round trip
first. The library's name and its functions' names carry a hash of its source: gateways
and bridges of two versions, side by side during a deploy, each call their own. A Redis
that has never seen this version (or lost it: a restart without persistence) answers
"Function not found"; :func:`call` loads the library and calls again.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import ResponseError

from .redis_client import Client

_SOURCE = resources.files(__package__).joinpath("library.lua").read_text()
VERSION = hashlib.sha1(_SOURCE.encode()).hexdigest()[:12]  # noqa: S324 - a name, not a secret
CODE = _SOURCE.replace("VERSION", VERSION)
PUBLISH = f"notify_publish_{VERSION}"
READ = f"notify_read_{VERSION}"
RECENT = f"notify_recent_{VERSION}"


def missing(error: BaseException) -> bool:
    """Whether ``error`` says this version of the library is not loaded on that node."""
    return isinstance(error, ResponseError) and "function not found" in str(error).lower()


async def load(redis: Client) -> None:
    """Load the library (on every primary of a cluster); loading it again is harmless."""
    await redis.function_load(CODE, replace=True)


async def call(redis: Client, function: str, keys: list[str], args: list[Any]) -> Any:
    """FCALL ``function``, loading the library first if the node does not have it."""
    try:
        return await redis.fcall(function, len(keys), *keys, *args)
    except ResponseError as exc:
        if not missing(exc):
            raise
    await load(redis)
    return await redis.fcall(function, len(keys), *keys, *args)
