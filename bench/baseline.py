"""The benchmark's baseline: a bare Bottle app answering one fixed OCS envelope.

It runs under the very Waitress settings talk-server uses (it calls
talk_server.create_server), so a ratio to it measures what talk-server adds
on top of Bottle and Waitress: authentication, SQLite, JSON shapes.

    python bench/baseline.py --port 8081 --threads 64
"""

import argparse
import json
import sys
import types
from pathlib import Path

import bottle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import talk_server  # noqa: E402  (the checkout's module, not an installed one)

ENVELOPE = json.dumps(
    {"ocs": {"meta": {"status": "ok", "statuscode": 200, "message": "OK"}, "data": []}},
    separators=(",", ":"),
).encode()


def make_app(threads: int) -> bottle.Bottle:
    """Every GET or POST path answers the same envelope."""
    app = bottle.Bottle(catchall=True)

    def answer(path=""):
        bottle.response.content_type = "application/json; charset=utf-8"
        return ENVELOPE

    app.route("/", ["GET", "POST"], answer)
    app.route("/<path:path>", ["GET", "POST"], answer)
    # create_server reads the body limit and the long-poll budget from app.talk.
    budget = types.SimpleNamespace(max_waiting=threads - talk_server.DEFAULT_RESERVE)
    app.talk = types.SimpleNamespace(max_body=talk_server.DEFAULT_MAX_BODY, notifier=budget)
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=talk_server.DEFAULT_THREADS)
    args = parser.parse_args(argv)
    server = talk_server.create_server(make_app(args.threads), args.host, args.port, args.threads)
    print(f"baseline on http://{args.host}:{server.effective_port}", flush=True)
    server.run()


if __name__ == "__main__":
    main()
