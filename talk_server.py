"""talk-server: the Nextcloud Talk ("spreed") API v1 on Bottle, SQLite and Waitress.

A small, dependable server for rooms, participants, calls, chat with
long-polling and the internal WebRTC signaling, for a Raspberry Pi, a local
mock server or a demo.

Run it::

    talk-server serve --db talk.sqlite3          # http://127.0.0.1:8080
    talk-server user add alice --password secret

Embed it (for example in another project's tests)::

    with talk_server.serve_in_thread(tmp_path / "talk.db") as url:
        ...

Sections of this module, in order:

    constants . errors and the OCS envelope . database . data access
    (users and groups, sessions, rooms, participants, calls, chat, signaling,
    avatars, user status, autocomplete) . JSON shapes . auth and request
    helpers (multipart too) . long-poll notifier . the outbox of signed POSTs
    (bot webhooks; notifications to a High-Performance Backend's signaling
    server) . avatar images (font, PNG writer, upload and emoji checks) . room
    operations . routes, one section
    per API generation (v1: room management, participant management, call
    management, chat, signaling; v3: signaling; v4: calls, conversations,
    participants), bots, the signaling server's backend requests,
    sign-in for apps, avatars, user status, user search, capabilities and
    accounts . app factory . serving . command line
"""

__version__ = "0.1.0"

import argparse
import base64
import collections
import contextlib
import ctypes
import gc
import getpass
import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import bottle
import waitress
import waitress.channel
import waitress.task
import waitress.wasyncore

# ---------------------------------------------------------------------------
# Constants, in the API document's order
# ---------------------------------------------------------------------------

# One route serves OCS v1 and v2 (<ocs> is "1" or "2"): half the routes to
# compile at start.
SPREED_PREFIX = "/ocs/v<ocs:re:[12]>.php/apps/spreed/api"
API_PREFIX = SPREED_PREFIX + "/v1"
API_V3_PREFIX = SPREED_PREFIX + "/v3"
API_V4_PREFIX = SPREED_PREFIX + "/v4"
CLOUD_PREFIX = "/ocs/v<ocs:re:[12]>.php/cloud"
USER_STATUS_PREFIX = "/ocs/v<ocs:re:[12]>.php/apps/user_status/api/v1"
AUTOCOMPLETE_PREFIX = "/ocs/v<ocs:re:[12]>.php/core/autocomplete"

# Room types
ROOM_ONE_TO_ONE = 1
ROOM_GROUP = 2
ROOM_PUBLIC = 3
ROOM_TYPES = (ROOM_ONE_TO_ONE, ROOM_GROUP, ROOM_PUBLIC)
ROOM_CHANGELOG = 4
ROOM_FORMER_ONE_TO_ONE = 5
ROOM_NOTE_TO_SELF = 6
ROOM_TYPES_V4 = (ROOM_ONE_TO_ONE, ROOM_GROUP, ROOM_PUBLIC, ROOM_NOTE_TO_SELF)

# Participant types
OWNER = 1
MODERATOR = 2
USER = 3
GUEST = 4
USER_SELF_JOINED = 5
MEMBER_TYPES = (OWNER, MODERATOR, USER)
MODERATOR_TYPES = (OWNER, MODERATOR)

# Sessions and activity (SPEC 2)
ACTIVE_SECONDS = 30  # a session is active when seen within this window
GUEST_EXPIRY_SECONDS = 30  # inactive guest rows may be deleted after this
SESSION_ID_LENGTH = 512
SESSION_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
TOKEN_LENGTH = 8
TOKEN_ALPHABET = "abcdefghijkmnopqrstuvwxyz23456789"
IN_CALL = 1  # bit of sessions.in_call
# In-call flags (sessions.in_call, an integer on today's routes)
FLAG_IN_CALL, FLAG_AUDIO, FLAG_VIDEO, FLAG_PHONE = 1, 2, 4, 8
CALL_FLAGS_ALL = FLAG_IN_CALL | FLAG_AUDIO | FLAG_VIDEO | FLAG_PHONE
CALL_FLAGS_DEFAULT = FLAG_IN_CALL | FLAG_AUDIO | FLAG_VIDEO  # POST /call without flags
# No ping (today's API): chat and signaling requests keep a session alive; one
# not seen for this long has left the call (a signaling poll waits 30 s, plus
# slack, as spreed's usersInRoom window).
CALL_TIMEOUT_SECONDS = 40
DEVICE_COOKIE = "talk_device"  # names a client's sessions on today's routes

# Permissions (docs/constants.md): a custom set carries bit 1; 0 is "the default"
PERM_CUSTOM, PERM_CALL_START, PERM_CALL_JOIN, PERM_LOBBY_IGNORE = 1, 2, 4, 8
PERM_AUDIO, PERM_VIDEO, PERM_SCREEN, PERM_CHAT = 16, 32, 64, 128
PERMISSIONS_DEFAULT_SET = 2 | 4 | 16 | 32 | 64 | 128  # what members may do by default
PERMISSIONS_ALL = 254  # moderators

# Conversation settings (docs/constants.md)
LOBBY_NONE, LOBBY_NON_MODERATORS = 0, 1
LISTABLE_NONE, LISTABLE_USERS, LISTABLE_ALL = 0, 1, 2
NOTIFY_DEFAULT, NOTIFY_ALWAYS, NOTIFY_MENTION, NOTIFY_NEVER = 0, 1, 2, 3
ROOM_NAME_MAX_V4 = 255
DESCRIPTION_MAX = 2000

# Room management
ROOM_NAME_MAX = 200

# Chat
CHAT_DEFAULT_TIMEOUT = 30
CHAT_MAX_TIMEOUT = 60
MESSAGE_MAX = 32000
CHAT_PER_MINUTE = 60  # messages one session (or user) may post in a minute
CHAT_BYTES_PER_MINUTE = 512 * 1024  # ...and their bytes
ROOM_FLOW_FACTOR = 5  # a conversation takes this many senders' share
GUESTS_PER_ROOM = 100  # guest rows one conversation holds at most
CHAT_PAGE_MAX = 1000  # messages in one answer, the oldest after the offset
# Today's chat (docs/chat.md)
CHAT_LIMIT_DEFAULT, CHAT_LIMIT_MAX = 100, 200
CONTEXT_LIMIT_DEFAULT, CONTEXT_LIMIT_MAX = 50, 100
REFERENCE_ID_MAX = 64
EDIT_MAX_AGE = 24 * 3600  # own messages may be edited for a day
DELETE_MAX_AGE = 6 * 3600  # and deleted for six hours
REACTION_MAX = 16  # characters of one reaction (an emoji with its modifiers)
GUEST_NAME_MAX = 64

# Bots (spreed docs/bots.md, lib/Model/Bot.php): states, feature bits and
# the limits of talk:bot:install (BotService::validateBotParameters)
BOT_DISABLED, BOT_ENABLED, BOT_NO_SETUP = 0, 1, 2
BOT_WEBHOOK, BOT_RESPONSE, BOT_EVENT, BOT_REACTION = 1, 2, 4, 8
BOT_FEATURES = {"webhook": BOT_WEBHOOK, "response": BOT_RESPONSE, "event": BOT_EVENT,
                "reaction": BOT_REACTION}
BOT_NAME_MAX = 64  # bytes, as Talk's strlen counts
BOT_SECRET_MIN, BOT_SECRET_MAX = 40, 128
BOT_URL_MAX = BOT_DESCRIPTION_MAX = 4000
BOT_RANDOM_MIN = 32  # X-Nextcloud-Talk-Bot-Random of a bot's request
WEBHOOK_RANDOM_LENGTH = 64  # X-Nextcloud-Talk-Random of ours
WEBHOOK_TIMEOUT = 5  # seconds a bot has to answer; no retry (as Talk)
WEBHOOK_QUEUE_MAX = 64  # deliveries waiting; more are dropped and counted as errors
WEBHOOK_WORKERS = 2  # threads delivering, started with the first webhook
WEBHOOK_BATCH = 100  # new messages one look hands to the bots
RETRY_DELAY = 0.5  # seconds before an outbox tries a failed delivery again (then twice that)
MENTIONS_LIMIT_DEFAULT = 20
POLL_PUBLIC, POLL_HIDDEN = 0, 1
POLL_OPEN, POLL_CLOSED = 0, 1
POLL_QUESTION_MAX, POLL_OPTION_MAX = 32000, 32000

# Signaling
SIGNALING_TIMEOUT = 30
SIGNALING_TTL = 300  # queued signaling messages live five minutes (as Talk)
SIGNALING_QUEUE_MAX = 500  # per recipient session
SIGNALING_MESSAGE_MAX = 16 * 1024  # bytes of one `fn` payload
SIGNALING_QUEUE_BYTES = 256 * 1024  # queued for one recipient session
SIGNALING_PER_MINUTE = 600  # signaling messages one session may send in a minute
SIGNALING_BYTES_PER_MINUTE = 2 * 1024 * 1024  # ...and their bytes
DEFAULT_STUN = "stun.nextcloud.com:443"
# TURN credentials open a relay: hours, not the 24 hours of SPEC 7, and only
# for users and joined guests.
TURN_CREDENTIAL_SECONDS = 4 * 3600
# The High-Performance Backend (nextcloud-spreed-signaling, docs/standalone-signaling-api-v1.md)
HPB_RANDOM_MIN = 32  # Spreed-Signaling-Random of its requests
HPB_RANDOM_LENGTH = 64  # ...and of ours
HPB_TIMEOUT = 5  # seconds the signaling server has to answer a notification
HPB_ATTEMPTS = 3  # a notification is tried this often before it is dropped (logged)
HPB_QUEUE_MAX = 256  # notifications waiting; more are dropped (logged)
HPB_WORKERS = 2
HPB_PING_MAX = 1000  # sessions one backend ping may name
# A hello v1 ticket is good this long after it was issued (spreed's never expire;
# the apps fetch fresh settings before each call, the web client before each connect).
SIGNALING_TICKET_SECONDS = 12 * 3600

# Capabilities (SPEC 8, 11): the 2018 names first, then today's, each listed
# only once its routes work (a listed feature the apps cannot use becomes an
# error screen in them).
FEATURES_2018 = ["audio", "video", "chat", "guest-signaling", "empty-group-room"]
FEATURES = FEATURES_2018 + [
    "conversation-v4",
    "multi-room-users",
    "favorites",
    "notification-levels",
    "notification-calls",
    "read-only-rooms",
    "listable-rooms",
    "webinary-lobby",
    "conversation-permissions",
    "room-description",
    "note-to-self",
    "message-expiration",
    "last-room-activity",
    "invite-groups-and-mails",
    "locked-one-to-one-rooms",
    "force-mute",  # moderators' mute travels as a relayed signaling message
    "avatar",
    # Today's chat (docs/chat.md, reaction.md, poll.md)
    "chat-v2",
    "system-messages",
    "mention-flag",
    "chat-read-marker",
    "chat-read-last",
    "chat-unread",
    "chat-read-status",
    "chat-reference-id",
    "chat-replies",
    "chat-get-context",
    "silent-send",
    "delete-messages",
    "edit-messages",
    "clear-history",
    "reactions",
    "talk-polls",
    "signaling-v3",
    "no-ping",
    "in-call-flags",
    "start-call-flag",
    "conversation-call-flags",
    "silent-call",  # nothing rings here, so every call is silent anyway
    "bots-v1",  # webhook bots (docs/bots.md)
]
# Today's apps refuse old servers: Android wants at least 17, Talk Desktop 27.
NEXTCLOUD_VERSION = (31, 0, 0, 0)
SPREED_VERSION = "21.0.0"  # the Talk release whose API this server follows

# Avatars: generated user avatars (a PNG at 16..512 px), conversation
# avatars (uploaded PNG or JPEG, or an emoji on a colour)
AVATAR_SIZE_MIN, AVATAR_SIZE_MAX = 16, 512
AVATAR_CACHE_ENTRIES = 256  # generated PNGs kept in memory (a few KiB each)
AVATAR_UPLOAD_MAX = 5 * 1024 * 1024  # Talk allows 20 MiB; a Pi keeps uploads in memory
AVATAR_BODY_MAX = AVATAR_UPLOAD_MAX + 64 * 1024  # the multipart framing around it
AVATAR_DEFAULT_COLORS = {False: "6b6b6b", True: "3b3b3b"}  # Talk's bright and dark
AVATAR_FIXED_TYPES = (1, 5)  # one-to-one rooms (and former ones) show the other user
EMOJI_MAX_CODEPOINTS = 16  # one grapheme: family, flag and job sequences fit

# User status (the Nextcloud user_status app)
STATUS_TYPES = ("online", "away", "dnd", "invisible", "offline")
HEARTBEAT_TYPES = ("online", "away")
STATUS_MESSAGE_MAX = 80
STATUS_STALE_SECONDS = 15 * 60  # an automatic status goes offline without heartbeats
STATUS_LIST_MAX = 200
# (id, icon, message, default clearAt) as the user_status app offers them.
PREDEFINED_STATUSES = (
    ("meeting", "\U0001f4c5", "In a meeting", {"type": "period", "time": 3600}),
    ("commuting", "\U0001f68c", "Commuting", {"type": "period", "time": 1800}),
    ("be-right-back", "\u23f3", "Be right back", {"type": "period", "time": 900}),
    ("remote-work", "\U0001f3e1", "Working remotely", {"type": "end-of", "time": "day"}),
    ("sick-leave", "\U0001f912", "Out sick", {"type": "end-of", "time": "day"}),
    ("vacationing", "\U0001f334", "Vacationing", None),
)
PREDEFINED_BY_ID = {entry[0]: entry for entry in PREDEFINED_STATUSES}

# User search for invitations (core autocomplete)
AUTOCOMPLETE_DEFAULT_LIMIT = 10
AUTOCOMPLETE_MAX_LIMIT = 100
SHARE_TYPE_USER, SHARE_TYPE_GROUP = 0, 1

# Accounts
ADMIN_GROUP = "admin"
ID_PATTERN = re.compile(r"[A-Za-z0-9 _.@'-]{1,64}")
DEMO_USERS = (("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol"))
GUEST_COOKIE = "talk_guest"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
CREDENTIAL_CACHE_SECONDS = 300
THROTTLE_FREE_FAILURES = 5  # failed logins from one address before any delay
THROTTLE_MAX_DELAY = 300  # seconds
THROTTLE_FORGET = 3600  # failures older than this no longer count
THROTTLE_NAME_FACTOR = 4  # a user name or room tolerates this many times more
ROOMS_PER_MINUTE = 30  # rooms one user may create in a minute

# Sign-in for apps: app passwords, the sign-in page, login flows v1 and v2
CORE_PREFIX = "/ocs/v<ocs:re:[12]>.php/core"
APP_PASSWORD_LENGTH = 72  # as Nextcloud's, of [A-Za-z0-9]
APP_PASSWORD_PATTERN = re.compile(r"[A-Za-z0-9]{72}")
APP_PASSWORD_NAME_MAX = 200
LAST_USED_EVERY = 60  # seconds: app_passwords.last_used is written at most this often
WEB_COOKIE = "talk_session"  # the sign-in page's session
PRE_SESSION_COOKIE = "talk_presession"  # ties the sign-in form's CSRF token to a browser
WEB_SESSION_IDLE = 7 * 24 * 3600  # a web session unused this long ends
LOGIN_FLOW_SECONDS = 20 * 60  # login flows v1 and v2 expire (as Nextcloud)
LOGIN_FLOWS_PER_MINUTE = 60  # flows one address may start in a minute
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # flow tokens live in page URLs
    "Cache-Control": "no-store",
}

# The browser client's pages: its own files and API only, never in a frame
CLIENT_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# Serving
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_THREADS = 64
DEFAULT_RESERVE = 4
DEFAULT_MAX_BODY = 1024 * 1024
MULTIPART_MAX_PARTS = 100
CONNECTIONS_PER_ADDRESS = 32  # open connections one client address may hold
REQUEST_TIMEOUT = 10  # seconds to send a whole request (headers and body)

# ---------------------------------------------------------------------------
# Errors and the OCS envelope
# ---------------------------------------------------------------------------

STATUS_MESSAGES = {
    400: "Bad request",
    401: "Unauthorised",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    412: "Precondition failed",
    413: "Request body too large",
    429: "Too many requests",
    500: "Internal server error",
}


class OCSError(Exception):
    """An endpoint's error: HTTP status (v2), a short reason, optional data."""

    def __init__(self, status, message=None, data=None, v1_code=None):
        super().__init__(message or STATUS_MESSAGES.get(status, "Error"))
        self.status = status
        self.message = message or STATUS_MESSAGES.get(status, "Error")
        self.data = [] if data is None else data
        self.v1_code = v1_code  # a v1 statuscode other than the HTTP one


class CSRFError(Exception):
    """The OCS-APIRequest header is missing (SPEC 1.4)."""


def fail(status, message=None, data=None, v1_code=None):
    """Raise an OCS error."""
    raise OCSError(status, message, data, v1_code)


@dataclass
class Reply:
    """A successful answer with a status other than 200."""

    status: int
    data: object


@dataclass
class Shared:
    """A 200 answer many requests reuse (room lists within a second): its
    entry holds the data and, once encoded, the body per OCS version and format."""

    entry: dict


def shared_answer(cache: dict, key, build) -> Shared:
    """The cached answer for `key`, else build() it; the cache stays bounded."""
    entry = cache.get(key)
    if entry is None:
        entry = {"data": build()}
        if len(cache) > 1000:
            cache.clear()
        cache[key] = entry
    return Shared(entry)


@dataclass
class Binary:
    """An answer that is not an envelope (an image): its bytes, type and ETag."""

    body: bytes
    content_type: str
    etag: str = ""


def ocs_meta(version, status, message):
    """The envelope's meta for OCS `version` (1 or 2) and HTTP-like `status`."""
    # Failed authentication carries Nextcloud's statuscode 997 (SPEC 1.5).
    code = 997 if status == 401 else status
    if version == 1:
        # Only a 200 becomes 100: a 201 keeps its code, and so its status is
        # "failure", as Nextcloud's OCS v1 answers it (SPEC 1.3).
        code = 100 if status == 200 else code
        return {
            "status": "ok" if code == 100 else "failure",
            "statuscode": code,
            "message": message,
            "totalitems": "",
            "itemsperpage": "",
        }
    return {
        "status": "ok" if 200 <= status < 300 else "failure",
        "statuscode": code,
        "message": message,
    }


def http_status(version, status):
    """The HTTP status for an OCS answer: v1 answers 200 but for 401 (SPEC 1.3)."""
    if version == 1:
        return 401 if status == 401 else 200
    return status


# Characters XML 1.0 cannot carry at all, even escaped: C0 controls but tab,
# newline and carriage return, lone surrogates, U+FFFE and U+FFFF.
XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_escape(text: str) -> str:
    """Escape for XML text and attributes; characters XML cannot carry become
    U+FFFD, so no stored value can make an answer unparseable."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return XML_INVALID.sub("\ufffd", text)


def xml_value(value):
    """Encode a JSON-able value as OCS XML: lists as <element>, true as 1."""
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            key = str(key)
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
                parts.append(f"<{key}>{xml_value(item)}</{key}>")
            else:
                attr = xml_escape(key).replace('"', "&quot;")
                parts.append(f'<element key="{attr}">{xml_value(item)}</element>')
        return "".join(parts)
    if isinstance(value, list | tuple):
        return "".join(f"<element>{xml_value(item)}</element>" for item in value)
    if value is True:
        return "1"
    if value is False or value is None:
        return ""
    return xml_escape(str(value))


CONTENT_TYPES = {"xml": "application/xml; charset=utf-8", "json": "application/json; charset=utf-8"}


def encode(fmt, document):
    """Encode a document as JSON or XML bytes and set the content type."""
    bottle.response.content_type = CONTENT_TYPES["xml" if fmt == "xml" else "json"]
    if fmt == "xml":
        return ('<?xml version="1.0"?>\n' + xml_value(document)).encode("utf-8")
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def envelope(version, fmt, status, data, message="OK"):
    """Build the whole OCS answer: status line, content type and body bytes."""
    bottle.response.status = http_status(version, status)
    meta = ocs_meta(version, status, message)
    return encode(fmt, {"ocs": {"meta": meta, "data": data}})


def ocs_version(path):
    """1 for paths under /ocs/v1.php, else 2."""
    return 1 if path.startswith("/ocs/v1.php/") else 2


def format_from_accept(environ):
    """JSON when the Accept header names it, else XML (as Nextcloud)."""
    return "json" if "application/json" in environ.get("HTTP_ACCEPT", "") else "xml"


def error_page(error):
    """Router-level errors (unknown path, wrong method, crash) as envelopes."""
    request = bottle.request
    status = error.status_code
    fmt = format_from_accept(request.environ)
    if request.query.get("format") in ("json", "xml"):
        fmt = request.query.get("format")
    message = {404: "Unknown path", 405: "Method not allowed"}.get(
        status, STATUS_MESSAGES.get(status, "Error")
    )
    body = envelope(ocs_version(request.path), fmt, status, [], message)
    bottle.response.status = status  # a router error keeps its real status
    return body


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------


def data_path(name):
    """A file shipped beside this module (a checkout) or in talk_server_data (installed)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here / "talk_server_data" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{name} is missing from the installation")


def schema_path():
    return data_path("schema.sql")


SCHEMA_VERSION = 2

# Each migration brings a database from version (index + 1) to (index + 2).
# They run with foreign keys off (a table rebuild must not cascade), and are
# frozen: a later schema.sql changes nothing here.
MIGRATIONS: list[str] = [
    # 2: sign-in for apps, today's conversations, several sessions per attendee
    # today's chat (system messages, replies, reactions, polls, read markers)
    # and webhook bots.
    # incremental vacuum (migrate() then runs the VACUUM that applies it).
    """
    PRAGMA auto_vacuum = INCREMENTAL;
    ALTER TABLE users ADD COLUMN email TEXT NOT NULL DEFAULT '';
    ALTER TABLE users ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE server_secrets (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE app_passwords (
        id         INTEGER PRIMARY KEY,
        user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name       TEXT NOT NULL DEFAULT '',
        token_hash TEXT NOT NULL UNIQUE,
        created    INTEGER NOT NULL,
        last_used  INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX app_passwords_by_user ON app_passwords (user_id);
    CREATE TABLE web_sessions (
        id_hash   TEXT PRIMARY KEY,
        user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        csrf      TEXT NOT NULL,
        created   INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX web_sessions_by_user ON web_sessions (user_id);
    CREATE TABLE login_flows (
        id              INTEGER PRIMARY KEY,
        version         INTEGER NOT NULL CHECK (version IN (1, 2)),
        login_token     TEXT NOT NULL UNIQUE,
        poll_token_hash TEXT UNIQUE,
        client_name     TEXT NOT NULL DEFAULT '',
        created         INTEGER NOT NULL,
        user_id         TEXT REFERENCES users (id) ON DELETE CASCADE,
        app_password    TEXT
    );
    CREATE TABLE user_status (
        user_id          TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
        status           TEXT NOT NULL DEFAULT 'online',
        message          TEXT NOT NULL DEFAULT '',
        icon             TEXT NOT NULL DEFAULT '',
        clear_at         INTEGER,
        status_timestamp INTEGER NOT NULL DEFAULT 0,
        message_id       TEXT,
        user_defined     INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE rooms_v2 (
        id                  INTEGER PRIMARY KEY,
        token               TEXT NOT NULL UNIQUE,
        type                INTEGER NOT NULL CHECK (type BETWEEN 1 AND 6),
        name                TEXT NOT NULL DEFAULT '',
        password_hash       TEXT NOT NULL DEFAULT '',
        last_activity       INTEGER NOT NULL DEFAULT 0,
        description         TEXT NOT NULL DEFAULT '',
        created             INTEGER NOT NULL DEFAULT 0,
        read_only           INTEGER NOT NULL DEFAULT 0,
        listable            INTEGER NOT NULL DEFAULT 0,
        lobby_state         INTEGER NOT NULL DEFAULT 0,
        lobby_timer         INTEGER NOT NULL DEFAULT 0,
        default_permissions INTEGER NOT NULL DEFAULT 0,
        call_permissions    INTEGER NOT NULL DEFAULT 0,
        message_expiration  INTEGER NOT NULL DEFAULT 0,
        object_type         TEXT NOT NULL DEFAULT '',
        object_id           TEXT NOT NULL DEFAULT '',
        call_flag           INTEGER NOT NULL DEFAULT 0,
        call_start_time     INTEGER NOT NULL DEFAULT 0,
        avatar              BLOB,
        avatar_type         TEXT NOT NULL DEFAULT '',
        avatar_color        TEXT NOT NULL DEFAULT '',
        avatar_version      INTEGER NOT NULL DEFAULT 0,
        modified            INTEGER NOT NULL DEFAULT 0,
        last_seq            INTEGER NOT NULL DEFAULT 0,
        last_legacy_seq     INTEGER NOT NULL DEFAULT 0,
        last_message_id     INTEGER NOT NULL DEFAULT 0,
        last_message_time   INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO rooms_v2 (id, token, type, name, password_hash, last_activity, created)
    SELECT id, token, type, name, password_hash, last_activity, last_activity FROM rooms;
    DROP TABLE rooms;
    ALTER TABLE rooms_v2 RENAME TO rooms;
    CREATE TABLE room_avatars (
        room_id INTEGER PRIMARY KEY REFERENCES rooms (id) ON DELETE CASCADE,
        data    BLOB NOT NULL
    );
    ALTER TABLE participants ADD COLUMN favorite INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN notification_level INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN notification_calls INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE participants ADD COLUMN permissions INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN last_read_message INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN guest_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE participants ADD COLUMN modified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN read_legacy_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN last_mention_message INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN last_mention_direct INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE sessions_v2 (
        seq            INTEGER PRIMARY KEY,
        id             TEXT NOT NULL UNIQUE,
        participant_id INTEGER NOT NULL REFERENCES participants (id) ON DELETE CASCADE,
        in_call        INTEGER NOT NULL DEFAULT 0,
        last_ping      INTEGER NOT NULL DEFAULT 0,
        device         TEXT
    );
    INSERT INTO sessions_v2 (id, participant_id, in_call, last_ping)
    SELECT s.id, s.participant_id, s.in_call, p.last_ping
      FROM sessions AS s JOIN participants AS p ON p.id = s.participant_id;
    DROP TABLE sessions;
    ALTER TABLE sessions_v2 RENAME TO sessions;
    CREATE INDEX sessions_by_participant ON sessions (participant_id, seq);
    CREATE TABLE messages_v2 (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        room_id      INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
        seq          INTEGER NOT NULL,
        actor_type   TEXT NOT NULL,
        actor_id     TEXT NOT NULL,
        timestamp    INTEGER NOT NULL,
        message      TEXT NOT NULL,
        legacy_seq   INTEGER,
        message_type TEXT NOT NULL DEFAULT 'comment',
        verb         TEXT NOT NULL DEFAULT '',
        parameters   TEXT NOT NULL DEFAULT '{}',
        actor_name   TEXT NOT NULL DEFAULT '',
        reference_id TEXT NOT NULL DEFAULT '',
        parent_id    INTEGER NOT NULL DEFAULT 0,
        silent       INTEGER NOT NULL DEFAULT 0,
        reactions    TEXT NOT NULL DEFAULT '{}',
        edit_actor_type TEXT NOT NULL DEFAULT '',
        edit_actor_id   TEXT NOT NULL DEFAULT '',
        edit_actor_name TEXT NOT NULL DEFAULT '',
        edit_time       INTEGER NOT NULL DEFAULT 0,
        expires      INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO messages_v2 (id, room_id, seq, actor_type, actor_id, timestamp, message, legacy_seq)
    SELECT id, room_id, seq, actor_type, actor_id, timestamp, message, seq FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq);
    CREATE UNIQUE INDEX messages_by_legacy_seq ON messages (room_id, legacy_seq);
    CREATE INDEX messages_by_time ON messages (room_id, timestamp) WHERE legacy_seq IS NOT NULL;
    CREATE INDEX messages_by_room ON messages (room_id, id);
    CREATE INDEX messages_by_expiry ON messages (expires) WHERE expires > 0;
    UPDATE rooms SET
        last_seq = coalesce((SELECT max(seq) FROM messages WHERE room_id = rooms.id), 0),
        last_legacy_seq = coalesce((SELECT max(seq) FROM messages WHERE room_id = rooms.id), 0),
        last_message_id = coalesce((SELECT max(id) FROM messages WHERE room_id = rooms.id), 0),
        last_message_time = coalesce(
            (SELECT max(timestamp) FROM messages WHERE room_id = rooms.id), 0);
    CREATE TABLE reactions (
        message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        reaction   TEXT NOT NULL,
        actor_type TEXT NOT NULL,
        actor_id   TEXT NOT NULL,
        actor_name TEXT NOT NULL DEFAULT '',
        timestamp  INTEGER NOT NULL,
        PRIMARY KEY (message_id, reaction, actor_type, actor_id)
    ) WITHOUT ROWID;
    CREATE INDEX reactions_by_actor ON reactions (actor_type, actor_id, message_id);
    CREATE TABLE polls (
        id          INTEGER PRIMARY KEY,
        room_id     INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
        question    TEXT NOT NULL,
        options     TEXT NOT NULL,
        votes       TEXT NOT NULL DEFAULT '{}',
        num_voters  INTEGER NOT NULL DEFAULT 0,
        actor_type  TEXT NOT NULL,
        actor_id    TEXT NOT NULL,
        actor_name  TEXT NOT NULL DEFAULT '',
        status      INTEGER NOT NULL DEFAULT 0,
        result_mode INTEGER NOT NULL DEFAULT 0,
        max_votes   INTEGER NOT NULL DEFAULT 0,
        created     INTEGER NOT NULL
    );
    CREATE INDEX polls_by_room ON polls (room_id);
    CREATE TABLE poll_votes (
        poll_id    INTEGER NOT NULL REFERENCES polls (id) ON DELETE CASCADE,
        actor_type TEXT NOT NULL,
        actor_id   TEXT NOT NULL,
        actor_name TEXT NOT NULL DEFAULT '',
        option_id  INTEGER NOT NULL,
        PRIMARY KEY (poll_id, actor_type, actor_id, option_id)
    ) WITHOUT ROWID;
    CREATE TABLE bots (
        id                 INTEGER PRIMARY KEY,
        name               TEXT NOT NULL,
        url                TEXT NOT NULL,
        url_hash           TEXT NOT NULL UNIQUE,
        description        TEXT NOT NULL DEFAULT '',
        secret             TEXT NOT NULL UNIQUE,
        error_count        INTEGER NOT NULL DEFAULT 0,
        last_error_date    INTEGER NOT NULL DEFAULT 0,
        last_error_message TEXT,
        state              INTEGER NOT NULL DEFAULT 1 CHECK (state IN (0, 1, 2)),
        features           INTEGER NOT NULL DEFAULT 3
    );
    CREATE TABLE bot_conversations (
        bot_id  INTEGER NOT NULL REFERENCES bots (id) ON DELETE CASCADE,
        room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
        state   INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (bot_id, room_id)
    ) WITHOUT ROWID;
    CREATE INDEX bot_conversations_by_room ON bot_conversations (room_id);
    """,
]


def create_private_file(path) -> None:
    """Create `path` readable and writable by its owner only, unless it exists.

    SQLite gives the -wal and -shm files the database file's permissions, so
    rooms, chat and password hashes stay private whatever the umask.
    """
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def connect(path, durability="full") -> sqlite3.Connection:
    """Open the database for one thread at a time, in WAL mode, autocommit."""
    create_private_file(path)
    conn = sqlite3.connect(
        str(path), timeout=10, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    # Only takes effect on a new, empty file (and must come before WAL mode):
    # freed pages can then go back to the file system (reclaim_pages).
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    # Turning a new file to WAL takes an exclusive lock without SQLite's busy
    # handler: two processes starting on one new file can get "database is
    # locked" at once. Try again a few times, backing off (start-up only).
    for attempt in range(10):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 9:
                raise
            time.sleep(0.01 * 2**attempt)
    # FULL syncs the WAL on every commit: an answered write survives a power
    # cut. NORMAL may lose the last commits on power loss (never corrupts).
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA cache_size = -1024")  # KiB; many connections, little memory
    return conn


@contextlib.contextmanager
def transaction(conn):
    """A write transaction that takes the write lock at once (BEGIN IMMEDIATE)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def sql_statements(script: str):
    """Split an SQL script into statements (comments travel with the next one)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""


def migrate(conn):
    """Create the schema in an empty database, or bring an old one up to date.

    Each step runs in one IMMEDIATE transaction, so two processes opening a
    new database at once cannot both create it, and a crash leaves either
    the old version or the new one.
    """
    conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction
    try:
        _migrate(conn)
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # A database made before incremental vacuum: one VACUUM (outside any
        # transaction) rebuilds the file so that it can shrink from now on.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")


def _migrate(conn):
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema {version} is newer than this talk-server ({SCHEMA_VERSION})"
            )
        if version == 0:
            if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                raise RuntimeError("not a talk-server database (tables but no version)")
            for statement in sql_statements(schema_path().read_text(encoding="utf-8")):
                conn.execute(statement)
            return
        for step in range(version, SCHEMA_VERSION):
            for statement in sql_statements(MIGRATIONS[step - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
            raise RuntimeError("migration left rows that break a foreign key")


class Batch:
    """Writes that one COMMIT makes durable together (group commit)."""

    def __init__(self):
        self.size = 0
        self.error: BaseException | None = None
        self.done = threading.Event()


class Database:
    """Pooled connections for reads; one connection for writes, with group commit.

    Writers take turns on the write connection (queued here, never in
    SQLite's busy loop). A writer that finishes while others wait leaves the
    transaction open for them and the last of the group commits for all:
    one sync to disk per group instead of one per request, and nobody is
    answered before its write is on disk. Each writer's changes sit in a
    savepoint, so one that fails is undone alone.
    """

    BATCH_MAX = 64

    def __init__(self, path, durability="full", keep=8):
        self.path = str(path)
        self.durability = durability
        self.keep = keep
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.closed = False
        self._writer = connect(self.path, durability)
        migrate(self._writer)
        self._turn = threading.Condition()
        self._writing = False  # a writer holds the write connection
        self._queued = 0  # writers waiting for their turn
        self._batch: Batch | None = None
        # Bumped after every commit of this process: cached answers built
        # from an older generation are stale.
        self.generation = 0
        # Called with each SQL statement run (sqlite3's trace callback), when
        # set: tests prove that a waiting long-poll runs none.
        self.on_sql = None

    def _borrow(self):
        with self._lock:
            if self.closed:
                raise RuntimeError("database is closed")
            if self._idle:
                return self._idle.pop()
        return connect(self.path, self.durability)

    def _give_back(self, conn):
        with self._lock:
            if not self.closed and len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def read(self):
        """A connection for reads; each statement sees the latest commit."""
        conn = self._borrow()
        conn.set_trace_callback(self.on_sql)
        try:
            yield conn
        finally:
            self._give_back(conn)

    @contextlib.contextmanager
    def write(self):
        """The write connection inside a transaction, durable when the block ends."""
        with self._turn:
            self._queued += 1
            while self._writing:
                self._turn.wait()
            self._queued -= 1
            self._writing = True
        conn = self._writer
        conn.set_trace_callback(self.on_sql)
        if self._batch is None:
            self._batch = Batch()
        batch = self._batch
        batch.size += 1
        failure = None
        try:
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
            conn.execute("SAVEPOINT request")
        except BaseException as error:
            batch.error = failure = error
        if failure is None:
            try:
                yield conn
            except BaseException as error:
                failure = error
            try:
                if failure is not None:
                    conn.execute("ROLLBACK TO request")
                conn.execute("RELEASE request")
            except sqlite3.Error as error:  # SQLite dropped the transaction itself
                batch.error = error
        self._finish(batch)
        if failure is not None:
            raise failure
        batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _finish(self, batch):
        """Commit the batch, or leave it open for the writer next in line."""
        with self._turn:
            if batch.error is None and self._queued and batch.size < self.BATCH_MAX:
                self._writing = False  # the next writer joins this batch
                self._turn.notify()
                return
        try:
            if batch.error is None:
                self._writer.execute("COMMIT")
        except BaseException as error:
            batch.error = error
        finally:
            if self._writer.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("ROLLBACK")
            self._batch = None
            self.generation += 1
            self._pass_turn()
            batch.done.set()

    def _pass_turn(self):
        with self._turn:
            self._writing = False
            self._turn.notify()

    def close(self):
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        with self._turn:
            while self._writing:
                self._turn.wait()
            self._writer.close()


# ---------------------------------------------------------------------------
# Data access: all SQL lives here
# ---------------------------------------------------------------------------

# --- Users and groups -------------------------------------------------------


def hash_password(password: str) -> str:
    """A salted scrypt hash with its parameters: scrypt$n$r$p$salt$hash."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored: str, password: str) -> bool:
    """Compare a password with a stored hash in constant time."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def get_user(db, user_id: str):
    return db.execute(
        """
        SELECT id, display_name, password_hash, email, enabled
          FROM users
         WHERE id = :id
        """,
        {"id": user_id},
    ).fetchone()


def list_users(db, search: str = "") -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT id, display_name
          FROM users
         WHERE instr(lower(id), lower(:search)) > 0
            OR instr(lower(display_name), lower(:search)) > 0
         ORDER BY id
        """,
        {"search": search},
    ).fetchall()


def create_user(db, user_id: str, password_hash: str, display_name: str = "") -> None:
    db.execute(
        """
        INSERT INTO users (id, display_name, password_hash)
        VALUES (:id, :display_name, :password_hash)
        """,
        {"id": user_id, "display_name": display_name or user_id, "password_hash": password_hash},
    )


def set_password_hash(db, user_id: str, password_hash: str) -> None:
    db.execute(
        "UPDATE users SET password_hash = :hash WHERE id = :id",
        {"id": user_id, "hash": password_hash},
    )


def set_display_name(db, user_id: str, display_name: str) -> None:
    db.execute(
        "UPDATE users SET display_name = :name WHERE id = :id",
        {"id": user_id, "name": display_name},
    )


def set_user_enabled(db, user_id: str, enabled: bool) -> None:
    db.execute(
        "UPDATE users SET enabled = :enabled WHERE id = :id",
        {"id": user_id, "enabled": int(enabled)},
    )


def delete_user(db, user_id: str) -> list[tuple[sqlite3.Row, list[str] | None]]:
    """Delete a user and the rooms that cannot live without them (SPEC 9).

    Returns each room the user was in, as it was, with the user ids it had
    when it went with them (None: it lives on without the user), so waiting
    polls there can be woken and the signaling server told.
    """
    rooms = db.execute(
        """
        SELECT r.*,
               (SELECT COUNT(*) FROM participants AS o
                 WHERE o.room_id = r.id AND o.user_id IS NOT NULL
                   AND o.user_id <> :user_id) AS other_users
          FROM rooms AS r
          JOIN participants AS p ON p.room_id = r.id
         WHERE p.user_id = :user_id
        """,
        {"user_id": user_id},
    ).fetchall()
    changed = []
    for room in rooms:
        members = None
        if room["type"] == ROOM_ONE_TO_ONE or room["other_users"] == 0:
            members = room_user_ids(db, room["id"])
            delete_room(db, room["id"])
        changed.append((room, members))
    db.execute("DELETE FROM users WHERE id = :id", {"id": user_id})
    return changed


def groups_of(db, user_id: str) -> list[str]:
    return [
        row[0]
        for row in db.execute(
            "SELECT group_id FROM group_members WHERE user_id = :user_id ORDER BY group_id",
            {"user_id": user_id},
        )
    ]


def is_admin(db, user_id: str) -> bool:
    return (
        db.execute(
            """
            SELECT 1 FROM group_members
             WHERE group_id = :group_id AND user_id = :user_id
            """,
            {"group_id": ADMIN_GROUP, "user_id": user_id},
        ).fetchone()
        is not None
    )


def group_exists(db, group_id: str) -> bool:
    return (
        db.execute("SELECT 1 FROM groups WHERE id = :id", {"id": group_id}).fetchone()
        is not None
    )


def list_groups(db, search: str = "") -> list[str]:
    return [
        row[0]
        for row in db.execute(
            """
            SELECT id FROM groups
             WHERE instr(lower(id), lower(:search)) > 0
             ORDER BY id
            """,
            {"search": search},
        )
    ]


def list_groups_with_counts(db, search: str = "") -> list[sqlite3.Row]:
    """Groups matching `search` with their member counts (GET /cloud/groups/details)."""
    return db.execute(
        """
        SELECT g.id, COUNT(m.user_id) AS user_count
          FROM groups AS g
          LEFT JOIN group_members AS m ON m.group_id = g.id
         WHERE instr(lower(g.id), lower(:search)) > 0
         GROUP BY g.id
         ORDER BY g.id
        """,
        {"search": search},
    ).fetchall()


def create_group(db, group_id: str) -> None:
    db.execute("INSERT INTO groups (id) VALUES (:id)", {"id": group_id})


def delete_group(db, group_id: str) -> None:
    db.execute("DELETE FROM groups WHERE id = :id", {"id": group_id})


def group_members(db, group_id: str) -> list[str]:
    return [
        row[0]
        for row in db.execute(
            "SELECT user_id FROM group_members WHERE group_id = :id ORDER BY user_id",
            {"id": group_id},
        )
    ]


def add_to_group(db, group_id: str, user_id: str) -> None:
    db.execute(
        """
        INSERT OR IGNORE INTO group_members (group_id, user_id)
        VALUES (:group_id, :user_id)
        """,
        {"group_id": group_id, "user_id": user_id},
    )


def remove_from_group(db, group_id: str, user_id: str) -> None:
    db.execute(
        "DELETE FROM group_members WHERE group_id = :group_id AND user_id = :user_id",
        {"group_id": group_id, "user_id": user_id},
    )


def count_users(db) -> int:
    return db.execute("SELECT COUNT(*) FROM users").fetchone()[0]


# --- Sign-in: server secrets, app passwords, web sessions, login flows ------


def server_secret(db, name: str) -> bytes | None:
    row = db.execute(
        "SELECT value FROM server_secrets WHERE name = :name", {"name": name}
    ).fetchone()
    return None if row is None else bytes(row["value"])


def create_server_secret(db, name: str, value: bytes) -> bytes:
    """Store a secret unless one exists; returns the one stored (first writer wins)."""
    db.execute(
        "INSERT OR IGNORE INTO server_secrets (name, value) VALUES (:name, :value)",
        {"name": name, "value": value},
    )
    return server_secret(db, name)


def add_app_password(db, user_id: str, name: str, token_hash: str, now: int) -> int:
    return db.execute(
        """
        INSERT INTO app_passwords (user_id, name, token_hash, created)
        VALUES (:user_id, :name, :token_hash, :now)
        """,
        {"user_id": user_id, "name": name, "token_hash": token_hash, "now": now},
    ).lastrowid


def app_password_by_hash(db, token_hash: str):
    """The app password with this hash and its owner's row, or None."""
    return db.execute(
        """
        SELECT a.id AS app_password_id, a.last_used,
               u.id, u.display_name, u.enabled
          FROM app_passwords AS a
          JOIN users AS u ON u.id = a.user_id
         WHERE a.token_hash = :token_hash
        """,
        {"token_hash": token_hash},
    ).fetchone()


def app_passwords_of(db, user_id: str) -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT id, name, created, last_used
          FROM app_passwords
         WHERE user_id = :user_id
         ORDER BY id
        """,
        {"user_id": user_id},
    ).fetchall()


def touch_app_password(db, password_id: int, now: int) -> None:
    """Record a use, unless one was recorded within the last minute (spares the SD card)."""
    db.execute(
        """
        UPDATE app_passwords
           SET last_used = :now
         WHERE id = :id AND last_used <= :now - :every
        """,
        {"id": password_id, "now": now, "every": LAST_USED_EVERY},
    )


def set_app_password_hash(db, password_id: int, token_hash: str) -> None:
    db.execute(
        "UPDATE app_passwords SET token_hash = :token_hash WHERE id = :id",
        {"id": password_id, "token_hash": token_hash},
    )


def delete_app_password(db, user_id: str, password_id: int) -> bool:
    """Revoke one of a user's app passwords; False when they have none with that id."""
    return (
        db.execute(
            "DELETE FROM app_passwords WHERE id = :id AND user_id = :user_id",
            {"id": password_id, "user_id": user_id},
        ).rowcount
        > 0
    )


def add_web_session(db, id_hash: str, user_id: str, csrf: str, now: int) -> None:
    db.execute(
        """
        INSERT INTO web_sessions (id_hash, user_id, csrf, created, last_seen)
        VALUES (:id_hash, :user_id, :csrf, :now, :now)
        """,
        {"id_hash": id_hash, "user_id": user_id, "csrf": csrf, "now": now},
    )


def web_session_by_hash(db, id_hash: str, since: int):
    """A web session seen at or after `since`, with its user's row, or None."""
    return db.execute(
        """
        SELECT s.id_hash, s.csrf, s.last_seen, u.id, u.display_name, u.enabled
          FROM web_sessions AS s
          JOIN users AS u ON u.id = s.user_id
         WHERE s.id_hash = :id_hash AND s.last_seen >= :since
        """,
        {"id_hash": id_hash, "since": since},
    ).fetchone()


def touch_web_session(db, id_hash: str, now: int) -> None:
    db.execute(
        "UPDATE web_sessions SET last_seen = :now WHERE id_hash = :id_hash",
        {"id_hash": id_hash, "now": now},
    )


def delete_web_session(db, id_hash: str) -> None:
    db.execute("DELETE FROM web_sessions WHERE id_hash = :id_hash", {"id_hash": id_hash})


def expire_web_sessions(db, before: int) -> None:
    db.execute("DELETE FROM web_sessions WHERE last_seen < :before", {"before": before})


def add_login_flow(db, version, login_token, poll_token_hash, client_name, now) -> None:
    db.execute(
        """
        INSERT INTO login_flows (version, login_token, poll_token_hash, client_name, created)
        VALUES (:version, :login_token, :poll_token_hash, :client_name, :now)
        """,
        {
            "version": version,
            "login_token": login_token,
            "poll_token_hash": poll_token_hash,
            "client_name": client_name,
            "now": now,
        },
    )


def login_flow_by_token(db, login_token: str, since: int):
    """A login flow started at or after `since`, by the token in its URL, or None."""
    return db.execute(
        """
        SELECT id, version, client_name, user_id, app_password
          FROM login_flows
         WHERE login_token = :login_token AND created >= :since
        """,
        {"login_token": login_token, "since": since},
    ).fetchone()


def grant_login_flow(db, flow_id: int, user_id: str, app_password: str) -> bool:
    """Hand a flow its app password, once; False when it was granted already."""
    return (
        db.execute(
            """
            UPDATE login_flows
               SET user_id = :user_id, app_password = :app_password
             WHERE id = :id AND app_password IS NULL
            """,
            {"id": flow_id, "user_id": user_id, "app_password": app_password},
        ).rowcount
        > 0
    )


def granted_flow(db, poll_token_hash: str, since: int):
    """A granted login flow v2 started at or after `since`, by its poll token, or None."""
    return db.execute(
        """
        SELECT id, user_id, app_password
          FROM login_flows
         WHERE poll_token_hash = :hash AND created >= :since AND app_password IS NOT NULL
        """,
        {"hash": poll_token_hash, "since": since},
    ).fetchone()


def delete_login_flow(db, flow_id: int) -> None:
    db.execute("DELETE FROM login_flows WHERE id = :id", {"id": flow_id})


def expire_login_flows(db, before: int) -> None:
    db.execute("DELETE FROM login_flows WHERE created < :before", {"before": before})


# --- Sessions ----------------------------------------------------------------


def new_session_id() -> str:
    """512 random characters of [A-Za-z0-9] (SPEC 1.6)."""
    return "".join(secrets.choice(SESSION_ALPHABET) for _ in range(SESSION_ID_LENGTH))


def end_session(db, participant_id: int) -> list[sqlite3.Row]:
    """End all of a participant's sessions; the ones ended (id, in_call)."""
    return db.execute(
        "DELETE FROM sessions WHERE participant_id = :pid RETURNING id, in_call",
        {"pid": participant_id},
    ).fetchall()


def add_session(db, participant_id: int, now: int, device: str | None) -> str:
    """Give a participant one more session (a joined device, today's API)."""
    session_id = new_session_id()
    db.execute(
        """
        INSERT INTO sessions (id, participant_id, last_ping, device)
        VALUES (:id, :pid, :now, :device)
        """,
        {"id": session_id, "pid": participant_id, "now": now, "device": device},
    )
    touch(db, participant_id, now)
    return session_id


def start_session(db, participant_id: int, now: int) -> tuple[str, list[sqlite3.Row]]:
    """Give a participant a new session, ending those it had (a 2018 join):
    (the new session's id, the ended ones)."""
    ended = end_session(db, participant_id)
    return add_session(db, participant_id, now, None), ended


def end_session_id(db, session_id: str) -> None:
    db.execute("DELETE FROM sessions WHERE id = :id", {"id": session_id})


def count_sessions(db, participant_id: int) -> int:
    return db.execute(
        "SELECT COUNT(*) FROM sessions WHERE participant_id = :pid", {"pid": participant_id}
    ).fetchone()[0]


def sessions_of(db, participant_id: int) -> list[sqlite3.Row]:
    """A participant's sessions, newest first."""
    return db.execute(
        """
        SELECT id, in_call, last_ping, device FROM sessions
         WHERE participant_id = :pid
         ORDER BY seq DESC
        """,
        {"pid": participant_id},
    ).fetchall()


def sessions_of_room(db, room_id: int) -> list[sqlite3.Row]:
    """Every session in a room with its participant id, oldest first."""
    return db.execute(
        """
        SELECT s.id, s.participant_id, s.in_call, s.last_ping
          FROM sessions AS s
          JOIN participants AS p ON p.id = s.participant_id
         WHERE p.room_id = :room_id
         ORDER BY s.seq
        """,
        {"room_id": room_id},
    ).fetchall()


def device_session(sessions, device, live_since):
    """The session a device holds among a participant's (newest first). A client
    without a device cookie (no cookie jar) gets the newest live one; a device
    that left gets none, as in Talk, and never rides another device's session."""
    if device is not None:
        return next((row for row in sessions if row["device"] == device), None)
    for row in sessions:
        if row["last_ping"] > live_since:
            return row
    return None


def touch(db, participant_id: int, now: int) -> None:
    """Refresh a participant's lastPing (SPEC 2)."""
    db.execute(
        "UPDATE participants SET last_ping = :now WHERE id = :pid",
        {"pid": participant_id, "now": now},
    )


def touch_session(db, session_id: str, participant_id: int, now: int) -> None:
    """Refresh one session's lastPing and its participant's (the 2018 routes read the latter)."""
    db.execute(
        "UPDATE sessions SET last_ping = :now WHERE id = :id", {"id": session_id, "now": now}
    )
    touch(db, participant_id, now)


def newest_session(db, me):
    """The participant's newest session, live or not: the one the 2018 routes act on."""
    if me is None:
        return None
    own = sessions_of(db, me["id"])
    return own[0] if own else None


def session_by_id(db, session_id: str):
    """A session with its participant and room, or None."""
    return db.execute(
        """
        SELECT s.id AS session_id, s.in_call, p.id AS participant_id,
               p.room_id, p.user_id, p.guest_id, p.participant_type, p.last_ping
          FROM sessions AS s
          JOIN participants AS p ON p.id = s.participant_id
         WHERE s.id = :id
        """,
        {"id": session_id},
    ).fetchone()


def latest_session_of(db, user_id, guest_id):
    """The actor's most recently active session in any room, or None."""
    return db.execute(
        """
        SELECT s.id AS session_id, p.room_id
          FROM participants AS p
          JOIN sessions AS s ON s.participant_id = p.id
         WHERE (:user_id IS NOT NULL AND p.user_id = :user_id)
            OR (:guest_id IS NOT NULL AND p.guest_id = :guest_id)
         ORDER BY p.last_ping DESC, s.seq DESC
         LIMIT 1
        """,
        {"user_id": user_id, "guest_id": guest_id},
    ).fetchone()


def guest_has_session(db, guest_id) -> bool:
    if guest_id is None:
        return False
    return (
        db.execute(
            """
            SELECT 1 FROM participants AS p
              JOIN sessions AS s ON s.participant_id = p.id
             WHERE p.guest_id = :guest_id
            """,
            {"guest_id": guest_id},
        ).fetchone()
        is not None
    )


# --- Rooms -------------------------------------------------------------------


def new_token(db) -> str:
    while True:
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))
        if room_by_token(db, token) is None:
            return token


def room_by_token(db, token: str):
    return db.execute(
        "SELECT * FROM rooms WHERE token = :token", {"token": token}
    ).fetchone()


def room_by_id(db, room_id: int):
    return db.execute("SELECT * FROM rooms WHERE id = :id", {"id": room_id}).fetchone()


def create_room(db, room_type: int, name: str, now: int) -> sqlite3.Row:
    db.execute(
        """
        INSERT INTO rooms (token, type, name, last_activity, created, modified)
        VALUES (:token, :type, :name, :now, :now, :now)
        """,
        {"token": new_token(db), "type": room_type, "name": name, "now": now},
    )
    return room_by_id(db, db.execute("SELECT last_insert_rowid()").fetchone()[0])


def one_to_one_room(db, user_a: str, user_b: str):
    return db.execute(
        """
        SELECT r.*
          FROM rooms AS r
          JOIN participants AS a ON a.room_id = r.id AND a.user_id = :a
          JOIN participants AS b ON b.room_id = r.id AND b.user_id = :b
         WHERE r.type = :type
        """,
        {"a": user_a, "b": user_b, "type": ROOM_ONE_TO_ONE},
    ).fetchone()


def rename_room(db, room_id: int, name: str) -> None:
    db.execute("UPDATE rooms SET name = :name WHERE id = :id", {"id": room_id, "name": name})


def set_room_type(db, room_id: int, room_type: int) -> None:
    db.execute(
        "UPDATE rooms SET type = :type WHERE id = :id", {"id": room_id, "type": room_type}
    )


def set_room_password(db, room_id: int, password_hash: str) -> None:
    db.execute(
        "UPDATE rooms SET password_hash = :hash WHERE id = :id",
        {"id": room_id, "hash": password_hash},
    )


def delete_room(db, room_id: int) -> None:
    """Delete a room; participants, sessions, chat and signaling go with it."""
    db.execute("DELETE FROM rooms WHERE id = :id", {"id": room_id})


def mark_activity(db, room_id: int, now: int) -> None:
    db.execute(
        "UPDATE rooms SET last_activity = max(last_activity, :now) WHERE id = :id",
        {"id": room_id, "now": now},
    )


ROOM_SETTINGS = (
    "description", "read_only", "listable", "lobby_state", "lobby_timer",
    "default_permissions", "call_permissions", "message_expiration",
)


def set_room_setting(db, room_id: int, column: str, value, now: int) -> None:
    """Change one of a room's settings (a column named in ROOM_SETTINGS)."""
    if column not in ROOM_SETTINGS:
        raise ValueError(column)
    db.execute(
        f"UPDATE rooms SET {column} = :value, modified = :now WHERE id = :id",
        {"id": room_id, "value": value, "now": now},
    )


def touch_room(db, room_id: int, now: int) -> None:
    """Note that a room changed (GET /room?modifiedSince shows it again)."""
    db.execute("UPDATE rooms SET modified = :now WHERE id = :id", {"id": room_id, "now": now})


def note_to_self_room(db, user_id: str):
    return db.execute(
        """
        SELECT r.*
          FROM rooms AS r
          JOIN participants AS p ON p.room_id = r.id AND p.user_id = :user_id
         WHERE r.type = :type
        """,
        {"user_id": user_id, "type": ROOM_NOTE_TO_SELF},
    ).fetchone()


def rooms_with(db, user_id: str) -> list[sqlite3.Row]:
    """The full rows of a user's rooms, newest activity first."""
    return db.execute(
        """
        SELECT r.*
          FROM participants AS mine
          JOIN rooms AS r ON r.id = mine.room_id
         WHERE mine.user_id = :user_id
         ORDER BY r.last_activity DESC, r.id DESC
        """,
        {"user_id": user_id},
    ).fetchall()


def listed_rooms(db, user_id: str, search: str, scopes) -> list[sqlite3.Row]:
    """Rooms listed for `scopes` (1 users, 2 everyone) that the user is not in, by name."""
    return db.execute(
        f"""
        SELECT r.* FROM rooms AS r
         WHERE r.listable IN ({",".join(str(int(s)) for s in scopes)})
           AND instr(lower(r.name), lower(:search)) > 0
           AND NOT EXISTS (SELECT 1 FROM participants AS p
                            WHERE p.room_id = r.id AND p.user_id = :user_id)
         ORDER BY r.name, r.id
        """,
        {"user_id": user_id, "search": search},
    ).fetchall()


# --- Participants ------------------------------------------------------------


PARTICIPANT_COLUMNS = """
    p.id, p.room_id, p.user_id, p.guest_id, p.participant_type, p.last_ping,
    p.favorite, p.notification_level, p.notification_calls, p.permissions,
    p.last_read_message, p.guest_name, p.modified, p.read_legacy_seq,
    p.last_mention_message, p.last_mention_direct,
    coalesce(s.id, '0') AS session_id, coalesce(s.in_call, 0) AS in_call,
    coalesce(u.display_name, '') AS display_name
"""


def participants_of(db, room_id: int) -> list[sqlite3.Row]:
    """Every row of a room with its session and display name, users first."""
    return db.execute(
        f"""
        SELECT {PARTICIPANT_COLUMNS}
          FROM participants AS p
          LEFT JOIN sessions AS s ON s.seq = (
                SELECT max(seq) FROM sessions WHERE participant_id = p.id)
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id
         ORDER BY p.guest_id IS NOT NULL, p.last_ping DESC, p.id
        """,
        {"room_id": room_id},
    ).fetchall()


def rooms_of(db, user_id: str) -> list[tuple[dict, list[sqlite3.Row]]]:
    """A user's rooms, newest activity first, each with all of its rows.

    One query for the whole list: GET /room is the request clients repeat most.
    """
    rooms: dict[int, tuple[dict, list]] = {}
    for row in db.execute(
        f"""
        SELECT r.token AS room_token, r.type AS room_type, r.name AS room_name,
               r.password_hash AS room_password_hash, {PARTICIPANT_COLUMNS}
          FROM participants AS mine
          JOIN rooms AS r ON r.id = mine.room_id
          JOIN participants AS p ON p.room_id = r.id
          LEFT JOIN sessions AS s ON s.seq = (
                SELECT max(seq) FROM sessions WHERE participant_id = p.id)
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE mine.user_id = :user_id
         ORDER BY max(r.last_activity, mine.last_ping) DESC, r.id DESC,
                  p.guest_id IS NOT NULL, p.last_ping DESC, p.id
        """,
        {"user_id": user_id},
    ):
        if row["room_id"] not in rooms:
            room = {
                "id": row["room_id"],
                "token": row["room_token"],
                "type": row["room_type"],
                "name": row["room_name"],
                "password_hash": row["room_password_hash"],
            }
            rooms[row["room_id"]] = (room, [])
        rooms[row["room_id"]][1].append(row)
    return list(rooms.values())


def participant_of(db, room_id: int, user_id=None, guest_id=None):
    """The row of a user or of a guest (by cookie hash) in a room, or None."""
    if user_id is None and guest_id is None:
        return None
    return db.execute(
        f"""
        SELECT {PARTICIPANT_COLUMNS}
          FROM participants AS p
          LEFT JOIN sessions AS s ON s.seq = (
                SELECT max(seq) FROM sessions WHERE participant_id = p.id)
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id
           AND (p.user_id = :user_id OR p.guest_id = :guest_id)
        """,
        {"room_id": room_id, "user_id": user_id, "guest_id": guest_id},
    ).fetchone()


def participant_by_session(db, room_id: int, session_id: str):
    return db.execute(
        f"""
        SELECT {PARTICIPANT_COLUMNS}
          FROM participants AS p
          JOIN sessions AS s ON s.participant_id = p.id
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id AND s.id = :session_id
        """,
        {"room_id": room_id, "session_id": session_id},
    ).fetchone()


def add_participant(db, room_id, participant_type, now, user_id=None, guest_id=None) -> int:
    """A new row; its read marker starts at the room's newest message (as Talk)."""
    db.execute(
        """
        INSERT INTO participants (room_id, user_id, guest_id, participant_type, last_ping,
                                  last_read_message, read_legacy_seq)
        SELECT :room_id, :user_id, :guest_id, :type, :now, last_message_id, last_legacy_seq
          FROM rooms WHERE id = :room_id
        """,
        {
            "room_id": room_id,
            "user_id": user_id,
            "guest_id": guest_id,
            "type": participant_type,
            "now": now,
        },
    )
    return db.execute("SELECT last_insert_rowid()").fetchone()[0]


def set_participant_type(db, participant_id: int, participant_type: int, now=0) -> None:
    db.execute(
        "UPDATE participants SET participant_type = :type, modified = :now WHERE id = :id",
        {"id": participant_id, "type": participant_type, "now": now},
    )


ATTENDEE_SETTINGS = ("favorite", "notification_level", "notification_calls", "permissions")


def set_attendee_setting(db, participant_id: int, column: str, value, now: int) -> None:
    """Change one of an attendee's own settings (a column named in ATTENDEE_SETTINGS)."""
    if column not in ATTENDEE_SETTINGS:
        raise ValueError(column)
    db.execute(
        f"UPDATE participants SET {column} = :value, modified = :now WHERE id = :id",
        {"id": participant_id, "value": value, "now": now},
    )


def participant_by_attendee(db, room_id: int, attendee_id):
    """The row of an attendee id in a room, or None."""
    if not isinstance(attendee_id, int):
        return None
    return db.execute(
        f"""
        SELECT {PARTICIPANT_COLUMNS}
          FROM participants AS p
          LEFT JOIN sessions AS s ON s.seq = (
                SELECT max(seq) FROM sessions WHERE participant_id = p.id)
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id AND p.id = :id
        """,
        {"room_id": room_id, "id": attendee_id},
    ).fetchone()


def rename_guest(db, old_guest_id: str, new_guest_id: str) -> None:
    """Move a guest's rows (and so their sessions) to a new guest identity."""
    db.execute(
        "UPDATE participants SET guest_id = :new WHERE guest_id = :old",
        {"new": new_guest_id, "old": old_guest_id},
    )


def remove_participant(db, participant_id: int) -> None:
    db.execute("DELETE FROM participants WHERE id = :id", {"id": participant_id})


def count_participants(db, room_id: int) -> int:
    return db.execute(
        "SELECT COUNT(*) FROM participants WHERE room_id = :room_id", {"room_id": room_id}
    ).fetchone()[0]


def remove_guests_and_self_joined(db, room_id: int) -> None:
    """Delete every type 4 and 5 row of a room (it became private)."""
    db.execute(
        """
        DELETE FROM participants
         WHERE room_id = :room_id AND participant_type IN (:guest, :self_joined)
        """,
        {"room_id": room_id, "guest": GUEST, "self_joined": USER_SELF_JOINED},
    )


def has_expired_guests(db, room_id: int, before: int) -> bool:
    """Whether a room has guest rows not seen since `before` (a read, to skip the write)."""
    return (
        db.execute(
            """
            SELECT 1 FROM participants
             WHERE room_id = :room_id AND participant_type = :guest AND last_ping <= :before
             LIMIT 1
            """,
            {"room_id": room_id, "guest": GUEST, "before": before},
        ).fetchone()
        is not None
    )


def expire_guests(db, room_id: int, before: int) -> list[sqlite3.Row]:
    """Delete guest rows of a room not seen since `before` (SPEC 2); the sessions
    (id, in_call) that ended with them."""
    params = {"room_id": room_id, "guest": GUEST, "before": before}
    ended = db.execute(
        """
        SELECT s.id, s.in_call
          FROM sessions AS s
          JOIN participants AS p ON p.id = s.participant_id
         WHERE p.room_id = :room_id AND p.participant_type = :guest AND p.last_ping <= :before
         ORDER BY p.id, s.seq
        """,
        params,
    ).fetchall()
    db.execute(
        """
        DELETE FROM participants
         WHERE room_id = :room_id AND participant_type = :guest AND last_ping <= :before
        """,
        params,
    )
    return ended


# --- Calls -------------------------------------------------------------------


def set_in_call(db, session_id: str, in_call: bool) -> None:
    set_call_flags(db, session_id, IN_CALL if in_call else 0)


def set_call_flags(db, session_id: str, flags: int) -> None:
    db.execute(
        "UPDATE sessions SET in_call = :flags WHERE id = :id",
        {"id": session_id, "flags": flags},
    )


def set_call_start(db, room_id: int, start: int) -> None:
    """When the room's call began (0: no call)."""
    db.execute(
        "UPDATE rooms SET call_start_time = :start WHERE id = :room_id",
        {"room_id": room_id, "start": start},
    )


def in_call_count(db, room_id: int, live_since: int) -> int:
    """Live sessions of a room in its call."""
    return db.execute(
        """
        SELECT COUNT(*)
          FROM sessions AS s
          JOIN participants AS p ON p.id = s.participant_id
         WHERE p.room_id = :room_id AND s.in_call & :in_call AND s.last_ping > :since
        """,
        {"room_id": room_id, "in_call": FLAG_IN_CALL, "since": live_since},
    ).fetchone()[0]


def leave_calls(db, room_id: int, seen_before: int | None = None) -> list[str]:
    """Take a room's sessions out of its call: all, or those not seen since
    `seen_before`; the ids of those that were in it."""
    rows = db.execute(
        """
        UPDATE sessions SET in_call = 0
         WHERE in_call != 0
           AND (:before IS NULL OR last_ping <= :before)
           AND participant_id IN (SELECT id FROM participants WHERE room_id = :room_id)
        RETURNING id
        """,
        {"room_id": room_id, "before": seen_before},
    ).fetchall()
    return sorted(row["id"] for row in rows)


def live_sessions(db, room_id: int, live_since: int) -> list[sqlite3.Row]:
    """A room's sessions seen since `live_since` with their attendees, users first."""
    return db.execute(
        """
        SELECT s.id AS session_id, s.in_call, s.last_ping, p.id AS participant_id,
               p.room_id, p.user_id, p.guest_id, p.guest_name, p.participant_type,
               p.permissions, coalesce(u.display_name, '') AS display_name
          FROM sessions AS s
          JOIN participants AS p ON p.id = s.participant_id
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id AND s.last_ping > :since
         ORDER BY p.user_id IS NULL, p.user_id, p.id, s.seq
        """,
        {"room_id": room_id, "since": live_since},
    ).fetchall()


def call_peers(db, room_id: int, active_since: int) -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT p.user_id, p.last_ping, s.id AS session_id
          FROM participants AS p
          JOIN sessions AS s ON s.participant_id = p.id
         WHERE p.room_id = :room_id AND s.in_call & :in_call
           AND p.last_ping > :since
         ORDER BY p.user_id IS NULL, p.last_ping DESC
        """,
        {"room_id": room_id, "in_call": IN_CALL, "since": active_since},
    ).fetchall()


def call_system_message(db, room_id: int, actor, verb: str, now: int) -> None:
    """Post a call's system message: `verb` is call_started, call_joined, call_left,
    call_ended or call_ended_everyone; `actor` the attendee row (None: the server
    ended the call, its last session having gone quiet)."""
    speaker = row_speaker(actor) if actor is not None else ("guests", "system", "")
    add_system_message(db, room_id, speaker, verb, None, now)


# --- Chat --------------------------------------------------------------------

# System messages that clients use to patch their caches and never show: they
# move neither the Room's lastMessage nor its activity.
HIDDEN_VERBS = (
    "message_deleted", "message_edited", "reaction", "reaction_deleted",
    "reaction_revoked", "poll_voted",
)

# The text of each system message (docs/chat.md "System messages"); the
# placeholders are rich-object parameters the writer stores with it.
SYSTEM_TEXTS = {
    "conversation_created": "{actor} created the conversation",
    "conversation_renamed": "{actor} renamed the conversation",
    "description_set": "{actor} set the description",
    "description_removed": "{actor} removed the description",
    "call_started": "{actor} started a call",
    "call_joined": "{actor} joined the call",
    "call_left": "{actor} left the call",
    "call_ended": "The call ended",
    "call_ended_everyone": "{actor} ended the call",
    "read_only": "{actor} locked the conversation",
    "read_only_off": "{actor} unlocked the conversation",
    "listable_none": "{actor} limited the conversation to the current participants",
    "listable_users": "{actor} opened the conversation accessible to registered users",
    "listable_all": "{actor} opened the conversation accessible to registered users and guests",
    "lobby_none": "{actor} opened the conversation to everyone",
    "lobby_non_moderators": "{actor} restricted the conversation to moderators",
    "guests_allowed": "{actor} allowed guests in the conversation",
    "guests_disallowed": "{actor} disallowed guests in the conversation",
    "password_set": "{actor} set a password for the conversation",
    "password_removed": "{actor} removed the password for the conversation",
    "user_added": "{actor} added {user}",
    "user_removed": "{actor} removed {user}",
    "moderator_promoted": "{actor} promoted {user} to moderator",
    "moderator_demoted": "{actor} demoted {user} from moderator",
    "message_deleted": "Message deleted by {actor}",
    "message_edited": "{actor} edited a message",
    "history_cleared": "{actor} cleared the history of the conversation",
    "reaction_revoked": "{actor} deleted a reaction",
    "poll_voted": "Someone voted on the poll {poll}",
    "poll_closed": "{actor} closed the poll {poll}",
    "message_expiration_enabled": "{actor} set the message expiration",
    "message_expiration_disabled": "{actor} disabled message expiration",
    "avatar_set": "{actor} set the conversation avatar",
    "avatar_removed": "{actor} removed the conversation avatar",
}


def rich_actor(actor_type: str, actor_id: str, name: str) -> dict:
    """A user or guest as a rich-object parameter (docs/chat.md, UserMention)."""
    if actor_type == "guests":
        return {"type": "guest", "id": f"guest/{actor_id}", "name": name}
    return {"type": "user", "id": actor_id, "name": name}


def add_message(
    db, room_id, actor_type, actor_id, message, now, *, message_type="comment",
    verb="", parameters=None, actor_name="", reference_id="", parent_id=0,
    silent=False, expires=0, legacy=None,
) -> sqlite3.Row:
    """Store a message with the room's next seq; timestamps never go backwards.

    Comments (legacy, unless told otherwise) also take the next 2018 seq. The
    room's counters hand out both numbers, so nothing is counted or scanned;
    a message that is not hidden becomes the room's lastMessage and activity.
    """
    if legacy is None:
        legacy = message_type == "comment"
    seq, legacy_seq, timestamp = db.execute(
        """
        UPDATE rooms
           SET last_seq = last_seq + 1,
               last_legacy_seq = last_legacy_seq + :legacy,
               last_message_time = max(last_message_time, :now)
         WHERE id = :room_id
        RETURNING last_seq, last_legacy_seq, last_message_time
        """,
        {"room_id": room_id, "legacy": 1 if legacy else 0, "now": now},
    ).fetchone()
    db.execute(
        """
        INSERT INTO messages (room_id, seq, actor_type, actor_id, timestamp, message,
                              legacy_seq, message_type, verb, parameters, actor_name,
                              reference_id, parent_id, silent, expires)
        VALUES (:room_id, :seq, :actor_type, :actor_id, :timestamp, :message,
                :legacy_seq, :message_type, :verb, :parameters, :actor_name,
                :reference_id, :parent_id, :silent, :expires)
        """,
        {
            "room_id": room_id,
            "seq": seq,
            "actor_type": actor_type,
            "actor_id": actor_id,
            "timestamp": timestamp,
            "message": message,
            "legacy_seq": legacy_seq if legacy else None,
            "message_type": message_type,
            "verb": verb,
            "parameters": json.dumps(parameters or {}, ensure_ascii=False),
            "actor_name": actor_name,
            "reference_id": reference_id,
            "parent_id": parent_id,
            "silent": 1 if silent else 0,
            "expires": expires,
        },
    )
    message_id = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    if verb not in HIDDEN_VERBS:
        db.execute(
            """
            UPDATE rooms
               SET last_message_id = :id, last_activity = max(last_activity, :now)
             WHERE id = :room_id
            """,
            {"id": message_id, "room_id": room_id, "now": now},
        )
    return message_by_id(db, message_id)


def add_system_message(
    db, room_id, actor, verb, params=None, now=0, *, parent_id=0, text=None
) -> sqlite3.Row:
    """Write the system message `verb` (docs/chat.md) into a room's chat.

    `actor` is (actor_type, actor_id, display name) of who caused it, e.g.
    ("users", "alice", "Alice"); `params` holds further rich objects by
    placeholder (`{"user": rich_actor(...)}`); `text` overrides the standard
    text of SYSTEM_TEXTS. Call it inside the operation's transaction, then
    `Talk.chat_posted(room_id, row)` after the commit to wake the polls. The
    2018 receive never shows it and it never counts as unread.
    """
    actor_type, actor_id, name = actor
    parameters = {"actor": rich_actor(actor_type, actor_id, name), **(params or {})}
    return add_message(
        db, room_id, actor_type, actor_id, text or SYSTEM_TEXTS.get(verb, "{actor}"), now,
        message_type="system", verb=verb, parameters=parameters, actor_name=name,
        parent_id=parent_id,
    )


MESSAGE_COLUMNS = """
    m.*,
    CASE WHEN m.actor_type = 'users' THEN coalesce(u.display_name, '') ELSE '' END
        AS actor_display_name
"""


def message_by_id(db, message_id: int):
    return db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.id = :id
        """,
        {"id": message_id},
    ).fetchone()


def messages_by_ids(db, ids) -> dict[int, sqlite3.Row]:
    """Messages by id (parents of replies), as {id: row}."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.id IN ({marks})
        """,
        ids,
    ).fetchall()
    return {row["id"]: row for row in rows}


def messages_after(db, room_id, offset, not_older_than, limit, now=0) -> tuple[int | None, list]:
    """The 2018 view: the room's comments newer than a timestamp, skipping the
    `offset` oldest.

    Returns (start, rows): `start` is the legacy_seq the first answered
    message has (None while no comment is newer than the timestamp), rows
    oldest first. legacy_seq numbers the comments only, so system messages,
    polls and expired rows never shift an offset; deleted comments keep their
    number and are left out. Two index lookups, whatever the room's history.
    """
    # The first index entry past the timestamp is the lowest seq there (min()
    # would read the whole range).
    first = db.execute(
        """
        SELECT legacy_seq FROM messages
         WHERE room_id = :room_id AND timestamp > :since AND legacy_seq IS NOT NULL
         ORDER BY timestamp, id
         LIMIT 1
        """,
        {"room_id": room_id, "since": not_older_than},
    ).fetchone()
    if first is None:
        return None, []
    start = first[0] + offset
    rows = db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.room_id = :room_id AND m.legacy_seq >= :start
           AND m.message_type = 'comment' AND (m.expires = 0 OR m.expires > :now)
         ORDER BY m.legacy_seq
         LIMIT :limit
        """,
        {"room_id": room_id, "start": start, "limit": limit, "now": now},
    ).fetchall()
    return start, rows


def messages_page(db, room_id, known, limit, future, inclusive=False) -> list:
    """Today's paging by id: newer than `known` oldest first (`future`), or older
    than it newest first (`known` 0: from the newest). One index range."""
    if future:
        compare, order = (">=" if inclusive else ">"), "ASC"
    else:
        compare, order = ("<=" if inclusive else "<"), "DESC"
        known = known if known > 0 else 2**62
    return db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.room_id = :room_id AND m.id {compare} :known
         ORDER BY m.id {order}
         LIMIT :limit
        """,
        {"room_id": room_id, "known": known, "limit": limit},
    ).fetchall()


def last_message_of(db, room, now=0):
    """The Room's lastMessage: the stored pointer, unless that message expired."""
    row = message_by_id(db, room["last_message_id"]) if room["last_message_id"] else None
    if row is not None and not (0 < row["expires"] <= now):
        return row
    if row is None and not room["last_message_id"]:
        return None
    hidden = ",".join("?" * len(HIDDEN_VERBS))
    return db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.room_id = ? AND m.verb NOT IN ({hidden})
           AND (m.expires = 0 OR m.expires > ?)
         ORDER BY m.id DESC
         LIMIT 1
        """,
        (room["id"], *HIDDEN_VERBS, now),
    ).fetchone()


def unread_count(room, row) -> int:
    """Comments after the attendee's read marker, from two stored counters."""
    return max(0, room["last_legacy_seq"] - row["read_legacy_seq"])


def legacy_seq_at(db, room_id: int, message_id: int) -> int:
    """How many comments the room had up to `message_id` (the newest one's legacy_seq)."""
    row = db.execute(
        """
        SELECT legacy_seq FROM messages
         WHERE room_id = :room_id AND id <= :id AND legacy_seq IS NOT NULL
         ORDER BY id DESC
         LIMIT 1
        """,
        {"room_id": room_id, "id": message_id},
    ).fetchone()
    return row[0] if row else 0


def set_read_marker(db, participant_id: int, room_id: int, message_id: int, count=None) -> None:
    """Move an attendee's read marker; `count` is the comments up to it, when known."""
    if count is None:
        count = legacy_seq_at(db, room_id, message_id)
    db.execute(
        """
        UPDATE participants
           SET last_read_message = :id, read_legacy_seq = :count
         WHERE id = :pid
        """,
        {"id": message_id, "count": count, "pid": participant_id},
    )


def legacy_message(db, room_id: int, legacy_seq: int):
    """The comment with a given 2018 seq, or None."""
    return db.execute(
        "SELECT id FROM messages WHERE room_id = :room_id AND legacy_seq = :seq",
        {"room_id": room_id, "seq": legacy_seq},
    ).fetchone()


def last_common_read(db, room_id: int) -> int:
    """The newest message every user of the room has read (read privacy is public)."""
    value = db.execute(
        """
        SELECT min(last_read_message) FROM participants
         WHERE room_id = :room_id AND user_id IS NOT NULL
        """,
        {"room_id": room_id},
    ).fetchone()[0]
    return value or 0


def mark_mentions(db, room_id, message_id, user_ids, everyone, sender_pid) -> None:
    """Note a message mentioning users by name (direct) or everyone (@all)."""
    if everyone:
        db.execute(
            """
            UPDATE participants SET last_mention_message = :id
             WHERE room_id = :room_id AND id != :sender
            """,
            {"id": message_id, "room_id": room_id, "sender": sender_pid},
        )
    for user_id in user_ids:
        db.execute(
            """
            UPDATE participants
               SET last_mention_message = :id, last_mention_direct = :id
             WHERE room_id = :room_id AND user_id = :user_id AND id != :sender
            """,
            {"id": message_id, "room_id": room_id, "user_id": user_id, "sender": sender_pid},
        )


def edit_message(db, message_id, text, parameters, editor, now) -> None:
    """Replace a comment's text (and mentions), noting who edited it when."""
    editor_type, editor_id, editor_name = editor
    db.execute(
        """
        UPDATE messages
           SET message = :text, parameters = :parameters, edit_actor_type = :type,
               edit_actor_id = :actor_id, edit_actor_name = :name, edit_time = :now
         WHERE id = :id
        """,
        {"id": message_id, "text": text, "now": now, "type": editor_type,
         "actor_id": editor_id, "name": editor_name,
         "parameters": json.dumps(parameters, ensure_ascii=False)},
    )


def delete_message(db, message_id, deleter, now) -> None:
    """Turn a comment into a comment_deleted placeholder; its reactions go."""
    deleter_type, deleter_id, deleter_name = deleter
    parameters = {"actor": rich_actor(deleter_type, deleter_id, deleter_name)}
    db.execute(
        """
        UPDATE messages
           SET message_type = 'comment_deleted', message = 'Message deleted by {actor}',
               parameters = :parameters, reactions = '{}', edit_actor_type = :type,
               edit_actor_id = :actor_id, edit_actor_name = :name, edit_time = :now
         WHERE id = :id
        """,
        {"id": message_id, "now": now, "type": deleter_type, "actor_id": deleter_id,
         "name": deleter_name, "parameters": json.dumps(parameters, ensure_ascii=False)},
    )
    db.execute("DELETE FROM reactions WHERE message_id = :id", {"id": message_id})


def clear_history(db, room_id: int) -> None:
    """Delete a room's messages, reactions and polls (the counters keep counting)."""
    db.execute("DELETE FROM messages WHERE room_id = :room_id", {"room_id": room_id})
    db.execute("DELETE FROM polls WHERE room_id = :room_id", {"room_id": room_id})


def mark_all_read(db, room_id: int, message_id: int, count: int) -> None:
    db.execute(
        """
        UPDATE participants
           SET last_read_message = :id, read_legacy_seq = :count,
               last_mention_message = 0, last_mention_direct = 0
         WHERE room_id = :room_id
        """,
        {"room_id": room_id, "id": message_id, "count": count},
    )


def has_expired_messages(db, now: int) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM messages WHERE expires > 0 AND expires <= :now LIMIT 1",
            {"now": now},
        ).fetchone()
        is not None
    )


def expire_messages(db, now: int) -> int:
    """Delete messages whose expiration passed (the partial index finds them)."""
    return db.execute(
        "DELETE FROM messages WHERE expires > 0 AND expires <= :now", {"now": now}
    ).rowcount


def next_expiry(db) -> int | None:
    """When the next message expires, or None."""
    row = db.execute(
        "SELECT expires FROM messages WHERE expires > 0 ORDER BY expires LIMIT 1"
    ).fetchone()
    return row[0] if row else None


def set_guest_name(db, participant_id: int, name: str) -> None:
    db.execute(
        "UPDATE participants SET guest_name = :name WHERE id = :id",
        {"id": participant_id, "name": name},
    )


# --- Reactions ---------------------------------------------------------------


def reactions_of(db, message_id: int, reaction: str = "") -> list[sqlite3.Row]:
    """Who reacted to a message with what (one emoji, or all), oldest first."""
    return db.execute(
        """
        SELECT r.*, CASE WHEN r.actor_type = 'users'
                         THEN coalesce(u.display_name, '') ELSE r.actor_name END AS display_name
          FROM reactions AS r
          LEFT JOIN users AS u ON u.id = r.actor_id AND r.actor_type = 'users'
         WHERE r.message_id = :id AND (:reaction = '' OR r.reaction = :reaction)
         ORDER BY r.timestamp, r.reaction
        """,
        {"id": message_id, "reaction": reaction},
    ).fetchall()


def own_reactions(db, actor_type, actor_id, message_ids) -> dict[int, list[str]]:
    """The emojis an actor reacted with, per message id."""
    ids = sorted(set(message_ids))
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    mine: dict[int, list[str]] = {}
    for row in db.execute(
        f"""
        SELECT message_id, reaction FROM reactions
         WHERE actor_type = ? AND actor_id = ? AND message_id IN ({marks})
        """,
        (actor_type, actor_id, *ids),
    ):
        mine.setdefault(row[0], []).append(row[1])
    return mine


def change_reaction(db, message_id, reaction, actor, now, add: bool) -> bool:
    """Add or remove one actor's reaction, keeping the message's counts; False
    when nothing changed (already there, or not there)."""
    actor_type, actor_id, name = actor
    if add:
        changed = db.execute(
            """
            INSERT OR IGNORE INTO reactions
                   (message_id, reaction, actor_type, actor_id, actor_name, timestamp)
            VALUES (:id, :reaction, :type, :actor_id, :name, :now)
            """,
            {"id": message_id, "reaction": reaction, "type": actor_type,
             "actor_id": actor_id, "name": name, "now": now},
        ).rowcount
    else:
        changed = db.execute(
            """
            DELETE FROM reactions
             WHERE message_id = :id AND reaction = :reaction
               AND actor_type = :type AND actor_id = :actor_id
            """,
            {"id": message_id, "reaction": reaction, "type": actor_type, "actor_id": actor_id},
        ).rowcount
    if not changed:
        return False
    counts = json.loads(message_by_id(db, message_id)["reactions"])
    counts[reaction] = counts.get(reaction, 0) + (1 if add else -1)
    if counts[reaction] <= 0:
        del counts[reaction]
    db.execute(
        "UPDATE messages SET reactions = :counts WHERE id = :id",
        {"id": message_id, "counts": json.dumps(counts, ensure_ascii=False)},
    )
    return True


# --- Polls -------------------------------------------------------------------


def create_poll(db, room_id, question, options, actor, result_mode, max_votes, now) -> int:
    actor_type, actor_id, name = actor
    db.execute(
        """
        INSERT INTO polls (room_id, question, options, actor_type, actor_id, actor_name,
                           result_mode, max_votes, created)
        VALUES (:room_id, :question, :options, :type, :actor_id, :name,
                :mode, :max_votes, :now)
        """,
        {"room_id": room_id, "question": question,
         "options": json.dumps(options, ensure_ascii=False), "type": actor_type,
         "actor_id": actor_id, "name": name, "mode": result_mode,
         "max_votes": max_votes, "now": now},
    )
    return db.execute("SELECT last_insert_rowid()").fetchone()[0]


def poll_by_id(db, room_id: int, poll_id):
    if not isinstance(poll_id, int):
        return None
    return db.execute(
        "SELECT * FROM polls WHERE id = :id AND room_id = :room_id",
        {"id": poll_id, "room_id": room_id},
    ).fetchone()


def poll_votes_of(db, poll_id: int, actor_type=None, actor_id=None) -> list[sqlite3.Row]:
    """A poll's votes (of one actor, when given), with the voters' names."""
    return db.execute(
        """
        SELECT v.*, CASE WHEN v.actor_type = 'users'
                         THEN coalesce(u.display_name, '') ELSE v.actor_name END AS display_name
          FROM poll_votes AS v
          LEFT JOIN users AS u ON u.id = v.actor_id AND v.actor_type = 'users'
         WHERE v.poll_id = :poll_id
           AND (:actor_type IS NULL OR (v.actor_type = :actor_type AND v.actor_id = :actor_id))
         ORDER BY v.option_id
        """,
        {"poll_id": poll_id, "actor_type": actor_type, "actor_id": actor_id},
    ).fetchall()


def set_poll_votes(db, poll, actor, option_ids) -> None:
    """Replace an actor's votes on a poll, keeping the counters of the poll row."""
    actor_type, actor_id, name = actor
    before = [row["option_id"] for row in poll_votes_of(db, poll["id"], actor_type, actor_id)]
    votes = json.loads(poll["votes"])
    for option in before:
        key = f"option-{option}"
        votes[key] = votes.get(key, 0) - 1
        if votes[key] <= 0:
            del votes[key]
    db.execute(
        "DELETE FROM poll_votes WHERE poll_id = :id AND actor_type = :type AND actor_id = :actor_id",
        {"id": poll["id"], "type": actor_type, "actor_id": actor_id},
    )
    for option in option_ids:
        db.execute(
            """
            INSERT INTO poll_votes (poll_id, actor_type, actor_id, actor_name, option_id)
            VALUES (:id, :type, :actor_id, :name, :option)
            """,
            {"id": poll["id"], "type": actor_type, "actor_id": actor_id, "name": name,
             "option": option},
        )
        key = f"option-{option}"
        votes[key] = votes.get(key, 0) + 1
    voters = poll["num_voters"] + (1 if option_ids and not before else 0)
    voters -= 1 if before and not option_ids else 0
    db.execute(
        "UPDATE polls SET votes = :votes, num_voters = :voters WHERE id = :id",
        {"id": poll["id"], "votes": json.dumps(votes), "voters": voters},
    )


def close_poll(db, poll_id: int) -> None:
    db.execute("UPDATE polls SET status = 1 WHERE id = :id", {"id": poll_id})


# --- Bots ----------------------------------------------------------------------


def bot_by_id(db, bot_id: int):
    return db.execute("SELECT * FROM bots WHERE id = :id", {"id": bot_id}).fetchone()


def bot_by_url(db, url: str):
    return db.execute("SELECT * FROM bots WHERE url = :url", {"url": url}).fetchone()


def list_bots(db) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM bots ORDER BY id").fetchall()


def add_bot(db, name, secret, url, description, state, features) -> int:
    """Install a bot; sqlite3.IntegrityError when its URL or secret is taken."""
    return db.execute(
        """
        INSERT INTO bots (name, url, url_hash, description, secret, state, features)
        VALUES (:name, :url, :url_hash, :description, :secret, :state, :features)
        RETURNING id
        """,
        {
            "name": name,
            "url": url,
            "url_hash": hashlib.sha1(url.encode("utf-8")).hexdigest(),
            "description": description,
            "secret": secret,
            "state": state,
            "features": features,
        },
    ).fetchone()[0]


def delete_bot(db, bot_id: int) -> None:
    db.execute("DELETE FROM bots WHERE id = :id", {"id": bot_id})


def set_bot_state(db, bot_id: int, state: int, features=None) -> None:
    db.execute(
        """
        UPDATE bots
           SET state = :state, features = coalesce(:features, features)
         WHERE id = :id
        """,
        {"id": bot_id, "state": state, "features": features},
    )


def count_bot_error(db, bot_id: int, now: int, message: str) -> None:
    """A webhook the bot did not take: error_count, last_error_date/_message."""
    db.execute(
        """
        UPDATE bots
           SET error_count = error_count + 1, last_error_date = :now,
               last_error_message = :message
         WHERE id = :id
        """,
        {"id": bot_id, "now": now, "message": message},
    )


def bots_in_room(db, room_id: int) -> list[sqlite3.Row]:
    """The bots set up in a room and not disabled (Bot::isEnabled), by id."""
    return db.execute(
        """
        SELECT b.*
          FROM bot_conversations AS c
          JOIN bots AS b ON b.id = c.bot_id
         WHERE c.room_id = :room_id AND c.state != 0 AND b.state != 0
         ORDER BY b.id
        """,
        {"room_id": room_id},
    ).fetchall()


def bot_ids_in_room(db, room_id: int) -> set[int]:
    """Every bot set up in a room, whatever its state."""
    rows = db.execute(
        "SELECT bot_id FROM bot_conversations WHERE room_id = :room_id",
        {"room_id": room_id},
    )
    return {row[0] for row in rows}


def link_bot(db, bot_id: int, room_id: int) -> bool:
    """Set a bot up in a room; False when it already was."""
    return db.execute(
        """
        INSERT OR IGNORE INTO bot_conversations (bot_id, room_id, state)
        VALUES (:bot_id, :room_id, 1)
        """,
        {"bot_id": bot_id, "room_id": room_id},
    ).rowcount == 1


def unlink_bot(db, bot_id: int, room_id: int) -> bool:
    """Remove a bot from a room; False when it was not set up there."""
    return db.execute(
        "DELETE FROM bot_conversations WHERE bot_id = :bot_id AND room_id = :room_id",
        {"bot_id": bot_id, "room_id": room_id},
    ).rowcount == 1


def rooms_with_bots(db) -> list[sqlite3.Row]:
    """(id, last_seq) of every room some bot is set up in."""
    return db.execute(
        """
        SELECT r.id, r.last_seq
          FROM rooms AS r
         WHERE r.id IN (SELECT room_id FROM bot_conversations)
        """
    ).fetchall()


def messages_since(db, room_id: int, seq: int, limit: int) -> list[sqlite3.Row]:
    """A room's messages after seq `seq`, oldest first (what bots have not seen)."""
    return db.execute(
        f"""
        SELECT {MESSAGE_COLUMNS}
          FROM messages AS m
          LEFT JOIN users AS u ON u.id = m.actor_id
         WHERE m.room_id = :room_id AND m.seq > :seq
         ORDER BY m.seq
         LIMIT :limit
        """,
        {"room_id": room_id, "seq": seq, "limit": limit},
    ).fetchall()


def participant_type_of(db, room_id: int, user_id: str) -> int | None:
    row = db.execute(
        "SELECT participant_type FROM participants WHERE room_id = :room_id AND user_id = :user_id",
        {"room_id": room_id, "user_id": user_id},
    ).fetchone()
    return None if row is None else row[0]


# --- Signaling ---------------------------------------------------------------


def queue_signaling(db, recipient: str, sender: str, data: str, now: int) -> None:
    db.execute(
        """
        INSERT INTO signaling (recipient, sender, data, created)
        VALUES (:recipient, :sender, :data, :now)
        """,
        {"recipient": recipient, "sender": sender, "data": data, "now": now},
    )


def queued_bytes(db, recipient: str) -> int:
    return db.execute(
        "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM signaling WHERE recipient = :recipient",
        {"recipient": recipient},
    ).fetchone()[0]


def count_guests(db, room_id: int) -> int:
    return db.execute(
        "SELECT COUNT(*) FROM participants WHERE room_id = :room_id AND guest_id IS NOT NULL",
        {"room_id": room_id},
    ).fetchone()[0]


def queued_count(db, recipient: str) -> int:
    return db.execute(
        "SELECT COUNT(*) FROM signaling WHERE recipient = :recipient",
        {"recipient": recipient},
    ).fetchone()[0]


def take_signaling(db, recipient: str, since: int) -> list[str]:
    """Remove and return a session's queued messages, oldest first."""
    rows = db.execute(
        """
        DELETE FROM signaling
         WHERE recipient = :recipient
        RETURNING id, data, created
        """,
        {"recipient": recipient},
    ).fetchall()
    return [row["data"] for row in sorted(rows, key=lambda r: r["id"]) if row["created"] > since]


def has_signaling(db, recipient: str) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM signaling WHERE recipient = :recipient LIMIT 1",
            {"recipient": recipient},
        ).fetchone()
        is not None
    )


def reclaim_pages(db, limit: int = 20000) -> int:
    """Give up to `limit` free pages back to the file system; how many were freed.

    Python's sqlite3 steps `PRAGMA incremental_vacuum` once, which frees one
    page, hence the loop (microseconds a page).
    """
    freed = 0
    while freed < limit and db.execute("PRAGMA freelist_count").fetchone()[0]:
        db.execute("PRAGMA incremental_vacuum(1)")
        freed += 1
    return freed


def expire_signaling(db, before: int) -> None:
    db.execute("DELETE FROM signaling WHERE created <= :before", {"before": before})


def users_in_room(db, room_id: int, active_since: int) -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT p.user_id, p.room_id, p.last_ping, s.id AS session_id, s.in_call
          FROM participants AS p
          JOIN sessions AS s ON s.participant_id = p.id
         WHERE p.room_id = :room_id AND p.last_ping > :since
         ORDER BY p.user_id IS NULL, p.user_id, p.id
        """,
        {"room_id": room_id, "since": active_since},
    ).fetchall()


# --- The High-Performance Backend ----------------------------------------------


def room_user_ids(db, room_id: int) -> list[str]:
    """Every user of a room (the signaling server's `alluserids`)."""
    return [
        row["user_id"]
        for row in db.execute(
            """
            SELECT user_id FROM participants
             WHERE room_id = :room_id AND user_id IS NOT NULL
             ORDER BY id
            """,
            {"room_id": room_id},
        )
    ]


def backend_attendees(db, room_id: int) -> list[sqlite3.Row]:
    """Every attendee of a room, a row per session (session_id '0': none), users first."""
    return db.execute(
        """
        SELECT p.id, p.room_id, p.user_id, p.guest_id, p.participant_type, p.permissions,
               p.guest_name, coalesce(u.display_name, '') AS display_name,
               coalesce(s.id, '0') AS session_id, coalesce(s.in_call, 0) AS in_call,
               coalesce(s.last_ping, 0) AS last_ping
          FROM participants AS p
          LEFT JOIN sessions AS s ON s.participant_id = p.id
          LEFT JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id
         ORDER BY p.user_id IS NULL, p.id, s.seq
        """,
        {"room_id": room_id},
    ).fetchall()


def touch_sessions(db, session_ids: list[str], now: int) -> int:
    """Refresh many sessions' lastPing (and their participants') at once; how many there were."""
    ids = json.dumps(session_ids)
    count = db.execute(
        "UPDATE sessions SET last_ping = :now WHERE id IN (SELECT value FROM json_each(:ids))",
        {"ids": ids, "now": now},
    ).rowcount
    db.execute(
        """
        UPDATE participants SET last_ping = :now
         WHERE id IN (SELECT participant_id FROM sessions
                       WHERE id IN (SELECT value FROM json_each(:ids)))
        """,
        {"ids": ids, "now": now},
    )
    return count


# --- Avatars -----------------------------------------------------------------


def room_avatar_fields(db, room_id: int):
    """A room's avatar columns without the image: type, avatar_type, avatar_color,
    avatar_version, and avatar (an emoji's UTF-8, else NULL). None: no such room."""
    return db.execute(
        """
        SELECT type, avatar_type, avatar_color, avatar_version, avatar
          FROM rooms
         WHERE id = :id
        """,
        {"id": room_id},
    ).fetchone()


def room_avatar_image(db, room_id: int) -> bytes | None:
    row = db.execute(
        "SELECT data FROM room_avatars WHERE room_id = :id", {"id": room_id}
    ).fetchone()
    return None if row is None else bytes(row["data"])


def set_room_avatar(db, room_id: int, avatar_type: str, image=None, emoji="", color="") -> None:
    """Give a room an uploaded image (image bytes) or an emoji; bumps avatar_version."""
    db.execute("DELETE FROM room_avatars WHERE room_id = :id", {"id": room_id})
    if image is not None:
        db.execute(
            "INSERT INTO room_avatars (room_id, data) VALUES (:id, :data)",
            {"id": room_id, "data": image},
        )
    db.execute(
        """
        UPDATE rooms
           SET avatar_type = :avatar_type,
               avatar = :emoji,
               avatar_color = :color,
               avatar_version = avatar_version + 1
         WHERE id = :id
        """,
        {
            "id": room_id,
            "avatar_type": avatar_type,
            "emoji": emoji.encode("utf-8") if emoji else None,
            "color": color,
        },
    )


def delete_room_avatar(db, room_id: int) -> bool:
    """Back to the default avatar; False (and nothing changes) when it was the default."""
    db.execute("DELETE FROM room_avatars WHERE room_id = :id", {"id": room_id})
    changed = db.execute(
        """
        UPDATE rooms
           SET avatar_type = '', avatar = NULL, avatar_color = '',
               avatar_version = avatar_version + 1
         WHERE id = :id AND avatar_type <> ''
        """,
        {"id": room_id},
    ).rowcount
    return changed > 0


def other_user_of(db, room_id: int, user_id):
    """The first user of a room other than `user_id`, with display name, or None."""
    return db.execute(
        """
        SELECT u.id, u.display_name
          FROM participants AS p
          JOIN users AS u ON u.id = p.user_id
         WHERE p.room_id = :room_id AND p.user_id <> coalesce(:user_id, '')
         ORDER BY p.id
         LIMIT 1
        """,
        {"room_id": room_id, "user_id": user_id},
    ).fetchone()


# --- User status ---------------------------------------------------------------


def status_rows(db, user_ids) -> list[sqlite3.Row]:
    """The stored statuses of these users (users without one have no row)."""
    return db.execute(
        """
        SELECT * FROM user_status
         WHERE user_id IN (SELECT value FROM json_each(:ids))
        """,
        {"ids": json.dumps(list(user_ids))},
    ).fetchall()


def status_row(db, user_id: str):
    return db.execute(
        "SELECT * FROM user_status WHERE user_id = :id", {"id": user_id}
    ).fetchone()


def list_status_rows(db, limit: int, offset: int) -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT * FROM user_status
         ORDER BY user_id
         LIMIT :limit OFFSET :offset
        """,
        {"limit": limit, "offset": offset},
    ).fetchall()


def ensure_status_row(db, user_id: str) -> None:
    db.execute(
        "INSERT OR IGNORE INTO user_status (user_id, status) VALUES (:id, 'offline')",
        {"id": user_id},
    )


def set_status_type(db, user_id: str, status: str, now: int, user_defined: bool) -> None:
    ensure_status_row(db, user_id)
    db.execute(
        """
        UPDATE user_status
           SET status = :status, status_timestamp = :now, user_defined = :user_defined
         WHERE user_id = :id
        """,
        {"id": user_id, "status": status, "now": now, "user_defined": int(user_defined)},
    )


def touch_status(db, user_id: str, now: int) -> None:
    """A heartbeat that keeps the status as it is."""
    db.execute(
        "UPDATE user_status SET status_timestamp = :now WHERE user_id = :id",
        {"id": user_id, "now": now},
    )


def set_status_message(db, user_id: str, message: str, icon: str, message_id, clear_at) -> None:
    """A custom message (message_id None) or a predefined one (message and icon empty)."""
    ensure_status_row(db, user_id)
    db.execute(
        """
        UPDATE user_status
           SET message = :message, icon = :icon, message_id = :message_id,
               clear_at = :clear_at
         WHERE user_id = :id
        """,
        {
            "id": user_id,
            "message": message,
            "icon": icon,
            "message_id": message_id,
            "clear_at": clear_at,
        },
    )


def clear_status_message(db, user_id: str) -> None:
    db.execute(
        """
        UPDATE user_status
           SET message = '', icon = '', message_id = NULL, clear_at = NULL
         WHERE user_id = :id
        """,
        {"id": user_id},
    )


# --- Autocomplete --------------------------------------------------------------


def search_users(db, search: str) -> list[sqlite3.Row]:
    """Users whose id, display name or email contains `search` (any case)."""
    return db.execute(
        """
        SELECT id, display_name, email
          FROM users
         WHERE enabled
           AND (instr(lower(id), lower(:search)) > 0
                OR instr(lower(display_name), lower(:search)) > 0
                OR instr(lower(email), lower(:search)) > 0)
         ORDER BY lower(display_name), id
        """,
        {"search": search},
    ).fetchall()


def user_ids_in_room(db, room_id: int) -> set[str]:
    return {
        row[0]
        for row in db.execute(
            "SELECT user_id FROM participants WHERE room_id = :id AND user_id IS NOT NULL",
            {"id": room_id},
        )
    }


# ---------------------------------------------------------------------------
# JSON shapes: the only place columns become the document's camelCase fields
# ---------------------------------------------------------------------------


def plural(count, one, many):
    return one if count == 1 else many.format(count)


def room_json(room, rows, viewer, now) -> dict:
    """The room object of SPEC 3 for `viewer`, from all of the room's rows."""
    active_since = now - ACTIVE_SECONDS
    mine = None
    for row in rows:
        if (viewer.user_id is not None and row["user_id"] == viewer.user_id) or (
            viewer.guest_id is not None and row["guest_id"] == viewer.guest_id
        ):
            mine = row
    active = [r for r in rows if r["session_id"] != "0" and r["last_ping"] > active_since]
    active_guests = [r for r in active if r["user_id"] is None]
    users = [r for r in rows if r["user_id"] is not None]
    other_users = [r for r in users if mine is None or r["id"] != mine["id"]]

    name = room["name"]
    one_to_one_partner = None
    if room["type"] == ROOM_ONE_TO_ONE and other_users:
        one_to_one_partner = other_users[0]
        name = one_to_one_partner["user_id"]

    if mine is None:
        return {
            "id": room["id"],
            "token": room["token"],
            "type": room["type"],
            "name": name,
            "displayName": name,
            "participantType": GUEST,
            "participantInCall": False,
            "count": len(active),
            "hasPassword": bool(room["password_hash"]),
            "hasCall": False,
            "lastPing": 0,
            "sessionId": "0",
            "participants": [],
            "numGuests": 0,
            "guestList": "",
        }

    guest_list = ""
    if room["type"] == ROOM_PUBLIC:
        if viewer.is_guest:
            others = len([r for r in active_guests if r["id"] != mine["id"]])
            if others:
                guest_list = plural(others, "1 other guest", "{} other guests")
        elif active_guests:
            guest_list = plural(len(active_guests), "1 guest", "{} guests")

    if room["name"]:
        display_name = room["name"]
    elif one_to_one_partner is not None:
        display_name = one_to_one_partner["display_name"]
    else:
        names = [r["display_name"] for r in other_users]
        if viewer.is_guest or not names:
            names.append("You")
        if guest_list:
            names.append(guest_list)
        display_name = ", ".join(names)

    return {
        "id": room["id"],
        "token": room["token"],
        "type": room["type"],
        "name": name,
        "displayName": display_name,
        "participantType": mine["participant_type"],
        "participantInCall": bool(mine["in_call"] & IN_CALL),
        "count": len(active),
        "hasPassword": bool(room["password_hash"]),
        "hasCall": any(r["in_call"] & IN_CALL for r in active),
        "lastPing": mine["last_ping"],
        "sessionId": mine["session_id"],
        "participants": {
            r["user_id"]: {
                "name": r["display_name"],
                "type": r["participant_type"],
                "call": bool(r["in_call"] & IN_CALL),
            }
            for r in users
        }
        or [],
        "numGuests": len(active_guests),
        "guestList": guest_list,
    }


def participant_json(row) -> dict:
    return {
        "userId": row["user_id"] or "",
        "displayName": row["display_name"] if row["user_id"] else "",
        "participantType": row["participant_type"],
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
        "inCall": bool(row["in_call"] & IN_CALL),
    }


def call_peer_json(row, token) -> dict:
    return {
        "userId": row["user_id"] or "",
        "token": token,
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
    }


def message_json(row, token) -> dict:
    return {
        "id": row["id"],
        "token": token,
        "actorType": row["actor_type"],
        "actorId": row["actor_id"],
        "actorDisplayName": row["actor_display_name"],
        "timestamp": row["timestamp"],
        "message": row["message"],
    }


def user_in_room_json(row) -> dict:
    return {
        "userId": row["user_id"] or "",
        "roomId": row["room_id"],
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
        "inCall": bool(row["in_call"] & IN_CALL),
    }


def user_json(db, row) -> dict:
    """A user as the provisioning API shows it, with every field the apps and
    nc-py-api read (profile fields talk-server does not keep are empty)."""
    return {
        "enabled": bool(row["enabled"]),
        "storageLocation": "",
        "id": row["id"],
        "lastLogin": 0,
        "backend": "Database",
        "subadmin": [],
        "quota": {"free": -3, "used": 0, "total": -3, "relative": 0, "quota": -3},
        "manager": "",
        "email": row["email"] or None,
        "additional_mail": [],
        "displayname": row["display_name"],
        "display-name": row["display_name"],
        "phone": "",
        "address": "",
        "website": "",
        "twitter": "",
        "fediverse": "",
        "organisation": "",
        "role": "",
        "headline": "",
        "biography": "",
        "profile_enabled": "1",
        "pronouns": "",
        "groups": groups_of(db, row["id"]),
        "language": "en",
        "locale": "",
        "timezone": "",
        "notify_email": None,
        "backendCapabilities": {"setDisplayName": True, "setPassword": True},
    }


def app_password_json(row) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "created": row["created"],
        "lastUsed": row["last_used"],
    }


# --- Today's shapes (API v4 and modern chat) ---------------------------------


def guest_actor_id(guest_id) -> str:
    """A guest's public actor id: a hash of its (secret) cookie hash."""
    return hashlib.sha1(guest_id.encode()).hexdigest()


def lobby_active(room, now) -> bool:
    """The lobby holds non-moderators back until its timer (if any) passes."""
    timer = room["lobby_timer"]
    return room["lobby_state"] == LOBBY_NON_MODERATORS and not (0 < timer <= now)


def effective_permissions(room, row) -> int:
    """What an attendee may do (docs/constants.md): moderators everything, else
    their custom set, else the room's default set, else the default."""
    if row is None:
        return 0
    if row["participant_type"] in MODERATOR_TYPES:
        return PERMISSIONS_ALL
    if row["permissions"] & PERM_CUSTOM:
        return row["permissions"]
    return default_permissions(room)


def default_permissions(room) -> int:
    """What attendees without a custom set may do: the room's default set, else the default."""
    if room["default_permissions"] & PERM_CUSTOM:
        return room["default_permissions"]
    return PERMISSIONS_DEFAULT_SET


def effective_notification_level(room, row) -> int:
    """The stored level, or Talk's default: always for one-to-one, mentions elsewhere."""
    if row["notification_level"] != NOTIFY_DEFAULT:
        return row["notification_level"]
    return NOTIFY_ALWAYS if room["type"] in (ROOM_ONE_TO_ONE, ROOM_NOTE_TO_SELF) else NOTIFY_MENTION


MENTION = re.compile(r"""(?<![^\s(\[{])@(?:"([^"\n]{1,100})"|([A-Za-z0-9_.@'-]+))""")


def mention_candidates(match) -> list[tuple[str, str]]:
    """What a typed @mention may name, as (name, trailing text not part of it)."""
    quoted, bare = match.group(1), match.group(2)
    if quoted is not None:
        return [(quoted, "")]
    stripped = bare.rstrip(".'-@")
    return [(bare, "")] + ([(stripped, bare[len(stripped):])] if stripped and stripped != bare else [])


def render_mentions(text: str, parameters: dict) -> str:
    """Replace the stored @mentions by the {mention-...} placeholders of their parameters."""
    keys = {}
    for key, value in parameters.items():
        if key.startswith("mention-") and isinstance(value, dict):
            keys["all" if value.get("type") == "call" else value.get("id")] = key
    if not keys:
        return text

    def replace(match):
        for name, rest in mention_candidates(match):
            if name in keys:
                return "{" + keys[name] + "}" + rest
        return match.group(0)

    return MENTION.sub(replace, text)


def message_parameters(row) -> dict:
    try:
        value = json.loads(row["parameters"])
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def message_actor_name(row) -> str:
    """The author's name today's clients show: users by account, guests as they chose."""
    if row["actor_type"] == "users":
        return row["actor_display_name"]
    return row["actor_name"]


def chat_message_json(row, token, own=None, parent=None, with_parent=True, now=0) -> dict:
    """A chat message as today's clients read it (openapi ChatMessage).

    `own` lists the emojis the viewer reacted with; `parent` is the row this
    one replies to (shown without its own parent; `{"id", "deleted"}` once
    deleted, or when it is gone).
    """
    parameters = message_parameters(row)
    kind = row["message_type"]
    reactions = json.loads(row["reactions"] or "{}") if kind == "comment" else {}
    answer = {
        "id": row["id"],
        "token": token,
        "actorType": row["actor_type"],
        "actorId": row["actor_id"],
        "actorDisplayName": message_actor_name(row),
        "timestamp": row["timestamp"],
        "message": render_mentions(row["message"], parameters) if kind == "comment" else row["message"],
        "messageParameters": parameters or [],
        "messageType": kind,
        "systemMessage": row["verb"],
        "isReplyable": kind == "comment" and not row["verb"] and not (0 < row["expires"] <= now),
        "referenceId": row["reference_id"],
        "markdown": kind == "comment",
        "reactions": reactions or [],
        "expirationTimestamp": row["expires"],
        "silent": bool(row["silent"]),
    }
    if row["edit_time"] and kind == "comment":
        answer.update({
            "lastEditActorType": row["edit_actor_type"],
            "lastEditActorId": row["edit_actor_id"],
            "lastEditActorDisplayName": row["edit_actor_name"],
            "lastEditTimestamp": row["edit_time"],
        })
    if own is not None:
        answer["reactionsSelf"] = own
    if with_parent and row["parent_id"]:
        if parent is None or parent["message_type"] == "comment_deleted" and kind == "comment":
            answer["parent"] = {"id": row["parent_id"], "deleted": True}
        else:
            answer["parent"] = chat_message_json(parent, token, with_parent=False, now=now)
    return answer


def poll_json(poll, votes_self, details, is_moderator) -> dict:
    """A poll (openapi Poll): votes and voters once visible to the viewer."""
    own = [row["option_id"] for row in votes_self]
    answer = {
        "id": poll["id"],
        "question": poll["question"],
        "options": json.loads(poll["options"]),
        "actorType": poll["actor_type"],
        "actorId": poll["actor_id"],
        "actorDisplayName": poll["actor_name"],
        "status": poll["status"],
        "resultMode": poll["result_mode"],
        "maxVotes": poll["max_votes"],
        "votedSelf": own,
    }
    closed = poll["status"] == POLL_CLOSED
    public = poll["result_mode"] == POLL_PUBLIC
    if closed or (public and own):
        answer["votes"] = json.loads(poll["votes"]) or []
        answer["numVoters"] = poll["num_voters"]
    if closed and public:
        answer["details"] = [
            {"actorType": row["actor_type"], "actorId": row["actor_id"],
             "actorDisplayName": row["display_name"], "optionId": row["option_id"]}
            for row in details
        ]
    return answer


def mentioned(mine, column, unread, room) -> bool:
    """unreadMention(Direct): a mention after the read marker; in a one-to-one
    conversation every unread message is one (as Talk)."""
    if mine is None:
        return False
    if room["type"] == ROOM_ONE_TO_ONE:
        return unread > 0
    return mine[column] > mine["last_read_message"]


def call_flags_now(session, now) -> int:
    """A session's in-call flags, 0 once it has not been seen for CALL_TIMEOUT_SECONDS (no ping)."""
    if not session["in_call"] & FLAG_IN_CALL or session["last_ping"] <= now - CALL_TIMEOUT_SECONDS:
        return 0
    return session["in_call"]


def attendee_actor(row) -> tuple[str, str]:
    if row["user_id"] is not None:
        return "users", row["user_id"]
    return "guests", guest_actor_id(row["guest_id"])


def conversation_json(room, rows, sessions, viewer, my_session, extras, now) -> dict:
    """The Room of today's API (openapi Room) as `viewer` on `my_session` sees it.

    `rows` are the room's attendees (participants_of), `sessions` its
    sessions (sessions_of_room), `extras` the last message and unread count.
    """
    base = room_json(room, rows, viewer, now)  # the naming rules live there
    mine = next(
        (r for r in rows
         if (viewer.user_id is not None and r["user_id"] == viewer.user_id)
         or (viewer.guest_id is not None and r["guest_id"] == viewer.guest_id)),
        None,
    )
    flags = 0
    for session in sessions:
        flags |= call_flags_now(session, now)
    permissions = effective_permissions(room, mine)
    moderator = mine is not None and mine["participant_type"] in MODERATOR_TYPES
    users = [r for r in rows if r["user_id"] is not None]
    other_moderators = [
        r for r in users if r["participant_type"] in MODERATOR_TYPES and r is not mine
    ]
    if room["type"] == ROOM_NOTE_TO_SELF:
        can_leave = False
    elif room["type"] == ROOM_ONE_TO_ONE or not moderator:
        can_leave = mine is not None
    else:
        can_leave = bool(other_moderators) or len(users) <= 1
    last = extras.get("last_message")
    unread = extras.get("unread", 0) if mine is not None else 0
    actor_type, actor_id = attendee_actor(mine) if mine is not None else ("", "")
    partner = next((r for r in users if r is not mine), None)
    avatar = room_avatar_json(room, partner["display_name"] if partner is not None else "")
    return {
        "id": room["id"],
        "token": room["token"],
        "type": room["type"],
        "name": base["name"],
        "displayName": base["displayName"],
        "description": room["description"],
        "objectType": room["object_type"],
        "objectId": room["object_id"],
        "actorType": actor_type,
        "actorId": actor_id,
        "attendeeId": mine["id"] if mine is not None else 0,
        "attendeePin": "",
        "participantType": mine["participant_type"] if mine is not None else 0,
        "sessionId": my_session["id"] if my_session is not None else "0",
        "lastPing": mine["last_ping"] if mine is not None else 0,
        "participantFlags": call_flags_now(my_session, now) if my_session is not None else 0,
        "permissions": permissions,
        "attendeePermissions": mine["permissions"] if mine is not None else 0,
        "callPermissions": room["call_permissions"],
        "defaultPermissions": room["default_permissions"],
        "hasCall": bool(flags & FLAG_IN_CALL),
        "callFlag": flags,
        "callStartTime": room["call_start_time"] if flags & FLAG_IN_CALL else 0,
        "callRecording": 0,
        "recordingConsent": 0,
        "canStartCall": bool(permissions & PERM_CALL_START),
        "canEnableSIP": False,
        "sipEnabled": 0,
        "lastActivity": room["last_activity"],
        "lastMessage": (
            chat_message_json(last, room["token"], with_parent=False, now=now)
            if last is not None else []
        ),
        "unreadMessages": unread,
        "unreadMention": mentioned(mine, "last_mention_message", unread, room),
        "unreadMentionDirect": mentioned(mine, "last_mention_direct", unread, room),
        "lastReadMessage": mine["last_read_message"] if mine is not None else 0,
        "lastCommonReadMessage": min(
            (r["last_read_message"] for r in users), default=0),
        "messageExpiration": room["message_expiration"],
        "hasPassword": bool(room["password_hash"]),
        "isFavorite": bool(mine["favorite"]) if mine is not None else False,
        "isArchived": False,
        "isImportant": False,
        "isSensitive": False,
        **avatar,
        "canLeaveConversation": can_leave,
        "canDeleteConversation": moderator and room["type"] != ROOM_ONE_TO_ONE,
        "readOnly": room["read_only"],
        "listable": room["listable"],
        "lobbyState": LOBBY_NON_MODERATORS if lobby_active(room, now) else LOBBY_NONE,
        "lobbyTimer": room["lobby_timer"] if lobby_active(room, now) else 0,
        "mentionPermissions": 0,
        "breakoutRoomMode": 0,
        "breakoutRoomStatus": 0,
        "notificationLevel": effective_notification_level(room, mine) if mine is not None else 0,
        "notificationCalls": mine["notification_calls"] if mine is not None else 0,
    }


def attendee_json(room, row, sessions, now) -> dict:
    """An attendee of GET /api/v4/room/{token}/participants (openapi Participant)."""
    actor_type, actor_id = attendee_actor(row)
    mine = [s for s in sessions if s["participant_id"] == row["id"]]
    in_call = 0
    for session in mine:
        in_call |= call_flags_now(session, now)
    if row["user_id"] is not None:
        name = row["display_name"]
    else:
        name = row["guest_name"]
    return {
        "roomToken": room["token"],
        "attendeeId": row["id"],
        "actorType": actor_type,
        "actorId": actor_id,
        "displayName": name,
        "participantType": row["participant_type"],
        "lastPing": row["last_ping"],
        "inCall": in_call,
        "permissions": effective_permissions(room, row),
        "attendeePermissions": row["permissions"],
        "attendeePin": "",
        "sessionIds": [s["id"] for s in mine],
    }


def room_avatar_json(fields, partner_name: str = "") -> dict:
    """`isCustomAvatar` and `avatarVersion` of a room, from room_avatar_fields().

    The version changes whenever the picture does: a new upload or emoji, a
    delete, public/private (the default icon differs) and, for one-to-one
    rooms, the other user's display name (pass it as partner_name).
    """
    custom = fields["avatar_type"] != ""
    seed = f"{fields['type']}:{fields['avatar_type']}:{fields['avatar_version']}"
    if fields["type"] in AVATAR_FIXED_TYPES:
        seed += ":" + partner_name
    version = hashlib.sha1(seed.encode("utf-8")).hexdigest()[:8]
    return {"isCustomAvatar": custom, "avatarVersion": version}


def effective_status(row, now: int) -> dict:
    """A stored status as it reads at `now`: an expired message is gone; an
    automatic (or user-set online) status without heartbeats is offline."""
    status = row["status"]
    user_defined = bool(row["user_defined"])
    if row["status_timestamp"] < now - STATUS_STALE_SECONDS and (
        not user_defined or status == "online"
    ):
        status, user_defined = "offline", False
    message, icon, message_id, clear_at = row["message"], row["icon"], row["message_id"], row["clear_at"]
    if clear_at is not None and clear_at <= now:
        message, icon, message_id, clear_at = "", "", None, None
    predefined = PREDEFINED_BY_ID.get(message_id)
    if predefined is not None:
        icon, message = predefined[1], predefined[2]
    return {
        "userId": row["user_id"],
        "message": message or None,
        "messageId": message_id,
        "messageIsPredefined": message_id is not None,
        "icon": icon or None,
        "clearAt": clear_at,
        "status": status,
        "statusIsUserDefined": user_defined,
    }


def private_status_json(row, user_id: str, now: int) -> dict:
    """The caller's own status (UserStatusPrivate); offline when never set."""
    if row is None:
        return {
            "userId": user_id,
            "message": None,
            "messageId": None,
            "messageIsPredefined": False,
            "icon": None,
            "clearAt": None,
            "status": "offline",
            "statusIsUserDefined": False,
        }
    return effective_status(row, now)


def public_status_json(row, now: int) -> dict:
    """Another user's status (UserStatusPublic): invisible shows as offline."""
    full = effective_status(row, now)
    return {
        "userId": full["userId"],
        "message": full["message"],
        "icon": full["icon"],
        "clearAt": full["clearAt"],
        "status": "offline" if full["status"] == "invisible" else full["status"],
    }


def statuses_of(db, user_ids, now: int) -> dict[str, dict]:
    """The Room/participant status fields of users, for includeStatus.

    {user_id: {"status", "statusIcon", "statusMessage", "statusClearAt"}} for
    users who have a status row (others are left out, as Talk leaves out the
    fields); invisible shows as offline.
    """
    answer = {}
    for row in status_rows(db, user_ids):
        public = public_status_json(row, now)
        answer[row["user_id"]] = {
            "status": public["status"],
            "statusIcon": public["icon"],
            "statusMessage": public["message"],
            "statusClearAt": public["clearAt"],
        }
    return answer


def predefined_status_json(entry) -> dict:
    status_id, icon, message, clear_at = entry
    return {"id": status_id, "icon": icon, "message": message, "clearAt": clear_at, "visible": True}


def autocomplete_user_json(row, status) -> dict:
    return {
        "id": row["id"],
        "label": row["display_name"],
        "icon": "icon-user",
        "source": "users",
        "status": status or "",
        "subline": "",
        "shareWithDisplayNameUnique": row["email"] or row["id"],
    }


def autocomplete_group_json(group_id: str) -> dict:
    return {
        "id": group_id,
        "label": group_id,
        "icon": "icon-group",
        "source": "groups",
        "status": "",
        "subline": "",
        "shareWithDisplayNameUnique": "",
    }


def call_peer_v4_json(row, token) -> dict:
    """A session in the call (openapi CallPeer), from live_sessions."""
    actor_type, actor_id = attendee_actor(row)
    return {
        "actorType": actor_type,
        "actorId": actor_id,
        "displayName": row["display_name"] if row["user_id"] is not None else row["guest_name"],
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
        "token": token,
    }


def signaling_session_json(room, row, now) -> dict:
    """A session of usersInRoom on signaling v3 (openapi SignalingSession): `inCall` is
    the integer flags (the Android app casts it to a long; a boolean breaks it)."""
    actor_type, actor_id = attendee_actor(row)
    return {
        "userId": row["user_id"] or "",
        "roomId": room["id"],
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
        "inCall": call_flags_now(row, now),
        "participantPermissions": effective_permissions(room, row),
        "actorType": actor_type,
        "actorId": actor_id,
    }


# --- The High-Performance Backend (lib/Signaling/BackendNotifier.php) --------------


def signaling_properties(db, room, user_id="") -> dict:
    """A room as the signaling server hands it to its clients
    (Room::getPropertiesForSignaling); a one-to-one room is named after the
    partner of `user_id`."""
    name = room["name"]
    if room["type"] == ROOM_ONE_TO_ONE and user_id:
        partner = other_user_of(db, room["id"], user_id)
        name = partner["display_name"] if partner is not None else name
    return {
        "name": name,
        "type": room["type"],
        "lobby-state": room["lobby_state"],
        "lobby-timer": room["lobby_timer"],
        "read-only": room["read_only"],
        "listable": room["listable"],
        "active-since": room["call_start_time"] or None,
        "sip-enabled": 0,
        "description": room["description"],
    }


def backend_permissions(room, row) -> list[str]:
    """What the signaling server lets an attendee do: publish what its permission
    bits allow; moderators also "control" (force-mute)."""
    permissions = effective_permissions(room, row)
    names = [name for bit, name in ((PERM_AUDIO, "publish-audio"), (PERM_VIDEO, "publish-video"),
                                    (PERM_SCREEN, "publish-screen")) if permissions & bit]
    if row["participant_type"] in MODERATOR_TYPES:
        names.append("control")
    return names


def backend_session_json(room, row, now) -> dict:
    """An attendee's session as the signaling server's participant lists carry it
    (sessionId "0", no flags and the custom bit only, for one without a session)."""
    actor_type, actor_id = attendee_actor(row)
    has_session = row["session_id"] != "0"
    entry = {
        "inCall": call_flags_now(row, now) if has_session else 0,
        "lastPing": row["last_ping"],
        "sessionId": row["session_id"],
        "participantType": row["participant_type"],
        "participantPermissions": effective_permissions(room, row) if has_session else PERM_CUSTOM,
        "displayName": row["display_name"] if row["user_id"] is not None else row["guest_name"],
        "actorType": actor_type,
        "actorId": actor_id,
    }
    if row["user_id"] is not None:
        entry["userId"] = row["user_id"]
    return entry


# --- Bots and their webhooks (docs/bots.md, lib/Service/ActivityPubHelper.php) --


def php_json(value) -> str:
    """JSON as PHP's json_encode writes it (compact, \\uXXXX, escaped slashes):
    the webhook bodies byte for byte as Talk sends them."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")


def bot_signature(secret: str, random: str, text: str) -> str:
    """Hex HMAC-SHA256 over random + text with the bot's secret (both directions)."""
    return hmac.new(secret.encode("utf-8"), (random + text).encode("utf-8"), "sha256").hexdigest()


def bot_actor_id(bot) -> str:
    """How a bot writes in the chat (Attendee::ACTOR_BOT_PREFIX + sha1 of its URL)."""
    return "bot-" + bot["url_hash"]


def bot_display_name(bot) -> str:
    return f"{bot['name']} (Bot)"


def feature_labels(flags: int) -> str:
    """Bot::featureFlagsToLabels: "webhook, response", or "none"."""
    labels = [label for label, flag in BOT_FEATURES.items() if flags & flag]
    return ", ".join(labels) or "none"


def bot_json(bot, enabled_here: bool) -> dict | None:
    """A bot as a conversation's moderators see it (BotController::formatBot):
    None for a no-setup bot that is not set up here."""
    state = BOT_ENABLED if enabled_here else BOT_DISABLED
    if bot["state"] == BOT_NO_SETUP:
        if not enabled_here:
            return None
        state = BOT_NO_SETUP
    return {"id": bot["id"], "name": bot["name"], "description": bot["description"],
            "state": state}


def bot_admin_json(bot, secret=False) -> dict:
    """A bot with its details (BotServer::jsonSerialize), the secret only on request."""
    answer = {
        "id": bot["id"],
        "name": bot["name"],
        "url": bot["url"],
        "url_hash": bot["url_hash"],
        "description": bot["description"],
        "secret": bot["secret"],
        "error_count": bot["error_count"],
        "last_error_date": bot["last_error_date"],
        "last_error_message": bot["last_error_message"],
        "state": bot["state"],
        "features": bot["features"],
    }
    if not secret:
        del answer["secret"]
    return answer


def as_application(bot) -> dict:
    return {"type": "Application", "id": "bots/" + bot_actor_id(bot), "name": bot["name"]}


def as_collection(room) -> dict:
    return {"type": "Collection", "id": room["token"], "name": room["name"]}


def as_person(row, participant_type=None) -> dict:
    """The author of a message (generatePersonFromMessageActor), with the
    attendee's participant type as a string when known (FromAttendee)."""
    person = {"type": "Person", "id": f"{row['actor_type']}/{row['actor_id']}",
              "name": message_actor_name(row)}
    if participant_type is not None:
        person["talkParticipantType"] = str(participant_type)
    return person


def as_note(row, token, name) -> dict:
    """A message as a Note: its id as a string, its text and rich objects as
    the JSON string `content` (generateNote)."""
    shown = chat_message_json(row, token, with_parent=False)
    content = {"message": shown["message"], "parameters": shown["messageParameters"]}
    return {"type": "Note", "id": str(row["id"]), "name": name,
            "content": php_json(content), "mediaType": "text/markdown"}


def webhook_create(room, row, participant_type, parent=None) -> dict:
    """Create: a user or guest wrote a message (BotService::afterChatMessageSent)."""
    note = as_note(row, room["token"], "message")
    if parent is not None:
        note["inReplyTo"] = {"type": "Note", "actor": as_person(parent),
                             "object": as_note(parent, room["token"], "message")}
    return {"type": "Create", "actor": as_person(row, participant_type), "object": note,
            "target": as_collection(room)}


def webhook_activity(room, row) -> dict:
    """Activity: a system message, named by its verb (afterSystemMessageSent)."""
    return {"type": "Activity", "actor": as_person(row),
            "object": as_note(row, room["token"], row["verb"]), "target": as_collection(room)}


def webhook_like(room, row, reactor, reaction) -> dict:
    """Like: `reactor` (actor_type, actor_id, name) reacted to a message.

    Talk 21's code names the message's author as the actor while its
    documentation says the one who reacted; a bot needs the latter.
    """
    actor_type, actor_id, name = reactor
    return {"type": "Like", "actor": {"type": "Person", "id": f"{actor_type}/{actor_id}",
                                      "name": name},
            "object": as_note(row, room["token"], "message"), "target": as_collection(room),
            "content": reaction}


def webhook_undo(room, row, reactor, reaction) -> dict:
    """Undo: the Like of a reaction that was taken back (afterReactionRemoved)."""
    like = webhook_like(room, row, reactor, reaction)
    return {"type": "Undo", "actor": like["actor"], "object": like, "target": like["target"]}


def webhook_membership(room, bot, kind) -> dict:
    """Join or Leave: the bot was set up in a conversation or removed from it."""
    return {"type": kind, "actor": as_application(bot), "object": as_collection(room)}


# ---------------------------------------------------------------------------
# Auth and request helpers
# ---------------------------------------------------------------------------


# How a user proved who they are (Actor.credential): some endpoints care.
PASSWORD, APP_PASSWORD, WEB = "password", "app-password", "web"


@dataclass
class Actor:
    """Who is calling: a user (user_id), or a guest (guest_id, None without a cookie).

    A user's `credential` says how they signed in: PASSWORD (Basic auth with
    the login password), APP_PASSWORD (Basic auth with the app password
    `app_password_id`) or WEB (the sign-in page's session cookie).
    """

    user_id: str | None = None
    display_name: str = ""
    guest_id: str | None = None
    credential: str = ""
    app_password_id: int | None = None

    @property
    def is_guest(self) -> bool:
        return self.user_id is None


@dataclass
class Verified:
    """A login the cache vouches for: its keyed hash and the row it matched."""

    fast: bytes
    row: sqlite3.Row
    expires: float
    checked: float  # when the row was last read


class Credentials:
    """Verifies Basic-auth passwords, with a short-lived in-memory cache.

    A cached login answers without touching the database for `recheck`
    seconds, then re-reads the user's row: a password changed or a user
    deleted through this server takes effect at once (forget), one changed
    by another process (the command line) within `recheck` seconds.
    """

    def __init__(self, ttl=CREDENTIAL_CACHE_SECONDS, recheck=1.0):
        self.ttl = ttl
        self.recheck = recheck
        self._key = secrets.token_bytes(32)
        self._cache: dict[str, Verified] = {}
        self._lock = threading.Lock()
        # scrypt takes 16 MiB a hash: two at a time keep a burst of first
        # logins from swelling the process (SPEC 1.5).
        self._hashing = threading.BoundedSemaphore(2)
        self._stripes = [threading.Lock() for _ in range(16)]
        self._dummy = None

    def _fast(self, user_id, password):
        return hmac.new(self._key, f"{user_id}\0{password}".encode(), "sha256").digest()

    def _vouched(self, user_id, fast, row=None):
        """The cached row when the cache vouches for this login, else None."""
        with self._lock:
            entry = self._cache.get(user_id)
        now = time.monotonic()
        if entry is None or entry.expires <= now or not hmac.compare_digest(entry.fast, fast):
            return None
        if row is None:
            return entry.row if now - entry.checked < self.recheck else None
        if row["password_hash"] != entry.row["password_hash"]:
            return None
        entry.row, entry.checked = row, now
        return row

    def verify(self, database, user_id: str, password: str, guard=None):
        """The user's row when the password is right, else None.

        A login the cache vouches for answers at once. Otherwise `guard` (a
        LoginGuard) may refuse before this waits for anything, and counts the
        attempt right before the password is hashed.
        """
        fast = self._fast(user_id, password)
        row = self._vouched(user_id, fast)
        if row is not None:
            return row
        with database.read() as db:
            row = get_user(db, user_id)
        if row is not None and self._vouched(user_id, fast, row):
            return row
        if guard is not None:
            guard.check()
        # One full check per user at a time: a burst of first requests from
        # one client waits for the first check instead of each paying for it.
        with self._stripes[hash(user_id) % len(self._stripes)]:
            if row is not None and self._vouched(user_id, fast, row):
                return row
            if guard is not None:
                guard.begin()  # 429 here takes no hashing slot
            with self._hashing:
                if self._dummy is None:
                    self._dummy = hash_password(secrets.token_hex(8))
                # Unknown users cost a hash too, so timing does not tell them.
                ok = check_password(row["password_hash"] if row else self._dummy, password)
        if not ok or row is None:
            return None
        now = time.monotonic()
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[user_id] = Verified(fast, row, now + self.ttl, now)
        return row

    def forget(self, user_id: str) -> None:
        """Drop a user's cached login (password changed, user deleted)."""
        with self._lock:
            self._cache.pop(user_id, None)

    def hash(self, password: str) -> str:
        with self._hashing:
            return hash_password(password)

    def check(self, stored: str, password: str) -> bool:
        with self._hashing:
            return check_password(stored, password)


def basic_credentials(header: str):
    """(user, password) from an Authorization header, or None when malformed."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


@dataclass(frozen=True)
class Upload:
    """A file from a multipart/form-data body."""

    filename: str
    content_type: str
    data: bytes = field(repr=False)


def header_value(name: str, value: str):
    """A header as an email Message, to read its parameters with get_param
    (quoting, RFC 2231). The email package is imported here, on the first
    upload: it costs a Pi 2.5 MB that most servers never need."""
    import email.message

    message = email.message.Message()
    message[name] = value
    return message


def multipart_headers(block: bytes) -> dict[str, str]:
    """A part's header lines, names lowercased; 400 when they are not UTF-8 "Name: value"."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        fail(400, "Malformed multipart body: part headers are not UTF-8")
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            fail(400, "Malformed multipart body: bad part header")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse_multipart(raw: bytes, content_type: str) -> dict:
    """A multipart/form-data body: fields as strings, files as Upload; else 400.

    Strict and byte-exact (RFC 7578): every part needs a form-data name, the
    closing delimiter must be there, at most MULTIPART_MAX_PARTS parts; a
    repeated name keeps the last value, as form bodies do.
    """
    boundary = header_value("content-type", content_type).get_param("boundary")
    if not isinstance(boundary, str) or not re.fullmatch(r"[ -~]{1,70}", boundary):
        fail(400, "Malformed multipart body: missing or invalid boundary")
    delimiter = b"--" + boundary.encode("ascii")
    if raw.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first delimiter
        first = raw.find(b"\r\n" + delimiter)
        if first < 0:
            fail(400, "Malformed multipart body: no delimiter")
        pos = first + 2 + len(delimiter)
    fields: dict = {}
    for _ in range(MULTIPART_MAX_PARTS + 1):
        if raw.startswith(b"--", pos):
            return fields  # the closing delimiter; any epilogue is ignored
        while raw[pos : pos + 1] in (b" ", b"\t"):  # transport padding
            pos += 1
        if not raw.startswith(b"\r\n", pos):
            break
        head_end = raw.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            break
        headers = multipart_headers(raw[pos + 2 : head_end]) if head_end > pos + 2 else {}
        end = raw.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            break
        disposition = header_value("content-disposition", headers.get("content-disposition", ""))
        name = disposition.get_param("name", header="content-disposition")
        if disposition.get_content_disposition() != "form-data" or not name:
            fail(400, "Malformed multipart body: a part without a form-data name")
        name = collapse_rfc2231_value(name)
        data = raw[head_end + 4 : end]
        filename = disposition.get_filename()
        if filename is not None:
            ctype = headers.get("content-type", "application/octet-stream")
            fields[name] = Upload(filename, ctype.split(";")[0].strip().lower(), data)
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                fail(400, f"Multipart field {name} is not valid UTF-8")
        pos = end + 2 + len(delimiter)
    else:
        fail(400, f"Multipart body with more than {MULTIPART_MAX_PARTS} parts")
    fail(400, "Malformed multipart body: truncated or without its closing delimiter")


def form_params(pairs) -> dict:
    """Query or form pairs as a dict: the last value wins, but names ending in
    [] (options[]=a&options[]=b, as the apps send lists) give the list `options`."""
    params: dict = {}
    for key, value in pairs:
        if key.endswith("[]"):
            params.setdefault(key[:-2], []).append(value)
        else:
            params[key] = value
    return params


def query_params(query) -> dict:
    """The query string as parameters; values that are not UTF-8 are None (names[]: left out)."""

    def text(value):
        try:
            return value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return None

    pairs = [(key, text(value)) for key, value in query.allitems()]
    params = form_params((k, v) for k, v in pairs if v is not None or not k.endswith("[]"))
    return params


def read_raw_body(environ, max_body) -> bytes:
    """The request body's bytes, or raise 400/413."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        fail(400, "Invalid Content-Length")
    if length > max_body:
        fail(413, f"Request body over {max_body} bytes")
    return environ["wsgi.input"].read(length) if length > 0 else b""


def read_body(environ, max_body):
    """The request body as a dict of parameters (form, multipart or JSON), or raise 400/413."""
    raw = read_raw_body(environ, max_body)
    if not raw:
        return {}
    ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":  # binary files: before any UTF-8 decoding
        return parse_multipart(raw, environ["CONTENT_TYPE"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        fail(400, "Request body is not valid UTF-8")
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            body = json.loads(text)
            # Lone surrogates ("\\ud800") parse but can be neither stored nor sent.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError):
            fail(400, "Request body is not valid JSON")
        if not isinstance(body, dict):
            fail(400, "JSON body must be an object")
        return body
    if ctype in ("", "application/x-www-form-urlencoded", "text/plain"):
        try:
            return form_params(parse_qsl(text, keep_blank_values=True, errors="strict"))
        except ValueError:
            fail(400, "Malformed form body")
    if ctype.startswith("multipart/"):
        fail(400, "Only multipart/form-data bodies are supported; or send a form or JSON")
    fail(400, f"Unsupported content type {ctype}")


def html_escape(text) -> str:
    """Text safe in HTML content and in double- or single-quoted attributes."""
    return xml_escape(str(text)).replace('"', "&quot;").replace("'", "&#x27;")


def collapse_rfc2231_value(value) -> str:
    import email.utils

    return email.utils.collapse_rfc2231_value(value)


# C0 controls other than tab, newline and carriage return: refused on input
# (an XML answer could not carry them, and no client needs them).
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def text_value(name, value, default=None, required=False) -> str | None:
    """A raw parameter as a string; numbers are taken as their text, other types 400."""
    if value is None:
        if required:
            fail(400, f"Missing parameter {name}")
        return default
    if isinstance(value, Upload):
        fail(400, f"Parameter {name} must be text, not a file")
    if isinstance(value, bool) or not isinstance(value, str | int):
        fail(400, f"Parameter {name} must be a string")
    value = str(value)
    if CONTROL_CHARACTERS.search(value):
        fail(400, f"Parameter {name} contains a control character")
    return value


class Call:
    """One request as a handler sees it: the app's state, the actor, the parameters."""

    def __init__(self, talk, actor, params, version):
        self.talk = talk
        self.actor = actor
        self.params = params
        self.version = version
        self.may_wait = True  # False: a long-poll the dispatcher counted as none

    @property
    def now(self) -> int:
        return int(self.talk.clock())

    def has(self, name) -> bool:
        return name in self.params

    def text(self, name, default=None, required=False) -> str | None:
        """A string parameter; numbers are taken as their text, other types 400."""
        return text_value(name, self.params.get(name), default, required)

    def integer(self, name, default=None, minimum=None, required=False) -> int | None:
        """An integer parameter (JSON number or decimal text), else 400."""
        value = self.params.get(name)
        if value is None or value == "":
            if required:
                fail(400, f"Missing parameter {name}")
            return default
        if isinstance(value, bool | Upload):
            fail(400, f"Parameter {name} must be an integer")
        if isinstance(value, str):
            if not re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
                fail(400, f"Parameter {name} must be an integer")
            value = int(value)
        if not isinstance(value, int) or abs(value) >= 10**18:  # SQLite holds 63 bits
            fail(400, f"Parameter {name} must be an integer")
        if minimum is not None and value < minimum:
            fail(400, f"Parameter {name} must be at least {minimum}")
        return value

    def boolean(self, name, default=None) -> bool | None:
        """A boolean parameter: JSON true/false, 1/0 or true/false in any case, else 400."""
        value = self.params.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true"):
            return True
        if text in ("0", "false"):
            return False
        fail(400, f"Parameter {name} must be true or false")

    def device(self, create=False) -> str | None:
        """The keyed hash of this client's device cookie; a new cookie when `create`."""
        cookie = bottle.request.get_cookie(DEVICE_COOKIE)
        if not (cookie and re.fullmatch(r"[A-Za-z0-9_-]{20,100}", cookie)):
            if not create:
                return None
            cookie = secrets.token_urlsafe(32)
            set_cookie(DEVICE_COOKIE, cookie)
            bottle.request.cookies[DEVICE_COOKIE] = cookie
        return hashlib.sha256(cookie.encode("utf-8")).hexdigest()

    def texts(self, name) -> list[str]:
        """A list parameter: name[]=a&name[]=b, a JSON list, or one value; else 400."""
        value = self.params.get(name)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) or not isinstance(item, str | int) for item in items):
            fail(400, f"Parameter {name} must be a list of strings")
        return [str(item) for item in items]

    def upload(self, name, required=False) -> Upload | None:
        """A file from a multipart/form-data body; 400 when the parameter is not a file."""
        value = self.params.get(name)
        if value is None:
            if required:
                fail(400, f"Missing file {name} (send multipart/form-data)")
            return None
        if not isinstance(value, Upload):
            fail(400, f"Parameter {name} must be a file (send multipart/form-data)")
        return value

    def own_session(self, db, me):
        """The caller's session among its attendee row's: the one its device cookie
        names; without a cookie its newest live one (SPEC 11); else None."""
        if me is None:
            return None
        return device_session(sessions_of(db, me["id"]), self.device(), self.now - ACTIVE_SECONDS)

    def guest_id(self, fresh=False) -> str:
        """The guest's cookie hash, setting a new (signed) cookie when it has
        none, or when `fresh`: a new identity once a room password is accepted,
        so a cookie someone planted no longer reads the room."""
        if self.actor.guest_id is None or fresh:
            cookie = new_guest_cookie(self.talk.signin_key)
            set_cookie(GUEST_COOKIE, cookie)
            self.actor.guest_id = guest_hash(cookie)
        return self.actor.guest_id

    def wait_cancelled(self) -> bool:
        """True when the client went away (Waitress checks this for us)."""
        check = bottle.request.environ.get("waitress.client_disconnected")
        return bool(check and check())


def guest_hash(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8")).hexdigest()


GUEST_COOKIE_PATTERN = re.compile(r"([A-Za-z0-9_-]{32})\.([0-9a-f]{32})")


def new_guest_cookie(key: bytes) -> str:
    """A guest cookie only this server can have made: random.signature."""
    nonce = secrets.token_urlsafe(24)
    return f"{nonce}.{keyed_hash(key, 'guest-cookie', nonce)[:32]}"


def guest_cookie_ok(key: bytes, cookie) -> bool:
    """Whether a guest cookie is one this server issued (a chosen one is not)."""
    match = GUEST_COOKIE_PATTERN.fullmatch(cookie or "")
    return bool(match) and hmac.compare_digest(
        match.group(2), keyed_hash(key, "guest-cookie", match.group(1))[:32]
    )


def set_cookie(name: str, value: str) -> None:
    """Set a cookie for this server's requests only: HttpOnly, SameSite=Lax,
    Path=/, and Secure when the request came over HTTPS (through a trusted
    proxy, which Waitress believes about X-Forwarded-Proto)."""
    secure = bottle.request.environ.get("wsgi.url_scheme") == "https"
    bottle.response.set_cookie(name, value, path="/", httponly=True, samesite="lax", secure=secure)


class Throttle:
    """Slows down password guessing, as Nextcloud's brute-force protection
    does, but without holding a worker thread: after `free` failures a key
    (an address, a user name, a room) is refused with 429 and Retry-After for
    a delay that doubles with each further failure; failures are forgotten
    `forget` seconds after the last one.

    An attempt counts before its password is checked (begin), so a burst of
    parallel guesses cannot all pass the check first; a success takes its
    own count back and clears only what it proves (the user name or room
    whose password it knew), never the address: an account holder cannot
    wipe the failures of their guesses at someone else's password.
    """

    def __init__(self, free=THROTTLE_FREE_FAILURES, max_delay=THROTTLE_MAX_DELAY,
                 forget=THROTTLE_FORGET, clock=time.time):
        self.free = free
        self.max_delay = max_delay
        self.forget = forget
        self.clock = clock
        self._failures: dict[tuple, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def _free(self, key) -> int:
        """Failures a key has before any delay. A user name or a room gets
        more than an address: guesses spread over many addresses still slow
        down, but a few of them do not lock the account's owner out."""
        return self.free if key[0] == "address" else self.free * THROTTLE_NAME_FACTOR

    def _wait(self, key, now) -> float:
        """Seconds `key` must still wait (0 or less: it may try); under the lock."""
        count, last = self._failures.get(key, (0, 0.0))
        free = self._free(key)
        if count < free or now - last > self.forget:
            return 0.0
        return last + min(2 ** (count - free), self.max_delay) - now

    def _refuse(self, wait) -> None:
        bottle.response.set_header("Retry-After", str(int(wait) + 1))
        fail(429, f"Too many failed attempts; try again in {int(wait) + 1} s")

    def check(self, *keys) -> None:
        """Raise 429 while any of the keys must wait; counts nothing."""
        now = self.clock()
        with self._lock:
            wait = max(self._wait(key, now) for key in keys)
        if wait > 0:
            self._refuse(wait)

    def begin(self, *keys) -> tuple:
        """Count an attempt against every key at once, or raise 429 counting
        nothing; pass the result to succeeded() when the password was right."""
        now = self.clock()
        with self._lock:
            wait = max(self._wait(key, now) for key in keys)
            if wait <= 0:
                if len(self._failures) > 10000:  # forget the quiet ones
                    cutoff = now - self.forget
                    self._failures = {k: f for k, f in self._failures.items() if f[1] > cutoff}
                for key in keys:
                    count, last = self._failures.get(key, (0, 0.0))
                    if now - last > self.forget:
                        count = 0
                    self._failures[key] = (count + 1, now)
        if wait > 0:
            self._refuse(wait)
        return keys

    def succeeded(self, keys, proven=()) -> None:
        """Take back the attempt `begin` counted; clear the keys in `proven`."""
        with self._lock:
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                if key in proven or count <= 1:
                    self._failures.pop(key, None)
                else:
                    self._failures[key] = (count - 1, last)


def address_key(address: str) -> tuple:
    """The throttle key of a client address: IPv6 by its /64, which one
    subscriber usually holds whole; IPv4 as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ("address", address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ("address", str(ip.ipv4_mapped))
        return ("address", str(ipaddress.ip_network(f"{ip}/64", strict=False)))
    return ("address", str(ip))


def login_keys(environ, user_id: str) -> tuple:
    """What a login attempt counts against: the address and the user name."""
    return address_key(client_address(environ)), ("user", user_id)


class RateLimit:
    """At most `limit` events (or bytes: `weight`) per key in a sliding minute
    (room creation, chat, signaling). Each key keeps its events oldest first
    with their running total, so a take costs the same at any limit."""

    def __init__(self, limit, seconds=60.0, clock=time.monotonic):
        self.limit = limit
        self.seconds = seconds
        self.clock = clock
        self._events: dict[object, list] = {}  # key -> [deque of (time, weight), total]
        self._lock = threading.Lock()

    def take(self, key, what: str, weight: int = 1) -> None:
        now = self.clock()
        since = now - self.seconds
        with self._lock:
            if len(self._events) > 10000:  # forget the quiet ones
                self._events = {
                    k: e for k, e in self._events.items() if e[0] and e[0][-1][0] > since
                }
            entry = self._events.get(key)
            if entry is None:
                entry = self._events[key] = [collections.deque(), 0]
            recent = entry[0]
            while recent and recent[0][0] <= since:
                entry[1] -= recent.popleft()[1]
            if recent and entry[1] + weight > self.limit:
                retry = int(recent[0][0] + self.seconds - now) + 1
                bottle.response.set_header("Retry-After", str(retry))
                fail(429, f"At most {self.limit} {what} a minute; try again in {retry} s")
            recent.append((now, weight))
            entry[1] += weight


class Flow:
    """What one sender and one room may put into the database in a minute:
    a count and bytes for each, so neither many small nor a few huge writes
    let an anonymous guest grow the file without bound (chat, signaling)."""

    def __init__(self, what, per_sender, bytes_per_sender, room_factor, clock):
        self.what = what
        self.sender_count = RateLimit(per_sender, clock=clock)
        self.sender_bytes = RateLimit(bytes_per_sender, clock=clock)
        self.room_count = RateLimit(per_sender * room_factor, clock=clock)
        self.room_bytes = RateLimit(bytes_per_sender * room_factor, clock=clock)

    def take(self, sender, room_id, size: int, count: int = 1) -> None:
        """Raise 429 when the sender or the room has had its share this minute."""
        self.sender_count.take(sender, self.what, count)
        self.sender_bytes.take(sender, f"bytes of {self.what}", size)
        self.room_count.take(room_id, f"{self.what} in one conversation", count)
        self.room_bytes.take(room_id, f"bytes of {self.what} in one conversation", size)


def client_address(environ) -> str:
    return environ.get("REMOTE_ADDR") or "unknown"


def new_secret(length: int) -> str:
    """`length` random characters of [A-Za-z0-9] (app passwords, flow tokens)."""
    return "".join(secrets.choice(SESSION_ALPHABET) for _ in range(length))


def keyed_hash(key: bytes, purpose: str, text: str) -> str:
    """HMAC-SHA256 of a random token under the server's key, one purpose apart
    from another: the database keeps no token that would work if it leaked."""
    return hmac.new(key, f"{purpose}\0{text}".encode(), "sha256").hexdigest()


def load_server_key(database, name="signin") -> bytes:
    """A key of this server (the sign-in hashes, the signaling tickets), made once per database."""
    with database.read() as db:
        key = server_secret(db, name)
    if key is None:
        with database.write() as db:
            key = create_server_secret(db, name, secrets.token_bytes(32))
    return key


def signaling_checksum(secret: str, random: str, body) -> str:
    """Spreed-Signaling-Checksum: hex HMAC-SHA256 over random + body (bytes or
    text), with the secret shared with the signaling server (both directions)."""
    raw = body if isinstance(body, bytes) else body.encode("utf-8")
    return hmac.new(secret.encode("utf-8"), random.encode("utf-8") + raw, "sha256").hexdigest()


def signaling_ticket(talk, user_id, now: int) -> str:
    """A hello v1 ticket (Config::getSignalingTicket): random:issued:userid:mac,
    the user id empty for guests; the MAC is under this server's own key, so
    not even the signaling server, which knows the shared secret, can forge one."""
    data = f"{new_secret(16)}:{now}:{user_id or ''}"
    return f"{data}:{keyed_hash(talk.ticket_key, 'signaling-ticket', data)}"


def ticket_valid(talk, user_id, ticket, now: int) -> bool:
    """Whether `ticket` is one of ours, issued to `user_id` ("" for guests) within
    SIGNALING_TICKET_SECONDS."""
    data, _, mac = ticket.rpartition(":")
    parts = data.split(":", 2)
    if not talk.ticket_key or len(parts) != 3 or not hmac.compare_digest(
        keyed_hash(talk.ticket_key, "signaling-ticket", data), mac
    ):
        return False
    _, issued, holder = parts
    if holder != (user_id or "") or not issued.isdigit():
        return False
    return now - SIGNALING_TICKET_SECONDS <= int(issued) <= now + 60  # a minute of clock skew


def checked_signaling_servers(servers, secret) -> list[str]:
    """The signaling servers' URLs, without a trailing slash; ValueError for one
    that is no http(s):// or ws(s):// URL, or for servers without a shared secret."""
    urls = []
    for server in servers:
        url = str(server).strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError(f"signaling server {server!r} is not an http(s):// or ws(s):// URL")
        urls.append(url)
    if urls and not secret:
        raise ValueError("a signaling server needs the secret shared with it (--signaling-secret)")
    return urls


def signaling_server_for(talk, room_id=None) -> str:
    """The signaling server of a conversation (always the same one: notifications
    and settings agree), the first without one; "" when signaling is internal."""
    servers = talk.signaling_servers
    if not servers:
        return ""
    return servers[room_id % len(servers)] if room_id is not None else servers[0]


def refuse_internal_signaling(talk) -> None:
    """With a signaling server, the internal signaling routes answer as Talk's do."""
    if talk.signaling_servers:
        fail(400, "Internal signaling disabled.", "Internal signaling disabled.")


class LoginGuard:
    """The password throttle around one login: a refusal (429) comes before
    the login waits for a hashing slot; an attempt counts before its hash."""

    def __init__(self, throttle, keys, proven=()):
        self.throttle, self.keys, self.proven = throttle, keys, proven
        self.counted = None

    def check(self) -> None:
        self.throttle.check(*self.keys)

    def begin(self) -> None:
        self.counted = self.throttle.begin(*self.keys)

    def succeeded(self) -> None:
        if self.counted is not None:
            self.throttle.succeeded(self.counted, self.proven)


def password_login(talk, user_id: str, password: str, environ=None):
    """The user's row when the login password is right and the user enabled, else None.

    Throttled by address and user name (with `environ`); a login the
    credential cache already vouches for is never refused, so an attack from
    a shared address does not lock out who is signed in already.
    """
    guard = None
    if environ is not None:
        keys = login_keys(environ, user_id)
        guard = LoginGuard(talk.throttle, keys, proven=(keys[1],))
    row = talk.credentials.verify(talk.db, user_id, password, guard)
    if row is None or not row["enabled"]:
        return None
    if guard is not None:
        guard.succeeded()
    return row


def app_password_login(talk, user_id: str, password: str):
    """The row of an app password of enabled `user_id`, else None; records its use."""
    token_hash = keyed_hash(talk.signin_key, "app-password", password)
    with talk.db.read() as db:
        row = app_password_by_hash(db, token_hash)
    if row is None or row["id"] != user_id or not row["enabled"]:
        return None
    now = int(talk.clock())
    if now - row["last_used"] >= LAST_USED_EVERY:
        with talk.db.write() as db:
            touch_app_password(db, row["app_password_id"], now)
    return row


def basic_login(talk, user_id: str, password: str, environ=None) -> Actor | None:
    """The user Basic auth names, by an app password or the login password.

    Something shaped like an app password is looked up by its hash first (no
    scrypt: microseconds); a login password that happens to look like one
    still works through the scrypt check after.
    """
    if APP_PASSWORD_PATTERN.fullmatch(password):
        row = app_password_login(talk, user_id, password)
        if row is not None:
            return Actor(
                user_id=row["id"],
                display_name=row["display_name"],
                credential=APP_PASSWORD,
                app_password_id=row["app_password_id"],
            )
    row = password_login(talk, user_id, password, environ)
    if row is None:
        return None
    return Actor(user_id=row["id"], display_name=row["display_name"], credential=PASSWORD)


def web_session(talk, environ):
    """The sign-in page's session this request's cookie names (with its user), or None."""
    cookie = bottle.request.get_cookie(WEB_COOKIE)
    if not cookie or not re.fullmatch(r"[A-Za-z0-9_-]{20,100}", cookie):
        return None
    now = int(talk.clock())
    id_hash = keyed_hash(talk.signin_key, "web-session", cookie)
    with talk.db.read() as db:
        row = web_session_by_hash(db, id_hash, now - WEB_SESSION_IDLE)
    if row is None or not row["enabled"]:
        return None
    if now - row["last_seen"] >= LAST_USED_EVERY:
        with talk.db.write() as db:
            touch_web_session(db, id_hash, now)
    return row


def authenticate(talk, environ, need_user: bool) -> Actor:
    """The caller from Basic auth, the sign-in page's cookie or the guest cookie;
    401 when that fails (SPEC 1.5). A disabled user is refused with any of them."""
    header = environ.get("HTTP_AUTHORIZATION")
    if header:
        credentials = basic_credentials(header)
        if credentials is None:  # malformed: a failure of the address
            talk.throttle.begin(address_key(client_address(environ)))
            fail(401, "Wrong user name or password")
        actor = basic_login(talk, *credentials, environ=environ)
        if actor is None:
            fail(401, "Wrong user name or password")
        return actor
    session = web_session(talk, environ)
    if session is not None:
        return Actor(user_id=session["id"], display_name=session["display_name"], credential=WEB)
    if need_user:
        fail(401, "Authentication required")
    cookie = bottle.request.get_cookie(GUEST_COOKIE)
    if guest_cookie_ok(talk.signin_key, cookie):
        return Actor(guest_id=guest_hash(cookie))
    return Actor()  # a cookie the server did not issue is no identity (fixation)


def csrf_ok(environ) -> bool:
    return environ.get("HTTP_OCS_APIREQUEST", "").lower() == "true"


# Access levels for room_for, from loosest to tightest.
SEE, LIST, ROW, MEMBER, MODERATE, JOINED, CHAT, CALL_LIST = (
    "see",
    "list",
    "row",
    "member",
    "moderate",
    "joined",
    "chat",
    "call-list",
)


def outside_lobby(room, me, now) -> None:
    """412 while the lobby holds the caller back (non-moderators without lobby-ignore)."""
    if lobby_active(room, now) and not effective_permissions(room, me) & PERM_LOBBY_IGNORE:
        fail(412, "The conversation's lobby is active")


def room_for(db, actor: Actor, token: str, need: str = SEE):
    """The room and the caller's row, or the document's 404 / 403.

    SEE: a row, or a public room. LIST: a row, or a public room without a
    password. ROW: any row. MEMBER: a user row of type
    1-3. MODERATE: 1-2 (403 for other members). JOINED: a session in the
    room. CHAT: members, joined or not, and joined type 4/5 (SPEC 6).
    CALL_LIST: joined or member (SPEC 5).
    """
    room = room_by_token(db, token) if isinstance(token, str) else None
    if room is None:
        fail(404, "Room not found")
    me = participant_of(db, room["id"], actor.user_id, actor.guest_id)
    is_member = me is not None and actor.user_id and me["participant_type"] in MEMBER_TYPES
    joined = me is not None and me["session_id"] != "0"
    allowed = {
        SEE: me is not None or room["type"] == ROOM_PUBLIC,
        # Who is in a password room is for those who gave the password.
        LIST: me is not None or (room["type"] == ROOM_PUBLIC and not room["password_hash"]),
        ROW: me is not None,
        MEMBER: is_member,
        MODERATE: is_member,
        JOINED: joined,
        CHAT: is_member or joined,
        CALL_LIST: is_member or joined,
    }[need]
    if not allowed:
        fail(404, "Room not found")
    if need == MODERATE and me["participant_type"] not in MODERATOR_TYPES:
        fail(403, "You are not a moderator of this room")
    return room, me


# ---------------------------------------------------------------------------
# The long-poll notifier (chat and signaling)
# ---------------------------------------------------------------------------


class Waiter:
    """One waiting request: a Condition on the notifier's lock, a fired flag,
    and the news that came with notifications (None: look in the database)."""

    def __init__(self, lock, keys):
        self.cond = threading.Condition(lock)
        self.keys = keys
        self.fired = False
        self.superseded = False  # a newer poll of the same owner took over
        self.news: list = []


class Notifier:
    """Wakes waiting long-polls the moment something they wait for happens.

    A request registers (listen) *before* it looks at the database, so a
    change committed between its look and its wait still wakes it. Waits are
    bounded by a budget: at most `max_waiting` requests wait at once, so that
    the reserve of worker threads always serves sends, joins and pings.
    Under talk-server's own Waitress setup the LongPollDispatcher already
    keeps long-polls within that budget; the bound here protects an app
    served some other way.
    """

    def __init__(self, max_waiting, overflow_wait=1.0, slice_seconds=1.0, time_scale=1.0):
        # Where waits read the time: tests freeze it to pin the timeouts asked for.
        self.monotonic = time.monotonic
        self._lock = threading.Lock()
        self._waiters: dict[tuple, set[Waiter]] = {}
        self.max_waiting = max_waiting
        self.overflow_wait = overflow_wait
        self.slice_seconds = slice_seconds
        self.time_scale = time_scale
        self.waiting = 0
        self.closed = False
        self._owners: dict[tuple, Waiter] = {}  # the one poll each owner may hold

    @contextlib.contextmanager
    def listen(self, *keys, owner=None):
        """Register a waiter for `keys`. An `owner` (a session, say) holds one
        poll at a time: a newer one answers the older at once (superseded),
        so one client cannot pile up waiting requests."""
        waiter = Waiter(self._lock, keys)
        with self._lock:
            if owner is not None:
                older = self._owners.get(owner)
                if older is not None:
                    older.superseded = older.fired = True
                    older.cond.notify()
                self._owners[owner] = waiter
            for key in keys:
                self._waiters.setdefault(key, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                if owner is not None and self._owners.get(owner) is waiter:
                    del self._owners[owner]
                for key in keys:
                    waiters = self._waiters.get(key)
                    if waiters is not None:
                        waiters.discard(waiter)
                        if not waiters:
                            del self._waiters[key]

    def notify(self, *keys, news=None) -> None:
        """Wake the waiters of `keys`, handing each the news (a new message)."""
        with self._lock:
            for key in keys:
                for waiter in self._waiters.get(key, ()):
                    waiter.fired = True
                    waiter.news.append(news)
                    waiter.cond.notify()

    def taint(self, key) -> None:
        """Tell the waiters of `key` that news alone no longer suffices, without waking them."""
        with self._lock:
            for waiter in self._waiters.get(key, ()):
                waiter.news.append(None)

    def take_news(self, waiter) -> list:
        with self._lock:
            news, waiter.news = waiter.news, []
        return news

    def wait(self, waiter: Waiter, seconds: float, cancelled=lambda: False) -> bool:
        """Wait until notified, `seconds` pass, the client leaves or we shut down.

        Returns True when notified. The wait wakes once per slice to notice a
        client that disconnected; that is a flag check, not a re-query.
        """
        deadline = self.monotonic() + seconds * self.time_scale
        with self._lock:
            if waiter.fired or self.closed or seconds <= 0:
                fired, waiter.fired = waiter.fired, False
                return fired
            if self.waiting >= self.max_waiting:
                # Over budget: a short wait keeps the client from spinning
                # while the reserve threads stay free for everything else.
                deadline = min(deadline, self.monotonic() + self.overflow_wait)
                counted = False
            else:
                self.waiting += 1
                counted = True
            try:
                while not waiter.fired and not self.closed:
                    left = deadline - self.monotonic()
                    if left <= 0:
                        break
                    waiter.cond.wait(min(left, self.slice_seconds))
                    if not waiter.fired and cancelled():
                        break
            finally:
                if counted:
                    self.waiting -= 1
            fired, waiter.fired = waiter.fired, False
            return fired

    def close(self) -> None:
        """Wake every waiter for good (shutdown): they answer with what they have."""
        with self._lock:
            self.closed = True
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.cond.notify()


def long_poll(waits):
    """Mark a handler as a long-poll: `waits(query)` tells, from the query
    parameters the handler will read, whether this request may wait. The
    serving layer keeps such requests within the long-poll budget."""

    def mark(handler):
        handler.waits = waits
        return handler

    return mark


def poll_query(query_string: str) -> dict:
    """The query parameters as a long-poll classifier reads them: the last of
    repeated ones (as Bottle), and {} when the string cannot be parsed."""
    try:
        return dict(parse_qsl(query_string or "", keep_blank_values=True))
    except ValueError:
        return {}


def may_wait(handler, query_string: str) -> bool:
    """Whether a request to `handler` may wait, decided once from its query
    string: the serving layer budgets threads by it, and the handler obeys
    it (a body or an odd encoding cannot turn "no wait" into a wait)."""
    waits = getattr(handler, "waits", None)
    return bool(waits and waits(poll_query(query_string)))


def query_integer(query, name, default) -> int:
    """An integer query parameter as a long-poll classifier reads it (bad: 0, no wait)."""
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        return 0


def chat_key(room_id):
    return ("chat", room_id)


def modern_chat_key(room_id):
    """Today's chat polls wait on their own key: system messages wake them only."""
    return ("chat-v2", room_id)


def room_key(room_id):
    return ("room", room_id)


def session_key(session_id):
    return ("session", session_id)


# ---------------------------------------------------------------------------
# Bot webhooks: a small bounded queue, delivered off the request thread
# ---------------------------------------------------------------------------


@dataclass
class Delivery:
    """One signed POST waiting in an Outbox: to `url`, with `headers` (the
    signature among them) and the JSON text `body`. `failed(error)` is told
    when every attempt failed (or the queue was full)."""

    url: str
    body: str
    headers: dict
    failed: object = None
    attempts: int = 1


def post_signed(delivery: Delivery, timeout: float, track=None) -> str | None:
    """POST a delivery once; the error, or None when the receiver answered 200 or 202.

    `track(connection)` is told of the connection while it is open (and
    `track(None)` after), so that closing the app can cut a hanging receiver off.
    """
    import http.client  # here: it imports the email package, which a server without bots never needs

    parts = urlsplit(delivery.url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"talk-server/{__version__}",
        **delivery.headers,
    }
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    except (ValueError, http.client.HTTPException) as error:  # a port out of range, say
        return f"{type(error).__name__}: {error}"
    try:
        if track is not None:
            track(connection)
        connection.request("POST", path, delivery.body.encode("utf-8"), headers)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        if track is not None:
            track(None)
        connection.close()
    if status not in (200, 202):
        return f"UnexpectedStatusCode: {status}"
    return None


def webhook_delivery(bot, body: str, backend: str, failed=None) -> Delivery:
    """A webhook as BotService::sendAsyncRequest signs it: random + raw body."""
    random = new_secret(WEBHOOK_RANDOM_LENGTH)
    headers = {
        "X-Nextcloud-Talk-Random": random,
        "X-Nextcloud-Talk-Signature": bot_signature(bot["secret"], random, body),
        "X-Nextcloud-Talk-Backend": backend,
        "OCS-APIRequest": "true",
    }
    return Delivery(bot["url"], body, headers, failed)


def backend_url(talk) -> str:
    """X-Nextcloud-Talk-Backend: the public URL, else the one this request came to."""
    if talk.public_url:
        return talk.public_url.rstrip("/") + "/"
    try:
        environ = bottle.request.environ
    except RuntimeError:  # outside a request
        return f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/"
    return base_url(environ) + "/"


def receives_http(bot, feature: int) -> bool:
    """Whether a bot gets webhooks of `feature` (0: Join and Leave, for any bot).
    Event bots are Nextcloud apps listening to PHP events: none here."""
    return not bot["features"] & BOT_EVENT and (feature == 0 or bool(bot["features"] & feature))


class Outbox:
    """A small bounded queue of signed POSTs, delivered off the request thread.

    The request thread that changed something queues deliveries; `workers`
    threads, started with the first, POST them with a timeout, trying each
    up to its `attempts` times (RETRY_DELAY seconds apart, growing). A slow
    or dead receiver holds one worker, never a request; when the queue is
    full, the delivery is dropped and its `failed` is told.
    """

    def __init__(self, name, timeout, queue_max, workers):
        self.name = name
        self.timeout = timeout
        self.queue_max = queue_max
        self.workers = workers
        self._cond = threading.Condition()
        self._queue: collections.deque[Delivery] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._open: dict[int, object] = {}  # worker thread id -> its open connection
        self._pending = 0  # queued or being delivered
        self.closed = False

    def put(self, delivery: Delivery) -> None:
        """Queue a delivery; a full queue drops it (its `failed` is told)."""
        with self._cond:
            if self.closed:
                return
            full = len(self._queue) >= self.queue_max
            if not full:
                self._queue.append(delivery)
                self._pending += 1
                while len(self._threads) < self.workers:
                    thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                    self._threads.append(thread)
                    thread.start()
                self._cond.notify()
        if full and delivery.failed is not None:
            delivery.failed("Queue full: the request was dropped")

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self.closed:
                    self._cond.wait()
                if self.closed:
                    return
                delivery = self._queue.popleft()
            try:
                self._deliver(delivery)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _deliver(self, delivery: Delivery) -> None:
        for attempt in range(1, delivery.attempts + 1):
            error = post_signed(delivery, self.timeout, self._track)
            if error is None or self.closed:
                return
            if attempt < delivery.attempts:
                with self._cond:  # a pause that closing cuts short
                    self._cond.wait_for(lambda: self.closed, RETRY_DELAY * attempt)
        if delivery.failed is not None:
            delivery.failed(error)

    def _track(self, connection) -> None:
        with self._cond:
            if connection is None:
                self._open.pop(threading.get_ident(), None)
            else:
                self._open[threading.get_ident()] = connection

    def drain(self, timeout: float) -> bool:
        """Wait until every queued delivery was made (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers: queued deliveries are dropped, open ones cut off."""
        with self._cond:
            self.closed = True
            self._queue.clear()
            connections = list(self._open.values())
            self._cond.notify_all()
        for connection in connections:
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout)


class Webhooks(Outbox):
    """Tells the bots of a conversation what happens in it, one webhook each,
    through the outbox (no retry, as Talk); a failure or a full queue counts
    as the bot's error.

    Which messages a bot has not seen yet: for each conversation with bots,
    the seq of the last message looked at. Whatever wrote a message (a send,
    a system message of any room operation), the next chat_posted or
    room_changed hands everything after that seq to the bots, once.
    """

    def __init__(self, talk, timeout=WEBHOOK_TIMEOUT, queue_max=WEBHOOK_QUEUE_MAX,
                 workers=WEBHOOK_WORKERS):
        super().__init__("talk-webhooks", timeout, queue_max, workers)
        self.talk = talk
        self._look = threading.Lock()
        with talk.db.read() as db:
            self._seen = {row["id"]: row["last_seq"] for row in rooms_with_bots(db)}

    # --- What happened --------------------------------------------------------

    def posted(self, room_id, rows=()) -> None:
        """Messages were committed in a room: Create and Activity for its bots."""
        try:
            with self.talk.db.read() as db:
                bots = [bot for bot in bots_in_room(db, room_id) if receives_http(bot, BOT_WEBHOOK)]
                if not bots:
                    with self._look:
                        self._seen.pop(room_id, None)
                    return
                room = room_by_id(db, room_id)
                with self._look:
                    since = self._seen.get(room_id)
                    if since is None:  # set up by another process: start here
                        since = min(row["seq"] for row in rows) - 1 if rows else room["last_seq"]
                    fresh = messages_since(db, room_id, since, WEBHOOK_BATCH)
                    self._seen[room_id] = fresh[-1]["seq"] if fresh else since
                bodies = [body for body in (self.message_body(db, room, row) for row in fresh) if body]
        except (sqlite3.Error, RuntimeError):  # the app is closing
            return
        backend = backend_url(self.talk)
        for body in bodies:
            for bot in bots:
                self.send(bot, body, backend)

    def message_body(self, db, room, row) -> dict | None:
        """The webhook of one new message; None for bots' own messages,
        deleted ones and reactions (those are Like and Undo)."""
        if row["actor_type"] == "bots":
            return None
        if row["message_type"] == "comment":
            participant_type = GUEST
            if row["actor_type"] == "users":
                participant_type = participant_type_of(db, room["id"], row["actor_id"])
            parent = message_by_id(db, row["parent_id"]) if row["parent_id"] else None
            return webhook_create(room, row, participant_type, parent)
        if row["message_type"] == "system" and not row["verb"].startswith("reaction"):
            return webhook_activity(room, row)
        return None

    def reacted(self, room, message_id, reactor, reaction, added) -> None:
        """Someone reacted (or took it back): Like or Undo for bots with the reaction feature."""
        if reactor[0] == "bots":  # bots never trigger webhooks
            return
        with self.talk.db.read() as db:
            bots = [bot for bot in bots_in_room(db, room["id"]) if receives_http(bot, BOT_REACTION)]
            row = message_by_id(db, message_id) if bots else None
        if row is None:
            return
        body = (webhook_like if added else webhook_undo)(room, row, reactor, reaction)
        backend = backend_url(self.talk)
        for bot in bots:
            self.send(bot, body, backend)

    def membership(self, room, bot, kind) -> None:
        """The bot was set up in a room (Join; its news start now) or removed (Leave)."""
        if kind == "Join":
            with self._look:
                self._seen.setdefault(room["id"], room["last_seq"])
        if receives_http(bot, 0):
            self.send(bot, webhook_membership(room, bot, kind), backend_url(self.talk))

    # --- Delivery -----------------------------------------------------------

    def send(self, bot, body: dict, backend: str) -> None:
        """Queue a webhook for a bot; failing, or dropped from a full queue, it
        counts as the bot's error."""
        bot_id = bot["id"]
        self.put(webhook_delivery(bot, php_json(body), backend,
                                  lambda error: self._count_error(bot_id, error)))

    def _count_error(self, bot_id, message) -> None:
        if self.closed:
            return
        try:
            with self.talk.db.write() as db:
                count_bot_error(db, bot_id, int(self.talk.clock()), message[:4000])
        except (sqlite3.Error, RuntimeError):
            pass  # closing, or the bot went meanwhile


# ---------------------------------------------------------------------------
# The High-Performance Backend: telling the signaling server what changed
# ---------------------------------------------------------------------------


def signaling_api_url(server: str, token: str) -> str:
    """POST target of a room's notifications on a signaling server (ws URLs as http)."""
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):
        if server.startswith(ws):
            server = http + server[len(ws):]
    return f"{server}/api/v1/room/{token}"


class SignalingNotifier(Outbox):
    """Tells the signaling server of a room what changed in it, as Talk's
    BackendNotifier does: `{"type": T, T: {...}}`, signed with the shared
    secret, from the outbox (HPB_ATTEMPTS tries; a lost one is logged).
    Nothing at all without a signaling server.

    The room operations call these once they committed; each reads what it
    sends, so the signaling server always learns the state after the change.
    """

    def __init__(self, talk, timeout=HPB_TIMEOUT, queue_max=HPB_QUEUE_MAX, workers=HPB_WORKERS):
        super().__init__("talk-hpb", timeout, queue_max, workers)
        self.talk = talk
        self._told = {}  # room id -> the newest message seq the server heard of
        self._told_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.talk.signaling_servers)

    def request(self, room, kind: str, body: dict) -> None:
        """Queue one notification about `room` for its signaling server."""
        text = php_json({"type": kind, kind: body})
        random = new_secret(HPB_RANDOM_LENGTH)
        headers = {
            "Spreed-Signaling-Random": random,
            "Spreed-Signaling-Checksum": signaling_checksum(self.talk.signaling_secret, random, text),
            "Spreed-Signaling-Backend": backend_url(self.talk).rstrip("/"),
        }
        url = signaling_api_url(signaling_server_for(self.talk, room["id"]), room["token"])
        token = room["token"]
        self.put(Delivery(url, text, headers, lambda error: self._lost(kind, token, error),
                          HPB_ATTEMPTS))

    def _lost(self, kind, token, error) -> None:
        if not self.closed:
            print(f"talk-server: signaling server: {kind} of {token} not delivered: {error}",
                  file=sys.stderr, flush=True)

    def _room(self, room_id):
        """The room and every user id in it, read after the change; (None, []) once gone."""
        with self.talk.db.read() as db:
            room = room_by_id(db, room_id)
            if room is None:
                return None, [], {}
            return room, room_user_ids(db, room_id), signaling_properties(db, room)

    # --- What happened (triggers as Talk's Signaling\Listener) ----------------

    def invited(self, room_id, user_ids) -> None:
        """Users were added to a room (or created it): invite."""
        if not self.enabled or not user_ids:
            return
        room, everyone, properties = self._room(room_id)
        if room is not None:
            self.request(room, "invite", {"userids": list(user_ids), "alluserids": everyone,
                                          "properties": properties})

    def disinvited(self, room_id, user_ids=(), session_ids=()) -> None:
        """Users were removed from a room (userids), or guests' sessions ended for
        good (sessionids): disinvite."""
        if not self.enabled or not (user_ids or session_ids):
            return
        room, everyone, properties = self._room(room_id)
        if room is None:
            return
        for key, ids in (("userids", user_ids), ("sessionids", session_ids)):
            if ids:
                self.request(room, "disinvite", {key: list(ids), "alluserids": everyone,
                                                 "properties": properties})

    def updated(self, room_id) -> None:
        """A room's name, password, type, lobby or another setting changed: update."""
        if not self.enabled:
            return
        room, everyone, properties = self._room(room_id)
        if room is not None:
            self.request(room, "update", {"userids": everyone, "properties": properties})

    def deleted(self, room, user_ids) -> None:
        """A room went (`room` and `user_ids` as they were before): delete."""
        if self.enabled:
            with self._told_lock:
                self._told.pop(room["id"], None)
            self.request(room, "delete", {"userids": list(user_ids)})

    def _sessions(self, room_id):
        now = int(self.talk.clock())
        with self.talk.db.read() as db:
            room = room_by_id(db, room_id)
            rows = backend_attendees(db, room_id) if room is not None else []
        return room, [(row, backend_session_json(room, row, now)) for row in rows]

    def in_call_changed(self, room_id, flags, session_ids) -> None:
        """Sessions joined or left the call, or changed their flags: incall. Without
        it the signaling server refuses every subscription to a publisher."""
        if not self.enabled or not session_ids:
            return
        room, entries = self._sessions(room_id)
        if room is None:
            return
        wanted = set(session_ids)
        changed = [entry for _, entry in entries if entry["sessionId"] in wanted]
        known = {entry["sessionId"] for entry in changed}
        # A session that ended with its call is no longer there: it is out of the call.
        changed += [{"inCall": 0, "lastPing": 0, "sessionId": s} for s in session_ids if s not in known]
        users = [entry for _, entry in entries if entry["inCall"]]
        self.request(room, "incall", {"incall": flags, "changed": changed, "users": users})

    def participants_changed(self, room_id, participant_ids=None) -> None:
        """Attendees' type or permissions changed (all of them: None): participants,
        with the new permissions of each changed session."""
        if not self.enabled:
            return
        room, entries = self._sessions(room_id)
        if room is None:
            return
        changed = []
        for row, entry in entries:
            if entry["sessionId"] != "0" and (participant_ids is None or row["id"] in participant_ids):
                changed.append({**entry, "permissions": backend_permissions(room, row)})
        users = [entry for _, entry in entries]
        self.request(room, "participants", {"changed": changed, "users": users})

    def chat_changed(self, room_id, posted=False) -> None:
        """A message was written (`posted`), or maybe (a room change may have
        written a system message): message, so the clients fetch the chat."""
        if not self.enabled:
            return
        with self.talk.db.read() as db:
            room = room_by_id(db, room_id)
        if room is None:
            return
        with self._told_lock:
            told = self._told.get(room_id)
            self._told[room_id] = room["last_seq"]
        if posted or told is None or room["last_seq"] > told:
            self.request(room, "message", {"data": {"type": "chat", "chat": {"refresh": True}}})


# ---------------------------------------------------------------------------
# Avatar images: a bitmap font, a minimal PNG writer, upload and emoji checks
# ---------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom, "#" = ink. Other initials get the person.
FONT = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
NEUTRAL_GLYPH = ".###. ##### .###. ..... .###. ##### #####"  # head and shoulders

# Backgrounds white text reads well on; a name always gets the same one.
AVATAR_PALETTE = (
    (0xC9, 0x3A, 0x3A), (0xD6, 0x5C, 0x1E), (0xB5, 0x8A, 0x00), (0x5B, 0x8C, 0x1E),
    (0x1E, 0x8C, 0x4E), (0x0F, 0x8A, 0x8A), (0x1E, 0x78, 0xB4), (0x3A, 0x5B, 0xC9),
    (0x6A, 0x3A, 0xC9), (0x9B, 0x30, 0xB0), (0xB8, 0x2E, 0x7A), (0x6E, 0x6E, 0x6E),
)
WHITE = (0xFF, 0xFF, 0xFF)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def avatar_initial(display_name: str) -> str:
    """The glyph key for a name: its first letter or digit, accents dropped, upper case."""
    for char in display_name.strip()[:1]:
        base = unicodedata.normalize("NFKD", char)[:1].upper()
        if base in FONT:
            return base
    return ""


def avatar_color(display_name: str, dark: bool) -> tuple[int, int, int]:
    """A stable background from the name; the dark variant is darker."""
    digest = hashlib.sha256(display_name.encode("utf-8", "surrogatepass")).digest()
    red, green, blue = AVATAR_PALETTE[digest[0] % len(AVATAR_PALETTE)]
    if dark:
        return (red * 3 // 5, green * 3 // 5, blue * 3 // 5)
    return (red, green, blue)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data)
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from `height` rows of width*3 bytes (filter 0 on every row)."""
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 6))
        + png_chunk(b"IEND", b"")
    )


def render_avatar(initial: str, background: tuple[int, int, int], size: int) -> bytes:
    """A square PNG: the background with the initial's glyph, white, scaled and centred."""
    glyph = (FONT.get(initial) or NEUTRAL_GLYPH).split()
    cell = max(1, round(size * 0.45 / len(glyph)))
    width, height = 5 * cell, len(glyph) * cell
    left, top = (size - width) // 2, (size - height) // 2
    bg, ink = bytes(background), bytes(WHITE)
    plain = bg * size
    rows = [plain] * top
    for pattern in glyph:
        row = bg * left + b"".join((ink if c == "#" else bg) * cell for c in pattern)
        rows += [row + bg * (size - left - width)] * cell
    rows += [plain] * (size - len(rows))
    return encode_png(size, size, rows)


def clamp_avatar_size(text: str) -> int:
    """A requested avatar size, clamped to 16..512 px."""
    return min(max(int(text[:6]), AVATAR_SIZE_MIN), AVATAR_SIZE_MAX)


def png_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a well-formed PNG (chunks and CRCs checked), else None."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, size, seen_end = len(PNG_SIGNATURE), None, False
    while pos + 12 <= len(data):
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            return None
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(tag + body) != crc:
            return None
        if size is None:
            if tag != b"IHDR" or length != 13:
                return None
            size = struct.unpack(">II", body[:8])
        if tag == b"IEND":
            seen_end = True
            break
        pos += 12 + length
    if size is None or not seen_end or 0 in size:
        return None
    return size


# JPEG start-of-frame markers: they carry the image size.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking its segments, else None."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan before any frame
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            return None
        if marker in JPEG_SOF:
            if length < 7:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return (width, height) if width and height else None
        pos += 2 + length
    return None


def checked_avatar_image(upload: Upload) -> str:
    """The content type of an uploaded avatar (PNG or JPEG by its bytes, square),
    or a 400 with Talk's message (spreed docs/avatar.md)."""
    data = upload.data
    if not data:
        fail(400, "No image file provided", {"message": "No image file provided"})
    if len(data) > AVATAR_UPLOAD_MAX:
        fail(400, "File is too big", {"message": "File is too big"})
    for content_type, dimensions in (("image/png", png_dimensions), ("image/jpeg", jpeg_dimensions)):
        size = dimensions(data)
        if size is not None:
            if size[0] != size[1]:
                fail(400, "Avatar image is not square", {"message": "Avatar image is not square"})
            return content_type
    if data[:6] in (b"GIF87a", b"GIF89a") or data[:4] in (b"RIFF", b"BM\x00\x00"):
        fail(400, "Unknown filetype", {"message": "Unknown filetype"})
    fail(400, "Invalid image", {"message": "Invalid image"})


def emoji_base(cp: int) -> bool:
    """Code points that start an emoji (a reasonable, not exhaustive, set)."""
    return (
        0x1F000 <= cp <= 0x1FAFF
        or 0x2600 <= cp <= 0x27BF
        or 0x2300 <= cp <= 0x23FF
        or 0x2B00 <= cp <= 0x2BFF
        or 0x2190 <= cp <= 0x21FF
        or 0x25A0 <= cp <= 0x25FF
        or cp in (0x00A9, 0x00AE, 0x203C, 0x2049, 0x2122, 0x2139, 0x24C2, 0x2934, 0x2935,
                  0x3030, 0x303D, 0x3297, 0x3299)
    )


def is_single_emoji(text: str) -> bool:
    """One emoji grapheme: a flag, a keycap, or emoji joined by ZWJ, each with
    optional variation selector, skin tone and tag sequence."""
    cps = [ord(c) for c in text]
    if not cps or len(cps) > EMOJI_MAX_CODEPOINTS:
        return False
    if len(cps) == 2 and all(0x1F1E6 <= cp <= 0x1F1FF for cp in cps):
        return True  # a flag: two regional indicators
    if text[0] in "0123456789#*" and cps[1:] in ([0xFE0F, 0x20E3], [0x20E3]):
        return True  # a keycap
    pos = 0
    while True:
        if pos >= len(cps) or not emoji_base(cps[pos]) or 0x1F1E6 <= cps[pos] <= 0x1F1FF:
            return False
        pos += 1
        if pos < len(cps) and 0x1F3FB <= cps[pos] <= 0x1F3FF:  # skin tone
            pos += 1
        if pos < len(cps) and cps[pos] == 0xFE0F:
            pos += 1
        if pos < len(cps) and 0xE0020 <= cps[pos] <= 0xE007E:  # tags (subdivision flags)
            while pos < len(cps) and 0xE0020 <= cps[pos] <= 0xE007E:
                pos += 1
            if pos >= len(cps) or cps[pos] != 0xE007F:
                return False
            pos += 1
        if pos == len(cps):
            return True
        if cps[pos] != 0x200D:
            return False
        pos += 1


EMOJI_FONTS = (
    "'Segoe UI', Roboto, 'Noto Sans', Arial, sans-serif, 'Noto Color Emoji', "
    "'Apple Color Emoji', 'Segoe UI Emoji'"
)


def emoji_svg(emoji: str, color: str) -> bytes:
    """An emoji avatar: the emoji on a square of `color` (6 hex digits)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg width="512" height="512" version="1.1" viewBox="0 0 500 500" '
        'xmlns="http://www.w3.org/2000/svg">'
        f'<rect width="100%" height="100%" fill="#{color}"/>'
        f'<text x="50%" y="330" style="font-size:240px;font-family:{EMOJI_FONTS};'
        f'text-anchor:middle;">{xml_escape(emoji)}</text></svg>'
    ).encode()


# Default conversation icons in white: people for group rooms, a globe for public ones.
DEFAULT_ROOM_ICONS = {
    "group": '<circle cx="190" cy="190" r="55"/><circle cx="320" cy="205" r="45"/>'
    '<path d="M90 380c0-60 45-105 100-105s100 45 100 105z"/>'
    '<path d="M300 380c0-35-10-65-30-88 15-10 32-15 50-15 48 0 90 40 90 103z"/>',
    "public": '<circle cx="250" cy="250" r="130" fill="none" stroke="#fff" stroke-width="22"/>'
    '<ellipse cx="250" cy="250" rx="55" ry="130" fill="none" stroke="#fff" stroke-width="18"/>'
    '<path d="M120 250h260M145 185h210M145 315h210" stroke="#fff" stroke-width="18"/>',
}


def default_room_svg(room_type: int, dark: bool) -> bytes:
    icon = DEFAULT_ROOM_ICONS["public" if room_type == ROOM_PUBLIC else "group"]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg width="512" height="512" version="1.1" viewBox="0 0 500 500" '
        'xmlns="http://www.w3.org/2000/svg">'
        f'<rect width="100%" height="100%" fill="#{AVATAR_DEFAULT_COLORS[dark]}"/>'
        f'<g fill="#fff">{icon}</g></svg>'
    ).encode()


class BoundedCache:
    """A small thread-safe map that forgets the least recently used entries."""

    def __init__(self, entries: int):
        self.entries = entries
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        """The value for `key`, made (outside the lock) when missing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return value


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match names this ETag (weak or strong) or is *."""
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


# ---------------------------------------------------------------------------
# Room operations: the rules both API generations share (SPEC 11)
# ---------------------------------------------------------------------------

# Named refusals of the room operations, with the status the 2018 routes give
# them; REFUSED_V4 holds where today's routes answer otherwise.
REFUSED = {
    "no-user": (404, "User not found"),
    "no-group": (404, "Group not found"),
    "no-participant": (404, "Participant not found"),
    "self-one-to-one": (403, "You cannot start a one-to-one conversation with yourself"),
    "rename-one-to-one": (405, "A one-to-one room cannot be renamed"),
    "password-not-public": (403, "Only public rooms can have a password"),
    "owner-protected": (403, "The owner cannot be removed"),
    "not-a-guest": (403, "The participant is not a guest"),
    "owner-above-moderator": (403, "The owner is already above a moderator"),
    "promote-not-user": (412, "Only a user (type 3) can be promoted"),
    "demote-self": (403, "You cannot demote yourself"),
    "demote-not-moderator": (412, "Only a moderator (type 2) can be demoted"),
    "wrong-password": (403, "Wrong room password"),
    "guest-limit": (429, "The conversation has as many guests as it can take"),
    # Only today's routes refuse these:
    "one-to-one": (400, "Not possible in a one-to-one conversation"),
    "not-group-or-public": (400, "Only group and public conversations have this setting"),
    "last-moderator": (400, "You are the last moderator; promote someone before leaving"),
    "remove-yourself": (400, "Use participants/self to leave"),
    "moderator-permissions": (400, "Moderators always have every permission"),
    "session-in-call": (409, "This device is in a call already; join with force=true"),
    "bad-value": (400, "Invalid value"),
    # Calls (both generations; only today's clients can set what most of them guard)
    "no-session": (404, "You have not joined this conversation"),
    "no-calls-here": (400, "This conversation has no calls"),
    "read-only": (403, "The conversation is read-only"),
    "lobby": (412, "The conversation's lobby is active"),
    "may-not-join-call": (403, "You may not join calls in this conversation"),
    "may-not-start-call": (403, "You may not start a call in this conversation"),
    "not-in-call": (400, "This session is not in the call"),
    "bad-flags": (400, "flags must include 1 (in call)"),
    # Bots (BotController): data {"error": "bot"} or {"error": "room"}
    "no-bot": (400, "No such bot, or not one moderators may set up"),
    "bot-room": (400, "Bots cannot be set up in this conversation"),
}
REFUSED_V4 = {
    "rename-one-to-one": 400,
    "password-not-public": 400,
    "not-a-guest": 400,
    "owner-above-moderator": 400,
    "promote-not-user": 400,
    "demote-self": 400,
    "demote-not-moderator": 400,
}


class Refused(Exception):
    """A room operation said no, for a named reason (a key of REFUSED)."""

    def __init__(self, reason, data=None):
        super().__init__(reason)
        self.reason = reason
        self.data = data

    def as_ocs_error(self, generation) -> OCSError:
        status, message = REFUSED[self.reason]
        if generation >= 4:
            status = REFUSED_V4.get(self.reason, status)
        return OCSError(status, message, self.data)


def speaker(actor, me) -> tuple[str, str, str]:
    """(actor_type, actor_id, display name) of the caller, as chat stores authors."""
    if actor.user_id is not None:
        name = (me["display_name"] if me is not None else "") or actor.display_name
        return "users", actor.user_id, name
    guest_id = me["guest_id"] if me is not None else actor.guest_id
    return "guests", guest_actor_id(guest_id or ""), me["guest_name"] if me is not None else ""


def row_speaker(row) -> tuple[str, str, str]:
    """(actor_type, actor_id, display name) of an attendee row."""
    actor_type, actor_id = attendee_actor(row)
    return actor_type, actor_id, row["display_name"] if row["user_id"] else row["guest_name"]


def rich_row(row) -> dict:
    return rich_actor(*row_speaker(row))


# The system message a change of a room setting writes, by column and new value.
SETTING_VERBS = {
    "read_only": lambda value: "read_only" if value else "read_only_off",
    "listable": lambda value: ("listable_none", "listable_users", "listable_all")[value],
    "description": lambda value: "description_set" if value else "description_removed",
    "message_expiration": lambda value: (
        "message_expiration_enabled" if value else "message_expiration_disabled"),
}


def publishable(flags: int, permissions: int) -> int:
    """In-call flags without the audio or video the attendee may not publish (as spreed)."""
    if not permissions & PERM_AUDIO:
        flags &= ~FLAG_AUDIO
    if not permissions & PERM_VIDEO:
        flags &= ~FLAG_VIDEO
    return flags


def end_call_if_empty(db, room, actor, now) -> None:
    """The last session out of a call ends it (callStartTime 0, call_ended)."""
    if room["call_start_time"] and not in_call_count(db, room["id"], now - CALL_TIMEOUT_SECONDS):
        set_call_start(db, room["id"], 0)
        call_system_message(db, room["id"], actor, "call_ended", now)


def expire_calls(db, room, now) -> list[str]:
    """No ping: sessions not seen for CALL_TIMEOUT_SECONDS leave the call; the ids
    of those that did (Rooms.calls_expired tells of them once committed)."""
    expired = leave_calls(db, room["id"], now - CALL_TIMEOUT_SECONDS)
    if expired:
        end_call_if_empty(db, room, None, now)
    return expired


class Rooms:
    """The room operations: each checks who may, writes in one transaction,
    wakes the polls it concerns and returns rows; it refuses with Refused or
    the document's 404/403 (room_for). Handlers of both API generations call
    these and only parse and shape around them.
    """

    def __init__(self, talk):
        self.talk = talk

    def now(self) -> int:
        return int(self.talk.clock())

    def say(self, db, room_id, author, verb, params=None, text=None) -> sqlite3.Row:
        """Write a system message in the operation's transaction; the polls
        are woken by room_changed / chat_posted once it committed."""
        return add_system_message(db, room_id, author, verb, params, self.now(), text=text)

    def create(self, actor, room_type, name="", invite="") -> tuple[sqlite3.Row, bool]:
        """Create a room of `room_type`; (room, False) when a one-to-one room already exists."""
        me, now = actor.user_id, self.now()
        self.talk.room_creation.take(me, "new rooms")
        with self.talk.db.write() as db:
            if room_type == ROOM_ONE_TO_ONE:
                if not invite or get_user(db, invite) is None:
                    raise Refused("no-user")
                if invite == me:
                    raise Refused("self-one-to-one")
                room = one_to_one_room(db, me, invite)
                if room is not None:
                    return room, False
                room = create_room(db, ROOM_ONE_TO_ONE, "", now)
                self.say(db, room["id"], speaker(actor, None), "conversation_created")
                add_participant(db, room["id"], OWNER, 0, user_id=me)
                add_participant(db, room["id"], OWNER, 0, user_id=invite)
            elif room_type == ROOM_GROUP:
                members = []
                if invite:
                    self.check_group(db, actor, invite)
                    members = [u for u in group_members(db, invite) if u != me]
                room = create_room(db, ROOM_GROUP, name or invite, now)
                self.say(db, room["id"], speaker(actor, None), "conversation_created")
                add_participant(db, room["id"], OWNER, 0, user_id=me)
                for user_id in members:
                    add_participant(db, room["id"], USER, 0, user_id=user_id)
            elif room_type == ROOM_NOTE_TO_SELF:
                room = note_to_self_room(db, me)
                if room is not None:
                    return room, False
                room = create_room(db, ROOM_NOTE_TO_SELF, "Note to self", now)
                self.say(db, room["id"], speaker(actor, None), "conversation_created")
                add_participant(db, room["id"], OWNER, 0, user_id=me)
            else:
                room = create_room(db, ROOM_PUBLIC, name, now)
                self.say(db, room["id"], speaker(actor, None), "conversation_created")
                add_participant(db, room["id"], OWNER, 0, user_id=me)
            room = room_by_id(db, room["id"])
            invited = room_user_ids(db, room["id"])
        self.talk.hpb.invited(room["id"], invited)
        return room, True

    @staticmethod
    def drop(db, room) -> list[str]:
        """Delete a room; the users it had (whom the signaling server tells)."""
        members = room_user_ids(db, room["id"])
        delete_room(db, room["id"])
        return members

    @staticmethod
    def check_group(db, actor, group_id) -> None:
        """Only a member of a group, or an administrator, may pull its members
        into a room; to anyone else it does not exist (404): a group, `admin`
        above all, is no list of people to reveal or invite."""
        if not group_id or not group_exists(db, group_id):
            raise Refused("no-group")
        if group_id not in groups_of(db, actor.user_id) and not is_admin(db, actor.user_id):
            raise Refused("no-group")

    def rename(self, actor, token, raw_name, max_length) -> sqlite3.Row:
        """Rename a room (moderators); a one-to-one room's name is its partner.

        The name is checked after the caller's rights, as Talk does.
        """
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            name = room_name(raw_name, max_length)
            if not name:
                fail(400, f"roomName must be 1 to {max_length} characters")
            if room["type"] == ROOM_ONE_TO_ONE:
                raise Refused("rename-one-to-one")
            rename_room(db, room["id"], name)
            if name != room["name"]:
                text = f'{{actor}} renamed the conversation from "{room["name"]}" to "{name}"'
                self.say(db, room["id"], speaker(actor, me), "conversation_renamed", text=text)
        self.talk.chat_posted(room["id"])
        self.talk.hpb.updated(room["id"])
        return room

    def set_password(self, actor, token, password) -> sqlite3.Row:
        """Set or clear (empty) the password of a public room (moderators)."""

        def check(db):
            room, _ = room_for(db, actor, token, MODERATE)
            if room["type"] != ROOM_PUBLIC:
                raise Refused("password-not-public")
            return room

        with self.talk.db.read() as db:
            check(db)
        # Hash outside the write transaction: scrypt is slow on a Pi.
        password_hash = self.talk.credentials.hash(password) if password else ""
        with self.talk.db.write() as db:
            room = check(db)
            set_room_password(db, room["id"], password_hash)
            if password_hash or room["password_hash"]:
                _, me = room_for(db, actor, token, MODERATE)
                verb = "password_set" if password_hash else "password_removed"
                self.say(db, room["id"], speaker(actor, me), verb)
        self.talk.chat_posted(room["id"])
        self.talk.hpb.updated(room["id"])
        return room

    def delete(self, actor, token, one_to_one=True) -> None:
        """Delete a room (moderators): everyone waiting in it is answered.
        Today's routes refuse one-to-one rooms (one leaves them instead)."""
        with self.talk.db.write() as db:
            room, _ = room_for(db, actor, token, MODERATE)
            if room["type"] == ROOM_ONE_TO_ONE and not one_to_one:
                raise Refused("one-to-one")
            members = self.drop(db, room)
        self.talk.room_changed(room["id"], chat=True)
        self.talk.hpb.deleted(room, members)

    def user_deleted(self, user_id, rooms) -> None:
        """A user was deleted (delete_user's `rooms`): wake each of their rooms;
        the signaling server hears of the rooms that went (delete) and that the
        user is out of the others (disinvite), as Talk's removeUserFromAllRooms."""
        for room, members in rooms:
            self.talk.room_changed(room["id"], chat=True)
            if members is not None:
                self.talk.hpb.deleted(room, members)
            else:
                self.talk.hpb.disinvited(room["id"], user_ids=[user_id])

    def make_public(self, actor, token, types=ROOM_TYPES) -> None:
        """Let guests in (moderators): the room becomes public. Today's routes
        refuse it for one-to-one rooms and notes to self."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            if room["type"] not in types:
                raise Refused("one-to-one" if room["type"] == ROOM_ONE_TO_ONE else "not-group-or-public")
            set_room_type(db, room["id"], ROOM_PUBLIC)
            touch_room(db, room["id"], self.now())
            if room["type"] != ROOM_PUBLIC:
                self.say(db, room["id"], speaker(actor, me), "guests_allowed")
        self.talk.chat_posted(room["id"])
        self.talk.hpb.updated(room["id"])

    def make_private(self, actor, token) -> None:
        """A public room becomes a group room; its guests and self-joined users go."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            users, sessions = [], []
            if room["type"] == ROOM_PUBLIC:
                for row in backend_attendees(db, room["id"]):
                    if row["participant_type"] == USER_SELF_JOINED:
                        users.append(row["user_id"])
                    elif row["participant_type"] == GUEST and row["session_id"] != "0":
                        sessions.append(row["session_id"])
                set_room_type(db, room["id"], ROOM_GROUP)
                remove_guests_and_self_joined(db, room["id"])
                self.say(db, room["id"], speaker(actor, me), "guests_disallowed")
        self.talk.room_changed(room["id"])
        self.talk.hpb.updated(room["id"])
        self.talk.hpb.disinvited(room["id"], sorted(set(users)), sessions)

    def add_user(self, actor, token, user_id, convert_one_to_one=True) -> int | None:
        """Add a user (moderators); returns the room's new type when it changed.

        On the 2018 routes adding a third person turns a one-to-one room into
        a group room; today's refuse it.
        """
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            if room["type"] == ROOM_ONE_TO_ONE and not convert_one_to_one:
                raise Refused("one-to-one")
            if room["type"] == ROOM_NOTE_TO_SELF:
                raise Refused("not-group-or-public")
            if participant_of(db, room["id"], user_id=user_id) is not None:
                return None
            if not user_id or get_user(db, user_id) is None:
                raise Refused("no-user")
            pid = add_participant(db, room["id"], USER, 0, user_id=user_id)
            added = participant_by_attendee(db, room["id"], pid)
            self.say(db, room["id"], speaker(actor, me), "user_added", {"user": rich_row(added)})
            new_type = None
            if room["type"] == ROOM_ONE_TO_ONE:
                set_room_type(db, room["id"], ROOM_GROUP)
                new_type = ROOM_GROUP
        self.talk.chat_posted(room["id"])
        self.talk.hpb.invited(room["id"], [user_id])
        return new_type

    def add_group(self, actor, token, group_id) -> None:
        """Add every member of a group who is not in the room yet (moderators)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            if room["type"] not in (ROOM_GROUP, ROOM_PUBLIC):
                raise Refused("one-to-one" if room["type"] == ROOM_ONE_TO_ONE else "not-group-or-public")
            self.check_group(db, actor, group_id)
            invited = []
            for user_id in group_members(db, group_id):
                if participant_of(db, room["id"], user_id=user_id) is None:
                    pid = add_participant(db, room["id"], USER, 0, user_id=user_id)
                    added = participant_by_attendee(db, room["id"], pid)
                    self.say(db, room["id"], speaker(actor, me), "user_added",
                             {"user": rich_row(added)})
                    invited.append(user_id)
        self.talk.room_changed(room["id"])
        self.talk.hpb.invited(room["id"], invited)

    def remove(self, actor, token, find, one_to_one_deletes=True) -> None:
        """Remove the participant `find(db, room)` returns (moderators); never the owner.

        In a one-to-one room the 2018 routes delete the room, as Talk 3.1
        did; today's refuse.
        """
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            gone = room["type"] == ROOM_ONE_TO_ONE
            if gone and not one_to_one_deletes:
                raise Refused("one-to-one")
            if gone:
                members = self.drop(db, room)
            else:
                row = find(db, room)
                if row is None:
                    raise Refused("no-participant")
                if not one_to_one_deletes and row["id"] == me["id"]:
                    raise Refused("remove-yourself")
                if row["participant_type"] == OWNER:
                    raise Refused("owner-protected")
                sessions = [s["id"] for s in sessions_of(db, row["id"])]
                remove_participant(db, row["id"])
                self.say(db, room["id"], speaker(actor, me), "user_removed", {"user": rich_row(row)})
                end_call_if_empty(db, room, me, self.now())
        self.talk.room_changed(room["id"], chat=gone)
        if gone:
            self.talk.hpb.deleted(room, members)
        elif row["user_id"] is not None:
            self.talk.hpb.disinvited(room["id"], user_ids=[row["user_id"]])
        else:
            self.talk.hpb.disinvited(room["id"], session_ids=sessions)

    def remove_guest(self, actor, token, session_id) -> None:
        """Remove the guest holding `session_id` (moderators)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            row = participant_by_session(db, room["id"], session_id) if session_id else None
            if row is None:
                raise Refused("no-participant")
            if row["participant_type"] != GUEST:
                raise Refused("not-a-guest")
            sessions = [s["id"] for s in sessions_of(db, row["id"])]
            remove_participant(db, row["id"])
            end_call_if_empty(db, room, me, self.now())
        self.talk.room_changed(room["id"])
        self.talk.hpb.disinvited(room["id"], session_ids=sessions)

    def remove_self(self, actor, token, keep_a_moderator=False) -> None:
        """Leave a room for good; the last one out (or either of a one-to-one) deletes it.

        Today's routes refuse the last moderator while other users remain.
        """
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, ROW)
            if (
                keep_a_moderator
                and room["type"] != ROOM_ONE_TO_ONE
                and me["participant_type"] in MODERATOR_TYPES
            ):
                users = [r for r in participants_of(db, room["id"]) if r["user_id"] is not None]
                moderators = [r for r in users if r["participant_type"] in MODERATOR_TYPES]
                if len(moderators) == 1 and len(users) > 1:
                    raise Refused("last-moderator")
            gone = room["type"] == ROOM_ONE_TO_ONE or count_participants(db, room["id"]) <= 1
            if gone:
                members = self.drop(db, room)
            else:
                sessions = [s["id"] for s in sessions_of(db, me["id"])]
                remove_participant(db, me["id"])
                if me["user_id"] is not None:
                    self.say(db, room["id"], speaker(actor, me), "user_removed",
                             {"user": rich_row(me)}, text="{user} left the conversation")
        self.talk.room_changed(room["id"], chat=gone)
        if gone:
            self.talk.hpb.deleted(room, members)
        elif me["user_id"] is not None:
            self.talk.hpb.disinvited(room["id"], user_ids=[me["user_id"]])
        else:
            self.talk.hpb.disinvited(room["id"], session_ids=sessions)

    def join(
        self, actor, token, password, guest_id, address, device=None, force=True
    ) -> tuple[sqlite3.Row, str]:
        """Join a room: a new session for the caller; (room, session id).

        Guests and self-joining users give the room password (checked before
        the write transaction, as scrypt is slow, and throttled per address and
        room).
        `guest_id` is called for a guest's id once the password passed. A
        2018 join (no `device`) replaces the caller's sessions; today's adds
        one per device, replacing only the one this device held, unless that
        one is in a call and `force` is false (409).
        """
        with self.talk.db.read() as db:
            room, me = room_for(db, actor, token, SEE)
        needs_password = bool(room["password_hash"]) and not (
            me is not None and actor.user_id and me["participant_type"] in MEMBER_TYPES
        )
        if needs_password:
            room_key = ("room", room["id"])
            guard = LoginGuard(self.talk.room_throttle, (address_key(address), room_key),
                               proven=(room_key,))
            guard.check()
            guard.begin()
            if not self.talk.credentials.check(room["password_hash"], password):
                raise Refused("wrong-password")
            guard.succeeded()
        previous = actor.guest_id
        guest = None if actor.user_id else guest_id(fresh=needs_password)
        now = self.now()
        invited, expired = [], []
        with self.talk.db.write() as db:
            if guest is not None and previous not in (None, guest):
                # The guest keeps its rows in other rooms under the new identity.
                rename_guest(db, previous, guest)
            room, me = room_for(db, actor, token, SEE)
            if me is None:
                kind = USER_SELF_JOINED if actor.user_id else GUEST
                if kind == GUEST:
                    expired = expire_guests(db, room["id"], now - GUEST_EXPIRY_SECONDS)
                    if count_guests(db, room["id"]) >= self.talk.guests_per_room:
                        raise Refused("guest-limit")
                pid = add_participant(
                    db, room["id"], kind, now, user_id=actor.user_id, guest_id=guest
                )
                if actor.user_id:
                    joined = participant_by_attendee(db, room["id"], pid)
                    self.say(db, room["id"], row_speaker(joined), "user_added",
                             {"user": rich_row(joined)}, text="{actor} joined the conversation")
                    invited.append(actor.user_id)
            else:
                pid = me["id"]
            if device is None:
                session_id, replaced = start_session(db, pid, now)
            else:
                held = next((s for s in sessions_of(db, pid) if s["device"] == device), None)
                replaced = [held] if held is not None else []
                if held is not None:
                    if not force and held["in_call"] & FLAG_IN_CALL:
                        raise Refused(
                            "session-in-call",
                            {"sessionId": held["id"], "inCall": held["in_call"],
                             "lastPing": held["last_ping"]},
                        )
                    end_session_id(db, held["id"])
                session_id = add_session(db, pid, now, device)
        self.talk.room_changed(room["id"])
        self.left(room["id"], None, expired, removed=True)
        # A replaced session that was in the call is out of it (not out of the room).
        self.left(room["id"], None, replaced, removed=False)
        self.talk.hpb.invited(room["id"], invited)
        return room, session_id

    def leave(self, actor, token, session_id=None) -> None:
        """Leave a room's chat and call: the session ends; guests and self-joined
        go with their last session. The 2018 routes end all of the caller's
        sessions; today's the one named."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, SEE)
            own = sessions_of(db, me["id"]) if me is not None else []
            ended = [s for s in own if session_id is None or s["id"] == session_id]
            removed = False
            if session_id is not None:
                if ended:
                    removed = self.end_one_session(db, me, session_id)
            elif me is not None and me["session_id"] != "0":
                if me["participant_type"] in (GUEST, USER_SELF_JOINED):
                    remove_participant(db, me["id"])
                    removed = True
                else:
                    end_session(db, me["id"])
            end_call_if_empty(db, room, me, self.now())
        self.talk.room_changed(room["id"])
        self.left(room["id"], me, ended, removed)

    def left(self, room_id, me, ended, removed) -> None:
        """Tell the signaling server of sessions that ended: out of the call, and
        a guest or self-joined user gone with them is no longer invited (`me`
        None: guests that expired, expire_guests)."""
        in_call = [s["id"] for s in ended if s["in_call"] & FLAG_IN_CALL]
        self.talk.hpb.in_call_changed(room_id, 0, in_call)
        if removed and me is not None and me["user_id"] is not None:
            self.talk.hpb.disinvited(room_id, user_ids=[me["user_id"]])
        elif removed:
            self.talk.hpb.disinvited(room_id, session_ids=[s["id"] for s in ended])

    @staticmethod
    def end_one_session(db, me, session_id) -> bool:
        """End one session of the attendee `me`; a guest or self-joined user goes
        with their last one (True then)."""
        end_session_id(db, session_id)
        if me["participant_type"] in (GUEST, USER_SELF_JOINED) and not count_sessions(db, me["id"]):
            remove_participant(db, me["id"])
            return True
        return False

    def backend_room(self, token, user_id, session_id, leave=False):
        """The signaling server's room request (SignalingController::backendRoom):
        (room, attendee row) of the Talk session `session_id` (without one: of the
        user), None when there is none or it is not `user_id`'s (a guest's, for
        no user id). A join marks the session seen; a leave ends it, as leaving
        through the API does."""
        now = self.now()
        with self.talk.db.write() as db:
            room = room_by_token(db, token)
            row = None
            if room is not None and session_id:
                row = participant_by_session(db, room["id"], session_id)
            elif room is not None and user_id:
                row = participant_of(db, room["id"], user_id=user_id)
            if row is None or row["user_id"] != (user_id or None):
                return None
            ended, removed = [], False
            if session_id and not leave:
                touch_session(db, session_id, row["id"], now)
            elif session_id:
                ended = [s for s in sessions_of(db, row["id"]) if s["id"] == session_id]
                removed = self.end_one_session(db, row, session_id)
                end_call_if_empty(db, room, row, now)
        if ended:
            self.talk.room_changed(room["id"])
            self.left(room["id"], row, ended, removed)
        return room, row

    def backend_ping(self, session_ids) -> None:
        """The signaling server's ping: its sessions are alive (no client pings in external mode)."""
        with self.talk.db.write() as db:
            touch_sessions(db, session_ids, self.now())

    def call_rules(self, room, me, now) -> int:
        """Who may be in this room's call; the caller's permissions. Read-only rooms,
        the lobby and permissions are today's settings: 2018 rooms never have them."""
        if room["type"] not in ROOM_TYPES:
            raise Refused("no-calls-here")
        if room["read_only"]:
            raise Refused("read-only")
        permissions = effective_permissions(room, me)
        if lobby_active(room, now) and not permissions & PERM_LOBBY_IGNORE:
            raise Refused("lobby")
        if not permissions & PERM_CALL_JOIN:
            raise Refused("may-not-join-call")
        return permissions

    def join_call(self, actor, token, find_session, flags, silent=False) -> None:
        """Join the call with the session `find_session(db, me)` picks (None: 404).

        The first one in starts the call, if allowed to. The in-call bit is
        implied; audio and video stay only with the permission to publish them.
        """
        now = self.now()
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, SEE)
            session = find_session(db, me)
            if session is None:
                raise Refused("no-session")
            permissions = self.call_rules(room, me, now)
            # The joining session is in the call again below, whatever it was.
            expired = [s for s in expire_calls(db, room, now) if s != session["id"]]
            running = in_call_count(db, room["id"], now - CALL_TIMEOUT_SECONDS) > 0
            if not running and not permissions & PERM_CALL_START:
                raise Refused("may-not-start-call")
            rejoin = bool(call_flags_now(session, now))
            flags = publishable(flags | FLAG_IN_CALL, permissions)
            set_call_flags(db, session["id"], flags)
            touch_session(db, session["id"], me["id"], now)
            if not running:
                set_call_start(db, room["id"], now)
                call_system_message(db, room["id"], me, "call_started", now)
            elif not rejoin:
                call_system_message(db, room["id"], me, "call_joined", now)
        self.talk.room_changed(room["id"])
        self.calls_expired(room["id"], expired)
        self.talk.hpb.in_call_changed(room["id"], flags, [session["id"]])

    def calls_expired(self, room_id, session_ids) -> None:
        """Sessions that stopped pinging dropped out of the call (expire_calls, once
        committed): the signaling server hears they left it, as from leave_call."""
        self.talk.hpb.in_call_changed(room_id, 0, session_ids)

    def change_call_flags(self, actor, token, find_session, flags) -> None:
        """Change a session's in-call flags (audio, video, phone) while in the call."""
        now = self.now()
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, SEE)
            session = find_session(db, me)
            if session is None:
                raise Refused("no-session")
            if not call_flags_now(session, now):
                raise Refused("not-in-call")
            if not flags & FLAG_IN_CALL:
                raise Refused("bad-flags")
            flags = publishable(flags, effective_permissions(room, me))
            set_call_flags(db, session["id"], flags)
            touch_session(db, session["id"], me["id"], now)
        self.talk.room_changed(room["id"])
        self.talk.hpb.in_call_changed(room["id"], flags, [session["id"]])

    def leave_call(self, actor, token, find_session, everyone=False) -> None:
        """Leave the call (staying in the room); a moderator may end it for everyone.
        The last one out ends it."""
        now = self.now()
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, SEE)
            session = find_session(db, me)
            if session is None:
                raise Refused("no-session")
            left = [session["id"]]
            if everyone and me["participant_type"] in MODERATOR_TYPES:
                left = [s["id"] for s in sessions_of_room(db, room["id"]) if s["in_call"]]
                leave_calls(db, room["id"])
                if room["call_start_time"]:
                    set_call_start(db, room["id"], 0)
                    call_system_message(db, room["id"], me, "call_ended_everyone", now)
            else:
                was_in_call = bool(call_flags_now(session, now))
                set_call_flags(db, session["id"], 0)
                # The last one out ends the call: call_ended, not call_left (as Talk).
                ended = room["call_start_time"] and not in_call_count(
                    db, room["id"], now - CALL_TIMEOUT_SECONDS
                )
                if was_in_call and not ended:
                    call_system_message(db, room["id"], me, "call_left", now)
                end_call_if_empty(db, room, me, now)
        self.talk.room_changed(room["id"])
        self.talk.hpb.in_call_changed(room["id"], 0, left)

    def promote(self, actor, token, find) -> None:
        """Make the user `find(db, room)` returns a moderator (moderators)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            row = find(db, room)
            if row is None:
                raise Refused("no-participant")
            if row["participant_type"] == OWNER:
                raise Refused("owner-above-moderator")
            if row["participant_type"] != USER:
                raise Refused("promote-not-user")
            set_participant_type(db, row["id"], MODERATOR, self.now())
            self.say(db, room["id"], speaker(actor, me), "moderator_promoted",
                     {"user": rich_row(row)})
        self.talk.chat_posted(room["id"])
        self.talk.hpb.participants_changed(room["id"], {row["id"]})

    def demote(self, actor, token, find) -> None:
        """Make the moderator `find(db, room)` returns a plain user (moderators)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            row = find(db, room)
            if row is not None and row["id"] == me["id"]:
                raise Refused("demote-self")
            if row is None:
                raise Refused("no-participant")
            if row["participant_type"] != MODERATOR:
                raise Refused("demote-not-moderator")
            set_participant_type(db, row["id"], USER, self.now())
            self.say(db, room["id"], speaker(actor, me), "moderator_demoted",
                     {"user": rich_row(row)})
        self.talk.chat_posted(room["id"])
        self.talk.hpb.participants_changed(room["id"], {row["id"]})

    def set_setting(self, actor, token, column, value, types=(ROOM_GROUP, ROOM_PUBLIC)) -> None:
        """Change a room setting (moderators), in rooms of the given types only."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            if room["type"] not in types:
                raise Refused("one-to-one" if room["type"] == ROOM_ONE_TO_ONE else "not-group-or-public")
            set_room_setting(db, room["id"], column, value, self.now())
            if column in SETTING_VERBS and room[column] != value:
                self.say(db, room["id"], speaker(actor, me), SETTING_VERBS[column](value))
        self.talk.room_changed(room["id"])
        if column in ("default_permissions", "call_permissions"):
            self.talk.hpb.participants_changed(room["id"])  # everyone's may have changed
        else:
            self.talk.hpb.updated(room["id"])

    def set_lobby(self, actor, token, state, timer) -> None:
        """Turn the lobby on (with an optional opening time) or off (moderators)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, MODERATE)
            if room["type"] not in (ROOM_GROUP, ROOM_PUBLIC):
                raise Refused("one-to-one" if room["type"] == ROOM_ONE_TO_ONE else "not-group-or-public")
            if room["lobby_state"] != state:
                verb = "lobby_non_moderators" if state else "lobby_none"
                self.say(db, room["id"], speaker(actor, me), verb)
            set_room_setting(db, room["id"], "lobby_state", state, self.now())
            set_room_setting(db, room["id"], "lobby_timer", timer if state else 0, self.now())
        self.talk.room_changed(room["id"])
        self.talk.hpb.updated(room["id"])

    def set_attendee_permissions(self, actor, token, attendee_id, method, permissions) -> None:
        """Set, add or remove an attendee's permissions (moderators; never a moderator's)."""
        with self.talk.db.write() as db:
            room, _ = room_for(db, actor, token, MODERATE)
            if room["type"] == ROOM_ONE_TO_ONE:
                raise Refused("one-to-one")
            row = participant_by_attendee(db, room["id"], attendee_id)
            if row is None:
                raise Refused("no-participant")
            if row["participant_type"] in MODERATOR_TYPES:
                raise Refused("moderator-permissions")
            current = effective_permissions(room, row)
            if method == "add":
                permissions = current | permissions
            elif method == "remove":
                permissions = current & ~permissions
            permissions = (permissions | PERM_CUSTOM) & (PERMISSIONS_ALL | PERM_CUSTOM)
            set_attendee_setting(db, row["id"], "permissions", permissions, self.now())
        self.talk.room_changed(room["id"])
        self.talk.hpb.participants_changed(room["id"], {row["id"]})

    def bots(self, actor, token) -> tuple[list[sqlite3.Row], set[int]]:
        """Every bot, and the ids of those set up in the room (moderators)."""
        with self.talk.db.read() as db:
            room, _ = room_for(db, actor, token, MODERATE)
            return list_bots(db), bot_ids_in_room(db, room["id"])

    def switch_bot(self, actor, token, bot_id, enable) -> tuple[sqlite3.Row, bool]:
        """Set a bot up in the room or remove it (moderators): (bot, whether
        that changed anything). Only enabled bots, not no-setup ones, and none
        in former one-to-ones; the bot is sent Join or Leave."""
        with self.talk.db.write() as db:
            room, _ = room_for(db, actor, token, MODERATE)
            if enable and room["type"] == ROOM_FORMER_ONE_TO_ONE:
                raise Refused("bot-room", {"error": "room"})
            bot = bot_by_id(db, bot_id)
            if bot is None or bot["state"] != BOT_ENABLED:
                raise Refused("no-bot", {"error": "bot"})
            changed = (link_bot if enable else unlink_bot)(db, bot["id"], room["id"])
        if changed:
            self.talk.bots.membership(room, bot, "Join" if enable else "Leave")
        return bot, changed

    def set_own(self, actor, token, column, value) -> None:
        """Change one of the caller's own settings in a room (favorite, notifications)."""
        with self.talk.db.write() as db:
            room, me = room_for(db, actor, token, ROW)
            set_attendee_setting(db, me["id"], column, value, self.now())


def by_user(user_id):
    """A finder for Rooms.remove/promote/demote: the row of a user id."""
    return lambda db, room: participant_of(db, room["id"], user_id=user_id) if user_id else None


def by_attendee(attendee_id):
    """A finder for Rooms.remove/promote/demote: the row of an attendee id."""
    return lambda db, room: participant_by_attendee(db, room["id"], attendee_id)


# ---------------------------------------------------------------------------
# Routes, API v1 (2018): Room management
# ---------------------------------------------------------------------------


def room_name(value, max_length=ROOM_NAME_MAX) -> str | None:
    """An optional room name from a raw parameter: trimmed, at most `max_length`, else 400."""
    value = text_value("roomName", value)
    if value is None:
        return None
    value = value.strip()
    if len(value) > max_length:
        fail(400, f"Room name longer than {max_length} characters")
    return value


def room_answer(rq, db, room) -> dict:
    """The 2018 room object for the caller."""
    rows = participants_of(db, room["id"])
    return room_json(room, rows, rq.actor, rq.now)


def room_create(rq):
    """POST /room: Creating a new room."""
    room_type = rq.integer("roomType")
    if room_type not in ROOM_TYPES:
        fail(400, "roomType must be 1, 2 or 3")
    invite = rq.text("invite", "")
    name = room_name(rq.params.get("roomName")) or ""
    room, created = rq.talk.rooms.create(rq.actor, room_type, name, invite)
    with rq.talk.db.read() as db:
        shown = room_answer(rq, db, room)
    data = {"token": room["token"], "name": shown["name"], "displayName": shown["displayName"]}
    return Reply(201 if created else 200, data)


def room_list(rq):
    """GET /room: Get user's rooms."""
    talk, now = rq.talk, rq.now
    # Clients poll this list: an answer is reused until this process writes
    # anything or the second changes (the active window counts in seconds;
    # changes by other processes, such as the command line, show a second later).
    key = (rq.actor.user_id, talk.db.generation, now)

    def build():
        with talk.db.read() as db:
            rooms = rooms_of(db, rq.actor.user_id)
        return [room_json(room, rows, rq.actor, now) for room, rows in rooms]

    return shared_answer(talk.room_lists, key, build)


def room_get(rq, token):
    """GET /room/{token}: Get single room (also for guests)."""
    rq.talk.expire_guests(token)
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, SEE)
        return room_answer(rq, db, room)


def room_rename(rq, token):
    """PUT /room/{token}: Rename a room."""
    rq.talk.rooms.rename(rq.actor, token, rq.params.get("roomName"), ROOM_NAME_MAX)
    return []


def room_set_password(rq, token):
    """PUT /room/{token}/password: Set password for a room."""
    rq.talk.rooms.set_password(rq.actor, token, rq.text("password", ""))
    return []


def room_delete(rq, token):
    """DELETE /room/{token}: Delete a room."""
    rq.talk.rooms.delete(rq.actor, token)
    return []


def room_make_public(rq, token):
    """POST /room/{token}/public: Allow guests in a room (public room)."""
    rq.talk.rooms.make_public(rq.actor, token)
    return []


def room_make_private(rq, token):
    """DELETE /room/{token}/public: Disallow guests in a room (group room)."""
    rq.talk.rooms.make_private(rq.actor, token)
    return []


# ---------------------------------------------------------------------------
# Routes, API v1 (2018): Participant management
# ---------------------------------------------------------------------------


def participant_list(rq, token):
    """GET /room/{token}/participants: Get list of participants in a room."""
    rq.talk.expire_guests(token)
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, LIST)
        rows = participants_of(db, room["id"])
    return [participant_json(row) for row in rows]


def participant_add(rq, token):
    """POST /room/{token}/participants: Add a participant to a room."""
    new_type = rq.talk.rooms.add_user(rq.actor, token, rq.text("newParticipant", ""))
    return {"type": new_type} if new_type else []


def participant_remove(rq, token):
    """DELETE /room/{token}/participants: Delete a participant from a room."""
    rq.talk.rooms.remove(rq.actor, token, by_user(rq.text("participant", "")))
    return []


def participant_remove_guest(rq, token):
    """DELETE /room/{token}/participants/guests: Remove a guest from a room."""
    rq.talk.rooms.remove_guest(rq.actor, token, rq.text("participant", ""))
    return []


def participant_remove_self(rq, token):
    """DELETE /room/{token}/participants/self: Remove yourself from a room."""
    rq.talk.rooms.remove_self(rq.actor, token)
    return []


def participant_join(rq, token):
    """POST /room/{token}/participants/active: Join a room (available for call and chat)."""
    address = client_address(bottle.request.environ)
    _, session_id = rq.talk.rooms.join(
        rq.actor, token, rq.text("password", ""), rq.guest_id, address
    )
    return {"sessionId": session_id}


def participant_leave(rq, token):
    """DELETE /room/{token}/participants/active: Leave a room (not available for call and chat anymore)."""
    rq.talk.rooms.leave(rq.actor, token)
    return []


def moderator_promote(rq, token):
    """POST /room/{token}/moderators: Promote a user to a moderator."""
    rq.talk.rooms.promote(rq.actor, token, by_user(rq.text("participant", "")))
    return []


def moderator_demote(rq, token):
    """DELETE /room/{token}/moderators: Demote a moderator to a user."""
    rq.talk.rooms.demote(rq.actor, token, by_user(rq.text("participant", "")))
    return []


# ---------------------------------------------------------------------------
# Routes, API v1 (2018): Call management
# ---------------------------------------------------------------------------


def call_peers_list(rq, token):
    """GET /call/{token}: Get list of connected participants."""
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, CALL_LIST)
        rows = call_peers(db, room["id"], rq.now - ACTIVE_SECONDS)
    return [call_peer_json(row, room["token"]) for row in rows]


def call_join(rq, token):
    """POST /call/{token}: Join a call."""
    rq.talk.rooms.join_call(rq.actor, token, newest_session, FLAG_IN_CALL)
    return []


def call_ping(rq, token):
    """POST /call/{token}/ping: Send ping to keep the call alive."""
    with rq.talk.db.write() as db:
        _, me = room_for(db, rq.actor, token, JOINED)
        touch_session(db, me["session_id"], me["id"], rq.now)
    return []


def call_leave(rq, token):
    """DELETE /call/{token}: Leave a call (but staying in the room for future calls and chat)."""
    with rq.talk.db.read() as db:
        room_for(db, rq.actor, token, SEE)
        # As Talk 3.1: a guest with no session anywhere is simply told 200.
        if rq.actor.is_guest and not guest_has_session(db, rq.actor.guest_id):
            return []
    rq.talk.rooms.leave_call(rq.actor, token, newest_session)
    return []


# ---------------------------------------------------------------------------
# Routes, API v1: Chat (2018, and today's with lookIntoFuture, SPEC 11)
# ---------------------------------------------------------------------------


def legacy_waits(query) -> bool:
    """Whether a chat receive may wait: the 2018 form unless timeout=0, today's
    form only looking into the future with a timeout (read as the handler does)."""
    if "lookIntoFuture" in query:
        return (
            query_integer(query, "lookIntoFuture", 0) == 1
            and query_integer(query, "timeout", CHAT_DEFAULT_TIMEOUT) > 0
        )
    return query_integer(query, "timeout", CHAT_DEFAULT_TIMEOUT) > 0


@long_poll(legacy_waits)
def chat_receive(rq, token):
    """GET /chat/{token}: Receive chat messages of a room (today's form with lookIntoFuture)."""
    if rq.has("lookIntoFuture"):
        return chat_receive_modern(rq, token)
    offset = rq.integer("offset", 0, minimum=0)
    since = rq.integer("notOlderThanTimestamp", 0, minimum=0)
    timeout = min(rq.integer("timeout", CHAT_DEFAULT_TIMEOUT, minimum=0), CHAT_MAX_TIMEOUT)
    if not rq.may_wait:
        timeout = 0
    talk = rq.talk
    deadline = talk.notifier.monotonic() + timeout * talk.notifier.time_scale
    with talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        outside_lobby(room, me, rq.now)
    owner = poll_owner(me)
    with talk.notifier.listen(chat_key(room["id"]), owner=owner) as waiter:
        last_look = waited = False
        while True:
            with talk.db.read() as db:
                if waited:  # the room may have gone, or the caller with it
                    room, _ = room_for(db, rq.actor, token, CHAT)
                start, rows = messages_after(db, room["id"], offset, since, CHAT_PAGE_MAX, rq.now)
            left = (deadline - talk.notifier.monotonic()) / talk.notifier.time_scale
            if rows or last_look or left <= 0 or talk.notifier.closed or waiter.superseded:
                break
            # Not notified means timed out, over the budget, client gone or
            # shutting down: look once more, then answer.
            last_look = not talk.notifier.wait(waiter, left, rq.wait_cancelled)
            waited = True
            rows = messages_in_news(talk.notifier.take_news(waiter), start)
            if rows:
                break  # the sends handed us exactly what we wait for
    return [message_json(row, room["token"]) for row in reversed(rows)]


PING_EVERY = 5  # seconds: a receive refreshes a session at most this often (SD card)


def keep_alive(rq, me) -> None:
    """No ping: today's chat receive keeps the caller's session alive, writing
    at most every PING_EVERY seconds (SPEC 2 keeps the 2018 receive from it)."""
    if me is None:
        return
    with rq.talk.db.read() as db:
        session = rq.own_session(db, me)
    stamp = session["last_ping"] if session is not None else me["last_ping"]
    if stamp >= rq.now - PING_EVERY:
        return
    with rq.talk.db.write() as db:
        seen(rq, db, me, rq.now)


def seen(rq, db, me, now) -> None:
    """The caller was seen now: its row, and the session its device holds (no ping)."""
    session = rq.own_session(db, me)
    if session is None:
        touch(db, me["id"], now)
    else:
        touch_session(db, session["id"], me["id"], now)


def poll_owner(me) -> tuple | None:
    """Whose long-poll this is: the caller's session in the room. A member
    who has not joined (a user, no session) is bounded by the dispatcher's
    long-poll budget alone."""
    if me is not None and me["session_id"] != "0":
        return ("chat-session", me["session_id"])
    return None


def messages_in_news(news, start) -> list:
    """The messages a waiting receive can answer with straight from the sends
    that woke it: they must continue its view exactly at legacy_seq `start`,
    and nothing else may have happened meanwhile (None). Else [] (look again)."""
    if start is None or not news or any(item is None for item in news):
        return []
    fresh = sorted(
        (row for row in news if row["legacy_seq"] is not None and row["legacy_seq"] >= start),
        key=lambda row: row["legacy_seq"],
    )
    seqs = [row["legacy_seq"] for row in fresh]
    if not fresh or seqs != list(range(start, start + len(fresh))):
        return []
    return fresh[:CHAT_PAGE_MAX]


def future_in_news(news, last_seq) -> list:
    """Today's waiting receive answers from the news when it continues the
    room exactly after seq `last_seq` and nothing else happened (None)."""
    if not news or any(item is None for item in news):
        return []
    fresh = sorted((row for row in news if row["seq"] > last_seq), key=lambda row: row["seq"])
    if not fresh or [row["seq"] for row in fresh] != list(
        range(last_seq + 1, last_seq + 1 + len(fresh))
    ):
        return []
    return fresh


def clamp(value, low, high):
    return max(low, min(value, high))


def chat_answer(rq, db, room, rows) -> list:
    """Rows as today's message objects for the caller, with parents and own reactions."""
    now = rq.now
    parents = messages_by_ids(db, [r["parent_id"] for r in rows if r["parent_id"]]) if db else {}
    actor_type, actor_id = caller_actor(rq, db, room)
    reacted = [r["id"] for r in rows if r["reactions"] != "{}"]
    own = own_reactions(db, actor_type, actor_id, reacted) if reacted and db else {}
    return [
        chat_message_json(row, room["token"], own.get(row["id"], []), parents.get(row["parent_id"]),
                          now=now)
        for row in rows
        if not (0 < row["expires"] <= now)
    ]


def caller_actor(rq, db, room) -> tuple[str, str]:
    """The caller's actor type and id in chat (guests: from their attendee row)."""
    if rq.actor.user_id is not None:
        return "users", rq.actor.user_id
    return "guests", guest_actor_id(rq.actor.guest_id or "")


def common_read_header(db, room) -> int:
    value = last_common_read(db, room["id"])
    bottle.response.set_header("X-Chat-Last-Common-Read", str(value))
    return value


def chat_receive_modern(rq, token):
    """GET /chat/{token} with lookIntoFuture: history by id (0) or the future (1)."""
    future = choice(rq, "lookIntoFuture", (0, 1), 0) == 1
    limit = clamp(rq.integer("limit", CHAT_LIMIT_DEFAULT), 1, CHAT_LIMIT_MAX)
    known = rq.integer("lastKnownMessageId", 0, minimum=0)
    inclusive = rq.boolean("includeLastKnown", False)
    timeout = clamp(rq.integer("timeout", CHAT_DEFAULT_TIMEOUT), 0, CHAT_MAX_TIMEOUT)
    set_marker = rq.boolean("setReadMarker", True)
    common_sent = rq.integer("lastCommonReadId", 0)
    talk = rq.talk
    with talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        outside_lobby(room, me, rq.now)
    keep_alive(rq, me)
    if not future:
        with talk.db.read() as db:
            rows = messages_page(db, room["id"], known, limit, False, inclusive)
            return chat_reply(rq, db, room, rows, common_sent)
    if set_marker and known > me["last_read_message"]:
        with talk.db.write() as db:
            set_read_marker(db, me["id"], room["id"], known)
    deadline = talk.notifier.monotonic() + timeout * talk.notifier.time_scale
    with talk.notifier.listen(modern_chat_key(room["id"])) as waiter:
        last_look = waited = False
        while True:
            with talk.db.read() as db:
                if waited:
                    room, _ = room_for(db, rq.actor, token, CHAT)
                room = room_by_id(db, room["id"])
                rows = messages_page(db, room["id"], known, limit, True, inclusive)
                if rows:
                    return chat_reply(rq, db, room, rows, common_sent)
            left = (deadline - talk.notifier.monotonic()) / talk.notifier.time_scale
            if last_look or left <= 0 or talk.notifier.closed:
                break
            last_look = not talk.notifier.wait(waiter, left, rq.wait_cancelled)
            waited = True
            rows = future_in_news(talk.notifier.take_news(waiter), room["last_seq"])[:limit]
            if rows and not any(r["parent_id"] or r["reactions"] != "{}" for r in rows):
                return chat_reply(rq, None, room, rows, common_sent)
    with talk.db.read() as db:
        return chat_reply(rq, db, room, [], common_sent)


def chat_reply(rq, db, room, rows, common_sent):
    """The answer of a modern receive: 304 when nothing, else the messages and
    X-Chat-Last-Given (the last fetched, before expired ones are dropped)."""
    if not rows:
        if common_sent and db is not None:
            if common_read_header(db, room) != common_sent:
                return []
        return Reply(304, None)
    bottle.response.set_header("X-Chat-Last-Given", str(rows[-1]["id"]))
    if db is not None:
        common_read_header(db, room)
    return chat_answer(rq, db, room, rows)


def modern_send(rq) -> bool:
    """Whether a send comes from today's clients (a superset answer, 413 when too long)."""
    markers = ("referenceId", "replyTo", "silent", "actorDisplayName")
    content_type = bottle.request.environ.get("CONTENT_TYPE", "")
    return any(rq.has(name) for name in markers) or "json" in content_type


def parse_mentions(db, room, text) -> tuple[dict, list[str], bool]:
    """The rich objects of a message's @mentions: (parameters, user ids, @all)."""
    parameters, users, everyone = {}, [], False
    numbers = {"user": 0, "guest": 0, "call": 0}
    seen = set()
    guests = None
    for match in MENTION.finditer(text):
        for name, _ in mention_candidates(match):
            if name in seen:
                break
            found = None
            if name == "all":
                found = ("call", {"type": "call", "id": room["token"],
                                  "name": room["name"], "call-type": call_type(room)})
                everyone = True
            elif name.startswith("guest/"):
                if guests is None:
                    guests = {guest_actor_id(r["guest_id"]): r for r in participants_of(db, room["id"])
                              if r["guest_id"] is not None}
                row = guests.get(name[6:])
                if row is not None:
                    found = ("guest", {"type": "guest", "id": name, "name": row["guest_name"]})
            else:
                user = get_user(db, name)
                if user is not None:
                    found = ("user", {"type": "user", "id": user["id"], "name": user["display_name"]})
                    users.append(user["id"])
            if found is not None:
                seen.add(name)
                kind, value = found
                numbers[kind] += 1
                parameters[f"mention-{kind}{numbers[kind]}"] = value
                break
    return parameters, users, everyone


def call_type(room) -> str:
    return {ROOM_ONE_TO_ONE: "one2one", ROOM_PUBLIC: "public"}.get(room["type"], "group")


def may_write(room, me, now) -> None:
    """Chat writes: the lobby (412), read-only rooms and the chat permission (403)."""
    outside_lobby(room, me, now)
    if room["read_only"]:
        fail(403, "The conversation is read-only")
    if not effective_permissions(room, me) & PERM_CHAT:
        fail(403, "You may not chat in this conversation")


def chat_send(rq, token):
    """POST /chat/{token}: Sending a new chat message (replyTo, referenceId, silent)."""
    modern = modern_send(rq)
    message = (rq.text("message", "") or "").strip()
    reference_id = rq.text("referenceId", "") or ""
    if len(reference_id) > REFERENCE_ID_MAX:
        fail(400, f"referenceId is longer than {REFERENCE_ID_MAX} characters")
    reply_to = rq.integer("replyTo", 0, minimum=0)
    silent = rq.boolean("silent", False)
    guest_name = (rq.text("actorDisplayName", "") or "").strip()[:GUEST_NAME_MAX]
    now = rq.now
    with rq.talk.db.write() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        may_write(room, me, now)
        if not message:
            fail(400, "The message is empty")
        if len(message) > MESSAGE_MAX:
            fail(413 if modern else 400, f"The message is longer than {MESSAGE_MAX} characters")
        parent = message_by_id(db, reply_to) if reply_to else None
        if reply_to and (
            parent is None or parent["room_id"] != room["id"]
            or parent["message_type"] != "comment" or parent["verb"]
        ):
            fail(400, "replyTo must be a message of this conversation")
        if rq.actor.user_id:
            actor_type, actor_id, name = "users", rq.actor.user_id, ""
        else:
            if guest_name:
                set_guest_name(db, me["id"], guest_name)
            actor_type, name = "guests", guest_name or me["guest_name"]
            # The 2018 routes name a guest by its session, today's by its attendee.
            actor_id = guest_actor_id(me["guest_id"]) if modern else (
                hashlib.sha1(me["session_id"].encode()).hexdigest())
        sender = ("session", me["session_id"]) if me["session_id"] != "0" else ("user", actor_id)
        rq.talk.chat_flow.take(sender, room["id"], len(message.encode("utf-8")))
        parameters, users, everyone = parse_mentions(db, room, message)
        expires = now + room["message_expiration"] if room["message_expiration"] else 0
        row = add_message(
            db, room["id"], actor_type, actor_id, message, now, parameters=parameters,
            actor_name=name, reference_id=reference_id, parent_id=reply_to,
            silent=silent, expires=expires,
        )
        mark_mentions(db, room["id"], row["id"], users, everyone, me["id"])
        set_read_marker(db, me["id"], room["id"], row["id"], row["legacy_seq"])
        seen(rq, db, me, now)
        common = last_common_read(db, room["id"]) if modern else 0
    if expires:
        rq.talk.expire_at(expires)
    rq.talk.chat_posted(room["id"], row)
    if not modern:
        return Reply(201, message_json(row, room["token"]))
    bottle.response.set_header("X-Chat-Last-Common-Read", str(common))
    return Reply(201, chat_message_json(row, room["token"], [], parent, now=now))


def message_id_of(value) -> int:
    """A message or poll id from the URL (404 unless a positive integer)."""
    if not re.fullmatch(r"[0-9]{1,18}", value or ""):
        fail(404, "Message not found")
    return int(value)


def own_message(rq, me, row) -> bool:
    """Whether the caller wrote the message (guests under either of their ids)."""
    if rq.actor.user_id is not None:
        return row["actor_type"] == "users" and row["actor_id"] == rq.actor.user_id
    ids = {guest_actor_id(me["guest_id"]), hashlib.sha1(me["session_id"].encode()).hexdigest()}
    return row["actor_type"] == "guests" and row["actor_id"] in ids


def changeable_message(rq, db, token, message_id, max_age):
    """The room, the caller's row and a comment the caller may edit or delete
    (docs/chat.md): own, or a moderator's outside one-to-ones, not too old."""
    room, me = room_for(db, rq.actor, token, CHAT)
    may_write(room, me, rq.now)
    row = message_by_id(db, message_id)
    if row is None or row["room_id"] != room["id"]:
        fail(404, "Message not found")
    if row["message_type"] != "comment" or row["verb"]:
        fail(405, "Only chat messages can be changed")
    moderator = me["participant_type"] in MODERATOR_TYPES and room["type"] != ROOM_ONE_TO_ONE
    if not own_message(rq, me, row) and not moderator:
        fail(403, "You may change only your own messages")
    if rq.now - row["timestamp"] > max_age:
        fail(400, "The message is too old to change")
    return room, me, row


def chat_edit(rq, token, message_id):
    """PUT /chat/{token}/{messageId}: Edit a message (answers the message_edited system message)."""
    message_id = message_id_of(message_id)
    text = (rq.text("message", "") or "").strip()
    now = rq.now
    with rq.talk.db.write() as db:
        room, me, row = changeable_message(rq, db, token, message_id, EDIT_MAX_AGE)
        if not text:
            fail(400, "The message is empty")
        if len(text) > MESSAGE_MAX:
            fail(413, f"The message is longer than {MESSAGE_MAX} characters")
        parameters, users, everyone = parse_mentions(db, room, text)
        author = speaker(rq.actor, me)
        edit_message(db, message_id, text, parameters, author, now)
        mark_mentions(db, room["id"], message_id, users, everyone, me["id"])
        system = add_system_message(db, room["id"], author, "message_edited", now=now,
                                    parent_id=message_id)
        edited = message_by_id(db, message_id)
    rq.talk.chat_posted(room["id"], system, changed=True)
    return chat_message_json(system, room["token"], parent=edited, now=now)


def chat_delete(rq, token, message_id):
    """DELETE /chat/{token}/{messageId}: Delete a message (answers the message_deleted system message)."""
    message_id = message_id_of(message_id)
    now = rq.now
    with rq.talk.db.write() as db:
        room, me, _ = changeable_message(rq, db, token, message_id, DELETE_MAX_AGE)
        author = speaker(rq.actor, me)
        delete_message(db, message_id, author, now)
        system = add_system_message(db, room["id"], author, "message_deleted", now=now,
                                    parent_id=message_id)
        deleted = message_by_id(db, message_id)
    rq.talk.chat_posted(room["id"], system, changed=True)
    return chat_message_json(system, room["token"], parent=deleted, now=now)


def chat_clear(rq, token):
    """DELETE /chat/{token}: Clear the history (moderators; either side of a one-to-one)."""
    now = rq.now
    with rq.talk.db.write() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        if me["participant_type"] not in MODERATOR_TYPES:
            fail(403, "Only moderators may clear the history")
        clear_history(db, room["id"])
        row = add_system_message(db, room["id"], speaker(rq.actor, me), "history_cleared", now=now)
        room = room_by_id(db, room["id"])
        mark_all_read(db, room["id"], row["id"], room["last_legacy_seq"])
    rq.talk.chat_posted(room["id"], row, changed=True)
    return chat_message_json(row, room["token"], now=now)


def chat_context(rq, token, message_id):
    """GET /chat/{token}/{messageId}/context: The messages around one, oldest first."""
    message_id = message_id_of(message_id)
    limit = clamp(rq.integer("limit", CONTEXT_LIMIT_DEFAULT), 1, CONTEXT_LIMIT_MAX)
    with rq.talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        outside_lobby(room, me, rq.now)
        older = messages_page(db, room["id"], message_id, limit, False)
        newer = messages_page(db, room["id"], message_id, limit + 1, True, inclusive=True)
        rows = [*reversed(older), *newer]
        if rows:
            bottle.response.set_header("X-Chat-Last-Given", str(rows[0]["id"]))
        common_read_header(db, room)
        return chat_answer(rq, db, room, rows)


def chat_mark_read(rq, token):
    """POST /chat/{token}/read: Mark the chat read up to lastReadMessage (default: all)."""
    with rq.talk.db.write() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        marker = rq.integer("lastReadMessage", None, minimum=0)
        if marker is None or marker >= room["last_message_id"]:
            last = max(room["last_message_id"], me["last_read_message"])
            set_read_marker(db, me["id"], room["id"], last, room["last_legacy_seq"])
        else:
            set_read_marker(db, me["id"], room["id"], marker)
        common_read_header(db, room)
    return read_marker_answer(rq, token)


def chat_mark_unread(rq, token):
    """DELETE /chat/{token}/read: Mark the chat unread (its newest comment is unread again)."""
    with rq.talk.db.write() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        count = max(room["last_legacy_seq"] - 1, 0)
        before = legacy_message(db, room["id"], count) if count else None
        set_read_marker(db, me["id"], room["id"], before["id"] if before else 0, count)
        common_read_header(db, room)
    return read_marker_answer(rq, token)


def read_marker_answer(rq, token) -> dict:
    """The Room after a read-marker change (today's Talk answers it)."""
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, CHAT)
        return conversation_answer(rq, db, room)


def chat_mentions(rq, token):
    """GET /chat/{token}/mentions: Autocomplete suggestions for @mentions."""
    search = (rq.text("search", "") or "").lower()
    limit = clamp(rq.integer("limit", MENTIONS_LIMIT_DEFAULT), 1, 100)
    with rq.talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        outside_lobby(room, me, rq.now)
        rows = participants_of(db, room["id"])
    found = []
    if "all".startswith(search) or search in room["name"].lower():
        found.append({"id": "all", "label": room["name"] or "all", "source": "calls",
                      "mentionId": "all"})
    for row in rows:
        if row["id"] == me["id"]:
            continue
        if row["user_id"] is not None:
            entry = {"id": row["user_id"], "label": row["display_name"], "source": "users",
                     "mentionId": row["user_id"]}
        else:
            guest = f"guest/{guest_actor_id(row['guest_id'])}"
            entry = {"id": guest, "label": row["guest_name"] or "Guest", "source": "guests",
                     "mentionId": guest}
        if search in entry["id"].lower() or search in entry["label"].lower():
            found.append(entry)
    return found[:limit]


# --- Reactions (docs/reaction.md) ----------------------------------------------------


def reaction_of(rq) -> str:
    return checked_reaction(rq.text("reaction", "") or "")


def checked_reaction(text: str) -> str:
    reaction = text.strip()
    if not reaction or len(reaction) > REACTION_MAX or re.search(r"[\sA-Za-z0-9]", reaction):
        fail(400, "reaction must be one emoji")
    return reaction


def reactable(rq, db, token, message_id, write=True):
    room, me = room_for(db, rq.actor, token, CHAT)
    if write:
        may_write(room, me, rq.now)
    else:
        outside_lobby(room, me, rq.now)
    row = message_by_id(db, message_id)
    if row is None or row["room_id"] != room["id"]:
        fail(404, "Message not found")
    if row["message_type"] != "comment" or row["verb"]:
        fail(400, "Only chat messages take reactions")
    return room, me, row


def reactions_answer(db, message_id, reaction="") -> dict:
    """emoji -> who reacted with it (openapi Reaction)."""
    answer: dict[str, list] = {}
    for row in reactions_of(db, message_id, reaction):
        answer.setdefault(row["reaction"], []).append({
            "actorType": row["actor_type"], "actorId": row["actor_id"],
            "actorDisplayName": row["display_name"], "timestamp": row["timestamp"],
        })
    return answer or []


def apply_reaction(db, room, message_id, reaction, author, now, add) -> sqlite3.Row | None:
    """Add or take back one reaction, with the system message pollers notice
    it by; that message, or None when nothing changed."""
    if not change_reaction(db, message_id, reaction, author, now, add):
        return None
    verb = "reaction" if add else "reaction_revoked"
    return add_system_message(db, room["id"], author, verb, now=now, parent_id=message_id,
                              text=reaction if add else None)


def reaction_change(rq, token, message_id, add):
    message_id = message_id_of(message_id)
    reaction = reaction_of(rq)
    now = rq.now
    with rq.talk.db.write() as db:
        room, me, _ = reactable(rq, db, token, message_id)
        author = speaker(rq.actor, me)
        system = apply_reaction(db, room, message_id, reaction, author, now, add)
        if system is None and not add:
            fail(404, "Reaction not found")
        answer = reactions_answer(db, message_id)
    if system is not None:
        rq.talk.chat_posted(room["id"], system, changed=True)
        rq.talk.bots.reacted(room, message_id, author, reaction, add)
    return Reply(201 if add and system is not None else 200, answer)


def reaction_add(rq, token, message_id):
    """POST /reaction/{token}/{messageId}: React (201 new, 200 already there)."""
    return reaction_change(rq, token, message_id, add=True)


def reaction_delete(rq, token, message_id):
    """DELETE /reaction/{token}/{messageId}: Take one's reaction back."""
    return reaction_change(rq, token, message_id, add=False)


def reaction_list(rq, token, message_id):
    """GET /reaction/{token}/{messageId}: Who reacted with what (`reaction` filters)."""
    message_id = message_id_of(message_id)
    reaction = (rq.text("reaction", "") or "").strip()
    with rq.talk.db.read() as db:
        reactable(rq, db, token, message_id, write=False)
        return reactions_answer(db, message_id, reaction)


# --- Polls (docs/poll.md) --------------------------------------------------------------


def poll_answer(rq, db, room, me, poll) -> dict:
    actor_type, actor_id = caller_actor(rq, db, room)
    own = poll_votes_of(db, poll["id"], actor_type, actor_id)
    details = poll_votes_of(db, poll["id"]) if poll["status"] == POLL_CLOSED else []
    return poll_json(poll, own, details, me["participant_type"] in MODERATOR_TYPES)


def text_list(rq, name) -> list:
    """A list parameter: a JSON array, or repeated `name[]` form fields."""
    value = rq.params.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        value = [value]
    if not all(isinstance(item, str | int) and not isinstance(item, bool) for item in value):
        fail(400, f"{name} must be a list")
    return [str(item) for item in value]


def poll_create(rq, token):
    """POST /poll/{token}: Create a poll (question, options, resultMode, maxVotes)."""
    question = (rq.text("question", "") or "").strip()
    options = [option.strip() for option in text_list(rq, "options")]
    mode = choice(rq, "resultMode", (POLL_PUBLIC, POLL_HIDDEN), POLL_PUBLIC)
    max_votes = rq.integer("maxVotes", 0, minimum=0)
    if not question or len(question) > POLL_QUESTION_MAX:
        fail(400, "question must be 1 to 32000 characters")
    if len(options) < 2 or not all(options) or any(len(o) > POLL_OPTION_MAX for o in options):
        fail(400, "options must be at least two texts")
    now = rq.now
    with rq.talk.db.write() as db:
        room, me = room_for(db, rq.actor, token, CHAT)
        may_write(room, me, now)
        if room["type"] == ROOM_ONE_TO_ONE:
            fail(400, "Polls are not possible in one-to-one conversations")
        author = speaker(rq.actor, me)
        poll_id = create_poll(db, room["id"], question, options, author, mode, max_votes, now)
        expires = now + room["message_expiration"] if room["message_expiration"] else 0
        params = {"actor": rich_actor(*author),
                  "object": {"type": "talk-poll", "id": str(poll_id), "name": question}}
        row = add_message(db, room["id"], author[0], author[1], "{object}", now,
                          parameters=params, actor_name=author[2], legacy=False, expires=expires)
        set_read_marker(db, me["id"], room["id"], row["id"])
        answer = poll_answer(rq, db, room, me, poll_by_id(db, room["id"], poll_id))
    if expires:
        rq.talk.expire_at(expires)
    rq.talk.chat_posted(room["id"], row)
    return Reply(201, answer)


def poll_of(rq, db, token, poll_id, write=False):
    room, me = room_for(db, rq.actor, token, CHAT)
    if write:
        may_write(room, me, rq.now)
    else:
        outside_lobby(room, me, rq.now)
    poll = poll_by_id(db, room["id"], message_id_of(poll_id))
    if poll is None:
        fail(404, "Poll not found")
    return room, me, poll


def poll_get(rq, token, poll_id):
    """GET /poll/{token}/{pollId}: A poll's state (results once visible)."""
    with rq.talk.db.read() as db:
        room, me, poll = poll_of(rq, db, token, poll_id)
        return poll_answer(rq, db, room, me, poll)


def poll_vote(rq, token, poll_id):
    """POST /poll/{token}/{pollId}: Vote (optionIds replace earlier votes)."""
    raw = text_list(rq, "optionIds")
    if not all(re.fullmatch(r"[0-9]{1,9}", item) for item in raw):
        fail(400, "optionIds must be option numbers")
    option_ids = sorted({int(item) for item in raw})
    now = rq.now
    with rq.talk.db.write() as db:
        room, me, poll = poll_of(rq, db, token, poll_id, write=True)
        if poll["status"] == POLL_CLOSED:
            fail(400, "The poll is closed")
        if any(o >= len(json.loads(poll["options"])) for o in option_ids):
            fail(400, "No such option")
        if poll["max_votes"] and len(option_ids) > poll["max_votes"]:
            fail(400, f"At most {poll['max_votes']} options")
        author = speaker(rq.actor, me)
        set_poll_votes(db, poll, author, option_ids)
        system = None
        if poll["result_mode"] == POLL_PUBLIC:
            rich = {"poll": {"type": "talk-poll", "id": str(poll["id"]), "name": poll["question"]}}
            system = add_system_message(db, room["id"], author, "poll_voted", rich, now)
        answer = poll_answer(rq, db, room, me, poll_by_id(db, room["id"], poll["id"]))
    if system is not None:
        rq.talk.chat_posted(room["id"], system)
    return answer


def poll_close(rq, token, poll_id):
    """DELETE /poll/{token}/{pollId}: Close a poll (its author or a moderator)."""
    now = rq.now
    with rq.talk.db.write() as db:
        room, me, poll = poll_of(rq, db, token, poll_id, write=True)
        author = speaker(rq.actor, me)
        mine = (poll["actor_type"], poll["actor_id"]) == author[:2]
        if not mine and me["participant_type"] not in MODERATOR_TYPES:
            fail(403, "Only the author or a moderator may close the poll")
        if poll["status"] == POLL_CLOSED:
            fail(400, "The poll is closed already")
        close_poll(db, poll["id"])
        rich = {"poll": {"type": "talk-poll", "id": str(poll["id"]), "name": poll["question"]}}
        system = add_system_message(db, room["id"], author, "poll_closed", rich, now)
        answer = poll_answer(rq, db, room, me, poll_by_id(db, room["id"], poll["id"]))
    rq.talk.chat_posted(room["id"], system)
    return answer


# ---------------------------------------------------------------------------
# Routes, API v1 (2018): Signaling
# ---------------------------------------------------------------------------


def turn_credentials(secret: str, now: int) -> tuple[str, str]:
    """TURN REST credentials (coturn use-auth-secret): expiry:random and its HMAC."""
    username = f"{now + TURN_CREDENTIAL_SECONDS}:{secrets.token_hex(8)}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), "sha1").digest()
    return username, base64.b64encode(digest).decode("ascii")


def may_relay(rq) -> bool:
    """Whether the caller may have TURN credentials: a user, or a guest who has
    joined a room. Anyone else would have an open relay for the asking."""
    if rq.actor.user_id:
        return True
    if rq.actor.guest_id is None:
        return False
    with rq.talk.db.read() as db:
        return guest_has_session(db, rq.actor.guest_id)


def ice_servers(talk, now) -> tuple[list[str], list[dict]]:
    """The configured STUN URLs, and the TURN servers ({urls, username, credential})
    with fresh credentials; both generations' signaling settings shape these."""
    stun = [f"stun:{server}" for server in talk.stun_servers]
    turn = []
    if talk.turn_server and talk.turn_secret:
        username, credential = turn_credentials(talk.turn_secret, now)
        for transport in ("udp", "tcp"):
            urls = [f"turn:{talk.turn_server}?transport={transport}"]
            turn.append({"urls": urls, "username": username, "credential": credential})
    return stun, turn


def external_signaling(rq, room=None) -> dict:
    """The settings fields of the signaling mode: with a signaling server, its
    URL and a fresh ticket for the caller (a guest's names no user)."""
    talk = rq.talk
    server = signaling_server_for(talk, room["id"] if room is not None else None)
    ticket = signaling_ticket(talk, rq.actor.user_id, rq.now) if server else ""
    return {
        "signalingMode": "external" if server else "internal",
        "hideWarning": bool(server),
        "server": server,
        "ticket": ticket,
    }


def signaling_settings(rq):
    """GET /signaling/settings: STUN and TURN servers for WebRTC (and the signaling server)."""
    stun, turn = ice_servers(rq.talk, rq.now)
    mode = external_signaling(rq)
    answer = {"server": mode["server"], "ticket": mode["ticket"]}
    if mode["server"]:  # the 2018 answer had no mode: internal signaling keeps it as it was
        answer["signalingMode"] = mode["signalingMode"]
    return {
        **answer,
        "stunservers": [{"url": secrets.choice(stun)}] if stun else [],
        # Only users and joined guests: anyone else would have an open relay.
        "turnservers": [{"url": entry["urls"], **entry} for entry in turn] if may_relay(rq) else [],
    }


def signaling_session(rq, db, token):
    """The caller's session: in the token's room, or the most recently active one."""
    if token is None:
        row = latest_session_of(db, rq.actor.user_id, rq.actor.guest_id)
        return (row["session_id"], row["room_id"]) if row else (None, None)
    room = room_by_token(db, token)
    if room is None:
        return None, None
    me = participant_of(db, room["id"], rq.actor.user_id, rq.actor.guest_id)
    if me is None or me["session_id"] == "0":
        return None, None
    return me["session_id"], room["id"]


def parse_signaling_messages(raw) -> list:
    """The `messages` parameter: a JSON string of a list of objects, else 400."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            fail(400, "messages is not valid JSON")
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        fail(400, "messages must be a list of objects")
    return raw


def relay_signaling(talk, db, items, my_session, room_id, now, control=True) -> set[str]:
    """Queue the `messages` items for their recipients; the sessions to wake.

    Only `ev: message` items of the caller's own session count (a spoofed one
    is dropped); `fn` (a JSON string or object) goes to the session in its
    `to`, if that is in the same room, with the server's `from`, delivered as
    a JSON string. Without `control`, `type: control` items are dropped.
    """
    woken = set()
    expire_signaling(db, now - SIGNALING_TTL)
    for item in items:
        if item.get("ev") != "message" or item.get("sessionId") != my_session:
            continue
        payload = item.get("fn")
        if isinstance(payload, str):
            if len(payload.encode("utf-8", "surrogatepass")) > SIGNALING_MESSAGE_MAX:
                fail(413, f"A signaling message is at most {SIGNALING_MESSAGE_MAX} bytes")
            try:
                payload = json.loads(payload)
            except ValueError:
                fail(400, "fn is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("to"), str):
            fail(400, "fn must be an object with a recipient session in to")
        if payload.get("type") == "control" and not control:
            continue
        recipient = session_by_id(db, payload["to"])
        if recipient is None or recipient["room_id"] != room_id:
            continue  # only sessions of the same room receive
        payload["from"] = my_session
        data = json.dumps(payload)
        if len(data) > SIGNALING_MESSAGE_MAX + 1024:  # fn given as an object
            fail(413, f"A signaling message is at most {SIGNALING_MESSAGE_MAX} bytes")
        if (
            queued_count(db, payload["to"]) >= talk.signaling_queue_max
            or queued_bytes(db, payload["to"]) + len(data) > SIGNALING_QUEUE_BYTES
        ):
            fail(429, "The recipient's signaling queue is full")
        talk.signaling_flow.take(("session", my_session), room_id, len(data))
        queue_signaling(db, payload["to"], my_session, data, now)
        woken.add(payload["to"])
    return woken


def signaling_messages(rq) -> list:
    """The `messages` parameter (form field or JSON body), else 400."""
    if not rq.has("messages"):
        fail(400, "Missing parameter messages")
    return parse_signaling_messages(rq.params["messages"])


def signaling_send(rq, token=None):
    """POST /signaling and /signaling/{token}: Send signaling messages."""
    refuse_internal_signaling(rq.talk)
    items = signaling_messages(rq)
    now, talk = rq.now, rq.talk
    with talk.db.write() as db:
        my_session, room_id = signaling_session(rq, db, token)
        if my_session is None:
            fail(404, "No session", [{"type": "usersInRoom", "data": []}])
        sender = session_by_id(db, my_session)
        touch_session(db, my_session, sender["participant_id"], now)
        woken = relay_signaling(talk, db, items, my_session, room_id, now)
    talk.notifier.notify(*(session_key(s) for s in woken))
    return []


@long_poll(lambda query: True)
def signaling_receive(rq, token=None):
    """GET /signaling and /signaling/{token}: Receive signaling messages (long-poll)."""
    talk = rq.talk
    refuse_internal_signaling(talk)
    gone = OCSError(404, "No session", [{"type": "usersInRoom", "data": []}])
    with talk.db.write() as db:
        my_session, room_id = signaling_session(rq, db, token)
        if my_session is None:
            raise gone
        touch_session(db, my_session, session_by_id(db, my_session)["participant_id"], rq.now)
    owner = ("signaling", my_session)
    with talk.notifier.listen(room_key(room_id), session_key(my_session), owner=owner) as waiter:
        with talk.db.read() as db:
            pending = has_signaling(db, my_session)
        if not pending:
            # Any wake-up answers: a message for us, a room event (the new
            # usersInRoom is the news), the timeout, the client gone, shutdown.
            talk.notifier.wait(waiter, SIGNALING_TIMEOUT, rq.wait_cancelled)
    now = rq.now
    with talk.db.write() as db:
        if session_by_id(db, my_session) is None:
            raise gone
        messages = take_signaling(db, my_session, now - SIGNALING_TTL)
        users = users_in_room(db, room_id, now - ACTIVE_SECONDS)
    answer = [{"type": "message", "data": data} for data in messages]
    answer.append({"type": "usersInRoom", "data": [user_in_room_json(u) for u in users]})
    return answer


# ---------------------------------------------------------------------------
# Routes, API v3 and v4 (today): Calls and internal signaling
# ---------------------------------------------------------------------------

# A signaling poll's answer when its session is gone (the apps read the list).
NO_USERS = [{"type": "usersInRoom", "data": []}]


def may_call(rq, db, room, me) -> bool:
    """Whether the caller may join a call: in `room` when given, else anywhere
    (users, and guests who joined a room). Only they get TURN credentials."""
    if room is None:
        return not rq.actor.is_guest or guest_has_session(db, rq.actor.guest_id)
    if me is None:  # a public room they may join, with its default permissions
        return room["type"] == ROOM_PUBLIC and bool(default_permissions(room) & PERM_CALL_JOIN)
    return bool(effective_permissions(room, me) & PERM_CALL_JOIN)


def signaling_settings_v3(rq):
    """GET /signaling/settings: Internal signaling, STUN and TURN servers (API v3)."""
    token = rq.text("token", "")
    with rq.talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, SEE) if token else (None, None)
        allowed = may_call(rq, db, room, me)
    stun, turn = ice_servers(rq.talk, rq.now)
    user_id = rq.actor.user_id
    # Internal: empty strings (the apps test `server` for emptiness to pick it).
    mode = external_signaling(rq, room)
    return {
        "signalingMode": mode["signalingMode"],
        "userId": user_id,
        "hideWarning": mode["hideWarning"],
        "server": mode["server"],
        "ticket": mode["ticket"],
        "helloAuthParams": {"1.0": {"userid": user_id, "ticket": mode["ticket"]}, "2.0": {"token": ""}},
        "stunservers": [{"urls": stun}] if stun else [],
        "turnservers": turn if allowed else [],
        "sipDialinInfo": "",
        "federation": None,
    }


def signaling_session_v3(rq, db, token, now):
    """The room, the caller's row and its session (seen now), else the 404 the apps expect."""
    room = room_by_token(db, token)
    me = participant_of(db, room["id"], rq.actor.user_id, rq.actor.guest_id) if room else None
    session = rq.own_session(db, me)
    if session is None:
        fail(404, "No session", NO_USERS)
    touch_session(db, session["id"], me["id"], now)
    return room, me, session


@long_poll(lambda query: True)
def signaling_pull(rq, token):
    """GET /signaling/{token}: Receive signaling messages (API v3 long-poll).

    The session is the one the device cookie names, else the caller's newest
    live one. Answers the queued messages at once, else waits until one
    comes, the room's participants change (refresh-participant-list) or 30 s
    pass; then always usersInRoom. A session gone meanwhile: 409 while the
    caller is still a participant (another join replaced it), else 404.
    """
    talk = rq.talk
    refuse_internal_signaling(talk)
    now = rq.now
    with talk.db.write() as db:
        room, me, session = signaling_session_v3(rq, db, token, now)
        expired = expire_calls(db, room, now)
    if expired:
        talk.room_changed(room["id"])
        talk.rooms.calls_expired(room["id"], expired)
    room_id, my_session = room["id"], session["id"]
    with talk.notifier.listen(room_key(room_id), session_key(my_session)) as waiter:
        with talk.db.read() as db:
            pending = has_signaling(db, my_session) or talk.room_news_for(my_session, room_id)
        if not pending:
            talk.notifier.wait(waiter, SIGNALING_TIMEOUT, rq.wait_cancelled)
    now = rq.now
    version = talk.room_version(room_id)
    with talk.db.write() as db:
        if session_by_id(db, my_session) is None:
            room = room_by_id(db, room_id)
            still = room is not None and participant_of(
                db, room_id, rq.actor.user_id, rq.actor.guest_id) is not None
            fail(409 if still else 404, "Session ended" if still else "No session", NO_USERS)
        touch_session(db, my_session, me["id"], now)
        messages = take_signaling(db, my_session, now - SIGNALING_TTL)
        room = room_by_id(db, room_id)
        users = live_sessions(db, room_id, now - CALL_TIMEOUT_SECONDS)
    talk.saw_room(my_session, version)
    answer = [{"type": "message", "data": data} for data in messages]
    answer.append(
        {"type": "usersInRoom", "data": [signaling_session_json(room, u, now) for u in users]}
    )
    return answer


def signaling_push(rq, token):
    """POST /signaling/{token}: Send signaling messages (API v3); `control` from moderators only."""
    refuse_internal_signaling(rq.talk)
    items = signaling_messages(rq)
    talk, now = rq.talk, rq.now
    with talk.db.write() as db:
        room, me, session = signaling_session_v3(rq, db, token, now)
        moderator = me["participant_type"] in MODERATOR_TYPES
        woken = relay_signaling(talk, db, items, session["id"], room["id"], now, moderator)
    talk.notifier.notify(*(session_key(s) for s in woken))
    return []


def call_flags_param(rq, name, default=None) -> int:
    """In-call flags: an integer of the bits 1, 2, 4 and 8, else 400."""
    flags = rq.integer(name, default, minimum=0, required=default is None)
    if flags & ~CALL_FLAGS_ALL:
        fail(400, f"{name} must be a combination of 1, 2, 4 and 8")
    return flags


def call_peers_v4(rq, token):
    """GET /call/{token}: Get the sessions in the call (API v4)."""
    now = rq.now
    with rq.talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, ROW)
        outside_lobby(room, me, now)
        rows = live_sessions(db, room["id"], now - CALL_TIMEOUT_SECONDS)
    return [call_peer_v4_json(row, room["token"]) for row in rows if call_flags_now(row, now)]


def call_join_v4(rq, token):
    """POST /call/{token}: Join the call with `flags` (default 7), `silent` (API v4)."""
    flags = call_flags_param(rq, "flags", CALL_FLAGS_DEFAULT)
    silent = rq.boolean("silent", False)
    rq.talk.rooms.join_call(rq.actor, token, rq.own_session, flags, silent)
    return []


def call_update_v4(rq, token):
    """PUT /call/{token}: Change the in-call flags (API v4)."""
    rq.talk.rooms.change_call_flags(rq.actor, token, rq.own_session, call_flags_param(rq, "flags"))
    return []


def call_leave_v4(rq, token):
    """DELETE /call/{token}: Leave the call; `all=true` ends it for everyone (moderators)."""
    everyone = rq.boolean("all", False)
    rq.talk.rooms.leave_call(rq.actor, token, rq.own_session, everyone)
    return []


# ---------------------------------------------------------------------------
# Routes, API v4 (today): Conversations
# ---------------------------------------------------------------------------


def with_talk_hash(rq) -> None:
    """X-Nextcloud-Talk-Hash: changes when capabilities or signaling settings do
    (iOS and nc-py-api refetch them then; nc-py-api requires the header)."""
    bottle.response.set_header("X-Nextcloud-Talk-Hash", rq.talk.config_hash)


def conversation_parts(rq, db, room, session_id=None) -> tuple[dict, sqlite3.Row | None]:
    """The Room for the caller, and the caller's attendee row (None: not in it).

    The caller's session is `session_id`, else the one its device cookie
    names, else its newest live one (SPEC 11).
    """
    now = rq.now
    rows = participants_of(db, room["id"])
    actor = rq.actor
    mine = next(
        (r for r in rows
         if (actor.user_id is not None and r["user_id"] == actor.user_id)
         or (actor.guest_id is not None and r["guest_id"] == actor.guest_id)),
        None,
    )
    my_session, unread = None, 0
    last = last_message_of(db, room, now)
    if mine is not None:
        if session_id is not None:
            own = sessions_of(db, mine["id"])
            my_session = next((s for s in own if s["id"] == session_id), None)
        else:
            my_session = rq.own_session(db, mine)
        unread = unread_count(room, mine)
    extras = {"last_message": last, "unread": unread}
    sessions = sessions_of_room(db, room["id"])
    return conversation_json(room, rows, sessions, actor, my_session, extras, now), mine


def conversation_answer(rq, db, room, session_id=None) -> dict:
    return conversation_parts(rq, db, room, session_id)[0]


def changed_since(room, answer, mine, since) -> bool:
    """GET /room?modifiedSince: new activity, a changed setting or own row, or a call."""
    return (
        answer["lastActivity"] >= since
        or room["modified"] >= since
        or (mine is not None and mine["modified"] >= since)
        or answer["hasCall"]
    )


def conversation_list(rq):
    """GET /room: Get user's conversations."""
    since = rq.integer("modifiedSince", 0, minimum=0)
    # Taken before the query: a change while it runs shows in the next list.
    bottle.response.set_header("X-Nextcloud-Talk-Modified-Before", str(rq.now))
    with_talk_hash(rq)
    include_status = rq.boolean("includeStatus", False)
    talk, now = rq.talk, rq.now
    # As on the 2018 route, an answer is reused until this process writes
    # anything or the second changes; the device names the caller's sessions.
    key = ("v4", rq.actor.user_id, rq.device(), since, include_status, talk.db.generation, now)

    def build():
        answers = []
        with talk.db.read() as db:
            for room in rooms_with(db, rq.actor.user_id):
                answer, mine = conversation_parts(rq, db, room)
                # With includeStatus every one-to-one room comes (its partner's status may change).
                one_to_one = include_status and room["type"] == ROOM_ONE_TO_ONE
                if not since or one_to_one or changed_since(room, answer, mine, since):
                    answers.append(answer)
            if include_status:
                add_statuses(db, answers, now)
        return answers

    return shared_answer(talk.room_lists, key, build)


def add_statuses(db, answers, now) -> None:
    """includeStatus: the partner's status fields on one-to-one Rooms (user_status app)."""
    partners = [a["name"] for a in answers if a["type"] == ROOM_ONE_TO_ONE]
    statuses = statuses_of(db, partners, now)
    for answer in answers:
        if answer["type"] == ROOM_ONE_TO_ONE and answer["name"] in statuses:
            answer.update(statuses[answer["name"]])


def conversation_name(rq, required) -> str:
    name = room_name(rq.params.get("roomName"), ROOM_NAME_MAX_V4) or ""
    if required and not name:
        fail(400, f"roomName must be 1 to {ROOM_NAME_MAX_V4} characters")
    return name


def conversation_create(rq):
    """POST /room: Creating a new conversation."""
    room_type = rq.integer("roomType")
    if room_type not in ROOM_TYPES_V4:
        fail(400, "roomType must be 1, 2, 3 or 6")
    invite = rq.text("invite", "")
    source = rq.text("source", "") or ("users" if room_type == ROOM_ONE_TO_ONE else "groups")
    if invite and source not in ("users", "groups"):
        fail(400, "source must be users or groups")
    name = conversation_name(rq, required=room_type == ROOM_PUBLIC or (
        room_type == ROOM_GROUP and not invite))
    password = rq.text("password", "")
    if password and room_type != ROOM_PUBLIC:
        fail(400, "Only public conversations can have a password")
    room, created = rq.talk.rooms.create(rq.actor, room_type, name, invite)
    if created and password:
        room = rq.talk.rooms.set_password(rq.actor, room["token"], password)
    with_talk_hash(rq)
    with rq.talk.db.read() as db:
        answer = conversation_answer(rq, db, room_by_id(db, room["id"]))
    return Reply(201 if created else 200, answer)


def conversation_get(rq, token):
    """GET /room/{token}: Get a single conversation (also for guests)."""
    rq.talk.expire_guests(token)
    with_talk_hash(rq)
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, SEE)
        return conversation_answer(rq, db, room)


def conversation_rename(rq, token):
    """PUT /room/{token}: Rename a conversation."""
    rq.talk.rooms.rename(rq.actor, token, rq.params.get("roomName"), ROOM_NAME_MAX_V4)
    return []


def conversation_delete(rq, token):
    """DELETE /room/{token}: Delete a conversation; a one-to-one is 400 (leave it)."""
    rq.talk.rooms.delete(rq.actor, token, one_to_one=False)
    return []


def conversation_description(rq, token):
    """PUT /room/{token}/description: Set the description."""
    description = (rq.text("description", "") or "").strip()
    if len(description) > DESCRIPTION_MAX:
        fail(400, f"The description is longer than {DESCRIPTION_MAX} characters")
    types = (ROOM_GROUP, ROOM_PUBLIC, ROOM_NOTE_TO_SELF)
    rq.talk.rooms.set_setting(rq.actor, token, "description", description, types)
    return []


def conversation_make_public(rq, token):
    """POST /room/{token}/public: Allow guests."""
    rq.talk.rooms.make_public(rq.actor, token, types=(ROOM_GROUP, ROOM_PUBLIC))
    return []


def choice(rq, name, allowed, default=None) -> int:
    value = rq.integer(name, default, required=default is None)
    if value not in allowed:
        fail(400, f"{name} must be one of {', '.join(map(str, allowed))}")
    return value


def conversation_read_only(rq, token):
    """PUT /room/{token}/read-only: Set read-only (state 0 or 1)."""
    rq.talk.rooms.set_setting(rq.actor, token, "read_only", choice(rq, "state", (0, 1)))
    return []


def conversation_listable(rq, token):
    """PUT /room/{token}/listable: Who may find it (scope 0 none, 1 users, 2 everyone)."""
    scope = choice(rq, "scope", (LISTABLE_NONE, LISTABLE_USERS, LISTABLE_ALL))
    rq.talk.rooms.set_setting(rq.actor, token, "listable", scope)
    return []


def conversation_favorite(rq, token):
    """POST /room/{token}/favorite: Add to favorites."""
    rq.talk.rooms.set_own(rq.actor, token, "favorite", 1)
    return []


def conversation_unfavorite(rq, token):
    """DELETE /room/{token}/favorite: Remove from favorites."""
    rq.talk.rooms.set_own(rq.actor, token, "favorite", 0)
    return []


def conversation_notify(rq, token):
    """POST /room/{token}/notify: Set the chat notification level (0-3)."""
    level = choice(rq, "level", (NOTIFY_DEFAULT, NOTIFY_ALWAYS, NOTIFY_MENTION, NOTIFY_NEVER))
    rq.talk.rooms.set_own(rq.actor, token, "notification_level", level)
    return []


def conversation_notify_calls(rq, token):
    """POST /room/{token}/notify-calls: Set the call notification level (0 or 1)."""
    rq.talk.rooms.set_own(rq.actor, token, "notification_calls", choice(rq, "level", (0, 1)))
    return []


def conversation_lobby(rq, token):
    """PUT /room/{token}/webinar/lobby: Set the lobby state (0, 1) and timer."""
    state = choice(rq, "state", (LOBBY_NONE, LOBBY_NON_MODERATORS))
    timer = rq.integer("timer", 0, minimum=0)
    rq.talk.rooms.set_lobby(rq.actor, token, state, timer)
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, SEE)
        return conversation_answer(rq, db, room)


def permission_bits(rq, name="permissions") -> int:
    value = rq.integer(name, required=True, minimum=0)
    if value > PERMISSIONS_ALL | PERM_CUSTOM:
        fail(400, f"{name} must be a combination of the permission bits (at most 255)")
    return value


def conversation_permissions(rq, token, mode):
    """PUT /room/{token}/permissions/{mode}: Set default or call permissions."""
    if mode not in ("default", "call"):
        fail(400, "mode must be default or call")
    permissions = permission_bits(rq)
    if permissions:
        permissions |= PERM_CUSTOM  # a set that is not "the default" is custom
    column = "default_permissions" if mode == "default" else "call_permissions"
    rq.talk.rooms.set_setting(rq.actor, token, column, permissions)
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, SEE)
        return conversation_answer(rq, db, room)


def conversation_message_expiration(rq, token):
    """POST /room/{token}/message-expiration: Messages expire after `seconds` (0: never)."""
    seconds = rq.integer("seconds", required=True, minimum=0)
    types = (ROOM_ONE_TO_ONE, ROOM_GROUP, ROOM_PUBLIC, ROOM_NOTE_TO_SELF)
    rq.talk.rooms.set_setting(rq.actor, token, "message_expiration", seconds, types)
    return []


def conversation_listed(rq):
    """GET /listed-room: Find listed conversations the caller is not in."""
    search = rq.text("searchTerm", "") or ""
    with rq.talk.db.read() as db:
        rooms = listed_rooms(db, rq.actor.user_id, search, (LISTABLE_USERS, LISTABLE_ALL))
        return [conversation_answer(rq, db, room) for room in rooms]


# ---------------------------------------------------------------------------
# Routes, API v4 (today): Participants
# ---------------------------------------------------------------------------


def attendee_list(rq, token):
    """GET /room/{token}/participants: Get the attendees and their sessions."""
    rq.talk.expire_guests(token)
    with rq.talk.db.read() as db:
        room, me = room_for(db, rq.actor, token, ROW)
        if rq.actor.is_guest:
            fail(403, "Guests cannot list the participants")
        if lobby_active(room, rq.now) and not (
            effective_permissions(room, me) & PERM_LOBBY_IGNORE
        ):
            fail(412, "The lobby is active")
        rows = participants_of(db, room["id"])
        sessions = sessions_of_room(db, room["id"])
        answer = [attendee_json(room, row, sessions, rq.now) for row in rows]
        if rq.boolean("includeStatus", False):
            statuses = statuses_of(db, [r["actorId"] for r in answer if r["actorType"] == "users"], rq.now)
            for row in answer:
                if row["actorType"] == "users":
                    row.update(statuses.get(row["actorId"], {}))
    return answer


def attendee_add(rq, token):
    """POST /room/{token}/participants: Add a user or the members of a group."""
    new = rq.text("newParticipant", "")
    source = rq.text("source", "users")
    if source == "users":
        rq.talk.rooms.add_user(rq.actor, token, new, convert_one_to_one=False)
    elif source == "groups":
        rq.talk.rooms.add_group(rq.actor, token, new)
    else:
        fail(400, "source must be users or groups")
    return []


def attendee_remove(rq, token):
    """DELETE /room/{token}/attendees: Remove an attendee by attendeeId."""
    attendee_id = rq.integer("attendeeId", required=True)
    rq.talk.rooms.remove(rq.actor, token, by_attendee(attendee_id), one_to_one_deletes=False)
    return []


def attendee_remove_self(rq, token):
    """DELETE /room/{token}/participants/self: Leave a conversation for good."""
    rq.talk.rooms.remove_self(rq.actor, token, keep_a_moderator=True)
    return []


def attendee_join(rq, token):
    """POST /room/{token}/participants/active: Join (a new session for this device)."""
    address = client_address(bottle.request.environ)
    force = rq.boolean("force", True)
    room, session_id = rq.talk.rooms.join(
        rq.actor, token, rq.text("password", ""), rq.guest_id, address,
        device=rq.device(create=True), force=force,
    )
    with rq.talk.db.read() as db:
        return conversation_answer(rq, db, room_by_id(db, room["id"]), session_id)


def attendee_leave(rq, token):
    """DELETE /room/{token}/participants/active: Leave (this device's session ends)."""
    with rq.talk.db.read() as db:
        _, me = room_for(db, rq.actor, token, SEE)
        session = rq.own_session(db, me)
    if session is not None:
        rq.talk.rooms.leave(rq.actor, token, session["id"])
    return []


def attendee_promote(rq, token):
    """POST /room/{token}/moderators: Promote an attendee to moderator."""
    rq.talk.rooms.promote(rq.actor, token, by_attendee(rq.integer("attendeeId", required=True)))
    return []


def attendee_demote(rq, token):
    """DELETE /room/{token}/moderators: Demote a moderator."""
    rq.talk.rooms.demote(rq.actor, token, by_attendee(rq.integer("attendeeId", required=True)))
    return []


def attendee_permissions(rq, token):
    """PUT /room/{token}/attendees/permissions: Set, add or remove an attendee's permissions."""
    attendee_id = rq.integer("attendeeId", required=True)
    method = rq.text("method", "set")
    if method not in ("set", "add", "remove"):
        fail(400, "method must be set, add or remove")
    rq.talk.rooms.set_attendee_permissions(
        rq.actor, token, attendee_id, method, permission_bits(rq)
    )
    return []


# ---------------------------------------------------------------------------
# Routes: Bots (spreed docs/bots.md, lib/Controller/BotController.php)
# ---------------------------------------------------------------------------


def bot_id_of(value) -> int:
    """A bot id from the URL; 0 (no such bot) unless digits, as PHP's (int)."""
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value or "") else 0


def bot_admin_list(rq):
    """GET /bot/admin: Every installed bot with its details (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        return [bot_admin_json(bot) for bot in list_bots(db)]


def bot_list(rq, token):
    """GET /bot/{token}: The bots moderators may set up here, and their state."""
    bots, here = rq.talk.rooms.bots(rq.actor, token)
    shown = (bot_json(bot, bot["id"] in here) for bot in bots)
    return [bot for bot in shown if bot is not None]


def bot_enable(rq, token, bot_id):
    """POST /bot/{token}/{botId}: Set a bot up in the conversation (201; 200 when it was)."""
    bot, created = rq.talk.rooms.switch_bot(rq.actor, token, bot_id_of(bot_id), enable=True)
    return Reply(201 if created else 200, bot_json(bot, True))


def bot_disable(rq, token, bot_id):
    """DELETE /bot/{token}/{botId}: Remove a bot from the conversation."""
    bot, _ = rq.talk.rooms.switch_bot(rq.actor, token, bot_id_of(bot_id), enable=False)
    return bot_json(bot, False)


def signed_bot(rq, token, text):
    """The room and the bot that signed `text` (BotController::getBotFromHeaders).

    X-Nextcloud-Talk-Bot-Signature is the HMAC of the random and only the
    message or reaction text (docs/bots.md says the body; Talk's code and
    every client sign the text). 400 for a short random or no signature;
    401, counted towards the address's 429, unless a bot enabled in the
    room with the response feature signed it. A random may come again:
    nc-py-api and others do not vary it reliably.
    """
    request = bottle.request
    random = request.get_header("X-Nextcloud-Talk-Bot-Random", "")
    signature = request.get_header("X-Nextcloud-Talk-Bot-Signature", "").lower()
    if len(random) < BOT_RANDOM_MIN:
        fail(400, f"X-Nextcloud-Talk-Bot-Random must be at least {BOT_RANDOM_MIN} characters")
    if not signature:
        fail(400, "X-Nextcloud-Talk-Bot-Signature is missing")
    with rq.talk.db.read() as db:
        room = room_by_token(db, token)
        bots = bots_in_room(db, room["id"]) if room is not None else []
    attempt = rq.talk.bot_throttle.begin(address_key(client_address(request.environ)))
    for bot in bots:
        if bot["features"] & BOT_RESPONSE and hmac.compare_digest(
            bot_signature(bot["secret"], random, text), signature
        ):
            rq.talk.bot_throttle.succeeded(attempt, proven=attempt)
            return room, bot
    fail(401, "No enabled bot of this conversation signed the request")


def bot_message(rq, token):
    """POST /bot/{token}/message: A bot writes (message, replyTo, referenceId, silent)."""
    rq.talk.bot_throttle.check(address_key(client_address(bottle.request.environ)))
    message = rq.text("message", "") or ""
    if not message.strip():
        fail(400, "The message is empty")
    reference_id = rq.text("referenceId", "") or ""
    if len(reference_id) > REFERENCE_ID_MAX:
        fail(400, f"referenceId is longer than {REFERENCE_ID_MAX} characters")
    reply_to = rq.integer("replyTo", 0, minimum=0)  # nc-py-api sends the id as a string
    silent = rq.boolean("silent", False)
    room, bot = signed_bot(rq, token, message)
    now = rq.now
    with rq.talk.db.write() as db:
        room = room_by_id(db, room["id"])
        if room is None:
            fail(404, "Room not found")
        parent = message_by_id(db, reply_to) if reply_to else None
        if reply_to and (
            parent is None or parent["room_id"] != room["id"]
            or parent["message_type"] != "comment" or parent["verb"]
        ):
            fail(400, "replyTo must be a message of this conversation")
        if len(message) > MESSAGE_MAX:
            fail(413, f"The message is longer than {MESSAGE_MAX} characters")
        parameters, users, everyone = parse_mentions(db, room, message)
        expires = now + room["message_expiration"] if room["message_expiration"] else 0
        row = add_message(
            db, room["id"], "bots", bot_actor_id(bot), message, now, parameters=parameters,
            actor_name=bot_display_name(bot), reference_id=reference_id, parent_id=reply_to,
            silent=silent, expires=expires,
        )
        mark_mentions(db, room["id"], row["id"], users, everyone, 0)
    if expires:
        rq.talk.expire_at(expires)
    rq.talk.chat_posted(room["id"], row)
    return Reply(201, None)


def bot_reaction_change(rq, token, message_id, add):
    """A bot's reaction: signed like a message, over the reaction text."""
    rq.talk.bot_throttle.check(address_key(client_address(bottle.request.environ)))
    text = rq.text("reaction", "") or ""
    room, bot = signed_bot(rq, token, text)
    message_id = message_id_of(message_id)
    reaction = checked_reaction(text)
    author = ("bots", bot_actor_id(bot), bot_display_name(bot))
    now = rq.now
    with rq.talk.db.write() as db:
        row = message_by_id(db, message_id)
        if row is None or row["room_id"] != room["id"]:
            fail(404, "Message not found")
        if row["message_type"] != "comment" or row["verb"]:
            fail(400 if add else 404, "Only chat messages take reactions")
        system = apply_reaction(db, room, message_id, reaction, author, now, add)
        if system is None and not add:
            fail(404, "Reaction not found")
    if system is not None:
        rq.talk.chat_posted(room["id"], system, changed=True)
    return Reply(201 if add and system is not None else 200, None)


def bot_react(rq, token, message_id):
    """POST /bot/{token}/reaction/{messageId}: A bot reacts (201; 200 when it had)."""
    return bot_reaction_change(rq, token, message_id, add=True)


def bot_unreact(rq, token, message_id):
    """DELETE /bot/{token}/reaction/{messageId}: A bot takes its reaction back."""
    return bot_reaction_change(rq, token, message_id, add=False)


# ---------------------------------------------------------------------------
# Routes: the High-Performance Backend's requests (SignalingController::backend)
# ---------------------------------------------------------------------------


def hpb_error(code: str, message: str) -> dict:
    """A refusal the signaling server reads (always with HTTP 200, as Talk)."""
    return {"type": "error", "error": {"code": code, "message": message}}


def hpb_signed(talk, environ, raw) -> bool:
    """Whether the signaling server signed this body (validateBackendRequest): a
    Spreed-Signaling-Random of at least 32 characters and the checksum over it
    and the raw body. Never without a secret: an empty one would sign for anyone."""
    random = environ.get("HTTP_SPREED_SIGNALING_RANDOM", "")
    checksum = environ.get("HTTP_SPREED_SIGNALING_CHECKSUM", "").lower()
    if not talk.signaling_secret or raw is None or len(random) < HPB_RANDOM_MIN or not checksum:
        return False
    return hmac.compare_digest(signaling_checksum(talk.signaling_secret, random, raw), checksum)


def hpb_string(request, name) -> str:
    """A text field of a backend request ("" when missing or null), else ValueError."""
    value = request.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def hpb_auth(rq, auth) -> dict:
    """auth: is the ticket of a hello v1 good for the user (or a guest: no user id)?"""
    params = auth.get("params")
    if not isinstance(params, dict):
        raise ValueError("auth.params must be an object")
    user_id, ticket = hpb_string(params, "userid"), hpb_string(params, "ticket")
    if not ticket_valid(rq.talk, user_id, ticket, rq.now):
        return hpb_error("invalid_ticket", "The given ticket is not valid for this user.")
    answer = {"type": "auth", "auth": {"version": "1.0"}}
    if user_id:
        with rq.talk.db.read() as db:
            user = get_user(db, user_id)
        if user is None or not user["enabled"]:
            return hpb_error("no_such_user", "The given user does not exist.")
        answer["auth"]["userid"] = user["id"]
        answer["auth"]["user"] = {"displayname": user["display_name"]}
    return answer


def hpb_room(rq, request) -> dict:
    """room: may this Talk session (of this user) join the room, with which
    permissions? Or it leaves (action "leave")."""
    token, session_id = hpb_string(request, "roomid"), hpb_string(request, "sessionid")
    user_id, action = hpb_string(request, "userid"), hpb_string(request, "action") or "join"
    if action not in ("join", "leave"):
        raise ValueError("action must be join or leave")
    found = rq.talk.rooms.backend_room(token, user_id, session_id, leave=action == "leave")
    if found is None:  # the same answer for no room and no such attendee: nothing leaks
        return hpb_error("no_such_room", "The user is not invited to this room.")
    room, row = found
    with rq.talk.db.read() as db:
        properties = signaling_properties(db, room, user_id)
    return {"type": "room", "room": {
        "version": "1.0", "roomid": room["token"], "properties": properties,
        "permissions": backend_permissions(room, row),
    }}


def hpb_ping(rq, ping) -> dict:
    """ping: the sessions the signaling server holds in a room are alive."""
    entries = ping.get("entries")
    if not isinstance(entries, list) or len(entries) > HPB_PING_MAX:
        raise ValueError(f"ping.entries must be a list of at most {HPB_PING_MAX} objects")
    if not all(isinstance(entry, dict) for entry in entries):
        raise ValueError("ping.entries must be a list of objects")
    sessions = [hpb_string(entry, "sessionid") for entry in entries]
    rq.talk.rooms.backend_ping([s for s in sessions if s and s != "0"])
    return {"type": "room", "room": {"version": "1.0"}}


HPB_REQUESTS = {"auth": hpb_auth, "room": hpb_room, "ping": hpb_ping}


def signaling_backend(rq, api):
    """POST /signaling/backend: The signaling server asks (auth, room, ping), signed.

    Always 200 (Talk's "sorry about that"); a refusal is an error object. A
    bad checksum counts towards the address's 429, as Talk's brute-force
    protection does; junk the checksum vouches for is refused, never a 500.
    """
    talk = rq.talk
    environ = bottle.request.environ
    address = address_key(client_address(environ))
    talk.hpb_throttle.check(address)
    try:
        raw = read_raw_body(environ, talk.max_body)
    except OCSError:  # too large (or no length): it cannot be checked
        raw = None
    if not hpb_signed(talk, environ, raw):
        talk.hpb_throttle.begin(address)
        return hpb_error("invalid_request", "The request could not be authenticated.")
    try:
        message = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        message = None
    kind = message.get("type") if isinstance(message, dict) else None
    if not isinstance(kind, str) or kind not in HPB_REQUESTS:
        shown = raw.decode("utf-8", "replace")[:200]
        return hpb_error("unknown_type", f"The given type {shown} is not supported.")
    try:
        if not isinstance(message.get(kind), dict):
            raise ValueError(f"{kind} must be an object")
        return HPB_REQUESTS[kind](rq, message[kind])
    except ValueError as error:
        return hpb_error("invalid_request", str(error))


# ---------------------------------------------------------------------------
# Routes: Capabilities, status and accounts (SPEC 1.1, 8, 9)
# ---------------------------------------------------------------------------


def capabilities_document(talk) -> dict:
    """The capabilities of both API generations; also the source of the Talk hash."""
    major, minor, micro, _ = NEXTCLOUD_VERSION
    return {
        "version": {
            "major": major,
            "minor": minor,
            "micro": micro,
            "string": f"{major}.{minor}.{micro}",
            "edition": "",
            "extendedSupport": False,
            "productname": "talk-server",
            "talk-server": __version__,
        },
        "capabilities": {
            "core": {"pollinterval": 60, "webdav-root": "remote.php/webdav"},
            "user_status": {"enabled": True, "restore": False, "supports_emoji": True},
            "spreed": {
                "features": list(FEATURES),
                "features-local": [],
                "config-local": {},
                "version": SPREED_VERSION,
                "config": {
                    "attachments": {"allowed": False},
                    "call": {
                        "enabled": True,
                        "breakout-rooms": False,
                        "recording": False,
                        "recording-consent": 0,
                        "supported-reactions": [],
                        "predefined-backgrounds": [],
                        "can-upload-background": False,
                        "sip-enabled": False,
                        "sip-dialout-enabled": False,
                        "can-enable-sip": False,
                        "start-without-media": False,
                        "max-duration": 0,
                        "blur-virtual-background": False,
                    },
                    "chat": {
                        "max-length": MESSAGE_MAX,
                        "read-privacy": 0,
                        "has-translation-providers": False,
                        "typing-privacy": 1,
                        "summary-threshold": 100,
                    },
                    "conversations": {"can-create": True},
                    "previews": {"max-gif-size": 3145728},
                    "federation": {
                        "enabled": False,
                        "incoming-enabled": False,
                        "outgoing-enabled": False,
                        "only-trusted-servers": True,
                    },
                    "signaling": {"session-ping-limit": 200},
                },
            },
        },
    }


def config_hash(talk) -> str:
    """X-Nextcloud-Talk-Hash: a digest of the capabilities and signaling settings."""
    settings = [capabilities_document(talk), talk.stun_servers, talk.turn_server,
                talk.signaling_servers]
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def capabilities(rq):
    """GET /cloud/capabilities: what this server can do."""
    return capabilities_document(rq.talk)


def status_php():
    """GET /status.php: the plain JSON that mobile apps probe."""
    bottle.response.content_type = "application/json; charset=utf-8"
    return json.dumps(
        {
            "installed": True,
            "maintenance": False,
            "needsDbUpgrade": False,
            "version": ".".join(map(str, NEXTCLOUD_VERSION)),
            "versionstring": ".".join(map(str, NEXTCLOUD_VERSION[:3])),
            "edition": "",
            "productname": "talk-server",
        }
    )


def client_csp(talk) -> str:
    """CLIENT_CSP; with external signaling the page may also open WebSockets to
    the signaling servers (connect-src), and to nothing else."""
    sockets = set()
    for url in talk.signaling_servers:
        parts = urlsplit(url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        sockets.add(f"{scheme}://{parts.netloc}")
    if not sockets:
        return CLIENT_CSP
    return CLIENT_CSP + "; connect-src 'self' " + " ".join(sorted(sockets))


def static_file(path="index.html"):
    """GET / and /static/...: the browser client; revalidated on every load."""
    try:
        root = data_path("static")
    except FileNotFoundError:
        return bottle.HTTPError(404, "The browser client is not installed")
    answer = bottle.static_file(path, root=str(root))
    answer.set_header("Cache-Control", "no-cache")
    # The client's own scripts, styles and API only; no framing (clickjacking).
    answer.set_header("Content-Security-Policy", client_csp(bottle.request.app.talk))
    answer.set_header("X-Content-Type-Options", "nosniff")
    answer.set_header("Referrer-Policy", "no-referrer")  # room tokens live in URLs
    return answer


def require_admin(rq, db):
    if not is_admin(db, rq.actor.user_id):
        fail(403, "Only administrators may do this")


def existing_user(db, user_id):
    row = get_user(db, user_id)
    if row is None:
        fail(404, "User not found")
    return row


def existing_group(db, group_id):
    if not group_exists(db, group_id):
        fail(404, "Group not found")


def valid_id(value, what):
    if not value or not ID_PATTERN.fullmatch(value):
        fail(400, f"Invalid {what}: use 1-64 of letters, digits, space and _.@'-")
    return value


def paged(rq, items: list) -> list:
    """The slice of `items` that the `offset` and `limit` parameters ask for."""
    offset = rq.integer("offset", 0, minimum=0)
    limit = rq.integer("limit", None, minimum=0)
    items = items[offset:]
    return items if limit is None else items[:limit]


def cloud_me(rq):
    """GET /cloud/user: the signed-in user."""
    with rq.talk.db.read() as db:
        return user_json(db, existing_user(db, rq.actor.user_id))


def cloud_users(rq):
    """GET /cloud/users: list users (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        rows = list_users(db, rq.text("search", ""))
    return {"users": paged(rq, [row["id"] for row in rows])}


def cloud_users_details(rq):
    """GET /cloud/users/details: list users with their details (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        ids = paged(rq, [row["id"] for row in list_users(db, rq.text("search", ""))])
        return {"users": {user_id: user_json(db, get_user(db, user_id)) for user_id in ids}}


def cloud_user_add(rq):
    """POST /cloud/users: create a user (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)  # before any validation (SPEC 9)
    user_id = valid_id(rq.text("userid", ""), "user id")
    password = rq.text("password", "")
    if not password:
        fail(400, "A password is required")
    display_name = rq.text("displayName", "") or rq.text("displayname", "") or user_id
    password_hash = rq.talk.credentials.hash(password)
    with rq.talk.db.write() as db:
        if get_user(db, user_id) is not None:
            fail(400, "User already exists", v1_code=102)
        create_user(db, user_id, password_hash, display_name)
    return {"id": user_id}


def cloud_user_get(rq, userid):
    """GET /cloud/users/{userid}: one user (administrators, or the user itself)."""
    with rq.talk.db.read() as db:
        if userid != rq.actor.user_id:
            require_admin(rq, db)
        return user_json(db, existing_user(db, userid))


def cloud_user_edit(rq, userid):
    """PUT /cloud/users/{userid}: set displayname or password (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)  # before any validation (SPEC 9)
        existing_user(db, userid)
    key, value = rq.text("key", ""), rq.text("value", "")
    if key not in ("displayname", "display", "password"):
        fail(400, "key must be displayname or password", v1_code=103)
    if not value:
        fail(400, "value must not be empty", v1_code=102)
    password_hash = rq.talk.credentials.hash(value) if key == "password" else None
    with rq.talk.db.write() as db:
        existing_user(db, userid)
        if password_hash:
            set_password_hash(db, userid, password_hash)
        else:
            set_display_name(db, userid, value.strip()[:64] or userid)
    rq.talk.credentials.forget(userid)
    return []


def set_enabled(rq, userid, enabled: bool):
    """Enable or disable a user (administrators). As Nextcloud, nobody may
    change themselves (statuscode 101): an administrator cannot lock
    themselves out."""
    with rq.talk.db.write() as db:
        require_admin(rq, db)
        if userid == rq.actor.user_id:
            fail(400, "You cannot enable or disable yourself", v1_code=101)
        existing_user(db, userid)
        set_user_enabled(db, userid, enabled)
    rq.talk.credentials.forget(userid)
    return []


def cloud_user_enable(rq, userid):
    """PUT /cloud/users/{userid}/enable: let a disabled user sign in again (administrators)."""
    return set_enabled(rq, userid, True)


def cloud_user_disable(rq, userid):
    """PUT /cloud/users/{userid}/disable: refuse a user's every credential (administrators)."""
    return set_enabled(rq, userid, False)


def cloud_user_delete(rq, userid):
    """DELETE /cloud/users/{userid}: delete a user and their rooms (administrators).

    As Nextcloud, an administrator cannot delete themselves (statuscode 101):
    the last one would lock administration out."""
    with rq.talk.db.write() as db:
        require_admin(rq, db)
        if userid == rq.actor.user_id:
            fail(400, "You cannot delete yourself", v1_code=101)
        existing_user(db, userid)
        rooms = delete_user(db, userid)
    rq.talk.credentials.forget(userid)
    rq.talk.rooms.user_deleted(userid, rooms)
    return []


def cloud_user_groups(rq, userid):
    """GET /cloud/users/{userid}/groups: a user's groups (administrators, or the user)."""
    with rq.talk.db.read() as db:
        if userid != rq.actor.user_id:
            require_admin(rq, db)
        existing_user(db, userid)
        return {"groups": groups_of(db, userid)}


def cloud_user_group_add(rq, userid):
    """POST /cloud/users/{userid}/groups: add a user to a group (administrators)."""
    with rq.talk.db.write() as db:
        require_admin(rq, db)
        group_id = rq.text("groupid", "")
        existing_user(db, userid)
        existing_group(db, group_id)
        add_to_group(db, group_id, userid)
    return []


def cloud_user_group_remove(rq, userid):
    """DELETE /cloud/users/{userid}/groups: remove a user from a group (administrators).

    As Nextcloud, nobody leaves group admin themselves (statuscode 105), so
    the last administrator stays one."""
    with rq.talk.db.write() as db:
        require_admin(rq, db)
        group_id = rq.text("groupid", "")
        existing_user(db, userid)
        existing_group(db, group_id)
        if userid == rq.actor.user_id and group_id == ADMIN_GROUP:
            fail(400, "You cannot remove yourself from the admin group", v1_code=105)
        remove_from_group(db, group_id, userid)
    return []


def cloud_groups(rq):
    """GET /cloud/groups: list groups (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        return {"groups": paged(rq, list_groups(db, rq.text("search", "")))}


def cloud_groups_details(rq):
    """GET /cloud/groups/details: list groups with member counts (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        rows = paged(rq, list_groups_with_counts(db, rq.text("search", "")))
    return {
        "groups": [
            {
                "id": row["id"],
                "displayname": row["id"],
                "usercount": row["user_count"],
                "disabled": 0,
                "canAdd": True,
                "canRemove": True,
            }
            for row in rows
        ]
    }


def cloud_group_add(rq):
    """POST /cloud/groups: create a group (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)  # before any validation (SPEC 9)
    group_id = valid_id(rq.text("groupid", ""), "group id")
    with rq.talk.db.write() as db:
        if group_exists(db, group_id):
            fail(400, "Group already exists", v1_code=102)
        create_group(db, group_id)
    return []


def cloud_group_get(rq, groupid):
    """GET /cloud/groups/{groupid}: a group's members (administrators)."""
    with rq.talk.db.read() as db:
        require_admin(rq, db)
        existing_group(db, groupid)
        return {"users": group_members(db, groupid)}


def cloud_group_delete(rq, groupid):
    """DELETE /cloud/groups/{groupid}: delete a group (administrators)."""
    with rq.talk.db.write() as db:
        require_admin(rq, db)
        if groupid == ADMIN_GROUP:
            fail(403, "The admin group cannot be deleted")
        existing_group(db, groupid)
        delete_group(db, groupid)
    return []


# ---------------------------------------------------------------------------
# Routes: Sign-in for apps (app passwords, sign-in page, login flows)
# ---------------------------------------------------------------------------

# The OCS part (/ocs/v{1,2}.php/core/...) runs through ocs_callback like every
# OCS route. The /index.php pages are HTML forms that work without
# JavaScript; page_callback gives them their errors as HTML pages (the login
# flow v2 start and poll answer JSON). Their CSRF defence: the sign-in form
# carries a token derived from a pre-session cookie, every later form the
# web session's own token.


def client_name(environ) -> str:
    """What an app password is named after: the client's User-Agent (as Nextcloud)."""
    agent = environ.get("HTTP_USER_AGENT", "").strip()
    return agent[:APP_PASSWORD_NAME_MAX] or "unknown"


def base_url(environ) -> str:
    """This server's URL as the client reached it. The scheme is Waitress's,
    which believes X-Forwarded-Proto only from a trusted proxy."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST", "")
    if not re.fullmatch(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?", host):
        host = f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
    return f"{scheme}://{host}"


def create_app_password(talk, user_id: str, name: str) -> tuple[int, str]:
    """A new app password for `user_id`: (its id, the password, shown only now)."""
    password = new_secret(APP_PASSWORD_LENGTH)
    token_hash = keyed_hash(talk.signin_key, "app-password", password)
    with talk.db.write() as db:
        password_id = add_app_password(db, user_id, name, token_hash, int(talk.clock()))
    return password_id, password


def require_credential(rq, *kinds):
    """403 unless the caller signed in with one of `kinds` (AppPasswordController)."""
    if rq.actor.credential not in kinds:
        if rq.actor.credential == APP_PASSWORD:
            fail(403, "Not allowed with an app password; use the login password")
        fail(403, "Only allowed with an app password")


def core_get_app_password(rq):
    """GET /core/getapppassword: trade the login password for an app password."""
    require_credential(rq, PASSWORD, WEB)
    _, password = create_app_password(rq.talk, rq.actor.user_id, client_name(bottle.request.environ))
    return {"apppassword": password}


def core_delete_app_password(rq):
    """DELETE /core/apppassword: revoke the app password this request uses."""
    require_credential(rq, APP_PASSWORD)
    with rq.talk.db.write() as db:
        delete_app_password(db, rq.actor.user_id, rq.actor.app_password_id)
    return []


def core_rotate_app_password(rq):
    """POST /core/apppassword/rotate: replace the app password in use by a new one."""
    require_credential(rq, APP_PASSWORD)
    password = new_secret(APP_PASSWORD_LENGTH)
    with rq.talk.db.write() as db:
        token_hash = keyed_hash(rq.talk.signin_key, "app-password", password)
        set_app_password_hash(db, rq.actor.app_password_id, token_hash)
    return {"apppassword": password}


def core_list_app_passwords(rq):
    """GET /core/apppasswords: the caller's app passwords (talk-server's own API)."""
    with rq.talk.db.read() as db:
        return [app_password_json(row) for row in app_passwords_of(db, rq.actor.user_id)]


def core_create_app_password(rq):
    """POST /core/apppasswords: a new named app password (talk-server's own API)."""
    require_credential(rq, PASSWORD, WEB)
    name = (rq.text("name", "") or "").strip()
    if not 1 <= len(name) <= APP_PASSWORD_NAME_MAX:
        fail(400, f"name must be 1-{APP_PASSWORD_NAME_MAX} characters")
    password_id, password = create_app_password(rq.talk, rq.actor.user_id, name)
    return {"id": password_id, "name": name, "apppassword": password}


def core_revoke_app_password(rq, password_id):
    """DELETE /core/apppasswords/{id}: revoke one of the caller's app passwords."""
    if not re.fullmatch(r"\d{1,18}", password_id):
        fail(404, "App password not found")
    with rq.talk.db.write() as db:
        if not delete_app_password(db, rq.actor.user_id, int(password_id)):
            fail(404, "App password not found")
    return []


# --- The sign-in pages -------------------------------------------------------


class PageCall(Call):
    """A request to an /index.php page: a Call plus the browser's web session row."""

    def __init__(self, talk, actor, params, session):
        super().__init__(talk, actor, params, 2)
        self.session = session


def page(title: str, body: str) -> str:
    """A whole HTML page: no script, no style, no external URL."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html_escape(title)} - talk-server</title></head>"
        f"<body><main><h1>{html_escape(title)}</h1>{body}</main></body></html>\n"
    )


def hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{name}" value="{html_escape(value)}">'


def see_other(location: str) -> Reply:
    """A 303 redirect; relative, so a forged Host or X-Forwarded-Host cannot bend it."""
    bottle.response.set_header("Location", location)
    return Reply(303, "")


def safe_redirect(target) -> str:
    """`target` when it is a path on this server, else "/" (no open redirect)."""
    if (
        not isinstance(target, str)
        or not re.fullmatch(r"/[\x21-\x7e]*", target)
        or target.startswith(("//", "/\\"))
    ):
        return "/"
    return target


def set_page_cookie(name: str, value: str) -> None:
    """A browser-session cookie only this server's pages and requests see."""
    set_cookie(name, value)


def presession_token(rq) -> str:
    """The sign-in form's CSRF token, derived from the pre-session cookie (set when missing)."""
    cookie = bottle.request.get_cookie(PRE_SESSION_COOKIE)
    if not cookie or not re.fullmatch(r"[A-Za-z0-9_-]{20,100}", cookie):
        cookie = secrets.token_urlsafe(32)
        set_page_cookie(PRE_SESSION_COOKIE, cookie)
    return keyed_hash(rq.talk.signin_key, "csrf", cookie)


def presession_ok(rq) -> bool:
    cookie = bottle.request.get_cookie(PRE_SESSION_COOKIE)
    given = rq.params.get("requesttoken")
    if not cookie or not isinstance(given, str):
        return False
    return hmac.compare_digest(keyed_hash(rq.talk.signin_key, "csrf", cookie), given)


def require_session_csrf(rq) -> None:
    """403 unless the form carries the web session's CSRF token."""
    given = rq.params.get("requesttoken")
    if not isinstance(given, str) or not hmac.compare_digest(rq.session["csrf"], given):
        fail(403, "The form expired or came from another site; please try again")


def signin_form(rq, target: str, user: str = "", error: str = "", status: int = 200) -> Reply:
    message = f'<p role="alert"><strong>{html_escape(error)}</strong></p>' if error else ""
    body = (
        f'{message}<form method="post" action="/index.php/login">'
        f'<p><label>User name<br><input name="user" value="{html_escape(user)}" '
        'autocomplete="username" autocapitalize="none" required autofocus></label></p>'
        '<p><label>Password<br><input name="password" type="password" '
        'autocomplete="current-password" required></label></p>'
        f'{hidden("requesttoken", presession_token(rq))}{hidden("redirect_url", target)}'
        '<p><button type="submit">Sign in</button></p></form>'
    )
    return Reply(status, page("Sign in", body))


def logout_form(rq) -> str:
    return (
        '<form method="post" action="/index.php/logout">'
        f'{hidden("requesttoken", rq.session["csrf"])}'
        '<button type="submit">Sign out</button></form>'
    )


def signin_page(rq):
    """GET /index.php/login: the sign-in form (signed in already: on to redirect_url)."""
    target = safe_redirect(rq.text("redirect_url", "/"))
    if rq.session is not None:
        return see_other(target)
    return signin_form(rq, target, rq.text("user", "") or "")


def signin(rq):
    """POST /index.php/login: sign in with user and password, throttled as Basic auth.

    A wrong password shows the form again with status 401.
    """
    target = safe_redirect(rq.text("redirect_url", "/"))
    user, password = rq.text("user", "") or "", rq.text("password", "") or ""
    if not presession_ok(rq):
        return signin_form(rq, target, user, "The form expired; please try again.", 403)
    environ = bottle.request.environ
    row = password_login(rq.talk, user, password, environ) if user and password else None
    if row is None:
        return signin_form(rq, target, user, "Wrong user name or password.", 401)
    cookie = secrets.token_urlsafe(32)
    with rq.talk.db.write() as db:
        expire_web_sessions(db, rq.now - WEB_SESSION_IDLE)
        id_hash = keyed_hash(rq.talk.signin_key, "web-session", cookie)
        add_web_session(db, id_hash, row["id"], new_secret(32), rq.now)
    set_page_cookie(WEB_COOKIE, cookie)
    return see_other(target)


def signout(rq):
    """POST /index.php/logout: end the web session (CSRF-checked).

    The browser client's fetch proves itself as the OCS API does, with the
    OCS-APIRequest header (a cross-site form cannot send one); forms carry
    the session's token.
    """
    if rq.session is not None:
        if not csrf_ok(bottle.request.environ):
            require_session_csrf(rq)
        with rq.talk.db.write() as db:
            delete_web_session(db, rq.session["id_hash"])
    bottle.response.delete_cookie(WEB_COOKIE, path="/")
    return see_other("/index.php/login")


# --- Login flows v1 and v2 ---------------------------------------------------


def flow_path(version: int, login_token: str) -> str:
    return f"/index.php/login/{'v2/' if version == 2 else ''}flow/{login_token}"


def start_flow(rq, version: int) -> tuple[str, str]:
    """A new login flow: (login token for its URL, poll token for v2)."""
    rq.talk.flow_starts.take(client_address(bottle.request.environ), "login flows")
    login_token, poll_token = new_secret(64), new_secret(64)
    poll_hash = keyed_hash(rq.talk.signin_key, "poll", poll_token) if version == 2 else None
    name = client_name(bottle.request.environ)
    with rq.talk.db.write() as db:
        expire_login_flows(db, rq.now - LOGIN_FLOW_SECONDS)
        add_login_flow(db, version, login_token, poll_hash, name, rq.now)
    return login_token, poll_token


def live_flow(rq, login_token: str, version: int):
    """The unexpired flow of this version, or 404."""
    with rq.talk.db.read() as db:
        flow = login_flow_by_token(db, login_token, rq.now - LOGIN_FLOW_SECONDS)
    if flow is None or flow["version"] != version:
        fail(404, "This sign-in link is unknown or has expired; start again from the app")
    return flow


def flow_page(rq, login_token: str, version: int):
    """Sign in first (when needed), then the Grant access form."""
    flow = live_flow(rq, login_token, version)
    if rq.session is None:
        return signin_form(rq, flow_path(version, login_token), rq.text("user", "") or "")
    if flow["app_password"] is not None:
        return page("Access granted", "<p>You may close this window.</p>")
    body = (
        f"<p>Signed in as <strong>{html_escape(rq.session['display_name'])}</strong> "
        f"({html_escape(rq.session['id'])}).</p>"
        f"<p>Grant <strong>{html_escape(flow['client_name'])}</strong> access to your "
        "account? It gets its own app password, which you can revoke.</p>"
        f'<form method="post" action="{flow_path(version, login_token)}">'
        f'{hidden("requesttoken", rq.session["csrf"])}'
        '<button type="submit">Grant access</button></form>'
        f"<p>Not you?</p>{logout_form(rq)}"
    )
    return page("Grant access", body)


def grant_flow(rq, login_token: str, version: int):
    """Create the flow's app password: v2 keeps it for one poll, v1 redirects to nc://."""
    flow = live_flow(rq, login_token, version)
    if rq.session is None:
        return signin_form(rq, flow_path(version, login_token), "", "Please sign in first.", 401)
    require_session_csrf(rq)
    user_id = rq.session["id"]
    password = new_secret(APP_PASSWORD_LENGTH)
    with rq.talk.db.write() as db:
        token_hash = keyed_hash(rq.talk.signin_key, "app-password", password)
        add_app_password(db, user_id, flow["client_name"], token_hash, rq.now)
        if version == 1:
            delete_login_flow(db, flow["id"])
        elif not grant_login_flow(db, flow["id"], user_id, password):
            fail(409, "Access was granted already")
    if version == 1:
        server = base_url(bottle.request.environ)
        return see_other(
            f"nc://login/server:{server}&user:{quote(user_id, safe='')}"
            f"&password:{quote(password, safe='')}"
        )
    return page("Access granted", "<p>You may close this window and return to the app.</p>")


def login_v2_start(rq):
    """POST /index.php/login/v2: start a login flow v2 (no credentials)."""
    login_token, poll_token = start_flow(rq, 2)
    base = base_url(bottle.request.environ)
    return {
        "poll": {"token": poll_token, "endpoint": f"{base}/index.php/login/v2/poll"},
        "login": f"{base}{flow_path(2, login_token)}",
    }


def login_v2_poll(rq):
    """POST /index.php/login/v2/poll: the credentials, once, after the user granted."""
    token = rq.text("token", "") or ""
    row = None
    if re.fullmatch(r"[A-Za-z0-9]{1,200}", token):
        token_hash = keyed_hash(rq.talk.signin_key, "poll", token)
        since = rq.now - LOGIN_FLOW_SECONDS
        with rq.talk.db.read() as db:
            row = granted_flow(db, token_hash, since)
        if row is not None:
            with rq.talk.db.write() as db:  # another poll may have taken it meanwhile
                row = granted_flow(db, token_hash, since)
                if row is not None:
                    delete_login_flow(db, row["id"])
    if row is None:
        return Reply(404, [])
    return {
        "server": base_url(bottle.request.environ),
        "loginName": row["user_id"],
        "appPassword": row["app_password"],
    }


def login_v2_flow(rq, login_token):
    """GET /index.php/login/v2/flow/{token}: the page a login flow v2 opens."""
    return flow_page(rq, login_token, 2)


def login_v2_grant(rq, login_token):
    """POST /index.php/login/v2/flow/{token}: grant the app access."""
    return grant_flow(rq, login_token, 2)


def login_v1_start(rq):
    """GET /index.php/login/flow: start a login flow v1 (the apps' web view)."""
    if not csrf_ok(bottle.request.environ):
        fail(400, "This page is for the Nextcloud apps; they send OCS-APIRequest: true")
    login_token, _ = start_flow(rq, 1)
    user = rq.text("user", "") or ""
    return see_other(flow_path(1, login_token) + (f"?{urlencode({'user': user})}" if user else ""))


def login_v1_flow(rq, login_token):
    """GET /index.php/login/flow/{token}: sign in, then the Grant access form."""
    return flow_page(rq, login_token, 1)


def login_v1_grant(rq, login_token):
    """POST /index.php/login/flow/{token}: grant, then redirect to nc://login/..."""
    return grant_flow(rq, login_token, 1)


# ---------------------------------------------------------------------------
# Routes: Avatars (users and guests: Nextcloud core; conversations: spreed
# docs/avatar.md)
# ---------------------------------------------------------------------------


def avatar_png(talk, display_name: str, size: int, dark: bool) -> Binary:
    """A generated avatar, from the app's cache: the same initial, colour and
    size give the same image, so one entry serves every name that shares them."""
    initial = avatar_initial(display_name)
    color = avatar_color(display_name, dark)
    key = (initial, color, size)
    body = talk.avatars.get(key, lambda: render_avatar(initial, color, size))
    tag = hashlib.sha1(repr(key).encode("utf-8")).hexdigest()[:20]
    return Binary(body, "image/png", f'"{tag}"')


def is_true(value) -> bool:
    return value in ("1", "true", "True", True, 1)


def user_avatar(rq, user, size, dark=False):
    """GET /index.php/avatar/{user}/{size}: a user's avatar (PNG, 16..512 px).

    Served without sign-in, as Nextcloud serves it (PublicPage): whoever knows
    a user id may see its initial and colour. Unknown users: 404 `[]`, or the
    guest avatar with guestFallback=true (as Nextcloud).
    """
    with rq.talk.db.read() as db:
        row = get_user(db, user)
    if row is None:
        if is_true(rq.text("guestFallback")):
            return guest_avatar(rq, user, size, dark)
        fail(404, "User not found")
    return avatar_png(rq.talk, row["display_name"], clamp_avatar_size(size), dark)


def user_avatar_dark(rq, user, size):
    """GET /index.php/avatar/{user}/{size}/dark: a user's avatar for dark themes."""
    return user_avatar(rq, user, size, dark=True)


def guest_avatar(rq, name, size, dark=False):
    """GET /index.php/avatar/guest/{name}/{size}: a guest's avatar from the name it chose."""
    return avatar_png(rq.talk, name, clamp_avatar_size(size), dark)


def guest_avatar_dark(rq, name, size):
    """GET /index.php/avatar/guest/{name}/{size}/dark: a guest's avatar for dark themes."""
    return guest_avatar(rq, name, size, dark=True)


def refuse_fixed_avatar(room) -> None:
    """Set conversations avatar: 400 in one-to-one rooms (they show the other user)."""
    if room["type"] in AVATAR_FIXED_TYPES:
        message = "One-to-one rooms always need to show the other users avatar"
        fail(400, message, {"message": message})


def room_avatar_get(rq, token, dark=False):
    """GET /room/{token}/avatar: Get conversations avatar (binary)."""
    partner = None
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, SEE)
        fields = room_avatar_fields(db, room["id"])
        image = room_avatar_image(db, room["id"]) if fields["avatar_type"] != "emoji" else None
        if fields["type"] in AVATAR_FIXED_TYPES:
            partner = other_user_of(db, room["id"], rq.actor.user_id)
    partner_name = partner["display_name"] if partner is not None else ""
    version = room_avatar_json(fields, partner_name)["avatarVersion"]
    etag = f'"{room["token"]}-{version}-{int(dark)}"'
    if fields["avatar_type"] == "emoji":
        color = fields["avatar_color"] or AVATAR_DEFAULT_COLORS[dark]
        emoji = bytes(fields["avatar"] or b"").decode("utf-8", "replace")
        return Binary(emoji_svg(emoji, color), "image/svg+xml", etag)
    if fields["avatar_type"] and image is not None:
        return Binary(image, fields["avatar_type"], etag)
    if partner is not None:
        return avatar_png(rq.talk, partner_name, AVATAR_SIZE_MAX, dark)
    return Binary(default_room_svg(fields["type"], dark), "image/svg+xml", etag)


def room_avatar_get_dark(rq, token):
    """GET /room/{token}/avatar/dark: Get dark mode conversations avatar (binary)."""
    return room_avatar_get(rq, token, dark=True)


def room_avatar_upload(rq, token):
    """POST /room/{token}/avatar: Set conversations avatar (multipart `file`)."""
    with rq.talk.db.read() as db:
        room, _ = room_for(db, rq.actor, token, MODERATE)
        refuse_fixed_avatar(room)
    upload = rq.upload("file")
    if upload is None:
        fail(400, "No image file provided", {"message": "No image file provided"})
    content_type = checked_avatar_image(upload)  # outside the write turn: CRCs of megabytes
    with rq.talk.db.write() as db:
        room, _ = room_for(db, rq.actor, token, MODERATE)
        refuse_fixed_avatar(room)
        set_room_avatar(db, room["id"], content_type, image=upload.data)
        return conversation_answer(rq, db, room_by_id(db, room["id"]))


def room_avatar_emoji(rq, token):
    """POST /room/{token}/avatar/emoji: Set emoji as avatar (`emoji`, `color`)."""
    emoji = rq.text("emoji", "")
    color = rq.text("color") or ""  # omitted or null: Talk's bright or dark grey
    with rq.talk.db.write() as db:
        room, _ = room_for(db, rq.actor, token, MODERATE)
        refuse_fixed_avatar(room)
        if not is_single_emoji(emoji):
            fail(400, "Invalid emoji character", {"message": "Invalid emoji character"})
        if color and not re.fullmatch(r"[0-9a-fA-F]{6}", color):
            fail(400, "Invalid background color", {"message": "Invalid background color"})
        set_room_avatar(db, room["id"], "emoji", emoji=emoji, color=color.lower())
        return conversation_answer(rq, db, room_by_id(db, room["id"]))


def room_avatar_delete(rq, token):
    """DELETE /room/{token}/avatar: Delete conversations avatar."""
    with rq.talk.db.write() as db:
        room, _ = room_for(db, rq.actor, token, MODERATE)
        delete_room_avatar(db, room["id"])
        return conversation_answer(rq, db, room_by_id(db, room["id"]))


# ---------------------------------------------------------------------------
# Routes: User status (Nextcloud's user_status app, api/v1)
# ---------------------------------------------------------------------------


def clear_at_param(rq) -> int | None:
    """clearAt: a unix time in the future, or none (absent, empty, 0); else 400."""
    clear_at = rq.integer("clearAt")
    if not clear_at:
        return None
    if clear_at < rq.now:
        fail(400, "clearAt is in the past")
    return clear_at


def own_status(rq, db) -> dict:
    me = rq.actor.user_id
    return private_status_json(status_row(db, me), me, rq.now)


def user_status_get(rq):
    """GET /user_status: Get the status of the current user (offline when never set)."""
    with rq.talk.db.read() as db:
        return own_status(rq, db)


def user_status_set_type(rq):
    """PUT /user_status/status: Update the status type of the current user."""
    status = rq.text("statusType", required=True)
    if status not in STATUS_TYPES:
        fail(400, f"statusType must be one of {', '.join(STATUS_TYPES)}")
    with rq.talk.db.write() as db:
        set_status_type(db, rq.actor.user_id, status, rq.now, user_defined=True)
        return own_status(rq, db)


def user_status_set_custom(rq):
    """PUT /user_status/message/custom: Set a custom message (`statusIcon`, `message`, `clearAt`)."""
    icon = rq.text("statusIcon") or ""
    message = rq.text("message") or ""
    clear_at = clear_at_param(rq)
    if len(message) > STATUS_MESSAGE_MAX:
        fail(400, f"Message is longer than {STATUS_MESSAGE_MAX} characters")
    if icon and not is_single_emoji(icon):
        fail(400, "statusIcon must be one emoji")
    with rq.talk.db.write() as db:
        if message or clear_at:
            set_status_message(db, rq.actor.user_id, message, icon, None, clear_at)
        else:  # nothing to show: the user_status app clears the message
            ensure_status_row(db, rq.actor.user_id)
            clear_status_message(db, rq.actor.user_id)
        return own_status(rq, db)


def user_status_set_predefined(rq):
    """PUT /user_status/message/predefined: Set a predefined message (`messageId`, `clearAt`)."""
    message_id = rq.text("messageId", required=True)
    clear_at = clear_at_param(rq)
    if message_id not in PREDEFINED_BY_ID:
        fail(400, "messageId is not a predefined status")
    with rq.talk.db.write() as db:
        set_status_message(db, rq.actor.user_id, "", "", message_id, clear_at)
        return own_status(rq, db)


def user_status_clear_message(rq):
    """DELETE /user_status/message: Clear the message of the current user."""
    with rq.talk.db.write() as db:
        clear_status_message(db, rq.actor.user_id)
    return []


def predefined_statuses(rq):
    """GET /predefined_statuses: the predefined messages."""
    return [predefined_status_json(entry) for entry in PREDEFINED_STATUSES]


def statuses_list(rq):
    """GET /statuses: Find statuses of users (`limit` at most 200, `offset`)."""
    limit = min(max(rq.integer("limit", STATUS_LIST_MAX), 1), STATUS_LIST_MAX)
    offset = rq.integer("offset", 0, minimum=0)
    with rq.talk.db.read() as db:
        rows = list_status_rows(db, limit, offset)
    return [public_status_json(row, rq.now) for row in rows]


def statuses_get(rq, user_id):
    """GET /statuses/{userId}: Find the status of a user (404 when it has none)."""
    with rq.talk.db.read() as db:
        row = status_row(db, user_id)
    if row is None:
        fail(404, "No status for the requested userId")
    return public_status_json(row, rq.now)


def user_status_heartbeat(rq):
    """PUT /heartbeat: the client is online or away (`status`).

    A status the user chose stays (away, dnd, invisible, offline; online is
    kept alive); otherwise the heartbeat's becomes the automatic status.
    """
    status = rq.text("status", required=True)
    if status not in HEARTBEAT_TYPES:
        fail(400, "status must be online or away")
    me, now = rq.actor.user_id, rq.now
    with rq.talk.db.write() as db:
        shown = own_status(rq, db)
        if shown["statusIsUserDefined"]:
            touch_status(db, me, now)
        else:
            set_status_type(db, me, status, now, user_defined=False)
        return own_status(rq, db)


# ---------------------------------------------------------------------------
# Routes: User search for invitations (Nextcloud core autocomplete)
# ---------------------------------------------------------------------------


def autocomplete_get(rq):
    """GET /core/autocomplete/get: Find users and groups to invite (`search`,
    `itemType`, `itemId`, `shareTypes[]` 0 users / 1 groups, `limit`, `offset`).

    Never the caller; with itemType=call the members of room itemId are left
    out, but only when the caller is in that room (else nobody learns who is).
    Groups: the caller's own, or all for administrators.
    """
    search = rq.text("search", "").strip()
    limit = min(max(rq.integer("limit", AUTOCOMPLETE_DEFAULT_LIMIT), 1), AUTOCOMPLETE_MAX_LIMIT)
    offset = rq.integer("offset", 0, minimum=0)
    share_types = {int(t) for t in rq.texts("shareTypes") if t.strip().isdigit()}
    if not rq.has("shareTypes"):
        share_types = {SHARE_TYPE_USER}
    me = rq.actor.user_id
    wanted = search.lower()
    with rq.talk.db.read() as db:
        exclude = {me}
        if rq.text("itemType") == "call" and rq.text("itemId"):
            room = room_by_token(db, rq.text("itemId"))
            if room is not None and participant_of(db, room["id"], me) is not None:
                exclude |= user_ids_in_room(db, room["id"])
        users, groups = [], []
        if SHARE_TYPE_USER in share_types:
            users = [row for row in search_users(db, search) if row["id"] not in exclude]
        if SHARE_TYPE_GROUP in share_types:
            mine = None if is_admin(db, me) else set(groups_of(db, me))
            groups = [g for g in list_groups(db, search) if mine is None or g in mine]

        def exact(row):
            return wanted in (row["id"].lower(), row["display_name"].lower(), row["email"].lower())

        ranked = (
            [("user", row) for row in users if exact(row)]
            + [("group", g) for g in groups if g.lower() == wanted]
            + [("user", row) for row in users if not exact(row)]
            + [("group", g) for g in groups if g.lower() != wanted]
        )[offset : offset + limit]
        page_users = [row["id"] for kind, row in ranked if kind == "user"]
        statuses = {row["user_id"]: public_status_json(row, rq.now) for row in status_rows(db, page_users)}
    answer = []
    for kind, item in ranked:
        if kind == "user":
            status = statuses.get(item["id"])
            if status is not None:
                status = {key: status[key] for key in ("status", "message", "icon", "clearAt")}
            answer.append(autocomplete_user_json(item, status))
        else:
            answer.append(autocomplete_group_json(item))
    return answer


# ---------------------------------------------------------------------------
# The app factory
# ---------------------------------------------------------------------------

# Who may call: USERS need Basic auth; PUBLIC also takes guests (cookie) and
# nobody; IMAGE is PUBLIC without the OCS-APIRequest header (an <img> cannot
# send it, and reading a picture changes nothing) and answers Binary; BOT is
# a bot, which proves itself by the signature headers its handler checks
# (signed_bot), never by Basic auth or cookies.
# HPB: the signaling server, which signs its requests (the handler reads the raw body).
PUBLIC, USERS, IMAGE, BOT, HPB = "public", "users", "image", "bot", "hpb"

# One table per API generation and prefix: (method, path under the prefix,
# handler, who may call it). ROUTE_TABLES says where each is served and which
# generation's status codes its refusals take (SPEC 11).

# API v1 (2018), under /ocs/v{1,2}.php/apps/spreed/api/v1 (SPEC 3-7). Chat
# lives here in both generations.
ROUTES = [
    # Room management
    ("POST", "/room", room_create, USERS),
    ("GET", "/room", room_list, USERS),
    ("GET", "/room/<token>", room_get, PUBLIC),
    ("PUT", "/room/<token>", room_rename, USERS),
    ("PUT", "/room/<token>/password", room_set_password, USERS),
    ("DELETE", "/room/<token>", room_delete, USERS),
    ("POST", "/room/<token>/public", room_make_public, USERS),
    ("DELETE", "/room/<token>/public", room_make_private, USERS),
    # Participant management
    ("GET", "/room/<token>/participants", participant_list, PUBLIC),
    ("POST", "/room/<token>/participants", participant_add, USERS),
    ("DELETE", "/room/<token>/participants", participant_remove, USERS),
    ("DELETE", "/room/<token>/participants/guests", participant_remove_guest, USERS),
    ("DELETE", "/room/<token>/participants/self", participant_remove_self, USERS),
    ("POST", "/room/<token>/participants/active", participant_join, PUBLIC),
    ("DELETE", "/room/<token>/participants/active", participant_leave, PUBLIC),
    ("POST", "/room/<token>/moderators", moderator_promote, USERS),
    ("DELETE", "/room/<token>/moderators", moderator_demote, USERS),
    # Call management
    ("GET", "/call/<token>", call_peers_list, PUBLIC),
    ("POST", "/call/<token>", call_join, PUBLIC),
    ("POST", "/call/<token>/ping", call_ping, PUBLIC),
    ("DELETE", "/call/<token>", call_leave, PUBLIC),
    # Chat
    ("GET", "/chat/<token>", chat_receive, PUBLIC),
    ("POST", "/chat/<token>", chat_send, PUBLIC),
    # Signaling
    ("GET", "/signaling/settings", signaling_settings, PUBLIC),
    ("POST", "/signaling", signaling_send, PUBLIC),
    ("GET", "/signaling", signaling_receive, PUBLIC),
    ("POST", "/signaling/<token>", signaling_send, PUBLIC),
    ("GET", "/signaling/<token>", signaling_receive, PUBLIC),
]

# Today's chat, also under .../api/v1 (docs/chat.md, reaction.md, poll.md):
# GET /chat/{token} with lookIntoFuture and POST /chat/{token} are the 2018
# routes above; static paths before the <message_id> ones.
CHAT_ROUTES = [
    ("DELETE", "/chat/<token>", chat_clear, PUBLIC),
    ("POST", "/chat/<token>/read", chat_mark_read, PUBLIC),
    ("DELETE", "/chat/<token>/read", chat_mark_unread, PUBLIC),
    ("GET", "/chat/<token>/mentions", chat_mentions, PUBLIC),
    ("PUT", "/chat/<token>/<message_id>", chat_edit, PUBLIC),
    ("DELETE", "/chat/<token>/<message_id>", chat_delete, PUBLIC),
    ("GET", "/chat/<token>/<message_id>/context", chat_context, PUBLIC),
    ("POST", "/reaction/<token>/<message_id>", reaction_add, PUBLIC),
    ("DELETE", "/reaction/<token>/<message_id>", reaction_delete, PUBLIC),
    ("GET", "/reaction/<token>/<message_id>", reaction_list, PUBLIC),
    ("POST", "/poll/<token>", poll_create, PUBLIC),
    ("GET", "/poll/<token>/<poll_id>", poll_get, PUBLIC),
    ("POST", "/poll/<token>/<poll_id>", poll_vote, PUBLIC),
    ("DELETE", "/poll/<token>/<poll_id>", poll_close, PUBLIC),
]

# API v4 (today), under /ocs/v{1,2}.php/apps/spreed/api/v4: conversations,
# participants and calls.
ROUTES_V4 = [
    # Conversations
    ("GET", "/room", conversation_list, USERS),
    ("POST", "/room", conversation_create, USERS),
    ("GET", "/listed-room", conversation_listed, USERS),
    ("GET", "/room/<token>", conversation_get, PUBLIC),
    ("PUT", "/room/<token>", conversation_rename, USERS),
    ("DELETE", "/room/<token>", conversation_delete, USERS),
    ("PUT", "/room/<token>/description", conversation_description, USERS),
    ("PUT", "/room/<token>/password", room_set_password, USERS),
    ("POST", "/room/<token>/public", conversation_make_public, USERS),
    ("DELETE", "/room/<token>/public", room_make_private, USERS),
    ("PUT", "/room/<token>/read-only", conversation_read_only, USERS),
    ("PUT", "/room/<token>/listable", conversation_listable, USERS),
    ("POST", "/room/<token>/favorite", conversation_favorite, USERS),
    ("DELETE", "/room/<token>/favorite", conversation_unfavorite, USERS),
    ("POST", "/room/<token>/notify", conversation_notify, USERS),
    ("POST", "/room/<token>/notify-calls", conversation_notify_calls, USERS),
    ("PUT", "/room/<token>/webinar/lobby", conversation_lobby, USERS),
    ("PUT", "/room/<token>/permissions/<mode>", conversation_permissions, USERS),
    ("POST", "/room/<token>/message-expiration", conversation_message_expiration, USERS),
    # Participants
    ("GET", "/room/<token>/participants", attendee_list, PUBLIC),
    ("POST", "/room/<token>/participants", attendee_add, USERS),
    ("DELETE", "/room/<token>/attendees", attendee_remove, USERS),
    ("PUT", "/room/<token>/attendees/permissions", attendee_permissions, USERS),
    ("DELETE", "/room/<token>/participants/self", attendee_remove_self, USERS),
    ("POST", "/room/<token>/participants/active", attendee_join, PUBLIC),
    ("DELETE", "/room/<token>/participants/active", attendee_leave, PUBLIC),
    ("POST", "/room/<token>/moderators", attendee_promote, USERS),
    ("DELETE", "/room/<token>/moderators", attendee_demote, USERS),
    # Calls
    ("GET", "/call/<token>", call_peers_v4, PUBLIC),
    ("POST", "/call/<token>", call_join_v4, PUBLIC),
    ("PUT", "/call/<token>", call_update_v4, PUBLIC),
    ("DELETE", "/call/<token>", call_leave_v4, PUBLIC),
]

# API v3 (today), under /ocs/v{1,2}.php/apps/spreed/api/v3: internal signaling.
ROUTES_V3 = [
    ("GET", "/signaling/settings", signaling_settings_v3, PUBLIC),
    ("GET", "/signaling/<token>", signaling_pull, PUBLIC),
    ("POST", "/signaling/<token>", signaling_push, PUBLIC),
]

# Capabilities and provisioning, under /ocs/v{1,2}.php/cloud (SPEC 8, 9).
CLOUD_ROUTES = [
    ("GET", "/capabilities", capabilities, PUBLIC),
    ("GET", "/user", cloud_me, USERS),
    ("GET", "/users", cloud_users, USERS),
    ("POST", "/users", cloud_user_add, USERS),
    ("GET", "/users/details", cloud_users_details, USERS),  # before /users/<userid>
    ("GET", "/users/<userid>", cloud_user_get, USERS),
    ("PUT", "/users/<userid>", cloud_user_edit, USERS),
    ("DELETE", "/users/<userid>", cloud_user_delete, USERS),
    ("PUT", "/users/<userid>/enable", cloud_user_enable, USERS),
    ("PUT", "/users/<userid>/disable", cloud_user_disable, USERS),
    ("GET", "/users/<userid>/groups", cloud_user_groups, USERS),
    ("POST", "/users/<userid>/groups", cloud_user_group_add, USERS),
    ("DELETE", "/users/<userid>/groups", cloud_user_group_remove, USERS),
    ("GET", "/groups", cloud_groups, USERS),
    ("POST", "/groups", cloud_group_add, USERS),
    ("GET", "/groups/details", cloud_groups_details, USERS),  # before /groups/<groupid>
    ("GET", "/groups/<groupid>", cloud_group_get, USERS),
    ("DELETE", "/groups/<groupid>", cloud_group_delete, USERS),
]

# Sign-in for apps: OCS routes under /ocs/v{1,2}.php/core
SIGNIN_ROUTES = [
    ("GET", "/getapppassword", core_get_app_password, USERS),
    ("DELETE", "/apppassword", core_delete_app_password, USERS),
    ("POST", "/apppassword/rotate", core_rotate_app_password, USERS),
    # talk-server's own: the browser client's list of app passwords
    ("GET", "/apppasswords", core_list_app_passwords, USERS),
    ("POST", "/apppasswords", core_create_app_password, USERS),
    ("DELETE", "/apppasswords/<password_id>", core_revoke_app_password, USERS),
]

HTML, JSON = "html", "json"

# Sign-in for apps: the pages under /index.php, HTML forms or JSON
PAGE_ROUTES = [
    ("GET", "/index.php/login", signin_page, HTML),
    ("POST", "/index.php/login", signin, HTML),
    ("POST", "/index.php/logout", signout, HTML),
    ("POST", "/index.php/login/v2", login_v2_start, JSON),
    ("POST", "/index.php/login/v2/poll", login_v2_poll, JSON),
    ("GET", "/index.php/login/v2/flow/<login_token>", login_v2_flow, HTML),
    ("POST", "/index.php/login/v2/flow/<login_token>", login_v2_grant, HTML),
    ("GET", "/index.php/login/flow", login_v1_start, HTML),
    ("GET", "/index.php/login/flow/<login_token>", login_v1_flow, HTML),
    ("POST", "/index.php/login/flow/<login_token>", login_v1_grant, HTML),
]


# Conversation avatars, under the Talk API (spreed docs/avatar.md)
AVATAR_ROUTES = [
    ("GET", "/room/<token>/avatar", room_avatar_get, IMAGE),
    ("GET", "/room/<token>/avatar/dark", room_avatar_get_dark, IMAGE),
    ("POST", "/room/<token>/avatar", room_avatar_upload, PUBLIC),
    ("POST", "/room/<token>/avatar/emoji", room_avatar_emoji, PUBLIC),
    ("DELETE", "/room/<token>/avatar", room_avatar_delete, PUBLIC),
]

# Handlers that take bodies over max_body (uploads), with their own limit.
LARGE_BODIES = {room_avatar_upload: AVATAR_BODY_MAX}

# User and guest avatars: plain pages, not OCS (method, full path, handler).
# Guests first, and sizes only digits, so /avatar/guest/Bo/64 is guest "Bo"
# while /avatar/guest/64/dark stays user "guest" at 64 px, dark.
AVATAR_SIZE = r"<size:re:\d{1,9}>"
USER_AVATAR_ROUTES = [
    ("GET", f"/index.php/avatar/guest/<name>/{AVATAR_SIZE}", guest_avatar),
    ("GET", f"/index.php/avatar/guest/<name>/{AVATAR_SIZE}/dark", guest_avatar_dark),
    ("GET", f"/index.php/avatar/<user>/{AVATAR_SIZE}", user_avatar),
    ("GET", f"/index.php/avatar/<user>/{AVATAR_SIZE}/dark", user_avatar_dark),
]

# The user_status app (/ocs/v{1,2}.php/apps/user_status/api/v1)
USER_STATUS_ROUTES = [
    ("GET", "/user_status", user_status_get, USERS),
    ("PUT", "/user_status/status", user_status_set_type, USERS),
    ("PUT", "/user_status/message/custom", user_status_set_custom, USERS),
    ("PUT", "/user_status/message/predefined", user_status_set_predefined, USERS),
    ("DELETE", "/user_status/message", user_status_clear_message, USERS),
    ("GET", "/predefined_statuses", predefined_statuses, USERS),
    ("GET", "/statuses", statuses_list, USERS),
    ("GET", "/statuses/<user_id>", statuses_get, USERS),
    ("PUT", "/heartbeat", user_status_heartbeat, USERS),
]

# User search for invitations (/ocs/v{1,2}.php/core/autocomplete)
AUTOCOMPLETE_ROUTES = [
    ("GET", "/get", autocomplete_get, USERS),
]

# Bots, also under .../api/v1 (docs/bots.md): moderators and administrators
# manage them; the bots themselves write, signing each request.
BOT_ROUTES = [
    ("GET", "/bot/admin", bot_admin_list, USERS),  # before /bot/<token>
    ("GET", "/bot/<token>", bot_list, USERS),
    ("POST", "/bot/<token>/message", bot_message, BOT),  # before /bot/<token>/<bot_id>
    ("POST", "/bot/<token>/reaction/<message_id>", bot_react, BOT),
    ("DELETE", "/bot/<token>/reaction/<message_id>", bot_unreact, BOT),
    ("POST", "/bot/<token>/<bot_id>", bot_enable, USERS),
    ("DELETE", "/bot/<token>/<bot_id>", bot_disable, USERS),
]

# The signaling server's backend requests, under .../api/v1, v2 and v3 (it
# picks v3 when the capabilities list signaling-v3). Registered first: the
# internal signaling's POST /signaling/<token> would take "backend" for a token.
HPB_ROUTES = [
    ("POST", "/signaling/backend", signaling_backend, HPB),
]

# (prefix, generation, table)
ROUTE_TABLES = [
    (SPREED_PREFIX + "/v<api:re:[123]>", 3, HPB_ROUTES),
    (API_PREFIX, 1, ROUTES),
    (API_PREFIX, 1, CHAT_ROUTES),
    (API_V3_PREFIX, 3, ROUTES_V3),
    (API_PREFIX, 1, BOT_ROUTES),
    (API_V4_PREFIX, 4, ROUTES_V4),
    (CLOUD_PREFIX, 1, CLOUD_ROUTES),
    (CORE_PREFIX, 1, SIGNIN_ROUTES),
    (API_PREFIX, 4, AVATAR_ROUTES),
    (USER_STATUS_PREFIX, 4, USER_STATUS_ROUTES),
    (AUTOCOMPLETE_PREFIX, 4, AUTOCOMPLETE_ROUTES),
]


def route_pattern(prefix, path) -> re.Pattern:
    """The regular expression of a route's whole path, as Bottle reads its wildcards."""
    regex = ""
    for part in re.split(r"(<[^>]+>)", prefix + path):
        if part.startswith("<"):
            _, _, rule = part[1:-1].partition(":re:")
            regex += f"(?:{rule})" if rule else "[^/]+"
        else:
            regex += re.escape(part)
    return re.compile(regex + "$")


def long_poll_routes() -> list[tuple[re.Pattern, object]]:
    """Every GET route as (pattern, waits or None), static paths first as Bottle
    matches them: the long-poll classification is derived from the route tables."""
    routes = [
        (path, route_pattern(prefix, path), getattr(handler, "waits", None))
        for prefix, _, table in ROUTE_TABLES
        for method, path, handler, _ in table
        if method == "GET"
    ]
    routes.sort(key=lambda route: "<" in route[0])  # stable: table order otherwise
    return [(pattern, waits) for _, pattern, waits in routes]


class Talk:
    """The state one app lives on: database, notifier, clock and settings."""

    def __init__(
        self,
        db_path,
        *,
        clock=time.time,
        durability="full",
        threads=DEFAULT_THREADS,
        reserve=None,
        time_scale=1.0,
        max_body=DEFAULT_MAX_BODY,
        stun_servers=(DEFAULT_STUN,),
        turn_server="",
        turn_secret="",
        signaling_queue_max=SIGNALING_QUEUE_MAX,
        rooms_per_minute=ROOMS_PER_MINUTE,
        throttle_free_failures=THROTTLE_FREE_FAILURES,
        public_url="",
        webhook_timeout=WEBHOOK_TIMEOUT,
        chat_per_minute=CHAT_PER_MINUTE,
        signaling_per_minute=SIGNALING_PER_MINUTE,
        guests_per_room=GUESTS_PER_ROOM,
        signaling_servers=(),
        signaling_secret="",
        signaling_internal_secret="",
    ):
        if durability not in ("full", "normal"):
            raise ValueError("durability must be full or normal")
        signaling_servers = checked_signaling_servers(signaling_servers, signaling_secret)
        self.db = Database(db_path, durability)
        self.room_lists: dict[tuple, dict] = {}  # GET /room answers, see shared_answer
        self.avatars = BoundedCache(AVATAR_CACHE_ENTRIES)  # generated PNGs, see avatar_png
        self.clock = clock
        self.threads = threads
        if reserve is None:  # small pools (tests, embedding) keep a quarter back
            reserve = min(DEFAULT_RESERVE, max(1, threads // 4))
        self.notifier = Notifier(
            max(threads - reserve, 0), overflow_wait=0.5, time_scale=time_scale
        )
        self.credentials = Credentials()
        self.max_body = max_body
        self.stun_servers = list(stun_servers)
        self.turn_server = turn_server
        self.turn_secret = turn_secret
        # The High-Performance Backend: its URLs (none: internal signaling), the
        # secret it shares with us, the one of its internal clients (kept for
        # the services that connect as such), our key of the hello tickets.
        self.signaling_servers = signaling_servers
        self.signaling_secret = signaling_secret
        self.signaling_internal_secret = signaling_internal_secret
        self.ticket_key = load_server_key(self.db, "signaling-ticket") if signaling_servers else b""
        self.hpb_throttle = Throttle(throttle_free_failures, clock=clock)  # bad checksums
        self.signaling_queue_max = signaling_queue_max
        # Chat and signaling per sender and per room (on the app clock): an
        # anonymous guest cannot grow the database without bound.
        # The byte allowances scale with the message counts.
        chat_bytes = CHAT_BYTES_PER_MINUTE * chat_per_minute // CHAT_PER_MINUTE
        signaling_bytes = SIGNALING_BYTES_PER_MINUTE * signaling_per_minute // SIGNALING_PER_MINUTE
        self.chat_flow = Flow("messages", chat_per_minute, chat_bytes, ROOM_FLOW_FACTOR, clock)
        self.signaling_flow = Flow(
            "signaling messages", signaling_per_minute, signaling_bytes, ROOM_FLOW_FACTOR, clock
        )
        self.guests_per_room = guests_per_room
        self.room_creation = RateLimit(rooms_per_minute)
        self.throttle = Throttle(throttle_free_failures, clock=clock)  # logins
        self.signin_key = load_server_key(self.db)
        self.flow_starts = RateLimit(LOGIN_FLOWS_PER_MINUTE)
        # Room passwords apart: a user's successful login must not reset them.
        self.room_throttle = Throttle(throttle_free_failures, clock=clock)
        self.rooms = Rooms(self)
        self.config_hash = config_hash(self)
        self.public_url = public_url  # X-Nextcloud-Talk-Backend; "" = the request's own
        self.bots = Webhooks(self, timeout=webhook_timeout)
        self.bot_throttle = Throttle(throttle_free_failures)  # bad bot signatures
        self.hpb = SignalingNotifier(self)
        self._expiry_lock = threading.Lock()
        self._expiry = None  # (when, timer) of the next message expiration
        self.closing = False
        upcoming = self.expire_messages()
        if upcoming is not None:
            self.expire_at(upcoming)
        # refresh-participant-list (signaling v3): a room's latest change, and
        # the change each session's last usersInRoom showed; a poll whose room
        # changed since answers at once. In memory: a restart answers once more.
        self._changes = itertools.count(1)
        self.room_versions: dict[int, int] = {}
        self.seen_versions: dict[str, int] = {}

    def room_version(self, room_id) -> int:
        return self.room_versions.get(room_id, 0)

    def room_news_for(self, session_id, room_id) -> bool:
        """Whether the room changed since this session's last usersInRoom (or it has none)."""
        return self.seen_versions.get(session_id) != self.room_version(room_id)

    def saw_room(self, session_id, version) -> None:
        if len(self.seen_versions) > 10000:
            self.seen_versions.clear()  # sessions gone long ago; the live ones answer once more
        self.seen_versions[session_id] = version

    def room_changed(self, room_id, chat=False):
        """Wake the room's signaling polls (and chat polls when the room went).

        Waiting chat polls must look in the database again before they use a
        new message as news: the change may have cost them the room. Today's
        chat polls are woken too: the change may have written a system message.
        """
        self.room_versions[room_id] = next(self._changes)
        self.notifier.taint(chat_key(room_id))
        keys = [room_key(room_id), modern_chat_key(room_id)]
        if chat:
            keys.append(chat_key(room_id))
        self.notifier.notify(*keys)  # news None: today's polls look again
        if not chat:
            self.bots.posted(room_id)
            self.hpb.chat_changed(room_id)
        if chat:  # the room went, with its history: let the file shrink
            with self.db.write() as db:
                reclaim_pages(db)

    def chat_posted(self, room_id, *rows, changed=False):
        """Wake the room's chat polls with the messages just committed (none
        given: today's polls look in the database). A 2018 poll is woken by
        comments only. `changed`: older messages changed too (edit, delete,
        clear), so news alone does not tell everything."""
        if changed:
            self.notifier.taint(chat_key(room_id))
            self.notifier.taint(modern_chat_key(room_id))
        if not rows:
            self.notifier.notify(modern_chat_key(room_id))
        for row in rows:
            if row["legacy_seq"] is not None:
                self.notifier.notify(chat_key(room_id), news=row)
            self.notifier.notify(modern_chat_key(room_id), news=row)
        self.bots.posted(room_id, rows)
        self.hpb.chat_changed(room_id, posted=bool(rows))

    def expire_guests(self, token):
        """Delete guest rows inactive past the window, when there are any (SPEC 2)."""
        before = int(self.clock()) - GUEST_EXPIRY_SECONDS
        with self.db.read() as db:
            room = room_by_token(db, token)
            if room is None:
                return
            stale = has_expired_guests(db, room["id"], before)
        if stale:
            with self.db.write() as db:
                ended = expire_guests(db, room["id"], before)
            self.room_changed(room["id"])
            self.rooms.left(room["id"], None, ended, removed=True)

    def expire_messages(self) -> int | None:
        """Delete the messages whose expiration passed; when the next one
        expires (None: no message will)."""
        now = int(self.clock())
        with self.db.read() as db:
            due = has_expired_messages(db, now)
        if due:
            with self.db.write() as db:
                expire_messages(db, now)
        with self.db.read() as db:
            return next_expiry(db)

    def expire_at(self, when) -> None:
        """Have expire_messages run when `when` comes (one timer, set to the
        nearest expiration: no loop polls for them)."""
        with self._expiry_lock:
            if self.closing or (self._expiry is not None and self._expiry[0] <= when):
                return
            if self._expiry is not None:
                self._expiry[1].cancel()
            delay = min(max(when - self.clock(), 0), 3600)
            timer = threading.Timer(delay, self._expire_due)
            timer.daemon = True
            self._expiry = (when, timer)
            timer.start()

    def _expire_due(self):
        with self._expiry_lock:
            self._expiry = None
        try:
            upcoming = self.expire_messages()
        except (sqlite3.Error, RuntimeError):  # closed meanwhile
            return
        if upcoming is not None:
            self.expire_at(upcoming)

    def shutdown(self):
        """Answer every waiting long-poll now; stop new waits."""
        with self._expiry_lock:
            self.closing = True
            if self._expiry is not None:
                self._expiry[1].cancel()
                self._expiry = None
        self.notifier.close()

    def close(self):
        self.shutdown()
        self.bots.close()
        self.hpb.close()
        self.db.close()


def binary_answer(result: Binary) -> bytes:
    """Send an image: revalidated on every use (ETag; If-None-Match gives 304)."""
    response = bottle.response
    response.set_header("Cache-Control", "no-cache")
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
    if result.etag:
        response.set_header("ETag", result.etag)
        if etag_matches(bottle.request.get_header("If-None-Match", ""), result.etag):
            response.status = 304
            return b""
    response.content_type = result.content_type
    return result.body


def image_callback(talk, handler):
    """Wrap a plain (not OCS) image handler: errors answer `[]` as Nextcloud's do."""

    def wrapper(**url_args):
        try:
            rq = Call(talk, Actor(), query_params(bottle.request.query), 2)
            result = handler(rq, **url_args)
        except OCSError as error:
            bottle.response.status = error.status
            bottle.response.content_type = "application/json; charset=utf-8"
            return b"[]"
        return binary_answer(result)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def ocs_callback(talk, handler, who, generation=1, max_body=None):
    """Wrap a handler: auth, CSRF, parameters, errors and the envelope, in one place."""
    max_body = talk.max_body if max_body is None else max_body

    def wrapper(ocs, **url_args):
        request = bottle.request
        environ = request.environ
        version = int(ocs)
        fmt = format_from_accept(environ)
        try:
            query = query_params(request.query)
            fmt = query.get("format") or fmt
            body = read_body(environ, max_body) if who != HPB else {}
            fmt = body.get("format") if isinstance(body.get("format"), str) else fmt
            if fmt not in ("json", "xml"):
                fmt = "json"
                fail(400, "format must be json or xml")
            anyone = who in (BOT, HPB)  # they sign their requests instead
            actor = Actor() if anyone else authenticate(talk, environ, need_user=(who == USERS))
            if who not in (IMAGE, HPB) and not csrf_ok(environ):
                raise CSRFError()
            rq = Call(talk, actor, {**query, **body}, version)
            rq.may_wait = may_wait(handler, environ.get("QUERY_STRING", ""))
            result = handler(rq, **url_args)
        except (OCSError, Refused) as error:
            if isinstance(error, Refused):
                error = error.as_ocs_error(generation)
            data = error.data
            if version == 1 and error.v1_code:
                bottle.response.status = 200
                meta = ocs_meta(1, error.v1_code, error.message)
                return encode(fmt, {"ocs": {"meta": meta, "data": data}})
            return envelope(version, fmt, error.status, data, error.message)
        except CSRFError:
            bottle.response.status = 412
            return encode("json", {"message": "CSRF check failed"})
        except sqlite3.IntegrityError:
            # A row this request relied on went meanwhile (say, its user was
            # deleted by the command line within the credential recheck).
            return envelope(version, fmt, 409, [], "Conflict with a concurrent change; try again")
        if isinstance(result, Binary):
            return binary_answer(result)
        if isinstance(result, Reply) and result.status == 304:
            bottle.response.status = 304  # today's chat: nothing new, and no body
            return b""
        if isinstance(result, Shared):
            body = result.entry.get((version, fmt))
            if body is None:
                body = envelope(version, fmt, 200, result.entry["data"])
                result.entry[(version, fmt)] = body
            else:
                bottle.response.status = 200
                bottle.response.content_type = CONTENT_TYPES[fmt]
            return body
        if isinstance(result, Reply):
            return envelope(version, fmt, result.status, result.data)
        return envelope(version, fmt, 200, result)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def page_callback(talk, handler, kind):
    """Wrap an /index.php page: parameters, the web session, security headers and
    errors (an HTML page, or JSON for the login flow v2 API), in one place."""

    def wrapper(**url_args):
        request = bottle.request
        environ = request.environ
        for name, value in PAGE_HEADERS.items():
            bottle.response.set_header(name, value)
        try:
            query = {key: request.query.getunicode(key) for key in request.query.keys()}
            body = read_body(environ, talk.max_body)
            session = web_session(talk, environ)
            actor = Actor()
            if session is not None:
                actor = Actor(user_id=session["id"], display_name=session["display_name"], credential=WEB)
            result = handler(PageCall(talk, actor, {**query, **body}, session), **url_args)
        except OCSError as error:
            result = Reply(error.status, error.data if kind == JSON else error_html(error))
        except sqlite3.IntegrityError:
            result = Reply(409, [] if kind == JSON else page("Please try again", ""))
        status, data = (result.status, result.data) if isinstance(result, Reply) else (200, result)
        bottle.response.status = status
        if kind == JSON:
            bottle.response.content_type = "application/json; charset=utf-8"
            return json.dumps(data, separators=(",", ":")).encode("utf-8")
        bottle.response.content_type = "text/html; charset=utf-8"
        return data.encode("utf-8")

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def error_html(error: OCSError) -> str:
    title = STATUS_MESSAGES.get(error.status, "Error")
    return page(title, f"<p>{html_escape(error.message)}</p>")


def make_app(db_path, **options) -> bottle.Bottle:
    """Build a fresh Talk app on the SQLite database at `db_path`.

    Options (all keyword): clock (a function giving seconds since the epoch),
    durability ("full" or "normal"), threads and reserve (the long-poll
    budget), time_scale (multiplies every long-poll wait; tests use a small
    one), max_body (bytes), stun_servers, turn_server, turn_secret,
    signaling_queue_max, rooms_per_minute, throttle_free_failures,
    public_url (the X-Nextcloud-Talk-Backend of webhooks; default: the URL
    each request came to), webhook_timeout (seconds), chat_per_minute,
    signaling_per_minute (per sender; a room takes five senders' share),
    guests_per_room, signaling_servers (URLs of High-Performance Backend
    signaling servers; none: internal signaling), signaling_secret (shared
    with them; required with servers), signaling_internal_secret. The app's
    state is `app.talk`; `app.talk.close()` ends waits, stops the webhook and
    signaling-server workers and closes the database.
    """
    talk = Talk(db_path, **options)
    app = bottle.Bottle(catchall=True)
    app.talk = talk
    for prefix, generation, table in ROUTE_TABLES:
        for method, path, handler, who in table:
            max_body = max(talk.max_body, LARGE_BODIES.get(handler, 0))
            callback = ocs_callback(talk, handler, who, generation, max_body)
            app.route(prefix + path, method, callback)
    for method, path, handler, kind in PAGE_ROUTES:
        app.route(path, method, page_callback(talk, handler, kind))
    for method, path, handler in USER_AVATAR_ROUTES:
        app.route(path, method, image_callback(talk, handler))
    app.route("/status.php", "GET", status_php)
    app.route("/", "GET", static_file)
    app.route("/static/<path:path>", "GET", static_file)
    for status in (400, 404, 405, 413, 500):
        app.error(status)(error_page)
    return app


# ---------------------------------------------------------------------------
# Serving: Waitress, in the foreground or in a background thread
# ---------------------------------------------------------------------------


LONG_POLL_ROUTES = long_poll_routes()


def is_long_poll(channel) -> bool:
    """Whether the request a Waitress channel is about to serve may wait.

    The first GET route matching the path decides, from the query parameters
    as its handler will read them (the last of repeated ones, as Bottle).
    """
    request = channel.requests[0] if getattr(channel, "requests", None) else None
    if request is None or request.command != "GET":
        return False
    for pattern, waits in LONG_POLL_ROUTES:
        if pattern.match(request.path):
            return bool(waits and waits(poll_query(request.query)))
    return False


class LongPollDispatcher(waitress.task.ThreadedTaskDispatcher):
    """Waitress's worker pool, where long-polls may hold at most `slots` threads.

    A long-poll that finds every slot taken is held back here, costing no
    thread, until a running one answers; everything else is queued as
    usual, so the threads outside the slots (the reserve) always serve
    sends, joins and pings, and a client over the budget waits instead of
    spinning.
    """

    def __init__(self, slots):
        super().__init__()
        self.slots = slots
        self.polls = 0  # long-polls queued or running
        self.held = collections.deque()

    def add_task(self, task):
        if is_long_poll(task):
            with self.lock:
                if self.polls >= self.slots:
                    self.held.append(task)
                    return
                self.polls += 1
            task = PollSlot(self, task)
        super().add_task(task)

    def poll_done(self):
        with self.lock:
            self.polls -= 1
            if not self.held or self.polls >= self.slots:
                return
            self.polls += 1
            task = self.held.popleft()
        super().add_task(PollSlot(self, task))

    def shutdown(self, cancel_pending=True, timeout=5):
        with self.lock:
            held, self.held = list(self.held), collections.deque()
        for task in held:
            task.cancel()
        return super().shutdown(cancel_pending, timeout)


class PollSlot:
    """A long-poll task holding one of the dispatcher's slots until it ends."""

    def __init__(self, dispatcher, task):
        self.dispatcher = dispatcher
        self.task = task

    def service(self):
        try:
            self.task.service()
        finally:
            self.dispatcher.poll_done()

    def cancel(self):
        # Only a shutdown cancels, and Waitress does it holding the dispatcher's
        # lock: taking it again in poll_done would hang. No slot is needed then.
        self.task.cancel()


class OCSErrorTask(waitress.task.ErrorTask):
    """Waitress's own refusals (a body over the limit: 413; a malformed
    request: 400) as OCS envelopes under /ocs/, like the app's (SPEC 1.2)."""

    def execute(self):
        request, error = self.request, self.request.error
        path = getattr(request, "path", "") or ""
        if not path.startswith("/ocs/"):
            return super().execute()
        fmt = poll_query(getattr(request, "query", "")).get("format")
        if fmt not in ("json", "xml"):
            accept = request.headers.get("ACCEPT", "")
            fmt = "json" if "application/json" in accept else "xml"
        message = STATUS_MESSAGES.get(error.code, error.reason)
        document = {"ocs": {"meta": ocs_meta(ocs_version(path), error.code, message), "data": []}}
        if fmt == "xml":
            body = ('<?xml version="1.0"?>\n' + xml_value(document)).encode("utf-8")
        else:
            body = json.dumps(document, separators=(",", ":")).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", f"application/{fmt}; charset=utf-8"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class GuardedChannel(waitress.channel.HTTPChannel):
    """A Waitress connection that counts against its client address, and
    notes when its current request began (see guard_server)."""

    error_task_class = OCSErrorTask
    request_started = 0.0
    counted = None  # the address this connection counts against

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        address = addr[0] if isinstance(addr, tuple) else str(addr)
        guard = server.talk_guard
        if address in guard["exempt"]:
            return
        with guard["lock"]:
            held = guard["open"].get(address, 0)
            if held >= guard["limit"]:
                refused = True
            else:
                refused = False
                guard["open"][address] = held + 1
                self.counted = address
        if refused:  # one client may not take every connection
            self.will_close = True

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.time()
        return super().received(data)

    def del_channel(self, map=None):
        address, self.counted = self.counted, None
        if address is not None:
            guard = self.server.talk_guard
            with guard["lock"]:
                left = guard["open"].get(address, 1) - 1
                if left > 0:
                    guard["open"][address] = left
                else:
                    guard["open"].pop(address, None)
        super().del_channel(map)


def guard_server(server, per_address, request_timeout, exempt=()):
    """Bound the connections of each client address (a proxy we trust is
    exempt: its clients are told apart by X-Forwarded-For) and close a
    connection whose request is not all there within `request_timeout`
    seconds, so idle or trickling sockets cannot take the server's
    connections; Waitress's own idle timeout covers connections between
    requests."""
    server.channel_class = GuardedChannel
    server.talk_guard = {
        "lock": threading.Lock(), "open": {}, "limit": per_address, "exempt": set(exempt),
    }
    plain_maintenance = server.maintenance

    def maintenance(now):
        plain_maintenance(now)
        cutoff = now - request_timeout
        for channel in list(server.active_channels.values()):
            if (
                channel.request is not None
                and not channel.requests  # not while it is being answered
                and getattr(channel, "request_started", now) < cutoff
            ):
                channel.will_close = True

    server.maintenance = maintenance
    server.adj.cleanup_interval = min(server.adj.cleanup_interval, max(request_timeout / 4, 0.05))
    return server


def tune_memory():
    """Give scrypt's 16 MiB buffers back to the system after each hash.

    glibc otherwise keeps them in per-thread arenas: a burst of first logins
    on many threads leaves the process hundreds of MiB larger (SPEC 1.5).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD: big blocks come from mmap
        libc.mallopt(-8, 2)  # M_ARENA_MAX: two arenas, not eight per core
        # Compiling this module from source (a script, or no .pyc) leaves
        # megabytes of freed parser memory in the heap: hand them back.
        gc.collect()
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def create_server(
    app, host=DEFAULT_HOST, port=DEFAULT_PORT, threads=DEFAULT_THREADS, trusted_proxy=None,
    per_address=CONNECTIONS_PER_ADDRESS, request_timeout=REQUEST_TIMEOUT,
):
    """A Waitress server set up for long-polls, guarded against clients that
    hoard connections (guard_server).

    Behind a reverse proxy at `trusted_proxy` (an address, or "*"), the
    client's address comes from the proxy's X-Forwarded-For, so password
    throttling sees each client and not the proxy.
    """
    dispatcher = LongPollDispatcher(app.talk.notifier.max_waiting)
    dispatcher.set_thread_count(threads)
    proxy = {}
    if trusted_proxy:
        proxy = {
            "trusted_proxy": trusted_proxy,
            "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"},
            "trusted_proxy_count": 1,
        }
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        _dispatcher=dispatcher,
        # One request read ahead lets Waitress see a client hang up while
        # its long-poll waits (environ["waitress.client_disconnected"]).
        channel_request_lookahead=1,
        connection_limit=max(100, threads * 4),
        asyncore_use_poll=True,  # no 1024-descriptor limit of select()
        max_request_body_size=app.talk.max_body + 1024,
        channel_timeout=CHAT_MAX_TIMEOUT + 60,
        ident="talk-server",
        clear_untrusted_proxy_headers=True,
        **proxy,
    )
    if trusted_proxy == "*":  # every client comes through the proxy
        per_address = 10**9
    return guard_server(server, per_address, request_timeout, exempt=[trusted_proxy or ""])


def close_listener(server):
    """Close the listening socket only (server.close() also closes the trigger)."""
    if server.accepting:
        waitress.wasyncore.dispatcher.close(server)


def stop_server(server, talk, grace=5.0):
    """Stop gracefully: polls answer, no new connections, in-flight work finishes."""
    talk.shutdown()
    dispatcher = server.task_dispatcher
    server.trigger.pull_trigger(lambda: close_listener(server))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (dispatcher.active_count or dispatcher.queue):
        time.sleep(0.02)

    def close_everything():
        for channel in list(server._map.values()):
            channel.close()

    # Give the loop a moment to flush the last answers, then end it.
    time.sleep(0.05)
    server.trigger.pull_trigger(close_everything)


class ServedURL(str):
    """The base URL of a server from serve_in_thread; `.app` is the app it serves."""

    app: bottle.Bottle


@contextlib.contextmanager
def serve_in_thread(
    db_path, host="127.0.0.1", threads=16, trusted_proxy=None,
    per_address=CONNECTIONS_PER_ADDRESS, request_timeout=REQUEST_TIMEOUT, **options,
):
    """Serve a fresh app on a free loopback port in a background thread.

    Yields the base URL (``http://127.0.0.1:PORT``, a str whose `.app` is the
    app, for a look at `app.talk`); on exit, waiting polls answer, the server
    stops and the database is closed. For tests and for projects that embed
    talk-server as a mock.
    """
    options.setdefault("threads", threads)
    app = make_app(db_path, **options)
    server = create_server(
        app, host=host, port=0, threads=threads, trusted_proxy=trusted_proxy,
        per_address=per_address, request_timeout=request_timeout,
    )
    thread = threading.Thread(target=server.run, name="talk-server", daemon=True)
    thread.start()
    url = ServedURL(f"http://{host}:{server.effective_port}")
    url.app = app
    try:
        yield url
    finally:
        stop_server(server, app.talk, grace=2.0)
        thread.join(10)
        server.task_dispatcher.shutdown(timeout=2)
        app.talk.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def die(message, code=1):
    """Print one line to stderr and exit with `code` (1 unless a command names others)."""
    print(f"talk-server: {message}", file=sys.stderr)
    raise SystemExit(code)


def env(name, default):
    return os.environ.get(name, default)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="talk-server", description="A Nextcloud Talk API v1 server on SQLite."
    )
    parser.add_argument("--version", action="version", version=f"talk-server {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_db(p):
        p.add_argument(
            "--db",
            default=env("TALK_DB", "talk.sqlite3"),
            help="SQLite database file (TALK_DB; default ./talk.sqlite3)",
        )
        return p

    serve = with_db(commands.add_parser("serve", help="run the server"))
    serve.add_argument("--host", default=env("TALK_HOST", DEFAULT_HOST), help="bind address (TALK_HOST)")
    serve.add_argument("--port", type=int, default=int(env("TALK_PORT", DEFAULT_PORT)), help="port (TALK_PORT)")
    serve.add_argument(
        "--threads",
        type=int,
        default=int(env("TALK_THREADS", DEFAULT_THREADS)),
        help="worker threads; each waiting long-poll holds one (TALK_THREADS)",
    )
    serve.add_argument(
        "--reserve",
        type=int,
        default=int(env("TALK_RESERVE", DEFAULT_RESERVE)),
        help="threads long-polls may never take (TALK_RESERVE)",
    )
    serve.add_argument(
        "--durability",
        choices=("full", "normal"),
        default=env("TALK_DURABILITY", "full"),
        help="full: every answered write survives a power cut (default)",
    )
    serve.add_argument(
        "--stun-server",
        action="append",
        default=None,
        help=f"host:port, repeatable (TALK_STUN_SERVERS, comma-separated; default {DEFAULT_STUN})",
    )
    serve.add_argument("--turn-server", default=env("TALK_TURN_SERVER", ""), help="host:port (TALK_TURN_SERVER)")
    serve.add_argument("--turn-secret", default=env("TALK_TURN_SECRET", ""), help="coturn static-auth-secret (TALK_TURN_SECRET)")
    serve.add_argument(
        "--chat-per-minute",
        type=int,
        default=int(env("TALK_CHAT_PER_MINUTE", CHAT_PER_MINUTE)),
        help="chat messages one session may send a minute (TALK_CHAT_PER_MINUTE)",
    )
    serve.add_argument(
        "--signaling-per-minute",
        type=int,
        default=int(env("TALK_SIGNALING_PER_MINUTE", SIGNALING_PER_MINUTE)),
        help="signaling messages one session may send a minute (TALK_SIGNALING_PER_MINUTE)",
    )
    serve.add_argument(
        "--trusted-proxy",
        default=env("TALK_TRUSTED_PROXY", ""),
        help="address of a reverse proxy whose X-Forwarded-For to believe (TALK_TRUSTED_PROXY)",
    )
    serve.add_argument(
        "--connections-per-address",
        type=int,
        default=int(env("TALK_CONNECTIONS_PER_ADDRESS", str(CONNECTIONS_PER_ADDRESS))),
        help="open connections one client address may hold (TALK_CONNECTIONS_PER_ADDRESS; "
        f"default {CONNECTIONS_PER_ADDRESS}; a trusted proxy has no limit)",
    )
    serve.add_argument(
        "--public-url",
        default=env("TALK_PUBLIC_URL", ""),
        help="this server's URL as bots reach it (X-Nextcloud-Talk-Backend; TALK_PUBLIC_URL)",
    )
    serve.add_argument(
        "--signaling-server",
        action="append",
        default=None,
        help="URL of a High-Performance Backend signaling server, repeatable "
        "(TALK_SIGNALING_SERVERS, comma-separated; default: internal signaling)",
    )
    serve.add_argument(
        "--signaling-secret",
        default=env("TALK_SIGNALING_SECRET", ""),
        help="the secret shared with the signaling servers (TALK_SIGNALING_SECRET)",
    )
    serve.add_argument(
        "--signaling-internal-secret",
        default=env("TALK_SIGNALING_INTERNAL_SECRET", ""),
        help="the signaling servers' secret of internal clients (TALK_SIGNALING_INTERNAL_SECRET)",
    )
    serve.add_argument("--demo", action="store_true", help="add demo users alice, bob and carol")

    user = commands.add_parser("user", help="manage users").add_subparsers(dest="action", required=True)
    add = with_db(user.add_parser("add", help="create a user"))
    add.add_argument("name")
    add.add_argument("--password", help="asked for when not given")
    add.add_argument("--display-name", default="")
    with_db(user.add_parser("list", help="list users"))
    delete = with_db(user.add_parser("delete", help="delete a user and their rooms"))
    delete.add_argument("name")
    passwd = with_db(user.add_parser("passwd", help="set a user's password"))
    passwd.add_argument("name")
    passwd.add_argument("--password", help="asked for when not given")
    rename = with_db(user.add_parser("rename", help="set a user's display name"))
    rename.add_argument("name")
    rename.add_argument("display_name")
    for action in ("disable", "enable"):
        help_text = f"{action} a user's every sign-in (passwords, app passwords, web sessions)"
        with_db(user.add_parser(action, help=help_text)).add_argument("name")

    backup = with_db(commands.add_parser("backup", help="copy the database safely, even while serving"))
    backup.add_argument("destination", help="a new file to write the copy to")

    group = commands.add_parser("group", help="manage groups").add_subparsers(dest="action", required=True)
    for action in ("add", "delete"):
        with_db(group.add_parser(action, help=f"{action} a group")).add_argument("group")
    with_db(group.add_parser("list", help="list groups and their members"))
    for action in ("add-member", "remove-member"):
        p = with_db(group.add_parser(action, help=f"{action.replace('-', ' ')} to or from a group"))
        p.add_argument("group")
        p.add_argument("user")

    # Bots: Talk's occ talk:bot:* commands, their arguments, messages and exit codes.
    bot = commands.add_parser("bot", help="manage webhook bots (occ talk:bot:*)").add_subparsers(
        dest="action", required=True
    )

    def with_features(p):
        p.add_argument(
            "-f", "--feature", action="append", choices=[*BOT_FEATURES, "none"],
            help="repeatable: webhook (receives messages), response (may write and react), "
            "event, reaction (receives reactions), none",
        )
        return p

    install = with_features(with_db(bot.add_parser("install", help="install a new bot")))
    install.add_argument("name", help="the name its messages show (1-64 characters)")
    install.add_argument("secret", help="the shared secret (40-128 characters)")
    install.add_argument("url", help="its webhook, http:// or https://")
    install.add_argument("description", nargs="?", default=None, help="shown to moderators")
    install.add_argument("--description", dest="description_option", default=None)
    install.add_argument("--no-setup", action="store_true",
                         help="moderators cannot set it up; only `bot setup` can")
    uninstall = with_db(bot.add_parser("uninstall", help="uninstall a bot"))
    uninstall.add_argument("id", nargs="?", default="0")
    uninstall.add_argument("--url", default="", help="the bot's URL, when no ID is given")
    listing = with_db(bot.add_parser("list", help="list the bots (of a conversation)"))
    listing.add_argument("token", nargs="?", default="")
    listing.add_argument("--output", choices=("plain", "json", "json_pretty"), default="plain")
    listing.add_argument("-v", "--verbose", action="store_true", help="with URL, secret and errors")
    state = with_features(with_db(bot.add_parser("state", help="change a bot's state or features")))
    state.add_argument("id")
    state.add_argument("state", help="0 disabled, 1 enabled, 2 no setup by moderators")
    for action, text in (("setup", "set a bot up in conversations"),
                         ("remove", "remove a bot from conversations")):
        p = with_db(bot.add_parser(action, help=text))
        p.add_argument("id")
        p.add_argument("token", nargs="*")
        p.add_argument(
            "--public-url", default=env("TALK_PUBLIC_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"),
            help="the server's URL for the Join/Leave webhook (TALK_PUBLIC_URL)",
        )
    return parser.parse_args(argv)


def ask_password(given):
    if given is not None:
        if not given:
            die("the password must not be empty")
        return given
    if not sys.stdin.isatty():
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            die("no password given (use --password or type it on standard input)")
        return line
    first = getpass.getpass("Password: ")
    if not first or first != getpass.getpass("Again: "):
        die("the passwords are empty or do not match")
    return first


def open_db(path, durability="full") -> Database:
    try:
        return Database(path, durability)
    except (sqlite3.Error, RuntimeError, OSError) as error:
        die(f"cannot open database {path}: {error}")


def ensure_user(db, user_id, password, display_name="", admin=False) -> None:
    """Create a user, or reset its password; optionally make it an administrator."""
    password_hash = hash_password(password)
    if get_user(db, user_id) is None:
        create_user(db, user_id, password_hash, display_name)
    else:
        set_password_hash(db, user_id, password_hash)
    if admin:
        if not group_exists(db, ADMIN_GROUP):
            create_group(db, ADMIN_GROUP)
        add_to_group(db, ADMIN_GROUP, user_id)


def run_user_command(args, database):
    action = args.action
    if CONTROL_CHARACTERS.search(getattr(args, "display_name", "") or ""):
        die("the display name must not contain control characters")
    if action == "list":
        with database.read() as db:
            for row in list_users(db):
                groups = ",".join(groups_of(db, row["id"]))
                print(f"{row['id']}\t{row['display_name']}\t{groups}")
        return
    if action == "add":
        if not ID_PATTERN.fullmatch(args.name):
            die("a user id is 1-64 of letters, digits, space and _.@'-")
        with database.read() as db:
            if get_user(db, args.name) is not None:
                die(f"user {args.name} already exists")
        password = ask_password(args.password)
        with database.write() as db:
            create_user(db, args.name, hash_password(password), args.display_name)
        print(f"user {args.name} added")
        return
    with database.read() as db:
        if get_user(db, args.name) is None:
            die(f"no user {args.name}")
    if action == "delete":
        with database.write() as db:
            delete_user(db, args.name)
    elif action == "passwd":
        password = ask_password(args.password)
        with database.write() as db:
            set_password_hash(db, args.name, hash_password(password))
    elif action == "rename":
        if not args.display_name.strip():
            die("the display name must not be empty")
        with database.write() as db:
            set_display_name(db, args.name, args.display_name.strip())
    elif action in ("disable", "enable"):
        with database.write() as db:
            set_user_enabled(db, args.name, action == "enable")
    print(f"user {args.name}: {action} done")


def run_group_command(args, database):
    action = args.action
    if action == "list":
        with database.read() as db:
            for group_id in list_groups(db):
                print(f"{group_id}\t{','.join(group_members(db, group_id))}")
        return
    with database.read() as db:
        exists = group_exists(db, args.group)
        if action in ("add-member", "remove-member") and get_user(db, args.user) is None:
            die(f"no user {args.user}")
    if action == "add":
        if exists:
            die(f"group {args.group} already exists")
        if not ID_PATTERN.fullmatch(args.group):
            die("a group id is 1-64 of letters, digits, space and _.@'-")
        with database.write() as db:
            create_group(db, args.group)
    elif not exists:
        die(f"no group {args.group}")
    elif action == "delete":
        with database.write() as db:
            delete_group(db, args.group)
    elif action == "add-member":
        with database.write() as db:
            add_to_group(db, args.group, args.user)
    elif action == "remove-member":
        with database.write() as db:
            remove_from_group(db, args.group, args.user)
    print(f"group {args.group}: {action} done")


def feature_flags(labels) -> int:
    """Bot::featureLabelsToFlags: the sum of the labels; "none" is 0."""
    if "none" in labels:
        return 0
    return sum({BOT_FEATURES[label] for label in labels})


def valid_bot(name, secret, url, description) -> None:
    """BotService::validateBotParameters, with its messages (exit 1)."""
    if not 0 < len(name.encode("utf-8")) <= BOT_NAME_MAX:
        die("The provided name is too short or too long (min. 1 char, max. 64 chars)")
    if not BOT_SECRET_MIN <= len(secret.encode("utf-8")) <= BOT_SECRET_MAX:
        die("The provided secret is too short (min. 40 chars, max. 128 chars)")
    if len(url) > BOT_URL_MAX or not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
        die("The provided URL is not a valid URL")
    if len(description.encode("utf-8")) > BOT_DESCRIPTION_MAX:
        die("The provided description is too long (max. 4000 chars)")


def print_bots(bots, output, verbose) -> None:
    """Bots as `occ talk:bot:list` shows them: a table, or JSON."""
    rows = []
    for bot in bots:
        row = bot_admin_json(bot, secret=True)
        row["features"] = feature_labels(row["features"])
        if not verbose:
            for key in ("url", "url_hash", "secret", "last_error_date", "last_error_message"):
                del row[key]
        rows.append(row)
    if output != "plain":
        print(json.dumps(rows, indent=4 if output == "json_pretty" else None, ensure_ascii=False))
        return
    if not rows:
        return
    table = [list(rows[0])] + [["" if v is None else str(v) for v in row.values()] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def tell_bot(database, room, bot, kind, public_url) -> None:
    """Send Join or Leave from the command line, waiting for the bot's answer."""
    if not receives_http(bot, 0):
        return
    body = php_json(webhook_membership(room, bot, kind))
    error = post_signed(webhook_delivery(bot, body, public_url.rstrip("/") + "/"), WEBHOOK_TIMEOUT)
    if error is not None:
        with database.write() as db:
            count_bot_error(db, bot["id"], int(time.time()), error)


def run_bot_command(args, database):
    action = args.action
    if action == "install":
        description = args.description_option or args.description or ""
        valid_bot(args.name, args.secret, args.url, description)
        features = BOT_WEBHOOK | BOT_RESPONSE if not args.feature else feature_flags(args.feature)
        with database.read() as db:
            if bot_by_url(db, args.url) is not None:
                die("Bot with the same URL is already registered", 2)
        try:
            with database.write() as db:
                state = BOT_NO_SETUP if args.no_setup else BOT_ENABLED
                bot_id = add_bot(db, args.name, args.secret, args.url, description, state, features)
        except sqlite3.IntegrityError:
            die("Bot with the same secret is already registered", 3)
        print(f"Bot installed\nID: {bot_id}")
        return
    if action == "list":
        with database.read() as db:
            bots = list_bots(db)
            if args.token:
                room = room_by_token(db, args.token)
                here = bot_ids_in_room(db, room["id"]) if room is not None else set()
                bots = [bot for bot in bots if bot["id"] in here]
        print_bots(bots, args.output, args.verbose)
        return
    if action == "uninstall":
        bot_id = bot_id_of(args.id)
        with database.read() as db:
            bot = bot_by_id(db, bot_id) if bot_id else bot_by_url(db, args.url)
        if bot is None:
            die("Bot not found")
        with database.write() as db:
            delete_bot(db, bot["id"])  # its conversations go with it (ON DELETE CASCADE)
        print("Bot uninstalled")
        return
    bot_id = bot_id_of(args.id)
    if action == "state" and args.state not in ("0", "1", "2"):
        die("Provided state is invalid")
    with database.read() as db:
        bot = bot_by_id(db, bot_id)
    if bot is None:
        die(f"Bot could not be found by id: {bot_id}")
    if action == "state":
        features = None if not args.feature else feature_flags(args.feature)
        with database.write() as db:
            set_bot_state(db, bot_id, int(args.state), features)
        extra = "" if features is None else f" with features: {feature_labels(features)}"
        print(f"Bot state set to {args.state}{extra}")
        return
    if action == "remove":
        removed = []
        with database.write() as db:
            for token in args.token:
                room = room_by_token(db, token)
                if room is not None and unlink_bot(db, bot_id, room["id"]):
                    removed.append(room)
        print("Remove bot from given conversations")
        for room in removed:
            tell_bot(database, room, bot, "Leave", args.public_url)
        return
    code = 0  # setup: like Talk, the last failing token names the exit code
    for token in args.token:
        with database.write() as db:
            room = room_by_token(db, token)
            linked = room is not None and link_bot(db, bot_id, room["id"])
        if room is None:
            print(f"talk-server: Conversation could not be found by token: {token}", file=sys.stderr)
            code = 2
        elif not linked:
            print(f"talk-server: Bot is already set up for the conversation {token}", file=sys.stderr)
            code = 3
        else:
            print(f"Successfully set up for conversation {token}")
            tell_bot(database, room, bot, "Join", args.public_url)
    if code:
        raise SystemExit(code)


def run_backup(args):
    """Copy the database with SQLite's online backup: consistent while serving."""
    destination = Path(args.destination)
    try:
        # Created here, by the owner for the owner: a backup holds what the
        # database does (exclusive creation also keeps an existing file).
        os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        die(f"{destination} exists; choose a new file")
    except OSError as error:
        die(f"cannot create {destination}: {error}")
    database = open_db(args.db)
    try:
        target = sqlite3.connect(str(destination))
        with database.read() as source:
            source.backup(target)
        target.close()
    finally:
        database.close()
    print(f"backed up {args.db} to {destination}")


def bootstrap_accounts(database, demo) -> list[str]:
    """The admin account and demo users; returns lines to print at start."""
    lines = []
    admin_user = env("TALK_ADMIN_USER", "admin")
    admin_password = os.environ.get("TALK_ADMIN_PASSWORD")
    with database.read() as db:
        empty = count_users(db) == 0
    if admin_password:
        # Only ever creates the account: a password or group an administrator
        # changed later is not undone at the next start (issue 14).
        with database.write() as db:
            exists = get_user(db, admin_user) is not None
            if not exists:
                ensure_user(db, admin_user, admin_password, admin=True)
        if exists:
            lines.append(
                f"TALK_ADMIN_PASSWORD: user {admin_user!r} exists; its password and groups "
                "are left as they are (talk-server user passwd changes the password)"
            )
        else:
            lines.append(
                f"created administrator {admin_user!r} with the password from TALK_ADMIN_PASSWORD"
            )
    elif empty:
        admin_password = secrets.token_urlsafe(12)
        with database.write() as db:
            ensure_user(db, admin_user, admin_password, admin=True)
        lines.append(
            f"created administrator {admin_user!r} with password {admin_password!r} "
            "(shown once; set TALK_ADMIN_PASSWORD to choose it)"
        )
    if demo:
        demo_lines = []
        for user_id, display_name in DEMO_USERS:
            password = f"{user_id}-demo"
            with database.write() as db:
                ensure_user(db, user_id, password, display_name)
            demo_lines.append(f"{user_id}/{password}")
        lines.append("demo users (user/password): " + ", ".join(demo_lines))
    return lines


def run_serve(args):
    stun = args.stun_server or [
        s.strip() for s in env("TALK_STUN_SERVERS", DEFAULT_STUN).split(",") if s.strip()
    ]
    if args.threads < 2 or not 0 <= args.reserve < args.threads:
        die("--threads must be at least 2 and --reserve between 0 and threads - 1")
    signaling = args.signaling_server or [
        s.strip() for s in env("TALK_SIGNALING_SERVERS", "").split(",") if s.strip()
    ]
    try:
        checked_signaling_servers(signaling, args.signaling_secret)
    except ValueError as error:
        die(str(error))
    started = time.monotonic()
    tune_memory()
    try:
        app = make_app(
            args.db,
            durability=args.durability,
            threads=args.threads,
            reserve=args.reserve,
            stun_servers=stun,
            turn_server=args.turn_server,
            turn_secret=args.turn_secret,
            chat_per_minute=max(1, args.chat_per_minute),
            signaling_per_minute=max(1, args.signaling_per_minute),
            public_url=args.public_url,
            signaling_servers=signaling,
            signaling_secret=args.signaling_secret,
            signaling_internal_secret=args.signaling_internal_secret,
        )
    except (sqlite3.Error, RuntimeError, OSError) as error:
        die(f"cannot open database {args.db}: {error}")
    for line in bootstrap_accounts(app.talk.db, args.demo):
        print(line, flush=True)
    try:
        server = create_server(
            app, args.host, args.port, args.threads, args.trusted_proxy,
            per_address=max(1, args.connections_per_address),
        )
    except OSError as error:
        die(f"cannot listen on {args.host}:{args.port}: {error}")
    url = f"http://{args.host}:{server.effective_port}"
    print(
        f"talk-server {__version__} on {url} (database {Path(args.db).resolve()}, "
        f"{args.threads} threads, ready in {time.monotonic() - started:.2f} s)",
        flush=True,
    )
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            os._exit(1)  # a second Ctrl-C: stop now
        stopping.set()
        print("talk-server: stopping", file=sys.stderr, flush=True)
        threading.Thread(target=stop_server, args=(server, app.talk), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()
    server.task_dispatcher.shutdown(timeout=5)
    app.talk.close()


def main(argv=None):
    """The talk-server command."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "backup":
        return run_backup(args)
    database = open_db(args.db)
    try:
        if args.command == "user":
            run_user_command(args, database)
        elif args.command == "bot":
            run_bot_command(args, database)
        else:
            run_group_command(args, database)
    finally:
        database.close()


if __name__ == "__main__":
    main()
