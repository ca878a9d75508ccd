"""Security of the review page: token login, session cookie, CSRF on every POST, image routes that only serve
what the ledger knows, input validation, and the helpers in review/security.py."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from magic_align.ledger import SampleRow
from magic_align.review import app as review_app
from magic_align.review.app import create_app, run_review
from magic_align.review.security import (
    SESSION_COOKIE,
    InputError,
    Session,
    SessionSigner,
    check_note,
    check_reviewer,
    check_sample_id,
    is_loopback,
    parse_checked_items,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
VERSION = re.compile(r'name="checklist_version" value="([^"]+)"')
TOKEN = "correct-horse-battery-staple-0123456789abcdef"


def csrf_of(page: str) -> str:
    return CSRF.search(page).group(1)


@pytest.fixture
def locked(review_run):
    """An app that needs the token (as when bound to a non-loopback host)."""
    config, ledger, samples, checklists = review_run
    with TestClient(create_app(config, token=TOKEN, reviewer="Dr A", judge_id="judge:a")) as client:
        yield client, ledger


@pytest.fixture
def open_app(review_run):
    config, ledger, samples, checklists = review_run
    with TestClient(create_app(config, reviewer="Dr A", judge_id="judge:a")) as client:
        yield client, ledger, review_run


def log_in(client: TestClient, token: str = TOKEN):
    login = client.get("/login")
    return client.post("/login", data={"csrf_token": csrf_of(login.text), "token": token}, follow_redirects=False)


# ----------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("review.example.org", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_parse_checked_items_rules():
    assert parse_checked_items(["1", "3"], 5) == [1, 0, 1, 0, 0]
    assert parse_checked_items([], 3) == [0, 0, 0]
    for values, message in ((["6"], "does not exist"), (["0"], "does not exist"), (["1", "1"], "sent twice"),
                            (["-1"], "not valid"), (["1.0"], "not valid"), (["x"], "not valid"), (["0001"], "not valid")):
        with pytest.raises(InputError, match=message):
            parse_checked_items(values, 5)


def test_note_reviewer_and_sample_id_rules():
    assert check_note("  fine\r\nline two ") == "fine\nline two"
    with pytest.raises(InputError, match="at most 2000"):
        check_note("x" * 2001)
    with pytest.raises(InputError, match="control characters"):
        check_note("bell \x07")
    assert check_reviewer(" Dr O'Neil-Smith ") == "Dr O'Neil-Smith"
    for name in ("", " ", "<b>", "a" * 65, "../x"):
        with pytest.raises(InputError):
            check_reviewer(name)
    assert check_sample_id("r0-u0007-k1") == "r0-u0007-k1"
    for value in ("../ledger.sqlite", "a/b", "a\\b", "..", "", ".hidden", "x" * 201, "r0 u1"):
        with pytest.raises(InputError):
            check_sample_id(value)


def test_session_signer_refuses_tampered_and_foreign_cookies():
    signer = SessionSigner("secret-one")
    session = Session.fresh(authenticated=True, reviewer="Dr A")
    value = signer.dumps(session)
    assert signer.loads(value) == session
    assert signer.loads(value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]) is None
    assert SessionSigner("secret-two").loads(value) is None
    assert signer.loads("") is None and signer.loads("not-a-cookie") is None
    assert SessionSigner("secret-one", max_age_s=-1).loads(value) is None  # expired


# ------------------------------------------------------------------------------------------------ token
def test_without_token_nothing_is_served(locked):
    client, ledger = locked
    for path in ("/", "/review/r0-u000-k0", "/gallery/alpha", "/image/r0-u000-k0"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    login = client.get("/login")
    assert login.status_code == 200 and 'name="token"' in login.text
    response = client.post("/review/r0-u000-k0", data={"csrf_token": csrf_of(login.text), "item": ["1"]})
    assert response.status_code == 401
    assert ledger.reviews() == []


@pytest.mark.parametrize("token", ["", "wrong", TOKEN[:-1], TOKEN + "x"])
def test_wrong_or_missing_token_is_refused(locked, token):
    client, ledger = locked
    response = log_in(client, token)
    assert response.status_code == 401 and "wrong or missing token" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.get("/image/r0-u000-k0", follow_redirects=False).status_code == 303


def test_right_token_gives_a_fresh_session(locked):
    client, ledger = locked
    before = client.cookies.get(SESSION_COOKIE)
    login_page_csrf = csrf_of(client.get("/login").text)
    response = log_in(client)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert client.cookies.get(SESSION_COOKIE) != before
    page = client.get("/review/r0-u000-k0")
    assert page.status_code == 200
    assert csrf_of(page.text) != login_page_csrf  # a new CSRF token after login
    assert client.get("/image/r0-u000-k0").headers["content-type"] == "image/png"
    # logging out drops the session's rights
    client.post("/logout", data={"csrf_token": csrf_of(page.text)})
    assert client.get("/", follow_redirects=False).status_code == 303


def test_forged_cookie_is_ignored(locked):
    client, ledger = locked
    forged = SessionSigner("guessed-secret").dumps(Session.fresh(authenticated=True, reviewer="mallory"))
    client.cookies.set(SESSION_COOKIE, forged)
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_without_csrf_is_refused(locked):
    client, ledger = locked
    client.get("/login")
    response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 303


def test_run_review_on_a_public_address_prints_a_token_and_requires_it(review_run, monkeypatch):
    config = review_run[0]
    served = {}

    def fake_run(app, host, port, log_level):  # stands in for uvicorn.run: keep the app, serve nothing
        served.update(app=app, host=host, port=port)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    lines: list[str] = []
    run_review(config, host="0.0.0.0", port=9999, reviewer="Dr A", judge_id="judge:a", announce=lines.append)
    token = next(line.split(": ", 1)[1] for line in lines if line.startswith("token: "))
    assert len(token) >= 40 and served["host"] == "0.0.0.0" and served["port"] == 9999
    with TestClient(served["app"]) as client:
        assert client.get("/", follow_redirects=False).status_code == 303
        assert log_in(client, token).status_code == 303
        assert client.get("/").status_code == 200

    lines.clear()
    run_review(config, reviewer="Dr A", judge_id="judge:a", announce=lines.append)
    assert served["host"] == "127.0.0.1" and not any(line.startswith("token") for line in lines)
    with TestClient(served["app"], base_url="http://127.0.0.1:8765") as client:
        assert client.get("/").status_code == 200  # loopback: no token
    with TestClient(served["app"], base_url="http://attacker.example") as client:
        assert client.get("/").status_code == 400  # DNS rebinding: a foreign Host header is refused


# ------------------------------------------------------------------------------------------------- CSRF
def test_post_without_or_with_wrong_csrf_is_refused(open_app):
    client, ledger, _ = open_app
    page = client.get("/review/r0-u000-k0")
    version = VERSION.search(page.text).group(1)
    for data in (
        {"checklist_version": version, "item": ["1"]},
        {"checklist_version": version, "item": ["1"], "csrf_token": ""},
        {"checklist_version": version, "item": ["1"], "csrf_token": "forged"},
    ):
        response = client.post("/review/r0-u000-k0", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    # a CSRF token from another session does not work either
    with TestClient(client.app) as other:
        foreign = csrf_of(other.get("/review/r0-u000-k0").text)
    response = client.post("/review/r0-u000-k0", data={"checklist_version": version, "item": ["1"], "csrf_token": foreign})
    assert response.status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert ledger.reviews() == []
    ok = client.post("/review/r0-u000-k0", data={"checklist_version": version, "item": ["1"], "csrf_token": csrf_of(page.text)})
    assert ok.status_code == 200 and len(ledger.reviews()) == 1


def test_session_cookie_flags_and_security_headers(open_app):
    client, ledger, _ = open_app
    response = client.get("/")
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


# ----------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "path",
    ["/image/..%2Fledger.sqlite", "/image/..%2F..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e", "/image/%2E%2E%2Fledger.sqlite",
     "/image/..%5Cledger.sqlite", "/image/samples%2Fround-0%2Fimages%2F0000.png", "/static/..%2Fapp.py",
     "/static/%2e%2e/%2e%2e/ledger.py"],
)
def test_path_traversal_is_refused(open_app, path):
    client, ledger, _ = open_app
    response = client.get(path)
    assert response.status_code in (400, 404)
    assert b"SQLite" not in response.content and b"root:" not in response.content and b"import" not in response.content


def test_unknown_sample_is_404_everywhere(open_app):
    client, ledger, _ = open_app
    page = client.get("/review/r0-u000-k0")
    for response in (
        client.get("/image/r9-nope"),
        client.get("/review/r9-nope"),
        client.post("/review/r9-nope", data={"csrf_token": csrf_of(page.text), "checklist_version": "x"}),
        client.get("/gallery/gamma"),
    ):
        assert response.status_code == 404
        assert 'id="error-message"' in response.text  # a readable error page, not a traceback
    assert "has no sample &#39;r9-nope&#39;" in client.get("/image/r9-nope").text


def test_image_only_from_inside_the_run_and_unchanged(open_app):
    client, ledger, (config, _, samples, _) = open_app
    outside = SampleRow("evil-1", 0, "u9", 0, "../../../etc/passwd", "0" * 64, "s", "alpha", "alpha", "p", 0)
    not_image = SampleRow("evil-2", 0, "u9", 1, "ledger.sqlite", "0" * 64, "s", "alpha", "alpha", "p", 0)
    ledger.add_samples([outside, not_image])
    assert client.get("/image/evil-1").status_code == 404
    assert client.get("/image/evil-2").status_code == 404
    # an image rewritten on disk after sampling is not the one the ledger knows
    target = config.run_dir / samples[0].image_path
    target.write_bytes(target.read_bytes() + b"\0")
    response = client.get(f"/image/{samples[0].sample_id}")
    assert response.status_code == 409 and "changed on disk" in response.text
    assert client.get(f"/image/{samples[1].sample_id}").status_code == 200


# --------------------------------------------------------------------------------------------- input
def test_invalid_review_input_is_refused_and_nothing_stored(open_app):
    client, ledger, _ = open_app
    page = client.get("/review/r0-u000-k0")
    base = {"csrf_token": csrf_of(page.text), "checklist_version": VERSION.search(page.text).group(1)}
    cases = [
        ({"item": ["6"]}, 400, "does not exist"),
        ({"item": ["1", "1"]}, 400, "sent twice"),
        ({"item": ["one"]}, 400, "not valid"),
        ({"item": ["1", "2", "3", "4", "5", "1"]}, 400, "6 items sent"),
        ({"note": "x" * 2001}, 400, "at most 2000"),
        ({"note": "a\x00b"}, 400, "control characters"),
        ({"checklist_version": "stale"}, 409, "changed since this page was loaded"),
    ]
    for extra, status, message in cases:
        response = client.post("/review/r0-u000-k0", data={**base, **extra})
        assert response.status_code == status, extra
        assert message in response.text, extra
    response = client.post("/review/r0-u000-k0", data=base, files={"note": ("note.txt", b"hi", "text/plain")})
    assert response.status_code == 400
    response = client.post("/review/r0-u000-k0", data={**base, "note": "x" * 70_000})
    assert response.status_code == 413 and "larger than 64 KiB" in response.text
    assert ledger.reviews() == []


def test_unexpected_errors_show_a_page_without_traceback(open_app, monkeypatch):
    client, ledger, _ = open_app

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(review_app, "collect_views", broken)
    with TestClient(client.app, raise_server_exceptions=False) as other:
        response = other.get("/")
    assert response.status_code == 500
    assert "internal error (RuntimeError)" in response.text and "secret internals" not in response.text
