"""Today's chat (issue 12, today-api.md 6): receive with lookIntoFuture, send with
referenceId/replyTo/silent, the full message object, system messages written by
the operations, mentions, read markers, edit/delete/clear/context, reactions,
polls and message expiration. The 2018 receive is tests/test_chat.py's."""

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import API, PASSWORD, START
from helpers import join

import talk_server

V4 = "/ocs/v2.php/apps/spreed/api/v4"

# Every key openapi.json marks required on a ChatMessage, with its JSON type.
MESSAGE_FIELDS = {
    "id": int, "token": str, "actorType": str, "actorId": str, "actorDisplayName": str,
    "timestamp": int, "message": str, "messageType": str, "systemMessage": str,
    "isReplyable": bool, "referenceId": str, "markdown": bool, "expirationTimestamp": int,
}


def team(alice, *users):
    """A group conversation of alice with `users` (ids) added."""
    token = alice.post("/room", {"roomType": 2, "roomName": "Team"}, status=201).data["token"]
    for user in users:
        alice.post(f"/room/{token}/participants", {"newParticipant": user})
    return token


def send(client, token, message, status=201, **params):
    return client.post(f"/chat/{token}", {"message": message, **params}, status=status).data


def post_json(client, path, payload, status=200, method="POST"):
    headers = {**client.headers, "Content-Type": "application/json"}
    call = client.test.post_json if method == "POST" else client.test.put_json
    response = call(API + path, payload, headers=headers, status=status, expect_errors=True)
    return response.json["ocs"]["data"] if response.body else None


def checked(response, status):
    """webtest lets a 304 pass any expected status: check it here."""
    if status is not None:
        assert response.status_int == status, (response.status, response.body[:200])
    return response


def history(client, token, status=200, **params):
    params = {"lookIntoFuture": 0, "timeout": 0, **params}
    return checked(client.get(f"/chat/{token}", params, status=None), status)


def future(client, token, known, status=200, **params):
    params = {"lookIntoFuture": 1, "timeout": 0, "lastKnownMessageId": known, **params}
    return checked(client.get(f"/chat/{token}", params, status=None), status)


def comments(messages):
    return [m["message"] for m in messages if m["messageType"] == "comment"]


def verbs(messages):
    return [m["systemMessage"] for m in messages if m["messageType"] == "system"]


def all_messages(client, token):
    """The whole history, oldest first."""
    return list(reversed(history(client, token, limit=200).data))


def room4(client, token):
    return client.get(f"/room/{token}", prefix=V4).data


def assert_message_shape(message):
    missing = sorted(set(MESSAGE_FIELDS) - set(message))
    assert not missing, f"message lacks {missing}"
    wrong = {k: message[k] for k, kind in MESSAGE_FIELDS.items() if type(message[k]) is not kind}
    assert not wrong, wrong
    assert isinstance(message["messageParameters"], dict | list)
    assert isinstance(message["reactions"], dict | list)


# --- Receive: history and the future by id -------------------------------------------


def test_history_is_newest_first_with_last_given(alice):
    token = team(alice)
    sent = [send(alice, token, f"m{i}", referenceId=f"r{i}") for i in range(3)]
    response = history(alice, token, limit=2)
    assert comments(response.data) == ["m2", "m1"]
    assert response.headers["X-Chat-Last-Given"] == str(sent[1]["id"])
    older = history(alice, token, lastKnownMessageId=sent[1]["id"]).data
    assert comments(older) == ["m0"]
    assert verbs(older) == ["conversation_created"]


def test_history_and_future_page_a_thousand_messages_without_gap_or_repeat(app, alice):
    token = team(alice)
    with app.talk.db.write() as db:
        room = talk_server.room_by_token(db, token)
        for i in range(1000):
            talk_server.add_message(db, room["id"], "users", "alice", f"m{i}", START)
    seen, known = [], 0
    while True:
        response = history(alice, token, lastKnownMessageId=known, limit=200,
                           status=None)
        if response.status_int == 304:
            break
        seen += response.data
        known = int(response.headers["X-Chat-Last-Given"])
    texts = [m["message"] for m in seen if m["messageType"] == "comment"]
    assert texts == [f"m{i}" for i in reversed(range(1000))]
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids)) == 1001
    forward, known = [], 0
    while True:
        response = future(alice, token, known, limit=150, setReadMarker=0, status=None)
        if response.status_int == 304:
            break
        forward += response.data
        known = int(response.headers["X-Chat-Last-Given"])
    assert [m["id"] for m in forward] == sorted(ids)


def test_include_last_known(alice):
    token = team(alice)
    one = send(alice, token, "one", referenceId="x")
    two = send(alice, token, "two", referenceId="y")
    assert comments(future(alice, token, one["id"], includeLastKnown=1).data) == ["one", "two"]
    assert comments(history(alice, token, lastKnownMessageId=two["id"], includeLastKnown=1).data) == [
        "two", "one"]


def test_nothing_new_is_304_with_an_empty_body(alice):
    token = team(alice)
    last = send(alice, token, "hi", referenceId="x")
    response = future(alice, token, last["id"], status=304)
    assert response.body == b""
    first = all_messages(alice, token)[0]
    assert history(alice, token, lastKnownMessageId=first["id"], status=304).body == b""


def test_timed_out_future_poll_is_304(alice):
    token = team(alice)
    last = send(alice, token, "hi", referenceId="x")
    response = future(alice, token, last["id"], timeout=5, status=304)
    assert response.body == b""


def test_future_poll_waits_the_default_30_seconds_and_at_most_60(app, alice):
    """SPEC 11: today's receive waits 30 s without a timeout, and never more
    than 60. The notifier's wait is replaced by one that records the seconds
    asked for and times out at once. The receive measures its deadline on
    real time scaled by time_scale: at 10**6 a second of real time is a
    microsecond of the wait, so the seconds asked are the timeout itself."""
    token = team(alice)
    last = send(alice, token, "hi", referenceId="x")
    asked = []
    app.talk.notifier.time_scale = 10**6
    app.talk.notifier.wait = lambda waiter, seconds, cancelled=None: asked.append(seconds)
    plain = {"lookIntoFuture": 1, "lastKnownMessageId": last["id"]}
    checked(alice.get(f"/chat/{token}", plain, status=None), 304)
    for timeout in (600, 61, 60, 59):
        future(alice, token, last["id"], timeout=timeout, status=304)
    assert asked == pytest.approx([30, 60, 60, 60, 59], abs=0.001)


def test_common_read_answers_200_when_it_changed(alice, bob):
    token = team(alice, "bob")
    last = send(alice, token, "hi", referenceId="x")
    response = future(alice, token, last["id"], lastCommonReadId=999)
    assert response.data == []
    assert future(alice, token, last["id"], status=304,
                  lastCommonReadId=response.headers["X-Chat-Last-Common-Read"]).body == b""
    assert "X-Chat-Last-Common-Read" in response.headers


def test_limit_is_clamped_to_200(app, alice):
    token = team(alice)
    with app.talk.db.write() as db:
        room = talk_server.room_by_token(db, token)
        for i in range(250):
            talk_server.add_message(db, room["id"], "users", "alice", f"m{i}", START)
    assert len(history(alice, token, limit=1000).data) == 200
    assert len(history(alice, token, limit=0).data) == 1


def test_lobby_is_412_for_modern_receive(alice, bob):
    token = team(alice, "bob")
    alice.put(f"/room/{token}/webinar/lobby", {"state": 1}, prefix=V4)
    history(bob, token, status=412)
    future(bob, token, 0, status=412)
    history(alice, token)


def test_non_members_get_404(alice, carol, guest):
    token = team(alice)
    history(carol, token, status=404)
    history(guest, token, status=404)


def test_future_long_poll_is_woken_by_a_send(app, make_client, alice):
    token = team(alice, "bob")
    last = send(alice, token, "before", referenceId="a")
    bob = make_client("bob")
    result = {}

    def wait():
        result["response"] = future(bob, token, last["id"], timeout=60)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for_waiter(app)
    sent = send(make_client("alice"), token, "wake up", referenceId="b")
    thread.join(10)
    assert [m["id"] for m in result["response"].data] == [sent["id"]]
    assert result["response"].data[0]["referenceId"] == "b"


def wait_for_waiter(app, count=1):
    deadline = time.monotonic() + 5
    while app.talk.notifier.waiting < count:
        assert time.monotonic() < deadline, "nobody waits"
        time.sleep(0.005)


def test_future_long_poll_is_woken_by_a_system_message(app, make_client, alice):
    token = team(alice, "bob")
    known = all_messages(alice, token)[-1]["id"]
    bob = make_client("bob")
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("r", future(bob, token, known, timeout=60)))
    thread.start()
    wait_for_waiter(app)
    alice.put(f"/room/{token}", {"roomName": "Renamed"}, prefix=V4)
    thread.join(10)
    assert verbs(result["r"].data) == ["conversation_renamed"]


def test_future_sets_the_read_marker_to_the_last_known(alice, bob):
    token = team(alice, "bob")
    sent = [send(alice, token, f"m{i}", referenceId=str(i)) for i in range(3)]
    assert room4(bob, token)["unreadMessages"] == 3
    future(bob, token, sent[1]["id"])
    assert room4(bob, token)["unreadMessages"] == 1
    assert room4(bob, token)["lastReadMessage"] == sent[1]["id"]
    future(bob, token, sent[2]["id"], setReadMarker=0, status=304)
    assert room4(bob, token)["unreadMessages"] == 1


def test_modern_receive_waits_only_looking_into_the_future_with_a_timeout():
    waits = talk_server.chat_receive.waits
    assert waits({"lookIntoFuture": "1"}) and waits({"lookIntoFuture": "1", "timeout": "30"})
    assert not waits({"lookIntoFuture": "1", "timeout": "0"})
    assert not waits({"lookIntoFuture": "0"})
    assert not waits({"lookIntoFuture": "0", "timeout": "30"})
    assert waits({}) and not waits({"timeout": "0"})


def test_bad_parameters_are_400(alice):
    token = team(alice)
    alice.get(f"/chat/{token}", {"lookIntoFuture": 2}, status=400)
    alice.get(f"/chat/{token}", {"lookIntoFuture": 0, "lastKnownMessageId": "x"}, status=400)


# --- The 2018 receive does not see today's messages ------------------------------------


def test_2018_receive_shows_comments_only_and_offsets_keep_counting(alice, bob):
    token = team(alice, "bob")
    send(alice, token, "one")
    alice.post(f"/room/{token}/moderators", {"participant": "bob"})
    two = send(alice, token, "two", referenceId="r")
    poll = post_json(alice, f"/poll/{token}", {"question": "Q?", "options": ["a", "b"]}, 201)
    assert poll["question"] == "Q?"
    alice.post(f"/reaction/{token}/{two['id']}", {"reaction": "👍"}, status=201)
    send(alice, token, "three")
    old = alice.get(f"/chat/{token}", {"timeout": 0}).data
    assert [m["message"] for m in old] == ["three", "two", "one"]
    assert set(old[0]) == {"id", "token", "actorType", "actorId", "actorDisplayName",
                           "timestamp", "message"}
    assert [m["message"] for m in alice.get(f"/chat/{token}", {"timeout": 0, "offset": 2}).data] == [
        "three"]
    alice.delete(f"/chat/{token}/{two['id']}")
    assert [m["message"] for m in alice.get(f"/chat/{token}", {"timeout": 0}).data] == [
        "three", "one"]
    assert [m["message"] for m in alice.get(f"/chat/{token}", {"timeout": 0, "offset": 2}).data] == [
        "three"]


def test_2018_waiting_receive_is_not_woken_by_system_messages(app, make_client, alice):
    token = team(alice, "bob")
    bob = make_client("bob")
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("r", bob.get(f"/chat/{token}", {"timeout": 60}).data))
    thread.start()
    wait_for_waiter(app)
    alice.put(f"/room/{token}", {"roomName": "Renamed"}, prefix=V4)
    sent = send(make_client("alice"), token, "real news")
    thread.join(10)
    assert [m["message"] for m in result["r"]] == ["real news"]
    assert result["r"][0]["id"] == sent["id"]


# --- Send ------------------------------------------------------------------------------


def test_send_echoes_reference_id_and_answers_the_full_message(alice):
    token = team(alice)
    message = send(alice, token, "Hello", referenceId="a" * 64)
    assert_message_shape(message)
    assert message["referenceId"] == "a" * 64
    assert (message["messageType"], message["systemMessage"], message["isReplyable"]) == (
        "comment", "", True)
    assert message["messageParameters"] == [] and message["reactions"] == []
    assert history(alice, token).data[0]["referenceId"] == "a" * 64
    send(alice, token, "Hello", status=400, referenceId="a" * 65)


def test_reply_has_its_parent(alice, bob):
    token = team(alice, "bob")
    question = send(alice, token, "Question?", referenceId="q")
    answer = send(bob, token, "Answer", replyTo=question["id"], referenceId="a")
    assert answer["parent"]["id"] == question["id"]
    assert answer["parent"]["message"] == "Question?"
    assert "parent" not in answer["parent"]
    assert history(alice, token).data[0]["parent"]["id"] == question["id"]
    alice.delete(f"/chat/{token}/{question['id']}")
    reply = [m for m in history(alice, token).data if m["id"] == answer["id"]][0]
    assert reply["parent"] == {"id": question["id"], "deleted": True}


def test_reply_to_a_system_message_or_another_room_is_400(alice):
    token = team(alice)
    other = team(alice)
    created = all_messages(alice, token)[0]
    send(alice, token, "x", status=400, replyTo=created["id"])
    elsewhere = send(alice, other, "elsewhere", referenceId="e")
    send(alice, token, "x", status=400, replyTo=elsewhere["id"])
    send(alice, token, "x", status=400, replyTo=999999)


def test_modern_send_over_the_limit_is_413(alice):
    token = team(alice)
    send(alice, token, "m" * 32001, status=413, referenceId="x")
    send(alice, token, "m" * 32001, status=400)  # the 2018 form keeps its 400


def test_silent_message(alice):
    token = team(alice)
    assert send(alice, token, "psst", silent="true", referenceId="s")["silent"] is True


def test_read_only_and_chat_permission_are_403(alice, bob):
    token = team(alice, "bob")
    alice.put(f"/room/{token}/read-only", {"state": 1}, prefix=V4)
    send(bob, token, "x", status=403, referenceId="x")
    alice.put(f"/room/{token}/read-only", {"state": 0}, prefix=V4)
    alice.put(f"/room/{token}/permissions/default", {"permissions": 2}, prefix=V4)
    send(bob, token, "x", status=403, referenceId="x")


def test_guest_sends_with_a_display_name(alice, guest):
    token = alice.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data["token"]
    room = guest.post(f"/room/{token}/participants/active", prefix=V4).data
    message = send(guest, token, "hi", actorDisplayName="Visitor", referenceId="g")
    assert (message["actorType"], message["actorId"]) == ("guests", room["actorId"])
    assert message["actorDisplayName"] == "Visitor"
    assert history(alice, token).data[0]["actorDisplayName"] == "Visitor"


def test_last_message_of_the_room_is_the_full_message(alice, bob):
    token = team(alice, "bob")
    room = room4(bob, token)
    assert room["lastMessage"]["systemMessage"] == "user_added"
    send(alice, token, "latest", referenceId="l")
    last = room4(bob, token)["lastMessage"]
    assert_message_shape(last)
    assert last["message"] == "latest" and "parent" not in last


# --- System messages -------------------------------------------------------------------


def test_each_operation_writes_its_system_message(alice, bob, carol, clock, v4):
    a = v4("alice")
    token = a.post("/room", {"roomType": 2, "roomName": "Team"}, status=201).data["token"]
    a.post(f"/room/{token}/participants", {"newParticipant": "bob"})
    a.post(f"/room/{token}/participants", {"newParticipant": "carol"})
    a.put(f"/room/{token}", {"roomName": "New name"})
    a.put(f"/room/{token}/description", {"description": "About"})
    a.put(f"/room/{token}/description", {"description": ""})
    bob_id = next(r["attendeeId"] for r in a.get(f"/room/{token}/participants").data
                  if r["actorId"] == "bob")
    a.post(f"/room/{token}/moderators", {"attendeeId": bob_id})
    a.delete(f"/room/{token}/moderators", {"attendeeId": bob_id})
    a.post(f"/room/{token}/public")
    a.put(f"/room/{token}/password", {"password": "secret-pw"})
    a.put(f"/room/{token}/password", {"password": ""})
    a.delete(f"/room/{token}/public")
    a.put(f"/room/{token}/read-only", {"state": 1})
    a.put(f"/room/{token}/read-only", {"state": 0})
    a.put(f"/room/{token}/webinar/lobby", {"state": 1})
    a.put(f"/room/{token}/webinar/lobby", {"state": 0})
    a.put(f"/room/{token}/listable", {"scope": 1})
    a.post(f"/room/{token}/message-expiration", {"seconds": 3600})
    a.post(f"/room/{token}/message-expiration", {"seconds": 0})
    carol_id = next(r["attendeeId"] for r in a.get(f"/room/{token}/participants").data
                    if r["actorId"] == "carol")
    a.delete(f"/room/{token}/attendees", {"attendeeId": carol_id})
    v4("bob").delete(f"/room/{token}/participants/self")
    messages = all_messages(alice, token)
    assert verbs(messages) == [
        "conversation_created", "user_added", "user_added", "conversation_renamed",
        "description_set", "description_removed", "moderator_promoted", "moderator_demoted",
        "guests_allowed", "password_set", "password_removed", "guests_disallowed",
        "read_only", "read_only_off", "lobby_non_moderators", "lobby_none", "listable_users",
        "message_expiration_enabled", "message_expiration_disabled", "user_removed",
        "user_removed",
    ]
    renamed = messages[3]
    assert renamed["message"] == '{actor} renamed the conversation from "Team" to "New name"'
    assert renamed["messageParameters"]["actor"] == {"type": "user", "id": "alice", "name": "Alice"}
    assert renamed["isReplyable"] is False
    added = messages[1]
    assert added["messageParameters"]["user"]["id"] == "bob"
    assert messages[-1]["message"] == "{user} left the conversation"
    for message in messages:
        assert_message_shape(message)


def test_system_messages_count_for_activity_not_for_unread(alice, bob, clock):
    token = team(alice, "bob")
    before = room4(bob, token)
    clock.advance(10)
    alice.put(f"/room/{token}", {"roomName": "Renamed"}, prefix=V4)
    after = room4(bob, token)
    assert after["unreadMessages"] == 0
    assert after["lastActivity"] == before["lastActivity"] + 10
    assert after["lastMessage"]["systemMessage"] == "conversation_renamed"


def test_self_joined_user_writes_joined(alice, carol):
    token = alice.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data["token"]
    join(carol, token)
    last = all_messages(alice, token)[-1]
    assert (last["systemMessage"], last["actorId"]) == ("user_added", "carol")
    assert last["message"] == "{actor} joined the conversation"


def test_2018_routes_write_system_messages_too(alice, bob):
    token = alice.post("/room", {"roomType": 2, "roomName": "Old"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"})
    alice.put(f"/room/{token}", {"roomName": "Older"})
    assert verbs(all_messages(alice, token)) == [
        "conversation_created", "user_added", "conversation_renamed"]


# --- Mentions --------------------------------------------------------------------------


def test_mention_raises_unread_mention_for_the_mentioned_user_only(alice, bob, carol):
    token = team(alice, "bob", "carol")
    message = send(alice, token, "Hi @bob and @\"carol\", see @nobody", referenceId="m")
    assert message["message"] == "Hi {mention-user1} and {mention-user2}, see @nobody"
    assert message["messageParameters"]["mention-user1"] == {
        "type": "user", "id": "bob", "name": "Bob"}
    bob_room, carol_room = room4(bob, token), room4(carol, token)
    assert bob_room["unreadMention"] and bob_room["unreadMentionDirect"]
    assert carol_room["unreadMention"]
    assert not room4(alice, token)["unreadMention"]
    send(alice, token, "just text", referenceId="n")
    alice.post(f"/chat/{token}/read")
    bob.post(f"/chat/{token}/read")
    assert not room4(bob, token)["unreadMention"]


def test_mention_with_trailing_punctuation(alice, bob):
    token = team(alice, "bob")
    assert send(alice, token, "thanks @bob.", referenceId="t")["message"] == "thanks {mention-user1}."


def test_at_all_mentions_everyone_but_not_directly(alice, bob):
    token = team(alice, "bob")
    message = send(alice, token, "@all meeting", referenceId="a")
    assert message["message"] == "{mention-call1} meeting"
    assert message["messageParameters"]["mention-call1"]["type"] == "call"
    room = room4(bob, token)
    assert room["unreadMention"] and not room["unreadMentionDirect"]


def test_2018_receive_shows_mentions_as_typed(alice, bob):
    token = team(alice, "bob")
    send(alice, token, "hey @bob", referenceId="x")
    assert alice.get(f"/chat/{token}", {"timeout": 0}).data[0]["message"] == "hey @bob"


def test_mention_autocomplete(alice, bob, carol):
    token = team(alice, "bob", "carol")
    found = alice.get(f"/chat/{token}/mentions", {"search": "b"}).data
    assert [(m["id"], m["source"]) for m in found] == [("bob", "users")]
    ids = {m["id"] for m in alice.get(f"/chat/{token}/mentions", {"search": ""}).data}
    assert ids == {"all", "bob", "carol"}


# --- Read markers ----------------------------------------------------------------------


def test_read_markers_move_unread_counts(alice, bob):
    token = team(alice, "bob")
    sent = [send(alice, token, f"m{i}", referenceId=str(i)) for i in range(4)]
    assert room4(bob, token)["unreadMessages"] == 4
    room = bob.post(f"/chat/{token}/read", {"lastReadMessage": sent[1]["id"]}).data
    assert (room["unreadMessages"], room["lastReadMessage"]) == (2, sent[1]["id"])
    assert bob.post(f"/chat/{token}/read").data["unreadMessages"] == 0
    room = bob.delete(f"/chat/{token}/read").data
    assert room["unreadMessages"] == 1 and room["lastReadMessage"] == sent[2]["id"]
    assert room4(alice, token)["unreadMessages"] == 0  # own messages are read


def test_last_common_read(alice, bob):
    token = team(alice, "bob")
    one = send(alice, token, "one", referenceId="1")
    assert room4(alice, token)["lastCommonReadMessage"] < one["id"]
    bob.post(f"/chat/{token}/read")
    assert room4(alice, token)["lastCommonReadMessage"] == one["id"]
    response = bob.post(f"/chat/{token}/read")
    assert response.headers["X-Chat-Last-Common-Read"] == str(one["id"])


def test_guest_read_marker(alice, guest):
    token = alice.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data["token"]
    guest.post(f"/room/{token}/participants/active", prefix=V4)
    send(alice, token, "hello guest", referenceId="h")
    assert room4(guest, token)["unreadMessages"] == 1
    assert guest.post(f"/chat/{token}/read").data["unreadMessages"] == 0


def test_new_members_start_with_nothing_unread(alice, bob):
    token = team(alice)
    send(alice, token, "before bob", referenceId="b")
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"})
    assert room4(bob, token)["unreadMessages"] == 0


# --- Edit, delete, clear, context ------------------------------------------------------


def test_edit_own_message(alice, bob, clock):
    token = team(alice, "bob")
    message = send(bob, token, "typo", referenceId="t")
    clock.advance(60)
    answer = post_json(bob, f"/chat/{token}/{message['id']}", {"message": "fixed @alice"},
                       method="PUT")
    assert answer["systemMessage"] == "message_edited"
    assert answer["parent"]["message"] == "fixed {mention-user1}"
    assert answer["parent"]["lastEditTimestamp"] == START + 60
    assert answer["parent"]["lastEditActorId"] == "bob"
    assert room4(alice, token)["unreadMentionDirect"]
    assert [m for m in history(alice, token).data if m["id"] == message["id"]][0][
        "message"] == "fixed {mention-user1}"


def test_edit_rules(alice, bob, carol, clock):
    token = team(alice, "bob", "carol")
    message = send(bob, token, "mine", referenceId="m")
    carol.put(f"/chat/{token}/{message['id']}", {"message": "hijack"}, status=403)
    alice.put(f"/chat/{token}/{message['id']}", {"message": "moderated"}, status=200)
    bob.put(f"/chat/{token}/{message['id']}", {"message": ""}, status=400)
    created = all_messages(alice, token)[0]
    alice.put(f"/chat/{token}/{created['id']}", {"message": "x"}, status=405)
    alice.put(f"/chat/{token}/999999", {"message": "x"}, status=404)
    alice.put(f"/chat/{token}/abc", {"message": "x"}, status=404)
    clock.advance(24 * 3600 + 1)
    bob.put(f"/chat/{token}/{message['id']}", {"message": "late"}, status=400)


def test_delete_own_message_leaves_a_placeholder(alice, bob, clock):
    token = team(alice, "bob")
    message = send(bob, token, "oops", referenceId="o")
    answer = bob.delete(f"/chat/{token}/{message['id']}").data
    assert answer["systemMessage"] == "message_deleted"
    assert answer["parent"]["messageType"] == "comment_deleted"
    assert answer["parent"]["id"] == message["id"]
    stored = [m for m in history(alice, token).data if m["id"] == message["id"]][0]
    assert stored["messageType"] == "comment_deleted"
    assert stored["message"] == "Message deleted by {actor}"
    assert stored["isReplyable"] is False
    bob.delete(f"/chat/{token}/{message['id']}", status=405)


def test_delete_rules(alice, bob, carol, clock):
    token = team(alice, "bob", "carol")
    message = send(bob, token, "mine", referenceId="m")
    carol.delete(f"/chat/{token}/{message['id']}", status=403)
    clock.advance(6 * 3600 + 1)
    bob.delete(f"/chat/{token}/{message['id']}", status=400)
    one = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201).data["token"]
    theirs = send(bob, one, "private", referenceId="p")
    alice.delete(f"/chat/{one}/{theirs['id']}", status=403)  # no moderation in one-to-one


def test_clear_history(alice, bob):
    token = team(alice, "bob")
    send(alice, token, "one", referenceId="1")
    bob.delete(f"/chat/{token}", status=403)
    answer = alice.delete(f"/chat/{token}").data
    assert answer["systemMessage"] == "history_cleared"
    assert [m["systemMessage"] for m in history(alice, token).data] == ["history_cleared"]
    assert alice.get(f"/chat/{token}", {"timeout": 0}).data == []
    assert room4(bob, token)["unreadMessages"] == 0
    send(alice, token, "after", referenceId="a")
    assert [m["message"] for m in bob.get(f"/chat/{token}", {"timeout": 0}).data] == ["after"]


def test_context_of_a_message(alice):
    token = team(alice)
    sent = [send(alice, token, f"m{i}", referenceId=str(i)) for i in range(10)]
    context = alice.get(f"/chat/{token}/{sent[5]['id']}/context", {"limit": 2})
    assert [m["message"] for m in context.data] == ["m3", "m4", "m5", "m6", "m7"]
    assert context.headers["X-Chat-Last-Given"] == str(sent[3]["id"])


# --- Reactions -------------------------------------------------------------------------


def test_reactions_end_to_end(alice, bob):
    token = team(alice, "bob")
    message = send(alice, token, "react to me", referenceId="r")
    first = bob.post(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}, status=201).data
    assert [r["actorId"] for r in first["👍"]] == ["bob"]
    bob.post(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}, status=200)
    alice.post(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}, status=201)
    alice.post(f"/reaction/{token}/{message['id']}", {"reaction": "🎉"}, status=201)
    seen = [m for m in history(bob, token).data if m["id"] == message["id"]][0]
    assert seen["reactions"] == {"👍": 2, "🎉": 1}
    assert seen["reactionsSelf"] == ["👍"]
    listed = alice.get(f"/reaction/{token}/{message['id']}", {"reaction": "🎉"}).data
    assert list(listed) == ["🎉"]
    assert bob.delete(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}).data["👍"][0][
        "actorId"] == "alice"
    bob.delete(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}, status=404)
    hidden = [m for m in history(alice, token).data if m["messageType"] == "system"]
    assert {"reaction", "reaction_revoked"} <= {m["systemMessage"] for m in hidden}
    assert room4(alice, token)["lastMessage"]["message"] == "react to me"


def test_reaction_rules(alice, bob, carol):
    token = team(alice, "bob")
    message = send(alice, token, "x", referenceId="x")
    bob.post(f"/reaction/{token}/{message['id']}", {"reaction": "abc"}, status=400)
    bob.post(f"/reaction/{token}/{message['id']}", {"reaction": ""}, status=400)
    carol.post(f"/reaction/{token}/{message['id']}", {"reaction": "👍"}, status=404)
    bob.post(f"/reaction/{token}/999999", {"reaction": "👍"}, status=404)
    created = all_messages(alice, token)[0]
    bob.post(f"/reaction/{token}/{created['id']}", {"reaction": "👍"}, status=400)


# --- Polls -----------------------------------------------------------------------------


def test_public_poll_end_to_end(alice, bob):
    token = team(alice, "bob")
    poll = post_json(alice, f"/poll/{token}",
                     {"question": "Lunch?", "options": ["Pizza", "Sushi"], "maxVotes": 1}, 201)
    assert (poll["status"], poll["resultMode"], poll["votedSelf"]) == (0, 0, [])
    assert "votes" not in poll
    shown = history(bob, token).data[0]
    assert shown["message"] == "{object}"
    assert shown["messageParameters"]["object"] == {
        "type": "talk-poll", "id": str(poll["id"]), "name": "Lunch?"}
    voted = post_json(bob, f"/poll/{token}/{poll['id']}", {"optionIds": [1]})
    assert voted["votedSelf"] == [1] and voted["votes"] == {"option-1": 1}
    voted = post_json(bob, f"/poll/{token}/{poll['id']}", {"optionIds": [0]})
    assert voted["votes"] == {"option-0": 1} and voted["numVoters"] == 1
    post_json(bob, f"/poll/{token}/{poll['id']}", {"optionIds": [0, 1]}, 400)
    post_json(bob, f"/poll/{token}/{poll['id']}", {"optionIds": [5]}, 400)
    bob.delete(f"/poll/{token}/{poll['id']}", status=403)
    closed = alice.delete(f"/poll/{token}/{poll['id']}").data
    assert closed["status"] == 1
    assert closed["details"] == [{"actorType": "users", "actorId": "bob",
                                  "actorDisplayName": "Bob", "optionId": 0}]
    post_json(bob, f"/poll/{token}/{poll['id']}", {"optionIds": [1]}, 400)
    assert verbs(all_messages(alice, token))[-2:] == ["poll_voted", "poll_closed"]


def test_hidden_poll_shows_results_once_closed(alice, bob):
    token = team(alice, "bob")
    poll = alice.post(f"/poll/{token}", {"question": "Secret?", "options[]": ["yes", "no"],
                                         "resultMode": 1}, status=201).data
    voted = bob.post(f"/poll/{token}/{poll['id']}", {"optionIds[]": ["0"]}).data
    assert voted["votedSelf"] == [0] and "votes" not in voted
    assert "poll_voted" not in verbs(all_messages(alice, token))
    closed = alice.delete(f"/poll/{token}/{poll['id']}").data
    assert closed["votes"] == {"option-0": 1} and "details" not in closed
    assert bob.get(f"/poll/{token}/{poll['id']}").data["votes"] == {"option-0": 1}


def test_poll_rules(alice, bob, carol):
    token = team(alice, "bob")
    post_json(alice, f"/poll/{token}", {"question": "", "options": ["a", "b"]}, 400)
    post_json(alice, f"/poll/{token}", {"question": "Q", "options": ["a"]}, 400)
    one = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201).data["token"]
    post_json(alice, f"/poll/{one}", {"question": "Q", "options": ["a", "b"]}, 400)
    poll = post_json(alice, f"/poll/{token}", {"question": "Q", "options": ["a", "b"]}, 201)
    carol.get(f"/poll/{token}/{poll['id']}", status=404)
    alice.get(f"/poll/{token}/999999", status=404)


# --- Message expiration ----------------------------------------------------------------


def test_messages_expire(app, alice, bob, clock):
    token = team(alice, "bob")
    alice.post(f"/room/{token}/message-expiration", {"seconds": 60}, prefix=V4)
    message = send(alice, token, "ephemeral", referenceId="e")
    assert message["expirationTimestamp"] == START + 60
    clock.advance(61)
    assert "ephemeral" not in comments(history(bob, token).data)
    assert bob.get(f"/chat/{token}", {"timeout": 0}).data == []
    assert room4(bob, token)["lastMessage"]["systemMessage"] == "message_expiration_enabled"
    app.talk.expire_messages()
    with app.talk.db.read() as db:
        assert talk_server.message_by_id(db, message["id"]) is None


def test_expiry_timer_sleeps_until_the_next_expiration(app, alice, clock):
    token = team(alice)
    alice.post(f"/room/{token}/message-expiration", {"seconds": 60}, prefix=V4)
    send(alice, token, "soon gone", referenceId="s")
    assert app.talk.expire_messages() == START + 60  # nothing yet; next one at +60
    clock.advance(60)
    assert app.talk.expire_messages() is None


# --- Capabilities ----------------------------------------------------------------------


def test_capabilities_list_the_chat_features(anonymous):
    features = anonymous.get("/capabilities", prefix="/ocs/v2.php/cloud").data[
        "capabilities"]["spreed"]["features"]
    for name in ("chat-v2", "system-messages", "mention-flag", "chat-read-marker",
                 "chat-read-last", "chat-reference-id", "reactions", "edit-messages",
                 "delete-messages", "talk-polls", "clear-history"):
        assert name in features
    assert "rich-object-list-media" not in features


# --- Over real HTTP: the Android app's sequence and nc-py-api --------------------------


def http(base, method, path, user, params=None, timeout=30):
    """One request to the served app: (status, headers, OCS data or None)."""
    url = base + API + path
    body = None
    if method == "GET" and params:
        url += "?" + urllib.parse.urlencode(params)
    elif params:
        body = urllib.parse.urlencode(params).encode("utf-8")
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("OCS-APIRequest", "true")
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    raw = f"{user}:{PASSWORD}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return response.status, response.headers, json.loads(text)["ocs"]["data"]
    except urllib.error.HTTPError as error:
        with error:
            text = error.read()
            data = json.loads(text)["ocs"]["data"] if text else None
            return error.code, error.headers, data


@pytest.fixture
def served(tmp_path, password_hash):
    with talk_server.serve_in_thread(tmp_path / "served.db", threads=8, reserve=2) as base:
        with base.app.talk.db.write() as db:
            for user in ("alice", "bob"):
                talk_server.create_user(db, user, password_hash, user.title())
        yield base


def android_fields(known, future, common=0):
    """The field map of talk-android's OfflineFirstChatRepository.getFieldMap."""
    return {
        "includeLastKnown": 0 if future else 1,
        "lastKnownMessageId": known,
        "lastCommonReadId": common,
        "timeout": 30 if future else 0,
        "limit": 100,
        "lookIntoFuture": 1 if future else 0,
        "setReadMarker": 1,
    }


@pytest.mark.slow
def test_android_chat_sequence_over_real_http(served):
    status, _, room = http(served, "POST", "/room", "alice", {"roomType": 2, "roomName": "Team"})
    token = room["token"]
    http(served, "POST", f"/room/{token}/participants", "alice", {"newParticipant": "bob"})
    for i in range(3):
        http(served, "POST", f"/chat/{token}", "alice", {"message": f"m{i}"})
    # Initial history: the newest 100, newest first, and where to continue.
    status, headers, history_page = http(
        served, "GET", f"/chat/{token}", "bob", android_fields(0, future=False))
    assert status == 200
    assert [m["message"] for m in history_page if m["messageType"] == "comment"] == [
        "m2", "m1", "m0"]
    newest = history_page[0]["id"]
    oldest_given = int(headers["X-Chat-Last-Given"])
    common = int(headers["X-Chat-Last-Common-Read"])
    # Android always includes the last known message when paging back: the
    # page that holds only it is the end of the history.
    status, _, page = http(served, "GET", f"/chat/{token}", "bob",
                           android_fields(oldest_given, future=False, common=common))
    assert status == 200 and [m["id"] for m in page] == [oldest_given]
    assert page[0]["systemMessage"] == "conversation_created"
    # The future long-poll, woken by alice's send from another client.
    result = {}
    poll = threading.Thread(target=lambda: result.setdefault("r", http(
        served, "GET", f"/chat/{token}", "bob", android_fields(newest, True, common), 60)))
    poll.start()
    wait_for_waiter(served.app)
    status, _, sent = http(served, "POST", f"/chat/{token}", "alice", {
        "message": "live", "actorDisplayName": "", "replyTo": 0, "silent": "false",
        "referenceId": "f" * 64})
    assert status == 201 and sent["referenceId"] == "f" * 64
    poll.join(10)
    status, headers, fresh = result["r"]
    assert status == 200 and [m["id"] for m in fresh] == [sent["id"]]
    assert fresh[0]["referenceId"] == "f" * 64  # the pending bubble finds its message
    assert int(headers["X-Chat-Last-Given"]) == sent["id"]
    # bob sends: his own bubble is matched by referenceId too.
    status, _, own = http(served, "POST", f"/chat/{token}", "bob", {
        "message": "reply", "replyTo": sent["id"], "silent": "false", "referenceId": "b" * 64})
    assert own["parent"]["id"] == sent["id"] and own["referenceId"] == "b" * 64
    # The read marker, then the Room shows nothing unread.
    status, _, _ = http(served, "POST", f"/chat/{token}/read", "bob",
                        {"lastReadMessage": own["id"]})
    assert status == 200
    url = f"{served}/ocs/v2.php/apps/spreed/api/v4/room/{token}"
    request = urllib.request.Request(url, headers={
        "OCS-APIRequest": "true", "Accept": "application/json",
        "Authorization": "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        room = json.load(response)["ocs"]["data"]
    assert room["unreadMessages"] == 0 and room["lastReadMessage"] == own["id"]
    # Nothing new: a timed-out future poll is 304 with no body.
    served.app.talk.notifier.time_scale = 0.01
    status, _, data = http(served, "GET", f"/chat/{token}", "bob",
                           android_fields(own["id"], True))
    assert (status, data) == (304, None)


@pytest.mark.slow
def test_nc_py_api_chat_reactions_and_polls(served):
    import nc_py_api
    alice = nc_py_api.Nextcloud(nextcloud_url=served, nc_auth_user="alice", nc_auth_pass=PASSWORD)
    bob = nc_py_api.Nextcloud(nextcloud_url=served, nc_auth_user="bob", nc_auth_pass=PASSWORD)
    with served.app.talk.db.write() as db:
        talk_server.create_group(db, "team")
        talk_server.add_to_group(db, "team", "alice")  # a room from a group needs membership
        talk_server.add_to_group(db, "team", "bob")
    conversation = alice.talk.create_conversation(2, "team", room_name="Team")
    hello = alice.talk.send_message("Hello @bob", conversation)
    assert hello.message == "Hello {mention-user1}"
    assert hello.reference_id and hello.message_type == "comment"
    reply = bob.talk.send_message("Hi!", conversation, reply_to_message=hello)
    messages = bob.talk.receive_messages(conversation, limit=10)
    assert [m.message for m in messages][:2] == ["Hi!", "Hello {mention-user1}"]
    assert messages[-1].system_message == "conversation_created"
    reactions = bob.talk.react_to_message(hello, "👍")
    assert [r.actor_id for r in reactions["👍"]] == ["bob"]
    assert list(alice.talk.get_message_reactions(hello)) == ["👍"]
    assert bob.talk.delete_reaction(hello, "👍") == {}
    deleted = bob.talk.delete_message(reply)
    assert deleted.system_message == "message_deleted"
    poll = alice.talk.create_poll(conversation, "Lunch?", ["Pizza", "Sushi"], hidden_results=False)
    assert (poll.question, poll.options, poll.closed) == ("Lunch?", ["Pizza", "Sushi"], False)
    voted = bob.talk.vote_poll([1], poll.poll_id, conversation)
    assert voted.voted_self == [1] and voted.votes == {"option-1": 1}
    closed = alice.talk.close_poll(poll)
    assert closed.closed and closed.num_voters == 1
    assert [(d.actor_id, d.option) for d in closed.details] == [("bob", 1)]
    assert alice.talk.get_poll(poll).closed
    room = [c for c in bob.talk.get_user_conversations() if c.token == conversation.token][0]
    assert room.last_message.system_message == "poll_closed"
    assert not room.unread_mention  # bob's own reply moved his read marker past it
