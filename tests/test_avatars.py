"""Avatars: generated user and guest PNGs, conversation avatars (upload,
emoji, delete) through multipart bodies, and nc-py-api against a served
talk-server. Also the multipart parser itself."""

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from conftest import API, PASSWORD
from helpers import add, create, join
from served import served  # noqa: F401

import talk_server

ROOT = Path(__file__).resolve().parents[1]


# --- Images built here, and a PNG reader that checks everything ---------------


def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def make_png(width, height, rgb=(200, 30, 30)):
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_jpeg(width, height):
    """A real baseline greyscale JPEG of mid-grey: every 8x8 block has DC 0
    and no AC coefficients, so one-bit Huffman codes encode it all."""
    segment = lambda marker, body: b"\xff" + marker + struct.pack(">H", len(body) + 2) + body  # noqa: E731
    quant = segment(b"\xdb", b"\x00" + b"\x01" * 64)
    frame = segment(b"\xc0", struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    one_code = b"\x01" + b"\x00" * 15 + b"\x00"  # one code of length 1 for symbol 0
    huffman = segment(b"\xc4", b"\x00" + one_code) + segment(b"\xc4", b"\x10" + one_code)
    scan = segment(b"\xda", b"\x01\x01\x00\x00\x3f\x00")
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = "00" * blocks  # DC category 0, then end of block
    bits += "1" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    return b"\xff\xd8" + quant + frame + huffman + scan + data + b"\xff\xd9"


def read_png(data):
    """(width, height, rows of RGB bytes); asserts the signature, every CRC,
    IHDR first, IEND last and the decompressed length."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + body) == crc, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + width * 3
    assert len(raw) == height * stride
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter "none"
    return width, height, [row[1:] for row in rows]


def avatar(client, path, status=200, headers=None):
    """GET a plain avatar page (not under the OCS prefix)."""
    return client.get(path, status=status, headers=headers, prefix="")


def upload(client, token, data, filename="a.png", status=200, field="file"):
    """POST /room/{token}/avatar as multipart/form-data, the way apps send it."""
    response = client.test.post(
        f"{API}/room/{token}/avatar",
        upload_files=[(field, filename, data)],
        headers=client.headers,
        status=status,
        expect_errors=True,
    )
    if response.content_type == "application/json":
        response.data = response.json["ocs"]["data"]
    return response


def room_avatar(client, token, dark=False, status=200, headers=None):
    suffix = "/dark" if dark else ""
    return client.get(f"/room/{token}/avatar{suffix}", status=status, headers=headers)


# --- User and guest avatars ----------------------------------------------------


@pytest.mark.parametrize("size", [64, 256, 512])
def test_user_avatar_is_a_valid_png_of_the_requested_size(alice, size):
    response = avatar(alice, f"/index.php/avatar/bob/{size}")
    assert response.content_type == "image/png"
    width, height, rows = read_png(response.body)
    assert (width, height) == (size, size)


def test_the_initial_is_drawn_in_white_on_the_background(alice):
    _, _, rows = read_png(avatar(alice, "/index.php/avatar/bob/64").body)
    background = rows[0][:3]
    pixels = {bytes(row[x : x + 3]) for row in rows for x in range(0, len(row), 3)}
    assert pixels == {bytes(background), b"\xff\xff\xff"}
    middle = rows[32]
    assert b"\xff\xff\xff" in {bytes(middle[x : x + 3]) for x in range(0, len(middle), 3)}


def test_sizes_are_clamped_to_16_and_512(alice):
    assert read_png(avatar(alice, "/index.php/avatar/bob/1").body)[:2] == (16, 16)
    assert read_png(avatar(alice, "/index.php/avatar/bob/999999999").body)[:2] == (512, 512)


def test_a_size_that_is_not_a_number_is_404(alice):
    avatar(alice, "/index.php/avatar/bob/big", status=404)


def test_dark_avatar_differs_from_the_light_one(alice):
    light = read_png(avatar(alice, "/index.php/avatar/bob/64").body)[2]
    dark = read_png(avatar(alice, "/index.php/avatar/bob/64/dark").body)[2]
    assert light != dark
    assert sum(dark[0][:3]) < sum(light[0][:3])


def test_colour_is_stable_and_follows_the_display_name(app, alice):
    first = avatar(alice, "/index.php/avatar/bob/64")
    assert avatar(alice, "/index.php/avatar/bob/64").body == first.body
    with app.talk.db.write() as db:
        talk_server.set_display_name(db, "bob", "Zed")
    renamed = avatar(alice, "/index.php/avatar/bob/64")
    assert renamed.headers["ETag"] != first.headers["ETag"]
    assert renamed.body != first.body


def test_unknown_user_is_404_unless_guest_fallback(alice):
    response = avatar(alice, "/index.php/avatar/nobody/64", status=404)
    assert response.json == []
    fallback = avatar(alice, "/index.php/avatar/nobody/64?guestFallback=true")
    assert read_png(fallback.body)[:2] == (64, 64)


def test_avatars_need_no_sign_in(anonymous):
    assert avatar(anonymous, "/index.php/avatar/alice/64").content_type == "image/png"


def test_etag_gives_304(anonymous):
    first = avatar(anonymous, "/index.php/avatar/alice/64")
    etag = first.headers["ETag"]
    assert "no-cache" in first.headers["Cache-Control"]
    again = avatar(anonymous, "/index.php/avatar/alice/64", 304, {"If-None-Match": etag})
    assert again.body == b""
    avatar(anonymous, "/index.php/avatar/alice/64", 304, {"If-None-Match": f'"x", W/{etag}'})
    avatar(anonymous, "/index.php/avatar/alice/64", 200, {"If-None-Match": '"other"'})
    other_size = avatar(anonymous, "/index.php/avatar/alice/65")
    assert other_size.headers["ETag"] != etag


def test_guest_avatar_from_the_name(anonymous):
    zoe = avatar(anonymous, "/index.php/avatar/guest/Zo%C3%AB/64")
    assert read_png(zoe.body)[:2] == (64, 64)
    assert avatar(anonymous, "/index.php/avatar/guest/Zo%C3%AB/64/dark").body != zoe.body
    # Any name, even one no glyph exists for, gets a picture.
    assert read_png(avatar(anonymous, "/index.php/avatar/guest/%E6%9D%8E/32").body)[:2] == (32, 32)


def test_the_png_cache_is_bounded_and_lives_on_the_app(app, anonymous):
    app.talk.avatars.entries = 3
    for size in range(20, 30):
        avatar(anonymous, f"/index.php/avatar/alice/{size}")
    assert len(app.talk.avatars._items) == 3


def test_initials_fold_accents_and_case():
    assert talk_server.avatar_initial("élodie") == "E"
    assert talk_server.avatar_initial("  7 dwarfs") == "7"
    assert talk_server.avatar_initial("李") == ""
    assert talk_server.avatar_initial("") == ""


# --- Multipart bodies --------------------------------------------------------


def parse(body, ctype="multipart/form-data; boundary=XyZ", max_body=10**6):
    environ = {"CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": ctype, "wsgi.input": io.BytesIO(body)}
    return talk_server.read_body(environ, max_body)


def part(name, data, filename=None, ctype=None):
    disposition = f'form-data; name="{name}"' + (f"; filename=\"{filename}\"" if filename is not None else "")
    head = f"Content-Disposition: {disposition}\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
    return b"--XyZ\r\n" + head.encode() + b"\r\n" + data + b"\r\n"


def test_multipart_gives_fields_and_uploads():
    png = make_png(2, 2)
    body = part("roomName", "Caf\u00e9".encode()) + part("file", png, "a.png", "image/png") + b"--XyZ--\r\n"
    fields = parse(body)
    assert fields["roomName"] == "Caf\u00e9"
    assert fields["file"] == talk_server.Upload("a.png", "image/png", png)


def test_multipart_keeps_binary_bytes_and_empty_files():
    data = b"\r\n--XY\x00\xff\r\n"
    fields = parse(part("f", data, "x.bin") + part("empty", b"", "") + b"--XyZ--")
    assert fields["f"].data == data and fields["f"].content_type == "application/octet-stream"
    assert fields["empty"].data == b"" and fields["empty"].filename == ""


@pytest.mark.parametrize(
    "body, ctype",
    [
        (part("a", b"1"), "multipart/form-data; boundary=XyZ"),  # no closing delimiter
        (part("a", b"1") + b"--XyZ--", "multipart/form-data"),  # no boundary
        (b"roomType=3", "multipart/form-data; boundary=XyZ"),
        (b"--XyZ\r\nX-Other: 1\r\n\r\nv\r\n--XyZ--", "multipart/form-data; boundary=XyZ"),
        (b"--XyZ\r\nContent-Disposition: attachment; name=a\r\n\r\nv\r\n--XyZ--", None),
        (b"--XyZ\r\nbroken header\r\n\r\nv\r\n--XyZ--", None),
        (part("a", b"\xff\xfe"), None),  # a text field that is not UTF-8
        (part("a", b"1") * (talk_server.MULTIPART_MAX_PARTS + 1) + b"--XyZ--", None),
        (b"--XyZ\r\nContent-Disposition: form-data; name=a", None),
        (part("a", b"1") + b"--XyZ--", "multipart/form-data; boundary=" + "b" * 71),
    ],
)
def test_malformed_multipart_is_400(body, ctype):
    with pytest.raises(talk_server.OCSError) as error:
        parse(body, ctype or "multipart/form-data; boundary=XyZ")
    assert error.value.status == 400


def test_multipart_is_bounded_by_max_body():
    with pytest.raises(talk_server.OCSError) as error:
        parse(part("a", b"x" * 2000) + b"--XyZ--", max_body=1000)
    assert error.value.status == 413


def test_other_multipart_types_are_still_refused(alice):
    response = alice.test.post(
        f"{API}/room", b"--XyZ--", headers=alice.headers, content_type="multipart/mixed; boundary=XyZ",
        status=400, expect_errors=True,
    )
    assert response.json["ocs"]["meta"]["statuscode"] == 400


def test_a_file_where_text_is_expected_is_400(alice):
    response = alice.test.post(
        f"{API}/room", {"roomType": "2"}, upload_files=[("roomName", "n.txt", b"Team")],
        headers=alice.headers, status=400, expect_errors=True,
    )
    assert "not a file" in response.json["ocs"]["meta"]["message"]
    response = alice.test.post(
        f"{API}/room", upload_files=[("roomType", "n.txt", b"2")],
        headers=alice.headers, status=400, expect_errors=True,
    )
    assert response.json["ocs"]["meta"]["statuscode"] == 400


def test_multipart_form_fields_work_on_the_2018_routes(alice):
    response = alice.test.post(
        f"{API}/room", {"roomType": "3", "roomName": "Multi"}, upload_files=[("x", "x", b"")],
        headers=alice.headers, status=201, expect_errors=True,
    )
    assert response.json["ocs"]["data"]["name"] == "Multi"


def test_malformed_multipart_on_an_endpoint_is_an_envelope(alice):
    response = alice.test.post(
        f"{API}/room", b"--XyZ\r\nContent-Disposition: form-data; name=roomType\r\n\r\n3",
        headers=alice.headers, content_type="multipart/form-data; boundary=XyZ",
        status=400, expect_errors=True,
    )
    assert response.json["ocs"]["meta"]["status"] == "failure"


# --- Conversation avatars ----------------------------------------------------


@pytest.fixture
def team(alice, bob, carol):
    """A group room: alice owner, bob member (not moderator); carol is outside."""
    token = create(alice, 2, roomName="Team")
    add(alice, token, "bob")
    return token


def test_default_avatar_is_an_svg_icon(alice, team):
    response = room_avatar(alice, team)
    assert response.content_type == "image/svg+xml"
    assert response.body.startswith(b"<?xml") and b"<svg" in response.body
    assert room_avatar(alice, team, dark=True).body != response.body
    public = create(alice, 3, roomName="Open")
    assert room_avatar(alice, public).body != response.body


def test_room_avatar_needs_no_ocs_header_but_the_room(alice, carol, team):
    headers = {"OCS-APIRequest": ""}
    assert room_avatar(alice, team, headers=headers).content_type == "image/svg+xml"
    room_avatar(carol, team, status=404)
    room_avatar(alice, "nosuchroom", status=404)


def test_upload_png_then_get_it_back(alice, bob, team):
    png = make_png(4, 4)
    response = upload(alice, team, png)
    assert response.data["token"] == team
    got = room_avatar(bob, team)
    assert got.content_type == "image/png" and got.body == png
    assert room_avatar(bob, team, dark=True).body == png


def test_upload_jpeg_then_get_it_back(alice, team):
    jpeg = make_jpeg(16, 16)
    assert talk_server.jpeg_dimensions(jpeg) == (16, 16)
    upload(alice, team, jpeg, "photo.jpg")
    got = room_avatar(alice, team)
    assert got.content_type == "image/jpeg" and got.body == jpeg


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "Unknown filetype"),
        (b"this is no picture at all", "Invalid image"),
        (make_png(4, 4)[:-12], "Invalid image"),  # no IEND
        (make_png(4, 4)[:29] + b"\x00" + make_png(4, 4)[30:], "Invalid image"),  # bad CRC
        (make_png(4, 3), "Avatar image is not square"),
        (make_jpeg(16, 8), "Avatar image is not square"),
        (b"\xff\xd8\xff\xd9", "Invalid image"),
        (b"", "No image file provided"),
    ],
)
def test_upload_refuses_what_is_no_square_png_or_jpeg(alice, team, data, message):
    response = upload(alice, team, data, status=400)
    assert response.data == {"message": message}
    assert room_avatar(alice, team).content_type == "image/svg+xml"


def test_upload_without_a_file_is_400(alice, team):
    alice.post(f"/room/{team}/avatar", {"file": "not a file"}, status=400)
    alice.post(f"/room/{team}/avatar", status=400)


def test_upload_over_the_limit(app, alice, team, monkeypatch):
    monkeypatch.setattr(talk_server, "AVATAR_UPLOAD_MAX", 100)
    upload(alice, team, make_png(64, 64, (1, 2, 3)) + b"\x00" * 200, status=400)
    huge = b"\x00" * (talk_server.AVATAR_BODY_MAX + 1)
    upload(alice, team, huge, status=413)


def test_upload_takes_more_than_max_body(alice, team):
    # A real photo is bigger than the 1 MiB of other bodies.
    big = make_png(4, 4)[:-12] + chunk(b"tEXt", b"x" * (1024 * 1024 + 10)) + chunk(b"IEND", b"")
    upload(alice, team, big)


def test_only_moderators_change_avatars(alice, bob, carol, team):
    upload(bob, team, make_png(4, 4), status=403)
    bob.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f389"}, status=403)
    bob.delete(f"/room/{team}/avatar", status=403)
    upload(carol, team, make_png(4, 4), status=404)
    carol.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f389"}, status=404)
    carol.delete(f"/room/{team}/avatar", status=404)


def test_guests_cannot_change_avatars(alice, guest):
    token = create(alice, 3, roomName="Open")
    join(guest, token)
    upload(guest, token, make_png(4, 4), status=404)
    assert room_avatar(guest, token).content_type == "image/svg+xml"


def test_one_to_one_rooms_keep_the_other_users_avatar(alice, bob):
    token = create(alice, 1, invite="bob")
    response = upload(alice, token, make_png(4, 4), status=400)
    assert "one-to-one" in response.data["message"].lower()
    alice.post(f"/room/{token}/avatar/emoji", {"emoji": "\U0001f389"}, status=400)
    # The picture is bob's generated avatar for alice, and alice's for bob.
    assert room_avatar(alice, token).body == avatar(alice, "/index.php/avatar/bob/512").body
    assert room_avatar(bob, token, dark=True).body == avatar(bob, "/index.php/avatar/alice/512/dark").body


def test_emoji_avatar_is_an_svg_with_its_colour(alice, bob, team):
    alice.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f44d\U0001f3fd", "color": "FF00aa"})
    svg = room_avatar(bob, team)
    assert svg.content_type == "image/svg+xml"
    text = svg.body.decode()
    assert "\U0001f44d\U0001f3fd" in text and 'fill="#ff00aa"' in text
    assert room_avatar(bob, team, dark=True).body == svg.body  # a chosen colour is kept


def test_emoji_avatar_without_colour_follows_the_theme(alice, team):
    alice.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f389", "color": ""})
    light = room_avatar(alice, team).body.decode()
    dark = room_avatar(alice, team, dark=True).body.decode()
    assert 'fill="#6b6b6b"' in light and 'fill="#3b3b3b"' in dark


@pytest.mark.parametrize(
    "emoji",
    ["\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f1e9\U0001f1ea", "2\ufe0f\u20e3",
     "\u2764\ufe0f", "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
     "\U0001f9d1\U0001f3fe\u200d\U0001f4bb"],
)
def test_single_emoji_sequences_are_taken(alice, team, emoji):
    alice.post(f"/room/{team}/avatar/emoji", {"emoji": emoji})


@pytest.mark.parametrize(
    "emoji", ["", "a", "ab", "\U0001f389\U0001f389", "\U0001f389 ", "<svg>", "\U0001f1e9",
              "\u200d\U0001f389", "\U0001f389\u200d", "\U0001f389" * 20],
)
def test_not_one_emoji_is_400(alice, team, emoji):
    response = alice.post(f"/room/{team}/avatar/emoji", {"emoji": emoji}, status=400)
    assert response.data == {"message": "Invalid emoji character"}


@pytest.mark.parametrize("color", ["red", "#ff0000", "ff00", "ff00001", "gggggg"])
def test_bad_colour_is_400(alice, team, color):
    alice.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f389", "color": color}, status=400)


def test_each_change_gives_a_new_avatar_version(app, alice, team):
    def version():
        with app.talk.db.read() as db:
            room = talk_server.room_by_token(db, team)
            return talk_server.room_avatar_json(talk_server.room_avatar_fields(db, room["id"]))

    seen = [version()]
    assert seen[0]["isCustomAvatar"] is False
    upload(alice, team, make_png(4, 4))
    seen.append(version())
    alice.post(f"/room/{team}/avatar/emoji", {"emoji": "\U0001f389"})
    seen.append(version())
    alice.delete(f"/room/{team}/avatar")
    seen.append(version())
    assert [v["isCustomAvatar"] for v in seen] == [False, True, True, False]
    assert len({v["avatarVersion"] for v in seen}) == 4
    alice.delete(f"/room/{team}/avatar")  # already the default: nothing changes
    assert version() == seen[-1]


def test_room_avatar_etag_gives_304_and_changes_with_the_avatar(alice, team):
    first = room_avatar(alice, team)
    room_avatar(alice, team, status=304, headers={"If-None-Match": first.headers["ETag"]})
    upload(alice, team, make_png(4, 4))
    room_avatar(alice, team, status=200, headers={"If-None-Match": first.headers["ETag"]})


def test_delete_goes_back_to_the_default(app, alice, team):
    upload(alice, team, make_png(4, 4))
    alice.delete(f"/room/{team}/avatar")
    assert room_avatar(alice, team).content_type == "image/svg+xml"
    with app.talk.db.read() as db:
        assert db.execute("SELECT COUNT(*) FROM room_avatars").fetchone()[0] == 0


def test_room_lookups_do_not_read_the_image(app, alice, team):
    upload(alice, team, make_png(4, 4))
    with app.talk.db.read() as db:
        room = talk_server.room_by_token(db, team)
    assert room["avatar"] is None and room["avatar_type"] == "image/png"


def test_deleting_the_room_deletes_its_avatar(app, alice, team):
    upload(alice, team, make_png(4, 4))
    alice.delete(f"/room/{team}")
    with app.talk.db.read() as db:
        assert db.execute("SELECT COUNT(*) FROM room_avatars").fetchone()[0] == 0


def test_readme_lists_the_new_endpoints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## What is implemented") :]
    tables = (
        talk_server.AVATAR_ROUTES + talk_server.USER_STATUS_ROUTES + talk_server.AUTOCOMPLETE_ROUTES
    )
    paths = [path for _, path, _, _ in tables]
    paths += [re.sub(r":re:[^>]*", "", path) for _, path, _ in talk_server.USER_AVATAR_ROUTES]
    for path in paths:
        shown = re.sub(r"<(\w+)>", r"{\1}", path)
        assert f"{shown}`" in table, f"{shown} is missing from the README"


# --- nc-py-api against a served talk-server ------------------------------------


def nextcloud(url, user="alice"):
    """An nc-py-api client, relying on the server's own capabilities (avatar)."""
    import nc_py_api

    nc = nc_py_api.Nextcloud(nextcloud_url=url, nc_auth_user=user, nc_auth_pass=PASSWORD)
    assert "avatar" in nc.capabilities["spreed"]["features"]
    return nc


def test_nc_py_api_conversation_avatar(served):  # noqa: F811 (a fixture)
    nc = nextcloud(served)
    # nc-py-api's own create_conversation needs the v4 routes: make it by hand.
    token = nc.ocs("POST", "/ocs/v2.php/apps/spreed/api/v1/room", json={"roomType": 2, "roomName": "Py"})["token"]
    default = nc.talk.get_conversation_avatar(token)
    assert default.startswith(b"<?xml")
    png = make_png(8, 8)
    answered = nc.talk.set_conversation_avatar(token, png)
    assert answered.token == token
    assert nc.talk.get_conversation_avatar(token) == png
    assert nc.talk.get_conversation_avatar(token, dark=True) == png
    nc.talk.set_conversation_avatar(token, ("\U0001f680", None))
    assert "\U0001f680".encode() in nc.talk.get_conversation_avatar(token)
    nc.talk.set_conversation_avatar(token, ("\U0001f680", "00ff00"))
    assert b"#00ff00" in nc.talk.get_conversation_avatar(token, dark=True)
    nc.talk.delete_conversation_avatar(token)
    assert nc.talk.get_conversation_avatar(token) == default
    with pytest.raises(Exception) as error:
        nc.talk.set_conversation_avatar(token, b"GIF89a...")
    assert getattr(error.value, "status_code", 400) == 400
