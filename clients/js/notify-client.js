// notify-client.js: the notify-gateway WebSocket client (README.md in this package).
//
// A plain ES module with no dependencies and no build step. It runs in browsers, in React
// Native and in Node (20 with --experimental-websocket, 22+). What it gets right so that
// apps do not have to:
//   - resume: it reconnects with `since=<last processed id>`, and stores that id only
//     after the event's stores were reloaded and onEvent returned (or its promise
//     settled), so an event the app did not finish applying is delivered again;
//   - stores: each store an event names in `invalidate` is reloaded once, and every store
//     on a `resync`, before the position moves;
//   - reconnect: exponential backoff with full jitter, so a gateway restart does not
//     bring every device back in the same instant; skipped when the network comes back;
//   - the network: a network source (NetInfo, the browser's online events) drops a dead
//     socket at once when the network goes, and reconnects at once when it returns;
//   - tokens: the token provider is asked again when the token expires or is refused,
//     judged by the token's own lifetime so that a device clock set wrong does not matter;
//   - dead connections: an app-level ping with a pong deadline, since browsers and
//     React Native do not expose WebSocket pings.

/** Close codes the gateway sends (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  ABNORMAL: 1006,
  POLICY_VIOLATION: 1008,
  TOO_BIG: 1009,
  SERVER_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4008,
  TOO_MANY_CONNECTIONS: 4029,
});

/** The states reported to onStateChange. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  WAITING: "waiting", // backing off before the next attempt
  OFFLINE: "offline", // the network source says there is no network: waiting for it
  STOPPED: "stopped",
});

// Our own close code for a connection we gave up on (pong overdue, handler failed, offline).
const CLIENT_GAVE_UP = 4000;
// A token this close to the end of its lifetime is replaced before connecting: the gateway
// would close the connection with 4001 moments later anyway.
const TOKEN_EXPIRY_MARGIN_MS = 30_000;

// Close codes that mean "something is wrong with this client": retrying quickly cannot
// help and would hammer the gateway, so they wait the longest backoff.
const SLOW_RETRY = new Set([
  CloseCode.POLICY_VIOLATION,
  CloseCode.TOO_BIG,
  CloseCode.TOO_MANY_CONNECTIONS,
]);
// Close codes after which the first retry may be quick: nothing is wrong with the client
// and another gateway process (or a fresh token) will serve it.
const QUICK_RETRY = new Set([CloseCode.SERVICE_RESTART, CloseCode.TOKEN_EXPIRED]);
// Close codes that mean the token must be replaced before reconnecting.
const NEEDS_TOKEN = new Set([CloseCode.TOKEN_EXPIRED]);

/** Storage that lives as long as the page: the default. Pass your own to survive restarts. */
export function memoryStorage(initial = null) {
  let position = initial;
  return {
    get: () => position,
    set: (id) => {
      position = id;
    },
  };
}

/** A JWT's claims, or null when the token is not a readable JWT (opaque tokens are fine). */
function claimsOf(token) {
  try {
    const payload = token.split(".")[1];
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")));
  } catch {
    return null;
  }
}

/** The `exp` claim of a JWT in milliseconds, or null when the token is not a readable JWT. */
export function tokenExpiry(token) {
  const exp = claimsOf(token)?.exp;
  return typeof exp === "number" ? exp * 1000 : null;
}

/**
 * When a token received at `receivedAt` (this device's clock) should be replaced, on this
 * device's clock. With `iat` and `exp` the token's lifetime is counted from when it was
 * received, so a device clock minutes off (common on phones) neither refreshes every token
 * at once nor keeps an expired one; without `iat`, `exp` is compared with the device clock.
 */
function replaceAt(token, receivedAt) {
  const claims = claimsOf(token);
  if (typeof claims?.exp !== "number") return null; // the gateway's 4001 tells us
  if (typeof claims.iat === "number" && claims.exp > claims.iat) {
    return receivedAt + (claims.exp - claims.iat) * 1000 - TOKEN_EXPIRY_MARGIN_MS;
  }
  return claims.exp * 1000 - TOKEN_EXPIRY_MARGIN_MS;
}

/**
 * The network, as a browser sees it: its `online` and `offline` events.
 * @param {EventTarget & {navigator?: {onLine?: boolean}}} [target] `window` by default
 */
export function browserNetwork(target = globalThis) {
  return {
    subscribe(listener) {
      const online = () => listener(true);
      const offline = () => listener(false);
      target.addEventListener("online", online);
      target.addEventListener("offline", offline);
      if (target.navigator?.onLine === false) listener(false);
      return () => {
        target.removeEventListener("online", online);
        target.removeEventListener("offline", offline);
      };
    },
  };
}

/**
 * The network, as React Native's NetInfo (@react-native-community/netinfo) sees it.
 * Pass the NetInfo module: `netInfoNetwork(NetInfo)`.
 */
export function netInfoNetwork(netInfo) {
  return {
    subscribe(listener) {
      // isInternetReachable is null while unknown: only a definite "no" counts as offline.
      return netInfo.addEventListener((state) =>
        listener(state.isConnected !== false && state.isInternetReachable !== false),
      );
    },
  };
}

export class NotifyClient {
  #options;
  #storage;
  #stores;
  #socket = null;
  #token = null;
  #tokenReplaceAt = null; // when the current token should be replaced (device clock)
  #tokenOpened = false; // the current token has opened a connection
  #tokenMisses = 0; // attempts with the current token that failed before opening
  #tokenSuspect = false; // ask for a new token before the next attempt
  #attempt = 0; // consecutive failed or short-lived connections
  #generation = 0; // bumped per connection, so late callbacks of an old socket are ignored
  #handling = Promise.resolve(); // frames are applied one at a time, in order
  #timers = new Set();
  #pongDeadline = null;
  #welcomedAt = null;
  #state = State.STOPPED;
  #running = false;
  #online = true;
  #unsubscribeNetwork = null;

  /**
   * @param {object} options see README.md ("Options"), and the types in notify-client.d.ts
   */
  constructor(options) {
    if (!options?.url || typeof options.getToken !== "function") {
      throw new TypeError("NotifyClient needs url and getToken");
    }
    if (typeof options.onEvent !== "function" && options.stores == null) {
      throw new TypeError("NotifyClient needs onEvent, stores, or both");
    }
    for (const [name, reload] of Object.entries(options.stores ?? {})) {
      if (typeof reload !== "function") {
        throw new TypeError(`stores.${name} must be a function that reloads that store`);
      }
    }
    this.#options = {
      onEvent: () => {},
      onResync: () => {},
      onStateChange: () => {},
      onError: (error) => console.error("notify-client:", error),
      createSocket: queryTokenSocket,
      minDelayMs: 500,
      maxDelayMs: 30_000,
      healthyAfterMs: 10_000,
      pingIntervalMs: 20_000,
      pongTimeoutMs: 10_000,
      ...options,
    };
    this.#stores = { ...(options.stores ?? {}) };
    this.#storage = options.storage ?? memoryStorage();
  }

  get state() {
    return this.#state;
  }

  /** Connect, and keep reconnecting until stop(). */
  start() {
    if (this.#running) return;
    this.#running = true;
    this.#online = true;
    const network = this.#options.network;
    if (network) {
      this.#unsubscribeNetwork = network.subscribe((online) => this.#networkChanged(online));
    }
    if (this.#running && this.#online) this.#connect();
  }

  /** Close the connection for good; a later start() resumes from the stored position. */
  stop() {
    this.#running = false;
    this.#generation += 1;
    this.#clearTimers();
    this.#unsubscribeNetwork?.();
    this.#unsubscribeNetwork = null;
    this.#socket?.close(CloseCode.NORMAL);
    this.#socket = null;
    this.#setState(State.STOPPED, {});
  }

  #networkChanged(online) {
    if (online === this.#online) return;
    this.#online = online;
    if (!this.#running) return;
    if (!online) {
      // A socket over a network that is gone may take minutes to notice: drop it now,
      // and stop trying until the network is back.
      this.#generation += 1;
      this.#clearTimers();
      this.#socket?.close(CLIENT_GAVE_UP, "offline");
      this.#socket = null;
      this.#setState(State.OFFLINE, {});
      return;
    }
    // The network is back: whatever the backoff said, now is the time to reconnect.
    this.#attempt = 0;
    this.#clearTimers();
    this.#connect();
  }

  async #connect() {
    const generation = ++this.#generation;
    this.#setState(State.CONNECTING, { attempt: this.#attempt });
    let socket;
    try {
      // A handler still applying the previous connection's last event must finish first:
      // its id decides where this connection resumes.
      await this.#handling;
      const token = await this.#freshToken();
      const position = await this.#storage.get();
      if (generation !== this.#generation) return;
      const { url: base } = this.#options;
      const url = position == null ? base : withParam(base, "since", position);
      socket = this.#options.createSocket(url, token);
    } catch (error) {
      if (generation !== this.#generation) return;
      this.#options.onError(error);
      this.#retry({ code: CloseCode.ABNORMAL, reason: String(error) });
      return;
    }
    this.#socket = socket;
    this.#welcomedAt = null;
    this.#handling = Promise.resolve();
    let opened = false;
    socket.onopen = () => {
      if (generation !== this.#generation) return;
      opened = true;
      this.#tokenOpened = true;
      this.#tokenMisses = 0;
      this.#schedulePing(generation);
    };
    socket.onmessage = (message) => {
      if (generation !== this.#generation) return;
      // Any frame proves the connection alive; a pong is only the frame we asked for.
      this.#clearPongDeadline();
      this.#handling = this.#handling.then(() => this.#handle(generation, message.data));
    };
    let ended = false;
    const end = (code, reason) => {
      if (ended || generation !== this.#generation) return;
      ended = true;
      // A browser reports a refused handshake (HTTP 401 among others) exactly like a
      // network failure: 1006 before opening. So a token that worked before is replaced
      // after its first such failure (revoked or rotated keys), and one that never worked
      // after every third: at most one extra token per outage, or per three attempts.
      if (!opened) {
        this.#tokenMisses += 1;
        this.#tokenSuspect = this.#tokenOpened || this.#tokenMisses >= 3;
      }
      this.#retry({ code, reason });
    };
    socket.onclose = (close) => end(close.code, close.reason);
    // Browsers follow an error with a close; Node 20's WebSocket does not when the
    // connection fails, so the error ends the connection too (whichever comes first).
    socket.onerror = () => {
      end(CloseCode.ABNORMAL, "connection error");
      try {
        socket.close();
      } catch {
        // already closing, or never opened
      }
    };
  }

  async #handle(generation, raw) {
    if (generation !== this.#generation) return; // queued behind a connection that closed
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return; // the gateway sends JSON only; ignore anything else rather than fail
    }
    try {
      switch (frame.type) {
        case "welcome":
          await this.#welcome(frame);
          break;
        case "resync":
          // Every store may be stale: reload them all, then tell the app, and only then
          // move the position.
          await this.#reload(Object.keys(this.#stores));
          await this.#options.onResync(frame.reason, frame);
          await this.#storage.set(frame.last_id);
          break;
        case "event":
          await this.#reload(frame.invalidate ?? []);
          await this.#options.onEvent(frame.event, frame.data, frame.invalidate, frame);
          // Only now: a crash or failure before this line redelivers the event on resume.
          await this.#storage.set(frame.id);
          break;
        default:
          break; // pong, and frame types newer than this client
      }
    } catch (error) {
      if (generation !== this.#generation) return;
      // The position was not advanced; reconnecting redelivers from it. Retrying at once
      // would spin on a handler that fails every time, so this goes through backoff.
      this.#options.onError(error);
      this.#abandon(generation, "handler failed");
    }
  }

  /** Reload each named store the app registered, once, all at the same time. */
  async #reload(names) {
    const reloads = [...new Set(names)]
      .filter((name) => Object.hasOwn(this.#stores, name))
      .map((name) => this.#stores[name]());
    await Promise.all(reloads);
  }

  async #welcome(frame) {
    this.#welcomedAt = Date.now();
    // A first connection starts from where the student's history is now. The position
    // names the history's incarnation even before its first event ("<epoch>-0"), so a
    // history lost while this client is away ends in a resync, never in a silent gap.
    if ((await this.#storage.get()) == null) {
      await this.#storage.set(frame.last_id);
    }
    this.#setState(State.CONNECTED, { user: frame.user, recovered: frame.recovered });
  }

  async #freshToken() {
    const expiring = this.#tokenReplaceAt != null && Date.now() >= this.#tokenReplaceAt;
    if (this.#token == null || this.#tokenSuspect || expiring) {
      this.#token = null;
      const token = await this.#options.getToken();
      this.#token = token;
      this.#tokenReplaceAt = replaceAt(token, Date.now());
      this.#tokenOpened = false;
      this.#tokenMisses = 0;
      this.#tokenSuspect = false;
    }
    return this.#token;
  }

  #retry({ code, reason }) {
    this.#clearTimers();
    this.#socket = null;
    if (!this.#running) return;
    if (!this.#online) {
      this.#setState(State.OFFLINE, { code, reason });
      return; // the network source's "online" reconnects
    }
    const lived = this.#welcomedAt == null ? 0 : Date.now() - this.#welcomedAt;
    const healthy = lived >= this.#options.healthyAfterMs;
    if (NEEDS_TOKEN.has(code)) this.#token = null;
    const { minDelayMs, maxDelayMs } = this.#options;
    let delay;
    if (SLOW_RETRY.has(code)) {
      // Full jitter could still pick ~0: wait at least half the longest backoff.
      this.#attempt += 1;
      delay = maxDelayMs / 2 + (Math.random() * maxDelayMs) / 2;
    } else {
      this.#attempt = QUICK_RETRY.has(code) || healthy ? 1 : this.#attempt + 1;
      const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** (this.#attempt - 1));
      delay = Math.random() * ceiling; // full jitter
    }
    this.#setState(State.WAITING, { code, reason, attempt: this.#attempt, delay });
    this.#later(() => this.#connect(), delay);
  }

  /** Give up on a connection the gateway may still think is open. */
  #abandon(generation, reason) {
    if (generation !== this.#generation) return;
    const socket = this.#socket;
    this.#generation += 1; // its close event, whenever it comes, is no longer ours
    socket?.close(CLIENT_GAVE_UP, reason);
    this.#retry({ code: CloseCode.ABNORMAL, reason });
  }

  #schedulePing(generation) {
    this.#later(() => {
      if (generation !== this.#generation) return;
      try {
        this.#socket.send(JSON.stringify({ type: "ping" }));
      } catch {
        return; // the socket is closing; onclose takes over
      }
      this.#pongDeadline = this.#later(
        () => this.#abandon(generation, "no pong"),
        this.#options.pongTimeoutMs,
      );
      this.#schedulePing(generation);
    }, this.#options.pingIntervalMs);
  }

  #clearPongDeadline() {
    if (this.#pongDeadline == null) return;
    clearTimeout(this.#pongDeadline);
    this.#timers.delete(this.#pongDeadline);
    this.#pongDeadline = null;
  }

  #later(callback, delay) {
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      callback();
    }, delay);
    this.#timers.add(timer);
    return timer;
  }

  #clearTimers() {
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    this.#pongDeadline = null;
  }

  #setState(state, detail) {
    this.#state = state;
    try {
      this.#options.onStateChange(state, detail);
    } catch (error) {
      this.#options.onError(error);
    }
  }
}

/** The default socket factory: the token in ?token=, the one place a browser can put it. */
export function queryTokenSocket(url, token) {
  return new WebSocket(withParam(url, "token", token));
}

// By hand rather than with URLSearchParams, whose setters React Native does not implement.
function withParam(url, name, value) {
  const separator = url.includes("?") ? "&" : "?";
  return `${url}${separator}${name}=${encodeURIComponent(String(value))}`;
}
