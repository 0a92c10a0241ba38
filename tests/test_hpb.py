"""talk-server as the backend of Talk's High-Performance Backend (issue 17,
today-api.md 9; spreed SignalingController::backend, BackendNotifier, Capabilities;
nextcloud-spreed-signaling docs/standalone-signaling-api-v1.md).

The checksum both ways against the documented vector, each backend request
kind with its refusals, each notification's trigger and payload as a
recording fake signaling server (a thread on a free loopback port that checks
every checksum itself) receives it, the settings and capabilities in external
mode as the Android app reads them, and internal signaling refused. Tests wait
on what arrives (with a bound), never on elapsed time.
"""

import hashlib
import hmac
import json

import pytest
import webtest
from conftest import START, Client
from helpers import RecordingServer, scalar

import talk_server

V1 = "/ocs/v2.php/apps/spreed/api/v1"
V3 = "/ocs/v2.php/apps/spreed/api/v3"
V4 = "/ocs/v2.php/apps/spreed/api/v4"
SECRET = "the-secret-shared-with-the-signaling-server"
PUBLIC_URL = "https://cloud.example"
WAIT = 10  # seconds a notification may take to arrive before a test fails

# The example of docs/standalone-signaling-api-v1.md ("Backend requests")
VECTOR_BODY = '{"type":"auth","auth":{"version":"1.0","params":{"hello":"world"}}}'
VECTOR_RANDOM = "afb6b872ab03e3376b31bf0af601067222ff7990335ca02d327071b73c0119c6"
VECTOR_SECRET = "MySecretValue"
VECTOR_CHECKSUM = "3c4a69ff328299803ac2879614b707c807b4758cf19450755c60656cac46e3bc"


def checksum(secret, random, body):
    """The HMAC computed here, independently of talk-server's code."""
    raw = body if isinstance(body, bytes) else body.encode()
    return hmac.new(secret.encode(), random.encode() + raw, hashlib.sha256).hexdigest()


# --- A recording fake signaling server ------------------------------------------------


class FakeSignalingServer(RecordingServer):
    """POST /api/v1/room/{token} on a free loopback port, recording each request;
    answers `statuses` in turn (then 200); holds each while `release` is clear."""

    def __init__(self, secret=SECRET):
        super().__init__(hold=WAIT)
        self.secret = secret

    def next(self, kind=None):
        """The next request: (path, headers, body), signed as the docs say."""
        path, headers, raw = self.requests.get(timeout=WAIT)
        random = headers["Spreed-Signaling-Random"]
        assert headers["Spreed-Signaling-Checksum"] == checksum(self.secret, random, raw)
        body = json.loads(raw)
        assert len(random) == 64
        assert headers["Spreed-Signaling-Backend"] == PUBLIC_URL
        assert headers["Content-Type"] == "application/json"
        assert set(body) == {"type", body["type"]}
        if kind is not None:
            assert body["type"] == kind, body
        return path, headers, body

    def until(self, kind):
        """Skip to the next request of `kind` (each change may tell several things)."""
        while True:
            path, headers, body = self.next()
            if body["type"] == kind:
                return path, body[kind]


@pytest.fixture
def hpb():
    fake = FakeSignalingServer()
    yield fake
    fake.close()


@pytest.fixture
def app(db_path, clock, password_hash, hpb):
    """conftest's users on an app whose signaling server is the fake."""
    app = talk_server.make_app(
        db_path, clock=clock, time_scale=0.01, public_url=PUBLIC_URL,
        signaling_servers=[hpb.url], signaling_secret=SECRET,
    )
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob", "carol", "dave"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    yield app
    app.talk.close()


def settled(app, hpb):
    """Every notification sent; then forget them (the tests below look at one change)."""
    assert app.talk.hpb.drain(WAIT)
    while not hpb.requests.empty():
        hpb.requests.get_nowait()


def v4(client):
    return Client(client.test.app, client.user, prefix=V4)


def conversation(client, *users, room_type=2, name="Team"):
    token = client.post("/room", {"roomType": room_type, "roomName": name}, status=201,
                        prefix=V4).data["token"]
    for user in users:
        client.post(f"/room/{token}/participants", {"newParticipant": user}, prefix=V4)
    return token


def join(client, token):
    return client.post(f"/room/{token}/participants/active", prefix=V4).data["sessionId"]


def attendee_id(client, token, user):
    rows = client.get(f"/room/{token}/participants", prefix=V4).data
    return next(row["attendeeId"] for row in rows if row["actorId"] == user)


def backend(app, body, random="r" * 32, secret=SECRET, path=V3, sign=True, headers=None):
    """POST /signaling/backend as the signaling server does; the OCS data."""
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    raw = raw if isinstance(raw, bytes) else raw.encode()
    sent = {"Content-Type": "application/json", "Accept": "application/json",
            "OCS-APIRequest": "true"}
    if sign:
        sent.update({"Spreed-Signaling-Random": random,
                     "Spreed-Signaling-Checksum": checksum(secret, random, raw)})
    sent.update(headers or {})
    response = webtest.TestApp(app).post(path + "/signaling/backend", raw, headers=sent,
                                         expect_errors=True)
    assert response.status_int == 200, response.text
    return response.json["ocs"]["data"]


def error_code(data):
    assert data["type"] == "error" and set(data["error"]) == {"code", "message"}
    return data["error"]["code"]


def ticket_of(client):
    return client.get("/signaling/settings", prefix=V3).data["ticket"]


def auth(app, user_id, ticket):
    return backend(app, {"type": "auth", "auth": {"version": "1.0",
                                                  "params": {"userid": user_id, "ticket": ticket}}})


def arrivals(hpb, kind, count):
    """The next `count` requests of `kind`, skipping others."""
    return [hpb.until(kind) for _ in range(count)]


def one_of_each(hpb, *kinds):
    """The next request of each kind, in whatever order they come (several workers
    send them), skipping others."""
    seen = {}
    while set(seen) != set(kinds):
        _, _, body = hpb.next()
        if body["type"] in kinds:
            assert body["type"] not in seen, body
            seen[body["type"]] = body[body["type"]]
    return seen


def make_admin(app, user_id):
    with app.talk.db.write() as db:
        talk_server.create_group(db, "admin")
        talk_server.add_to_group(db, "admin", user_id)


def room_request(app, token, session_id, user_id="", action=None):
    room = {"version": "1.0", "roomid": token, "userid": user_id, "sessionid": session_id}
    if action:
        room["action"] = action
    return backend(app, {"type": "room", "room": room})


# --- The checksum, both ways ------------------------------------------------------------


def test_checksum_matches_the_documented_vector_and_an_independent_hmac():
    assert talk_server.signaling_checksum(VECTOR_SECRET, VECTOR_RANDOM, VECTOR_BODY) == VECTOR_CHECKSUM
    assert checksum(VECTOR_SECRET, VECTOR_RANDOM, VECTOR_BODY) == VECTOR_CHECKSUM
    random, body = "x" * 40, '{"type":"ping","ping":{"entries":[]}}'
    assert talk_server.signaling_checksum(SECRET, random, body.encode()) == checksum(SECRET, random, body)


def test_the_backend_accepts_the_documented_request_and_refuses_any_change_of_it(
        db_path, clock):
    app = talk_server.make_app(db_path, clock=clock, signaling_servers=["https://hpb.example"],
                               signaling_secret=VECTOR_SECRET)
    try:
        headers = {"Spreed-Signaling-Random": VECTOR_RANDOM,
                   "Spreed-Signaling-Checksum": VECTOR_CHECKSUM}
        # Authenticated: its params carry no ticket, so only the ticket is wrong.
        data = backend(app, VECTOR_BODY, sign=False, headers=headers)
        assert error_code(data) == "invalid_ticket"
        data = backend(app, VECTOR_BODY.replace("world", "World"), sign=False, headers=headers)
        assert error_code(data) == "invalid_request"
        upper = {**headers, "Spreed-Signaling-Checksum": VECTOR_CHECKSUM.upper()}  # hex, any case
        assert error_code(backend(app, VECTOR_BODY, sign=False, headers=upper)) == "invalid_ticket"
    finally:
        app.talk.close()


def test_notifications_are_signed_with_the_shared_secret(app, alice, hpb):
    token = conversation(alice)
    path, headers, body = hpb.next("invite")
    assert path == f"/api/v1/room/{token}"
    raw = talk_server.php_json(body).encode()  # the body as sent, byte for byte
    assert headers["Spreed-Signaling-Checksum"] == checksum(SECRET, headers["Spreed-Signaling-Random"], raw)
    assert headers["Spreed-Signaling-Checksum"] != checksum("another-secret", headers["Spreed-Signaling-Random"], raw)


# --- Backend requests: authentication and refusals --------------------------------------


@pytest.mark.parametrize("path", [V1, "/ocs/v2.php/apps/spreed/api/v2", V3,
                                  "/ocs/v1.php/apps/spreed/api/v3"])
def test_every_api_path_of_the_backend_answers(app, alice, path):
    data = backend(app, {"type": "auth", "auth": {"params": {"userid": "alice",
                                                             "ticket": ticket_of(alice)}}},
                   path=path)
    assert data["auth"]["userid"] == "alice"


def test_unsigned_requests_are_refused_as_talk_does(app, alice, clock):
    body = {"type": "auth", "auth": {"params": {"userid": "alice", "ticket": ticket_of(alice)}}}
    refusals = [
        backend(app, body, sign=False),  # no headers at all
        backend(app, body, sign=False, headers={"Spreed-Signaling-Random": "r" * 32}),
        backend(app, body, secret="not-the-secret"),
        backend(app, body, random="r" * 31),  # signed, but too short a random
        backend(app, body, sign=False, headers={"Spreed-Signaling-Random": "r" * 32,
                                                "Spreed-Signaling-Checksum": "00" * 32}),
    ]
    for data in refusals:
        assert data == {"type": "error", "error": {
            "code": "invalid_request", "message": "The request could not be authenticated."}}
    clock.advance(2)  # five failures from this address: it waits a second first
    assert backend(app, body, random="r" * 32)["type"] == "auth"


def test_bad_checksums_are_throttled_per_address(app, alice, clock):
    body = {"type": "ping", "ping": {"entries": []}}
    for _ in range(talk_server.THROTTLE_FREE_FAILURES):
        assert error_code(backend(app, body, secret="guess")) == "invalid_request"
    response = webtest.TestApp(app).post(
        V3 + "/signaling/backend", json.dumps(body),
        headers={"Accept": "application/json", "Spreed-Signaling-Random": "r" * 32,
                 "Spreed-Signaling-Checksum": checksum(SECRET, "r" * 32, json.dumps(body))},
        expect_errors=True)
    assert response.status_int == 429 and response.headers["Retry-After"]
    clock.advance(2)  # the first delay passed: the right secret is heard again
    assert backend(app, body) == {"type": "room", "room": {"version": "1.0"}}


def test_without_a_secret_nothing_is_authenticated(db_path, clock):
    app = talk_server.make_app(db_path, clock=clock)  # internal signaling
    try:
        data = backend(app, {"type": "ping", "ping": {"entries": []}}, secret="")
        assert error_code(data) == "invalid_request"
    finally:
        app.talk.close()


@pytest.mark.parametrize("raw, code", [
    ("not json", "unknown_type"),
    ("[1, 2]", "unknown_type"),
    ('{"type": "nonsense"}', "unknown_type"),
    ('{"type": ["auth"]}', "unknown_type"),
    ('{"type": "auth"}', "invalid_request"),
    ('{"type": "auth", "auth": []}', "invalid_request"),
    ('{"type": "auth", "auth": {"params": "x"}}', "invalid_request"),
    ('{"type": "auth", "auth": {"params": {"userid": 7, "ticket": "t"}}}', "invalid_request"),
    ('{"type": "room", "room": {"roomid": ["x"]}}', "invalid_request"),
    ('{"type": "room", "room": {"roomid": "x", "action": "dance"}}', "invalid_request"),
    ('{"type": "ping", "ping": {"entries": "all"}}', "invalid_request"),
    ('{"type": "ping", "ping": {"entries": [1]}}', "invalid_request"),
    ('{"type": "ping", "ping": {"entries": [{"sessionid": {}}]}}', "invalid_request"),
    (b'{"type": "\xff"}', "unknown_type"),
    ("[" * 100000, "unknown_type"),
])
def test_junk_the_checksum_vouches_for_is_refused_never_a_500(app, raw, code):
    assert error_code(backend(app, raw)) == code


def test_a_body_over_the_limit_is_refused_with_200(db_path, clock):
    app = talk_server.make_app(db_path, clock=clock, max_body=100,
                               signaling_servers=["https://hpb.example"], signaling_secret=SECRET)
    try:
        data = backend(app, {"type": "ping", "ping": {"entries": [], "padding": "x" * 200}})
        assert error_code(data) == "invalid_request"
    finally:
        app.talk.close()


def test_the_backend_needs_no_user_credentials_and_ignores_them(app, wrong_password):
    data = backend(app, {"type": "ping", "ping": {"entries": []}},
                   headers={"Authorization": wrong_password.headers["Authorization"]})
    assert data["type"] == "room"


# --- auth --------------------------------------------------------------------------------


def test_auth_answers_the_user_of_a_valid_ticket(app, alice):
    assert auth(app, "alice", ticket_of(alice)) == {
        "type": "auth", "auth": {"version": "1.0", "userid": "alice",
                                 "user": {"displayname": "Alice"}}}


def test_auth_of_a_guest_names_no_user(app, anonymous):
    ticket = ticket_of(anonymous)
    assert ticket.split(":")[2] == ""
    assert auth(app, "", ticket) == {"type": "auth", "auth": {"version": "1.0"}}
    assert backend(app, {"type": "auth", "auth": {"params": {"ticket": ticket}}})["type"] == "auth"


def test_auth_refuses_forged_borrowed_and_expired_tickets(app, alice, bob, anonymous, clock):
    ticket = ticket_of(alice)
    random, issued, user, mac = ticket.split(":")
    forged = [
        "",
        "garbage",
        f"{random}:{issued}:bob:{mac}",  # alice's MAC, bob's name
        f"{random}:{int(issued) + 1}:alice:{mac}",  # a later issue time
        ticket[:-1] + ("0" if ticket[-1] != "0" else "1"),
    ]
    for bad in forged:
        assert error_code(auth(app, "alice", bad)) == "invalid_ticket"
    assert error_code(auth(app, "bob", ticket)) == "invalid_ticket"  # alice's ticket
    assert error_code(auth(app, "", ticket)) == "invalid_ticket"  # ...is no guest's either
    assert error_code(auth(app, "alice", ticket_of(anonymous))) == "invalid_ticket"
    # Tickets expire: good until SIGNALING_TICKET_SECONDS after they were issued.
    clock.advance(talk_server.SIGNALING_TICKET_SECONDS)
    assert auth(app, "alice", ticket)["type"] == "auth"
    clock.advance(1)
    assert error_code(auth(app, "alice", ticket)) == "invalid_ticket"
    assert auth(app, "alice", ticket_of(alice))["type"] == "auth"  # a fresh one works


def test_auth_refuses_a_valid_ticket_of_a_user_who_is_gone_or_disabled(app, alice, clock):
    ghost = talk_server.signaling_ticket(app.talk, "ghost", clock())
    assert error_code(auth(app, "ghost", ghost)) == "no_such_user"
    ticket = ticket_of(alice)
    with app.talk.db.write() as db:
        talk_server.set_user_enabled(db, "alice", False)
    assert error_code(auth(app, "alice", ticket)) == "no_such_user"


# --- room ----------------------------------------------------------------------------------


def test_room_join_answers_properties_and_a_moderators_permissions(app, alice, clock):
    token = conversation(alice, "bob")
    alice.put(f"/room/{token}/description", {"description": "Weekly"}, prefix=V4)
    session = join(alice, token)
    clock.advance(5)
    data = room_request(app, token, session, "alice")
    assert data == {"type": "room", "room": {
        "version": "1.0", "roomid": token,
        "properties": {"name": "Team", "type": 2, "lobby-state": 0, "lobby-timer": 0,
                       "read-only": 0, "listable": 0, "active-since": None, "sip-enabled": 0,
                       "description": "Weekly"},
        "permissions": ["publish-audio", "publish-video", "publish-screen", "control"],
    }}
    # A join is a sign of life of the Talk session.
    assert scalar(app, "SELECT last_ping FROM sessions WHERE id = ?", session) == clock()


def test_room_join_reflects_the_attendees_permission_bits(app, alice, bob):
    token = conversation(alice, "bob")
    session = join(bob, token)
    assert room_request(app, token, session, "bob")["room"]["permissions"] == [
        "publish-audio", "publish-video", "publish-screen"]
    audio_only = 1 | 2 | 4 | 16 | 128  # custom, start and join calls, audio, chat
    alice.put(f"/room/{token}/attendees/permissions",
              {"attendeeId": attendee_id(alice, token, "bob"), "permissions": audio_only},
              prefix=V4)
    assert room_request(app, token, session, "bob")["room"]["permissions"] == ["publish-audio"]


def test_room_join_names_the_partner_of_a_one_to_one_room(app, alice, bob):
    token = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201, prefix=V4).data["token"]
    data = room_request(app, token, join(bob, token), "bob")
    assert data["room"]["properties"]["name"] == "Alice"


def test_room_join_of_a_guest_names_no_user_and_gives_no_control(app, alice, guest):
    token = conversation(alice, room_type=3, name="Open")
    session = join(guest, token)
    data = room_request(app, token, session, "")
    assert data["room"]["permissions"] == ["publish-audio", "publish-video", "publish-screen"]
    # A guest's session claimed by a user, or a user's by a guest, is no one's.
    assert error_code(room_request(app, token, session, "alice")) == "no_such_room"
    assert error_code(room_request(app, token, join(alice, token), "")) == "no_such_room"


def test_room_refuses_unknown_rooms_and_sessions_alike(app, alice, bob, dave):
    token = conversation(alice, "bob")
    other = conversation(alice, name="Other")
    session = join(bob, token)
    for data in (
        room_request(app, "nosuchroom", session, "bob"),
        room_request(app, other, session, "bob"),  # bob's session is in another room
        room_request(app, token, session, "alice"),  # not alice's session
        room_request(app, token, "x" * 512, "bob"),  # no such session
        room_request(app, token, "", "dave"),  # dave is no participant
        room_request(app, token, "", ""),  # nobody at all
    ):
        assert data == {"type": "error", "error": {
            "code": "no_such_room", "message": "The user is not invited to this room."}}
    # Without a session, a participant's row is enough (as Talk).
    assert room_request(app, token, "", "bob")["room"]["roomid"] == token


def test_room_leave_ends_the_talk_session(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    session = join(bob, token)
    settled(app, hpb)
    data = room_request(app, token, session, "bob", action="leave")
    assert data["type"] == "room" and data["room"]["roomid"] == token
    assert scalar(app, "SELECT count(*) FROM sessions WHERE id = ?", session) == 0
    assert "bob" in [row["actorId"] for row in alice.get(f"/room/{token}/participants",
                                                          prefix=V4).data]  # still invited


def test_room_leave_of_a_guest_removes_it_and_disinvites_its_session(app, alice, guest, hpb):
    token = conversation(alice, room_type=3, name="Open")
    session = join(guest, token)
    settled(app, hpb)
    room_request(app, token, session, "", action="leave")
    assert scalar(app, "SELECT count(*) FROM participants WHERE guest_id IS NOT NULL") == 0
    _, body = hpb.until("disinvite")
    assert body["sessionids"] == [session] and body["alluserids"] == ["alice"]


# --- ping ----------------------------------------------------------------------------------


def test_ping_keeps_the_listed_sessions_alive(app, alice, bob, clock):
    token = conversation(alice, "bob")
    mine, his = join(alice, token), join(bob, token)
    clock.advance(35)
    data = backend(app, {"type": "ping", "ping": {"roomid": token, "entries": [
        {"userid": "alice", "sessionid": mine}, {"userid": "", "sessionid": "0"},
        {"userid": "x", "sessionid": "no-such-session"}]}})
    assert data == {"type": "room", "room": {"version": "1.0"}}
    assert scalar(app, "SELECT last_ping FROM sessions WHERE id = ?", mine) == clock()
    assert scalar(app, "SELECT last_ping FROM sessions WHERE id = ?", his) == START
    assert scalar(app, "SELECT last_ping FROM participants WHERE user_id = 'alice'") == clock()


def test_pings_keep_a_call_going_without_client_requests(app, alice, bob, clock):
    token = conversation(alice, "bob")
    mine, his = join(alice, token), join(bob, token)
    alice.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    bob.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    for _ in range(6):  # a minute of the signaling server's pings, nothing from the apps
        clock.advance(10)
        backend(app, {"type": "ping", "ping": {"roomid": token, "entries": [
            {"userid": "alice", "sessionid": mine}, {"userid": "bob", "sessionid": his}]}})
    peers = alice.get(f"/call/{token}", prefix=V4).data
    assert sorted(p["actorId"] for p in peers) == ["alice", "bob"]


def test_ping_refuses_too_many_entries(app):
    entries = [{"sessionid": str(n)} for n in range(talk_server.HPB_PING_MAX + 1)]
    assert error_code(backend(app, {"type": "ping", "ping": {"entries": entries}})) == "invalid_request"


# --- Notifications: triggers and payloads ------------------------------------------------


def test_creating_a_room_and_adding_users_invites_them(app, alice, hpb):
    token = conversation(alice)
    path, _, body = hpb.next("invite")
    assert path == f"/api/v1/room/{token}"
    assert body["invite"]["userids"] == ["alice"] and body["invite"]["alluserids"] == ["alice"]
    assert body["invite"]["properties"]["name"] == "Team"
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"}, prefix=V4)
    _, invite = hpb.until("invite")
    assert invite["userids"] == ["bob"] and invite["alluserids"] == ["alice", "bob"]


def test_a_user_joining_a_public_room_is_invited(app, alice, dave, hpb):
    token = conversation(alice, room_type=3, name="Open")
    settled(app, hpb)
    join(dave, token)
    _, invite = hpb.until("invite")
    assert invite["userids"] == ["dave"] and invite["alluserids"] == ["alice", "dave"]


def test_removing_a_user_or_a_guest_disinvites_them(app, alice, bob, guest, hpb):
    token = conversation(alice, "bob", room_type=3, name="Open")
    guest_session = join(guest, token)
    settled(app, hpb)
    alice.delete(f"/room/{token}/attendees", {"attendeeId": attendee_id(alice, token, "bob")},
                 prefix=V4)
    _, disinvite = hpb.until("disinvite")
    assert disinvite["userids"] == ["bob"] and disinvite["alluserids"] == ["alice"]
    alice.delete(f"/room/{token}/participants/guests", {"participant": guest_session})
    _, disinvite = hpb.until("disinvite")
    assert disinvite["sessionids"] == [guest_session]


def test_leaving_a_room_for_good_disinvites(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    settled(app, hpb)
    bob.delete(f"/room/{token}/participants/self", prefix=V4)
    _, disinvite = hpb.until("disinvite")
    assert disinvite["userids"] == ["bob"] and disinvite["alluserids"] == ["alice"]


@pytest.mark.parametrize("change", ["rename", "password", "public", "private", "lobby",
                                    "read-only", "description"])
def test_room_changes_send_an_update(app, alice, bob, change, hpb):
    token = conversation(alice, "bob", room_type=3 if change in ("password", "private") else 2)
    settled(app, hpb)
    a = v4(alice)
    {
        "rename": lambda: a.put(f"/room/{token}", {"roomName": "Renamed"}),
        "password": lambda: a.put(f"/room/{token}/password", {"password": "s3cret-Pa55word"}),
        "public": lambda: a.post(f"/room/{token}/public"),
        "private": lambda: a.delete(f"/room/{token}/public"),
        "lobby": lambda: a.put(f"/room/{token}/webinar/lobby", {"state": 1}),
        "read-only": lambda: a.put(f"/room/{token}/read-only", {"state": 1}),
        "description": lambda: a.put(f"/room/{token}/description", {"description": "New"}),
    }[change]()
    path, update = hpb.until("update")
    assert path == f"/api/v1/room/{token}" and update["userids"] == ["alice", "bob"]
    expected = {"rename": ("name", "Renamed"), "public": ("type", 3), "private": ("type", 2),
                "lobby": ("lobby-state", 1), "read-only": ("read-only", 1),
                "description": ("description", "New")}.get(change)
    if expected:
        assert update["properties"][expected[0]] == expected[1]


def test_making_a_room_private_disinvites_its_guests_and_self_joined(app, alice, dave, guest, hpb):
    token = conversation(alice, room_type=3, name="Open")
    join(dave, token)
    guest_session = join(guest, token)
    settled(app, hpb)
    alice.delete(f"/room/{token}/public", prefix=V4)
    bodies = {}
    while len(bodies) < 2:
        _, update = hpb.until("disinvite")
        bodies["userids" if "userids" in update else "sessionids"] = update
    assert bodies["userids"]["userids"] == ["dave"]
    assert bodies["sessionids"]["sessionids"] == [guest_session]


def test_deleting_a_room_sends_delete_to_its_users(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    settled(app, hpb)
    alice.delete(f"/room/{token}", prefix=V4)
    path, delete = hpb.until("delete")
    assert path == f"/api/v1/room/{token}" and delete == {"userids": ["alice", "bob"]}


def test_deleting_a_user_deletes_the_rooms_that_go_and_disinvites_from_the_others(
        app, alice, bob, carol, hpb):
    make_admin(app, "alice")
    team = conversation(alice, "bob", "carol")
    pair = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201, prefix=V4).data["token"]
    solo = conversation(bob, name="Solo")
    settled(app, hpb)
    alice.delete("/users/bob", prefix="/ocs/v2.php/cloud")
    sent = {}
    for _ in range(3):
        path, _, body = hpb.next()
        sent[path.rsplit("/", 1)[1]] = body
    assert sent[pair] == {"type": "delete", "delete": {"userids": ["alice", "bob"]}}
    assert sent[solo] == {"type": "delete", "delete": {"userids": ["bob"]}}
    disinvite = sent[team]["disinvite"]
    assert disinvite["userids"] == ["bob"] and disinvite["alluserids"] == ["alice", "carol"]
    assert disinvite["properties"]["name"] == "Team"
    assert app.talk.hpb.drain(WAIT)
    assert hpb.empty()


def test_joining_changing_and_leaving_the_call_send_incall(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    mine, his = join(alice, token), join(bob, token)
    settled(app, hpb)
    alice.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 3
    [changed] = incall["changed"]
    assert changed == {"inCall": 3, "lastPing": START, "sessionId": mine, "participantType": 1,
                       "participantPermissions": talk_server.PERMISSIONS_ALL,
                       "displayName": "Alice", "actorType": "users", "actorId": "alice",
                       "userId": "alice"}
    assert [u["sessionId"] for u in incall["users"]] == [mine]
    bob.post(f"/call/{token}", {"flags": 7}, prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 7 and [c["sessionId"] for c in incall["changed"]] == [his]
    assert sorted(u["sessionId"] for u in incall["users"]) == sorted([mine, his])
    bob.put(f"/call/{token}", {"flags": 1 | 2}, prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 3 and incall["changed"][0]["inCall"] == 3
    bob.delete(f"/call/{token}", prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 0 and incall["changed"][0]["inCall"] == 0
    assert [u["sessionId"] for u in incall["users"]] == [mine]


def test_ending_the_call_for_everyone_sends_incall_for_every_session(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    mine, his = join(alice, token), join(bob, token)
    alice.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    bob.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    settled(app, hpb)
    alice.delete(f"/call/{token}", {"all": True}, prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 0 and incall["users"] == []
    assert sorted(c["sessionId"] for c in incall["changed"]) == sorted([mine, his])


def test_leaving_the_room_during_a_call_sends_incall(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    join(alice, token)
    his = join(bob, token)
    bob.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    settled(app, hpb)
    bob.delete(f"/room/{token}/participants/active", prefix=V4)
    _, incall = hpb.until("incall")
    assert incall["incall"] == 0 and incall["changed"] == [
        {"inCall": 0, "lastPing": 0, "sessionId": his}]


def test_a_session_that_stopped_pinging_drops_out_of_the_call_with_incall(
        app, alice, bob, carol, clock, hpb):
    token = conversation(alice, "bob", "carol")
    mine, his, hers = join(alice, token), join(bob, token), join(carol, token)
    alice.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    bob.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    settled(app, hpb)
    clock.advance(talk_server.CALL_TIMEOUT_SECONDS)  # bob's app went: no ping from him
    backend(app, {"type": "ping", "ping": {"roomid": token, "entries": [
        {"userid": "alice", "sessionid": mine}, {"userid": "carol", "sessionid": hers}]}})
    carol.post(f"/call/{token}", {"flags": 3}, prefix=V4)  # the next call join expires bob
    incalls = {body["incall"]: body for _, body in arrivals(hpb, "incall", 2)}
    assert [c["sessionId"] for c in incalls[3]["changed"]] == [hers]
    timed_out = incalls[0]
    assert [(c["sessionId"], c["inCall"]) for c in timed_out["changed"]] == [(his, 0)]
    assert sorted(u["sessionId"] for u in timed_out["users"]) == sorted([mine, hers])


@pytest.mark.parametrize("trigger", ["participants", "guest-joins"])
def test_guests_expiring_leave_the_call_and_are_disinvited(app, alice, guest, other_guest,
                                                           clock, trigger, hpb):
    token = conversation(alice, room_type=3, name="Open")
    join(alice, token)
    session = join(guest, token)
    guest.post(f"/call/{token}", {"flags": 3}, prefix=V4)
    settled(app, hpb)
    clock.advance(talk_server.GUEST_EXPIRY_SECONDS + 1)  # the guest's app went
    if trigger == "participants":
        alice.get(f"/room/{token}/participants", prefix=V4)
    else:
        join(other_guest, token)
    assert scalar(app, "SELECT count(*) FROM sessions WHERE id = ?", session) == 0
    sent = one_of_each(hpb, "incall", "disinvite")
    assert sent["incall"]["incall"] == 0 and sent["incall"]["changed"] == [
        {"inCall": 0, "lastPing": 0, "sessionId": session}]
    disinvite = sent["disinvite"]
    assert disinvite["sessionids"] == [session] and disinvite["alluserids"] == ["alice"]


def test_a_join_that_replaces_a_session_in_the_call_takes_it_out_of_the_call(app, alice, bob,
                                                                              hpb):
    token = conversation(alice, "bob")
    old = bob.post(f"/room/{token}/participants/active").data["sessionId"]
    bob.post(f"/call/{token}")
    settled(app, hpb)
    new = bob.post(f"/room/{token}/participants/active").data["sessionId"]  # the 2018 app again
    _, incall = hpb.until("incall")
    assert incall["incall"] == 0
    assert [(c["sessionId"], c["inCall"]) for c in incall["changed"]] == [(old, 0)]
    assert new != old and not any(u["sessionId"] == old for u in incall["users"])


def test_the_2018_call_routes_notify_too(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    session = bob.post(f"/room/{token}/participants/active").data["sessionId"]
    settled(app, hpb)
    bob.post(f"/call/{token}")
    _, incall = hpb.until("incall")
    assert incall["changed"][0]["sessionId"] == session and incall["incall"] & 1


def test_promoting_demoting_and_permissions_send_participants(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    join(alice, token)
    his = join(bob, token)
    settled(app, hpb)
    bob_id = attendee_id(alice, token, "bob")
    alice.post(f"/room/{token}/moderators", {"attendeeId": bob_id}, prefix=V4)
    _, participants = hpb.until("participants")
    [changed] = participants["changed"]
    assert changed["sessionId"] == his and changed["participantType"] == 2
    assert changed["permissions"] == ["publish-audio", "publish-video", "publish-screen", "control"]
    assert sorted(u["actorId"] for u in participants["users"]) == ["alice", "bob"]
    alice.delete(f"/room/{token}/moderators", {"attendeeId": bob_id}, prefix=V4)
    _, participants = hpb.until("participants")
    assert participants["changed"][0]["participantType"] == 3
    assert "control" not in participants["changed"][0]["permissions"]
    alice.put(f"/room/{token}/attendees/permissions",
              {"attendeeId": bob_id, "permissions": 1 | 4 | 32}, prefix=V4)
    _, participants = hpb.until("participants")
    assert participants["changed"][0]["permissions"] == ["publish-video"]
    assert participants["changed"][0]["participantPermissions"] == 1 | 4 | 32
    alice.put(f"/room/{token}/permissions/default", {"permissions": 1 | 4 | 16}, prefix=V4)
    _, participants = hpb.until("participants")
    assert {c["sessionId"] for c in participants["changed"]} >= {his}


def test_every_chat_and_system_message_sends_message(app, alice, bob, hpb):
    token = conversation(alice, "bob")
    settled(app, hpb)
    refresh = {"data": {"type": "chat", "chat": {"refresh": True}}}
    alice.post(f"/chat/{token}", {"message": "Hello"}, status=201)
    path, message = hpb.until("message")
    assert path == f"/api/v1/room/{token}" and message == refresh
    alice.put(f"/room/{token}", {"roomName": "Renamed"}, prefix=V4)  # a system message
    assert hpb.until("message")[1] == refresh
    settled(app, hpb)
    join(bob, token)  # a member joining writes no message: no refresh
    assert app.talk.hpb.drain(WAIT)
    assert hpb.empty()


def test_nothing_is_sent_without_a_signaling_server(db_path, clock, password_hash):
    app = talk_server.make_app(db_path, clock=clock, time_scale=0.01)
    try:
        with app.talk.db.write() as db:
            for user_id in ("alice", "bob"):
                talk_server.create_user(db, user_id, password_hash, user_id)
        alice = Client(app, "alice")
        token = conversation(alice, "bob")
        mine = join(alice, token)
        alice.post(f"/call/{token}", {"flags": 3}, prefix=V4)
        alice.post(f"/chat/{token}", {"message": "Hello"}, status=201)
        alice.put(f"/room/{token}", {"roomName": "Renamed"}, prefix=V4)
        open_token = conversation(alice, "bob", room_type=3, name="Open")
        guest = Client(app)
        guest_session = join(guest, open_token)
        guest.post(f"/call/{open_token}", {"flags": 3}, prefix=V4)
        clock.advance(talk_server.CALL_TIMEOUT_SECONDS)  # the guest expires, alice's call times out
        join(Client(app), open_token)
        bob = Client(app, "bob")
        join(bob, token)
        bob.post(f"/call/{token}", {"flags": 3}, prefix=V4)
        assert scalar(app, "SELECT in_call FROM sessions WHERE id = ?", mine) == 0
        assert scalar(app, "SELECT count(*) FROM sessions WHERE id = ?", guest_session) == 0
        make_admin(app, "alice")
        alice.delete("/users/bob", prefix="/ocs/v2.php/cloud")  # leaves two rooms
        alice.delete(f"/room/{token}", prefix=V4)
        assert not app.talk.hpb.enabled and app.talk.hpb._threads == []
    finally:
        app.talk.close()


# --- The queue: retries, a bound, never a blocked request ---------------------------------


def test_a_failed_notification_is_tried_again(app, alice, hpb):
    hpb.statuses = [503, 500]
    token = conversation(alice)
    first, second, third = (hpb.next("invite")[2] for _ in range(3))
    assert first == second == third and first["invite"]["alluserids"] == ["alice"]
    assert app.talk.hpb.drain(WAIT) and token


def test_a_notification_failing_every_time_is_logged_and_dropped(app, alice, hpb, capfd):
    hpb.statuses = [500] * talk_server.HPB_ATTEMPTS
    token = conversation(alice)
    for _ in range(talk_server.HPB_ATTEMPTS):
        hpb.next("invite")
    assert app.talk.hpb.drain(WAIT)
    assert f"invite of {token} not delivered: UnexpectedStatusCode: 500" in capfd.readouterr().err


def test_a_hanging_signaling_server_never_delays_a_request(app, alice, hpb, capfd):
    hpb.release.clear()
    hpb.arrived.clear()
    app.talk.hpb.queue_max = 1
    token = conversation(alice)  # invite: held by the first worker
    assert hpb.arrived.wait(WAIT)
    for n in range(4):  # answered at once though nothing is delivered
        alice.post(f"/chat/{token}", {"message": f"m{n}"}, status=201)
    assert "not delivered: Queue full" in capfd.readouterr().err
    hpb.release.set()
    assert app.talk.hpb.drain(WAIT)


# --- Settings, capabilities and internal signaling in external mode ----------------------


def test_settings_v3_give_the_server_and_a_ticket(app, alice, anonymous, clock):
    data = alice.get("/signaling/settings", prefix=V3).data
    ticket = data["ticket"]
    random, issued, user, mac = ticket.split(":")
    assert len(random) == 16 and issued == str(clock()) and user == "alice" and len(mac) == 64
    assert data["signalingMode"] == "external" and data["server"] == app.talk.signaling_servers[0]
    assert data["hideWarning"] is True and data["userId"] == "alice"
    assert data["helloAuthParams"] == {"1.0": {"userid": "alice", "ticket": ticket},
                                       "2.0": {"token": ""}}
    assert ticket_of(alice) != ticket  # a fresh one each time
    guest = anonymous.get("/signaling/settings", prefix=V3).data
    assert guest["userId"] is None and guest["ticket"].split(":")[2] == ""


def test_settings_v1_give_the_server_and_a_ticket(app, alice):
    data = alice.get("/signaling/settings").data
    assert data["signalingMode"] == "external" and data["server"] == app.talk.signaling_servers[0]
    assert auth(app, "alice", data["ticket"])["auth"]["userid"] == "alice"


def test_several_servers_each_room_always_on_the_same_one(db_path, clock, password_hash):
    # Nothing listens on the discard port: the notifications fail at once (and are logged).
    servers = ["http://127.0.0.1:9", "ws://127.0.0.1:9/signaling/"]
    app = talk_server.make_app(db_path, clock=clock, signaling_servers=servers,
                               signaling_secret=SECRET)
    try:
        with app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        alice = Client(app, "alice")
        assert alice.get("/signaling/settings", prefix=V3).data["server"] == servers[0]
        seen = set()
        for _ in range(2):
            token = conversation(alice)
            room_id = scalar(app, "SELECT id FROM rooms WHERE token = ?", token)
            server = alice.get("/signaling/settings", {"token": token}, prefix=V3).data["server"]
            assert server == servers[room_id % 2].rstrip("/")
            seen.add(server)
        assert seen == {"http://127.0.0.1:9", "ws://127.0.0.1:9/signaling"}
        assert talk_server.signaling_api_url("wss://hpb-2.example/signaling", "abc") == (
            "https://hpb-2.example/signaling/api/v1/room/abc")
    finally:
        app.talk.close()


def test_internal_signaling_is_refused_as_talk_does(app, alice):
    token = conversation(alice)
    join(alice, token)
    alice.post(f"/room/{token}/participants/active")  # a 2018 session too
    messages = {"messages": "[]"}
    for method, prefix, path in [("GET", V3, f"/signaling/{token}"),
                                 ("POST", V3, f"/signaling/{token}"),
                                 ("GET", V1, f"/signaling/{token}"),
                                 ("POST", V1, f"/signaling/{token}"),
                                 ("GET", V1, "/signaling"), ("POST", V1, "/signaling")]:
        answer = alice.request(method, path, messages if method == "POST" else None, status=400,
                               prefix=prefix)
        assert answer.data == "Internal signaling disabled."


def test_capabilities_in_external_mode(app, anonymous):
    spreed = anonymous.get("/capabilities", prefix="/ocs/v2.php/cloud").data["capabilities"]["spreed"]
    assert "signaling-v3" in spreed["features"]  # the signaling server then calls api/v3
    # No JWT hello v2 here: without its key the clients and the server use the ticket.
    assert spreed["config"]["signaling"] == {"session-ping-limit": 200}


def test_the_talk_hash_changes_with_the_signaling_server(app, db_path, tmp_path, clock):
    internal = talk_server.make_app(tmp_path / "other.db", clock=clock)
    try:
        assert internal.talk.config_hash != app.talk.config_hash
    finally:
        internal.talk.close()


# --- The apps' view: what talk-android reads ----------------------------------------------


def test_the_android_app_finds_and_authenticates_with_the_signaling_server(app, alice):
    """talk-android: SignalingSettingsWorker stores `server` and `ticket` of the v3
    settings (no token); a non-empty server means external signaling;
    WebSocketConnectionHelper connects to server + "/spreed" and says hello v1
    with `userid`, `ticket` and the backend URL of ApiUtils.getUrlForSignalingBackend
    (the API version from the capabilities' signaling-v3); the signaling server
    then posts auth there, and a room request with the Talk session of the join."""
    capabilities = alice.get("/capabilities", prefix="/ocs/v2.php/cloud").data["capabilities"]
    version = 3 if "signaling-v3" in capabilities["spreed"]["features"] else 1
    settings = alice.get("/signaling/settings", prefix=V3).data
    server, ticket = settings["server"], settings["ticket"]
    assert server and ticket  # TextUtils.isEmpty on both decides external signaling
    websocket = server.replace("https://", "wss://").replace("http://", "ws://") + "/spreed"
    assert websocket.startswith("ws://127.0.0.1:")
    backend_path = f"/ocs/v2.php/apps/spreed/api/v{version}"
    hello = {"userid": "alice", "ticket": ticket}
    answer = backend(app, {"type": "auth", "auth": {"version": "1.0", "params": hello}},
                     path=backend_path)
    assert answer["auth"]["userid"] == "alice"
    token = conversation(alice)
    session = join(alice, token)
    per_room = alice.get("/signaling/settings", {"token": token}, prefix=V3).data
    assert per_room["server"] == server and per_room["signalingMode"] == "external"
    answer = backend(app, {"type": "room", "room": {"version": "1.0", "roomid": token,
                                                    "userid": "alice", "sessionid": session}},
                     path=backend_path)
    assert answer["room"]["roomid"] == token and "control" in answer["room"]["permissions"]


# --- Configuration ----------------------------------------------------------------------


def test_a_server_without_a_secret_or_a_bad_url_is_refused(db_path):
    with pytest.raises(ValueError, match="secret"):
        talk_server.make_app(db_path, signaling_servers=["https://hpb.example"])
    with pytest.raises(ValueError, match="not an http"):
        talk_server.make_app(db_path, signaling_servers=["hpb.example"], signaling_secret=SECRET)


@pytest.mark.parametrize("argv, environment, message", [
    (["--signaling-server", "https://hpb.example"], {}, "needs the secret"),
    ([], {"TALK_SIGNALING_SERVERS": "https://a.example, https://b.example"}, "needs the secret"),
    (["--signaling-server", "ftp://hpb.example", "--signaling-secret", "s"], {}, "not an http"),
])
def test_serve_refuses_a_signaling_server_without_a_secret(tmp_path, monkeypatch, capsys, argv,
                                                           environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        talk_server.main(["serve", "--db", str(tmp_path / "t.db"), "--port", "0", *argv])
    assert stop.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "t.db").exists()  # refused before anything opened


def test_serve_reads_the_signaling_options_and_variables(monkeypatch):
    monkeypatch.setenv("TALK_SIGNALING_SECRET", "from-env")
    monkeypatch.setenv("TALK_SIGNALING_INTERNAL_SECRET", "internal")
    args = talk_server.parse_args(["serve", "--signaling-server", "https://a.example",
                                   "--signaling-server", "https://b.example"])
    assert args.signaling_server == ["https://a.example", "https://b.example"]
    assert args.signaling_secret == "from-env" and args.signaling_internal_secret == "internal"
