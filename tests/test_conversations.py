"""Today's conversations and participants (API v4): every route, who may call it, and
the Room and attendee objects today's clients read (SPEC 11, today-api.md 4-5)."""

import pytest
from helpers import scalar

import talk_server

V4 = "/ocs/v2.php/apps/spreed/api/v4"
V1 = "/ocs/v2.php/apps/spreed/api/v1"

# Every key openapi.json marks required on a Room, with its JSON type.
ROOM_FIELDS = {
    "id": int, "token": str, "type": int, "name": str, "displayName": str, "description": str,
    "objectType": str, "objectId": str, "actorType": str, "actorId": str, "attendeeId": int,
    "attendeePin": str, "participantType": int, "sessionId": str, "lastPing": int,
    "participantFlags": int, "permissions": int, "attendeePermissions": int,
    "callPermissions": int, "defaultPermissions": int, "hasCall": bool, "callFlag": int,
    "callStartTime": int, "callRecording": int, "recordingConsent": int, "canStartCall": bool,
    "canEnableSIP": bool, "sipEnabled": int, "lastActivity": int, "unreadMessages": int,
    "unreadMention": bool, "unreadMentionDirect": bool, "lastReadMessage": int,
    "lastCommonReadMessage": int, "messageExpiration": int, "hasPassword": bool,
    "isFavorite": bool, "isArchived": bool, "isCustomAvatar": bool, "avatarVersion": str,
    "canLeaveConversation": bool, "canDeleteConversation": bool, "readOnly": int,
    "listable": int, "lobbyState": int, "lobbyTimer": int, "mentionPermissions": int,
    "breakoutRoomMode": int, "breakoutRoomStatus": int, "notificationLevel": int,
    "notificationCalls": int,
}
ATTENDEE_FIELDS = {
    "roomToken": str, "attendeeId": int, "actorType": str, "actorId": str, "displayName": str,
    "participantType": int, "lastPing": int, "inCall": int, "permissions": int,
    "attendeePermissions": int, "attendeePin": str, "sessionIds": list,
}


def create(client, room_type=2, status=201, **params):
    params.setdefault("roomName", "Team") if room_type in (2, 3) and "invite" not in params else None
    return client.post("/room", {"roomType": room_type, **params}, status=status).data


def team(a, *members):
    """A group conversation "Team" of alice with `members` (user ids) added."""
    token = create(a)["token"]
    for user in members:
        a.post(f"/room/{token}/participants", {"newParticipant": user})
    return token


def attendee(client, token, user):
    rows = client.get(f"/room/{token}/participants").data
    return next(row for row in rows if row["actorId"] == user)


def assert_room_shape(room):
    missing = sorted(set(ROOM_FIELDS) - set(room))
    assert not missing, f"Room lacks {missing}"
    wrong = {k: room[k] for k, kind in ROOM_FIELDS.items() if type(room[k]) is not kind}
    assert not wrong, f"wrong types: {wrong}"
    assert room["lastMessage"] == [] or isinstance(room["lastMessage"], dict)


# --- Creating -------------------------------------------------------------------


def test_create_group_answers_the_whole_room_with_every_required_field(a):
    room = create(a, 2, roomName="Team")
    assert_room_shape(room)
    assert (room["type"], room["name"], room["displayName"]) == (2, "Team", "Team")
    assert (room["participantType"], room["actorType"], room["actorId"]) == (1, "users", "alice")
    assert room["canStartCall"] is True and room["permissions"] == talk_server.PERMISSIONS_ALL
    assert room["canDeleteConversation"] is True and room["sessionId"] == "0"


def test_create_with_query_parameters_on_a_post_as_android_sends_it(a):
    response = a.test.post(V4 + "/room?roomType=3&roomName=Standup", headers=a.headers, status=201)
    room = response.json["ocs"]["data"]
    assert (room["type"], room["name"]) == (3, "Standup")


def test_create_with_a_json_body_as_nc_py_api_sends_it(a):
    body = {"roomType": 2, "roomName": "From JSON"}
    response = a.test.post_json(V4 + "/room", body, headers=a.headers, status=201)
    assert response.json["ocs"]["data"]["name"] == "From JSON"


def test_create_one_to_one_twice_answers_the_same_room_with_200(a):
    first = create(a, 1, invite="bob")
    again = create(a, 1, status=200, invite="bob")
    assert first["token"] == again["token"]
    assert (first["name"], first["displayName"]) == ("bob", "Bob")


def test_create_one_to_one_with_unknown_user_is_404(a):
    create(a, 1, status=404, invite="nobody")


def test_create_one_to_one_with_yourself_is_403(a):
    create(a, 1, status=403, invite="alice")


@pytest.mark.parametrize("room_type", [0, 4, 5, 7, "x"])
def test_create_with_a_bad_type_is_400(a, room_type):
    a.post("/room", {"roomType": room_type, "roomName": "x"}, status=400)


@pytest.mark.parametrize("room_type", [2, 3])
def test_create_without_a_name_is_400(a, room_type):
    a.post("/room", {"roomType": room_type}, status=400)


def test_names_may_have_255_characters_on_v4(a):
    assert create(a, 2, roomName="n" * 255)["name"] == "n" * 255
    create(a, 2, status=400, roomName="n" * 256)


def test_group_room_from_a_group_invites_its_members(a, alice):
    alice.post("/groups", {"groupid": "team"}, prefix="/ocs/v2.php/cloud")
    for user in ("bob", "carol"):
        alice.post(f"/users/{user}/groups", {"groupid": "team"}, prefix="/ocs/v2.php/cloud")
    room = create(a, 2, invite="team", source="groups")
    ids = sorted(r["actorId"] for r in a.get(f"/room/{room['token']}/participants").data)
    assert ids == ["alice", "bob", "carol"]


def test_create_group_from_unknown_group_is_404(a):
    create(a, 2, status=404, invite="no-such-group")


def test_note_to_self_is_one_per_user(a):
    first = create(a, 6)
    assert (first["type"], first["name"], first["canLeaveConversation"]) == (6, "Note to self", False)
    assert create(a, 6, status=200)["token"] == first["token"]


def test_public_room_with_a_password_at_creation(a, v4):
    room = create(a, 3, roomName="Open", password="sesame")
    assert room["hasPassword"] is True
    v4().post(f"/room/{room['token']}/participants/active", {"password": "nope"}, status=403)
    v4().post(f"/room/{room['token']}/participants/active", {"password": "sesame"})


def test_password_for_a_group_room_at_creation_is_400(a):
    create(a, 2, status=400, roomName="x", password="sesame")


def test_guests_and_strangers_cannot_create(v4, wrong_password):
    v4().post("/room", {"roomType": 3, "roomName": "x"}, status=401)
    wrong_password.post("/room", {"roomType": 3, "roomName": "x"}, status=401, prefix=V4)


# --- Listing and getting ----------------------------------------------------------


def test_list_has_both_talk_headers(a):
    team(a)
    response = a.get("/room")
    assert len(response.data) == 1
    assert_room_shape(response.data[0])
    assert int(response.headers["X-Nextcloud-Talk-Modified-Before"]) == talk_server_now(a)
    assert len(response.headers["X-Nextcloud-Talk-Hash"]) == 40


def talk_server_now(client):
    return int(client.test.app.talk.clock())


def test_list_shows_only_the_callers_rooms(a, b):
    team(a)
    assert b.get("/room").data == []


def test_modified_since_shows_changed_rooms_only(a, b, clock):
    old = team(a, "bob")
    clock.advance(100)
    since = int(a.get("/room").headers["X-Nextcloud-Talk-Modified-Before"])
    assert a.get("/room", {"modifiedSince": since}).data == []
    clock.advance(5)
    fresh = team(a)
    tokens = [r["token"] for r in a.get("/room", {"modifiedSince": since}).data]
    assert tokens == [fresh]
    clock.advance(5)
    a.put(f"/room/{old}/description", {"description": "now with a topic"})
    tokens = {r["token"] for r in a.get("/room", {"modifiedSince": since + 6}).data}
    assert tokens == {old}
    # A change of bob's own row shows in bob's list only.
    clock.advance(5)
    b.post(f"/room/{old}/favorite")
    assert [r["token"] for r in b.get("/room", {"modifiedSince": since + 12}).data] == [old]
    assert a.get("/room", {"modifiedSince": since + 12}).data == []


def test_get_room_for_member_guest_and_stranger(a, b, v4):
    private = team(a)
    public = create(a, 3, roomName="Open")["token"]
    b.get(f"/room/{private}", status=404)
    v4().get(f"/room/{private}", status=404)
    shown = v4().get(f"/room/{public}").data
    assert (shown["participantType"], shown["attendeeId"], shown["permissions"]) == (0, 0, 0)
    assert "X-Nextcloud-Talk-Hash" in a.get(f"/room/{private}").headers


def test_get_unknown_room_is_404(a):
    a.get("/room/nosuchroom", status=404)


# --- Settings -----------------------------------------------------------------


def test_rename(a, b):
    token = team(a, "bob")
    a.put(f"/room/{token}", {"roomName": "Renamed"})
    assert a.get(f"/room/{token}").data["name"] == "Renamed"
    b.put(f"/room/{token}", {"roomName": "Mine"}, status=403)
    a.put(f"/room/{token}", {"roomName": " "}, status=400)
    a.put(f"/room/{token}", {"roomName": "n" * 256}, status=400)


def test_rename_one_to_one_is_400_on_v4_and_405_on_v1(a, alice):
    token = create(a, 1, invite="bob")["token"]
    a.put(f"/room/{token}", {"roomName": "x"}, status=400)
    alice.put(f"/room/{token}", {"roomName": "x"}, status=405)


def test_description(a, b):
    token = team(a, "bob")
    a.put(f"/room/{token}/description", {"description": "What we do"})
    assert b.get(f"/room/{token}").data["description"] == "What we do"
    b.put(f"/room/{token}/description", {"description": "x"}, status=403)
    a.put(f"/room/{token}/description", {"description": "d" * 2001}, status=400)
    one = create(a, 1, invite="carol")["token"]
    a.put(f"/room/{one}/description", {"description": "x"}, status=400)


def test_password_public_only(a, v4):
    group = team(a)
    a.put(f"/room/{group}/password", {"password": "x"}, status=400)
    public = create(a, 3, roomName="Open")["token"]
    a.put(f"/room/{public}/password", {"password": "sesame"})
    assert a.get(f"/room/{public}").data["hasPassword"] is True
    v4().post(f"/room/{public}/participants/active", {"password": "wrong"}, status=403)
    a.put(f"/room/{public}/password", {"password": ""})
    v4().post(f"/room/{public}/participants/active")


def test_public_and_private(a, b, v4):
    token = team(a, "bob")
    b.post(f"/room/{token}/public", status=403)
    a.post(f"/room/{token}/public")
    assert a.get(f"/room/{token}").data["type"] == 3
    guest = v4()
    guest.post(f"/room/{token}/participants/active")
    a.delete(f"/room/{token}/public")
    assert a.get(f"/room/{token}").data["type"] == 2
    guest.get(f"/room/{token}", status=404)
    one = create(a, 1, invite="carol")["token"]
    a.post(f"/room/{one}/public", status=400)


def test_read_only(a, b, bob):
    token = team(a, "bob")
    b.put(f"/room/{token}/read-only", {"state": 1}, status=403)
    a.put(f"/room/{token}/read-only", {"state": 2}, status=400)
    a.put(f"/room/{token}/read-only", {"state": 1})
    assert b.get(f"/room/{token}").data["readOnly"] == 1
    bob.post(f"/chat/{token}", {"message": "hi"}, status=403)
    a.put(f"/room/{token}/read-only", {"state": 0})
    bob.post(f"/chat/{token}", {"message": "hi"}, status=201)


def test_listable_and_listed_rooms(a, b, c):
    token = team(a, "bob")
    a.put(f"/room/{token}/listable", {"scope": 3}, status=400)
    b.put(f"/room/{token}/listable", {"scope": 1}, status=403)
    assert c.get("/listed-room").data == []
    a.put(f"/room/{token}/listable", {"scope": 1})
    listed = c.get("/listed-room", {"searchTerm": "tea"}).data
    assert [r["token"] for r in listed] == [token]
    assert listed[0]["participantType"] == 0
    assert c.get("/listed-room", {"searchTerm": "nothing like it"}).data == []
    assert b.get("/listed-room").data == []  # bob is in it already


def test_favorite(a, b):
    token = team(a, "bob")
    a.post(f"/room/{token}/favorite")
    assert a.get(f"/room/{token}").data["isFavorite"] is True
    assert b.get(f"/room/{token}").data["isFavorite"] is False
    a.delete(f"/room/{token}/favorite")
    assert a.get(f"/room/{token}").data["isFavorite"] is False
    b.post("/room/nosuchroom/favorite", status=404)


def test_favorite_is_for_users_only(a, v4):
    token = create(a, 3, roomName="Open")["token"]
    guest = v4()
    guest.post(f"/room/{token}/participants/active")
    guest.post(f"/room/{token}/favorite", status=401)


def test_notification_levels(a):
    group, one = team(a), create(a, 1, invite="bob")["token"]
    assert a.get(f"/room/{group}").data["notificationLevel"] == 2  # default: mentions
    assert a.get(f"/room/{one}").data["notificationLevel"] == 1  # default: always
    a.post(f"/room/{group}/notify", {"level": 3})
    assert a.get(f"/room/{group}").data["notificationLevel"] == 3
    a.post(f"/room/{group}/notify", {"level": 4}, status=400)
    a.post(f"/room/{group}/notify-calls", {"level": 0})
    assert a.get(f"/room/{group}").data["notificationCalls"] == 0
    a.post(f"/room/{group}/notify-calls", {"level": 2}, status=400)


def test_lobby_blocks_non_moderators_until_its_timer(a, b, bob, alice, clock):
    token = team(a, "bob")
    b.put(f"/room/{token}/webinar/lobby", {"state": 1}, status=403)
    a.put(f"/room/{token}/webinar/lobby", {"state": 2}, status=400)
    room = a.put(f"/room/{token}/webinar/lobby", {"state": 1, "timer": clock.now + 60}).data
    assert (room["lobbyState"], room["lobbyTimer"]) == (1, clock.now + 60)
    bob.post(f"/chat/{token}", {"message": "early"}, status=412)
    bob.get(f"/chat/{token}", {"timeout": 0}, status=412)
    b.get(f"/room/{token}/participants", status=412)
    alice.post(f"/chat/{token}", {"message": "moderators may"}, status=201)
    clock.advance(61)  # the timer opened the lobby
    assert b.get(f"/room/{token}").data["lobbyState"] == 0
    bob.post(f"/chat/{token}", {"message": "now"}, status=201)


def test_lobby_is_refused_in_one_to_one(a):
    one = create(a, 1, invite="bob")["token"]
    a.put(f"/room/{one}/webinar/lobby", {"state": 1}, status=400)


def test_default_permissions(a, b):
    token = team(a, "bob")
    room = a.put(f"/room/{token}/permissions/default", {"permissions": 4 | 128}).data
    assert room["defaultPermissions"] == 4 | 128 | 1  # custom bit added
    bob_room = b.get(f"/room/{token}").data
    assert (bob_room["permissions"], bob_room["canStartCall"]) == (4 | 128 | 1, False)
    assert a.get(f"/room/{token}").data["permissions"] == talk_server.PERMISSIONS_ALL
    a.put(f"/room/{token}/permissions/default", {"permissions": 0})
    assert b.get(f"/room/{token}").data["canStartCall"] is True
    a.put(f"/room/{token}/permissions/nonsense", {"permissions": 4}, status=400)
    a.put(f"/room/{token}/permissions/default", {"permissions": 256}, status=400)
    b.put(f"/room/{token}/permissions/default", {"permissions": 4}, status=403)


def test_attendee_permissions(a, b):
    token = team(a, "bob")
    bob_id = attendee(a, token, "bob")["attendeeId"]
    alice_id = attendee(a, token, "alice")["attendeeId"]
    path = f"/room/{token}/attendees/permissions"
    a.put(path, {"attendeeId": bob_id, "method": "set", "permissions": 128})
    assert b.get(f"/room/{token}").data["permissions"] == 129
    a.put(path, {"attendeeId": bob_id, "method": "add", "permissions": 2})
    assert b.get(f"/room/{token}").data["permissions"] == 131
    a.put(path, {"attendeeId": bob_id, "method": "remove", "permissions": 128})
    assert b.get(f"/room/{token}").data["permissions"] == 3
    a.put(path, {"attendeeId": alice_id, "method": "set", "permissions": 4}, status=400)
    a.put(path, {"attendeeId": 9999, "method": "set", "permissions": 4}, status=404)
    a.put(path, {"attendeeId": bob_id, "method": "toggle", "permissions": 4}, status=400)
    b.put(path, {"attendeeId": bob_id, "method": "set", "permissions": 254}, status=403)


def test_message_expiration_setting(a, b):
    token = team(a, "bob")
    a.post(f"/room/{token}/message-expiration", {"seconds": 3600})
    assert b.get(f"/room/{token}").data["messageExpiration"] == 3600
    a.post(f"/room/{token}/message-expiration", {"seconds": -1}, status=400)
    b.post(f"/room/{token}/message-expiration", {"seconds": 0}, status=403)


def test_delete(a, b):
    token = team(a, "bob")
    b.delete(f"/room/{token}", status=403)
    a.delete(f"/room/{token}")
    a.get(f"/room/{token}", status=404)
    a.delete(f"/room/{token}", status=404)


# --- Participants -----------------------------------------------------------------


def test_participant_list_shape_and_sessions(a, b):
    token = team(a, "bob")
    b.post(f"/room/{token}/participants/active")
    rows = a.get(f"/room/{token}/participants").data
    for row in rows:
        missing = sorted(set(ATTENDEE_FIELDS) - set(row))
        assert not missing
        assert all(type(row[k]) is kind for k, kind in ATTENDEE_FIELDS.items())
    by_actor = {row["actorId"]: row for row in rows}
    assert len(by_actor["bob"]["sessionIds"]) == 1 and by_actor["alice"]["sessionIds"] == []
    assert by_actor["bob"]["inCall"] == 0 and by_actor["alice"]["participantType"] == 1


def test_participant_list_refuses_guests_and_strangers(a, v4, c):
    token = create(a, 3, roomName="Open")["token"]
    guest = v4()
    guest.post(f"/room/{token}/participants/active")
    guest.get(f"/room/{token}/participants", status=403)
    c.get(f"/room/{token}/participants", status=404)  # not a participant
    v4().get(f"/room/{token}/participants", status=404)


def test_add_participant(a, b):
    token = team(a)
    a.post(f"/room/{token}/participants", {"newParticipant": "bob"})
    assert attendee(a, token, "bob")["participantType"] == 3
    a.post(f"/room/{token}/participants", {"newParticipant": "nobody"}, status=404)
    b.post(f"/room/{token}/participants", {"newParticipant": "carol"}, status=403)
    a.post(f"/room/{token}/participants", {"newParticipant": "x", "source": "emails"}, status=400)


def test_add_participant_to_one_to_one_is_400_on_v4(a, alice):
    one = create(a, 1, invite="bob")["token"]
    a.post(f"/room/{one}/participants", {"newParticipant": "carol"}, status=400)
    # The 2018 route still turns it into a group room.
    assert alice.post(f"/room/{one}/participants", {"newParticipant": "carol"}).data == {"type": 2}


def test_add_a_group(a, alice):
    alice.post("/groups", {"groupid": "ops"}, prefix="/ocs/v2.php/cloud")
    alice.post("/users/dave/groups", {"groupid": "ops"}, prefix="/ocs/v2.php/cloud")
    token = team(a)
    a.post(f"/room/{token}/participants", {"newParticipant": "ops", "source": "groups"})
    assert attendee(a, token, "dave")["participantType"] == 3
    a.post(f"/room/{token}/participants", {"newParticipant": "nope", "source": "groups"}, status=404)


def test_remove_attendee(a, b, c):
    token = team(a, "bob", "carol")
    carol_id = attendee(a, token, "carol")["attendeeId"]
    alice_id = attendee(a, token, "alice")["attendeeId"]
    b.delete(f"/room/{token}/attendees", {"attendeeId": carol_id}, status=403)
    a.delete(f"/room/{token}/attendees", {"attendeeId": carol_id})
    c.get(f"/room/{token}", status=404)
    a.delete(f"/room/{token}/attendees", {"attendeeId": carol_id}, status=404)
    a.delete(f"/room/{token}/attendees", {"attendeeId": alice_id}, status=400)
    a.delete(f"/room/{token}/attendees", {"attendeeId": "x"}, status=400)


def test_remove_attendee_from_one_to_one_is_400(a):
    one = create(a, 1, invite="bob")["token"]
    bob_id = attendee(a, one, "bob")["attendeeId"]
    a.delete(f"/room/{one}/attendees", {"attendeeId": bob_id}, status=400)


def test_the_last_moderator_cannot_leave_while_others_remain(a, b):
    token = team(a, "bob")
    assert a.get(f"/room/{token}").data["canLeaveConversation"] is False
    a.delete(f"/room/{token}/participants/self", status=400)
    a.post(f"/room/{token}/moderators", {"attendeeId": attendee(a, token, "bob")["attendeeId"]})
    assert a.get(f"/room/{token}").data["canLeaveConversation"] is True
    a.delete(f"/room/{token}/participants/self")
    a.get(f"/room/{token}", status=404)
    b.delete(f"/room/{token}/participants/self")  # the last one out deletes it
    b.get(f"/room/{token}", status=404)


def test_promote_and_demote_by_attendee_id(a, b):
    token = team(a, "bob")
    bob_id = attendee(a, token, "bob")["attendeeId"]
    alice_id = attendee(a, token, "alice")["attendeeId"]
    b.post(f"/room/{token}/moderators", {"attendeeId": bob_id}, status=403)
    a.post(f"/room/{token}/moderators", {"attendeeId": bob_id})
    assert attendee(a, token, "bob")["participantType"] == 2
    a.post(f"/room/{token}/moderators", {"attendeeId": bob_id}, status=400)
    a.post(f"/room/{token}/moderators", {"attendeeId": alice_id}, status=400)
    a.delete(f"/room/{token}/moderators", {"attendeeId": bob_id})
    assert attendee(a, token, "bob")["participantType"] == 3
    a.delete(f"/room/{token}/moderators", {"attendeeId": bob_id}, status=400)
    a.post(f"/room/{token}/moderators", {"attendeeId": 12345}, status=404)


# --- Joining and sessions -----------------------------------------------------------


def test_join_answers_the_room_with_the_new_session_and_sets_a_cookie(a, b):
    token = team(a, "bob")
    response = b.post(f"/room/{token}/participants/active")
    room = response.data
    assert_room_shape(room)
    assert len(room["sessionId"]) == 512
    assert "talk_device=" in response.headers["Set-Cookie"]
    assert "HttpOnly" in response.headers["Set-Cookie"]
    # The cookie finds the session again.
    assert b.get(f"/room/{token}").data["sessionId"] == room["sessionId"]


def test_two_sessions_of_one_user_in_one_room(a, v4, make_client):
    token = team(a, "bob")
    phone, laptop = v4("bob"), v4("bob")
    on_phone = phone.post(f"/room/{token}/participants/active").data["sessionId"]
    on_laptop = laptop.post(f"/room/{token}/participants/active").data["sessionId"]
    assert on_phone != on_laptop
    bob = attendee(a, token, "bob")
    assert sorted(bob["sessionIds"]) == sorted([on_phone, on_laptop])
    assert phone.get(f"/room/{token}").data["sessionId"] == on_phone
    assert laptop.get(f"/room/{token}").data["sessionId"] == on_laptop
    # Leaving on the laptop ends that session only.
    laptop.delete(f"/room/{token}/participants/active")
    assert attendee(a, token, "bob")["sessionIds"] == [on_phone]
    assert phone.get(f"/room/{token}").data["sessionId"] == on_phone
    # The 2018 views show one session, the newest.
    v1 = make_client("bob", prefix=V1)
    rows = v1.get(f"/room/{token}/participants").data
    assert [r["sessionId"] for r in rows if r["userId"] == "bob"] == [on_phone]


def test_rejoining_from_the_same_device_replaces_its_session(a, b):
    token = team(a, "bob")
    first = b.post(f"/room/{token}/participants/active").data["sessionId"]
    second = b.post(f"/room/{token}/participants/active").data["sessionId"]
    assert first != second
    assert attendee(a, token, "bob")["sessionIds"] == [second]


def test_rejoin_without_force_while_in_a_call_is_409(a, b, app):
    token = team(a, "bob")
    session = b.post(f"/room/{token}/participants/active").data["sessionId"]
    with app.talk.db.write() as db:
        talk_server.set_in_call(db, session, True)
    answer = b.post(f"/room/{token}/participants/active", {"force": "false"}, status=409)
    assert answer.data["sessionId"] == session and answer.data["inCall"] == 1
    assert b.post(f"/room/{token}/participants/active", {"force": "true"}).data["sessionId"] != session
    b.post(f"/room/{token}/participants/active", {"force": "maybe"}, status=400)


def test_a_request_without_the_cookie_finds_the_newest_live_session(a, b, v4, clock):
    token = team(a, "bob")
    session = b.post(f"/room/{token}/participants/active").data["sessionId"]
    cookieless = v4("bob")
    assert cookieless.get(f"/room/{token}").data["sessionId"] == session
    clock.advance(talk_server.ACTIVE_SECONDS + 1)  # no longer live
    assert cookieless.get(f"/room/{token}").data["sessionId"] == "0"


def test_guest_joins_public_room_and_leaves(a, v4):
    token = create(a, 3, roomName="Open")["token"]
    guest = v4()
    room = guest.post(f"/room/{token}/participants/active").data
    assert (room["participantType"], room["actorType"]) == (4, "guests")
    assert room["canStartCall"] is True and room["sessionId"] != "0"
    guests = [r for r in a.get(f"/room/{token}/participants").data if r["actorType"] == "guests"]
    assert len(guests) == 1 and guests[0]["actorId"] == room["actorId"]
    guest.delete(f"/room/{token}/participants/active")
    assert [r for r in a.get(f"/room/{token}/participants").data if r["actorType"] == "guests"] == []


def test_join_unknown_or_private_room_is_404(a, v4, c):
    token = team(a)
    c.post(f"/room/{token}/participants/active", status=404)
    v4().post(f"/room/{token}/participants/active", status=404)
    v4().post("/room/nosuchroom/participants/active", status=404)


def test_user_self_joins_a_public_room_as_type_5(a, c):
    token = create(a, 3, roomName="Open")["token"]
    assert c.post(f"/room/{token}/participants/active").data["participantType"] == 5
    c.delete(f"/room/{token}/participants/active")
    assert all(r["actorId"] != "carol" for r in a.get(f"/room/{token}/participants").data)


def test_unread_messages_and_last_message(a, b, bob, alice):
    token = team(a, "bob")
    for text in ("one", "two", "three"):
        alice.post(f"/chat/{token}", {"message": text}, status=201)
    room = b.get(f"/room/{token}").data
    assert room["unreadMessages"] == 3
    assert room["lastMessage"]["message"] == "three"
    assert room["lastMessage"]["messageType"] == "comment"


def test_the_2018_routes_see_rooms_made_on_v4(a, alice, bob):
    token = team(a, "bob")
    assert token in [r["token"] for r in bob.get("/room").data]
    v1_room = alice.get(f"/room/{token}").data
    assert (v1_room["type"], v1_room["name"]) == (2, "Team")


def test_sessions_are_stored_per_device(a, b, app):
    token = team(a, "bob")
    b.post(f"/room/{token}/participants/active")
    assert scalar(app, "SELECT COUNT(*) FROM sessions WHERE device IS NOT NULL") == 1
