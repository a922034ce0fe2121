// Types of tokenfan.js, the browser client for tokenfan's wire protocol v1 (docs/PROTOCOL.md).

/** The protocol version the module speaks, and the prefix it is served under (`/v1/client/`). */
export declare const PROTOCOL_VERSION: 1;

/** A session token, or a function returning a fresh one (called before each connection and each refresh). */
export type TokenSource = string | null | (() => string | null | Promise<string | null>);

/** One frame of docs/PROTOCOL.md: an event (with `offset`) or a `snapshot`. Unknown members are kept. */
export interface Frame {
  type: string;
  offset: string | null;
  session_id: string;
  generation_id?: string;
  seq?: number;
  seq_start?: number;
  content?: string;
  reasoning?: string;
  tool_calls?: ToolCallDelta[];
  generations?: GenerationView[];
  reason?: string;
  [member: string]: unknown;
}

export interface ToolCallDelta {
  index: number;
  id?: string;
  name?: string;
  arguments?: string;
}

/** A generation as `GET /v1/generations/{id}` and snapshot frames describe it. */
export interface GenerationView {
  generation_id: string;
  session_id: string;
  status: GenerationStatus;
  text: string;
  reasoning: string;
  tool_calls: ToolCall[];
  seq: number;
  attempt: number;
  finish_reason: string | null;
  usage: Record<string, unknown> | null;
  error: Record<string, unknown> | null;
  [member: string]: unknown;
}

export type GenerationStatus = "queued" | "running" | "completed" | "failed" | "cancelled";

export interface ToolCall {
  index: number;
  id: string;
  name: string;
  arguments: string;
}

/** How a stream retries and buffers. */
export interface ConnectionOptions {
  /** First retry delay in milliseconds (100); doubles per failure up to `maxBackoff` (5000), with jitter. */
  minBackoff?: number;
  maxBackoff?: number;
  /** Frames an iterator may have unread before the stream pauses its connection (1000). */
  maxBuffered?: number;
  /** Failed connections in a row before the stream gives up with a fatal 1006 (default: never). */
  maxAttempts?: number;
}

export interface StreamOptions extends ConnectionOptions {
  /** The session id. */
  session: string;
  /** A session token (never an API key: it would travel in a URL), or a function returning a fresh one. */
  token?: TokenSource;
  /** Resume after this offset; without it, the session's whole retained history comes first. */
  after?: string | null;
  /** The request API's base URL: needed to rebuild from a snapshot after 4410/4404 (and for SSE). */
  api?: string;
}

export interface SessionStreamOptions extends StreamOptions {
  /** The relay's base URL, `ws://…` or `wss://…`. */
  relay: string;
}

export interface SseStreamOptions extends StreamOptions {
  api: string;
  /** Custom event types (a hook's `x.*`) to listen for: an EventSource only hears types it names. */
  eventTypes?: string[];
}

export interface OpenEvent {
  /** 1 for the first connection, 2 for the first resume, … */
  connection: number;
  /** The offset it resumed after (null: from the start). */
  after: string | null;
}

export interface CloseEvent {
  code: number;
  reason: string;
  /** Whether the stream goes on (it reconnects, refreshes or rebuilds) or has stopped. */
  resuming: boolean;
}

export interface RefreshedEvent {
  /** Unix seconds at which the new token expires. */
  expiresAt: number | null;
}

export interface StreamEvents {
  frame: Frame;
  open: OpenEvent;
  close: CloseEvent;
  error: TokenfanError;
  refreshed: RefreshedEvent;
}

export type StreamState = "idle" | "connecting" | "open" | "waiting" | "paused" | "closed";

/** What both streams share: the position, callbacks, the async iterator, and stopping. */
declare abstract class ResumingStream implements AsyncIterable<Frame> {
  readonly session: string;
  /** Offset of the last frame received: the stream resumes after it. */
  readonly offset: string | null;
  /** Frames received, connections opened, and tokens refreshed without reconnecting. */
  readonly frames: number;
  readonly connections: number;
  readonly refreshes: number;
  readonly state: StreamState;
  /** Open the connection without iterating (for callbacks). Iterating starts it too. */
  start(): this;
  /** Stop for good: no more frames, no reconnect; an iterator ends. */
  close(): void;
  /** Drop the current connection on purpose; the stream resumes after its last offset. */
  reconnect(): void;
  /** Call `listener` for each such event; returns a function that removes it. */
  on<K extends keyof StreamEvents>(type: K, listener: (value: StreamEvents[K]) => void): () => void;
  off<K extends keyof StreamEvents>(type: K, listener: (value: StreamEvents[K]) => void): void;
  /** Every frame once, in order; throws the `TokenfanError` that stopped the stream. Iterate once. */
  [Symbol.asyncIterator](): AsyncIterator<Frame>;
}

/** A session's frames over the relay's WebSocket, resumed across drops, with token refresh. */
export declare class SessionStream extends ResumingStream {
  constructor(options: SessionStreamOptions);
  readonly relay: string;
}

/** A session's frames as Server-Sent Events (an EventSource), for where WebSockets are blocked. */
export declare class SseStream extends ResumingStream {
  constructor(options: SseStreamOptions);
}

/** A close code (or HTTP status) with the server's reason; `fatal` errors ended the stream. */
export declare class TokenfanError extends Error {
  constructor(code: number, reason: string, options?: { fatal?: boolean });
  readonly code: number;
  readonly reason: string;
  readonly fatal: boolean;
  /** On a `MultiStream`: the session whose subscription this error ended (the others go on). */
  session?: string;
}

export interface MultiStreamOptions extends ConnectionOptions {
  /** The relay's base URL, `ws://…` or `wss://…`. */
  relay: string;
  /** The request API's base URL: needed to rebuild a subscription after 4410/4404. */
  api?: string;
}

export interface SubscribeOptions {
  /** This session's token (sent in the subscribe message, not in a URL), or a function returning a fresh one. */
  token?: TokenSource;
  /** Resume after this offset; without it, the session's whole retained history comes first. */
  after?: string | null;
}

export interface MultiStreamEvents {
  frame: Frame;
  open: OpenEvent;
  close: CloseEvent;
  error: TokenfanError;
  subscribed: { session: string };
  refreshed: RefreshedEvent & { session: string };
}

/** Several sessions over one relay connection (`/v1/stream`), each resumed after its own last offset. */
export declare class MultiStream implements AsyncIterable<Frame> {
  constructor(options: MultiStreamOptions);
  readonly relay: string;
  readonly frames: number;
  readonly connections: number;
  readonly state: StreamState;
  /** Watch `session` too; connects if needed. Throws if already subscribed. */
  subscribe(session: string, options?: SubscribeOptions): this;
  /** Stop watching `session`: no frame of it follows. */
  unsubscribe(session: string): this;
  /** Offset of the last frame received of `session` (null: none yet, or not subscribed). */
  offset(session: string): string | null;
  start(): this;
  close(): void;
  /** Drop the connection on purpose; every subscription resumes after its last offset. */
  reconnect(): void;
  on<K extends keyof MultiStreamEvents>(type: K, listener: (value: MultiStreamEvents[K]) => void): () => void;
  off<K extends keyof MultiStreamEvents>(type: K, listener: (value: MultiStreamEvents[K]) => void): void;
  /** Frames of every session (each with its `session_id`), once, in each session's order. */
  [Symbol.asyncIterator](): AsyncIterator<Frame>;
}

/** The frames do not form a valid stream: a gap, a duplicate, or an offset out of order. */
export declare class TranscriptError extends Error {
  constructor(message: string);
}

/** The completed frame's length and SHA-256 against what was assembled. */
export interface Verification {
  /** true: both match; false: a mismatch (see `reason`); null: SHA-256 unavailable (not a secure context). */
  ok: boolean | null;
  length: number;
  sha256: string | null;
  reason: string | null;
}

/** One generation as assembled from frames. */
export interface Generation {
  id: string;
  status: GenerationStatus;
  content: string;
  reasoning: string;
  toolCalls: ToolCall[];
  attempt: number;
  lastSeq: number;
  restarts: number;
  finishReason: string | null;
  usage: Record<string, unknown> | null;
  error: Record<string, unknown> | null;
  /** The `generation.completed` frame, once it came. */
  completed: Frame | null;
  /** True when its state came from a snapshot (no completed frame to verify against). */
  fromSnapshot: boolean;
  /** Set on completion. */
  verification: Promise<Verification> | null;
  /** Events of types this client does not know (a hook's `x.*`), in order. */
  other: Frame[];
}

/** A session assembled from its frames, refusing gaps and duplicates, verifying completed texts. */
export declare class Transcript {
  readonly generations: Map<string, Generation>;
  readonly lastOffset: string | null;
  readonly frames: number;
  /** Fold one frame in; returns the generation it touched (null for a snapshot). Throws `TranscriptError`. */
  apply(frame: Frame): Generation | null;
}

/** Whether offset `next` comes after `previous` in one session (a new epoch counts as after). */
export declare function offsetFollows(previous: string | null, next: string): boolean;
/** Lowercase hex SHA-256 of the UTF-8 text, via WebCrypto; null outside a secure context. */
export declare function sha256Hex(text: string): Promise<string | null>;
/** The number of Unicode code points (what the protocol's `length` counts). */
export declare function codePointLength(text: string): number;
/** Whether the frame ends its generation (completed, failed or cancelled). */
export declare function isTerminal(frame: { type: string }): boolean;
