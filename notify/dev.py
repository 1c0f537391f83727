"""``notify dev``: the whole stack on one machine, from nothing but installed wheels.

It starts what is not given (valkey-server unless ``REDIS_URL``, a 3-master Redis Cluster
of them with ``REDIS_CLUSTER=1``, tansu unless ``KAFKA_BOOTSTRAP_SERVERS``, PostgreSQL
unless ``NOTIFY_OUTBOX_DSN``), creates the topics and the outbox table, runs the bridge,
the outbox relay and the gateway as child processes exactly as the Procfile would, prints
how to watch an event arrive, and stops everything it started on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import FrameType

import orjson

from bridge.outbox import admin
from gateway.auth import mint

from . import config, embedded, processes

DEV_STUDENT = "dev-student"
DEMO_COURSE = "9e16d892-4324-4568-be60-163aa1665683"


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _port(env: dict[str, str]) -> int:
    if env.get("PORT"):
        return int(env["PORT"])
    try:
        with socket.create_server(("127.0.0.1", 8000)):
            return 8000
    except OSError:
        return embedded.free_port()


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + embedded.READY_TIMEOUT
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise RuntimeError("a service exited while starting; see its log above")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready at {url} within {embedded.READY_TIMEOUT:.0f}s")


def run_dev() -> int:
    env = dict(os.environ)
    started: list[embedded.Server | embedded.Cluster] = []
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        if not env.get("REDIS_URL"):
            cluster = config.load_redis_cluster(env)
            started.append(embedded.start_redis_cluster() if cluster else embedded.start_redis())
            env["REDIS_URL"] = started[-1].address
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            started.append(embedded.start_kafka())
            env["KAFKA_BOOTSTRAP_SERVERS"] = started[-1].address
            # The embedded broker has no InitProducerId (Apache Kafka does).
            env.setdefault("NOTIFY_OUTBOX_IDEMPOTENT", "0")
        if not env.get("NOTIFY_OUTBOX_DSN"):
            started.append(embedded.start_postgres())
            env["NOTIFY_OUTBOX_DSN"] = started[-1].address
        env.setdefault("NOTIFY_JWT_SECRET", secrets.token_urlsafe(32))
        env.setdefault("NOTIFY_API_KEYS", f"dev:operator={secrets.token_urlsafe(24)}")
        env.setdefault("NOTIFY_HOST", "127.0.0.1")
        env["PORT"] = str(_port(env))
        env.setdefault("BRIDGE_PORT", str(embedded.free_port()))
        env.setdefault("OUTBOX_PORT", str(embedded.free_port()))
        kafka = config.load_kafka(env)
        asyncio.run(embedded.create_topics(kafka.bootstrap, [*kafka.topics, kafka.dlq_topic]))
        asyncio.run(admin.init(config.load_outbox_table(env)))
        for service in ("bridge", "outbox", "gateway"):
            children.append(processes.spawn(processes.notify(service), env))
        base = f"http://{env['NOTIFY_HOST']}:{env['PORT']}"
        _wait_ready(f"{base}/readyz", children)
        _banner(env, base)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("notify dev: a service exited; stopping the rest", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        for child in children:
            processes.stop(child)
        for server in reversed(started):
            server.stop()


def _banner(env: dict[str, str], base: str) -> None:
    token = mint(config.load_jwt(env), DEV_STUDENT, 7 * 86_400)
    ws = base.replace("http", "ws", 1)
    notify = shlex.quote(str(Path(sys.argv[0]))) if sys.argv[0].endswith("notify") else "notify"
    python = shlex.quote(sys.executable)
    kafka_env = f"KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']}"
    outbox = config.load_outbox_table(env)
    topic = config.load_kafka(env).topics[0]
    print(
        f"""
notify-gateway is running (Ctrl-C stops everything).

  gateway        {base}   (WebSocket: {ws}/ws)
  console        {base}/console   (sign in with the api key below)
  js client      {base}/client/notify-client.js
  bridge probes  http://{env["NOTIFY_HOST"]}:{env["BRIDGE_PORT"]}/metrics
  outbox probes  http://{env["NOTIFY_HOST"]}:{env["OUTBOX_PORT"]}/metrics
  redis          {env["REDIS_URL"]}
  kafka          {env["KAFKA_BOOTSTRAP_SERVERS"]}
  postgresql     {outbox.dsn}   (outbox table {outbox.table})
  jwt secret     NOTIFY_JWT_SECRET={env["NOTIFY_JWT_SECRET"]}
  api keys       NOTIFY_API_KEYS={env["NOTIFY_API_KEYS"]}
  student token  ({DEV_STUDENT}, valid 7 days)
{token}

Watch the student's notifications (in a second terminal):
  {python} -m websockets '{ws}/ws?token={token}'
or with the JS client package (clients/js), from Node 20:
  {_node_snippet(f"{ws}/ws", token)}

Send a demo PURCHASE_CREATED through Kafka (in a third terminal):
  {kafka_env} {notify} send-event PURCHASE_CREATED --student {DEV_STUDENT} \\
      --course {DEMO_COURSE} --field purchaseId={secrets.token_hex(8)} --field purchaseTier=30

Or commit a demo PURCHASE_CONFIRMED through the outbox, as the payment service would (it
reaches the student even with Kafka down, and Kafka once it is back):
  {_outbox_insert(outbox, topic)}
""",
        flush=True,
    )


def _node_snippet(url: str, token: str) -> str:
    """A one-line Node program that subscribes with the client package (README there)."""
    module = resources.files("gateway").joinpath("static", "notify-client.js")
    program = (
        f"import {{ NotifyClient }} from {json.dumps(str(module))}; "
        f"new NotifyClient({{ url: {json.dumps(url)}, getToken: () => {json.dumps(token)}, "
        "onEvent: (event, data, invalidate) => console.log(event, JSON.stringify(data), "
        "invalidate) }).start();"
    )
    return f"node --experimental-websocket --input-type=module -e {shlex.quote(program)}"


def _outbox_insert(outbox: config.OutboxTable, topic: str) -> str:
    """A psql command line that inserts a demo PURCHASE_CONFIRMED row (docs/outbox.md)."""
    event_id = str(uuid.uuid4())
    envelope = {
        "eventId": event_id,
        "eventType": "PURCHASE_CONFIRMED",
        "occurredAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {
            "paymentId": secrets.token_hex(8),
            "studentId": DEV_STUDENT,
            "courseId": DEMO_COURSE,
            "amount": 360000,
        },
    }
    payload = orjson.dumps(envelope).decode()
    # Printed for a developer to paste; every value is ours.
    columns = "(event_id, event_type, key, payload, topic)"
    values = f"('{event_id}', 'PURCHASE_CONFIRMED', '{DEV_STUDENT}', '{payload}', '{topic}')"
    sql = f"INSERT INTO {outbox.table} {columns} VALUES {values}"  # noqa: S608
    psql = shlex.quote(str(embedded.postgres_bin() / "psql"))
    return f"{psql} {shlex.quote(outbox.dsn)} -c {shlex.quote(sql)}"
