"""The command line (SPEC 9): users, groups, the admin bootstrap, and real server processes."""

import base64
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

import talk_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "cli.db")


@pytest.fixture
def talk(db, capsys):
    """Run `talk-server ARGS --db DB` in-process; returns stdout."""

    def run(*args):
        talk_server.main([*args, "--db", db])
        return capsys.readouterr().out

    return run


@pytest.fixture
def fails(db, capsys):
    """Run a command that must fail; returns its one line on stderr."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            talk_server.main([*args, "--db", db])
        assert exit_info.value.code not in (0, None)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        return lines[0]

    return run


def read_db(db):
    """A Database on the file, for checking what the commands did."""
    return talk_server.Database(db)


def user_row(db, user_id):
    database = read_db(db)
    try:
        with database.read() as conn:
            row = talk_server.get_user(conn, user_id)
            return None if row is None else dict(row)
    finally:
        database.close()


def groups_of(db, user_id):
    database = read_db(db)
    try:
        with database.read() as conn:
            return talk_server.groups_of(conn, user_id)
    finally:
        database.close()


def users_in(output):
    return [line.split("\t")[0] for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------


def test_user_add_with_password(talk, db):
    out = talk("user", "add", "erin", "--password", "pw", "--display-name", "Erin E.")
    assert "erin" in out
    row = user_row(db, "erin")
    assert row["display_name"] == "Erin E."
    assert talk_server.check_password(row["password_hash"], "pw")
    assert not talk_server.check_password(row["password_hash"], "other")


def test_user_add_reads_password_from_stdin_when_not_a_tty(talk, db, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-stdin\n"))
    talk("user", "add", "erin")
    assert talk_server.check_password(user_row(db, "erin")["password_hash"], "from-stdin")


def test_user_add_with_empty_stdin_fails(fails, db, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert "password" in fails("user", "add", "erin")
    assert user_row(db, "erin") is None


def test_user_add_with_empty_password_fails(fails, db):
    assert "password" in fails("user", "add", "erin", "--password", "")
    assert user_row(db, "erin") is None


def test_user_add_with_invalid_id_fails(fails):
    assert fails("user", "add", "a/b", "--password", "pw")


def test_user_list(talk):
    talk("user", "add", "erin", "--password", "pw", "--display-name", "Erin")
    talk("user", "add", "bob", "--password", "pw")
    talk("group", "add", "team")
    talk("group", "add-member", "team", "erin")
    out = talk("user", "list")
    assert users_in(out) == ["bob", "erin"]
    assert out.splitlines()[1].split("\t")[:2] == ["erin", "Erin"]
    assert "team" in out.splitlines()[1]


def test_user_list_of_empty_database_prints_nothing(talk):
    assert talk("user", "list") == ""


def test_duplicate_user_fails(talk, fails, db):
    talk("user", "add", "erin", "--password", "pw")
    line = fails("user", "add", "erin", "--password", "other")
    assert "erin" in line and "exists" in line
    assert talk_server.check_password(user_row(db, "erin")["password_hash"], "pw")


def test_user_passwd(talk, db):
    talk("user", "add", "erin", "--password", "old")
    talk("user", "passwd", "erin", "--password", "new")
    stored = user_row(db, "erin")["password_hash"]
    assert talk_server.check_password(stored, "new")
    assert not talk_server.check_password(stored, "old")


def test_user_passwd_from_stdin(talk, db, monkeypatch):
    talk("user", "add", "erin", "--password", "old")
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped\n"))
    talk("user", "passwd", "erin")
    assert talk_server.check_password(user_row(db, "erin")["password_hash"], "piped")


def test_user_rename(talk, db):
    talk("user", "add", "erin", "--password", "pw")
    talk("user", "rename", "erin", "Erin Example")
    assert user_row(db, "erin")["display_name"] == "Erin Example"


def test_user_rename_to_blank_fails(talk, fails, db):
    talk("user", "add", "erin", "--password", "pw", "--display-name", "Erin")
    assert fails("user", "rename", "erin", "   ")
    assert user_row(db, "erin")["display_name"] == "Erin"


def test_user_delete(talk, db):
    talk("user", "add", "erin", "--password", "pw")
    talk("user", "delete", "erin")
    assert user_row(db, "erin") is None
    assert users_in(talk("user", "list")) == []


def test_user_delete_removes_their_one_to_one_rooms(talk, db):
    talk("user", "add", "erin", "--password", "pw")
    talk("user", "add", "fred", "--password", "pw")
    database = read_db(db)
    try:
        with database.write() as conn:
            room = talk_server.create_room(conn, talk_server.ROOM_ONE_TO_ONE, "", 0)
            for user_id in ("erin", "fred"):
                talk_server.add_participant(conn, room["id"], talk_server.OWNER, 0, user_id=user_id)
    finally:
        database.close()
    talk("user", "delete", "erin")
    database = read_db(db)
    try:
        with database.read() as conn:
            assert talk_server.room_by_token(conn, room["token"]) is None
    finally:
        database.close()


@pytest.mark.parametrize(
    "args",
    [
        ("user", "delete", "nobody"),
        ("user", "passwd", "nobody", "--password", "pw"),
        ("user", "rename", "nobody", "No Body"),
    ],
)
def test_unknown_user_fails(fails, args):
    assert "nobody" in fails(*args)


def test_error_line_names_the_program(fails):
    assert fails("user", "delete", "nobody").startswith("talk-server: ")


# ---------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------


def test_group_add_list_members_and_delete(talk, db):
    talk("user", "add", "erin", "--password", "pw")
    talk("user", "add", "fred", "--password", "pw")
    talk("group", "add", "team")
    talk("group", "add", "admin")
    talk("group", "add-member", "team", "erin")
    talk("group", "add-member", "team", "fred")
    talk("group", "add-member", "admin", "fred")
    assert talk("group", "list").splitlines() == ["admin\tfred", "team\terin,fred"]
    assert groups_of(db, "fred") == ["admin", "team"]
    talk("group", "remove-member", "team", "fred")
    assert talk("group", "list").splitlines() == ["admin\tfred", "team\terin"]
    talk("group", "delete", "team")
    assert talk("group", "list").splitlines() == ["admin\tfred"]
    assert groups_of(db, "erin") == []
    assert user_row(db, "erin") is not None


def test_group_list_of_empty_database_prints_nothing(talk):
    assert talk("group", "list") == ""


def test_duplicate_group_fails(talk, fails):
    talk("group", "add", "team")
    assert "team" in fails("group", "add", "team")


def test_invalid_group_id_fails(fails):
    assert fails("group", "add", "a/b")


@pytest.mark.parametrize(
    "args",
    [
        ("group", "delete", "nogroup"),
        ("group", "add-member", "nogroup", "erin"),
        ("group", "remove-member", "nogroup", "erin"),
    ],
)
def test_unknown_group_fails(talk, fails, args):
    talk("user", "add", "erin", "--password", "pw")
    assert "nogroup" in fails(*args)


@pytest.mark.parametrize("action", ["add-member", "remove-member"])
def test_group_member_unknown_user_fails(talk, fails, action):
    talk("group", "add", "team")
    assert "nobody" in fails("group", action, "team", "nobody")


def test_missing_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        talk_server.main(["user", "add"])
    assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        talk_server.main(["--version"])
    assert exit_info.value.code == 0
    assert talk_server.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The admin bootstrap and demo users
# ---------------------------------------------------------------------------


@pytest.fixture
def database(db):
    database = talk_server.Database(db)
    yield database
    database.close()


def is_admin(database, user_id):
    with database.read() as conn:
        return talk_server.is_admin(conn, user_id)


def password_ok(database, user_id, password):
    with database.read() as conn:
        row = talk_server.get_user(conn, user_id)
        return row is not None and talk_server.check_password(row["password_hash"], password)


def test_admin_password_from_environment(database, monkeypatch):
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "chosen")
    monkeypatch.delenv("TALK_ADMIN_USER", raising=False)
    lines = talk_server.bootstrap_accounts(database, demo=False)
    assert not any("chosen" in line for line in lines)
    assert password_ok(database, "admin", "chosen")
    assert is_admin(database, "admin")


def test_admin_user_name_from_environment(database, monkeypatch):
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "chosen")
    monkeypatch.setenv("TALK_ADMIN_USER", "root")
    talk_server.bootstrap_accounts(database, demo=False)
    assert password_ok(database, "root", "chosen")
    assert is_admin(database, "root")
    with database.read() as conn:
        assert talk_server.get_user(conn, "admin") is None


def test_admin_password_from_environment_does_not_undo_later_changes(database, monkeypatch):
    """Issue 14: the variable creates the account once; a password changed
    and a group left afterwards stay so at the next start, which says so."""
    monkeypatch.delenv("TALK_ADMIN_USER", raising=False)
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "first")
    (line,) = talk_server.bootstrap_accounts(database, demo=False)
    assert "created administrator 'admin'" in line and "first" not in line
    with database.write() as conn:
        talk_server.set_password_hash(conn, "admin", talk_server.hash_password("changed"))
        talk_server.create_user(conn, "root", talk_server.hash_password("x"), "Root")
        talk_server.add_to_group(conn, "admin", "root")
        talk_server.remove_from_group(conn, "admin", "admin")
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "second")
    (line,) = talk_server.bootstrap_accounts(database, demo=False)
    assert "exists" in line and "left as they are" in line
    assert password_ok(database, "admin", "changed")
    assert not password_ok(database, "admin", "second")
    assert not is_admin(database, "admin")


def test_admin_password_leaves_an_existing_user_alone(database, monkeypatch):
    with database.write() as conn:
        talk_server.create_user(conn, "admin", talk_server.hash_password("x"), "Boss")
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "chosen")
    monkeypatch.delenv("TALK_ADMIN_USER", raising=False)
    talk_server.bootstrap_accounts(database, demo=False)
    assert not is_admin(database, "admin")
    assert password_ok(database, "admin", "x")


def test_empty_database_without_password_gets_random_admin_once(database, monkeypatch):
    monkeypatch.delenv("TALK_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("TALK_ADMIN_USER", raising=False)
    lines = talk_server.bootstrap_accounts(database, demo=False)
    assert len(lines) == 1
    match = re.search(r"password '([^']+)'", lines[0])
    assert match, lines[0]
    password = match.group(1)
    assert len(password) >= 12
    assert password_ok(database, "admin", password)
    assert is_admin(database, "admin")
    # The next start does not make or print another one.
    assert talk_server.bootstrap_accounts(database, demo=False) == []
    assert password_ok(database, "admin", password)


def test_random_admin_passwords_differ(tmp_path, monkeypatch):
    monkeypatch.delenv("TALK_ADMIN_PASSWORD", raising=False)
    passwords = set()
    for name in ("a.db", "b.db"):
        database = talk_server.Database(tmp_path / name)
        try:
            (line,) = talk_server.bootstrap_accounts(database, demo=False)
        finally:
            database.close()
        passwords.add(re.search(r"password '([^']+)'", line).group(1))
    assert len(passwords) == 2


def test_database_with_users_gets_no_random_admin(database, monkeypatch):
    monkeypatch.delenv("TALK_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("TALK_ADMIN_USER", raising=False)
    with database.write() as conn:
        talk_server.create_user(conn, "erin", talk_server.hash_password("x"))
    assert talk_server.bootstrap_accounts(database, demo=False) == []
    with database.read() as conn:
        assert talk_server.get_user(conn, "admin") is None


def test_demo_users(database, monkeypatch):
    monkeypatch.setenv("TALK_ADMIN_PASSWORD", "chosen")
    lines = talk_server.bootstrap_accounts(database, demo=True)
    for user_id, display_name in (("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol")):
        assert password_ok(database, user_id, f"{user_id}-demo")
        with database.read() as conn:
            assert talk_server.get_user(conn, user_id)["display_name"] == display_name
        assert not is_admin(database, user_id)
        assert any(f"{user_id}/{user_id}-demo" in line for line in lines)


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url, headers=None, timeout=5):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def wait_until_up(url, proc, limit=10.0):
    """Poll status.php until it answers; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"server exited with {proc.returncode}: {out}\n{err}")
        try:
            status, body = get(url + "/status.php", timeout=1)
        except OSError:
            time.sleep(0.02)
            continue
        assert status == 200
        assert json.loads(body)["productname"] == "talk-server"
        return time.monotonic() - started
    pytest.fail(f"server did not answer within {limit} s")


class Server:
    """A `talk-server serve` subprocess; always stopped and reaped."""

    def __init__(self, command, db, cwd, env=None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        full_env = {**os.environ, **(env or {})}
        for name in ("TALK_ADMIN_PASSWORD", "TALK_ADMIN_USER", "TALK_DB", "TALK_PORT"):
            if name not in (env or {}):
                full_env.pop(name, None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *command,
                "serve",
                "--db",
                str(db),
                "--port",
                str(self.port),
                "--threads",
                "8",
                *extra,
            ],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_until_up(self):
        return wait_until_up(self.url, self.proc)

    def stop(self, timeout=5):
        """SIGTERM; returns (exit code, stdout, stderr, seconds to exit)."""
        asked = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err, time.monotonic() - asked

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def servers():
    started = []

    def start(*args, **kwargs):
        server = Server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def start_lines(out):
    return [line for line in out.splitlines() if line.startswith("talk-server ")]


@pytest.mark.slow
def test_serve_answers_prints_one_start_line_and_stops_on_sigterm(tmp_path, servers):
    db = tmp_path / "served.db"
    server = servers(
        [sys.executable, str(REPO / "talk_server.py")],
        db,
        cwd=tmp_path,
        env={"TALK_ADMIN_PASSWORD": "chosen"},
    )
    up = server.wait_until_up()
    print(f"\nserve: start to first answer {up:.2f} s")

    headers = {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "Authorization": basic("admin", "chosen"),
    }
    status, body = get(server.url + "/ocs/v2.php/cloud/user", headers)
    assert status == 200
    assert json.loads(body)["ocs"]["data"]["groups"] == ["admin"]

    code, out, err, _ = server.stop()  # stop() waits a bounded time itself
    assert code == 0, err
    (line,) = start_lines(out)
    assert talk_server.__version__ in line
    assert server.url in line
    assert str(db.resolve()) in line
    assert "8 threads" in line
    assert "chosen" not in out + err


@pytest.mark.slow
def test_serve_prints_random_admin_password_once(tmp_path, servers):
    db = tmp_path / "served.db"
    command = [sys.executable, str(REPO / "talk_server.py")]

    first = servers(command, db, cwd=tmp_path)
    first.wait_until_up()
    code, out, err, _ = first.stop()
    assert code == 0, err
    passwords = re.findall(r"password '([^']+)'", out)
    assert len(passwords) == 1, out
    assert len(start_lines(out)) == 1

    second = servers(command, db, cwd=tmp_path)
    second.wait_until_up()
    headers = {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "Authorization": basic("admin", passwords[0]),
    }
    assert get(second.url + "/ocs/v2.php/cloud/user", headers)[0] == 200
    code, out, err, _ = second.stop()
    assert code == 0, err
    assert "password" not in out
    assert len(start_lines(out)) == 1


@pytest.mark.slow
def test_serve_with_demo_users(tmp_path, servers):
    server = servers(
        [sys.executable, str(REPO / "talk_server.py")],
        tmp_path / "demo.db",
        cwd=tmp_path,
        env={"TALK_ADMIN_PASSWORD": "chosen"},
        extra=["--demo"],
    )
    server.wait_until_up()
    headers = {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "Authorization": basic("bob", "bob-demo"),
    }
    status, body = get(server.url + "/ocs/v2.php/cloud/user", headers)
    assert status == 200
    assert json.loads(body)["ocs"]["data"]["display-name"] == "Bob"
    code, out, err, _ = server.stop()
    assert code == 0, err
    assert "bob/bob-demo" in out
    assert len(start_lines(out)) == 1


@pytest.mark.slow
def test_serve_refuses_a_busy_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "talk_server.py"),
                "serve",
                "--db",
                str(tmp_path / "busy.db"),
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            env={**os.environ, "TALK_ADMIN_PASSWORD": "chosen"},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert str(port) in line


@pytest.mark.slow
def test_built_wheel_serves_from_elsewhere(tmp_path, servers):
    """The wheel ships schema.sql and static/ under talk_server_data/."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling is not installed: cannot build the wheel offline")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("talk_server-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    assert "talk_server.py" in names
    assert "talk_server_data/schema.sql" in names
    assert "talk_server_data/static/index.html" in names
    assert not any(name.startswith("tests/") for name in names)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    launcher = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); import talk_server; "
        "assert talk_server.__file__.startswith(sys.path[0]), talk_server.__file__; "
        "talk_server.main()"
    )
    server = servers(
        [sys.executable, "-c", launcher, str(site)],
        elsewhere / "talk.db",
        cwd=elsewhere,
        env={"TALK_ADMIN_PASSWORD": "chosen"},
    )
    server.wait_until_up()
    status, body = get(server.url + "/")
    assert status == 200
    assert b"<html" in body.lower()
    code, out, err, _ = server.stop()
    assert code == 0, err
    assert len(start_lines(out)) == 1


def test_connections_per_address_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("TALK_CONNECTIONS_PER_ADDRESS", raising=False)
    assert talk_server.parse_args(["serve"]).connections_per_address == 32
    assert talk_server.parse_args(
        ["serve", "--connections-per-address", "200"]).connections_per_address == 200
    monkeypatch.setenv("TALK_CONNECTIONS_PER_ADDRESS", "90")
    assert talk_server.parse_args(["serve"]).connections_per_address == 90
