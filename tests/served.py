"""A served talk-server for client libraries (nc-py-api): alice and bob, password "secret"."""

import pytest

import talk_server


@pytest.fixture
def served(tmp_path, password_hash):
    """The base URL of talk-server on a loopback port, for the test's duration."""
    path = tmp_path / "served.db"
    app = talk_server.make_app(path)
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    app.talk.close()
    with talk_server.serve_in_thread(path, threads=4) as url:
        yield url
