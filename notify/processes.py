"""Child processes: how the supervisor, ``notify dev``, the tests and the bench start them.

Children are started with PR_SET_PDEATHSIG so they die with the process that started them,
even when it is killed with SIGKILL: a supervisor or a test run that crashes must not leave
gateways holding the port, or servers holding the machine's memory.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import IO

_PR_SET_PDEATHSIG = 1


def notify(*args: str) -> list[str]:
    """The ``notify`` command line for this interpreter, e.g. ``notify("gateway")``.

    Run as ``python -m notify``, not through the console script: a child then uses the
    same interpreter and packages as its parent, in a virtualenv or not.
    """
    return [sys.executable, "-m", "notify", *args]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    quiet: bool = False,
    log: IO[bytes] | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child that dies with us; its output is inherited, discarded or sent to ``log``.

    ``user``: run it as that system user (PostgreSQL refuses to run as root). The death
    signal is set after the switch, which would otherwise clear it.
    """
    output: IO[bytes] | int | None = subprocess.DEVNULL if quiet else log
    return subprocess.Popen(  # noqa: S603 - arguments are built by the caller, not a shell
        list(args),
        env=env,
        stdout=output,
        stderr=output,
        user=user,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop(
    process: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    """``sig``, then SIGKILL if the child has not exited within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
