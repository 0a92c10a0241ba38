"""Sign-in for apps: app passwords, the sign-in page, login flows v1 and v2."""

import base64
import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
import webtest
from conftest import CLOUD, PASSWORD
from helpers import form_action, form_field

import talk_server

CORE = "/ocs/v2.php/core"
OCS = {"OCS-APIRequest": "true", "Accept": "application/json"}


def basic(user, password):
    raw = f"{user}:{password}".encode()
    return {**OCS, "Authorization": "Basic " + base64.b64encode(raw).decode()}


def app_password_of(make_client, user="bob", agent="Talk (Android)"):
    client = make_client(user, prefix=CORE)
    answer = client.get("/getapppassword", headers={"User-Agent": agent}, status=200)
    return answer.data["apppassword"]


@pytest.fixture
def browser(app):
    """A browser: a cookie jar and HTML forms, no Basic auth."""
    return webtest.TestApp(app)


def sign_in(browser, user="bob", password=PASSWORD, redirect_url="/", status=303):
    form = browser.get("/index.php/login", {"redirect_url": redirect_url}, status=200)
    token = form_field(form.text, "requesttoken")
    fields = {
        "user": user,
        "password": password,
        "requesttoken": token,
        "redirect_url": redirect_url,
    }
    return browser.post("/index.php/login", fields, status=status, expect_errors=True)


# ---------------------------------------------------------------------------
# App passwords
# ---------------------------------------------------------------------------


def test_getapppassword_gives_72_characters_named_after_the_user_agent(make_client):
    password = app_password_of(make_client, agent="Nextcloud Talk iOS")
    assert re.fullmatch(r"[A-Za-z0-9]{72}", password)
    bob = make_client("bob", password=password, prefix=CORE)
    assert [p["name"] for p in bob.get("/apppasswords", status=200).data] == ["Nextcloud Talk iOS"]


def test_getapppassword_on_ocs_v1(make_client):
    answer = make_client("bob", prefix="/ocs/v1.php/core").get("/getapppassword", status=200)
    assert answer.meta["statuscode"] == 100
    assert len(answer.data["apppassword"]) == 72


def test_app_password_works_where_the_login_password_does(make_client):
    password = app_password_of(make_client)
    make_client("bob", password=password, prefix=CLOUD).get("/user", status=200)
    make_client("bob", password=password).get("/room", status=200)


def test_app_password_of_someone_else_is_401(make_client):
    password = app_password_of(make_client, "bob")
    make_client("carol", password=password, prefix=CLOUD).get("/user", status=401)


def test_app_password_is_stored_only_as_a_keyed_hash(app, make_client):
    password = app_password_of(make_client)
    with app.talk.db.read() as db:
        (stored,) = db.execute("SELECT token_hash FROM app_passwords").fetchone()
        (key,) = db.execute("SELECT value FROM server_secrets").fetchone()
    assert password not in stored and len(stored) == 64
    assert stored == talk_server.keyed_hash(bytes(key), "app-password", password)


def test_getapppassword_with_an_app_password_is_403(make_client):
    password = app_password_of(make_client)
    make_client("bob", password=password, prefix=CORE).get("/getapppassword", status=403)


def test_delete_apppassword_revokes_the_one_in_use(make_client):
    password = app_password_of(make_client)
    with_app = make_client("bob", password=password, prefix=CORE)
    assert with_app.delete("/apppassword", status=200).data == []
    make_client("bob", password=password, prefix=CLOUD).get("/user", status=401)


def test_delete_apppassword_with_the_login_password_is_403(make_client):
    make_client("bob", prefix=CORE).delete("/apppassword", status=403)


def test_rotate_gives_a_new_password_and_the_old_one_stops(make_client):
    old = app_password_of(make_client)
    new = make_client("bob", password=old, prefix=CORE).post("/apppassword/rotate", status=200)
    new = new.data["apppassword"]
    assert new != old and len(new) == 72
    make_client("bob", password=old, prefix=CLOUD).get("/user", status=401)
    make_client("bob", password=new, prefix=CLOUD).get("/user", status=200)
    make_client("bob", prefix=CORE).post("/apppassword/rotate", status=403)


def test_last_used_is_written_at_most_once_a_minute(app, make_client, clock):
    password = app_password_of(make_client)
    bob = make_client("bob", password=password, prefix=CORE)

    def last_used():
        return bob.get("/apppasswords", status=200).data[0]["lastUsed"]

    first = last_used()
    assert first == clock.now
    clock.advance(59)
    assert last_used() == first
    clock.advance(1)
    assert last_used() == clock.now


def test_own_app_password_api_lists_creates_and_revokes(make_client):
    bob = make_client("bob", prefix=CORE)
    created = bob.post("/apppasswords", {"name": "Laptop"}, status=200).data
    assert set(created) == {"id", "name", "apppassword"} and created["name"] == "Laptop"
    listed = bob.get("/apppasswords", status=200).data
    assert [(p["id"], p["name"]) for p in listed] == [(created["id"], "Laptop")]
    assert set(listed[0]) == {"id", "name", "created", "lastUsed"}
    make_client("carol", prefix=CORE).delete(f"/apppasswords/{created['id']}", status=404)
    bob.delete(f"/apppasswords/{created['id']}", status=200)
    make_client("bob", password=created["apppassword"], prefix=CLOUD).get("/user", status=401)
    bob.delete(f"/apppasswords/{created['id']}", status=404)
    bob.delete("/apppasswords/not-a-number", status=404)


def test_creating_an_app_password_with_an_app_password_is_403(make_client):
    password = app_password_of(make_client)
    make_client("bob", password=password, prefix=CORE).post(
        "/apppasswords", {"name": "x"}, status=403
    )


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
def test_app_password_name_must_be_1_to_200_characters(make_client, name):
    make_client("bob", prefix=CORE).post("/apppasswords", {"name": name}, status=400)


def test_app_password_routes_need_a_user(make_client):
    make_client(prefix=CORE).get("/getapppassword", status=401)
    make_client(prefix=CORE).get("/apppasswords", status=401)


# ---------------------------------------------------------------------------
# The sign-in page
# ---------------------------------------------------------------------------


def test_sign_in_page_is_a_plain_form_with_strict_headers(browser):
    form = browser.get("/index.php/login", status=200)
    assert form.content_type == "text/html"
    assert form.headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert form.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script" not in form.text and "http" not in form.text.split("</head>")[1]
    assert form_field(form.text, "requesttoken")


def test_sign_in_sets_a_strict_cookie_and_redirects(browser):
    answer = sign_in(browser, redirect_url="/#/room/abc")
    assert answer.headers["Location"] == "/#/room/abc"
    cookie = [c for c in answer.headers.getall("Set-Cookie") if c.startswith("talk_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert "Path=/" in cookie


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil", "x"])
def test_sign_in_never_redirects_off_site(browser, target):
    assert sign_in(browser, redirect_url=target).headers["Location"] == "/"


def test_web_session_authenticates_ocs_requests_with_the_ocs_header(browser, app):
    sign_in(browser)
    answer = browser.get(CLOUD + "/user", headers=OCS, status=200)
    assert answer.json["ocs"]["data"]["id"] == "bob"
    browser.get(CLOUD + "/user", headers={"Accept": "application/json"}, status=412)


def test_web_session_may_create_app_passwords(browser):
    sign_in(browser)
    browser.get(CORE + "/getapppassword", headers=OCS, status=200)
    browser.post(CORE + "/apppasswords", {"name": "Phone"}, headers=OCS, status=200)


def test_web_session_is_stored_only_as_a_keyed_hash(browser, app):
    sign_in(browser)
    cookie = browser.cookies["talk_session"]
    with app.talk.db.read() as db:
        (stored,) = db.execute("SELECT id_hash FROM web_sessions").fetchone()
    assert cookie not in stored and stored == talk_server.keyed_hash(
        app.talk.signin_key, "web-session", cookie
    )


def test_wrong_password_shows_the_form_again_with_401(browser):
    answer = sign_in(browser, password="wrong", status=401)
    assert "Wrong user name or password" in answer.text
    assert form_field(answer.text, "user") == "bob"
    browser.get(CLOUD + "/user", headers=OCS, status=401)


def test_sign_in_without_the_csrf_token_is_refused(browser):
    browser.get("/index.php/login", status=200)  # has the pre-session cookie
    fields = {"user": "bob", "password": PASSWORD}
    browser.post("/index.php/login", fields, status=403)
    browser.post("/index.php/login", {**fields, "requesttoken": "forged"}, status=403)
    browser.get(CLOUD + "/user", headers=OCS, status=401)


def test_csrf_token_of_another_browser_is_refused(app, browser):
    token = form_field(browser.get("/index.php/login").text, "requesttoken")
    other = webtest.TestApp(app)
    other.get("/index.php/login")
    fields = {"user": "bob", "password": PASSWORD, "requesttoken": token}
    other.post("/index.php/login", fields, status=403)


def test_sign_in_form_is_throttled_with_basic_auth(browser, make_client):
    for _ in range(5):
        sign_in(browser, password="wrong", status=401)
    answer = sign_in(browser, status=429)
    assert answer.headers["Retry-After"] and answer.content_type == "text/html"
    make_client("bob", prefix=CLOUD).get("/user", status=429)


def test_sign_out_needs_the_session_csrf_token(browser):
    sign_in(browser)
    browser.post("/index.php/logout", {"requesttoken": "forged"}, status=403)
    browser.get(CLOUD + "/user", headers=OCS, status=200)
    page = browser.get("/index.php/login/flow", headers=OCS).follow()
    token = form_field(page.text, "requesttoken")
    assert browser.post("/index.php/logout", {"requesttoken": token}, status=303)
    browser.get(CLOUD + "/user", headers=OCS, status=401)


def test_sign_out_from_the_browser_client_proves_itself_with_the_ocs_header(browser):
    sign_in(browser)
    assert browser.post("/index.php/logout", headers=OCS, status=303)
    browser.get(CLOUD + "/user", headers=OCS, status=401)


def test_bad_form_bodies_are_html_errors(browser):
    answer = browser.post(
        "/index.php/login",
        b"\xff\xfe",
        content_type="application/x-www-form-urlencoded",
        status=400,
    )
    assert answer.content_type == "text/html"


# ---------------------------------------------------------------------------
# Disabled users
# ---------------------------------------------------------------------------


def test_disabled_user_is_refused_with_every_credential(make_client, browser):
    password = app_password_of(make_client)
    sign_in(browser)
    admin = make_client("alice", prefix=CLOUD)
    admin.put("/users/bob/disable", status=200)
    make_client("bob", prefix=CLOUD).get("/user", status=401)
    make_client("bob", password=password, prefix=CLOUD).get("/user", status=401)
    browser.get(CLOUD + "/user", headers=OCS, status=401)
    assert "Wrong user name" in sign_in(browser, status=401).text
    admin.put("/users/bob/enable", status=200)
    make_client("bob", password=password, prefix=CLOUD).get("/user", status=200)
    assert admin.get("/users/bob", status=200).data["enabled"] is True


# ---------------------------------------------------------------------------
# Login flow v2
# ---------------------------------------------------------------------------


def test_login_flow_v2_over_http_end_to_end(tmp_path, password_hash):
    with talk_server.serve_in_thread(tmp_path / "talk.db") as url:
        with url.app.talk.db.write() as db:
            talk_server.create_user(db, "bob", password_hash, "Bob")
        started = post_json(url + "/index.php/login/v2", b"", {"User-Agent": "Talk (Android)"})
        assert started["poll"]["endpoint"] == url + "/index.php/login/v2/poll"
        assert started["login"].startswith(url + "/index.php/login/v2/flow/")
        poll = urllib.parse.urlencode({"token": started["poll"]["token"]}).encode()
        assert poll_status(started["poll"]["endpoint"], poll) == (404, [])

        # The browser: the flow's page asks to sign in, then to grant access.
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        page = opener.open(started["login"]).read().decode()
        fields = {
            "user": "bob",
            "password": PASSWORD,
            "requesttoken": form_field(page, "requesttoken"),
            "redirect_url": form_field(page, "redirect_url"),
        }
        grant = opener.open(url + form_action(page), urllib.parse.urlencode(fields).encode())
        grant = grant.read().decode()
        assert "Grant access" in grant and "Talk (Android)" in grant
        done = opener.open(
            url + form_action(grant),
            urllib.parse.urlencode({"requesttoken": form_field(grant, "requesttoken")}).encode(),
        )
        assert "Access granted" in done.read().decode()

        status, credentials = poll_status(started["poll"]["endpoint"], poll)
        assert status == 200
        assert credentials["server"] == url and credentials["loginName"] == "bob"
        assert poll_status(started["poll"]["endpoint"], poll) == (404, [])

        headers = basic("bob", credentials["appPassword"])
        user = get_json(url + "/ocs/v2.php/cloud/user", headers)
        assert user["ocs"]["data"]["id"] == "bob"
        revoke = urllib.request.Request(
            url + "/ocs/v2.php/core/apppassword", headers=headers, method="DELETE"
        )
        assert urllib.request.urlopen(revoke).status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            get_json(url + "/ocs/v2.php/cloud/user", headers)
        assert refused.value.code == 401


def post_json(url, body, headers=None):
    request = urllib.request.Request(url, body, headers or {}, method="POST")
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read())


def get_json(url, headers):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as answer:
        return json.loads(answer.read())


def poll_status(endpoint, body):
    try:
        with urllib.request.urlopen(
            urllib.request.Request(endpoint, body, method="POST")
        ) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def start_v2(browser):
    started = browser.post(
        "/index.php/login/v2", headers={"User-Agent": "nc_py_api"}, status=200
    ).json
    path = urllib.parse.urlsplit(started["login"]).path
    return path, started["poll"]["token"]


def grant_in_browser(browser, path):
    page = browser.get(path, status=200)
    browser.post(path, {"requesttoken": form_field(page.text, "requesttoken")}, status=200)


def test_login_flow_v2_expires_after_20_minutes(browser, clock):
    path, token = start_v2(browser)
    sign_in(browser)
    clock.advance(20 * 60 + 1)
    browser.get(path, status=404)
    browser.post("/index.php/login/v2/poll", {"token": token}, status=404)


def test_login_flow_v2_granted_but_polled_too_late_is_404(browser, clock):
    path, token = start_v2(browser)
    sign_in(browser)
    grant_in_browser(browser, path)
    clock.advance(20 * 60 + 1)
    assert browser.post("/index.php/login/v2/poll", {"token": token}, status=404).json == []


def test_login_flow_v2_poll_token_is_stored_only_hashed(app, browser):
    _, token = start_v2(browser)
    with app.talk.db.read() as db:
        (stored,) = db.execute("SELECT poll_token_hash FROM login_flows").fetchone()
    assert token not in stored


def test_login_flow_v2_grant_without_the_csrf_token_is_403(browser):
    path, token = start_v2(browser)
    sign_in(browser)
    browser.post(path, {"requesttoken": "forged"}, status=403)
    browser.post(path, status=403)
    browser.post("/index.php/login/v2/poll", {"token": token}, status=404)


def test_login_flow_v2_granted_twice_is_409(browser):
    path, _ = start_v2(browser)
    sign_in(browser)
    page = browser.get(path, status=200)
    token = form_field(page.text, "requesttoken")
    browser.post(path, {"requesttoken": token}, status=200)
    browser.post(path, {"requesttoken": token}, status=409)


@pytest.mark.parametrize("token", ["", "unknown", "a" * 500, "bad token!"])
def test_login_flow_v2_poll_with_a_bad_token_is_404(browser, token):
    assert browser.post("/index.php/login/v2/poll", {"token": token}, status=404).json == []


def test_unknown_flow_page_is_an_html_404(browser):
    answer = browser.get("/index.php/login/v2/flow/nope", status=404)
    assert answer.content_type == "text/html" and "expired" in answer.text


def test_login_flow_v2_start_is_rate_limited(app, browser):
    for _ in range(talk_server.LOGIN_FLOWS_PER_MINUTE):
        browser.post("/index.php/login/v2", status=200)
    browser.post("/index.php/login/v2", status=429)


# ---------------------------------------------------------------------------
# Login flow v1 (iOS)
# ---------------------------------------------------------------------------


def test_login_flow_v1_ends_in_the_nc_login_redirect(browser, make_client):
    start = browser.get(
        "/index.php/login/flow",
        {"user": "bob"},
        headers={**OCS, "User-Agent": "Talk iOS"},
        status=303,
    )
    flow = start.headers["Location"]
    assert flow.startswith("/index.php/login/flow/") and flow.endswith("?user=bob")
    form = browser.get(flow, status=200)
    assert form_field(form.text, "user") == "bob"
    fields = {
        "user": "bob",
        "password": PASSWORD,
        "requesttoken": form_field(form.text, "requesttoken"),
        "redirect_url": form_field(form.text, "redirect_url"),
    }
    grant = browser.post("/index.php/login", fields, status=303).follow(status=200)
    assert "Talk iOS" in grant.text
    done = browser.post(
        form_action(grant.text),
        {"requesttoken": form_field(grant.text, "requesttoken")},
        status=303,
    )
    match = re.fullmatch(
        r"nc://login/server:(.*)&user:(.*)&password:(.*)", done.headers["Location"]
    )
    assert match and match.group(1) == "http://localhost:80" and match.group(2) == "bob"
    make_client("bob", password=urllib.parse.unquote(match.group(3)), prefix=CLOUD).get(
        "/user", status=200
    )
    browser.get(flow, status=404)  # used up


def test_login_flow_v1_urlencodes_the_user(app, browser, password_hash):
    with app.talk.db.write() as db:
        talk_server.create_user(db, "erin b@x", password_hash)
    flow = browser.get("/index.php/login/flow", headers=OCS, status=303).headers["Location"]
    sign_in(browser, user="erin b@x", redirect_url=flow)
    grant = browser.get(flow, status=200)
    done = browser.post(flow, {"requesttoken": form_field(grant.text, "requesttoken")}, status=303)
    assert "&user:erin%20b%40x&password:" in done.headers["Location"]


def test_login_flow_v1_without_the_ocs_header_is_400(browser):
    assert browser.get("/index.php/login/flow", status=400).content_type == "text/html"


# ---------------------------------------------------------------------------
# nc-py-api against a served talk-server
# ---------------------------------------------------------------------------


def test_nc_py_api_reads_users_with_an_app_password(tmp_path, password_hash):
    import nc_py_api
    with talk_server.serve_in_thread(tmp_path / "talk.db") as url:
        with url.app.talk.db.write() as db:
            for user_id in ("alice", "bob"):
                talk_server.create_user(db, user_id, password_hash, user_id.title())
            talk_server.create_group(db, "admin")
            talk_server.add_to_group(db, "admin", "alice")
        password = get_json(url + "/ocs/v2.php/core/getapppassword", basic("alice", PASSWORD))
        password = password["ocs"]["data"]["apppassword"]
        nc = nc_py_api.Nextcloud(nextcloud_url=url, nc_auth_user="alice", nc_auth_pass=password)
        assert nc.user == "alice"
        me = nc.users.get_user()
        assert (me.user_id, me.display_name, me.groups, me.enabled) == (
            "alice",
            "Alice",
            ["admin"],
            True,
        )
        assert nc.users.get_list() == ["alice", "bob"]
        assert nc.users.get_list(limit=1, offset=1) == ["bob"]
        assert nc.users.get_user("bob").email == ""
        nc.users.disable("bob")
        assert nc.users.get_user("bob").enabled is False
        nc.users.enable("bob")
        details = nc.users_groups.get_details()
        assert [(g.group_id, g.user_count, g.can_add) for g in details] == [("admin", 1, True)]


def test_nc_py_api_login_flow_v2(tmp_path, password_hash):
    import nc_py_api
    with talk_server.serve_in_thread(tmp_path / "talk.db") as url:
        with url.app.talk.db.write() as db:
            talk_server.create_user(db, "bob", password_hash, "Bob")
        nc = nc_py_api.Nextcloud(nextcloud_url=url)
        flow = nc.loginflow_v2.init(user_agent="my script")
        browser = webtest.TestApp(url.app)
        path = urllib.parse.urlsplit(flow.login).path
        sign_in(browser, redirect_url=path)
        grant_in_browser(browser, path)
        credentials = nc.loginflow_v2.poll(flow.token, timeout=1)
        assert credentials.login_name == "bob" and len(credentials.app_password) == 72
        assert nc.user == "bob"


# ---------------------------------------------------------------------------
# The README
# ---------------------------------------------------------------------------


def test_readme_lists_the_sign_in_endpoints():
    readme = (talk_server.Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    table = readme[readme.index("## What is implemented") :]
    for _, path, _, _ in talk_server.SIGNIN_ROUTES + talk_server.PAGE_ROUTES:
        shown = re.sub(r"<(\w+)>", r"{\1}", path)
        assert f"{shown}`" in table, f"{shown} is missing"
    assert "## Signing in from apps" in readme


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_disables_and_enables_a_user(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    talk_server.main(["user", "add", "erin", "--password", "pw", "--db", db])
    talk_server.main(["user", "disable", "erin", "--db", db])
    assert "erin: disable done" in capsys.readouterr().out
    app = talk_server.make_app(db)
    try:
        erin = webtest.TestApp(app)
        erin.get(CLOUD + "/user", headers=basic("erin", "pw"), status=401)
        talk_server.main(["user", "enable", "erin", "--db", db])
        app.talk.credentials.forget("erin")
        erin.get(CLOUD + "/user", headers=basic("erin", "pw"), status=200)
    finally:
        app.talk.close()
    with pytest.raises(SystemExit):
        talk_server.main(["user", "disable", "nobody", "--db", db])
