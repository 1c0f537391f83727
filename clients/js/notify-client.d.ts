// Types of notify-client.js and of every frame of the gateway's protocol (docs/protocol.md).

/** An event's id, and a position in a student's history: `<epoch>-<seq>`. Opaque. */
export type EventId = string;

/** The first frame of every connection. */
export interface WelcomeFrame {
  type: "welcome";
  /** The student id from the token. */
  user: string;
  /** The student's position when the connection started (`<epoch>-0` before any event). */
  last_id: EventId;
  /** True when `since` was given and every event after it follows this frame. */
  recovered: boolean;
}

/** A notification. */
export interface EventFrame<Data = Record<string, unknown>> {
  type: "event";
  id: EventId;
  /** The notification's name, e.g. "COURSE_PURCHASED" (docs/events.md). */
  event: string;
  data: Data;
  /** The app stores to reload: the backend's cache for them was already cleared. */
  invalidate: string[];
  /** Publish time, Unix milliseconds. */
  ts: number;
}

/** Why the server cannot say exactly what was missed. */
export type ResyncReason =
  | "malformed id"
  | "history trimmed"
  | "history expired"
  | "history epoch changed"
  | "unknown id"
  | "too far behind";

/** Every store may be stale: reload them all; live events follow. */
export interface ResyncFrame {
  type: "resync";
  reason: ResyncReason;
  /** The position to store once the stores are reloaded. */
  last_id: EventId;
}

/** The answer to a client `{"type":"ping"}`. */
export interface PongFrame {
  type: "pong";
}

export type ServerFrame = WelcomeFrame | EventFrame | ResyncFrame | PongFrame;

/** Close codes the gateway sends. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  ABNORMAL: 1006;
  POLICY_VIOLATION: 1008;
  TOO_BIG: 1009;
  SERVER_ERROR: 1011;
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  TOKEN_EXPIRED: 4001;
  SLOW_CONSUMER: 4008;
  TOO_MANY_CONNECTIONS: 4029;
}>;

/** The client's states, as onStateChange reports them. */
export declare const State: Readonly<{
  CONNECTING: "connecting";
  CONNECTED: "connected";
  WAITING: "waiting";
  OFFLINE: "offline";
  STOPPED: "stopped";
}>;
export type StateName = (typeof State)[keyof typeof State];

/** What onStateChange is told with each state. */
export interface StateDetail {
  /** CONNECTING, WAITING: consecutive attempts so far. */
  attempt?: number;
  /** CONNECTED: the student id. */
  user?: string;
  /** CONNECTED: whether the connection resumed exactly (false: fresh, or a resync follows). */
  recovered?: boolean;
  /** WAITING, OFFLINE: the close code and reason of the connection that ended. */
  code?: number;
  reason?: string;
  /** WAITING: milliseconds until the next attempt. */
  delay?: number;
}

/** The part of a WebSocket the client uses: the browser's, React Native's, Node's. */
export interface SocketLike {
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** Where the last processed position lives; AsyncStorage fits (both may be async). */
export interface PositionStorage {
  get(): EventId | null | undefined | Promise<EventId | null | undefined>;
  set(id: EventId): unknown;
}

/** Tells the client when the network comes and goes; returns how to stop listening. */
export interface NetworkSource {
  subscribe(listener: (online: boolean) => void): () => void;
}

/** Reloads one app store; awaited before the event's position is stored. */
export type StoreReload = () => unknown | Promise<unknown>;

export interface NotifyClientOptions {
  /** The gateway's WebSocket endpoint, e.g. "wss://notify.example.com/ws". */
  url: string;
  /** A student JWT; asked again when the token expires, is refused or nears its end. */
  getToken: () => string | Promise<string>;
  /**
   * Reload functions by store name: each store an event names in `invalidate` is reloaded
   * once before onEvent, and every store on a resync, before the position is stored.
   */
  stores?: Record<string, StoreReload>;
  /** Apply one notification (after its stores reloaded); awaited before the next one. */
  onEvent?: (
    event: string,
    data: Record<string, unknown>,
    invalidate: string[],
    frame: EventFrame,
  ) => unknown | Promise<unknown>;
  /** Called after every store reloaded on a resync; awaited. */
  onResync?: (reason: ResyncReason, frame: ResyncFrame) => unknown | Promise<unknown>;
  onStateChange?: (state: StateName, detail: StateDetail) => void;
  /** Handler, store and token-provider failures. */
  onError?: (error: unknown) => void;
  /** Where the position lives (default: in memory, lost with the page or process). */
  storage?: PositionStorage;
  /** How to open a socket (default: `new WebSocket(url + "?token=")`). */
  createSocket?: (url: string, token: string) => SocketLike;
  /** NetInfo (`netInfoNetwork(NetInfo)`) or the browser's events (`browserNetwork()`). */
  network?: NetworkSource;
  /** First backoff window, ms (500); it doubles per failure. */
  minDelayMs?: number;
  /** Largest backoff window, ms (30 000). */
  maxDelayMs?: number;
  /** How long a connection must live after its welcome for the backoff to start over (10 000). */
  healthyAfterMs?: number;
  /** App-level ping period, ms (20 000). */
  pingIntervalMs?: number;
  /** A connection silent this long after a ping is replaced, ms (10 000). */
  pongTimeoutMs?: number;
}

export declare class NotifyClient {
  constructor(options: NotifyClientOptions);
  readonly state: StateName;
  /** Connect, and keep reconnecting until stop(). */
  start(): void;
  /** Close the connection for good; a later start() resumes from the stored position. */
  stop(): void;
}

export declare function memoryStorage(initial?: EventId | null): PositionStorage;
/** The `exp` claim of a JWT in milliseconds, or null for an opaque token. */
export declare function tokenExpiry(token: string): number | null;
export declare function queryTokenSocket(url: string, token: string): SocketLike;
export declare function browserNetwork(target?: {
  addEventListener(type: "online" | "offline", listener: () => void): void;
  removeEventListener(type: "online" | "offline", listener: () => void): void;
  navigator?: { onLine?: boolean };
}): NetworkSource;
export declare function netInfoNetwork(netInfo: {
  addEventListener(
    listener: (state: { isConnected: boolean | null; isInternetReachable: boolean | null }) => void,
  ): () => void;
}): NetworkSource;
