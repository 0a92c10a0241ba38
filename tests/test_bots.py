"""Bots (issue 16, today-api.md 8; spreed docs/bots.md, BotController, BotService):
the `bot` commands, moderators setting bots up, the signed webhooks in their exact
shapes, the queue that a hanging or refusing bot cannot stall, the bot-side
message and reaction endpoints with each refusal, and the real bot-side clients
(nc-py-api's talk_bot, apprise's Nextcloud Talk bot mode) against a served server.

Webhook receivers are http.server threads on free loopback ports; tests wait on
what arrives (with timeouts), never on elapsed time.
"""

import asyncio
import hashlib
import hmac
import json
import sys

import pytest
from conftest import API
from helpers import RecordingServer, create, join

import talk_server

V4 = "/ocs/v2.php/apps/spreed/api/v4"
SECRET = "0123456789abcdef0123456789abcdef01234567"
RANDOM = "f" * 32 + "0" * 32
WAIT = 10  # seconds any webhook may take to arrive before a test fails


# --- A bot's webhook endpoint ----------------------------------------------------


class Receiver(RecordingServer):
    """A webhook endpoint on a free loopback port. It records every POST, answers
    `status`, and while `release` is clear it hangs (after `arrived` is set)."""

    def __init__(self, status=200):
        super().__init__("/webhook", status, hold=WAIT)

    def next(self, secret=SECRET):
        """The next webhook: (headers, body as JSON), its signature checked independently."""
        _, headers, raw = self.requests.get(timeout=WAIT)
        raw = raw.decode("utf-8")
        random = headers["X-Nextcloud-Talk-Random"]
        expected = hmac.new(secret.encode(), (random + raw).encode(), hashlib.sha256).hexdigest()
        assert headers["X-Nextcloud-Talk-Signature"] == expected
        assert len(random) == 64 and headers["Content-Type"] == "application/json"
        return headers, json.loads(raw)


@pytest.fixture
def receiver():
    endpoint = Receiver()
    yield endpoint
    endpoint.close()


def install(app, url, name="Echo", secret=SECRET, features=3, state=1, description=""):
    with app.talk.db.write() as db:
        return talk_server.add_bot(db, name, secret, url, description, state, features)


def url_hash(url):
    return hashlib.sha1(url.encode()).hexdigest()


def drained(app):
    assert app.talk.bots.drain(WAIT)


@pytest.fixture
def team(group_room):
    """conftest's group room "Team": alice owner, bob moderator, carol member."""
    return group_room


@pytest.fixture
def echo(app, alice, team, receiver):
    """Bot "Echo" (webhook, response, reaction) set up in Team; its Join consumed."""
    bot_id = install(app, receiver.url, features=1 | 2 | 8)
    alice.post(f"/bot/{team}/{bot_id}", status=201)
    assert receiver.next()[1]["type"] == "Join"
    return bot_id


def send(client, token, message, **params):
    return client.post(f"/chat/{token}", {"message": message, "referenceId": "r", **params},
                       status=201).data


def history(client, token):
    return client.get(f"/chat/{token}", {"lookIntoFuture": 0, "timeout": 0}).data


def signed(text, secret=SECRET, random=RANDOM):
    signature = hmac.new(secret.encode(), (random + text).encode(), hashlib.sha256).hexdigest()
    return {"X-Nextcloud-Talk-Bot-Random": random, "X-Nextcloud-Talk-Bot-Signature": signature}


# --- The signature: a fixed test vector ----------------------------------------------


def test_signature_matches_the_fixed_test_vector():
    expected = "e5225704e0d8b273645921af41a8784f68a9ef5ed95588aca44e32182abf2ebc"
    assert talk_server.bot_signature(SECRET, RANDOM, "Hello!") == expected
    independent = hmac.new(SECRET.encode(), (RANDOM + "Hello!").encode(), hashlib.sha256)
    assert independent.hexdigest() == expected


def test_webhook_bodies_are_json_as_php_writes_it():
    assert talk_server.php_json({"a": "x/y", "e": "👍"}) == '{"a":"x\\/y","e":"\\ud83d\\udc4d"}'


def test_capability_bots_v1(anonymous):
    caps = anonymous.get("/capabilities", prefix="/ocs/v2.php/cloud").data
    assert "bots-v1" in caps["capabilities"]["spreed"]["features"]


# --- The command line (occ talk:bot:*) ----------------------------------------------


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "cli.db")


@pytest.fixture
def cli(db, capsys):
    """Run `talk-server ARGS --db DB`: (exit code, stdout, stderr)."""

    def run(*args):
        try:
            talk_server.main([*args, "--db", db])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_install_validations_and_exit_codes(cli):
    url = "https://bots.example/one"
    code, _, err = cli("bot", "install", "", SECRET, url)
    assert code == 1 and "The provided name is too short or too long" in err
    code, _, err = cli("bot", "install", "n" * 65, SECRET, url)
    assert code == 1 and "name is too short or too long" in err
    code, _, err = cli("bot", "install", "Bot", "S3CR3T", url)
    assert code == 1 and "The provided secret is too short" in err
    code, _, err = cli("bot", "install", "Bot", "s" * 129, url)
    assert code == 1 and "The provided secret is too short" in err
    for bad in ("U", "ftp://bots.example/", "http://", "https://x/" + "a" * 4000):
        code, _, err = cli("bot", "install", "Bot", SECRET, bad)
        assert code == 1 and "The provided URL is not a valid URL" in err, bad
    code, _, err = cli("bot", "install", "Bot", SECRET, url, "--description", "d" * 4001)
    assert code == 1 and "description is too long" in err
    assert cli("bot", "install", "Bot", SECRET, url) == (0, "Bot installed\nID: 1\n", "")
    code, _, err = cli("bot", "install", "Bot", SECRET, url)
    assert code == 2 and "Bot with the same URL is already registered" in err
    code, _, err = cli("bot", "install", "Bot", SECRET, "https://bots.example/two")
    assert code == 3 and "Bot with the same secret is already registered" in err
    code, _, err = cli("bot", "install", "Bot", SECRET, url, "--feature", "nonsense")
    assert code == 2 and "invalid choice" in err  # argparse's usage error


def test_install_features_state_and_description(cli, db):
    cli("bot", "install", "Plain", "a" * 40, "http://b/1")
    cli("bot", "install", "Quiet", "b" * 40, "http://b/2", "--feature", "none", "--no-setup")
    assert cli("bot", "install", "Both", "c" * 128, "http://b/3", "Said positionally",
               "-f", "webhook", "-f", "reaction")[0] == 0
    cli("bot", "install", "Opt", "d" * 40, "http://b/4", "--description", "Said as an option")
    database = talk_server.Database(db)
    with database.read() as conn:
        bots = talk_server.list_bots(conn)
    database.close()
    assert [(b["name"], b["features"], b["state"], b["description"]) for b in bots] == [
        ("Plain", 3, 1, ""), ("Quiet", 0, 2, ""), ("Both", 9, 1, "Said positionally"),
        ("Opt", 3, 1, "Said as an option"),
    ]
    assert bots[0]["url_hash"] == url_hash("http://b/1")


def test_list_plain_json_and_verbose(cli):
    assert cli("bot", "list") == (0, "", "")
    assert cli("bot", "list", "--output", "json") == (0, "[]\n", "")
    cli("bot", "install", "Echo", SECRET, "http://b/echo", "--description", "Says it again")
    code, out, _ = cli("bot", "list")
    header, row = out.splitlines()
    assert header.split() == ["id", "name", "description", "error_count", "state", "features"]
    assert row.split("  ")[0] == "1" and "Says it again" in row and row.endswith("webhook, response")
    listed = json.loads(cli("bot", "list", "--output", "json")[1])
    assert listed == [{"id": 1, "name": "Echo", "description": "Says it again", "error_count": 0,
                       "state": 1, "features": "webhook, response"}]
    verbose = json.loads(cli("bot", "list", "-v", "--output", "json_pretty")[1])[0]
    assert verbose["url"] == "http://b/echo" and verbose["secret"] == SECRET
    assert verbose["url_hash"] == url_hash("http://b/echo") and verbose["last_error_message"] is None


def test_state_changes_state_and_features(cli):
    cli("bot", "install", "Echo", SECRET, "http://b/echo")
    assert cli("bot", "state", "1", "3")[0] == 1
    assert "Provided state is invalid" in cli("bot", "state", "1", "3")[2]
    code, _, err = cli("bot", "state", "7", "0")
    assert code == 1 and "Bot could not be found by id: 7" in err
    assert cli("bot", "state", "1", "2") == (0, "Bot state set to 2\n", "")
    assert cli("bot", "state", "1", "0", "-f", "reaction", "-f", "webhook") == (
        0, "Bot state set to 0 with features: webhook, reaction\n", "")
    assert json.loads(cli("bot", "list", "--output", "json")[1])[0]["state"] == 0


def test_setup_remove_and_uninstall(cli, db, receiver):
    cli("bot", "install", "Echo", SECRET, receiver.url)
    database = talk_server.Database(db)
    with database.write() as conn:
        room = talk_server.create_room(conn, 2, "Team", 0)
    database.close()
    token = room["token"]
    code, _, err = cli("bot", "setup", "2147483647", "invalid-token")
    assert code == 1 and "Bot could not be found by id: 2147483647" in err
    code, _, err = cli("bot", "setup", "1", "invalid-token")
    assert code == 2 and "Conversation could not be found by token: invalid-token" in err
    code, out, _ = cli("bot", "setup", "1", token, "--public-url", "https://talk.example")
    assert (code, out) == (0, f"Successfully set up for conversation {token}\n")
    headers, body = receiver.next()
    assert headers["X-Nextcloud-Talk-Backend"] == "https://talk.example/"
    assert body == {"type": "Join",
                    "actor": {"type": "Application", "id": f"bots/bot-{url_hash(receiver.url)}",
                              "name": "Echo"},
                    "object": {"type": "Collection", "id": token, "name": "Team"}}
    code, _, err = cli("bot", "setup", "1", token)
    assert code == 3 and f"Bot is already set up for the conversation {token}" in err
    assert json.loads(cli("bot", "list", token, "--output", "json")[1])[0]["name"] == "Echo"
    assert cli("bot", "list", "nosuchroom", "--output", "json")[1] == "[]\n"
    assert cli("bot", "remove", "9", token)[0] == 1
    assert cli("bot", "remove", "1", token, "invalid-token") == (
        0, "Remove bot from given conversations\n", "")
    assert receiver.next()[1]["type"] == "Leave"
    assert cli("bot", "list", token, "--output", "json")[1] == "[]\n"
    cli("bot", "setup", "1", token)
    receiver.next()
    assert cli("bot", "uninstall", "5")[0] == 1
    code, _, err = cli("bot", "uninstall", "--url", "http://nope/")
    assert code == 1 and "Bot not found" in err
    assert cli("bot", "uninstall", "--url", receiver.url) == (0, "Bot uninstalled\n", "")
    database = talk_server.Database(db)
    with database.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM bot_conversations").fetchone()[0] == 0
    database.close()
    again = cli("bot", "install", "Echo", SECRET, receiver.url)[1].split("ID: ")[1].strip()
    assert cli("bot", "uninstall", again) == (0, "Bot uninstalled\n", "")


def test_setup_counts_an_error_when_the_bot_is_down(cli, db):
    dead = Receiver()
    url = dead.url
    dead.close()  # nothing listens there any more
    cli("bot", "install", "Echo", SECRET, url)
    database = talk_server.Database(db)
    with database.write() as conn:
        token = talk_server.create_room(conn, 2, "Team", 0)["token"]
    database.close()
    assert cli("bot", "setup", "1", token)[0] == 0
    bot = json.loads(cli("bot", "list", "-v", "--output", "json")[1])[0]
    assert bot["error_count"] == 1 and bot["last_error_message"].startswith("ConnectionRefused")


# --- Moderators and administrators --------------------------------------------------


def test_moderators_list_enable_and_disable(app, alice, bob, carol, dave, team, receiver):
    echo = install(app, receiver.url, description="Says it again")
    hidden = install(app, "http://b/hidden", name="Hidden", secret="h" * 40, state=2)
    off = install(app, "http://b/off", name="Off", secret="o" * 40, state=0)
    carol.get(f"/bot/{team}", status=403)
    dave.get(f"/bot/{team}", status=404)
    assert bob.get(f"/bot/{team}").data == [
        {"id": echo, "name": "Echo", "description": "Says it again", "state": 0},
        {"id": off, "name": "Off", "description": "", "state": 0},
    ]
    carol.post(f"/bot/{team}/{echo}", status=403)
    assert bob.post(f"/bot/{team}/{echo}", status=201).data == {
        "id": echo, "name": "Echo", "description": "Says it again", "state": 1}
    assert receiver.next()[1]["type"] == "Join"
    assert bob.post(f"/bot/{team}/{echo}", status=200).data["state"] == 1
    for refused in (hidden, off, 999, "nonsense"):
        answer = bob.post(f"/bot/{team}/{refused}", status=400)
        assert answer.data == {"error": "bot"}
    assert bob.get(f"/bot/{team}").data[0]["state"] == 1
    assert bob.delete(f"/bot/{team}/{echo}").data["state"] == 0
    headers, body = receiver.next()
    assert body["type"] == "Leave" and body["object"]["id"] == team
    assert headers["X-Nextcloud-Talk-Backend"] == "http://localhost:80/"
    bob.delete(f"/bot/{team}/{hidden}", status=400)
    # A no-setup bot set up from the command line shows as 2, and stays.
    with app.talk.db.write() as db:
        talk_server.link_bot(db, hidden, talk_server.room_by_token(db, team)["id"])
    assert {b["id"]: b["state"] for b in bob.get(f"/bot/{team}").data}[hidden] == 2
    bob.delete(f"/bot/{team}/{hidden}", status=400)
    drained(app)
    assert receiver.empty()


def test_former_one_to_one_rooms_take_no_bots(app, alice, receiver):
    token = create(alice, 1, invite="bob")
    with app.talk.db.write() as db:
        talk_server.set_room_type(db, talk_server.room_by_token(db, token)["id"], 5)
    echo = install(app, receiver.url)
    assert alice.post(f"/bot/{token}/{echo}", status=400).data == {"error": "room"}


def test_admin_list_shows_details_without_the_secret(app, alice, bob, receiver):
    echo = install(app, receiver.url, features=9)
    assert alice.get("/bot/admin").data == [{
        "id": echo, "name": "Echo", "url": receiver.url, "url_hash": url_hash(receiver.url),
        "description": "", "error_count": 0, "last_error_date": 0, "last_error_message": None,
        "state": 1, "features": 9,
    }]
    bob.get("/bot/admin", status=403)


# --- Webhooks, exactly as Talk sends them ---------------------------------------------


def test_create_webhook_for_a_users_message(app, alice, bob, team, echo, receiver):
    message = send(bob, team, "hi @alice, see https://example.org")
    headers, body = receiver.next()
    assert headers["X-Nextcloud-Talk-Backend"] == "http://localhost:80/"
    assert headers["OCS-APIRequest"] == "true"
    content = ('{"message":"hi {mention-user1}, see https:\\/\\/example.org",'
               '"parameters":{"mention-user1":{"type":"user","id":"alice","name":"Alice"}}}')
    assert body == {
        "type": "Create",
        "actor": {"type": "Person", "id": "users/bob", "name": "Bob", "talkParticipantType": "2"},
        "object": {"type": "Note", "id": str(message["id"]), "name": "message",
                   "content": content,
                   "mediaType": "text/markdown"},
        "target": {"type": "Collection", "id": team, "name": "Team"},
    }


def test_create_webhook_carries_the_message_replied_to(app, alice, carol, team, echo, receiver):
    first = send(alice, team, "question")
    receiver.next()
    send(carol, team, "answer", replyTo=first["id"])
    body = receiver.next()[1]
    assert body["actor"]["talkParticipantType"] == "3"
    assert body["object"]["inReplyTo"] == {
        "type": "Note",
        "actor": {"type": "Person", "id": "users/alice", "name": "Alice"},
        "object": {"type": "Note", "id": str(first["id"]), "name": "message",
                   "content": '{"message":"question","parameters":[]}', "mediaType": "text/markdown"},
    }


def test_create_webhook_for_a_guests_message(app, alice, guest, receiver):
    token = create(alice, 3, roomName="Open")
    bot_id = install(app, receiver.url)
    alice.post(f"/bot/{token}/{bot_id}", status=201)
    receiver.next()
    join(guest, token)
    guest.post(f"/chat/{token}", {"message": "hello", "actorDisplayName": "Visitor"}, status=201)
    body = receiver.next()[1]
    assert body["type"] == "Create"
    assert body["actor"]["id"].startswith("guests/") and len(body["actor"]["id"]) == 47
    assert body["actor"]["name"] == "Visitor" and body["actor"]["talkParticipantType"] == "4"


def test_activity_webhook_for_a_system_message(app, alice, team, echo, receiver, make_client):
    make_client("alice", prefix=V4).put(f"/room/{team}", {"roomName": "Crew"})
    body = receiver.next()[1]
    assert body["type"] == "Activity"
    assert body["actor"] == {"type": "Person", "id": "users/alice", "name": "Alice"}
    assert body["object"]["name"] == "conversation_renamed"
    content = json.loads(body["object"]["content"])
    assert content == {"message": '{actor} renamed the conversation from "Team" to "Crew"',
                       "parameters": {"actor": {"type": "user", "id": "alice", "name": "Alice"}}}
    assert body["target"] == {"type": "Collection", "id": team, "name": "Crew"}


def test_like_and_undo_webhooks_for_reactions(app, alice, bob, team, echo, receiver):
    message = send(alice, team, "react to me")
    receiver.next()
    bob.post(f"/reaction/{team}/{message['id']}", {"reaction": "👍"}, status=201)
    like = receiver.next()[1]
    note = {"type": "Note", "id": str(message["id"]), "name": "message",
            "content": '{"message":"react to me","parameters":[]}', "mediaType": "text/markdown"}
    target = {"type": "Collection", "id": team, "name": "Team"}
    assert like == {"type": "Like", "actor": {"type": "Person", "id": "users/bob", "name": "Bob"},
                    "object": note, "target": target, "content": "👍"}
    bob.post(f"/reaction/{team}/{message['id']}", {"reaction": "👍"}, status=200)  # no news
    bob.delete(f"/reaction/{team}/{message['id']}", {"reaction": "👍"})
    assert receiver.next()[1] == {"type": "Undo", "actor": like["actor"], "object": like,
                                  "target": target}
    drained(app)
    assert receiver.empty()


def test_bots_without_the_feature_get_no_reactions_and_no_messages(app, alice, bob, team):
    webhook_only, response_only = Receiver(), Receiver()
    try:
        a = install(app, webhook_only.url, name="A", features=1)
        b = install(app, response_only.url, name="B", secret="b" * 40, features=2)
        for bot_id in (a, b):
            alice.post(f"/bot/{team}/{bot_id}", status=201)
        assert webhook_only.next()[1]["type"] == "Join"
        assert response_only.next(secret="b" * 40)[1]["type"] == "Join"
        message = send(alice, team, "one")
        bob.post(f"/reaction/{team}/{message['id']}", {"reaction": "🎉"}, status=201)
        drained(app)
        assert webhook_only.next()[1]["object"]["id"] == str(message["id"])
        assert webhook_only.empty() and response_only.empty()
    finally:
        webhook_only.close()
        response_only.close()


def test_disabled_bots_and_rooms_without_them_get_nothing(app, alice, team, echo, receiver):
    other = create(alice, 2, roomName="Other")
    send(alice, other, "not for the bot")
    with app.talk.db.write() as db:
        talk_server.set_bot_state(db, echo, 0)
    send(alice, team, "the bot is off")
    drained(app)
    assert receiver.empty()
    with app.talk.db.write() as db:
        talk_server.set_bot_state(db, echo, 1)
    message = send(alice, team, "back on")
    assert receiver.next()[1]["object"]["id"] == str(message["id"])


def test_public_url_names_the_backend(db_path, password_hash, receiver):
    app = talk_server.make_app(db_path, public_url="https://talk.example/base")
    try:
        with app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        from conftest import Client

        alice = Client(app, "alice")
        token = create(alice, 2, roomName="Team")
        alice.post(f"/bot/{token}/{install(app, receiver.url)}", status=201)
        assert receiver.next()[0]["X-Nextcloud-Talk-Backend"] == "https://talk.example/base/"
    finally:
        app.talk.close()


# --- The queue: a hanging or refusing bot stalls nothing --------------------------------


def test_a_hanging_bot_never_delays_a_send(app, alice, team, echo, receiver):
    receiver.release.clear()
    receiver.arrived.clear()
    first = send(alice, team, "first")
    assert receiver.arrived.wait(WAIT)  # the bot holds the webhook and does not answer
    # Sends go on while it hangs: they answer before the bot is let go.
    second = send(alice, team, "second")
    third = send(alice, team, "third")
    assert not receiver.release.is_set()
    assert [m["id"] for m in history(alice, team)[:3]] == [third["id"], second["id"], first["id"]]
    receiver.release.set()
    seen = {receiver.next()[1]["object"]["id"] for _ in range(3)}
    assert seen == {str(m["id"]) for m in (first, second, third)}


def test_closing_the_app_stops_the_workers_even_with_a_hanging_bot(app, alice, team, echo, receiver):
    receiver.release.clear()
    receiver.arrived.clear()
    send(alice, team, "hang on")
    assert receiver.arrived.wait(WAIT)
    workers = list(app.talk.bots._threads)
    assert workers and all(t.is_alive() for t in workers)
    app.talk.bots.close()  # the open connection is cut: no waiting for the bot
    assert not any(t.is_alive() for t in workers)
    receiver.release.set()


def test_a_refusing_or_dead_bot_counts_errors(app, alice, team, echo, receiver):
    receiver.status = 500
    send(alice, team, "refused")
    receiver.next()
    drained(app)
    bot = alice.get("/bot/admin").data[0]
    assert bot["error_count"] == 1 and bot["last_error_message"] == "UnexpectedStatusCode: 500"
    assert bot["last_error_date"] == app.talk.clock()
    receiver.status = 202  # accepted counts as delivered
    send(alice, team, "accepted")
    receiver.next()
    drained(app)
    assert alice.get("/bot/admin").data[0]["error_count"] == 1
    receiver.close()  # now nothing listens
    send(alice, team, "nobody home")
    drained(app)
    bot = alice.get("/bot/admin").data[0]
    assert bot["error_count"] == 2 and bot["last_error_message"].startswith("ConnectionRefused")
    send(alice, team, "the queue survived")  # and sends still answer at once


def test_a_full_queue_drops_webhooks_as_errors(app, alice, team, echo, receiver):
    app.talk.bots.queue_max = 1
    receiver.release.clear()
    receiver.arrived.clear()
    send(alice, team, "held by worker 1")
    assert receiver.arrived.wait(WAIT)
    receiver.arrived.clear()
    send(alice, team, "held by worker 2")
    assert receiver.arrived.wait(WAIT)
    send(alice, team, "queued")
    send(alice, team, "dropped")
    bot = alice.get("/bot/admin").data[0]
    assert bot["error_count"] == 1 and bot["last_error_message"].startswith("Queue full")
    receiver.release.set()
    drained(app)
    assert sorted(receiver.next()[1]["object"]["name"] for _ in range(3)) == ["message"] * 3
    assert receiver.empty()


# --- The bot side: messages and reactions, signed -------------------------------------


def test_bot_sends_a_message(app, alice, anonymous, team, echo, receiver):
    question = send(alice, team, "what time is it?")
    receiver.next()
    answer = anonymous.post(f"/bot/{team}/message",
                            {"message": "Noon", "referenceId": "ref-1", "replyTo": question["id"],
                             "silent": "true"},
                            headers=signed("Noon"), status=201)
    assert answer.data is None
    shown = history(alice, team)[0]
    assert shown["actorType"] == "bots"
    assert shown["actorId"] == "bot-" + url_hash(receiver.url)
    assert shown["actorDisplayName"] == "Echo (Bot)"
    assert (shown["message"], shown["referenceId"], shown["silent"]) == ("Noon", "ref-1", True)
    assert shown["parent"]["id"] == question["id"]
    # Messages sent by bots never trigger webhooks: the next one is alice's.
    later = send(alice, team, "thanks")
    drained(app)
    assert receiver.next()[1]["object"]["id"] == str(later["id"])
    assert receiver.empty()


def test_bot_message_takes_json_reply_to_as_int_or_string_and_repeated_randoms(
    app, alice, anonymous, team, echo, receiver
):
    question = send(alice, team, "q")
    headers = {**anonymous.headers, **signed("a1"), "Content-Type": "application/json"}
    for reply_to in (question["id"], str(question["id"])):
        anonymous.test.post_json(f"{API}/bot/{team}/message",
                                 {"message": "a1", "replyTo": reply_to}, headers=headers, status=201)
    assert [m["parent"]["id"] for m in history(alice, team)[:2]] == [question["id"]] * 2


def test_bot_message_refusals(app, alice, bob, anonymous, team, echo, receiver):
    other = create(bob, 2, roomName="Elsewhere")
    foreign = send(bob, other, "not here")
    post = lambda data, headers, status: anonymous.post(  # noqa: E731
        f"/bot/{team}/message", data, headers=headers, status=status)
    post({"message": "  "}, signed("  "), 400)
    post({"message": "hi"}, signed("hi", random="short"), 400)
    post({"message": "hi"}, {"X-Nextcloud-Talk-Bot-Random": RANDOM}, 400)
    post({"message": "hi"}, signed("hi", secret="x" * 40), 401)
    post({"message": "hi"}, signed("other text"), 401)  # the signature covers the message
    post({"message": "hi", "replyTo": foreign["id"]}, signed("hi"), 400)
    post({"message": "hi", "replyTo": 999999}, signed("hi"), 400)
    post({"message": "hi", "replyTo": "abc"}, signed("hi"), 400)
    long = "x" * 32001
    post({"message": long}, signed(long), 413)
    anonymous.post(f"/bot/{other}/message", {"message": "hi"}, headers=signed("hi"), status=401)
    anonymous.post("/bot/nosuchroom/message", {"message": "hi"}, headers=signed("hi"), status=401)
    anonymous.post(f"/bot/{team}/message", {"message": "hi"},
                   headers={**signed("hi"), "OCS-APIRequest": ""}, status=412)
    with app.talk.db.write() as db:  # without the response feature, it may not write
        talk_server.set_bot_state(db, echo, 1, features=1)
    post({"message": "hi"}, signed("hi"), 401)
    drained(app)
    assert [m["message"] for m in history(alice, team) if m["actorType"] == "bots"] == []


def test_repeated_bad_signatures_are_throttled(app, alice, anonymous, team, echo):
    for _ in range(5):
        anonymous.post(f"/bot/{team}/message", {"message": "hi"},
                       headers=signed("hi", secret="y" * 40), status=401)
    refused = anonymous.post(f"/bot/{team}/message", {"message": "hi"}, headers=signed("hi"),
                             status=429)
    assert refused.headers["Retry-After"]


def test_bot_reactions(app, alice, anonymous, team, echo, receiver):
    message = send(alice, team, "react")
    receiver.next()
    path = f"/bot/{team}/reaction/{message['id']}"
    assert anonymous.post(path, {"reaction": "👍"}, headers=signed("👍"), status=201).data is None
    anonymous.post(path, {"reaction": "👍"}, headers=signed("👍"), status=200)
    listed = alice.get(f"/reaction/{team}/{message['id']}").data
    assert listed["👍"][0]["actorType"] == "bots"
    assert listed["👍"][0]["actorDisplayName"] == "Echo (Bot)"
    anonymous.delete(path, {"reaction": "👍"}, headers=signed("👍"), status=200)
    anonymous.delete(path, {"reaction": "👍"}, headers=signed("👍"), status=404)
    anonymous.post(path, {"reaction": "abc"}, headers=signed("abc"), status=400)
    anonymous.post(path, {"reaction": "👍"}, headers=signed("👎"), status=401)
    anonymous.post(f"/bot/{team}/reaction/999999", {"reaction": "👍"}, headers=signed("👍"),
                   status=404)
    anonymous.post(f"/bot/{team}/reaction/{message['id']}", {"reaction": "👍"},
                   headers=signed("👍", random="r" * 31), status=400)
    drained(app)
    assert receiver.empty()  # a bot's own reactions trigger no Like


# --- The real bot-side clients, against a served talk-server ----------------------------


@pytest.fixture
def served(tmp_path, password_hash):
    with talk_server.serve_in_thread(tmp_path / "talk.db", threads=8) as url:
        with url.app.talk.db.write() as db:
            talk_server.create_user(db, "alice", password_hash, "Alice")
        yield url


def served_client(url):
    from conftest import Client

    return Client(url.app, "alice")


def test_nc_py_api_talk_bot_answers_and_reacts(served, monkeypatch):
    talk_bot = pytest.importorskip("nc_py_api.talk_bot")
    endpoint = Receiver()
    try:
        monkeypatch.setenv("NEXTCLOUD_URL", served)
        monkeypatch.setenv("APP_ID", "talk_server_tests")
        callback = "bot_callback"
        key = hashlib.sha1(f"talk_server_tests_{callback}".encode()).hexdigest()
        monkeypatch.setenv(key, SECRET)  # where nc-py-api keeps a registered bot's secret
        app = served.app
        bot_id = install(app, endpoint.url, name="Helper", features=1 | 2 | 8)
        alice = served_client(served)
        token = create(alice, 2, roomName="Team")
        alice.post(f"/bot/{token}/{bot_id}", status=201)
        joined = talk_bot.TalkBotMessage(endpoint.next()[1])
        assert (joined.message_type, joined.conversation_token) == ("Join", token)
        send(alice, token, "!time")
        received = talk_bot.TalkBotMessage(endpoint.next()[1])
        assert received.object_content["message"] == "!time"
        assert received.actor_id == "users/alice" and received.conversation_name == "Team"
        bot = talk_bot.AsyncTalkBot(callback, "Helper")

        async def answer():
            sent, reference = await bot.send_message("It is noon", received)
            reacted = await bot.react_to_message(received, "👍")
            removed = await bot.delete_reaction(received, "👍")
            again = await bot.react_to_message(received, "🎉")
            return sent.status_code, reference, reacted.status_code, removed.status_code, again.status_code

        sent, reference, reacted, removed, again = asyncio.run(answer())
        assert (sent, reacted, removed, again) == (201, 201, 200, 201)
        reply = history(alice, token)
        bot_messages = [m for m in reply if m["actorType"] == "bots" and m["messageType"] == "comment"]
        assert bot_messages[0]["message"] == "It is noon"
        assert bot_messages[0]["referenceId"] == reference
        assert bot_messages[0]["parent"]["id"] == int(received.object_id)
        assert bot_messages[0]["actorDisplayName"] == "Helper (Bot)"
        assert list(alice.get(f"/reaction/{token}/{received.object_id}").data) == ["🎉"]
    finally:
        endpoint.close()


def test_apprise_nextcloud_talk_bot_mode_sends(served):
    apprise = pytest.importorskip("apprise")
    app = served.app
    bot_id = install(app, "http://127.0.0.1:9/unused", name="Apprise", features=2)
    alice = served_client(served)
    token = create(alice, 2, roomName="Alerts")
    alice.post(f"/bot/{token}/{bot_id}", status=201)
    notifier = apprise.Apprise()
    port = served.rsplit(":", 1)[1]
    assert notifier.add(f"nctalk://127.0.0.1:{port}/{token}?secret={SECRET}")
    assert notifier.notify(title="Build", body="passed")
    shown = history(alice, token)[0]
    assert (shown["actorType"], shown["actorDisplayName"]) == ("bots", "Apprise (Bot)")
    assert shown["message"] == "Build\r\npassed"
    wrong = apprise.Apprise()
    wrong.add(f"nctalk://127.0.0.1:{port}/{token}?secret={'z' * 40}")
    assert not wrong.notify(title="Build", body="forged")


def test_readme_example_bot_answers_time(served, tmp_path):
    """The README's 20-line stdlib bot, run as written against a served server."""
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    bots = readme[readme.index("## Bots"):]
    code = re.search(r"```python\n(.*?)```", bots, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    script = tmp_path / "timebot.py"
    script.write_text(code, encoding="utf-8")
    listener = Receiver()  # only for a free port: the example binds it itself
    port = listener.server.server_port
    listener.close()
    served.app.talk.public_url = served  # the webhooks tell the bot where to answer
    env = {"BOT_SECRET": SECRET, "BOT_PORT": str(port), "PATH": ""}
    process = subprocess.Popen([sys.executable, str(script)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in process.stdout.readline()
        app = served.app
        bot_id = install(app, f"http://127.0.0.1:{port}/", name="Clock")
        alice = served_client(served)
        token = create(alice, 2, roomName="Team")
        alice.post(f"/bot/{token}/{bot_id}", status=201)
        send(alice, token, "!time")
        drained(app)
        answers = [m for m in history(alice, token) if m["actorType"] == "bots"]
        assert len(answers) == 1 and re.fullmatch(r"It is \d\d:\d\d", answers[0]["message"])
    finally:
        process.kill()
        process.wait()
