"""A served talk-server for client libraries (nc-py-api): alice and bob, password "secret"."""

import contextlib

import pytest

import talk_server


@contextlib.contextmanager
def serve_users(tmp_path, password_hash, **options):
    """talk-server on a loopback port with alice and bob; yields its base URL."""
    path = tmp_path / "served.db"
    app = talk_server.make_app(path)
    with app.talk.db.write() as db:
        for user_id in ("alice", "bob"):
            talk_server.create_user(db, user_id, password_hash, user_id.capitalize())
    app.talk.close()
    with talk_server.serve_in_thread(path, **options) as url:
        yield url


@pytest.fixture
def served(tmp_path, password_hash):
    """The base URL of talk-server on a loopback port, for the test's duration."""
    with serve_users(tmp_path, password_hash, threads=4) as url:
        yield url
