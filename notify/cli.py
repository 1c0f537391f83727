"""The ``notify`` command: run the services, mint dev tokens, produce test events.

The top of the import graph: each command imports the service it runs only when it runs,
so ``notify token`` does not load uvicorn and a bridge host never imports the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.rules import RuleError

from . import api_client, config


def _configure_logging(process: str) -> None:
    from . import logs

    logs.configure(os.environ.get("NOTIFY_LOG_LEVEL", "INFO"), process)


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
    from gateway import server

    settings = config.load_gateway(os.environ)
    _configure_logging("gateway")
    return server.serve(settings, args.processes)


def cmd_bridge(_args: argparse.Namespace) -> int:
    from bridge import rules, service
    from bridge.consumer import Bridge

    settings = config.load_bridge(os.environ)
    rule_set = rules.load(settings.rules_path)
    _configure_logging("bridge")
    _run(service.run(lambda: Bridge(settings, rule_set), settings.host, settings.port))
    return 0


def cmd_outbox(_args: argparse.Namespace) -> int:
    from bridge import rules, service
    from bridge.outbox.relay import Relay

    settings = config.load_outbox(os.environ)
    rule_set = rules.load(settings.rules_path)
    _configure_logging("outbox")
    _run(service.run(lambda: Relay(settings, rule_set), settings.host, settings.port))
    return 0


def cmd_outbox_init(_args: argparse.Namespace) -> int:
    from bridge.outbox import admin

    _run(admin.init(config.load_outbox_table(os.environ)))
    return 0


def cmd_outbox_failed(args: argparse.Namespace) -> int:
    from bridge.outbox import admin

    _run(admin.show_failed(config.load_outbox_table(os.environ), args.limit))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth import AuthError, mint

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


def _operator(call: Callable[[api_client.Client], str]) -> int:
    """An operator command: one call to the gateway's HTTP API at NOTIFY_URL."""
    try:
        output = call(api_client.Client.from_env(os.environ))
    except api_client.CallFailed as exc:
        print(f"notify: error: {exc}", file=sys.stderr)
        return 1
    print(output)
    return 0


def cmd_trigger_update(args: argparse.Namespace) -> int:
    return _operator(
        lambda c: api_client.trigger_update(c, args.student_id, args.course_id, args.reason)
    )


def cmd_publish(args: argparse.Namespace) -> int:
    return _operator(
        lambda c: api_client.publish(c, args.user_id, args.event, args.data, args.invalidate)
    )


def cmd_presence(args: argparse.Namespace) -> int:
    return _operator(lambda c: api_client.presence(c, args.user_id))


def cmd_history(args: argparse.Namespace) -> int:
    return _operator(lambda c: api_client.history(c, args.user_id, args.limit))


def cmd_dev(_args: argparse.Namespace) -> int:
    from .dev import run_dev

    _configure_logging("dev")
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
    outbox = sub.add_parser("outbox", help="relay the PostgreSQL outbox (the default: run)")
    outbox.set_defaults(func=cmd_outbox)
    actions = outbox.add_subparsers(metavar="action")
    actions.add_parser("run", help="relay its rows").set_defaults(func=cmd_outbox)
    actions.add_parser("init", help="create its table").set_defaults(func=cmd_outbox_init)
    failed = actions.add_parser("failed", help="list the rows set aside, newest first")
    failed.add_argument("--limit", type=_positive, default=20, help="failed rows to show")
    failed.set_defaults(func=cmd_outbox_failed)
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
    trigger.set_defaults(func=cmd_trigger_update)
    publish = sub.add_parser("publish", help="publish a notification through the HTTP API")
    publish.add_argument("user_id")
    publish.add_argument("event", help="e.g. COURSE_PURCHASED")
    publish.add_argument("--data", help="a JSON object")
    publish.add_argument("--invalidate", help="store names, comma-separated: home,learning")
    publish.set_defaults(func=cmd_publish)
    presence = sub.add_parser("presence", help="how many devices a student has connected")
    presence.add_argument("user_id")
    presence.set_defaults(func=cmd_presence)
    history = sub.add_parser("history", help="a student's recent notifications")
    history.add_argument("user_id")
    history.add_argument("--limit", type=int, default=20)
    history.set_defaults(func=cmd_history)
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
