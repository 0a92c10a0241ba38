-- talk-server schema: the single source of truth for a new database.
-- Migrations in talk_server.py bring older databases to the version below.

-- Accounts (SPEC 9): users, groups, and who is in which group.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    email         TEXT NOT NULL DEFAULT '',
    enabled       INTEGER NOT NULL DEFAULT 1  -- a disabled user cannot sign in
);

CREATE TABLE groups (
    id TEXT PRIMARY KEY
);

CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;

CREATE INDEX group_members_by_user ON group_members (user_id);

-- Sign-in for apps: secrets this server made for itself (keys of the fast
-- hashes below), app passwords, browser sign-in sessions and login flows.
CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- An app password is 72 random characters, so a keyed SHA-256 of it
-- (token_hash) is as safe as scrypt and costs microseconds.
CREATE TABLE app_passwords (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       TEXT NOT NULL DEFAULT '',
    token_hash TEXT NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    last_used  INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX app_passwords_by_user ON app_passwords (user_id);

-- A browser signed in on the sign-in page: the cookie's keyed hash.
CREATE TABLE web_sessions (
    id_hash   TEXT PRIMARY KEY,
    user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf      TEXT NOT NULL,
    created   INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX web_sessions_by_user ON web_sessions (user_id);

-- Login flows v1 and v2: a poll token (v2) and a login token in the URL the
-- user opens; once granted, the app password waits here for one poll.
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

-- A user's status (online, away, dnd, invisible, offline) and message.
-- message_id names a predefined message (NULL: a custom one or none);
-- user_defined is 0 for a status the heartbeat set, which goes offline
-- when the heartbeats stop.
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

-- Room management: one row per room. last_activity orders GET /room. Types
-- 1-3 as in 2018; 4 changelog, 5 former one-to-one, 6 note to self. The
-- avatar is an uploaded image (avatar_type image/png or image/jpeg, its
-- bytes in room_avatars) or an emoji (avatar_type emoji, the emoji's UTF-8
-- in avatar) on avatar_color; avatar_version changes with every change.
CREATE TABLE rooms (
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
    modified            INTEGER NOT NULL DEFAULT 0, -- last change of a setting (modifiedSince)
    -- Chat counters, so that nothing counts messages: the last seq given, the
    -- last 2018 seq given (comments), the Room's lastMessage, the newest timestamp.
    last_seq            INTEGER NOT NULL DEFAULT 0,
    last_legacy_seq     INTEGER NOT NULL DEFAULT 0,
    last_message_id     INTEGER NOT NULL DEFAULT 0,
    last_message_time   INTEGER NOT NULL DEFAULT 0
);

-- Conversation avatars: an uploaded image's bytes, apart from rooms, so
-- the room lookups every request makes (SELECT *) never read megabytes.
CREATE TABLE room_avatars (
    room_id INTEGER PRIMARY KEY REFERENCES rooms (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);

-- Participant management: one row per user (user_id) or guest (guest_id, a
-- hash of the guest's cookie) in a room. last_ping is the actor's last sign
-- of life in the room (SPEC 2).
CREATE TABLE participants (
    id               INTEGER PRIMARY KEY,
    room_id          INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id          TEXT REFERENCES users (id) ON DELETE CASCADE,
    guest_id         TEXT,
    participant_type INTEGER NOT NULL CHECK (participant_type BETWEEN 1 AND 5),
    last_ping        INTEGER NOT NULL DEFAULT 0,
    favorite           INTEGER NOT NULL DEFAULT 0,
    notification_level INTEGER NOT NULL DEFAULT 0,
    notification_calls INTEGER NOT NULL DEFAULT 1,
    permissions        INTEGER NOT NULL DEFAULT 0,  -- the attendee's own, 0: the room's
    last_read_message  INTEGER NOT NULL DEFAULT 0,
    guest_name         TEXT NOT NULL DEFAULT '',
    modified           INTEGER NOT NULL DEFAULT 0,  -- last change of this row (modifiedSince)
    -- Read marker: the 2018 seq (comment count) at last_read_message, so the
    -- unread count is rooms.last_legacy_seq - read_legacy_seq; the newest
    -- message mentioning this attendee (direct: by name, not @all).
    read_legacy_seq      INTEGER NOT NULL DEFAULT 0,
    last_mention_message INTEGER NOT NULL DEFAULT 0,
    last_mention_direct  INTEGER NOT NULL DEFAULT 0,
    CHECK ((user_id IS NULL) <> (guest_id IS NULL))
);

CREATE UNIQUE INDEX participants_by_user ON participants (user_id, room_id);
CREATE UNIQUE INDEX participants_by_guest ON participants (guest_id, room_id);
CREATE INDEX participants_by_room ON participants (room_id);

-- Sessions and calls: one row per joined device (a participant may have
-- several; the 2018 routes show the newest, the highest seq). in_call is a
-- bit mask, as today's Talk keeps it: 1 in call, 2 audio, 4 video, 8 phone.
-- device is the keyed hash of the cookie of the client that joined (the
-- modern routes find their session by it); NULL for a 2018 join.
CREATE TABLE sessions (
    seq            INTEGER PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    participant_id INTEGER NOT NULL REFERENCES participants (id) ON DELETE CASCADE,
    in_call        INTEGER NOT NULL DEFAULT 0,
    last_ping      INTEGER NOT NULL DEFAULT 0,
    device         TEXT
);

CREATE INDEX sessions_by_participant ON sessions (participant_id, seq);

-- Chat: seq numbers a room's messages 1, 2, 3...; legacy_seq numbers only the
-- comments, the messages a 2018 client sees (NULL for system messages and
-- polls), so the 2018 "skip the N oldest" stays a range lookup whatever else
-- is interleaved. Timestamps never decrease within a room. Ids are never
-- reused (AUTOINCREMENT): today's clients page by id, and messages expire.
-- message_type is comment, comment_deleted or system (verb says which);
-- parameters holds the rich objects (mentions, the actor of a system
-- message); reactions the counts per emoji, kept with each change.
CREATE TABLE messages (
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

CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq);
CREATE UNIQUE INDEX messages_by_legacy_seq ON messages (room_id, legacy_seq);
CREATE INDEX messages_by_time ON messages (room_id, timestamp) WHERE legacy_seq IS NOT NULL;
CREATE INDEX messages_by_room ON messages (room_id, id);
CREATE INDEX messages_by_expiry ON messages (expires) WHERE expires > 0;

-- Reactions: one row per message, emoji and actor.
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

-- Polls: options as a JSON list, votes per option kept as counters; status 0
-- open, 1 closed; result_mode 0 public, 1 hidden until closed.
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

-- Bots (spreed docs/bots.md): webhook bots an administrator installs from
-- the command line. url_hash is sha1(url), so a bot writes as actor
-- bots/bot-<url_hash>; state 0 disabled, 1 enabled, 2 no setup by moderators;
-- features a bit mask: 1 webhook, 2 response, 4 event, 8 reaction.
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

-- The conversations each bot is set up in (moderators, or bot setup).
CREATE TABLE bot_conversations (
    bot_id  INTEGER NOT NULL REFERENCES bots (id) ON DELETE CASCADE,
    room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    state   INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (bot_id, room_id)
) WITHOUT ROWID;

CREATE INDEX bot_conversations_by_room ON bot_conversations (room_id);

-- Signaling: messages queued for a session until it polls them. They go with
-- either session (SPEC 7) and expire after five minutes.
CREATE TABLE signaling (
    id        INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    sender    TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    data      TEXT NOT NULL,
    created   INTEGER NOT NULL
);

CREATE INDEX signaling_by_recipient ON signaling (recipient, id);
CREATE INDEX signaling_by_sender ON signaling (sender);
CREATE INDEX signaling_by_age ON signaling (created);

PRAGMA user_version = 2;
