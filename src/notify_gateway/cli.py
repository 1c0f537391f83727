"""The ``notify`` command: run the services, mint dev tokens, produce test events."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from . import config
from .bridge.rules import RuleError


def _configure_logging() -> None:
    from . import logs

    logs.configure(os.environ.get("NOTIFY_LOG_LEVEL", "INFO"))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from .gateway import supervisor
    from .gateway.app import create_app
    from .gateway.server import listen, uvicorn_config

    settings = config.load_gateway(os.environ)
    _configure_logging()
    if args.processes > 1:
        return supervisor.run(args.processes)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run(sockets=[listen(settings)])
    return 0


def cmd_bridge(_args: argparse.Namespace) -> int:
    from .bridge import probes, rules
    from .bridge.consumer import Bridge

    settings = config.load_bridge(os.environ)
    rule_set = rules.load(settings.rules_path)
    _configure_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bridge = Bridge(settings, rule_set)
        probe_server = probes.server(bridge, settings.host, settings.port)
        serving = asyncio.create_task(probe_server.serve())
        try:
            await bridge.run(stop)
        finally:
            probe_server.should_exit = True
            await serving

    _run(main())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .gateway.auth import AuthError, mint

    settings = config.load_jwt(os.environ)
    try:
        print(mint(settings, args.user_id, args.ttl))
    except AuthError as exc:
        raise config.ConfigError("NOTIFY_JWT_SECRET", str(exc)) from None
    return 0


def _field(raw: str) -> tuple[str, Any]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected k=v, got {raw!r}")
    try:
        return name, orjson.loads(value)
    except orjson.JSONDecodeError:
        return name, value


def cmd_send_event(args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer

    kafka = config.load_kafka(os.environ)
    data: dict[str, Any] = {"studentId": args.student}
    if args.course:
        data["courseId"] = args.course
    data.update(dict(args.field))
    event = {
        "eventId": args.event_id or str(uuid.uuid4()),
        "eventType": args.type,
        "occurredAt": datetime.now(UTC).isoformat(),
        "data": data,
    }
    topic = args.topic or kafka.topics[0]

    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await asyncio.wait_for(producer.start(), 15)
        try:
            sent = await asyncio.wait_for(
                producer.send_and_wait(topic, orjson.dumps(event), key=args.student.encode()), 15
            )
        finally:
            await producer.stop()
        print(f"sent {args.type} {event['eventId']} to {topic}[{sent.partition}]@{sent.offset}")

    try:
        asyncio.run(main())
    except (TimeoutError, OSError) as exc:
        print(f"notify: error: Kafka at {kafka.bootstrap} unreachable: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from . import api_client

    client = api_client.Client.from_env(os.environ)
    try:
        if args.command == "trigger-update":
            output = api_client.trigger_update(client, args.student_id, args.course_id, args.reason)
        elif args.command == "publish":
            output = api_client.publish(
                client, args.user_id, args.event, args.data, args.invalidate
            )
        elif args.command == "presence":
            output = api_client.presence(client, args.user_id)
        else:
            output = api_client.history(client, args.user_id, args.limit)
    except api_client.CallFailed as exc:
        print(f"notify: error: {exc}", file=sys.stderr)
        return 1
    print(output)
    return 0


def cmd_dev(_args: argparse.Namespace) -> int:
    from .dev import run_dev

    _configure_logging()
    return run_dev()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run Redis, Kafka, bridge and gateway locally").set_defaults(
        func=cmd_dev
    )
    gateway = sub.add_parser("gateway", help="serve WebSockets and the HTTP API on $PORT")
    gateway.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="run N gateway processes sharing $PORT (SO_REUSEPORT), restarting any that dies",
    )
    gateway.set_defaults(func=cmd_gateway)
    sub.add_parser("bridge", help="consume Kafka domain events").set_defaults(func=cmd_bridge)
    token = sub.add_parser("token", help="mint a student JWT with NOTIFY_JWT_SECRET")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.set_defaults(func=cmd_token)
    send = sub.add_parser("send-event", help="produce a domain event to Kafka")
    send.add_argument("type", help="eventType, e.g. PURCHASE_CREATED")
    send.add_argument("--student", required=True, help="studentId (also the message key)")
    send.add_argument("--course", help="courseId")
    send.add_argument(
        "--field", type=_field, action="append", default=[], help="extra data field k=v"
    )
    send.add_argument("--topic", help="default: the first of NOTIFY_KAFKA_TOPICS")
    send.add_argument("--event-id", help="default: a new UUID")
    send.set_defaults(func=cmd_send_event)

    # Operator commands: the HTTP API of the gateway at NOTIFY_URL, with NOTIFY_API_KEY.
    trigger = sub.add_parser(
        "trigger-update", help="delete a student's cache keys and push an update (audited)"
    )
    trigger.add_argument("student_id")
    trigger.add_argument("--course-id")
    trigger.add_argument("--reason", help="recorded in the audit log")
    publish = sub.add_parser("publish", help="publish a notification through the HTTP API")
    publish.add_argument("user_id")
    publish.add_argument("event", help="e.g. COURSE_PURCHASED")
    publish.add_argument("--data", help="a JSON object")
    publish.add_argument("--invalidate", help="store names, comma-separated: home,learning")
    presence = sub.add_parser("presence", help="how many devices a student has connected")
    presence.add_argument("user_id")
    history = sub.add_parser("history", help="a student's recent notifications")
    history.add_argument("user_id")
    history.add_argument("--limit", type=int, default=20)
    for command in (trigger, publish, presence, history):
        command.set_defaults(func=cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (config.ConfigError, RuleError) as exc:
        print(f"notify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
