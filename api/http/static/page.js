// The live demo page: one session, several subscriber panes, each its own connection. Plain DOM, no
// framework. Everything shown comes from the client module the API serves (/v1/client/tokenfan.js);
// model output is untrusted text, so it is only ever set as textContent.
import { SessionStream, SseStream, Transcript, TranscriptError } from "/v1/client/tokenfan.js";

const STATUS_RANK = { queued: 0, running: 1, completed: 2, failed: 2, cancelled: 2 };
const SIMULATOR_EXTRAS = {
  reasoning: {
    reasoning: ["The user asks about fan-out. ", "Look it up first, ", "then answer."],
    tool_calls: [{ name: "search", arguments: "{\"query\": \"fan-out\"}" }],
  },
};

/**
 * Your backend's part, played by the page in the local demo only: it holds an API key (in memory) to
 * enqueue generations and to mint session tokens. A real app does this on its server and gives the
 * browser nothing but session tokens; the panes below never see the key.
 */
class DemoBackend {
  /** @param {string} session @param {string} key */
  constructor(session, key) {
    this.session = session;
    this.key = key;
    this.tokensConfigured = true;
  }

  headers() {
    return { "content-type": "application/json", ...(this.key ? { Authorization: `Bearer ${this.key}` } : {}) };
  }

  /** A fresh session token (null when the server runs without token secrets, in development mode). */
  async sessionToken() {
    if (!this.tokensConfigured) return null;
    const path = `/v1/sessions/${encodeURIComponent(this.session)}/tokens`;
    const response = await fetch(path, { method: "POST", headers: this.headers() });
    if (response.status === 400) {
      this.tokensConfigured = false;
      return null;
    }
    if (!response.ok) throw new Error(await problem(response));
    return (await response.json()).token;
  }

  /** @param {object} body a chat.completions request */
  async enqueue(body) {
    const path = `/v1/sessions/${encodeURIComponent(this.session)}/generations`;
    const response = await fetch(path, { method: "POST", headers: this.headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await problem(response));
    return response.json();
  }

  /** @param {string} generationId */
  async cancel(generationId) {
    const response = await fetch(`/v1/generations/${generationId}/cancel`, { method: "POST", headers: this.headers() });
    if (!response.ok) throw new Error(await problem(response));
    return response.json();
  }
}

/** @param {Response} response */
async function problem(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** @param {string} id */
const $ = (id) => document.getElementById(id);

/** @param {string} templateId */
function fromTemplate(templateId) {
  return /** @type {HTMLElement} */ ($(templateId).content.firstElementChild.cloneNode(true));
}

/** The queue of generations: what was enqueued here, and what any pane has seen, by status. */
class Queue {
  constructor(list) {
    this.list = list;
    this.items = new Map();
    this.onCancel = null;
  }

  /** @param {string} id @param {string} status @param {string} [label] */
  update(id, status, label) {
    let item = this.items.get(id);
    if (!item) {
      item = this.create(id);
      this.items.set(id, item);
    }
    if (label) item.label.textContent = label;
    if (STATUS_RANK[status] < STATUS_RANK[item.status]) return; // panes may lag behind each other
    item.status = status;
    item.statusElement.textContent = status;
    item.element.dataset.status = status;
    item.cancel.hidden = STATUS_RANK[status] === 2 || !this.onCancel;
  }

  create(id) {
    const element = document.createElement("li");
    const statusElement = Object.assign(document.createElement("span"), { className: "status" });
    const code = Object.assign(document.createElement("code"), { textContent: id });
    const label = Object.assign(document.createElement("span"), { className: "label" });
    const cancel = Object.assign(document.createElement("button"), { type: "button", textContent: "Cancel" });
    cancel.addEventListener("click", () => this.onCancel?.(id));
    element.dataset.id = id;
    element.append(statusElement, code, label, cancel);
    this.list.append(element);
    return { element, statusElement, label, cancel, status: "queued" };
  }
}

/** One subscriber: its own stream (WebSocket or SSE), its own transcript, its own piece of the page. */
class Pane {
  constructor({ number, transport, streamOptions, queue }) {
    this.number = number;
    this.transport = transport;
    this.queue = queue;
    this.frames = [];
    this.errors = [];
    this.transcript = new Transcript();
    this.element = fromTemplate("pane-template");
    this.element.dataset.pane = String(number);
    this.element.querySelector(".title").textContent = `Pane ${number} · ${transport}`;
    this.field = (name) => this.element.querySelector(`.${name}`);
    this.generationElements = new Map();
    this.stream = transport === "SSE" ? new SseStream(streamOptions) : new SessionStream(streamOptions);
    this.listen();
    this.field("drop").addEventListener("click", () => this.stream.reconnect());
    this.field("remove").addEventListener("click", () => this.remove());
  }

  listen() {
    this.stream.on("frame", (frame) => this.received(frame));
    this.stream.on("open", ({ connection }) => this.show(connection === 1 ? "live" : "live (resumed)"));
    this.stream.on("close", ({ code, resuming }) => this.show(resuming ? `reconnecting (closed ${code})` : "stopped"));
    this.stream.on("refreshed", () => this.showStats());
    this.stream.on("error", (error) => {
      if (!error.fatal) return;
      this.problem(`Stopped: ${error.reason} (${error.code})`);
      console.warn(`pane ${this.number}:`, error.message);
    });
  }

  start() {
    this.show("connecting");
    this.stream.start();
    return this;
  }

  received(frame) {
    this.frames.push(frame);
    const box = this.field("generations");
    const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40; // the reader is at the end
    try {
      const generation = this.transcript.apply(frame);
      if (generation) this.render(generation);
      else this.renderAll();
    } catch (error) {
      if (!(error instanceof TranscriptError)) throw error;
      this.errors.push(error.message);
      this.problem(`✗ ${error.message}`);
      console.error(`pane ${this.number}: ${error.message}`);
    }
    this.showStats();
    if (following) box.scrollTop = box.scrollHeight;
  }

  renderAll() {
    for (const generation of this.transcript.generations.values()) this.render(generation);
  }

  render(generation) {
    const element = this.generationElement(generation.id);
    const part = (name) => element.querySelector(`.${name}`);
    this.queue.update(generation.id, generation.status);
    element.dataset.status = generation.status;
    part("status").textContent = generation.restarts ? `${generation.status} (restarted)` : generation.status;
    part("reasoning").hidden = !generation.reasoning;
    part("reasoning-text").textContent = generation.reasoning;
    part("answer").textContent = generation.content;
    part("tools").replaceChildren(...generation.toolCalls.map(toolCallItem));
    if (generation.fromSnapshot) part("badge").textContent = "from a snapshot";
    if (generation.verification && !element.dataset.verifying) {
      element.dataset.verifying = "yes";
      generation.verification.then((verification) => showVerification(part("badge"), verification));
    }
  }

  generationElement(id) {
    let element = this.generationElements.get(id);
    if (!element) {
      element = fromTemplate("generation-template");
      element.dataset.id = id;
      element.querySelector(".id").textContent = id;
      this.generationElements.set(id, element);
      this.field("generations").append(element);
    }
    return element;
  }

  show(state) {
    this.field("state").textContent = state;
    this.showStats();
  }

  showStats() {
    this.field("offset").textContent = this.stream.offset ?? "none yet";
    this.field("frames").textContent = String(this.stream.frames);
    this.field("connections").textContent = String(this.stream.connections);
    this.field("refreshes").textContent = String(this.stream.refreshes);
  }

  problem(text) {
    const element = this.field("problem");
    element.hidden = false;
    element.textContent = text;
  }

  remove() {
    this.stream.close();
    this.element.remove();
    demo.panes = demo.panes.filter((pane) => pane !== this);
  }
}

function toolCallItem(call) {
  const item = document.createElement("li");
  const name = Object.assign(document.createElement("strong"), { textContent: `${call.name || "tool"}(` });
  const args = Object.assign(document.createElement("code"), { textContent: call.arguments });
  item.append("Tool call: ", name, args, ")");
  return item;
}

function showVerification(badge, { ok, length, sha256, reason }) {
  badge.classList.add(ok ? "verified" : ok === null ? "unverifiable" : "mismatch");
  if (ok) badge.textContent = `✓ verified: ${length} characters, sha256 ${sha256.slice(0, 12)}…`;
  else badge.textContent = ok === null ? `length ${length} checked; ${reason}` : `✗ ${reason}`;
  badge.title = sha256 ? `sha256 ${sha256}` : "";
}

/** The page's state, also what the browser tests read. */
const demo = {
  session: "demo",
  relay: null,
  backend: null,
  /** @type {Pane[]} */
  panes: [],
  queue: null,
  token: null,
  addPane,
};
window.demo = demo;

/** @param {"WebSocket" | "SSE"} transport */
function addPane(transport) {
  if (!demo.relay) transport = "SSE"; // the relay's address is not configured: the API alone serves
  const number = (demo.panes.at(-1)?.number ?? 0) + 1;
  const streamOptions = { relay: demo.relay, api: location.origin, session: demo.session, token: demo.token };
  const pane = new Pane({ number, transport, streamOptions, queue: demo.queue });
  demo.panes.push(pane);
  $("panes").append(pane.element);
  return pane.start();
}

function startPanes() {
  $("join-late").disabled = false;
  if (demo.panes.length) return;
  addPane("WebSocket");
  addPane("WebSocket");
  addPane("SSE");
}

/** The prompt box: enqueue through the demo backend, list the generation in the queue. */
async function sendPrompt(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  const extras = SIMULATOR_EXTRAS[$("extras").value];
  const content = extras ? `${text} <<sim ${JSON.stringify(extras)}>>` : text;
  const status = $("prompt-status");
  try {
    const accepted = await demo.backend.enqueue({ model: "tokenfan-sim", messages: [{ role: "user", content }] });
    demo.queue.update(accepted.generation_id, accepted.status, text);
    status.textContent = `Queued at position ${accepted.queue_position}.`;
  } catch (error) {
    status.textContent = `Not queued: ${error.message}`;
  }
}

/** The key form: check the key by minting a token with it, then open the panes. */
async function connectBackend(event) {
  event.preventDefault();
  const status = $("backend-status");
  const backend = new DemoBackend(demo.session, $("api-key").value.trim());
  try {
    await backend.sessionToken();
  } catch (error) {
    status.textContent = `That did not work: ${error.message}`;
    return;
  }
  demo.backend = backend;
  demo.token = () => backend.sessionToken();
  demo.queue.onCancel = (id) => backend.cancel(id).catch((error) => { status.textContent = error.message; });
  status.textContent = backend.tokensConfigured
    ? "Connected. Panes watch with session tokens minted by the demo backend, refreshed before they expire."
    : "Connected without tokens (insecure development mode).";
  $("prompt-form").hidden = false;
  startPanes();
}

/** A page opened with `#token=<session token>` is a viewer: it watches and cannot enqueue. */
function viewerToken() {
  return new URLSearchParams(location.hash.slice(1)).get("token");
}

async function main() {
  const params = new URLSearchParams(location.search);
  demo.session = params.get("session") || "demo";
  $("session-name").textContent = demo.session;
  $("session").value = demo.session;
  demo.queue = new Queue($("queue"));
  const config = await (await fetch("/v1/client/config.json")).json();
  demo.relay = params.get("relay") || config.relay;
  $("session-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.search = new URLSearchParams({ session: $("session").value }).toString();
  });
  $("backend-form").addEventListener("submit", connectBackend);
  $("prompt-form").addEventListener("submit", sendPrompt);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("prompt-form").requestSubmit();
  });
  $("join-late").addEventListener("click", () => addPane($("use-sse").checked ? "SSE" : "WebSocket"));
  const token = viewerToken();
  if (token) {
    demo.token = token;
    $("backend-form").hidden = true;
    startPanes();
  } else {
    $("api-key").focus();
  }
}

main();
