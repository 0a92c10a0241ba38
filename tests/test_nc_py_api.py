"""nc-py-api 0.30.3, today's most used Python client, driven against a served talk-server.

Every call goes over real HTTP to `serve_in_thread`; the clients sign in with an app
password from login flow v2 (nc.loginflow_v2, the browser step as plain HTML forms)
or with the login password. Every property of every object nc-py-api hands back is
read, since nc-py-api indexes the JSON directly: a missing key is a KeyError in the
caller's code, a wrong value a ValueError from its enums.
"""

import functools

import pytest
from conftest import PASSWORD
from helpers import grant_in_browser

import talk_server

nc_py_api = pytest.importorskip("nc_py_api")
from nc_py_api import NextcloudException  # noqa: E402
from nc_py_api.talk import (  # noqa: E402
    AttendeePermissions,
    Conversation,
    ConversationType,
    NotificationLevel,
    Participant,
    ParticipantType,
)

# 0.30 warns that its sync client goes away in 0.31; the tests pin 0.30.3.
pytestmark = pytest.mark.filterwarnings("ignore:Sync Nextcloud:DeprecationWarning")

USERS = {"alice": "Alice", "bob": "Bob", "carol": "Carol"}


@pytest.fixture
def served(tmp_path, password_hash, clock):
    """A served talk-server on a free loopback port: alice (admin), bob and carol;
    group "team" holds bob and carol. Its clock moves only by hand."""
    with talk_server.serve_in_thread(tmp_path / "talk.db", clock=clock) as url:
        with url.app.talk.db.write() as db:
            for user_id, name in USERS.items():
                talk_server.create_user(db, user_id, password_hash, name)
            talk_server.create_group(db, "admin")
            talk_server.add_to_group(db, "admin", "alice")
            talk_server.create_group(db, "team")
            talk_server.add_to_group(db, "team", "bob")
            talk_server.add_to_group(db, "team", "carol")
        yield url


def signed_in_with_login_flow(url, user):
    """A Nextcloud client that got its app password through nc.loginflow_v2."""
    nc = nc_py_api.Nextcloud(nextcloud_url=url)
    flow = nc.loginflow_v2.init(user_agent="nc_py_api tests")
    assert flow.endpoint == url + "/index.php/login/v2/poll"
    grant_in_browser(flow.login, user, PASSWORD)
    credentials = nc.loginflow_v2.poll(flow.token, timeout=1)
    assert (credentials.server, credentials.login_name) == (url, user)
    assert len(credentials.app_password) == 72
    return nc


def signed_in_with_password(url, user):
    return nc_py_api.Nextcloud(nextcloud_url=url, nc_auth_user=user, nc_auth_pass=PASSWORD)


@pytest.fixture
def alice_and_bob(served):
    """alice signed in through login flow v2, bob with his login password."""
    return signed_in_with_login_flow(served, "alice"), signed_in_with_password(served, "bob")


def status_of(call) -> int:
    """The HTTP status of the NextcloudException that `call` raises."""
    with pytest.raises(NextcloudException) as refused:
        call()
    return refused.value.status_code


def read_every_property(obj) -> dict:
    """Read every property nc-py-api defines on obj's class: KeyError/ValueError fail here."""
    names = [
        name
        for klass in type(obj).__mro__
        for name, value in vars(klass).items()
        if isinstance(value, property)
    ]
    assert names, f"{type(obj).__name__} has no properties"
    return {name: getattr(obj, name) for name in names}


def touch_conversation(conversation):
    values = read_every_property(conversation)
    assert isinstance(conversation, Conversation)
    assert isinstance(values["conversation_id"], int) and isinstance(values["token"], str)
    for name in ("name", "display_name", "description", "actor_type", "actor_id",
                 "attendee_pin", "avatar_version", "status_type", "status_message",
                 "status_icon"):
        assert isinstance(values[name], str), name
    for name in ("attendee_id", "last_activity", "lobby_timer", "unread_messages_count",
                 "last_read_message", "last_common_read_message", "call_start_time",
                 "message_expiration"):
        assert type(values[name]) is int, name
    for name in ("is_favorite", "unread_mention", "unread_mention_direct", "has_password",
                 "has_call", "can_start_call", "can_delete_conversation",
                 "can_leave_conversation", "can_enable_sip", "is_custom_avatar", "read_only"):
        assert type(values[name]) is bool, name
    assert values["last_message"] is None or values["last_message"].token == conversation.token
    if values["last_message"] is not None:
        read_every_property(values["last_message"])
    repr(conversation)
    return values


def touch_participant(participant):
    values = read_every_property(participant)
    assert isinstance(participant, Participant)
    assert type(values["attendee_id"]) is int and type(values["last_ping"]) is int
    assert isinstance(values["session_ids"], list)
    for name in ("actor_type", "actor_id", "display_name", "breakout_token", "status_type",
                 "status_message", "status_icon"):
        assert isinstance(values[name], str), name
    repr(participant)
    return values


# ---------------------------------------------------------------------------
# Server, capabilities and the user
# ---------------------------------------------------------------------------


def test_server_version_and_capabilities(served):
    nc = signed_in_with_login_flow(served, "alice")
    version = nc.srv_version
    assert version["major"] >= 27  # Android needs 17, Talk Desktop 27
    assert version["string"] == f"{version['major']}.{version['minor']}.{version['micro']}"
    assert version["extended_support"] is False
    capabilities = nc.capabilities
    features = capabilities["spreed"]["features"]
    assert "conversation-v4" in features and "favorites" in features
    assert nc.talk.available is True
    assert nc.talk.bots_available is ("bots-v1" in features)
    assert nc.theme is None or nc.theme.name
    nc.update_server_info()
    assert nc.capabilities == capabilities


def test_the_user_and_the_users_api(served):
    nc = signed_in_with_login_flow(served, "alice")
    assert nc.user == "alice"
    me = nc.users.get_user()
    values = read_every_property(me)
    assert (values["user_id"], values["display_name"], values["enabled"]) == (
        "alice", "Alice", True
    )
    assert values["groups"] == ["admin"] and values["email"] == ""
    assert values["profile_enabled"] is True
    bob = read_every_property(nc.users.get_user("bob"))
    assert (bob["user_id"], bob["display_name"], bob["groups"]) == ("bob", "Bob", ["team"])
    assert nc.users.get_list() == ["alice", "bob", "carol"]
    assert nc.users.get_list(mask="car") == ["carol"]
    assert status_of(lambda: nc.users.get_user("nobody")) == 404


def test_login_password_works_too(served):
    nc = signed_in_with_password(served, "bob")
    assert nc.user == "bob"
    assert nc.talk.get_user_conversations() == []


# ---------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------


def test_create_each_conversation_type(served):
    nc = signed_in_with_login_flow(served, "alice")
    group = nc.talk.create_conversation(ConversationType.GROUP, room_name="Team")
    values = touch_conversation(group)
    assert values["conversation_type"] is ConversationType.GROUP
    assert (values["display_name"], values["participant_type"]) == ("Team", ParticipantType.OWNER)
    assert values["permissions"] == AttendeePermissions(254)
    assert values["can_start_call"] and values["can_delete_conversation"]
    assert values["notification_level"] is NotificationLevel.NOTIFY_ON_MENTION

    direct = nc.talk.create_conversation(ConversationType.ONE_TO_ONE, invite="bob")
    values = touch_conversation(direct)
    assert values["conversation_type"] is ConversationType.ONE_TO_ONE
    assert (values["name"], values["display_name"]) == ("bob", "Bob")
    assert values["can_delete_conversation"] is False
    assert values["notification_level"] is NotificationLevel.ALWAYS_NOTIFY
    again = nc.talk.create_conversation(ConversationType.ONE_TO_ONE, invite="bob")
    assert again.token == direct.token

    public = nc.talk.create_conversation(ConversationType.PUBLIC, room_name="Open")
    assert touch_conversation(public)["conversation_type"] is ConversationType.PUBLIC

    note = nc.talk.create_conversation(ConversationType.NOTE_TO_SELF)
    values = touch_conversation(note)
    assert values["conversation_type"] is ConversationType.NOTE_TO_SELF
    assert values["can_leave_conversation"] is False

    from_group = nc.talk.create_conversation(ConversationType.GROUP, invite="team")
    touch_conversation(from_group)
    members = {p.actor_id for p in nc.talk.list_participants(from_group)}
    assert members == {"alice", "bob", "carol"}

    tokens = {c.token for c in nc.talk.get_user_conversations()}
    assert tokens == {group.token, direct.token, public.token, note.token, from_group.token}
    seen_by_bob = signed_in_with_password(served, "bob").talk.get_user_conversations()
    assert {c.token for c in seen_by_bob} == {direct.token, from_group.token}
    for conversation in seen_by_bob:
        touch_conversation(conversation)


def test_create_refusals_arrive_as_nextcloud_exceptions(served):
    nc = signed_in_with_login_flow(served, "alice")
    cases = [
        (dict(conversation_type=ConversationType.ONE_TO_ONE, invite="nobody"), 404),
        (dict(conversation_type=ConversationType.GROUP), 400),
        (dict(conversation_type=ConversationType.CHANGELOG, room_name="x"), 400),
    ]
    for kwargs, status in cases:
        call = functools.partial(nc.talk.create_conversation, **kwargs)
        assert status_of(call) == status, kwargs


def test_list_with_modified_since_as_a_number_and_as_true(served, clock):
    nc = signed_in_with_login_flow(served, "alice")
    old = nc.talk.create_conversation(ConversationType.GROUP, room_name="Old")
    clock.advance(100)
    assert [c.token for c in nc.talk.get_user_conversations()] == [old.token]
    # The header X-Nextcloud-Talk-Modified-Before, kept for modified_since=True.
    assert nc.talk.modified_since == clock.now
    assert nc.talk.config_sha and len(nc.talk.config_sha) == 40
    since = nc.talk.modified_since
    clock.advance(10)
    assert nc.talk.get_user_conversations(modified_since=True) == []
    assert nc.talk.modified_since == since + 10

    fresh = nc.talk.create_conversation(ConversationType.GROUP, room_name="Fresh")
    clock.advance(10)
    changed = nc.talk.get_user_conversations(modified_since=True)
    assert [c.token for c in changed] == [fresh.token]
    for conversation in changed:
        touch_conversation(conversation)

    clock.advance(10)
    nc.talk.set_conversation_description(old, "A topic")
    clock.advance(10)
    assert [c.token for c in nc.talk.get_user_conversations(modified_since=True)] == [old.token]
    # As a number: everything since then, whatever the last call kept.
    tokens = {c.token for c in nc.talk.get_user_conversations(modified_since=since + 1)}
    assert tokens == {old.token, fresh.token}
    listed = nc.talk.get_user_conversations(include_status=True, no_status_update=False)
    assert {c.token for c in listed} == {old.token, fresh.token}


def test_get_rename_describe_and_settings(served):
    nc = signed_in_with_login_flow(served, "alice")
    room = nc.talk.create_conversation(ConversationType.GROUP, room_name="Team")
    got = nc.talk.get_conversation_by_token(room)
    assert touch_conversation(got)["token"] == room.token
    assert nc.talk.get_conversation_by_token(room.token).display_name == "Team"

    nc.talk.rename_conversation(room, "Renamed")
    nc.talk.set_conversation_description(room.token, "What we do")
    got = nc.talk.get_conversation_by_token(room)
    assert (got.name, got.display_name, got.description) == ("Renamed", "Renamed", "What we do")

    nc.talk.set_conversation_fav(room, True)
    assert nc.talk.get_conversation_by_token(room).is_favorite is True
    nc.talk.set_conversation_fav(room, False)
    assert nc.talk.get_conversation_by_token(room).is_favorite is False

    nc.talk.set_conversation_readonly(room, True)
    assert nc.talk.get_conversation_by_token(room).read_only is True
    nc.talk.set_conversation_readonly(room, False)
    assert nc.talk.get_conversation_by_token(room).read_only is False

    for level in (NotificationLevel.NEVER_NOTIFY, NotificationLevel.ALWAYS_NOTIFY):
        nc.talk.set_conversation_notify_lvl(room, level)
        assert nc.talk.get_conversation_by_token(room).notification_level is level
    nc.talk.set_conversation_notify_lvl(room, NotificationLevel.DEFAULT)
    got = nc.talk.get_conversation_by_token(room)
    assert got.notification_level is NotificationLevel.NOTIFY_ON_MENTION

    nc.talk.set_conversation_public(room, True)
    got = nc.talk.get_conversation_by_token(room)
    assert touch_conversation(got)["conversation_type"] is ConversationType.PUBLIC
    nc.talk.set_conversation_password(room, "sesame")
    assert nc.talk.get_conversation_by_token(room).has_password is True
    nc.talk.set_conversation_password(room, "")
    assert nc.talk.get_conversation_by_token(room).has_password is False
    nc.talk.set_conversation_public(room, False)
    got = nc.talk.get_conversation_by_token(room)
    assert got.conversation_type is ConversationType.GROUP
    # A private conversation has no password.
    assert status_of(lambda: nc.talk.set_conversation_password(room, "sesame")) == 400


def test_what_a_member_who_is_no_moderator_may_not_do(alice_and_bob):
    alice, bob = alice_and_bob
    room = alice.talk.create_conversation(ConversationType.GROUP, invite="team")
    mine = touch_conversation(bob.talk.get_conversation_by_token(room))
    assert mine["participant_type"] is ParticipantType.USER
    assert mine["can_start_call"] is True and mine["can_delete_conversation"] is False
    calls = [
        lambda: bob.talk.rename_conversation(room, "Mine"),
        lambda: bob.talk.set_conversation_description(room, "Mine"),
        lambda: bob.talk.set_conversation_readonly(room, True),
        lambda: bob.talk.set_conversation_public(room, True),
        lambda: bob.talk.delete_conversation(room),
    ]
    for call in calls:
        assert status_of(call) == 403
    # What is one's own: favorite and notifications.
    bob.talk.set_conversation_fav(room, True)
    bob.talk.set_conversation_notify_lvl(room, NotificationLevel.NEVER_NOTIFY)
    mine = bob.talk.get_conversation_by_token(room)
    assert mine.is_favorite and mine.notification_level is NotificationLevel.NEVER_NOTIFY
    assert alice.talk.get_conversation_by_token(room).is_favorite is False


def test_participants(served):
    nc = signed_in_with_login_flow(served, "alice")
    room = nc.talk.create_conversation(ConversationType.GROUP, invite="team")
    participants = {p.actor_id: touch_participant(p) for p in nc.talk.list_participants(room)}
    assert set(participants) == {"alice", "bob", "carol"}
    alice, bob = participants["alice"], participants["bob"]
    assert (alice["participant_type"], bob["participant_type"]) == (
        ParticipantType.OWNER, ParticipantType.USER
    )
    assert (alice["actor_type"], alice["display_name"]) == ("users", "Alice")
    assert alice["permissions"] == AttendeePermissions(254)
    assert bob["attendee_permissions"] == AttendeePermissions.DEFAULT
    assert bob["session_ids"] == [] and bob["participant_flags"] == 0
    assert bob["breakout_token"] == room.token
    with_status = nc.talk.list_participants(room.token, include_status=True)
    assert {p.attendee_id for p in with_status} == {p["attendee_id"] for p in participants.values()}


def test_leave_and_delete(alice_and_bob):
    alice, bob = alice_and_bob
    room = alice.talk.create_conversation(ConversationType.GROUP, invite="team")
    bob.talk.leave_conversation(room)
    assert bob.talk.get_user_conversations() == []
    assert {p.actor_id for p in alice.talk.list_participants(room)} == {"alice", "carol"}
    assert status_of(lambda: bob.talk.get_conversation_by_token(room)) == 404

    direct = alice.talk.create_conversation(ConversationType.ONE_TO_ONE, invite="bob")
    assert direct.can_delete_conversation is False
    # A one-to-one is left, not deleted (spreed docs/conversation.md: 400).
    assert status_of(lambda: alice.talk.delete_conversation(direct)) == 400
    assert {c.token for c in bob.talk.get_user_conversations()} == {direct.token}

    assert status_of(lambda: bob.talk.delete_conversation(room)) == 404  # no member now
    alice.talk.delete_conversation(room)
    assert status_of(lambda: alice.talk.get_conversation_by_token(room)) == 404
    assert [c.token for c in alice.talk.get_user_conversations()] == [direct.token]


def test_leaving_a_one_to_one_deletes_it_for_both(alice_and_bob):
    """A deliberate difference from today's Talk (README): the 2018 rule holds on
    v4 too, so a one-to-one lives while both are in it; spreed keeps it for the
    other user (spreed tests/integration/features/conversation-1/create.feature)."""
    alice, bob = alice_and_bob
    direct = alice.talk.create_conversation(ConversationType.ONE_TO_ONE, invite="bob")
    alice.talk.leave_conversation(direct)
    assert alice.talk.get_user_conversations() == []
    assert bob.talk.get_user_conversations() == []
    again = alice.talk.create_conversation(ConversationType.ONE_TO_ONE, invite="bob")
    assert again.token != direct.token
    assert [c.token for c in bob.talk.get_user_conversations()] == [again.token]
