"""Call management (api-v1.md "Call management", SPEC 2 and 5).

GET /call/{token} lists the active sessions in the call; POST joins it, POST
/ping keeps it alive, DELETE leaves it. "Joined" means a session in the room.
"""

from conftest import API, START
from helpers import group_room_with as group_room
from helpers import join
from helpers import public_room_with as public_room

# --- Helpers -----------------------------------------------------------------


def peers(client, token):
    return client.get(f"/call/{token}", status=200).data


def row_of(client, token, session_id):
    """The participant row with this session, as the participants list shows it."""
    rows = client.get(f"/room/{token}/participants", status=200).data
    return next(row for row in rows if row["sessionId"] == session_id)


def room_of(client, token):
    return client.get(f"/room/{token}", status=200).data


# --- GET /call/{token}: Get list of connected participants ---------------------


def test_peers_list_is_empty_before_anyone_joins_the_call(alice):
    token = group_room(alice)
    join(alice, token)
    assert peers(alice, token) == []


def test_peers_list_shows_a_user_in_the_call(alice, clock):
    token = group_room(alice)
    session = join(alice, token)
    clock.advance(5)
    alice.post(f"/call/{token}", status=200)
    assert peers(alice, token) == [
        {"userId": "alice", "token": token, "lastPing": START + 5, "sessionId": session}
    ]
    assert len(session) == 512 and session.isalnum()


def test_peers_list_shows_a_guest_with_an_empty_user_id(alice, guest):
    token = public_room(alice)
    session = join(guest, token)
    guest.post(f"/call/{token}", status=200)
    listed = peers(guest, token)
    assert listed == [{"userId": "", "token": token, "lastPing": START, "sessionId": session}]
    assert peers(alice, token) == listed  # a member who has not joined may look


def test_peers_list_has_users_and_guests_in_the_call_only(alice, bob, carol, guest):
    token = public_room(alice, bob, carol)
    alice_session = join(alice, token)
    bob_session = join(bob, token)
    join(carol, token)  # joined the room, not the call
    guest_session = join(guest, token)
    for client in (alice, bob, guest):
        client.post(f"/call/{token}", status=200)
    listed = peers(carol, token)
    assert sorted(p["sessionId"] for p in listed) == sorted(
        [alice_session, bob_session, guest_session]
    )
    assert sorted(p["userId"] for p in listed) == ["", "alice", "bob"]
    assert {tuple(sorted(p)) for p in listed} == {("lastPing", "sessionId", "token", "userId")}


def test_inactive_sessions_are_not_in_the_peers_list(alice, bob, clock):
    token = group_room(alice, bob)
    join(alice, token)
    bob_session = join(bob, token)
    alice.post(f"/call/{token}", status=200)
    bob.post(f"/call/{token}", status=200)
    clock.advance(31)
    assert peers(alice, token) == []
    bob.post(f"/call/{token}/ping", status=200)
    assert [p["sessionId"] for p in peers(alice, token)] == [bob_session]


def test_a_session_seen_exactly_30_seconds_ago_is_inactive(alice, clock):
    token = group_room(alice)
    join(alice, token)
    alice.post(f"/call/{token}", status=200)
    clock.advance(29)
    assert len(peers(alice, token)) == 1
    clock.advance(1)
    assert peers(alice, token) == []


def test_member_who_has_not_joined_may_list_peers(alice, bob):
    token = group_room(alice, bob)
    join(alice, token)
    alice.post(f"/call/{token}", status=200)
    assert [p["userId"] for p in peers(bob, token)] == ["alice"]


def test_peers_list_of_a_group_room_is_404_for_a_non_member(alice, carol, guest):
    token = group_room(alice)
    carol.get(f"/call/{token}", status=404)
    guest.get(f"/call/{token}", status=404)


def test_peers_list_of_a_public_room_is_404_until_joined(alice, carol, guest):
    token = public_room(alice)
    carol.get(f"/call/{token}", status=404)
    guest.get(f"/call/{token}", status=404)
    join(carol, token)
    join(guest, token)
    assert peers(carol, token) == []
    assert peers(guest, token) == []


def test_peers_list_of_an_unknown_room_is_404(alice, guest):
    response = alice.get("/call/abcdefgh", status=404)
    assert response.meta["statuscode"] == 404
    assert response.meta["status"] == "failure"
    guest.get("/call/abcdefgh", status=404)


# --- POST /call/{token}: Join a call ---------------------------------------------


def test_join_call_sets_in_call_and_has_call(alice, bob):
    token = group_room(alice, bob)
    session = join(alice, token)
    before = room_of(alice, token)
    assert before["hasCall"] is False
    assert before["participantInCall"] is False
    assert alice.post(f"/call/{token}", status=200).data == []
    mine = room_of(alice, token)
    assert mine["hasCall"] is True
    assert mine["participantInCall"] is True
    assert mine["participants"]["alice"]["call"] is True
    assert row_of(alice, token, session)["inCall"] is True
    theirs = room_of(bob, token)
    assert theirs["hasCall"] is True
    assert theirs["participantInCall"] is False


def test_guest_joins_a_call(alice, guest, clock):
    token = public_room(alice)
    session = join(guest, token)
    clock.advance(7)
    guest.post(f"/call/{token}", status=200)
    row = row_of(guest, token, session)
    assert row["inCall"] is True
    assert row["userId"] == ""
    assert row["lastPing"] == START + 7  # joining the call refreshes lastPing
    shown = room_of(guest, token)
    assert shown["participantInCall"] is True
    assert shown["hasCall"] is True


def test_joining_a_call_refreshes_last_ping(alice, clock):
    token = group_room(alice)
    session = join(alice, token)
    clock.advance(20)
    alice.post(f"/call/{token}", status=200)
    assert row_of(alice, token, session)["lastPing"] == START + 20
    assert room_of(alice, token)["lastPing"] == START + 20


def test_member_who_has_not_joined_the_room_cannot_join_the_call(alice, bob):
    token = group_room(alice, bob)
    alice.post(f"/call/{token}", status=404)  # the owner, not joined
    bob.post(f"/call/{token}", status=404)
    assert room_of(alice, token)["hasCall"] is False


def test_member_who_left_the_room_cannot_join_the_call(alice):
    token = group_room(alice)
    join(alice, token)
    alice.delete(f"/room/{token}/participants/active", status=200)
    alice.post(f"/call/{token}", status=404)


def test_user_who_joined_a_public_room_joins_its_call(alice, carol):
    token = public_room(alice)
    carol.post(f"/call/{token}", status=404)
    session = join(carol, token)
    carol.post(f"/call/{token}", status=200)
    assert [p["sessionId"] for p in peers(carol, token)] == [session]
    assert row_of(carol, token, session)["participantType"] == 5


def test_join_call_is_404_for_outsiders_and_unknown_rooms(alice, carol, guest):
    token = group_room(alice)
    carol.post(f"/call/{token}", status=404)
    guest.post(f"/call/{token}", status=404)
    public = public_room(alice)
    guest.post(f"/call/{public}", status=404)  # not joined
    alice.post("/call/abcdefgh", status=404)
    guest.post("/call/abcdefgh", status=404)


def test_a_session_in_another_room_does_not_open_this_call(alice, guest):
    joined = public_room(alice)
    other = public_room(alice)
    join(guest, joined)
    guest.post(f"/call/{other}", status=404)
    guest.post(f"/call/{other}/ping", status=404)
    guest.delete(f"/call/{other}", status=404)


# --- POST /call/{token}/ping: Send ping to keep the call alive -------------------


def test_ping_refreshes_last_ping(alice, clock):
    token = group_room(alice)
    session = join(alice, token)
    alice.post(f"/call/{token}", status=200)
    clock.advance(25)
    assert alice.post(f"/call/{token}/ping", status=200).data == []
    assert row_of(alice, token, session)["lastPing"] == START + 25
    assert peers(alice, token)[0]["lastPing"] == START + 25


def test_pings_keep_a_call_alive_past_the_active_window(alice, guest, clock):
    token = public_room(alice)
    join(alice, token)
    guest_session = join(guest, token)
    alice.post(f"/call/{token}", status=200)
    guest.post(f"/call/{token}", status=200)
    for _ in range(3):
        clock.advance(20)
        guest.post(f"/call/{token}/ping", status=200)
    # Sixty seconds on, only the guest that pinged is still in the call list.
    assert [p["sessionId"] for p in peers(guest, token)] == [guest_session]


def test_guest_ping_refreshes_its_last_ping(alice, guest, clock):
    token = public_room(alice)
    session = join(guest, token)
    clock.advance(12)
    guest.post(f"/call/{token}/ping", status=200)
    assert row_of(guest, token, session)["lastPing"] == START + 12


def test_ping_without_joining_the_room_is_404(alice, bob, carol, guest):
    token = group_room(alice, bob)
    bob.post(f"/call/{token}/ping", status=404)  # member, not joined
    carol.post(f"/call/{token}/ping", status=404)
    public = public_room(alice)
    carol.post(f"/call/{public}/ping", status=404)
    guest.post(f"/call/{public}/ping", status=404)
    alice.post("/call/abcdefgh/ping", status=404)


def test_ping_outside_the_call_is_allowed_for_a_joined_session(alice, clock):
    token = group_room(alice)
    session = join(alice, token)
    clock.advance(3)
    alice.post(f"/call/{token}/ping", status=200)
    assert row_of(alice, token, session)["lastPing"] == START + 3
    assert row_of(alice, token, session)["inCall"] is False


# --- DELETE /call/{token}: Leave a call --------------------------------------------


def test_leave_call_stays_in_the_room(alice):
    token = group_room(alice)
    session = join(alice, token)
    alice.post(f"/call/{token}", status=200)
    assert alice.delete(f"/call/{token}", status=200).data == []
    assert peers(alice, token) == []
    shown = room_of(alice, token)
    assert shown["participantInCall"] is False
    assert shown["hasCall"] is False
    assert shown["sessionId"] == session
    assert row_of(alice, token, session)["inCall"] is False
    alice.post(f"/call/{token}", status=200)  # and may join the call again


def test_has_call_becomes_false_when_the_last_one_leaves(alice, bob, guest):
    token = public_room(alice, bob)
    join(alice, token)
    join(bob, token)
    join(guest, token)
    for client in (alice, bob, guest):
        client.post(f"/call/{token}", status=200)
    alice.delete(f"/call/{token}", status=200)
    assert room_of(alice, token)["hasCall"] is True
    guest.delete(f"/call/{token}", status=200)
    assert room_of(alice, token)["hasCall"] is True
    bob.delete(f"/call/{token}", status=200)
    assert room_of(alice, token)["hasCall"] is False
    assert room_of(bob, token)["hasCall"] is False
    assert peers(alice, token) == []


def test_has_call_becomes_false_when_the_last_one_leaves_the_room(alice, guest):
    token = public_room(alice)
    join(alice, token)
    join(guest, token)
    guest.post(f"/call/{token}", status=200)
    assert room_of(alice, token)["hasCall"] is True
    guest.delete(f"/room/{token}/participants/active", status=200)
    assert room_of(alice, token)["hasCall"] is False
    assert peers(alice, token) == []


def test_has_call_becomes_false_when_the_last_one_is_removed(alice, guest):
    token = public_room(alice)
    join(alice, token)
    guest_session = join(guest, token)
    guest.post(f"/call/{token}", status=200)
    alice.delete(f"/room/{token}/participants/guests", {"participant": guest_session}, status=200)
    assert room_of(alice, token)["hasCall"] is False


def test_member_leaving_the_room_leaves_the_call(alice, bob):
    token = group_room(alice, bob)
    join(alice, token)
    join(bob, token)
    bob.post(f"/call/{token}", status=200)
    bob.delete(f"/room/{token}/participants/active", status=200)
    assert room_of(bob, token)["participantInCall"] is False
    assert room_of(alice, token)["hasCall"] is False


def test_guest_leaves_a_call(alice, guest):
    token = public_room(alice)
    session = join(guest, token)
    guest.post(f"/call/{token}", status=200)
    guest.delete(f"/call/{token}", status=200)
    assert row_of(guest, token, session)["inCall"] is False
    assert peers(guest, token) == []


def test_guest_with_no_session_may_leave_a_call(alice, anonymous, guest):
    token = public_room(alice)
    assert anonymous.delete(f"/call/{token}", status=200).data == []
    # A guest cookie with no session in any room: still 200, nothing changes.
    other = public_room(alice)
    join(guest, other)
    guest.delete(f"/room/{other}/participants/active", status=200)
    guest.delete(f"/call/{token}", status=200)
    assert guest.get(f"/room/{token}/participants", status=200).data[0]["userId"] == "alice"


def test_leave_call_of_an_unknown_or_hidden_room_is_404_even_without_a_session(alice, anonymous):
    anonymous.delete("/call/abcdefgh", status=404)
    alice.delete("/call/abcdefgh", status=404)
    token = group_room(alice)
    anonymous.delete(f"/call/{token}", status=404)


def test_leave_call_without_joining_the_room_is_404(alice, bob, carol):
    token = group_room(alice, bob)
    bob.delete(f"/call/{token}", status=404)  # member, not joined
    carol.delete(f"/call/{token}", status=404)  # not a member
    public = public_room(alice)
    carol.delete(f"/call/{public}", status=404)  # may see it, has not joined


def test_leave_call_when_joined_but_not_in_the_call_is_200(alice):
    token = group_room(alice)
    join(alice, token)
    alice.delete(f"/call/{token}", status=200)
    assert room_of(alice, token)["hasCall"] is False


# --- Authentication, CSRF, OCS v1 ----------------------------------------------------


def test_call_endpoints_reject_wrong_credentials_with_401(alice, wrong_password):
    token = group_room(alice)
    join(alice, token)
    for method, path in (
        ("get", f"/call/{token}"),
        ("post", f"/call/{token}"),
        ("post", f"/call/{token}/ping"),
        ("delete", f"/call/{token}"),
    ):
        getattr(wrong_password, method)(path, status=401)
    assert room_of(alice, token)["hasCall"] is False


def test_call_endpoints_need_the_csrf_header(alice):
    token = group_room(alice)
    join(alice, token)
    response = alice.post(f"/call/{token}", status=412, headers={"OCS-APIRequest": "false"})
    assert response.json == {"message": "CSRF check failed"}
    assert room_of(alice, token)["hasCall"] is False


def test_call_under_ocs_v1_maps_statuses(alice):
    v1 = API.replace("v2.php", "v1.php")
    token = group_room(alice)
    missing = alice.post(f"/call/{token}", status=200, prefix=v1)
    assert missing.meta["statuscode"] == 404
    join(alice, token)
    joined = alice.post(f"/call/{token}", status=200, prefix=v1)
    assert joined.meta["statuscode"] == 100
    assert joined.meta["status"] == "ok"
