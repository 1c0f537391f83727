// Compiled, never run (npm run typecheck): the declarations must accept what an app writes
// and reject what it must not.
import {
  type EventFrame,
  type ResyncFrame,
  type ServerFrame,
  CloseCode,
  NotifyClient,
  State,
  browserNetwork,
  memoryStorage,
  netInfoNetwork,
} from "../notify-client.js";

declare const NetInfo: Parameters<typeof netInfoNetwork>[0];
declare function refetchHome(): Promise<void>;

const client = new NotifyClient({
  url: "wss://notify.example.com/ws",
  getToken: async () => "token",
  stores: { home: refetchHome, learning: () => undefined },
  onResync: (reason, frame: ResyncFrame) => {
    const known: "history trimmed" | string = reason;
    return [known, frame.last_id];
  },
  onStateChange: (state, detail) => {
    if (state === State.CONNECTED && detail.recovered === false) return;
  },
  storage: memoryStorage(),
  network: netInfoNetwork(NetInfo),
});
client.start();
client.stop();
const network = browserNetwork({
  addEventListener: () => {},
  removeEventListener: () => {},
  navigator: { onLine: true },
});
network.subscribe((online: boolean) => online)();

function describe(frame: ServerFrame): string {
  switch (frame.type) {
    case "welcome":
      return `${frame.user} at ${frame.last_id}, recovered: ${frame.recovered}`;
    case "event":
      return `${frame.event} ${frame.id} reload ${frame.invalidate.join(",")} at ${frame.ts}`;
    case "resync":
      return frame.reason;
    case "pong":
      return "pong";
  }
}
describe({ type: "pong" });

const purchase: EventFrame<{ purchaseId: string }> = {
  type: "event",
  id: "5f1c2a9b-13",
  event: "COURSE_PURCHASED",
  data: { purchaseId: "p1" },
  invalidate: ["home"],
  ts: 1,
};
const code: 4001 = CloseCode.TOKEN_EXPIRED;
export { code, purchase };

// @ts-expect-error: a client needs a token provider
new NotifyClient({ url: "wss://x/ws", onEvent: () => {} });
// @ts-expect-error: store reloads are functions
new NotifyClient({ url: "wss://x/ws", getToken: () => "", stores: { home: "yes" } });
// @ts-expect-error: not a resync reason
const reason: ResyncFrame["reason"] = "because";
export { reason };
