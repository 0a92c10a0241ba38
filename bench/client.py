"""Load for bench/run.py: an HTTP helper and the client-process workloads.

run.py starts this file as separate processes, so the load generator's CPU
and memory never count against the server:

    python bench/client.py '{"mode": "throughput", ...}'

It prints one JSON object (the result) on stdout. Standard library only.
"""

import base64
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlencode

HOST = "127.0.0.1"
API = "/ocs/v2.php/apps/spreed/api/v1"
API_V3 = "/ocs/v2.php/apps/spreed/api/v3"
API_V4 = "/ocs/v2.php/apps/spreed/api/v4"
NETWORK_ERRORS = (OSError, http.client.HTTPException)


def auth_headers(user=None, password=None) -> dict:
    headers = {"OCS-APIRequest": "true", "Accept": "application/json"}
    if user is not None:
        raw = f"{user}:{password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    return headers


class Http:
    """One keep-alive connection with one actor's credentials."""

    def __init__(self, port, user=None, password=None, timeout=120):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        self.headers = auth_headers(user, password)
        self.device = None  # the talk_device cookie: one device, as a phone app

    def raw(self, method, path, params=None, prefix=API, body=None, headers=None):
        """Send one request (form `params`, or a ready `body` with its `headers`);
        (status, body bytes). The connection reopens if dropped."""
        headers = {**self.headers, **(headers or {})}
        if self.device:
            headers = {**headers, "Cookie": f"talk_device={self.device}"}
        if body is not None:
            body = body.encode("utf-8")
        elif params is not None:
            if method == "GET":
                path = f"{path}?{urlencode(params)}"
            else:
                body = urlencode(params)
                headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        try:
            self.conn.request(method, prefix + path, body, headers)
            response = self.conn.getresponse()
            cookie = response.getheader("Set-Cookie") or ""
            if cookie.startswith("talk_device="):
                self.device = cookie.split(";", 1)[0].split("=", 1)[1]
            return response.status, response.read()
        except NETWORK_ERRORS:
            self.conn.close()
            raise

    def ocs(self, method, path, params=None, expect=(200, 201), prefix=API):
        """The OCS data of an answer; raises when the status is not expected."""
        status, body = self.raw(method, path, params, prefix)
        if status not in expect:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)["ocs"]["data"]

    def close(self):
        self.conn.close()


def percentile(values, fraction):
    """The nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def server_rss_kb(pid) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# ---------------------------------------------------------------------------
# Throughput: keep-alive connections asking the same request as fast as they can
# ---------------------------------------------------------------------------


def throughput(spec) -> dict:
    """Count answers completed in [start_at, start_at + duration) (wall clock).

    The connections start at once; what completes before start_at warms up.
    """
    start_at, end_at = spec["start_at"], spec["start_at"] + spec["duration"]
    totals = {"ok": 0, "errors": 0, "statuses": {}, "answers": 0}
    lock = threading.Lock()

    def worker():
        client = Http(spec["port"], spec.get("user"), spec.get("password"))
        ok = errors = answers = 0
        statuses = {}
        while True:
            try:
                status, _ = client.raw(
                    spec["method"], spec["path"], spec.get("params"), spec.get("prefix", API),
                    spec.get("body"), spec.get("headers"),
                )
                answers += 1
            except NETWORK_ERRORS:
                status = "network"
            now = time.time()
            if now >= end_at:
                break
            if now >= start_at:
                if status in (200, 201):
                    ok += 1
                else:
                    errors += 1
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        client.close()
        with lock:
            totals["ok"] += ok
            totals["errors"] += errors
            totals["answers"] += answers  # all of them, window or not (for CPU per answer)
            for key, count in statuses.items():
                totals["statuses"][key] = totals["statuses"].get(key, 0) + count

    threads = [threading.Thread(target=worker) for _ in range(spec["connections"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return totals


# ---------------------------------------------------------------------------
# Long-poll receivers: threads that poll one room's chat again and again
# ---------------------------------------------------------------------------


class Receivers:
    """`count` receivers spread over rooms, each on its own connection.

    Each loops: GET /chat/{token}?offset=<what it has>&timeout=30 (with
    `modern`: lookIntoFuture=1&lastKnownMessageId=<newest it has>, as
    today's apps poll), notes when an answer with messages came back
    (perf_counter, this process), and asks again. `polling[i]` is the offset
    (modern: the message id) receiver i is waiting at, None while it is
    between requests.
    """

    def __init__(self, spec):
        self.spec = spec
        self.tokens = spec["tokens"]
        self.count = spec["receivers"]
        self.room_of = [i % len(self.tokens) for i in range(self.count)]
        self.cond = threading.Condition()
        self.polling = [None] * self.count
        self.started = [False] * self.count
        self.arrivals: dict[int, list[float]] = {}  # message id -> return times
        self.errors = 0

    def start(self, offsets):
        for i in range(self.count):
            thread = threading.Thread(target=self._run, args=(i, offsets[self.room_of[i]]))
            thread.daemon = True  # long-polls end when this process exits
            thread.start()

    def _run(self, i, offset):
        spec = self.spec
        client = Http(spec["port"], spec["user"], spec["password"])
        path = f"/chat/{self.tokens[self.room_of[i]]}"
        while True:
            with self.cond:
                self.polling[i] = offset
                self.started[i] = True
                self.cond.notify_all()
            if spec.get("modern"):
                params = {"lookIntoFuture": 1, "lastKnownMessageId": offset, "timeout": 30}
            else:
                params = {"offset": offset, "timeout": 30}
            try:
                status, body = client.raw("GET", path, params)
            except NETWORK_ERRORS:
                status, body = "network", b""
            returned = time.perf_counter()
            messages = json.loads(body)["ocs"]["data"] if status == 200 else []
            fine = status == 200 or (status == 304 and spec.get("modern"))
            with self.cond:
                self.polling[i] = None
                if not fine:
                    self.errors += 1
                for message in messages:
                    self.arrivals.setdefault(message["id"], []).append(returned)
                if spec.get("modern"):
                    offset = max([offset, *(m["id"] for m in messages)])
                else:
                    offset += len(messages)
                self.cond.notify_all()
            if not fine:
                time.sleep(0.05)

    def wait_for(self, predicate, timeout=60.0):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise RuntimeError("receivers did not reach the expected state in time")


def wake(spec) -> dict:
    """Latency from a send's answer to each waiting receiver's answer, in ms.

    Before each send every receiver is waiting at its room's current count
    (and `settle` seconds passed so the server registered the waits); then
    one message goes to one room, rooms in turn.
    """
    receivers = Receivers(spec)
    sender = Http(spec["port"], spec["user"], spec["password"])
    if spec.get("modern"):  # each room's newest message id, where the polls start
        counts = [
            sender.ocs("GET", f"/chat/{token}", {"lookIntoFuture": 0, "limit": 1, "timeout": 0})[
                0
            ]["id"]
            for token in spec["tokens"]
        ]
    else:
        counts = list(spec["offsets"])
    receivers.start(counts)
    per_room = [receivers.room_of.count(r) for r in range(len(counts))]
    latencies, rss = [], []

    def all_waiting():
        return all(
            receivers.polling[i] == counts[receivers.room_of[i]] for i in range(receivers.count)
        )

    for k in range(spec["sends"]):
        room = k % len(counts)
        receivers.wait_for(all_waiting)
        time.sleep(spec["first_settle"] if k == 0 else spec["settle"])
        if k == 0:
            rss.append(server_rss_kb(spec["server_pid"]))
        data = sender.ocs("POST", f"/chat/{spec['tokens'][room]}", {"message": f"wake {k}"})
        sent = time.perf_counter()
        counts[room] = data["id"] if spec.get("modern") else counts[room] + 1
        message_id, expected = data["id"], per_room[room]
        receivers.wait_for(lambda: len(receivers.arrivals.get(message_id, ())) >= expected)  # noqa: B023
        latencies.extend((t - sent) * 1000 for t in receivers.arrivals[message_id])
    receivers.wait_for(all_waiting)
    time.sleep(spec["settle"])
    rss.append(server_rss_kb(spec["server_pid"]))
    return {"latencies_ms": latencies, "rss_kb": rss, "errors": receivers.errors}


def send_latency(spec) -> dict:
    """Round-trip times of POST /chat while more receivers wait than the server has threads."""
    receivers = Receivers(spec)
    receivers.start(spec["offsets"])
    receivers.wait_for(lambda: all(receivers.started))
    time.sleep(spec["settle"])
    sender = Http(spec["port"], spec["user"], spec["password"], timeout=spec["max_seconds"])
    latencies, failures, statuses = [], 0, {}
    deadline = time.monotonic() + spec["max_seconds"]
    for k in range(spec["sends"]):
        if time.monotonic() >= deadline:
            break
        token = spec["tokens"][k % len(spec["tokens"])]
        began = time.perf_counter()
        try:
            status, _ = sender.raw("POST", f"/chat/{token}", {"message": f"send {k}"})
        except NETWORK_ERRORS:
            status = "network"
        latencies.append((time.perf_counter() - began) * 1000)
        if status != 201:
            failures += 1
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(spec["interval"])
    return {
        "latencies_ms": latencies,
        "failures": failures,
        "statuses": statuses,
        "receiver_errors": receivers.errors,
        "median_ms": statistics.median(latencies),
        "seconds": spec["max_seconds"] - (deadline - time.monotonic()),
    }


def signaling_wake(spec) -> dict:
    """Latency from a signaling v3 send's answer to its recipient's waiting poll answer, in ms.

    Each receiver is one device (its own cookie and session) polling
    GET /api/v3/signaling/{token}; one sender device holds a session in every
    room. Before each send every receiver has been waiting `settle` seconds;
    then one offer goes to one receiver, receivers in turn.
    """
    tokens, count, port = spec["tokens"], spec["receivers"], spec["port"]
    sender = Http(port, spec["user"], spec["password"])
    senders = [
        sender.ocs("POST", f"/room/{t}/participants/active", {}, prefix=API_V4)["sessionId"]
        for t in tokens
    ]
    cond = threading.Condition()
    sessions, polling, arrivals = [None] * count, [False] * count, {}
    errors = 0

    def run(i):
        nonlocal errors
        client = Http(port, spec["user"], spec["password"])
        path = f"/signaling/{tokens[i % len(tokens)]}"
        joined = client.ocs("POST", f"/room/{tokens[i % len(tokens)]}/participants/active", {},
                            prefix=API_V4)
        with cond:
            sessions[i] = joined["sessionId"]
        while True:
            with cond:
                polling[i] = True
                cond.notify_all()
            try:
                status, body = client.raw("GET", path, prefix=API_V3)
            except NETWORK_ERRORS:
                status, body = "network", b""
            returned = time.perf_counter()
            items = json.loads(body)["ocs"]["data"] if status == 200 else []
            with cond:
                polling[i] = False
                errors += status != 200
                for item in items[:-1]:
                    arrivals[json.loads(item["data"])["payload"]["sdp"]] = returned
                cond.notify_all()
            if status != 200:
                time.sleep(0.05)

    for i in range(count):
        threading.Thread(target=run, args=(i,), daemon=True).start()

    def wait_for(predicate, timeout=60.0):
        with cond:
            if not cond.wait_for(predicate, timeout):
                raise RuntimeError("receivers did not reach the expected state in time")

    wait_for(lambda: all(sessions))
    latencies = []
    for k in range(spec["sends"]):
        i = k % count
        wait_for(lambda: all(polling))
        time.sleep(spec["first_settle"] if k == 0 else spec["settle"])
        fn = {"to": sessions[i], "type": "offer", "roomType": "video",
              "payload": {"type": "offer", "sdp": f"wake {k}"}}
        item = {"ev": "message", "fn": json.dumps(fn), "sessionId": senders[i % len(tokens)]}
        sender.ocs("POST", f"/signaling/{tokens[i % len(tokens)]}",
                   {"messages": json.dumps([item])}, prefix=API_V3)
        sent = time.perf_counter()
        wait_for(lambda: f"wake {k}" in arrivals)  # noqa: B023
        latencies.append((arrivals[f"wake {k}"] - sent) * 1000)
    return {"latencies_ms": latencies, "errors": errors}


MODES = {
    "throughput": throughput,
    "wake": wake,
    "send_latency": send_latency,
    "signaling_wake": signaling_wake,
}


def main(argv=None):
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    if spec.get("handshake"):
        # Tell run.py we are up, then learn when the window opens: a slow
        # process start must not eat into the measured window.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        spec["start_at"] = float(sys.stdin.readline())
    result = MODES[spec["mode"]](spec)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
