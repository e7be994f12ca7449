/*
 * console.js: the /console page's words and figures, pure functions (no DOM, no network), so
 * they run under node too (tests/test_wsserver_js.py). The page (templates/console.html) loads
 * it after wsserver.js and uses window.WsserverConsole; under CommonJS it is module.exports.
 *
 *   explainRefusal(status, body, origin) -> {text, retry}: why GET /ws refused (what
 *       POST /console/check answered: the same status and body), in words; retry says whether
 *       reconnecting can help without a change (429, 503) or not (400, 401, 403).
 *   explainClose(code, reason, opened) -> text or null: a close of an open connection, in words.
 *   audience(n) -> {kind, text}: whom a notification went to: its room, "@user" for one user's,
 *       "*" for everybody.
 *   healthFigures(body) -> {clients, rooms, queue, workers, worker}: GET /'s numbers as the
 *       server gives them (cluster-wide when it adds them up), "worker" being this worker's own
 *       when the answer carries them under an extra field.
 *   membersText(members) -> text: a presence room's members ({users, anonymous}, as the
 *       client keeps them) in words: "alice, bob + 2 anonymous", "nobody".
 *   presenceText(event) -> text: a presence event in words: "alice joined", "anonymous left".
 */
(function (root) {
  "use strict";

  // GET /ws's refusal codes (docs/protocol.md, "Connecting"), each in words.
  const REFUSALS = {
    missing_token: "token missing: this server requires a connection token (a JWT); paste one " +
      "in the token field and connect",
    invalid_token: "token invalid: malformed, badly signed, or not made for this server " +
      "(issuer, audience)",
    token_expired: "token expired: get a fresh one, paste it and connect",
    ambiguous_token: "token sent twice (in the offer and as ?token= or Authorization)",
    origin_forbidden: "origin not allowed: this page's origin is not in WSSERVER_ALLOWED_ORIGINS",
    invalid_origin: "origin malformed: the Origin header is not scheme://host[:port]",
    room_forbidden: "room not granted: the token does not grant a private room asked for",
    invalid_room: "invalid room name in ?rooms=",
    too_many_rooms: "too many rooms in ?rooms=",
    too_many_connections: "too many connections from this address " +
      "(WSSERVER_MAX_CONNECTIONS_PER_IP): close some tabs; retrying",
    server_full: "server full: no room for another WebSocket; retrying",
    unsupported_subprotocol: "subprotocol refused: the server does not speak this client's " +
      "subprotocol",
    invalid_subprotocol: "subprotocol offer malformed (the token has characters a subprotocol " +
      "cannot carry?)",
    bad_request: "not a WebSocket request",
  };

  // a server's field as text: a JSON object may carry its own "toString" (even null), so
  // only primitives go through String()
  const str = (v) => {
    if (v === null || v === undefined) return "";
    if (typeof v === "string" || typeof v === "number" || typeof v === "boolean") return String(v);
    try { return JSON.stringify(v); } catch (err) { return "?"; }
  };
  const own = (table, key) => (Object.prototype.hasOwnProperty.call(table, key) ? table[key]
    : undefined);

  const explainRefusal = (status, body, origin) => {
    const b = body && typeof body === "object" ? body : {};
    const code = str(b.code);
    const retry = status === 429 || status === 503 || status >= 500;
    let words = own(REFUSALS, code);
    if (code === "origin_forbidden" && origin) {
      words = "origin not allowed: add " + origin + " to WSSERVER_ALLOWED_ORIGINS";
    }
    if (words === undefined) {
      words = status >= 500 ? "the server could not take the connection; retrying"
        : "refused" + (b.error ? ": " + str(b.error) : "");
    } else if (b.error) {
      words += " (server: " + str(b.error) + ")";
    }
    return {text: words + " (" + status + (code ? " " + code : "") + ")", retry: retry};
  };

  // What a close of an open connection means; null when there is nothing to explain.
  const CLOSES = {
    1001: "the server is shutting down or restarting; reconnecting",
    1002: "protocol error: the server found a broken frame",
    1003: "the server does not take this kind of data",
    1007: "a text message was not valid UTF-8",
    1009: "a message was too big (WSSERVER_MAX_MESSAGE_SIZE)",
    1011: "keepalive timeout or server fault; reconnecting",
    1013: "the server is busy; reconnecting later",
    4001: "token expired while connected: paste a fresh token and connect",
  };

  const explainClose = (code, reason, opened) => {
    if (code === 1000) return null;
    if ((code === 1006 || code === 1005) && !opened) return null; // refused: ask the server
    let words = own(CLOSES, code);
    if (code === 1008) {
      words = reason === "too many invalid commands" ? "closed for invalid commands: fix the client"
        : "closed by a server limit; reconnecting";
    } else if (code === 1006 || code === 1005) {
      words = "connection lost (network, proxy or server crash); reconnecting";
    }
    if (words === undefined) words = "closed by the server";
    return words + (reason ? " (" + code + " " + reason + ")" : " (" + code + ")");
  };

  const audience = (n) => {
    if (n && n.room !== null && n.room !== undefined) return {kind: "room", text: str(n.room)};
    if (n && n.user !== null && n.user !== undefined) return {kind: "user", text: "@" + str(n.user)};
    return {kind: "all", text: "*"};
  };

  const count = (v) => {
    if (typeof v === "number") return v;
    if (Array.isArray(v)) return v.length;
    if (v && typeof v === "object") return Object.keys(v).length;
    return null;
  };

  // This worker's own figures, when GET / gives the cluster-wide ones at the top level.
  const LOCAL_FIELDS = ["worker", "this_worker", "local"];

  const healthFigures = (body) => {
    const h = body && typeof body === "object" ? body : {};
    let worker = null;
    for (const name of LOCAL_FIELDS) {
      const w = h[name];
      if (w && typeof w === "object" && typeof w.clients === "number") {
        worker = {clients: w.clients, rooms: count(w.rooms)};
        break;
      }
    }
    const workers = typeof h.workers === "number" ? h.workers
      : h.cluster && typeof h.cluster.workers === "number" ? h.cluster.workers : null;
    return {clients: count(h.clients), rooms: count(h.rooms),
            queue: typeof h.queue === "number" ? h.queue : null, workers: workers, worker: worker};
  };

  const membersText = (members) => {
    const m = members && typeof members === "object" ? members : {};
    const users = Array.isArray(m.users) ? m.users.map(str) : [];
    const anonymous = typeof m.anonymous === "number" && m.anonymous > 0 ? m.anonymous : 0;
    const parts = [];
    if (users.length) parts.push(users.join(", "));
    if (anonymous) parts.push((users.length ? "+ " : "") + anonymous + " anonymous");
    return parts.length ? parts.join(" ") : "nobody";
  };

  const presenceText = (event) => {
    const e = event && typeof event === "object" ? event : {};
    const who = e.user === null || e.user === undefined ? "anonymous" : str(e.user);
    return who + (e.action === "join" ? " joined" : e.action === "leave" ? " left" : " " + str(e.action));
  };

  const api = {explainRefusal, explainClose, audience, healthFigures, membersText, presenceText,
               REFUSALS};
  root.WsserverConsole = api;
  if (typeof module === "object" && module && module.exports) module.exports = api;
})(typeof self !== "undefined" ? self : this);
