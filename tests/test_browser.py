"""The browser client, end to end, in a real Chromium driven by Playwright.

Needs Debian's Chromium (/usr/bin/chromium) and the `playwright` Python
package (never `playwright install`: the system browser is used). Without
them every test here skips.

WebRTC only offers loopback candidates when the machine shows no other
network interface, so the call test runs only inside a network namespace
that has nothing but `lo` (as root)::

    unshare --net sh -c 'ip link set lo up && exec .venv/bin/python -m pytest tests/test_browser.py'

Elsewhere the call test skips and the chat, guest and XSS tests still run.
Screenshots go to tests/screenshots/ (gitignored); the README's pictures come
from tests/test_browser_modern.py (TALK_SCREENSHOT=1).
"""

import contextlib
import os
import re
import socket
import time
from pathlib import Path

import pytest

import talk_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the e2e extra is not installed
    expect = sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "tests" / "screenshots"
PASSWORD = "secret"
USERS = {"alice": "Alice", "bob": "Bob"}
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]


def other_interfaces():
    """Network interfaces besides loopback that Chromium would see.

    socket.if_nameindex() asks the kernel about this process's network
    namespace; /sys/class/net would still list the host's interfaces after
    `unshare --net` (sysfs shows the namespace of whoever mounted it), so
    it is only the fallback.
    """
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        try:
            names = os.listdir("/sys/class/net")
        except OSError:
            names = []
    return sorted(name for name in names if name != "lo")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        sync_playwright is None, reason="playwright is not installed (pip install '.[e2e]')"
    ),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing (apt-get install chromium)",
    ),
]

needs_loopback_only = pytest.mark.skipif(
    bool(other_interfaces()),
    reason=(
        f"WebRTC needs a network namespace with only lo (visible: {', '.join(other_interfaces())}); "
        "run: unshare --net sh -c 'ip link set lo up && exec python -m pytest tests/test_browser.py'"
    ),
)


# ---------------------------------------------------------------------------
# Fixtures: one Chromium per module, a fresh server per test
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    home = tmp_path_factory.mktemp("chromium-home")
    for sub in (".config", ".cache", "tmp"):
        (home / sub).mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "TMPDIR": str(home / "tmp"),
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=env
        )
        yield browser
        browser.close()


@contextlib.contextmanager
def serving(tmp_path, password_hash, users, **options):
    """A real talk-server (Waitress, loopback port) with `users` {id: name}; `options` go to the app."""
    db_path = tmp_path / "talk.db"
    app = talk_server.make_app(db_path)
    with app.talk.db.write() as db:
        for user_id, name in users.items():
            talk_server.create_user(db, user_id, password_hash, name)
    app.talk.close()
    with talk_server.serve_in_thread(db_path, **options) as base_url:
        yield base_url


@pytest.fixture
def server(tmp_path, password_hash):
    """A real talk-server with users alice and bob."""
    with serving(tmp_path, password_hash, USERS) as base_url:
        yield base_url


class Person:
    """One browser profile (its own cookies and storage) with one page."""

    def __init__(self, browser, base_url, viewport=DESKTOP, color_scheme="light"):
        self.base_url = base_url
        self.context = browser.new_context(
            viewport=viewport, locale="en-GB", color_scheme=color_scheme
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.dialogs = []
        self.errors = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def by(self, test_id):
        return self.page.get_by_test_id(test_id)

    def sign_in(self, user_id, name=None):
        self.page.goto(self.base_url + "/")
        self.by("login-user").fill(user_id)
        self.by("login-password").fill(PASSWORD)
        self.by("login-submit").click()
        expect(self.by("me-name")).to_have_text(name or USERS[user_id])
        # The session is the sign-in page's HttpOnly cookie: no password stays
        # in the page's storage, and scripts cannot read the cookie.
        stored = self.page.evaluate(
            "JSON.stringify([{...sessionStorage}, {...localStorage}, document.cookie])"
        )
        assert PASSWORD not in stored and "talk_session" not in stored, stored

    def create_room(self, kind, name):
        """kind: "2" group, "3" public; returns the new room's token."""
        self.by("new-room-type").select_option(kind)
        self.by("new-room-name").fill(name)
        self.by("new-room-submit").click()
        expect(self.by("room-title")).to_have_text(name)
        self.wait_chat_ready()
        return self.token()

    def token(self):
        token = self.page.evaluate("window.talkDebug.token")
        assert token and self.page.url.endswith(f"#/room/{token}")
        return token

    def open_room(self, token):
        self.page.locator(f'[data-testid=room-item][data-token="{token}"] a').click()
        self.wait_chat_ready()

    def wait_chat_ready(self):
        """The history is loaded and the chat long-poll runs."""
        expect(self.page.locator("[data-testid=message-list][data-ready=true]")).to_be_attached()

    def add_participant(self, user_id):
        self.by("participants-toggle").click()
        self.by("add-participant-id").fill(user_id)
        self.by("add-participant-submit").click()
        expect(
            self.page.locator(f'[data-testid=participant][data-user="{user_id}"]')
        ).to_be_visible()
        self.by("participants-toggle").click()

    def send(self, text):
        self.by("message-input").fill(text)
        self.by("message-input").press("Enter")

    def last_message(self):
        return self.by("message").last

    def room_item(self, token):
        return self.page.locator(f'[data-testid=room-item][data-token="{token}"]')

    def message(self, text):
        """The newest message whose own text (not a quote of it) holds `text`."""
        text_node = self.page.get_by_test_id("message-text").filter(has_text=text)
        return self.by("message").filter(has=text_node).last

    def act(self, text, action):
        """Hover a message (its toolbar shows) and press one of its actions."""
        message = self.message(text)
        message.hover()
        message.locator(f"[data-action={action}]").click()

    def mention(self, prefix, user_id):
        """Type "@prefix" in the composer and pick `user_id` from the suggestions."""
        self.by("message-input").press_sequentially(f"@{prefix}")
        self.page.locator(f'[data-testid=mention-suggestion][data-id="{user_id}"]').click()

    def screenshot(self, name):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        self.page.screenshot(path=str(path))
        return path

    def assert_clean(self):
        assert self.dialogs == [], self.dialogs
        assert self.errors == [], self.errors

    def close(self):
        self.context.close()


@pytest.fixture
def people(browser, server):
    """make() a Person; all are closed before the server stops."""
    made = []

    def make(viewport=DESKTOP, color_scheme="light"):
        person = Person(browser, server, viewport, color_scheme)
        made.append(person)
        return person

    yield make
    for person in made:
        person.close()


def shared_room(people, name, bob_viewport=DESKTOP):
    """Alice creates a group room and adds Bob; both have it open."""
    alice, bob = people(), people(bob_viewport)
    alice.sign_in("alice")
    token = alice.create_room("2", name)
    alice.add_participant("bob")
    bob.sign_in("bob")
    bob.open_room(token)
    return alice, bob, token


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_two_users_chat_in_real_time(people):
    alice, bob = people(), people(PHONE)
    alice.sign_in("alice")
    token = alice.create_room("2", "Team 🚀")
    alice.add_participant("bob")
    alice.send("Good morning")

    # Bob (on a phone-sized screen) sees the room with an unread marker.
    bob.sign_in("bob")
    room = bob.page.locator(f'[data-testid=room-item][data-token="{token}"]')
    expect(room.get_by_test_id("unread-badge")).to_have_text("1")
    bob.open_room(token)
    expect(bob.by("room-list")).to_be_hidden()  # one pane at a time on a phone
    expect(bob.last_message().get_by_test_id("message-text")).to_have_text("Good morning")
    expect(bob.last_message().get_by_test_id("message-author")).to_have_text("Alice")

    text = "Hello Bob 👋🏽 — ünïcödé, 漢字, עברית ✓"
    alice.by("message-input").fill(text)
    alice.by("message-input").press("Enter")  # delivered by bob's waiting long-poll
    expect(bob.last_message().get_by_test_id("message-text")).to_have_text(text)
    expect(bob.last_message().get_by_test_id("message-author")).to_have_text("Alice")

    reply = "Hi Alice! 🎉\nTwo lines"
    bob.by("message-input").fill(reply)
    bob.by("message-input").press("Enter")
    last = alice.last_message()
    expect(last.get_by_test_id("message-text")).to_have_text(reply)
    expect(last.get_by_test_id("message-author")).to_have_text("Bob")
    assert alice.last_message().locator("time").get_attribute("datetime")
    expect(bob.last_message()).to_have_class(re.compile(r"\bmine\b"))

    alice.screenshot("chat-desktop.png")
    bob.screenshot("chat-phone.png")
    alice.assert_clean()
    bob.assert_clean()


def test_guest_joins_public_room_with_password(people):
    alice = people()
    alice.sign_in("alice")
    token = alice.create_room("3", "Open house")
    alice.by("room-settings").click()
    alice.by("settings-password").fill("hunter2 🔑")
    alice.by("settings-password-set").click()
    expect(alice.by("settings-ok")).to_have_text("Password set.")
    link = alice.by("settings-link").input_value()
    assert link == f"{alice.base_url}/#/room/{token}"
    alice.page.keyboard.press("Escape")
    expect(alice.by("settings-dialog")).to_be_hidden()

    guest = people(PHONE)
    guest.page.goto(link)
    expect(guest.by("guest-room-name")).to_have_text("Open house")
    guest.by("guest-name").fill("Gita ☕")
    guest.by("guest-password").fill("wrong")
    guest.by("guest-join").click()
    expect(guest.by("guest-error")).to_contain_text("Wrong password")
    guest.by("guest-password").fill("hunter2 🔑")
    guest.by("guest-join").click()
    guest.wait_chat_ready()
    expect(guest.by("room-title")).to_have_text("Open house")

    guest.send("Hi from a guest ☕")
    expect(alice.last_message().get_by_test_id("message-text")).to_have_text(
        "Hi from a guest ☕", timeout=1000
    )
    expect(alice.last_message().get_by_test_id("message-author")).to_have_text("Gita ☕ (guest)")
    expect(guest.last_message()).to_have_class(re.compile(r"\bmine\b"))

    alice.send("Welcome! 👋")
    expect(guest.last_message().get_by_test_id("message-text")).to_have_text(
        "Welcome! 👋", timeout=1000
    )
    expect(guest.last_message().get_by_test_id("message-author")).to_have_text("Alice")

    # Alice sees the guest among the participants, online.
    alice.by("participants-toggle").click()
    expect(alice.page.locator("[data-testid=participant][data-type='4'].online")).to_have_count(1)

    guest.screenshot("guest-phone.png")
    alice.assert_clean()
    guest.assert_clean()


def test_messages_are_text_never_html(people):
    alice, bob, _ = shared_room(people, "XSS")
    payloads = [
        "<img src=x onerror=alert(1)>",
        "<script>window.__pwned = 1; alert(2)</script><b>bold</b>",
        '"><svg onload=alert(3)>&amp; &lt;',
    ]
    for payload in payloads:
        alice.send(payload)
        expect(bob.last_message().get_by_test_id("message-text")).to_have_text(payload)
        expect(alice.last_message().get_by_test_id("message-text")).to_have_text(payload)
    for person in (alice, bob):
        messages = person.by("message-list")
        # Only the page's own avatars are pictures; nothing from a message is markup.
        for tag in ("img:not(.avatar-img)", "[onerror]", "script", "svg", "b"):
            assert messages.locator(tag).count() == 0, tag
        texts = person.by("message-text").all_text_contents()
        assert texts == payloads
    alice.page.wait_for_timeout(500)  # give an injected handler time to fire
    for person in (alice, bob):
        assert person.page.evaluate("window.__pwned") is None
        person.assert_clean()


def test_banner_when_server_unreachable_then_recovers(people):
    alice = people()
    alice.sign_in("alice")
    alice.create_room("2", "Flaky")
    alice.page.route("**/ocs/**", lambda route: route.abort())
    alice.send("lost in the void")
    expect(alice.by("offline-banner")).to_be_visible(timeout=3000)
    expect(alice.by("offline-banner")).to_contain_text("Cannot reach the server")
    expect(alice.by("send-error")).to_contain_text("unreachable")
    expect(alice.by("message-input")).to_have_value("lost in the void")

    alice.page.unroute("**/ocs/**")
    alice.page.get_by_role("button", name="Retry now").click()
    expect(alice.by("offline-banner")).to_be_hidden(timeout=10_000)
    alice.by("message-input").press("Enter")
    expect(alice.last_message().get_by_test_id("message-text")).to_have_text("lost in the void")
    alice.assert_clean()


def test_moderator_manages_room_and_participants(people):
    alice, bob, token = shared_room(people, "Planning")
    # Bob is a plain user (type 3): his settings are his own (notifications, leaving).
    bob.by("room-settings").click()
    expect(bob.by("settings-notify")).to_be_visible()
    expect(bob.by("settings-name")).to_be_hidden()
    expect(bob.by("settings-delete")).to_be_hidden()
    bob.page.keyboard.press("Escape")

    alice.by("participants-toggle").click()
    bob_row = alice.page.locator('[data-testid=participant][data-user="bob"]')
    bob_row.locator("[data-action=promote]").click()
    expect(bob_row.get_by_test_id("participant-type")).to_have_text("Moderator")
    bob_row.locator("[data-action=demote]").click()
    expect(bob_row.get_by_test_id("participant-type")).to_have_text("User")

    alice.by("room-settings").click()
    alice.by("settings-name").fill("Planning 2.0")
    alice.by("settings-rename").click()
    expect(alice.by("room-title")).to_have_text("Planning 2.0")
    alice.by("settings-public").click()
    expect(alice.by("room-type")).to_have_text("Public")
    expect(alice.by("settings-link")).to_be_visible()
    alice.by("settings-public").click()
    expect(alice.by("room-type")).to_have_text("Group")
    alice.page.keyboard.press("Escape")

    # Removing Bob closes the room on his screen at once.
    bob_row.locator("[data-action=remove]").click()
    expect(bob_row).to_have_count(0)
    expect(bob.by("toast")).to_contain_text("no longer in this conversation")
    expect(bob.page.locator(f'[data-testid=room-item][data-token="{token}"]')).to_have_count(0)

    # Bob starts a one-to-one conversation with Alice, then leaves it.
    bob.by("new-room-type").select_option("1")
    bob.by("new-room-name").fill("alice")
    bob.by("new-room-submit").click()
    expect(bob.by("room-title")).to_have_text("Alice")
    expect(bob.by("room-type")).to_have_text("One-to-one")
    bob.by("participants-toggle").click()
    bob.by("leave-room").click()
    bob.by("leave-room").click()  # the second click confirms
    expect(bob.by("toast")).to_contain_text("You left")
    expect(bob.page.locator("[data-testid=room-item]")).to_have_count(0)

    alice.by("room-settings").click()
    alice.by("settings-delete").click()
    alice.by("settings-delete").click()  # the second click confirms
    expect(alice.by("toast")).to_have_text("The conversation was deleted.")
    expect(alice.page.locator(f'[data-testid=room-item][data-token="{token}"]')).to_have_count(0)
    alice.assert_clean()
    bob.assert_clean()


def test_same_user_in_two_windows_keeps_both_in_the_conversation(people):
    """On API v4 each browser is a device with its own session: no tug of war."""
    first, second = people(), people()
    first.sign_in("alice")
    token = first.create_room("2", "Two windows")
    second.sign_in("alice")
    second.open_room(token)
    second.send("from the second window")
    expect(first.last_message().get_by_test_id("message-text")).to_have_text(
        "from the second window"
    )
    first.send("from the first window")
    expect(second.last_message().get_by_test_id("message-text")).to_have_text(
        "from the first window"
    )
    for person in (first, second):
        expect(person.by("room-notice")).to_be_hidden()
        person.assert_clean()


CALL_STATS = """
async () => {
  const peers = [];
  for (const [session, pc] of window.talkDebug.peerConnections) {
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach((s) => byId.set(s.id, s));
    let frames = 0;
    let addresses = [];
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames = Math.max(frames, s.framesDecoded || 0);
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        const pair = byId.get(s.selectedCandidatePairId);
        const local = pair && byId.get(pair.localCandidateId);
        const remote = pair && byId.get(pair.remoteCandidateId);
        addresses = [local && (local.address || local.ip), remote && (remote.address || remote.ip)];
      }
    });
    peers.push({session, ice: pc.iceConnectionState, frames, addresses});
  }
  return peers;
}
"""


@needs_loopback_only
def test_call_connects_and_decodes_video_over_loopback(people):
    alice, bob, _ = shared_room(people, "Stand-up ☕")
    alice.send("Joining the call 📞")
    expect(bob.last_message().get_by_test_id("message-text")).to_have_text("Joining the call 📞")
    bob.send("On my way 🏃")
    expect(alice.last_message().get_by_test_id("message-text")).to_have_text("On my way 🏃")
    for person in (alice, bob):
        person.by("call-join").click()
        expect(person.page.locator("[data-testid=video-tile][data-local=true]")).to_be_visible()

    deadline = time.monotonic() + 30
    while True:
        stats = {name: p.page.evaluate(CALL_STATS) for name, p in (("alice", alice), ("bob", bob))}
        done = all(
            len(peers) == 1
            and peers[0]["ice"] in ("connected", "completed")
            and peers[0]["frames"] > 10
            for peers in stats.values()
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done, stats
    alice_session = alice.page.evaluate("window.talkDebug.sessionId")
    bob_session = bob.page.evaluate("window.talkDebug.sessionId")
    assert stats["alice"][0]["session"] == bob_session
    assert stats["bob"][0]["session"] == alice_session
    for peers in stats.values():
        assert peers[0]["addresses"] == ["127.0.0.1", "127.0.0.1"], peers
    for person in (alice, bob):
        expect(person.page.locator("[data-testid=video-tile][data-local=false]")).to_have_attribute(
            "data-state", "connected"
        )

    # Mute and camera toggles flip the local tracks.
    alice.by("toggle-mic").click()
    expect(alice.by("toggle-mic")).to_have_attribute("aria-pressed", "true")
    alice.by("toggle-mic").click()
    expect(alice.by("toggle-mic")).to_have_attribute("aria-pressed", "false")

    alice.screenshot("call-desktop.png")
    bob.screenshot("call-desktop-bob.png")

    # Bob hangs up: Alice's tile for him goes away.
    bob.by("call-hangup").click()
    expect(alice.page.locator("[data-testid=video-tile][data-local=false]")).to_have_count(0)
    alice.assert_clean()
    bob.assert_clean()
