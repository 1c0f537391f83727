"""The ``notify`` command's own contract: one-line configuration errors, tokens."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time

import pytest

from gateway.auth import TokenVerifier
from notify import config, embedded, processes

from .support import settings_env


def notify(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "REDIS_", "KAFKA_"))
    }
    return subprocess.run(
        processes.notify(*args),
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "env", "variable"),
    [
        ("gateway", {}, "REDIS_URL"),
        ("gateway", {"REDIS_URL": "redis://x:1"}, "NOTIFY_JWT_SECRET"),
        (
            "gateway",
            {"REDIS_URL": "redis://x:1", "NOTIFY_JWT_SECRET": "s" * 32, "PORT": "x"},
            "PORT",
        ),
        ("bridge", {"REDIS_URL": "redis://x:1"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ("token", {}, "NOTIFY_JWT_SECRET"),
    ],
)
def test_configuration_errors_are_one_line_naming_the_variable(
    command: str, env: dict[str, str], variable: str
) -> None:
    args = [command, "someone"] if command == "token" else [command]
    result = notify(*args, **env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"notify: error: {variable}: ")
    assert result.stderr.count("\n") == 1


def test_bad_rules_file_stops_the_bridge(tmp_path: object) -> None:
    result = notify(
        "bridge",
        REDIS_URL="redis://x:1",
        KAFKA_BOOTSTRAP_SERVERS="x:1",
        NOTIFY_RULES="/nonexistent/rules.toml",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("notify: error: /nonexistent/rules.toml:")


async def test_token_command_mints_a_verifiable_token() -> None:
    secret = "z" * 32
    result = notify("token", "student-42", "--ttl", "120", NOTIFY_JWT_SECRET=secret)
    assert result.returncode == 0, result.stderr
    claims = await TokenVerifier(config.load_jwt({"NOTIFY_JWT_SECRET": secret})).verify(
        result.stdout.strip()
    )
    assert claims.user_id == "student-42"


def test_services_log_readable_lines_on_a_terminal(redis_url: str) -> None:
    """On a terminal (``notify dev`` in a shell) lines are for a person: time, level,
    process, message, coloured; elsewhere they stay JSON for log shippers."""
    port = embedded.free_port()
    terminal, child_side = pty.openpty()
    gateway = subprocess.Popen(
        processes.notify("gateway"),
        env={**os.environ, **settings_env(redis_url, PORT=str(port))},
        stdout=subprocess.DEVNULL,
        stderr=child_side,
    )
    os.close(child_side)
    shown = b""
    try:
        deadline = time.monotonic() + 20
        while b"startup complete" not in shown and time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 0.5)
            if ready:
                shown += os.read(terminal, 65536)
    finally:
        processes.stop(gateway)
        os.close(terminal)
    line = next(x for x in shown.decode().splitlines() if "startup complete" in x)
    assert re.match(
        r"\x1b\[2m\d\d:\d\d:\d\d\.\d{3}\x1b\[0m \x1b\[36mINFO   \x1b\[0m gateway  ", line
    ), repr(line)
    assert "{" not in line
