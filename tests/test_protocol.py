"""The OCS layer (SPEC 1, 8): format, envelope, status mapping, CSRF, auth, bodies, errors."""

import base64
import json
import xml.etree.ElementTree as ET

import pytest
import webtest
from conftest import API, CLOUD

import talk_server

API_V1 = "/ocs/v1.php/apps/spreed/api/v1"
CLOUD_V1 = "/ocs/v1.php/cloud"
WORLD = "Café ☕ 日本語 עברית"
JSON_TYPE = "application/json; charset=utf-8"
XML_TYPE = "application/xml; charset=utf-8"


def without(client, header):
    """The same client with one of its default headers dropped."""
    client.headers.pop(header)
    return client


def xml_of(response):
    """Parse an OCS XML answer after checking its declaration."""
    assert response.body.startswith(b'<?xml version="1.0"?>')
    return ET.fromstring(response.body)


def public_room(alice, name="Public"):
    return alice.post("/room", {"roomType": 3, "roomName": name}, status=201).data["token"]


# ---------------------------------------------------------------------------
# Format: JSON or XML
# ---------------------------------------------------------------------------


def test_accept_json_gives_json_envelope(alice):
    response = alice.get("/room", status=200)
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.json == {
        "ocs": {"meta": {"status": "ok", "statuscode": 200, "message": "OK"}, "data": []}
    }


def test_no_accept_header_gives_xml(make_client):
    alice = without(make_client("alice"), "Accept")
    response = alice.get("/room", status=200)
    assert response.headers["Content-Type"] == XML_TYPE
    root = xml_of(response)
    assert root.tag == "ocs"
    assert root.findtext("meta/status") == "ok"


def test_accept_naming_json_among_others_gives_json(alice):
    headers = {"Accept": "text/html, application/json;q=0.9, */*;q=0.1"}
    response = alice.get("/room", status=200, headers=headers)
    assert response.headers["Content-Type"] == JSON_TYPE


def test_accept_without_json_gives_xml(alice):
    response = alice.get("/room", status=200, headers={"Accept": "text/html, */*"})
    assert response.headers["Content-Type"] == XML_TYPE


@pytest.mark.parametrize(
    ("accept", "fmt", "content_type"),
    [
        ("application/xml", "json", JSON_TYPE),
        ("application/json", "xml", XML_TYPE),
    ],
)
def test_format_in_query_beats_accept(alice, accept, fmt, content_type):
    response = alice.get(f"/room?format={fmt}", status=200, headers={"Accept": accept})
    assert response.headers["Content-Type"] == content_type


@pytest.mark.parametrize(
    ("accept", "fmt", "content_type"),
    [
        ("application/xml", "json", JSON_TYPE),
        ("application/json", "xml", XML_TYPE),
    ],
)
def test_format_in_form_body_beats_accept(alice, accept, fmt, content_type):
    params = {"roomType": 3, "roomName": "x", "format": fmt}
    response = alice.post("/room", params, status=201, headers={"Accept": accept})
    assert response.headers["Content-Type"] == content_type


def test_format_in_json_body_beats_accept(alice):
    body = json.dumps({"roomType": 3, "roomName": "x", "format": "xml"})
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    response = alice.post("/room", body, status=201, headers=headers)
    assert response.headers["Content-Type"] == XML_TYPE
    assert xml_of(response).findtext("meta/statuscode") == "201"


def test_unknown_format_is_400_in_json(alice):
    response = alice.get("/room?format=yaml", status=400, headers={"Accept": "application/xml"})
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 400


def test_unknown_format_in_body_is_400_in_json(alice):
    response = alice.post("/room", {"roomType": 3, "format": "html"}, status=400)
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.meta["statuscode"] == 400


# ---------------------------------------------------------------------------
# XML shape
# ---------------------------------------------------------------------------


def test_xml_envelope_shape(alice):
    response = alice.get("/room", status=200, headers={"Accept": "application/xml"})
    assert response.body.decode("utf-8") == (
        '<?xml version="1.0"?>\n'
        "<ocs><meta><status>ok</status><statuscode>200</statuscode>"
        "<message>OK</message></meta><data></data></ocs>"
    )


def test_xml_lists_are_elements_true_is_1_false_is_empty(alice):
    token = public_room(alice, "Team")
    alice.post(f"/room/{token}/participants/active", status=200)
    alice.post(f"/call/{token}", status=200)
    response = alice.get("/room", status=200, headers={"Accept": "application/xml"})
    root = xml_of(response)
    rooms = root.findall("data/element")
    assert len(rooms) == 1
    room = rooms[0]
    assert room.findtext("token") == token
    assert room.findtext("name") == "Team"
    assert room.findtext("type") == "3"
    assert room.findtext("hasCall") == "1"
    has_password = room.find("hasPassword")
    assert has_password is not None and has_password.text is None and len(has_password) == 0


def test_xml_error_envelope(alice):
    response = alice.get("/room/nosuchrm", status=404, headers={"Accept": "application/xml"})
    assert response.headers["Content-Type"] == XML_TYPE
    root = xml_of(response)
    assert root.findtext("meta/status") == "failure"
    assert root.findtext("meta/statuscode") == "404"
    assert root.findtext("meta/message")


def test_xml_v1_meta_has_totalitems_and_itemsperpage(make_client):
    alice = make_client("alice", prefix=API_V1)
    response = alice.get("/room", status=200, headers={"Accept": "application/xml"})
    meta = xml_of(response).find("meta")
    assert [child.tag for child in meta] == [
        "status",
        "statuscode",
        "message",
        "totalitems",
        "itemsperpage",
    ]
    assert meta.findtext("statuscode") == "100"
    assert meta.find("totalitems").text is None


def test_xml_keeps_non_ascii_text(alice):
    token = public_room(alice, WORLD)
    response = alice.get(f"/room/{token}", status=200, headers={"Accept": "application/xml"})
    assert xml_of(response).findtext("data/name") == WORLD


def test_xml_escapes_markup_in_text(alice):
    name = '<b>&"tags"</b>'
    token = public_room(alice, name)
    response = alice.get(f"/room/{token}", status=200, headers={"Accept": "application/xml"})
    assert xml_of(response).findtext("data/name") == name


# ---------------------------------------------------------------------------
# v2 and v1 status mapping
# ---------------------------------------------------------------------------


def test_v2_success_meta(alice):
    response = alice.post("/room", {"roomType": 3, "roomName": "x"}, status=201)
    assert response.meta == {"status": "ok", "statuscode": 201, "message": "OK"}


def test_v2_error_meta_statuscode_is_http_status(alice):
    response = alice.get("/room/nosuchrm", status=404)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 404
    assert response.meta["message"] == "Room not found"
    assert response.data == []


def test_v2_bad_request(alice):
    response = alice.post("/room", {"roomType": 7}, status=400)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 400
    assert response.meta["message"]


def test_v1_success_is_http_200_statuscode_100(make_client, alice):
    token = alice.post("/room", {"roomType": 3, "roomName": "x"}, status=201).data["token"]
    response = make_client("alice", prefix=API_V1).get(f"/room/{token}", status=200)
    assert response.meta == {
        "status": "ok",
        "statuscode": 100,
        "message": "OK",
        "totalitems": "",
        "itemsperpage": "",
    }
    assert response.data["token"] == token


def test_v1_created_keeps_statuscode_201_with_status_failure(make_client):
    """Only a 200 becomes 100 on v1: Nextcloud's OCS v1 passes a 201 through,
    and so calls it a failure (SPEC 1.3). The data is the created room."""
    alice = make_client("alice", prefix=API_V1)
    response = alice.post("/room", {"roomType": 3, "roomName": "x"}, status=200)
    assert response.meta == {
        "status": "failure",
        "statuscode": 201,
        "message": "OK",
        "totalitems": "",
        "itemsperpage": "",
    }
    assert len(response.data["token"]) == 8


def test_v1_not_found_is_http_200_statuscode_404(make_client):
    alice = make_client("alice", prefix=API_V1)
    response = alice.get("/room/nosuchrm", status=200)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 404
    assert response.meta["totalitems"] == ""
    assert response.meta["itemsperpage"] == ""


def test_v1_wrong_credentials_stay_http_401(make_client):
    intruder = make_client("alice", password="nope", prefix=API_V1)
    response = intruder.get("/room", status=401)
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 997


def test_v1_and_v2_answer_the_same_route(alice, make_client):
    token = public_room(alice)
    v1 = make_client("alice", prefix=API_V1).get(f"/room/{token}", status=200)
    v2 = alice.get(f"/room/{token}", status=200)
    assert v1.data == v2.data


# ---------------------------------------------------------------------------
# The OCS-APIRequest header (SPEC 1.4)
# ---------------------------------------------------------------------------


def test_missing_ocs_apirequest_is_412(make_client):
    alice = without(make_client("alice"), "OCS-APIRequest")
    response = alice.get("/room", status=412)
    assert response.json == {"message": "CSRF check failed"}
    assert response.headers["Content-Type"] == JSON_TYPE


def test_missing_ocs_apirequest_is_412_json_even_when_xml_asked(make_client):
    alice = without(make_client("alice"), "OCS-APIRequest")
    response = alice.get("/room", status=412, headers={"Accept": "application/xml"})
    assert response.json == {"message": "CSRF check failed"}


def test_ocs_apirequest_other_than_true_is_412(alice):
    response = alice.get("/room", status=412, headers={"OCS-APIRequest": "false"})
    assert response.json == {"message": "CSRF check failed"}


def test_ocs_apirequest_header_name_is_case_insensitive(make_client):
    alice = without(make_client("alice"), "OCS-APIRequest")
    alice.get("/room", status=200, headers={"ocs-apirequest": "true"})
    alice.get("/room", status=200, headers={"OCS-APIREQUEST": "true"})


def test_401_comes_before_412_on_user_endpoints(make_client):
    nobody = without(make_client(), "OCS-APIRequest")
    assert nobody.get("/room", status=401).meta["statuscode"] == 997
    intruder = without(make_client("alice", password="nope"), "OCS-APIRequest")
    assert intruder.get("/room", status=401).meta["statuscode"] == 997


def test_guest_without_ocs_apirequest_is_412_on_public_endpoint(alice, make_client):
    token = public_room(alice)
    guest = without(make_client(), "OCS-APIRequest")
    response = guest.get(f"/room/{token}", status=412)
    assert response.json == {"message": "CSRF check failed"}


def test_capabilities_need_ocs_apirequest(make_client):
    guest = without(make_client(prefix=CLOUD), "OCS-APIRequest")
    guest.get("/capabilities", status=412)


# ---------------------------------------------------------------------------
# Authentication (SPEC 1.5)
# ---------------------------------------------------------------------------


def test_no_credentials_on_user_endpoint_is_401_997(anonymous):
    response = anonymous.get("/room", status=401)
    assert response.meta == {
        "status": "failure",
        "statuscode": 997,
        "message": response.meta["message"],
    }
    assert response.meta["message"]


def test_wrong_password_is_401_997(wrong_password):
    assert wrong_password.get("/room", status=401).meta["statuscode"] == 997


def test_unknown_user_is_401_997(make_client):
    assert make_client("mallory").get("/room", status=401).meta["statuscode"] == 997


def test_wrong_password_is_401_even_on_public_endpoint(alice, wrong_password):
    token = public_room(alice)
    assert wrong_password.get(f"/room/{token}", status=401).meta["statuscode"] == 997


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"alice-without-colon").decode(),
        "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
        "Basic",
        "Bearer abcdef",
        "alice:secret",
    ],
)
def test_malformed_authorization_is_401_997(anonymous, authorization):
    response = anonymous.get("/room", status=401, headers={"Authorization": authorization})
    assert response.meta["statuscode"] == 997


def test_right_credentials_pass(alice, bob):
    alice.get("/room", status=200)
    bob.get("/room", status=200)


def test_guest_cookie_is_set_on_join(alice, guest):
    token = public_room(alice)
    response = guest.post(f"/room/{token}/participants/active", status=200)
    cookies = response.headers.getall("Set-Cookie")
    assert len(cookies) == 1
    name_value, *attributes = [part.strip() for part in cookies[0].split(";")]
    assert name_value.split("=", 1)[0] == talk_server.GUEST_COOKIE
    assert len(name_value.split("=", 1)[1]) >= 20
    lowered = [attribute.lower() for attribute in attributes]
    assert "httponly" in lowered
    assert "samesite=lax" in lowered
    assert "path=/" in lowered


def test_guest_keeps_its_identity_with_the_cookie(alice, guest):
    token = public_room(alice)
    first = guest.post(f"/room/{token}/participants/active", status=200).data["sessionId"]
    second = guest.post(f"/room/{token}/participants/active", status=200)
    assert "Set-Cookie" not in second.headers
    assert second.data["sessionId"] != first
    guests = [p for p in alice.get(f"/room/{token}/participants").data if p["userId"] == ""]
    assert len(guests) == 1


def test_users_get_no_cookie_on_join(alice):
    token = public_room(alice)
    response = alice.post(f"/room/{token}/participants/active", status=200)
    assert "Set-Cookie" not in response.headers


# ---------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------


def test_form_body_keeps_non_ascii_text(alice):
    token = alice.post("/room", {"roomType": 3, "roomName": WORLD}, status=201).data["token"]
    response = alice.get(f"/room/{token}", status=200)
    assert response.data["name"] == WORLD
    assert WORLD.encode("utf-8") in response.body  # UTF-8 on the wire, not \u escapes


def test_json_body_keeps_non_ascii_text(alice):
    body = json.dumps({"roomType": 3, "roomName": WORLD})
    headers = {"Content-Type": "application/json"}
    token = alice.post("/room", body, status=201, headers=headers).data["token"]
    assert alice.get(f"/room/{token}", status=200).data["name"] == WORLD


def test_json_body_with_charset_and_raw_utf8(alice):
    body = json.dumps({"roomType": 3, "roomName": WORLD}, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/json; charset=utf-8"}
    token = alice.post("/room", body, status=201, headers=headers).data["token"]
    assert alice.get(f"/room/{token}", status=200).data["name"] == WORLD


def test_put_body_keeps_non_ascii_text(alice):
    token = public_room(alice, "old")
    alice.put(f"/room/{token}", {"roomName": WORLD}, status=200)
    assert alice.get(f"/room/{token}", status=200).data["name"] == WORLD


def test_query_keeps_non_ascii_text(alice):
    new_user = {"userid": "erin", "password": "pw", "displayName": WORLD}
    alice.post("/users", new_user, status=200, prefix=CLOUD)
    found = alice.get("/users", {"search": "日本語"}, status=200, prefix=CLOUD).data
    assert found == {"users": ["erin"]}
    assert alice.get("/users/erin", status=200, prefix=CLOUD).data["displayname"] == WORLD


def test_chat_message_keeps_non_ascii_text(alice):
    token = public_room(alice)
    alice.post(f"/room/{token}/participants/active", status=200)
    alice.post(f"/chat/{token}", {"message": WORLD}, status=201)
    messages = alice.get(f"/chat/{token}", {"timeout": 0}, status=200).data
    assert [m["message"] for m in messages] == [WORLD]


def test_invalid_utf8_form_body_is_400(alice):
    body = b"roomType=3&roomName=caf\xe9"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = alice.post("/room", body, status=400, headers=headers)
    assert response.meta["statuscode"] == 400
    assert alice.get("/room", status=200).data == []


def test_percent_encoded_invalid_utf8_form_body_is_400(alice):
    body = b"roomType=3&roomName=caf%E9"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    alice.post("/room", body, status=400, headers=headers)
    assert alice.get("/room", status=200).data == []


def test_malformed_json_is_400(alice):
    headers = {"Content-Type": "application/json"}
    response = alice.post("/room", '{"roomType": 3,', status=400, headers=headers)
    assert response.meta["statuscode"] == 400


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "3", "null"])
def test_json_that_is_not_an_object_is_400(alice, body):
    headers = {"Content-Type": "application/json"}
    alice.post("/room", body, status=400, headers=headers)


def test_json_numbers_are_accepted_as_numbers(alice):
    headers = {"Content-Type": "application/json"}
    body = json.dumps({"roomType": 2, "roomName": "numbers"})
    alice.post("/room", body, status=201, headers=headers)


def test_empty_body_is_no_parameters(alice):
    alice.post("/room", "", status=400, headers={"Content-Type": "application/json"})


def test_oversized_body_is_413_envelope(tmp_path, password_hash):
    app = talk_server.make_app(tmp_path / "small.db", max_body=1000)
    try:
        with app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        client = webtest.TestApp(app)
        headers = {
            "OCS-APIRequest": "true",
            "Accept": "application/json",
            "Authorization": "Basic " + base64.b64encode(b"alice:secret").decode(),
        }
        big = {"roomType": "3", "roomName": "x" * 2000}
        response = client.post(API + "/room", big, headers=headers, status=413)
        assert response.headers["Content-Type"] == JSON_TYPE
        assert response.json["ocs"]["meta"]["status"] == "failure"
        assert response.json["ocs"]["meta"]["statuscode"] == 413
        small = {"roomType": "3", "roomName": "x" * 100}
        client.post(API + "/room", small, headers=headers, status=201)
    finally:
        app.talk.close()


# ---------------------------------------------------------------------------
# Router-level errors: unknown path, wrong method, crash
# ---------------------------------------------------------------------------


def test_unknown_path_under_ocs_is_404_envelope(alice):
    response = alice.get("/no/such/endpoint", status=404)
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 404
    assert response.data == []


def test_unknown_path_outside_the_api_is_404_envelope(anonymous):
    response = anonymous.get("/ocs/v2.php/apps/nosuchapp/api/v1/x", status=404, prefix="")
    assert response.meta["statuscode"] == 404


def test_unknown_path_in_xml(make_client):
    client = without(make_client(), "Accept")
    response = client.get("/no/such/endpoint", status=404)
    assert response.headers["Content-Type"] == XML_TYPE
    assert xml_of(response).findtext("meta/statuscode") == "404"


def test_wrong_method_is_405_envelope(alice):
    response = alice.delete("/room", status=405)
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 405


def test_wrong_method_on_cloud_is_405_envelope(alice):
    response = alice.delete("/capabilities", status=405, prefix=CLOUD)
    assert response.meta["statuscode"] == 405


def test_crash_is_500_envelope_without_traceback(alice, monkeypatch):
    def broken(db, user_id):
        raise RuntimeError("secret internals exploded")

    monkeypatch.setattr(talk_server, "rooms_of", broken)
    response = alice.get("/room", status=500)
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.meta["status"] == "failure"
    assert response.meta["statuscode"] == 500
    assert b"Traceback" not in response.body
    assert b"secret internals" not in response.body
    assert b"<html" not in response.body.lower()


def test_crash_in_xml_is_500_envelope(make_client, monkeypatch):
    def broken(db, user_id):
        raise RuntimeError("secret internals exploded")

    monkeypatch.setattr(talk_server, "rooms_of", broken)
    alice = without(make_client("alice"), "Accept")
    response = alice.get("/room", status=500)
    assert xml_of(response).findtext("meta/statuscode") == "500"
    assert b"Traceback" not in response.body


# ---------------------------------------------------------------------------
# status.php and capabilities (SPEC 1.1, 8)
# ---------------------------------------------------------------------------


def test_status_php_exact_json(anonymous):
    response = anonymous.test.get("/status.php", status=200)
    assert response.content_type == "application/json"
    assert response.json == {
        "installed": True,
        "maintenance": False,
        "needsDbUpgrade": False,
        "version": "31.0.0.0",
        "versionstring": "31.0.0",
        "edition": "",
        "productname": "talk-server",
    }


def test_status_php_needs_no_header_and_no_auth(app):
    webtest.TestApp(app).get("/status.php", status=200)


@pytest.mark.parametrize("prefix", [CLOUD, CLOUD_V1])
def test_capabilities_for_guests(anonymous, prefix):
    response = anonymous.get("/capabilities", status=200, prefix=prefix)
    # The 2018 names stay first; today's follow (SPEC 11).
    assert response.data["capabilities"]["spreed"]["features"][:5] == [
        "audio",
        "video",
        "chat",
        "guest-signaling",
        "empty-group-room",
    ]
    assert response.data["version"]["productname"] == "talk-server"
    assert response.data["version"]["talk-server"] == talk_server.__version__


def test_capabilities_for_users(alice):
    response = alice.get("/capabilities", status=200, prefix=CLOUD)
    assert "guest-signaling" in response.data["capabilities"]["spreed"]["features"]


def test_capabilities_in_xml(make_client):
    guest = without(make_client(prefix=CLOUD), "Accept")
    root = xml_of(guest.get("/capabilities", status=200))
    features = root.findall("data/capabilities/spreed/features/element")
    assert [f.text for f in features] == talk_server.FEATURES
