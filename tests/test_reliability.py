"""Reliability: crashes, concurrency, password guessing, limits, clean shutdown.

The crash and shutdown tests run the real command (`talk_server.py serve`) as
a subprocess on a free loopback port; the concurrency test serves the app
from a thread; the throttle and limit tests use WebTest with REMOTE_ADDR set.
Every server, process and thread is stopped or joined before a test ends.
"""

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import webtest
from conftest import API, CLOUD, PASSWORD, Client, Clock

import talk_server

pytestmark = pytest.mark.slow

SERVER_SCRIPT = Path(talk_server.__file__).resolve()


# --- Helpers -----------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_users(db_path, *names):
    """Create users with the command line, as an operator would."""
    for name in names:
        talk_server.main(["user", "add", name, "--password", PASSWORD, "--db", str(db_path)])


class Server:
    """`talk_server.py serve` in a subprocess; stop() always leaves no process behind."""

    def __init__(self, db_path, log_path, threads=16):
        self.port = free_port()
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "TALK_ADMIN_PASSWORD": "admin-secret", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, str(SERVER_SCRIPT), "serve", "--db", str(db_path)]
        command += ["--port", str(self.port), "--threads", str(threads)]
        # These tests send hundreds of messages from one client: no rate limit.
        command += ["--chat-per-minute", "1000000", "--signaling-per-minute", "1000000"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log, env=env)
        self.log_path = log_path
        self._wait_ready()

    def _wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise AssertionError(f"server exited: {Path(self.log_path).read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/status.php")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError("server did not start")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.log.close()


class Http:
    """One keep-alive connection to a real server: Basic auth or a guest cookie."""

    def __init__(self, port, user=None, password=PASSWORD):
        self.port = port
        self.conn = None
        self.cookie = None
        self.headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
        if user is not None:
            raw = f"{user}:{password}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()

    def call(self, method, path, params=None, timeout=30, prefix=API):
        """(status, envelope, raw body) of one request; raises OSError when the server is gone."""
        url = prefix + path
        body = None
        headers = dict(self.headers)
        if method == "GET":
            if params:
                url += "?" + urllib.parse.urlencode(params)
        else:
            body = urllib.parse.urlencode(params or {}).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookie:
            headers["Cookie"] = self.cookie
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.conn.timeout = timeout
        try:
            self.conn.request(method, url, body=body, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        cookie = response.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";")[0]
        document = json.loads(raw) if raw.startswith(b"{") else None
        return response.status, document, raw

    def expect(self, method, path, params=None, status=200, **kw):
        actual, document, raw = self.call(method, path, params, **kw)
        assert actual == status, (method, path, actual, raw[:300])
        return document["ocs"]["data"]

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def all_messages(client, token):
    """Every message of a room, oldest first, paging with offset (1000 an answer)."""
    messages = []
    while True:
        page = client.expect("GET", f"/chat/{token}", {"timeout": 0, "offset": len(messages)})
        if not page:
            return messages
        assert len(page) <= talk_server.CHAT_PAGE_MAX
        messages.extend(reversed(page))  # each answer is newest first


class Worker(threading.Thread):
    """A thread that records its exception instead of losing it."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self._target_fn, self._args, self.error = target, args, None

    def run(self):
        try:
            self._target_fn(*self._args)
        except BaseException as error:  # noqa: BLE001 (re-raised by the test)
            self.error = error


def join_all(threads, timeout=60):
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    errors = [thread.error for thread in threads if thread.error]
    if errors:
        raise errors[0]


# --- Crash safety ------------------------------------------------------------


def test_every_answered_message_survives_sigkill_exactly_once_in_order(tmp_path):
    db = tmp_path / "crash.db"
    add_users(db, "alice", "bob", "carol")
    server = Server(db, tmp_path / "server.log")
    senders = {}
    threads = []
    stop = threading.Event()
    try:
        alice = Http(server.port, "alice")
        token = alice.expect("POST", "/room", {"roomType": 2, "roomName": "Crash"}, 201)["token"]
        for user in ("bob", "carol"):
            alice.expect("POST", f"/room/{token}/participants", {"newParticipant": user})
        guest = Http(server.port)
        alice.expect("POST", f"/room/{token}/public")
        guest.expect("POST", f"/room/{token}/participants/active")
        clients = {
            "alice": alice,
            "alice2": Http(server.port, "alice"),
            "bob": Http(server.port, "bob"),
            "carol": Http(server.port, "carol"),
            "guest": guest,
        }

        def stream(name):
            acked = senders[name] = []
            client = clients[name]
            n = 0
            while not stop.is_set():
                try:
                    status, document, raw = client.call(
                        "POST", f"/chat/{token}", {"message": f"{name}:{n}"}, timeout=10
                    )
                except (OSError, http.client.HTTPException):
                    return  # the server died under us: that message may or may not be there
                assert status == 201, raw
                acked.append((n, document["ocs"]["data"]["id"]))
                n += 1

        threads = [Worker(stream, name) for name in clients]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(senders) == len(clients) and min(len(a) for a in senders.values()) >= 40:
                break
            time.sleep(0.01)
        os.kill(server.process.pid, signal.SIGKILL)  # mid-stream: every sender is busy
        server.process.wait(10)
        stop.set()
        join_all(threads, timeout=20)
    finally:
        stop.set()
        server.stop()
        for thread in threads:
            thread.join(20)

    assert min(len(a) for a in senders.values()) >= 40, "the senders never got going"
    server = Server(db, tmp_path / "server.log")
    try:
        stored = all_messages(Http(server.port, "alice"), token)
    finally:
        server.stop()

    texts = [m["message"] for m in stored]
    assert len(texts) == len(set(texts)), "a message was stored twice"
    ids = [m["id"] for m in stored]
    assert ids == sorted(ids)
    by_id = {m["id"]: m["message"] for m in stored}
    for name, acked in senders.items():
        for n, message_id in acked:
            assert by_id.get(message_id) == f"{name}:{n}", f"answered {name}:{n} is lost"
        mine = [int(t.split(":")[1]) for t in texts if t.split(":")[0] == name]
        # In order, no gaps; at most the one message in flight at the kill beyond.
        assert mine == list(range(len(mine)))
        assert len(acked) <= len(mine) <= len(acked) + 1, name


# --- Concurrency -------------------------------------------------------------


def test_parallel_writers_and_room_traffic_lose_nothing(tmp_path, password_hash):
    writers, per_writer = 20, 200
    db = tmp_path / "busy.db"
    app = talk_server.make_app(db)
    with app.talk.db.write() as conn:
        for user in ["alice", "bob", "carol", "dave"] + [f"w{i:02}" for i in range(writers)]:
            talk_server.create_user(conn, user, password_hash, user)
    app.talk.close()
    bad = []  # every 5xx or "database is locked" answer
    answers = {}
    stop = threading.Event()
    threads = []

    def check(status, raw, expected):
        if status >= 500 or b"database is locked" in raw or status != expected:
            bad.append((status, raw[:200]))

    # A load test, not a rate-limit test: the chat limits are lifted. How
    # fast it runs is for bench/ to say, not for an assertion here.
    with talk_server.serve_in_thread(db, threads=32, chat_per_minute=10**9) as base:
        port = int(base.rsplit(":", 1)[1])
        alice = Http(port, "alice")
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Busy"}, 201)["token"]
        others = [
            alice.expect("POST", "/room", {"roomType": 3, "roomName": f"R{i}"}, 201)["token"]
            for i in range(3)
        ]

        def write(i):
            client = Http(port, f"w{i:02}")
            client.expect("POST", f"/room/{token}/participants/active")
            mine = answers[i] = []
            for n in range(per_writer):
                sent = time.monotonic()
                status, document, raw = client.call(
                    "POST", f"/chat/{token}", {"message": f"w{i:02}:{n}"}
                )
                check(status, raw, 201)
                if status == 201:
                    mine.append((n, document["ocs"]["data"]["id"], sent, time.monotonic()))
            client.close()

        def traffic(user, room):
            client = Http(port, user)
            while not stop.is_set():
                for method, path, expected in (
                    ("POST", f"/room/{room}/participants/active", 200),
                    ("POST", f"/call/{room}/ping", 200),
                    ("POST", f"/call/{room}", 200),
                    ("GET", f"/room/{room}", 200),
                    ("GET", f"/chat/{room}?timeout=0", 200),
                    ("DELETE", f"/call/{room}", 200),
                    ("DELETE", f"/room/{room}/participants/active", 200),
                ):
                    status, _, raw = client.call(method, path)
                    check(status, raw, expected)
            client.close()

        def guest_traffic(room):
            while not stop.is_set():
                client = Http(port)  # a new browser each round
                for method, path, params, expected in (
                    ("POST", f"/room/{room}/participants/active", None, 200),
                    ("POST", f"/chat/{room}", {"message": "hi"}, 201),
                    ("POST", f"/call/{room}/ping", None, 200),
                    ("DELETE", f"/room/{room}/participants/active", None, 200),
                ):
                    status, _, raw = client.call(method, path, params)
                    check(status, raw, expected)
                client.close()

        try:
            threads = [Worker(write, i) for i in range(writers)]
            background = [
                Worker(traffic, "bob", others[0]),
                Worker(traffic, "carol", others[1]),
                Worker(traffic, "dave", others[0]),
                Worker(guest_traffic, others[2]),
            ]
            for thread in threads + background:
                thread.start()
            join_all(threads, timeout=60)
            stop.set()
            join_all(background, timeout=20)
            stored = all_messages(alice, token)
        finally:
            stop.set()
            for thread in threads:
                thread.join(20)
    assert bad == []
    assert len(stored) == writers * per_writer
    ids = [m["id"] for m in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stamps = [m["timestamp"] for m in stored]
    assert stamps == sorted(stamps), "timestamps go backwards in the room"
    text_of = {m["id"]: m["message"] for m in stored}
    sent_all = []
    for i, mine in answers.items():
        assert [n for n, *_ in mine] == list(range(per_writer))
        assert [text_of[message_id] for _, message_id, *_ in mine] == [
            f"w{i:02}:{n}" for n in range(per_writer)
        ]
        writer_ids = [message_id for _, message_id, *_ in mine]
        assert writer_ids == sorted(writer_ids), "a writer's answers are out of order"
        sent_all.extend(mine)
    # Across writers: a message answered before another was sent has a lower id.
    by_answer = sorted(sent_all, key=lambda m: m[3])
    highest, k = 0, 0
    for _, message_id, sent, _ in sorted(sent_all, key=lambda m: m[2]):
        while k < len(by_answer) and by_answer[k][3] < sent:
            highest = max(highest, by_answer[k][1])
            k += 1
        assert message_id > highest, "a later message got an earlier id"


# --- Password guessing -------------------------------------------------------


@pytest.fixture
def guard_clock():
    return Clock()


@pytest.fixture
def guarded(tmp_path, password_hash, guard_clock):
    """An app that tolerates two failed passwords per address (and per user
    name), on a clock the test moves."""
    app = talk_server.make_app(
        tmp_path / "guarded.db", throttle_free_failures=2, clock=guard_clock
    )
    with app.talk.db.write() as db:
        for user in ("alice", "bob"):
            talk_server.create_user(db, user, password_hash, user.capitalize())
    yield app
    app.talk.close()


def login(app, password, address, user="alice"):
    """GET /cloud/user from `address`; the webtest response."""
    raw = f"{user}:{password}".encode()
    headers = {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "Authorization": "Basic " + base64.b64encode(raw).decode(),
    }
    return webtest.TestApp(app).get(
        CLOUD + "/user",
        headers=headers,
        extra_environ={"REMOTE_ADDR": address},
        expect_errors=True,
    )


def assert_throttled(response, at_least=1):
    assert response.status_int == 429
    assert int(response.headers["Retry-After"]) >= at_least
    meta = response.json["ocs"]["meta"]
    assert meta["statuscode"] == 429 and meta["message"]


def test_password_guessing_is_throttled_per_address(guarded, guard_clock):
    attacker, friend = "10.0.0.1", "10.0.0.2"
    assert login(guarded, "guess-1", attacker, user="bob").status_int == 401
    assert login(guarded, "guess-2", attacker, user="bob").status_int == 401
    assert_throttled(login(guarded, "guess-3", attacker, user="bob"))
    # Even the right password waits, from that address...
    assert_throttled(login(guarded, PASSWORD, attacker))
    # ...while another address logs in at once.
    assert login(guarded, PASSWORD, friend).status_int == 200

    guard_clock.advance(1.1)  # the first delay is one second
    assert login(guarded, "guess-3", attacker, user="bob").status_int == 401
    assert_throttled(login(guarded, "guess-4", attacker, user="bob"), at_least=2)  # it doubles
    guard_clock.advance(2.1)
    # alice's login from there (vouched for by the cache since her login
    # from `friend`) passes, but clears nothing of the address's failures.
    assert login(guarded, PASSWORD, attacker).status_int == 200
    assert login(guarded, "guess-5", attacker, user="bob").status_int == 401
    # Had the success reset the address, two more guesses would be free.
    assert_throttled(login(guarded, "guess-6", attacker, user="bob"), at_least=4)
    guard_clock.advance(talk_server.THROTTLE_FORGET + 1)  # an hour later, forgotten
    assert login(guarded, "guess-6", attacker, user="bob").status_int == 401


def proxied_login(base, password, forwarded_for):
    """GET /cloud/user through a (pretend) reverse proxy; the HTTP status."""
    raw = f"alice:{password}".encode()
    host, port = base.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(
            "GET",
            CLOUD + "/user",
            headers={
                "OCS-APIRequest": "true",
                "Accept": "application/json",
                "Authorization": "Basic " + base64.b64encode(raw).decode(),
                "X-Forwarded-For": forwarded_for,
            },
        )
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "no-proxy"])
def test_throttling_behind_a_trusted_proxy_sees_each_client(tmp_path, password_hash, trusted):
    """Behind a reverse proxy every client has the proxy's address: only when
    the proxy is trusted does a guesser leave the others alone."""
    path = tmp_path / "proxied.db"
    app = talk_server.make_app(path)
    with app.talk.db.write() as db:
        talk_server.create_user(db, "alice", password_hash, "Alice")
    app.talk.close()
    proxy = "127.0.0.1" if trusted else None
    with talk_server.serve_in_thread(path, trusted_proxy=proxy, throttle_free_failures=2) as base:
        assert proxied_login(base, "guess-1", "10.0.0.1") == 401
        assert proxied_login(base, "guess-2", "10.0.0.1") == 401
        assert proxied_login(base, "guess-3", "10.0.0.1") == 429
        friend = proxied_login(base, PASSWORD, "10.0.0.2")
        assert friend == (200 if trusted else 429)


def join_room(app, token, address, password, user=None):
    headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
    if user:
        raw = f"{user}:{PASSWORD}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    return webtest.TestApp(app).post(
        f"{API}/room/{token}/participants/active",
        {"password": password},
        headers=headers,
        extra_environ={"REMOTE_ADDR": address},
        expect_errors=True,
    )


@pytest.mark.parametrize("user", [None, "bob"], ids=["guest", "user"])
def test_room_password_guessing_is_throttled_per_address(guarded, guard_clock, user):
    alice = Client(guarded, "alice")
    token = alice.post("/room", {"roomType": 3, "roomName": "Locked"}, status=201).data["token"]
    alice.put(f"/room/{token}/password", {"password": "door"})
    attacker = "10.0.0.3"
    assert join_room(guarded, token, attacker, "guess-1", user).status_int == 403
    assert join_room(guarded, token, attacker, "guess-2", user).status_int == 403
    assert_throttled(join_room(guarded, token, attacker, "guess-3", user))
    assert_throttled(join_room(guarded, token, attacker, "door", user))
    assert join_room(guarded, token, "10.0.0.4", "door", user).status_int == 200
    guard_clock.advance(1.1)
    assert join_room(guarded, token, attacker, "door", user).status_int == 200
    # The right password clears the room's count, not the address's.
    assert_throttled(join_room(guarded, token, attacker, "guess-4", user))


# --- Limits ------------------------------------------------------------------


def test_room_creation_is_limited_per_user_and_minute(tmp_path, password_hash):
    app = talk_server.make_app(tmp_path / "rooms.db", rooms_per_minute=3)
    try:
        with app.talk.db.write() as db:
            for user in ("alice", "bob"):
                talk_server.create_user(db, user, password_hash, user)
        alice, bob = Client(app, "alice"), Client(app, "bob")
        for n in range(3):
            alice.post("/room", {"roomType": 3, "roomName": f"R{n}"}, status=201)
        refused = alice.post("/room", {"roomType": 3, "roomName": "R4"}, status=429)
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.meta["statuscode"] == 429 and refused.meta["message"]
        assert len(alice.get("/room").data) == 3
        bob.post("/room", {"roomType": 2, "roomName": "Bob's"}, status=201)
    finally:
        app.talk.close()


def test_body_size_and_message_length_limits(tmp_path, password_hash):
    app = talk_server.make_app(tmp_path / "body.db", max_body=2000)
    try:
        with app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        alice = Client(app, "alice")
        token = alice.post("/room", {"roomType": 2, "roomName": "Big"}, status=201).data["token"]
        too_big = alice.post(f"/chat/{token}", {"message": "m" * 2500}, status=413)
        assert too_big.meta["statuscode"] == 413 and too_big.meta["message"]
        assert alice.post(f"/chat/{token}", {"message": "m" * 1900}, status=201)
    finally:
        app.talk.close()


def test_message_over_32000_characters_is_400(alice):
    token = alice.post("/room", {"roomType": 2, "roomName": "Long"}, status=201).data["token"]
    refused = alice.post(f"/chat/{token}", {"message": "é" * 32001}, status=400)
    assert refused.meta["message"]
    alice.post(f"/chat/{token}", {"message": "é" * 32000}, status=201)
    alice.post(f"/chat/{token}", {"message": "  " + "x" * 32000 + "  "}, status=201)


def test_a_full_signaling_queue_is_429_until_drained(tmp_path, password_hash):
    app = talk_server.make_app(tmp_path / "queue.db", signaling_queue_max=3, time_scale=0.01)
    try:
        with app.talk.db.write() as db:
            for user in ("alice", "bob"):
                talk_server.create_user(db, user, password_hash, user)
        alice, bob = Client(app, "alice"), Client(app, "bob")
        token = alice.post("/room", {"roomType": 3, "roomName": "Q"}, status=201).data["token"]
        mine = alice.post(f"/room/{token}/participants/active").data["sessionId"]
        theirs = bob.post(f"/room/{token}/participants/active").data["sessionId"]

        def send(status):
            fn = json.dumps({"to": theirs, "type": "candidate"})
            item = {"ev": "message", "fn": fn, "sessionId": mine}
            return alice.post(
                f"/signaling/{token}", {"messages": json.dumps([item])}, status=status
            )

        for _ in range(3):
            send(200)
        full = send(429)
        assert full.meta["statuscode"] == 429 and full.meta["message"]
        delivered = bob.get(f"/signaling/{token}").data
        assert [d["type"] for d in delivered] == ["message"] * 3 + ["usersInRoom"]
        send(200)
    finally:
        app.talk.close()


# --- Clean shutdown ----------------------------------------------------------


def test_a_shutdown_with_a_long_poll_still_queued_ends():
    """Waitress cancels the tasks still queued at shutdown while holding the
    dispatcher's lock; a queued long-poll's slot must not take it again (under
    load, a browser test's server once hung there for good)."""

    class Queued:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    dispatcher = talk_server.LongPollDispatcher(slots=1)
    task = Queued()
    dispatcher.polls = 1  # as add_task counts it
    dispatcher.queue.append(talk_server.PollSlot(dispatcher, task))
    done = threading.Event()
    stopper = threading.Thread(
        target=lambda: (dispatcher.shutdown(timeout=0), done.set()), daemon=True
    )
    stopper.start()
    assert done.wait(30), "shutdown hangs on the queued long-poll"
    stopper.join()
    assert task.cancelled and not dispatcher.queue


def test_sigterm_answers_waiting_polls_and_exits_cleanly(tmp_path):
    db = tmp_path / "term.db"
    add_users(db, "alice", "bob")
    server = Server(db, tmp_path / "server.log")
    results = {}
    threads = []
    try:
        alice, bob = Http(server.port, "alice"), Http(server.port, "bob")
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Term"}, 201)["token"]
        alice.expect("POST", f"/room/{token}/participants/active")
        bob.expect("POST", f"/room/{token}/participants/active")
        sent = [
            alice.expect("POST", f"/chat/{token}", {"message": f"before {n}"}, 201)["id"]
            for n in range(5)
        ]

        def poll(name, client, path, params):
            status, document, _ = client.call("GET", path, params, timeout=70)
            results[name] = (status, document["ocs"]["data"])

        threads = [
            Worker(
                poll,
                "chat",
                Http(server.port, "bob"),
                f"/chat/{token}",
                {"timeout": 60, "offset": 5},
            ),
            Worker(poll, "signaling", Http(server.port, "alice"), f"/signaling/{token}", None),
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # both polls are waiting now
        assert results == {}
        server.process.send_signal(signal.SIGTERM)
        # No elapsed-time bound: the chat poll asked for 60 s and the
        # signaling poll waits 30 s, so answers within join_all's 10 s came
        # from the shutdown, not from the polls' own timeouts.
        join_all(threads, timeout=10)
        code = server.process.wait(5)
    finally:
        server.stop()
        for thread in threads:
            thread.join(10)

    assert code == 0, Path(tmp_path / "server.log").read_text()
    status, data = results["chat"]
    assert (status, data) == (200, [])
    status, data = results["signaling"]
    assert status == 200 and data[-1]["type"] == "usersInRoom"

    server = Server(db, tmp_path / "server.log")
    try:
        stored = all_messages(Http(server.port, "alice"), token)
    finally:
        server.stop()
    assert [m["id"] for m in stored] == sent
    assert [m["message"] for m in stored] == [f"before {n}" for n in range(5)]
