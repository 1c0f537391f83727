// notify-client.js: the notify-gateway WebSocket client (docs/client.md).
//
// A plain ES module with no dependencies and no build step. It runs in browsers and in
// React Native. What it gets right so that apps do not have to:
//   - resume: it reconnects with `since=<last processed id>`, and stores that id only
//     after onEvent returned (or its promise settled), so an event the app did not
//     finish applying is delivered again rather than lost;
//   - reconnect: exponential backoff with full jitter, so a gateway restart does not
//     bring every device back in the same instant;
//   - tokens: the token provider is asked again when the token expires or is refused;
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
  STOPPED: "stopped",
});

// Our own close code for a connection we gave up on (pong overdue, handler failed).
const CLIENT_GAVE_UP = 4000;
// A token this close to its exp is replaced before connecting: the gateway would close
// the connection with 4001 moments later anyway.
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

/** The `exp` claim of a JWT in milliseconds, or null when the token is not a readable JWT. */
export function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1];
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null; // opaque tokens are fine: the gateway's 4001 still triggers a refresh
  }
}

export class NotifyClient {
  #options;
  #storage;
  #socket = null;
  #token = null;
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

  /**
   * @param {object} options
   * @param {string} options.url the gateway's WebSocket endpoint ("wss://host/ws")
   * @param {() => Promise<string>} options.getToken returns a student JWT; called again when
   *   the token expired or was refused
   * @param {(event: string, data: object, invalidate: string[], frame: object) => unknown}
   *   options.onEvent apply one notification; may return a promise, which is awaited
   *   before the next event and before the event's id is stored
   * @param {(reason: string) => unknown} [options.onResync] reload every store; awaited too
   * @param {(state: string, detail: object) => void} [options.onStateChange]
   * @param {(error: Error) => void} [options.onError] handler and token-provider failures
   * @param {{get: () => unknown, set: (id: string) => unknown}} [options.storage] where the
   *   last processed id lives; both may return promises (AsyncStorage)
   * @param {(url: string, token: string) => WebSocket} [options.createSocket] how to open a
   *   socket; the default puts the token in ?token= since browsers cannot set headers
   * @param {number} [options.minDelayMs] first backoff window (500); doubles per failure
   * @param {number} [options.maxDelayMs] largest backoff window (30 000)
   * @param {number} [options.healthyAfterMs] how long a connection must have lived after its
   *   welcome for the backoff to start again from the minimum (10 000)
   * @param {number} [options.pingIntervalMs] app-level ping period (20 000)
   * @param {number} [options.pongTimeoutMs] a connection with no frame this long after a ping
   *   is given up and replaced (10 000); keep it under pingIntervalMs
   */
  constructor(options) {
    if (!options?.url || typeof options.getToken !== "function") {
      throw new TypeError("NotifyClient needs url and getToken");
    }
    if (typeof options.onEvent !== "function") {
      throw new TypeError("NotifyClient needs onEvent");
    }
    this.#options = {
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
    this.#storage = options.storage ?? memoryStorage();
  }

  get state() {
    return this.#state;
  }

  /** Connect, and keep reconnecting until stop(). */
  start() {
    if (this.#running) return;
    this.#running = true;
    this.#connect();
  }

  /** Close the connection for good; a later start() resumes from the stored position. */
  stop() {
    this.#running = false;
    this.#generation += 1;
    this.#clearTimers();
    this.#socket?.close(CloseCode.NORMAL);
    this.#socket = null;
    this.#setState(State.STOPPED, {});
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
    socket.onclose = (close) => {
      if (generation !== this.#generation) return;
      // A browser reports a refused handshake (HTTP 401 among others) exactly like a
      // network failure: 1006 before opening. So a token that worked before is replaced
      // after its first such failure (revoked or rotated keys), and one that never worked
      // after every third: at most one extra token per outage, or per three attempts.
      if (!opened) {
        this.#tokenMisses += 1;
        this.#tokenSuspect = this.#tokenOpened || this.#tokenMisses >= 3;
      }
      this.#retry({ code: close.code, reason: close.reason });
    };
    // onerror is always followed by onclose, which decides what to do.
    socket.onerror = () => {};
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
          await this.#options.onResync(frame.reason);
          await this.#storage.set(frame.last_id);
          break;
        case "event":
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
    const expiry = this.#token && tokenExpiry(this.#token);
    const expiring = expiry != null && expiry - Date.now() < TOKEN_EXPIRY_MARGIN_MS;
    if (this.#token == null || this.#tokenSuspect || expiring) {
      this.#token = null;
      this.#token = await this.#options.getToken();
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
