"""Rate limits held in the process's memory, so that enforcing them costs no Redis call.

They guard what an unauthenticated client can do (open connections, present wrong API
keys), where a limit that needs a round trip to the Redis carrying the notifications would
let the abuse reach that Redis, and what each API key may ask, where that round trip cost
more than the publish it guarded (docs/performance.md). Each process keeps its own view.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Names tracked before the ones that have been quiet long enough to be full again are
# forgotten: the memory stays bounded whatever the number of clients.
MAX_TRACKED = 10_000


class RateLimiter:
    """A token bucket per name (a client address, an API key's name): ``rate`` per second,
    bursts up to ``burst``."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        # name -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, address: str) -> bool:
        """Take one token of ``address``'s bucket (any name); False if it is empty."""
        now = self._clock()
        tokens, then = self._buckets.get(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return False
        if len(self._buckets) >= MAX_TRACKED and address not in self._buckets:
            self._forget_full(now)
        self._buckets[address] = (tokens - 1, now)
        return True

    def _forget_full(self, now: float) -> None:
        full = self._burst / self._rate
        self._buckets = {
            address: (tokens, then)
            for address, (tokens, then) in self._buckets.items()
            if now - then < full
        }
        if len(self._buckets) >= MAX_TRACKED:
            # Busy from more addresses than it tracks (a distributed flood): start over.
            # The cap on pending connections still bounds what the flood holds open.
            self._buckets.clear()
