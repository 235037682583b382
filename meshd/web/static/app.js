// meshd dashboard: one module, no framework, no build step, nothing from a CDN.
//
// Rules:
// - Everything the page shows comes from the node's op table through /api/call (one
//   request, one answer) and /api/stream (NDJSON events), with the token the user logged in
//   with; rules decide, and a 403 is shown as "denied" with the rule's words, never hidden.
// - Data never goes through innerHTML: elements are built with h() and text nodes, so a
//   service name or a log line cannot inject markup.
// - Each page renders into a fresh View; leaving the page aborts the View's requests,
//   streams and timers (nothing keeps running for a page no one looks at).

const TOKEN_KEY = "meshd.token";
const TRACE_ID = /^[0-9a-f]{32}$/;
const NS_KEY = "meshd.namespace";

// ---- helpers --------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = {
  ms: (s) => (s === null || s === undefined ? "—" : s < 0.001 ? `${(s * 1e6).toFixed(0)} µs` : s < 1 ? `${(s * 1000).toFixed(2)} ms` : `${s.toFixed(2)} s`),
  rtt: (ms) => (ms === null || ms === undefined ? "—" : `${Number(ms).toFixed(2)} ms`),
  dur: (s) => {
    if (s === null || s === undefined) return "—";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${hh}h` : hh ? `${hh}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  },
  bytes: (b) => (b === null || b === undefined ? "—" : b >= 1 << 30 ? `${(b / (1 << 30)).toFixed(1)} GiB` : b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} B`),
  time: (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false }),
  datetime: (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 23),
  json: (v) => JSON.stringify(v, null, 2),
};

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// ---- the op table -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    super(error && error.detail ? error.detail : `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
}

function stored(key, v) { if (v) sessionStorage.setItem(key, v); else sessionStorage.removeItem(key); }

const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY) || ""; },
  set token(v) { stored(TOKEN_KEY, v); },
  // a token this page got from auth.login (log out revokes it) and its refresh token; a
  // pasted token is only forgotten (it may be the node's admin.token, used elsewhere)
  get minted() { return sessionStorage.getItem("meshd.minted") === "1"; },
  set minted(v) { stored("meshd.minted", v ? "1" : ""); },
  get refresh() { return sessionStorage.getItem("meshd.refresh") || ""; },
  set refresh(v) { stored("meshd.refresh", v); },
  get namespace() { return sessionStorage.getItem(NS_KEY) || document.documentElement.dataset.namespace || "default"; },
  set namespace(v) { sessionStorage.setItem(NS_KEY, v); },
  whoami: null,
};

function headers() {
  const hd = { "content-type": "application/json" };
  if (session.token) hd.authorization = `Bearer ${session.token}`;
  return hd;
}

function withNamespace(op, args) {
  if (op === "auth.login" || op === "auth.refresh" || op === "auth.token.revoke" || "namespace" in args) return args;
  return { ...args, namespace: session.namespace };
}

async function post(path, op, args, signal) {
  try {
    return await fetch(path, { method: "POST", headers: headers(), signal,
      body: JSON.stringify({ op, args: withNamespace(op, args) }) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { detail: `the node did not answer (${e.message})` });
  }
}

async function answer(res, signal) {
  let data;
  try { data = await res.json(); } catch (e) {
    if (signal && signal.aborted) throw new DOMException("the view went", "AbortError");
    data = { error: { status: res.ok ? 502 : res.status, detail: `the answer was not JSON (HTTP ${res.status})` } };
  }
  return data || {};
}

async function call(op, args = {}, signal, retried = false) {
  const res = await post("/api/call", op, args, signal);
  const data = await answer(res, signal);
  if (!res.ok || data.error) {
    const status = data.error && data.error.status ? data.error.status : res.status;
    if (status === 401 && !op.startsWith("auth.")) {
      if (!retried && await renewed()) return call(op, args, signal, true);
      expired(data.error);
    }
    throw new ApiError(status, data.error);
  }
  return data.result;
}

// A new access token from the refresh token auth.login gave (once at a time); false when
// there is none or it is refused.
let renewing = null;
function renewed() {
  if (!session.refresh) return Promise.resolve(false);
  if (!renewing) {
    renewing = (async () => {
      try {
        const got = await call("auth.refresh", { refresh_token: session.refresh });
        session.token = got.token;
        if (got.refresh_token) session.refresh = got.refresh_token;
        return true;
      } catch { session.refresh = ""; return false; } finally { renewing = null; }
    })();
  }
  return renewing;
}

// Run a stream op; onEvent(event) per event. Resolves when the stream ends, rejects with an
// ApiError (AbortError when the view goes).
async function stream(op, args, onEvent, signal) {
  const res = await post("/api/stream", op, args, signal);
  if (!res.ok) {
    const data = await answer(res, signal);
    throw new ApiError(res.status, data.error);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line) continue;
      const msg = JSON.parse(line);
      if (msg.error) {
        if (msg.error.status === 401 && !(await renewed())) expired(msg.error);
        throw new ApiError(msg.error.status || 500, msg.error);  // renewed: follow() reconnects
      }
      if ("event" in msg) onEvent(msg.event);
    }
  }
}

function expired(error) {
  session.token = "";
  session.whoami = null;
  session.loginNote = (error && error.detail) || "your session ended: log in again";
  if (!location.hash.startsWith("#/login")) location.hash = "#/login";
}

// An error as the page shows it: a denial says so, with the rule's words.
function problem(err, what = "") {
  if (err && err.name === "AbortError") return h("span");
  const status = err && err.status;
  if (status === 403) {
    return h("div", { class: "denied", role: "alert" },
      h("strong", {}, "Denied"), what ? ` (${what})` : "", ": ", err.message);
  }
  return h("div", { class: "error", role: "alert" },
    status ? `${status} ` : "", err && err.error && err.error.code ? `${err.error.code}: ` : "",
    err ? err.message : "failed", what ? ` (${what})` : "");
}

// ---- views --------------------------------------------------------------------------------

class View {
  constructor(el) {
    this.el = el;
    this.ctl = new AbortController();
    this.timers = new Set();
  }
  later(ms, fn) {
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, ms);
    this.timers.add(t);
  }
  get signal() { return this.ctl.signal; }
  get live() { return !this.ctl.signal.aborted; }
  call(op, args) { return call(op, args, this.signal); }
  every(ms, fn) {
    const tick = async () => {
      if (!this.live) return;
      try { await fn(); } catch (e) { if (e.name !== "AbortError") console.warn(e); }
      if (this.live) this.later(ms, tick);
    };
    this.later(ms, tick);
  }
  // Follow a stream op; `onEvent` per event; reconnects after a drop or a renewed token, not
  // after a denial: then `onError(e)`, by default a note under the page's title.
  follow(op, args, onEvent, onError) {
    const stopped = onError || ((e) => {
      const note = problem(e, `live updates stopped (${op})`);
      const at = this.el && this.el.querySelector("h1");
      if (at) at.after(note);
    });
    const run = async (delay) => {
      while (this.live) {
        try {
          await stream(op, args, onEvent, this.signal);
        } catch (e) {
          if (e.name === "AbortError" || !this.live) return;
          const again = !e.status || e.status === 503 || (e.status === 401 && session.token);
          if (!again) { stopped(e); return; }
        }
        await new Promise((r) => this.later(delay, r));
      }
    };
    run(1000);
  }
  close() {
    this.ctl.abort();
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}

// ---- pages --------------------------------------------------------------------------------

const PAGES = [
  ["nodes", "Nodes"], ["network", "Network"], ["services", "Services"], ["traces", "Traces"],
  ["logs", "Logs"], ["stats", "Stats"], ["store", "Store"], ["config", "Config"],
  ["broker", "Broker"], ["runtime", "Runtime"],
];

function title(el, text, ...extra) {
  document.title = `${text} · meshd`;
  el.append(h("h1", {}, text, ...extra));
}

function badge(text) { return h("span", { class: `badge ${text}` }, text); }

function table(columns, rows, rowAttrs) {
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r, i) => h("tr", rowAttrs ? rowAttrs(i) : {}, r.map((c) => h("td", {}, c))))));
}

function tags(obj) {
  return Object.entries(obj || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`));
}

// Login: an account and secret (auth.login), or a pasted token.
async function pageLogin(view) {
  const el = view.el;
  title(el, "Log in");
  const note = session.loginNote;
  session.loginNote = "";
  const msg = h("div", { role: "status", "aria-live": "polite" }, note ? problem(new ApiError(401, { detail: note })) : "");
  const account = h("input", { type: "text", id: "login-account", name: "account", autocomplete: "username", required: true });
  const secret = h("input", { type: "password", id: "login-secret", name: "secret", autocomplete: "current-password", required: true });
  const pasted = h("textarea", { id: "login-token", name: "token", rows: 4, class: "json" });
  const done = async (token) => {
    session.token = token;
    try {
      session.whoami = await call("auth.whoami", {});
      loadNamespaces();
      location.hash = "#/nodes";
    } catch (e) {
      session.token = "";
      msg.replaceChildren(problem(e));
    }
  };
  const byAccount = h("form", { class: "stack card", "aria-label": "Log in with an account",
    onsubmit: async (ev) => {
      ev.preventDefault();
      msg.replaceChildren();
      try {
        const got = await call("auth.login", { id: account.value.trim(), secret: secret.value, namespace: session.namespace });
        session.minted = true;
        session.refresh = got.refresh_token || "";
        await done(got.token);
      } catch (e) { msg.replaceChildren(problem(e)); }
    } },
    h("h2", {}, "Account"),
    h("label", { for: "login-account" }, "Account"), account,
    h("label", { for: "login-secret" }, "Secret"), secret,
    h("p", {}, h("button", { type: "submit" }, "Log in")));
  const byToken = h("form", { class: "stack card", "aria-label": "Log in with a token",
    onsubmit: async (ev) => {
      ev.preventDefault();
      msg.replaceChildren();
      session.minted = false;
      session.refresh = "";
      await done(pasted.value.trim());
    } },
    h("h2", {}, "Token"),
    h("label", { for: "login-token" }, "Token (meshd auth token create, or admin.token)"), pasted,
    h("p", {}, h("button", { type: "submit" }, "Use token")));
  el.append(h("div", { class: "login" }, msg, byAccount, byToken));
}

// Nodes: members with reach and RTT, and each node's version, uptime and load (debug.stats).
async function pageNodes(view) {
  const el = view.el;
  title(el, "Nodes");
  const status = h("p", { class: "muted", role: "status" });
  const statsNote = h("div");
  const box = h("div");
  el.append(status, statsNote, box);
  let samples = {};
  const render = (members) => {
    const counts = {};
    for (const m of members) counts[m.status] = (counts[m.status] || 0) + 1;
    status.textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ");
    box.replaceChildren(table(
      ["Name", "Address", "Status", "Reach", "RTT", "Tags", "Version", "Uptime", "Load", "Memory"],
      members.map((m) => {
        const s = samples[m.name] || {};
        return [h("strong", {}, m.name, m.self ? h("span", { class: "count" }, "(this node)") : ""),
          m.address, badge(m.status), m.reach, fmt.rtt(m.rtt_ms), tags(m.tags),
          s.version || "—", s.uptime !== undefined ? fmt.dur(s.uptime) : "—",
          s.load1 !== undefined ? String(s.load1) : "—", fmt.bytes(s.rss_bytes)];
      }),
      (i) => ({ class: members[i].status, dataset: { node: members[i].name, status: members[i].status } })));
  };
  const refresh = async () => {
    try { render(await view.call("members", {})); } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "members")); }
  };
  const refreshStats = async () => {
    try {
      const got = await view.call("debug.stats", {});
      samples = Object.fromEntries(got.nodes.map((n) => [n.node, n.sample || {}]));
      statsNote.replaceChildren();
    } catch (e) { if (e.name !== "AbortError") statsNote.replaceChildren(problem(e, "versions, uptime and load of the nodes")); }
  };
  const soon = debounce(refresh, 100);
  view.follow("members.watch", {}, () => soon());  // first: no change is missed
  await refresh();
  refreshStats().then(refresh);  // versions and load come from every node: not waited for
  view.every(3000, refresh);
  view.every(10000, refreshStats);
}

// Network: the routing graph as a picture, the path from this node to the chosen member.
async function pageNetwork(view) {
  const el = view.el;
  title(el, "Network");
  const pick = h("select", { id: "path-to", "aria-label": "Show the path to" });
  const legend = h("p", { class: "muted" });
  const pic = h("div");
  const routesBox = h("div");
  el.append(h("div", { class: "row" }, h("div", {}, h("label", { for: "path-to" }, "Path from this node to "), pick)), legend, pic, h("h2", {}, "Routes"), routesBox);
  let last = "";
  let data = null;
  const draw = () => {
    if (!data) return;
    const { graph, routes, members } = data;
    const me = (members.find((m) => m.self) || {}).name;
    const state = Object.fromEntries(members.map((m) => [m.name, m.status]));
    const names = graph.nodes;
    const W = 900, H = 520, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 60;
    const pos = {};
    names.forEach((n, i) => {
      const a = (2 * Math.PI * i) / Math.max(names.length, 1) - Math.PI / 2;
      pos[n] = names.length === 1 ? [cx, cy] : [cx + R * Math.cos(a), cy + R * Math.sin(a)];
    });
    const dest = pick.value;
    const route = routes.find((r) => r.destination === dest);
    const onPath = new Set();
    for (const r of dest ? (route ? [route] : []) : routes) {  // (every member): every path
      for (let i = 0; i + 1 < r.path.length; i++) onPath.add([r.path[i], r.path[i + 1]].sort().join("\u0000"));
    }
    const edges = graph.edges.filter((e) => pos[e.a] && pos[e.b]);
    const picture = svg("svg", { class: "graph", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `Routing graph of ${names.length} nodes and ${edges.length} links` },
      svg("title", {}, "Routing graph"),
      edges.map((e) => {
        const [x1, y1] = pos[e.a], [x2, y2] = pos[e.b];
        const cls = onPath.has([e.a, e.b].sort().join("\u0000")) ? "edge path" : "edge";
        return svg("g", {}, svg("line", { class: cls, x1, y1, x2, y2 }),
          svg("text", { class: "lat", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, `${e.latency_ms.toFixed(2)} ms`));
      }),
      names.map((n) => {
        const [x, y] = pos[n];
        return svg("g", { class: `node${n === me ? " me" : ""}${state[n] === "dead" ? " dead" : ""}`, "data-node": n },
          svg("circle", { cx: x, cy: y, r: 14 }), svg("text", { x, y: y + 30, "text-anchor": "middle" }, n));
      }));
    pic.replaceChildren(picture);
    legend.textContent = route
      ? `${me} → ${dest}: ${route.path.join(" → ")} (${route.latency_ms.toFixed(2)} ms)`
      : dest ? `no route from ${me} to ${dest}` : `the paths from ${me} to every member are drawn thick`;
    routesBox.replaceChildren(table(["Destination", "Next hop", "Path", "Latency"],
      routes.map((r) => [r.destination, r.next_hop, r.path.join(" → "), fmt.rtt(r.latency_ms)])));
  };
  const refresh = async () => {
    try {
      const [graph, routes, members] = await Promise.all([view.call("graph", {}), view.call("routes", {}), view.call("members", {})]);
      const key = JSON.stringify([graph, routes, members.map((m) => [m.name, m.status])]);
      if (key === last) return;
      last = key;
      data = { graph, routes, members };
      const chosen = pick.value;
      pick.replaceChildren(h("option", { value: "" }, "(every member)"), ...routes.map((r) => h("option", { value: r.destination, selected: r.destination === chosen }, r.destination)));
      draw();
    } catch (e) { if (e.name !== "AbortError") pic.replaceChildren(problem(e, "routes")); }
  };
  pick.addEventListener("change", draw);
  await refresh();
  view.every(1000, refresh);
}

// Services: filter by name and tag; instances, nodes, versions.
async function pageServices(view) {
  const el = view.el;
  title(el, "Services");
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const byName = h("input", { type: "search", id: "filter-name", value: q.get("name") || "", placeholder: "greeter" });
  const byTag = h("input", { type: "search", id: "filter-tag", value: q.get("tag") || "", placeholder: "key=value" });
  const count = h("p", { class: "muted", role: "status" });
  const box = h("div");
  el.append(h("div", { class: "row card", role: "search" },
    h("div", {}, h("label", { for: "filter-name" }, "Name"), h("br"), byName),
    h("div", {}, h("label", { for: "filter-tag" }, "Tag"), h("br"), byTag)), count, box);
  let rows = [];
  const render = () => {
    const n = byName.value.trim().toLowerCase(), t = byTag.value.trim().toLowerCase();
    const shown = rows.filter((s) => (!n || s.name.toLowerCase().includes(n))
      && (!t || (s.tags || []).some((x) => x.toLowerCase().includes(t))));
    count.textContent = `${shown.length} of ${rows.length} services`;
    box.replaceChildren(table(["Service", "Instances", "Nodes", "Versions", "Tags"],
      shown.map((s) => [h("a", { href: `#/services/${encodeURIComponent(s.name)}` }, s.name), String(s.instances),
        s.nodes.join(", "), s.versions.join(", "), (s.tags || []).map((x) => h("span", { class: "tag" }, x))]),
      (i) => ({ dataset: { service: shown[i].name } })));
  };
  const refresh = async () => {
    try { rows = await view.call("services", {}); render(); } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "services")); }
  };
  byName.addEventListener("input", render);
  byTag.addEventListener("input", render);
  await refresh();
  const soon = debounce(refresh, 200);
  view.follow("services.watch", {}, () => soon());
}

function schemaText(schema) { return fmt.json(schema); }

async function pageService(view, name) {
  const el = view.el;
  title(el, name, h("span", { class: "count" }, "service"));
  const box = h("div");
  el.append(box);
  let got;
  try { got = await view.call("describe", { service: name }); } catch (e) { box.replaceChildren(problem(e, `describe ${name}`)); return; }
  const healthBox = h("div");
  const checkHealth = async () => {
    healthBox.replaceChildren(h("span", { class: "muted" }, "checking…"));
    try {
      const rows = await view.call("health", { service: name });
      healthBox.replaceChildren(table(["Instance", "Node", "Health", "Latency", "Detail"],
        rows.map((r) => [r.id, r.node, badge(r.status), fmt.rtt(r.latency_ms), r.detail])));
    } catch (e) { healthBox.replaceChildren(problem(e, "health")); }
  };
  const endpoints = new Map();
  for (const inst of got.instances) for (const ep of inst.endpoints || []) if (!endpoints.has(ep.name)) endpoints.set(ep.name, ep);
  box.append(
    h("h2", {}, "Instances"),
    table(["Instance", "Node", "Address", "Version", "Metadata"],
      got.instances.map((i) => [i.id, i.node, i.address, i.version, tags(i.metadata)])),
    h("p", {}, h("button", { type: "button", class: "secondary", onclick: checkHealth }, "Check health")), healthBox,
    h("h2", {}, "Endpoints"),
    ...[...endpoints.values()].map((ep) => h("div", { class: "card", dataset: { endpoint: ep.name } },
      h("div", { class: "row" }, h("strong", {}, ep.name), ep.stream ? h("span", { class: "tag" }, "stream") : "",
        ep.stream ? "" : h("a", { href: `#/call/${encodeURIComponent(name)}/${encodeURIComponent(ep.name)}` }, "Call")),
      h("div", { class: "grid2" },
        h("div", {}, h("h3", {}, "Request"), h("pre", {}, schemaText(ep.request))),
        h("div", {}, h("h3", {}, "Response"), h("pre", {}, schemaText(ep.response)))))));
}

// A form generated from a request format: fields by type, checked as one types.
function buildForm(schema) {
  const fields = [];
  const props = (schema && schema.type === "object" && schema.properties) || null;
  const required = new Set((schema && schema.required) || []);
  const root = h("div");
  if (!props) return { root, fields, simple: false };
  for (const [name, described] of Object.entries(props)) {
    const sub = described && typeof described === "object" ? described : {};
    const id = `field-${name}`;
    // T | None: a field of T that may be left empty
    const some = Array.isArray(sub.anyOf) ? sub.anyOf.filter((x) => x && x.type !== "null") : [];
    const type = sub.type || (some.length === 1 && some[0].type ? some[0].type : "json");
    let input;
    if (type === "boolean") input = h("input", { type: "checkbox", id, name });
    else if (type === "integer") input = h("input", { type: "number", id, name, step: "1" });
    else if (type === "number") input = h("input", { type: "number", id, name, step: "any" });
    else if (type === "string") input = h("input", { type: "text", id, name });
    else input = h("textarea", { id, name, rows: 3, class: "json", placeholder: type === "array" ? "[ ]" : "{ }" });
    const err = h("div", { class: "fielderr", id: `${id}-error`, "aria-live": "polite" });
    input.setAttribute("aria-describedby", `${id}-error`);
    if (required.has(name)) input.setAttribute("aria-required", "true");
    const field = { name, type, input, err, required: required.has(name),
      check() {
        let problemText = "";
        const raw = input.type === "checkbox" ? null : input.value;
        if (type === "boolean") { /* always valid */ }
        else if (input.validity && input.validity.badInput) problemText = type === "integer" ? "a whole number" : "a number";
        else if (raw === "") { if (field.required) problemText = "required"; }
        else if (type === "integer" && !/^-?\d+$/.test(raw)) problemText = "a whole number";
        else if (type === "number" && !Number.isFinite(Number(raw))) problemText = "a number";
        else if (!["string", "integer", "number"].includes(type)) {
          try {
            const v = JSON.parse(raw);
            if (type === "array" && !Array.isArray(v)) problemText = "a JSON array";
            if (type === "object" && (typeof v !== "object" || Array.isArray(v) || v === null)) problemText = "a JSON object";
          } catch { problemText = "not valid JSON"; }
        }
        err.textContent = problemText ? `${name}: ${problemText}` : "";
        input.classList.toggle("invalid", !!problemText);
        input.setAttribute("aria-invalid", problemText ? "true" : "false");
        return !problemText;
      },
      value() {
        if (type === "boolean") return field.required || field.touched ? input.checked : undefined;
        const raw = input.value;
        if (raw === "") return undefined;
        if (type === "integer") return parseInt(raw, 10);
        if (type === "number") return Number(raw);
        if (type === "string") return raw;
        return JSON.parse(raw);
      },
      set(v) {
        if (type === "boolean") input.checked = !!v;
        else if (v === undefined) input.value = "";
        else input.value = ["string", "integer", "number"].includes(type) ? String(v) : JSON.stringify(v);
      },
    };
    input.addEventListener("input", () => { field.touched = true; field.check(); });
    fields.push(field);
    root.append(h("div", { class: "field" },
      h("label", { for: id }, name, field.required ? " *" : "", h("span", { class: "hint" }, ` ${sub.type || "JSON"}`)), input, err));
  }
  return { root, fields, simple: true };
}

async function pageCall(view, service, endpoint) {
  const el = view.el;
  title(el, `Call ${service} ${endpoint}`);
  const box = h("div");
  el.append(box);
  let ep;
  try {
    const got = await view.call("describe", { service });
    for (const inst of got.instances) for (const e of inst.endpoints || []) if (e.name === endpoint) ep = e;
  } catch (e) { box.replaceChildren(problem(e, `describe ${service}`)); return; }
  if (!ep) { box.replaceChildren(problem(new ApiError(404, { detail: `${service} has no endpoint ${endpoint}` }))); return; }
  const form = buildForm(ep.request);
  const rawToggle = h("input", { type: "checkbox", id: "raw-json" });
  const raw = h("textarea", { id: "raw-request", rows: 8, class: "json" });
  const rawBox = h("div", { hidden: true }, h("label", { for: "raw-request" }, "Request (JSON)"), raw, h("div", { class: "fielderr", id: "raw-error" }));
  raw.setAttribute("aria-describedby", "raw-error");
  const rawErr = rawBox.querySelector("#raw-error");
  const checkRaw = () => {
    try { JSON.parse(raw.value || "null"); rawErr.textContent = ""; raw.classList.remove("invalid"); return true; } catch { rawErr.textContent = "not valid JSON"; raw.classList.add("invalid"); return false; }
  };
  raw.addEventListener("input", checkRaw);
  const values = () => {
    const out = {};
    for (const f of form.fields) { const v = f.value(); if (v !== undefined) out[f.name] = v; }
    return out;
  };
  if (!form.simple) { rawToggle.checked = true; rawToggle.disabled = true; rawBox.hidden = false; raw.value = "{}"; }
  rawToggle.addEventListener("change", () => {
    if (rawToggle.checked) {
      const out = {};
      const left = [];  // fields holding something not valid: named, not silently dropped
      for (const f of form.fields) {
        if (!f.check()) { if (f.input.value) left.push(f.name); continue; }
        const v = f.value();
        if (v !== undefined) out[f.name] = v;
      }
      raw.value = fmt.json(out);
      rawErr.textContent = left.length ? `left out, not valid: ${left.join(", ")}` : "";
      form.root.hidden = true; rawBox.hidden = false;
    } else {
      try { const v = JSON.parse(raw.value); for (const f of form.fields) f.set(v ? v[f.name] : undefined); } catch { /* keep the form */ }
      form.root.hidden = false; rawBox.hidden = true;
    }
  });
  const result = h("div", { id: "call-result", "aria-live": "polite" });
  const send = h("button", { type: "submit" }, "Call");
  el.append(h("form", { class: "card", "aria-label": `Request to ${endpoint}`, onsubmit: async (ev) => {
    ev.preventDefault();
    let body;
    if (rawToggle.checked) {
      if (!checkRaw()) return;
      body = JSON.parse(raw.value || "null");
    } else {
      const ok = form.fields.map((f) => f.check()).every(Boolean);
      if (!ok) return;
      body = values();
    }
    const traceId = randomHex(16);
    send.disabled = true;
    result.replaceChildren(h("span", { class: "muted" }, "calling…"));
    const t0 = performance.now();
    const traceLink = () => h("a", { href: `#/traces/${traceId}` }, traceId);
    try {
      const reply = await view.call("rpc.call", { service, endpoint, body, meta: { traceparent: `00-${traceId}-${randomHex(8)}-01` } });
      const ms = performance.now() - t0;
      result.replaceChildren(h("div", { class: "row" }, h("span", { class: "okmsg" }, "OK"), h("span", {}, `${ms.toFixed(1)} ms`), h("span", {}, "trace ", traceLink())),
        h("pre", { class: "reply" }, fmt.json(reply)));
    } catch (e) {
      if (e.name === "AbortError") return;
      const ms = performance.now() - t0;
      result.replaceChildren(h("div", { class: "row" }, problem(e), h("span", {}, `${ms.toFixed(1)} ms`), h("span", {}, "trace ", traceLink())),
        h("pre", { class: "reply error-body" }, fmt.json(e.error)));
    } finally { send.disabled = false; }
  } },
  h("div", { class: "row" }, h("label", { for: "raw-json" }, rawToggle, " Raw JSON")),
  form.root, rawBox, h("p", {}, send)), result,
  h("details", {}, h("summary", {}, "Request and response formats"),
    h("div", { class: "grid2" }, h("pre", {}, schemaText(ep.request)), h("pre", {}, schemaText(ep.response)))));
}

// Traces: recent slow and failed calls; one trace as a waterfall across nodes.
async function pageTraces(view) {
  const el = view.el;
  title(el, "Traces");
  const service = h("input", { type: "search", id: "trace-service", placeholder: "all services" });
  const errors = h("input", { type: "checkbox", id: "trace-errors" });
  const slowest = h("input", { type: "checkbox", id: "trace-slowest" });
  const box = h("div");
  const load = async () => {
    const args = { limit: 50 };
    if (service.value.trim()) args.service = service.value.trim();
    if (errors.checked) args.errors = true;
    if (slowest.checked) args.slowest = 50;
    try {
      const got = await view.call("debug.traces", args);
      box.replaceChildren(table(["Trace", "Name", "Service", "Started", "Duration", "Status", "Spans", "Nodes"],
        got.traces.map((t) => [h("a", { href: `#/traces/${t.trace_id}` }, t.trace_id.slice(0, 16) + "…"), t.name, t.service,
          fmt.time(t.start), fmt.ms(t.duration), t.status ? badge("error") : badge("ok"), String(t.spans), t.nodes.join(", ")])));
    } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "traces")); }
  };
  el.append(h("form", { class: "row card", "aria-label": "Trace filters", onsubmit: (ev) => { ev.preventDefault(); load(); } },
    h("div", {}, h("label", { for: "trace-service" }, "Service"), h("br"), service),
    h("label", { for: "trace-errors" }, errors, " Failed only"),
    h("label", { for: "trace-slowest" }, slowest, " Slowest first"),
    h("button", { type: "submit" }, "Show")), box);
  errors.addEventListener("change", load);
  slowest.addEventListener("change", load);
  await load();
}

async function pageTrace(view, id) {
  const el = view.el;
  title(el, "Trace", h("span", { class: "count" }, id));
  const box = h("div");
  el.append(box);
  let got;
  for (let i = 0; i < 5; i++) {  // spans reach the buffers a moment after the reply
    try { got = await view.call("debug.trace", { trace_id: id }); break; } catch (e) {
      if (e.status !== 404 || i === 4) { box.replaceChildren(problem(e, "trace")); return; }
      await new Promise((r) => setTimeout(r, 400));
    }
  }
  const spans = got.spans;
  const t0 = Math.min(...spans.map((s) => s.start));
  const t1 = Math.max(...spans.map((s) => s.start + s.duration));
  const total = Math.max(t1 - t0, 1e-9);
  const byId = new Map(spans.map((s) => [s.span_id, s]));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (byId.has(s.parent_id)) { if (!children.has(s.parent_id)) children.set(s.parent_id, []); children.get(s.parent_id).push(s); } else roots.push(s);
  }
  const ordered = [];
  const seen = new Set();  // a span listed once, whatever parents a faulty node claims
  const walk = (s, depth) => {
    if (seen.has(s) || depth > 64) return;
    seen.add(s);
    ordered.push([s, depth]);
    for (const c of (children.get(s.span_id) || []).sort((x, y) => x.start - y.start)) walk(c, depth + 1);
  };
  for (const r of roots.sort((a, b) => a.start - b.start)) walk(r, 0);
  for (const sp of spans) if (!seen.has(sp)) walk(sp, 0);  // parents in a loop: shown anyway
  box.append(h("p", { class: "muted" }, `${spans.length} spans on ${new Set(spans.map((s) => s.node)).size} nodes, ${fmt.ms(total)}`),
    h("table", { class: "waterfall" },
      h("thead", {}, h("tr", {}, ["Span", "Node", "Kind", "Duration", "Timeline"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ordered.map(([s, depth]) => {
        const bar = h("div", { class: `bar${s.status ? " err" : ""}`, title: `${s.name}: ${fmt.ms(s.duration)}` });
        bar.style.marginLeft = `${((s.start - t0) / total) * 100}%`;
        bar.style.width = `${Math.max((s.duration / total) * 100, 0.3)}%`;
        const name = h("span", {}, s.name, s.error ? h("span", { class: "error" }, ` — ${s.error}`) : "");
        name.style.paddingLeft = `${depth * 1.2}rem`;
        return h("tr", { dataset: { kind: s.kind } }, h("td", {}, name), h("td", {}, s.node), h("td", {}, s.kind),
          h("td", {}, fmt.ms(s.duration)), h("td", { class: "track" }, bar));
      }))));
}

// Logs: a live tail across nodes, filtered by service and level.
async function pageLogs(view) {
  const el = view.el;
  title(el, "Logs");
  const service = h("input", { type: "search", id: "log-service", placeholder: "all services" });
  const level = h("select", { id: "log-level" }, ["", "debug", "info", "warning", "error"].map((l) => h("option", { value: l }, l || "any")));
  const node = h("input", { type: "search", id: "log-node", placeholder: "all nodes" });
  const state = h("span", { class: "muted", role: "status" });
  const lines = h("div", { id: "logs", role: "log", "aria-live": "polite", "aria-label": "Log records" });
  el.append(h("form", { class: "row card", "aria-label": "Log filters", onsubmit: (ev) => { ev.preventDefault(); start(); } },
    h("div", {}, h("label", { for: "log-service" }, "Service"), h("br"), service),
    h("div", {}, h("label", { for: "log-level" }, "Level at least"), h("br"), level),
    h("div", {}, h("label", { for: "log-node" }, "Node"), h("br"), node),
    h("button", { type: "submit" }, "Follow"), state), lines);
  const line = (r) => h("div", { class: "logline" },
    h("span", { class: "muted" }, fmt.time(r.time), " "), h("span", { class: `lvl-${r.level.toUpperCase()}` }, r.level.toUpperCase().padEnd(7)), " ",
    h("strong", {}, r.node), " ", r.service, r.instance ? `/${r.instance}` : "", ": ", r.message,
    TRACE_ID.test(r.trace_id || "") ? [" ", h("a", { href: `#/traces/${r.trace_id}` }, "trace")] : "");
  const add = (r) => {
    const stick = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 30;
    lines.append(line(r));
    while (lines.childElementCount > 1000) lines.firstElementChild.remove();
    if (stick) lines.scrollTop = lines.scrollHeight;
  };
  let sub = null;
  view.signal.addEventListener("abort", () => sub && sub.close());
  const start = async () => {
    if (sub) sub.close();
    const mine = new View(null);  // this tail's requests; the next Follow closes it
    sub = mine;
    const args = {};
    if (service.value.trim()) args.service = service.value.trim();
    if (level.value) args.level = level.value;
    if (node.value.trim()) args.node = node.value.trim();
    lines.replaceChildren();
    state.textContent = "following";
    const asked = Date.now() / 1000;
    let after = asked - 1;  // the tail goes on from just after what was shown: no gap
    try {
      const got = await mine.call("debug.logs", { ...args, limit: 200 });
      if (!mine.live) return;
      for (const r of got.records) add(r);
      if (got.records.length) after = got.records[got.records.length - 1].time + 1e-6;
      const silent = Object.keys(got.errors || {});
      if (silent.length) lines.prepend(h("div", { class: "error" }, `not answering: ${silent.join(", ")}`));
    } catch (e) {
      if (e.name !== "AbortError" && mine.live) { lines.replaceChildren(problem(e, "logs")); state.textContent = ""; }
      return;
    }
    const live = { ...args, since: after };  // moved on as lines come: a reconnect resumes
    mine.follow("debug.logs.follow", live, (r) => { add(r); live.since = Math.max(live.since, r.time + 1e-6); }, (e) => { lines.append(problem(e, "live logs")); state.textContent = "stopped"; });
  };
  start();
}

// Stats: per node and per service instance, with small charts over the page's lifetime.
function spark(values, cls = "") {
  const W = 140, H = 28;
  if (values.length < 2) return h("span", { class: "muted" }, "collecting…");
  const max = Math.max(...values, 1e-9);
  const pts = values.map((v, i) => `${((i / (values.length - 1)) * W).toFixed(1)},${(H - 2 - (v / max) * (H - 4)).toFixed(1)}`).join(" ");
  return svg("svg", { class: `spark ${cls}`, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `last ${values[values.length - 1].toFixed(2)}, max ${max.toFixed(2)}` },
    svg("polyline", { points: pts }));
}

async function pageStats(view) {
  const el = view.el;
  title(el, "Stats");
  const service = h("input", { type: "search", id: "stats-service", placeholder: "all services" });
  const box = h("div");
  el.append(h("div", { class: "row card" }, h("div", {}, h("label", { for: "stats-service" }, "Service"), h("br"), service)), box);
  const history = new Map();  // key -> [{t, requests, errors, p99, cpu}]
  const push = (key, v) => {
    const list = history.get(key) || [];
    list.push(v);
    if (list.length > 60) list.shift();
    history.set(key, list);
    return list;
  };
  const rates = (list, field) => {
    const out = [];
    for (let i = 1; i < list.length; i++) {
      const dt = list[i].t - list[i - 1].t;
      out.push(dt > 0 ? Math.max(list[i][field] - list[i - 1][field], 0) / dt : 0);
    }
    return out;
  };
  const refresh = async () => {
    let got;
    try { got = await view.call("debug.stats", service.value.trim() ? { service: service.value.trim() } : {}); } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "stats")); return; }
    const nodes = got.nodes;
    const nodeRows = nodes.map((n) => {
      const s = n.sample || {};
      const hist = push(`node:${n.node}`, { t: s.time, cpu: s.cpu_seconds || 0 });
      return [h("strong", {}, n.node), fmt.dur(s.uptime), spark(rates(hist, "cpu").map((x) => x * 100)),
        fmt.bytes(s.rss_bytes), String(s.tasks ?? "—"), String(s.links ?? "—"),
        Object.entries(s.members || {}).map(([k, v]) => `${v} ${k}`).join(", "), String(s.store_records ?? "—"), String(s.services ?? "—")];
    });
    const instRows = [];
    for (const n of nodes) for (const i of n.instances || []) {
      const p99 = Math.max(0, ...Object.values(i.endpoints || {}).map((e) => e.p99_ms || 0));
      const hist = push(`inst:${i.instance}`, { t: (n.sample || {}).time || Date.now() / 1000, requests: i.requests, errors: i.errors, p99 });
      instRows.push([h("strong", {}, i.service), i.instance, n.node, String(i.requests), spark(rates(hist, "requests")),
        String(i.errors), spark(rates(hist, "errors"), "err"), String(i.in_flight), spark(hist.map((x) => x.p99)),
        table(["Endpoint", "Count", "Errors", "Mean", "p50", "p99"], Object.entries(i.endpoints || {}).map(([name, e]) =>
          [name, String(e.count), String(e.errors), fmt.rtt(e.mean_ms), fmt.rtt(e.p50_ms), fmt.rtt(e.p99_ms)]))]);
    }
    box.replaceChildren(h("h2", {}, "Nodes"),
      table(["Node", "Uptime", "CPU %", "Memory", "Tasks", "Links", "Members", "Store records", "Services"], nodeRows),
      h("h2", {}, "Service instances"),
      instRows.length ? table(["Service", "Instance", "Node", "Requests", "Requests/s", "Errors", "Errors/s", "In flight", "p99 ms", "Endpoints"], instRows)
        : h("p", { class: "muted" }, "no service instances"),
      Object.keys(got.errors || {}).length ? h("p", { class: "error" }, "not answering: ", Object.entries(got.errors).map(([k, v]) => `${k} (${v})`).join(", ")) : "");
  };
  service.addEventListener("change", () => { history.clear(); refresh(); });
  await refresh();
  view.every(2000, refresh);
}

// Store: databases and tables, keys by prefix and substring, a value viewed, edited, watched.
async function pageStore(view) {
  const el = view.el;
  title(el, "Store");
  const db = h("select", { id: "store-db" });
  const tbl = h("select", { id: "store-table" });
  const prefix = h("input", { type: "search", id: "store-prefix", placeholder: "user:" });
  const contains = h("input", { type: "search", id: "store-contains", placeholder: "ada" });
  const keysBox = h("div");
  const valueBox = h("div");
  const msg = h("div", { role: "status", "aria-live": "polite" });
  el.append(msg, h("form", { class: "row card", role: "search", "aria-label": "Find keys", onsubmit: (ev) => { ev.preventDefault(); search(); } },
    h("div", {}, h("label", { for: "store-db" }, "Database"), h("br"), db),
    h("div", {}, h("label", { for: "store-table" }, "Table"), h("br"), tbl),
    h("div", {}, h("label", { for: "store-prefix" }, "Key prefix"), h("br"), prefix),
    h("div", {}, h("label", { for: "store-contains" }, "Key contains"), h("br"), contains),
    h("button", { type: "submit" }, "Search")),
  h("div", { class: "grid2" }, keysBox, valueBox));
  let watching = null;
  const loadTables = async () => {
    tbl.replaceChildren();
    if (!db.value) return;
    try {
      const names = await view.call("store.tables", { database: db.value });
      tbl.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
    } catch (e) { msg.replaceChildren(problem(e, "tables")); }
  };
  const open = async (key) => {
    if (watching) { watching.close(); watching = null; }
    const area = h("textarea", { id: "store-value", rows: 12, class: "json" });
    const note = h("div", { "aria-live": "polite" });
    const watch = h("input", { type: "checkbox", id: "store-watch" });
    const events = h("div", { id: "store-events" });
    const where = { database: db.value, table: tbl.value, key };
    // what the key holds: "json" or "text" (edited here), "binary", "counter" or "set" (shown)
    let kind = "text";
    let row = null;
    let dirty = false;  // edited and not saved: a watch event does not overwrite it
    area.addEventListener("input", () => { dirty = true; });
    const show = (r) => {
      row = r;
      dirty = false;
      area.readOnly = false;
      const v = r ? r.value : undefined;
      if (r && v === undefined && (r.counter !== undefined || r.members)) {
        kind = r.counter !== undefined ? "counter" : "set";
        area.value = kind === "counter" ? `counter: ${r.counter}` : `set: ${JSON.stringify(r.members)}`;
        area.readOnly = true;
      } else if (v === undefined || v === null) { area.value = ""; kind = "text"; }
      else if (typeof v === "object" && v.base64 !== undefined) { kind = "binary"; area.value = `binary, base64: ${v.base64}`; area.readOnly = true; }
      else { try { area.value = fmt.json(JSON.parse(v)); kind = "json"; } catch { area.value = v; kind = "text"; } }
    };
    try {
      const rows = await view.call("store.read", where);
      show(rows[0] || null);
    } catch (e) { note.replaceChildren(problem(e, `read ${key}`)); }
    const save = async () => {
      if (["binary", "counter", "set"].includes(kind)) { note.replaceChildren(h("span", { class: "error" }, `a ${kind} is not edited here`)); return; }
      if (kind === "json") {
        try { JSON.parse(area.value); } catch { note.replaceChildren(h("span", { class: "error" }, "the value is not valid JSON (it was JSON when read)")); return; }
      }
      const args = { ...where, value: area.value };
      if (row && row.metadata && Object.keys(row.metadata).length) args.metadata = row.metadata;  // kept
      if (row && row.expiry) {  // and so is the time it has left
        const left = (row.expiry - Date.now()) / 1000;
        if (left > 0) args.ttl = left;
      }
      try { show(await view.call("store.write", args)); note.replaceChildren(h("span", { class: "okmsg" }, "saved")); } catch (e) { note.replaceChildren(problem(e, "write")); }
    };
    valueBox.replaceChildren(h("div", { class: "card" }, h("h2", {}, key),
      h("label", { for: "store-value" }, "Value"), area, note,
      h("div", { class: "row" },
        h("button", { type: "button", onclick: save }, "Save"),
        h("button", { type: "button", class: "secondary", onclick: async () => {
          if (!confirm(`Delete ${key}?`)) return;
          try { await view.call("store.delete", where); note.replaceChildren(h("span", { class: "okmsg" }, "deleted")); search(); } catch (e) { note.replaceChildren(problem(e, "delete")); }
        } }, "Delete"),
        h("label", { for: "store-watch" }, watch, " Watch")), events));
    watch.addEventListener("change", () => {
      if (watching) { watching.close(); watching = null; }
      if (!watch.checked) return;
      watching = new View(null);
      view.signal.addEventListener("abort", () => watching && watching.close());
      watching.follow("store.watch", { database: where.database, table: where.table, prefix: key }, (ev) => {
        if (ev.key !== key) return;
        const r = ev.record || {};
        events.prepend(h("div", { class: "logline" }, `${fmt.time(Date.now() / 1000)} ${ev.deleted ? "deleted" : "changed"} (${ev.origin || "?"})`,
          typeof r.value === "string" ? `: ${r.value.slice(0, 200)}` : ""));
        if (ev.deleted) return;
        if (dirty) note.replaceChildren(h("span", { class: "error" }, "changed on the mesh while you edit: Save overwrites it"));
        else show(r);
      }, (e) => events.prepend(problem(e, "watch")));
    });
  };
  const search = async () => {
    if (!db.value || !tbl.value) return;
    const args = { database: db.value, table: tbl.value, limit: 500 };
    if (prefix.value) args.prefix = prefix.value;
    if (contains.value) args.contains = contains.value;
    try {
      const keys = await view.call("store.list", args);
      keysBox.replaceChildren(h("p", { class: "muted", role: "status" }, `${keys.length} keys${keys.length === 500 ? " (first 500)" : ""}`),
        h("ul", { class: "keys" }, keys.map((k) => h("li", {}, h("a", { href: "#", dataset: { key: k }, onclick: (ev) => { ev.preventDefault(); open(k); } }, k)))));
    } catch (e) { keysBox.replaceChildren(problem(e, "keys")); }
  };
  db.addEventListener("change", async () => { await loadTables(); search(); });
  tbl.addEventListener("change", search);
  try {
    const names = await view.call("store.databases", {});
    if (!names.length) msg.replaceChildren(h("p", { class: "muted" }, "no databases in this namespace yet (meshd store write creates one)"));
    db.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
    await loadTables();
    await search();
  } catch (e) { msg.replaceChildren(problem(e, "databases")); }
}

// Config: the namespace's tree, a path's value edited, and its history.
async function pageConfig(view) {
  const el = view.el;
  title(el, "Config");
  const treeBox = h("div");
  const path = h("input", { type: "text", id: "config-path", placeholder: "db.host" });
  const value = h("textarea", { id: "config-value", rows: 6, class: "json" });
  const note = h("div", { "aria-live": "polite" });
  const historyBox = h("div");
  const renderTree = (v, at) => {
    if (v === null || typeof v !== "object" || Array.isArray(v)) return h("code", {}, JSON.stringify(v));
    return h("ul", {}, Object.entries(v).map(([k, sub]) => {
      const p = at ? `${at}.${k}` : k;
      return h("li", {}, h("a", { href: "#", dataset: { path: p }, onclick: (ev) => { ev.preventDefault(); pick(p); } }, k),
        sub !== null && typeof sub === "object" && !Array.isArray(sub) ? renderTree(sub, p) : [" = ", h("code", {}, JSON.stringify(sub))]);
    }));
  };
  const loadTree = async () => {
    try { treeBox.replaceChildren(h("h2", {}, "Tree"), renderTree((await view.call("config.get", { path: "" })).value, "")); } catch (e) {
      treeBox.replaceChildren(h("h2", {}, "Tree"), e.status === 404 ? h("p", { class: "muted" }, "no config in this namespace yet") : problem(e, "config"));
    }
  };
  const loadHistory = async (p) => {
    try {
      const rows = await view.call("config.history", { path: p });
      historyBox.replaceChildren(h("h2", {}, `History of ${p || "(all)"}`), rows.length ? table(["When", "Path", "By", "Value"],
        rows.map((r) => [fmt.datetime(r.time), r.path, r.by || "—", r.deleted ? h("em", {}, "deleted") : h("code", {}, JSON.stringify(r.value))])) : h("p", { class: "muted" }, "no changes recorded"));
    } catch (e) { historyBox.replaceChildren(h("h2", {}, "History"), problem(e, "history")); }
  };
  const pick = async (p) => {
    path.value = p;
    note.replaceChildren();
    try { value.value = fmt.json((await view.call("config.get", { path: p })).value); } catch (e) { value.value = ""; if (e.status !== 404) note.replaceChildren(problem(e)); }
    loadHistory(p);
  };
  el.append(h("div", { class: "grid2" }, treeBox,
    h("div", {}, h("form", { class: "card stack", "aria-label": "Edit a config path", onsubmit: async (ev) => {
      ev.preventDefault();
      let v;
      try { v = JSON.parse(value.value); } catch { note.replaceChildren(h("span", { class: "error" }, "the value is not valid JSON")); return; }
      try { await view.call("config.set", { path: path.value.trim(), value: v }); note.replaceChildren(h("span", { class: "okmsg" }, "saved")); loadTree(); loadHistory(path.value.trim()); } catch (e) { note.replaceChildren(problem(e, "set")); }
    } },
    h("label", { for: "config-path" }, "Path"), path,
    h("label", { for: "config-value" }, "Value (JSON)"), value, note,
    h("div", { class: "row" }, h("button", { type: "submit" }, "Save"),
      h("button", { type: "button", class: "secondary", onclick: () => pick(path.value.trim()) }, "Load"),
      h("button", { type: "button", class: "secondary", onclick: async () => {
        if (!confirm(`Delete ${path.value.trim()} and everything below it?`)) return;
        try { await view.call("config.del", { path: path.value.trim() }); note.replaceChildren(h("span", { class: "okmsg" }, "deleted")); loadTree(); loadHistory(path.value.trim()); } catch (e) { note.replaceChildren(problem(e, "delete")); }
      } }, "Delete"))), historyBox)));
  await loadTree();
  loadHistory("");
  const soon = debounce(loadTree, 200);
  view.follow("config.watch", { path: "" }, () => soon());
}

// Broker: topics, subscribers per node, pending and dead counts; publish a test message.
async function pageBroker(view) {
  const el = view.el;
  title(el, "Broker");
  const box = h("div");
  const topic = h("input", { type: "text", id: "publish-topic", placeholder: "orders.created" });
  const body = h("textarea", { id: "publish-body", rows: 4, class: "json" }, '{"hello": "world"}');
  const note = h("div", { "aria-live": "polite" });
  el.append(box, h("form", { class: "card stack", "aria-label": "Publish a message", onsubmit: async (ev) => {
    ev.preventDefault();
    let v;
    try { v = JSON.parse(body.value); } catch { note.replaceChildren(h("span", { class: "error" }, "the body is not valid JSON")); return; }
    try {
      const got = await view.call("broker.publish", { topic: topic.value.trim(), body: v });
      note.replaceChildren(h("span", { class: "okmsg" }, `published ${got && got.id ? got.id : ""}`));
      refresh();
    } catch (e) { note.replaceChildren(problem(e, "publish")); }
  } }, h("h2", {}, "Publish a test message"),
  h("label", { for: "publish-topic" }, "Topic"), topic, h("label", { for: "publish-body" }, "Body (JSON)"), body, note,
  h("p", {}, h("button", { type: "submit" }, "Publish"))));
  const refresh = async () => {
    let got;
    try { got = await view.call("broker.topics", {}); } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "topics")); return; }
    const cell = (v) => (v === undefined || v === null ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));
    const sum = (subs, k) => Object.values(subs || {}).reduce((n, c) => n + (c[k] || 0), 0);
    box.replaceChildren(
      h("h2", {}, "Durable topics"),
      got.durable.length ? table(["Topic", "Messages", "Durable subscribers", "Pending", "Dead", "Nodes", "Settings"], got.durable.map((d) =>
        [d.topic, String(d.messages), Object.keys(d.subscribers || {}).join(", ") || "—", String(sum(d.subscribers, "pending")),
          String(sum(d.subscribers, "dead")), Object.keys(d.nodes || {}).join(", "), cell(d.settings)]),
      (i) => ({ dataset: { topic: got.durable[i].topic } }))
        : h("p", { class: "muted" }, "no durable topics"),
      h("h2", {}, "Subscribers by node"),
      got.interest.length ? table(["Node", "Pattern", "Queue group", "Durable", "Subscribers"], got.interest.map((r) =>
        [r.node, r.pattern, r.queue || "—", r.durable || "—", String(r.subscribers)]))
        : h("p", { class: "muted" }, "no subscribers"),
      got.subscriptions.length ? h("div", {}, h("h2", {}, "Subscriptions"), table(["Node", "Subscription", "Details"], got.subscriptions.map((r) =>
        [r.node, cell(r.pattern || r.topic || r.id), h("code", {}, JSON.stringify(r))]))) : "",
      got.unanswered.length ? h("p", { class: "error" }, `not answering: ${got.unanswered.join(", ")}`) : "",
      h("h2", {}, `On ${got.node}`),
      table(["Counter", "Value"], Object.entries(got.stats || {}).map(([k, v]) => [k, String(v)])));
  };
  await refresh();
  view.every(3000, refresh);
}

// Runtime: managed services (meshd run), their replicas, restart (a new version) and kill.
async function pageRuntime(view) {
  const el = view.el;
  title(el, "Runtime");
  const note = h("div", { "aria-live": "polite" });
  const box = h("div");
  el.append(note, box);
  const act = async (op, name, done) => {
    try { await view.call(op, { name }); note.replaceChildren(h("span", { class: "okmsg" }, `${done} ${name}`)); refresh(); } catch (e) { note.replaceChildren(problem(e, op)); }
  };
  const refresh = async () => {
    let got;
    try { got = await view.call("runtime.ps", {}); } catch (e) { if (e.name !== "AbortError") box.replaceChildren(problem(e, "managed services")); return; }
    if (!got.specs.length) { box.replaceChildren(h("p", { class: "muted" }, "No managed services in this namespace: meshd run SOURCE starts one.")); return; }
    box.replaceChildren(
      h("h2", {}, "Services"),
      table(["Name", "Version", "Source", "Replicas", "Placement", "Restart", ""], got.specs.map((sp) => [
        h("strong", {}, sp.name), String(sp.version), sp.source, String(sp.replicas), sp.placement || "(any)", sp.restart,
        h("div", { class: "row" },
          h("button", { type: "button", class: "secondary", onclick: () => act("runtime.update", sp.name, "restarting") }, "Restart"),
          h("button", { type: "button", class: "secondary", onclick: () => { if (confirm(`Stop ${sp.name} everywhere?`)) act("runtime.kill", sp.name, "killed"); } }, "Kill"))]),
      (i) => ({ dataset: { spec: got.specs[i].name } })),
      h("h2", {}, "Replicas"),
      table(["Name", "Slot", "Node", "State", "PID", "Restarts", "Uptime", "Version", "Revision", "Reason"], got.replicas.map((r) => [
        r.name, r.slot, r.node || "—", badge(r.state), r.pid ? String(r.pid) : "—", String(r.restarts || 0),
        r.uptime !== null && r.uptime !== undefined ? fmt.dur(r.uptime) : "—", r.version ? String(r.version) : "—",
        (r.revision || "—").slice(0, 12), r.reason || ""]),
      (i) => ({ dataset: { replica: `${got.replicas[i].name}/${got.replicas[i].slot}`, state: got.replicas[i].state } })));
  };
  await refresh();
  view.every(2000, refresh);
}

// ---- the shell ----------------------------------------------------------------------------

let current = null;

function routeOf(hash) {
  const [path] = (hash || "").replace(/^#\/?/, "").split("?");
  return path.split("/").map((p) => { try { return decodeURIComponent(p); } catch { return p; } });
}

async function render() {
  if (current) current.close();
  const main = document.getElementById("main");
  main.replaceChildren();
  const view = new View(main);
  current = view;
  const [page, a, b] = routeOf(location.hash);
  renderNav(page || "nodes");
  if (!session.token && page !== "login") { location.hash = "#/login"; return; }
  try {
    if (page === "login") await pageLogin(current);
    else if (!page || page === "nodes") await pageNodes(current);
    else if (page === "network") await pageNetwork(current);
    else if (page === "services" && a) await pageService(current, a);
    else if (page === "services") await pageServices(current);
    else if (page === "call" && a && b) await pageCall(current, a, b);
    else if (page === "traces" && a) await pageTrace(current, a);
    else if (page === "traces") await pageTraces(current);
    else if (page === "logs") await pageLogs(current);
    else if (page === "stats") await pageStats(current);
    else if (page === "store") await pageStore(current);
    else if (page === "config") await pageConfig(current);
    else if (page === "broker") await pageBroker(current);
    else if (page === "runtime") await pageRuntime(current);
    else { title(main, "Not found"); main.append(h("p", {}, "No such page. ", h("a", { href: "#/nodes" }, "Nodes"))); }
    if (current === view) performance.mark(`meshd:ready:${page || "nodes"}`);  // its first answers are shown
  } catch (e) {
    if (e.name !== "AbortError" && current === view) main.append(problem(e));
  }
}

function renderNav(page) {
  const nav = document.getElementById("nav");
  const loggedIn = !!session.token;
  nav.replaceChildren(...(loggedIn ? PAGES : []).map(([id, label]) =>
    h("a", { href: `#/${id}`, class: id === page || (page === "call" && id === "services") ? "active" : "", "aria-current": id === page ? "page" : false }, label)));
  document.getElementById("logout").hidden = !loggedIn;
  document.getElementById("whoami").textContent = loggedIn && session.whoami ? `${session.whoami.id}` : "";
  document.getElementById("namespace").disabled = !loggedIn;
}

async function loadNamespaces() {
  const select = document.getElementById("namespace");
  let names = [session.namespace];
  if (session.token) {
    try { names = (await call("namespaces", { namespace: "default" })).map((n) => n.name); } catch { /* the reader may not list them */ }
    if (!names.includes(session.namespace)) names.unshift(session.namespace);
  }
  select.replaceChildren(...names.map((n) => h("option", { value: n, selected: n === session.namespace }, n)));
}

async function start() {
  const select = document.getElementById("namespace");
  select.addEventListener("change", () => { session.namespace = select.value; render(); });
  document.getElementById("logout").addEventListener("click", async () => {
    if (current) current.close();  // nothing of the page runs on without a token
    const token = session.token, minted = session.minted, refresh = session.refresh;
    session.token = "";
    session.refresh = "";
    session.minted = false;
    session.whoami = null;
    if (minted) {  // only what this page minted: a pasted token may be used elsewhere
      for (const t of [token, refresh]) {
        if (t) { try { await call("auth.token.revoke", { token: t }); } catch { /* expired already */ } }
      }
    }
    if (location.hash === "#/login") render(); else location.hash = "#/login";
  });
  window.addEventListener("hashchange", () => {
    render();
    if (session.token && !session.whoami) identify();  // just logged in
  });
  render();
  if (session.token) identify();
}

// Who the token is and which namespaces it sees, for the header (the page does not wait).
async function identify() {
  try { session.whoami = await call("auth.whoami", {}); } catch { return; /* expired() sends us to log in */ }
  await loadNamespaces();
  renderNav(routeOf(location.hash)[0] || "nodes");
}

start();
