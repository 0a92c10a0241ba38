"""Shared steps of the room and participant tests: one call each, status checked."""

import http.cookiejar
import queue
import re
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLOUD = "/ocs/v2.php/cloud"


def create(client, room_type, status=201, **params):
    """POST /room and return the token."""
    return client.post("/room", {"roomType": room_type, **params}, status=status).data["token"]


def join(client, token, status=200, **params):
    """POST /room/{token}/participants/active; the session id on success."""
    response = client.post(f"/room/{token}/participants/active", params, status=status)
    return response.data["sessionId"] if status == 200 else None


def leave(client, token, status=200):
    return client.delete(f"/room/{token}/participants/active", status=status)


def add(client, token, user, status=200):
    return client.post(f"/room/{token}/participants", {"newParticipant": user}, status=status)


def remove(client, token, user, status=200):
    return client.delete(f"/room/{token}/participants", {"participant": user}, status=status)


def remove_guest(client, token, session_id, status=200):
    return client.delete(
        f"/room/{token}/participants/guests", {"participant": session_id}, status=status
    )


def remove_self(client, token, status=200):
    return client.delete(f"/room/{token}/participants/self", status=status)


def promote(client, token, user, status=200):
    return client.post(f"/room/{token}/moderators", {"participant": user}, status=status)


def demote(client, token, user, status=200):
    return client.delete(f"/room/{token}/moderators", {"participant": user}, status=status)


def room_of(client, token, status=200):
    return client.get(f"/room/{token}", status=status).data


def listed(client, token, status=200):
    return client.get(f"/room/{token}/participants", status=status).data


def types(client, token):
    """Who has a row and with which type: users by id, guests as "guest"."""
    return sorted(
        (row["userId"] or "guest", row["participantType"]) for row in listed(client, token)
    )


def tokens(client):
    return [room["token"] for room in client.get("/room").data]


def scalar(app, sql, *params):
    """One value straight from the database."""
    with app.talk.db.read() as db:
        return db.execute(sql, params).fetchone()[0]


def make_group(alice, group, *users):
    """Create a group and its members through the provisioning API."""
    alice.post("/groups", {"groupid": group}, prefix=CLOUD)
    for user in users:
        alice.post(f"/users/{user}/groups", {"groupid": group}, prefix=CLOUD)


def group_room_with(owner, *members):
    """A new group room "Team" of `owner` with `members` (clients) added; nobody joined."""
    return _room_with(owner, 2, "Team", members)


def public_room_with(owner, *members):
    """A new public room "Open" of `owner` with `members` (clients) added; nobody joined."""
    return _room_with(owner, 3, "Open", members)


def _room_with(owner, room_type, name, members):
    token = create(owner, room_type, roomName=name)
    for member in members:
        add(owner, token, member.user)
    return token


# --- Sign-in pages over real HTTP (as a browser submits them) -----------------


def form_field(page_text, name):
    match = re.search(rf'name="{name}" value="([^"]*)"', page_text)
    assert match, f"no {name} field in the page"
    return match.group(1)


def form_action(page_text):
    return re.search(r'<form method="post" action="([^"]+)"', page_text).group(1)


def grant_in_browser(login_url, user, password):
    """A browser on a login flow's `login` URL: its own cookies, plain HTML forms,
    sign in, then grant. Answers the grant page's text."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    base = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(login_url))
    page = opener.open(login_url).read().decode()
    fields = {
        "user": user,
        "password": password,
        "requesttoken": form_field(page, "requesttoken"),
        "redirect_url": form_field(page, "redirect_url"),
    }
    grant = opener.open(base + form_action(page), urllib.parse.urlencode(fields).encode())
    grant = grant.read().decode()
    done = opener.open(
        base + form_action(grant),
        urllib.parse.urlencode({"requesttoken": form_field(grant, "requesttoken")}).encode(),
    )
    assert "Access granted" in done.read().decode()
    return grant


def wait_until(condition, limit=30.0, what="the condition"):
    """Wait for a state the server reaches by itself (a poll waiting, say):
    polls `condition`; fails only if it never holds (a broken server)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.002)


class RecordingServer:
    """An HTTP endpoint on a free loopback port (`url`, ending in `path`) for what
    talk-server sends out (bot webhooks, signaling server notifications). It
    records every POST as (path, headers, raw body) in `requests`, answers the
    next of `statuses` (then `status`), and while `release` is clear it holds
    each request (after setting `arrived`)."""

    def __init__(self, path="", status=200, hold=10):
        self.status = status
        self.statuses = []
        self.requests = queue.Queue()
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.release.set()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.requests.put((self.path, dict(self.headers), raw))
                recorder.arrived.set()
                recorder.release.wait(hold)
                self.send_response(recorder.statuses.pop(0) if recorder.statuses else recorder.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def empty(self) -> bool:
        return self.requests.empty()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def every_row(app):
    """Every row of every table: a refused request must change none."""
    with app.talk.db.read() as db:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {
            table: sorted((tuple(row) for row in db.execute(f"SELECT * FROM {table}")), key=repr)
            for table in tables
        }
