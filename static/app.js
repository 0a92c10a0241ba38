/* talk-server's browser client on today's Talk API: conversations and
 * participants on v4, chat by message id with lookIntoFuture, calls as a mesh
 * of peer connections, or through the High-Performance Backend (the signaling
 * server's WebSocket and Janus) when the server names one.
 *
 * Vanilla JavaScript, no build step, no external URL: it must work on a LAN
 * with no internet, under a Content-Security-Policy without inline code.
 * Sections, in order:
 *   1. Constants and small DOM helpers
 *   2. The API client (OCS envelope; the session is the sign-in cookie)
 *   3. Connection banner and exponential backoff
 *   4. State, signing in and out, guests, routing
 *   5. Conversation list: avatars, unread counts, mentions, favorites, search
 *   6. Creating conversations, user search
 *   7. An open conversation: join, chat long-poll, signaling long-poll
 *   8. Chat rendering (always as text, never as HTML): mentions, replies,
 *      reactions, edits, deletes, polls, system messages, read divider
 *   9. The composer: sending, replies, edits, @-autocomplete, polls
 *  10. Participants panel and conversation settings
 *  11. Connect a phone: app passwords and the QR code
 *  12. Calls (v4, signaling v3): peers, screen sharing, raised hands, speaking
 *  13. The High-Performance Backend: external signaling, MCU calls
 *  14. Start-up
 *
 * Security rule: text from the server only ever reaches the page through
 * textContent / Text nodes (see el()); this file never assigns innerHTML.
 * No password is stored: the sign-in page's HttpOnly cookie is the session.
 */
'use strict';

(function () {
  // -------------------------------------------------------------------------
  // 1. Constants and small DOM helpers
  // -------------------------------------------------------------------------

  const SPREED = '/ocs/v2.php/apps/spreed/api';
  const V1 = SPREED + '/v1';
  const V3 = SPREED + '/v3';
  const V4 = SPREED + '/v4';
  const CLOUD = '/ocs/v2.php/cloud';
  const CORE = '/ocs/v2.php/core';
  const CHAT_WAIT_S = 30; // the server holds a chat poll this long at most
  const POLL_GRACE_MS = 20000; // a poll silent this much past its wait is dead
  const REQUEST_TIMEOUT_MS = 20000;
  const ROOMS_REFRESH_MS = 10000;
  const ROOM_REFRESH_MS = 10000;
  const BACKOFF_MAX_MS = 30000;
  const HISTORY_PAGE = 100;
  const TOKEN_RE = /^[A-Za-z0-9]{1,64}$/;
  // System messages that only change another message: applied, not shown.
  const HIDDEN_VERBS = new Set([
    'message_deleted',
    'message_edited',
    'reaction',
    'reaction_deleted',
    'reaction_revoked',
    'poll_voted',
  ]);

  const ROOM_TYPES = { 1: 'One-to-one', 2: 'Group', 3: 'Public', 4: 'Changelog', 5: 'Former one-to-one', 6: 'Note to self' };
  const PARTICIPANT_TYPES = { 1: 'Owner', 2: 'Moderator', 3: 'User', 4: 'Guest', 5: 'User via link', 6: 'Guest moderator' };
  const OWNER = 1;
  const MODERATOR = 2;
  const USER = 3;
  const GUEST_MODERATOR = 6;
  const MODERATORS = [OWNER, MODERATOR, GUEST_MODERATOR];
  const ONE_TO_ONE = 1;
  const PUBLIC = 3;
  const NOTE_TO_SELF = 6;

  const $ = (id) => document.getElementById(id);

  /** Build an element. String children become Text nodes, never markup. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'style') throw new Error('inline styles break the CSP');
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
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

  function randomHex(bytes) {
    return [...crypto.getRandomValues(new Uint8Array(bytes))].map((b) => b.toString(16).padStart(2, '0')).join('');
  }

  const darkMode = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;
  const isDark = () => Boolean(darkMode && darkMode.matches);

  /** An <img> that follows the system's dark mode (the server draws both). */
  function avatarImg(light, dark, cls, label) {
    const img = el('img', { class: 'avatar-img ' + (cls || ''), alt: label || '', loading: 'lazy', decoding: 'async' });
    img.dataset.light = light;
    img.dataset.dark = dark || light;
    img.src = isDark() ? img.dataset.dark : img.dataset.light;
    return img;
  }

  function userAvatar(userId, cls) {
    const base = `/index.php/avatar/${encodeURIComponent(userId)}/64`;
    return avatarImg(base, base + '/dark', cls);
  }

  function guestAvatar(name, cls) {
    const base = `/index.php/avatar/guest/${encodeURIComponent(name || 'Guest')}/64`;
    return avatarImg(base, base + '/dark', cls);
  }

  function roomAvatar(room, cls) {
    const base = `${V1}/room/${room.token}/avatar`;
    const v = `?v=${encodeURIComponent(room.avatarVersion || '')}`;
    return avatarImg(base + v, base + '/dark' + v, cls);
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

  /**
   * One OCS call: resolves to {status, data, headers}; rejects with ApiError
   * (the server answered with an error), NetworkError, or an AbortError.
   * `params` go into the query for GET, else into a JSON body (a FormData
   * body is sent as it is). 304 resolves with data null.
   */
  async function api(method, path, params, opts = {}) {
    const headers = { 'OCS-APIRequest': 'true', Accept: 'application/json' };
    let url = (opts.base || V4) + path;
    let body;
    if (params instanceof FormData) {
      body = params;
    } else if (params) {
      if (method === 'GET') {
        const query = new URLSearchParams();
        for (const [key, value] of Object.entries(params)) {
          if (value !== undefined && value !== null) query.append(key, String(value));
        }
        url += '?' + query.toString();
      } else {
        headers['Content-Type'] = 'application/json';
        body = JSON.stringify(params);
      }
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
      if (response.status !== 304) {
        try {
          json = await response.json();
        } catch (error) {
          if (controller.signal.aborted) throw error;
          json = null;
        }
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
    if (response.status === 304) return { status: 304, data: null, headers: response.headers };
    const ocs = json && json.ocs;
    const data = ocs ? ocs.data : json;
    if (!response.ok) {
      const message = (ocs && ocs.meta && ocs.meta.message) || (json && json.message) || response.statusText;
      throw new ApiError(response.status, message, data);
    }
    return { status: response.status, data, headers: response.headers };
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
      seconds > 0 ? `Cannot reach the server. Retrying in ${seconds} s…` : 'Cannot reach the server. Retrying…',
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
  // 4. State, signing in and out, guests, routing
  // -------------------------------------------------------------------------

  const state = {
    me: null, // {id, displayName} for a user, {guest: true, name} for a guest
    rooms: new Map(), // token -> Room of GET /api/v4/room
    search: '',
    room: null, // the open RoomSession
    roomsTimer: null,
    roomsRunning: false,
    hiddenUnread: 0, // messages that arrived while the tab was hidden
  };

  /** Test hooks: peer connections by peer session id, the open room, timings. */
  window.talkDebug = {
    peerConnections: new Map(),
    screenConnections: new Map(),
    /** Every connection the call holds: {role: peer|publisher|subscriber|screen, session, pc}. */
    connections() {
      const hpb = Boolean(state.room && state.room.hpb);
      const list = [];
      if (call.publisher) list.push({ role: 'publisher', session: call.publisher.sid, pc: call.publisher.pc });
      for (const peer of call.peers.values()) list.push({ role: hpb ? 'subscriber' : 'peer', session: peer.sid, pc: peer.pc });
      for (const peer of call.screens.values()) list.push({ role: 'screen', session: peer.sid, pc: peer.pc });
      return list;
    },
    get signalingMode() {
      return state.room ? (state.room.hpb ? 'external' : 'internal') : null;
    },
    /** Our session on the signaling server (external signaling), once it greeted us. */
    get signalingSession() {
      return state.room && state.room.hpb ? state.room.hpb.ownId : null;
    },
    notifications: [],
    timings: {},
    get sessionId() {
      return state.room ? state.room.sessionId : null;
    },
    get token() {
      return state.room ? state.room.token : null;
    },
  };

  /** Who the sign-in cookie belongs to, or null. */
  async function whoAmI() {
    try {
      const { data } = await api('GET', '/user', null, { base: CLOUD });
      return { id: data.id, displayName: data['display-name'] || data.displayname || data.id };
    } catch (error) {
      if (error.status === 401) return null;
      throw error;
    }
  }

  /**
   * Sign in through the server's sign-in form (its CSRF token comes from
   * the page, its session is an HttpOnly cookie): the password goes to the
   * server once and is kept nowhere.
   */
  async function signIn(user, password) {
    let page;
    try {
      page = await fetch('/index.php/login', { credentials: 'same-origin', cache: 'no-store' });
    } catch (error) {
      throw new NetworkError('The server is unreachable');
    }
    const doc = new DOMParser().parseFromString(await page.text(), 'text/html');
    const token = doc.querySelector('input[name=requesttoken]');
    if (token) {
      const form = new URLSearchParams({ user, password, requesttoken: token.value, redirect_url: '/' });
      let answer;
      try {
        answer = await fetch('/index.php/login', {
          method: 'POST',
          body: form,
          credentials: 'same-origin',
          cache: 'no-store',
          redirect: 'manual', // the 303 to "/" is the success
        });
      } catch (error) {
        throw new NetworkError('The server is unreachable');
      }
      if (answer.type !== 'opaqueredirect' && !answer.ok) {
        throw new ApiError(answer.status, answer.status === 429 ? 'Too many attempts; wait a minute.' : 'Wrong user name or password.');
      }
    }
    const me = await whoAmI();
    if (!me) throw new ApiError(401, 'Wrong user name or password.');
    state.me = me;
  }

  async function signOut(message) {
    const wasUser = state.me && !state.me.guest;
    closeRoom();
    clearTimeout(state.roomsTimer);
    state.roomsRunning = false;
    state.me = null;
    state.rooms = new Map();
    $('room-list').replaceChildren();
    if (wasUser) {
      await fetch('/index.php/logout', {
        method: 'POST',
        headers: { 'OCS-APIRequest': 'true' },
        credentials: 'same-origin',
        redirect: 'manual',
      }).catch(() => {});
    }
    if (location.hash && location.hash !== '#/') history.replaceState(null, '', '#/');
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
    setText('me-name', guest ? state.me.name || 'Guest' : state.me.displayName);
    const img = $('me-avatar');
    if (!guest) {
      const base = `/index.php/avatar/${encodeURIComponent(state.me.id)}/64`;
      img.dataset.light = base;
      img.dataset.dark = base + '/dark';
      img.src = isDark() ? img.dataset.dark : img.dataset.light;
    }
    img.hidden = guest;
    renderNotifyButton();
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
  const GUEST_NAME_KEY = 'talk-guest-name'; // only the chosen name is remembered

  async function showGuestJoin(token, message) {
    showView('guest');
    guestJoin.token = token;
    guestJoin.room = null;
    setText('guest-room-name', 'Loading…');
    setText('guest-error', message || '');
    show('guest-password-label', false);
    if (!$('guest-name').value) $('guest-name').value = localStorage.getItem(GUEST_NAME_KEY) || '';
    $('guest-form').querySelector('button[type=submit]').disabled = true;
    try {
      const { data } = await retrying(() => api('GET', `/room/${token}`));
      if (guestJoin.token !== token) return;
      guestJoin.room = data;
      setText('guest-room-name', data.displayName || data.name || 'Public conversation');
      show('guest-password-label', Boolean(data.hasPassword));
      $('guest-form').querySelector('button[type=submit]').disabled = false;
      (!$('guest-name').value ? $('guest-name') : data.hasPassword ? $('guest-password') : $('guest-form').querySelector('button')).focus();
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
    const name = $('guest-name').value.trim();
    const password = $('guest-password').value;
    if (!name) return setText('guest-error', 'Type the name the others will see.');
    const button = $('guest-form').querySelector('button[type=submit]');
    button.disabled = true;
    setText('guest-error', '');
    try {
      const params = room.hasPassword ? { password } : {};
      const { data } = await retrying(() => api('POST', `/room/${token}/participants/active`, params));
      state.me = { guest: true, name };
      try {
        localStorage.setItem(GUEST_NAME_KEY, name);
      } catch (error) {
        /* private mode: the name is asked again next time */
      }
      $('guest-password').value = '';
      showApp();
      openRoom(token, { room: data, sessionId: data.sessionId, password });
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
  // 5. Conversation list: avatars, unread counts, mentions, favorites, search
  // -------------------------------------------------------------------------

  async function refreshRooms() {
    clearTimeout(state.roomsTimer);
    if (!state.me || state.me.guest) {
      state.roomsRunning = false;
      return;
    }
    try {
      const { data } = await api('GET', '/room', { includeStatus: 'true' });
      state.rooms = new Map((Array.isArray(data) ? data : []).map((room) => [room.token, room]));
      renderRooms();
    } catch (error) {
      if (error instanceof NetworkError) reportDown(ROOMS_REFRESH_MS);
      else if (error.status === 401) return signOut('Please sign in again.');
    }
    clearTimeout(state.roomsTimer);
    if (state.me && !state.me.guest) state.roomsTimer = setTimeout(refreshRooms, ROOMS_REFRESH_MS);
    else state.roomsRunning = false;
  }

  function refreshRoomsSoon(ms = 50) {
    clearTimeout(state.roomsTimer);
    state.roomsTimer = setTimeout(refreshRooms, ms);
  }

  function roomName(room) {
    return room.displayName || room.name || 'Conversation';
  }

  /** One line about the newest message, as text. */
  function lastMessageLine(room) {
    const last = room.lastMessage;
    if (!last || Array.isArray(last) || !last.id) return ROOM_TYPES[room.type] || '';
    const text = renderPlain(last);
    if (last.messageType === 'system') return text;
    const mine = state.me && last.actorType === 'users' && last.actorId === state.me.id;
    return (mine ? 'You' : last.actorDisplayName || 'Guest') + ': ' + text;
  }

  function renderRooms() {
    const list = $('room-list');
    const needle = state.search.trim().toLowerCase();
    const rooms = [...state.rooms.values()]
      .filter((room) => !needle || roomName(room).toLowerCase().includes(needle) || String(room.name).toLowerCase().includes(needle))
      .sort(
        (a, b) =>
          Number(b.isFavorite) - Number(a.isFavorite) ||
          (b.lastActivity || 0) - (a.lastActivity || 0) ||
          roomName(a).localeCompare(roomName(b)),
      );
    const openToken = state.room ? state.room.token : null;
    let totalUnread = 0;
    const items = rooms.map((room) => {
      const open = room.token === openToken;
      const unread = open ? 0 : room.unreadMessages || 0;
      const mention = !open && (room.unreadMention || room.unreadMentionDirect);
      totalUnread += unread;
      const name = roomName(room);
      const labels = [name];
      if (unread) labels.push(`${unread} unread`);
      if (mention) labels.push('you were mentioned');
      if (room.hasCall) labels.push('call in progress');
      return el(
        'li',
        {
          class:
            'room-item' +
            (open ? ' active' : '') +
            (unread ? ' unread' : '') +
            (room.hasCall ? ' has-call' : '') +
            (room.isFavorite ? ' favorite' : ''),
          'data-testid': 'room-item',
          'data-token': room.token,
          'data-unread': unread,
          'data-favorite': room.isFavorite ? 'true' : 'false',
        },
        el(
          'a',
          { href: roomHash(room.token), class: 'room-link', 'aria-label': labels.join(', '), 'aria-current': open ? 'true' : null },
          roomAvatar(room, 'type-' + room.type),
          el(
            'span',
            { class: 'room-info' },
            el(
              'span',
              { class: 'room-name', 'data-testid': 'room-name' },
              room.isFavorite ? el('span', { class: 'fav-star', 'aria-hidden': 'true' }, '★ ') : null,
              name,
            ),
            el('span', { class: 'room-sub', 'data-testid': 'room-last-message' }, lastMessageLine(room)),
          ),
          el(
            'span',
            { class: 'room-badges-list' },
            room.hasCall ? el('span', { class: 'call-badge', 'data-testid': 'call-badge', title: 'Call in progress' }, '📞') : null,
            mention ? el('span', { class: 'badge mention', 'data-testid': 'mention-badge', title: 'You were mentioned' }, '@') : null,
            unread
              ? el('span', { class: 'badge', 'data-testid': 'unread-badge', title: `${unread} unread` }, unread > 99 ? '99+' : String(unread))
              : null,
          ),
        ),
        room.hasCall && !open
          ? el(
              'button',
              {
                type: 'button',
                class: 'small primary join-from-list',
                'data-testid': 'list-call-join',
                onclick: () => {
                  pendingCallJoin = room.token;
                  location.hash = roomHash(room.token);
                },
              },
              'Join call',
            )
          : null,
      );
    });
    list.replaceChildren(...items);
    show('room-list-empty', state.rooms.size === 0);
    updateTitle(totalUnread);
  }

  let pendingCallJoin = null; // "Join call" in the list: join once the room is open

  function updateTitle(otherUnread) {
    const count = (otherUnread || 0) + state.hiddenUnread;
    const name = state.room && state.room.room ? roomName(state.room.room) : 'Talk';
    document.title = (count ? `(${count}) ` : '') + name + (name === 'Talk' ? '' : ' · Talk');
  }

  // -------------------------------------------------------------------------
  // 6. Creating conversations, user search
  // -------------------------------------------------------------------------

  /**
   * A combobox of users from /core/autocomplete/get under `input`; `pick`
   * gets the chosen {id, label}. Arrow keys move, Enter picks, Escape closes.
   */
  function userCombo(input, listbox, { enabled, pick, itemType }) {
    let items = [];
    let active = -1;
    let seq = 0;
    let shown = '';
    const close = () => {
      shown = '';
      listbox.hidden = true;
      listbox.replaceChildren();
      input.setAttribute('aria-expanded', 'false');
      input.removeAttribute('aria-activedescendant');
      items = [];
      active = -1;
    };
    const render = () => {
      // The same suggestions again (a slower answer to an earlier keystroke):
      // keep the nodes, so a pointer on one is not pulled away.
      const key = items.map((item) => item.id).join('\n') + '|' + active;
      if (key === shown && !listbox.hidden) return;
      shown = key;
      listbox.replaceChildren(
        ...items.map((item, i) =>
          el(
            'li',
            {
              id: `${listbox.id}-${i}`,
              role: 'option',
              class: 'suggestion' + (i === active ? ' active' : ''),
              'aria-selected': i === active ? 'true' : 'false',
              'data-testid': 'user-suggestion',
              'data-id': item.id,
              onmousedown: (event) => {
                event.preventDefault();
                choose(i);
              },
            },
            userAvatar(item.id, 'tiny'),
            el('span', null, item.label),
            el('span', { class: 'muted small' }, item.id),
          ),
        ),
      );
      listbox.hidden = items.length === 0;
      input.setAttribute('aria-expanded', String(items.length > 0));
      if (active >= 0) input.setAttribute('aria-activedescendant', `${listbox.id}-${active}`);
    };
    const choose = (i) => {
      const item = items[i];
      close();
      if (item) pick(item);
    };
    input.addEventListener('input', async () => {
      if (!enabled()) return close();
      const search = input.value.trim();
      const mine = ++seq;
      if (!search) return close();
      try {
        const params = { search, limit: 8, 'shareTypes[]': 0 };
        const extra = itemType ? itemType() : null;
        if (extra) Object.assign(params, { itemType: 'call', itemId: extra });
        const { data } = await api('GET', '/autocomplete/get', params, { base: CORE });
        if (mine !== seq) return;
        items = (Array.isArray(data) ? data : []).filter((item) => item.source === 'users');
        active = items.length ? 0 : -1;
        render();
      } catch (error) {
        if (mine === seq) close();
      }
    });
    input.addEventListener('keydown', (event) => {
      if (listbox.hidden) return;
      if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
        event.preventDefault();
        active = (active + (event.key === 'ArrowDown' ? 1 : -1) + items.length) % items.length;
        render();
      } else if (event.key === 'Enter' && active >= 0) {
        event.preventDefault();
        choose(active);
      } else if (event.key === 'Escape') {
        close();
      }
    });
    // Closed a moment after focus leaves (a click on a suggestion lands first),
    // unless focus came back meanwhile.
    input.addEventListener('blur', () => setTimeout(() => document.activeElement !== input && close(), 150));
    return { close };
  }

  async function createRoom(event) {
    if (event) event.preventDefault();
    const type = Number($('new-room-type').value);
    const value = $('new-room-name').value.trim();
    setText('new-room-error', '');
    if (type === ONE_TO_ONE && !value) return setText('new-room-error', 'Type the user name of the person to talk to.');
    if ((type === 2 || type === PUBLIC) && !value) return setText('new-room-error', 'Give the conversation a name.');
    let params;
    if (type === ONE_TO_ONE) params = { roomType: 1, invite: value, source: 'users' };
    else if (type === NOTE_TO_SELF) params = { roomType: 6, roomName: value || 'Note to self' };
    else params = { roomType: type, roomName: value };
    try {
      const { data } = await api('POST', '/room', params);
      $('new-room-name').value = '';
      state.rooms.set(data.token, data);
      refreshRoomsSoon();
      location.hash = roomHash(data.token);
    } catch (error) {
      if (error.status === 404) setText('new-room-error', `No user "${value}".`);
      else if (error.status === 403) setText('new-room-error', 'You cannot start that conversation.');
      else setText('new-room-error', `Could not create: ${error.message}`);
    }
  }

  function updateNewRoomPlaceholder() {
    const type = $('new-room-type').value;
    const input = $('new-room-name');
    input.placeholder = { 1: 'Search a user', 6: 'Note to self' }[type] || 'Conversation name';
    input.setAttribute('aria-label', type === '1' ? 'User to talk to' : 'Conversation name');
  }

  // -------------------------------------------------------------------------
  // 7. An open conversation: join, chat long-poll, signaling long-poll
  // -------------------------------------------------------------------------

  class RoomSession {
    constructor(token) {
      this.token = token;
      this.alive = true;
      this.abort = new AbortController();
      this.room = null; // the Room (v4)
      this.sessionId = null;
      this.password = '';
      this.messages = new Map(); // id -> {message, node}
      this.pending = new Map(); // referenceId -> node
      this.oldestId = 0;
      this.newestId = 0;
      this.historyLoaded = false;
      this.historyDone = false;
      this.loadingOlder = null;
      this.lastReadAtOpen = 0;
      this.dividerShown = false;
      this.replyTo = null; // message being answered
      this.editing = null; // message being edited
      this.polls = new Map(); // poll id -> poll state
      this.users = []; // the latest usersInRoom
      this.usersKey = '';
      this.participants = [];
      this.participantsPending = null;
      this.inCall = false;
      this.outbox = [];
      this.sending = false;
      this.recovering = null;
      this.lastRecovery = 0;
      this.timers = [];
      this.hands = new Map(); // session id -> raised?
      this.settings = null; // signaling settings v3, as the room opened
      this.hpb = null; // the signaling server's connection (external signaling), or null
    }

    get signal() {
      return this.abort.signal;
    }

    get isModerator() {
      return Boolean(this.room && MODERATORS.includes(this.room.participantType));
    }

    get isGuest() {
      return Boolean(state.me && state.me.guest);
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
    const started = performance.now();
    const rs = new RoomSession(token);
    state.room = rs;
    if (location.hash !== roomHash(token)) history.replaceState(null, '', roomHash(token));
    document.body.classList.add('in-room');
    show('room-placeholder', false);
    show('room-main', true);
    $('message-list').replaceChildren();
    delete $('message-list').dataset.ready;
    const known = pre.room || state.rooms.get(token);
    setText('room-title', known ? roomName(known) : '…');
    show('room-avatar', false);
    $('room-badges').replaceChildren();
    show('room-notice', false);
    setText('send-error', '');
    cancelReply();
    cancelEdit();
    $('participant-list').replaceChildren();
    renderRooms();
    try {
      if (pre.sessionId) {
        rs.room = pre.room;
        rs.sessionId = pre.sessionId;
        rs.password = pre.password || '';
      } else {
        await joinRoom(rs);
      }
      window.talkDebug.timings.joinedAt = performance.now();
      if (!rs.alive) return;
      rs.lastReadAtOpen = rs.room.lastReadMessage || 0;
      renderRoomHeader(rs);
      // Internal or external signaling: asked for while the history loads.
      const settings = loadSignalingSettings(rs);
      await loadHistory(rs);
      rs.settings = await settings;
    } catch (error) {
      if (!rs.alive) return;
      if (isAbort(error)) {
        rs.sessionId = null;
        return roomGone(rs, 'You did not join the conversation.');
      }
      return roomGone(
        rs,
        error.status === 404 ? 'That conversation does not exist, or you are not in it.' : `Could not open the conversation: ${error.message}`,
      );
    }
    if (!rs.alive) return;
    window.talkDebug.timings.openRoomMs = Math.round(performance.now() - started);
    $('message-input').focus({ preventScroll: true });
    chatLoop(rs);
    if (isExternal(rs.settings)) hpbStart(rs, rs.settings);
    else signalingLoop(rs);
    // No ping route (no-ping): the chat and signaling polls keep the session alive.
    rs.timers.push(setInterval(() => refreshRoom(rs), ROOM_REFRESH_MS));
    refreshParticipants(rs);
    // The future poll moves the read marker; the list hears of it soon after.
    if (!rs.isGuest) refreshRoomsSoon(800);
    if (pendingCallJoin === token) {
      pendingCallJoin = null;
      joinCall();
    }
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
    show('room-main', false);
    show('room-placeholder', true);
    show('participants', false);
    hideReactionPicker();
    $('participants-toggle').setAttribute('aria-expanded', 'false');
    state.hiddenUnread = 0;
    renderRooms();
  }

  /** The room went away for us (deleted, or we were removed). */
  function roomGone(rs, message) {
    if (state.room !== rs) return;
    // Our own polls see the room go (404) and may answer before our own
    // DELETE does: what we did is what we are told.
    if (rs.deleting) message = 'The conversation was deleted.';
    else if (rs.leaving) message = 'You left the conversation.';
    const guest = rs.isGuest;
    closeRoom();
    if (guest) {
      state.me = null;
      showGuestJoin(rs.token, message);
      return;
    }
    state.rooms.delete(rs.token);
    toast(message);
    refreshRoomsSoon();
    if (location.hash !== '#/') history.replaceState(null, '', '#/');
  }

  /** POST participants/active; users who need the room password are asked for it. */
  async function joinRoom(rs) {
    let password = rs.password;
    for (;;) {
      try {
        const params = password ? { password } : {};
        const { data } = await retrying(
          () => api('POST', `/room/${rs.token}/participants/active`, params, { signal: rs.signal }),
          rs.signal,
        );
        rs.room = data;
        rs.sessionId = data.sessionId;
        rs.password = password;
        hideNotice();
        return rs.sessionId;
      } catch (error) {
        if (error.status !== 403 || !rs.alive || rs.isGuest) throw error;
        password = await askRoomPassword(rs, Boolean(password));
        if (password === null) throw new DOMException('Cancelled', 'AbortError');
      }
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

  function hideNotice() {
    $('room-notice').replaceChildren();
    show('room-notice', false);
  }

  /**
   * The server no longer knows our session (404 on chat or signaling):
   * guests expire after a while unseen. Re-join once, or declare the room gone.
   */
  function recoverSession(rs) {
    if (rs.recovering) return rs.recovering;
    rs.recovering = (async () => {
      const since = Date.now() - rs.lastRecovery;
      if (since < 3000) await sleep(3000 - since, rs.signal);
      rs.lastRecovery = Date.now();
      try {
        const wasInCall = rs.inCall;
        if (wasInCall) closeAllPeers();
        await joinRoom(rs);
        renderRoomHeader(rs);
        if (rs.hpb) hpbReconnect(rs); // the signaling server joins the new session
        if (wasInCall) await api('POST', `/call/${rs.token}`, { flags: callFlags() }, { signal: rs.signal });
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

  /** Handle a loop's failure: back off on network errors, recover on 404. */
  async function loopFailed(rs, error, failures) {
    if (!rs.alive || isAbort(error)) return false;
    if (error instanceof NetworkError) {
      const ms = backoffMs(failures);
      reportDown(ms);
      await sleep(ms, rs.signal);
      return rs.alive;
    }
    if (error.status === 401 && !rs.isGuest) {
      signOut('Please sign in again.');
      return false;
    }
    if (error.status === 404) return recoverSession(rs);
    if (error.status === 412) {
      $('room-notice').replaceChildren('The conversation has not opened yet: waiting in the lobby…');
      show('room-notice', true);
      await sleep(5000, rs.signal);
      return rs.alive;
    }
    await sleep(backoffMs(failures), rs.signal);
    return rs.alive;
  }

  /** The newest page of history, newest first from the server. */
  async function loadHistory(rs) {
    const { status, data, headers } = await retrying(
      () =>
        api(
          'GET',
          `/chat/${rs.token}`,
          { lookIntoFuture: 0, limit: HISTORY_PAGE, lastKnownMessageId: 0, setReadMarker: 0 },
          { base: V1, signal: rs.signal },
        ),
      rs.signal,
    );
    if (!rs.alive) return;
    window.talkDebug.timings.historyAt = performance.now();
    const batch = status === 304 || !Array.isArray(data) ? [] : data.slice().reverse();
    const given = Number(headers.get('X-Chat-Last-Given')) || 0;
    if (batch.length < HISTORY_PAGE) rs.historyDone = true;
    addMessages(rs, batch, { initial: true });
    if (given) rs.oldestId = rs.oldestId ? Math.min(rs.oldestId, given) : given;
    rs.historyLoaded = true;
    $('message-list').dataset.ready = 'true';
    window.talkDebug.timings.readyAt = performance.now();
  }

  /** Scrolled to the top: one more page of older messages. */
  function loadOlder(rs) {
    if (rs.historyDone || !rs.oldestId || rs.loadingOlder) return rs.loadingOlder;
    rs.loadingOlder = (async () => {
      try {
        const { status, data, headers } = await api(
          'GET',
          `/chat/${rs.token}`,
          { lookIntoFuture: 0, limit: HISTORY_PAGE, lastKnownMessageId: rs.oldestId, setReadMarker: 0 },
          { base: V1, signal: rs.signal },
        );
        if (!rs.alive) return;
        const batch = status === 304 || !Array.isArray(data) ? [] : data.slice().reverse();
        if (batch.length < HISTORY_PAGE) rs.historyDone = true;
        const given = Number(headers.get('X-Chat-Last-Given')) || 0;
        if (given) rs.oldestId = Math.min(rs.oldestId, given);
        addMessages(rs, batch, { older: true });
      } catch (error) {
        /* the next scroll tries again */
      } finally {
        rs.loadingOlder = null;
      }
    })();
    return rs.loadingOlder;
  }

  /** Long-poll GET /chat/{token} with lookIntoFuture=1 after the newest id. */
  async function chatLoop(rs) {
    let failures = 0;
    while (rs.alive) {
      try {
        const { status, data } = await api(
          'GET',
          `/chat/${rs.token}`,
          {
            lookIntoFuture: 1,
            lastKnownMessageId: rs.newestId,
            timeout: CHAT_WAIT_S,
            limit: HISTORY_PAGE,
            setReadMarker: document.hidden ? 0 : 1,
            includeLastKnown: 0,
          },
          { base: V1, signal: rs.signal, timeoutMs: CHAT_WAIT_S * 1000 + POLL_GRACE_MS },
        );
        failures = 0;
        if (!rs.alive) return;
        if (status !== 304 && Array.isArray(data) && data.length) {
          addMessages(rs, data, {});
        }
      } catch (error) {
        if (!(await loopFailed(rs, error, ++failures))) return;
      }
    }
  }

  /** Long-poll GET /api/v3/signaling/{token}: call offers and answers, and who is here. */
  async function signalingLoop(rs) {
    let failures = 0;
    while (rs.alive) {
      try {
        const { data } = await api('GET', `/signaling/${rs.token}`, null, {
          base: V3,
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
        // 409: our session ended (another join replaced it): join again.
        if (error.status === 409 && rs.alive) error.status = 404;
        if (!(await loopFailed(rs, error, ++failures))) return;
      }
    }
  }

  async function refreshRoom(rs) {
    if (!rs.alive || rs.recovering) return;
    try {
      const { data } = await api('GET', `/room/${rs.token}`, null, { signal: rs.signal });
      if (!rs.alive) return;
      rs.room = data;
      if (!rs.isGuest) state.rooms.set(rs.token, data);
      renderRoomHeader(rs);
      if (!$('participants').hidden) refreshParticipants(rs);
    } catch (error) {
      if (!rs.alive || isAbort(error) || error instanceof NetworkError) return;
      if (error.status === 404) recoverSession(rs);
    }
  }

  function usersInRoom(rs, users) {
    rs.users = users;
    const key = users
      .map((user) => `${user.sessionId}:${Number(user.inCall)}`)
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
    setText('room-title', roomName(room));
    const img = $('room-avatar');
    const fresh = roomAvatar(room);
    img.dataset.light = fresh.dataset.light;
    img.dataset.dark = fresh.dataset.dark;
    if (img.getAttribute('src') !== fresh.getAttribute('src')) img.src = fresh.src;
    img.hidden = false;
    const badges = [el('span', { class: `chip type-${room.type}`, 'data-testid': 'room-type' }, ROOM_TYPES[room.type] || '')];
    if (room.hasPassword) badges.push(el('span', { class: 'chip', title: 'Guests need a password' }, 'password'));
    if (room.readOnly) badges.push(el('span', { class: 'chip', 'data-testid': 'read-only-chip' }, 'read-only'));
    if (room.lobbyState) badges.push(el('span', { class: 'chip' }, 'lobby'));
    $('room-badges').replaceChildren(...badges);
    setText('room-description', room.description || '');
    show('room-description', Boolean(room.description));
    const guest = rs.isGuest;
    show('room-settings', !guest);
    show('room-favorite', !guest);
    $('room-favorite').setAttribute('aria-pressed', String(Boolean(room.isFavorite)));
    $('room-favorite').textContent = room.isFavorite ? '★' : '☆';
    $('room-favorite').title = room.isFavorite ? 'Remove from favorites' : 'Add to favorites';
    setText('leave-room', guest ? 'Leave conversation' : 'Leave conversation for good');
    show('leave-room', guest || room.canLeaveConversation);
    show('add-participant-form', rs.isModerator && room.type !== ONE_TO_ONE && room.type !== NOTE_TO_SELF);
    show('poll-open', room.type !== ONE_TO_ONE);
    const canChat = !room.readOnly && (room.permissions & 128) !== 0;
    $('message-input').disabled = !canChat;
    $('message-input').placeholder = canChat
      ? 'Write a message… (Enter sends, Shift+Enter: new line, @ mentions)'
      : 'This conversation is read-only.';
    renderCallButton(rs);
    updateTitle(0);
    if ($('settings-dialog').open) fillSettings(rs);
  }

  function renderCallButton(rs) {
    const others = rs.users.filter((user) => Number(user.inCall) & 1 && user.sessionId !== rs.sessionId).length;
    const canCall = !rs.room || rs.room.type !== NOTE_TO_SELF;
    show('call-join', !rs.inCall && canCall);
    show('call-leave', rs.inCall);
    setText('call-join', others ? `Join call (${others})` : 'Start call');
    $('call-join').classList.toggle('pulse', others > 0 && !rs.inCall);
    setText('participant-count', String(rs.users.length || ''));
  }

  // -------------------------------------------------------------------------
  // 8. Chat rendering (always as text, never as HTML)
  // -------------------------------------------------------------------------

  function myActor(rs) {
    if (rs.room && rs.room.actorType) return { type: rs.room.actorType, id: rs.room.actorId };
    if (state.me && !state.me.guest) return { type: 'users', id: state.me.id };
    return { type: '', id: '' };
  }

  function isMine(rs, message) {
    const me = myActor(rs);
    return message.actorType === me.type && message.actorId === me.id;
  }

  function authorName(message) {
    if (message.actorType === 'guests') return message.actorDisplayName ? `${message.actorDisplayName} (guest)` : 'Guest';
    if (message.actorType === 'bots') return message.actorDisplayName || 'Bot';
    return message.actorDisplayName || message.actorId || 'Unknown';
  }

  function params(message) {
    const p = message.messageParameters;
    return p && !Array.isArray(p) && typeof p === 'object' ? p : {};
  }

  function isMentionOfMe(rs, parameter) {
    if (!parameter || !state.me) return false;
    const me = myActor(rs);
    if (parameter.type === 'user') return me.type === 'users' && parameter.id === me.id;
    if (parameter.type === 'guest') return me.type === 'guests' && parameter.id === `guest/${me.id}`;
    if (parameter.type === 'call') return true; // @all
    return false;
  }

  /** The message's text with its {placeholders} as nodes: mentions as chips. */
  function renderRich(rs, message) {
    const text = String(message.message ?? '');
    const p = params(message);
    const parts = [];
    let last = 0;
    const re = /\{([A-Za-z0-9_-]+)\}/g;
    let match;
    while ((match = re.exec(text))) {
      const parameter = p[match[1]];
      if (!parameter) continue;
      if (match.index > last) parts.push(text.slice(last, match.index));
      const name = String(parameter.name || parameter.id || '');
      if (/^mention-/.test(match[1])) {
        parts.push(
          el(
            'span',
            {
              class: 'mention' + (isMentionOfMe(rs, parameter) ? ' mention-self' : ''),
              'data-testid': 'mention',
              'data-id': parameter.id,
            },
            '@' + name,
          ),
        );
      } else {
        parts.push(el('strong', { class: 'param' }, name));
      }
      last = match.index + match[0].length;
    }
    if (last < text.length) parts.push(text.slice(last));
    return parts;
  }

  /** The message as one plain line (for the list, quotes and notifications). */
  function renderPlain(message) {
    const p = params(message);
    return String(message.message ?? '').replace(/\{([A-Za-z0-9_-]+)\}/g, (whole, key) => {
      const parameter = p[key];
      if (!parameter) return whole;
      const name = String(parameter.name || parameter.id || '');
      return /^mention-/.test(key) ? '@' + name : name;
    });
  }

  function pollOf(message) {
    const object = params(message).object;
    return object && object.type === 'talk-poll' ? object : null;
  }

  /** Build the <li> of a comment, a deleted comment or a system message. */
  function messageNode(rs, message) {
    const date = new Date((message.timestamp || 0) * 1000);
    if (message.messageType === 'system') {
      return el(
        'li',
        { class: 'system', 'data-testid': 'system-message', 'data-id': message.id, 'data-verb': message.systemMessage, 'data-ts': message.timestamp },
        el('span', { class: 'system-text' }, ...renderRich(rs, message)),
        el('time', { datetime: date.toISOString(), title: date.toLocaleString() }, fmtTime(date)),
      );
    }
    const mine = isMine(rs, message);
    const deleted = message.messageType === 'comment_deleted';
    const mentionsMe = Object.entries(params(message)).some(([key, value]) => /^mention-/.test(key) && isMentionOfMe(rs, value));
    const node = el('li', {
      class: 'message' + (mine ? ' mine' : '') + (deleted ? ' deleted' : '') + (mentionsMe ? ' mentions-me' : ''),
      'data-testid': 'message',
      'data-id': message.id,
      'data-actor': `${message.actorType}/${message.actorId}`,
      'data-ts': message.timestamp,
      'data-reference-id': message.referenceId || null,
    });
    const avatar =
      message.actorType === 'users'
        ? userAvatar(message.actorId, 'msg-avatar')
        : guestAvatar(message.actorDisplayName || 'Guest', 'msg-avatar');
    const meta = el(
      'div',
      { class: 'meta' },
      el('span', { class: 'author', 'data-testid': 'message-author' }, authorName(message)),
      el('time', { datetime: date.toISOString(), title: date.toLocaleString() }, fmtTime(date)),
      message.lastEditTimestamp && !deleted ? el('span', { class: 'edited muted small', 'data-testid': 'edited' }, '(edited)') : null,
    );
    const body = [];
    const parent = message.parent && !Array.isArray(message.parent) ? message.parent : null;
    if (parent && !deleted) {
      body.push(
        el(
          'button',
          {
            type: 'button',
            class: 'quote',
            'data-testid': 'reply-quote',
            'data-parent': parent.id,
            title: 'Show the original message',
            onclick: () => jumpTo(rs, parent.id),
          },
          parent.deleted
            ? el('span', { class: 'muted' }, 'Message deleted')
            : [el('strong', null, authorName(parent)), el('span', { class: 'quote-text' }, renderPlain(parent))],
        ),
      );
    }
    const poll = !deleted && pollOf(message);
    if (deleted) {
      body.push(el('div', { class: 'text muted', 'data-testid': 'message-text' }, 'Message deleted'));
    } else if (poll) {
      body.push(pollCard(rs, poll.id, poll.name));
    } else {
      body.push(el('div', { class: 'text', 'data-testid': 'message-text' }, ...renderRich(rs, message)));
    }
    const reactions = !deleted ? reactionBar(rs, message) : null;
    node.append(avatar, el('div', { class: 'bubble' }, meta, ...body, reactions), deleted ? '' : messageActions(rs, message, mine));
    return node;
  }

  function reactionBar(rs, message) {
    const counts = message.reactions && !Array.isArray(message.reactions) ? message.reactions : {};
    const own = new Set(Array.isArray(message.reactionsSelf) ? message.reactionsSelf : []);
    const entries = Object.entries(counts).filter(([, count]) => count > 0);
    if (!entries.length) return null;
    return el(
      'div',
      { class: 'reactions', 'data-testid': 'reactions' },
      ...entries.map(([emoji, count]) =>
        el(
          'button',
          {
            type: 'button',
            class: 'reaction' + (own.has(emoji) ? ' own' : ''),
            'data-testid': 'reaction',
            'data-emoji': emoji,
            'aria-pressed': own.has(emoji) ? 'true' : 'false',
            'aria-label': `${emoji} ${count}${own.has(emoji) ? ', yours' : ''}`,
            onclick: () => toggleReaction(rs, message.id, emoji),
          },
          `${emoji} ${count}`,
        ),
      ),
    );
  }

  function messageActions(rs, message, mine) {
    const canWrite = rs.room && !rs.room.readOnly;
    const buttons = [];
    const button = (action, label, handler, text) =>
      el('button', { type: 'button', class: 'ghost small', 'data-action': action, 'aria-label': label, title: label, onclick: handler }, text);
    if (message.isReplyable && canWrite) buttons.push(button('reply', 'Reply', () => startReply(rs, message.id), '↩'));
    if (canWrite) buttons.push(button('react', 'React', (event) => showReactionPicker(rs, message.id, event.currentTarget), '☺'));
    const poll = pollOf(message);
    if (mine && canWrite && !poll) buttons.push(button('edit', 'Edit', () => startEdit(rs, message.id), '✎'));
    const moderatorMayDelete = rs.isModerator && rs.room.type !== ONE_TO_ONE;
    if ((mine || moderatorMayDelete) && canWrite && !poll) {
      buttons.push(button('delete', 'Delete', (event) => confirmClick(event.currentTarget, 'Delete?', () => deleteMessage(rs, message.id)), '🗑'));
    }
    return el('div', { class: 'actions', role: 'toolbar', 'aria-label': 'Message actions' }, ...buttons);
  }

  /**
   * Put messages into the list: new ids are inserted in id order, known ids
   * are redrawn, pending bubbles are swapped by referenceId, and system
   * messages that change another message apply their `parent`.
   */
  function addMessages(rs, batch, { initial = false, older = false } = {}) {
    if (!batch.length) return;
    const list = $('message-list');
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 150;
    const previousHeight = list.scrollHeight;
    const previousTop = list.scrollTop;
    let arrived = [];
    const fragment = document.createDocumentFragment();
    const appendAtEnd = !older;
    for (const message of batch) {
      if (!message || typeof message.id !== 'number') continue;
      if (message.messageType === 'system' && message.parent && !Array.isArray(message.parent) && !older) {
        updateMessage(rs, message.parent);
      }
      if (message.messageType === 'system' && (message.systemMessage === 'poll_voted' || message.systemMessage === 'poll_closed')) {
        const poll = params(message).poll;
        if (poll) refreshPoll(rs, poll.id);
      }
      if (rs.messages.has(message.id)) continue;
      rs.newestId = Math.max(rs.newestId, message.id);
      rs.oldestId = rs.oldestId ? Math.min(rs.oldestId, message.id) : message.id;
      if (message.messageType === 'system' && HIDDEN_VERBS.has(message.systemMessage)) {
        rs.messages.set(message.id, { message, node: null });
        continue;
      }
      const node = messageNode(rs, message);
      rs.messages.set(message.id, { message, node });
      const pending = message.referenceId && rs.pending.get(message.referenceId);
      if (pending) {
        rs.pending.delete(message.referenceId);
        pending.replaceWith(node);
        continue;
      }
      if (
        !initial &&
        !older &&
        !rs.dividerShown &&
        document.hidden &&
        message.messageType !== 'system' &&
        !isMine(rs, message)
      ) {
        fragment.append(newDivider());
        rs.dividerShown = true;
      }
      if (initial && !rs.dividerShown && rs.lastReadAtOpen && message.id > rs.lastReadAtOpen && message.messageType !== 'system' && !isMine(rs, message)) {
        fragment.append(newDivider());
        rs.dividerShown = true;
      }
      fragment.append(node);
      if (!initial && !older) arrived.push(message);
    }
    if (appendAtEnd) {
      // Pending bubbles stay last: real messages go in before them.
      const firstPending = list.querySelector('li.pending');
      if (firstPending) list.insertBefore(fragment, firstPending);
      else list.append(fragment);
    } else {
      list.prepend(fragment);
    }
    relayout(list);
    if (older) {
      list.scrollTop = previousTop + (list.scrollHeight - previousHeight);
    } else if (initial) {
      const divider = list.querySelector('.unread-divider');
      if (divider) divider.scrollIntoView({ block: 'center' });
      else list.scrollTop = list.scrollHeight;
    } else if (nearBottom || arrived.some((m) => isMine(rs, m))) {
      list.scrollTop = list.scrollHeight;
    }
    arrived = arrived.filter((m) => m.messageType !== 'system' && !isMine(rs, m));
    if (arrived.length && document.hidden) {
      state.hiddenUnread += arrived.length;
      updateTitle(0);
      for (const message of arrived) maybeNotify(rs, message);
    }
  }

  function newDivider() {
    return el('li', { class: 'unread-divider', 'data-testid': 'unread-divider', role: 'separator' }, el('span', null, 'New messages'));
  }

  /** Day separators and "continued" grouping, recomputed over the list. */
  function relayout(list) {
    for (const old of list.querySelectorAll(':scope > li.day')) old.remove();
    let lastDay = null;
    let previous = null;
    for (const node of [...list.children]) {
      if (node.classList.contains('unread-divider')) {
        previous = null;
        continue;
      }
      const ts = Number(node.dataset.ts || 0);
      const date = new Date(ts * 1000);
      const day = date.toDateString();
      if (ts && day !== lastDay) {
        node.before(el('li', { class: 'day', role: 'separator' }, dayLabel(date)));
        lastDay = day;
        previous = null;
      }
      if (node.classList.contains('message')) {
        const continued = previous && previous.dataset.actor === node.dataset.actor && ts - Number(previous.dataset.ts) < 300;
        node.classList.toggle('continued', Boolean(continued));
        previous = node;
      } else {
        previous = null;
      }
    }
  }

  /** Redraw a message we show (an edit, a delete, a reaction count). */
  function updateMessage(rs, message) {
    const known = rs.messages.get(message.id);
    if (!known || !known.node) return;
    const merged = { ...known.message, ...message };
    if (!('reactionsSelf' in message)) merged.reactionsSelf = known.message.reactionsSelf;
    if (!('parent' in message) && known.message.parent) merged.parent = known.message.parent;
    const node = messageNode(rs, merged);
    node.className = known.node.className.includes('continued') ? node.className + ' continued' : node.className;
    known.node.replaceWith(node);
    rs.messages.set(message.id, { message: merged, node });
    // Replies quote it: their quotes follow the edit or the delete.
    if ('message' in message || 'messageType' in message) {
      for (const other of rs.messages.values()) {
        const parent = other.message.parent;
        if (other.node && parent && !Array.isArray(parent) && parent.id === message.id) {
          const quote = merged.messageType === 'comment_deleted' ? { id: merged.id, deleted: true } : { ...merged, parent: undefined };
          updateMessage(rs, { id: other.message.id, parent: quote });
        }
      }
    }
  }

  async function jumpTo(rs, id) {
    for (let page = 0; page < 20 && !rs.messages.has(id) && !rs.historyDone; page++) await loadOlder(rs);
    const known = rs.messages.get(id);
    if (!known || !known.node) return toast('The original message is not there any more.');
    known.node.scrollIntoView({ block: 'center', behavior: 'smooth' });
    known.node.classList.add('highlight');
    known.node.tabIndex = -1;
    known.node.focus({ preventScroll: true });
    setTimeout(() => known.node.classList.remove('highlight'), 2000);
  }

  // Reactions

  let pickerFor = null;

  function showReactionPicker(rs, messageId, anchor) {
    const picker = $('reaction-picker');
    if (!picker.hidden && pickerFor === messageId) return hideReactionPicker();
    pickerFor = messageId;
    const rect = anchor.getBoundingClientRect();
    picker.hidden = false;
    const width = picker.offsetWidth;
    picker.style.left = Math.max(8, Math.min(window.innerWidth - width - 8, rect.left - width / 2)) + 'px';
    picker.style.top = Math.max(8, rect.top - picker.offsetHeight - 6) + 'px';
    picker.querySelector('button').focus();
  }

  function hideReactionPicker() {
    $('reaction-picker').hidden = true;
    pickerFor = null;
  }

  async function toggleReaction(rs, messageId, emoji) {
    const known = rs.messages.get(messageId);
    if (!known) return;
    const own = new Set(Array.isArray(known.message.reactionsSelf) ? known.message.reactionsSelf : []);
    const remove = own.has(emoji);
    try {
      const { data } = await api(remove ? 'DELETE' : 'POST', `/reaction/${rs.token}/${messageId}`, { reaction: emoji }, { base: V1, signal: rs.signal });
      const me = myActor(rs);
      const counts = {};
      const mine = [];
      for (const [key, actors] of Object.entries(data && !Array.isArray(data) ? data : {})) {
        counts[key] = actors.length;
        if (actors.some((a) => a.actorType === me.type && a.actorId === me.id)) mine.push(key);
      }
      updateMessage(rs, { id: messageId, reactions: counts, reactionsSelf: mine });
    } catch (error) {
      if (!isAbort(error)) toast(`Could not react: ${error.message}`);
    }
  }

  async function deleteMessage(rs, messageId) {
    try {
      const { data } = await api('DELETE', `/chat/${rs.token}/${messageId}`, null, { base: V1, signal: rs.signal });
      if (data && data.parent) updateMessage(rs, data.parent);
    } catch (error) {
      if (!isAbort(error)) toast(`Could not delete: ${error.message}`);
    }
  }

  // Polls

  function pollCard(rs, pollId, question) {
    const card = el(
      'div',
      { class: 'poll', 'data-testid': 'poll', 'data-poll': pollId },
      el('p', { class: 'poll-question' }, '📊 ', question || 'Poll'),
      el('div', { class: 'poll-body muted small' }, 'Loading…'),
    );
    const known = rs.polls.get(String(pollId));
    if (known) setTimeout(() => renderPoll(rs, known), 0);
    else refreshPoll(rs, pollId);
    return card;
  }

  async function refreshPoll(rs, pollId) {
    try {
      const { data } = await api('GET', `/poll/${rs.token}/${pollId}`, null, { base: V1, signal: rs.signal });
      rs.polls.set(String(pollId), data);
      renderPoll(rs, data);
    } catch (error) {
      /* shown as loading until the next vote arrives */
    }
  }

  function renderPoll(rs, poll) {
    for (const card of $('message-list').querySelectorAll(`.poll[data-poll="${Number(poll.id)}"]`)) {
      const voted = Array.isArray(poll.votedSelf) && poll.votedSelf.length > 0;
      const closed = poll.status === 1;
      const votes = poll.votes && !Array.isArray(poll.votes) ? poll.votes : {};
      const total = Object.values(votes).reduce((a, b) => a + b, 0);
      const multiple = poll.maxVotes !== 1;
      const body = el('div', { class: 'poll-body' });
      if (!voted && !closed) {
        const form = el('form', {
          class: 'poll-form',
          onsubmit: async (event) => {
            event.preventDefault();
            const chosen = [...form.querySelectorAll('input:checked')].map((input) => Number(input.value));
            if (!chosen.length) return;
            try {
              const { data } = await api('POST', `/poll/${rs.token}/${poll.id}`, { optionIds: chosen }, { base: V1, signal: rs.signal });
              rs.polls.set(String(poll.id), data);
              renderPoll(rs, data);
            } catch (error) {
              if (!isAbort(error)) toast(`Could not vote: ${error.message}`);
            }
          },
        });
        const name = `poll-${poll.id}-${randomHex(3)}`;
        poll.options.forEach((option, i) =>
          form.append(
            el(
              'label',
              { class: 'check' },
              el('input', { type: multiple ? 'checkbox' : 'radio', name, value: i, 'data-testid': 'poll-choice' }),
              ' ',
              option,
            ),
          ),
        );
        form.append(el('button', { type: 'submit', class: 'primary small', 'data-testid': 'poll-vote' }, 'Vote'));
        body.append(form);
      } else {
        poll.options.forEach((option, i) => {
          const count = votes[`option-${i}`] || 0;
          const share = total ? Math.round((100 * count) / total) : 0;
          const bar = el('progress', { max: 100, value: share, 'aria-hidden': 'true' });
          body.append(
            el(
              'div',
              { class: 'poll-result' + (poll.votedSelf && poll.votedSelf.includes(i) ? ' own' : ''), 'data-testid': 'poll-result', 'data-option': i, 'data-votes': count },
              el('span', { class: 'poll-option-text' }, option),
              bar,
              el('span', { class: 'poll-count' }, `${count} (${share} %)`),
            ),
          );
        });
        body.append(
          el('p', { class: 'muted small', 'data-testid': 'poll-status' }, closed ? `Closed · ${poll.numVoters || 0} voted` : `${poll.numVoters || 0} voted`),
        );
      }
      const me = myActor(rs);
      if (!closed && (rs.isModerator || (poll.actorType === me.type && poll.actorId === me.id))) {
        body.append(
          el(
            'button',
            {
              type: 'button',
              class: 'ghost small',
              'data-testid': 'poll-end',
              onclick: async () => {
                try {
                  const { data } = await api('DELETE', `/poll/${rs.token}/${poll.id}`, null, { base: V1, signal: rs.signal });
                  rs.polls.set(String(poll.id), data);
                  renderPoll(rs, data);
                } catch (error) {
                  if (!isAbort(error)) toast(`Could not end the poll: ${error.message}`);
                }
              },
            },
            'End poll',
          ),
        );
      }
      card.querySelector('.poll-body').replaceWith(body);
    }
  }

  // Notifications while the tab is hidden: a mention, or any message in a one-to-one.

  function maybeNotify(rs, message) {
    const mention = Object.entries(params(message)).some(([key, value]) => /^mention-/.test(key) && isMentionOfMe(rs, value));
    const oneToOne = rs.room && rs.room.type === ONE_TO_ONE;
    if (!mention && !oneToOne) return;
    const title = mention ? `${authorName(message)} mentioned you` : authorName(message);
    const body = renderPlain(message).slice(0, 200);
    window.talkDebug.notifications.push({ title, body });
    if (!('Notification' in window) || Notification.permission !== 'granted') return;
    try {
      const note = new Notification(title, { body, tag: `talk-${rs.token}` });
      note.onclick = () => {
        window.focus();
        note.close();
      };
    } catch (error) {
      /* some browsers only notify from a service worker */
    }
  }

  function renderNotifyButton() {
    const supported = 'Notification' in window;
    show('notify-enable', supported && Notification.permission === 'default' && state.me && !state.me.guest);
  }

  // -------------------------------------------------------------------------
  // 9. The composer: sending, replies, edits, @-autocomplete, polls
  // -------------------------------------------------------------------------

  function startReply(rs, messageId) {
    const known = rs.messages.get(messageId);
    if (!known) return;
    cancelEdit();
    rs.replyTo = known.message;
    setText('reply-author', authorName(known.message));
    setText('reply-text', renderPlain(known.message).slice(0, 120));
    show('reply-preview', true);
    $('message-input').focus();
  }

  function cancelReply() {
    if (state.room) state.room.replyTo = null;
    show('reply-preview', false);
  }

  /** The stored text of a message, with mentions back as @id for editing. */
  function editableText(message) {
    const p = params(message);
    return String(message.message ?? '').replace(/\{([A-Za-z0-9_-]+)\}/g, (whole, key) => {
      const parameter = p[key];
      if (!parameter) return whole;
      if (/^mention-/.test(key)) return mentionToken(String(parameter.id));
      return String(parameter.name || '');
    });
  }

  function mentionToken(id) {
    return /^[A-Za-z0-9_.@'-]+$/.test(id) ? `@${id}` : `@"${id}"`;
  }

  function startEdit(rs, messageId) {
    const known = rs.messages.get(messageId);
    if (!known) return;
    cancelReply();
    rs.editing = known.message;
    show('edit-preview', true);
    const input = $('message-input');
    input.value = editableText(known.message);
    autoGrow();
    input.focus();
  }

  function cancelEdit() {
    const rs = state.room;
    if (rs && rs.editing) {
      rs.editing = null;
      $('message-input').value = '';
      autoGrow();
    }
    show('edit-preview', false);
  }

  async function sendMessage() {
    const rs = state.room;
    const input = $('message-input');
    const text = input.value;
    if (!rs || !text.trim() || !rs.sessionId) return;
    mentions.close();
    setText('send-error', '');
    if (rs.editing) {
      const editing = rs.editing;
      try {
        const { data } = await api('PUT', `/chat/${rs.token}/${editing.id}`, { message: text }, { base: V1, signal: rs.signal });
        if (data && data.parent) updateMessage(rs, data.parent);
        rs.editing = null;
        input.value = '';
        autoGrow();
        show('edit-preview', false);
      } catch (error) {
        if (!isAbort(error)) setText('send-error', `Not saved: ${error.message}`);
      }
      return;
    }
    input.value = '';
    autoGrow();
    const referenceId = randomHex(32);
    const reply = rs.replyTo;
    cancelReply();
    // The pending bubble: shown at once, replaced when the message comes back.
    const pending = messageNode(rs, {
      id: -1,
      actorType: myActor(rs).type,
      actorId: myActor(rs).id,
      actorDisplayName: rs.isGuest ? state.me.name : state.me.displayName,
      timestamp: Math.floor(Date.now() / 1000),
      message: text,
      messageType: 'comment',
      parent: reply || undefined,
      referenceId,
    });
    pending.classList.add('pending');
    pending.removeAttribute('data-id');
    pending.querySelector('.actions').remove();
    pending.setAttribute('aria-busy', 'true');
    $('message-list').append(pending);
    rs.pending.set(referenceId, pending);
    $('message-list').scrollTop = $('message-list').scrollHeight;
    const body = { message: text, referenceId };
    if (reply) body.replyTo = reply.id;
    if (rs.isGuest) body.actorDisplayName = state.me.name;
    try {
      const { data } = await api('POST', `/chat/${rs.token}`, body, { base: V1, signal: rs.signal });
      if (data && typeof data.id === 'number') addMessages(rs, [data], {});
    } catch (error) {
      if (isAbort(error)) return;
      rs.pending.delete(referenceId);
      pending.remove();
      if (!input.value) {
        input.value = text;
        autoGrow();
      }
      if (reply) startReply(rs, reply.id);
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

  /** @-mentions: suggestions from /chat/{token}/mentions while typing "@na". */
  const mentions = (() => {
    const input = () => $('message-input');
    const listbox = () => $('mention-suggestions');
    let items = [];
    let active = -1;
    let seq = 0;
    let start = -1;
    const close = () => {
      listbox().hidden = true;
      listbox().replaceChildren();
      input().setAttribute('aria-expanded', 'false');
      input().removeAttribute('aria-activedescendant');
      items = [];
      active = -1;
    };
    const render = () => {
      listbox().replaceChildren(
        ...items.map((item, i) =>
          el(
            'li',
            {
              id: `mention-option-${i}`,
              role: 'option',
              class: 'suggestion' + (i === active ? ' active' : ''),
              'aria-selected': i === active ? 'true' : 'false',
              'data-testid': 'mention-suggestion',
              'data-id': item.id,
              onmousedown: (event) => {
                event.preventDefault();
                choose(i);
              },
            },
            item.source === 'users' ? userAvatar(item.id, 'tiny') : el('span', { class: 'tiny-icon', 'aria-hidden': 'true' }, item.source === 'calls' ? '👥' : '👤'),
            el('span', null, item.label),
            el('span', { class: 'muted small' }, item.source === 'calls' ? 'everyone' : item.source === 'guests' ? 'guest' : item.id),
          ),
        ),
      );
      listbox().hidden = items.length === 0;
      input().setAttribute('aria-expanded', String(items.length > 0));
      if (active >= 0) input().setAttribute('aria-activedescendant', `mention-option-${active}`);
    };
    const choose = (i) => {
      const item = items[i];
      const field = input();
      if (!item || start < 0) return close();
      const before = field.value.slice(0, start);
      const after = field.value.slice(field.selectionStart);
      const token = mentionToken(String(item.mentionId || item.id)) + ' ';
      field.value = before + token + after;
      const caret = (before + token).length;
      field.setSelectionRange(caret, caret);
      close();
      field.focus();
    };
    const update = async () => {
      const rs = state.room;
      const field = input();
      const upto = field.value.slice(0, field.selectionStart);
      const match = /(^|[\s([{])@([^\s@"]{0,30})$/.exec(upto);
      if (!rs || !match) return close();
      start = upto.length - match[2].length - 1;
      const mine = ++seq;
      try {
        const { data } = await api('GET', `/chat/${rs.token}/mentions`, { search: match[2], limit: 8 }, { base: V1, signal: rs.signal });
        if (mine !== seq) return;
        items = Array.isArray(data) ? data : [];
        active = items.length ? 0 : -1;
        render();
      } catch (error) {
        close();
      }
    };
    const keydown = (event) => {
      if (listbox().hidden) return false;
      if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
        active = (active + (event.key === 'ArrowDown' ? 1 : -1) + items.length) % items.length;
        render();
        return true;
      }
      if ((event.key === 'Enter' || event.key === 'Tab') && active >= 0) {
        choose(active);
        return true;
      }
      if (event.key === 'Escape') {
        close();
        return true;
      }
      return false;
    };
    return { update, keydown, close };
  })();

  function openPollDialog() {
    const rs = state.room;
    if (!rs) return;
    $('poll-form').reset();
    const options = $('poll-options');
    while (options.children.length > 2) options.lastElementChild.remove();
    setText('poll-error', '');
    $('poll-dialog').showModal();
    $('poll-question').focus();
  }

  function addPollOption() {
    const options = $('poll-options');
    const n = options.children.length + 1;
    const label = el('label', null, `Answer ${n} `, el('input', { class: 'poll-option', 'data-testid': 'poll-option' }));
    options.append(label);
    label.querySelector('input').focus();
  }

  async function submitPoll(event) {
    event.preventDefault();
    const rs = state.room;
    if (!rs) return;
    const question = $('poll-question').value.trim();
    const options = [...$('poll-options').querySelectorAll('input')].map((input) => input.value.trim()).filter(Boolean);
    if (!question || options.length < 2) return setText('poll-error', 'A question and at least two answers, please.');
    try {
      await api('POST', `/poll/${rs.token}`, { question, options, resultMode: 0, maxVotes: 1 }, { base: V1, signal: rs.signal });
      $('poll-dialog').close();
    } catch (error) {
      if (!isAbort(error)) setText('poll-error', error.message);
    }
  }

  // -------------------------------------------------------------------------
  // 10. Participants panel and conversation settings
  // -------------------------------------------------------------------------

  /** Attendees as {attendeeId, actorType, actorId, name, type, sessionIds, inCall}. */
  async function fetchParticipants(rs) {
    if (rs.isGuest) {
      // Today's route refuses guests (as spreed); the 2018 one lists the room for them.
      const { data } = await api('GET', `/room/${rs.token}/participants`, null, { base: V1, signal: rs.signal });
      return (Array.isArray(data) ? data : []).map((p) => ({
        attendeeId: 0,
        actorType: p.userId ? 'users' : 'guests',
        actorId: p.userId || '',
        name: p.userId ? p.displayName || p.userId : 'Guest',
        type: p.participantType,
        sessionIds: p.sessionId && p.sessionId !== '0' ? [p.sessionId] : [],
        inCall: Number(p.inCall),
      }));
    }
    const { data } = await api('GET', `/room/${rs.token}/participants`, { includeStatus: 'true' }, { signal: rs.signal });
    return (Array.isArray(data) ? data : []).map((p) => ({
      attendeeId: p.attendeeId,
      actorType: p.actorType,
      actorId: p.actorId,
      name: p.displayName || (p.actorType === 'guests' ? 'Guest' : p.actorId),
      type: p.participantType,
      sessionIds: Array.isArray(p.sessionIds) ? p.sessionIds : [],
      inCall: p.inCall,
      status: p.status,
    }));
  }

  async function refreshParticipants(rs) {
    if (rs.participantsPending) return rs.participantsPending;
    rs.participantsPending = (async () => {
      try {
        rs.participants = await fetchParticipants(rs);
        if (!rs.alive) return;
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

  function isMe(rs, p) {
    const me = myActor(rs);
    return p.actorType === me.type && p.actorId === me.id;
  }

  function renderParticipants(rs) {
    const online = new Set(rs.users.map((user) => user.sessionId));
    const isOnline = (p) => p.sessionIds.some((sid) => online.has(sid));
    const order = (p) => (isOnline(p) ? 0 : 1) * 10 + p.type;
    const people = rs.participants.slice().sort((a, b) => order(a) - order(b) || a.name.localeCompare(b.name));
    const items = people.map((p) => {
      const me = isMe(rs, p);
      const actions = [];
      if (rs.isModerator && !me && p.attendeeId) {
        const act = (label, handler, cls) =>
          el(
            'button',
            { type: 'button', class: 'small ' + (cls || ''), 'data-action': label.toLowerCase(), 'aria-label': `${label} ${p.name}`, onclick: handler },
            label,
          );
        if (p.type === USER) actions.push(act('Promote', () => participantAction(rs, 'POST', '/moderators', p.attendeeId)));
        if (p.type === MODERATOR) actions.push(act('Demote', () => participantAction(rs, 'DELETE', '/moderators', p.attendeeId)));
        if (p.type !== OWNER && rs.room.type !== ONE_TO_ONE) {
          actions.push(act('Remove', () => participantAction(rs, 'DELETE', '/attendees', p.attendeeId), 'danger'));
        }
      }
      const hand = p.sessionIds.some((sid) => rs.hands.get(sid));
      const avatar = p.actorType === 'users' ? userAvatar(p.actorId, 'small') : guestAvatar(p.name, 'small');
      return el(
        'li',
        {
          class: 'participant' + (isOnline(p) ? ' online' : ''),
          'data-testid': 'participant',
          'data-user': p.actorType === 'users' ? p.actorId : '',
          'data-type': p.type,
        },
        el('span', { class: 'avatar-wrap' }, avatar, el('span', { class: 'presence', title: isOnline(p) ? 'Online' : 'Offline' })),
        el(
          'span',
          { class: 'participant-info' },
          el('span', { class: 'participant-name' }, p.name + (me ? ' (you)' : ''), hand ? el('span', { class: 'hand', 'data-testid': 'hand-raised', title: 'Hand raised' }, ' ✋') : null),
          el(
            'span',
            { class: 'participant-type', 'data-testid': 'participant-type' },
            (PARTICIPANT_TYPES[p.type] || '') + (Number(p.inCall) & 1 ? ' · in call' : ''),
          ),
        ),
        el('span', { class: 'participant-actions' }, ...actions),
      );
    });
    $('participant-list').replaceChildren(...items);
  }

  async function participantAction(rs, method, path, attendeeId) {
    setText('participants-error', '');
    try {
      await api(method, `/room/${rs.token}${path}`, { attendeeId }, { signal: rs.signal });
    } catch (error) {
      if (!isAbort(error)) setText('participants-error', error.message);
    }
    refreshParticipants(rs);
    refreshRoom(rs);
  }

  async function addParticipant(event) {
    if (event) event.preventDefault();
    const rs = state.room;
    const input = $('add-participant-id');
    const userId = input.value.trim();
    if (!rs || !userId) return;
    setText('participants-error', '');
    try {
      await api('POST', `/room/${rs.token}/participants`, { newParticipant: userId, source: 'users' }, { signal: rs.signal });
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
    if (rs.isGuest) {
      if (rs.inCall) leaveCall(rs, { tellServer: false });
      return roomGone(rs, 'You left the conversation.');
    }
    try {
      if (rs.inCall) leaveCall(rs, { tellServer: true });
      rs.leaving = true;
      await api('DELETE', `/room/${rs.token}/participants/self`);
      rs.sessionId = null;
      if ($('settings-dialog').open) $('settings-dialog').close();
      roomGone(rs, 'You left the conversation.');
    } catch (error) {
      rs.leaving = false;
      setText('participants-error', error.message);
      setText('settings-error', error.message);
    }
  }

  async function toggleFavorite() {
    const rs = state.room;
    if (!rs || rs.isGuest) return;
    const on = !rs.room.isFavorite;
    try {
      await api(on ? 'POST' : 'DELETE', `/room/${rs.token}/favorite`, null, { signal: rs.signal });
      rs.room = { ...rs.room, isFavorite: on };
      state.rooms.set(rs.token, rs.room);
      renderRoomHeader(rs);
      renderRooms();
      refreshRoom(rs);
    } catch (error) {
      if (!isAbort(error)) toast(error.message);
    }
  }

  function openSettings() {
    const rs = state.room;
    if (!rs || rs.isGuest) return;
    setText('settings-error', '');
    setText('settings-ok', '');
    $('settings-password').value = '';
    fillSettings(rs);
    $('settings-dialog').showModal();
  }

  function fillSettings(rs) {
    const room = rs.room;
    const isPublic = room.type === PUBLIC;
    const moderator = rs.isModerator;
    show('settings-moderator', moderator && room.type !== ONE_TO_ONE);
    show('settings-rename-section', room.type !== ONE_TO_ONE);
    show('settings-public-section', room.type === 2 || room.type === PUBLIC);
    show('settings-avatar-section', room.type !== ONE_TO_ONE);
    const active = document.activeElement;
    if (active !== $('settings-name')) $('settings-name').value = room.name || '';
    if (active !== $('settings-description')) $('settings-description').value = room.description || '';
    $('settings-notify').value = String(room.notificationLevel || (room.type === ONE_TO_ONE ? 1 : 2));
    $('settings-read-only').checked = Boolean(room.readOnly);
    $('settings-lobby').checked = Boolean(room.lobbyState);
    setText('settings-public-state', isPublic ? 'Public: anyone with the link can join as a guest.' : 'Private: only the participants can join.');
    setText('settings-public', isPublic ? 'Make private' : 'Make public');
    show('settings-link-section', isPublic && moderator);
    $('settings-link').value = location.origin + location.pathname + roomHash(rs.token);
    show('settings-password-section', isPublic && moderator);
    setText('settings-password-state', room.hasPassword ? '(a password is set)' : '(none)');
    $('settings-password-clear').disabled = !room.hasPassword;
    $('settings-avatar-remove').disabled = !room.isCustomAvatar;
    show('settings-leave', Boolean(room.canLeaveConversation));
    show('settings-delete', Boolean(room.canDeleteConversation));
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
      refreshRoom(rs);
    }
  }

  function bindSettings() {
    const on = (id, event, handler) => $(id).addEventListener(event, handler);
    on('settings-rename', 'click', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}`, { roomName: $('settings-name').value.trim() }), 'Renamed.'),
    );
    on('settings-description-set', 'click', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}/description`, { description: $('settings-description').value }), 'Description saved.'),
    );
    on('settings-notify', 'change', () =>
      settingsAction((rs) => api('POST', `/room/${rs.token}/notify`, { level: Number($('settings-notify').value) }), 'Notifications saved.'),
    );
    on('settings-read-only', 'change', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}/read-only`, { state: $('settings-read-only').checked ? 1 : 0 }), 'Saved.'),
    );
    on('settings-lobby', 'change', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}/webinar/lobby`, { state: $('settings-lobby').checked ? 1 : 0 }), 'Saved.'),
    );
    on('settings-public', 'click', () =>
      settingsAction((rs) => api(rs.room.type === PUBLIC ? 'DELETE' : 'POST', `/room/${rs.token}/public`), 'Saved.'),
    );
    on('settings-password-set', 'click', () => {
      if (!$('settings-password').value) return setText('settings-error', 'Type a password first.');
      settingsAction(async (rs) => {
        await api('PUT', `/room/${rs.token}/password`, { password: $('settings-password').value });
        $('settings-password').value = '';
      }, 'Password set.');
    });
    on('settings-password-clear', 'click', () =>
      settingsAction((rs) => api('PUT', `/room/${rs.token}/password`, { password: '' }), 'Password removed.'),
    );
    on('settings-avatar-file', 'change', () => {
      const file = $('settings-avatar-file').files[0];
      if (!file) return;
      settingsAction(async (rs) => {
        const form = new FormData();
        form.append('file', file);
        await api('POST', `/room/${rs.token}/avatar`, form, { base: V1 });
        $('settings-avatar-file').value = '';
      }, 'Picture saved.');
    });
    on('settings-avatar-emoji-set', 'click', () => {
      const emoji = $('settings-avatar-emoji').value.trim();
      if (!emoji) return setText('settings-error', 'Type an emoji first.');
      settingsAction((rs) => api('POST', `/room/${rs.token}/avatar/emoji`, { emoji }, { base: V1 }), 'Picture saved.');
    });
    on('settings-avatar-remove', 'click', () =>
      settingsAction((rs) => api('DELETE', `/room/${rs.token}/avatar`, null, { base: V1 }), 'Picture removed.'),
    );
    on('settings-copy', 'click', async () => {
      $('settings-link').select();
      try {
        await navigator.clipboard.writeText($('settings-link').value);
        setText('settings-ok', 'Link copied.');
      } catch (error) {
        setText('settings-ok', 'Select the link and copy it.');
      }
    });
    on('settings-leave', 'click', (event) => confirmClick(event.currentTarget, 'Click again to leave', leaveRoomForGood));
    on('settings-delete', 'click', (event) =>
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
    // The settings form is method=dialog: only its close button may submit.
    on('settings-form', 'submit', (event) => {
      if (!event.submitter || event.submitter.value !== 'close') event.preventDefault();
    });
    on('settings-name', 'keydown', (event) => {
      if (event.key === 'Enter') $('settings-rename').click();
    });
    on('settings-password', 'keydown', (event) => {
      if (event.key === 'Enter') $('settings-password-set').click();
    });
  }

  // -------------------------------------------------------------------------
  // 11. Connect a phone: app passwords and the QR code
  // -------------------------------------------------------------------------

  /** The Talk apps' QR form (Android BrowserLoginActivity, the iOS scanner). */
  function loginUrl(user, password, server) {
    return `nc://login/user:${encodeURIComponent(user)}&password:${encodeURIComponent(password)}&server:${server}`;
  }

  /** Draw `text` as a QR code into the <svg>: one path of dark modules. */
  function drawQr(svg, text) {
    const qr = window.qrcode(0, 'M'); // version from the length, 15 % damage allowed
    window.qrcode.stringToBytes = window.qrcode.stringToBytesFuncs['UTF-8'];
    qr.addData(text, 'Byte');
    qr.make();
    const count = qr.getModuleCount();
    const quiet = 4;
    const size = count + quiet * 2;
    let d = '';
    for (let row = 0; row < count; row++) {
      for (let col = 0; col < count; col++) {
        if (qr.isDark(row, col)) d += `M${col + quiet},${row + quiet}h1v1h-1z`;
      }
    }
    const ns = 'http://www.w3.org/2000/svg';
    const background = document.createElementNS(ns, 'rect');
    background.setAttribute('width', String(size));
    background.setAttribute('height', String(size));
    background.setAttribute('class', 'qr-bg');
    const path = document.createElementNS(ns, 'path');
    path.setAttribute('d', d);
    path.setAttribute('class', 'qr-fg');
    svg.setAttribute('viewBox', `0 0 ${size} ${size}`);
    svg.setAttribute('shape-rendering', 'crispEdges');
    svg.dataset.modules = String(count);
    svg.replaceChildren(background, path);
  }

  async function openPhonePanel() {
    setText('phone-error', '');
    show('phone-result', false);
    $('phone-qr').replaceChildren();
    setText('phone-password', '');
    $('phone-dialog').showModal();
    $('phone-device').focus();
    $('phone-device').select();
    await loadAppPasswords();
  }

  function closePhonePanel() {
    // The password was for this moment only: nothing of it stays in the page.
    $('phone-qr').replaceChildren();
    setText('phone-password', '');
    show('phone-result', false);
    $('phone-dialog').close();
  }

  async function createAppPassword(event) {
    event.preventDefault();
    setText('phone-error', '');
    const name = $('phone-device').value.trim() || 'Phone';
    try {
      const { data } = await api('POST', '/apppasswords', { name }, { base: CORE });
      const server = location.origin;
      setText('phone-server', server);
      setText('phone-user', state.me.id);
      setText('phone-password', data.apppassword);
      drawQr($('phone-qr'), loginUrl(state.me.id, data.apppassword, server));
      show('phone-result', true);
      await loadAppPasswords();
    } catch (error) {
      setText('phone-error', `Could not create an app password: ${error.message}`);
    }
  }

  async function loadAppPasswords() {
    try {
      const { data } = await api('GET', '/apppasswords', null, { base: CORE });
      const rows = (Array.isArray(data) ? data : []).map((item) => {
        const created = new Date(item.created * 1000);
        const used = item.lastUsed ? new Date(item.lastUsed * 1000).toLocaleString() : 'never';
        return el(
          'li',
          { class: 'app-password', 'data-testid': 'app-password', 'data-id': item.id },
          el(
            'span',
            { class: 'app-password-info' },
            el('strong', null, item.name),
            el('span', { class: 'muted small' }, `created ${created.toLocaleString()} · last used ${used}`),
          ),
          el(
            'button',
            {
              type: 'button',
              class: 'small danger',
              'data-action': 'revoke',
              'aria-label': `Revoke ${item.name}`,
              onclick: async () => {
                try {
                  await api('DELETE', `/apppasswords/${item.id}`, null, { base: CORE });
                } catch (error) {
                  setText('phone-error', error.message);
                }
                loadAppPasswords();
              },
            },
            'Revoke',
          ),
        );
      });
      $('app-passwords').replaceChildren(...(rows.length ? rows : [el('li', { class: 'muted small' }, 'None yet.')]));
    } catch (error) {
      setText('phone-error', error.message);
    }
  }

  // -------------------------------------------------------------------------
  // 12. Calls (v4, signaling v3): peers, screen sharing, raised hands, speaking
  // -------------------------------------------------------------------------

  const call = {
    local: null, // our MediaStream, or null when we only watch and listen
    screen: null, // our shared screen's MediaStream
    peers: new Map(), // peer session id -> {sid, pc, offerer, pending, tile, video}
    publisher: null, // through the HPB: our own stream's connection to Janus
    screens: new Map(), // peer session id -> screen peer (ours when we share, theirs when they do)
    iceServers: [],
    hand: false,
    speakingTimer: null,
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

  /** Signaling settings v3 for the room (null when they cannot be had: internal signaling). */
  async function loadSignalingSettings(rs) {
    try {
      const { data } = await api('GET', '/signaling/settings', { token: rs.token }, { base: V3, signal: rs.signal });
      return data && typeof data === 'object' ? data : null;
    } catch (error) {
      if (isAbort(error)) throw error;
      return null;
    }
  }

  function isExternal(settings) {
    return Boolean(settings && settings.signalingMode === 'external' && typeof settings.server === 'string' && settings.server);
  }

  /** STUN and TURN from the server; a LAN without internet still connects on host candidates. */
  async function loadIceServers(rs) {
    try {
      const data = await loadSignalingSettings(rs);
      const servers = [];
      for (const stun of (data && data.stunservers) || []) {
        const urls = stun && (stun.urls || stun.url);
        if (urls && urls.length) servers.push({ urls });
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
      // Through the HPB our stream goes to Janus first: the others ask for it
      // as soon as the server tells them we are in the call.
      if (rs.hpb) hpbPublish(rs);
      await api('POST', `/call/${rs.token}`, { flags: callFlags() }, { signal: rs.signal });
      updatePeers(rs);
      renderCallButton(rs);
      call.speakingTimer = setInterval(() => detectSpeaking(rs), 400);
    } catch (error) {
      if (!isAbort(error)) setText('call-error', `Could not join the call: ${error.message}`);
      leaveCall(rs, { tellServer: false });
    } finally {
      button.disabled = false;
    }
  }

  function leaveCall(rs, { tellServer }) {
    rs.inCall = false;
    stopScreen(rs, { tell: tellServer });
    closeAllPeers();
    stopLocal();
    clearInterval(call.speakingTimer);
    call.hand = false;
    rs.hands.clear();
    $('video-grid').replaceChildren();
    show('call', false);
    document.body.classList.remove('in-call');
    renderCallButton(rs);
    renderHand();
    if (tellServer) api('DELETE', `/call/${rs.token}`, null, { keepalive: true }).catch(() => {});
  }

  /** In-call flags of calls v4: 1 in the call, 2 with audio, 4 with video. */
  function callFlags() {
    let flags = 1;
    if (call.local && call.local.getAudioTracks().length) flags |= 2;
    if (call.local && call.local.getVideoTracks().length) flags |= 4;
    return flags;
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
      el('span', { class: 'tile-hand', 'aria-label': 'Hand raised', hidden: true }, '✋'),
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
    // Screens are shared peer to peer; through the HPB only cameras are (for now).
    const viaHpb = Boolean(state.room && state.room.hpb);
    $('toggle-screen').disabled = viaHpb || !(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
    $('toggle-screen').setAttribute('aria-pressed', String(Boolean(call.screen)));
    $('toggle-screen').title = viaHpb
      ? 'Screen sharing is not available through the High-Performance Backend'
      : call.screen
        ? 'Stop sharing your screen'
        : 'Share your screen';
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
    const talkSession = talkSessionOf(rs, sid);
    const p = rs.participants.find((x) => x.sessionIds.includes(talkSession));
    return p ? p.name : 'Someone';
  }

  function renderTileNames(rs) {
    for (const peer of call.peers.values()) peer.tile.querySelector('.tile-label').textContent = peerName(rs, peer.sid);
    for (const peer of call.screens.values()) {
      if (peer.tile) peer.tile.querySelector('.tile-label').textContent = `${peerName(rs, peer.sid)}'s screen`;
    }
  }

  /**
   * Match the peer connections to usersInRoom: one per other session in the
   * call. Through the HPB: one subscriber per other session that publishes
   * (in the call with audio or video), keyed by its signaling session.
   */
  function updatePeers(rs) {
    if (!rs.inCall || !rs.sessionId) return;
    const hpb = rs.hpb;
    if (hpb && !hpb.ownId) return; // (re)connecting: the room join brings the list again
    const wanted = new Set(
      hpb
        ? rs.users
            .filter((user) => Number(user.inCall) & 1 && Number(user.inCall) & 6 && user.signalingId !== hpb.ownId)
            .map((user) => user.signalingId)
        : rs.users
            .filter((user) => Number(user.inCall) & 1 && user.sessionId && user.sessionId !== rs.sessionId)
            .map((user) => user.sessionId),
    );
    for (const sid of [...call.peers.keys()]) if (!wanted.has(sid)) closePeer(sid);
    for (const sid of [...call.screens.keys()]) if (!wanted.has(sid)) closeScreenPeer(sid);
    for (const sid of wanted) {
      const known = call.peers.get(sid);
      if (!known) {
        const peer = createPeer(rs, sid);
        if (hpb) requestOffer(rs, peer);
        else if (peer.offerer) makeOffer(rs, peer);
        if (call.hand) sendSignal(rs, sid, 'raiseHand', { state: true, timestamp: Date.now() }, 'video');
      } else if (hpb && !known.pc.remoteDescription) {
        requestOffer(rs, known); // the call changed: the server may say yes now
      }
      if (call.screen && !call.screens.has(sid)) offerScreen(rs, sid);
    }
  }

  function newPeerConnection(rs, peer, roomType) {
    const pc = new RTCPeerConnection({ iceServers: call.iceServers });
    pc.onicecandidate = (event) => {
      if (!event.candidate) return;
      const { candidate, sdpMid, sdpMLineIndex } = event.candidate;
      sendSignal(rs, peer.sid, 'candidate', { candidate: { candidate, sdpMid, sdpMLineIndex } }, roomType, peer.connectionId);
    };
    pc.ontrack = (event) => {
      if (!peer.video) return; // our publisher receives nothing
      if (!peer.stream) peer.stream = event.streams[0] || new MediaStream();
      if (!peer.stream.getTracks().includes(event.track)) peer.stream.addTrack(event.track);
      if (peer.video.srcObject !== peer.stream) peer.video.srcObject = peer.stream;
      peer.video.play().catch(() => {});
    };
    return pc;
  }

  function createPeer(rs, sid) {
    // Glare rule: the lexicographically smaller session id makes the offer.
    // Through the HPB, Janus always offers: the peer is a subscriber.
    const subscriber = Boolean(rs.hpb);
    const peer = { sid, offerer: !subscriber && rs.sessionId < sid, subscriber, pending: [], stream: null };
    const video = el('video', { 'aria-label': 'Video of ' + peerName(rs, sid) });
    video.autoplay = true;
    video.playsInline = true;
    const status = el('span', { class: 'tile-state' }, 'Connecting…');
    peer.tile = el(
      'div',
      { class: 'tile remote', 'data-testid': 'video-tile', 'data-local': 'false', 'data-session': sid, 'data-state': 'new', 'data-speaking': 'false' },
      video,
      el('span', { class: 'tile-label' }, peerName(rs, sid)),
      el('span', { class: 'tile-hand', 'data-testid': 'tile-hand', 'aria-label': 'Hand raised', hidden: !rs.hands.get(talkSessionOf(rs, sid)) }, '✋'),
      status,
    );
    peer.video = video;
    $('video-grid').append(peer.tile);
    renderGridSize();
    const pc = newPeerConnection(rs, peer, 'video');
    peer.pc = pc;
    const localTracks = call.local && !subscriber ? call.local.getTracks() : [];
    for (const track of localTracks) pc.addTrack(track, call.local);
    if (peer.offerer) {
      // Without a camera or microphone, still ask to receive both.
      for (const kind of ['audio', 'video']) {
        if (!localTracks.some((track) => track.kind === kind)) pc.addTransceiver(kind, { direction: 'recvonly' });
      }
    }
    pc.oniceconnectionstatechange = () => {
      const ice = pc.iceConnectionState;
      peer.tile.dataset.state = ice;
      status.textContent =
        { new: 'Connecting…', checking: 'Connecting…', connected: '', completed: '', disconnected: 'Reconnecting…', failed: 'Connection failed', closed: '' }[ice] || '';
      if (ice === 'failed' && peer.offerer && call.peers.get(sid) === peer) {
        pc.restartIce();
        makeOffer(rs, peer, { iceRestart: true });
      } else if (ice === 'failed' && subscriber && call.peers.get(sid) === peer) {
        // Janus offers afresh to a new subscriber.
        closePeer(sid);
        updatePeers(rs);
      }
    };
    call.peers.set(sid, peer);
    window.talkDebug.peerConnections.set(sid, pc);
    return peer;
  }

  async function makeOffer(rs, peer, options, roomType = 'video') {
    try {
      const offer = await peer.pc.createOffer(options);
      await peer.pc.setLocalDescription(offer);
      sendSignal(rs, peer.sid, 'offer', { type: 'offer', sdp: peer.pc.localDescription.sdp }, roomType);
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
    for (const sid of [...call.screens.keys()]) closeScreenPeer(sid);
    closePublisher();
  }

  // Screen sharing: one more connection per peer (roomType "screen"), offered by the sharer.

  async function toggleScreen() {
    const rs = state.room;
    if (!rs || !rs.inCall) return;
    if (call.screen) return stopScreen(rs, { tell: true });
    try {
      call.screen = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
    } catch (error) {
      if (error && error.name !== 'NotAllowedError') setText('call-error', `Could not share the screen: ${error.message}`);
      return;
    }
    const [track] = call.screen.getVideoTracks();
    if (track) track.addEventListener('ended', () => stopScreen(rs, { tell: true }));
    const video = el('video', { 'aria-label': 'Your screen' });
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    video.srcObject = call.screen;
    $('video-grid').append(
      el('div', { class: 'tile screen local', 'data-testid': 'screen-tile', 'data-local': 'true' }, video, el('span', { class: 'tile-label' }, 'Your screen')),
    );
    renderGridSize();
    renderMediaButtons();
    for (const sid of call.peers.keys()) offerScreen(rs, sid);
  }

  function offerScreen(rs, sid) {
    const peer = { sid, offerer: true, pending: [], stream: null, video: document.createElement('video'), own: true };
    peer.pc = newPeerConnection(rs, peer, 'screen');
    for (const track of call.screen.getTracks()) peer.pc.addTrack(track, call.screen);
    call.screens.set(sid, peer);
    makeOffer(rs, peer, undefined, 'screen');
  }

  function stopScreen(rs, { tell }) {
    if (!call.screen) return;
    for (const track of call.screen.getTracks()) track.stop();
    call.screen = null;
    for (const [sid, peer] of [...call.screens]) {
      if (!peer.own) continue;
      if (tell) sendSignal(rs, sid, 'unshareScreen', {}, 'screen');
      closeScreenPeer(sid);
    }
    const tile = $('video-grid').querySelector('.tile.screen.local');
    if (tile) tile.remove();
    renderGridSize();
    renderMediaButtons();
  }

  function receiveScreen(rs, sid) {
    const video = el('video', { 'aria-label': `Screen of ${peerName(rs, sid)}` });
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    const peer = { sid, offerer: false, pending: [], stream: null, video, own: false };
    peer.tile = el(
      'div',
      { class: 'tile screen remote', 'data-testid': 'screen-tile', 'data-local': 'false', 'data-session': sid },
      video,
      el('span', { class: 'tile-label' }, `${peerName(rs, sid)}'s screen`),
    );
    $('video-grid').prepend(peer.tile);
    renderGridSize();
    peer.pc = newPeerConnection(rs, peer, 'screen');
    call.screens.set(sid, peer);
    window.talkDebug.screenConnections.set(sid, peer.pc);
    return peer;
  }

  function closeScreenPeer(sid) {
    const peer = call.screens.get(sid);
    if (!peer) return;
    call.screens.delete(sid);
    window.talkDebug.screenConnections.delete(sid);
    peer.pc.close();
    if (peer.tile) peer.tile.remove();
    renderGridSize();
  }

  // Raised hands and the speaking indicator.

  function toggleHand() {
    const rs = state.room;
    if (!rs || !rs.inCall) return;
    call.hand = !call.hand;
    for (const sid of call.peers.keys()) sendSignal(rs, sid, 'raiseHand', { state: call.hand, timestamp: Date.now() }, 'video');
    renderHand();
  }

  function renderHand() {
    const button = $('toggle-hand');
    button.setAttribute('aria-pressed', String(call.hand));
    button.title = call.hand ? 'Lower hand' : 'Raise hand';
    const local = $('video-grid').querySelector('.tile.local:not(.screen) .tile-hand');
    if (local) local.hidden = !call.hand;
  }

  /** Audio levels from the receivers' statistics: a speaker's tile lights up. */
  async function detectSpeaking(rs) {
    if (!rs.inCall) return;
    for (const peer of call.peers.values()) {
      try {
        const stats = await peer.pc.getStats();
        let level = 0;
        stats.forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'audio' && typeof s.audioLevel === 'number') level = Math.max(level, s.audioLevel);
        });
        const speaking = level > 0.02;
        if (speaking) peer.lastSpoke = Date.now();
        const lit = Boolean(peer.lastSpoke && Date.now() - peer.lastSpoke < 800);
        peer.tile.dataset.speaking = String(lit);
        peer.tile.classList.toggle('speaking', lit);
        if (lit) peer.tile.dataset.spoke = 'true';
      } catch (error) {
        /* closed meanwhile */
      }
    }
  }

  async function flushCandidates(peer) {
    const pending = peer.pending.splice(0);
    for (const candidate of pending) await peer.pc.addIceCandidate(candidate).catch(() => {});
  }

  /**
   * One signaling message {from, to, type, payload, roomType, sid} from a
   * peer, or through the HPB from Janus: the answer to our publisher comes
   * "from" our own signaling session, a subscriber's offer from its publisher.
   */
  async function handleSignal(rs, message) {
    if (!message || typeof message !== 'object' || !rs.inCall) return;
    const from = message.from;
    const me = rs.hpb ? rs.hpb.ownId : rs.sessionId;
    const own = Boolean(rs.hpb) && from === me;
    if (!from || (from === me && !own) || (message.to && message.to !== me)) return;
    const payload = message.payload || {};
    if (message.type === 'raiseHand') {
      rs.hands.set(talkSessionOf(rs, from), Boolean(payload.state));
      const peer = call.peers.get(from);
      if (peer) peer.tile.querySelector('.tile-hand').hidden = !payload.state;
      renderParticipants(rs);
      return;
    }
    const screen = message.roomType === 'screen';
    if (message.type === 'unshareScreen') return closeScreenPeer(from);
    if (rs.hpb && screen) return; // screens are shared peer to peer only
    let peer = own ? call.publisher : screen ? call.screens.get(from) : call.peers.get(from);
    try {
      if (message.type === 'offer') {
        if (own) return;
        if (screen) {
          if (peer && !peer.own) closeScreenPeer(from);
          peer = receiveScreen(rs, from);
        } else if (!peer) {
          if (rs.hpb) return; // an offer we did not ask for (or no longer want)
          peer = createPeer(rs, from);
        }
        // We are the offerer and mid-offer: ours wins, as both follow the rule.
        if (!screen && peer.pc.signalingState === 'have-local-offer' && peer.offerer) return;
        if (message.sid) peer.connectionId = message.sid;
        await peer.pc.setRemoteDescription({ type: 'offer', sdp: payload.sdp });
        await flushCandidates(peer);
        const answer = await peer.pc.createAnswer();
        await peer.pc.setLocalDescription(answer);
        const description = { type: 'answer', sdp: peer.pc.localDescription.sdp };
        sendSignal(rs, from, 'answer', description, screen ? 'screen' : 'video', peer.connectionId);
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

  /**
   * Queue a message for a peer; one POST at a time keeps them in order.
   * Through the HPB it goes over the signaling server's WebSocket instead.
   */
  function sendSignal(rs, to, type, payload, roomType = 'video', sid = undefined) {
    if (rs.hpb) return hpbSendTo(rs, to, { to, from: rs.hpb.ownId, type, payload, roomType, sid });
    const fn = JSON.stringify({ to, type, payload, roomType });
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
          await api('POST', `/signaling/${rs.token}`, { messages: JSON.stringify(batch) }, { base: V3, signal: rs.signal });
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
  // 13. The High-Performance Backend: external signaling, MCU calls
  // -------------------------------------------------------------------------
  //
  // When the signaling settings name a server (signalingMode "external"), the
  // room's signaling runs over that server's WebSocket instead of the
  // long-poll: hello v1 with the ticket, then a room join with our Talk
  // session, which the server checks with talk-server's backend endpoint. Its
  // events say who is here and in the call. A call is one publisher
  // connection (our camera and microphone to Janus, offered to our own
  // session) and one subscriber connection per other publisher (Janus offers
  // it when we send `requestoffer`): never a mesh.

  const HPB_BACKEND_PATH = V3 + '/signaling/backend';
  const HPB_REQUEST_TIMEOUT_MS = 15000;
  const REQUEST_OFFER_TRIES = 10;
  const OFFER_WAIT_MS = 3000; // no offer this long after a requestoffer: ask again

  /** The WebSocket address of a signaling server configured as http(s) or ws(s). */
  function hpbSocketUrl(server) {
    let url = server.trim().replace(/\/+$/, '').replace(/^http(s?):/i, 'ws$1:');
    if (!url.endsWith('/spreed')) url += '/spreed';
    return url;
  }

  function hpbStart(rs, settings) {
    rs.hpb = {
      settings,
      ws: null,
      ownId: null, // our signaling session (not the Talk session)
      sessions: new Map(), // signaling session -> {id, roomSessionId, userId, inCall}
      requests: new Map(), // request id -> {onReply, onError, timer}
      handling: Promise.resolve(), // peer messages, one after the other
      nextId: 1,
      failures: 0,
      greeted: false, // a hello succeeded before: the next one is a reconnection
      stopped: false,
    };
    rs.signal.addEventListener('abort', () => hpbStop(rs), { once: true });
    hpbOpen(rs);
    renderMediaButtons();
  }

  function hpbOpen(rs) {
    const hpb = rs.hpb;
    let ws;
    try {
      ws = new WebSocket(hpbSocketUrl(hpb.settings.server));
    } catch (error) {
      console.warn('signaling server address refused', error);
      return;
    }
    hpb.ws = ws;
    ws.onopen = () => hpbHello(rs, ws);
    ws.onmessage = (event) => {
      if (hpb.ws === ws) hpbReceive(rs, event.data);
    };
    ws.onclose = () => hpbLost(rs, ws);
  }

  async function hpbHello(rs, ws) {
    const hpb = rs.hpb;
    const settings = hpb.settings;
    const params = (settings.helloAuthParams && settings.helloAuthParams['1.0']) || {
      userid: settings.userId || null,
      ticket: settings.ticket,
    };
    try {
      const hello = await hpbRequest(rs, 'hello', { version: '1.0', auth: { url: location.origin + HPB_BACKEND_PATH, params } });
      hpb.ownId = hello.sessionid;
      await hpbRequest(rs, 'room', { roomid: rs.token, sessionid: rs.sessionId });
      hpb.failures = 0;
      const again = hpb.greeted;
      hpb.greeted = true;
      if (rs.inCall) {
        hpbPublish(rs);
        // A new signaling session knows nothing of our call: joining it again
        // makes talk-server tell the server who is in it.
        if (again) api('POST', `/call/${rs.token}`, { flags: callFlags() }, { signal: rs.signal }).catch(() => {});
        updatePeers(rs);
      }
    } catch (error) {
      if (hpb.ws !== ws) return;
      console.warn('signaling server refused us', error.message);
      ws.close(); // hpbLost tries again with fresh settings
    }
  }

  /** Send one request; `handlers` {onReply, onError} hear its answer or its error. */
  function hpbSend(rs, type, body, handlers = null) {
    const hpb = rs.hpb;
    if (!hpb.ws || hpb.ws.readyState !== WebSocket.OPEN) {
      if (handlers) handlers.onError(new Error('Not connected to the signaling server'));
      return;
    }
    const id = String(hpb.nextId++);
    if (handlers) {
      const timer = setTimeout(() => {
        // Only requests that expect a reply fail by silence; for the others silence is success.
        if (hpb.requests.delete(id) && handlers.onReply) handlers.onError(new Error('The signaling server did not answer'));
      }, HPB_REQUEST_TIMEOUT_MS);
      hpb.requests.set(id, { ...handlers, timer });
    }
    hpb.ws.send(JSON.stringify({ id, type, [type]: body }));
  }

  function hpbRequest(rs, type, body) {
    return new Promise((resolve, reject) => hpbSend(rs, type, body, { onReply: resolve, onError: reject }));
  }

  /** A message to one signaling session (a peer, or Janus's side of a publisher). */
  function hpbSendTo(rs, sid, data, onError) {
    hpbSend(rs, 'message', { recipient: { type: 'session', sessionid: sid }, data }, onError ? { onError } : null);
  }

  function hpbReceive(rs, raw) {
    const hpb = rs.hpb;
    let message;
    try {
      message = JSON.parse(raw);
    } catch (error) {
      return;
    }
    if (!message || typeof message !== 'object') return;
    const waiting = message.id !== undefined ? hpb.requests.get(String(message.id)) : null;
    if (waiting) {
      hpb.requests.delete(String(message.id));
      clearTimeout(waiting.timer);
      if (message.type === 'error') {
        const error = new Error((message.error && message.error.message) || 'Refused');
        error.code = message.error && message.error.code;
        waiting.onError(error);
      } else if (waiting.onReply) {
        waiting.onReply(message[message.type] || {});
      }
      return;
    }
    if (message.type === 'event') {
      hpbEvent(rs, message.event || {});
    } else if (message.type === 'message') {
      const { sender, data } = message.message || {};
      if (!data || typeof data !== 'object') return;
      const signal = { ...data, from: (sender && sender.sessionid) || data.from };
      hpb.handling = hpb.handling.then(() => handleSignal(rs, signal)).catch((error) => console.warn('peer message failed', error));
    } else if (message.type === 'room') {
      // Moved out of the room by the server: removed, or the room is gone.
      if (message.room && !message.room.roomid) refreshRoom(rs);
    } else if (message.type === 'bye') {
      hpb.ws.close(); // our session ended there: start a new one
    } else if (message.type === 'error') {
      console.warn('signaling server error', message.error);
    }
  }

  /** Room and participants events: who is here (join, leave) and who is in the call (update). */
  function hpbEvent(rs, event) {
    const hpb = rs.hpb;
    if (event.target === 'room' && event.type === 'join') {
      for (const joined of Array.isArray(event.join) ? event.join : []) {
        if (!joined || !joined.sessionid) continue;
        const known = hpb.sessions.get(joined.sessionid) || { id: joined.sessionid, inCall: 0 };
        known.roomSessionId = joined.roomsessionid || known.roomSessionId;
        known.userId = joined.userid || '';
        hpb.sessions.set(joined.sessionid, known);
      }
    } else if (event.target === 'room' && event.type === 'leave') {
      for (const sid of Array.isArray(event.leave) ? event.leave : []) hpb.sessions.delete(sid);
    } else if (event.target === 'participants' && event.type === 'update') {
      const update = event.update || {};
      if (update.all) for (const known of hpb.sessions.values()) known.inCall = Number(update.incall) || 0;
      const users = [...(Array.isArray(update.users) ? update.users : []), ...(Array.isArray(update.changed) ? update.changed : [])];
      for (const user of users) {
        const sid = user && (user.sessionId || user.sessionid);
        const known = sid && hpb.sessions.get(sid);
        if (!known && !(user && user.nextcloudSessionId)) continue; // not connected to the signaling server
        const entry = known || { id: sid };
        entry.inCall = Number(user.inCall) || 0;
        if (user.nextcloudSessionId) entry.roomSessionId = user.nextcloudSessionId;
        if (user.userId) entry.userId = user.userId;
        hpb.sessions.set(sid, entry);
      }
    } else if (event.target === 'roomlist') {
      if (!rs.isGuest) refreshRoomsSoon();
      return;
    } else {
      return; // chat messages arrive through the chat long-poll
    }
    const users = [...hpb.sessions.values()].map((known) => ({
      sessionId: known.roomSessionId || known.id,
      signalingId: known.id,
      userId: known.userId || '',
      inCall: known.inCall || 0,
    }));
    usersInRoom(rs, users);
  }

  /** The connection lost (or refused): back off, fetch a fresh ticket, connect again. */
  function hpbLost(rs, ws) {
    const hpb = rs.hpb;
    if (!hpb || hpb.ws !== ws) return;
    hpb.ws = null;
    hpb.ownId = null;
    hpb.sessions.clear();
    for (const waiting of hpb.requests.values()) {
      clearTimeout(waiting.timer);
      waiting.onError(new Error('The signaling server closed the connection'));
    }
    hpb.requests.clear();
    if (!rs.alive || hpb.stopped) return;
    if (rs.inCall) closeAllPeers(); // a new session publishes and subscribes anew
    sleep(backoffMs(++hpb.failures), rs.signal).then(async () => {
      if (!rs.alive) return;
      const settings = await loadSignalingSettings(rs).catch(() => null);
      if (!rs.alive || hpb.ws) return;
      if (isExternal(settings)) hpb.settings = settings;
      hpbOpen(rs);
    });
  }

  /** Join again as a new Talk session (after recoverSession). */
  function hpbReconnect(rs) {
    rs.hpb.failures = 0;
    if (rs.hpb.ws) rs.hpb.ws.close();
  }

  function hpbStop(rs) {
    const hpb = rs.hpb;
    hpb.stopped = true;
    const ws = hpb.ws;
    if (!ws) return;
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ id: 'bye', type: 'bye', bye: {} }));
    ws.close();
  }

  /** Our camera and microphone to Janus: an offer to our own signaling session. */
  async function hpbPublish(rs) {
    const hpb = rs.hpb;
    if (!call.local || !hpb.ownId || call.publisher) return;
    const peer = { sid: hpb.ownId, connectionId: randomHex(8), pending: [], stream: null, video: null };
    peer.pc = newPeerConnection(rs, peer, 'video');
    for (const track of call.local.getTracks()) peer.pc.addTransceiver(track, { direction: 'sendonly', streams: [call.local] });
    peer.pc.oniceconnectionstatechange = () => {
      if (peer.pc.iceConnectionState !== 'failed' || call.publisher !== peer) return;
      closePublisher();
      hpbPublish(rs);
    };
    call.publisher = peer;
    try {
      await peer.pc.setLocalDescription(await peer.pc.createOffer());
      if (call.publisher !== peer) return;
      const data = {
        to: hpb.ownId,
        from: hpb.ownId,
        type: 'offer',
        roomType: 'video',
        sid: peer.connectionId,
        payload: { type: 'offer', sdp: peer.pc.localDescription.sdp },
      };
      hpbSendTo(rs, hpb.ownId, data, (error) => {
        if (call.publisher === peer) setText('call-error', `The media server did not take our stream: ${error.message}`);
      });
    } catch (error) {
      console.warn('publishing failed', error);
    }
  }

  function closePublisher() {
    const peer = call.publisher;
    if (!peer) return;
    call.publisher = null;
    peer.pc.close();
  }

  /**
   * Ask Janus to offer us `peer`'s stream. The server refuses (with an error)
   * while the stream has not reached Janus, and ignores us (silently) while it
   * does not yet count both of us in the call: ask again after a refusal, after
   * a silence, and when the call changes, a bounded number of times.
   */
  function requestOffer(rs, peer) {
    if ((peer.asked || 0) >= REQUEST_OFFER_TRIES || Date.now() - (peer.askedAt || 0) < OFFER_WAIT_MS / 3) return;
    peer.asked = (peer.asked || 0) + 1;
    peer.askedAt = Date.now();
    const again = (ms) =>
      sleep(ms, rs.signal).then(() => {
        if (rs.inCall && call.peers.get(peer.sid) === peer && !peer.pc.remoteDescription) requestOffer(rs, peer);
      });
    hpbSendTo(rs, peer.sid, { type: 'requestoffer', roomType: 'video' }, () => again(backoffMs(peer.asked)));
    again(OFFER_WAIT_MS);
  }

  /** The Talk session behind a signaling session (the same id with internal signaling). */
  function talkSessionOf(rs, sid) {
    const known = rs.hpb && rs.hpb.sessions.get(sid);
    return known && known.roomSessionId ? known.roomSessionId : sid;
  }

  // -------------------------------------------------------------------------
  // 14. Start-up
  // -------------------------------------------------------------------------

  function bind() {
    const on = (id, event, handler) => $(id).addEventListener(event, handler);
    on('login-form', 'submit', async (event) => {
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
        $('login-password').value = '';
        setText('login-error', error.status ? error.message : `Could not sign in: ${error.message}`);
        $('login-password').focus();
      } finally {
        button.disabled = false;
      }
    });
    on('guest-form', 'submit', submitGuestJoin);
    on('guest-signin', 'click', () => showLogin());
    on('signout', 'click', () => signOut());
    on('new-room-form', 'submit', createRoom);
    on('new-room-type', 'change', updateNewRoomPlaceholder);
    userCombo($('new-room-name'), $('user-suggestions'), {
      enabled: () => $('new-room-type').value === '1',
      pick: (item) => {
        $('new-room-name').value = item.id;
        createRoom();
      },
    });
    userCombo($('add-participant-id'), $('add-suggestions'), {
      enabled: () => true,
      itemType: () => (state.room ? state.room.token : null),
      pick: (item) => {
        $('add-participant-id').value = item.id;
        addParticipant();
      },
    });
    on('room-search', 'input', () => {
      state.search = $('room-search').value;
      renderRooms();
    });
    on('room-search', 'keydown', (event) => {
      if (event.key === 'Escape') {
        $('room-search').value = '';
        state.search = '';
        renderRooms();
      } else if (event.key === 'Enter') {
        const first = $('room-list').querySelector('a');
        if (first) first.click();
      }
    });
    on('back', 'click', () => {
      if (state.me && state.me.guest) return;
      location.hash = '#/';
    });
    on('composer', 'submit', (event) => {
      event.preventDefault();
      sendMessage();
    });
    on('message-input', 'keydown', (event) => {
      if (event.isComposing) return;
      if (mentions.keydown(event)) return event.preventDefault();
      if (event.key === 'Enter' && !event.shiftKey) {
        event.preventDefault();
        sendMessage();
      } else if (event.key === 'Escape') {
        cancelReply();
        cancelEdit();
      } else if (event.key === 'ArrowUp' && !$('message-input').value && state.room) {
        // As in most chats: ArrowUp in an empty box edits your last message.
        const mine = [...state.room.messages.values()].filter((m) => m.node && m.message.messageType === 'comment' && isMine(state.room, m.message) && !pollOf(m.message));
        if (mine.length) {
          event.preventDefault();
          startEdit(state.room, mine[mine.length - 1].message.id);
        }
      }
    });
    on('message-input', 'input', () => {
      autoGrow();
      mentions.update();
    });
    on('message-input', 'blur', () => setTimeout(() => document.activeElement !== $('message-input') && mentions.close(), 150));
    on('reply-cancel', 'click', cancelReply);
    on('edit-cancel', 'click', cancelEdit);
    on('message-list', 'scroll', () => {
      const rs = state.room;
      if (rs && rs.historyLoaded && $('message-list').scrollTop < 80) loadOlder(rs);
    });
    on('reaction-picker', 'click', (event) => {
      const button = event.target.closest('button[data-emoji]');
      if (!button || !state.room || pickerFor === null) return;
      const id = pickerFor;
      hideReactionPicker();
      toggleReaction(state.room, id, button.dataset.emoji);
    });
    on('reaction-picker', 'keydown', (event) => {
      const buttons = [...$('reaction-picker').querySelectorAll('button')];
      const i = buttons.indexOf(document.activeElement);
      if (event.key === 'Escape') hideReactionPicker();
      else if (event.key === 'ArrowRight' || event.key === 'ArrowLeft') {
        event.preventDefault();
        buttons[(i + (event.key === 'ArrowRight' ? 1 : -1) + buttons.length) % buttons.length].focus();
      }
    });
    document.addEventListener('click', (event) => {
      if (!$('reaction-picker').hidden && !event.target.closest('#reaction-picker, [data-action=react]')) hideReactionPicker();
    });
    on('poll-open', 'click', openPollDialog);
    on('poll-close', 'click', () => $('poll-dialog').close());
    on('poll-add-option', 'click', addPollOption);
    on('poll-form', 'submit', submitPoll);
    on('participants-toggle', 'click', () => toggleParticipants());
    on('participants-close', 'click', () => toggleParticipants(false));
    on('add-participant-form', 'submit', addParticipant);
    on('leave-room', 'click', (event) => confirmClick(event.currentTarget, 'Click again to leave', leaveRoomForGood));
    on('room-settings', 'click', openSettings);
    on('room-favorite', 'click', toggleFavorite);
    on('call-join', 'click', joinCall);
    const hangUp = () => state.room && leaveCall(state.room, { tellServer: true });
    on('call-leave', 'click', hangUp);
    on('call-hangup', 'click', hangUp);
    on('toggle-mic', 'click', () => toggleTracks('audio'));
    on('toggle-camera', 'click', () => toggleTracks('video'));
    on('toggle-screen', 'click', toggleScreen);
    on('toggle-hand', 'click', toggleHand);
    on('phone-open', 'click', openPhonePanel);
    on('phone-close', 'click', closePhonePanel);
    on('phone-dialog', 'close', () => {
      $('phone-qr').replaceChildren();
      setText('phone-password', '');
      show('phone-result', false);
    });
    on('phone-form', 'submit', createAppPassword);
    on('notify-enable', 'click', async () => {
      try {
        await Notification.requestPermission();
      } catch (error) {
        /* refused */
      }
      renderNotifyButton();
    });
    on('banner-retry', 'click', () => {
      connection.retryAt = Date.now();
      renderBanner();
      wakeSleepers();
      if (state.me && !state.me.guest) refreshRoomsSoon();
    });
    bindSettings();
    if (darkMode) {
      darkMode.addEventListener('change', () => {
        for (const img of document.querySelectorAll('img[data-light]')) img.src = isDark() ? img.dataset.dark : img.dataset.light;
      });
    }
    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', () => {
      const rs = state.room;
      if (document.hidden || !rs) return;
      state.hiddenUnread = 0;
      updateTitle(0);
      // Back to the tab: what arrived meanwhile is read now.
      if (rs.sessionId && rs.newestId) {
        api('POST', `/chat/${rs.token}/read`, { lastReadMessage: rs.newestId }, { base: V1, signal: rs.signal })
          .then(() => refreshRoomsSoon(100))
          .catch(() => {});
      }
      renderRooms();
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
    const started = performance.now();
    bind();
    sessionStorage.removeItem('talk-auth'); // what older versions kept: a password
    try {
      state.me = await retrying(() => whoAmI());
      window.talkDebug.timings.signedInAt = performance.now();
    } catch (error) {
      state.me = null;
    }
    renderNotifyButton();
    route();
    window.talkDebug.timings.startMs = Math.round(performance.now() - started);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
