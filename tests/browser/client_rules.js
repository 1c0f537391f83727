// Evaluated in the browser by test_client_rules.py: the client against a scripted fake
// socket, so every close code and timing rule is checked without waiting on a server.
async () => {
  const { NotifyClient, memoryStorage } = await import("/client/notify-client.js");
  // The top of every jitter window, so each delay shows the window it was drawn from.
  Math.random = () => 0.999;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const until = async (what, condition) => {
    for (let i = 0; i < 300 && !condition(); i++) await sleep(10);
    if (!condition()) throw new Error(`timed out waiting for ${what}`);
  };

  const sockets = [];
  class FakeSocket {
    constructor(url, token) {
      Object.assign(this, { url, token, sent: [], closedWith: null });
      sockets.push(this);
      setTimeout(() => this.onopen?.(), 0);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close(code) {
      this.closedWith = code;
    }
    frame(frame) {
      this.onmessage({ data: JSON.stringify(frame) });
    }
    drop(code) {
      this.onclose({ code, reason: "" });
    }
  }

  const storage = memoryStorage();
  const delays = [];
  let tokens = 0;
  let release = null; // resolves the event handler in progress
  const applied = [];
  const client = new NotifyClient({
    url: "ws://gateway.test/ws",
    getToken: async () => `token-${++tokens}`,
    createSocket: (url, token) => new FakeSocket(url, token),
    storage,
    onEvent: (event, _data, _invalidate, frame) =>
      new Promise((resolve) => {
        release = () => {
          applied.push(frame.id);
          resolve();
        };
      }),
    onStateChange: (state, detail) => {
      if (state === "waiting") delays.push({ code: detail.code, delay: detail.delay });
    },
    minDelayMs: 100,
    maxDelayMs: 1000,
    healthyAfterMs: 60_000,
    pingIntervalMs: 60_000,
  });
  const result = {};
  client.start();

  await until("the first socket", () => sockets.length === 1);
  const first = sockets[0];
  result.firstUrl = first.url;
  first.frame({ type: "welcome", user: "s", last_id: "e-5", recovered: false });
  await until("the welcome's position", () => storage.get() === "e-5");

  // The position moves only once the handler's promise resolved, and a reconnect waits
  // for it: resuming before it would skip or repeat that event.
  first.frame({ type: "event", id: "e-6", event: "COURSE_PURCHASED", data: {}, invalidate: [] });
  await sleep(30);
  result.storedWhileApplying = storage.get();
  first.drop(1011);
  await sleep(300);
  result.socketsWhileApplying = sockets.length;
  release();
  await until("the reconnect", () => sockets.length === 2);
  result.storedAfterApplying = storage.get();
  result.resumeUrl = sockets[1].url;

  sockets[1].drop(1011); // backoff doubles: nothing healthy in between
  await until("socket 3", () => sockets.length === 3);
  sockets[2].drop(1012); // restart: back to the smallest window
  await until("socket 4", () => sockets.length === 4);
  sockets[3].drop(4001); // expired token: a new one, smallest window
  await until("socket 5", () => sockets.length === 5);
  sockets[4].drop(1008); // a client bug: never fast
  await until("socket 6", () => sockets.length === 6);
  result.delays = delays;
  result.tokens = sockets.map((socket) => socket.token);
  client.stop();
  result.closedOnStop = sockets[5].closedWith;

  // A connection whose pong never comes is given up (4000) and replaced.
  const silent = new NotifyClient({
    url: "ws://gateway.test/ws",
    getToken: async () => "token",
    createSocket: (url, token) => new FakeSocket(url, token),
    onEvent: () => {},
    pingIntervalMs: 30,
    pongTimeoutMs: 30,
    minDelayMs: 10,
  });
  const before = sockets.length;
  silent.start();
  await until("the silent socket", () => sockets.length === before + 1);
  const quiet = sockets[before];
  await until("a replacement", () => sockets.length === before + 2);
  silent.stop();
  result.pingSent = quiet.sent;
  result.quietClosedWith = quiet.closedWith;
  result.applied = applied;
  return result;
};
