"""Participant management (api-v1.md "Participant management", SPEC 4) and
the sessions and activity of joins (SPEC 2): who does what, expecting which code.

Actors: the owner (alice), a moderator, a member, a self-joined user (type 5),
a guest with a cookie, a logged-in non-member and an anonymous caller.
"""

import re

from helpers import (
    add,
    create,
    demote,
    join,
    leave,
    listed,
    promote,
    remove,
    remove_guest,
    remove_self,
    room_of,
    scalar,
    tokens,
    types,
)

CLOUD = "/ocs/v2.php/cloud"
START = 1_700_000_000  # the conftest clock's start
SESSION_ID = re.compile(r"[A-Za-z0-9]{512}")
PARTICIPANT_KEYS = {"userId", "displayName", "participantType", "lastPing", "sessionId", "inCall"}


def guest_session(client, token):
    """The session id of the (single) guest row of a room."""
    (row,) = [row for row in listed(client, token) if row["userId"] == ""]
    return row["sessionId"]


# ---------------------------------------------------------------------------
# GET /room/{token}/participants: Get list of participants in a room
# ---------------------------------------------------------------------------


def test_list_participants_by_owner_is_200_with_every_row(alice, public_room):
    rows = listed(alice, public_room, status=200)
    assert all(set(row) == PARTICIPANT_KEYS for row in rows)
    assert types(alice, public_room) == [
        ("alice", 1),
        ("bob", 2),
        ("carol", 3),
        ("dave", 5),
        ("guest", 4),
    ]


def test_list_participants_shows_inactive_rows_too(alice, public_room):
    carol = next(row for row in listed(alice, public_room) if row["userId"] == "carol")
    assert carol == {
        "userId": "carol",
        "displayName": "Carol",
        "participantType": 3,
        "lastPing": 0,  # added, never joined: never seen
        "sessionId": "0",
        "inCall": False,
    }


def test_list_participants_users_first_then_guests(alice, bob, guest, other_guest, clock):
    token = create(alice, 3)
    join(guest, token)
    clock.advance(1)
    join(other_guest, token)
    clock.advance(1)
    add(alice, token, "bob")  # a user added after the guests joined
    assert [bool(row["userId"]) for row in listed(alice, token)] == [True, True, False, False]


def test_list_participants_guest_rows_have_empty_user_id_and_display_name(
    alice, guest, public_room
):
    session = join(guest, public_room)
    (row,) = [row for row in listed(alice, public_room) if row["participantType"] == 4]
    assert row == {
        "userId": "",
        "displayName": "",
        "participantType": 4,
        "lastPing": START,
        "sessionId": session,
        "inCall": False,
    }


def test_list_participants_shows_session_ping_and_call(alice, bob, group_room, clock):
    clock.advance(7)
    session = join(bob, group_room)
    bob.post(f"/call/{group_room}")
    row = next(row for row in listed(alice, group_room) if row["userId"] == "bob")
    assert (row["sessionId"], row["lastPing"], row["inCall"]) == (session, START + 7, True)


def test_list_participants_by_moderator_and_member_is_200(bob, carol, group_room):
    assert len(listed(bob, group_room, status=200)) == 3
    assert len(listed(carol, group_room, status=200)) == 3


def test_list_participants_by_self_joined_user_is_200(dave, public_room):
    assert len(listed(dave, public_room, status=200)) == 5


def test_list_participants_by_joined_guest_is_200(guest, public_room):
    assert len(listed(guest, public_room, status=200)) == 5


def test_list_participants_of_public_room_by_non_member_user_is_200(alice, make_client):
    token = create(alice, 3)
    assert [row["userId"] for row in listed(make_client("dave"), token, status=200)] == ["alice"]


def test_list_participants_of_public_room_anonymous_is_200(anonymous, public_room):
    assert len(listed(anonymous, public_room, status=200)) == 5


def test_list_participants_of_group_room_by_non_member_is_404(dave, group_room):
    listed(dave, group_room, status=404)


def test_list_participants_of_group_room_by_guest_with_cookie_is_404(guest_with_cookie, group_room):
    listed(guest_with_cookie, group_room, status=404)


def test_list_participants_of_group_room_anonymous_is_404(anonymous, group_room):
    listed(anonymous, group_room, status=404)


def test_list_participants_of_unknown_room_is_404(alice, anonymous):
    listed(alice, "unknown1", status=404)
    listed(anonymous, "unknown1", status=404)


def test_list_participants_with_wrong_password_is_401(wrong_password, public_room):
    wrong_password.get(f"/room/{public_room}/participants", status=401)


# ---------------------------------------------------------------------------
# POST /room/{token}/participants: Add a participant to a room
# ---------------------------------------------------------------------------


def test_add_participant_by_owner_is_200_as_user(alice, dave, group_room):
    assert add(alice, group_room, "dave", status=200).data == []
    room = room_of(dave, group_room)
    assert (room["participantType"], room["sessionId"]) == (3, "0")
    assert group_room in tokens(dave)


def test_add_participant_by_moderator_is_200(bob, dave, group_room):
    add(bob, group_room, "dave", status=200)
    assert room_of(dave, group_room)["participantType"] == 3


def test_add_participant_by_member_is_403(carol, dave, group_room):
    add(carol, group_room, "dave", status=403)
    room_of(dave, group_room, status=404)


def test_add_participant_by_self_joined_user_is_404(dave, public_room):
    add(dave, public_room, "dave", status=404)
    assert room_of(dave, public_room)["participantType"] == 5


def test_add_participant_by_non_member_is_404(dave, group_room):
    add(dave, group_room, "dave", status=404)


def test_add_participant_by_guest_with_cookie_is_401(guest, public_room):
    add(guest, public_room, "dave", status=401)


def test_add_participant_anonymous_is_401(anonymous, group_room):
    add(anonymous, group_room, "dave", status=401)


def test_add_participant_to_unknown_room_is_404(alice):
    add(alice, "unknown1", "bob", status=404)


def test_add_unknown_user_is_404(alice, group_room):
    add(alice, group_room, "nobody", status=404)
    assert len(listed(alice, group_room)) == 3


def test_add_participant_without_new_participant_is_404(alice, group_room):
    alice.post(f"/room/{group_room}/participants", {}, status=404)


def test_add_existing_member_is_200_and_changes_nothing(alice, group_room):
    add(alice, group_room, "bob", status=200)  # bob is a moderator
    add(alice, group_room, "alice", status=200)
    assert types(alice, group_room) == [("alice", 1), ("bob", 2), ("carol", 3)]


def test_add_self_joined_user_is_200_and_changes_nothing(alice, dave, public_room):
    session = room_of(dave, public_room)["sessionId"]
    add(alice, public_room, "dave", status=200)
    room = room_of(dave, public_room)
    assert (room["participantType"], room["sessionId"]) == (5, session)


def test_add_third_user_to_one_to_one_room_makes_it_a_group_room(alice, bob, carol):
    token = create(alice, 1, invite="bob")
    data = add(bob, token, "carol", status=200).data
    assert data == {"type": 2}
    assert type(data["type"]) is int
    assert room_of(carol, token)["type"] == 2
    assert types(alice, token) == [("alice", 1), ("bob", 1), ("carol", 3)]


def test_add_partner_again_to_one_to_one_room_keeps_it_one_to_one(alice, bob):
    token = create(alice, 1, invite="bob")
    assert add(alice, token, "bob").data == []
    assert room_of(alice, token)["type"] == 1


def test_add_unknown_user_to_one_to_one_room_is_404_and_keeps_it_one_to_one(alice, bob):
    token = create(alice, 1, invite="bob")
    add(alice, token, "nobody", status=404)
    assert room_of(alice, token)["type"] == 1


# ---------------------------------------------------------------------------
# DELETE /room/{token}/participants: Delete a participant from a room
# ---------------------------------------------------------------------------


def test_remove_participant_by_owner_is_200(alice, carol, group_room):
    assert remove(alice, group_room, "carol", status=200).data == []
    room_of(carol, group_room, status=404)
    assert group_room not in tokens(carol)


def test_remove_participant_by_moderator_is_200(bob, carol, group_room):
    remove(bob, group_room, "carol", status=200)
    assert types(bob, group_room) == [("alice", 1), ("bob", 2)]


def test_remove_moderator_by_owner_is_200(alice, group_room):
    remove(alice, group_room, "bob", status=200)
    assert types(alice, group_room) == [("alice", 1), ("carol", 3)]


def test_remove_participant_by_member_is_403(carol, group_room):
    remove(carol, group_room, "bob", status=403)
    assert len(listed(carol, group_room)) == 3


def test_remove_participant_by_self_joined_user_is_404(dave, public_room):
    remove(dave, public_room, "carol", status=404)


def test_remove_participant_by_non_member_is_404(dave, group_room):
    remove(dave, group_room, "carol", status=404)


def test_remove_participant_by_guest_with_cookie_is_401(guest, public_room):
    remove(guest, public_room, "carol", status=401)


def test_remove_participant_anonymous_is_401(anonymous, group_room):
    remove(anonymous, group_room, "carol", status=401)


def test_remove_participant_from_unknown_room_is_404(alice):
    remove(alice, "unknown1", "bob", status=404)


def test_remove_participant_without_row_is_404(alice, group_room):
    remove(alice, group_room, "dave", status=404)
    remove(alice, group_room, "nobody", status=404)
    alice.delete(f"/room/{group_room}/participants", {}, status=404)


def test_remove_owner_is_403(bob, group_room):
    remove(bob, group_room, "alice", status=403)
    assert ("alice", 1) in types(bob, group_room)


def test_remove_self_joined_user_is_200(alice, dave, public_room):
    remove(alice, public_room, "dave", status=200)
    assert public_room not in tokens(dave)
    assert room_of(dave, public_room)["participantType"] == 4  # no row any more


def test_remove_joined_participant_ends_the_session(app, alice, carol, group_room):
    session = join(carol, group_room)
    remove(alice, group_room, "carol")
    assert scalar(app, "SELECT COUNT(*) FROM sessions WHERE id = ?", session) == 0
    carol.post(f"/call/{group_room}/ping", status=404)


def test_remove_participant_from_one_to_one_room_deletes_the_room(alice, bob):
    token = create(alice, 1, invite="bob")
    remove(alice, token, "bob", status=200)
    room_of(alice, token, status=404)
    room_of(bob, token, status=404)


def test_remove_unknown_participant_from_one_to_one_room_still_deletes_it(alice, bob):
    token = create(alice, 1, invite="bob")
    remove(bob, token, "nobody", status=200)
    room_of(alice, token, status=404)


def test_remove_participant_from_one_to_one_room_by_outsider_is_404(alice, bob, carol):
    token = create(alice, 1, invite="bob")
    remove(carol, token, "bob", status=404)
    room_of(alice, token)


# ---------------------------------------------------------------------------
# DELETE /room/{token}/participants/guests: Remove a guest from a room
# ---------------------------------------------------------------------------


def test_remove_guest_by_owner_is_200(alice, guest, public_room):
    session = guest_session(alice, public_room)
    assert remove_guest(alice, public_room, session, status=200).data == []
    assert ("guest", 4) not in types(alice, public_room)
    room = room_of(guest, public_room)  # still public: it sees the room, without a row
    assert (room["participantType"], room["sessionId"]) == (4, "0")
    guest.post(f"/call/{public_room}/ping", status=404)


def test_remove_guest_by_moderator_is_200(bob, public_room):
    remove_guest(bob, public_room, guest_session(bob, public_room), status=200)
    assert ("guest", 4) not in types(bob, public_room)


def test_remove_guest_by_member_is_403(carol, public_room):
    remove_guest(carol, public_room, guest_session(carol, public_room), status=403)
    assert ("guest", 4) in types(carol, public_room)


def test_remove_guest_by_self_joined_user_is_404(dave, public_room):
    remove_guest(dave, public_room, guest_session(dave, public_room), status=404)


def test_remove_guest_by_non_member_user_is_404(alice, dave, other_guest):
    token = create(alice, 3)
    session = join(other_guest, token)
    remove_guest(dave, token, session, status=404)
    assert guest_session(alice, token) == session


def test_remove_guest_by_guest_with_cookie_is_401(alice, guest, other_guest, public_room):
    session = join(other_guest, public_room)
    remove_guest(guest, public_room, session, status=401)
    assert types(alice, public_room).count(("guest", 4)) == 2


def test_remove_guest_anonymous_is_401(anonymous, alice, public_room):
    remove_guest(anonymous, public_room, guest_session(alice, public_room), status=401)


def test_remove_guest_from_unknown_room_is_404(alice):
    remove_guest(alice, "unknown1", "x" * 512, status=404)


def test_remove_guest_with_unknown_session_is_404(alice, public_room):
    remove_guest(alice, public_room, "x" * 512, status=404)
    alice.delete(f"/room/{public_room}/participants/guests", {}, status=404)


def test_remove_guest_with_a_users_session_is_403(alice, dave, public_room):
    session = room_of(dave, public_room)["sessionId"]
    remove_guest(alice, public_room, session, status=403)
    assert room_of(dave, public_room)["participantType"] == 5


def test_remove_guest_with_a_session_of_another_room_is_404(alice, guest, public_room):
    other = create(alice, 3)
    session = join(guest, other)
    remove_guest(alice, public_room, session, status=404)
    assert room_of(guest, other)["sessionId"] == session


def test_removing_the_last_guest_in_the_call_ends_the_call(alice, guest, public_room):
    guest.post(f"/call/{public_room}")
    assert room_of(alice, public_room)["hasCall"] is True
    remove_guest(alice, public_room, guest_session(alice, public_room))
    assert room_of(alice, public_room)["hasCall"] is False


# ---------------------------------------------------------------------------
# DELETE /room/{token}/participants/self: Remove yourself from a room
# ---------------------------------------------------------------------------


def test_remove_self_by_member_is_200(carol, group_room):
    assert remove_self(carol, group_room, status=200).data == []
    room_of(carol, group_room, status=404)
    assert group_room not in tokens(carol)


def test_remove_self_by_moderator_is_200(alice, bob, group_room):
    remove_self(bob, group_room, status=200)
    assert types(alice, group_room) == [("alice", 1), ("carol", 3)]


def test_remove_self_by_owner_leaves_the_room_to_the_others(alice, bob, group_room):
    remove_self(alice, group_room, status=200)
    assert types(bob, group_room) == [("bob", 2), ("carol", 3)]


def test_remove_self_by_self_joined_user_is_200(alice, dave, public_room):
    remove_self(dave, public_room, status=200)
    assert public_room not in tokens(dave)
    assert ("dave", 5) not in types(alice, public_room)


def test_remove_self_as_last_participant_deletes_the_room(app, alice):
    token = create(alice, 2, roomName="Solo")
    remove_self(alice, token, status=200)
    room_of(alice, token, status=404)
    assert scalar(app, "SELECT COUNT(*) FROM rooms WHERE token = ?", token) == 0


def test_remove_self_from_one_to_one_room_deletes_it(alice, bob):
    token = create(alice, 1, invite="bob")
    remove_self(bob, token, status=200)
    room_of(alice, token, status=404)


def test_remove_self_by_non_member_is_404(dave, group_room):
    remove_self(dave, group_room, status=404)


def test_remove_self_from_public_room_without_row_is_404(alice, make_client):
    token = create(alice, 3)
    remove_self(make_client("dave"), token, status=404)


def test_remove_self_from_unknown_room_is_404(alice):
    remove_self(alice, "unknown1", status=404)


def test_remove_self_by_guest_with_cookie_is_401(guest, public_room):
    remove_self(guest, public_room, status=401)
    assert room_of(guest, public_room)["participantType"] == 4


def test_remove_self_anonymous_is_401(anonymous, public_room):
    remove_self(anonymous, public_room, status=401)


# ---------------------------------------------------------------------------
# POST /room/{token}/participants/active: Join a room
# ---------------------------------------------------------------------------


def test_join_by_member_is_200_with_a_512_character_session_id(alice, group_room):
    response = alice.post(f"/room/{group_room}/participants/active", status=200)
    assert list(response.data) == ["sessionId"]
    assert SESSION_ID.fullmatch(response.data["sessionId"])


def test_join_sets_session_and_last_ping(alice, group_room, clock):
    clock.advance(42)
    session = join(alice, group_room)
    room = room_of(alice, group_room)
    assert (room["sessionId"], room["lastPing"]) == (session, START + 42)


def test_join_by_moderator_and_member_is_200(bob, carol, group_room):
    assert SESSION_ID.fullmatch(join(bob, group_room))
    assert SESSION_ID.fullmatch(join(carol, group_room))


def test_join_by_member_needs_no_password(alice, carol, public_room):
    alice.put(f"/room/{public_room}/password", {"password": "s3cret"})
    join(carol, public_room, status=200)
    join(carol, public_room, password="wrong", status=200)


def test_join_public_room_by_non_member_user_makes_a_self_joined_row(alice, make_client):
    token = create(alice, 3)
    dave = make_client("dave")
    session = join(dave, token, status=200)
    room = room_of(dave, token)
    assert (room["participantType"], room["sessionId"]) == (5, session)
    assert token in tokens(dave)


def test_join_public_room_by_guest_makes_a_guest_row_and_sets_a_cookie(alice, guest):
    token = create(alice, 3)
    response = guest.post(f"/room/{token}/participants/active", status=200)
    cookies = response.headers.getall("Set-Cookie")
    assert len(cookies) == 1
    cookie = cookies[0].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    room = room_of(guest, token)
    assert (room["participantType"], room["sessionId"]) == (4, response.data["sessionId"])


def test_join_with_password_by_self_joined_user(alice, public_room, make_client):
    alice.put(f"/room/{public_room}/password", {"password": "s3cret"})
    dave = make_client("dave")
    join(dave, public_room, status=403)
    join(dave, public_room, password="wrong", status=403)
    join(dave, public_room, password="s3cret", status=200)


def test_join_with_wrong_or_missing_password_by_non_member_user_is_403(alice, make_client):
    token = create(alice, 3)
    alice.put(f"/room/{token}/password", {"password": "s3cret"})
    dave = make_client("dave")
    join(dave, token, status=403)
    join(dave, token, password="wrong", status=403)
    assert types(alice, token) == [("alice", 1)]
    join(dave, token, password="s3cret", status=200)
    assert types(alice, token) == [("alice", 1), ("dave", 5)]


def test_join_with_wrong_or_missing_password_by_guest_is_403(alice, guest):
    token = create(alice, 3)
    alice.put(f"/room/{token}/password", {"password": "s3cret"})
    join(guest, token, status=403)
    join(guest, token, password="S3CRET", status=403)
    assert types(alice, token) == [("alice", 1)]
    join(guest, token, password="s3cret", status=200)
    assert types(alice, token) == [("alice", 1), ("guest", 4)]


def test_join_group_room_by_non_member_is_404(dave, group_room):
    join(dave, group_room, status=404)


def test_join_group_room_by_guest_with_cookie_is_404(guest_with_cookie, group_room):
    join(guest_with_cookie, group_room, status=404)


def test_join_group_room_anonymous_is_404(anonymous, group_room):
    join(anonymous, group_room, status=404)


def test_join_unknown_room_is_404(alice, guest):
    join(alice, "unknown1", status=404)
    join(guest, "unknown1", status=404)


def test_join_with_wrong_password_credentials_is_401(wrong_password, public_room):
    wrong_password.post(f"/room/{public_room}/participants/active", status=401)


def test_rejoin_gives_a_new_session_and_ends_the_old_one(app, alice, group_room):
    first = join(alice, group_room)
    second = join(alice, group_room)
    assert first != second
    assert room_of(alice, group_room)["sessionId"] == second
    assert types(alice, group_room).count(("alice", 1)) == 1
    assert scalar(app, "SELECT COUNT(*) FROM sessions WHERE id = ?", first) == 0


def test_sessions_are_per_room(alice, bob, group_room):
    other = create(alice, 2, roomName="Other")
    in_team = join(alice, group_room)
    in_other = join(alice, other)
    assert in_team != in_other
    assert room_of(alice, group_room)["sessionId"] == in_team
    assert room_of(alice, other)["sessionId"] == in_other
    leave(alice, other)
    assert room_of(alice, group_room)["sessionId"] == in_team


def test_session_ids_are_unique(alice, bob, carol, guest, other_guest, public_room):
    sessions = [join(client, public_room) for client in (alice, bob, carol, guest, other_guest)]
    assert len(set(sessions)) == 5
    assert all(SESSION_ID.fullmatch(session) for session in sessions)


def test_guest_rejoining_reuses_its_guest_row(alice, guest, public_room, clock):
    first = guest_session(alice, public_room)
    clock.advance(10)
    second = join(guest, public_room)
    assert second != first
    rows = [row for row in listed(alice, public_room) if row["participantType"] == 4]
    assert [(row["sessionId"], row["lastPing"]) for row in rows] == [(second, START + 10)]


def test_two_guests_get_two_rows(alice, guest, other_guest, public_room):
    join(other_guest, public_room)
    assert types(alice, public_room).count(("guest", 4)) == 2


def test_guest_keeps_one_row_per_room(alice, guest, public_room):
    other = create(alice, 3)
    in_public = room_of(guest, public_room)["sessionId"]
    in_other = join(guest, other)
    assert room_of(guest, public_room)["sessionId"] == in_public
    assert room_of(guest, other)["sessionId"] == in_other


def test_joined_actor_is_active_for_30_seconds(alice, bob, group_room, clock):
    join(bob, group_room)
    clock.advance(29)
    assert room_of(alice, group_room)["count"] == 1
    clock.advance(1)  # lastPing > now - 30 no longer holds
    assert room_of(alice, group_room)["count"] == 0


def test_inactive_member_keeps_row_and_session(alice, bob, group_room, clock):
    session = join(bob, group_room)
    clock.advance(31)
    room = room_of(bob, group_room)
    assert (room["count"], room["sessionId"], room["participantType"]) == (0, session, 2)
    join(bob, group_room)
    assert room_of(alice, group_room)["count"] == 1


def test_inactive_guest_row_vanishes(alice, guest, public_room, clock):
    clock.advance(31)
    assert ("guest", 4) not in types(alice, public_room)
    room = room_of(guest, public_room)
    assert (room["participantType"], room["sessionId"], room["lastPing"]) == (4, "0", 0)
    guest.post(f"/call/{public_room}/ping", status=404)
    session = join(guest, public_room)  # joins again
    assert guest_session(alice, public_room) == session


def test_active_guest_row_stays(alice, guest, public_room, clock):
    session = guest_session(alice, public_room)
    clock.advance(29)
    assert guest_session(alice, public_room) == session
    assert room_of(alice, public_room)["numGuests"] == 1


def test_inactive_self_joined_user_keeps_its_row(alice, dave, public_room, clock):
    clock.advance(31)
    assert ("dave", 5) in types(alice, public_room)


# ---------------------------------------------------------------------------
# DELETE /room/{token}/participants/active: Leave a room
# ---------------------------------------------------------------------------


def test_leave_by_member_ends_the_session_and_keeps_the_row(alice, bob, group_room):
    join(bob, group_room)
    bob.post(f"/call/{group_room}")
    assert leave(bob, group_room, status=200).data == []
    room = room_of(bob, group_room)
    assert (room["participantType"], room["sessionId"], room["participantInCall"]) == (
        2,
        "0",
        False,
    )
    assert (room_of(alice, group_room)["count"], room_of(alice, group_room)["hasCall"]) == (
        0,
        False,
    )


def test_leave_by_guest_deletes_its_row(alice, guest, public_room):
    leave(guest, public_room, status=200)
    assert ("guest", 4) not in types(alice, public_room)


def test_leave_by_self_joined_user_deletes_its_row(alice, dave, public_room):
    leave(dave, public_room, status=200)
    assert ("dave", 5) not in types(alice, public_room)
    assert public_room not in tokens(dave)


def test_leave_without_session_is_200_and_changes_nothing(alice, carol, group_room):
    leave(carol, group_room, status=200)
    assert types(alice, group_room) == [("alice", 1), ("bob", 2), ("carol", 3)]


def test_leave_public_room_without_row_is_200(alice, anonymous, guest_with_cookie, make_client):
    token = create(alice, 3)
    leave(anonymous, token, status=200)
    leave(guest_with_cookie, token, status=200)
    leave(make_client("dave"), token, status=200)
    assert types(alice, token) == [("alice", 1)]


def test_leave_one_room_keeps_the_session_in_another(alice, guest, public_room):
    other = create(alice, 3)
    session = join(guest, other)
    leave(guest, public_room)
    assert room_of(guest, other)["sessionId"] == session


def test_leave_group_room_by_non_member_is_404(dave, group_room):
    leave(dave, group_room, status=404)


def test_leave_group_room_by_guest_with_cookie_is_404(guest_with_cookie, group_room):
    leave(guest_with_cookie, group_room, status=404)


def test_leave_group_room_anonymous_is_404(anonymous, group_room):
    leave(anonymous, group_room, status=404)


def test_leave_unknown_room_is_404(alice, guest):
    leave(alice, "unknown1", status=404)
    leave(guest, "unknown1", status=404)


def test_leave_with_wrong_password_credentials_is_401(wrong_password, public_room):
    leave(wrong_password, public_room, status=401)


# ---------------------------------------------------------------------------
# POST /room/{token}/moderators: Promote a user to a moderator
# ---------------------------------------------------------------------------


def test_promote_by_owner_is_200(alice, carol, group_room):
    assert promote(alice, group_room, "carol", status=200).data == []
    assert room_of(carol, group_room)["participantType"] == 2


def test_promote_by_moderator_is_200(bob, carol, group_room):
    promote(bob, group_room, "carol", status=200)
    assert room_of(carol, group_room)["participantType"] == 2


def test_promote_by_member_is_403(carol, group_room, alice):
    add(alice, group_room, "dave")
    promote(carol, group_room, "dave", status=403)
    assert ("dave", 3) in types(alice, group_room)


def test_promote_by_self_joined_user_is_404(dave, public_room):
    promote(dave, public_room, "carol", status=404)


def test_promote_by_non_member_is_404(dave, group_room):
    promote(dave, group_room, "carol", status=404)


def test_promote_by_guest_with_cookie_is_401(guest, public_room):
    promote(guest, public_room, "carol", status=401)


def test_promote_anonymous_is_401(anonymous, group_room):
    promote(anonymous, group_room, "carol", status=401)


def test_promote_in_unknown_room_is_404(alice):
    promote(alice, "unknown1", "bob", status=404)


def test_promote_user_without_row_is_404(alice, group_room):
    promote(alice, group_room, "dave", status=404)
    promote(alice, group_room, "nobody", status=404)
    alice.post(f"/room/{group_room}/moderators", {}, status=404)


def test_promote_owner_is_403(bob, group_room):
    promote(bob, group_room, "alice", status=403)
    assert ("alice", 1) in types(bob, group_room)


def test_promote_one_to_one_partner_is_403(alice, bob):
    token = create(alice, 1, invite="bob")
    promote(alice, token, "bob", status=403)


def test_promote_moderator_is_412(alice, group_room):
    promote(alice, group_room, "bob", status=412)


def test_promote_self_joined_user_is_412(alice, public_room):
    promote(alice, public_room, "dave", status=412)
    assert ("dave", 5) in types(alice, public_room)


# ---------------------------------------------------------------------------
# DELETE /room/{token}/moderators: Demote a moderator to a user
# ---------------------------------------------------------------------------


def test_demote_by_owner_is_200(alice, bob, group_room):
    assert demote(alice, group_room, "bob", status=200).data == []
    assert room_of(bob, group_room)["participantType"] == 3


def test_demote_by_moderator_is_200(alice, bob, carol, group_room):
    promote(alice, group_room, "carol")
    demote(bob, group_room, "carol", status=200)
    assert room_of(carol, group_room)["participantType"] == 3


def test_demote_by_member_is_403(carol, group_room):
    demote(carol, group_room, "bob", status=403)
    assert ("bob", 2) in types(carol, group_room)


def test_demote_by_self_joined_user_is_404(dave, public_room):
    demote(dave, public_room, "bob", status=404)


def test_demote_by_non_member_is_404(dave, group_room):
    demote(dave, group_room, "bob", status=404)


def test_demote_by_guest_with_cookie_is_401(guest, public_room):
    demote(guest, public_room, "bob", status=401)


def test_demote_anonymous_is_401(anonymous, group_room):
    demote(anonymous, group_room, "bob", status=401)


def test_demote_in_unknown_room_is_404(alice):
    demote(alice, "unknown1", "bob", status=404)


def test_demote_yourself_is_403(alice, bob, group_room):
    demote(bob, group_room, "bob", status=403)
    demote(alice, group_room, "alice", status=403)
    assert types(alice, group_room) == [("alice", 1), ("bob", 2), ("carol", 3)]


def test_demote_user_without_row_is_404(alice, group_room):
    demote(alice, group_room, "dave", status=404)
    demote(alice, group_room, "nobody", status=404)


def test_demote_user_is_412(alice, group_room):
    demote(alice, group_room, "carol", status=412)


def test_demote_owner_is_412(alice, bob, group_room):
    demote(bob, group_room, "alice", status=412)


def test_demote_one_to_one_partner_is_412(alice, bob):
    token = create(alice, 1, invite="bob")
    demote(alice, token, "bob", status=412)


def test_demote_self_joined_user_is_412(alice, public_room):
    demote(alice, public_room, "dave", status=412)


# ---------------------------------------------------------------------------
# Deleting a user (SPEC 9) takes them out of every room
# ---------------------------------------------------------------------------


def test_deleting_a_user_removes_them_from_every_room(app, alice, bob, carol, guest, make_client):
    team = create(alice, 2, roomName="Team")
    add(alice, team, "bob")
    add(alice, team, "carol")
    open_room = create(alice, 3, roomName="Open")
    join(bob, open_room)  # type 5
    with_alice = create(alice, 1, invite="bob")
    with_carol = create(bob, 1, invite="carol")
    create(bob, 2, roomName="Bob alone")  # bob was its only participant
    with_guests = create(bob, 3, roomName="Bob and guests")
    join(guest, with_guests)

    alice.delete("/users/bob", prefix=CLOUD, status=200)

    assert types(alice, team) == [("alice", 1), ("carol", 3)]
    assert types(alice, open_room) == [("alice", 1)]
    room_of(alice, with_alice, status=404)
    room_of(carol, with_carol, status=404)
    room_of(guest, with_guests, status=404)  # only guests were left
    assert sorted(tokens(alice)) == sorted([open_room, team])
    assert tokens(carol) == [team]
    with app.talk.db.read() as db:
        left = {row[0] for row in db.execute("SELECT token FROM rooms")}
        assert left == {team, open_room}
    assert scalar(app, "SELECT COUNT(*) FROM participants WHERE user_id = ?", "bob") == 0
    bob.get("/room", status=401)
