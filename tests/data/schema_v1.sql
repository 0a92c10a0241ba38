-- talk-server schema: the single source of truth for a new database.
-- Migrations in talk_server.py bring older databases to the version below.

-- Accounts (SPEC 9): users, groups, and who is in which group.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL,
    password_hash TEXT NOT NULL
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

-- Room management: one row per room. last_activity orders GET /room.
CREATE TABLE rooms (
    id            INTEGER PRIMARY KEY,
    token         TEXT NOT NULL UNIQUE,
    type          INTEGER NOT NULL CHECK (type IN (1, 2, 3)),
    name          TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL DEFAULT '',
    last_activity INTEGER NOT NULL DEFAULT 0
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
    CHECK ((user_id IS NULL) <> (guest_id IS NULL))
);

CREATE UNIQUE INDEX participants_by_user ON participants (user_id, room_id);
CREATE UNIQUE INDEX participants_by_guest ON participants (guest_id, room_id);
CREATE INDEX participants_by_room ON participants (room_id);

-- Sessions and calls: a participant's session in its room (v1 shows one per
-- participant). in_call is a bit mask, as today's Talk keeps it: 1 = in call.
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    participant_id INTEGER NOT NULL REFERENCES participants (id) ON DELETE CASCADE,
    in_call        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE INDEX sessions_by_participant ON sessions (participant_id);

-- Chat: seq numbers a room's messages 1, 2, 3... so "skip the N oldest" is
-- a range lookup; timestamps never decrease within a room.
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    actor_type TEXT NOT NULL,
    actor_id   TEXT NOT NULL,
    timestamp  INTEGER NOT NULL,
    message    TEXT NOT NULL
);

CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq);
CREATE INDEX messages_by_time ON messages (room_id, timestamp);

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

PRAGMA user_version = 1;
