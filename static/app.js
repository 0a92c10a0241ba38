/* talk-server's browser client: chat, rooms and calls on the Talk API v1.
 *
 * Vanilla JavaScript, no build step, no external URL: it must work on a LAN
 * with no internet. Sections, in order:
 *   1. Constants and small DOM helpers
 *   2. The API client (OCS envelope, Basic auth, guest cookie)
 *   3. Connection banner and exponential backoff
 *   4. State, signing in and out, routing
 *   5. Room list, activity order and unread markers
 *   6. An open room: join, chat long-poll, signaling long-poll, ping
 *   7. Chat rendering and sending (always as text, never as HTML)
 *   8. Participants panel and room settings
 *   9. Calls: a mesh of RTCPeerConnections over the internal signaling
 *  10. Start-up
 *
 * Security rule: text from the server only ever reaches the page through
 * textContent / Text nodes (see el()); this file never assigns innerHTML.
 */
'use strict';

(function () {
  // -------------------------------------------------------------------------
  // 1. Constants and small DOM helpers
  // -------------------------------------------------------------------------

  const API = '/ocs/v2.php/apps/spreed/api/v1';
  const CLOUD = '/ocs/v2.php/cloud';
  const CORE = '/ocs/v2.php/core';
  const CHAT_WAIT_S = 30; // the server holds a chat poll this long at most
  const POLL_GRACE_MS = 20000; // a poll silent this much past its wait is dead
  const REQUEST_TIMEOUT_MS = 20000;
  const PING_MS = 5000; // keeps lastPing inside the server's 30 s window
  const ACTIVE_S = 30; // the server's "active" window
  const ROOMS_REFRESH_MS = 10000;
  const ROOM_REFRESH_MS = 10000;
  const BACKOFF_MAX_MS = 30000;
  const TOKEN_RE = /^[A-Za-z0-9]{1,64}$/;

  const ROOM_TYPES = { 1: 'One-to-one', 2: 'Group', 3: 'Public' };
  const PARTICIPANT_TYPES = { 1: 'Owner', 2: 'Moderator', 3: 'User', 4: 'Guest', 5: 'User via link' };
  const OWNER = 1;
  const MODERATOR = 2;
  const USER = 3;
  const GUEST = 4;

  const $ = (id) => document.getElementById(id);

  /** Build an element. String children become Text nodes, never markup. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function setText(id, text) {
    $(id).textContent = text || '';
  }

  function show(id, visible) {
    $(id).hidden = !visible;
  }

  const sleepers = new Set();

  /** Wait `ms`, or less when `signal` aborts or "Retry now" wakes every sleeper. */
  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        sleepers.delete(done);
        if (signal) signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      sleepers.add(done);
      if (signal) signal.addEventListener('abort', done, { once: true });
    });
  }

  function wakeSleepers() {
    for (const wake of [...sleepers]) wake();
  }

  let toastTimer = null;
  function toast(message) {
    setText('toast', message);
    show('toast', true);
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => show('toast', false), 6000);
  }

  function fmtTime(date) {
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  function dayLabel(date) {
    const today = new Date();
    const yesterday = new Date(Date.now() - 86400000);
    if (date.toDateString() === today.toDateString()) return 'Today';
    if (date.toDateString() === yesterday.toDateString()) return 'Yesterday';
    return date.toLocaleDateString([], { weekday: 'long', year: 'numeric', month: 'long', day: 'numeric' });
  }

  function firstLetter(name) {
    const first = [...(name || '?').trim()][0] || '?';
    return first.toUpperCase();
  }

  // -------------------------------------------------------------------------
  // 2. The API client
  // -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, data) {
      super(message || `HTTP ${status}`);
      this.status = status;
      this.data = data;
    }
  }

  /** The server could not be reached (or a proxy says it is down). */
  class NetworkError extends Error {}

  const isAbort = (error) => error && error.name === 'AbortError';

  function utf8Base64(text) {
    let binary = '';
    for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
    return btoa(binary);
  }

  /**
   * One OCS call: resolves to {status, data}; rejects with ApiError (the
   * server answered with an error), NetworkError, or an AbortError.
   */
  async function api(method, path, params, opts = {}) {
    const headers = { 'OCS-APIRequest': 'true', Accept: 'application/json' };
    const auth = 'auth' in opts ? opts.auth : state.auth;
    if (auth) headers.Authorization = 'Basic ' + utf8Base64(`${auth.user}:${auth.password}`);
    let url = (opts.base || API) + path;
    let body;
    if (params) {
      const form = new URLSearchParams();
      for (const [key, value] of Object.entries(params)) {
        if (value !== undefined && value !== null) form.append(key, String(value));
      }
      if (method === 'GET') url += '?' + form.toString();
      else body = form;
    }
    const controller = new AbortController();
    const outer = opts.signal;
    const onAbort = () => controller.abort();
    if (outer) {
      if (outer.aborted) controller.abort();
      else outer.addEventListener('abort', onAbort, { once: true });
    }
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, opts.timeoutMs || REQUEST_TIMEOUT_MS);
    let response;
    let json = null;
    try {
      response = await fetch(url, {
        method,
        headers,
        body,
        credentials: 'same-origin',
        cache: 'no-store',
        signal: controller.signal,
        keepalive: Boolean(opts.keepalive),
      });
      try {
        json = await response.json();
      } catch (error) {
        if (controller.signal.aborted) throw error;
        json = null;
      }
    } catch (error) {
      if (outer && outer.aborted && !timedOut) throw new DOMException('Aborted', 'AbortError');
      throw new NetworkError(timedOut ? 'The server did not answer in time' : 'The server is unreachable');
    } finally {
      clearTimeout(timer);
      if (outer) outer.removeEventListener('abort', onAbort);
    }
    if ([502, 503, 504].includes(response.status)) throw new NetworkError(`HTTP ${response.status}`);
    reportUp();
    const serverDate = Date.parse(response.headers.get('Date') || '');
    if (!Number.isNaN(serverDate)) state.clockSkewMs = serverDate - Date.now();
    const ocs = json && json.ocs;
    const data = ocs ? ocs.data : json;
    if (!response.ok) {
      const message = (ocs && ocs.meta && ocs.meta.message) || (json && json.message) || response.statusText;
      throw new ApiError(response.status, message, data);
    }
    return { status: response.status, data };
  }

  // -------------------------------------------------------------------------
  // 3. Connection banner and exponential backoff
  // -------------------------------------------------------------------------

  const connection = { down: false, retryAt: 0, timer: null };

  function backoffMs(failures) {
    const base = Math.min(BACKOFF_MAX_MS, 1000 * 2 ** Math.max(0, failures - 1));
    return Math.round(base * (0.8 + Math.random() * 0.4));
  }

  /** Show the banner; `retryInMs` is when the caller will try again. */
  function reportDown(retryInMs) {
    const at = Date.now() + retryInMs;
    if (!connection.down || connection.retryAt < Date.now() || at < connection.retryAt) {
      connection.retryAt = at;
    }
    connection.down = true;
    document.body.classList.add('offline');
    show('banner', true);
    renderBanner();
    if (!connection.timer) connection.timer = setInterval(renderBanner, 500);
  }

  function reportUp() {
    if (!connection.down) return;
    connection.down = false;
    document.body.classList.remove('offline');
    show('banner', false);
    clearInterval(connection.timer);
    connection.timer = null;
  }

  function renderBanner() {
    const seconds = Math.ceil((connection.retryAt - Date.now()) / 1000);
    setText(
      'banner-text',
      seconds > 0
        ? `Cannot reach the server. Retrying in ${seconds} s…`
        : 'Cannot reach the server. Retrying…',
    );
  }

  /** Run `fn` until it does not fail with a NetworkError (backing off between tries). */
  async function retrying(fn, signal) {
    for (let failures = 1; ; failures++) {
      try {
        return await fn();
      } catch (error) {
        if (!(error instanceof NetworkError) || (signal && signal.aborted)) throw error;
        const ms = backoffMs(failures);
        reportDown(ms);
        await sleep(ms, signal);
        if (signal && signal.aborted) throw new DOMException('Aborted', 'AbortError');
      }
    }
  }

  // -------------------------------------------------------------------------
  // 4. State, signing in and out, routing
  // -------------------------------------------------------------------------

  const state = {
    auth: null, // {user, password: an app password} of a signed-in user; in sessionStorage only
    me: null, // {id, displayName} for a user, {guest: true} for a guest
    rooms: new Map(), // token -> room object of GET /room
    known: new Map(), // token -> number of messages counted in that room
    newest: new Map(), // token -> newest message timestamp known
    room: null, // the open RoomSession
    roomsTimer: null,
    roomsRunning: false,
    hiddenUnread: 0, // messages that arrived while the tab was hidden
    clockSkewMs: 0, // the server's clock minus ours, from the Date header
  };

  /** The server's time in seconds, to judge lastPing against its 30 s window. */
  function serverNow() {
    return (Date.now() + state.clockSkewMs) / 1000;
  }

  const AUTH_KEY = 'talk-auth';

  /** Test hooks: `talkDebug.peerConnections` maps peer session ids to RTCPeerConnections. */
  window.talkDebug = {
    peerConnections: new Map(),
    get sessionId() {
      return state.room ? state.room.sessionId : null;
    },
    get token() {
      return state.room ? state.room.token : null;
    },
  };

  /**
   * Sign in with the login password, then trade it for an app password: only
   * that one is kept (in sessionStorage), and signing out revokes it, so the
   * user's password never stays in the browser.
   */
  async function signIn(user, password) {
    const auth = { user, password };
    await api('GET', '/user', null, { base: CLOUD, auth });
    const { data } = await api('GET', '/getapppassword', null, { base: CORE, auth });
    await resume({ user, password: data.apppassword });
  }

  /** Continue with an app password from signIn (or from sessionStorage after a reload). */
  async function resume(auth) {
    const { data } = await api('GET', '/user', null, { base: CLOUD, auth });
    state.auth = auth;
    state.me = { id: data.id || auth.user, displayName: data['display-name'] || data.id || auth.user };
    sessionStorage.setItem(AUTH_KEY, JSON.stringify(auth));
  }

  function signOut(message) {
    if (state.auth) api('DELETE', '/apppassword', null, { base: CORE }).catch(() => {});
    closeRoom();
    clearTimeout(state.roomsTimer);
    state.roomsRunning = false;
    state.auth = null;
    state.me = null;
    state.rooms = new Map();
    state.known = new Map();
    state.newest = new Map();
    sessionStorage.removeItem(AUTH_KEY);
    $('room-list').replaceChildren();
    if (location.hash && location.hash !== '#/') location.hash = '#/';
    showLogin(message);
  }

  function showView(name) {
    show('login-view', name === 'login');
    show('guest-view', name === 'guest');
    show('app-view', name === 'app');
  }

  function showLogin(message) {
    showView('login');
    setText('login-error', message || '');
    if (!$('login-user').value) $('login-user').focus();
    else $('login-password').focus();
  }

  function showApp() {
    showView('app');
    const guest = Boolean(state.me && state.me.guest);
    document.body.classList.toggle('guest', guest);
    setText('me-name', guest ? 'Guest' : state.me.displayName);
    if (!guest && !state.roomsRunning) {
      state.roomsRunning = true;
      refreshRooms();
    }
  }

  function hashToken() {
    const match = /^#\/room\/([^/?#]+)\/?$/.exec(location.hash);
    return match && TOKEN_RE.test(match[1]) ? match[1] : null;
  }

  function roomHash(token) {
    return `#/room/${token}`;
  }

  async function route() {
    const token = hashToken();
    if (state.me && !state.me.guest) {
      showApp();
      if (token) openRoom(token);
      else closeRoom();
      return;
    }
    if (state.me && state.me.guest) {
      if (token && state.room && state.room.token === token) return;
      // A guest belongs to one room: following another link starts over.
      closeRoom();
      state.me = null;
    }
    if (token) showGuestJoin(token);
    else showLogin();
  }

  // Guests: a public room's link (#/room/<token>) lets anyone in.
  const guestJoin = { token: null, room: null };

  async function showGuestJoin(token, message) {
    showView('guest');
    guestJoin.token = token;
    guestJoin.room = null;
    setText('guest-room-name', 'Loading…');
    setText('guest-error', message || '');
    show('guest-password-label', false);
    $('guest-form').querySelector('button[type=submit]').disabled = true;
    try {
      const { data } = await retrying(() => api('GET', `/room/${token}`, null, { auth: null }));
      if (guestJoin.token !== token) return;
      guestJoin.room = data;
      setText('guest-room-name', data.displayName || data.name || 'Public conversation');
      show('guest-password-label', Boolean(data.hasPassword));
      $('guest-form').querySelector('button[type=submit]').disabled = false;
      (data.hasPassword ? $('guest-password') : $('guest-form').querySelector('button')).focus();
    } catch (error) {
      if (guestJoin.token !== token) return;
      setText('guest-room-name', 'Conversation not found');
      setText('guest-error', 'This link is not valid, or the conversation is not public any more.');
    }
  }

  async function submitGuestJoin(event) {
    event.preventDefault();
    const token = guestJoin.token;
    const room = guestJoin.room;
    if (!token || !room) return;
    const password = $('guest-password').value;
    const button = $('guest-form').querySelector('button[type=submit]');
    button.disabled = true;
    setText('guest-error', '');
    try {
      const params = room.hasPassword ? { password } : null;
      const { data } = await retrying(() =>
        api('POST', `/room/${token}/participants/active`, params, { auth: null }),
      );
      state.me = { guest: true };
      $('guest-password').value = '';
      showApp();
      openRoom(token, { room, sessionId: data.sessionId, password });
    } catch (error) {
      if (error.status === 403) {
        setText('guest-error', 'Wrong password. Please try again.');
        $('guest-password').select();
      } else if (error.status === 404) {
        setText('guest-error', 'This conversation is not public any more.');
      } else {
        setText('guest-error', `Could not join: ${error.message}`);
      }
    } finally {
      button.disabled = false;
    }
  }

  // -------------------------------------------------------------------------
  // 5. Room list, activity order and unread markers
  // -------------------------------------------------------------------------

  // How many messages of each room this user has seen: {token: {count, ts}}.
  // Only counts live in localStorage; the password never leaves sessionStorage.
  function seenKey() {
    return `talk-seen:${state.me ? state.me.id : ''}`;
  }

  function loadSeen() {
    try {
      return JSON.parse(localStorage.getItem(seenKey()) || '{}') || {};
    } catch (error) {
      return {};
    }
  }

  function saveSeen(token, count, ts) {
    if (!state.me || state.me.guest) return;
    const seen = loadSeen();
    const old = seen[token] || { count: 0, ts: 0 };
    if (old.count === count && old.ts >= ts) return;
    seen[token] = { count: Math.max(old.count, count), ts: Math.max(old.ts, ts || 0) };
    try {
      localStorage.setItem(seenKey(), JSON.stringify(seen));
    } catch (error) {
      /* storage full or disabled: unread markers are best effort */
    }
  }

  async function refreshRooms() {
    clearTimeout(state.roomsTimer);
    if (!state.me || state.me.guest) {
      state.roomsRunning = false;
      return;
    }
    let next = ROOMS_REFRESH_MS;
    try {
      const { data } = await api('GET', '/room');
      state.rooms = new Map((Array.isArray(data) ? data : []).map((room) => [room.token, room]));
      renderRooms();
      await countUnread();
      renderRooms();
    } catch (error) {
      if (error instanceof NetworkError) reportDown(next);
      else if (error.status === 401) return signOut('Please sign in again.');
    }
    // One pending timer at most, however many refreshes overlapped.
    clearTimeout(state.roomsTimer);
    if (state.me && !state.me.guest) state.roomsTimer = setTimeout(refreshRooms, next);
    else state.roomsRunning = false;
  }

  function refreshRoomsSoon() {
    clearTimeout(state.roomsTimer);
    state.roomsTimer = setTimeout(refreshRooms, 50);
  }

  /**
   * Count messages past what was seen in each closed room: chat with
   * offset = messages known so far and no wait returns only the new ones.
   */
  async function countUnread() {
    const seen = loadSeen();
    for (const room of state.rooms.values()) {
      if (state.room && state.room.token === room.token) continue;
      if (!state.known.has(room.token)) {
        const mine = seen[room.token];
        state.known.set(room.token, mine ? mine.count : 0);
        if (mine && mine.ts) state.newest.set(room.token, mine.ts);
      }
      try {
        for (let page = 0; page < 5; page++) {
          const offset = state.known.get(room.token);
          const { data } = await api('GET', `/chat/${room.token}`, { offset, timeout: 0 });
          if (!Array.isArray(data) || data.length === 0) break;
          state.known.set(room.token, offset + data.length);
          state.newest.set(room.token, Math.max(state.newest.get(room.token) || 0, data[0].timestamp || 0));
        }
      } catch (error) {
        if (error instanceof NetworkError) throw error;
        // 404: a room joined through a link and left again has no chat for us.
      }
    }
  }

  function unreadOf(token) {
    const seen = loadSeen()[token];
    const known = state.known.get(token) || 0;
    return Math.max(0, known - (seen ? seen.count : 0));
  }

  function activityOf(room) {
    return Math.max(room.lastPing || 0, state.newest.get(room.token) || 0);
  }

  function renderRooms() {
    const list = $('room-list');
    const rooms = [...state.rooms.values()].sort(
      (a, b) => activityOf(b) - activityOf(a) || String(a.displayName).localeCompare(String(b.displayName)),
    );
    const openToken = state.room ? state.room.token : null;
    let totalUnread = 0;
    const items = rooms.map((room) => {
      const unread = room.token === openToken ? 0 : unreadOf(room.token);
      totalUnread += unread;
      const name = room.displayName || room.name || 'Conversation';
      const sub = [ROOM_TYPES[room.type] || 'Conversation'];
      if (room.hasPassword) sub.push('password');
      if (room.hasCall) sub.push('call in progress');
      return el(
        'li',
        {
          class: 'room-item' + (room.token === openToken ? ' active' : '') + (unread ? ' unread' : '') + (room.hasCall ? ' has-call' : ''),
          'data-testid': 'room-item',
          'data-token': room.token,
          'data-unread': unread,
        },
        el(
          'a',
          { href: roomHash(room.token), class: 'room-link' },
          el('span', { class: `avatar type-${room.type}`, 'aria-hidden': 'true' }, firstLetter(name)),
          el(
            'span',
            { class: 'room-info' },
            el('span', { class: 'room-name', 'data-testid': 'room-name' }, name),
            el('span', { class: 'room-sub' }, sub.join(' · ')),
          ),
          unread
            ? el(
                'span',
                { class: 'badge', 'data-testid': 'unread-badge', title: `${unread} unread` },
                unread > 99 ? '99+' : String(unread),
              )
            : null,
        ),
      );
    });
    list.replaceChildren(...items);
    show('room-list-empty', rooms.length === 0);
    updateTitle(totalUnread);
  }

  function updateTitle(otherUnread) {
    const count = (otherUnread || 0) + state.hiddenUnread;
    const name = state.room && state.room.room ? state.room.room.displayName || 'Talk' : 'Talk';
    document.title = (count ? `(${count}) ` : '') + name + (name === 'Talk' ? '' : ' · Talk');
  }

  async function createRoom(event) {
    event.preventDefault();
    const type = Number($('new-room-type').value);
    const value = $('new-room-name').value.trim();
    setText('new-room-error', '');
    if (type === 1 && !value) return setText('new-room-error', 'Type the user id of the person to talk to.');
    const params = type === 1 ? { roomType: 1, invite: value } : { roomType: type, roomName: value };
    try {
      const { data } = await api('POST', '/room', params);
      $('new-room-name').value = '';
      refreshRoomsSoon();
      location.hash = roomHash(data.token);
    } catch (error) {
      if (error.status === 404) setText('new-room-error', `No user "${value}".`);
      else if (error.status === 403) setText('new-room-error', 'You cannot start a conversation with yourself.');
      else setText('new-room-error', `Could not create: ${error.message}`);
    }
  }

  function updateNewRoomPlaceholder() {
    const oneToOne = $('new-room-type').value === '1';
    $('new-room-name').placeholder = oneToOne ? 'User id' : 'Conversation name';
  }

  // -------------------------------------------------------------------------
  // 6. An open room: join, chat long-poll, signaling long-poll, ping
  // -------------------------------------------------------------------------

  class RoomSession {
    constructor(token) {
      this.token = token;
      this.alive = true;
      this.abort = new AbortController();
      this.room = null; // the room object (GET /room/{token})
      this.sessionId = null;
      this.password = '';
      this.offset = 0; // messages received so far: the chat poll's offset
      this.historyLoaded = false;
      this.messageIds = new Set();
      this.myMessageIds = new Set();
      this.guestActorId = null; // sha1(session id), how the server names a guest author
      this.last = null; // the last rendered message, for grouping
      this.lastDay = null;
      this.users = []; // the latest usersInRoom
      this.usersKey = '';
      this.usersSeen = false; // has the signaling poll answered yet?
      this.participants = [];
      this.participantsPending = null;
      this.inCall = false;
      this.outbox = [];
      this.sending = false;
      this.recovering = null;
      this.lastRecovery = 0;
      this.timers = [];
    }

    get signal() {
      return this.abort.signal;
    }

    get isModerator() {
      return Boolean(state.me && !state.me.guest && this.room && [OWNER, MODERATOR].includes(this.room.participantType));
    }

    stop() {
      this.alive = false;
      this.abort.abort();
      for (const timer of this.timers) clearInterval(timer);
    }
  }

  async function openRoom(token, pre = {}) {
    if (state.room && state.room.token === token) {
      document.body.classList.add('in-room');
      return;
    }
    closeRoom();
    const rs = new RoomSession(token);
    state.room = rs;
    if (location.hash !== roomHash(token)) history.replaceState(null, '', roomHash(token));
    document.body.classList.add('in-room');
    show('room-placeholder', false);
    show('room-main', true);
    $('message-list').replaceChildren();
    delete $('message-list').dataset.ready;
    setText('room-title', pre.room ? pre.room.displayName || pre.room.name : '…');
    $('room-badges').replaceChildren();
    show('room-notice', false);
    setText('send-error', '');
    $('participant-list').replaceChildren();
    renderRooms();
    try {
      rs.room = pre.room || (await retrying(() => api('GET', `/room/${token}`, null, { signal: rs.signal }), rs.signal)).data;
      if (!rs.alive) return;
      renderRoomHeader(rs);
      if (pre.sessionId) {
        rs.sessionId = pre.sessionId;
        rs.password = pre.password || '';
        await learnGuestActorId(rs);
      } else {
        await joinRoom(rs);
      }
    } catch (error) {
      if (!rs.alive) return;
      if (isAbort(error)) {
        // The password prompt was cancelled.
        rs.sessionId = null;
        return roomGone(rs, 'You did not join the conversation.');
      }
      return roomGone(rs, error.status === 404 ? 'That conversation does not exist, or you are not in it.' : `Could not open the conversation: ${error.message}`);
    }
    if (!rs.alive) return;
    $('message-input').focus({ preventScroll: true });
    chatLoop(rs);
    signalingLoop(rs);
    rs.timers.push(setInterval(() => ping(rs), PING_MS));
    rs.timers.push(setInterval(() => refreshRoom(rs), ROOM_REFRESH_MS));
    refreshParticipants(rs);
    if (pre.sessionId) refreshRoom(rs); // a guest's first view of the room predates the join
  }

  /** Leave the open room's view: the call, the session and every loop end. */
  function closeRoom() {
    const rs = state.room;
    document.body.classList.remove('in-room');
    if (!rs) return;
    state.room = null;
    if (rs.inCall) leaveCall(rs, { tellServer: false });
    rs.stop();
    if (rs.sessionId) {
      api('DELETE', `/room/${rs.token}/participants/active`, null, { keepalive: true }).catch(() => {});
    }
    state.known.set(rs.token, rs.offset);
    show('room-main', false);
    show('room-placeholder', true);
    show('participants', false);
    $('participants-toggle').setAttribute('aria-expanded', 'false');
    state.hiddenUnread = 0;
    renderRooms();
  }

  /** The room went away for us (deleted, or we were removed). */
  function roomGone(rs, message) {
    if (state.room !== rs) return;
    if (rs.deleting) message = 'The conversation was deleted.';
    const guest = state.me && state.me.guest;
    closeRoom();
    if (guest) {
      state.me = null;
      showGuestJoin(rs.token, message);
      return;
    }
    toast(message);
    refreshRoomsSoon();
    if (location.hash !== '#/') history.replaceState(null, '', '#/');
  }

  /** POST participants/active; users who need the room password are asked for it. */
  async function joinRoom(rs) {
    let password = rs.password;
    for (;;) {
      try {
        const params = password ? { password } : null;
        const { data } = await retrying(
          () => api('POST', `/room/${rs.token}/participants/active`, params, { signal: rs.signal }),
          rs.signal,
        );
        rs.sessionId = data.sessionId;
        rs.password = password;
        hideNotice();
        await learnGuestActorId(rs);
        return rs.sessionId;
      } catch (error) {
        if (error.status !== 403 || !rs.alive || (state.me && state.me.guest)) throw error;
        password = await askRoomPassword(rs, Boolean(password));
        if (password === null) throw new DOMException('Cancelled', 'AbortError');
      }
    }
  }

  async function learnGuestActorId(rs) {
    // A guest's messages carry sha1(session id) as actorId: knowing it marks
    // our own messages after a reload too. crypto.subtle needs a secure
    // context (localhost or https); elsewhere the ids of sent messages do.
    rs.guestActorId = null;
    if (!state.me || !state.me.guest || !window.crypto || !crypto.subtle) return;
    try {
      const digest = await crypto.subtle.digest('SHA-1', new TextEncoder().encode(rs.sessionId));
      rs.guestActorId = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
    } catch (error) {
      rs.guestActorId = null;
    }
  }

  function askRoomPassword(rs, wrong) {
    return new Promise((resolve) => {
      const input = el('input', { type: 'password', 'data-testid': 'room-password', 'aria-label': 'Conversation password' });
      const form = el(
        'form',
        {
          class: 'inline-form',
          onsubmit: (event) => {
            event.preventDefault();
            resolve(input.value);
          },
        },
        el('span', null, wrong ? 'Wrong password. Try again:' : 'This conversation has a password:'),
        input,
        el('button', { type: 'submit', class: 'primary' }, 'Join'),
        el('button', { type: 'button', class: 'ghost', onclick: () => resolve(null) }, 'Cancel'),
      );
      $('room-notice').replaceChildren(form);
      show('room-notice', true);
      input.focus();
      rs.signal.addEventListener('abort', () => resolve(null), { once: true });
    });
  }

  function showNotice(text) {
    $('room-notice').replaceChildren(text);
    show('room-notice', true);
  }

  function hideNotice() {
    $('room-notice').replaceChildren();
    show('room-notice', false);
  }

  /**
   * The server no longer knows our session (404 on chat, ping or signaling):
   * guests expire after 30 s unseen, members may have been logged out by
   * another tab. Re-join once, or declare the room gone.
   */
  function recoverSession(rs) {
    if (rs.recovering) return rs.recovering;
    rs.recovering = (async () => {
      const since = Date.now() - rs.lastRecovery;
      if (since < 3000) await sleep(3000 - since, rs.signal);
      rs.lastRecovery = Date.now();
      try {
        const { data } = await api('GET', `/room/${rs.token}`, null, { signal: rs.signal });
        rs.room = data;
        let wasInCall = rs.inCall;
        if (data.sessionId && data.sessionId !== '0' && data.sessionId !== rs.sessionId) {
          // Another window took our one session in this room: taking it back
          // at once would start a tug of war, so wait until asked.
          if (wasInCall) leaveCall(rs, { tellServer: false });
          wasInCall = false;
          await waitForUseHere(rs);
        } else if (wasInCall) {
          closeAllPeers();
        }
        await joinRoom(rs);
        renderRoomHeader(rs);
        if (wasInCall) await api('POST', `/call/${rs.token}`, null, { signal: rs.signal });
        return true;
      } catch (error) {
        if (!rs.alive || isAbort(error)) return false;
        if (error instanceof NetworkError) return true; // the loops back off and retry
        if (error.status === 401) {
          signOut('Please sign in again.');
          return false;
        }
        roomGone(rs, error.status === 403 ? 'The conversation password has changed.' : 'You are no longer in this conversation.');
        return false;
      } finally {
        rs.recovering = null;
      }
    })();
    return rs.recovering;
  }

  function waitForUseHere(rs) {
    return new Promise((resolve, reject) => {
      const button = el('button', { type: 'button', class: 'primary', 'data-testid': 'use-here' }, 'Use here');
      button.addEventListener('click', () => resolve(), { once: true });
      $('room-notice').replaceChildren(
        el('span', { class: 'inline-form' }, 'This conversation is open in another window.', button),
      );
      show('room-notice', true);
      rs.signal.addEventListener('abort', () => reject(new DOMException('Closed', 'AbortError')), { once: true });
    });
  }

  /** Handle a loop's failure: back off on network errors, recover on 404. */
  async function loopFailed(rs, error, failures) {
    if (!rs.alive || isAbort(error)) return false;
    if (error instanceof NetworkError) {
      const ms = backoffMs(failures);
      reportDown(ms);
      await sleep(ms, rs.signal);
      return rs.alive;
    }
    if (error.status === 401) {
      signOut('Please sign in again.');
      return false;
    }
    if (error.status === 404) return recoverSession(rs);
    await sleep(backoffMs(failures), rs.signal);
    return rs.alive;
  }

  /** Long-poll GET /chat/{token}: offset = messages received so far. */
  async function chatLoop(rs) {
    let failures = 0;
    while (rs.alive) {
      try {
        const wait = rs.historyLoaded ? CHAT_WAIT_S : 0;
        const { data } = await api(
          'GET',
          `/chat/${rs.token}`,
          { offset: rs.offset, timeout: wait },
          { signal: rs.signal, timeoutMs: wait * 1000 + POLL_GRACE_MS },
        );
        failures = 0;
        if (!rs.alive) return;
        // The server answers newest first.
        const batch = Array.isArray(data) ? data.slice().reverse() : [];
        rs.offset += batch.length;
        appendMessages(rs, batch);
        if (!rs.historyLoaded && batch.length === 0) {
          rs.historyLoaded = true;
          $('message-list').dataset.ready = 'true';
        }
      } catch (error) {
        if (!(await loopFailed(rs, error, ++failures))) return;
      }
    }
  }

  /** Long-poll GET /signaling/{token}: call offers and answers, and who is here. */
  async function signalingLoop(rs) {
    let failures = 0;
    while (rs.alive) {
      try {
        const { data } = await api('GET', `/signaling/${rs.token}`, null, {
          signal: rs.signal,
          timeoutMs: 30000 + POLL_GRACE_MS,
        });
        failures = 0;
        if (!rs.alive) return;
        for (const item of Array.isArray(data) ? data : []) {
          if (item.type === 'message') {
            let message;
            try {
              message = typeof item.data === 'string' ? JSON.parse(item.data) : item.data;
            } catch (error) {
              continue;
            }
            await handleSignal(rs, message);
          } else if (item.type === 'usersInRoom') {
            usersInRoom(rs, Array.isArray(item.data) ? item.data : []);
          }
        }
      } catch (error) {
        if (!(await loopFailed(rs, error, ++failures))) return;
      }
    }
  }

  async function ping(rs) {
    if (!rs.alive || !rs.sessionId || rs.recovering) return;
    try {
      await api('POST', `/call/${rs.token}/ping`, null, { signal: rs.signal });
    } catch (error) {
      if (!rs.alive || isAbort(error)) return;
      if (error instanceof NetworkError) reportDown(PING_MS);
      else if (error.status === 404) recoverSession(rs);
    }
  }

  async function refreshRoom(rs) {
    if (!rs.alive || rs.recovering) return;
    try {
      const { data } = await api('GET', `/room/${rs.token}`, null, { signal: rs.signal });
      if (!rs.alive) return;
      rs.room = data;
      renderRoomHeader(rs);
      if (!$('participants').hidden) refreshParticipants(rs);
    } catch (error) {
      if (!rs.alive || isAbort(error) || error instanceof NetworkError) return;
      if (error.status === 404) recoverSession(rs);
    }
  }

  function usersInRoom(rs, users) {
    rs.users = users;
    rs.usersSeen = true;
    const key = users
      .map((user) => `${user.sessionId}:${user.inCall ? 1 : 0}`)
      .sort()
      .join(',');
    if (key !== rs.usersKey) {
      rs.usersKey = key;
      refreshParticipants(rs);
    }
    renderCallButton(rs);
    if (rs.inCall) updatePeers(rs);
  }

  function renderRoomHeader(rs) {
    const room = rs.room;
    if (!room) return;
    const name = room.displayName || room.name || 'Conversation';
    setText('room-title', name);
    const badges = [el('span', { class: `chip type-${room.type}`, 'data-testid': 'room-type' }, ROOM_TYPES[room.type] || '')];
    if (room.hasPassword) badges.push(el('span', { class: 'chip', title: 'Guests need a password' }, 'password'));
    $('room-badges').replaceChildren(...badges);
    const guest = state.me && state.me.guest;
    show('room-settings', rs.isModerator);
    setText('leave-room', guest ? 'Leave conversation' : 'Leave conversation for good');
    show('add-participant-form', rs.isModerator);
    renderCallButton(rs);
    updateTitle(0);
    if (!$('settings-dialog').open) return;
    fillSettings(rs);
  }

  function renderCallButton(rs) {
    const others = rs.users.filter((user) => user.inCall && user.sessionId !== rs.sessionId).length;
    show('call-join', !rs.inCall);
    show('call-leave', rs.inCall);
    setText('call-join', others ? `Join call (${others})` : 'Start call');
    $('call-join').classList.toggle('pulse', others > 0 && !rs.inCall);
    setText('participant-count', String(rs.users.length || ''));
  }

  // -------------------------------------------------------------------------
  // 7. Chat rendering and sending (always as text, never as HTML)
  // -------------------------------------------------------------------------

  function isMine(rs, message) {
    if (rs.myMessageIds.has(message.id)) return true;
    if (!state.me) return false;
    if (state.me.guest) return message.actorType === 'guests' && message.actorId === rs.guestActorId;
    return message.actorType === 'users' && message.actorId === state.me.id;
  }

  function authorName(message) {
    if (message.actorType === 'guests') return `Guest ${String(message.actorId || '').slice(0, 4)}`.trim();
    return message.actorDisplayName || message.actorId || 'Unknown';
  }

  function appendMessages(rs, batch) {
    if (!batch.length) return;
    const list = $('message-list');
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 120;
    const fragment = document.createDocumentFragment();
    let newest = 0;
    for (const message of batch) {
      if (rs.messageIds.has(message.id)) continue;
      rs.messageIds.add(message.id);
      const date = new Date((message.timestamp || 0) * 1000);
      const day = date.toDateString();
      if (day !== rs.lastDay) {
        fragment.append(el('li', { class: 'day', role: 'separator' }, dayLabel(date)));
        rs.lastDay = day;
        rs.last = null;
      }
      const previous = rs.last;
      const continued =
        previous &&
        previous.actorType === message.actorType &&
        previous.actorId === message.actorId &&
        message.timestamp - previous.timestamp < 300;
      const mine = isMine(rs, message);
      fragment.append(
        el(
          'li',
          {
            class: 'message' + (mine ? ' mine' : '') + (continued ? ' continued' : ''),
            'data-testid': 'message',
            'data-id': message.id,
          },
          el(
            'div',
            { class: 'meta' },
            el('span', { class: 'author', 'data-testid': 'message-author' }, authorName(message)),
            el('time', { datetime: date.toISOString(), title: date.toLocaleString() }, fmtTime(date)),
          ),
          el('div', { class: 'text', 'data-testid': 'message-text' }, String(message.message)),
        ),
      );
      rs.last = message;
      newest = Math.max(newest, message.timestamp || 0);
    }
    list.append(fragment);
    if (nearBottom || !rs.historyLoaded) list.scrollTop = list.scrollHeight;
    if (newest) state.newest.set(rs.token, newest);
    state.known.set(rs.token, rs.offset);
    saveSeen(rs.token, rs.offset, newest);
    if (document.hidden && rs.historyLoaded) {
      state.hiddenUnread += batch.length;
      updateTitle(0);
    }
  }

  async function sendMessage() {
    const rs = state.room;
    const input = $('message-input');
    const text = input.value;
    if (!rs || !text.trim()) return;
    input.value = '';
    autoGrow();
    setText('send-error', '');
    try {
      const { data } = await api('POST', `/chat/${rs.token}`, { message: text }, { signal: rs.signal });
      if (data && data.id !== undefined) {
        rs.myMessageIds.add(data.id);
        // The poll may have shown it already, before this answer came.
        const shown = $('message-list').querySelector(`li[data-id="${Number(data.id)}"]`);
        if (shown) shown.classList.add('mine');
      }
    } catch (error) {
      if (isAbort(error)) return;
      if (!input.value) {
        input.value = text;
        autoGrow();
      }
      if (error instanceof NetworkError) {
        reportDown(1000);
        setText('send-error', 'Not sent: the server is unreachable. Press Enter to try again.');
      } else if (error.status === 404) {
        setText('send-error', 'Not sent: reconnecting to the conversation… Press Enter to try again.');
        recoverSession(rs);
      } else {
        setText('send-error', `Not sent: ${error.message}`);
      }
    }
  }

  function autoGrow() {
    const input = $('message-input');
    input.style.height = 'auto';
    input.style.height = Math.min(input.scrollHeight, 160) + 'px';
  }

  // -------------------------------------------------------------------------
  // 8. Participants panel and room settings
  // -------------------------------------------------------------------------

  async function refreshParticipants(rs) {
    if (rs.participantsPending) return rs.participantsPending;
    rs.participantsPending = (async () => {
      try {
        const { data } = await api('GET', `/room/${rs.token}/participants`, null, { signal: rs.signal });
        if (!rs.alive) return;
        rs.participants = Array.isArray(data) ? data : [];
        if (!rs.usersSeen) {
          // Until the signaling poll first answers (it may wait 30 s), judge
          // who is here from lastPing, as the server does.
          const since = serverNow() - ACTIVE_S;
          rs.users = rs.participants
            .filter((p) => p.sessionId && p.sessionId !== '0' && p.lastPing > since)
            .map((p) => ({ userId: p.userId, sessionId: p.sessionId, inCall: Boolean(p.inCall), lastPing: p.lastPing }));
          renderCallButton(rs);
        }
        renderParticipants(rs);
        renderTileNames(rs);
      } catch (error) {
        /* the next usersInRoom change or refresh tries again */
      } finally {
        rs.participantsPending = null;
      }
    })();
    return rs.participantsPending;
  }

  function participantName(p) {
    if (!p) return 'Someone';
    return p.userId ? p.displayName || p.userId : 'Guest';
  }

  function isMe(rs, p) {
    if (!state.me) return false;
    if (state.me.guest) return p.sessionId === rs.sessionId;
    return p.userId === state.me.id;
  }

  function renderParticipants(rs) {
    const online = new Set(rs.users.map((user) => user.sessionId));
    const order = (p) => (online.has(p.sessionId) ? 0 : 1) * 10 + p.participantType;
    const people = rs.participants.slice().sort((a, b) => order(a) - order(b) || participantName(a).localeCompare(participantName(b)));
    const items = people.map((p) => {
      const me = isMe(rs, p);
      const actions = [];
      if (rs.isModerator && !me) {
        const act = (label, handler, cls) =>
          el('button', { type: 'button', class: 'small ' + (cls || ''), 'data-action': label.toLowerCase(), onclick: handler }, label);
        if (p.participantType === USER) actions.push(act('Promote', () => participantAction(rs, 'POST', '/moderators', p.userId)));
        if (p.participantType === MODERATOR) actions.push(act('Demote', () => participantAction(rs, 'DELETE', '/moderators', p.userId)));
        if (p.userId && p.participantType !== OWNER) {
          actions.push(act('Remove', () => participantAction(rs, 'DELETE', '/participants', p.userId), 'danger'));
        }
        if (!p.userId && p.participantType === GUEST && p.sessionId !== '0') {
          actions.push(act('Remove', () => participantAction(rs, 'DELETE', '/participants/guests', p.sessionId), 'danger'));
        }
      }
      const name = participantName(p) + (me ? ' (you)' : '');
      return el(
        'li',
        {
          class: 'participant' + (online.has(p.sessionId) ? ' online' : ''),
          'data-testid': 'participant',
          'data-user': p.userId || '',
          'data-type': p.participantType,
        },
        el('span', { class: 'presence', title: online.has(p.sessionId) ? 'Online' : 'Offline' }),
        el(
          'span',
          { class: 'participant-info' },
          el('span', { class: 'participant-name' }, name),
          el('span', { class: 'participant-type', 'data-testid': 'participant-type' }, (PARTICIPANT_TYPES[p.participantType] || '') + (p.inCall ? ' · in call' : '')),
        ),
        el('span', { class: 'participant-actions' }, ...actions),
      );
    });
    $('participant-list').replaceChildren(...items);
  }

  async function participantAction(rs, method, path, participant) {
    setText('participants-error', '');
    try {
      await api(method, `/room/${rs.token}${path}`, { participant }, { signal: rs.signal });
    } catch (error) {
      if (!isAbort(error)) setText('participants-error', error.message);
    }
    refreshParticipants(rs);
    refreshRoom(rs);
  }

  async function addParticipant(event) {
    event.preventDefault();
    const rs = state.room;
    const input = $('add-participant-id');
    const userId = input.value.trim();
    if (!rs || !userId) return;
    setText('participants-error', '');
    try {
      await api('POST', `/room/${rs.token}/participants`, { newParticipant: userId }, { signal: rs.signal });
      input.value = '';
    } catch (error) {
      if (isAbort(error)) return;
      setText('participants-error', error.status === 404 ? `No user "${userId}".` : error.message);
    }
    refreshParticipants(rs);
    refreshRoom(rs);
  }

  function toggleParticipants(force) {
    const panel = $('participants');
    const open = force === undefined ? panel.hidden : force;
    panel.hidden = !open;
    $('participants-toggle').setAttribute('aria-expanded', String(open));
    if (open && state.room) refreshParticipants(state.room);
  }

  /** A button that acts only on a second click (no native confirm() dialogs). */
  function confirmClick(button, question, action) {
    if (button.dataset.armed === 'true') {
      clearTimeout(Number(button.dataset.timer));
      delete button.dataset.armed;
      button.textContent = button.dataset.label;
      return action();
    }
    button.dataset.label = button.textContent;
    button.dataset.armed = 'true';
    button.textContent = question;
    button.dataset.timer = String(
      setTimeout(() => {
        delete button.dataset.armed;
        button.textContent = button.dataset.label;
      }, 5000),
    );
  }

  async function leaveRoomForGood() {
    const rs = state.room;
    if (!rs) return;
    if (state.me && state.me.guest) {
      // A guest just leaves (DELETE participants/active ends its row); the
      // link still works to come back.
      if (rs.inCall) leaveCall(rs, { tellServer: false });
      return roomGone(rs, 'You left the conversation.');
    }
    try {
      if (rs.inCall) leaveCall(rs, { tellServer: true });
      await api('DELETE', `/room/${rs.token}/participants/self`);
      rs.sessionId = null;
      roomGone(rs, 'You left the conversation.');
    } catch (error) {
      setText('participants-error', error.message);
    }
  }

  function openSettings() {
    const rs = state.room;
    if (!rs || !rs.isModerator) return;
    setText('settings-error', '');
    setText('settings-ok', '');
    $('settings-password').value = '';
    fillSettings(rs);
    $('settings-dialog').showModal();
  }

  function fillSettings(rs) {
    const room = rs.room;
    const isPublic = room.type === 3;
    show('settings-rename-section', room.type !== 1);
    if (document.activeElement !== $('settings-name')) $('settings-name').value = room.name || '';
    setText('settings-public-state', isPublic ? 'Public: anyone with the link can join as a guest.' : 'Private: only the participants can join.');
    setText('settings-public', isPublic ? 'Make private' : 'Make public');
    show('settings-link-section', isPublic);
    $('settings-link').value = location.origin + location.pathname + roomHash(rs.token);
    show('settings-password-section', isPublic);
    setText('settings-password-state', room.hasPassword ? '(a password is set)' : '(none)');
    $('settings-password-clear').disabled = !room.hasPassword;
  }

  async function settingsAction(fn, done) {
    const rs = state.room;
    if (!rs) return;
    setText('settings-error', '');
    setText('settings-ok', '');
    try {
      await fn(rs);
      setText('settings-ok', done);
      await refreshRoom(rs);
      refreshRoomsSoon();
    } catch (error) {
      if (!isAbort(error)) setText('settings-error', error.message);
    }
  }

  function bindSettings() {
    $('settings-rename').addEventListener('click', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}`, { roomName: $('settings-name').value }), 'Renamed.'),
    );
    $('settings-public').addEventListener('click', () =>
      settingsAction(
        (rs) => api(rs.room.type === 3 ? 'DELETE' : 'POST', `/room/${rs.token}/public`),
        'Saved.',
      ),
    );
    $('settings-password-set').addEventListener('click', () => {
      if (!$('settings-password').value) return setText('settings-error', 'Type a password first.');
      settingsAction(async (rs) => {
        await api('PUT', `/room/${rs.token}/password`, { password: $('settings-password').value });
        $('settings-password').value = '';
      }, 'Password set.');
    });
    $('settings-password-clear').addEventListener('click', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}/password`, { password: '' }), 'Password removed.'),
    );
    $('settings-copy').addEventListener('click', async () => {
      $('settings-link').select();
      try {
        await navigator.clipboard.writeText($('settings-link').value);
        setText('settings-ok', 'Link copied.');
      } catch (error) {
        setText('settings-ok', 'Select the link and copy it.');
      }
    });
    $('settings-delete').addEventListener('click', (event) =>
      confirmClick(event.currentTarget, 'Click again to delete for everyone', async () => {
        const rs = state.room;
        if (!rs) return;
        try {
          if (rs.inCall) leaveCall(rs, { tellServer: false });
          // Our own polls see the room go (404) and may answer before the
          // DELETE does: they must tell us it was deleted, not that we left.
          rs.deleting = true;
          await api('DELETE', `/room/${rs.token}`);
          $('settings-dialog').close();
          rs.sessionId = null;
          roomGone(rs, 'The conversation was deleted.');
        } catch (error) {
          rs.deleting = false;
          setText('settings-error', error.message);
        }
      }),
    );
  }

  // -------------------------------------------------------------------------
  // 9. Calls: a mesh of RTCPeerConnections over the internal signaling
  // -------------------------------------------------------------------------

  const call = {
    local: null, // our MediaStream, or null when we only watch and listen
    peers: new Map(), // peer session id -> {sid, pc, offerer, pending, tile, video}
    iceServers: [],
  };

  async function getLocalMedia() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      setText('call-error', 'Camera and microphone need https or localhost: joining to watch and listen.');
      return null;
    }
    const wishes = [
      { audio: true, video: { width: { ideal: 640 }, height: { ideal: 480 } } },
      { audio: true, video: false },
      { audio: false, video: true },
    ];
    for (const constraints of wishes) {
      try {
        return await navigator.mediaDevices.getUserMedia(constraints);
      } catch (error) {
        if (error && error.name === 'NotAllowedError') break;
      }
    }
    setText('call-error', 'No camera or microphone available: joining to watch and listen.');
    return null;
  }

  /** STUN and TURN from the server; a LAN without internet still connects on host candidates. */
  async function loadIceServers(rs) {
    try {
      const { data } = await api('GET', '/signaling/settings', null, { signal: rs.signal });
      const servers = [];
      for (const stun of (data && data.stunservers) || []) {
        if (stun && stun.url) servers.push({ urls: stun.url });
      }
      for (const turn of (data && data.turnservers) || []) {
        const urls = turn && (turn.urls || turn.url);
        if (urls) servers.push({ urls, username: turn.username, credential: turn.credential });
      }
      return servers;
    } catch (error) {
      return [];
    }
  }

  async function joinCall() {
    const rs = state.room;
    if (!rs || rs.inCall || !rs.sessionId) return;
    const button = $('call-join');
    button.disabled = true;
    setText('call-error', '');
    try {
      call.local = await getLocalMedia();
      call.iceServers = await loadIceServers(rs);
      if (!rs.alive) return stopLocal();
      // In the call locally before the server knows, so an offer that
      // races the answer to this POST is not dropped.
      rs.inCall = true;
      showCallArea(rs);
      await api('POST', `/call/${rs.token}`, null, { signal: rs.signal });
      updatePeers(rs);
      renderCallButton(rs);
    } catch (error) {
      if (!isAbort(error)) setText('call-error', `Could not join the call: ${error.message}`);
      leaveCall(rs, { tellServer: false });
    } finally {
      button.disabled = false;
    }
  }

  function leaveCall(rs, { tellServer }) {
    rs.inCall = false;
    closeAllPeers();
    stopLocal();
    $('video-grid').replaceChildren();
    show('call', false);
    document.body.classList.remove('in-call');
    renderCallButton(rs);
    if (tellServer) api('DELETE', `/call/${rs.token}`, null, { keepalive: true }).catch(() => {});
  }

  function stopLocal() {
    if (call.local) for (const track of call.local.getTracks()) track.stop();
    call.local = null;
  }

  function showCallArea(rs) {
    show('call', true);
    document.body.classList.add('in-call');
    const video = el('video', { 'aria-label': 'Your camera' });
    video.muted = true; // never play our own microphone back
    video.autoplay = true;
    video.playsInline = true;
    if (call.local) video.srcObject = call.local;
    const hasVideo = Boolean(call.local && call.local.getVideoTracks().length);
    const tile = el(
      'div',
      { class: 'tile local' + (hasVideo ? '' : ' no-video'), 'data-testid': 'video-tile', 'data-local': 'true', 'data-session': rs.sessionId },
      video,
      el('span', { class: 'tile-label' }, 'You'),
    );
    $('video-grid').replaceChildren(tile);
    renderMediaButtons();
    renderGridSize();
  }

  function renderMediaButtons() {
    const audio = call.local ? call.local.getAudioTracks() : [];
    const video = call.local ? call.local.getVideoTracks() : [];
    const mic = $('toggle-mic');
    const cam = $('toggle-camera');
    mic.disabled = audio.length === 0;
    cam.disabled = video.length === 0;
    const micOff = audio.length === 0 || !audio[0].enabled;
    const camOff = video.length === 0 || !video[0].enabled;
    mic.setAttribute('aria-pressed', String(micOff));
    cam.setAttribute('aria-pressed', String(camOff));
    mic.title = micOff ? 'Unmute microphone' : 'Mute microphone';
    cam.title = camOff ? 'Turn camera on' : 'Turn camera off';
    mic.classList.toggle('off', micOff);
    cam.classList.toggle('off', camOff);
    const localTile = $('video-grid').querySelector('.tile.local');
    if (localTile) localTile.classList.toggle('no-video', camOff);
  }

  function toggleTracks(kind) {
    if (!call.local) return;
    const tracks = kind === 'audio' ? call.local.getAudioTracks() : call.local.getVideoTracks();
    const enable = !(tracks[0] && tracks[0].enabled);
    for (const track of tracks) track.enabled = enable;
    renderMediaButtons();
  }

  function renderGridSize() {
    const count = $('video-grid').children.length;
    $('video-grid').dataset.count = String(Math.min(count, 9));
  }

  function peerName(rs, sid) {
    return participantName(rs.participants.find((p) => p.sessionId === sid));
  }

  function renderTileNames(rs) {
    for (const peer of call.peers.values()) {
      peer.tile.querySelector('.tile-label').textContent = peerName(rs, peer.sid);
    }
  }

  /** Match the peer connections to usersInRoom: one per other session in the call. */
  function updatePeers(rs) {
    if (!rs.inCall || !rs.sessionId) return;
    const wanted = new Set(
      rs.users.filter((user) => user.inCall && user.sessionId && user.sessionId !== rs.sessionId).map((user) => user.sessionId),
    );
    for (const sid of [...call.peers.keys()]) if (!wanted.has(sid)) closePeer(sid);
    for (const sid of wanted) {
      if (call.peers.has(sid)) continue;
      const peer = createPeer(rs, sid);
      if (peer.offerer) makeOffer(rs, peer);
    }
  }

  function createPeer(rs, sid) {
    const pc = new RTCPeerConnection({ iceServers: call.iceServers });
    // Glare rule: the lexicographically smaller session id makes the offer.
    const peer = { sid, pc, offerer: rs.sessionId < sid, pending: [], stream: null };
    const video = el('video', { 'aria-label': 'Video of ' + peerName(rs, sid) });
    video.autoplay = true;
    video.playsInline = true;
    const status = el('span', { class: 'tile-state' }, 'Connecting…');
    peer.tile = el(
      'div',
      { class: 'tile remote', 'data-testid': 'video-tile', 'data-local': 'false', 'data-session': sid, 'data-state': 'new' },
      video,
      el('span', { class: 'tile-label' }, peerName(rs, sid)),
      status,
    );
    peer.video = video;
    $('video-grid').append(peer.tile);
    renderGridSize();

    const localTracks = call.local ? call.local.getTracks() : [];
    for (const track of localTracks) pc.addTrack(track, call.local);
    if (peer.offerer) {
      // Without a camera or microphone, still ask to receive both.
      for (const kind of ['audio', 'video']) {
        if (!localTracks.some((track) => track.kind === kind)) pc.addTransceiver(kind, { direction: 'recvonly' });
      }
    }
    pc.onicecandidate = (event) => {
      if (!event.candidate) return;
      const { candidate, sdpMid, sdpMLineIndex } = event.candidate;
      sendSignal(rs, sid, 'candidate', { candidate: { candidate, sdpMid, sdpMLineIndex } });
    };
    pc.ontrack = (event) => {
      if (!peer.stream) peer.stream = event.streams[0] || new MediaStream();
      if (!peer.stream.getTracks().includes(event.track)) peer.stream.addTrack(event.track);
      if (video.srcObject !== peer.stream) video.srcObject = peer.stream;
      video.play().catch(() => {});
    };
    pc.oniceconnectionstatechange = () => {
      const ice = pc.iceConnectionState;
      peer.tile.dataset.state = ice;
      status.textContent = { new: 'Connecting…', checking: 'Connecting…', connected: '', completed: '', disconnected: 'Reconnecting…', failed: 'Connection failed', closed: '' }[ice] || '';
      if (ice === 'failed' && peer.offerer && call.peers.get(sid) === peer) {
        pc.restartIce();
        makeOffer(rs, peer, { iceRestart: true });
      }
    };
    call.peers.set(sid, peer);
    window.talkDebug.peerConnections.set(sid, pc);
    return peer;
  }

  async function makeOffer(rs, peer, options) {
    try {
      const offer = await peer.pc.createOffer(options);
      await peer.pc.setLocalDescription(offer);
      sendSignal(rs, peer.sid, 'offer', { type: 'offer', sdp: peer.pc.localDescription.sdp });
    } catch (error) {
      console.warn('offer failed', error);
    }
  }

  function closePeer(sid) {
    const peer = call.peers.get(sid);
    if (!peer) return;
    call.peers.delete(sid);
    window.talkDebug.peerConnections.delete(sid);
    peer.pc.close();
    peer.tile.remove();
    renderGridSize();
  }

  function closeAllPeers() {
    for (const sid of [...call.peers.keys()]) closePeer(sid);
  }

  async function flushCandidates(peer) {
    const pending = peer.pending.splice(0);
    for (const candidate of pending) await peer.pc.addIceCandidate(candidate).catch(() => {});
  }

  /** One signaling message {from, to, type, payload} from a peer. */
  async function handleSignal(rs, message) {
    if (!message || typeof message !== 'object' || !rs.inCall) return;
    const from = message.from;
    if (!from || from === rs.sessionId || (message.to && message.to !== rs.sessionId)) return;
    if (message.roomType && message.roomType !== 'video') return;
    const payload = message.payload || {};
    let peer = call.peers.get(from);
    try {
      if (message.type === 'offer') {
        if (!peer) peer = createPeer(rs, from);
        // We are the offerer and mid-offer: ours wins, as both follow the rule.
        if (peer.pc.signalingState === 'have-local-offer' && peer.offerer) return;
        await peer.pc.setRemoteDescription({ type: 'offer', sdp: payload.sdp });
        await flushCandidates(peer);
        const answer = await peer.pc.createAnswer();
        await peer.pc.setLocalDescription(answer);
        sendSignal(rs, from, 'answer', { type: 'answer', sdp: peer.pc.localDescription.sdp });
      } else if (message.type === 'answer') {
        if (!peer || peer.pc.signalingState !== 'have-local-offer') return;
        await peer.pc.setRemoteDescription({ type: 'answer', sdp: payload.sdp });
        await flushCandidates(peer);
      } else if (message.type === 'candidate') {
        if (!peer) return;
        const raw = payload.candidate;
        const candidate =
          typeof raw === 'string' ? { candidate: raw, sdpMid: payload.sdpMid, sdpMLineIndex: payload.sdpMLineIndex } : raw;
        if (!candidate) return;
        if (peer.pc.remoteDescription) await peer.pc.addIceCandidate(candidate).catch(() => {});
        else peer.pending.push(candidate);
      }
    } catch (error) {
      console.warn('signaling message failed', message.type, error);
    }
  }

  /** Queue a message for a peer; one POST at a time keeps them in order. */
  function sendSignal(rs, to, type, payload) {
    const fn = JSON.stringify({ to, type, payload, roomType: 'video' });
    rs.outbox.push({ ev: 'message', sessionId: rs.sessionId, fn });
    flushOutbox(rs);
  }

  async function flushOutbox(rs) {
    if (rs.sending) return;
    rs.sending = true;
    let failures = 0;
    try {
      await sleep(15, rs.signal); // gather a burst of ICE candidates into one request
      while (rs.alive && rs.outbox.length) {
        const batch = rs.outbox.splice(0, 40);
        try {
          await api('POST', `/signaling/${rs.token}`, { messages: JSON.stringify(batch) }, { signal: rs.signal });
          failures = 0;
        } catch (error) {
          if (!rs.alive || isAbort(error)) return;
          if (error instanceof NetworkError) {
            rs.outbox.unshift(...batch);
            const ms = backoffMs(++failures);
            reportDown(ms);
            await sleep(ms, rs.signal);
          } else if (error.status === 404) {
            recoverSession(rs);
          } else {
            console.warn('signaling send failed', error);
          }
        }
      }
    } finally {
      rs.sending = false;
    }
  }

  // -------------------------------------------------------------------------
  // 10. Start-up
  // -------------------------------------------------------------------------

  function bind() {
    $('login-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const user = $('login-user').value.trim();
      const password = $('login-password').value;
      const button = $('login-form').querySelector('button[type=submit]');
      button.disabled = true;
      setText('login-error', '');
      try {
        await retrying(() => signIn(user, password));
        $('login-password').value = '';
        route();
      } catch (error) {
        setText('login-error', error.status === 401 ? 'Wrong user id or password.' : `Could not sign in: ${error.message}`);
      } finally {
        button.disabled = false;
      }
    });
    $('guest-form').addEventListener('submit', submitGuestJoin);
    $('guest-signin').addEventListener('click', () => showLogin());
    $('signout').addEventListener('click', () => signOut());
    $('new-room-form').addEventListener('submit', createRoom);
    $('new-room-type').addEventListener('change', updateNewRoomPlaceholder);
    $('back').addEventListener('click', () => {
      if (state.me && state.me.guest) return;
      location.hash = '#/';
    });
    $('composer').addEventListener('submit', (event) => {
      event.preventDefault();
      sendMessage();
    });
    $('message-input').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        sendMessage();
      }
    });
    $('message-input').addEventListener('input', autoGrow);
    $('participants-toggle').addEventListener('click', () => toggleParticipants());
    $('participants-close').addEventListener('click', () => toggleParticipants(false));
    $('add-participant-form').addEventListener('submit', addParticipant);
    $('leave-room').addEventListener('click', (event) =>
      confirmClick(event.currentTarget, 'Click again to leave', leaveRoomForGood),
    );
    $('room-settings').addEventListener('click', openSettings);
    $('call-join').addEventListener('click', joinCall);
    const hangUp = () => state.room && leaveCall(state.room, { tellServer: true });
    $('call-leave').addEventListener('click', hangUp);
    $('call-hangup').addEventListener('click', hangUp);
    $('toggle-mic').addEventListener('click', () => toggleTracks('audio'));
    $('toggle-camera').addEventListener('click', () => toggleTracks('video'));
    $('banner-retry').addEventListener('click', () => {
      connection.retryAt = Date.now();
      renderBanner();
      wakeSleepers();
      if (state.me && !state.me.guest) refreshRoomsSoon();
    });
    bindSettings();
    // The settings form is method=dialog: only its close button may submit.
    $('settings-form').addEventListener('submit', (event) => {
      if (!event.submitter || event.submitter.value !== 'close') event.preventDefault();
    });
    $('settings-name').addEventListener('keydown', (event) => {
      if (event.key === 'Enter') $('settings-rename').click();
    });
    $('settings-password').addEventListener('keydown', (event) => {
      if (event.key === 'Enter') $('settings-password-set').click();
    });
    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) {
        state.hiddenUnread = 0;
        updateTitle(0);
        renderRooms();
      }
    });
    // Leave the room (and so the call) when the page goes away, so the
    // others see us go at once instead of after the 30 s window.
    window.addEventListener('pagehide', () => {
      const rs = state.room;
      if (rs && rs.sessionId) {
        api('DELETE', `/room/${rs.token}/participants/active`, null, { keepalive: true }).catch(() => {});
      }
    });
  }

  async function start() {
    bind();
    const saved = sessionStorage.getItem(AUTH_KEY);
    if (saved) {
      try {
        const { user, password } = JSON.parse(saved);
        await retrying(() => resume({ user, password }));
      } catch (error) {
        sessionStorage.removeItem(AUTH_KEY);
        state.auth = null;
        state.me = null;
      }
    }
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
