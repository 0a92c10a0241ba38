"""User status (Nextcloud's user_status app) and the user search for
invitations (core autocomplete), also through nc-py-api."""

import asyncio

import pytest
from conftest import PASSWORD, START
from helpers import add, create, make_group
from served import served  # noqa: F401

import talk_server

STATUS = "/ocs/v2.php/apps/user_status/api/v1"
AUTOCOMPLETE = "/ocs/v2.php/core/autocomplete/get"


def own(client, status=200):
    return client.get("/user_status", status=status, prefix=STATUS).data


def put(client, path, params=None, status=200):
    return client.put(path, params, status=status, prefix=STATUS).data


def public(client, user_id, status=200):
    return client.get(f"/statuses/{user_id}", status=status, prefix=STATUS).data


# --- Status type ---------------------------------------------------------------


def test_a_user_who_never_set_a_status_reads_offline(alice, bob):
    assert own(alice) == {
        "userId": "alice",
        "message": None,
        "messageId": None,
        "messageIsPredefined": False,
        "icon": None,
        "clearAt": None,
        "status": "offline",
        "statusIsUserDefined": False,
    }
    public(bob, "alice", status=404)


@pytest.mark.parametrize("status", ["online", "away", "dnd", "invisible", "offline"])
def test_set_and_read_the_status_type(alice, status):
    answer = put(alice, "/user_status/status", {"statusType": status})
    assert answer["status"] == status and answer["statusIsUserDefined"] is True
    assert own(alice)["status"] == status


@pytest.mark.parametrize("status", ["busy", "", "ONLINE", "x" * 300])
def test_unknown_status_type_is_400(alice, status):
    put(alice, "/user_status/status", {"statusType": status}, status=400)


def test_missing_status_type_is_400(alice):
    put(alice, "/user_status/status", status=400)


def test_others_see_invisible_as_offline(alice, bob):
    put(alice, "/user_status/status", {"statusType": "invisible"})
    assert own(alice)["status"] == "invisible"
    seen = public(bob, "alice")
    assert seen["status"] == "offline"
    assert set(seen) == {"userId", "message", "icon", "clearAt", "status"}
    assert [s["status"] for s in bob.get("/statuses", prefix=STATUS).data] == ["offline"]


def test_status_needs_a_user(anonymous, guest):
    anonymous.get("/user_status", status=401, prefix=STATUS)
    guest.put("/user_status/status", {"statusType": "online"}, status=401, prefix=STATUS)


def test_status_answers_on_ocs_v1_too(alice):
    response = alice.get("/user_status", prefix="/ocs/v1.php/apps/user_status/api/v1")
    assert response.meta["statuscode"] == 100 and response.data["userId"] == "alice"


# --- Messages ------------------------------------------------------------------


def test_custom_message_set_read_and_clear(alice, bob, clock):
    until = START + 3600
    answer = put(
        alice,
        "/user_status/message/custom",
        {"statusIcon": "\U0001f3d6\ufe0f", "message": "On the beach", "clearAt": until},
    )
    assert (answer["message"], answer["icon"], answer["clearAt"]) == (
        "On the beach", "\U0001f3d6\ufe0f", until
    )
    assert answer["messageIsPredefined"] is False and answer["messageId"] is None
    assert public(bob, "alice")["message"] == "On the beach"
    assert alice.delete("/user_status/message", prefix=STATUS).data == []
    assert own(alice)["message"] is None and own(alice)["icon"] is None


def test_message_disappears_when_clear_at_passes(alice, bob, clock):
    put(alice, "/user_status/status", {"statusType": "dnd"})
    put(alice, "/user_status/message/custom", {"message": "Focus", "clearAt": START + 60})
    clock.advance(59)
    assert own(alice)["message"] == "Focus"
    clock.advance(1)
    mine = own(alice)
    assert mine["message"] is None and mine["clearAt"] is None
    assert mine["status"] == "dnd"  # only the message goes
    assert public(bob, "alice")["message"] is None


def test_custom_message_checks(alice):
    put(alice, "/user_status/message/custom", {"message": "x" * 81}, status=400)
    put(alice, "/user_status/message/custom", {"message": "hi", "statusIcon": "ab"}, status=400)
    put(alice, "/user_status/message/custom", {"message": "hi", "clearAt": START - 1}, status=400)
    put(alice, "/user_status/message/custom", {"message": "hi", "clearAt": "soon"}, status=400)
    assert put(alice, "/user_status/message/custom", {"message": "x" * 80})["message"] == "x" * 80


def test_an_empty_custom_message_clears_it(alice):
    put(alice, "/user_status/message/custom", {"message": "hi", "statusIcon": "\U0001f600"})
    cleared = put(alice, "/user_status/message/custom", {"message": ""})
    assert cleared["message"] is None and cleared["icon"] is None


def test_predefined_messages(alice, clock):
    listed = alice.get("/predefined_statuses", prefix=STATUS).data
    meeting = next(item for item in listed if item["id"] == "meeting")
    assert meeting["clearAt"] == {"type": "period", "time": 3600} and meeting["icon"]
    answer = put(
        alice, "/user_status/message/predefined", {"messageId": "meeting", "clearAt": START + 10}
    )
    assert answer["messageIsPredefined"] is True and answer["messageId"] == "meeting"
    assert answer["message"] == meeting["message"] and answer["icon"] == meeting["icon"]
    clock.advance(10)
    assert own(alice)["messageId"] is None
    put(alice, "/user_status/message/predefined", {"messageId": "nope"}, status=400)
    put(alice, "/user_status/message/predefined", status=400)


def test_statuses_list_is_clamped(app, alice, bob, carol):
    for client in (alice, bob, carol):
        put(client, "/user_status/status", {"statusType": "away"})
    everyone = alice.get("/statuses", prefix=STATUS).data
    assert [s["userId"] for s in everyone] == ["alice", "bob", "carol"]
    page = alice.get("/statuses", {"limit": 1, "offset": 1}, prefix=STATUS).data
    assert [s["userId"] for s in page] == ["bob"]
    assert len(alice.get("/statuses", {"limit": 10**9}, prefix=STATUS).data) == 3
    assert len(alice.get("/statuses", {"limit": -5}, prefix=STATUS).data) == 1
    alice.get("/statuses", {"offset": -1}, status=400, prefix=STATUS)


# --- Heartbeat -------------------------------------------------------------------


def test_heartbeat_sets_an_automatic_status_that_goes_stale(alice, bob, clock):
    answer = put(alice, "/heartbeat", {"status": "online"})
    assert answer["status"] == "online" and answer["statusIsUserDefined"] is False
    assert put(alice, "/heartbeat", {"status": "away"})["status"] == "away"
    clock.advance(talk_server.STATUS_STALE_SECONDS + 1)
    assert own(alice)["status"] == "offline"
    assert public(bob, "alice")["status"] == "offline"
    assert put(alice, "/heartbeat", {"status": "online"})["status"] == "online"


def test_heartbeat_keeps_a_chosen_status(alice, clock):
    put(alice, "/user_status/status", {"statusType": "dnd"})
    assert put(alice, "/heartbeat", {"status": "online"})["status"] == "dnd"
    clock.advance(talk_server.STATUS_STALE_SECONDS * 4)
    assert own(alice)["status"] == "dnd"  # chosen statuses do not go stale


def test_a_chosen_online_stays_alive_with_heartbeats_only(alice, clock):
    put(alice, "/user_status/status", {"statusType": "online"})
    clock.advance(talk_server.STATUS_STALE_SECONDS - 1)
    assert put(alice, "/heartbeat", {"status": "away"})["status"] == "online"
    clock.advance(talk_server.STATUS_STALE_SECONDS - 1)
    assert own(alice)["status"] == "online"
    clock.advance(2)
    assert own(alice)["status"] == "offline"


@pytest.mark.parametrize("status", ["dnd", "invisible", "", "x"])
def test_heartbeat_takes_only_online_or_away(alice, status):
    put(alice, "/heartbeat", {"status": status}, status=400)


# --- statuses_of, for the Room's includeStatus ----------------------------------


def test_statuses_of_gives_the_room_fields(app, alice, bob, clock):
    put(alice, "/user_status/status", {"statusType": "invisible"})
    put(alice, "/user_status/message/custom", {"message": "Hidden", "statusIcon": "\U0001f648"})
    with app.talk.db.read() as db:
        fields = talk_server.statuses_of(db, ["alice", "bob", "nobody"], clock())
    assert fields == {
        "alice": {
            "status": "offline",
            "statusIcon": "\U0001f648",
            "statusMessage": "Hidden",
            "statusClearAt": None,
        }
    }


# --- Autocomplete -----------------------------------------------------------------


def search(client, status=200, **params):
    return client.get(AUTOCOMPLETE, params, status=status, prefix="").data


def test_autocomplete_finds_users_but_not_the_caller(alice):
    found = search(alice, search="")
    assert [item["id"] for item in found] == ["bob", "carol", "dave"]
    bob = found[0]
    assert bob == {
        "id": "bob",
        "label": "Bob",
        "icon": "icon-user",
        "source": "users",
        "status": "",
        "subline": "",
        "shareWithDisplayNameUnique": "bob",
    }


def test_autocomplete_matches_id_and_name_any_case_exact_first(app, alice):
    with app.talk.db.write() as db:
        talk_server.set_display_name(db, "dave", "Carolyn")
    assert [item["id"] for item in search(alice, search="CAROL")] == ["carol", "dave"]
    with app.talk.db.write() as db:
        talk_server.set_display_name(db, "dave", "Bo")
    assert [item["id"] for item in search(alice, search="bo")] == ["dave", "bob"]


def test_autocomplete_for_a_call_leaves_out_members(alice, carol):
    token = create(alice, 2, roomName="Team")
    add(alice, token, "bob")
    found = search(alice, search="", itemType="call", itemId=token)
    assert [item["id"] for item in found] == ["carol", "dave"]
    # carol is not in the room: she learns nothing about who is.
    assert [i["id"] for i in search(carol, search="", itemType="call", itemId=token)] == [
        "alice", "bob", "dave"
    ]


def test_autocomplete_shows_status(alice, bob):
    bob.put("/user_status/status", {"statusType": "dnd"}, prefix=STATUS)
    bob.put("/user_status/message/custom", {"message": "Busy"}, prefix=STATUS)
    found = search(alice, search="bob")
    assert found[0]["status"] == {"status": "dnd", "message": "Busy", "icon": None, "clearAt": None}


def test_autocomplete_groups_the_caller_is_in_or_all_for_admins(alice, bob):
    make_group(alice, "team", "bob")
    make_group(alice, "other", "carol")
    share_types = {"shareTypes[]": ["0", "1"], "search": ""}
    mine = [(i["source"], i["id"]) for i in search(bob, **share_types)]
    assert ("groups", "team") in mine and ("groups", "other") not in mine
    assert ("users", "alice") in mine
    groups_only = search(alice, **{"shareTypes[]": "1", "search": ""})
    assert {i["id"] for i in groups_only} == {"admin", "team", "other"}
    assert {i["icon"] for i in groups_only} == {"icon-group"}


def test_autocomplete_limit_is_clamped(alice):
    assert len(search(alice, search="", limit=1)) == 1
    assert len(search(alice, search="", limit=0)) == 1
    assert len(search(alice, search="", limit=10**9)) == 3
    assert [i["id"] for i in search(alice, search="", limit=1, offset=2)] == ["dave"]
    search(alice, status=400, search="", limit="many")


def test_autocomplete_needs_a_user(anonymous):
    anonymous.get(AUTOCOMPLETE, {"search": "a"}, status=401, prefix="")


# --- Hostile input at the new OCS routes ---------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [(m, STATUS + p.replace("<user_id>", "bob")) for m, p, _, _ in talk_server.USER_STATUS_ROUTES]
    + [(m, "/ocs/v2.php/core/autocomplete" + p) for m, p, _, _ in talk_server.AUTOCOMPLETE_ROUTES]
    + [
        (m, "/ocs/v2.php/apps/spreed/api/v1" + p.replace("<token>", "TOKEN"))
        for m, p, _, _ in talk_server.AVATAR_ROUTES
    ],
)
@pytest.mark.parametrize(
    "body, ctype",
    [
        (b"statusType=\xff&message=%ff", "application/x-www-form-urlencoded"),
        (b'{"statusType": [1], "message": {"a": 1}, "clearAt": 1e999, "emoji": null}', "application/json"),
        (b'{"clearAt": "99999999999999999999", "limit": true, "shareTypes": [[]]}', "application/json"),
        (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\x00", "multipart/form-data; boundary=b"),
        (b'--b\r\nContent-Disposition: form-data; name="statusType"; filename="x"\r\n\r\naway\r\n--b--', "multipart/form-data; boundary=b"),
    ],
)
def test_new_routes_answer_bad_input_with_an_envelope(alice, method, path, body, ctype):
    token = create(alice, 2, roomName="Arena")
    response = alice.test.request(
        path.replace("TOKEN", token), method=method, body=body, content_type=ctype,
        headers=alice.headers, expect_errors=True,
    )
    assert response.status_int < 500
    if response.content_type == "application/json":
        meta = response.json["ocs"]["meta"]
        assert meta["statuscode"] == response.status_int


# --- nc-py-api against a served talk-server -------------------------------------------


async def nextcloud(url, user):
    """nc-py-api (its user status API is async only), on the server's own capabilities."""
    import nc_py_api

    nc = nc_py_api.AsyncNextcloud(nextcloud_url=url, nc_auth_user=user, nc_auth_pass=PASSWORD)
    assert (await nc.capabilities)["user_status"]["enabled"] is True
    return nc


def test_nc_py_api_user_status(served):  # noqa: F811 (a fixture)
    asyncio.run(nc_py_api_user_status(served))


async def nc_py_api_user_status(served):  # noqa: F811
    alice, bob = await nextcloud(served, "alice"), await nextcloud(served, "bob")
    assert await alice.user_status.available
    assert (await alice.user_status.get_current()).status_type == "offline"
    assert await bob.user_status.get("alice") is None
    await alice.user_status.set_status_type("dnd")
    await alice.user_status.set_status("Deep work", status_icon="\U0001f9e0")
    current = await alice.user_status.get_current()
    assert (current.status_type, current.status_message, current.status_icon) == (
        "dnd", "Deep work", "\U0001f9e0"
    )
    assert current.status_type_defined is True and current.message_predefined is False
    seen = await bob.user_status.get("alice")
    assert (seen.status_type, seen.status_message) == ("dnd", "Deep work")
    assert [s.user_id for s in await bob.user_status.get_list()] == ["alice"]
    await alice.user_status.set_status_type("invisible")
    assert (await bob.user_status.get("alice")).status_type == "offline"
    await alice.user_status.set_status(None)
    assert (await alice.user_status.get_current()).status_message is None
    assert await bob.user_status.get_backup_status("alice") is None
