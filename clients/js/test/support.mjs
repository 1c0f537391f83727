// What the tests need around a real gateway: tokens, publishing, a TCP proxy to cut.
//
// The gateway, Redis and Kafka are started by the Python test run
// (tests/test_js_client.py), which passes where they are in NOTIFY_TEST_* variables.

import { createHmac } from "node:crypto";
import net from "node:net";

export const env = {
  wsUrl: required("NOTIFY_TEST_WS_URL"),
  apiUrl: required("NOTIFY_TEST_API_URL"),
  apiKey: required("NOTIFY_TEST_API_KEY"),
  jwtSecret: required("NOTIFY_TEST_JWT_SECRET"),
};

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/test_js_client.py`);
  return value;
}

const base64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 student token, as the platform's auth service would mint it. */
export function mint(user, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = base64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSeconds }));
  const signature = createHmac("sha256", env.jwtSecret).update(`${header}.${claims}`).digest();
  return `${header}.${claims}.${base64url(signature)}`;
}

export function student(prefix = "js") {
  return `${prefix}-${Math.random().toString(36).slice(2, 12)}`;
}

/** Publish through the gateway's HTTP API; returns the ids, in order. */
export async function publish(user, notifications) {
  const response = await fetch(`${env.apiUrl}/api/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${env.apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({
      notifications: notifications.map((n) => ({ user_id: user, ...n })),
    }),
  });
  if (response.status !== 202) throw new Error(`publish: ${response.status} ${await response.text()}`);
  return (await response.json()).ids;
}

/** A loopback TCP proxy in front of the gateway: cut() drops every connection through it. */
export async function proxy() {
  const target = new URL(env.wsUrl);
  const sockets = new Set();
  let server = null;
  const listen = (port) =>
    new Promise((resolve) => {
      server = net.createServer((client) => {
        const upstream = net.connect(Number(target.port), target.hostname);
        for (const [a, b] of [[client, upstream], [upstream, client]]) {
          sockets.add(a);
          a.on("data", (chunk) => b.write(chunk));
          a.on("close", () => b.destroy());
          a.on("error", () => b.destroy());
        }
      });
      server.listen(port, "127.0.0.1", () => resolve(server.address().port));
    });
  const port = await listen(0);
  return {
    url: `ws://127.0.0.1:${port}${target.pathname}`,
    /** Refuse new connections and drop every open one. */
    async cut() {
      const closed = new Promise((resolve) => server.close(resolve));
      for (const socket of sockets) socket.destroy();
      sockets.clear();
      await closed; // once every connection is gone
    },
    async restore() {
      await listen(port);
    },
    async close() {
      await this.cut();
    },
  };
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function until(what, condition, within = 10_000) {
  const deadline = Date.now() + within;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** A storage that records each position written, in order. */
export function recordingStorage(log, initial = null) {
  let position = initial;
  return {
    get: () => position,
    set: async (id) => {
      position = id;
      log.push(`position ${id}`);
    },
  };
}
