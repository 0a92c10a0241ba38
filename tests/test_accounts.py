"""Accounts and provisioning over HTTP (SPEC 9): /cloud/user, /cloud/users, /cloud/groups."""

import sqlite3

import pytest
from conftest import CLOUD

import talk_server

CLOUD_V1 = "/ocs/v1.php/cloud"


@pytest.fixture
def admin(make_client):
    """alice, an administrator, talking to the provisioning API."""
    return make_client("alice", prefix=CLOUD)


@pytest.fixture
def user(make_client):
    """bob, not an administrator, talking to the provisioning API."""
    return make_client("bob", prefix=CLOUD)


@pytest.fixture
def admin_v1(make_client):
    return make_client("alice", prefix=CLOUD_V1)


# ---------------------------------------------------------------------------
# GET /cloud/user
# ---------------------------------------------------------------------------


def test_current_user_for_admin(admin):
    assert admin.get("/user", status=200).data.items() >= {
        "id": "alice",
        "display-name": "Alice",
        "email": None,
        "groups": ["admin"],
    }.items()


def test_current_user_for_non_admin(user):
    assert user.get("/user", status=200).data.items() >= {
        "id": "bob",
        "display-name": "Bob",
        "email": None,
        "groups": [],
    }.items()


def test_current_user_on_v1(make_client):
    response = make_client("bob", prefix=CLOUD_V1).get("/user", status=200)
    assert response.meta["statuscode"] == 100
    assert response.data["id"] == "bob"


def test_current_user_needs_credentials(make_client):
    make_client(prefix=CLOUD).get("/user", status=401)
    make_client("bob", password="nope", prefix=CLOUD).get("/user", status=401)


# ---------------------------------------------------------------------------
# Users, as an administrator
# ---------------------------------------------------------------------------


def test_admin_lists_users(admin):
    assert admin.get("/users", status=200).data == {"users": ["alice", "bob", "carol", "dave"]}


def test_admin_searches_users(admin):
    assert admin.get("/users", {"search": "CAR"}, status=200).data == {"users": ["carol"]}


def test_admin_creates_user_who_can_sign_in(admin, make_client):
    params = {"userid": "erin", "password": "erin-pass", "displayName": "Erin E."}
    admin.post("/users", params, status=200)
    erin = make_client("erin", password="erin-pass", prefix=CLOUD)
    assert erin.get("/user", status=200).data.items() >= {
        "id": "erin",
        "display-name": "Erin E.",
        "email": None,
        "groups": [],
    }.items()
    assert "erin" in admin.get("/users", status=200).data["users"]


def test_created_user_without_display_name_is_named_by_id(admin):
    admin.post("/users", {"userid": "erin", "password": "pw"}, status=200)
    assert admin.get("/users/erin", status=200).data["displayname"] == "erin"


def test_create_existing_user_is_400_on_v2(admin):
    response = admin.post("/users", {"userid": "bob", "password": "pw"}, status=400)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 400


def test_create_existing_user_is_statuscode_102_on_v1(admin_v1):
    response = admin_v1.post("/users", {"userid": "bob", "password": "pw"}, status=200)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 102


def test_create_user_on_v1_is_statuscode_100(admin_v1, make_client):
    response = admin_v1.post("/users", {"userid": "erin", "password": "pw"}, status=200)
    assert response.meta["statuscode"] == 100
    make_client("erin", password="pw", prefix=CLOUD).get("/user", status=200)


def test_create_user_without_password_is_400(admin):
    admin.post("/users", {"userid": "erin"}, status=400)
    admin.get("/users/erin", status=404)


@pytest.mark.parametrize("userid", ["", "a/b", "x" * 65, "tab\tbed"])
def test_create_user_with_invalid_id_is_400(admin, userid):
    admin.post("/users", {"userid": userid, "password": "pw"}, status=400)


def test_admin_gets_a_user(admin):
    data = admin.get("/users/bob", status=200).data
    assert data["id"] == "bob"
    assert data["displayname"] == "Bob"
    assert data["display-name"] == "Bob"
    assert data["email"] is None
    assert data["groups"] == []


def test_admin_renames_a_user(admin, make_client):
    admin.put("/users/bob", {"key": "displayname", "value": "Robert"}, status=200)
    assert admin.get("/users/bob", status=200).data["displayname"] == "Robert"
    bob = make_client("bob", prefix=CLOUD)
    assert bob.get("/user", status=200).data["display-name"] == "Robert"


def test_renamed_user_shows_in_rooms(admin, alice, bob):
    token = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201).data["token"]
    admin.put("/users/bob", {"key": "displayname", "value": "Robert"}, status=200)
    assert alice.get(f"/room/{token}", status=200).data["displayName"] == "Robert"


def test_admin_sets_a_password(admin, make_client):
    old = make_client("bob", prefix=CLOUD)
    old.get("/user", status=200)  # warms any credential cache with the old password
    admin.put("/users/bob", {"key": "password", "value": "new-secret"}, status=200)
    make_client("bob", password="new-secret", prefix=CLOUD).get("/user", status=200)
    old.get("/user", status=401)


def test_put_with_unknown_key_is_400(admin):
    admin.put("/users/bob", {"key": "email", "value": "bob@example.com"}, status=400)


def test_put_with_empty_value_is_400(admin):
    admin.put("/users/bob", {"key": "displayname", "value": ""}, status=400)
    assert admin.get("/users/bob", status=200).data["displayname"] == "Bob"


def test_admin_deletes_a_user(admin, make_client):
    admin.delete("/users/bob", status=200)
    admin.get("/users/bob", status=404)
    assert "bob" not in admin.get("/users", status=200).data["users"]
    make_client("bob", prefix=CLOUD).get("/user", status=401)


# ---------------------------------------------------------------------------
# Group membership and groups, as an administrator
# ---------------------------------------------------------------------------


def test_admin_reads_a_users_groups(admin):
    assert admin.get("/users/alice/groups", status=200).data == {"groups": ["admin"]}
    assert admin.get("/users/bob/groups", status=200).data == {"groups": []}


def test_admin_adds_and_removes_group_members(admin, user):
    admin.post("/groups", {"groupid": "team"}, status=200)
    admin.post("/users/bob/groups", {"groupid": "team"}, status=200)
    assert admin.get("/users/bob/groups", status=200).data == {"groups": ["team"]}
    assert admin.get("/groups/team", status=200).data == {"users": ["bob"]}
    admin.delete("/users/bob/groups", {"groupid": "team"}, status=200)
    assert admin.get("/users/bob/groups", status=200).data == {"groups": []}
    assert admin.get("/groups/team", status=200).data == {"users": []}


def test_adding_to_admin_group_makes_an_administrator(admin, user):
    user.get("/users", status=403)
    admin.post("/users/bob/groups", {"groupid": "admin"}, status=200)
    user.get("/users", status=200)
    admin.delete("/users/bob/groups", {"groupid": "admin"}, status=200)
    user.get("/users", status=403)


def test_admin_lists_creates_and_deletes_groups(admin):
    assert admin.get("/groups", status=200).data == {"groups": ["admin"]}
    admin.post("/groups", {"groupid": "team"}, status=200)
    assert admin.get("/groups", status=200).data == {"groups": ["admin", "team"]}
    assert admin.get("/groups", {"search": "tea"}, status=200).data == {"groups": ["team"]}
    assert admin.get("/groups/admin", status=200).data == {"users": ["alice"]}
    admin.delete("/groups/team", status=200)
    admin.get("/groups/team", status=404)
    assert admin.get("/groups", status=200).data == {"groups": ["admin"]}


def test_create_existing_group_is_400(admin, admin_v1):
    admin.post("/groups", {"groupid": "admin"}, status=400)
    assert admin_v1.post("/groups", {"groupid": "admin"}, status=200).meta["statuscode"] == 102


def test_deleting_a_group_keeps_its_members(admin):
    admin.post("/groups", {"groupid": "team"}, status=200)
    admin.post("/users/bob/groups", {"groupid": "team"}, status=200)
    admin.delete("/groups/team", status=200)
    assert admin.get("/users/bob", status=200).data["groups"] == []


def test_group_created_over_http_can_seed_a_group_room(admin, alice):
    admin.post("/groups", {"groupid": "team"}, status=200)
    admin.post("/users/bob/groups", {"groupid": "team"}, status=200)
    token = alice.post("/room", {"roomType": 2, "invite": "team"}, status=201).data["token"]
    users = {p["userId"] for p in alice.get(f"/room/{token}/participants", status=200).data}
    assert users == {"alice", "bob"}


# ---------------------------------------------------------------------------
# Unknown users and groups: 404
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/users/nobody", None),
        ("PUT", "/users/nobody", {"key": "displayname", "value": "X"}),
        ("PUT", "/users/nobody", {"key": "password", "value": "X"}),
        ("DELETE", "/users/nobody", None),
        ("GET", "/users/nobody/groups", None),
        ("POST", "/users/nobody/groups", {"groupid": "admin"}),
        ("DELETE", "/users/nobody/groups", {"groupid": "admin"}),
        ("POST", "/users/bob/groups", {"groupid": "nogroup"}),
        ("DELETE", "/users/bob/groups", {"groupid": "nogroup"}),
        ("GET", "/groups/nogroup", None),
        ("DELETE", "/groups/nogroup", None),
    ],
)
def test_unknown_user_or_group_is_404(admin, method, path, params):
    response = admin.request(method, path, params, status=404)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 404


def test_unknown_user_is_statuscode_404_on_v1(admin_v1):
    response = admin_v1.get("/users/nobody", status=200)
    assert response.meta["statuscode"] == 404


# ---------------------------------------------------------------------------
# Users who are not administrators: 403, except for themselves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/users", None),
        ("POST", "/users", {"userid": "erin", "password": "pw"}),
        ("POST", "/users", {"userid": "carol", "password": "pw"}),
        ("GET", "/users/alice", None),
        ("GET", "/users/nobody", None),
        ("PUT", "/users/alice", {"key": "displayname", "value": "Mallory"}),
        ("PUT", "/users/alice", {"key": "password", "value": "stolen"}),
        ("PUT", "/users/bob", {"key": "displayname", "value": "Bobby"}),
        ("DELETE", "/users/alice", None),
        ("DELETE", "/users/bob", None),
        ("GET", "/users/alice/groups", None),
        ("POST", "/users/bob/groups", {"groupid": "admin"}),
        ("DELETE", "/users/alice/groups", {"groupid": "admin"}),
        ("GET", "/groups", None),
        ("POST", "/groups", {"groupid": "team"}),
        ("GET", "/groups/admin", None),
        ("DELETE", "/groups/admin", None),
    ],
)
def test_non_admin_is_403(user, admin, method, path, params):
    response = user.request(method, path, params, status=403)
    assert response.meta["statuscode"] == 403
    # Nothing changed.
    assert admin.get("/users", status=200).data == {"users": ["alice", "bob", "carol", "dave"]}
    assert admin.get("/groups", status=200).data == {"groups": ["admin"]}
    assert admin.get("/groups/admin", status=200).data == {"users": ["alice"]}
    assert admin.get("/users/alice", status=200).data["displayname"] == "Alice"
    assert admin.get("/users/bob", status=200).data["displayname"] == "Bob"


def test_non_admin_is_403_on_v1(make_client):
    bob = make_client("bob", prefix=CLOUD_V1)
    response = bob.get("/users", status=200)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 403


def test_user_reads_themselves(user):
    data = user.get("/users/bob", status=200).data
    assert data["id"] == "bob"
    assert data["displayname"] == "Bob"
    assert user.get("/users/bob/groups", status=200).data == {"groups": []}


def test_provisioning_needs_credentials(make_client):
    nobody = make_client(prefix=CLOUD)
    nobody.get("/users", status=401)
    nobody.get("/users/bob", status=401)
    nobody.post("/users", {"userid": "erin", "password": "pw"}, status=401)
    nobody.get("/groups", status=401)


# ---------------------------------------------------------------------------
# Deleting a user and their rooms
# ---------------------------------------------------------------------------


def room_exists(app, token):
    with app.talk.db.read() as db:
        return talk_server.room_by_token(db, token) is not None


def test_deleting_a_user_removes_them_from_rooms(app, admin, alice, bob, carol):
    group = alice.post("/room", {"roomType": 2, "roomName": "Team"}, status=201).data["token"]
    alice.post(f"/room/{group}/participants", {"newParticipant": "bob"}, status=200)
    alice.post(f"/room/{group}/participants", {"newParticipant": "carol"}, status=200)
    bob.post(f"/room/{group}/participants/active", status=200)
    admin.delete("/users/bob", status=200)
    users = {p["userId"] for p in alice.get(f"/room/{group}/participants", status=200).data}
    assert users == {"alice", "carol"}
    assert "bob" not in alice.get(f"/room/{group}", status=200).data["participants"]


def test_deleting_a_user_deletes_their_one_to_one_rooms(app, admin, alice, bob, carol):
    with_alice = alice.post("/room", {"roomType": 1, "invite": "bob"}, status=201).data["token"]
    with_carol = bob.post("/room", {"roomType": 1, "invite": "carol"}, status=201).data["token"]
    alice_carol = alice.post("/room", {"roomType": 1, "invite": "carol"}, status=201).data["token"]
    admin.delete("/users/bob", status=200)
    alice.get(f"/room/{with_alice}", status=404)
    carol.get(f"/room/{with_carol}", status=404)
    assert not room_exists(app, with_alice)
    assert not room_exists(app, with_carol)
    assert [r["token"] for r in alice.get("/room", status=200).data] == [alice_carol]


def test_deleting_a_user_deletes_rooms_they_were_alone_in(app, admin, bob):
    alone = bob.post("/room", {"roomType": 2, "roomName": "Mine"}, status=201).data["token"]
    admin.delete("/users/bob", status=200)
    assert not room_exists(app, alone)


def test_deleting_a_user_deletes_rooms_left_with_guests_only(app, admin, bob, guest):
    public = bob.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data["token"]
    guest.post(f"/room/{public}/participants/active", status=200)
    admin.delete("/users/bob", status=200)
    assert not room_exists(app, public)
    guest.get(f"/room/{public}", status=404)


def test_deleting_a_user_keeps_their_chat_in_shared_rooms(admin, alice, bob):
    token = alice.post("/room", {"roomType": 3, "roomName": "Open"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants", {"newParticipant": "bob"}, status=200)
    bob.post(f"/chat/{token}", {"message": "bye"}, status=201)
    admin.delete("/users/bob", status=200)
    messages = alice.get(f"/chat/{token}", {"timeout": 0}, status=200).data
    assert [(m["actorId"], m["message"], m["actorDisplayName"]) for m in messages] == [
        ("bob", "bye", "")
    ]


# ---------------------------------------------------------------------------
# Both OCS versions answer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/user", "/users", "/users/bob", "/users/bob/groups", "/groups", "/groups/admin"]
)
def test_v1_and_v2_both_answer(admin, admin_v1, path):
    v2 = admin.get(path, status=200)
    v1 = admin_v1.get(path, status=200)
    assert v2.meta["statuscode"] == 200
    assert v1.meta["statuscode"] == 100
    assert v1.data == v2.data


def test_v1_write_endpoints_answer(admin_v1):
    admin_v1.post("/groups", {"groupid": "team"}, status=200)
    admin_v1.post("/users/bob/groups", {"groupid": "team"}, status=200)
    assert admin_v1.get("/groups/team", status=200).data == {"users": ["bob"]}
    admin_v1.put("/users/bob", {"key": "displayname", "value": "Robert"}, status=200)
    admin_v1.delete("/users/bob/groups", {"groupid": "team"}, status=200)
    admin_v1.delete("/groups/team", status=200)
    admin_v1.delete("/users/bob", status=200)
    assert admin_v1.get("/users/bob", status=200).meta["statuscode"] == 404


def test_password_changed_by_another_process_counts_after_the_recheck(app, alice, db_path):
    alice.get("/user", prefix=CLOUD)  # a verified, cached login
    with sqlite3.connect(db_path) as other:  # as `talk-server user passwd` would
        other.execute(
            "UPDATE users SET password_hash = ? WHERE id = 'alice'",
            (talk_server.hash_password("changed"),),
        )
    app.talk.credentials.recheck = 0  # the recheck second has passed
    alice.get("/user", prefix=CLOUD, status=401)


def test_user_deleted_by_another_process_is_401_after_the_recheck(app, bob, db_path):
    bob.get("/user", prefix=CLOUD)
    with sqlite3.connect(db_path) as other:
        other.execute("PRAGMA foreign_keys = ON")
        other.execute("DELETE FROM users WHERE id = 'bob'")
    app.talk.credentials.recheck = 0
    bob.get("/user", prefix=CLOUD, status=401)


# ---------------------------------------------------------------------------
# What nc-py-api and the apps use: fields, enable/disable, details, paging
# ---------------------------------------------------------------------------


def test_current_user_has_the_fields_the_apps_read(admin):
    data = admin.get("/user", status=200).data
    for field in ("id", "display-name", "displayname", "email", "groups", "enabled",
                  "language", "locale", "quota", "backend", "subadmin", "phone",
                  "address", "website", "twitter", "backendCapabilities"):
        assert field in data, field
    assert data["enabled"] is True and isinstance(data["quota"], dict)
    assert data["subadmin"] == [] and data["backend"] == "Database"


def test_user_details_carry_the_same_fields(admin):
    me = admin.get("/user", status=200).data
    assert admin.get("/users/alice", status=200).data == me


def test_admin_disables_and_enables_a_user(admin, make_client):
    bob = make_client("bob", prefix=CLOUD)
    bob.get("/user", status=200)
    admin.put("/users/bob/disable", status=200)
    assert admin.get("/users/bob", status=200).data["enabled"] is False
    bob.get("/user", status=401)
    admin.put("/users/bob/enable", status=200)
    bob.get("/user", status=200)


def test_disabling_yourself_is_refused_as_nextcloud(admin, admin_v1):
    admin.put("/users/alice/disable", status=400)
    assert admin_v1.put("/users/alice/disable", status=200).meta["statuscode"] == 101
    assert admin.get("/users/alice", status=200).data["enabled"] is True


def test_only_admins_disable_users(user, admin):
    user.put("/users/carol/disable", status=403)
    admin.put("/users/nobody/disable", status=404)
    assert admin.get("/users/carol", status=200).data["enabled"] is True


def test_users_and_groups_page_with_limit_and_offset(admin):
    admin.post("/groups", {"groupid": "team"}, status=200)
    assert admin.get("/users", {"limit": 2, "offset": 1}, status=200).data == {"users": ["bob", "carol"]}
    assert admin.get("/groups", {"limit": 1}, status=200).data == {"groups": ["admin"]}
    assert admin.get("/groups", {"offset": 1}, status=200).data == {"groups": ["team"]}
    assert admin.get("/groups", {"search": "TE"}, status=200).data == {"groups": ["team"]}
    admin.get("/groups", {"limit": -1}, status=400)


def test_group_details(admin, user):
    admin.post("/groups", {"groupid": "team"}, status=200)
    assert admin.get("/groups/details", status=200).data == {
        "groups": [
            {"id": "admin", "displayname": "admin", "usercount": 1, "disabled": 0,
             "canAdd": True, "canRemove": True},
            {"id": "team", "displayname": "team", "usercount": 0, "disabled": 0,
             "canAdd": True, "canRemove": True},
        ]
    }
    user.get("/groups/details", status=403)


def test_users_details_keyed_by_id(admin):
    data = admin.get("/users/details", {"search": "bo"}, status=200).data
    assert list(data["users"]) == ["bob"] and data["users"]["bob"]["displayname"] == "Bob"
