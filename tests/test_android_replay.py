"""The Android app's account-and-conversation sequence, replayed over real HTTP.

Each request is sent as nextcloud/talk-android sends it (its RestModule adds the
same headers to every call; NcApi and ApiUtils say where parameters go: room
creation and newParticipant as a query on a POST, join and settings as form
fields), and each answer is checked for what the app reads: ServerSelectionActivity
and CapabilitiesUtil (status.php, version.major >= 17, spreed features),
AccountVerificationActivity (capabilities with credentials, cloud/user with `id`
and `display-name`), NetworkLoginDataSource (login flow v2), ApiUtils (the API
version each feature selects) and Conversation.kt (every field, with its JSON type:
the app defaults canStartCall to false and permissions to 0 when they are missing).
"""

import base64
import http.client
import json
import urllib.parse

import pytest
from conftest import PASSWORD
from helpers import grant_in_browser

import talk_server

USER_AGENT = "Mozilla/5.0 (Android) Nextcloud-Talk v21.1.0"
OCS2 = "/ocs/v2.php"
SPREED = OCS2 + "/apps/spreed/api/v"
FORM = "application/x-www-form-urlencoded"

# Conversation.kt: every field the app maps, with the JSON type it parses.
CONVERSATION_FIELDS = {
    "token": str, "name": str, "displayName": str, "description": str, "type": int,
    "lastPing": int, "participantType": int, "hasPassword": bool, "sessionId": str,
    "actorId": str, "actorType": str, "isFavorite": bool, "lastActivity": int,
    "unreadMessages": int, "unreadMention": bool, "objectType": str,
    "notificationLevel": int, "readOnly": int, "lobbyState": int, "lobbyTimer": int,
    "lastReadMessage": int, "lastCommonReadMessage": int, "hasCall": bool, "callFlag": int,
    "canStartCall": bool, "canLeaveConversation": bool, "canDeleteConversation": bool,
    "unreadMentionDirect": bool, "notificationCalls": int, "permissions": int,
    "messageExpiration": int, "callRecording": int, "avatarVersion": str,
    "isCustomAvatar": bool, "callStartTime": int, "recordingConsent": int,
    "isArchived": bool,
}
# ParticipantsOverall / Participant.kt reads these on the participant list.
PARTICIPANT_FIELDS = {
    "attendeeId": int, "actorType": str, "actorId": str, "displayName": str,
    "participantType": int, "lastPing": int, "inCall": int, "permissions": int,
    "attendeePermissions": int, "attendeePin": str, "sessionIds": list,
}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def data(self):
        meta = self.json["ocs"]["meta"]  # GenericMeta: the app reads status and code
        assert meta["status"] == "ok" and meta["statuscode"] == self.status, meta  # OCS v2
        return self.json["ocs"]["data"]


class AndroidApp:
    """The app's HTTP client: okhttp with RestModule's HeadersInterceptor and a
    CookieManager that keeps cookies across calls (the talk session cookie too)."""

    def __init__(self, base_url):
        self.base_url = base_url
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.credentials = None
        self.cookies = {}

    def sign_in_as(self, login_name, app_password):
        raw = f"{login_name}:{app_password}".encode()
        self.credentials = "Basic " + base64.b64encode(raw).decode()

    def request(self, method, path, query=None, form=None, headers=None, auth=True):
        if query:
            path += "?" + urllib.parse.urlencode(query)
        sent = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "OCS-APIRequest": "true",
            "ngrok-skip-browser-warning": "true",
            **(headers or {}),
        }
        if auth and self.credentials:
            sent["Authorization"] = self.credentials
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:  # @FormUrlEncoded: null fields are left out
            body = urllib.parse.urlencode({k: v for k, v in form.items() if v is not None})
            sent["Content-Type"] = FORM
        elif method in ("POST", "PUT"):
            body = b""  # Retrofit's empty body: no Content-Type, Content-Length 0
        connection = http.client.HTTPConnection(self.host, self.port, timeout=45)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            answer = Answer(response.status, response.headers, response.read())
        finally:
            connection.close()
        for cookie in answer.headers.get_all("Set-Cookie") or []:
            name, _, value = cookie.split(";", 1)[0].partition("=")
            self.cookies[name.strip()] = value
        return answer

    def get(self, path, query=None, **kwargs):
        return self.request("GET", path, query=query, **kwargs)

    def post(self, path, query=None, form=None, **kwargs):
        return self.request("POST", path, query=query, form=form, **kwargs)

    def put(self, path, form=None, **kwargs):
        return self.request("PUT", path, form=form, **kwargs)

    def delete(self, path, query=None, **kwargs):
        return self.request("DELETE", path, query=query, **kwargs)


def expect(answer, status):
    assert answer.status == status, (answer.status, answer.body[:300])
    return answer


def assert_conversation(room):
    """What Conversation.kt parses: present, of the right JSON type, in range."""
    for field, kind in CONVERSATION_FIELDS.items():
        assert field in room, f"{field} is missing"
        value = room[field]
        if kind is int:
            assert type(value) is int, f"{field} is {value!r}, not an int"
        else:
            assert isinstance(value, kind), f"{field} is {value!r}, not {kind.__name__}"
    assert room["lastMessage"] == [] or isinstance(room["lastMessage"], dict)
    assert not room.get("remoteServer")  # set, it sends the app to federation
    assert room["type"] in (1, 2, 3, 4, 5, 6)
    assert room["participantType"] in (1, 2, 3, 4, 5, 6)
    assert room["notificationLevel"] in (0, 1, 2, 3)
    assert room["readOnly"] in (0, 1) and room["lobbyState"] in (0, 1)
    # Members may start calls: the app's defaults (false, 0) would forbid them.
    assert room["canStartCall"] is True
    assert room["permissions"] & 2 and room["permissions"] & 128


@pytest.fixture
def served(tmp_path, password_hash, clock):
    with talk_server.serve_in_thread(tmp_path / "talk.db", clock=clock) as url:
        with url.app.talk.db.write() as db:
            for user_id in ("alice", "bob"):
                talk_server.create_user(db, user_id, password_hash, user_id.title())
        yield url


# ---------------------------------------------------------------------------
# The steps, as the app takes them
# ---------------------------------------------------------------------------


def check_server(app):
    """ServerSelectionActivity.checkServer, then findServerTalkApp (no credentials)."""
    status = expect(app.get("/status.php", auth=False), 200).json
    assert status["installed"] is True and status["maintenance"] is False
    assert status.get("upgrade", False) is False  # the app's Status reads `upgrade`
    version = status["version"]
    assert int(version[: version.index(".")]) >= 13  # MIN_SERVER_MAJOR_VERSION
    assert isinstance(status["versionstring"], str)
    assert isinstance(status["productname"], str) and isinstance(status["edition"], str)
    capabilities = expect(app.get(OCS2 + "/cloud/capabilities", auth=False), 200).data
    check_capabilities(capabilities)


def check_capabilities(data):
    assert type(data["version"]["major"]) is int
    assert data["version"]["major"] >= 17  # CapabilitiesUtil.isServerEOL
    assert isinstance(data["version"]["string"], str)
    core = data["capabilities"]["core"]
    assert type(core["pollinterval"]) is int and isinstance(core["webdav-root"], str)
    spreed = data["capabilities"]["spreed"]
    features = spreed["features"]
    assert features and all(isinstance(f, str) for f in features)  # hasTalk
    assert "conversation-v4" in features  # ApiUtils.getConversationApiVersion
    # CapabilitiesUtil reads these config values with toString().toInt()/toBoolean().
    config = spreed["config"]
    assert int(str(config["chat"]["max-length"])) > 0
    assert str(config["call"]["enabled"]).lower() == "true"
    assert int(str(config["previews"]["max-gif-size"])) > 0
    return features


def login_flow_v2(app, user):
    """NetworkLoginDataSource: start anonymously, the user grants in a browser, poll."""
    start = app.post(
        "/index.php/login/v2", form={}, headers={"Clear-Site-Data": "cookies"}, auth=False
    )
    started = expect(start, 200).json
    token = started["poll"]["token"]
    poll_url = started["poll"]["endpoint"]
    assert poll_url == app.base_url + "/index.php/login/v2/poll"
    poll_path = urllib.parse.urlsplit(poll_url).path
    not_yet = expect(app.post(poll_path, form={"token": token}, auth=False), 404)
    assert not_yet.json == []
    grant = grant_in_browser(started["login"], user, PASSWORD)
    assert "Grant access" in grant and USER_AGENT in grant  # named after the app
    done = expect(app.post(poll_path, form={"token": token}, auth=False), 200).json
    assert done["server"] == app.base_url and done["loginName"] == user
    assert isinstance(done["appPassword"], str) and done["appPassword"]
    expect(app.post(poll_path, form={"token": token}, auth=False), 404)  # only once
    return done


def verify_account(app, credentials, user, display_name):
    """AccountVerificationActivity: capabilities with credentials, the profile, and
    the signaling settings of the API version the capabilities select."""
    app.cookies.clear()  # cookieManager.cookieStore.removeAll()
    app.sign_in_as(credentials["loginName"], credentials["appPassword"])
    data = expect(app.get(OCS2 + "/cloud/capabilities"), 200).data
    features = check_capabilities(data)
    profile = expect(app.get(OCS2 + "/cloud/user"), 200).data
    assert profile["id"] == user
    assert (profile.get("display-name") or profile.get("displayname")) == display_name
    signaling = 3 if "signaling-v3" in features else 1  # ApiUtils.getSignalingApiVersion
    settings = expect(app.get(f"{SPREED}{signaling}/signaling/settings"), 200).data
    assert isinstance(settings["stunservers"], list)
    return features


def signed_in_app(url, user):
    app = AndroidApp(url)
    check_server(app)
    credentials = login_flow_v2(app, user)
    verify_account(app, credentials, user, user.title())
    return app


ROOMS = SPREED + "4/room"


def test_android_sign_in_sequence(served):
    app = AndroidApp(served)
    check_server(app)
    credentials = login_flow_v2(app, "alice")
    verify_account(app, credentials, "alice", "Alice")
    # ConversationsListActivity: the list, as RetrofitConversationsNetwork asks for it.
    answer = expect(app.get(ROOMS, {"includeStatus": "true"}), 200)
    assert answer.data == []
    assert answer.headers["Content-Type"].startswith("application/json")


def test_android_creates_opens_and_joins_conversations(served):
    alice = signed_in_app(served, "alice")

    # getRetrofitBucketForCreateRoom: the parameters are a query on a POST.
    direct = expect(alice.post(ROOMS, {"roomType": "1", "invite": "bob"}), 201).data
    assert_conversation(direct)
    assert (direct["type"], direct["name"], direct["displayName"]) == (1, "bob", "Bob")
    again = expect(alice.post(ROOMS, {"roomType": "1", "invite": "bob"}), 200).data
    assert again["token"] == direct["token"]

    team = expect(alice.post(ROOMS, {"roomType": "2", "roomName": "Team"}), 201).data
    assert_conversation(team)
    assert (team["displayName"], team["participantType"]) == ("Team", 1)
    added = alice.post(f"{ROOMS}/{team['token']}/participants", {"newParticipant": "bob"})
    expect(added, 200)

    public = expect(alice.post(ROOMS, {"roomType": "3", "roomName": "Open"}), 201).data
    assert_conversation(public)
    token = public["token"]
    expect(alice.put(f"{ROOMS}/{token}/password", form={"password": "sesame"}), 200)

    rooms = expect(alice.get(ROOMS, {"includeStatus": "true"}), 200).data
    assert {r["token"] for r in rooms} == {direct["token"], team["token"], token}
    for room in rooms:
        assert_conversation(room)

    # Opening a conversation: get it, then join (@Field("password"), null left out).
    opened = expect(alice.get(f"{ROOMS}/{team['token']}"), 200).data
    assert_conversation(opened)
    assert opened["sessionId"] == "0"
    joined = expect(alice.post(f"{ROOMS}/{team['token']}/participants/active", form={}), 200)
    joined = joined.data
    assert_conversation(joined)
    assert joined["sessionId"] not in ("", "0") and joined["token"] == team["token"]
    participants = expect(alice.get(f"{ROOMS}/{team['token']}/participants",
                                    {"includeStatus": "true"}), 200).data
    by_actor = {p["actorId"]: p for p in participants}
    assert set(by_actor) == {"alice", "bob"}
    for participant in participants:
        for field, kind in PARTICIPANT_FIELDS.items():
            assert isinstance(participant[field], kind), field
            if kind is int:
                assert type(participant[field]) is int, field
    assert by_actor["alice"]["sessionIds"] == [joined["sessionId"]]
    # The cookie the join set finds the session again.
    assert expect(alice.get(f"{ROOMS}/{team['token']}"), 200).data["sessionId"] == (
        joined["sessionId"]
    )
    expect(alice.delete(f"{ROOMS}/{team['token']}/participants/active"), 200)

    # bob, on his phone: the public room with a password, joined with password=.
    bob = signed_in_app(served, "bob")
    rooms = expect(bob.get(ROOMS, {"includeStatus": "true"}), 200).data
    assert {r["token"] for r in rooms} == {direct["token"], team["token"]}
    for room in rooms:
        assert_conversation(room)
    seen = expect(bob.get(f"{ROOMS}/{token}"), 200).data
    assert seen["hasPassword"] is True and seen["participantType"] == 0
    wrong = bob.post(f"{ROOMS}/{token}/participants/active", form={"password": "nope"})
    expect(wrong, 403)
    inside = bob.post(f"{ROOMS}/{token}/participants/active", form={"password": "sesame"})
    inside = expect(inside, 200).data
    assert_conversation(inside)
    assert inside["participantType"] == 5 and inside["sessionId"] not in ("", "0")
    # Rejoining from the same device (force, as spreed defaults it) replaces the session.
    rejoined = bob.post(
        f"{ROOMS}/{token}/participants/active", form={"password": "sesame", "force": "true"}
    )
    rejoined = expect(rejoined, 200).data
    assert rejoined["sessionId"] not in ("0", inside["sessionId"])
    participants = expect(alice.get(f"{ROOMS}/{token}/participants"), 200).data
    bob_row = next(p for p in participants if p["actorId"] == "bob")
    assert bob_row["sessionIds"] == [rejoined["sessionId"]]
    expect(bob.delete(f"{ROOMS}/{token}/participants/active"), 200)


def test_android_settings_calls_as_it_sends_them(served):
    """The conversation-info screen's calls: form fields on PUT and POST."""
    alice = signed_in_app(served, "alice")
    token = expect(alice.post(ROOMS, {"roomType": "2", "roomName": "Team"}), 201).data["token"]
    url = f"{ROOMS}/{token}"
    expect(alice.put(url, form={"roomName": "Renamed"}), 200)
    expect(alice.post(f"{url}/notify", form={"level": "3"}), 200)
    expect(alice.put(f"{url}/read-only", form={"state": "1"}), 200)
    expect(alice.put(f"{url}/webinar/lobby", form={"state": "1", "timer": None}), 200)
    expect(alice.post(f"{url}/favorite"), 200)
    expect(alice.post(f"{url}/public"), 200)
    room = expect(alice.get(url), 200).data
    assert_conversation(room)
    assert (room["displayName"], room["notificationLevel"], room["readOnly"]) == ("Renamed", 3, 1)
    assert (room["isFavorite"], room["type"], room["lobbyState"]) == (True, 3, 1)
    # Participants: newParticipant as a query on a POST, attendeeId as a query.
    expect(alice.post(f"{url}/participants", {"newParticipant": "bob"}), 200)
    rows = expect(alice.get(f"{url}/participants", {"includeStatus": "true"}), 200).data
    bob_id = next(p["attendeeId"] for p in rows if p["actorId"] == "bob")
    expect(alice.post(f"{url}/moderators", {"attendeeId": bob_id}), 200)
    rows = expect(alice.get(f"{url}/participants"), 200).data
    assert next(p["participantType"] for p in rows if p["actorId"] == "bob") == 2
    expect(alice.delete(f"{url}/moderators", {"attendeeId": bob_id}), 200)
    expect(alice.delete(f"{url}/attendees", {"attendeeId": bob_id}), 200)
    rows = expect(alice.get(f"{url}/participants"), 200).data
    assert [p["actorId"] for p in rows] == ["alice"]
    expect(alice.delete(f"{url}/favorite"), 200)
    expect(alice.delete(f"{url}/public"), 200)
    expect(alice.delete(url), 200)
    expect(alice.get(url), 404)
