// The client against a real gateway: node --experimental-websocket --test test/
import assert from "node:assert/strict";
import { test } from "node:test";

import { NotifyClient, State } from "../notify-client.js";
import {
  env,
  mint,
  proxy,
  publish,
  recordingStorage,
  sleep,
  student,
  until,
} from "./support.mjs";

/** A client with recording stores (home, learning) and storage; `log` is the order. */
function recordingClient(user, options = {}) {
  const log = [];
  const received = [];
  const states = [];
  const stores = {};
  for (const name of ["home", "learning"]) {
    stores[name] = async () => {
      await sleep(5); // a store reload is a fetch: the position must wait for it
      log.push(`reload ${name}`);
    };
  }
  const client = new NotifyClient({
    url: env.wsUrl,
    getToken: async () => mint(user),
    stores,
    onEvent: (event, data, invalidate, frame) => {
      log.push(`event ${frame.id}`);
      received.push(data.n);
    },
    onResync: (reason) => log.push(`resync ${reason}`),
    onStateChange: (state, detail) => states.push({ state, ...detail }),
    storage: recordingStorage(log, options.position ?? null),
    minDelayMs: 50,
    maxDelayMs: 200,
    ...options,
  });
  return { client, log, received, states };
}

const numbered = (from, to, invalidate = ["home"]) =>
  Array.from({ length: to - from }, (_, i) => ({
    event: "E",
    data: { n: from + i },
    invalidate,
  }));

test("resumes after the server drops the connection, missing nothing", async () => {
  const user = student();
  const front = await proxy();
  const { client, received, log, states } = recordingClient(user, { url: front.url });
  try {
    client.start();
    await until("connected", () => client.state === State.CONNECTED);
    await publish(user, numbered(0, 3));
    await until("3 events", () => received.length === 3);
    await front.cut(); // the server side of the connection is gone, and so is the gateway
    await until("noticed", () => client.state !== State.CONNECTED);
    const missed = await publish(user, numbered(3, 6));
    await front.restore();
    await until("6 events", () => received.length === 6);
    assert.deepEqual(received, [0, 1, 2, 3, 4, 5]);
    assert.equal(log.at(-1), `position ${missed.at(-1)}`);
    assert.ok(
      states.some((s) => s.state === State.CONNECTED && s.recovered === true),
      "the reconnection resumed exactly",
    );
  } finally {
    client.stop();
    await front.close();
  }
});

test("stop and start, as the AppState pattern does, resume from the stored position", async () => {
  const user = student();
  const { client, received } = recordingClient(user);
  client.start();
  await until("connected", () => client.state === State.CONNECTED);
  await publish(user, numbered(0, 2));
  await until("2 events", () => received.length === 2);
  client.stop(); // the app went to the background
  assert.equal(client.state, State.STOPPED);
  await publish(user, numbered(2, 5));
  await sleep(200);
  assert.deepEqual(received, [0, 1], "nothing while stopped");
  client.start(); // back in the foreground
  try {
    await until("5 events", () => received.length === 5);
    assert.deepEqual(received, [0, 1, 2, 3, 4]);
  } finally {
    client.stop();
  }
});

test("a network source: offline drops the socket at once, online reconnects at once", async () => {
  const user = student();
  let tell = null;
  const network = {
    subscribe(listener) {
      tell = listener;
      return () => {
        tell = null;
      };
    },
  };
  // A backoff far longer than the test: only "online" can explain a quick reconnect.
  const { client, received, states } = recordingClient(user, {
    network,
    minDelayMs: 60_000,
    maxDelayMs: 60_000,
  });
  client.start();
  try {
    await until("connected", () => client.state === State.CONNECTED);
    tell(false);
    assert.equal(client.state, State.OFFLINE);
    await publish(user, numbered(0, 3));
    await sleep(200);
    assert.deepEqual(received, [], "the dropped socket delivers nothing");
    const back = Date.now();
    tell(true);
    await until("3 events", () => received.length === 3, 3000);
    assert.ok(Date.now() - back < 3000, "no backoff after the network returned");
    assert.deepEqual(received, [0, 1, 2]);
    assert.ok(states.some((s) => s.state === State.OFFLINE));
  } finally {
    client.stop();
  }
  assert.equal(tell, null, "stop() unsubscribes from the network source");
});

test("a token the gateway expires (4001) is replaced and nothing is lost", async () => {
  const user = student();
  let tokens = 0;
  const { client, received, states } = recordingClient(user, {
    getToken: async () => {
      tokens += 1;
      return mint(user, 2); // the gateway closes the connection with 4001 in 2 s
    },
  });
  client.start();
  try {
    await until("connected", () => client.state === State.CONNECTED);
    await publish(user, numbered(0, 1));
    await until("4001", () => states.some((s) => s.code === 4001), 5000);
    await publish(user, numbered(1, 3));
    await until("3 events", () => received.length === 3);
    assert.deepEqual(received, [0, 1, 2]);
    assert.ok(tokens >= 2, `a fresh token was asked for (${tokens})`);
  } finally {
    client.stop();
  }
});

test("a resync reloads every store, then stores the new position", async () => {
  const user = student();
  const [last] = await publish(user, numbered(0, 1));
  // "0" is what older clients stored for an empty history: only a resync is safe.
  const { client, log } = recordingClient(user, { position: "0" });
  client.start();
  try {
    await until("resync handled", () => log.some((line) => line.startsWith("position")));
    assert.deepEqual(log.slice(0, 2).sort(), ["reload home", "reload learning"]);
    assert.deepEqual(log.slice(2), ["resync malformed id", `position ${last}`]);
  } finally {
    client.stop();
  }
});

test("the position is stored only after the event's stores reloaded", async () => {
  const user = student();
  let finishReload = null;
  const log = [];
  const client = new NotifyClient({
    url: env.wsUrl,
    getToken: async () => mint(user),
    stores: {
      learning: () =>
        new Promise((resolve) => {
          finishReload = () => {
            log.push("reloaded learning");
            resolve();
          };
        }),
    },
    storage: recordingStorage(log),
  });
  client.start();
  try {
    await until("connected", () => client.state === State.CONNECTED);
    const welcomed = log.length; // the welcome's position
    const [id] = await publish(user, [{ event: "E", invalidate: ["learning", "learning"] }]);
    await until("reload started", () => finishReload !== null);
    await sleep(100);
    assert.equal(log.length, welcomed, "no position while the store reloads");
    finishReload();
    await until("stored", () => log.at(-1) === `position ${id}`);
    assert.deepEqual(log.slice(welcomed), ["reloaded learning", `position ${id}`]);
  } finally {
    client.stop();
  }
});

test("onEvent is optional when stores are given, and one of the two is required", () => {
  assert.throws(
    () => new NotifyClient({ url: env.wsUrl, getToken: async () => "" }),
    /needs onEvent, stores, or both/,
  );
  assert.throws(
    () => new NotifyClient({ url: env.wsUrl, getToken: async () => "", stores: { home: 1 } }),
    /stores.home must be a function/,
  );
});

test("a device clock hours off neither renews every token nor keeps an expired one", async () => {
  // Sockets that open, then close as a restarting gateway does (1012): quick reconnects.
  let sockets = 0;
  const createSocket = () => {
    sockets += 1;
    const socket = { send() {}, close() {} };
    setTimeout(() => socket.onopen?.(), 1);
    setTimeout(() => socket.onclose?.({ code: 1012, reason: "" }), 5);
    return socket;
  };
  const now = Date.now;
  Date.now = () => now() + 2 * 3600_000; // the phone's clock runs two hours ahead
  let tokens = 0;
  const client = new NotifyClient({
    url: "ws://gateway.test/ws",
    getToken: async () => {
      tokens += 1;
      return mint("clock", 3600); // iat and exp on the server's clock
    },
    onEvent: () => {},
    createSocket,
    minDelayMs: 1,
    maxDelayMs: 2,
  });
  try {
    client.start();
    await until("five connections", () => sockets >= 5);
    assert.equal(tokens, 1, "the token's own lifetime says it is fresh");
  } finally {
    client.stop();
    Date.now = now;
  }
});
