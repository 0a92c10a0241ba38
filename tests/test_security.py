"""Security (issue 14): each weakness a review found by probing a real server.

One section per item of the issue, in its order. Tests that need sockets
(parallel logins, idle connections, Waitress's own answers) start the real
server with serve_in_thread on a free loopback port; the rest use WebTest.
No test measures time: waits end by events, the app's clock or a socket
answer, and each test would fail on the code before the fix.
"""

import base64
import http.client
import http.cookiejar
import json
import os
import socket
import sqlite3
import stat
import threading
import xml.etree.ElementTree as ET

import pytest
from conftest import API, CLOUD, PASSWORD, START, Client
from helpers import create, join, wait_until

import talk_server

V4 = "/ocs/v2.php/apps/spreed/api/v4"


def basic(user, password=PASSWORD):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- 4. TURN credentials only for users and joined guests ---------------------


@pytest.fixture
def turn_app(db_path, clock, password_hash):
    app = talk_server.make_app(
        db_path, clock=clock, time_scale=0.01, turn_server="turn.example.org:3478",
        turn_secret="s3cret",
    )
    with app.talk.db.write() as db:
        talk_server.create_user(db, "alice", password_hash, "Alice")
    yield app
    app.talk.close()


def test_anonymous_callers_get_no_turn_credentials(turn_app):
    anonymous = Client(turn_app)
    data = anonymous.get("/signaling/settings", status=200).data
    assert data["turnservers"] == []
    assert data["stunservers"]  # STUN gives nothing away


def test_users_and_joined_guests_get_turn_credentials_for_hours(turn_app, clock):
    alice, guest = Client(turn_app, "alice"), Client(turn_app)
    token = create(alice, 3, roomName="Open")
    assert guest.get("/signaling/settings", status=200).data["turnservers"] == []
    join(guest, token)  # a cookie and a session now
    for client in (alice, guest):
        turn = client.get("/signaling/settings", status=200).data["turnservers"]
        assert len(turn) == 2
        expiry = int(turn[0]["username"].split(":")[0])
        assert clock() < expiry <= clock() + 6 * 3600


# --- 5. Guest cookies: only server-issued, renewed at the room password -------


def as_browser(app, cookie=None):
    """A client whose guest cookie is exactly `cookie` (sent by hand: WebTest's
    jar would not send a cookie planted for another host)."""
    client = Client(app)
    client.test.cookiejar.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    if cookie:
        client.headers["Cookie"] = f"{talk_server.GUEST_COOKIE}={cookie}"
    return client


def issued_cookie(response):
    """The guest cookie a response set, or None."""
    for name, value in response.headerlist:
        if name == "Set-Cookie" and value.startswith(talk_server.GUEST_COOKIE + "="):
            return value.split(";")[0].split("=", 1)[1]
    return None


def test_a_client_chosen_guest_cookie_is_not_an_identity(app, alice):
    token = create(alice, 3, roomName="Open")
    planted = "A" * 43
    response = as_browser(app, planted).post(f"/room/{token}/participants/active")
    issued = issued_cookie(response)
    assert issued and issued != planted  # the server made its own
    # Whoever chose the value has no row, so no chat; the issued cookie has.
    as_browser(app, planted).get(f"/chat/{token}", {"timeout": 0}, status=404)
    as_browser(app, issued).get(f"/chat/{token}", {"timeout": 0}, status=200)


def test_a_room_password_gives_the_guest_a_new_identity(app, alice):
    """A planted (server-issued) cookie stops working once the victim enters
    a room password: the attacker cannot read the room the victim entered."""
    lobby = create(alice, 3, roomName="Lobby")
    secret_room = create(alice, 3, roomName="Secret")
    alice.put(f"/room/{secret_room}/password", {"password": "letmein"}, status=200)
    planted = issued_cookie(as_browser(app).post(f"/room/{lobby}/participants/active"))
    response = as_browser(app, planted).post(
        f"/room/{secret_room}/participants/active", {"password": "letmein"}
    )
    renewed = issued_cookie(response)
    assert renewed and renewed != planted
    victim, attacker = as_browser(app, renewed), as_browser(app, planted)
    victim.post(f"/chat/{secret_room}", {"message": "for the room only"}, status=201)
    attacker.get(f"/chat/{secret_room}", {"timeout": 0}, status=404)
    attacker.get(f"/room/{secret_room}/participants", status=404)
    # The victim keeps the rows of its old identity (the lobby) under the new one.
    victim.get(f"/chat/{lobby}", {"timeout": 0}, status=200)
    attacker.get(f"/chat/{lobby}", {"timeout": 0}, status=404)


def test_cookies_are_secure_behind_an_https_proxy(app, alice):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    response = guest.post(
        f"/room/{token}/participants/active", status=200,
        headers={},
    )
    assert "secure" not in response.headers["Set-Cookie"].lower()
    guest = Client(app)
    guest.test.extra_environ = {"wsgi.url_scheme": "https"}
    response = guest.post(f"/room/{token}/participants/active", status=200)
    assert "; secure" in response.headers["Set-Cookie"].lower()


def test_guest_cookies_are_secure_through_a_trusted_https_proxy_over_http(tmp_path):
    with talk_server.serve_in_thread(tmp_path / "t.db", trusted_proxy="127.0.0.1") as url:
        with url.app.talk.db.write() as db:
            talk_server.create_user(db, "alice", talk_server.hash_password("pw"), "Alice")
        conn = http.client.HTTPConnection(url.split("//")[1])
        headers = {"OCS-APIRequest": "true", "Accept": "application/json",
                   "Authorization": basic("alice", "pw")}
        conn.request("POST", API + "/room", "roomType=3&roomName=Open",
                     {**headers, "Content-Type": "application/x-www-form-urlencoded"})
        token = json.loads(conn.getresponse().read())["ocs"]["data"]["token"]
        conn.request("POST", API + f"/room/{token}/participants/active", headers={
            "OCS-APIRequest": "true", "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "203.0.113.9"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert "; secure" in response.getheader("Set-Cookie").lower()
        conn.close()


# --- 6. A password room's participants ----------------------------------------


def test_a_password_rooms_participants_are_hidden_until_the_password(app, alice, guest, dave):
    token = create(alice, 3, roomName="Open")
    alice.put(f"/room/{token}/password", {"password": "pw"}, status=200)
    guest.get(f"/room/{token}/participants", status=404)
    dave.get(f"/room/{token}/participants", status=404)
    assert guest.get(f"/room/{token}", status=200).data["hasPassword"] is True
    join(guest, token, password="pw")
    assert [row["participantType"] for row in guest.get(f"/room/{token}/participants").data] == [
        1, 4,
    ]
    # Without a password the list stays open to anyone who sees the room (SPEC 4).
    alice.put(f"/room/{token}/password", {"password": ""}, status=200)
    dave.get(f"/room/{token}/participants", status=200)


# --- 7. Control characters ----------------------------------------------------


@pytest.mark.parametrize("bad", ["\x01", "\x1b[31m", "a\x00b", "x\x0by"])
def test_control_characters_are_refused_on_input(app, alice, bad):
    token = create(alice, 3, roomName="Open")
    join(alice, token)
    alice.post(f"/chat/{token}", {"message": f"hi {bad}"}, status=400)
    alice.put(f"/room/{token}", {"roomName": f"name {bad}"}, status=400)
    alice.put("/users/bob", {"key": "displayname", "value": f"Bob {bad}"}, prefix=CLOUD,
              status=400)
    alice.post("/room", {"roomType": 3, "roomName": bad}, status=400)
    assert alice.get(f"/chat/{token}", {"timeout": 0}).data == []
    assert alice.get(f"/room/{token}").data["name"] == "Open"
    assert alice.get("/users/bob", prefix=CLOUD).data["displayname"] == "Bob"
    # Tab, newline and carriage return stay allowed.
    alice.post(f"/chat/{token}", {"message": "a\tb\r\nc"}, status=201)


def test_stored_control_characters_never_break_an_xml_answer(app, alice):
    """A value stored before the rule (or by the command line) is sent as U+FFFD."""
    token = create(alice, 3, roomName="Open")
    join(alice, token)
    with app.talk.db.write() as db:
        room = talk_server.room_by_token(db, token)
        talk_server.add_message(db, room["id"], "users", "alice", "bell\x07 esc\x1b", START)
        talk_server.set_display_name(db, "alice", "Al\x01ice")
    headers = {"Accept": "application/xml"}
    for path in (f"/chat/{token}", f"/room/{token}", "/room", f"/room/{token}/participants"):
        response = alice.get(path, {"timeout": 0, "format": "xml"}, headers=headers)
        document = ET.fromstring(response.body)  # raises on an invalid character
        assert document.findtext("meta/statuscode") == "200"
    text = ET.fromstring(alice.get(f"/chat/{token}", {"timeout": 0, "format": "xml"}).body)
    assert text.findtext("data/element/message") == "bell\ufffd esc\ufffd"


# --- 8. Group rooms only from one's own groups ----------------------------------


def test_a_user_cannot_build_a_room_from_a_group_they_are_not_in(app, alice, bob, carol):
    for group, members in (("team", ("carol",)), ("admin", ())):
        if group != "admin":
            alice.post("/groups", {"groupid": group}, prefix=CLOUD)
        for user in members:
            alice.post(f"/users/{user}/groups", {"groupid": group}, prefix=CLOUD)
    bob.post("/room", {"roomType": 2, "invite": "admin"}, status=404)
    bob.post("/room", {"roomType": 2, "invite": "team"}, status=404)
    with app.talk.db.read() as db:
        assert db.execute("SELECT COUNT(*) FROM rooms").fetchone()[0] == 0
    # A member of the group may, and an administrator may use any group.
    token = create(carol, 2, invite="team")
    assert [r["userId"] for r in carol.get(f"/room/{token}/participants").data] == ["carol"]
    token = create(alice, 2, invite="team")
    assert sorted(r["userId"] for r in alice.get(f"/room/{token}/participants").data) == [
        "alice", "carol",
    ]


def test_adding_a_foreign_group_on_v4_is_404(app, alice, bob):
    alice.post("/groups", {"groupid": "admin2"}, prefix=CLOUD)
    alice.post("/users/carol/groups", {"groupid": "admin2"}, prefix=CLOUD)
    token = create(bob, 3, roomName="Bob's")
    bob.post(f"/room/{token}/participants", {"newParticipant": "admin", "source": "groups"},
             prefix=V4, status=404)
    bob.post(f"/room/{token}/participants", {"newParticipant": "admin2", "source": "groups"},
             prefix=V4, status=404)
    assert [r["userId"] for r in bob.get(f"/room/{token}/participants").data] == ["bob"]


# --- 9. The last administrator stays one -------------------------------------


def test_an_administrator_cannot_delete_themselves(app, alice, make_client):
    response = alice.delete("/users/alice", prefix=CLOUD, status=400)
    assert response.meta["statuscode"] == 400
    v1 = make_client("alice", prefix="/ocs/v1.php/cloud")
    assert v1.delete("/users/alice", status=200).meta["statuscode"] == 101
    assert alice.get("/users/alice", prefix=CLOUD, status=200).data["id"] == "alice"


def test_an_administrator_cannot_leave_group_admin(app, alice, make_client):
    alice.delete("/users/alice/groups", {"groupid": "admin"}, prefix=CLOUD, status=400)
    v1 = make_client("alice", prefix="/ocs/v1.php/cloud")
    response = v1.delete("/users/alice/groups", {"groupid": "admin"}, status=200)
    assert response.meta["statuscode"] == 105
    assert alice.get("/groups/admin", prefix=CLOUD).data == {"users": ["alice"]}
    # Another administrator may still be removed by one.
    alice.post("/users/bob/groups", {"groupid": "admin"}, prefix=CLOUD)
    alice.delete("/users/bob/groups", {"groupid": "admin"}, prefix=CLOUD, status=200)


# --- 10. Database files for the owner only -----------------------------------


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_database_files_are_readable_by_the_owner_only(tmp_path, usual_umask):
    path = tmp_path / "talk.db"
    database = talk_server.Database(path)
    try:
        with database.write() as db:
            talk_server.create_user(db, "alice", "x", "Alice")
        for name in ("talk.db", "talk.db-wal", "talk.db-shm"):
            assert mode(tmp_path / name) == 0o600, name
    finally:
        database.close()


def test_backups_are_readable_by_the_owner_only(tmp_path, usual_umask, capsys):
    talk_server.Database(tmp_path / "talk.db").close()
    talk_server.main(["backup", "--db", str(tmp_path / "talk.db"), str(tmp_path / "copy.db")])
    assert mode(tmp_path / "copy.db") == 0o600
    with sqlite3.connect(tmp_path / "copy.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == talk_server.SCHEMA_VERSION


# --- SPEC 9: the 403 comes before any validation -----------------------------


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("POST", "/users", {"userid": "bad/id", "password": ""}),
        ("POST", "/users", {"userid": "alice", "password": "pw"}),
        ("PUT", "/users/alice", {"key": "nonsense", "value": ""}),
        ("PUT", "/users/nobody", {"key": "displayname", "value": "x"}),
        ("POST", "/groups", {"groupid": "bad/id"}),
        ("POST", "/groups", {"groupid": "admin"}),
        ("DELETE", "/groups/admin", None),
    ],
)
def test_non_admins_learn_nothing_from_validation(bob, method, path, params, make_client):
    bob.request(method, path, params, prefix=CLOUD, status=403)
    v1 = make_client("bob", prefix="/ocs/v1.php/cloud")
    assert v1.request(method, path, params, status=200).meta["statuscode"] == 403


# --- 1. Password guessing -------------------------------------------------------


@pytest.fixture
def served(tmp_path, password_hash, clock):
    """A real server on a frozen clock (throttle delays never run out by
    themselves), trusting 127.0.0.1 as its proxy; users admin, bob, carol."""
    path = tmp_path / "served.db"
    with talk_server.serve_in_thread(path, clock=clock, trusted_proxy="127.0.0.1") as url:
        with url.app.talk.db.write() as db:
            for user_id in ("admin", "bob", "carol"):
                talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
            talk_server.create_group(db, "admin")
            talk_server.add_to_group(db, "admin", "admin")
        yield url


def http_get(url, path, user=None, password=PASSWORD, forwarded_for=None, timeout=30):
    """GET over a new connection: (status, parsed JSON or None)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
    if user is not None:
        headers["Authorization"] = basic(user, password)
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, None
    finally:
        conn.close()


def login(url, user, password=PASSWORD, forwarded_for=None):
    return http_get(url, CLOUD + "/user", user, password, forwarded_for)[0]


def in_parallel(count, fn):
    results = [None] * count

    def run(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_parallel_guesses_are_counted_before_they_are_checked(served):
    statuses = in_parallel(40, lambda i: login(served, "admin", f"guess-{i}"))
    assert sorted(statuses) == [401] * 5 + [429] * 35


def test_an_account_holders_success_does_not_clear_their_guesses(served):
    assert login(served, "bob") == 200  # bob signs in: the cache vouches for him now
    for n in range(5):
        assert login(served, "admin", f"guess-{n}") == 401
    assert login(served, "admin", "guess-5") == 429
    assert login(served, "bob") == 200  # not locked out from his own address...
    assert login(served, "admin", "guess-6") == 429  # ...and it cleared nothing


def test_an_ipv6_64_counts_as_one_address(served):
    for n in range(5):
        assert login(served, "carol", f"guess-{n}", forwarded_for=f"2001:db8:1:2::{n + 1}") == 401
    assert login(served, "carol", "guess-5", forwarded_for="2001:db8:1:2:ffff::9") == 429
    # Another /64 (and IPv4) are other addresses.
    assert login(served, "bob", "guess", forwarded_for="2001:db8:1:3::1") == 401
    assert login(served, "bob", forwarded_for="198.51.100.7") == 200


def test_a_user_name_is_throttled_across_addresses(served):
    free = talk_server.THROTTLE_FREE_FAILURES * talk_server.THROTTLE_NAME_FACTOR
    for n in range(free):
        assert login(served, "admin", f"guess-{n}", forwarded_for=f"203.0.113.{n + 1}") == 401
    assert login(served, "admin", "guess", forwarded_for="198.51.100.1") == 429


def test_a_throttled_login_is_refused_without_waiting_for_a_hashing_slot(served):
    """With both hashing slots taken, five guesses (each counted before its
    hash) wait for a slot; the sixth is refused at once."""
    talk = served.app.talk
    stripes = len(talk.credentials._stripes)
    names, seen = [], set()
    for n in range(1000):  # five names on five different stripes: none waits for another
        name = f"user{n}"
        if hash(name) % stripes not in seen:
            seen.add(hash(name) % stripes)
            names.append(name)
        if len(names) == 5:
            break
    slots = talk.credentials._hashing
    slots.acquire()
    slots.acquire()
    waiting = []
    try:
        for name in names:
            thread = threading.Thread(target=lambda name=name: waiting.append(
                login(served, name, "guess")))
            thread.start()
            waiting.append(thread)
        address = talk_server.address_key("127.0.0.1")
        for _ in range(10000):
            with talk.throttle._lock:
                if talk.throttle._failures.get(address, (0, 0))[0] == 5:
                    break
            threading.Event().wait(0.01)
        assert talk.throttle._failures[address][0] == 5, "the guesses were not counted first"
        assert login(served, "admin", "guess") == 429
    finally:
        slots.release()
        slots.release()
    for thread in [t for t in waiting if isinstance(t, threading.Thread)]:
        thread.join(30)
    assert sorted(s for s in waiting if isinstance(s, int)) == [401] * 5


# --- 2. One client cannot make the server unreachable ------------------------


def half_request(url, source="127.0.0.2"):
    """A connection from `source` that sent half a request's headers."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
    sock.sendall(b"GET " + API.encode() + b"/room HTTP/1.1\r\nHost: x\r\n")
    return sock


def closed_by_server(sock) -> bool:
    """Whether the server closed the socket (recv gives EOF); blocks until it
    does or the 30 s socket timeout says it did not."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_one_address_cannot_take_every_connection(tmp_path):
    with talk_server.serve_in_thread(tmp_path / "t.db", per_address=8) as url:
        hoard = [half_request(url) for _ in range(8)]
        extra = half_request(url)
        try:
            assert closed_by_server(extra)
            # Everyone else is served, the hoarder's open requests too.
            assert http_get(url, "/status.php")[0] == 200
        finally:
            for sock in [*hoard, extra]:
                sock.close()
        # Closed connections count no more.
        again = half_request(url)
        again.close()


def test_an_incomplete_request_is_closed_quickly(tmp_path):
    """Waitress alone would keep a trickling request for its channel timeout
    (two minutes); the guard closes it once request_timeout has passed."""
    with talk_server.serve_in_thread(tmp_path / "t.db", request_timeout=0.5) as url:
        sock = half_request(url, source="127.0.0.1")
        try:
            assert closed_by_server(sock)
        finally:
            sock.close()


def test_a_newer_poll_of_the_same_session_answers_the_older(app, alice):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    session = join(guest, token)
    app.talk.notifier.monotonic = lambda: 0.0  # no wait ever times out by itself
    app.talk.notifier.time_scale = 10**6
    answers = []

    def poll():
        answers.append(guest.get(f"/signaling/{token}", status=200).data)

    first = threading.Thread(target=poll)
    first.start()
    wait_until(lambda: app.talk.notifier.waiting == 1)
    second = threading.Thread(target=poll)
    second.start()
    first.join(30)
    assert not first.is_alive(), "the older poll was not answered"
    assert answers[0][-1]["type"] == "usersInRoom"
    wait_until(lambda: app.talk.notifier.waiting == 1)  # the newer one waits on
    guest.post(f"/signaling/{token}", {"messages": json.dumps([{
        "ev": "message", "sessionId": session, "fn": json.dumps({"to": session})}])})
    second.join(30)
    assert not second.is_alive()
    assert [item["type"] for item in answers[1]] == ["message", "usersInRoom"]


def test_a_newer_chat_poll_of_the_same_session_answers_the_older(app, alice):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    join(guest, token)
    app.talk.notifier.monotonic = lambda: 0.0
    app.talk.notifier.time_scale = 10**6
    answers = []
    polls = [threading.Thread(target=lambda: answers.append(
        guest.get(f"/chat/{token}", {"timeout": 60}).data)) for _ in range(3)]
    for n, thread in enumerate(polls):
        thread.start()
        if n < 2:
            wait_until(lambda n=n: app.talk.notifier.waiting == 1 and len(answers) == n)
    polls[0].join(30)
    polls[1].join(30)
    assert answers[:2] == [[], []]
    sent = alice.post(f"/chat/{token}", {"message": "hi"}, status=201).data
    polls[2].join(30)
    assert answers[2] == [sent]


@pytest.mark.parametrize(
    "query, body",
    [
        ("timeout=0&timeout=8", b""),  # Bottle and the dispatcher both take the last: 8
        ("timeout=0", b"timeout=8"),  # a body parameter the dispatcher never sees
        ("timeout=%ff", b""),  # not UTF-8: the dispatcher reads 0, Bottle the default
    ],
)
def test_a_poll_classified_as_no_wait_does_not_wait(app, alice, query, body):
    token = create(alice, 3, roomName="Open")
    join(alice, token)
    handler = talk_server.chat_receive
    expected_wait = talk_server.may_wait(handler, query)
    asked = []
    app.talk.notifier.wait = lambda waiter, seconds, cancelled=None: asked.append(seconds)
    headers = {**alice.headers, "Content-Type": "application/x-www-form-urlencoded"}
    response = alice.test.request(
        f"{API}/chat/{token}?{query}", method="GET", body=body, headers=headers,
        expect_errors=True,
    )
    assert response.status_int == 200
    assert bool(asked) == expected_wait
    if not expected_wait:
        assert asked == []


def test_waitress_oversize_body_413_is_an_ocs_envelope(tmp_path):
    with talk_server.serve_in_thread(tmp_path / "t.db", max_body=1000) as url:
        host, port = url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", API + "/room", b"x" * 5000, {
            "OCS-APIRequest": "true", "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        document = json.loads(response.read())
        conn.close()
        assert response.status == 413
        assert document["ocs"]["meta"]["statuscode"] == 413
        assert document["ocs"]["meta"]["message"]


# --- 3. Anonymous growth of the database ---------------------------------------


def rows(app, table):
    with app.talk.db.read() as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_chat_is_rate_limited_per_session_and_refills(app, alice, clock):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    join(guest, token)
    for n in range(talk_server.CHAT_PER_MINUTE):
        guest.post(f"/chat/{token}", {"message": f"m{n}"}, status=201)
    response = guest.post(f"/chat/{token}", {"message": "one too many"}, status=429)
    assert int(response.headers["Retry-After"]) >= 1
    with app.talk.db.read() as db:  # the guest's comments (the room also has its system messages)
        comments = db.execute(
            "SELECT COUNT(*) FROM messages WHERE actor_type = 'guests' AND message_type = 'comment'"
        ).fetchone()[0]
    assert comments == talk_server.CHAT_PER_MINUTE
    alice.post(f"/chat/{token}", {"message": "others still talk"}, status=201)
    clock.advance(61)
    guest.post(f"/chat/{token}", {"message": "a minute later"}, status=201)


def test_a_rate_limit_window_slides_event_by_event():
    """Events leave the minute one by one, weights count, and keys are apart."""
    now = [0.0]
    limit = talk_server.RateLimit(10, clock=lambda: now[0])
    for _ in range(6):
        limit.take("a", "things")
    now[0] = 30.0
    limit.take("a", "things", weight=4)
    with pytest.raises(talk_server.OCSError) as refused:
        limit.take("a", "things")
    assert refused.value.status == 429
    limit.take("b", "things", weight=10)  # another key has its own minute
    now[0] = 60.0  # the first six are a minute old: gone, the weight-4 one stays
    for _ in range(6):
        limit.take("a", "things")
    with pytest.raises(talk_server.OCSError):
        limit.take("a", "things")
    now[0] = 90.0
    limit.take("a", "things", weight=4)


def test_chat_bytes_are_limited_per_session(app, alice):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    join(guest, token)
    big = "\U0001f600" * talk_server.MESSAGE_MAX  # 128 KB of UTF-8
    stored = 0
    for _ in range(10):
        if guest.post(f"/chat/{token}", {"message": big}, status="*").status_int != 201:
            break
        stored += 1
    assert stored * len(big.encode()) <= talk_server.CHAT_BYTES_PER_MINUTE
    assert stored < 10


def test_chat_is_rate_limited_per_room(app, alice):
    token = create(alice, 3, roomName="Open")
    share = talk_server.CHAT_PER_MINUTE * talk_server.ROOM_FLOW_FACTOR
    sent = 0
    for _ in range(talk_server.ROOM_FLOW_FACTOR + 1):
        guest = Client(app)
        join(guest, token)
        for _ in range(talk_server.CHAT_PER_MINUTE):
            if guest.post(f"/chat/{token}", {"message": "x"}, status="*").status_int == 201:
                sent += 1
    assert sent == share


def signaling_item(session, to, size=10):
    return {"ev": "message", "sessionId": session,
            "fn": json.dumps({"to": to, "payload": "p" * size})}


def test_a_signaling_message_over_16_kb_is_413(app, alice):
    token = create(alice, 3, roomName="Open")
    guest, other = Client(app), Client(app)
    me, peer = join(guest, token), join(other, token)
    item = signaling_item(me, peer, 16 * 1024)
    guest.post(f"/signaling/{token}", {"messages": json.dumps([item])}, status=413)
    guest.post(f"/signaling/{token}", {"messages": json.dumps([signaling_item(me, peer, 15000)])})
    assert rows(app, "signaling") == 1


def test_the_bytes_queued_for_one_recipient_are_capped(app, alice, clock):
    token = create(alice, 3, roomName="Open")
    senders = [Client(app) for _ in range(4)]
    peer = join(Client(app), token)
    sessions = [join(sender, token) for sender in senders]
    statuses = []
    for sender, session in zip(senders, sessions, strict=True):
        for _ in range(10):
            response = sender.post(f"/signaling/{token}", {
                "messages": json.dumps([signaling_item(session, peer, 15000)])}, status="*")
            statuses.append(response.status_int)
    assert 429 in statuses
    with app.talk.db.read() as db:
        assert talk_server.queued_bytes(db, peer) <= talk_server.SIGNALING_QUEUE_BYTES


def test_signaling_is_rate_limited_per_session(app, alice):
    token = create(alice, 3, roomName="Open")
    guest = Client(app)
    me = join(guest, token)
    peers = [join(Client(app), token) for _ in range(20)]
    sent = refused = 0
    for n in range(200):  # 200 x 15 KB = 3 MB, spread over recipients
        item = signaling_item(me, peers[n % len(peers)], 15000)
        response = guest.post(f"/signaling/{token}", {"messages": json.dumps([item])}, status="*")
        sent += response.status_int == 200
        refused += response.status_int == 429
    assert refused and sent * 15000 <= talk_server.SIGNALING_BYTES_PER_MINUTE


def test_guests_per_room_are_capped(db_path, clock, password_hash):
    app = talk_server.make_app(db_path, clock=clock, guests_per_room=3)
    try:
        with app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        token = create(Client(app, "alice"), 3, roomName="Open")
        for _ in range(3):
            join(Client(app), token)
        response = Client(app).post(f"/room/{token}/participants/active", status=429)
        assert response.meta["message"]
        assert rows(app, "participants") == 4
        clock.advance(talk_server.GUEST_EXPIRY_SECONDS + 1)  # the three went quiet
        join(Client(app), token)
    finally:
        app.talk.close()


def test_deleting_a_room_lets_the_file_shrink(app, alice):
    token = create(alice, 3, roomName="Big")
    with app.talk.db.write() as db:
        room = talk_server.room_by_token(db, token)
        for n in range(3000):
            talk_server.add_message(db, room["id"], "users", "alice", "x" * 1000, START + n)
    with app.talk.db.read() as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        before = db.execute("PRAGMA page_count").fetchone()[0]
    alice.delete(f"/room/{token}", status=200)
    with app.talk.db.read() as db:
        after = db.execute("PRAGMA page_count").fetchone()[0]
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert after < before / 4


# --- Password hashing: its cost and its concurrency (SPEC 1.5) ----------------


def test_scrypt_parameters_are_the_specs():
    stored = talk_server.hash_password("pw")
    kind, n, r, p, salt, digest = stored.split("$")
    assert (kind, int(n), int(r), int(p)) == ("scrypt", 2**14, 8, 1)
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 64
    assert talk_server.check_password(stored, "pw")
    assert not talk_server.check_password(stored, "wrong")
    assert stored != talk_server.hash_password("pw")  # salted


def test_at_most_two_password_hashes_run_at_once(monkeypatch):
    """Counted by events: each hash waits until the test lets it go, so the
    most that were ever running at once is exact."""
    credentials = talk_server.Credentials()
    running, most, lock = [0], [0], threading.Lock()
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow_hash(password):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started.release()
        release.wait(30)
        with lock:
            running[0] -= 1
        return "x"

    monkeypatch.setattr(talk_server, "hash_password", slow_hash)
    threads = [threading.Thread(target=credentials.hash, args=("pw",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    assert started.acquire(timeout=30) and started.acquire(timeout=30)  # two are in
    assert not started.acquire(timeout=0.2)  # and no third, while they run
    release.set()
    for thread in threads:
        thread.join(30)
    assert most[0] == 2


# --- 11. The browser client's pages ------------------------------------------


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css"])
def test_client_pages_carry_a_content_security_policy(app, path):
    response = Client(app).test.get(path, status=200)
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_client_keeps_no_login_password():
    """It signs in through the sign-in page's cookie and stores no credential
    (the browser tests check the storages after a real sign-in)."""
    source = (talk_server.data_path("static") / "app.js").read_text(encoding="utf-8")
    assert "/index.php/login" in source
    assert "sessionStorage.setItem" not in source
    assert "JSON.stringify({ user, password })" not in source
