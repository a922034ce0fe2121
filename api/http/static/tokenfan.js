/**
 * tokenfan's browser client for protocol v1 (docs/PROTOCOL.md): one dependency-free ES module.
 *
 *   import { SessionStream, Transcript } from "https://api.example.com/v1/client/tokenfan.js";
 *   const stream = new SessionStream({ relay: "wss://relay.example.com", api: "https://api.example.com",
 *                                      session: "demo", token: () => myBackend.sessionToken("demo") });
 *   const transcript = new Transcript();
 *   for await (const frame of stream) transcript.apply(frame);
 *
 * `SessionStream` (WebSocket), `SseStream` (EventSource, where WebSockets are blocked) and `MultiStream`
 * (several sessions over one connection) remember the offset of the last frame they received and resume
 * after it by themselves, so a consumer sees every event once, in order, whatever happens to the connection. `Transcript` assembles generations from frames and proves
 * it: it refuses a gap or a duplicate, and checks each completed text's length and SHA-256 (WebCrypto).
 *
 * Credentials: give the browser a session token (minted by your backend with its API key), never an API
 * key. Browsers cannot set headers on WebSocket or EventSource connections, so the token travels in the
 * URL; that is why tokens are short-lived and scoped to one session, and why this module refuses to put
 * an API key there. Types: tokenfan.d.ts beside this file.
 */

/** The protocol version this module speaks; it is served under that version's prefix (`/v1/client/`). */
export const PROTOCOL_VERSION = 1;

const TERMINAL = new Set(["generation.completed", "generation.failed", "generation.cancelled"]);

/** Event types an `EventSource` listens for by name (it cannot listen for "any type"). */
const SSE_TYPES = [
  "generation.started", "delta", "generation.completed", "generation.failed",
  "generation.cancelled", "generation.restarted", "snapshot",
];

/** Close codes that end a stream for good: retrying cannot fix them. */
const FATAL = new Map([
  [1009, "message_too_big"], [4400, "invalid_request"], [4401, "unauthorized"],
  [4403, "forbidden"], [4429, "rate_limited"],
]);

/** Close codes after which the position cannot be resumed: rebuild from the session's snapshot. */
const REBUILD = new Set([4404, 4410]);

/** The close code a client uses to drop its own connection on purpose (then it resumes). */
const DROPPED = 4000;

/** An error the server reported, or one this client gave up on. `fatal` ones end the stream. */
export class TokenfanError extends Error {
  /**
   * @param {number} code a WebSocket close code (or an HTTP status for plain requests)
   * @param {string} reason the server's explanation
   * @param {{fatal?: boolean}} [options]
   */
  constructor(code, reason, { fatal = true } = {}) {
    super(`${code}: ${reason}`);
    this.name = "TokenfanError";
    this.code = code;
    this.reason = reason;
    this.fatal = fatal;
  }
}

/**
 * Whether offset `next` comes after `previous` in one session. Offsets are `<epoch>:<ms>-<seq>`; a new
 * epoch belongs to a recreated stream, which only a rebuild (a snapshot) crosses, so it counts as after.
 * @param {string | null} previous
 * @param {string} next
 * @returns {boolean}
 */
export function offsetFollows(previous, next) {
  if (previous == null) return true;
  const a = parseOffset(previous);
  const b = parseOffset(next);
  if (a.epoch !== b.epoch) return true;
  return b.ms > a.ms || (b.ms === a.ms && b.seq > a.seq);
}

/** @param {string} offset */
function parseOffset(offset) {
  const match = /^([^:]+):(\d+)-(\d+)$/.exec(offset);
  if (!match) throw new TypeError(`not a tokenfan offset: ${offset}`);
  return { epoch: match[1], ms: Number(match[2]), seq: Number(match[3]) };
}

/**
 * The lowercase hex SHA-256 of `text` as UTF-8, with WebCrypto. Browsers offer it only in secure
 * contexts (https, or http://localhost): elsewhere this returns null.
 * @param {string} text
 * @returns {Promise<string | null>}
 */
export async function sha256Hex(text) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * The number of Unicode code points of `text`: what the protocol's `length` counts (not UTF-16 units).
 * @param {string} text
 */
export function codePointLength(text) {
  let length = 0;
  for (const _ of text) length += 1;
  return length;
}

/**
 * Listeners by event name; a listener that throws does not stop the stream (its error is rethrown on
 * its own, so it still shows in the console).
 */
class Emitter {
  #listeners = new Map();

  /**
   * Call `listener` for each event of `type`; returns a function that removes it.
   * @param {string} type
   * @param {(value: any) => void} listener
   */
  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  /** @param {string} type @param {(value: any) => void} listener */
  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  /** @param {string} type @param {unknown} value */
  emit(type, value) {
    for (const listener of this.#listeners.get(type) ?? []) {
      try {
        listener(value);
      } catch (error) {
        queueMicrotask(() => { throw error; });
      }
    }
  }
}

/**
 * What every stream shares: the frames handed out (callbacks, and an async iterator whose buffer is
 * bounded), the connection's lifecycle, and backoff with jitter. Subclasses open and drop the connection
 * (`prepare` then `connect`, and `disconnect`).
 */
class FrameSource extends Emitter {
  /** @param {import("./tokenfan").ConnectionOptions} options */
  constructor(options = {}) {
    super();
    this.minBackoff = options.minBackoff ?? 100;
    this.maxBackoff = options.maxBackoff ?? 5000;
    this.maxBuffered = options.maxBuffered ?? 1000;
    this.maxAttempts = options.maxAttempts ?? Infinity;
    /** Frames received (snapshots included), and connections opened. */
    this.frames = 0;
    this.connections = 0;
    /** @type {"idle" | "connecting" | "open" | "waiting" | "paused" | "closed"} */
    this.state = "idle";
    this.failures = 0;
    this.timer = null;
    this.queue = null;
    this.waiter = null;
    this.failure = null;
  }

  /** Open the connection (iterating does it too). Returns the stream. */
  start() {
    if (this.state === "idle") this.connectSoon(0);
    return this;
  }

  /** Stop for good: no more frames, no reconnect; an iterator ends. */
  close() {
    if (this.state === "closed") return;
    this.state = "closed";
    clearTimeout(this.timer);
    this.disconnect();
    this.emit("close", { code: 1000, reason: "closed by the client", resuming: false });
    this.wake();
  }

  [Symbol.asyncIterator]() {
    if (this.queue) throw new TypeError("a stream can be iterated once");
    this.queue = [];
    this.start();
    return {
      next: () => this.nextFrame(),
      return: async () => { this.close(); return { value: undefined, done: true }; },
      [Symbol.asyncIterator]() { return this; },
    };
  }

  /** @returns {Promise<IteratorResult<any>>} */
  async nextFrame() {
    for (;;) {
      if (this.queue.length) {
        const value = this.queue.shift();
        if (this.state === "paused" && this.queue.length <= this.maxBuffered / 2) this.connectSoon(0);
        return { value, done: false };
      }
      if (this.failure) throw this.failure;
      if (this.state === "closed") return { value: undefined, done: true };
      await new Promise((resolve) => { this.waiter = resolve; });
    }
  }

  wake() {
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.();
  }

  /** Hand one frame out, to the listeners and to the iterator. */
  handOut(frame) {
    this.frames += 1;
    this.failures = 0;
    this.emit("frame", frame);
    if (!this.queue) return;
    this.queue.push(frame);
    this.wake();
    if (this.queue.length >= this.maxBuffered && this.state === "open") {
      // The reader fell behind: stop receiving instead of buffering without bound, and resume after the
      // last offset once it has caught up. Frames the server sends meanwhile are not lost, only not yet read.
      this.state = "paused";
      this.disconnect();
    }
  }

  /** Report `error` and stop for good. */
  fail(error) {
    if (this.state === "closed") return;
    this.failure = error;
    this.emit("error", error);
    this.close();
  }

  /** Try again later: exponential backoff from `minBackoff` to `maxBackoff`, with jitter. */
  retry() {
    this.failures += 1;
    if (this.failures > this.maxAttempts) {
      return this.fail(new TokenfanError(1006, `unreachable after ${this.maxAttempts} attempts`));
    }
    this.connectSoon(backoff(this.failures, this.minBackoff, this.maxBackoff));
  }

  /** @param {number} delay milliseconds */
  connectSoon(delay) {
    clearTimeout(this.timer);
    this.state = "waiting";
    this.timer = setTimeout(() => this.connectNow(), delay);
  }

  async connectNow() {
    if (this.state === "closed") return;
    this.state = "connecting";
    let prepared;
    try {
      prepared = await this.prepare();
    } catch (error) {
      if (error instanceof TokenfanError && error.fatal) return this.fail(error);
      this.emit("error", new TokenfanError(0, `getting a token failed: ${error}`, { fatal: false }));
      return this.retry();
    }
    if (this.state === "connecting") this.connect(prepared);
  }

  /** What `connect` needs, fetched first (a token). */
  async prepare() {
    return null;
  }
}

/**
 * The wait before attempt `failures` + 1: from `min`, doubling, up to `max`, each randomized between half
 * and all of it, so that many clients cut off at once do not come back at once.
 */
function backoff(failures, min, max) {
  return Math.min(max, min * 2 ** Math.min(failures - 1, 10)) * (0.5 + Math.random() / 2);
}

/**
 * The token a function returns (or the one given). An API key is refused: a browser has no business
 * holding one, and a WebSocket or EventSource would have to put it in a URL.
 * @param {import("./tokenfan").TokenSource | undefined} source
 * @returns {Promise<string | null>}
 */
async function resolveToken(source) {
  const token = typeof source === "function" ? await source() : source;
  if (typeof token === "string" && token.startsWith("tfk_")) {
    throw new TokenfanError(4401, "an API key never goes in a URL: hand the browser a session token");
  }
  return token || null;
}

/**
 * Whether a 4401 means the token ran out (judged by its own `exp`, a second of clock skew allowed) rather
 * than that it was refused: a quiet stream receives no frame between two expiries, and must still go on.
 */
function hasExpired(times) {
  return times !== null && times.expiresAt * 1000 <= Date.now() + 1000;
}

/**
 * Milliseconds until a fresh token should be sent: a third of the token's lifetime before it expires, at
 * least one second and at most a minute before; null when the token says nothing of its expiry.
 */
function refreshDelay(times) {
  if (!times) return null;
  const margin = Math.min(60, Math.max(1, times.lifetime / 3)) * 1000;
  return Math.max(0, times.expiresAt * 1000 - margin - Date.now());
}

/**
 * A session's snapshot as the frame a rebuild yields (`reason: "offset_gone"`), or the HTTP error that
 * refused it. A session that is gone altogether is an empty snapshot without an offset: start over.
 * @returns {Promise<{frame: any} | {status: number, reason: string}>}
 */
async function snapshotFrame(api, session, token) {
  const response = await fetch(`${api}/v1/sessions/${encodeURIComponent(session)}`, {
    headers: token ? { Authorization: `Bearer ${token}` } : {},
  });
  if (response.status === 404) {
    return { frame: { type: "snapshot", offset: null, session_id: session, reason: "offset_gone", generations: [] } };
  }
  if (!response.ok) return { status: response.status, reason: await errorText(response) };
  return { frame: { type: "snapshot", reason: "offset_gone", ...(await response.json()) } };
}

/**
 * One session's stream: its position, its token, and what to do when the server ends it (resume,
 * reconnect with a fresh token, rebuild from a snapshot, or stop).
 */
class ResumingStream extends FrameSource {
  /** @param {import("./tokenfan").StreamOptions} options */
  constructor(options) {
    super(options);
    if (!options?.session) throw new TypeError("session is required");
    this.session = options.session;
    this.api = options.api ? options.api.replace(/\/+$/, "") : null;
    this.token = options.token ?? null;
    /** Offset of the last frame received: the stream resumes after it. */
    this.offset = options.after ?? null;
    /** Tokens refreshed without a reconnect. */
    this.refreshes = 0;
    this.freshTokenRefused = false;
    /** When the token of the current connection expires, if it says (a session token does). */
    this.times = null;
  }

  /** One frame received: remember its offset, hand it out. */
  deliver(frame) {
    if (frame.offset !== undefined) this.offset = frame.offset;
    this.freshTokenRefused = false;
    this.handOut(frame);
  }

  async prepare() {
    return resolveToken(this.token);
  }

  /** The server closed our stream with `code`: resume, rebuild, reconnect with a fresh token, or stop. */
  closed(code, reason) {
    const action = this.afterClose(code);
    this.emit("close", { code, reason, resuming: action !== "stop" });
    if (action === "expired") {
      this.connectSoon(0); // the token ran out: go on at once with a fresh one
    } else if (action === "fresh") {
      this.freshTokenRefused = true; // refused before its time: one more try, with a fresh one
      this.connectSoon(0);
    } else if (action === "rebuild") {
      this.rebuild();
    } else if (action === "stop") {
      this.fail(new TokenfanError(code, reason));
    } else if (action === "backoff") {
      this.retry();
    }
  }

  /** @param {number} code @returns {"none" | "expired" | "fresh" | "rebuild" | "stop" | "backoff"} */
  afterClose(code) {
    if (this.state === "closed" || this.state === "paused") return "none";
    if (code === 4401 && typeof this.token === "function") {
      if (hasExpired(this.times)) return "expired";
      if (!this.freshTokenRefused) return "fresh";
    }
    if (REBUILD.has(code) && this.api) return "rebuild";
    if (FATAL.has(code) || REBUILD.has(code)) return "stop";
    return "backoff";
  }

  /** Our position is lost (4410, 4404): take the session's snapshot, yield it, continue after its offset. */
  async rebuild() {
    if (this.state === "closed") return;
    this.state = "waiting";
    let result;
    try {
      result = await snapshotFrame(this.api, this.session, await resolveToken(this.token));
    } catch (error) {
      result = { status: 0, reason: String(error) };
    }
    if (this.state === "closed") return;
    if (result.status === 401 || result.status === 403) {
      return this.fail(new TokenfanError(result.status === 401 ? 4401 : 4403, result.reason));
    }
    if (!result.frame) {
      this.emit("error", new TokenfanError(result.status, `rebuilding failed: ${result.reason}`, { fatal: false }));
      this.timer = setTimeout(() => this.rebuild(), this.maxBackoff);
      return;
    }
    this.offset = result.frame.offset;
    this.deliver(result.frame);
    if (this.state !== "closed" && this.state !== "paused") this.connectSoon(0);
  }
}

/** @param {Response} response */
async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/**
 * Seconds since the epoch at which a session token (a JWT) expires, and its lifetime; null for anything
 * else. Read only to time the refresh: the server is the one that checks tokens.
 * @param {string | null} token
 */
function tokenTimes(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    if (typeof claims.exp !== "number") return null;
    return { expiresAt: claims.exp, lifetime: claims.exp - (claims.iat ?? claims.exp) };
  } catch {
    return null;
  }
}

/**
 * A session's frames over the relay's WebSocket (`/v1/sessions/{id}/stream`), resumed across drops.
 * See tokenfan.d.ts for the options and events.
 */
export class SessionStream extends ResumingStream {
  /** @param {import("./tokenfan").SessionStreamOptions} options */
  constructor(options) {
    super(options);
    if (!options.relay) throw new TypeError("relay is required (ws:// or wss://)");
    this.relay = options.relay.replace(/\/+$/, "");
    this.socket = null;
    this.refreshTimer = null;
    this.pendingTimes = null;
  }

  /** Drop the current connection on purpose, as a network failure would; the stream resumes by itself. */
  reconnect() {
    if (this.socket && this.state === "open") this.socket.close(DROPPED, "dropped by the client");
  }

  /** @param {string | null} token */
  url(token) {
    const query = new URLSearchParams();
    if (this.offset) query.set("after", this.offset);
    if (token) query.set("token", token);
    const path = `${this.relay}/v1/sessions/${encodeURIComponent(this.session)}/stream`;
    return query.toString() ? `${path}?${query}` : path;
  }

  /** @param {string | null} token */
  connect(token) {
    this.times = tokenTimes(token);
    const socket = new WebSocket(this.url(token));
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.state = "open";
      this.connections += 1;
      this.emit("open", { connection: this.connections, after: this.offset });
      this.scheduleRefresh(this.times);
    };
    socket.onmessage = (event) => {
      if (this.socket === socket) this.received(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      clearTimeout(this.refreshTimer);
      this.closed(event.code, event.reason);
    };
  }

  disconnect() {
    clearTimeout(this.refreshTimer);
    const socket = this.socket;
    if (this.state !== "paused") this.socket = null;
    socket?.close(1000, this.state === "paused" ? "paused: the reader fell behind" : "closed by the client");
  }

  /** A frame with an offset is an event; the others answer our `refresh`. */
  received(frame) {
    if (frame.offset !== undefined) return this.deliver(frame);
    if (frame.type === "refreshed") {
      this.refreshes += 1;
      this.failures = 0;
      this.freshTokenRefused = false;
      this.times = this.pendingTimes;
      this.emit("refreshed", { expiresAt: frame.expires_at ?? null });
      this.scheduleRefresh(this.pendingTimes);
    } else if (frame.type === "error") {
      // A refused refresh changes nothing yet: the old token runs out, and the stream reconnects then.
      this.emit("error", new TokenfanError(frame.code, frame.reason, { fatal: false }));
    }
  }

  /**
   * With a token function, send a fresh token before this one expires: a third of its lifetime before,
   * at least one second and at most a minute. Without one, the stream ends with 4401 at expiry.
   */
  scheduleRefresh(times) {
    clearTimeout(this.refreshTimer);
    const delay = refreshDelay(times);
    if (delay === null || typeof this.token !== "function") return;
    this.refreshTimer = setTimeout(() => this.refresh(), delay);
  }

  async refresh() {
    const socket = this.socket;
    try {
      const token = await resolveToken(this.token);
      this.pendingTimes = tokenTimes(token);
      if (socket && this.socket === socket && this.state === "open") {
        socket.send(JSON.stringify({ type: "refresh", token }));
      }
    } catch (error) {
      this.emit("error", new TokenfanError(0, `refreshing the token failed: ${error}`, { fatal: false }));
    }
  }
}

/**
 * A session's frames as Server-Sent Events (`GET /v1/sessions/{id}/events`, an `EventSource`), for where
 * WebSockets are blocked. Same interface as `SessionStream`; `api` is required. An EventSource can only
 * listen for event types by name: pass custom ones (a hook's `x.*` types) as `eventTypes`.
 */
export class SseStream extends ResumingStream {
  /** @param {import("./tokenfan").SseStreamOptions} options */
  constructor(options) {
    super(options);
    if (!this.api) throw new TypeError("api is required (the request API's base URL)");
    this.eventTypes = [...SSE_TYPES, ...(options.eventTypes ?? [])];
    this.source = null;
    this.currentUrl = null;
  }

  /** Drop the current connection on purpose; the stream resumes by itself. */
  reconnect() {
    if (this.source && this.state === "open") {
      this.disconnect();
      this.closed(DROPPED, "dropped by the client");
    }
  }

  /** @param {string | null} token */
  url(token) {
    const query = new URLSearchParams();
    if (this.offset) query.set("after", this.offset);
    if (token) query.set("token", token);
    const path = `${this.api}/v1/sessions/${encodeURIComponent(this.session)}/events`;
    return query.toString() ? `${path}?${query}` : path;
  }

  /** @param {string | null} token */
  connect(token) {
    this.times = tokenTimes(token);
    const source = new EventSource(this.url(token));
    this.source = source;
    this.currentUrl = source.url;
    source.onopen = () => {
      if (this.source !== source) return;
      this.state = "open";
      this.connections += 1;
      this.emit("open", { connection: this.connections, after: this.offset });
    };
    const onFrame = (event) => {
      if (this.source === source) this.deliver(JSON.parse(event.data));
    };
    for (const type of this.eventTypes) source.addEventListener(type, onFrame);
    source.addEventListener("error", (event) => {
      if (this.source === source) this.sourceError(source, event);
    });
  }

  disconnect() {
    this.source?.close();
    this.source = null;
  }

  /**
   * The server's `error` event ends the response with a close code; the browser's own `error` means the
   * connection failed. A browser retries a dropped response by itself (sending Last-Event-ID); when it
   * gives up (an HTTP error), ask the server what the status was.
   */
  async sourceError(source, event) {
    if (typeof event.data === "string") {
      const { code, reason } = JSON.parse(event.data);
      this.disconnect();
      return this.closed(code, reason);
    }
    if (source.readyState !== EventSource.CLOSED) return;
    this.disconnect();
    const status = await httpStatus(this.currentUrl);
    const code = { 400: 4400, 401: 4401, 403: 4403, 404: 4404, 410: 4410 }[status] ?? 1006;
    this.closed(code, `HTTP ${status ?? "unreachable"}`);
  }
}

/**
 * Several sessions over one relay connection (`/v1/stream`), for dashboards and collaboration clients.
 * Each subscription has its own token (sent in its `subscribe` message, never in a URL) and its own
 * position: after a drop, the stream reconnects and subscribes to each session again after its last
 * offset. A subscription's own troubles (its token expired, its position is gone) are handled for that
 * subscription alone; one that cannot go on is reported as a fatal `error` carrying its `session`, and
 * the others go on. Frames of every session come through the same callbacks and iterator, each with its
 * `session_id`.
 */
export class MultiStream extends FrameSource {
  /** @param {import("./tokenfan").MultiStreamOptions} options */
  constructor(options) {
    super(options);
    if (!options?.relay) throw new TypeError("relay is required (ws:// or wss://)");
    this.relay = options.relay.replace(/\/+$/, "");
    this.api = options.api ? options.api.replace(/\/+$/, "") : null;
    /** @type {Map<string, any>} the live subscriptions, by session */
    this.subscriptions = new Map();
    this.socket = null;
  }

  /**
   * Watch `session` too, after `after` (default: its whole history), with its own token or token function.
   * @param {string} session
   * @param {{token?: import("./tokenfan").TokenSource, after?: string | null}} [options]
   */
  subscribe(session, { token = null, after = null } = {}) {
    if (this.subscriptions.has(session)) throw new TypeError(`already subscribed to ${session}`);
    const subscription = {
      session, token, offset: after, frames: 0, refreshes: 0, failures: 0, times: null,
      pendingTimes: null, freshTokenRefused: false, rebuilding: false, timer: null,
    };
    this.subscriptions.set(session, subscription);
    if (this.state === "open") this.sendSubscribe(subscription);
    else this.start();
    return this;
  }

  /** Stop watching `session`; no frame of it follows. @param {string} session */
  unsubscribe(session) {
    const subscription = this.subscriptions.get(session);
    if (!subscription) return this;
    clearTimeout(subscription.timer);
    this.subscriptions.delete(session);
    if (this.state === "open") this.send({ type: "unsubscribe", session_id: session });
    return this;
  }

  /** Offset of the last frame received of `session`. @param {string} session */
  offset(session) {
    return this.subscriptions.get(session)?.offset ?? null;
  }

  /** Drop the connection on purpose; every subscription resumes after its last offset. */
  reconnect() {
    if (this.socket && this.state === "open") this.socket.close(DROPPED, "dropped by the client");
  }

  connect() {
    const socket = new WebSocket(`${this.relay}/v1/stream`);
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.state = "open";
      this.connections += 1;
      this.emit("open", { connection: this.connections, after: null });
      for (const subscription of this.subscriptions.values()) {
        if (!subscription.rebuilding) this.sendSubscribe(subscription); // a rebuild subscribes when done
      }
    };
    socket.onmessage = (event) => {
      if (this.socket === socket) this.received(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      for (const subscription of this.subscriptions.values()) clearTimeout(subscription.timer);
      this.connectionClosed(event.code, event.reason);
    };
  }

  disconnect() {
    for (const subscription of this.subscriptions.values()) clearTimeout(subscription.timer);
    const socket = this.socket;
    if (this.state !== "paused") this.socket = null;
    socket?.close(1000, this.state === "paused" ? "paused: the reader fell behind" : "closed by the client");
  }

  /** The connection ended: reconnect (the subscriptions follow), wait for a subscription, or stop. */
  connectionClosed(code, reason) {
    if (this.state === "closed" || this.state === "paused") return;
    const stop = code === 4429 || code === 1009;
    this.emit("close", { code, reason, resuming: !stop });
    if (stop) return this.fail(new TokenfanError(code, reason));
    if (this.subscriptions.size) return this.retry();
    this.state = "idle"; // nothing to watch: the relay closes idle anonymous connections; wait for a subscribe
  }

  /** @param {object} message */
  send(message) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  /** Subscribe (again) after the subscription's last offset, with a token fetched now. */
  async sendSubscribe(subscription) {
    const socket = this.socket;
    let token;
    try {
      token = await resolveToken(subscription.token);
    } catch (error) {
      if (error instanceof TokenfanError) return this.endSubscription(subscription, error);
      this.emit("error", new TokenfanError(0, `getting a token failed: ${error}`, { fatal: false }));
      return this.resubscribeLater(subscription);
    }
    if (this.socket !== socket || this.subscriptions.get(subscription.session) !== subscription) return;
    subscription.times = tokenTimes(token);
    const message = { type: "subscribe", session_id: subscription.session };
    if (subscription.offset) message.after = subscription.offset;
    if (token) message.token = token;
    this.send(message);
  }

  resubscribeLater(subscription) {
    subscription.failures += 1;
    const delay = backoff(subscription.failures, this.minBackoff, this.maxBackoff);
    subscription.timer = setTimeout(() => this.sendSubscribe(subscription), delay);
  }

  /** A frame with an offset is an event of one session; the others answer our messages. */
  received(frame) {
    const subscription = this.subscriptions.get(frame.session_id);
    if (frame.offset !== undefined) {
      if (!subscription) return; // sent before our unsubscribe reached the relay
      subscription.offset = frame.offset;
      subscription.frames += 1;
      subscription.failures = 0;
      subscription.freshTokenRefused = false;
      return this.handOut(frame);
    }
    if (frame.type === "subscribed" && subscription) {
      this.scheduleRefresh(subscription, subscription.times);
      this.emit("subscribed", { session: frame.session_id });
    } else if (frame.type === "refreshed" && subscription) {
      Object.assign(subscription, { times: subscription.pendingTimes, freshTokenRefused: false });
      subscription.refreshes += 1;
      this.scheduleRefresh(subscription, subscription.times);
      this.emit("refreshed", { session: frame.session_id, expiresAt: frame.expires_at ?? null });
    } else if (frame.type === "error" && subscription) {
      this.subscriptionEnded(subscription, frame.code, frame.reason);
    } else if (frame.type === "error") {
      // A refused refresh, or a message the relay could not read: nothing ended yet.
      this.emit("error", new TokenfanError(frame.code, frame.reason, { fatal: false }));
    }
  }

  /** The relay ended one subscription with `code`, as it would have closed a single-session stream. */
  subscriptionEnded(subscription, code, reason) {
    clearTimeout(subscription.timer);
    if (code === 4401 && typeof subscription.token === "function") {
      if (hasExpired(subscription.times)) return this.sendSubscribe(subscription);
      if (!subscription.freshTokenRefused) {
        subscription.freshTokenRefused = true;
        return this.sendSubscribe(subscription);
      }
    }
    if (REBUILD.has(code) && this.api) return this.rebuild(subscription);
    if (FATAL.has(code) || REBUILD.has(code)) return this.endSubscription(subscription, new TokenfanError(code, reason));
    this.resubscribeLater(subscription);
  }

  /** Report that `subscription` cannot go on, and forget it; the connection and the others go on. */
  endSubscription(subscription, error) {
    clearTimeout(subscription.timer);
    this.subscriptions.delete(subscription.session);
    error.session = subscription.session;
    this.emit("error", error);
  }

  /** This subscription's position is lost: yield its session's snapshot, subscribe after its offset. */
  async rebuild(subscription) {
    subscription.rebuilding = true;
    let result;
    try {
      result = await snapshotFrame(this.api, subscription.session, await resolveToken(subscription.token));
    } catch (error) {
      result = { status: 0, reason: String(error) };
    }
    if (this.state === "closed" || this.subscriptions.get(subscription.session) !== subscription) return;
    if (result.frame || result.status === 401 || result.status === 403) subscription.rebuilding = false;
    if (result.status === 401 || result.status === 403) {
      return this.endSubscription(subscription, new TokenfanError(result.status === 401 ? 4401 : 4403, result.reason));
    }
    if (!result.frame) {
      this.emit("error", new TokenfanError(result.status, `rebuilding failed: ${result.reason}`, { fatal: false }));
      subscription.timer = setTimeout(() => this.rebuild(subscription), this.maxBackoff);
      return;
    }
    subscription.offset = result.frame.offset;
    subscription.frames += 1;
    this.handOut(result.frame);
    if (this.state === "open") this.sendSubscribe(subscription);
  }

  scheduleRefresh(subscription, times) {
    clearTimeout(subscription.timer);
    const delay = refreshDelay(times);
    if (delay === null || typeof subscription.token !== "function") return;
    subscription.timer = setTimeout(() => this.refresh(subscription), delay);
  }

  async refresh(subscription) {
    try {
      const token = await resolveToken(subscription.token);
      subscription.pendingTimes = tokenTimes(token);
      this.send({ type: "refresh", token, session_id: subscription.session });
    } catch (error) {
      this.emit("error", new TokenfanError(0, `refreshing the token failed: ${error}`, { fatal: false }));
    }
  }
}

/** The HTTP status `url` answers now (the body is not read), or null when it cannot be reached. */
async function httpStatus(url) {
  const controller = new AbortController();
  try {
    const response = await fetch(url, { signal: controller.signal });
    return response.status;
  } catch {
    return null;
  } finally {
    controller.abort();
  }
}

/**
 * One generation as assembled from frames.
 * @returns {import("./tokenfan").Generation}
 */
function newGeneration(id) {
  return {
    id, status: "queued", content: "", reasoning: "", toolCalls: [], attempt: 0, lastSeq: 0,
    restarts: 0, finishReason: null, usage: null, error: null, completed: null, fromSnapshot: false,
    verification: null, other: [],
  };
}

/** The frames do not form a valid stream: a gap, a duplicate, or an offset out of order. */
export class TranscriptError extends Error {
  constructor(message) {
    super(message);
    this.name = "TranscriptError";
  }
}

/**
 * A session assembled from its frames, in the order received (as `tokenfan.client.Transcript` in Python).
 * `apply` throws `TranscriptError` on anything a correct stream never produces. A completed generation
 * gets a `verification` promise: its length and SHA-256 against the text assembled.
 */
export class Transcript {
  constructor() {
    /** @type {Map<string, import("./tokenfan").Generation>} */
    this.generations = new Map();
    this.lastOffset = null;
    this.frames = 0;
  }

  /**
   * Fold one frame in; returns the generation it touched (null for a snapshot).
   * @param {any} frame
   */
  apply(frame) {
    if (frame.type === "snapshot") return this.applySnapshot(frame);
    this.checkOffset(frame.offset);
    let generation = this.generations.get(frame.generation_id);
    if (!generation) {
      generation = newGeneration(frame.generation_id);
      this.generations.set(generation.id, generation);
    }
    checkSeq(generation, frame);
    this.frames += 1;
    applyEvent(generation, frame);
    return generation;
  }

  /** A snapshot replaces each generation it lists with its state as of the snapshot's offset. */
  applySnapshot(frame) {
    if (frame.offset) this.checkOffset(frame.offset);
    for (const view of frame.generations ?? []) {
      const generation = newGeneration(view.generation_id);
      Object.assign(generation, {
        status: view.status, content: view.text ?? "", reasoning: view.reasoning ?? "",
        toolCalls: (view.tool_calls ?? []).map((call) => ({ ...call })), attempt: view.attempt ?? 0,
        lastSeq: view.seq ?? 0, finishReason: view.finish_reason ?? null, usage: view.usage ?? null,
        error: view.error ?? null, fromSnapshot: true,
      });
      this.generations.set(generation.id, generation);
    }
    // Apps' events (the pseudo-generation "app") that the snapshot skipped are in no generation's state.
    const app = this.generations.get("app");
    if (app) app.lastSeq = 0;
    this.frames += 1;
    return null;
  }

  checkOffset(offset) {
    if (!offsetFollows(this.lastOffset, offset)) {
      throw new TranscriptError(`offset ${offset} does not follow ${this.lastOffset}: a duplicate or reordering`);
    }
    this.lastOffset = offset;
  }
}

function checkSeq(generation, frame) {
  const first = frame.seq_start ?? frame.seq;
  if (generation.lastSeq && first !== generation.lastSeq + 1) {
    const kind = first <= generation.lastSeq ? "a duplicate" : "a gap";
    throw new TranscriptError(`${generation.id}: seq ${first} after ${generation.lastSeq}: ${kind}`);
  }
  generation.lastSeq = frame.seq;
}

function applyEvent(generation, frame) {
  switch (frame.type) {
    case "delta":
      generation.content += frame.content ?? "";
      generation.reasoning += frame.reasoning ?? "";
      for (const call of frame.tool_calls ?? []) appendToolCall(generation, call);
      break;
    case "generation.started":
      generation.status = "running";
      generation.attempt = frame.attempt ?? 1;
      break;
    case "generation.restarted": // the worker died: what it produced so far is void
      Object.assign(generation, { content: "", reasoning: "", toolCalls: [] });
      generation.restarts += 1;
      break;
    case "generation.completed":
      Object.assign(generation, { status: "completed", finishReason: frame.finish_reason ?? null });
      generation.usage = frame.usage ?? null;
      generation.completed = frame;
      generation.verification = verify(generation, frame);
      break;
    case "generation.failed":
      Object.assign(generation, { status: "failed", error: frame.error ?? null, usage: frame.usage ?? null });
      break;
    case "generation.cancelled":
      Object.assign(generation, { status: "cancelled", usage: frame.usage ?? null });
      break;
    default: // a hook's x.* event, or a type newer than this client: kept, in order
      generation.other.push(frame);
  }
}

function appendToolCall(generation, call) {
  let entry = generation.toolCalls.find((existing) => existing.index === call.index);
  if (!entry) {
    entry = { index: call.index, id: "", name: "", arguments: "" };
    generation.toolCalls.push(entry);
    generation.toolCalls.sort((a, b) => a.index - b.index);
  }
  if (call.id) entry.id = call.id;
  if (call.name) entry.name = call.name;
  entry.arguments += call.arguments ?? "";
}

/**
 * The completed frame's `length` and `sha256` (and each tool call's) against what was assembled.
 * @returns {Promise<import("./tokenfan").Verification>}
 */
async function verify(generation, frame) {
  const text = generation.content;
  const checks = [{ what: "text", text, length: frame.length, sha256: frame.sha256 }];
  for (const digest of frame.tool_calls ?? []) {
    const call = generation.toolCalls.find((entry) => entry.index === digest.index);
    checks.push({ what: `tool call ${digest.index}`, text: call?.arguments ?? "", ...digest });
  }
  const length = codePointLength(text);
  const sha256 = await sha256Hex(text);
  for (const check of checks) {
    if (check.length !== undefined && codePointLength(check.text) !== check.length) {
      return { ok: false, length, sha256, reason: `${check.what}: length differs from the stream's` };
    }
    const actual = check.what === "text" ? sha256 : await sha256Hex(check.text);
    if (actual === null) {
      return { ok: null, length, sha256, reason: "SHA-256 needs a secure context (https or localhost)" };
    }
    if (check.sha256 !== undefined && actual !== check.sha256) {
      return { ok: false, length, sha256, reason: `${check.what}: SHA-256 differs from the stream's` };
    }
  }
  return { ok: true, length, sha256, reason: null };
}

/** Whether `frame` ends its generation. @param {{type: string}} frame */
export function isTerminal(frame) {
  return TERMINAL.has(frame.type);
}
