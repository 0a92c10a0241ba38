"""The browser client on today's API, end to end (issue 15): sign-in by cookie,
Connect a phone, the conversation list, modern chat, moderator settings, the
page-load figure, and a call with a screen share.

Same setup as tests/test_browser.py (Debian's Chromium, Playwright; the call
test needs a network namespace with only lo). Screenshots go to
tests/screenshots/: list.png, list-phone-dark.png, chat-replies-reactions.png,
qr-panel.png, call.png; with TALK_SCREENSHOT=1 two of them also become the
README's docs/list.png and docs/chat.png.
"""

import base64
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest
from test_browser import (  # noqa: F401  (fixtures and the module's skip marks)
    CALL_STATS,
    PASSWORD,
    PHONE,
    ROOT,
    SCREENSHOTS,
    USERS,
    browser,
    needs_loopback_only,
    people,
    pytestmark,
    serving,
)

import talk_server

try:
    from playwright.sync_api import expect
except ImportError:  # the module skips through pytestmark
    expect = None

USERS_HERE = {**USERS, "carol": "Carol"}  # Carol never opens a browser: the API is her eyes


@pytest.fixture
def server(tmp_path, password_hash):
    """A real talk-server with alice, bob and carol."""
    with serving(tmp_path, password_hash, USERS_HERE) as base_url:
        yield base_url


def ocs(base, method, path, user="alice", password=PASSWORD, data=None):
    """One OCS request with Basic auth: (status, data)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(data).encode() if data is not None else None,
        headers={
            "OCS-APIRequest": "true",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Authorization": f"Basic {token}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)["ocs"]["data"]
    except urllib.error.HTTPError as error:
        return error.code, None


def room_as(base, user, token):
    status, data = ocs(base, "GET", f"/ocs/v2.php/apps/spreed/api/v4/room/{token}", user)
    assert status == 200
    return data


def add_by_search(person, prefix, user_id):
    """Add a participant through the autocomplete of the participants panel."""
    person.by("participants-toggle").click()
    person.by("add-participant-id").press_sequentially(prefix)
    person.page.locator(
        f'#add-suggestions [data-testid=user-suggestion][data-id="{user_id}"]'
    ).click()
    expect(person.page.locator(f'[data-testid=participant][data-user="{user_id}"]')).to_be_visible()
    person.by("participants-toggle").click()


def keep(shot, name):
    if os.environ.get("TALK_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / name)


# ---------------------------------------------------------------------------
# Sign-in and Connect a phone
# ---------------------------------------------------------------------------


def test_sign_in_lives_on_the_session_cookie_and_sign_out_ends_it(people):
    alice = people()
    alice.page.goto(alice.base_url + "/")
    alice.by("login-user").fill("alice")
    alice.by("login-password").fill("wrong")
    alice.by("login-submit").click()
    expect(alice.by("login-error")).to_have_text("Wrong user name or password.")
    expect(alice.by("login-password")).to_have_value("")

    alice.sign_in("alice")  # also checks that no storage holds the password
    alice.page.reload()  # the cookie, not the page, remembers her
    expect(alice.by("me-name")).to_have_text("Alice")

    alice.by("signout").click()
    expect(alice.by("login-form")).to_be_visible()
    status = alice.page.evaluate(
        "fetch('/ocs/v2.php/cloud/user', {headers: {'OCS-APIRequest': 'true'}}).then((r) => r.status)"
    )
    assert status == 401  # the server ended the session
    alice.page.reload()
    expect(alice.by("login-form")).to_be_visible()
    alice.assert_clean()


QR_MODULES = """
(text) => {
  const qr = qrcode(0, 'M');
  qr.addData(text, 'Byte');
  qr.make();
  const dark = [];
  for (let r = 0; r < qr.getModuleCount(); r++)
    for (let c = 0; c < qr.getModuleCount(); c++) if (qr.isDark(r, c)) dark.push(`${c},${r}`);
  return dark;
}
"""


def test_connect_a_phone_makes_an_app_password_shown_as_a_qr_code(people):
    alice = people()
    alice.sign_in("alice")
    alice.by("phone-open").click()
    expect(alice.by("phone-dialog")).to_be_visible()
    alice.by("phone-device").fill("Pixel 8")
    alice.by("phone-create").click()
    expect(alice.by("phone-result")).to_be_visible()
    password = alice.by("phone-password").text_content()
    assert re.fullmatch(r"[A-Za-z0-9]{72}", password), password
    assert alice.by("phone-user").text_content() == "alice"
    assert alice.by("phone-server").text_content() == alice.base_url

    # The QR code holds exactly the Talk apps' login URL (quiet zone of 4).
    expected = f"nc://login/user:alice&password:{password}&server:{alice.base_url}"
    drawn = alice.by("phone-qr").locator("path").get_attribute("d")
    modules = {f"{int(x) - 4},{int(y) - 4}" for x, y in re.findall(r"M(\d+),(\d+)", drawn)}
    assert modules == set(alice.page.evaluate(QR_MODULES, expected))
    alice.screenshot("qr-panel.png")

    # The app password works for what the apps ask first...
    status, me = ocs(alice.base_url, "GET", "/ocs/v2.php/cloud/user", "alice", password)
    assert status == 200 and me["id"] == "alice"
    row = alice.page.locator("[data-testid=app-password]").filter(has_text="Pixel 8")
    expect(row).to_have_count(1)
    # ...is nowhere in the page's storage, and is gone once revoked.
    stored = alice.page.evaluate("JSON.stringify([{...sessionStorage}, {...localStorage}])")
    assert password not in stored
    row.locator("[data-action=revoke]").click()
    expect(row).to_have_count(0)
    assert ocs(alice.base_url, "GET", "/ocs/v2.php/cloud/user", "alice", password)[0] == 401
    alice.page.keyboard.press("Escape")
    expect(alice.by("phone-dialog")).to_be_hidden()
    alice.assert_clean()


# ---------------------------------------------------------------------------
# The conversation list
# ---------------------------------------------------------------------------


def test_conversation_list_creates_every_kind_with_favorites_on_top_and_search(people):
    alice = people()
    alice.sign_in("alice")
    alpha = alice.create_room("2", "Alpha team")
    beta = alice.create_room("3", "Beta launch")
    alice.by("new-room-type").select_option("6")
    alice.by("new-room-submit").click()
    expect(alice.by("room-type")).to_have_text("Note to self")
    notes = alice.token()

    # One-to-one through the user search: pick Bob from the suggestions.
    alice.by("new-room-type").select_option("1")
    alice.by("new-room-name").press_sequentially("bo")
    alice.page.locator("#user-suggestions [data-testid=user-suggestion][data-id=bob]").click()
    expect(alice.by("room-title")).to_have_text("Bob")
    expect(alice.by("room-type")).to_have_text("One-to-one")
    direct = alice.token()

    # Beta becomes a favorite: it goes to the top of the list.
    alice.open_room(beta)
    alice.by("room-favorite").click()
    expect(alice.by("room-favorite")).to_have_attribute("aria-pressed", "true")
    items = alice.page.locator("[data-testid=room-item]")
    expect(items).to_have_count(4)
    expect(items.first).to_have_attribute("data-token", beta)
    assert room_as(alice.base_url, "alice", beta)["isFavorite"] is True

    # Every conversation shows its avatar (drawn by the server, light or dark).
    for token in (alpha, beta, notes, direct):
        image = alice.room_item(token).locator("img.avatar-img")
        expect(image).to_have_attribute("src", re.compile(rf"/room/{token}/avatar\?v="))
        image.evaluate("(img) => img.decode()")
        assert image.evaluate("(img) => img.naturalWidth") > 0

    alice.by("room-search").fill("alp")
    expect(items).to_have_count(1)
    expect(items.first).to_have_attribute("data-token", alpha)
    alice.by("room-search").fill("")
    expect(items).to_have_count(4)
    shot = alice.screenshot("list.png")
    keep(shot, "list.png")

    # On a phone in dark mode: one pane, dark avatars.
    phone = people(PHONE, "dark")
    phone.sign_in("alice")
    expect(phone.page.locator("[data-testid=room-item]")).to_have_count(4)
    image = phone.room_item(beta).locator("img.avatar-img")
    expect(image).to_have_attribute("src", re.compile(r"/avatar/dark\?v="))
    phone.screenshot("list-phone-dark.png")
    alice.assert_clean()
    phone.assert_clean()


# ---------------------------------------------------------------------------
# Chat: mentions, unread counts, replies, reactions, edits, deletes, polls
# ---------------------------------------------------------------------------


def test_two_users_and_a_guest_reply_mention_react_edit_delete_and_poll(people):
    alice, bob = people(), people()
    alice.sign_in("alice")
    token = alice.create_room("3", "Release 🚀")
    add_by_search(alice, "bo", "bob")
    add_by_search(alice, "car", "carol")
    alice.send("Ship it on Friday?")
    alice.mention("bo", "bob")
    alice.by("message-input").press_sequentially("please review")
    alice.by("message-input").press("Enter")
    sent = alice.message("please review")
    expect(sent.get_by_test_id("mention")).to_have_text("@Bob")
    expect(sent).not_to_have_class(re.compile("pending"))

    # Bob's list: two unread and the mention badge. Carol: unread, no mention.
    bob.sign_in("bob")
    item = bob.room_item(token)
    expect(item.get_by_test_id("unread-badge")).to_have_text("2")
    expect(item.get_by_test_id("mention-badge")).to_be_visible()
    carol = room_as(alice.base_url, "carol", token)
    assert carol["unreadMessages"] == 2 and carol["unreadMention"] is False
    assert room_as(alice.base_url, "alice", token)["unreadMention"] is False

    # Reading takes the counts to zero (the future poll moves the marker).
    bob.open_room(token)
    expect(bob.by("unread-divider")).to_be_visible()
    expect(bob.message("please review").locator(".mention-self")).to_have_text("@Bob")
    deadline = time.monotonic() + 10
    while room_as(alice.base_url, "bob", token)["unreadMessages"] and time.monotonic() < deadline:
        time.sleep(0.2)
    bob_view = room_as(alice.base_url, "bob", token)
    assert bob_view["unreadMessages"] == 0 and bob_view["unreadMention"] is False
    bob.page.evaluate("location.hash = '#/'")
    expect(item.get_by_test_id("unread-badge")).to_have_count(0, timeout=15_000)
    expect(item.get_by_test_id("mention-badge")).to_have_count(0)
    bob.open_room(token)

    # A reply: the quote shows, and clicking it finds the original.
    bob.act("Ship it on Friday?", "reply")
    expect(bob.by("reply-preview")).to_contain_text("Ship it on Friday?")
    bob.send("Yes, with the changelog 👍")
    reply = alice.message("with the changelog")
    expect(reply.get_by_test_id("reply-quote")).to_contain_text("Ship it on Friday?")
    reply.get_by_test_id("reply-quote").click()
    expect(alice.message("Ship it on Friday?")).to_have_class(re.compile("highlight"))

    # A guest with a name of her own reacts; Alice too; counts and "own" marks.
    link = f"{alice.base_url}/#/room/{token}"
    guest = people(PHONE)
    guest.page.goto(link)
    guest.by("guest-name").fill("Gita")
    guest.by("guest-join").click()
    guest.wait_chat_ready()
    guest.act("Ship it on Friday?", "react")
    guest.by("reaction-picker").locator("[data-emoji='🎉']").click()
    reaction = alice.message("Ship it on Friday?").locator(
        "[data-testid=reaction][data-emoji='🎉']"
    )
    expect(reaction).to_have_text("🎉 1")
    expect(reaction).to_have_attribute("aria-pressed", "false")
    reaction.click()  # Alice adds hers by clicking the count
    expect(reaction).to_have_text("🎉 2")
    expect(reaction).to_have_attribute("aria-pressed", "true")
    bobs = bob.message("Ship it on Friday?").locator("[data-testid=reaction][data-emoji='🎉']")
    expect(bobs).to_have_text("🎉 2")
    expect(bobs).to_have_attribute("aria-pressed", "false")
    guest.send("Great, see you then")
    expect(alice.message("see you then").get_by_test_id("message-author")).to_have_text(
        "Gita (guest)"
    )

    # Alice edits her question; everyone sees the new text, marked edited.
    alice.act("Ship it on Friday?", "edit")
    expect(alice.by("edit-preview")).to_be_visible()
    alice.by("message-input").fill("Ship it on Thursday?")
    alice.by("message-input").press("Enter")
    for person in (alice, bob, guest):
        edited = person.message("Ship it on Thursday?")
        expect(edited.get_by_test_id("edited")).to_be_visible()
    expect(bob.by("message").filter(has_text="Friday?")).to_have_count(0)
    expect(reply.get_by_test_id("reply-quote")).to_contain_text("Thursday")

    # Bob deletes a slip; the others see it deleted.
    bob.send("oops, wrong room")
    expect(alice.message("oops, wrong room")).to_be_visible()
    bob.act("oops, wrong room", "delete")
    bob.message("oops, wrong room").locator("[data-action=delete]").click()  # confirms
    expect(alice.by("message").filter(has_text="oops, wrong room")).to_have_count(0)
    expect(alice.by("message").last.get_by_test_id("message-text")).to_have_text("Message deleted")

    # A poll: Alice asks, three vote, everyone sees the results.
    alice.by("poll-open").click()
    alice.by("poll-question").fill("Release day?")
    alice.by("poll-option").nth(0).fill("Thursday")
    alice.by("poll-option").nth(1).fill("Friday")
    alice.by("poll-submit").click()
    for person, choice in ((bob, 0), (guest, 1), (alice, 0)):
        poll = person.by("poll").last
        poll.get_by_test_id("poll-choice").nth(choice).check()
        poll.get_by_test_id("poll-vote").click()
        expect(poll.get_by_test_id("poll-result")).to_have_count(2)
    results = alice.by("poll").last.get_by_test_id("poll-result")
    expect(results.nth(0)).to_have_attribute("data-votes", "2")
    expect(results.nth(1)).to_have_attribute("data-votes", "1")
    expect(bob.by("poll").last.get_by_test_id("poll-result").nth(0)).to_have_attribute(
        "data-votes", "2"
    )

    # System messages are one-line events (here: the participants Alice added).
    expect(alice.by("system-message").filter(has_text="added Bob")).to_have_count(1)
    alice.message("see you then").scroll_into_view_if_needed()
    shot = alice.screenshot("chat-replies-reactions.png")
    keep(shot, "chat.png")
    bob.screenshot("chat-replies-reactions-bob.png")
    for person in (alice, bob, guest):
        person.assert_clean()


def test_mention_or_one_to_one_message_notifies_while_the_tab_is_hidden(people):
    alice, bob = people(), people()
    alice.sign_in("alice")
    bob.sign_in("bob")
    bob.context.grant_permissions(["notifications"])
    bob.by("new-room-type").select_option("1")
    bob.by("new-room-name").fill("alice")
    bob.by("new-room-submit").click()
    bob.wait_chat_ready()
    token = bob.token()
    bob.page.evaluate(
        "Object.defineProperty(document, 'hidden', {get: () => true}); "
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    alice.open_room(token)
    alice.send("Lunch? 🍜")
    # Polled with evaluate: wait_for_function's polling evals a string, which the CSP forbids.
    assert wait_for(lambda: bob.page.evaluate("window.talkDebug.notifications.length > 0"), 10)
    notes = bob.page.evaluate("window.talkDebug.notifications")
    assert notes == [{"title": "Alice", "body": "Lunch? 🍜"}]
    expect(bob.by("unread-divider")).to_be_visible()
    assert bob.page.title().startswith("(1)")
    alice.assert_clean()
    bob.assert_clean()


# ---------------------------------------------------------------------------
# Moderator settings
# ---------------------------------------------------------------------------


def test_moderator_settings_description_read_only_notifications_and_emoji_avatar(people):
    alice, bob = people(), people()
    alice.sign_in("alice")
    token = alice.create_room("2", "Settings")
    add_by_search(alice, "bo", "bob")
    bob.sign_in("bob")
    bob.open_room(token)

    alice.by("room-settings").click()
    alice.by("settings-description").fill("Where we decide things")
    alice.by("settings-description-set").click()
    expect(alice.by("settings-ok")).to_have_text("Description saved.")
    old_avatar = alice.by("room-avatar").get_attribute("src")
    alice.by("settings-avatar-emoji").fill("🦊")
    alice.by("settings-avatar-emoji-set").click()
    expect(alice.by("settings-ok")).to_have_text("Picture saved.")
    expect(alice.by("room-avatar")).not_to_have_attribute("src", old_avatar)
    alice.by("settings-read-only").check()
    expect(alice.by("settings-ok")).to_have_text("Saved.")
    alice.page.keyboard.press("Escape")

    expect(bob.by("room-description")).to_have_text("Where we decide things", timeout=15_000)
    expect(bob.by("message-input")).to_be_disabled()
    expect(bob.by("read-only-chip")).to_be_visible()

    # Bob's own setting: notifications off.
    bob.by("room-settings").click()
    bob.by("settings-notify").select_option("3")
    expect(bob.by("settings-ok")).to_have_text("Notifications saved.")
    assert room_as(alice.base_url, "bob", token)["notificationLevel"] == 3
    assert room_as(alice.base_url, "bob", token)["isCustomAvatar"] is True
    alice.assert_clean()
    bob.assert_clean()


# ---------------------------------------------------------------------------
# Page load with 500 messages (measured and reported, never asserted)
# ---------------------------------------------------------------------------


def test_page_load_with_500_messages_is_measured_in_the_trace(people, server):
    status, room = ocs(
        server,
        "POST",
        "/ocs/v2.php/apps/spreed/api/v4/room",
        data={"roomType": 2, "roomName": "Busy"},
    )
    assert status == 201
    now = int(time.time())
    with server.app.talk.db.write() as db:
        room_id = talk_server.room_by_token(db, room["token"])["id"]
        for n in range(500):
            talk_server.add_message(db, room_id, "users", "alice", f"Message {n} ✓", now)
    alice = people()
    alice.sign_in("alice")
    alice.page.goto("about:blank")  # a real load of the page, not a change of its #hash
    alice.context.tracing.start(snapshots=False, screenshots=False)
    alice.page.goto(f"{server}/#/room/{room['token']}")
    alice.wait_chat_ready()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    alice.context.tracing.stop(path=str(SCREENSHOTS / "load-500-trace.zip"))
    expect(alice.last_message().get_by_test_id("message-text")).to_have_text("Message 499 ✓")
    timing = alice.page.evaluate(
        """() => ({
          ready: Math.round(window.talkDebug.timings.readyAt),
          signedIn: Math.round(window.talkDebug.timings.signedInAt),
          joined: Math.round(window.talkDebug.timings.joinedAt),
          history: Math.round(window.talkDebug.timings.historyAt),
          domContentLoaded: Math.round(performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd),
          shown: document.querySelectorAll('[data-testid=message]').length,
        })"""
    )
    report = (
        f"page load, 500 messages in the room: chat ready {timing['ready']} ms after navigation "
        f"(DOMContentLoaded {timing['domContentLoaded']} ms, signed in {timing['signedIn']} ms, "
        f"joined {timing['joined']} ms, history answered {timing['history']} ms, "
        f"{timing['shown']} newest shown)"
    )
    (SCREENSHOTS / "load-500.txt").write_text(report + "\n")
    print(report)
    # Scrolling up loads the older ones.
    alice.by("message-list").evaluate("(list) => list.scrollTo(0, 0)")
    expect(alice.by("message").first.get_by_test_id("message-text")).to_have_text(
        "Message 300 ✓", timeout=10_000
    )
    alice.assert_clean()


# ---------------------------------------------------------------------------
# A call: join from the list, frames both ways, a screen share, a raised hand
# ---------------------------------------------------------------------------

SCREEN_STATS = """
async () => {
  let frames = 0;
  for (const pc of window.talkDebug.screenConnections.values()) {
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames = Math.max(frames, s.framesDecoded || 0);
    });
  }
  return frames;
}
"""


def wait_for(check, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@needs_loopback_only
def test_call_joined_from_the_list_with_screen_share_hand_and_speaking(people):
    alice, bob = people(), people()
    alice.sign_in("alice")
    token = alice.create_room("2", "Stand-up ☕")
    add_by_search(alice, "bo", "bob")
    bob.sign_in("bob")
    alice.by("call-join").click()
    expect(alice.page.locator("[data-testid=video-tile][data-local=true]")).to_be_visible()

    # Bob's list shows the call in progress, with a button to join it.
    expect(bob.room_item(token).get_by_test_id("call-badge")).to_be_visible(timeout=15_000)
    bob.room_item(token).get_by_test_id("list-call-join").click()
    expect(bob.page.locator("[data-testid=video-tile][data-local=true]")).to_be_visible()

    def connected():
        stats = [p.page.evaluate(CALL_STATS) for p in (alice, bob)]
        ok = all(
            len(s) == 1 and s[0]["ice"] in ("connected", "completed") and s[0]["frames"] > 10
            for s in stats
        )
        return stats if ok else None

    assert wait_for(connected), [p.page.evaluate(CALL_STATS) for p in (alice, bob)]

    # Alice shares her screen: Bob sees it as a tile of its own, with frames.
    alice.by("toggle-screen").click()
    expect(alice.by("toggle-screen")).to_have_attribute("aria-pressed", "true")
    expect(bob.page.locator("[data-testid=screen-tile][data-local=false]")).to_be_visible(
        timeout=15_000
    )
    assert wait_for(lambda: bob.page.evaluate(SCREEN_STATS) > 5), bob.page.evaluate(SCREEN_STATS)

    # A raised hand shows on the other side; the speaking ring lights up.
    alice.by("toggle-hand").click()
    expect(
        bob.page.locator("[data-testid=video-tile][data-local=false] [data-testid=tile-hand]")
    ).to_be_visible()
    remote = bob.page.locator("[data-testid=video-tile][data-local=false]")
    assert wait_for(lambda: remote.get_attribute("data-spoke") == "true", 20), "no speaking seen"
    bob.screenshot("call.png")
    alice.screenshot("call-alice.png")

    # Alice stops sharing: the screen tile goes on Bob's side.
    alice.by("toggle-screen").click()
    expect(bob.page.locator("[data-testid=screen-tile]")).to_have_count(0, timeout=10_000)
    bob.by("call-hangup").click()
    expect(alice.page.locator("[data-testid=video-tile][data-local=false]")).to_have_count(0)
    alice.assert_clean()
    bob.assert_clean()
