"""Hostile input: whatever a client sends, the answer is an OCS envelope, never a 500.

Property tests (hypothesis) throw wrong types, huge and negative numbers,
empty and very long strings, RTL marks, NUL, emoji and lone surrogates,
invalid UTF-8, malformed JSON, odd content types, duplicate parameters and
oversized bodies at every endpoint, as a user, a joined guest and a stranger.
The property: a 2xx (the input happened to be valid) or a 4xx, in an
envelope whose meta agrees with the HTTP status and names a reason for
errors, answered promptly.
"""

import base64
import io
import json
import re
from urllib.parse import quote

import pytest
from conftest import API, CLOUD, PASSWORD, Client
from helpers import every_row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import talk_server

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# Every parameter name the API reads, plus a few it does not.
PARAM_NAMES = [
    "roomType",
    "invite",
    "roomName",
    "password",
    "newParticipant",
    "participant",
    "offset",
    "notOlderThanTimestamp",
    "timeout",
    "message",
    "messages",
    "userid",
    "displayName",
    "key",
    "value",
    "groupid",
    "search",
    "limit",
    "format",
    "sessionId",
    "",
    "a" * 300,
]

NASTY_STRINGS = [
    "",
    " ",
    "\t\n",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",  # right-to-left override
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew
    "\U0001f600\U0001f4a9",  # emoji
    "\ud800",  # lone surrogates: "\ud800" escapes in JSON
    "x\udfffy",
    "\ufeff",
    "\uffff",
    "-1",
    "0",
    "1e400",
    "NaN",
    "Infinity",
    "0x10",
    "１２",  # fullwidth digits
    "99999999999999999999999999",
    "-99999999999999999999999999",
    "<xml/>",
    "x'); DROP TABLE rooms;--",
    "%00",
    "../../etc/passwd",
    "x" * 201,
    "y" * 40000,
    "json",
    "xml",
]

scalars = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "So", "Lo"]), max_size=10),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**63, 2**63 - 1, -(2**63), 2**64, 10**30, -1, 0, 1, 2, 3]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
params_strategy = st.dictionaries(
    st.sampled_from(PARAM_NAMES) | st.text(max_size=8), values, max_size=5
)


# --- Helpers -----------------------------------------------------------------


def form_pairs(params):
    """Flatten params to (key, text) pairs: lists repeat the key (a=1&a=2)."""
    pairs = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                item = ""
            elif isinstance(item, bool):
                item = "true" if item else "false"
            elif isinstance(item, dict):
                item = json.dumps(item)
            pairs.append((str(key), str(item)))
    return pairs


def form_encode(params) -> bytes:
    """urlencode that keeps lone surrogates as (invalid) UTF-8 percent-escapes."""
    return "&".join(
        quote(k, safe="", errors="surrogatepass") + "=" + quote(v, safe="", errors="surrogatepass")
        for k, v in form_pairs(params)
    ).encode("ascii")


def raw_request(
    client, method, path, body=b"", content_type=None, query="", prefix=API, headers=None
):
    """Send exact bytes, with the client's credentials and cookies; any status."""
    url = prefix + path + (("?" + query) if query else "")
    all_headers = dict(client.headers)
    all_headers.update(headers or {})
    kwargs = {"method": method, "headers": all_headers}
    if body or content_type:
        kwargs["body"] = body
    if content_type:
        kwargs["content_type"] = content_type
    # No timing assertion: the app's time_scale (0.01) keeps every wait short.
    return client.test.request(url, expect_errors=True, **kwargs)


def check_envelope(response):
    """The property: 2xx or 4xx, an OCS envelope agreeing with the status.

    Under /ocs/v1.php the status is in the envelope (SPEC 1.3): HTTP 200 but
    for 401 and router errors, statuscode 100 for a 200, the code otherwise,
    status "ok" only for 100. Returns the endpoint's status either way.
    """
    path = response.request.environ.get("PATH_INFO", "")
    if path.startswith("/ocs/v1.php/") and response.status_int in (200, 401):
        return check_v1_envelope(response)
    status = response.status_int
    assert 200 <= status < 300 or 400 <= status < 500, (status, response.body[:500])
    ctype = response.content_type
    if ctype == "application/xml":
        text = response.body.decode("utf-8")
        assert text.startswith('<?xml version="1.0"?>')
        code = int(re.search(r"<statuscode>(\d+)</statuscode>", text).group(1))
        message = re.search(r"<message>(.*?)</message>", text, re.S).group(1)
        state = re.search(r"<status>(\w+)</status>", text).group(1)
    else:
        assert ctype == "application/json", (status, ctype, response.body[:300])
        document = json.loads(response.body.decode("utf-8"))
        if status == 412 and document == {"message": "CSRF check failed"}:
            return status
        meta = document["ocs"]["meta"]
        assert "data" in document["ocs"]
        code, message, state = meta["statuscode"], meta["message"], meta["status"]
    assert code == status or (status == 401 and code == 997), (status, code)
    assert state == ("ok" if status < 300 else "failure")
    if status >= 400:
        assert isinstance(message, str) and message.strip() and message != "OK"
    return status


def check_v1_envelope(response):
    status = response.status_int
    if response.content_type == "application/xml":
        text = response.body.decode("utf-8")
        code = int(re.search(r"<statuscode>(\d+)</statuscode>", text).group(1))
        message = re.search(r"<message>(.*?)</message>", text, re.S).group(1)
        state = re.search(r"<status>(\w+)</status>", text).group(1)
    else:
        assert response.content_type == "application/json", response.body[:300]
        meta = json.loads(response.body.decode("utf-8"))["ocs"]["meta"]
        code, message, state = meta["statuscode"], meta["message"], meta["status"]
        assert meta["totalitems"] == "" and meta["itemsperpage"] == ""
    # Nextcloud's own v1 failure codes (101-199, say "user exists") are the
    # 400s of v2.
    effective = {100: 200, 997: 401}.get(code, 400 if 100 < code < 200 else code)
    assert (status == 401) == (effective == 401), (status, code)
    assert 200 <= effective < 300 or 400 <= effective < 500, (status, code)
    assert state == ("ok" if code == 100 else "failure")
    if effective >= 400:
        assert isinstance(message, str) and message.strip() and message != "OK"
    return effective


def all_endpoints():
    """(method, prefix, route path) for every route of the API and /cloud."""
    return [(m, API, p) for m, p, *_ in talk_server.ROUTES] + [
        (m, CLOUD, p) for m, p, *_ in talk_server.CLOUD_ROUTES
    ]


V4 = API.replace("/v1", "/v4")
CORE = CLOUD.replace("/cloud", "/core")
# Every OCS route of every table, each its own test: a run gives each route
# its examples (one shared draw gave most routes 0-2 a run).
EVERY_ROUTE = all_endpoints() + [(m, V4, p) for m, p, *_ in talk_server.ROUTES_V4] + [
    (m, CORE, p) for m, p, *_ in talk_server.SIGNIN_ROUTES
]
PER_ROUTE = settings(SETTINGS, max_examples=12)


ENDPOINTS = all_endpoints()


@pytest.fixture
def arena(app, alice, bob, guest, anonymous):
    """A public room with a message; alice (admin, owner) and a guest joined."""
    state = {
        "app": app,
        "clients": {"alice": alice, "bob": bob, "guest": guest, "anonymous": anonymous},
    }
    alice.post("/groups", {"groupid": "team"}, prefix=CLOUD)

    now = app.talk.clock

    def ensure():
        """(Re)build the room when an example deleted it or threw alice out."""
        token = state.get("token")
        with app.talk.db.read() as db:
            room = token and talk_server.room_by_token(db, token)
            mine = room and talk_server.participant_of(db, room["id"], "alice")
        if room and mine and room["type"] == 3 and not room["password_hash"]:
            return
        with app.talk.db.write() as db:
            room = talk_server.create_room(db, 3, "Arena", now())
            pid = talk_server.add_participant(db, room["id"], 1, now(), user_id="alice")
            talk_server.start_session(db, pid, now())
            talk_server.add_message(db, room["id"], "users", "alice", "first", now())
        state["token"] = room["token"]
        guest.post(f"/room/{room['token']}/participants/active")

    def sessions():
        with app.talk.db.read() as db:
            room = talk_server.room_by_token(db, state["token"])
            rows = talk_server.participants_of(db, room["id"])
        return [row["session_id"] for row in rows if row["session_id"] != "0"] or ["0"]

    state["ensure"], state["sessions"] = ensure, sessions
    ensure()
    return state


def fill_path(path, token, userid, groupid):
    """Put URL arguments in a route path, percent-encoded.

    Lone surrogates become "?": WebTest's cookie jar cannot even build a URL
    whose path is not UTF-8 (the invalid-path cases have their own test).
    """

    def arg(value):
        return quote(value, safe="", errors="replace")

    return (
        path.replace("<token>", arg(token))
        .replace("<userid>", arg(userid))
        .replace("<groupid>", arg(groupid))
    )


def signaling_messages(draw, sessions):
    """A `messages` value: well-formed lists with hostile `fn`, or anything."""
    fn = draw(
        st.one_of(
            values,
            st.builds(
                lambda to, extra: json.dumps({"to": to, **extra}),
                st.sampled_from(sessions) | scalars,
                st.dictionaries(st.text(max_size=5), values, max_size=3),
            ),
            st.builds(
                lambda n: json.dumps({"to": sessions[0], "payload": "p" * n}), st.integers(0, 70000)
            ),
        )
    )
    items = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "ev": st.sampled_from(["message", "join", ""]) | scalars,
                    "fn": st.just(fn),
                    "sessionId": st.sampled_from(sessions) | scalars,
                }
            ),
            max_size=3,
        )
    )
    return draw(st.sampled_from([json.dumps(items), items, json.dumps(items)[:-1]]))


# --- Property tests ----------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", EVERY_ROUTE, ids=[f"{m} {pre.split('.php')[1]}{p}" for m, pre, p in EVERY_ROUTE]
)
@PER_ROUTE
@given(data=st.data())
def test_any_parameters_at_any_endpoint_give_an_envelope(arena, endpoint, data):
    """On /ocs/v1.php and /ocs/v2.php alike; and a refused request (4xx)
    changed nothing in the database."""
    arena["ensure"]()
    method, prefix, path = endpoint
    if data.draw(st.booleans(), label="OCS v1"):
        prefix = prefix.replace("/ocs/v2.php", "/ocs/v1.php")
    actor = data.draw(st.sampled_from(["alice", "bob", "guest", "anonymous"]), label="actor")
    token = data.draw(
        st.sampled_from([arena["token"]]) | st.sampled_from(NASTY_STRINGS) | st.text(max_size=12),
        label="token",
    )
    userid = data.draw(
        st.sampled_from(["bob", "carol", "nobody", "admin"])
        | st.text(min_size=1, max_size=70).filter(lambda u: u != "alice"),
        label="userid",
    )
    groupid = data.draw(
        st.sampled_from(["team", "admin", "none"]) | st.text(min_size=1, max_size=70),
        label="groupid",
    )
    params = data.draw(params_strategy, label="params")
    if "messages" in params or path.startswith("/signaling"):
        if data.draw(st.booleans(), label="well-formed messages"):
            params["messages"] = signaling_messages(data.draw, arena["sessions"]())
    encoding = data.draw(st.sampled_from(["json", "form", "query", "json+query"]), label="encoding")
    url = fill_path(path, token, userid, groupid).replace("<mode>", "default").replace(
        "<password_id>", "1"
    )
    before = every_row(arena["app"])
    client = arena["clients"][actor]
    if encoding == "json":
        body = json.dumps(params, allow_nan=True).encode("ascii")
        response = raw_request(client, method, url, body, "application/json", prefix=prefix)
    elif encoding == "form":
        response = raw_request(
            client,
            method,
            url,
            form_encode(params),
            "application/x-www-form-urlencoded",
            prefix=prefix,
        )
    elif encoding == "query":
        response = raw_request(
            client, method, url, query=form_encode(params).decode(), prefix=prefix
        )
    else:
        half = dict(list(params.items())[::2])
        rest = dict(list(params.items())[1::2])
        body = json.dumps(rest, allow_nan=True).encode("ascii")
        response = raw_request(
            client,
            method,
            url,
            body,
            "application/json",
            query=form_encode(half).decode(),
            prefix=prefix,
        )
    status = check_envelope(response)
    if status >= 400:
        assert every_row(arena["app"]) == before, f"a {status} changed the database"


WRITE_ENDPOINTS = [e for e in ENDPOINTS if e[0] != "GET"]


@SETTINGS
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                b"roomName=\xff\xfe",
                b"message=\xc3\x28",
                b"message=\xed\xa0\x80",  # an encoded surrogate: invalid UTF-8
                b"message=%ff%fe",
                b"message=%ed%a0%80",
                b"roomType=3&roomName=\x80",
                b"\xef\xbb\xbfroomType=3",
                b"message=" + "\U0001f600".encode() + b"\xf0\x9f",
                b"=&&=&a",
                b"%",
                b"message=%",
                b"messages=%5B%7B%22ev%22%3A%22message%22%7D%5D\xff",
            ]
        ),
    ),
    actor=st.sampled_from(["alice", "guest", "anonymous"]),
)
def test_invalid_utf8_form_bodies_give_400_or_an_answer(arena, endpoint, body, actor):
    arena["ensure"]()
    method, prefix, path = endpoint
    url = fill_path(path, arena["token"], "bob", "team")
    response = raw_request(
        arena["clients"][actor],
        method,
        url,
        body,
        "application/x-www-form-urlencoded",
        prefix=prefix,
    )
    status = check_envelope(response)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        # Raw bytes that are not UTF-8 are refused, unless auth refuses first.
        assert status in (400, 401, 404, 413), status


@SETTINGS
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.one_of(
        st.text(max_size=80).map(str.encode),
        st.sampled_from(
            [
                b"{",
                b"{}}",
                b'{"roomType": 3,}',
                b"[1, 2, 3]",
                b'"just a string"',
                b"null",
                b"true",
                b"42",
                b"NaN",
                b'{"roomType": NaN}',
                b'{"roomType": Infinity, "roomName": -Infinity}',
                b'{"roomType": 1e999}',
                b'{"message": "\\ud800"}',
                b'{"roomName": "\\udfff\\ud800"}',
                b'{"message": "\\u0000"}',
                b'{"offset": 1' + b"0" * 5000 + b"}",
                b'{"a": ' * 2000 + b"1" + b"}" * 2000,
                b"[" * 100000,
                b'{"roomType": 3, "roomType": 1}',
                b"\xef\xbb\xbf{}",
            ]
        ),
    ),
    ctype=st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "application/vnd.api+json"]
    ),
    actor=st.sampled_from(["alice", "guest"]),
)
def test_malformed_json_gives_400_or_an_answer(arena, endpoint, body, ctype, actor):
    arena["ensure"]()
    method, prefix, path = endpoint
    url = fill_path(path, arena["token"], "bob", "team")
    response = raw_request(arena["clients"][actor], method, url, body, ctype, prefix=prefix)
    check_envelope(response)


@SETTINGS
@given(
    endpoint=st.sampled_from(WRITE_ENDPOINTS),
    ctype=st.sampled_from(
        [
            "text/xml",
            "application/xml",
            "multipart/form-data; boundary=XyZ",
            "multipart/mixed",
            "application/octet-stream",
            "image/png",
            "text/plain",
            "text/html; charset=latin-1",
            "application/x-www-form-urlencoded; charset=iso-8859-1",
            "",
            ";;;",
            "application/json; charset=utf-16",
        ]
    ),
    body=st.sampled_from(
        [
            b"<?xml version='1.0'?><roomType>3</roomType>",
            b'--XyZ\r\nContent-Disposition: form-data; name="roomType"\r\n\r\n3\r\n--XyZ--\r\n',
            b"roomType=3&roomName=Hi",
            b'{"roomType": 3}',
            b"\x89PNG\r\n\x1a\n\x00\x00",
            b"message=hi",
        ]
    ),
)
def test_wrong_content_types_give_an_envelope(arena, endpoint, ctype, body):
    arena["ensure"]()
    method, prefix, path = endpoint
    url = fill_path(path, arena["token"], "bob", "team")
    response = raw_request(
        arena["clients"]["alice"], method, url, body, ctype or None, prefix=prefix
    )
    check_envelope(response)


@SETTINGS
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    key=st.sampled_from(PARAM_NAMES[:-2]),
    first=st.sampled_from(["1", "3", "abc", "", "-5", "\U0001f600", "xml", "json"]),
    second=st.sampled_from(["1", "3", "abc", "", "-5", "\U0001f600", "xml", "json"]),
    where=st.sampled_from(["query", "form", "both"]),
)
def test_duplicate_parameters_give_an_envelope(arena, endpoint, key, first, second, where):
    arena["ensure"]()
    method, prefix, path = endpoint
    url = fill_path(path, arena["token"], "bob", "team")
    pairs = f"{quote(key)}={quote(first)}&{quote(key)}={quote(second)}"
    query = pairs if where in ("query", "both") else ""
    body = pairs.encode() if where in ("form", "both") else b""
    ctype = "application/x-www-form-urlencoded" if body else None
    response = raw_request(
        arena["clients"]["alice"], method, url, body, ctype, query=query, prefix=prefix
    )
    check_envelope(response)


def test_duplicate_parameters_take_the_last_value_as_php(arena, alice):
    """a=1&a=2 means a=2 in a query and in a form, as PHP reads them."""
    body = b"roomType=1&roomType=3&roomName=First&roomName=Second"
    response = raw_request(alice, "POST", "/room", body, "application/x-www-form-urlencoded")
    assert response.status_int == 201
    token = response.json["ocs"]["data"]["token"]
    room = alice.get(f"/room/{token}").data
    assert (room["type"], room["name"]) == (3, "Second")
    response = raw_request(alice, "GET", f"/chat/{arena['token']}", query="timeout=abc&timeout=0")
    assert response.status_int == 200


@pytest.fixture
def small_app(tmp_path, clock, password_hash):
    """An app that takes bodies of at most 2000 bytes."""
    app = talk_server.make_app(tmp_path / "small.db", clock=clock, time_scale=0.01, max_body=2000)
    with app.talk.db.write() as db:
        talk_server.create_user(db, "alice", password_hash, "Alice")
    yield app
    app.talk.close()


@SETTINGS
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    size=st.one_of(st.integers(0, 6000), st.sampled_from([1999, 2000, 2001, 2002, 100_000])),
    ctype=st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain"]),
)
def test_oversized_bodies_are_413(small_app, endpoint, size, ctype):
    client = Client(small_app, "alice")
    method, prefix, path = endpoint
    with small_app.talk.db.read() as db:
        rooms = db.execute("SELECT token FROM rooms").fetchall()
    token = rooms[0]["token"] if rooms else "nosuchrm"
    url = fill_path(path, token, "alice", "admin")
    if ctype == "application/json":
        body = b'{"message": "' + b"m" * max(size - 15, 0) + b'"}'
    else:
        body = b"message=" + b"m" * max(size - 8, 0)
    response = raw_request(client, method, url, body, ctype, prefix=prefix)
    status = check_envelope(response)
    if len(body) > 2000:
        assert status == 413
    else:
        assert status != 413


def call_wsgi(app, method, path, body=b"", environ=None):
    """Call the app with a hand-made environ (WebTest would fix Content-Length)."""
    base = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "HTTP_OCS_APIREQUEST": "true",
        "HTTP_ACCEPT": "application/json",
        "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        **(environ or {}),
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), headers

    chunks = app(base, start_response)
    body = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return answer["status"], json.loads(body)


@pytest.mark.parametrize(
    "length, expected",
    [("999999999", 413), ("2001", 413), ("abc", 400), ("1e3", 400), ("-5", None), ("", None)],
)
def test_a_lying_content_length_is_refused_or_harmless(small_app, length, expected):
    """A declared length over max_body: 413 before reading; garbage: 400."""
    status, document = call_wsgi(
        small_app, "POST", API + "/room", b"roomType=3", {"CONTENT_LENGTH": length}
    )
    meta = document["ocs"]["meta"]
    assert meta["statuscode"] == status and status < 500
    if expected is not None:
        assert status == expected
        assert meta["message"]
    else:
        assert status == 400  # no body read: roomType is missing


# --- Specific values ---------------------------------------------------------


def test_sql_lookalike_room_name_is_stored_verbatim(app, alice, bob):
    name = "x'); DROP TABLE rooms;--"
    token = alice.post("/room", {"roomType": 3, "roomName": name}, status=201).data["token"]
    assert alice.get(f"/room/{token}").data["name"] == name
    alice.put(f"/room/{token}", {"roomName": name + " 2"})
    assert bob.get(f"/room/{token}").data["name"] == name + " 2"
    alice.post(f"/room/{token}/participants/active")
    sent = alice.post(f"/chat/{token}", {"message": "'; DELETE FROM messages; --"}, status=201).data
    assert alice.get(f"/chat/{token}", {"timeout": 0}).data == [sent]
    with app.talk.db.read() as db:
        tables = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        stored = db.execute("SELECT name FROM rooms WHERE token = ?", (token,)).fetchone()[0]
    assert {"rooms", "messages", "participants"} <= tables
    assert stored == name + " 2"


@pytest.mark.parametrize(
    "name",
    [
        "\u202eevil\u202c",
        "\U0001f600 party",
        "\u05e9\u05dc\u05d5\u05dd",
        "x" * 200,
        " padded ",
    ],
)
def test_unicode_room_names_round_trip(alice, name):
    token = alice.post("/room", {"roomType": 3, "roomName": name}, status=201).data["token"]
    assert alice.get(f"/room/{token}").data["name"] == name.strip()


@pytest.mark.parametrize("field", ["roomName", "message", "password", "newParticipant", "invite"])
@pytest.mark.parametrize("value", [123, [1], {"a": 1}, None, True, 1.5])
def test_non_string_json_values_are_400_or_ignored(alice, field, value):
    """Wrong JSON types where a string is expected: a clear 400, never a 500."""
    token = alice.post("/room", {"roomType": 3, "roomName": "Typed"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants/active")
    endpoint = {
        "roomName": ("PUT", f"/room/{token}"),
        "message": ("POST", f"/chat/{token}"),
        "password": ("PUT", f"/room/{token}/password"),
        "newParticipant": ("POST", f"/room/{token}/participants"),
        "invite": ("POST", "/room"),
    }[field]
    params = {field: value}
    if field == "invite":
        params["roomType"] = 1
    body = json.dumps(params).encode()
    response = raw_request(alice, endpoint[0], endpoint[1], body, "application/json")
    status = check_envelope(response)
    if isinstance(value, list | dict | bool | float):
        assert status == 400, (field, value, status)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"offset": 2**63}, "empty"),
        ({"offset": 10**30}, "empty"),
        ({"offset": 9223372036854775807}, "empty"),
        ({"offset": -1}, 400),
        ({"notOlderThanTimestamp": 2**70}, "empty"),
        ({"notOlderThanTimestamp": -(2**70)}, 400),
        ({"timeout": 2**64}, "message"),  # capped at 60; a message is there
        ({"timeout": -1}, 400),
    ],
)
def test_huge_and_negative_chat_numbers_in_json_are_not_500(alice, params, expected):
    """Huge numbers: 400, or an answer as if clamped; never an SQLite overflow."""
    token = alice.post("/room", {"roomType": 2, "roomName": "Numbers"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants/active")
    alice.post(f"/chat/{token}", {"message": "one"}, status=201)
    body = json.dumps({"timeout": 0, **params}).encode()
    response = raw_request(alice, "GET", f"/chat/{token}", body, "application/json")
    status = check_envelope(response)
    if expected == 400:
        assert status == 400
    elif status == 200:
        messages = [m["message"] for m in response.json["ocs"]["data"]]
        assert messages == ([] if expected == "empty" else ["one"])
    else:
        assert status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'{"roomType": 3, "roomName": "\\ud800"}',
        b'{"roomType": 3, "roomName": "a\\udfffb"}',
    ],
)
def test_lone_surrogates_in_json_are_400(alice, body):
    """A lone surrogate cannot be stored or sent as UTF-8: 400, not a 500."""
    response = raw_request(alice, "POST", "/room", body, "application/json")
    assert check_envelope(response) == 400


def test_lone_surrogate_chat_message_is_400(alice):
    token = alice.post("/room", {"roomType": 2, "roomName": "S"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants/active")
    response = raw_request(
        alice, "POST", f"/chat/{token}", b'{"message": "\\ud83d"}', "application/json"
    )
    assert check_envelope(response) == 400
    assert alice.get(f"/chat/{token}", {"timeout": 0}).data == []


def test_very_long_values_are_refused_cleanly(alice):
    token = alice.post("/room", {"roomType": 2, "roomName": "Long"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants/active")
    alice.post("/room", {"roomType": 3, "roomName": "n" * 201}, status=400)
    alice.put(f"/room/{token}", {"roomName": "n" * 201}, status=400)
    alice.post(f"/chat/{token}", {"message": "m" * 32001}, status=400)
    assert (
        alice.post(f"/chat/{token}", {"message": "m" * 32000}, status=201).data["message"]
        == "m" * 32000
    )
    alice.post(f"/room/{token}/participants", {"newParticipant": "u" * 10000}, status=404)
    alice.get("/users/" + "u" * 5000, prefix=CLOUD, status=404)
    alice.post("/users", {"userid": "u" * 65, "password": PASSWORD}, prefix=CLOUD, status=400)


def test_hostile_tokens_in_the_path_are_404(alice, guest):
    for token in ["", "%00", "..", "a" * 5000, "\U0001f600", "x'--", "%ff", "%ed%a0%80"]:
        for client in (alice, guest):
            path = "/room/" + (token if "%" in token else quote(token, safe=""))
            response = raw_request(client, "GET", path)
            status = check_envelope(response)
            assert status in (400, 404), (token, status)
