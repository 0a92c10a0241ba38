"""Calls on API v4 and internal signaling v3 (today-api.md 7, issue 13): what today's
phone apps send to hold a call, rule by rule and status by status, then an Android
call sequence replayed against the real server and a real WebRTC call between two
aiortc peers speaking signaling v3 with the apps' message shapes."""

import asyncio
import base64
import http.cookiejar
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import START, Client
from helpers import scalar
from served import serve_users

import talk_server

V1 = "/ocs/v2.php/apps/spreed/api/v1"
V3 = "/ocs/v2.php/apps/spreed/api/v3"
V4 = "/ocs/v2.php/apps/spreed/api/v4"
NO_USERS = [{"type": "usersInRoom", "data": []}]
SESSION_FIELDS = {
    "userId": str, "roomId": int, "lastPing": int, "sessionId": str, "inCall": int,
    "participantPermissions": int, "actorType": str, "actorId": str,
}


# --- Helpers -----------------------------------------------------------------------


def team(a, *users, room_type=2):
    """A conversation "Team" of alice's with `users` added; nobody joined."""
    token = a.post("/room", {"roomType": room_type, "roomName": "Team"}, status=201).data["token"]
    for user in users:
        a.post(f"/room/{token}/participants", {"newParticipant": user})
    return token


def join(client, token, status=200, **params):
    """Join the conversation from this device; its session id."""
    answer = client.post(f"/room/{token}/participants/active", params, status=status)
    return answer.data["sessionId"] if status == 200 else None


def call(client, token, status=200, **params):
    return client.post(f"/call/{token}", params, status=status)


def room(client, token):
    return client.get(f"/room/{token}").data


def pull(client, token, status=200):
    return client.get(f"/signaling/{token}", status=status, prefix=V3).data


def push(client, token, *items, status=200, as_json=False):
    messages = json.dumps(list(items))
    if as_json:
        return client.test.post_json(
            V3 + f"/signaling/{token}", {"messages": messages},
            headers=client.headers, status=status,
        )
    return client.post(f"/signaling/{token}", {"messages": messages}, status=status, prefix=V3)


def app_message(sender, to, kind, payload, room_type="video"):
    """One element of `messages` as the Android and iOS apps build it: `fn` is a JSON
    string of {to, roomType, type, payload} (talk-android NCSignalingMessage)."""
    fn = {"to": to, "roomType": room_type, "type": kind, "payload": payload}
    return {"ev": "message", "fn": json.dumps(fn), "sessionId": sender}


def users(data):
    assert data[-1]["type"] == "usersInRoom"
    return data[-1]["data"]


def relayed(data):
    """The delivered messages: each `data` a JSON string (iOS drops anything else)."""
    assert all(item["type"] == "message" and isinstance(item["data"], str) for item in data[:-1])
    return [json.loads(item["data"]) for item in data[:-1]]


def attendee_id(client, token, user):
    rows = client.get(f"/room/{token}/participants").data
    return next(row["attendeeId"] for row in rows if row["actorId"] == user)


def flags_of(app, session):
    return scalar(app, "SELECT in_call FROM sessions WHERE id = ?", session)


class Background:
    """Run fn in a thread, keeping its result or error."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.result = fn(*args)
        except BaseException as error:  # reported by join
            self.error = error

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the poll was not answered"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def patient(db_path, clock, password_hash):
    """An app whose signaling poll waits 30 s x 1000: a poll that answers was woken
    (or had news), never timed out. Users alice, bob and carol on API v4."""
    app = talk_server.make_app(db_path, clock=clock, time_scale=1000.0)
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob", "carol"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    yield app, lambda user=None: Client(app, user, prefix=V4)
    app.talk.close()  # ends any wait a failed test left behind


def wait_until_polling(app, count=1):
    """Until `count` polls wait in the notifier (an event, not a sleep of a guessed length)."""
    for _ in range(2000):
        if app.talk.notifier.waiting >= count:
            return
        threading.Event().wait(0.005)
    raise AssertionError("the poll never started waiting")


# --- Signaling settings (API v3) ------------------------------------------------------


def test_settings_v3_for_a_user_name_internal_signaling_with_empty_server_and_ticket(a):
    token = team(a)
    for params in ({}, {"token": token}):
        data = a.get("/signaling/settings", params, prefix=V3).data
        assert data == {
            "signalingMode": "internal",
            "userId": "alice",
            "hideWarning": False,
            "server": "",
            "ticket": "",
            "helloAuthParams": {"1.0": {"userid": "alice", "ticket": ""}, "2.0": {"token": ""}},
            "stunservers": [{"urls": ["stun:stun.nextcloud.com:443"]}],
            "turnservers": [],
            "sipDialinInfo": "",
            "federation": None,
        }


def test_settings_v3_unknown_or_invisible_token_is_404(a, c):
    token = team(a)
    c.get("/signaling/settings", {"token": token}, status=404, prefix=V3)
    a.get("/signaling/settings", {"token": "nosuchroom"}, status=404, prefix=V3)


def test_settings_v3_for_a_guest_have_a_null_user_id(a, v4):
    token = team(a, room_type=3)
    guest = v4()
    data = guest.get("/signaling/settings", {"token": token}, prefix=V3).data
    assert data["userId"] is None and data["helloAuthParams"]["1.0"]["userid"] is None


@pytest.fixture
def with_turn(db_path, clock, password_hash):
    app = talk_server.make_app(
        db_path, clock=clock, time_scale=0.01, turn_server="turn.example:3478",
        turn_secret="s3cret", stun_servers=("stun.example:3478", "stun2.example:443"),
    )
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    yield lambda user=None: Client(app, user, prefix=V4)
    app.talk.close()


def test_settings_v3_give_turn_credentials_only_to_callers_who_may_join(with_turn):
    alice, bob, guest = with_turn("alice"), with_turn("bob"), with_turn()
    data = alice.get("/signaling/settings", prefix=V3).data
    assert data["stunservers"] == [{"urls": ["stun:stun.example:3478", "stun:stun2.example:443"]}]
    udp, tcp = data["turnservers"]
    assert udp["urls"] == ["turn:turn.example:3478?transport=udp"]
    assert tcp["urls"] == ["turn:turn.example:3478?transport=tcp"]
    assert udp["username"].split(":")[0] == str(START + talk_server.TURN_CREDENTIAL_SECONDS)
    assert udp["credential"] and set(udp) == {"urls", "username", "credential"}
    # A guest who joined no room gets no credentials; once in a public room, it does.
    assert guest.get("/signaling/settings", prefix=V3).data["turnservers"] == []
    token = team(alice, "bob", room_type=3)
    assert len(guest.get("/signaling/settings", {"token": token}, prefix=V3).data["turnservers"]) == 2
    join(guest, token)
    assert len(guest.get("/signaling/settings", prefix=V3).data["turnservers"]) == 2
    # An attendee whose permissions leave out joining calls gets none for that room.
    alice.put(f"/room/{token}/attendees/permissions",
              {"attendeeId": attendee_id(alice, token, "bob"), "permissions": 1 | 128})
    assert bob.get("/signaling/settings", {"token": token}, prefix=V3).data["turnservers"] == []
    assert len(bob.get("/signaling/settings", prefix=V3).data["turnservers"]) == 2


# --- Calls v4: join, flags, leave, peers -------------------------------------------------


def test_join_call_with_flags_shows_in_the_room_and_the_attendee_list(a, b, clock):
    token = team(a, "bob")
    session = join(b, token)
    clock.advance(3)
    call(b, token, flags=3)
    shown = room(b, token)
    assert shown["hasCall"] is True and shown["callFlag"] == 3
    assert shown["callStartTime"] == START + 3 and shown["participantFlags"] == 3
    rows = {r["actorId"]: r for r in a.get(f"/room/{token}/participants").data}
    assert rows["bob"]["inCall"] == 3 and rows["bob"]["sessionIds"] == [session]
    assert room(a, token)["participantFlags"] == 0  # alice has not joined
    call(b, token, flags=7)  # joining again only changes the flags
    assert room(b, token)["callStartTime"] == START + 3 and room(b, token)["callFlag"] == 7


def test_join_call_defaults_to_audio_and_video_and_implies_the_in_call_bit(a, b, app):
    token = team(a, "bob")
    join(a, token)
    bob_session = join(b, token)
    call(a, token)
    call(b, token, flags=2)
    assert room(a, token)["participantFlags"] == 7 and flags_of(app, bob_session) == 3


def test_join_call_without_a_session_here_is_404(a, b, c, v4):
    token = team(a, "bob", room_type=3)
    call(b, token, status=404)  # a member who has not joined the conversation
    call(c, token, status=404)  # a user who may join but has not
    call(v4(), token, status=404)  # a guest without a cookie
    call(c, "nosuchroom", status=404)
    b.put(f"/call/{token}", {"flags": 3}, status=404)
    b.delete(f"/call/{token}", status=404)
    b.get(f"/call/{token}", status=200)  # an attendee may look


def test_bad_flags_are_400(a):
    token = team(a)
    join(a, token)
    for flags in ("16", "-1", "x", "1.5"):
        call(a, token, flags=flags, status=400)
    call(a, token, flags=7)
    a.put(f"/call/{token}", {"flags": 32}, status=400)
    a.put(f"/call/{token}", status=400)  # flags are required


def test_change_flags_in_the_call(a, b, app):
    token = team(a, "bob")
    join(a, token)
    session = join(b, token)
    b.put(f"/call/{token}", {"flags": 3}, status=400)  # not in the call
    call(a, token)
    call(b, token, flags=7)
    b.put(f"/call/{token}", {"flags": 5})
    assert flags_of(app, session) == 5 and room(a, token)["callFlag"] == 7
    b.put(f"/call/{token}", {"flags": 4}, status=400)  # must keep the in-call bit
    assert flags_of(app, session) == 5


def test_the_last_one_out_ends_the_call(a, b):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    call(a, token)
    call(b, token)
    a.delete(f"/call/{token}")
    assert room(b, token)["hasCall"] is True and room(a, token)["participantFlags"] == 0
    b.delete(f"/call/{token}")
    shown = room(a, token)
    assert shown["hasCall"] is False and shown["callFlag"] == 0 and shown["callStartTime"] == 0
    b.delete(f"/call/{token}")  # leaving when not in the call: 200, as spreed


def test_a_moderator_ends_the_call_for_everyone(a, b, c, app):
    token = team(a, "bob", "carol")
    sessions = [join(x, token) for x in (a, b, c)]
    for x in (a, b, c):
        call(x, token)
    b.delete(f"/call/{token}", {"all": "true"})  # not a moderator: bob leaves alone
    assert [flags_of(app, s) for s in sessions] == [7, 0, 7]
    a.delete(f"/call/{token}", {"all": "true"})
    assert [flags_of(app, s) for s in sessions] == [0, 0, 0]
    assert room(c, token)["hasCall"] is False


def test_call_peers_list_the_sessions_in_the_call(a, b, v4, clock):
    token = team(a, "bob", room_type=3)
    join(a, token)
    bob_session = join(b, token)
    guest = v4()
    guest_session = join(guest, token)
    clock.advance(2)
    call(b, token, flags=3)
    call(guest, token)
    peers = a.get(f"/call/{token}").data
    assert peers[0] == {
        "actorType": "users", "actorId": "bob", "displayName": "Bob",
        "lastPing": START + 2, "sessionId": bob_session, "token": token,
    }
    assert peers[1]["actorType"] == "guests" and peers[1]["sessionId"] == guest_session
    assert len(peers) == 2  # alice joined the conversation, not the call
    v4().get(f"/call/{token}", status=404)  # no attendee row


def test_two_sessions_of_one_user_are_both_in_the_call(a, v4, app):
    token = team(a, "bob")
    phone, laptop = v4("bob"), v4("bob")
    on_phone, on_laptop = join(phone, token), join(laptop, token)
    call(phone, token, flags=3)
    call(laptop, token, flags=7)
    assert sorted(p["sessionId"] for p in a.get(f"/call/{token}").data) == sorted(
        [on_phone, on_laptop])
    in_room = {u["sessionId"]: u["inCall"] for u in users(pull(phone, token))}
    assert in_room == {on_phone: 3, on_laptop: 7}
    assert room(phone, token)["participantFlags"] == 3
    assert room(laptop, token)["participantFlags"] == 7
    phone.delete(f"/call/{token}")
    assert flags_of(app, on_phone) == 0 and flags_of(app, on_laptop) == 7
    assert room(a, token)["hasCall"] is True


def test_the_2018_call_routes_see_and_join_the_same_call(a, b, make_client):
    token = team(a, "bob")
    join(a, token)
    call(a, token)
    old = make_client("bob", prefix=V1)
    old.post(f"/room/{token}/participants/active")
    old.post(f"/call/{token}")
    assert [p["userId"] for p in old.get(f"/call/{token}").data] == ["alice", "bob"]
    assert room(a, token)["callFlag"] == 7  # the 2018 session adds the in-call bit only
    old.delete(f"/call/{token}")
    assert [p["actorId"] for p in a.get(f"/call/{token}").data] == ["alice"]


# --- Calls v4: who may ----------------------------------------------------------------------


def test_without_start_permission_one_may_join_but_not_start_a_call(a, b):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    no_start = 1 | 4 | 16 | 32 | 64 | 128  # custom: join, audio, video, screen, chat
    a.put(f"/room/{token}/attendees/permissions",
          {"attendeeId": attendee_id(a, token, "bob"), "permissions": no_start})
    assert room(b, token)["canStartCall"] is False
    call(b, token, status=403)
    call(a, token)
    call(b, token)
    assert room(b, token)["participantFlags"] == 7


def test_without_join_permission_the_call_is_403(a, b):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    call(a, token)
    a.put(f"/room/{token}/attendees/permissions",
          {"attendeeId": attendee_id(a, token, "bob"), "permissions": 1 | 128})
    call(b, token, status=403)


def test_audio_and_video_need_the_publish_permissions(a, b, app):
    token = team(a, "bob")
    join(a, token)
    session = join(b, token)
    call(a, token)
    a.put(f"/room/{token}/attendees/permissions",
          {"attendeeId": attendee_id(a, token, "bob"), "permissions": 1 | 4 | 16 | 128})
    call(b, token, flags=7)
    assert flags_of(app, session) == 3  # audio only
    b.put(f"/call/{token}", {"flags": 5})
    assert flags_of(app, session) == 1


def test_read_only_conversation_refuses_calls_and_the_lobby_holds_back(a, b):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    a.put(f"/room/{token}/read-only", {"state": 1})
    call(a, token, status=403)
    a.put(f"/room/{token}/read-only", {"state": 0})
    a.put(f"/room/{token}/webinar/lobby", {"state": 1})
    call(b, token, status=412)
    call(a, token)  # moderators pass the lobby


def test_a_note_to_self_has_no_calls(a):
    token = a.post("/room", {"roomType": 6}, status=201).data["token"]
    join(a, token)
    call(a, token, status=400)


# --- Signaling v3 ---------------------------------------------------------------------------


def test_pull_without_a_session_is_404_with_an_empty_users_in_room(a, b, c, v4):
    token = team(a, "bob", room_type=3)
    assert pull(b, token, status=404) == NO_USERS  # member, not joined
    assert pull(c, token, status=404) == NO_USERS
    assert pull(v4(), token, status=404) == NO_USERS
    assert pull(a, "nosuchroom", status=404) == NO_USERS
    push(b, token, status=404)


def test_users_in_room_have_integer_in_call_and_permissions(a, b, v4, clock):
    token = team(a, "bob", room_type=3)
    alice_session = join(a, token)
    bob_session = join(b, token)
    guest = v4()
    guest_session = join(guest, token)
    clock.advance(4)
    call(a, token, flags=7)
    listed = users(pull(b, token))
    for entry in listed:
        assert {k: type(v) for k, v in entry.items()} == SESSION_FIELDS
    by_session = {u["sessionId"]: u for u in listed}
    room_id = room(a, token)["id"]
    assert by_session[alice_session] == {
        "userId": "alice", "roomId": room_id, "lastPing": START + 4, "sessionId": alice_session,
        "inCall": 7, "participantPermissions": 254, "actorType": "users", "actorId": "alice",
    }
    assert by_session[bob_session]["inCall"] == 0 and by_session[bob_session]["lastPing"] == START + 4
    assert by_session[bob_session]["participantPermissions"] == talk_server.PERMISSIONS_DEFAULT_SET
    assert by_session[guest_session]["userId"] == "" and by_session[guest_session]["actorType"] == "guests"
    assert [u["userId"] for u in listed] == ["alice", "bob", ""]  # users first


def test_an_offer_sent_as_form_field_reaches_its_recipient_as_a_json_string(a, b):
    token = team(a, "bob")
    alice_session, bob_session = join(a, token), join(b, token)
    offer = {"type": "offer", "sdp": "v=0 offer", "nick": "Alice"}
    assert push(a, token, app_message(alice_session, bob_session, "offer", offer)).data == []
    (got,) = relayed(pull(b, token))
    assert got == {"to": bob_session, "roomType": "video", "type": "offer", "payload": offer,
                   "from": alice_session}
    assert relayed(pull(b, token)) == []  # delivered once


def test_messages_also_come_as_a_json_body(a, b):
    token = team(a, "bob")
    alice_session, bob_session = join(a, token), join(b, token)
    candidate = {"type": "candidate", "candidate": {
        "candidate": "candidate:1 1 UDP 1 127.0.0.1 5000 typ host", "sdpMid": "0",
        "sdpMLineIndex": 0}}
    push(a, token, app_message(alice_session, bob_session, "candidate", candidate), as_json=True)
    assert relayed(pull(b, token))[0]["payload"] == candidate


@pytest.mark.parametrize(
    "kind, payload",
    [
        ("raiseHand", {"state": True, "timestamp": 1700000000}),
        ("reaction", {"reaction": "👍"}),
        ("unshareScreen", {}),
        ("endOfCandidates", {}),
    ],
)
def test_call_messages_are_relayed(a, b, kind, payload):
    token = team(a, "bob")
    bob_session, alice_session = join(b, token), join(a, token)
    push(b, token, app_message(bob_session, alice_session, kind, payload))
    (got,) = relayed(pull(a, token))
    assert got["type"] == kind and got["payload"] == payload and got["from"] == bob_session


def test_control_messages_come_from_moderators_only(a, b):
    token = team(a, "bob")
    alice_session, bob_session = join(a, token), join(b, token)
    force_mute = {"action": "forceMute", "peerId": bob_session}
    push(b, token, app_message(bob_session, alice_session, "control", force_mute))
    assert relayed(pull(a, token)) == []
    push(a, token, app_message(alice_session, bob_session, "control", force_mute))
    assert relayed(pull(b, token))[0]["payload"] == force_mute


def test_only_sessions_of_the_same_room_receive_and_senders_cannot_be_spoofed(a, b, app):
    token, other = team(a, "bob"), team(a, "bob")
    alice_session, bob_session = join(a, token), join(b, token)
    elsewhere = join(b, other)
    push(a, token, app_message(alice_session, elsewhere, "offer", {"sdp": "x"}))
    push(a, token, app_message(bob_session, bob_session, "offer", {"sdp": "spoof"}))
    assert scalar(app, "SELECT COUNT(*) FROM signaling") == 0
    push(a, token, {"ev": "bye", "sessionId": alice_session, "fn": "{}"})
    assert relayed(pull(b, token)) == []


def test_the_session_is_the_one_the_device_cookie_names(a, v4):
    token = team(a, "bob")
    phone, laptop = v4("bob"), v4("bob")
    on_phone, on_laptop = join(phone, token), join(laptop, token)
    alice_session = join(a, token)
    push(a, token, app_message(alice_session, on_phone, "offer", {"sdp": "to the phone"}))
    assert relayed(pull(laptop, token)) == []
    assert relayed(pull(phone, token))[0]["payload"]["sdp"] == "to the phone"
    # A device sending as its own session is heard; as the other device's, not.
    push(laptop, token, app_message(on_phone, alice_session, "answer", {"sdp": "spoof"}))
    push(laptop, token, app_message(on_laptop, alice_session, "answer", {"sdp": "real"}))
    assert [m["payload"]["sdp"] for m in relayed(pull(a, token))] == ["real"]


def test_a_client_without_the_cookie_uses_its_newest_live_session(a, b, make_client):
    token = team(a, "bob")
    session = join(b, token)
    cookieless = make_client("bob", prefix=V4)
    assert {u["sessionId"] for u in users(pull(cookieless, token))} == {session}


# --- Signaling v3: waking, ending, no ping ---------------------------------------------------


def test_a_poll_answers_at_once_when_participants_changed_since_its_last_answer(patient):
    app, client = patient
    a, b, c = client("alice"), client("bob"), client("carol")
    token = team(a, "bob", "carol")
    join(a, token)
    join(b, token)
    first = Background(pull, b, token)  # the first poll of a session answers at once
    assert len(users(first.join())) == 2
    carol_session = join(c, token)  # between polls: refresh-participant-list
    listed = Background(pull, b, token).join()
    assert carol_session in {u["sessionId"] for u in users(listed)}
    waiting = Background(pull, b, token)  # nothing new: it waits ...
    wait_until_polling(app)
    call(c, token)  # ... until a call changes
    assert {u["sessionId"]: u["inCall"] for u in users(waiting.join())}[carol_session] == 7


def test_a_send_wakes_the_recipients_waiting_poll(patient):
    app, client = patient
    a, b = client("alice"), client("bob")
    token = team(a, "bob")
    alice_session, bob_session = join(a, token), join(b, token)
    pull(b, token)
    waiting = Background(pull, b, token)
    wait_until_polling(app)
    push(a, token, app_message(alice_session, bob_session, "offer", {"sdp": "wake"}))
    assert relayed(waiting.join())[0]["payload"]["sdp"] == "wake"


@pytest.mark.parametrize(
    "ending",
    [
        lambda a, token: a.delete(
            f"/room/{token}/attendees", {"attendeeId": attendee_id(a, token, "bob")}),
        lambda a, token: a.delete(f"/room/{token}"),
    ],
    ids=["participant-removed", "room-deleted"],
)
def test_a_removed_participants_waiting_poll_ends_at_once_with_404(patient, ending):
    app, client = patient
    a, b = client("alice"), client("bob")
    token = team(a, "bob")
    join(b, token)
    pull(b, token)
    waiting = Background(lambda: pull(b, token, status=404))
    wait_until_polling(app)
    ending(a, token)
    assert waiting.join() == NO_USERS


def test_a_session_replaced_from_its_device_ends_its_poll_with_409(patient):
    app, client = patient
    a, b = client("alice"), client("bob")
    token = team(a, "bob")
    join(b, token)
    pull(b, token)
    waiting = Background(lambda: pull(b, token, status=409))
    wait_until_polling(app)
    same_device = client("bob")
    same_device.test.set_cookie("talk_device", b.test.cookies["talk_device"])
    join(same_device, token, force="true")  # the app rejoins (a second tab, a restart)
    assert waiting.join() == NO_USERS


def test_a_device_that_stops_polling_drops_out_and_the_others_stay(a, v4, app, clock):
    token = team(a, "bob")
    phone, laptop = v4("bob"), v4("bob")
    on_phone, on_laptop = join(phone, token), join(laptop, token)
    alice_session = join(a, token)
    for device in (phone, laptop, a):
        call(device, token)
    clock.advance(25)
    pull(laptop, token)
    pull(a, token)
    clock.advance(talk_server.CALL_TIMEOUT_SECONDS - 24)  # the phone: 41 s unseen
    listed = {u["sessionId"]: u["inCall"] for u in users(pull(laptop, token))}
    assert listed == {on_laptop: 7, alice_session: 7}
    assert flags_of(app, on_phone) == 0  # it left the call ...
    rows = {r["actorId"]: r for r in a.get(f"/room/{token}/participants").data}
    assert sorted(rows["bob"]["sessionIds"]) == sorted([on_phone, on_laptop])  # ... not the room
    assert rows["bob"]["inCall"] == 7 and room(a, token)["hasCall"] is True
    assert [p["sessionId"] for p in a.get(f"/call/{token}").data] == [alice_session, on_laptop]


def test_a_device_that_leaves_drops_out_of_users_in_room(a, v4):
    token = team(a, "bob")
    phone, laptop = v4("bob"), v4("bob")
    on_phone, on_laptop = join(phone, token), join(laptop, token)
    call(phone, token)
    phone.delete(f"/room/{token}/participants/active")
    assert {u["sessionId"] for u in users(pull(laptop, token))} == {on_laptop}
    pull(phone, token, status=404)
    assert room(laptop, token)["hasCall"] is False  # the call ended with its last session
    assert on_phone not in {u["sessionId"] for u in users(pull(laptop, token))}


def test_the_call_ends_when_its_last_session_goes_quiet(a, b, clock):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    call(b, token)
    clock.advance(talk_server.CALL_TIMEOUT_SECONDS + 1)
    assert room(a, token)["hasCall"] is False  # shown at once ...
    pull(a, token)  # ... and written by the next signaling request
    assert room(a, token)["callStartTime"] == 0


def test_receiving_chat_or_signaling_keeps_a_session_in_the_call(a, b, clock):
    token = team(a, "bob")
    join(a, token)
    join(b, token)
    call(b, token)
    for _ in range(3):
        clock.advance(30)
        b.get(f"/chat/{token}", {"lookIntoFuture": 1, "timeout": 0}, prefix=V1, status=200)
    assert room(b, token)["participantFlags"] == 7
    for _ in range(3):
        clock.advance(30)
        pull(b, token)
    assert room(a, token)["callFlag"] == 7
    clock.advance(talk_server.CALL_TIMEOUT_SECONDS + 1)
    assert room(a, token)["callFlag"] == 0


def test_capabilities_list_the_call_features(make_client):
    features = make_client(prefix="/ocs/v2.php/cloud").get("/capabilities").data[
        "capabilities"]["spreed"]["features"]
    for feature in ("signaling-v3", "no-ping", "in-call-flags", "start-call-flag",
                    "conversation-call-flags", "silent-call"):
        assert feature in features


# --- The real server: an Android call sequence, and a WebRTC call between two peers -------


@pytest.fixture
def served(tmp_path, password_hash):
    """The real server (Waitress, loopback) with alice and bob, no STUN server (offline)."""
    with serve_users(tmp_path, password_hash, stun_servers=(), time_scale=0.1) as url:
        yield url


class App:
    """What a phone app holds: its account's credentials and one cookie jar (Android's
    OkHttp keeps the cookies, iOS's NSURLSession too), speaking form-encoded OCS."""

    def __init__(self, base, user, password="secret"):
        self.base = base
        self.user = user
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"OCS-APIRequest": "true", "Accept": "application/json",
                        "Authorization": f"Basic {raw}"}

    def ocs(self, method, path, form=None, query=None, expect=200):
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(url, body, headers, method=method)
        try:
            with self.opener.open(request, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        assert status == expect, f"{method} {path}: {status} {raw[:200]!r}"
        return json.loads(raw)["ocs"]["data"]


def android_messages(session, fn):
    """`messages` exactly as talk-android's CallActivity builds it: a StringBuilder
    wrapper {"fn": <escaped JSON>, "sessionId", "ev": "message"} in a Java
    List.toString()."""
    wrapper = '{"fn":' + json.dumps(json.dumps(fn, separators=(",", ":"))) + \
        ',"sessionId":' + json.dumps(session) + ',"ev":"message"}'
    return "[" + wrapper + "]"


@pytest.mark.slow
def test_android_call_sequence_replayed(served):
    """talk-android CallActivity against signaling v3 and calls v4, in its order."""
    android, desktop = App(served, "bob"), App(served, "alice")
    token = desktop.ocs("POST", V4 + "/room", {"roomType": 2, "roomName": "Call"}, expect=201)["token"]
    desktop.ocs("POST", V4 + f"/room/{token}/participants", {"newParticipant": "bob"})
    alice_session = desktop.ocs("POST", V4 + f"/room/{token}/participants/active", {})["sessionId"]

    settings = android.ocs("GET", V3 + "/signaling/settings", query={"token": token})
    assert settings["server"] == "" and settings["signalingMode"] == "internal"
    assert settings["stunservers"] == [] and settings["turnservers"] == []
    session = android.ocs("POST", V4 + f"/room/{token}/participants/active", {})["sessionId"]
    android.ocs("POST", V4 + f"/call/{token}", {"flags": 7, "silent": "false"})
    pulled = android.ocs("GET", V3 + f"/signaling/{token}")
    mine = next(u for u in users(pulled) if u["sessionId"] == session)
    assert type(mine["inCall"]) is int and mine["inCall"] == 7  # Android casts it to a long
    peers = android.ocs("GET", V4 + f"/call/{token}")
    assert [p["sessionId"] for p in peers] == [session]

    offer = {"to": alice_session, "type": "offer", "roomType": "video",
             "payload": {"type": "offer", "sdp": "v=0\r\n", "nick": "Bob"}}
    assert android.ocs("POST", V3 + f"/signaling/{token}",
                       {"messages": android_messages(session, offer)}) == []
    (got,) = relayed(desktop.ocs("GET", V3 + f"/signaling/{token}"))
    assert got == {**offer, "from": session}

    android.ocs("DELETE", V4 + f"/call/{token}")
    left = android.ocs("GET", V3 + f"/signaling/{token}")
    assert next(u for u in users(left) if u["sessionId"] == session)["inCall"] == 0
    android.ocs("DELETE", V4 + f"/room/{token}/participants/active")
    android.ocs("GET", V3 + f"/signaling/{token}", expect=404)


def split_candidates(sdp):
    """The SDP without its candidates, and the first m-section's candidates as the apps
    trickle them ({candidate, sdpMid, sdpMLineIndex}; one BUNDLE transport carries all)."""
    lines, candidates, section = [], [], -1
    mid = next(line[len("a=mid:"):] for line in sdp.splitlines() if line.startswith("a=mid:"))
    for line in sdp.splitlines():
        section += line.startswith("m=")
        if line.startswith("a=candidate:"):
            if section == 0:
                candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": 0})
        elif line != "a=end-of-candidates":
            lines.append(line)
    return "\r\n".join(lines) + "\r\n", candidates


class Peer:
    """One phone in the call: its App for HTTP, an aiortc peer connection sending
    audio and video, and the apps' signaling messages in `fn`."""

    FRAMES = 5  # of each kind, received, before the call counts as working

    def __init__(self, app, token, session, other):
        from aiortc import RTCConfiguration, RTCPeerConnection
        from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

        self.app, self.token, self.session, self.other = app, token, session, other
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # loopback only
        self.pc.addTrack(AudioStreamTrack())
        self.pc.addTrack(VideoStreamTrack())
        self.frames = {"audio": 0, "video": 0}
        self.done = asyncio.Event()
        self.consumers = []
        self.pc.on("track", self.on_track)

    def on_track(self, track):
        self.consumers.append(asyncio.ensure_future(self.consume(track)))

    async def consume(self, track):
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self.frames[track.kind] += 1
            if min(self.frames.values()) >= self.FRAMES:
                self.done.set()

    async def send(self, kind, payload):
        fn = {"to": self.other, "type": kind, "roomType": "video", "payload": payload}
        form = {"messages": android_messages(self.session, fn)}
        await asyncio.to_thread(self.app.ocs, "POST", V3 + f"/signaling/{self.token}", form)

    async def describe(self, kind):
        """Send our offer or answer, then its candidates one by one (trickle, as the apps)."""
        sdp, candidates = split_candidates(self.pc.localDescription.sdp)
        await self.send(kind, {"type": kind, "sdp": sdp, "nick": self.app.user})
        for candidate in candidates:
            await self.send("candidate", {"type": "candidate", "candidate": candidate})

    async def offer(self):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self.describe("offer")

    async def handle(self, message):
        from aiortc import RTCSessionDescription
        from aiortc.sdp import candidate_from_sdp

        assert message["from"] == self.other and message["to"] == self.session
        payload = message["payload"]
        if message["type"] in ("offer", "answer"):
            await self.pc.setRemoteDescription(RTCSessionDescription(payload["sdp"], payload["type"]))
            if message["type"] == "offer":
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.describe("answer")
        elif message["type"] == "candidate":
            ice = payload["candidate"]
            candidate = candidate_from_sdp(ice["candidate"].split(":", 1)[1])
            candidate.sdpMid, candidate.sdpMLineIndex = ice["sdpMid"], ice["sdpMLineIndex"]
            await self.pc.addIceCandidate(candidate)

    async def listen(self):
        """Poll signaling v3 and act on what comes, until the call carries media."""
        while not self.done.is_set():
            data = await asyncio.to_thread(self.app.ocs, "GET", V3 + f"/signaling/{self.token}")
            for message in relayed(data):
                await self.handle(message)

    async def close(self):
        for consumer in self.consumers:
            consumer.cancel()
        await self.pc.close()


@pytest.mark.slow
def test_a_webrtc_call_between_two_aiortc_peers_over_signaling_v3(served, monkeypatch):
    import aioice.ice

    # Media stays on 127.0.0.1: aioice leaves loopback out of its host
    # candidates (and CI's namespace has nothing else), so offer only it.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    alice, bob = App(served, "alice"), App(served, "bob")
    token = alice.ocs("POST", V4 + "/room", {"roomType": 2, "roomName": "Call"}, expect=201)["token"]
    alice.ocs("POST", V4 + f"/room/{token}/participants", {"newParticipant": "bob"})
    sessions = {}
    for app in (alice, bob):
        sessions[app.user] = app.ocs("POST", V4 + f"/room/{token}/participants/active", {})["sessionId"]
        app.ocs("POST", V4 + f"/call/{token}", {"flags": 7, "silent": "false"})
    # Each learns the other's session from usersInRoom, as the apps do.
    for app, other in ((alice, "bob"), (bob, "alice")):
        listed = users(app.ocs("GET", V3 + f"/signaling/{token}"))
        assert {u["sessionId"]: u["inCall"] for u in listed}[sessions[other]] == 7

    async def call():
        peers = [Peer(alice, token, sessions["alice"], sessions["bob"]),
                 Peer(bob, token, sessions["bob"], sessions["alice"])]
        listeners = [asyncio.ensure_future(peer.listen()) for peer in peers]
        try:
            await peers[0].offer()
            await asyncio.wait_for(
                asyncio.gather(*(peer.done.wait() for peer in peers)), timeout=60)
            return [dict(peer.frames) for peer in peers]
        finally:
            for listener in listeners:
                listener.cancel()
            for peer in peers:
                await peer.close()

    frames = asyncio.run(call())
    assert all(min(kinds.values()) >= Peer.FRAMES for kinds in frames), frames
    for app in (alice, bob):
        app.ocs("DELETE", V4 + f"/call/{token}")
    assert alice.ocs("GET", V4 + f"/room/{token}")["hasCall"] is False


def test_calls_write_their_system_messages(make_client):
    """call_started, call_joined, call_left and call_ended reach today's chat history."""
    alice = make_client("alice", prefix="/ocs/v2.php/apps/spreed/api/v4")
    bob = make_client("bob", prefix="/ocs/v2.php/apps/spreed/api/v4")
    token = alice.post("/room", {"roomType": 2, "roomName": "Calls"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"})
    for client in (alice, bob):
        client.post(f"/room/{token}/participants/active")
    alice.post(f"/call/{token}", {"flags": 3})
    bob.post(f"/call/{token}", {"flags": 3})
    bob.delete(f"/call/{token}")
    alice.delete(f"/call/{token}")
    history = alice.get(
        f"/chat/{token}", {"lookIntoFuture": 0, "timeout": 0, "limit": 50},
        prefix="/ocs/v2.php/apps/spreed/api/v1",
    ).data
    verbs = [m["systemMessage"] for m in reversed(history) if m["systemMessage"].startswith("call_")]
    assert verbs == ["call_started", "call_joined", "call_left", "call_ended"]
    started = next(m for m in history if m["systemMessage"] == "call_started")
    assert started["messageParameters"]["actor"]["id"] == "alice"
