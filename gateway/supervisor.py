"""``notify gateway --processes N``: N gateway processes sharing one port on one host.

Each child binds its own listening socket with SO_REUSEPORT (see :func:`.server.listen`) and
the kernel spreads new connections over them; the children share nothing but Redis, exactly
like gateways on separate machines. The supervisor only starts them, restarts one that dies
(its clients reconnect to the others meanwhile and resume from history), and passes SIGTERM
and SIGINT on, so that each child closes its sockets with 1012.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from notify import processes

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


def run(count: int) -> int:
    command = processes.notify("gateway")
    children = [processes.spawn(command) for _ in range(count)]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d gateway processes: %s", count, [c.pid for c in children])
    while not stopping or any(child.poll() is None for child in children):
        time.sleep(0.2)
        for i, child in enumerate(children):
            code = child.poll()
            if code is not None and not stopping:
                log.warning("gateway process %d exited with %s; restarting it", child.pid, code)
                time.sleep(RESTART_DELAY)
                children[i] = processes.spawn(command)
    return 0
