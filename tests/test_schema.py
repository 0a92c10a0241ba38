"""The database: schema.sql, its version, pragmas, refusals and migrations."""

import re
import sqlite3
import threading
from pathlib import Path

import pytest

import talk_server

SCHEMA = Path(__file__).resolve().parents[1] / "schema.sql"


def raw(path):
    """A plain sqlite3 connection, outside talk-server."""
    return sqlite3.connect(str(path), isolation_level=None)


def user_version(path):
    conn = raw(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def open_db():
    """Open talk_server.Database objects and close them all afterwards."""
    opened = []

    def open_(path):
        database = talk_server.Database(path)
        opened.append(database)
        return database

    yield open_
    for database in opened:
        database.close()


def test_schema_ends_with_user_version_equal_to_schema_version():
    text = SCHEMA.read_text(encoding="utf-8")
    last = [line for line in text.splitlines() if line.strip()][-1]
    match = re.fullmatch(r"PRAGMA user_version = (\d+);", last.strip())
    assert match, f"schema.sql must end with PRAGMA user_version = N;, not {last!r}"
    assert int(match.group(1)) == talk_server.SCHEMA_VERSION


def test_migrations_cover_every_version():
    assert len(talk_server.MIGRATIONS) == talk_server.SCHEMA_VERSION - 1


def test_new_database_gets_schema_version(tmp_path, open_db):
    open_db(tmp_path / "talk.db")
    assert user_version(tmp_path / "talk.db") == talk_server.SCHEMA_VERSION


def test_new_database_has_every_table(tmp_path, open_db):
    database = open_db(tmp_path / "talk.db")
    with database.read() as db:
        tables = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    expected = set(re.findall(r"CREATE TABLE (\w+)", SCHEMA.read_text(encoding="utf-8")))
    assert expected <= tables
    assert {"users", "groups", "rooms", "participants", "sessions", "messages"} <= tables


def test_new_database_is_in_wal_mode(tmp_path, open_db):
    open_db(tmp_path / "talk.db")
    conn = raw(tmp_path / "talk.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_connections_have_foreign_keys_on(tmp_path, open_db):
    database = open_db(tmp_path / "talk.db")
    with database.read() as db:
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with database.write() as db:
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):
            talk_server.add_to_group(db, "no-such-group", "no-such-user")


def test_connect_sets_wal_and_foreign_keys(tmp_path):
    conn = talk_server.connect(tmp_path / "plain.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        conn.close()


def test_deleting_a_room_cascades(tmp_path, open_db):
    database = open_db(tmp_path / "talk.db")
    with database.write() as db:
        talk_server.create_user(db, "alice", "x", "Alice")
        room = talk_server.create_room(db, 2, "Team", 0)
        pid = talk_server.add_participant(db, room["id"], 1, 0, user_id="alice")
        talk_server.start_session(db, pid, 0)
        talk_server.add_message(db, room["id"], "users", "alice", "hi", 0)
        talk_server.delete_room(db, room["id"])
    with database.read() as db:
        for table in ("participants", "sessions", "messages"):
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


def test_newer_database_is_refused(tmp_path):
    path = tmp_path / "future.db"
    conn = raw(path)
    conn.execute("CREATE TABLE users (id TEXT)")
    conn.execute(f"PRAGMA user_version = {talk_server.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        talk_server.Database(path)
    assert user_version(path) == talk_server.SCHEMA_VERSION + 1


def test_newer_database_is_refused_by_the_command_line(tmp_path, capsys):
    path = tmp_path / "future.db"
    conn = raw(path)
    conn.execute(f"PRAGMA user_version = {talk_server.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SystemExit) as exit_info:
        talk_server.main(["user", "list", "--db", str(path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "newer" in err


def test_tables_without_version_are_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = raw(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
    conn.close()
    with pytest.raises(RuntimeError, match="not a talk-server database"):
        talk_server.Database(path)
    conn = raw(path)
    try:
        assert conn.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "users" not in names
    finally:
        conn.close()


def test_reopening_keeps_data(tmp_path):
    path = tmp_path / "talk.db"
    database = talk_server.Database(path)
    with database.write() as db:
        talk_server.create_user(db, "alice", "hash", "Alice")
        room = talk_server.create_room(db, 3, "Kept", 5)
    database.close()
    database = talk_server.Database(path)
    try:
        with database.read() as db:
            assert talk_server.get_user(db, "alice")["display_name"] == "Alice"
            assert talk_server.room_by_token(db, room["token"])["name"] == "Kept"
    finally:
        database.close()
    assert user_version(path) == talk_server.SCHEMA_VERSION


def test_two_opens_of_a_new_database_at_once(tmp_path, open_db):
    """Two processes starting on one new file must not both create the schema."""

    path = tmp_path / "race.db"
    errors = []

    def opener():
        try:
            open_db(path)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert user_version(path) == talk_server.SCHEMA_VERSION


# ---------------------------------------------------------------------------
# Migrations: an old database built by hand
# ---------------------------------------------------------------------------

ADD_DESCRIPTION = "ALTER TABLE rooms ADD COLUMN topic TEXT NOT NULL DEFAULT '';"


def build_current_database(path):
    """A database at today's version made from schema.sql, with a user and a room."""
    conn = raw(path)
    conn.executescript(SCHEMA.read_text(encoding="utf-8"))
    conn.execute(
        "INSERT INTO users (id, display_name, password_hash) VALUES ('alice', 'Alice', 'x')"
    )
    conn.execute("INSERT INTO rooms (token, type, name) VALUES ('abcdefgh', 2, 'Old room')")
    conn.close()
    assert user_version(path) == talk_server.SCHEMA_VERSION


def test_migration_brings_old_database_up_to_date(tmp_path, monkeypatch, open_db):
    old = talk_server.SCHEMA_VERSION
    path = tmp_path / "old.db"
    build_current_database(path)
    monkeypatch.setattr(talk_server, "SCHEMA_VERSION", old + 1)
    monkeypatch.setattr(talk_server, "MIGRATIONS", [*talk_server.MIGRATIONS, ADD_DESCRIPTION])
    database = open_db(path)
    with database.read() as db:
        columns = [row["name"] for row in db.execute("PRAGMA table_info(rooms)")]
        assert "topic" in columns
        room = talk_server.room_by_token(db, "abcdefgh")
        assert room["name"] == "Old room"
        assert room["topic"] == ""
        assert talk_server.get_user(db, "alice")["display_name"] == "Alice"
    assert user_version(path) == old + 1


def test_migrated_database_opens_again_without_migrating(tmp_path, monkeypatch, open_db):
    old = talk_server.SCHEMA_VERSION
    path = tmp_path / "old.db"
    build_current_database(path)
    monkeypatch.setattr(talk_server, "SCHEMA_VERSION", old + 1)
    monkeypatch.setattr(talk_server, "MIGRATIONS", [*talk_server.MIGRATIONS, ADD_DESCRIPTION])
    open_db(path).close()
    open_db(path)  # the ALTER TABLE would fail if it ran twice
    assert user_version(path) == old + 1


def test_failed_migration_leaves_the_old_version(tmp_path, monkeypatch):
    old = talk_server.SCHEMA_VERSION
    path = tmp_path / "old.db"
    build_current_database(path)
    broken = ADD_DESCRIPTION + "\nALTER TABLE no_such_table ADD COLUMN x TEXT;"
    monkeypatch.setattr(talk_server, "SCHEMA_VERSION", old + 1)
    monkeypatch.setattr(talk_server, "MIGRATIONS", [*talk_server.MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        talk_server.Database(path)
    assert user_version(path) == old
    conn = raw(path)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(rooms)")]
        assert "topic" not in columns
        assert conn.execute("SELECT name FROM rooms").fetchall() == [("Old room",)]
    finally:
        conn.close()


def test_new_database_skips_migrations(tmp_path, monkeypatch, open_db):
    """A new database is made from schema.sql alone, which is already current."""
    monkeypatch.setattr(talk_server, "MIGRATIONS", ["THIS IS NOT SQL;"])
    open_db(tmp_path / "fresh.db")
    assert user_version(tmp_path / "fresh.db") == talk_server.SCHEMA_VERSION


V1_SCHEMA = Path(__file__).resolve().parent / "data" / "schema_v1.sql"


def build_v1_database(path):
    """A database as talk-server 0.1 (schema version 1) left it, with a call in a room."""
    conn = raw(path)
    conn.executescript(V1_SCHEMA.read_text(encoding="utf-8"))
    conn.executescript(
        """
        PRAGMA foreign_keys = ON;
        INSERT INTO users (id, display_name, password_hash) VALUES ('alice', 'Alice', 'x');
        INSERT INTO rooms (id, token, type, name, last_activity)
        VALUES (7, 'abcdefgh', 3, 'Old room', 1700000000);
        INSERT INTO participants (id, room_id, user_id, participant_type, last_ping)
        VALUES (3, 7, 'alice', 1, 1700000005);
        INSERT INTO sessions (id, participant_id, in_call) VALUES ('s1', 3, 1);
        INSERT INTO messages (room_id, seq, actor_type, actor_id, timestamp, message)
        VALUES (7, 1, 'users', 'alice', 1700000001, 'hello');
        INSERT INTO signaling (recipient, sender, data, created) VALUES ('s1', 's1', '{}', 1);
        """
    )
    conn.close()
    assert user_version(path) == 1


def test_version_1_database_is_migrated_keeping_its_data(tmp_path, open_db):
    path = tmp_path / "v1.db"
    build_v1_database(path)
    database = open_db(path)
    assert user_version(path) == talk_server.SCHEMA_VERSION
    with database.read() as db:
        room = talk_server.room_by_token(db, "abcdefgh")
        assert (room["name"], room["type"], room["created"]) == ("Old room", 3, 1700000000)
        session = talk_server.session_by_id(db, "s1")
        assert (session["room_id"], session["in_call"], session["user_id"]) == (7, 1, "alice")
        assert db.execute("SELECT last_ping FROM sessions").fetchone()[0] == 1700000005
        assert db.execute("SELECT message FROM messages").fetchone()[0] == "hello"
        assert db.execute("SELECT COUNT(*) FROM signaling").fetchone()[0] == 1
        assert talk_server.get_user(db, "alice")["display_name"] == "Alice"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    with database.write() as db:  # the cascades still hold after the rebuild
        talk_server.delete_room(db, 7)
    with database.read() as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM signaling").fetchone()[0] == 0


def test_migrated_version_1_database_matches_a_new_one(tmp_path, open_db):
    """Every table and column of schema.sql is there after migrating, in the same form."""

    def shape(path):
        conn = raw(path)
        try:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            indexes = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
            columns = {t: sorted(tuple(c)[1:] for c in conn.execute(f"PRAGMA table_info({t})"))
                       for t in tables}
            keys = {t: sorted(tuple(k)[2:] for k in conn.execute(f"PRAGMA foreign_key_list({t})"))
                    for t in tables}
            return tables, indexes, columns, keys
        finally:
            conn.close()

    build_v1_database(tmp_path / "old.db")
    open_db(tmp_path / "old.db")
    open_db(tmp_path / "new.db")
    assert shape(tmp_path / "old.db") == shape(tmp_path / "new.db")


def test_new_and_migrated_databases_use_incremental_vacuum(tmp_path, open_db):
    """The file can shrink after deletions (issue 14): a new database from its
    first page, an old one after the one VACUUM its migration runs."""
    build_v1_database(tmp_path / "old.db")
    for name in ("new.db", "old.db"):
        open_db(tmp_path / name)
        conn = raw(tmp_path / name)
        try:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2, name
        finally:
            conn.close()
    assert "PRAGMA auto_vacuum = INCREMENTAL;" in SCHEMA.read_text(encoding="utf-8")
    assert "PRAGMA auto_vacuum = INCREMENTAL;" in talk_server.MIGRATIONS[0]


@pytest.mark.parametrize("durability, level", [("full", 2), ("normal", 1)])
def test_every_connection_syncs_as_its_durability_says(tmp_path, durability, level):
    """FULL (2) syncs the WAL on every commit; NORMAL (1) may lose the last
    commits on power loss; never OFF (0), which may corrupt the file."""
    database = talk_server.Database(tmp_path / "talk.db", durability)
    try:
        with database.write() as db:
            assert db.execute("PRAGMA synchronous").fetchone()[0] == level
        with database.read() as db:
            assert db.execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        database.close()
    app = talk_server.make_app(tmp_path / "app.db")
    try:
        with app.talk.db.read() as db:
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # the default is full
    finally:
        app.talk.close()
