"""Chat (api-v1.md "Chat", SPEC 6).

GET /chat/{token} long-polls for messages, newest first; POST /chat/{token}
posts one. The app fixture runs with time_scale=0.01: a 30 s long-poll waits
0.3 s of real time, the 60 s cap 0.6 s.
"""

import base64
import hashlib
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import API, PASSWORD, START
from helpers import group_room_with as group_room
from helpers import join, wait_until
from helpers import public_room_with as public_room

import talk_server

# Long-poll waits as the fixture's app scales them (time_scale=0.01).
SCALE = 0.01


# --- Helpers -----------------------------------------------------------------


def send(client, token, message):
    return client.post(f"/chat/{token}", {"message": message}, status=201).data


def receive(client, token, **params):
    """Messages at once (timeout 0 unless given)."""
    params.setdefault("timeout", 0)
    return client.get(f"/chat/{token}", params, status=200).data


def texts(messages):
    return [m["message"] for m in messages]


def post_json(client, token, payload, status=201, ensure_ascii=True):
    """POST /chat/{token} with a JSON body."""
    body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8")
    headers = {**client.headers, "Content-Type": "application/json"}
    response = client.test.post(
        API + f"/chat/{token}", body, headers=headers, status=status, expect_errors=True
    )
    return response.json["ocs"]["data"]


class Background:
    """Run `fn` in a thread; `result()` joins it and returns its value or raises."""

    def __init__(self, fn):
        self.value = self.error = self.finished = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as error:  # handed to the test thread in result()
            self.error = error
        finally:
            self.finished = time.monotonic()

    def result(self, timeout=10):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background request did not finish"
        if self.error is not None:
            raise self.error
        return self.value

    @property
    def elapsed(self):
        return self.finished - self.started


@pytest.fixture
def background():
    """start(fn) runs fn in a thread; every thread started is joined at teardown."""
    started = []

    def start(fn):
        started.append(Background(fn))
        return started[-1]

    yield start
    for waiting in started:
        waiting.thread.join(30)
    assert not any(waiting.thread.is_alive() for waiting in started)


@pytest.fixture
def frozen(app):
    """Long-polls that never time out by themselves: the notifier's clock
    stands still, so a waiting receive answers only when something wakes it."""
    app.talk.notifier.monotonic = lambda: 0.0
    return app.talk.notifier


@pytest.fixture
def asked(app):
    """The waits receives ask the notifier for, in seconds; each times out at
    once (the clock stands still, so the seconds are exactly the timeout)."""
    seconds = []
    app.talk.notifier.monotonic = lambda: 0.0

    def wait(waiter, wait_seconds, cancelled=None):
        seconds.append(wait_seconds)
        return False

    app.talk.notifier.wait = wait
    return seconds


def waiting(notifier, count=1):
    """Until `count` receives wait (so a send or a delete comes after they look)."""
    wait_until(lambda: notifier.waiting >= count, what=f"{count} waiting receives")


# --- POST /chat/{token}: Sending a new chat message -------------------------------


def test_send_answers_201_with_the_created_message(alice, clock):
    token = group_room(alice)
    clock.advance(3)
    response = alice.post(f"/chat/{token}", {"message": "Hello"}, status=201)
    assert response.meta["statuscode"] == 201
    message = response.data
    assert isinstance(message["id"], int)
    assert message == {
        "id": message["id"],
        "token": token,
        "actorType": "users",
        "actorId": "alice",
        "actorDisplayName": "Alice",
        "timestamp": START + 3,
        "message": "Hello",
    }
    assert receive(alice, token) == [message]


def test_sent_message_is_trimmed(alice):
    token = group_room(alice)
    assert send(alice, token, "  \n\thi there \n")["message"] == "hi there"


def test_message_ids_grow(alice, bob):
    token = group_room(alice, bob)
    first = send(alice, token, "one")["id"]
    second = send(bob, token, "two")["id"]
    assert second > first


@pytest.mark.parametrize("message", ["", " ", "   \n\t  ", "\u3000\u00a0"])
def test_empty_or_whitespace_message_is_400(alice, message):
    token = group_room(alice)
    alice.post(f"/chat/{token}", {"message": message}, status=400)
    assert receive(alice, token) == []


def test_missing_message_is_400(alice):
    token = group_room(alice)
    alice.post(f"/chat/{token}", {}, status=400)
    alice.post(f"/chat/{token}", {"other": "x"}, status=400)


def test_message_of_32000_characters_is_accepted_and_32001_is_400(alice):
    token = group_room(alice)
    longest = "a" * 32000
    assert send(alice, token, longest)["message"] == longest
    assert send(alice, token, f"  {longest}  ")["message"] == longest  # trimmed first
    alice.post(f"/chat/{token}", {"message": "a" * 32001}, status=400)
    assert len(receive(alice, token)) == 2


def test_message_length_counts_characters_not_bytes(alice):
    token = group_room(alice)
    emoji = "\U0001f600" * 32000  # 4 bytes in UTF-8, 2 UTF-16 units each
    assert send(alice, token, emoji)["message"] == emoji
    alice.post(f"/chat/{token}", {"message": emoji + "\U0001f600"}, status=400)


def test_member_who_has_not_joined_can_chat(alice, bob):
    token = group_room(alice, bob)
    sent = send(bob, token, "from a member who never joined")
    assert receive(bob, token) == [sent]
    assert receive(alice, token) == [sent]


def test_member_who_left_the_room_can_still_chat(alice, bob):
    token = group_room(alice, bob)
    join(bob, token)
    bob.delete(f"/room/{token}/participants/active", status=200)
    sent = send(bob, token, "still here")
    assert receive(bob, token) == [sent]


def test_chat_of_a_group_room_is_404_for_non_members(alice, carol, guest):
    token = group_room(alice)
    send(alice, token, "private")
    carol.post(f"/chat/{token}", {"message": "hi"}, status=404)
    carol.get(f"/chat/{token}", {"timeout": 0}, status=404)
    guest.post(f"/chat/{token}", {"message": "hi"}, status=404)
    guest.get(f"/chat/{token}", {"timeout": 0}, status=404)


def test_chat_of_an_unknown_room_is_404(alice, guest):
    response = alice.post("/chat/abcdefgh", {"message": "hi"}, status=404)
    assert response.meta["status"] == "failure"
    alice.get("/chat/abcdefgh", {"timeout": 0}, status=404)
    guest.post("/chat/abcdefgh", {"message": "hi"}, status=404)
    guest.get("/chat/abcdefgh", {"timeout": 0}, status=404)


def test_user_who_has_not_joined_a_public_room_gets_404_on_chat(alice, carol):
    token = public_room(alice)
    send(alice, token, "welcome")
    carol.get(f"/room/{token}", status=200)  # may see the room
    carol.post(f"/chat/{token}", {"message": "hi"}, status=404)
    carol.get(f"/chat/{token}", {"timeout": 0}, status=404)


def test_user_who_joined_a_public_room_chats_until_leaving(alice, carol):
    token = public_room(alice)
    join(carol, token)
    sent = send(carol, token, "hi, I followed the link")
    assert sent["actorType"] == "users"
    assert sent["actorId"] == "carol"
    assert sent["actorDisplayName"] == "Carol"
    assert texts(receive(carol, token)) == ["hi, I followed the link"]
    carol.delete(f"/room/{token}/participants/active", status=200)
    carol.post(f"/chat/{token}", {"message": "gone"}, status=404)
    carol.get(f"/chat/{token}", {"timeout": 0}, status=404)


def test_guest_message_author_is_sha1_of_its_session(alice, guest):
    token = public_room(alice)
    session = join(guest, token)
    sent = send(guest, token, "hello from a guest")
    assert sent["actorType"] == "guests"
    assert sent["actorId"] == hashlib.sha1(session.encode()).hexdigest()
    assert sent["actorDisplayName"] == ""
    assert receive(alice, token) == [sent]
    assert receive(guest, token) == [sent]


def test_guest_rejoining_writes_under_its_new_session(alice, guest):
    token = public_room(alice)
    join(guest, token)
    first = send(guest, token, "first")
    session = join(guest, token)
    second = send(guest, token, "second")
    assert second["actorId"] == hashlib.sha1(session.encode()).hexdigest()
    assert second["actorId"] != first["actorId"]


def test_guest_must_join_before_chatting(alice, guest, anonymous):
    token = public_room(alice)
    send(alice, token, "welcome")
    for client in (guest, anonymous):
        client.post(f"/chat/{token}", {"message": "hi"}, status=404)
        client.get(f"/chat/{token}", {"timeout": 0}, status=404)


def test_guest_who_left_cannot_chat(alice, guest):
    token = public_room(alice)
    join(guest, token)
    send(guest, token, "bye")
    guest.delete(f"/room/{token}/participants/active", status=200)
    guest.post(f"/chat/{token}", {"message": "again"}, status=404)
    guest.get(f"/chat/{token}", {"timeout": 0}, status=404)


def test_guest_session_in_one_room_does_not_open_another_rooms_chat(alice, guest):
    joined = public_room(alice)
    other = public_room(alice)
    send(alice, other, "not for you yet")
    join(guest, joined)
    guest.post(f"/chat/{other}", {"message": "hi"}, status=404)
    guest.get(f"/chat/{other}", {"timeout": 0}, status=404)
    assert texts(receive(alice, other)) == ["not for you yet"]
    assert receive(guest, joined) == []


def test_sending_refreshes_last_ping(alice, bob, guest, clock):
    token = public_room(alice, bob)
    bob_session = join(bob, token)
    guest_session = join(guest, token)
    clock.advance(20)
    send(bob, token, "still here")
    send(guest, token, "me too")
    rows = {r["sessionId"]: r for r in alice.get(f"/room/{token}/participants").data}
    assert rows[bob_session]["lastPing"] == START + 20
    assert rows[guest_session]["lastPing"] == START + 20


def test_messages_of_a_deleted_user_have_an_empty_display_name(app, alice, bob):
    token = group_room(alice, bob)
    send(bob, token, "soon gone")
    send(alice, token, "still here")
    with app.talk.db.write() as db:
        talk_server.delete_user(db, "bob")
    old, newest = receive(alice, token)[::-1]
    assert (old["actorType"], old["actorId"], old["actorDisplayName"]) == ("users", "bob", "")
    assert newest["actorDisplayName"] == "Alice"


def test_chat_rejects_wrong_credentials_with_401(alice, wrong_password):
    token = group_room(alice)
    wrong_password.post(f"/chat/{token}", {"message": "hi"}, status=401)
    wrong_password.get(f"/chat/{token}", {"timeout": 0}, status=401)
    assert receive(alice, token) == []


# --- Unicode ----------------------------------------------------------------------


UNICODE_MESSAGES = [
    "Hi \U0001f44b\U0001f3fd \U0001f1e9\U0001f1ea \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001d11e",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd \u2014 \u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u200fRTL mark, then LTR text\u200e",
    "cafe\u0301 a\u0308 n\u0303 Z\u0351\u0354\u0359 \u1100\u1161\u11a8",  # not NFC-normalized
    "\u65e5\u672c\u8a9e \u4e2d\u6587 \ud55c\uad6d\uc5b4 <b>&amp;</b> \"quotes\" 'apostrophes' %20 + =",
]


@pytest.mark.parametrize("text", UNICODE_MESSAGES)
def test_unicode_message_survives_a_form_body(alice, guest, text):
    token = public_room(alice)
    join(guest, token)
    sent = send(alice, token, text)
    assert sent["message"] == text
    assert texts(receive(guest, token)) == [text]


@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize("text", UNICODE_MESSAGES)
def test_unicode_message_survives_a_json_body(alice, guest, text, ensure_ascii):
    token = public_room(alice)
    join(guest, token)
    sent = post_json(guest, token, {"message": text}, ensure_ascii=ensure_ascii)
    assert sent["message"] == text
    assert sent["actorType"] == "guests"
    assert texts(receive(alice, token)) == [text]


def test_json_body_with_an_empty_message_is_400(alice):
    token = group_room(alice)
    post_json(alice, token, {"message": "  "}, status=400)
    post_json(alice, token, {}, status=400)


# --- GET /chat/{token}: Receive chat messages of a room ---------------------------


def test_receive_answers_newest_first(alice, bob, clock):
    token = group_room(alice, bob)
    sent = []
    for i, client in enumerate((alice, bob, alice, bob)):
        sent.append(send(client, token, f"message {i}"))
        clock.advance(1)
    received = receive(bob, token)
    assert received == sent[::-1]
    assert [m["timestamp"] for m in received] == [START + 3, START + 2, START + 1, START]


def test_receive_from_an_empty_room_with_timeout_0_is_empty_at_once(alice, asked):
    token = group_room(alice)
    assert receive(alice, token, timeout=0) == []
    assert asked == []  # no wait at all


def test_timeout_0_answers_at_once_with_what_there_is(alice, asked):
    token = group_room(alice)
    send(alice, token, "one")
    send(alice, token, "two")
    assert texts(receive(alice, token, timeout=0)) == ["two", "one"]
    assert asked == []


def test_offset_skips_the_oldest_messages(alice):
    token = group_room(alice)
    for i in range(5):
        send(alice, token, f"m{i}")
    assert texts(receive(alice, token, offset=0)) == ["m4", "m3", "m2", "m1", "m0"]
    assert texts(receive(alice, token, offset=2)) == ["m4", "m3", "m2"]
    assert texts(receive(alice, token, offset=4)) == ["m4"]
    assert receive(alice, token, offset=5) == []
    assert receive(alice, token, offset=50) == []


def test_not_older_than_timestamp_keeps_strictly_newer_messages(alice, clock):
    token = group_room(alice)
    for i in range(3):
        send(alice, token, f"at +{i * 10}")
        clock.advance(10)
    assert texts(receive(alice, token, notOlderThanTimestamp=START - 1)) == [
        "at +20",
        "at +10",
        "at +0",
    ]
    assert texts(receive(alice, token, notOlderThanTimestamp=START)) == ["at +20", "at +10"]
    assert texts(receive(alice, token, notOlderThanTimestamp=START + 19)) == ["at +20"]
    assert receive(alice, token, notOlderThanTimestamp=START + 20) == []
    # 0 is the default: no filter.
    assert len(receive(alice, token, notOlderThanTimestamp=0)) == 3


def test_offset_counts_within_the_timestamp_filter(alice, clock):
    token = group_room(alice)
    send(alice, token, "old")
    clock.advance(10)
    for i in range(3):
        send(alice, token, f"new {i}")
    received = receive(alice, token, notOlderThanTimestamp=START, offset=1)
    assert texts(received) == ["new 2", "new 1"]


def test_several_messages_in_one_second_keep_their_order(alice, bob):
    token = group_room(alice, bob)
    for i in range(10):
        send(alice if i % 2 else bob, token, str(i))
    assert texts(receive(alice, token)) == [str(i) for i in reversed(range(10))]
    assert texts(receive(alice, token, offset=7)) == ["9", "8", "7"]


@pytest.mark.parametrize("name", ["offset", "timeout", "notOlderThanTimestamp"])
@pytest.mark.parametrize("value", ["abc", "1.5", "-1", "1e3", "0x10", "true", " "])
def test_non_integer_or_negative_receive_parameters_are_400(alice, name, value):
    token = group_room(alice)
    send(alice, token, "hi")
    alice.get(f"/chat/{token}", {"timeout": 0, name: value}, status=400)


def test_receive_without_timeout_waits_the_default_30_seconds(alice, asked):
    token = group_room(alice)
    assert alice.get(f"/chat/{token}", status=200).data == []
    assert asked == pytest.approx([30])


def test_receive_times_out_with_an_empty_list(alice, asked):
    token = group_room(alice)
    send(alice, token, "already read")
    assert receive(alice, token, offset=1, timeout=20) == []
    assert asked == pytest.approx([20])


def test_timeout_is_capped_at_60_seconds(alice, asked):
    token = group_room(alice)
    assert receive(alice, token, timeout=600) == []
    assert receive(alice, token, timeout=60) == []
    assert receive(alice, token, timeout=59) == []
    assert asked == pytest.approx([60, 60, 59])


@pytest.mark.parametrize("form", ["2018", "lookIntoFuture"])
def test_a_waiting_receive_runs_no_sql_while_its_clock_runs(
    app, background, make_client, alice, form
):
    """SPEC 6: a receive waits on the Condition, not in a database poll loop.

    Without real time: the notifier's clock is the test's, and the waits
    check it every millisecond. The clock runs through 50 of the 60 seconds,
    one second a step, and after each step the test lets the receive's
    thread read the clock three times (so a loop that wakes every second has
    woken and looked again): the thread runs no SQL statement at all, then
    the send answers it."""
    token = group_room(alice)
    last = alice.get(
        f"/chat/{token}", {"lookIntoFuture": 0, "timeout": 0}, status=None
    )
    notifier = app.talk.notifier
    notifier.time_scale = 1.0  # the clock below is the only time there is
    notifier.slice_seconds = 0.001
    now = [0.0]
    reads = {}

    def monotonic():
        thread = threading.current_thread()
        reads[thread] = reads.get(thread, 0) + 1
        return now[0]

    notifier.monotonic = monotonic
    receiver = make_client("alice")
    receiver.get("/room")  # credentials checked and cached before the poll
    if form == "2018":
        poll = background(lambda: receive(receiver, token, timeout=60))
    else:
        known = int(last.headers["X-Chat-Last-Given"])
        poll = background(
            lambda: receiver.get(
                f"/chat/{token}",
                {"lookIntoFuture": 1, "timeout": 60, "lastKnownMessageId": known},
                status=200,
            ).data
        )
    waiting(notifier)
    statements = []
    app.talk.db.on_sql = lambda sql: statements.append((threading.current_thread(), sql))
    try:
        for second in range(1, 51):
            now[0] = float(second)
            seen = reads.get(poll.thread, 0)
            wait_until(lambda seen=seen: reads.get(poll.thread, 0) >= seen + 3, what="the clock read")
            assert [sql for thread, sql in statements if thread is poll.thread] == [], second
    finally:
        app.talk.db.on_sql = None
    assert poll.thread.is_alive() and notifier.waiting == 1
    sent = send(make_client("alice"), token, "wake up")
    assert [m["message"] for m in poll.result()] == [sent["message"]]


# The tests of waiting receives freeze the notifier's clock (`frozen`): a
# receive then answers only when woken, so its answer proves the wake-up, and
# each waits until the receive waits (`waiting`) before it acts.


def test_waiting_receive_is_woken_by_a_send(background, make_client, alice, frozen):
    token = group_room(alice)
    receiver = make_client("alice")
    poll = background(lambda: receive(receiver, token, timeout=60))
    waiting(frozen)
    sent = send(make_client("alice"), token, "wake up")
    assert poll.result() == [sent]  # its own timeout never comes: the send woke it


def test_waiting_receive_with_offset_gets_only_the_new_message(
    background, make_client, alice, bob, frozen
):
    token = group_room(alice, bob)
    send(alice, token, "one")
    send(alice, token, "two")
    receiver = make_client("bob")
    poll = background(lambda: receive(receiver, token, offset=2, timeout=60))
    waiting(frozen)
    sent = send(make_client("alice"), token, "three")
    assert poll.result() == [sent]


def test_waiting_guest_is_woken_by_a_user_and_every_waiter_by_one_send(
    background, make_client, alice, guest, other_guest, frozen
):
    token = public_room(alice)
    join(guest, token)
    join(other_guest, token)
    waiters = [
        background(lambda client=client: receive(client, token, timeout=60))
        for client in (guest, other_guest, make_client("alice"))
    ]
    waiting(frozen, 3)
    sent = send(make_client("alice"), token, "everyone")
    for poll in waiters:
        assert poll.result() == [sent]


def test_waiting_user_is_woken_by_a_guest(background, make_client, alice, guest, frozen):
    token = public_room(alice)
    join(guest, token)
    receiver = make_client("alice")
    poll = background(lambda: receive(receiver, token, timeout=60))
    waiting(frozen)
    sent = send(guest, token, "hello from a guest")
    assert poll.result() == [sent]


def test_waiting_receive_ignores_a_message_the_filter_drops(
    app, background, make_client, alice, clock, frozen
):
    token = group_room(alice)
    receiver = make_client("alice")
    since = clock.now
    waits = []
    plain_wait = frozen.wait
    frozen.wait = lambda *args, **kw: (waits.append(1), plain_wait(*args, **kw))[1]
    poll = background(lambda: receive(receiver, token, notOlderThanTimestamp=since, timeout=60))
    wait_until(lambda: frozen.waiting == 1)
    send(make_client("alice"), token, "same second: not newer than the filter")
    wait_until(lambda: len(waits) == 2 and frozen.waiting == 1, what="waiting again")
    assert poll.thread.is_alive()  # woken, nothing for it, waiting on
    frozen.monotonic = lambda: 10.0**9  # now its timeout passes
    assert poll.result() == []


def test_waiting_receive_gets_a_burst_of_sends_in_order(
    background, make_client, alice, bob, frozen
):
    token = group_room(alice, bob)
    send(alice, token, "seen")
    receiver = make_client("bob")
    poll = background(lambda: receive(receiver, token, offset=1, timeout=60))
    waiting(frozen)
    sender = make_client("alice")
    burst = [send(sender, token, f"burst {n}") for n in range(5)]
    answer = poll.result()
    assert answer  # whatever part of the burst it was woken for, newest first, no gaps
    assert answer == list(reversed(burst[: len(answer)]))


def test_member_removed_while_waiting_is_not_handed_the_next_message(
    background, make_client, alice, bob, carol, frozen
):
    """A send's news is only used by waiters whose access nothing changed."""
    token = group_room(alice, bob, carol)
    send(alice, token, "seen")  # so the waiter knows which seq comes next
    receiver = make_client("carol")
    poll = background(
        lambda: receiver.get(f"/chat/{token}", {"offset": 1, "timeout": 60}, status=404)
    )
    waiting(frozen)
    moderator = make_client("alice")
    moderator.delete(f"/room/{token}/participants", {"participant": "carol"}, status=200)
    send(moderator, token, "not for carol")
    assert poll.result().meta["statuscode"] == 404


def test_waiting_receive_is_404_when_the_room_is_deleted(
    background, make_client, alice, bob, frozen
):
    token = group_room(alice, bob)
    receiver = make_client("bob")
    poll = background(lambda: receiver.get(f"/chat/{token}", {"timeout": 60}, status=404))
    waiting(frozen)  # the delete comes after the receive looked
    make_client("alice").delete(f"/room/{token}", status=200)
    assert poll.result().meta["statuscode"] == 404


def test_waiting_guest_is_404_when_the_room_is_deleted(
    background, make_client, alice, guest, frozen
):
    token = public_room(alice)
    join(guest, token)
    poll = background(lambda: guest.get(f"/chat/{token}", {"timeout": 60}, status=404))
    waiting(frozen)
    make_client("alice").delete(f"/room/{token}", status=200)
    assert poll.result().meta["statuscode"] == 404


# --- Cost: receiving does not scan the history ---------------------------------------


def fill(app, token, count):
    """Store `count` messages by alice, ten per second from START."""
    with app.talk.db.write() as db:
        room = talk_server.room_by_token(db, token)
        for i in range(count):
            talk_server.add_message(db, room["id"], "users", "alice", f"m{i}", START + i // 10)
    return room["id"]


def test_receive_at_a_large_offset_returns_only_the_newest(app, alice):
    token = group_room(alice)
    fill(app, token, 3000)
    newest = receive(alice, token, offset=2999)
    assert texts(newest) == ["m2999"]
    assert newest[0]["timestamp"] == START + 299
    assert receive(alice, token, offset=3000) == []
    assert texts(receive(alice, token, offset=2997)) == ["m2999", "m2998", "m2997"]
    recent = receive(alice, token, notOlderThanTimestamp=START + 298, offset=8)
    assert texts(recent) == ["m2999", "m2998"]


def test_receive_queries_use_indexes_not_a_scan(app, alice):
    token = group_room(alice)
    room_id = fill(app, token, 3000)
    with app.talk.db.read() as db:
        for offset, since in ((2999, 0), (0, START + 298), (5, START + 100)):
            statements = []
            db.set_trace_callback(statements.append)
            try:
                _, rows = talk_server.messages_after(db, room_id, offset, since, 1000)
            finally:
                db.set_trace_callback(None)
            assert rows, (offset, since)
            assert statements
            for sql in statements:
                plan = db.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
                details = [row["detail"] for row in plan]
                assert not any(re.match(r"SCAN (messages|m)\b", d) for d in details), (
                    sql,
                    details,
                )
                assert not any("TEMP B-TREE" in d for d in details), (sql, details)
                if "messages" in sql:
                    assert any("USING" in d and "INDEX" in d for d in details), details


def vm_steps(db, fn, every=100):
    """How many times SQLite's VM ran `every` instructions while `fn` ran."""
    steps = 0

    def tick():
        nonlocal steps
        steps += 1
        return 0

    db.set_progress_handler(tick, every)
    try:
        fn()
    finally:
        db.set_progress_handler(None, every)
    return steps


@pytest.mark.parametrize("since", [0, START + 1])
def test_receive_cost_does_not_grow_with_history(app, alice, since):
    """SPEC 6: skipping N messages or filtering by time is an index lookup.

    Reading the newest message of a 3000-message room must cost about what
    it costs in a 30-message room: an index range read of every message (as
    `min(seq)` over `timestamp > since` does) grows with the history.
    """
    # `fill` stamps ten messages a second from START.
    filtered = 0 if since == 0 else (since - START + 1) * 10
    cost = {}
    with app.talk.db.read() as db:
        for count in (30, 3000):
            room_id = fill(app, group_room(alice), count)
            offset = count - filtered - 1  # only the newest message is left

            def read(room_id=room_id, offset=offset, count=count):
                _, rows = talk_server.messages_after(db, room_id, offset, since, 1000)
                assert [row["message"] for row in rows] == [f"m{count - 1}"]

            read()  # warm the page cache
            cost[count] = vm_steps(db, read)
    assert cost[3000] <= 3 * cost[30] + 5, cost


# --- Real HTTP: Waitress threads and the long-poll budget ----------------------------


def http(base, method, path, user=None, params=None, timeout=60):
    """One request to the real server: (HTTP status, OCS data)."""
    url = base + API + path
    body = None
    if params and method == "GET":
        url += "?" + urllib.parse.urlencode(params)
    elif params:
        body = urllib.parse.urlencode(params).encode("utf-8")
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("OCS-APIRequest", "true")
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if user:
        raw = f"{user}:{PASSWORD}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)["ocs"]["data"]
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)["ocs"]["data"]


@pytest.fixture
def served_db(tmp_path, password_hash):
    """A database with alice and bob, ready to be served."""
    path = tmp_path / "served.db"
    app = talk_server.make_app(path)
    with app.talk.db.write() as db:
        talk_server.create_user(db, "alice", password_hash, "Alice")
        talk_server.create_user(db, "bob", password_hash, "Bob")
    app.talk.close()
    return path


def http_room(base):
    """A group room of alice with bob, both logged in once (credentials cached)."""
    status, data = http(base, "POST", "/room", "alice", {"roomType": 2, "roomName": "Live"})
    assert status == 201
    token = data["token"]
    status, _ = http(
        base, "POST", f"/room/{token}/participants", "alice", {"newParticipant": "bob"}
    )
    assert status == 200
    assert http(base, "GET", f"/room/{token}", "bob")[0] == 200
    return token


@pytest.mark.slow
def test_real_http_waiting_receive_is_woken_by_a_send(background, served_db):
    with talk_server.serve_in_thread(served_db, threads=8, reserve=2, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # a poll ends only when woken
        token = http_room(base)
        poll = background(lambda: http(base, "GET", f"/chat/{token}", "bob", {"timeout": 30}))
        waiting(notifier)
        status, sent = http(base, "POST", f"/chat/{token}", "alice", {"message": "over HTTP"})
        assert status == 201
        assert poll.result(timeout=40) == (200, [sent])


@pytest.mark.slow
def test_real_http_receive_over_the_waiting_budget_is_held_without_a_thread(background, served_db):
    """threads=4, reserve=2: two polls may wait; a third is held back (no thread,
    no answer) until one of them ends, while a send is still served at once."""
    with talk_server.serve_in_thread(served_db, threads=4, reserve=2, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # polls end only when woken
        token = http_room(base)
        polls = [
            background(lambda: http(base, "GET", f"/chat/{token}", "bob", {"timeout": 10}))
            for _ in range(3)
        ]
        waiting(notifier, 2)  # two wait; the third is held, costing no thread
        assert all(p.finished is None for p in polls), "nobody answers before a message"
        # Served by the reserve while both slots wait (else this would hang).
        status, sent = http(base, "POST", f"/chat/{token}", "alice", {"message": "now"})
        assert status == 201
        for p in polls:  # the two waiting, then the held one once a slot is free
            assert p.result(timeout=30) == (200, [sent])


@pytest.mark.slow
def test_real_http_send_is_prompt_with_more_waiting_receivers_than_threads(background, served_db):
    receivers = 12

    def poll_until_message(base, token, polls):
        for attempt in range(1, 6):
            status, data = http(base, "GET", f"/chat/{token}", "bob", {"timeout": 10})
            assert status == 200
            polls.append(attempt)
            if data:
                return data
        return []

    with talk_server.serve_in_thread(served_db, threads=8, reserve=2, time_scale=1.0) as base:
        notifier = base.app.talk.notifier
        notifier.monotonic = lambda: 0.0  # polls end only when woken
        token = http_room(base)
        polls = [[] for _ in range(receivers)]
        pollers = [background(lambda p=p: poll_until_message(base, token, p)) for p in polls]
        waiting(notifier, 6)  # six wait, six are held back without a thread
        status, sent = http(base, "POST", f"/chat/{token}", "alice", {"message": "to all"})
        assert status == 201  # served by the reserve
        results = [p.result(timeout=30) for p in pollers]
        assert results == [[sent]] * receivers
        assert max(len(p) for p in polls) == 1, f"a receiver had to poll again: {polls}"


@pytest.mark.slow
def test_real_http_poll_of_a_client_that_hangs_up_stops_waiting(served_db):
    """Waitress reads one request ahead, so it sees the hang-up; the wait ends
    within its one-second slice instead of holding a thread for 30 s."""
    with talk_server.serve_in_thread(served_db, threads=8, reserve=2, time_scale=1.0) as base:
        token = http_room(base)
        notifier = base.app.talk.notifier
        raw = f"bob:{PASSWORD}".encode()
        request = (
            f"GET {API}/chat/{token}?timeout=30 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nOCS-APIRequest: true\r\nAccept: application/json\r\n"
            f"Authorization: Basic {base64.b64encode(raw).decode()}\r\n\r\n"
        ).encode()
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(request)
            assert until(lambda: notifier.waiting == 1), "the poll never started waiting"
        assert until(lambda: notifier.waiting == 0, seconds=4), "the poll outlived its client"


def until(condition, seconds=3.0):
    """Poll `condition` every 20 ms for up to `seconds`; its last value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()
