// The operator console: a student's presence, live events, history, a trigger-update and
// the audit log, through the same HTTP API and JS client that everyone else uses.
//
// Every value from the API is put on the page with textContent, never as HTML: event data
// is written by publishers, not by us.

import { NotifyClient, State } from "../client/notify-client.js";

const KEY_STORAGE = "notify-console:api-key";
const LIVE_ROWS_KEPT = 200;

const $ = (id) => document.getElementById(id);

let student = null; // the student on screen
let watcher = null; // the NotifyClient of the live watch, if any

class ApiError extends Error {
  constructor(status, error) {
    const field = error?.field ? ` (field ${error.field})` : "";
    const message = error?.message ?? "request failed";
    super(`HTTP ${status} ${error?.code ?? "error"}: ${message}${field}`);
    this.status = status;
  }
}

// Relative to /console/, so the console works behind a proxy that adds a path prefix.
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(`../api/${path}`, location.href), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const doc = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) signOut("The API key was refused.");
    throw new ApiError(response.status, doc?.error);
  }
  return doc;
}

function wsUrl() {
  const url = new URL("../ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

// Errors of one action go next to the form that failed, the rest to the page's error line.
async function attempt(action, errorLine = $("app-error")) {
  errorLine.textContent = "";
  try {
    await action();
  } catch (error) {
    errorLine.textContent = error.message;
  }
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function eventRow(time, frame) {
  const tr = document.createElement("tr");
  tr.dataset.id = frame.id;
  tr.append(
    cell(time),
    cell(frame.id, "mono"),
    cell(frame.event, "event"),
    cell((frame.invalidate ?? []).join(", ")),
    cell(JSON.stringify(frame.data ?? {}), "mono data"),
  );
  return tr;
}

const clock = (date) => date.toLocaleTimeString([], { hour12: false });

// --- sign-in -----------------------------------------------------------------------------

const PUBLISHER_ONLY =
  "This key may only publish: the console needs an operator key " +
  "(NOTIFY_API_KEYS: name:operator=key).";

function showSignedIn(signedIn) {
  $("login-view").hidden = signedIn;
  $("app-view").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY_STORAGE);
  stopWatching();
  showSignedIn(false);
  $("login-error").textContent = message;
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  // Any authenticated call proves the key; the audit log is also the first thing to show.
  attempt(async () => {
    try {
      await loadAudit();
    } catch (error) {
      if (error.status !== 403) throw error;
      // A backend's key: valid, but it may only publish. Not kept, so a reload does not
      // sign it in.
      signOut(PUBLISHER_ONLY);
      return;
    }
    showSignedIn(true);
    $("student-id").focus();
  }, $("login-error"));
});

$("sign-out").addEventListener("click", () => signOut());

// --- one student ---------------------------------------------------------------------------

$("lookup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  stopWatching();
  student = $("student-id").value.trim();
  $("student-name").textContent = student;
  $("live-events").replaceChildren();
  $("trigger-result").textContent = "";
  $("student-view").hidden = false;
  attempt(() => Promise.all([loadPresence(), loadHistory()]));
});

async function loadPresence() {
  const { connections } = await api("GET", `presence/${encodeURIComponent(student)}`);
  $("presence-count").textContent = String(connections);
}

async function loadHistory() {
  const { events } = await api("GET", `history/${encodeURIComponent(student)}?limit=50`);
  // Newest first, like the live list and the audit log.
  const rows = events.reverse().map((frame) => eventRow(clock(new Date(frame.ts)), frame));
  $("history-events").replaceChildren(...rows);
}

async function loadAudit() {
  const { entries } = await api("GET", "audit?limit=50");
  $("audit-entries").replaceChildren(
    ...entries.map((entry) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(new Date(entry.time).toLocaleString([], { hour12: false })),
        cell(entry.caller),
        cell(entry.action),
        cell(entry.student_id ?? "", "mono"),
        cell(entry.reason ?? ""),
        cell(JSON.stringify(entry.result), "mono data"),
      );
      return tr;
    }),
  );
}

$("presence-refresh").addEventListener("click", () => attempt(loadPresence));
$("history-refresh").addEventListener("click", () => attempt(loadHistory));
$("audit-refresh").addEventListener("click", () => attempt(loadAudit));

$("trigger-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = { student_id: student, reason: $("trigger-reason").value.trim() };
  const course = $("trigger-course").value.trim();
  if (course) body.course_id = course;
  attempt(async () => {
    const result = await api("POST", "trigger-update", body);
    $("trigger-result").textContent =
      `pushed ${result.id}\n` +
      `cache keys deleted: ${result.cache_keys_deleted.join(", ") || "none"}\n` +
      `connected devices: ${result.connections ?? "unknown"}`;
    $("trigger-reason").value = "";
    await Promise.all([loadHistory(), loadAudit()]);
  }, $("trigger-result"));
});

// --- live watch ----------------------------------------------------------------------------

function setLiveState(state, text = state) {
  $("live-state").dataset.state = state;
  $("live-state").textContent = text;
  $("live-toggle").textContent = state === State.STOPPED ? "Watch live" : "Stop watching";
}

function stopWatching() {
  watcher?.stop();
  watcher = null;
  setLiveState(State.STOPPED);
}

function startWatching() {
  const watched = student;
  const live = $("live-events");
  watcher = new NotifyClient({
    url: wsUrl(),
    // Called again whenever the short-lived watch token expires (close code 4001).
    getToken: async () => {
      const { token } = await api("POST", `students/${encodeURIComponent(watched)}/watch-token`);
      return token;
    },
    onEvent: (_event, _data, _invalidate, frame) => {
      live.prepend(eventRow(clock(new Date()), frame));
      while (live.rows.length > LIVE_ROWS_KEPT) live.lastElementChild.remove();
    },
    onResync: (reason) => {
      const tr = document.createElement("tr");
      tr.className = "resync";
      tr.append(cell(clock(new Date())), cell(`resync: ${reason}`));
      tr.lastChild.colSpan = 4;
      live.prepend(tr);
    },
    onStateChange: (state, detail) => {
      if (state === State.WAITING) {
        const seconds = (detail.delay / 1000).toFixed(1);
        setLiveState(state, `reconnecting in ${seconds} s (close ${detail.code})`);
      } else {
        setLiveState(state);
      }
      if (state === State.CONNECTED) attempt(loadPresence);
    },
    onError: (error) => {
      $("app-error").textContent = `live watch: ${error.message}`;
    },
  });
  watcher.start();
}

$("live-toggle").addEventListener("click", () => {
  if (watcher) {
    stopWatching();
    attempt(loadPresence);
  } else {
    startWatching();
  }
});

showSignedIn(sessionStorage.getItem(KEY_STORAGE) !== null);
if (sessionStorage.getItem(KEY_STORAGE) !== null) attempt(loadAudit);
