"""Room management (api-v1.md "Room management", SPEC 3): who does what, expecting which code.

Actors: the owner (alice), a moderator, a member, a self-joined user (type 5),
a guest with a cookie, a logged-in non-member and an anonymous caller.
"""

import contextlib
import json
import re
import sqlite3
import threading

import pytest
from helpers import (
    add,
    create,
    every_row,
    join,
    make_group,
    promote,
    room_of,
    tokens,
    types,
    wait_until,
)

CLOUD = "/ocs/v2.php/cloud"
START = 1_700_000_000  # the conftest clock's start

# SPEC 3: the room object's keys, in Talk's order.
ROOM_KEYS = [
    "id",
    "token",
    "type",
    "name",
    "displayName",
    "participantType",
    "participantInCall",
    "count",
    "hasPassword",
    "hasCall",
    "lastPing",
    "sessionId",
    "participants",
    "numGuests",
    "guestList",
]

# ---------------------------------------------------------------------------
# The room object (SPEC 3)
# ---------------------------------------------------------------------------


def test_room_object_keys_are_in_talk_order_for_members(alice, group_room):
    assert list(room_of(alice, group_room).keys()) == ROOM_KEYS
    assert [list(room.keys()) for room in alice.get("/room").data] == [ROOM_KEYS]


def test_room_object_keys_are_in_talk_order_for_every_viewer(
    alice, public_room, dave, guest, anonymous
):
    token = create(alice, 3)
    # with a row: self-joined user, guest; without a row: a user, an anonymous guest
    for viewer, room in (
        (dave, public_room),
        (guest, public_room),
        (dave, token),
        (anonymous, token),
    ):
        assert list(room_of(viewer, room).keys()) == ROOM_KEYS
    assert [list(room.keys()) for room in dave.get("/room").data] == [ROOM_KEYS]


def test_room_object_field_types(alice, public_room):
    room = room_of(alice, public_room)
    assert isinstance(room["id"], int) and not isinstance(room["id"], bool)
    assert re.fullmatch(r"[abcdefghijkmnopqrstuvwxyz23456789]{8}", room["token"])
    assert room["token"] == public_room
    for key in ("type", "participantType", "count", "lastPing", "numGuests"):
        assert type(room[key]) is int, key
    for key in ("participantInCall", "hasPassword", "hasCall"):
        assert type(room[key]) is bool, key
    for key in ("name", "displayName", "sessionId", "guestList"):
        assert type(room[key]) is str, key
    assert isinstance(room["participants"], dict)


def test_room_tokens_are_distinct(alice):
    made = {create(alice, 2) for _ in range(20)}
    assert len(made) == 20


def token_of_a_new_room(client, data):
    """The answer's token: 8 characters of SPEC 1.6's alphabet, naming the room."""
    token = data["token"]
    assert len(token) == 8 and set(token) <= set("abcdefghijkmnopqrstuvwxyz23456789"), token
    assert room_of(client, token)["token"] == token
    return token


def test_create_answers_token_name_and_display_name(alice):
    data = alice.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data
    token = token_of_a_new_room(alice, data)
    assert data == {"token": token, "name": "Open", "displayName": "Open"}


def test_create_one_to_one_answers_partner_id_and_display_name(alice, bob):
    data = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201).data
    token = token_of_a_new_room(alice, data)
    assert data == {"token": token, "name": "bob", "displayName": "Bob"}


def test_display_name_is_the_name_when_set(alice, bob, guest, public_room):
    join(alice, public_room)
    assert room_of(alice, public_room)["displayName"] == "Open"
    assert room_of(guest, public_room)["displayName"] == "Open"


def test_one_to_one_name_is_partner_id_and_display_name_partner_display_name(alice, bob):
    alice.put("/users/bob", {"key": "displayname", "value": "Robert"}, prefix=CLOUD)
    token = create(alice, 1, invite="bob")
    mine, theirs = room_of(alice, token), room_of(bob, token)
    assert (mine["name"], mine["displayName"]) == ("bob", "Robert")
    assert (theirs["name"], theirs["displayName"]) == ("alice", "Alice")


def test_user_alone_in_unnamed_room_sees_you(alice):
    token = create(alice, 2)
    assert room_of(alice, token)["name"] == ""
    assert room_of(alice, token)["displayName"] == "You"


def test_unnamed_room_display_name_lists_other_users_most_recent_first(
    alice, bob, carol, dave, clock
):
    token = create(alice, 2)
    add(alice, token, "bob")
    add(alice, token, "carol")
    add(alice, token, "dave")
    join(bob, token)
    clock.advance(5)
    join(carol, token)
    # dave never pinged: last. The viewer itself is not listed.
    assert room_of(alice, token)["displayName"] == "Carol, Bob, Dave"
    names = room_of(bob, token)["displayName"].split(", ")
    assert names[0] == "Carol" and sorted(names[1:]) == ["Alice", "Dave"]


def test_guest_viewer_sees_users_followed_by_you(alice, guest):
    token = create(alice, 3)
    join(guest, token)
    assert room_of(guest, token)["displayName"] == "Alice, You"


def test_user_viewer_sees_guest_count_appended(alice, bob, guest, other_guest):
    token = create(alice, 3)
    add(alice, token, "bob")
    join(guest, token)
    room = room_of(alice, token)
    assert (room["displayName"], room["guestList"]) == ("Bob, 1 guest", "1 guest")
    join(other_guest, token)
    room = room_of(alice, token)
    assert (room["displayName"], room["guestList"]) == ("Bob, 2 guests", "2 guests")


def test_guest_viewer_sees_other_guests_but_not_itself(alice, guest, other_guest, make_client):
    token = create(alice, 3)
    join(guest, token)
    room = room_of(guest, token)
    assert (room["displayName"], room["guestList"]) == ("Alice, You", "")
    join(other_guest, token)
    room = room_of(guest, token)
    assert (room["displayName"], room["guestList"]) == (
        "Alice, You, 1 other guest",
        "1 other guest",
    )
    third = make_client()
    join(third, token)
    assert room_of(third, token)["guestList"] == "2 other guests"
    assert room_of(third, token)["displayName"] == "Alice, You, 2 other guests"


def test_named_public_room_keeps_its_name_with_guests(alice, public_room):
    room = room_of(alice, public_room)
    assert (room["displayName"], room["guestList"]) == ("Open", "1 guest")


def test_guest_list_is_empty_outside_public_rooms(alice, group_room, bob):
    join(bob, group_room)
    assert room_of(alice, group_room)["guestList"] == ""
    assert room_of(alice, create(alice, 1, invite="bob"))["guestList"] == ""


def test_guest_list_counts_only_active_guests(alice, guest, other_guest, clock):
    token = create(alice, 3)
    join(guest, token)
    clock.advance(20)
    join(other_guest, token)
    clock.advance(15)  # guest last seen 35 s ago, other_guest 15 s ago
    assert [room["guestList"] for room in alice.get("/room").data] == ["1 guest"]
    assert room_of(alice, token)["guestList"] == "1 guest"


def test_count_and_num_guests_count_active_sessions(alice, bob, carol, guest, public_room):
    join(alice, public_room)
    room = room_of(alice, public_room)
    # alice, dave (type 5) and the guest have sessions; bob and carol never joined
    assert (room["count"], room["numGuests"]) == (3, 1)


def test_count_and_num_guests_drop_after_30_seconds(alice, bob, guest, clock):
    token = create(alice, 3)
    add(alice, token, "bob")
    join(alice, token)
    join(bob, token)
    join(guest, token)
    listed = alice.get("/room").data[0]
    assert (listed["count"], listed["numGuests"]) == (3, 1)
    clock.advance(31)
    listed = alice.get("/room").data[0]
    assert (listed["count"], listed["numGuests"]) == (0, 0)
    join(bob, token)
    assert (room_of(alice, token)["count"], room_of(alice, token)["numGuests"]) == (1, 0)


def test_participants_maps_users_to_name_type_call_most_recent_first(
    alice, bob, carol, dave, guest, clock
):
    token = create(alice, 3)
    add(alice, token, "bob")
    promote(alice, token, "bob")
    add(alice, token, "carol")
    join(bob, token)
    clock.advance(5)
    join(dave, token)
    clock.advance(5)
    join(carol, token)
    carol.post(f"/call/{token}")
    join(guest, token)  # guests are not in `participants`
    participants = room_of(alice, token)["participants"]
    assert participants == {
        "carol": {"name": "Carol", "type": 3, "call": True},
        "dave": {"name": "Dave", "type": 5, "call": False},
        "bob": {"name": "Bob", "type": 2, "call": False},
        "alice": {"name": "Alice", "type": 1, "call": False},
    }
    assert list(participants) == ["carol", "dave", "bob", "alice"]


def test_participants_is_an_empty_list_when_no_user_has_a_row(alice, guest):
    token = create(alice, 3)
    join(guest, token)
    alice.delete(f"/room/{token}/participants/self")  # the guest stays
    room = room_of(guest, token)
    assert (room["participants"], room["displayName"]) == ([], "You")


def test_participant_fields_describe_the_viewer(alice, bob, group_room, clock):
    session = join(bob, group_room)
    bob.post(f"/call/{group_room}")
    room = room_of(bob, group_room)
    assert room["participantType"] == 2
    assert room["participantInCall"] is True
    assert room["hasCall"] is True
    assert room["sessionId"] == session
    assert room["lastPing"] == START
    assert room_of(alice, group_room)["participantInCall"] is False
    assert room_of(alice, group_room)["hasCall"] is True


def test_creator_is_owner_and_not_joined(alice):
    token = create(alice, 2, roomName="Team")
    room = room_of(alice, token)
    assert room["participantType"] == 1
    assert room["sessionId"] == "0"
    assert room["participantInCall"] is False
    assert room["count"] == 0


def test_viewer_without_row_sees_talk_defaults(
    alice, bob, carol, dave, guest, other_guest, anonymous
):
    token = create(alice, 3, roomName="Open")
    add(alice, token, "bob")
    join(alice, token)
    alice.post(f"/call/{token}")
    join(guest, token)
    expected = {
        "participantType": 4,
        "participantInCall": False,
        "lastPing": 0,
        "sessionId": "0",
        "participants": [],
        "numGuests": 0,
        "hasCall": False,
        "guestList": "",
        "displayName": "Open",
        "name": "Open",
        "count": 2,  # as for members: alice and the guest are active
        "type": 3,
    }
    for viewer in (dave, other_guest, anonymous):  # a user and two guests without a row
        room = room_of(viewer, token)
        assert {key: room[key] for key in expected} == expected
    assert room_of(alice, token)["hasCall"] is True


def test_viewer_without_row_sees_the_stored_name_even_when_empty(alice, dave, guest, anonymous):
    token = create(alice, 3)
    join(guest, token)
    assert room_of(dave, token)["displayName"] == ""
    assert room_of(anonymous, token)["displayName"] == ""
    assert room_of(guest, token)["displayName"] == "Alice, You"


def test_has_password_tells_whether_the_room_has_one(alice, dave, public_room):
    assert room_of(alice, public_room)["hasPassword"] is False
    alice.put(f"/room/{public_room}/password", {"password": "s3cret"})
    assert room_of(alice, public_room)["hasPassword"] is True
    assert room_of(dave, public_room)["hasPassword"] is True


# ---------------------------------------------------------------------------
# POST /room: Creating a new room
# ---------------------------------------------------------------------------


def test_create_group_room_is_201(alice):
    token = create(alice, 2, status=201, roomName="Team")
    assert room_of(alice, token)["type"] == 2


def test_create_without_room_type_is_400(alice):
    alice.post("/room", {"roomName": "x"}, status=400)


@pytest.mark.parametrize("room_type", ["0", "4", "-1", "abc", ""])
def test_create_with_invalid_room_type_is_400(alice, room_type):
    alice.post("/room", {"roomType": room_type}, status=400)


def test_create_room_anonymous_is_401(anonymous):
    anonymous.post("/room", {"roomType": 2}, status=401)


def test_create_room_guest_with_cookie_is_401(guest_with_cookie):
    guest_with_cookie.post("/room", {"roomType": 2}, status=401)


def test_create_room_with_wrong_password_is_401(wrong_password):
    response = wrong_password.post("/room", {"roomType": 2}, status=401)
    assert response.meta["statuscode"] == 997


def test_create_one_to_one_with_unknown_user_is_404(alice):
    alice.post("/room", {"roomType": 1, "invite": "nobody"}, status=404)


def test_create_one_to_one_without_invite_is_404(alice):
    alice.post("/room", {"roomType": 1}, status=404)


def test_create_one_to_one_with_yourself_is_403(alice):
    alice.post("/room", {"roomType": 1, "invite": "alice"}, status=403)
    assert alice.get("/room").data == []


def test_create_one_to_one_is_201_with_both_users_owners(alice, bob):
    token = create(alice, 1, status=201, invite="bob")
    assert types(alice, token) == [("alice", 1), ("bob", 1)]
    assert room_of(alice, token)["type"] == 1
    assert room_of(bob, token)["participantType"] == 1


def test_create_existing_one_to_one_is_200_with_same_token(alice, bob):
    token = create(alice, 1, status=201, invite="bob")
    assert create(alice, 1, status=200, invite="bob") == token
    assert create(bob, 1, status=200, invite="alice") == token
    assert tokens(alice) == [token]


def test_create_one_to_one_ignores_room_name(alice, bob):
    token = create(alice, 1, invite="bob", roomName="Ignored")
    assert room_of(alice, token)["name"] == "bob"


def test_create_group_room_from_unknown_group_is_404(alice):
    alice.post("/room", {"roomType": 2, "invite": "nogroup"}, status=404)
    assert alice.get("/room").data == []


def test_create_group_room_from_group_adds_its_members_as_users(alice, bob, carol, dave):
    make_group(alice, "team", "alice", "bob", "carol")
    data = alice.post("/room", {"roomType": 2, "invite": "team"}, status=201).data
    assert data["name"] == "team"
    assert types(alice, data["token"]) == [("alice", 1), ("bob", 3), ("carol", 3)]
    room_of(dave, data["token"], status=404)


def test_create_group_room_from_group_is_a_snapshot(alice, bob, dave):
    make_group(alice, "team", "bob")
    token = create(alice, 2, invite="team")
    alice.post("/users/dave/groups", {"groupid": "team"}, prefix=CLOUD)
    alice.delete("/users/bob/groups", {"groupid": "team"}, prefix=CLOUD)
    assert types(alice, token) == [("alice", 1), ("bob", 3)]


def test_create_group_room_with_group_and_name_uses_the_name(alice, bob):
    make_group(alice, "team", "bob")
    data = alice.post(
        "/room", {"roomType": 2, "invite": "team", "roomName": "Project"}, status=201
    ).data
    assert data["name"] == "Project"
    assert types(alice, data["token"]) == [("alice", 1), ("bob", 3)]


def test_create_group_room_without_invite_has_only_the_creator(alice):
    named = create(alice, 2, roomName="Team")
    unnamed = create(alice, 2)
    assert room_of(alice, named)["name"] == "Team"
    assert room_of(alice, unnamed)["name"] == ""
    assert types(alice, named) == types(alice, unnamed) == [("alice", 1)]


def test_create_public_room_creator_is_owner_with_the_name(alice):
    token = create(alice, 3, roomName="Open")
    room = room_of(alice, token)
    assert (room["type"], room["name"], room["participantType"]) == (3, "Open", 1)


def test_create_with_room_name_over_200_characters_is_400(alice):
    alice.post("/room", {"roomType": 2, "roomName": "x" * 201}, status=400)
    alice.post("/room", {"roomType": 3, "roomName": "x" * 201}, status=400)
    assert alice.get("/room").data == []


def test_create_with_room_name_of_200_characters_is_201(alice):
    token = create(alice, 2, roomName="x" * 200)
    assert room_of(alice, token)["name"] == "x" * 200


# ---------------------------------------------------------------------------
# GET /room: Get user's rooms
# ---------------------------------------------------------------------------


def test_list_rooms_anonymous_is_401(anonymous):
    anonymous.get("/room", status=401)


def test_list_rooms_guest_with_cookie_is_401(guest_with_cookie):
    guest_with_cookie.get("/room", status=401)


def test_list_rooms_with_wrong_password_is_401(wrong_password):
    wrong_password.get("/room", status=401)


def test_list_rooms_without_rooms_is_200_empty(dave):
    assert dave.get("/room", status=200).data == []


def test_list_rooms_shows_every_room_with_a_row_of_types_1_to_5(
    alice, bob, carol, dave, public_room, group_room
):
    one_to_one = create(carol, 1, invite="dave")
    other = create(alice, 2, roomName="Not dave's")
    by_token = {room["token"]: room["participantType"] for room in dave.get("/room").data}
    assert by_token == {one_to_one: 1, public_room: 5}
    by_token = {room["token"]: room["participantType"] for room in bob.get("/room").data}
    assert by_token == {public_room: 2, group_room: 2}
    by_token = {room["token"]: room["participantType"] for room in carol.get("/room").data}
    assert by_token == {public_room: 3, group_room: 3, one_to_one: 1}
    assert other not in tokens(bob)


def test_list_rooms_newest_activity_first(alice, clock):
    older = create(alice, 2, roomName="Older")
    clock.advance(10)
    newer = create(alice, 2, roomName="Newer")
    assert tokens(alice) == [newer, older]
    clock.advance(10)
    join(alice, older)
    alice.post(f"/chat/{older}", {"message": "news"}, status=201)
    assert tokens(alice) == [older, newer]


# ---------------------------------------------------------------------------
# GET /room/{token}: Get single room (also for guests)
# ---------------------------------------------------------------------------


def test_get_room_owner_is_200(alice, group_room):
    assert room_of(alice, group_room, status=200)["name"] == "Team"


def test_get_room_moderator_and_member_are_200(bob, carol, group_room):
    assert room_of(bob, group_room)["participantType"] == 2
    assert room_of(carol, group_room)["participantType"] == 3


def test_get_room_self_joined_user_is_200(dave, public_room):
    assert room_of(dave, public_room)["participantType"] == 5


def test_get_room_joined_guest_is_200(guest, public_room):
    room = room_of(guest, public_room)
    assert room["participantType"] == 4
    assert re.fullmatch(r"[A-Za-z0-9]{512}", room["sessionId"])


def test_get_group_room_non_member_is_404(dave, group_room):
    room_of(dave, group_room, status=404)


def test_get_group_room_guest_with_cookie_is_404(guest_with_cookie, group_room):
    room_of(guest_with_cookie, group_room, status=404)


def test_get_group_room_anonymous_is_404(anonymous, group_room):
    room_of(anonymous, group_room, status=404)


def test_get_public_room_non_member_user_is_200(alice, dave):
    token = create(alice, 3, roomName="Open")
    assert room_of(dave, token, status=200)["participantType"] == 4


def test_get_public_room_anonymous_is_200(anonymous, public_room):
    assert room_of(anonymous, public_room, status=200)["name"] == "Open"


def test_get_unknown_room_is_404(alice, anonymous):
    room_of(alice, "unknown1", status=404)
    room_of(anonymous, "unknown1", status=404)


def test_get_room_with_wrong_password_is_401(wrong_password, public_room):
    wrong_password.get(f"/room/{public_room}", status=401)


def test_get_one_to_one_room_non_partner_is_404(alice, bob, carol):
    token = create(alice, 1, invite="bob")
    room_of(carol, token, status=404)


# ---------------------------------------------------------------------------
# PUT /room/{token}: Rename a room
# ---------------------------------------------------------------------------


def rename(client, token, name, status=200):
    return client.put(f"/room/{token}", {"roomName": name}, status=status)


def test_rename_by_owner_is_200(alice, bob, group_room):
    assert rename(alice, group_room, "Renamed").data == []
    assert room_of(bob, group_room)["name"] == "Renamed"
    assert room_of(bob, group_room)["displayName"] == "Renamed"


def test_rename_by_moderator_is_200(bob, group_room):
    rename(bob, group_room, "By bob")
    assert room_of(bob, group_room)["name"] == "By bob"


def test_rename_by_member_is_403(carol, group_room):
    rename(carol, group_room, "By carol", status=403)
    assert room_of(carol, group_room)["name"] == "Team"


def test_rename_by_member_with_invalid_name_is_403(carol, group_room):
    rename(carol, group_room, "", status=403)


def test_rename_by_self_joined_user_is_404(dave, public_room):
    rename(dave, public_room, "By dave", status=404)


def test_rename_by_non_member_is_404(dave, group_room):
    rename(dave, group_room, "By dave", status=404)


def test_rename_by_non_member_of_public_room_is_404(alice, make_client):
    token = create(alice, 3, roomName="Open")
    rename(make_client("dave"), token, "By dave", status=404)


def test_rename_by_guest_with_cookie_is_401(guest, public_room):
    rename(guest, public_room, "By guest", status=401)


def test_rename_anonymous_is_401(anonymous, public_room):
    rename(anonymous, public_room, "Anonymous", status=401)


def test_rename_unknown_room_is_404(alice):
    rename(alice, "unknown1", "Name", status=404)


def test_rename_to_201_characters_is_400(alice, group_room):
    rename(alice, group_room, "x" * 201, status=400)
    assert room_of(alice, group_room)["name"] == "Team"


def test_rename_to_200_characters_is_200(alice, group_room):
    rename(alice, group_room, "y" * 200)
    assert room_of(alice, group_room)["name"] == "y" * 200


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_rename_to_empty_name_is_400(alice, group_room, name):
    rename(alice, group_room, name, status=400)
    assert room_of(alice, group_room)["name"] == "Team"


def test_rename_without_room_name_is_400(alice, group_room):
    alice.put(f"/room/{group_room}", {}, status=400)


def test_rename_trims_the_name(alice, group_room):
    rename(alice, group_room, "  Spaced  ")
    assert room_of(alice, group_room)["name"] == "Spaced"


def test_rename_trimmed_to_200_characters_is_200(alice, group_room):
    rename(alice, group_room, " " + "z" * 200 + " ")
    assert room_of(alice, group_room)["name"] == "z" * 200


def test_rename_one_to_one_room_is_405(app, alice, bob):
    """Refused, and nothing written: the answer shows a one-to-one room under
    its partner's name whatever is stored, so the test reads the database."""
    token = create(alice, 1, invite="bob")
    before = every_row(app)
    rename(alice, token, "Ours", status=405)
    rename(bob, token, "Ours", status=405)
    assert every_row(app) == before
    assert room_of(alice, token)["name"] == "bob"


def test_rename_one_to_one_room_with_too_long_name_is_400_before_405(alice, bob):
    token = create(alice, 1, invite="bob")
    rename(alice, token, "x" * 201, status=400)


def test_rename_one_to_one_room_of_others_is_404(alice, bob, carol):
    token = create(alice, 1, invite="bob")
    rename(carol, token, "Mine", status=404)


# ---------------------------------------------------------------------------
# PUT /room/{token}/password: Set password for a room
# ---------------------------------------------------------------------------


def set_password(client, token, password, status=200):
    return client.put(f"/room/{token}/password", {"password": password}, status=status)


def test_set_password_by_owner_is_200(alice, public_room):
    assert set_password(alice, public_room, "s3cret").data == []
    assert room_of(alice, public_room)["hasPassword"] is True


def test_set_password_by_moderator_is_200(bob, public_room):
    set_password(bob, public_room, "s3cret")
    assert room_of(bob, public_room)["hasPassword"] is True


def test_set_password_by_member_is_403(carol, public_room):
    set_password(carol, public_room, "s3cret", status=403)
    assert room_of(carol, public_room)["hasPassword"] is False


def test_set_password_by_self_joined_user_is_404(dave, public_room):
    set_password(dave, public_room, "s3cret", status=404)


def test_set_password_by_non_member_is_404(alice, make_client):
    token = create(alice, 3)
    set_password(make_client("dave"), token, "s3cret", status=404)


def test_set_password_by_guest_with_cookie_is_401(guest, public_room):
    set_password(guest, public_room, "s3cret", status=401)


def test_set_password_anonymous_is_401(anonymous, public_room):
    set_password(anonymous, public_room, "s3cret", status=401)


def test_set_password_unknown_room_is_404(alice):
    set_password(alice, "unknown1", "s3cret", status=404)


def test_set_password_on_group_room_is_403(alice, group_room):
    set_password(alice, group_room, "s3cret", status=403)
    assert room_of(alice, group_room)["hasPassword"] is False


def test_set_password_on_one_to_one_room_is_403(alice, bob):
    set_password(alice, create(alice, 1, invite="bob"), "s3cret", status=403)


def test_set_password_on_group_room_by_non_member_is_404(dave, group_room):
    set_password(dave, group_room, "s3cret", status=404)


def test_set_empty_password_clears_it(alice, dave, public_room):
    set_password(alice, public_room, "s3cret")
    set_password(alice, public_room, "")
    assert room_of(alice, public_room)["hasPassword"] is False
    join(dave, public_room)  # no password needed any more


def test_room_password_is_stored_only_as_a_salted_hash(app, alice, public_room):
    other = create(alice, 3)
    set_password(alice, public_room, "correct horse battery")
    set_password(alice, other, "correct horse battery")
    with app.talk.db.read() as db:
        stored = [
            row[0]
            for row in db.execute("SELECT password_hash FROM rooms WHERE password_hash <> ''")
        ]
        dump = "\n".join(db.iterdump())
    assert len(stored) == 2
    assert stored[0] != stored[1]  # salted
    for value in stored:
        assert "correct horse battery" not in value
        assert "correct" not in value
    assert "correct horse battery" not in dump


# ---------------------------------------------------------------------------
# DELETE /room/{token}: Delete a room
# ---------------------------------------------------------------------------


def test_delete_room_by_owner_is_200(alice, bob, carol, guest, public_room):
    assert alice.delete(f"/room/{public_room}", status=200).data == []
    for viewer in (alice, bob, carol, guest):
        room_of(viewer, public_room, status=404)
    assert public_room not in tokens(bob)


def test_delete_room_by_moderator_is_200(bob, group_room):
    bob.delete(f"/room/{group_room}", status=200)
    room_of(bob, group_room, status=404)


def test_delete_room_by_member_is_403(carol, group_room):
    carol.delete(f"/room/{group_room}", status=403)
    room_of(carol, group_room)


def test_delete_room_by_self_joined_user_is_404(dave, public_room):
    dave.delete(f"/room/{public_room}", status=404)


def test_delete_room_by_non_member_is_404(dave, group_room):
    dave.delete(f"/room/{group_room}", status=404)


def test_delete_room_by_guest_with_cookie_is_401(guest, public_room):
    guest.delete(f"/room/{public_room}", status=401)


def test_delete_room_anonymous_is_401(anonymous, public_room):
    anonymous.delete(f"/room/{public_room}", status=401)


def test_delete_unknown_room_is_404(alice):
    alice.delete("/room/unknown1", status=404)


def test_delete_room_removes_participants_sessions_and_chat(app, alice, guest, public_room):
    join(alice, public_room)
    alice.post(f"/chat/{public_room}", {"message": "bye"}, status=201)
    with app.talk.db.read() as db:
        room_id = db.execute("SELECT id FROM rooms WHERE token = ?", (public_room,)).fetchone()[0]
    alice.delete(f"/room/{public_room}")
    with app.talk.db.read() as db:
        for table in ("participants", "messages"):
            sql = f"SELECT COUNT(*) FROM {table} WHERE room_id = ?"
            assert db.execute(sql, (room_id,)).fetchone()[0] == 0, table
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0


def test_delete_room_ends_a_waiting_chat_poll_at_once_with_404(
    app, monkeypatch, alice, bob, group_room
):
    # The notifier's clock stands still: the poll ends only when woken.
    monkeypatch.setattr(app.talk.notifier, "monotonic", lambda: 0.0)
    bob.get("/room")  # bob's credentials are checked (and cached) before the poll
    answers = []
    poll = threading.Thread(
        target=lambda: answers.append(bob.get(f"/chat/{group_room}", {"timeout": 10}, status=404))
    )
    poll.start()
    wait_until(lambda: app.talk.notifier.waiting == 1)  # the delete comes after it looked
    alice.delete(f"/room/{group_room}")
    poll.join(30)
    assert len(answers) == 1


# ---------------------------------------------------------------------------
# POST /room/{token}/public: Allow guests in a room (public room)
# ---------------------------------------------------------------------------


def test_make_public_by_owner_is_200(alice, dave, guest, group_room):
    assert alice.post(f"/room/{group_room}/public", status=200).data == []
    assert room_of(alice, group_room)["type"] == 3
    room_of(dave, group_room, status=200)
    join(guest, group_room)


def test_make_public_by_moderator_is_200(bob, group_room):
    bob.post(f"/room/{group_room}/public", status=200)
    assert room_of(bob, group_room)["type"] == 3


def test_make_public_by_member_is_403(carol, group_room):
    carol.post(f"/room/{group_room}/public", status=403)
    assert room_of(carol, group_room)["type"] == 2


def test_make_public_by_self_joined_user_is_404(dave, public_room):
    dave.post(f"/room/{public_room}/public", status=404)


def test_make_public_by_non_member_is_404(dave, group_room):
    dave.post(f"/room/{group_room}/public", status=404)


def test_make_public_by_guest_with_cookie_is_401(guest, public_room):
    guest.post(f"/room/{public_room}/public", status=401)


def test_make_public_anonymous_is_401(anonymous, group_room):
    anonymous.post(f"/room/{group_room}/public", status=401)


def test_make_public_unknown_room_is_404(alice):
    alice.post("/room/unknown1/public", status=404)


def test_make_public_one_to_one_room_becomes_public(alice, bob, guest):
    token = create(alice, 1, invite="bob")
    bob.post(f"/room/{token}/public", status=200)
    assert room_of(alice, token)["type"] == 3
    join(guest, token)


def test_make_public_public_room_is_200_and_stays_public(alice, public_room):
    alice.post(f"/room/{public_room}/public", status=200)
    assert room_of(alice, public_room)["type"] == 3


# ---------------------------------------------------------------------------
# DELETE /room/{token}/public: Disallow guests in a room (group room)
# ---------------------------------------------------------------------------


def test_make_private_by_owner_is_200_and_removes_types_4_and_5(alice, dave, guest, public_room):
    assert alice.delete(f"/room/{public_room}/public", status=200).data == []
    assert room_of(alice, public_room)["type"] == 2
    assert types(alice, public_room) == [("alice", 1), ("bob", 2), ("carol", 3)]
    room_of(dave, public_room, status=404)
    room_of(guest, public_room, status=404)
    assert public_room not in tokens(dave)
    guest.post(f"/call/{public_room}/ping", status=404)  # its session ended


def test_make_private_keeps_member_sessions(alice, bob, public_room):
    session = join(bob, public_room)
    alice.delete(f"/room/{public_room}/public")
    assert room_of(bob, public_room)["sessionId"] == session


def test_make_private_keeps_the_password(alice, public_room):
    set_password(alice, public_room, "s3cret")
    alice.delete(f"/room/{public_room}/public")
    assert room_of(alice, public_room)["hasPassword"] is True


def test_make_private_by_moderator_is_200(bob, public_room):
    bob.delete(f"/room/{public_room}/public", status=200)
    assert room_of(bob, public_room)["type"] == 2


def test_make_private_by_member_is_403(carol, guest, public_room):
    carol.delete(f"/room/{public_room}/public", status=403)
    assert room_of(carol, public_room)["type"] == 3
    room_of(guest, public_room, status=200)


def test_make_private_by_self_joined_user_is_404(dave, public_room):
    dave.delete(f"/room/{public_room}/public", status=404)


def test_make_private_by_non_member_is_404(dave, group_room):
    dave.delete(f"/room/{group_room}/public", status=404)


def test_make_private_by_guest_with_cookie_is_401(guest, public_room):
    guest.delete(f"/room/{public_room}/public", status=401)


def test_make_private_anonymous_is_401(anonymous, public_room):
    anonymous.delete(f"/room/{public_room}/public", status=401)


def test_make_private_unknown_room_is_404(alice):
    alice.delete("/room/unknown1/public", status=404)


def test_make_private_group_room_is_200_and_stays_group(alice, group_room):
    alice.delete(f"/room/{group_room}/public", status=200)
    assert room_of(alice, group_room)["type"] == 2


# ---------------------------------------------------------------------------
# Lives of rooms
# ---------------------------------------------------------------------------


def test_life_of_a_group_room(alice, bob, carol, dave, guest):
    make_group(alice, "team", "bob")
    created = alice.post("/room", {"roomType": 2, "invite": "team"}, status=201).data
    token = created["token"]
    assert (created["name"], created["displayName"]) == ("team", "team")
    assert types(alice, token) == [("alice", 1), ("bob", 3)]

    assert add(alice, token, "carol").data == []
    promote(alice, token, "carol")
    assert types(alice, token) == [("alice", 1), ("bob", 3), ("carol", 2)]

    rename(carol, token, "Project")
    assert room_of(bob, token)["displayName"] == "Project"

    carol.post(f"/room/{token}/public")
    assert room_of(dave, token)["type"] == 3
    set_password(alice, token, "letmein")
    assert room_of(guest, token)["hasPassword"] is True

    join(guest, token, status=403)
    join(guest, token, password="wrong", status=403)
    join(guest, token, password="letmein")
    join(dave, token, status=403)
    join(dave, token, password="letmein")
    join(bob, token)  # members need no password
    assert types(alice, token) == [
        ("alice", 1),
        ("bob", 3),
        ("carol", 2),
        ("dave", 5),
        ("guest", 4),
    ]
    assert room_of(alice, token)["count"] == 3

    alice.delete(f"/room/{token}/public")
    assert room_of(alice, token)["type"] == 2
    assert types(alice, token) == [("alice", 1), ("bob", 3), ("carol", 2)]
    room_of(dave, token, status=404)
    room_of(guest, token, status=404)
    assert room_of(alice, token)["count"] == 1  # bob is still joined

    alice.delete(f"/room/{token}")
    for client in (alice, bob, carol):
        room_of(client, token, status=404)
        assert token not in tokens(client)


def test_life_of_a_one_to_one_room(alice, bob, carol):
    token = create(alice, 1, status=201, invite="bob")
    assert create(alice, 1, status=200, invite="bob") == token
    rename(alice, token, "Ours", status=405)

    assert add(alice, token, "carol").data == {"type": 2}
    assert room_of(bob, token)["type"] == 2
    assert types(alice, token) == [("alice", 1), ("bob", 1), ("carol", 3)]
    rename(alice, token, "Three of us")  # a group room now

    fresh = create(alice, 1, status=201, invite="bob")
    assert fresh != token
    promote(alice, fresh, "bob", status=403)  # both partners are owners
    alice.delete(f"/room/{fresh}/moderators", {"participant": "bob"}, status=412)
    assert types(alice, fresh) == [("alice", 1), ("bob", 1)]

    alice.delete(f"/room/{fresh}/participants/self", status=200)
    room_of(alice, fresh, status=404)
    room_of(bob, fresh, status=404)
    assert tokens(bob) == [token]


# ---------------------------------------------------------------------------
# Indexes
# ---------------------------------------------------------------------------

WATCHED_TABLES = re.compile(r"\b(rooms|participants|sessions)\b")


@contextlib.contextmanager
def traced_statements(app, monkeypatch):
    """Record every SQL statement (values expanded) the app runs meanwhile."""
    statements = []
    tracing = [True]

    def record(sql):
        if tracing[0]:
            statements.append(sql)

    app.talk.db.on_sql = record  # every connection of the pool, and the writer
    try:
        yield statements
    finally:
        tracing[0] = False
        app.talk.db.on_sql = None


def test_lookups_by_token_user_and_session_id_use_indexes(app, monkeypatch, alice, bob, guest):
    token = create(alice, 3, roomName="Open")
    add(alice, token, "carol")
    with traced_statements(app, monkeypatch) as statements:
        alice.get("/room")
        room_of(alice, token)
        bob.get(f"/room/{token}")
        alice_session = join(alice, token)
        bob_session = join(bob, token)
        guest_session = join(guest, token)
        bob.get("/room")
        alice.get(f"/room/{token}/participants")
        bob.post(f"/call/{token}")
        bob.post(f"/call/{token}/ping")
        fn = json.dumps({"to": alice_session, "type": "offer"})
        messages = json.dumps([{"ev": "message", "fn": fn, "sessionId": bob_session}])
        bob.post("/signaling", {"messages": messages})
        alice.delete(f"/room/{token}/participants/guests", {"participant": guest_session})
        alice.post(f"/room/{token}/moderators", {"participant": "carol"})
        bob.delete(f"/room/{token}/participants/active")
    assert any(f"'{token}'" in sql for sql in statements)  # by token
    assert any("'bob'" in sql and "participants" in sql for sql in statements)  # by user
    assert any(alice_session in sql for sql in statements)  # by session id
    assert any(guest_session in sql for sql in statements)

    scans = []
    with app.talk.db.read() as db:
        for sql in statements:
            text = sql.strip()
            first = text.split(None, 1)[0].upper() if text else ""
            if first not in ("SELECT", "UPDATE", "DELETE", "WITH") or not WATCHED_TABLES.search(
                text
            ):
                continue
            for row in db.execute("EXPLAIN QUERY PLAN " + text):
                detail = row[3]
                if (
                    detail.startswith("SCAN ")
                    and "json_each" not in detail
                    and "CONSTANT ROW" not in detail
                ):
                    scans.append((detail, " ".join(text.split())[:300]))
    assert scans == []


# --- GET /room answers are reused within a second until something is written ---


def test_room_list_shows_a_rename_at_once(alice, group_room):
    assert room_of(alice, group_room)["name"] == "Team"
    alice.get("/room")  # cached now
    alice.put(f"/room/{group_room}", {"roomName": "Renamed"})
    assert [room["name"] for room in alice.get("/room").data] == ["Renamed"]


def test_room_list_shows_another_process_change_a_second_later(alice, group_room, db_path, clock):
    alice.get("/room")  # cached for this second
    with sqlite3.connect(db_path) as other:  # as the command line would
        other.execute("UPDATE rooms SET name = 'Elsewhere'")
    assert [room["name"] for room in alice.get("/room").data] == ["Team"]
    clock.advance(1)
    assert [room["name"] for room in alice.get("/room").data] == ["Elsewhere"]
