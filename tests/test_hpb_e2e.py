"""A call through the High-Performance Backend, end to end (issue 17).

Janus (the media server), nextcloud-spreed-signaling (the signaling server,
with its built-in loopback NATS) and talk-server (its backend) run on
loopback ports; three people in headless Chromium hold a call on
talk-server's own page. Each page must decode video from both others, and
the media must go through Janus: every page holds one publisher connection
and one subscriber connection per other participant, never a mesh.

Needs root in a network namespace that has only lo (as .ci/run runs the
suite), Janus (`apt-get install janus`) and the signaling server 1.2.4
(.ci/hpb-daemons fetches both)::

    bash .ci/hpb-daemons
    unshare --net sh -c 'ip link set lo up && exec .venv/bin/python -m pytest tests/test_hpb_e2e.py'

Janus gathers no ICE candidates on lo, so the test adds a veth pair inside
the namespace carrying 127.0.0.2/32 and tells Janus to use only that.
Elsewhere it skips with its reason; in CI as root a missing daemon fails it.
"""

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from test_browser import (  # noqa: F401  (fixtures and the module's skip marks)
    Person,
    browser,
    other_interfaces,
    pytestmark,
    serving,
)

try:
    from playwright.sync_api import expect
except ImportError:  # the module skips through pytestmark
    expect = None

USERS = {"alice": "Alice", "bob": "Bob", "carol": "Carol"}
VETH = "talkhpb0"  # carries Janus's address; its peer end is VETH_PEER
VETH_PEER = "talkhpb1"
JANUS_ADDRESS = "127.0.0.2"
CACHE = Path(
    os.environ.get("TALK_HPB_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "talk-server" / "hpb"
)
SIGNALING = os.environ.get("TALK_HPB_SIGNALING") or str(
    CACHE / "root" / "usr" / "bin" / "nextcloud-spreed-signaling-server"
)
JANUS = shutil.which("janus") or "/usr/bin/janus"
SETTLE_MS = 60_000  # the longest wait for one step of the call (polled every 250 ms)


def missing_daemons():
    missing = []
    if not os.access(JANUS, os.X_OK):
        missing.append("janus (apt-get install janus)")
    if not os.access(SIGNALING, os.X_OK):
        missing.append(f"the signaling server at {SIGNALING} (bash .ci/hpb-daemons)")
    return missing


def skip_reason():
    if os.geteuid() != 0:
        return "needs root (a veth pair for Janus inside a network namespace)"
    if other_interfaces():
        return (
            "needs a network namespace with only lo (visible: "
            f"{', '.join(other_interfaces())}); run: unshare --net sh -c "
            "'ip link set lo up && exec python -m pytest tests/test_hpb_e2e.py'"
        )
    if missing_daemons():
        return "missing: " + "; ".join(missing_daemons())
    return None


@pytest.fixture(scope="module", autouse=True)
def daemons_or_skip():
    reason = skip_reason()
    if reason and os.environ.get("CI") == "true" and os.geteuid() == 0 and missing_daemons():
        pytest.fail(f"CI runs this test as root: {reason}")  # .ci/run fetches them
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------
# The daemons: configuration, start, readiness
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(*command):
    subprocess.run(command, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def veth_for_janus():
    """A veth pair in this namespace, one end carrying 127.0.0.2/32 (ICE skips lo)."""
    try:
        run("ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot add a veth pair here: {error.stderr.strip()}")
    try:
        run("ip", "addr", "add", f"{JANUS_ADDRESS}/32", "dev", VETH)
        run("ip", "link", "set", VETH, "up")
        run("ip", "link", "set", VETH_PEER, "up")
        yield VETH
    finally:
        subprocess.run(["ip", "link", "del", VETH], capture_output=True)


def janus_config(folder: Path, ws_port: int, interface: str) -> Path:
    """Janus for one machine: the VideoRoom plugin and WebSockets on 127.0.0.1, nothing else."""
    (folder / "janus.jcfg").write_text(
        f"""general: {{
	configs_folder = "{folder}"
	debug_level = 4
	server_name = "talk-hpb-test"
}}
media: {{
	rtp_port_range = "20000-40000"
}}
nat: {{
	ice_enforce_list = "{interface}"
	ignore_mdns = true
}}
plugins: {{
	disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so"
}}
transports: {{
	disable = "libjanus_http.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so"
}}
loggers: {{
	disable = "libjanus_jsonlog.so"
}}
events: {{
	broadcast = false
}}
"""
    )
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
    (folder / "janus.transport.websockets.jcfg").write_text(
        f"""general: {{
	ws = true
	ws_ip = "127.0.0.1"
	ws_port = {ws_port}
	wss = false
}}
admin: {{
	admin_ws = false
	admin_wss = false
}}
"""
    )
    return folder / "janus.jcfg"


def signaling_config(folder: Path, port: int, talk_url: str, secret: str, janus_port: int) -> Path:
    """The signaling server for one machine: talk-server as its backend, Janus, loopback NATS."""
    path = folder / "server.conf"
    path.write_text(
        f"""[http]
listen = 127.0.0.1:{port}

[app]
debug = false

[sessions]
hashkey = {secrets.token_hex(32)}
blockkey = {secrets.token_hex(16)}

[clients]
internalsecret = {secrets.token_hex(32)}

[backend]
backends = talk
allowall = false
timeout = 10
connectionsperhost = 8

[talk]
url = {talk_url}
secret = {secret}

[nats]
url = nats://loopback

[mcu]
type = janus
url = ws://127.0.0.1:{janus_port}
"""
    )
    return path


class Daemon:
    """A subprocess with its output in a log file; stop() ends it (and says why it died)."""

    def __init__(self, name, command, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def output(self):
        return Path(self.log_path).read_text(errors="replace")[-4000:]

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def wait_ready(daemon, check, attempts=100):
    """Ask `check` until it answers (at most `attempts` times, 0.1 s apart), or the daemon dies."""
    for _ in range(attempts):
        if not daemon.alive():
            raise AssertionError(f"{daemon.name} exited:\n{daemon.output()}")
        try:
            if check():
                return
        except OSError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.process.wait(0.1)
    raise AssertionError(f"{daemon.name} never became ready:\n{daemon.output()}")


def janus_answers(port):
    """Janus's WebSocket transport completes an upgrade for its protocol."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: janus-protocol\r\n\r\n"
            ).encode()
        )
        return sock.recv(1024).startswith(b"HTTP/1.1 101")


def signaling_welcome(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/api/v1/welcome")
        answer = connection.getresponse()
        return answer.status == 200 and "version" in json.loads(answer.read())
    finally:
        connection.close()


def signaling_stats(port):
    """The signaling server's own figures (/api/v1/stats answers loopback by default)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/stats", timeout=5) as answer:
        return json.load(answer)


@pytest.fixture
def hpb(tmp_path, password_hash):
    """Janus, talk-server and the signaling server between them, on loopback ports.

    Yields talk-server's URL, the signaling server's port and the daemons (for
    their logs). Teardown runs backwards: the signaling server, talk-server,
    Janus, the veth pair, then the folder with the configs and logs.
    """
    folder = Path(tempfile.mkdtemp(prefix="talk-hpb-"))
    try:
        with contextlib.ExitStack() as stack:
            interface = stack.enter_context(veth_for_janus())
            janus_port, signaling_port = free_port(), free_port()
            janus = Daemon(
                "janus",
                [JANUS, "-C", str(janus_config(folder, janus_port, interface)), "-F", str(folder)],
                folder / "janus.log",
            )
            stack.callback(janus.stop)
            wait_ready(janus, lambda: janus_answers(janus_port))

            secret = secrets.token_hex(32)
            base_url = stack.enter_context(
                serving(
                    tmp_path,
                    password_hash,
                    USERS,
                    signaling_servers=[f"http://127.0.0.1:{signaling_port}"],
                    signaling_secret=secret,
                )
            )
            config = signaling_config(folder, signaling_port, base_url, secret, janus_port)
            daemons = {"janus": janus}

            def start_signaling():
                """(Re)start the signaling server; ready once it greets and reaches Janus."""
                signaling = Daemon(
                    "nextcloud-spreed-signaling",
                    [SIGNALING, "-config", str(config)],
                    folder / "signaling.log",
                )
                daemons["signaling"] = signaling
                wait_ready(signaling, lambda: signaling_welcome(signaling_port))
                wait_ready(
                    signaling,
                    lambda: signaling_stats(signaling_port).get("mcu", {}).get("connected"),
                )

            def restart_signaling():
                daemons["signaling"].stop()
                start_signaling()

            stack.callback(lambda: daemons["signaling"].stop())
            start_signaling()
            yield {
                "url": base_url,
                "signaling_port": signaling_port,
                "restart_signaling": restart_signaling,
                "logs": daemons.values(),  # live: the restarted server's log too
            }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# The call
# ---------------------------------------------------------------------------

# Every RTCPeerConnection the page makes, closed or not: the client cannot
# hold one the test does not see.
COUNT_CONNECTIONS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__allConnections = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__allConnections.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""

# The call as the page sees it: each connection the client holds with its
# role, what it decodes and sends, and whom its media really travels to.
CALL_STATE = """
async () => {
  const out = [];
  for (const {role, session, pc} of window.talkDebug.connections()) {
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach((s) => byId.set(s.id, s));
    let framesDecoded = 0, framesSent = 0, remote = null;
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') framesDecoded += s.framesDecoded || 0;
      if (s.type === 'outbound-rtp' && s.kind === 'video') framesSent += s.framesSent || s.framesEncoded || 0;
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        const pair = byId.get(s.selectedCandidatePairId);
        const candidate = pair && byId.get(pair.remoteCandidateId);
        remote = candidate ? candidate.address || candidate.ip : null;
      }
    });
    out.push({
      role, session, ice: pc.iceConnectionState, framesDecoded, framesSent, remote,
      janus: Boolean(pc.remoteDescription && /^a=msid-semantic: ?WMS janus/m.test(pc.remoteDescription.sdp)),
    });
  }
  const open = window.__allConnections.filter((pc) => pc.connectionState !== 'closed').length;
  return {me: window.talkDebug.signalingSession, mode: window.talkDebug.signalingMode, open, connections: out};
}
"""

# True once the page publishes to Janus and decodes video from `count` others.
CALL_UP = """
async (count) => {
  const list = window.talkDebug.connections();
  const up = (pc) => ['connected', 'completed'].includes(pc.iceConnectionState);
  const subscribers = list.filter((c) => c.role === 'subscriber');
  const publishers = list.filter((c) => c.role === 'publisher');
  if (publishers.length !== 1 || subscribers.length !== count || !list.every((c) => up(c.pc))) return false;
  for (const {pc} of subscribers) {
    let frames = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames += s.framesDecoded || 0;
    });
    if (frames <= 0) return false;
  }
  return true;
}
"""


def wait_until(person, script, arg=None, daemons=()):
    """Ask the page `script` (which may be async) until it holds, at most SETTLE_MS
    (in steps of 250 ms); else fail with what the page and the daemons saw."""
    for _ in range(SETTLE_MS // 250):
        if person.page.evaluate(script, arg):
            return
        person.page.wait_for_timeout(250)
    logs = "\n".join(f"--- {d.name}:\n{d.output()}" for d in daemons)
    state = person.page.evaluate(CALL_STATE)
    raise AssertionError(
        f"{script} never held for {person.user_id}: {state}\nconsole:\n"
        + "\n".join(person.console[-40:])
        + f"\n{logs}"
    )


def test_three_party_call_goes_through_janus(browser, hpb):
    people = []
    try:
        for user_id in USERS:
            person = Person(browser, hpb["url"])
            person.context.add_init_script(COUNT_CONNECTIONS)
            person.user_id = user_id
            person.console = []
            person.page.on(
                "console", lambda m, log=person.console: log.append(f"{m.type}: {m.text}")
            )
            people.append(person)
            person.sign_in(user_id, USERS[user_id])
        alice, bob, carol = people
        token = alice.create_room("2", "Large call")
        alice.add_participant("bob")
        alice.add_participant("carol")
        for person in (bob, carol):
            person.open_room(token)
        # Each page talks to the signaling server (hello with the ticket, room join).
        for person in people:
            wait_until(
                person,
                "() => window.talkDebug.signalingMode === 'external' && Boolean(window.talkDebug.signalingSession)",
                daemons=hpb["logs"],
            )

        for person in people:
            expect(person.by("call-join")).to_be_visible()
            person.by("call-join").click()
            expect(person.page.locator("[data-testid=video-tile][data-local=true]")).to_be_visible()
        for person in people:
            wait_until(person, CALL_UP, 2, hpb["logs"])
        # Janus holds three published streams, one per camera.
        assert signaling_stats(hpb["signaling_port"])["mcu"]["publishers"] == 3

        states = {
            user_id: p.page.evaluate(CALL_STATE) for user_id, p in zip(USERS, people, strict=True)
        }
        sessions = {user_id: state["me"] for user_id, state in states.items()}
        assert len(set(sessions.values())) == 3, sessions
        for user_id, state in states.items():
            assert state["mode"] == "external", state
            roles = sorted(c["role"] for c in state["connections"])
            assert roles == ["publisher", "subscriber", "subscriber"], state
            # No connection the client does not list (so no hidden mesh).
            assert state["open"] == 3, state
            publisher = next(c for c in state["connections"] if c["role"] == "publisher")
            assert publisher["session"] == state["me"] and publisher["framesSent"] > 0, state
            others = {sessions[u] for u in USERS if u != user_id}
            subscribed = {c["session"] for c in state["connections"] if c["role"] == "subscriber"}
            assert subscribed == others, state
            for connection in state["connections"]:
                # Janus answered or offered every one, and the media flows to its address.
                assert connection["janus"], state
                assert connection["remote"] == JANUS_ADDRESS, state
                if connection["role"] == "subscriber":
                    assert connection["framesDecoded"] > 0, state

        # The signaling server restarts: every page greets the new one with a new
        # session, joins the room and the call again, and the call comes back.
        hpb["restart_signaling"]()
        for person in people:
            wait_until(
                person,
                "(old) => ![null, old].includes(window.talkDebug.signalingSession)",
                sessions[person.user_id],
                hpb["logs"],
            )
        for person in people:
            wait_until(person, CALL_UP, 2, hpb["logs"])
        assert signaling_stats(hpb["signaling_port"])["mcu"]["publishers"] == 3

        # Alice hangs up: her connections close, the others drop her stream only.
        alice.by("call-hangup").click()
        wait_until(alice, "() => window.talkDebug.connections().length === 0", daemons=hpb["logs"])
        for person in (bob, carol):
            wait_until(person, CALL_UP, 1, hpb["logs"])
        assert alice.page.evaluate(CALL_STATE)["open"] == 0
        for person in people:
            person.assert_clean()
    finally:
        for person in people:
            person.close()
