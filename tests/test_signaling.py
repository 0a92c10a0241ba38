"""Signaling (SPEC 7): settings, sending, the long-poll receive, queue hygiene.

WebTest tests run on the `app` fixture (time_scale=0.01: the 30 s poll waits
0.3 s); the tests marked slow start the real server to prove that waiting
polls are woken across threads.
"""

import base64
import hashlib
import hmac
import http.cookiejar
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import API, START, Client
from helpers import wait_until

import talk_server

NO_SESSION = [{"type": "usersInRoom", "data": []}]


# --- Helpers -----------------------------------------------------------------


def public_room(owner, name="Public"):
    return owner.post("/room", {"roomType": 3, "roomName": name}, status=201).data["token"]


def join(client, token):
    return client.post(f"/room/{token}/participants/active", status=200).data["sessionId"]


def room_id(client, token):
    return client.get(f"/room/{token}", status=200).data["id"]


def message(sender, to, kind="offer", payload=None, **extra):
    """One element of `messages`: ev, fn (a JSON string) and the sender's session."""
    fn = {"to": to, "type": kind, "payload": payload or {"sdp": f"{kind}-sdp"}, **extra}
    return {"ev": "message", "fn": json.dumps(fn), "sessionId": sender}


def send(client, token, *items, status=200):
    """POST /signaling/{token} (or /signaling when token is None)."""
    path = "/signaling" if token is None else f"/signaling/{token}"
    return client.post(path, {"messages": json.dumps(list(items))}, status=status)


def receive(client, token, status=200):
    path = "/signaling" if token is None else f"/signaling/{token}"
    return client.get(path, status=status)


def messages_of(data):
    """The delivered messages of a poll answer, decoded; checks the final usersInRoom."""
    assert data[-1]["type"] == "usersInRoom"
    assert all(item["type"] == "message" for item in data[:-1])
    assert all(isinstance(item["data"], str) for item in data[:-1])
    return [json.loads(item["data"]) for item in data[:-1]]


def users_of(data):
    assert data[-1]["type"] == "usersInRoom"
    return data[-1]["data"]


def queued_rows(app):
    with app.talk.db.read() as db:
        return [dict(row) for row in db.execute("SELECT * FROM signaling ORDER BY id")]


@pytest.fixture
def make_custom(db_path, clock, password_hash):
    """An app with other options: make_custom(stun_servers=[...]) -> (app, client factory)."""
    apps = []

    def make(**options):
        app = talk_server.make_app(db_path, clock=clock, time_scale=0.01, **options)
        apps.append(app)
        with app.talk.db.write() as db:
            for user_id in ("alice", "bob", "carol"):
                talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
        return app, lambda user=None: Client(app, user)

    yield make
    for app in apps:
        app.talk.close()


@pytest.fixture
def room(alice, bob, guest):
    """A public room that alice, bob and a guest have joined: (token, sessions by name)."""
    token = public_room(alice)
    sessions = {"alice": join(alice, token), "bob": join(bob, token), "guest": join(guest, token)}
    return token, sessions


# --- GET /signaling/settings -------------------------------------------------


def test_settings_default_to_the_nextcloud_stun_server_and_no_turn(alice):
    data = alice.get("/signaling/settings", status=200).data
    assert data == {
        "server": "",
        "ticket": "",
        "stunservers": [{"url": "stun:stun.nextcloud.com:443"}],
        "turnservers": [],
    }


def test_settings_are_available_to_guests(anonymous, guest, alice):
    token = public_room(alice)
    join(guest, token)
    for client in (anonymous, guest):
        data = client.get("/signaling/settings", status=200).data
        assert data["stunservers"] == [{"url": "stun:stun.nextcloud.com:443"}]


def test_settings_use_the_configured_stun_server(make_custom):
    _, client = make_custom(stun_servers=["stun.example.org:3478"])
    data = client().get("/signaling/settings", status=200).data
    assert data["stunservers"] == [{"url": "stun:stun.example.org:3478"}]


def test_settings_pick_one_of_several_stun_servers(make_custom):
    servers = ["stun1.example.org:3478", "stun2.example.org:3478", "stun3.example.org:19302"]
    _, client = make_custom(stun_servers=servers)
    seen = set()
    for _ in range(40):
        stun = client("alice").get("/signaling/settings", status=200).data["stunservers"]
        assert len(stun) == 1
        seen.add(stun[0]["url"])
    assert seen <= {f"stun:{server}" for server in servers}
    assert len(seen) > 1  # picked at random: 40 draws of 3 all alike is 3 in 3^40


def test_settings_give_turn_rest_credentials_for_udp_and_tcp(make_custom, clock):
    secret = "turn-shared-secret"
    _, client = make_custom(turn_server="turn.example.org:3478", turn_secret=secret)
    turn = client("alice").get("/signaling/settings", status=200).data["turnservers"]
    assert [entry["urls"] for entry in turn] == [
        ["turn:turn.example.org:3478?transport=udp"],
        ["turn:turn.example.org:3478?transport=tcp"],
    ]
    for entry in turn:
        assert entry["url"] == entry["urls"]
        match = re.fullmatch(r"(\d+):(\S+)", entry["username"])
        assert match, entry["username"]
        assert int(match.group(1)) == clock() + talk_server.TURN_CREDENTIAL_SECONDS
        expected = hmac.new(secret.encode(), entry["username"].encode(), hashlib.sha1).digest()
        assert entry["credential"] == base64.b64encode(expected).decode()


def test_settings_without_a_turn_secret_list_no_turn_server(make_custom):
    _, client = make_custom(turn_server="turn.example.org:3478")
    assert client("alice").get("/signaling/settings", status=200).data["turnservers"] == []


def test_turn_credentials_follow_the_turn_rest_convention():
    username, credential = talk_server.turn_credentials("s3cret", 1000)
    expiry, _, rest = username.partition(":")
    assert expiry == str(1000 + talk_server.TURN_CREDENTIAL_SECONDS) and rest
    assert talk_server.TURN_CREDENTIAL_SECONDS <= 6 * 3600  # hours, not a day
    digest = hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(credential) == digest


# --- POST /signaling ---------------------------------------------------------


def test_message_reaches_the_recipient_with_from_set_by_the_server(alice, bob, room):
    token, s = room
    payload = {"type": "offer", "sdp": "v=0..."}
    response = send(alice, token, message(s["alice"], s["bob"], "offer", payload))
    assert response.data == []
    data = receive(bob, token).data
    assert len(data) == 2 and data[0]["type"] == "message"
    assert json.loads(data[0]["data"]) == {
        "to": s["bob"],
        "type": "offer",
        "payload": payload,
        "from": s["alice"],
    }


def test_forged_from_is_replaced_by_the_sender(alice, bob, room):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"], "offer", **{"from": s["guest"]}))
    (received,) = messages_of(receive(bob, token).data)
    assert received["from"] == s["alice"]


def test_guest_sends_and_receives(alice, guest, room):
    token, s = room
    send(guest, token, message(s["guest"], s["alice"], "answer"))
    send(alice, token, message(s["alice"], s["guest"], "candidate"))
    (to_alice,) = messages_of(receive(alice, token).data)
    (to_guest,) = messages_of(receive(guest, token).data)
    assert (to_alice["type"], to_alice["from"]) == ("answer", s["guest"])
    assert (to_guest["type"], to_guest["from"]) == ("candidate", s["alice"])


def test_post_without_token_sends_from_the_latest_session(alice, bob, room):
    token, s = room
    send(alice, None, message(s["alice"], s["bob"]))
    (received,) = messages_of(receive(bob, token).data)
    assert received["from"] == s["alice"]


def test_spoofed_session_id_is_dropped(alice, bob, room, app):
    token, s = room
    spoofed = message(s["guest"], s["bob"], "offer")
    assert send(alice, token, spoofed).data == []
    assert queued_rows(app) == []
    assert messages_of(receive(bob, token).data) == []


def test_spoofed_element_is_dropped_but_the_genuine_one_is_sent(alice, bob, room):
    token, s = room
    send(alice, token, message(s["guest"], s["bob"], "forged"), message(s["alice"], s["bob"]))
    received = messages_of(receive(bob, token).data)
    assert [(m["type"], m["from"]) for m in received] == [("offer", s["alice"])]


def test_recipient_in_another_room_never_receives(alice, carol, room, app):
    token, s = room
    other = public_room(carol, "Other")
    carol_session = join(carol, other)
    assert send(alice, token, message(s["alice"], carol_session)).data == []
    assert queued_rows(app) == []
    assert messages_of(receive(carol, other).data) == []


def test_session_of_another_room_cannot_inject(carol, alice, room, app):
    token, s = room
    other = public_room(carol, "Other")
    carol_session = join(carol, other)
    # Through its own room: the recipient is not there.
    send(carol, other, message(carol_session, s["alice"]), status=200)
    # Through the target room: carol has no session there.
    response = send(carol, token, message(carol_session, s["alice"]), status=404)
    assert response.data == NO_SESSION
    # Claiming alice's session from another room.
    send(carol, other, message(s["alice"], s["bob"]), status=200)
    assert queued_rows(app) == []
    assert messages_of(receive(alice, token).data) == []


def test_unknown_recipient_is_ignored(alice, room, app):
    token, s = room
    assert send(alice, token, message(s["alice"], "nobody")).data == []
    assert queued_rows(app) == []


def test_events_other_than_message_are_ignored(alice, bob, room, app):
    token, s = room
    fn = json.dumps({"to": s["bob"], "type": "offer", "payload": {}})
    for ev in ("join", "leave", "ping", "MESSAGE"):
        item = {"ev": ev, "fn": fn, "sessionId": s["alice"]}
        assert send(alice, token, item).data == []
    send(alice, token, {"fn": fn, "sessionId": s["alice"]})  # no ev at all
    assert queued_rows(app) == []
    assert messages_of(receive(bob, token).data) == []


@pytest.mark.parametrize(
    "messages",
    [
        "not json",
        "",
        "{",
        json.dumps({"ev": "message"}),
        json.dumps("a string"),
        json.dumps(42),
        json.dumps(None),
        json.dumps([1, 2]),
        json.dumps(["message"]),
        json.dumps([None]),
        json.dumps([[]]),
    ],
    ids=[
        "not-json",
        "empty",
        "truncated",
        "object",
        "string",
        "number",
        "null",
        "numbers",
        "strings",
        "nulls",
        "lists",
    ],
)
def test_malformed_messages_are_400(alice, room, messages):
    token, _ = room
    alice.post(f"/signaling/{token}", {"messages": messages}, status=400)


def test_missing_messages_is_400(alice, room):
    token, _ = room
    alice.post(f"/signaling/{token}", status=400)


@pytest.mark.parametrize(
    "fn",
    [
        json.dumps({"type": "offer", "payload": {}}),
        json.dumps({"to": None, "type": "offer"}),
        json.dumps({"to": 42, "type": "offer"}),
        json.dumps(["to"]),
        "not json",
    ],
    ids=["no-to", "null-to", "number-to", "not-an-object", "not-json"],
)
def test_fn_without_a_recipient_is_400(alice, bob, room, app, fn):
    token, s = room
    send(alice, token, {"ev": "message", "fn": fn, "sessionId": s["alice"]}, status=400)
    assert queued_rows(app) == []


def test_send_without_a_session_is_404(alice, bob, guest, anonymous):
    token = public_room(alice)
    bob_session = join(bob, token)
    join(guest, token)  # the guest has a cookie, but no session any more
    guest.delete(f"/room/{token}/participants/active", status=200)
    for client in (alice, guest, anonymous):
        response = send(client, token, message("0", bob_session), status=404)
        assert response.data == NO_SESSION
        response = send(client, None, message("0", bob_session), status=404)
        assert response.data == NO_SESSION


def test_send_to_an_unknown_room_is_404(alice, room):
    _, s = room
    response = send(alice, "unknown2", message(s["alice"], s["bob"]), status=404)
    assert response.data == NO_SESSION


def test_send_is_also_json_body(alice, bob, room):
    token, s = room
    body = {"messages": json.dumps([message(s["alice"], s["bob"])])}
    alice.test.post_json(API + f"/signaling/{token}", body, headers=alice.headers, status=200)
    assert len(messages_of(receive(bob, token).data)) == 1


# --- GET /signaling ----------------------------------------------------------


def test_queued_messages_arrive_once_in_order(alice, bob, room):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"], "offer"))
    send(alice, token, message(s["alice"], s["bob"], "candidate", {"n": 1}))
    send(
        alice,
        token,
        message(s["alice"], s["bob"], "candidate", {"n": 2}),
        message(s["alice"], s["bob"], "candidate", {"n": 3}),
    )
    received = messages_of(receive(bob, token).data)
    assert [(m["type"], m["payload"]) for m in received] == [
        ("offer", {"sdp": "offer-sdp"}),
        ("candidate", {"n": 1}),
        ("candidate", {"n": 2}),
        ("candidate", {"n": 3}),
    ]
    assert all(m["from"] == s["alice"] and m["to"] == s["bob"] for m in received)
    assert messages_of(receive(bob, token).data) == []


def test_messages_wait_for_their_recipient_only(alice, bob, guest, room):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"], "to-bob"))
    send(alice, token, message(s["alice"], s["guest"], "to-guest"))
    assert [m["type"] for m in messages_of(receive(guest, token).data)] == ["to-guest"]
    assert [m["type"] for m in messages_of(receive(bob, token).data)] == ["to-bob"]
    assert messages_of(receive(alice, token).data) == []


@pytest.fixture
def asked(app):
    """The waits polls ask the notifier for (each times out at once)."""
    seconds = []

    def wait(waiter, wait_seconds, cancelled=None):
        seconds.append(wait_seconds)
        return False

    app.talk.notifier.wait = wait
    return seconds


@pytest.fixture
def frozen(app):
    """Polls that never time out by themselves: only a wake-up answers them."""
    app.talk.notifier.monotonic = lambda: 0.0
    return app.talk.notifier


def in_background(fn):
    """Run fn in a thread; join() gives its value."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as error:  # handed over in join()
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(30)
        assert not thread.is_alive(), "the poll was never answered"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def test_empty_poll_waits_then_answers_users_in_room(alice, bob, room, asked):
    token, s = room
    data = receive(bob, token).data
    assert asked == [30]  # SPEC 7: up to 30 s
    assert len(data) == 1 and data[0]["type"] == "usersInRoom"


def test_a_queued_message_answers_at_once(alice, bob, room, asked):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"]))
    assert [m["type"] for m in messages_of(receive(bob, token).data)] == ["offer"]
    assert asked == []  # no wait


def test_a_send_wakes_a_waiting_poll(app, alice, bob, room, frozen):
    token, s = room
    poll = in_background(lambda: receive(bob, token).data)
    wait_until(lambda: frozen.waiting == 1)  # the send comes after the poll looked
    send(alice, token, message(s["alice"], s["bob"], "offer"))
    assert [m["type"] for m in messages_of(poll())] == ["offer"]


@pytest.mark.parametrize("event", ["make private", "remove the guest", "remove bob"])
def test_room_events_wake_waiting_polls(app, alice, bob, guest, room, frozen, event):
    """SPEC 7: the room becoming private, a guest or a participant removed wake
    every waiting poll of the room: the removed get their 404, the others the
    new usersInRoom."""
    token, s = room
    removed = {"make private": guest, "remove the guest": guest, "remove bob": bob}[event]
    polls = {name: in_background(lambda c=c: receive(c, token, status="*"))
             for name, c in (("alice", alice), ("removed", removed))}
    wait_until(lambda: frozen.waiting == 2)
    if event == "make private":
        alice.delete(f"/room/{token}/public", status=200)
    elif event == "remove the guest":
        alice.delete(f"/room/{token}/participants/guests", {"participant": s["guest"]})
    else:
        alice.delete(f"/room/{token}/participants", {"participant": "bob"})
    gone = polls["removed"]()
    assert (gone.status_int, gone.json["ocs"]["data"]) == (404, NO_SESSION)
    users = {u["sessionId"] for u in users_of(polls["alice"]().data)}
    assert s["alice"] in users and s["guest" if removed is guest else "bob"] not in users


def test_users_in_room_lists_each_active_session_users_first(alice, bob, guest, clock):
    token = public_room(alice)
    guest_session = join(guest, token)
    clock.advance(1)
    bob_session = join(bob, token)
    clock.advance(1)
    alice_session = join(alice, token)
    alice.post(f"/call/{token}", status=200)
    users = users_of(receive(bob, token).data)
    rid = room_id(alice, token)
    assert all(isinstance(u["roomId"], int) and u["roomId"] == rid for u in users)
    assert users[-1] == {
        "userId": "",
        "roomId": rid,
        "lastPing": START,
        "sessionId": guest_session,
        "inCall": False,
    }
    assert sorted(users[:-1], key=lambda u: u["userId"]) == [
        {
            "userId": "alice",
            "roomId": rid,
            "lastPing": START + 2,
            "sessionId": alice_session,
            "inCall": True,
        },
        {
            "userId": "bob",
            "roomId": rid,
            "lastPing": START + 2,  # the poll itself refreshes the caller
            "sessionId": bob_session,
            "inCall": False,
        },
    ]


def test_users_in_room_puts_users_before_guests(alice, bob, guest, other_guest):
    token = public_room(alice)
    join(guest, token)
    join(other_guest, token)
    join(bob, token)
    join(alice, token)
    users = users_of(receive(alice, token).data)
    assert [u["userId"] != "" for u in users] == [True, True, False, False]


def test_users_in_room_leaves_out_inactive_sessions(alice, bob, guest, clock):
    token = public_room(alice)
    join(guest, token)
    join(bob, token)
    alice_session = join(alice, token)
    clock.advance(31)
    users = users_of(receive(alice, token).data)
    assert [u["sessionId"] for u in users] == [alice_session]
    assert users[0]["lastPing"] == START + 31


def test_users_in_room_leaves_out_those_who_left(alice, bob, guest, room):
    token, s = room
    bob.delete(f"/room/{token}/participants/active", status=200)
    guest.delete(f"/room/{token}/participants/active", status=200)
    users = users_of(receive(alice, token).data)
    assert [u["sessionId"] for u in users] == [s["alice"]]


def test_signaling_refreshes_last_ping(alice, bob, room, clock):
    token, s = room
    clock.advance(20)
    send(bob, token, message(s["bob"], s["alice"]))
    clock.advance(20)  # bob: 20 s since the send; guest: 40 s since the join
    users = users_of(receive(alice, token).data)
    assert {u["sessionId"]: u["lastPing"] for u in users} == {
        s["alice"]: START + 40,
        s["bob"]: START + 20,
    }


def test_receive_without_token_uses_the_latest_active_session(alice, bob, carol, clock):
    first = public_room(alice, "First")
    second = public_room(alice, "Second")
    join(alice, first)
    join(carol, first)
    clock.advance(1)
    alice_second = join(alice, second)
    bob_second = join(bob, second)
    send(bob, second, message(bob_second, alice_second, "offer"))
    data = receive(alice, None).data
    assert [m["type"] for m in messages_of(data)] == ["offer"]
    users = users_of(data)
    assert {u["roomId"] for u in users} == {room_id(alice, second)}
    assert {u["sessionId"] for u in users} == {alice_second, bob_second}


def test_post_without_token_uses_the_latest_active_session(alice, bob, clock):
    first = public_room(alice, "First")
    second = public_room(alice, "Second")
    alice_first = join(alice, first)
    bob_first = join(bob, first)
    clock.advance(1)
    join(bob, second)
    # bob's latest session is in the second room, where alice is not.
    send(bob, None, message(bob_first, alice_first), status=200)
    assert messages_of(receive(alice, first).data) == []


def test_receive_with_token_picks_that_rooms_session(alice, bob, clock):
    first = public_room(alice, "First")
    second = public_room(alice, "Second")
    alice_first = join(alice, first)
    bob_first = join(bob, first)
    clock.advance(1)
    join(alice, second)
    send(bob, first, message(bob_first, alice_first, "offer"))
    data = receive(alice, first).data
    assert [m["type"] for m in messages_of(data)] == ["offer"]
    assert {u["roomId"] for u in users_of(data)} == {room_id(alice, first)}


def test_receive_without_a_session_is_404(alice, bob, guest, anonymous):
    token = public_room(alice)
    join(bob, token)
    join(guest, token)  # the guest has a cookie, but no session any more
    guest.delete(f"/room/{token}/participants/active", status=200)
    for client in (alice, guest, anonymous):
        assert receive(client, token, status=404).data == NO_SESSION
        assert receive(client, None, status=404).data == NO_SESSION
    assert receive(bob, "unknown2", status=404).data == NO_SESSION


def test_receive_after_leaving_is_404(alice, bob, room):
    token, _ = room
    bob.delete(f"/room/{token}/participants/active", status=200)
    assert receive(bob, token, status=404).data == NO_SESSION


def test_receive_in_a_deleted_room_is_404(alice, bob, room):
    token, _ = room
    alice.delete(f"/room/{token}", status=200)
    assert receive(bob, token, status=404).data == NO_SESSION
    assert receive(bob, None, status=404).data == NO_SESSION


# --- Queue hygiene -----------------------------------------------------------


def test_messages_to_a_guest_who_leaves_are_deleted(app, alice, guest, room):
    token, s = room
    send(alice, token, message(s["alice"], s["guest"]))
    assert len(queued_rows(app)) == 1
    guest.delete(f"/room/{token}/participants/active", status=200)
    assert queued_rows(app) == []


def test_messages_to_a_member_who_leaves_are_deleted(app, alice, bob):
    token = alice.post("/room", {"roomType": 2, "roomName": "Team"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"}, status=200)
    alice_session, bob_session = join(alice, token), join(bob, token)
    send(alice, token, message(alice_session, bob_session))
    bob.delete(f"/room/{token}/participants/active", status=200)
    assert queued_rows(app) == []
    # bob is still a member: joining again gives a fresh, empty queue.
    bob_again = join(bob, token)
    assert bob_again != bob_session
    assert messages_of(receive(bob, token).data) == []


def test_messages_from_a_session_that_leaves_are_deleted(app, alice, bob, room):
    token, s = room
    send(bob, token, message(s["bob"], s["alice"]))
    bob.delete(f"/room/{token}/participants/active", status=200)
    assert queued_rows(app) == []
    assert messages_of(receive(alice, token).data) == []


def test_messages_to_a_replaced_session_are_deleted(app, alice, bob, room):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"]))
    new_session = join(bob, token)
    assert new_session != s["bob"]
    assert queued_rows(app) == []
    assert messages_of(receive(bob, token).data) == []


def test_messages_of_a_deleted_room_are_deleted(app, alice, bob, room):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"]))
    alice.delete(f"/room/{token}", status=200)
    assert queued_rows(app) == []


def test_messages_older_than_five_minutes_are_not_delivered(alice, bob, room, clock):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"], "stale"))
    clock.advance(301)
    assert messages_of(receive(bob, token).data) == []
    assert messages_of(receive(bob, token).data) == []


def test_messages_younger_than_five_minutes_are_delivered(alice, bob, room, clock):
    token, s = room
    send(alice, token, message(s["alice"], s["bob"], "fresh"))
    clock.advance(299)
    assert [m["type"] for m in messages_of(receive(bob, token).data)] == ["fresh"]


def test_a_full_queue_is_429(make_custom):
    app, client = make_custom(signaling_queue_max=3)
    alice, bob, carol = client("alice"), client("bob"), client("carol")
    token = public_room(alice)
    a, b, c = join(alice, token), join(bob, token), join(carol, token)
    for n in range(3):
        send(alice, token, message(a, b, "candidate", {"n": n}), status=200)
    response = send(alice, token, message(a, b, "candidate", {"n": 3}), status=429)
    assert response.meta["statuscode"] == 429
    assert response.meta["status"] == "failure"
    assert response.meta["message"]
    # Another recipient's queue is not affected.
    send(alice, token, message(a, c), status=200)
    # Once bob has read his queue, there is room again.
    received = messages_of(receive(bob, token).data)
    assert [m["payload"]["n"] for m in received] == [0, 1, 2]
    send(alice, token, message(a, b, "candidate", {"n": 4}), status=200)


# --- Capabilities ------------------------------------------------------------


def test_capabilities_list_guest_signaling(make_client):
    for user in ("alice", None):
        client = make_client(user, prefix="")
        data = client.get("/ocs/v2.php/cloud/capabilities", status=200).data
        assert "guest-signaling" in data["capabilities"]["spreed"]["features"]


# --- Over real HTTP ----------------------------------------------------------


class HttpClient:
    """A urllib client for the real server: Basic auth or a guest cookie jar."""

    def __init__(self, base, user=None):
        self.base = base + API
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
        if user is not None:
            raw = f"{user}:secret".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()

    def request(self, method, path, params=None, timeout=60):
        """(status, data) of one call."""
        url = self.base + path
        body = None
        if method == "GET":
            if params:
                url += "?" + urllib.parse.urlencode(params)
        else:
            body = urllib.parse.urlencode(params or {}).encode()
        request = urllib.request.Request(url, data=body, method=method, headers=self.headers)
        try:
            with self.opener.open(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, json.loads(raw)["ocs"]["data"]

    def expect(self, method, path, params=None, status=200):
        actual, data = self.request(method, path, params)
        assert actual == status, (method, path, actual, data)
        return data

    def join(self, token):
        return self.expect("POST", f"/room/{token}/participants/active")["sessionId"]

    def send(self, token, *items, status=200):
        return self.expect(
            "POST", f"/signaling/{token}", {"messages": json.dumps(list(items))}, status
        )


class Background:
    """Run fn in a thread; keeps its result, its error and when it finished."""

    started: list = []  # every thread of the current test, joined at teardown

    def __init__(self, fn, *args):
        self.result = self.error = self.finished = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args))
        self.started.append(self.thread)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.result = fn(*args)
        except BaseException as error:  # reported by the test
            self.error = error
        self.finished = time.monotonic()

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "thread did not end"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(autouse=True)
def join_threads():
    """Join every thread a test started, even when it failed half-way."""
    yield
    threads, Background.started[:] = list(Background.started), []
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


@pytest.fixture
def server_db(tmp_path, password_hash):
    """A database with alice, bob and carol (password "secret") for serve_in_thread."""
    path = tmp_path / "served.db"
    app = talk_server.make_app(path)
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob", "carol"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    app.talk.close()
    return path


class Poller:
    """Polls GET /signaling/{token} in a thread until stopped; keeps what arrives."""

    def __init__(self, client, token):
        self.client, self.token = client, token
        self.messages, self.answers = [], []
        self.stop = threading.Event()
        self.arrived = threading.Condition()
        self.background = Background(self._loop)

    def _loop(self):
        while not self.stop.is_set():
            try:
                status, data = self.client.request("GET", f"/signaling/{self.token}")
            except (urllib.error.URLError, ConnectionError):
                if self.stop.is_set():
                    return  # the server stopped under us
                raise
            with self.arrived:
                self.answers.append((status, data))
                if status == 200:
                    self.messages.extend(messages_of(data))
                self.arrived.notify_all()
            if status != 200:
                return

    def wait_for(self, count, timeout):
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
        return len(self.messages)


@pytest.mark.slow
def test_offer_answer_and_candidates_over_http(server_db):
    # time_scale=1: a poll waits 30 s, so every delivery below is a wake-up.
    with talk_server.serve_in_thread(server_db, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # a poll ends only when woken
        alice, bob = HttpClient(base, "alice"), HttpClient(base, "bob")
        carol, guest = HttpClient(base, "carol"), HttpClient(base)
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Call"}, 201)["token"]
        other = carol.expect("POST", "/room", {"roomType": 3, "roomName": "Other"}, 201)["token"]
        s = {"alice": alice.join(token), "bob": bob.join(token), "guest": guest.join(token)}
        assert any(cookie.name == "talk_guest" for cookie in guest.jar)
        carol_session = carol.join(other)
        clients = {"alice": alice, "bob": bob, "guest": guest}
        pollers = {}
        try:
            pollers = {name: Poller(client, token) for name, client in clients.items()}
            pollers["carol"] = Poller(carol, other)
            wait_until(lambda: notifier.waiting == 4)  # every poll waits
            script = [
                ("alice", "bob", "offer", {"sdp": "offer a-b"}),
                ("alice", "guest", "offer", {"sdp": "offer a-g"}),
                ("bob", "alice", "answer", {"sdp": "answer b-a"}),
                ("guest", "alice", "answer", {"sdp": "answer g-a"}),
                ("bob", "guest", "offer", {"sdp": "offer b-g"}),
                ("guest", "bob", "answer", {"sdp": "answer g-b"}),
            ]
            for n in range(3):
                for sender, recipient in (
                    ("alice", "bob"),
                    ("bob", "alice"),
                    ("alice", "guest"),
                    ("guest", "alice"),
                    ("bob", "guest"),
                    ("guest", "bob"),
                ):
                    script.append((sender, recipient, "candidate", {"candidate": f"{n}"}))
            for sender, recipient, kind, payload in script:
                item = message(s[sender], s[recipient], kind, payload)
                assert clients[sender].send(token, item) == []
            # carol, in another room, tries to reach alice three ways.
            carol.send(other, message(carol_session, s["alice"], "offer"))
            carol.send(other, message(s["alice"], s["bob"], "offer"))
            assert carol.send(token, message(carol_session, s["alice"]), status=404) == NO_SESSION
            expected = {name: [] for name in clients}
            for sender, recipient, kind, payload in script:
                expected[recipient].append(
                    {"to": s[recipient], "type": kind, "payload": payload, "from": s[sender]}
                )
            for name in clients:
                pollers[name].wait_for(len(expected[name]), timeout=10)
            time.sleep(0.3)  # room for a duplicate to show up
        finally:
            for poller in pollers.values():
                poller.stop.set()
    # The server has stopped: every waiting poll has answered.
    for poller in pollers.values():
        poller.background.join()
    for name in clients:
        assert pollers[name].messages == expected[name], name
        assert all(status == 200 for status, _ in pollers[name].answers)
    assert pollers["carol"].messages == []


def timed_poll(client, token):
    """One poll in a thread: join() gives (status, data); .finished says when."""
    return Background(client.request, "GET", f"/signaling/{token}")


@pytest.mark.slow
def test_joins_and_call_changes_wake_waiting_polls_over_http(server_db):
    with talk_server.serve_in_thread(server_db, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # a poll ends only when woken
        alice, bob, guest = HttpClient(base, "alice"), HttpClient(base, "bob"), HttpClient(base)
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Call"}, 201)["token"]
        alice_session = alice.join(token)

        # bob joins while alice waits.
        poll = timed_poll(alice, token)
        wait_until(lambda: notifier.waiting >= 1)
        bob_session = bob.join(token)
        status, data = poll.join()
        assert status == 200
        assert {u["sessionId"] for u in users_of(data)} == {alice_session, bob_session}

        # A guest joins while alice and bob wait.
        polls = [timed_poll(alice, token), timed_poll(bob, token)]
        wait_until(lambda: notifier.waiting >= 2)
        guest_session = guest.join(token)
        for poll in polls:
            status, data = poll.join()
            assert status == 200
            users = users_of(data)
            assert [u["sessionId"] for u in users][-1] == guest_session
            assert {u["sessionId"] for u in users} == {alice_session, bob_session, guest_session}

        # bob joins the call while alice waits.
        poll = timed_poll(alice, token)
        wait_until(lambda: notifier.waiting >= 1)
        bob.expect("POST", f"/call/{token}")
        status, data = poll.join()
        assert status == 200
        in_call = {u["sessionId"]: u["inCall"] for u in users_of(data)}
        assert in_call == {alice_session: False, bob_session: True, guest_session: False}

        # ...and leaves it.
        poll = timed_poll(alice, token)
        wait_until(lambda: notifier.waiting >= 1)
        bob.expect("DELETE", f"/call/{token}")
        status, data = poll.join()
        assert not any(u["inCall"] for u in users_of(data))

        # The guest leaves while alice waits.
        poll = timed_poll(alice, token)
        wait_until(lambda: notifier.waiting >= 1)
        guest.expect("DELETE", f"/room/{token}/participants/active")
        status, data = poll.join()
        assert {u["sessionId"] for u in users_of(data)} == {alice_session, bob_session}


@pytest.mark.slow
def test_deleting_the_room_ends_waiting_polls_with_404_over_http(server_db):
    with talk_server.serve_in_thread(server_db, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # a poll ends only when woken
        alice, bob, guest = HttpClient(base, "alice"), HttpClient(base, "bob"), HttpClient(base)
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Call"}, 201)["token"]
        alice.join(token)
        bob.join(token)
        guest.join(token)
        polls = [timed_poll(bob, token), timed_poll(guest, token)]
        wait_until(lambda: notifier.waiting >= 2)
        alice.expect("DELETE", f"/room/{token}")
        for poll in polls:
            status, data = poll.join()
            assert (status, data) == (404, NO_SESSION)


@pytest.mark.slow
def test_a_send_wakes_the_waiting_recipient_at_once_over_http(server_db):
    with talk_server.serve_in_thread(server_db, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # a poll ends only when woken
        alice, bob = HttpClient(base, "alice"), HttpClient(base, "bob")
        token = alice.expect("POST", "/room", {"roomType": 3, "roomName": "Call"}, 201)["token"]
        a, b = alice.join(token), bob.join(token)
        poll = timed_poll(bob, token)
        wait_until(lambda: notifier.waiting >= 1)
        alice.send(token, message(a, b, "offer"))
        status, data = poll.join()
        assert status == 200
        assert [(m["type"], m["from"]) for m in messages_of(data)] == [("offer", a)]
