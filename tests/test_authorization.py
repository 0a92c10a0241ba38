"""Who may do what: every endpoint against every kind of actor (SPEC 1.5, 3-7, 9).

One fixture world per test:

- room A, public, "Room A": alice OWNER (joined), bob MODERATOR (joined),
  henry MODERATOR (not joined), carol USER (joined), erin USER (not joined),
  dave self-joined (type 5), a guest joined (type 4), one chat message;
- room B, public, "Room B": grace OWNER (joined) and another guest (joined);
- frank: a user with no row anywhere; group "team" with carol.

The table below says, for each endpoint, the status each actor gets, read off
the SPEC tables; a reader can check every row against them. Each cell is one
test that builds the world, makes the call and checks the status, the
envelope, and that a refused call (and any read) changed nothing at all.
"""

import hashlib
import json

import pytest
from conftest import API, CLOUD, PASSWORD

import talk_server

# Actors, in the order of every status tuple below.
ACTORS = (
    "owner",  # alice, type 1, joined in A
    "moderator",  # bob, type 2, joined in A
    "member",  # carol, type 3, joined in A
    "member_not_joined",  # erin, type 3, no session
    "self_joined",  # dave, type 5 (joined the public room A himself)
    "guest",  # a guest joined in A (type 4)
    "guest_not_joined",  # a guest with a cookie, joined in B only
    "non_member",  # frank, logged in, no row anywhere
    "anonymous",  # no credentials, no cookie
    "wrong_password",  # alice with a wrong password
    "other_room",  # grace, owner of B and joined there, no row in A
)

# --- Status patterns, one per rule of SPEC --------------------------------------
#                    own  mod  mem  m-nj self gst  g-nj non  anon wrong other

# Public endpoints a public room shows to anyone (SPEC 3 GET /room/{token},
# 4 GET participants and join/leave, 7 settings, 8); wrong credentials: 401 (1.5).
ANYONE = (200, 200, 200, 200, 200, 200, 200, 200, 200, 401, 200)
# Any signed-in user (SPEC 3 GET /room, 9 GET /cloud/user); guests: 401.
USERS = (200, 200, 200, 200, 200, 401, 401, 200, 401, 401, 200)
# "404 unless member; 403 unless moderator" on a user endpoint (SPEC 3, 4):
# type 5 is not a member (404), guests are not users (401).
MODERATORS = (200, 200, 403, 403, 404, 401, 401, 404, 401, 401, 404)
# DELETE participants/self: "404 unless the user has a row" (type 5 has one).
ROW_HOLDERS = (200, 200, 200, 200, 200, 401, 401, 404, 401, 401, 404)
# GET /call and chat: members (joined or not), joined type 5, joined guests
# (SPEC 5 GET /call "404 unless joined or member", SPEC 6).
MEMBERS_OR_JOINED = (200, 200, 200, 200, 200, 200, 404, 404, 404, 401, 404)
# POST /call, ping, POST|GET /signaling/{token}: a session in this room.
JOINED = (200, 200, 200, 404, 200, 200, 404, 404, 404, 401, 404)
# DELETE /call: "a guest with no session at all: 200"; others 404 unless joined.
LEAVE_CALL = (200, 200, 200, 404, 200, 200, 404, 404, 200, 401, 404)
# POST|GET /signaling without a token: the caller's most recently active
# session in any room (SPEC 7): the guest and grace have theirs in room B.
ANY_SESSION = (200, 200, 200, 404, 200, 200, 200, 404, 404, 401, 200)
# Provisioning: administrators only, else 403 (SPEC 9); alice is the admin.
ADMIN = (200, 403, 403, 403, 403, 401, 401, 403, 401, 401, 403)
# ...except that a user may GET /cloud/users/{their own id} (carol here).
ADMIN_OR_CAROL = (200, 403, 200, 403, 403, 401, 401, 403, 401, 401, 403)


def created(pattern):
    """The same pattern where success is 201 Created (POST /room, POST /chat)."""
    return tuple(201 if status == 200 else status for status in pattern)


# (method, prefix, path, params, statuses). {A} is room A's token, {B} room B's,
# {guest_session} the joined guest's session id in A.
TABLE = [
    # Room management (SPEC 3)
    ("POST", API, "/room", {"roomType": 3, "roomName": "New room"}, created(USERS)),
    ("GET", API, "/room", None, USERS),
    ("GET", API, "/room/{A}", None, ANYONE),
    ("PUT", API, "/room/{A}", {"roomName": "Renamed"}, MODERATORS),
    ("PUT", API, "/room/{A}/password", {"password": "pw"}, MODERATORS),
    ("DELETE", API, "/room/{A}", None, MODERATORS),
    ("POST", API, "/room/{A}/public", None, MODERATORS),
    ("DELETE", API, "/room/{A}/public", None, MODERATORS),
    # Participant management (SPEC 4)
    ("GET", API, "/room/{A}/participants", None, ANYONE),
    ("POST", API, "/room/{A}/participants", {"newParticipant": "frank"}, MODERATORS),
    ("DELETE", API, "/room/{A}/participants", {"participant": "erin"}, MODERATORS),
    (
        "DELETE",
        API,
        "/room/{A}/participants/guests",
        {"participant": "{guest_session}"},
        MODERATORS,
    ),
    ("DELETE", API, "/room/{A}/participants/self", None, ROW_HOLDERS),
    ("POST", API, "/room/{A}/participants/active", None, ANYONE),
    ("DELETE", API, "/room/{A}/participants/active", None, ANYONE),
    ("POST", API, "/room/{A}/moderators", {"participant": "carol"}, MODERATORS),
    ("DELETE", API, "/room/{A}/moderators", {"participant": "henry"}, MODERATORS),
    # Call management (SPEC 5)
    ("GET", API, "/call/{A}", None, MEMBERS_OR_JOINED),
    ("POST", API, "/call/{A}", None, JOINED),
    ("POST", API, "/call/{A}/ping", None, JOINED),
    ("DELETE", API, "/call/{A}", None, LEAVE_CALL),
    # Chat (SPEC 6)
    ("GET", API, "/chat/{A}", {"timeout": 0}, MEMBERS_OR_JOINED),
    ("POST", API, "/chat/{A}", {"message": "Hello"}, created(MEMBERS_OR_JOINED)),
    # Signaling (SPEC 7)
    ("GET", API, "/signaling/settings", None, ANYONE),
    ("POST", API, "/signaling", {"messages": lambda w: probe_message(w, None)}, ANY_SESSION),
    ("GET", API, "/signaling", None, ANY_SESSION),
    ("POST", API, "/signaling/{A}", {"messages": lambda w: probe_message(w, "{A}")}, JOINED),
    ("GET", API, "/signaling/{A}", None, JOINED),
    # Capabilities and provisioning (SPEC 8, 9)
    ("GET", CLOUD, "/capabilities", None, ANYONE),
    ("GET", CLOUD, "/user", None, USERS),
    ("GET", CLOUD, "/users", None, ADMIN),
    ("POST", CLOUD, "/users", {"userid": "newbie", "password": "pw"}, ADMIN),
    ("GET", CLOUD, "/users/carol", None, ADMIN_OR_CAROL),
    ("PUT", CLOUD, "/users/carol", {"key": "displayname", "value": "Caroline"}, ADMIN),
    ("DELETE", CLOUD, "/users/erin", None, ADMIN),
    ("GET", CLOUD, "/users/details", None, ADMIN),
    ("PUT", CLOUD, "/users/erin/disable", None, ADMIN),
    ("PUT", CLOUD, "/users/erin/enable", None, ADMIN),
    # SPEC 9 opens GET /cloud/users/{own id} to non-administrators; their own
    # groups too, as Nextcloud allows (test_accounts agrees).
    ("GET", CLOUD, "/users/carol/groups", None, ADMIN_OR_CAROL),
    ("POST", CLOUD, "/users/erin/groups", {"groupid": "team"}, ADMIN),
    ("DELETE", CLOUD, "/users/carol/groups", {"groupid": "team"}, ADMIN),
    ("GET", CLOUD, "/groups", None, ADMIN),
    ("POST", CLOUD, "/groups", {"groupid": "newgroup"}, ADMIN),
    ("GET", CLOUD, "/groups/details", None, ADMIN),
    ("GET", CLOUD, "/groups/team", None, ADMIN),
    ("DELETE", CLOUD, "/groups/team", None, ADMIN),
]

# Route path templates in ROUTES / CLOUD_ROUTES for the paths above.
ROUTE_ARGS = {"{A}": "<token>", "carol": "<userid>", "erin": "<userid>", "team": "<groupid>"}

USER_OF = {
    "owner": "alice",
    "moderator": "bob",
    "member": "carol",
    "member_not_joined": "erin",
    "self_joined": "dave",
    "non_member": "frank",
    "other_room": "grace",
}


def route_of(prefix, path):
    """The ROUTES / CLOUD_ROUTES path a row of TABLE exercises."""
    parts = []
    for part in path.split("/"):
        parts.append(ROUTE_ARGS.get(part, part))
    return ("api" if prefix == API else "cloud", "/".join(parts))


def cells():
    for method, prefix, path, params, statuses in TABLE:
        assert len(statuses) == len(ACTORS), path
        for actor, status in zip(ACTORS, statuses, strict=True):
            yield pytest.param(
                method, prefix, path, params, actor, status, id=f"{method} {path} {actor}"
            )


# --- The world -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_worlds(monkeypatch):
    """Make ~480 small worlds cheap without changing any answer.

    - The two scrypt functions are pure: memoized, a wrong password still
      fails, but a world no longer pays 0.1 s for each first login.
    - Databases open with synchronous=NORMAL: each world commits ~25 times
      and FULL's fsync per commit dominated the run (minutes on a busy
      disk). Durability is what test_reliability.py tests, not this file.
    """
    real_connect = talk_server.connect
    monkeypatch.setattr(
        talk_server, "connect", lambda path, durability="full": real_connect(path, "normal")
    )
    checks, hashes = fast_worlds.checks, fast_worlds.hashes
    real_check, real_hash = talk_server.check_password, talk_server.hash_password

    def check_password(stored, password):
        key = (stored, password)
        if key not in checks:
            checks[key] = real_check(stored, password)
        return checks[key]

    def hash_password(password):
        if password not in hashes:
            hashes[password] = real_hash(password)
        return hashes[password]

    monkeypatch.setattr(talk_server, "check_password", check_password)
    monkeypatch.setattr(talk_server, "hash_password", hash_password)


fast_worlds.checks, fast_worlds.hashes = {}, {}


def join(client, token):
    return client.post(f"/room/{token}/participants/active", status=200).data["sessionId"]


@pytest.fixture
def world(
    app, clock, alice, bob, carol, dave, guest, other_guest, anonymous, wrong_password, make_client
):
    for user_id in ("erin", "frank", "grace", "henry"):
        alice.post(
            "/users",
            {"userid": user_id, "password": PASSWORD, "displayName": user_id.capitalize()},
            prefix=CLOUD,
        )
    alice.post("/groups", {"groupid": "team"}, prefix=CLOUD)
    alice.post("/users/carol/groups", {"groupid": "team"}, prefix=CLOUD)
    erin, frank, grace = make_client("erin"), make_client("frank"), make_client("grace")

    a = alice.post("/room", {"roomType": 3, "roomName": "Room A"}, status=201).data["token"]
    for user_id in ("bob", "carol", "erin", "henry"):
        alice.post(f"/room/{a}/participants", {"newParticipant": user_id})
    for user_id in ("bob", "henry"):
        alice.post(f"/room/{a}/moderators", {"participant": user_id})
    sessions = {
        name: join(client, a)
        for name, client in (
            ("alice", alice),
            ("bob", bob),
            ("carol", carol),
            ("dave", dave),
            ("guest", guest),
        )
    }
    alice.post(f"/chat/{a}", {"message": "Welcome"}, status=201)

    b = grace.post("/room", {"roomType": 3, "roomName": "Room B"}, status=201).data["token"]
    join(grace, b)
    join(other_guest, b)

    clients = {
        "owner": alice,
        "moderator": bob,
        "member": carol,
        "member_not_joined": erin,
        "self_joined": dave,
        "guest": guest,
        "guest_not_joined": other_guest,
        "non_member": frank,
        "anonymous": anonymous,
        "wrong_password": wrong_password,
        "other_room": grace,
    }
    types = {
        row["userId"] or "guest": row["participantType"]
        for row in alice.get(f"/room/{a}/participants").data
    }
    assert types == {"alice": 1, "bob": 2, "henry": 2, "carol": 3, "erin": 3, "dave": 5, "guest": 4}
    return {
        "app": app, "clock": clock, "A": a, "B": b, "guest_session": sessions["guest"],
        "clients": clients,
    }


def snapshot(app):
    """Every row of every table, to prove a call changed nothing."""
    tables = (
        "users",
        "groups",
        "group_members",
        "rooms",
        "participants",
        "sessions",
        "messages",
        "signaling",
    )
    with app.talk.db.read() as db:
        return {
            t: sorted((tuple(r) for r in db.execute(f"SELECT * FROM {t}")), key=repr)
            for t in tables
        }


def fill(value, w):
    if callable(value):  # needs the caller (w["actor"]): a signaling message
        return value(w)
    return (
        value.format(A=w["A"], B=w["B"], guest_session=w["guest_session"])
        if isinstance(value, str)
        else value
    )


# --- What a successful call must have done ---------------------------------------


def room_row(w, token="{A}"):
    with w["app"].talk.db.read() as db:
        return talk_server.room_by_token(db, fill(token, w))


def actor_row(w, actor, token="{A}"):
    """The actor's participant row (with session) in a room, or None."""
    client = w["clients"][actor]
    user_id = USER_OF.get(actor)
    guest_id = None
    if user_id is None:
        cookie = client.test.cookies.get(talk_server.GUEST_COOKIE)
        if cookie is None:
            return None
        guest_id = hashlib.sha256(cookie.encode()).hexdigest()
    room = room_row(w, token)
    with w["app"].talk.db.read() as db:
        return talk_server.participant_of(db, room["id"], user_id, guest_id)


def user_row(w, user_id):
    with w["app"].talk.db.read() as db:
        return talk_server.get_user(db, user_id)


def groups(w, user_id):
    with w["app"].talk.db.read() as db:
        return talk_server.groups_of(db, user_id)


def type_of(w, user_id):
    """A user's participant type in room A (None without a row)."""
    with w["app"].talk.db.read() as db:
        row = talk_server.participant_of(db, room_row(w)["id"], user_id)
    return row and row["participant_type"]


def group_ids(w):
    with w["app"].talk.db.read() as db:
        return talk_server.list_groups(db)


def check_join(w, actor):
    row = actor_row(w, actor)
    assert row is not None and row["session_id"] != "0"
    if actor in ("guest", "guest_not_joined", "anonymous"):
        assert row["participant_type"] == 4
    elif actor in ("non_member", "other_room", "self_joined"):
        assert row["participant_type"] == 5
    return True


def check_leave(w, actor):
    row = actor_row(w, actor)
    if actor in ("owner", "moderator", "member", "member_not_joined"):
        return row["session_id"] == "0"
    return row is None  # guests and type 5 lose their row (or never had one)


def actor_ids(w, actor):
    """(user id, guest id) of an actor: a user's name, or its guest cookie's hash."""
    user_id, guest_id = USER_OF.get(actor), None
    if user_id is None:
        cookie = w["clients"][actor].test.cookies.get(talk_server.GUEST_COOKIE)
        guest_id = cookie and hashlib.sha256(cookie.encode()).hexdigest()
    return user_id, guest_id


def touched(w, actor):
    """The caller was seen just now (SPEC 2: pings and signaling refresh
    lastPing): its most recently seen row carries the clock's time."""
    user_id, guest_id = actor_ids(w, actor)
    with w["app"].talk.db.read() as db:
        seen = db.execute(
            "SELECT MAX(last_ping) FROM participants WHERE user_id = ? OR guest_id = ?",
            (user_id, guest_id),
        ).fetchone()[0]
    return seen == w["clock"]()


def sender_session(w, actor, token):
    """The session a signaling send of `actor` speaks for: its session in the
    token's room, or (no token) its most recently active one; "0" if none."""
    if token is not None:
        row = actor_row(w, actor, token)
        return row["session_id"] if row is not None else "0"
    user_id, guest_id = actor_ids(w, actor)
    with w["app"].talk.db.read() as db:
        row = talk_server.latest_session_of(db, user_id, guest_id)
    return row["session_id"] if row else "0"


PROBE = "authorization-probe"


def probe_message(w, token):
    """One offer from the caller's session to itself: a success must queue it."""
    me = sender_session(w, w["actor"], token)
    fn = json.dumps({"to": me, "type": "offer", "payload": PROBE})
    return json.dumps([{"ev": "message", "sessionId": me, "fn": fn}])


def relayed_to_self(w, actor, token):
    """The probe message sits in the caller's own queue (and the send refreshed lastPing)."""
    me = sender_session(w, actor, token)
    with w["app"].talk.db.read() as db:
        rows = db.execute(
            "SELECT data FROM signaling WHERE recipient = ? AND sender = ?", (me, me)
        ).fetchall()
    return touched(w, actor) and any(json.loads(row[0])["payload"] == PROBE for row in rows)


def check_in_call(w, actor, in_call):
    row = actor_row(w, actor)
    return row is None or bool(row["in_call"]) is in_call


# (method, path of TABLE) -> what a successful call by `a` did to world `w`.
EFFECTS = {
    ("POST", "/room"): lambda w, a: room_row(w, w["response"].data["token"])["name"] == "New room",
    ("PUT", "/room/{A}"): lambda w, a: room_row(w)["name"] == "Renamed",
    ("PUT", "/room/{A}/password"): lambda w, a: room_row(w)["password_hash"].startswith("scrypt$"),
    ("DELETE", "/room/{A}"): lambda w, a: room_row(w) is None,
    ("POST", "/room/{A}/public"): lambda w, a: room_row(w)["type"] == 3,
    ("DELETE", "/room/{A}/public"): lambda w, a: (
        room_row(w)["type"] == 2
        and actor_row(w, "guest") is None
        and actor_row(w, "self_joined") is None
    ),
    ("POST", "/room/{A}/participants"): lambda w, a: type_of(w, "frank") == 3,
    ("DELETE", "/room/{A}/participants"): lambda w, a: actor_row(w, "member_not_joined") is None,
    ("DELETE", "/room/{A}/participants/guests"): lambda w, a: actor_row(w, "guest") is None,
    ("DELETE", "/room/{A}/participants/self"): lambda w, a: actor_row(w, a) is None,
    ("POST", "/room/{A}/participants/active"): check_join,
    ("DELETE", "/room/{A}/participants/active"): check_leave,
    ("POST", "/room/{A}/moderators"): lambda w, a: type_of(w, "carol") == 2,
    ("DELETE", "/room/{A}/moderators"): lambda w, a: type_of(w, "henry") == 3,
    ("POST", "/call/{A}"): lambda w, a: check_in_call(w, a, True) and touched(w, a),
    ("POST", "/call/{A}/ping"): touched,
    ("POST", "/signaling"): lambda w, a: relayed_to_self(w, a, None),
    ("GET", "/signaling"): touched,
    ("POST", "/signaling/{A}"): lambda w, a: relayed_to_self(w, a, "{A}"),
    ("GET", "/signaling/{A}"): touched,
    ("DELETE", "/call/{A}"): lambda w, a: check_in_call(w, a, False),
    ("POST", "/chat/{A}"): lambda w, a: w["response"].data["message"] == "Hello",
    ("POST", "/users"): lambda w, a: user_row(w, "newbie") is not None,
    ("PUT", "/users/carol"): lambda w, a: user_row(w, "carol")["display_name"] == "Caroline",
    ("DELETE", "/users/erin"): lambda w, a: user_row(w, "erin") is None,
    ("PUT", "/users/erin/disable"): lambda w, a: user_row(w, "erin")["enabled"] == 0,
    ("PUT", "/users/erin/enable"): lambda w, a: user_row(w, "erin")["enabled"] == 1,
    ("POST", "/users/erin/groups"): lambda w, a: "team" in groups(w, "erin"),
    ("DELETE", "/users/carol/groups"): lambda w, a: "team" not in groups(w, "carol"),
    ("POST", "/groups"): lambda w, a: "newgroup" in group_ids(w),
    ("DELETE", "/groups/team"): lambda w, a: "team" not in group_ids(w),
}


# --- The tests -------------------------------------------------------------------


def test_the_table_covers_every_route():
    covered = {(method, *route_of(prefix, path)) for method, prefix, path, *_ in TABLE}
    routes = {(m, "api", p) for m, p, *_ in talk_server.ROUTES}
    routes |= {(m, "cloud", p) for m, p, *_ in talk_server.CLOUD_ROUTES}
    assert covered == routes


@pytest.mark.parametrize("method, prefix, path, params, actor, expected", list(cells()))
def test_who_may_call_what(world, method, prefix, path, params, actor, expected):
    app, client = world["app"], world["clients"][actor]
    world["actor"] = actor
    url = fill(path, world)
    params = {key: fill(value, world) for key, value in (params or {}).items()}
    # The clock moves (within the 30 s active window), so a refresh of lastPing
    # shows as a change: with a frozen clock a ping did nothing visible.
    world["clock"].advance(7)
    before = snapshot(app)

    response = client.request(method, url, params, status=expected, prefix=prefix)

    meta = response.json["ocs"]["meta"]
    if expected != 401:  # 401 carries statuscode 997: see the test below
        assert meta["statuscode"] == expected
    assert meta["status"] == ("ok" if expected < 300 else "failure")
    if expected >= 400:
        assert meta["message"] and meta["message"] != "OK"
    after = snapshot(app)
    refreshes = method == "GET" and path.startswith("/signaling") and path != "/signaling/settings"
    if expected >= 400 or (method == "GET" and not refreshes):
        # A refused call changes nothing; a read changes nothing either.
        assert after == before
    else:
        world["response"] = response
        effect = EFFECTS.get((method, path))
        if effect is not None:
            assert effect(world, actor), f"{method} {path} by {actor} had no effect"


def test_refused_renames_keep_the_name(world):
    """The example of the brief, spelled out: nobody below moderator renames."""
    a = world["A"]
    for actor, status in zip(ACTORS, MODERATORS, strict=True):
        if status == 200:
            continue
        world["clients"][actor].put(f"/room/{a}", {"roomName": f"by {actor}"}, status=status)
    assert world["clients"]["owner"].get(f"/room/{a}").data["name"] == "Room A"


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("actor", ["wrong_password", "guest", "anonymous"])
def test_401_is_http_401_with_statuscode_997_on_v1_and_v2(world, version, actor):
    """Bad Basic credentials anywhere, or no user where one is needed: HTTP 401
    on v1 too, envelope statuscode 997 (SPEC 1.3, 1.5)."""
    client = world["clients"][actor]
    for n, (method, prefix, path, params, statuses) in enumerate(TABLE):
        if statuses[ACTORS.index(actor)] != 401:
            continue
        # A new address per call: five failures from one address are 429; and
        # a fresh throttle, as twenty for one user name are too.
        client.test.extra_environ = {"REMOTE_ADDR": f"10.0.{n}.1"}
        world["app"].talk.throttle = talk_server.Throttle()
        prefix = prefix.replace("/ocs/v2.php", f"/ocs/{version}.php")
        world["actor"] = actor
        params = {key: fill(value, world) for key, value in (params or {}).items()}
        response = client.request(method, fill(path, world), params, status=401, prefix=prefix)
        meta = response.json["ocs"]["meta"]
        assert (meta["status"], meta["statuscode"]) == ("failure", 997), path
        assert meta["message"]
