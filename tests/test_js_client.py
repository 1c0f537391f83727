"""The JS client package (clients/js): its own tests under Node 20 against a real gateway, and
the packed tarball as a fresh app installs it, type-checks against it and runs it.

Both need the package's dev dependencies (TypeScript), which ``make test`` installs with
``npm ci`` from the lockfile; Node and npm are the machine's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from .support import (
    API_KEY,
    JWT_SECRET,
    GatewayServer,
    TcpProxy,
    domain_event,
    produce,
    token,
)
from .test_bridge import run_bridge

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
TSC = JS / "node_modules" / ".bin" / "tsc"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="needs Node.js 20+ and npm on the PATH",
)


@pytest.fixture(scope="module")
def dev_dependencies() -> None:
    if not TSC.exists():
        pytest.fail("clients/js/node_modules is missing: run `make test` (it runs npm ci there)")


async def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{text}"
    return text


async def test_the_package_tests_pass_against_a_real_gateway(
    dev_dependencies: None, gateway: GatewayServer
) -> None:
    output = await run(
        "node",
        "--experimental-websocket",
        "--test",
        "--test-timeout=30000",
        "test/client.test.mjs",
        cwd=JS,
        env={
            "NOTIFY_TEST_WS_URL": f"{gateway.url.replace('http', 'ws', 1)}/ws",
            "NOTIFY_TEST_API_URL": gateway.url,
            "NOTIFY_TEST_API_KEY": API_KEY,
            "NOTIFY_TEST_JWT_SECRET": JWT_SECRET,
        },
    )
    assert "# fail 0" in output, output
    print(output[output.rfind("# tests") :])


async def test_the_declarations_describe_the_protocol(dev_dependencies: None) -> None:
    await run(str(TSC), "-p", "tsconfig.json", cwd=JS)


APP = """
import { NotifyClient } from "@notify-gateway/client";

declare const process: { env: Record<string, string | undefined> };
declare const console: { log(line: string): void };

const say = (line: object): void => console.log(JSON.stringify(line));
const positions: string[] = [];
let events = 0;
const client = new NotifyClient({
  url: process.env.APP_WS_URL ?? "",
  getToken: async () => process.env.APP_TOKEN ?? "",
  stores: {
    home: async () => say({ reload: "home" }),
    learning: async () => say({ reload: "learning" }),
  },
  onEvent: (event, data, _invalidate, frame) => {
    events += 1;
    say({ event, id: frame.id, data });
  },
  onStateChange: (state, detail) => say({ state, recovered: detail.recovered ?? null }),
  storage: {
    get: () => positions.at(-1) ?? null,
    set: (id) => {
      positions.push(id);
      say({ position: id });
      if (events === 2) client.stop();
    },
  },
  minDelayMs: 50,
  maxDelayMs: 200,
});
client.start();
"""

TSCONFIG = {
    "compilerOptions": {
        "target": "ES2022",
        "module": "NodeNext",
        "moduleResolution": "NodeNext",
        "strict": True,
        "types": [],
        "outDir": "dist",
    },
    "files": ["main.ts"],
}


async def test_a_fresh_app_installs_the_tarball_and_gets_a_kafka_event_across_a_drop(
    dev_dependencies: None,
    tmp_path: Path,
    gateway: GatewayServer,
    redis_url: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    """The app developer's first hour: npm pack, install, type-check, run."""
    packed = await run("npm", "pack", "--pack-destination", str(tmp_path), cwd=JS)
    tarball = tmp_path / packed.strip().splitlines()[-1]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "type": "module"}))
    await run("npm", "install", "--no-audit", "--no-fund", "--offline", str(tarball), cwd=app)
    (app / "main.ts").write_text(APP)
    (app / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    await run(str(TSC), "-p", "tsconfig.json", cwd=app)

    front = TcpProxy(_free_port(), int(gateway.url.rsplit(":", 1)[1]))
    await front.start()
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        program = await asyncio.create_subprocess_exec(
            "node",
            "--experimental-websocket",
            "dist/main.js",
            cwd=app,
            env={
                **os.environ,
                "APP_WS_URL": f"ws://127.0.0.1:{front.port}/ws",
                "APP_TOKEN": token(student),
            },
            stdout=asyncio.subprocess.PIPE,
        )
        assert program.stdout is not None
        lines: list[dict[str, Any]] = []

        async def until(check: Any) -> None:
            while not any(check(line) for line in lines):
                raw = await asyncio.wait_for(program.stdout.readline(), 30)  # type: ignore[union-attr]
                assert raw, f"the app exited early: {lines}"
                lines.append(orjson.loads(raw))

        purchase: dict[str, Any] = {"courseId": "c1", "purchaseId": "p1", "purchaseTier": 30}
        await until(lambda line: line.get("state") == "connected")
        await produce(
            kafka_bootstrap,
            bridge.topic,
            [domain_event("PURCHASE_CREATED", studentId=student, **purchase)],
            key=student,
        )
        await until(lambda line: line.get("event") == "COURSE_PURCHASED")
        await front.cut()  # the connection drops; the next event is published meanwhile
        await produce(
            kafka_bootstrap,
            bridge.topic,
            [domain_event("SESSIONS_GENERATED", studentId=student, courseId="c1", sessionCount=30)],
            key=student,
        )
        await asyncio.sleep(1)
        await front.restore()
        await until(lambda line: line.get("event") == "SESSIONS_GENERATED")
        assert await asyncio.wait_for(program.wait(), 10) == 0
        lines.extend(orjson.loads(raw) for raw in (await program.stdout.read()).splitlines())
    await front.cut()
    print("\n".join(json.dumps(line) for line in lines))
    events = [line for line in lines if "event" in line]
    assert [e["event"] for e in events] == ["COURSE_PURCHASED", "SESSIONS_GENERATED"]
    assert events[0]["data"] == purchase
    assert {"state": "connected", "recovered": True} in lines  # resumed across the drop
    # Each event's stores were reloaded before its position was stored.
    for event in events:
        at = lines.index(event)
        assert {line["reload"] for line in lines[at - 2 : at] if "reload" in line} == {
            "home",
            "learning",
        }
        assert lines[at + 1] == {"position": event["id"]}


def _free_port() -> int:
    from notify import embedded

    return embedded.free_port()


def test_the_gateway_serves_the_package_source() -> None:
    """One source: /client/notify-client.js is the package's file (a symlink in gateway/)."""
    served = Path(__file__).resolve().parent.parent / "gateway" / "static" / "notify-client.js"
    assert served.is_symlink()
    assert served.resolve() == (JS / "notify-client.js").resolve()
