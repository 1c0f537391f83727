"""``notify dev`` on a bare machine: it starts everything, and its banner's commands work."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from websockets.sync.client import connect

from notify import embedded, processes


def descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("cluster", ["0", "1"], ids=["single", "cluster"])
def test_dev_prints_its_urls_and_the_demo_command_works_then_stops_cleanly(cluster: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "REDIS_", "KAFKA_"))}
    env["PORT"] = str(embedded.free_port())
    env["REDIS_CLUSTER"] = cluster  # "1": an embedded 3-master Redis Cluster
    started = time.monotonic()
    dev = subprocess.Popen(
        processes.notify("dev"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert dev.stdout is not None
    banner = ""
    try:
        while "through the outbox" not in banner or "INSERT" not in banner.rstrip().split("\n")[-1]:
            assert time.monotonic() - started < 30, f"no banner within 30 s:\n{banner}"
            # Raw reads: a buffered readline() would hide data from select().
            ready, _, _ = select.select([dev.stdout], [], [], 1)
            if ready:
                banner += os.read(dev.stdout.fileno(), 65536).decode()
        ws_url = re.search(r"'(ws://\S+/ws\?token=\S+)'", banner)
        send = re.search(r"(KAFKA_BOOTSTRAP_SERVERS=\S+ .*send-event .*\\\n.*)", banner)
        insert = banner.rstrip().splitlines()[-1].strip()
        node = next(line.strip() for line in banner.splitlines() if "NotifyClient" in line)
        assert ws_url, banner
        assert send, banner
        command = send.group(1).replace("\\\n", " ")
        # The Node one-liner, as printed, subscribes with the JS client package.
        subscriber = subprocess.Popen(f"exec {node}", shell=True, stdout=subprocess.PIPE)
        with connect(ws_url.group(1)) as ws:
            assert orjson.loads(ws.recv(5))["type"] == "welcome"
            time.sleep(1)  # the Node client's welcome too
            command = command.replace(command.split()[1], f"{sys.executable} -m notify", 1)
            subprocess.run(command, shell=True, check=True, timeout=60, capture_output=True)
            frame = orjson.loads(ws.recv(30))
            # The outbox line, as printed: psql commits a row; the relay notifies at once.
            subprocess.run(insert, shell=True, check=True, timeout=30, capture_output=True)
            outboxed = orjson.loads(ws.recv(30))
        assert frame["event"] == "COURSE_PURCHASED"
        assert frame["data"]["purchaseTier"] == 30
        assert outboxed["event"] == "PAYMENT_CONFIRMED"
        assert outboxed["data"]["amount"] == 360000
        # The Node client prints each event as it lands, which may be after ours: read its
        # lines until both arrived (terminating it first could drop a line still in its pipe).
        assert subscriber.stdout is not None
        printed, deadline = "", time.monotonic() + 10
        while "PAYMENT_CONFIRMED" not in printed and time.monotonic() < deadline:
            ready, _, _ = select.select([subscriber.stdout], [], [], 1)
            if ready:
                printed += os.read(subscriber.stdout.fileno(), 65536).decode()
        subscriber.terminate()
        subscriber.wait(10)
        assert "COURSE_PURCHASED" in printed, printed
        assert "PAYMENT_CONFIRMED" in printed, printed
        family = descendants(dev.pid)
        # valkey-server (three with a cluster), tansu, postgres, bridge, relay, gateway
        assert len(family) >= (8 if cluster == "1" else 6)
    finally:
        dev.send_signal(signal.SIGTERM)
        code = dev.wait(20)
    assert code == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in family if alive(pid)], "orphan processes left behind"
