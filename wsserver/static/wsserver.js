/*
 * wsserver.js: a small browser client for wsserver (docs/protocol.md). No dependencies, no
 * build step, ES2017. Load it with a classic <script src="/static/wsserver.js"> and use
 * window.WsserverClient (under CommonJS it is also module.exports).
 *
 *   const client = new WsserverClient("wss://notify.example.com/ws", {rooms: ["orders"]});
 *   client.on("message", (n) => console.log(n.room, n.id, n.event, n.message, n.data));
 *   client.subscribe("chat");
 *
 * Options: rooms (joined at every (re)connect), token (a JWT, sent in the subprotocol offer as
 * "wsserver.token.<jwt>" beside "wsserver.v1": browsers cannot set headers on a WebSocket, and a
 * ?token= in the URL ends up in proxies' access logs; the server selects "wsserver.v1" and never
 * echoes the token; a function is called at every connect for a fresh one, which also makes an
 * expired-token close 4001 reconnect), backoffInitial / backoffMax (reconnect delays, ms).
 * A publisher's disconnect (close 4002, POST /disconnect) is never followed by a reconnect with
 * the same token: with a fixed token the client stops; with a function it reconnects only if
 * the function returns another token (it stops with an "error" otherwise). The app sees the
 * "close" event with code 4002 either way.
 * A room the server takes away (an "unsubscribed" reply with a "code", e.g. after a refresh
 * whose token no longer grants it) is forgotten: it is not joined again on reconnect. After a close it reconnects or stops as WsserverClient.closeAction(code, reason) says
 * (docs/protocol.md, "Close codes the server sends").
 * Events (on/off): open; close (code, reason); state ("connecting", "open", "reconnecting",
 * "closed"); message (every notification object); reply (every command reply: subscribed,
 * unsubscribed, pong, error...); error (a socket error, or an "error" reply); raw (any other
 * frame, e.g. a rebroadcast free-form message: string or Blob); presence (event, members).
 *
 * Presence rooms ("presence-*", docs/protocol.md "Presence"): client.members[room] is who is
 * there, {users: [sorted subs], anonymous: n}, set by the room's "subscribed" reply (which lists
 * them) and kept by the "presence" events after it ({type: "presence", room, action: "join" |
 * "leave", user}). The "presence" event (or client.onPresence(fn), or the onPresence option)
 * fires for that reply and for each event, with the members after it:
 *
 *   client.onPresence((ev, members) => render(ev.room, members.users));
 */
(function (root) {
  "use strict";

  // The protocol's codes, as wsserver/codes.py declares them (tests/test_codes.py checks that
  // this object equals codes.js_constants()): what to do after each close code ("reconnect"
  // with backoff, "new_token": reconnect with a fresh token, "give_up"), the close reasons that
  // turn a code's action into "give_up" (compared whole, never searched), and the error codes
  // that report the server's state (retry the command later) rather than a client mistake.
  const CODES = {
    "closeActions": {"1000": "reconnect", "1001": "reconnect", "1002": "give_up",
      "1003": "give_up", "1005": "reconnect", "1006": "reconnect", "1007": "give_up",
      "1008": "reconnect", "1009": "give_up", "1010": "give_up", "1011": "reconnect",
      "1012": "reconnect", "1013": "reconnect", "1014": "reconnect", "4001": "new_token",
      "4002": "new_token"},
    "closeDisconnected": 4002,
    "giveUpReasons": {"1008": ["too many invalid commands"]},
    "serverSideErrors": ["busy", "history_unavailable", "queue_full"],
    "subprotocol": "wsserver.v1",
    "tokenSubprotocolPrefix": "wsserver.token."
  };

  // A subprotocol entry must be an HTTP token (RFC 6455 4.1); a JWT always is.
  const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  // codes.close_action: the table; a code not in it gives up if 4000-4999, else reconnects.
  const closeAction = (code, reason) => {
    const giveUp = CODES.giveUpReasons[code] || [];
    if (giveUp.indexOf(reason) >= 0) return "give_up";
    const action = CODES.closeActions[code];
    if (action !== undefined) return action;
    return code >= 4000 && code <= 4999 ? "give_up" : "reconnect";
  };

  // The token a page was opened with: "#token=<jwt>" (a fragment is never sent to a server,
  // so no access log has it) or "?token=" (old links). Either way it is taken out of the
  // address bar (history.replaceState), so it is not bookmarked, shared or sent as a Referer.
  const takeTokenFromLocation = (loc, hist) => {
    const query = new URLSearchParams(loc.search);
    const frag = new URLSearchParams((loc.hash || "").replace(/^#/, ""));
    const token = frag.get("token") || query.get("token") || undefined;
    if (query.has("token") || frag.has("token")) {
      query.delete("token");
      frag.delete("token");
      const q = query.toString();
      const f = frag.toString();
      if (hist && hist.replaceState) {
        hist.replaceState(null, "", loc.pathname + (q ? "?" + q : "") + (f ? "#" + f : ""));
      }
    }
    return token;
  };

  class WsserverClient {
    constructor(url, options) {
      const opts = options || {};
      this.url = url;
      this.token = opts.token || null;
      this.backoffInitial = opts.backoffInitial > 0 ? opts.backoffInitial : 500;
      this.backoffMax = opts.backoffMax > 0 ? opts.backoffMax : 30000;
      this.rooms = new Set(opts.rooms || []); // rooms to (re)join on every connect
      this.lastIds = {}; // room -> id of the last notification seen there (for "since")
      this.members = {}; // presence room -> {users, anonymous}, from its reply and events
      this.state = "closed";
      this._handlers = {};
      this._ws = null;
      this._attempt = 0; // failed connects in a row: drives the backoff
      this._timer = null;
      this._stopped = false;
      this._tokenUsed = null; // the current connection's token
      this._spentToken = null; // the token of a connection a publisher disconnected (4002)
      if (typeof opts.onPresence === "function") this.onPresence(opts.onPresence);
      this._onOnline = () => this._retryNow();
      if (root.addEventListener) root.addEventListener("online", this._onOnline);
      // connect on the next tick, so handlers attached right after `new` see every event
      this._timer = setTimeout(() => this._connect(), 0);
    }

    on(name, fn) {
      (this._handlers[name] = this._handlers[name] || []).push(fn);
      return this;
    }

    // fn(event, members) for a presence room's "subscribed" reply and each "presence" event.
    onPresence(fn) {
      return this.on("presence", fn);
    }

    off(name, fn) {
      const list = this._handlers[name] || [];
      const i = list.indexOf(fn);
      if (i >= 0) list.splice(i, 1);
      return this;
    }

    // Join a room now (if connected) and after every reconnect.
    subscribe(room) {
      this.rooms.add(room);
      this._sendSubscribe(room);
    }

    // Leave a room and forget its position (a later subscribe starts from "now").
    unsubscribe(room) {
      this.rooms.delete(room);
      delete this.lastIds[room];
      delete this.members[room];
      this.send({type: "unsubscribe", room: room});
    }

    ping() {
      return this.send({type: "ping"});
    }

    // Renew the connection's token (same user) without reconnecting; a string token option is
    // replaced, so reconnects use the new one. Rooms it no longer grants are left by the server.
    refresh(token) {
      if (typeof this.token !== "function") this.token = token;
      return this.send({type: "refresh", token: token});
    }

    // Send a command object (or a string/binary free-form message); false when not open.
    send(data) {
      if (!this._ws || this._ws.readyState !== 1) return false;
      const plain = Object.prototype.toString.call(data) === "[object Object]";
      this._ws.send(plain ? JSON.stringify(data) : data);
      return true;
    }

    // Close for good: no reconnect after this.
    close(code, reason) {
      this._stopped = true;
      clearTimeout(this._timer);
      if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
      if (this._ws) this._ws.close(code || 1000, reason || "");
      else this._setState("closed");
    }

    _emit(name, ...args) {
      for (const fn of (this._handlers[name] || []).slice()) {
        try {
          fn.apply(this, args);
        } catch (err) {
          setTimeout(() => { throw err; }, 0); // a handler's bug must not break the client
        }
      }
    }

    _setState(state) {
      if (state === this.state) return;
      this.state = state;
      this._emit("state", state);
    }

    _connect() {
      if (this._stopped) return;
      this._setState(this.state === "closed" ? "connecting" : "reconnecting");
      let token;
      try {
        token = typeof this.token === "function" ? this.token() : this.token;
      } catch (err) { // the token service may be down: try again after the backoff
        this._emit("error", err);
        this._scheduleReconnect();
        return;
      }
      if (token && token === this._spentToken) { // the server said not to come back with it
        this._stopped = true;
        this._emit("error", new Error("disconnected by the server: the token function " +
          "returned the same token again; not reconnecting with it"));
        this._setState("closed");
        return;
      }
      this._tokenUsed = token || null;
      const offer = [CODES.subprotocol];
      if (token) {
        if (!TOKEN_CHARS.test(token)) { // not a JWT: it cannot travel in the offer
          this._stopped = true;
          this._emit("error", new Error("the token has characters a subprotocol cannot carry"));
          this._setState("closed");
          return;
        }
        offer.push(CODES.tokenSubprotocolPrefix + token);
      }
      let ws;
      try {
        ws = new WebSocket(this.url, offer);
      } catch (err) { // a malformed URL: retrying cannot help
        this._stopped = true;
        this._emit("error", err);
        this._setState("closed");
        return;
      }
      this._ws = ws;
      ws.onopen = () => {
        if (this._ws !== ws) return; // closed by close() before it opened
        this._attempt = 0;
        this._setState("open");
        this._emit("open");
        for (const room of this.rooms) this._sendSubscribe(room);
      };
      ws.onmessage = (ev) => this._ws === ws && this._receive(ev.data);
      ws.onerror = (ev) => this._emit("error", ev);
      ws.onclose = (ev) => {
        if (this._ws !== ws) return;
        this._ws = null;
        if (ev.code === CODES.closeDisconnected) this._spentToken = this._tokenUsed;
        this._emit("close", ev.code, ev.reason);
        if (this._stopped || !this._reconnects(ev.code, ev.reason)) {
          this._stopped = true;
          this._setState("closed");
        } else {
          this._scheduleReconnect();
        }
      };
    }

    // Whether a close is worth a reconnect: "new_token" only with a token function to call.
    _reconnects(code, reason) {
      const action = closeAction(code, reason);
      return action === "reconnect" || (action === "new_token" && typeof this.token === "function");
    }

    // Exponential backoff with "equal jitter": a random delay in [d/2, d], d doubling per
    // failed attempt up to backoffMax, so a restarted server is not hit by every tab at once.
    _scheduleReconnect() {
      const d = Math.min(this.backoffMax, this.backoffInitial * Math.pow(2, this._attempt));
      this._attempt += 1;
      this._setState("reconnecting");
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._connect(), d / 2 + Math.random() * d / 2);
    }

    // The network came back: skip the rest of the backoff wait.
    _retryNow() {
      if (this._stopped || this._ws || this.state !== "reconnecting") return;
      clearTimeout(this._timer);
      this._connect();
    }

    _sendSubscribe(room) {
      const cmd = {type: "subscribe", room: room};
      if (this.lastIds[room] !== undefined) cmd.since = this.lastIds[room]; // resume
      return this.send(cmd);
    }

    _receive(data) {
      let obj = null;
      if (typeof data === "string") {
        try {
          obj = JSON.parse(data);
        } catch (err) {
          obj = null;
        }
      }
      if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
        this._emit("raw", data);
      } else if (obj.type === "presence") {
        this._presence(obj);
      } else if (typeof obj.type === "string" && !("event" in obj)) {
        if (obj.type === "unsubscribed" && obj.code !== undefined) { // taken away by the server
          this.rooms.delete(obj.room);
          delete this.lastIds[obj.room];
        }
        if (obj.type === "unsubscribed") delete this.members[obj.room];
        this._emit("reply", obj);
        if (obj.type === "subscribed" && Array.isArray(obj.users)) this._presence(obj);
        if (obj.type === "error") this._emit("error", obj);
      } else if (typeof obj.event === "string" && "id" in obj) {
        // ids are opaque strings; the last one seen in a room is where to resume from
        if (obj.room !== null && obj.room !== undefined && this.rooms.has(obj.room)) {
          this.lastIds[obj.room] = obj.id;
        }
        this._emit("message", obj);
      } else {
        this._emit("raw", data);
      }
    }
  }

  // A presence room's members after its "subscribed" reply (the list) or a "presence" event
  // (applied to the list; an event before the room's reply is already counted in it).
  WsserverClient.prototype._presence = function (obj) {
    let members;
    if (obj.type === "subscribed") {
      members = {users: obj.users.slice().sort(), anonymous: obj.anonymous || 0};
    } else {
      const now = this.members[obj.room];
      if (now === undefined) return;
      const users = new Set(now.users);
      let anonymous = now.anonymous;
      const joined = obj.action === "join";
      if (obj.user === null || obj.user === undefined) {
        anonymous = joined ? anonymous + 1 : Math.max(anonymous - 1, 0);
      } else if (joined) {
        users.add(obj.user);
      } else {
        users.delete(obj.user);
      }
      members = {users: Array.from(users).sort(), anonymous: anonymous};
    }
    this.members[obj.room] = members;
    this._emit("presence", obj, members);
  };

  WsserverClient.CODES = CODES;
  WsserverClient.closeAction = closeAction;
  WsserverClient.takeTokenFromLocation = takeTokenFromLocation;
  root.WsserverClient = WsserverClient;
  if (typeof module === "object" && module && module.exports) module.exports = WsserverClient;
})(typeof self !== "undefined" ? self : this);
