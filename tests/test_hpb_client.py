"""The browser client's side of the High-Performance Backend that needs no
browser: the page may open WebSockets to the configured signaling servers,
and to nothing else (tests/test_hpb_e2e.py holds the call itself)."""

import webtest

import talk_server


def page_csp(db_path, **options):
    app = talk_server.make_app(db_path, **options)
    try:
        return webtest.TestApp(app).get("/").headers["Content-Security-Policy"]
    finally:
        app.talk.close()


def test_page_allows_only_its_own_origin_with_internal_signaling(db_path):
    csp = page_csp(db_path)
    assert csp == talk_server.CLIENT_CSP
    assert "connect-src" not in csp  # default-src 'self' covers the API


def test_page_may_open_the_signaling_servers_websockets(db_path):
    csp = page_csp(
        db_path,
        signaling_servers=["https://talk.example.org/standalone-signaling", "http://10.0.0.5:8081/"],
        signaling_secret="s3cret",
    )
    assert csp.startswith(talk_server.CLIENT_CSP)
    directive = next(d.strip() for d in csp.split(";") if d.strip().startswith("connect-src"))
    assert directive == "connect-src 'self' ws://10.0.0.5:8081 wss://talk.example.org"
