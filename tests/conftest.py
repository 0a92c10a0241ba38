"""Fixtures: a fresh app per test, a clock the test moves, one client per actor.

A test reads as who does what, expecting which code::

    token = alice.post("/room", {"roomType": 2}, status=201).data["token"]
    bob.get(f"/room/{token}", status=404)
"""

import base64
import hashlib

import pytest
import webtest
from helpers import add, create, join, promote

import talk_server

API = "/ocs/v2.php/apps/spreed/api/v1"
CLOUD = "/ocs/v2.php/cloud"
PASSWORD = "secret"
START = 1_700_000_000


class Clock:
    """A clock tests move by hand: `clock.advance(31)` passes the active window."""

    def __init__(self, now=START):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Client:
    """One actor's HTTP client: its own cookie jar, its own credentials.

    Every call names its expected status; `.data` is the OCS data.
    """

    def __init__(self, app, user=None, password=PASSWORD, prefix=API):
        self.test = webtest.TestApp(app)
        self.user = user
        self.prefix = prefix
        self.headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
        if user is not None:
            raw = f"{user}:{password}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()

    def request(self, method, path, params=None, status=200, headers=None, prefix=None):
        url = (self.prefix if prefix is None else prefix) + path
        all_headers = {**self.headers, **(headers or {})}
        kwargs = {"headers": all_headers, "expect_errors": True}
        if method == "GET":
            response = self.test.get(url, params or {}, **kwargs)
        elif method == "POST":
            response = self.test.post(url, params or {}, **kwargs)
        elif method == "PUT":
            response = self.test.put(url, params or {}, **kwargs)
        else:
            response = self.test.delete(url, params or "", **kwargs)
        # WebTest ignores `status` with expect_errors (which lets a 500 be
        # read): the check is here, so status= on every call asserts the code.
        if status not in (None, "*"):
            assert response.status_int == status, (
                f"{method} {url}: expected {status}, got {response.status}: {response.body[:300]!r}"
            )
        if response.content_type == "application/json" and "ocs" in response.json:
            response.data = response.json["ocs"]["data"]
            response.meta = response.json["ocs"]["meta"]
        return response

    def get(self, path, params=None, status=200, **kw):
        return self.request("GET", path, params, status, **kw)

    def post(self, path, params=None, status=200, **kw):
        return self.request("POST", path, params, status, **kw)

    def put(self, path, params=None, status=200, **kw):
        return self.request("PUT", path, params, status, **kw)

    def delete(self, path, params=None, status=200, **kw):
        return self.request("DELETE", path, params, status, **kw)


@pytest.fixture(scope="session")
def password_hash():
    """One cheap scrypt hash for every test user.

    The stored string carries its own parameters, so the server verifies it
    with n=16 instead of 2**14: the same code path at a thousandth the cost.
    """
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=16, r=8, p=1)
    b64 = base64.b64encode
    hashed = f"scrypt$16$8$1${b64(salt).decode()}${b64(digest).decode()}"
    assert talk_server.check_password(hashed, PASSWORD)
    return hashed


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "talk.db"


@pytest.fixture
def app(db_path, clock, password_hash):
    """A fresh app with users alice (administrator), bob, carol and dave."""
    app = talk_server.make_app(db_path, clock=clock, time_scale=0.01)
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob", "carol", "dave"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
        talk_server.create_group(db, "admin")
        talk_server.add_to_group(db, "admin", "alice")
    yield app
    app.talk.close()


@pytest.fixture
def alice(app):
    return Client(app, "alice")


@pytest.fixture
def bob(app):
    return Client(app, "bob")


@pytest.fixture
def carol(app):
    return Client(app, "carol")


@pytest.fixture
def dave(app):
    return Client(app, "dave")


@pytest.fixture
def guest(app):
    """A browser without an account: it gets a guest cookie when it joins."""
    return Client(app)


@pytest.fixture
def other_guest(app):
    return Client(app)


@pytest.fixture
def anonymous(app):
    """No credentials and no cookie, ever (a fresh client per call would do too)."""
    return Client(app)


@pytest.fixture
def wrong_password(app):
    return Client(app, "alice", password="not-the-password")


@pytest.fixture
def make_client(app):
    """Build more clients: make_client("bob", prefix=...)."""

    def make(user=None, **kwargs):
        return Client(app, user, **kwargs)

    return make


# --- Clients on today's API (v4) ---------------------------------------------

V4 = "/ocs/v2.php/apps/spreed/api/v4"


@pytest.fixture
def v4(make_client):
    """v4("bob") is a new device of bob's on API v4 (its own cookie jar); v4() a guest's."""
    return lambda user=None: make_client(user, prefix=V4)


@pytest.fixture
def a(v4):
    return v4("alice")


@pytest.fixture
def b(v4):
    return v4("bob")


@pytest.fixture
def c(v4):
    return v4("carol")


# --- Rooms shared by the room and participant tests --------------------------


@pytest.fixture
def group_room(alice, bob, carol):
    """A group room "Team": alice owner, bob moderator, carol member; dave is no member."""
    token = create(alice, 2, roomName="Team")
    add(alice, token, "bob")
    promote(alice, token, "bob")
    add(alice, token, "carol")
    return token


@pytest.fixture
def public_room(alice, bob, carol, dave, guest):
    """A public room "Open": alice owner, bob moderator, carol member,
    dave self-joined (type 5), a guest joined with a cookie (type 4)."""
    token = create(alice, 3, roomName="Open")
    add(alice, token, "bob")
    promote(alice, token, "bob")
    add(alice, token, "carol")
    join(dave, token)
    join(guest, token)
    return token


@pytest.fixture
def guest_with_cookie(guest, alice):
    """The guest, holding a cookie from joining some other public room."""
    join(guest, create(alice, 3, roomName="Lobby"))
    return guest
