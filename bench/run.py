"""Benchmark talk-server against its targets, with a bare Bottle app as baseline.

    python bench/run.py [--quick] [--markdown FILE]

Everything runs as separate processes on 127.0.0.1: the real server
(`talk_server.py serve`), the baseline (bench/baseline.py, same Waitress
settings) and the load (bench/client.py). Server RSS and CPU come from
/proc/<server pid>, so the load generator never counts against the server.

Prints one table: figure, conditions, measured value, target, pass/fail.
Timings are reported, never asserted: the exit status is 0 when the script
worked, non-zero only when it failed to measure something. --quick is a smoke
run (well under a minute) with fewer repetitions and smaller sizes.
"""

import argparse
import contextlib
import hmac
import http.client
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from client import Http, percentile

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "talk_server.py"
BASELINE = ROOT / "bench" / "baseline.py"
CLIENT = ROOT / "bench" / "client.py"
PYTHON = sys.executable
PASSWORD = "bench-password"
DEFAULT_THREADS = 64  # talk-server's default --threads
RESERVE = 4  # talk-server's default --reserve

# (key, figure, target): the rows of the table, in order.
FIGURES = [
    ("get_room", "Authenticated GET /room requests/s, ratio to baseline", ">= 0.5"),
    (
        "get_room_20",
        "GET /room (API v1) for a user in 20 rooms, ratio to baseline",
        "reference for v4",
    ),
    (
        "get_room_v4",
        "GET /api/v4/room for a user in 20 rooms, ratio to baseline",
        ">= 0.85 x the v1 ratio",
    ),
    ("post_chat", "POST /chat requests/s, ratio to baseline", ">= 0.35"),
    (
        "wake",
        "Wake-up latency, send returns -> waiting receive returns",
        "median <= 3 ms, p99 <= 20 ms",
    ),
    (
        "signaling_wake",
        "Wake-up latency, signaling v3 send returns -> waiting poll returns",
        "median <= 5 ms, p99 <= 30 ms",
    ),
    ("send", "Send latency while (threads + 20) receivers wait", "p99 <= 50 ms"),
    ("receive_cost", "Receive cost at the end of a room, big vs 1,000 messages", "ratio <= 1.5"),
    ("rss", "RSS idle / with waiting receivers", "<= 35 MB / <= 50 MB"),
    ("start", "Process start to first answered request", "<= 0.5 s"),
    ("idle_cpu", "CPU used by an idle server over 60 s", "<= 0.2 s"),
    # Today's chat (issue 12)
    (
        "receive_cost_v2",
        "Modern receive (lookIntoFuture) at the end of a room, big vs 1,000 messages",
        "ratio <= 1.2",
    ),
    (
        "wake_v2",
        "Wake-up latency of future long-polls (lookIntoFuture=1)",
        "median <= 3 ms, p99 <= 20 ms",
    ),
    (
        "post_chat_v2",
        "POST /chat with mentions and a reply requests/s, ratio to baseline",
        ">= 0.3",
    ),
    # The High-Performance Backend (issue 17): beside POST /chat and GET /room
    (
        "hpb_auth",
        "POST /signaling/backend `auth` (signaling server's hello) requests/s, ratio to baseline",
        "reported",
    ),
    (
        "hpb_ping",
        "POST /signaling/backend `ping` (keeps sessions alive) requests/s, ratio to baseline",
        "reported",
    ),
    (
        "get_room_v4_50",
        "GET /api/v4/room for a user in 50 rooms with unread messages, ratio to baseline",
        ">= 0.5",
    ),
]


@dataclass
class Settings:
    load_seconds: float  # one throughput measurement window
    load_warmup: float
    pairs: int  # server/baseline throughput pairs
    client_processes: int
    connections: int  # keep-alive connections per client process
    wake_receivers: int
    wake_rooms: int
    wake_sends: int
    wake_threads: int
    send_sends: int
    send_seconds: float  # the send-latency test stops sending after this
    big_room: int
    small_room: int
    receive_batches: int
    receive_per_batch: int
    starts: int
    idle_seconds: float


FULL = Settings(
    load_seconds=3.0,
    load_warmup=0.5,
    pairs=5,
    client_processes=2,
    connections=4,
    wake_receivers=100,
    wake_rooms=10,
    wake_sends=50,
    wake_threads=128,
    send_sends=200,
    send_seconds=30.0,
    big_room=100_000,
    small_room=1_000,
    receive_batches=5,
    receive_per_batch=200,
    starts=7,
    idle_seconds=60.0,
)
QUICK = Settings(
    load_seconds=1.0,
    load_warmup=0.2,
    pairs=2,
    client_processes=2,
    connections=4,
    wake_receivers=30,
    wake_rooms=10,
    wake_sends=20,
    wake_threads=128,
    send_sends=30,
    send_seconds=5.0,
    big_room=10_000,
    small_room=1_000,
    receive_batches=3,
    receive_per_batch=50,
    starts=3,
    idle_seconds=5.0,
)


# ---------------------------------------------------------------------------
# Processes: the server, the baseline, the load
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment without TALK_* settings from the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALK_")}
    env.update(extra)
    return env


class Process:
    """A server subprocess on a loopback port, its log in a file."""

    def __init__(self, argv, port, log_path, env):
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, path="/status.php", timeout=30.0) -> float:
        """Seconds from spawn to the first 200 answer to GET `path`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.name}: exited early\n{self.log_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    return time.perf_counter() - self.spawned
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.002)
        raise RuntimeError(f"{self.log_path.name}: not ready in {timeout} s\n{self.log_tail()}")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines=20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class Bench:
    """One run: a temporary directory, its database, the processes it started."""

    def __init__(self, settings: Settings, workdir: Path, server: Path = SERVER):
        self.s = settings
        self.server = server
        self.dir = workdir
        self.db = workdir / "talk.sqlite3"
        self.processes: list[Process] = []
        self.logs = 0

    def _log_path(self, name):
        self.logs += 1
        return self.dir / f"{self.logs:02d}-{name}.log"

    def start_talk(self, threads=DEFAULT_THREADS, admin=True, extra=()) -> Process:
        port = free_port()
        # Run as installed: `-m` imports the module through its cached
        # bytecode (pip compiles it at install), not from source every start.
        argv = [
            PYTHON,
            "-m",
            self.server.stem,
            "serve",
            "--db",
            str(self.db),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(threads),
            # The load is one sender at thousands of messages a minute.
            "--chat-per-minute",
            "100000000",
            "--signaling-per-minute",
            "100000000",
            # ...and over a hundred connections from 127.0.0.1.
            "--connections-per-address",
            "100000",
            *extra,
        ]
        env = clean_env(PYTHONPATH=str(self.server.parent))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if admin:
            env["TALK_ADMIN_PASSWORD"] = PASSWORD
        process = Process(argv, port, self._log_path(f"talk-{threads}"), env)
        self.processes.append(process)
        return process

    def start_baseline(self, threads=DEFAULT_THREADS) -> Process:
        port = free_port()
        argv = [PYTHON, str(BASELINE), "--port", str(port), "--threads", str(threads)]
        process = Process(argv, port, self._log_path("baseline"), clean_env())
        self.processes.append(process)
        return process

    def stop(self, process: Process):
        process.stop()
        self.processes.remove(process)

    def stop_all(self):
        for process in list(self.processes):
            self.stop(process)

    def cli(self, *args):
        """Run a talk-server command line on the bench database."""
        subprocess.run(
            [PYTHON, str(self.server), *args, "--db", str(self.db)],
            env=clean_env(),
            cwd=ROOT,
            check=True,
            capture_output=True,
        )

    def clients(self, specs: list[dict], timeout: float, warmup=None) -> list[dict]:
        """Run client processes at once (bench/client.py); their JSON results.

        With `warmup`, the processes first report that they are up; their
        measured window opens `warmup` seconds after the last one did.
        """
        if warmup is not None:
            specs = [{**spec, "handshake": True} for spec in specs]
        procs = [
            subprocess.Popen(
                [PYTHON, str(CLIENT), json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=ROOT,
                text=True,
            )
            for spec in specs
        ]
        if warmup is not None:
            for proc in procs:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError("a client process did not start")
            start_at = f"{time.time() + warmup!r}\n"
            for proc in procs:
                proc.stdin.write(start_at)
                proc.stdin.flush()
        results = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError("a client process did not finish in time") from None
            if proc.returncode != 0:
                raise RuntimeError(f"a client process failed (exit {proc.returncode})")
            results.append(json.loads(out))
        return results

    # --- Setup --------------------------------------------------------------

    def create_rooms(self, port, user, count, name, members=()) -> list[str]:
        client = Http(port, user, PASSWORD)
        tokens = []
        for i in range(count):
            token = client.ocs("POST", "/room", {"roomType": 2, "roomName": f"{name} {i}"})["token"]
            for member in members:
                client.ocs("POST", f"/room/{token}/participants", {"newParticipant": member})
            tokens.append(token)
        client.close()
        return tokens

    # --- Figures ------------------------------------------------------------

    def throughput(
        self, server: Process, method, path, params=None, user="bench", prefix=None, raw=None
    ):
        """Requests/s over the window, server CPU ms per answer, failed answers.
        `raw`: {"body": text, "headers": {...}} sent as it is instead of `params`."""
        s = self.s
        spec = {
            "mode": "throughput",
            "port": server.port,
            "method": method,
            "path": path,
            "params": params,
            "user": user,
            **({"prefix": prefix} if prefix else {}),
            **(raw or {}),
            "password": PASSWORD,
            "connections": s.connections,
            "duration": s.load_seconds,
        }
        cpu = server.cpu_seconds()
        results = self.clients(
            [spec] * s.client_processes, timeout=s.load_seconds + 60, warmup=s.load_warmup
        )
        cpu = server.cpu_seconds() - cpu
        ok = sum(r["ok"] for r in results)
        errors = sum(r["errors"] for r in results)
        answers = sum(r["answers"] for r in results)
        return ok / s.load_seconds, cpu * 1000 / max(answers, 1), errors

    def receive_cost(self, port, small_token, big_token, modern=False) -> dict:
        """Median time of an empty receive at the end of each room, batch by batch:
        the 2018 form at offset <count>, or today's future form after the newest
        message (`modern`, answered 304)."""
        s = self.s
        client = Http(port, "hist", PASSWORD)
        ends = {small_token: s.small_room, big_token: s.big_room}
        if modern:
            for token in ends:
                newest = client.ocs(
                    "GET", f"/chat/{token}", {"lookIntoFuture": 0, "limit": 1, "timeout": 0}
                )
                ends[token] = newest[0]["id"]

        def timed(token, end):
            if modern:
                params, expected = {"lookIntoFuture": 1, "lastKnownMessageId": end, "timeout": 0}, 304
            else:
                params, expected = {"offset": end, "timeout": 0}, 200
            began = time.perf_counter()
            status, body = client.raw("GET", f"/chat/{token}", params)
            elapsed = time.perf_counter() - began
            if status != expected or (not modern and json.loads(body)["ocs"]["data"] != []):
                raise RuntimeError(f"receive at the end of a room: HTTP {status} {body[:200]!r}")
            return elapsed

        for _ in range(20):  # warm caches and the credential cache
            timed(small_token, ends[small_token])
            timed(big_token, ends[big_token])
        ratios, smalls, bigs = [], [], []
        for _ in range(s.receive_batches):
            small, big = [], []
            for _ in range(s.receive_per_batch):
                small.append(timed(small_token, ends[small_token]))
                big.append(timed(big_token, ends[big_token]))
            smalls.append(statistics.median(small))
            bigs.append(statistics.median(big))
            ratios.append(bigs[-1] / smalls[-1])
        client.close()
        return {
            "ratio": statistics.median(ratios),
            "small_ms": statistics.median(smalls) * 1000,
            "big_ms": statistics.median(bigs) * 1000,
        }

    def fill_room(self, token, count, user):
        """Insert `count` comments straight into SQLite (the server is stopped),
        after what the room has, keeping the room's chat counters."""
        conn = sqlite3.connect(self.db)
        try:
            room_id, last_seq, last_legacy = conn.execute(
                "SELECT id, last_seq, last_legacy_seq FROM rooms WHERE token = ?", (token,)
            ).fetchone()
            first = int(time.time()) - count // 10 - 60
            rows = (
                (room_id, last_seq + n, last_legacy + n, "users", user, first + n // 10,
                 f"history message {n}")
                for n in range(1, count + 1)
            )
            with conn:
                conn.executemany(
                    """
                    INSERT INTO messages (room_id, seq, legacy_seq, actor_type, actor_id,
                                          timestamp, message)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                    """,
                    rows,
                )
                conn.execute(
                    """
                    UPDATE rooms
                       SET last_seq = last_seq + ?, last_legacy_seq = last_legacy_seq + ?,
                           last_message_id = (SELECT max(id) FROM messages WHERE room_id = ?),
                           last_message_time = max(last_message_time, ?)
                     WHERE id = ?
                    """,
                    (count, count, room_id, first + count // 10, room_id),
                )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def login(port, user):
    client = Http(port, user, PASSWORD)
    client.ocs("GET", "/room")
    client.close()


def mib(kb) -> float:
    return kb / 1024


def run(settings: Settings, rows: dict, errors: list, server: Path = SERVER):
    with tempfile.TemporaryDirectory(prefix="talk-bench-") as tmp:
        bench = Bench(settings, Path(tmp), server)
        try:
            phases(bench, settings, rows, errors)
        finally:
            bench.stop_all()


@contextlib.contextmanager
def phase(name, errors, rows, *keys):
    """Run one phase; a failure becomes error rows and the run goes on."""
    began = time.monotonic()
    try:
        yield
    except Exception as error:
        errors.append(f"{name}: {error!r}")
        traceback.print_exc()
        for key in keys:
            rows.setdefault(key, {"conditions": "", "measured": f"ERROR ({name})", "ok": None})
    finally:
        print(f"bench: {name} phase took {time.monotonic() - began:.1f} s", file=sys.stderr)


V3_PREFIX = "/ocs/v2.php/apps/spreed/api/v3"
V4_PREFIX = "/ocs/v2.php/apps/spreed/api/v4"


def room_lists(bench: Bench, s: Settings, talk, base, rows: dict, load: str):
    """The room list of both API generations for a user in 20 rooms, each
    against the baseline in the same pair of windows."""
    lists = {"get_room_20": None, "get_room_v4": V4_PREFIX}
    ratios = {key: ([], [], []) for key in lists}
    failed = 0
    for _ in range(s.pairs):
        for key, prefix in lists.items():
            server_rate, _, server_errors = bench.throughput(
                talk, "GET", "/room", user="lists", prefix=prefix
            )
            base_rate, _, base_errors = bench.throughput(base, "GET", "/room", user="lists")
            failed += server_errors + base_errors
            for values, value in zip(
                ratios[key], (server_rate, base_rate, server_rate / base_rate), strict=True
            ):
                values.append(value)
    v1_ratio = statistics.median(ratios["get_room_20"][2])
    for key in lists:
        server_rates, base_rates, key_ratios = ratios[key]
        ratio = statistics.median(key_ratios)
        rows[key] = {
            "conditions": f"{load}, {s.load_seconds:g} s x {s.pairs} pairs, 64 threads",
            "measured": f"{ratio:.2f} ({statistics.median(server_rates):.0f} vs "
            f"{statistics.median(base_rates):.0f} req/s)"
            + (f", {ratio / v1_ratio:.2f} x the v1 ratio" if key == "get_room_v4" else "")
            + (f", {failed} failed answers" if failed else ""),
            "ok": None if key == "get_room_20" else ratio >= 0.85 * v1_ratio,
        }


def unread_list(bench: Bench, s: Settings, talk, base, rows: dict, load: str):
    """Today's room list for a user in 50 rooms, each with unread messages and a
    mention: unread counts come from counters, so this stays near the 20-room list."""
    server_rates, base_rates, ratios, failed = [], [], [], 0
    for _ in range(s.pairs):
        server_rate, _, server_errors = bench.throughput(
            talk, "GET", "/room", user="many", prefix=V4_PREFIX
        )
        base_rate, _, base_errors = bench.throughput(base, "GET", "/room", user="many")
        failed += server_errors + base_errors
        server_rates.append(server_rate)
        base_rates.append(base_rate)
        ratios.append(server_rate / base_rate)
    ratio = statistics.median(ratios)
    rows["get_room_v4_50"] = {
        "conditions": f"{load}, {s.load_seconds:g} s x {s.pairs} pairs, 64 threads, "
        "3 unread messages with a mention in each room",
        "measured": f"{ratio:.2f} ({statistics.median(server_rates):.0f} vs "
        f"{statistics.median(base_rates):.0f} req/s)"
        + (f", {failed} failed answers" if failed else ""),
        "ok": ratio >= 0.5,
    }


HPB_SECRET = "bench-signaling-secret"
HPB_SESSIONS = 10  # sessions one backend ping names (one room's callers)


def signed_backend_request(message: dict) -> dict:
    """A backend request as the signaling server signs it (random + body)."""
    body = json.dumps(message)
    random = "r" * 64
    checksum = hmac.new(HPB_SECRET.encode(), (random + body).encode(), "sha256").hexdigest()
    return {
        "body": body,
        "headers": {
            "Content-Type": "application/json",
            "Spreed-Signaling-Random": random,
            "Spreed-Signaling-Checksum": checksum,
        },
    }


def hpb_backend(bench: Bench, s: Settings, rows: dict, token: str):
    """The signaling server's `auth` (a hello with a user's ticket) and `ping`
    (every ~10 s per room) against the baseline, on a server configured for a
    signaling server (one that nobody listens on: the notifications of the
    set-up joins are dropped after their tries)."""
    talk = bench.start_talk(
        extra=["--signaling-server", f"http://127.0.0.1:{free_port()}",
               "--signaling-secret", HPB_SECRET]
    )
    base = bench.start_baseline()
    talk.wait_ready()
    base.wait_ready()
    user = Http(talk.port, "bench", PASSWORD)
    ticket = user.ocs("GET", "/signaling/settings", prefix=V3_PREFIX)["ticket"]
    user.close()
    sessions = []
    for _ in range(HPB_SESSIONS):  # a new connection is a new device, so a session of its own
        device = Http(talk.port, "bench", PASSWORD)
        joined = device.ocs("POST", f"/room/{token}/participants/active", prefix=V4_PREFIX)
        sessions.append(joined["sessionId"])
        device.close()
    requests = {
        "hpb_auth": {"type": "auth", "auth": {"version": "1.0",
                                               "params": {"userid": "bench", "ticket": ticket}}},
        "hpb_ping": {"type": "ping", "ping": {"roomid": token, "entries": [
            {"userid": "bench", "sessionid": session} for session in sessions]}},
    }
    load = f"{s.client_processes} client processes x {s.connections} keep-alive connections"
    for key, message in requests.items():
        raw = signed_backend_request(message)
        server_rates, base_rates, ratios, failed = [], [], [], 0
        for _ in range(s.pairs):
            server_rate, _, server_errors = bench.throughput(
                talk, "POST", "/signaling/backend", user=None, prefix=V3_PREFIX, raw=raw
            )
            base_rate, _, base_errors = bench.throughput(
                base, "POST", "/signaling/backend", user=None, prefix=V3_PREFIX, raw=raw
            )
            failed += server_errors + base_errors
            server_rates.append(server_rate)
            base_rates.append(base_rate)
            ratios.append(server_rate / base_rate)
        ratio = statistics.median(ratios)
        rows[key] = {
            "conditions": f"{load}, {s.load_seconds:g} s x {s.pairs} pairs, 64 threads, "
            + ("a user's ticket" if key == "hpb_auth"
               else f"{HPB_SESSIONS} sessions, durability full"),
            "measured": f"{ratio:.2f} ({statistics.median(server_rates):.0f} vs "
            f"{statistics.median(base_rates):.0f} req/s)"
            + (f", {failed} failed answers" if failed else ""),
            "ok": None,
        }
    bench.stop(base)
    bench.stop(talk)


def phases(bench: Bench, s: Settings, rows: dict, errors: list):
    for user in ("bench", "poll", "hist", "lists", "many", "owner1", "owner2"):
        bench.cli("user", "add", user, "--password", PASSWORD)

    # Phase 1: the default server (64 threads) and the baseline, side by side.
    keys = ("rss", "idle_cpu", "get_room", "get_room_20", "get_room_v4", "post_chat", "send",
            "post_chat_v2", "get_room_v4_50")
    idle_kb = None
    with phase("default server", errors, rows, *keys):
        talk = bench.start_talk()
        base = bench.start_baseline()
        talk.wait_ready()
        base.wait_ready()
        bench_rooms = bench.create_rooms(talk.port, "bench", 3, "Team", members=("poll",))
        wake_rooms = bench.create_rooms(talk.port, "poll", s.wake_rooms, "Wake")
        send_rooms = bench.create_rooms(talk.port, "poll", 10, "Send")
        hist_rooms = bench.create_rooms(talk.port, "hist", 2, "History")
        bench.create_rooms(talk.port, "lists", 20, "Listed", members=("bench",))
        for user in ("bench", "poll", "hist", "lists"):  # the first login hashes; later ones hit the cache
            login(talk.port, user)
        time.sleep(1.0)
        idle_kb = talk.rss_kb()

        before = talk.cpu_seconds()
        time.sleep(s.idle_seconds)
        idle_cpu = (talk.cpu_seconds() - before) * 60 / s.idle_seconds
        rows["idle_cpu"] = {
            "conditions": f"{s.idle_seconds:g} s window, scaled to 60 s, no connections",
            "measured": f"{idle_cpu:.3f} s",
            "ok": idle_cpu <= 0.2,
        }

        # Today's chat, set up after the idle figures so that they stay comparable.
        # Two owners: one user may create at most 30 rooms a minute.
        for owner in ("owner1", "owner2"):
            unread = bench.create_rooms(talk.port, owner, 25, "Unread", members=("many",))
            writer = Http(talk.port, owner, PASSWORD)
            for token in unread:  # unread messages for "many" in every room
                for n in range(3):
                    writer.ocs("POST", f"/chat/{token}", {"message": f"@many unread {n}"})
            writer.close()
        replied = Http(talk.port, "bench", PASSWORD).ocs(
            "POST", f"/chat/{bench_rooms[0]}", {"message": "reply to me", "referenceId": "bench"}
        )["id"]
        login(talk.port, "many")
        loads = {
            "get_room": ("GET", "/room", None),
            "post_chat": ("POST", f"/chat/{bench_rooms[0]}", {"message": "benchmark message"}),
            "post_chat_v2": (
                "POST",
                f"/chat/{bench_rooms[0]}",
                {"message": "@poll and @\"bench\", see this", "replyTo": replied,
                 "referenceId": "b" * 64, "silent": "false"},
            ),
        }
        rates = {key: ([], [], [], [], []) for key in loads}
        failed = 0
        for _ in range(s.pairs):
            for key, (method, path, params) in loads.items():
                server_rate, server_cpu, server_errors = bench.throughput(
                    talk, method, path, params
                )
                base_rate, base_cpu, base_errors = bench.throughput(base, method, path, params)
                failed += server_errors + base_errors
                for values, value in zip(
                    rates[key],
                    (server_rate, base_rate, server_rate / base_rate, server_cpu, base_cpu),
                    strict=True,
                ):
                    values.append(value)
        load = f"{s.client_processes} client processes x {s.connections} keep-alive connections"
        for key, target in (("get_room", 0.5), ("post_chat", 0.35), ("post_chat_v2", 0.3)):
            server_rates, base_rates, ratios, server_cpus, base_cpus = rates[key]
            ratio = statistics.median(ratios)
            rows[key] = {
                "conditions": f"{load}, {s.load_seconds:g} s x {s.pairs} pairs, 64 threads"
                + (", user in 3 rooms" if key == "get_room" else ", durability full")
                + (", 2 mentions and a reply" if key == "post_chat_v2" else ""),
                "measured": f"{ratio:.2f} ({statistics.median(server_rates):.0f} vs "
                f"{statistics.median(base_rates):.0f} req/s; server CPU "
                f"{statistics.median(server_cpus):.2f} vs {statistics.median(base_cpus):.2f} ms/req)"
                + (f", {failed} failed answers" if failed else ""),
                "ok": ratio >= target,
            }
        room_lists(bench, s, talk, base, rows, load)
        unread_list(bench, s, talk, base, rows, load)
        bench.stop(base)

        receivers = DEFAULT_THREADS + 20
        (result,) = bench.clients(
            [
                {
                    "mode": "send_latency",
                    "port": talk.port,
                    "user": "poll",
                    "password": PASSWORD,
                    "tokens": send_rooms,
                    "offsets": [0] * 10,
                    "receivers": receivers,
                    "sends": s.send_sends,
                    "interval": 0.05,
                    "settle": 1.0,
                    "max_seconds": s.send_seconds,
                }
            ],
            timeout=s.send_seconds + 120,
        )
        sent = len(result["latencies_ms"])
        p99 = percentile(result["latencies_ms"], 0.99)
        rows["send"] = {
            "conditions": f"--threads {DEFAULT_THREADS} (reserve {RESERVE}), {receivers} "
            f"receivers in 10 rooms, {sent} sends into those rooms in {result['seconds']:.0f} s",
            "measured": f"p99 {p99:.1f} ms (median {result['median_ms']:.1f} ms, "
            f"max {max(result['latencies_ms']):.0f} ms)"
            + (f", {result['failures']} failed {result['statuses']}" if result["failures"] else ""),
            "ok": p99 <= 50,
        }
        bench.stop(talk)
        time.sleep(0.5)

    # Phase 2: enough threads for every receiver to wait.
    with phase("wake-up", errors, rows, "wake", "rss", "wake_v2", "signaling_wake"):
        talk = bench.start_talk(threads=s.wake_threads)
        talk.wait_ready()
        login(talk.port, "poll")  # once, so the receivers find their password cached
        def wake(**extra):
            """Latencies (ms) and the client's report of one wake-up run."""
            (result,) = bench.clients(
                [
                    {
                        "mode": "wake",
                        "port": talk.port,
                        "user": "poll",
                        "password": PASSWORD,
                        "tokens": wake_rooms,
                        "offsets": [0] * s.wake_rooms,
                        "receivers": s.wake_receivers,
                        "sends": s.wake_sends,
                        "first_settle": 0.5,
                        "settle": 0.1,
                        "server_pid": talk.pid,
                        **extra,
                    }
                ],
                timeout=300,
            )
            latencies = result["latencies_ms"]
            median, p99 = statistics.median(latencies), percentile(latencies, 0.99)
            measured = f"median {median:.2f} ms, p99 {p99:.2f} ms (max {max(latencies):.1f} ms)"
            return result, measured, len(latencies), median <= 3 and p99 <= 20

        chat, measured, samples, ok = wake()
        rows["wake"] = {
            "conditions": f"--threads {s.wake_threads}, {s.wake_receivers} receivers in "
            f"{s.wake_rooms} rooms, {s.wake_sends} sends, {samples} samples",
            "measured": measured,
            "ok": ok,
        }
        waiting_kb = max(chat["rss_kb"])
        modern, measured, samples, ok = wake(modern=True)
        rows["wake_v2"] = {
            "conditions": f"--threads {s.wake_threads}, {s.wake_receivers} receivers in "
            f"{s.wake_rooms} rooms polling lookIntoFuture=1, {s.wake_sends} sends, "
            f"{samples} samples",
            "measured": measured
            + (f", {modern['errors']} failed polls" if modern["errors"] else ""),
            "ok": ok,
        }
        # The same budget for signaling v3: one device (cookie, session) per receiver;
        # each answer takes its messages and refreshes the session in one write.
        (result,) = bench.clients(
            [
                {
                    "mode": "signaling_wake",
                    "port": talk.port,
                    "user": "poll",
                    "password": PASSWORD,
                    "tokens": wake_rooms,
                    "receivers": s.wake_receivers,
                    "sends": s.wake_sends,
                    "first_settle": 1.0,
                    "settle": 0.1,
                }
            ],
            timeout=300,
        )
        signaling = result["latencies_ms"]
        median, p99 = statistics.median(signaling), percentile(signaling, 0.99)
        rows["signaling_wake"] = {
            "conditions": f"--threads {s.wake_threads}, {s.wake_receivers} sessions in "
            f"{s.wake_rooms} rooms, {s.wake_sends} sends, {len(signaling)} samples",
            "measured": f"median {median:.2f} ms, p99 {p99:.2f} ms (max {max(signaling):.1f} ms)"
            + (f", {result['errors']} failed polls" if result["errors"] else ""),
            "ok": median <= 5 and p99 <= 30,
        }
        if idle_kb is not None:
            rows["rss"] = {
                "conditions": f"idle: --threads {DEFAULT_THREADS} after 3 logins; waiting: "
                f"--threads {s.wake_threads}, {s.wake_receivers} receivers",
                "measured": f"{mib(idle_kb):.1f} MiB / {mib(waiting_kb):.1f} MiB",
                "ok": mib(idle_kb) <= 35 and mib(waiting_kb) <= 50,
            }
        bench.stop(talk)

    # Phase 3: a big room and a small one, filled with the server stopped.
    with phase("receive cost", errors, rows, "receive_cost", "receive_cost_v2"):
        bench.fill_room(hist_rooms[0], s.small_room, "hist")
        bench.fill_room(hist_rooms[1], s.big_room, "hist")
        talk = bench.start_talk()
        talk.wait_ready()
        cost = bench.receive_cost(talk.port, hist_rooms[0], hist_rooms[1])
        rows["receive_cost"] = {
            "conditions": f"GET /chat?offset=<count>&timeout=0, {s.big_room:,} vs "
            f"{s.small_room:,} messages, {s.receive_batches} x {s.receive_per_batch} each",
            "measured": f"{cost['ratio']:.2f} ({cost['big_ms']:.2f} ms vs {cost['small_ms']:.2f} ms)",
            "ok": cost["ratio"] <= 1.5,
        }
        cost = bench.receive_cost(talk.port, hist_rooms[0], hist_rooms[1], modern=True)
        rows["receive_cost_v2"] = {
            "conditions": "GET /chat?lookIntoFuture=1&lastKnownMessageId=<newest>&timeout=0 "
            f"(304), {s.big_room:,} vs {s.small_room:,} messages, "
            f"{s.receive_batches} x {s.receive_per_batch} each",
            "measured": f"{cost['ratio']:.2f} ({cost['big_ms']:.2f} ms vs {cost['small_ms']:.2f} ms)",
            "ok": cost["ratio"] <= 1.2,
        }
        bench.stop(talk)

    # Phase 4: the requests a High-Performance Backend's signaling server makes (issue 17).
    with phase("hpb backend", errors, rows, "hpb_auth", "hpb_ping"):
        hpb_backend(bench, s, rows, bench_rooms[0])

    # Phase 5: cold starts on the existing database (no admin bootstrap hashing).
    with phase("start", errors, rows, "start"):
        times = []
        for _ in range(s.starts):
            talk = bench.start_talk(admin=False)
            times.append(talk.wait_ready())
            bench.stop(talk)
        start = statistics.median(times)
        rows["start"] = {
            "conditions": f"spawn (python -m, bytecode cached as installed) -> first 200 "
            f"from /status.php, median of {s.starts}, "
            "existing database with users",
            "measured": f"{start:.3f} s (min {min(times):.3f}, max {max(times):.3f})",
            "ok": start <= 0.5,
        }


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def table(rows: dict) -> list[list[str]]:
    lines = []
    for key, figure, target in FIGURES:
        row = rows.get(key, {"conditions": "", "measured": "not measured", "ok": None})
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[row["ok"]]
        lines.append([figure, row["conditions"], row["measured"], target, verdict])
    return lines


HEADER = ["Figure", "Conditions", "Measured", "Target", "Result"]


def text_table(lines) -> str:
    widths = [max(len(str(row[i])) for row in [HEADER, *lines]) for i in range(len(HEADER))]
    out = []
    for n, row in enumerate([HEADER, *lines]):
        out.append(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def markdown_table(lines) -> str:
    def cells(row):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"

    return "\n".join([cells(HEADER), "|" + "---|" * len(HEADER), *map(cells, lines)])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark talk-server against its targets.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer, smaller")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument(
        "--server",
        metavar="FILE",
        type=Path,
        default=SERVER,
        help="the server script to measure (default: this checkout's talk_server.py)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    rows: dict = {}
    errors: list = []
    try:
        run(settings, rows, errors, args.server.resolve())
    except Exception as error:  # setup failed: still print what there is
        errors.append(f"setup: {error!r}")
        traceback.print_exc()
    lines = table(rows)
    mode = "quick" if args.quick else "full"
    about = (
        f"talk-server benchmark ({mode}), {time.monotonic() - began:.0f} s, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}, "
        f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print(about)
    print(text_table(lines))
    if args.markdown:
        Path(args.markdown).write_text(f"{about}\n\n{markdown_table(lines)}\n", encoding="utf-8")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
