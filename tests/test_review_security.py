"""Security of the review page: token login (also on loopback with require_token), server-side sessions that
logout ends, static files behind the login, CSRF on every POST, a body limit counted on the bytes received,
binding before announcing, image routes that only serve what the ledger knows, input validation, and the
helpers in review/security.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import socket
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from magic_align.ledger import SampleRow
from magic_align.review import app as review_app
from magic_align.review.app import ReviewPortError, bind_listener, create_app, run_review
from magic_align.review.security import (
    MAX_FORM_BYTES,
    SESSION_COOKIE,
    InputError,
    Session,
    SessionSigner,
    SessionStore,
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
    session = Session.fresh()
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
    forged = SessionSigner("guessed-secret").dumps(Session.fresh())
    client.cookies.set(SESSION_COOKIE, forged)
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_without_csrf_is_refused(locked):
    client, ledger = locked
    client.get("/login")
    response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 303


@pytest.fixture
def served_apps(monkeypatch):
    """Stands in for serving: `run_review` binds for real, then hands (app, listener) here instead of uvicorn.
    A wildcard host is bound on 127.0.0.1 instead, so no test listens beyond loopback."""
    served: list[dict] = []

    def fake_serve(app, listener):
        served.append({"app": app, "address": listener.getsockname()})

    real_bind = review_app.bind_listener
    monkeypatch.setattr(review_app, "_serve", fake_serve)
    monkeypatch.setattr(review_app, "bind_listener", lambda host, port: real_bind("127.0.0.1" if host == "0.0.0.0" else host, port))
    return served


def announced_token(lines: list[str]) -> str | None:
    return next((line.split(": ", 1)[1] for line in lines if line.startswith("token: ")), None)


def test_run_review_on_a_public_address_prints_a_token_and_requires_it(review_run, served_apps):
    config = review_run[0]
    lines: list[str] = []
    run_review(config, host="0.0.0.0", port=0, reviewer="Dr A", judge_id="judge:a", announce=lines.append)
    token = announced_token(lines)
    assert token is not None and len(token) >= 40
    with TestClient(served_apps[-1]["app"]) as client:
        assert client.get("/", follow_redirects=False).status_code == 303
        assert log_in(client, token).status_code == 303
        assert client.get("/").status_code == 200

    lines.clear()
    run_review(config, port=0, reviewer="Dr A", judge_id="judge:a", announce=lines.append)
    assert served_apps[-1]["address"][0] == "127.0.0.1" and announced_token(lines) is None
    with TestClient(served_apps[-1]["app"], base_url="http://127.0.0.1:8765") as client:
        assert client.get("/").status_code == 200  # loopback: no token
    with TestClient(served_apps[-1]["app"], base_url="http://attacker.example") as client:
        assert client.get("/").status_code == 400  # DNS rebinding: a foreign Host header is refused


@pytest.mark.parametrize("how", ["argument", "config"])
def test_require_token_makes_loopback_ask_for_the_token(review_run, served_apps, how):
    config = review_run[0]
    if how == "config":
        config = config.model_copy(update={"review": config.review.model_copy(update={"require_token": True})})
    lines: list[str] = []
    run_review(config, port=0, reviewer="Dr A", judge_id="judge:a", require_token=True if how == "argument" else None,
               announce=lines.append)
    token = announced_token(lines)
    assert token is not None and any("token required" in line for line in lines)
    assert served_apps[-1]["address"][0] == "127.0.0.1"
    with TestClient(served_apps[-1]["app"], base_url="http://127.0.0.1:8765") as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/login"
        assert client.get("/static/review.js").status_code == 401
        page = client.get("/login")
        response = client.post("/review/r0-u000-k0", data={"csrf_token": csrf_of(page.text), "item": ["1"]})
        assert response.status_code == 401
        assert log_in(client, "wrong").status_code == 401
        assert log_in(client, token).status_code == 303
        assert client.get("/").status_code == 200
    assert review_run[1].reviews() == []


def test_the_address_is_printed_only_once_the_port_answers(review_run, served_apps):
    config = review_run[0]
    answered: list[bool] = []

    def announce(line: str) -> None:
        if answered:
            return
        port = int(re.search(r":(\d+)/", line).group(1))  # the first line names the address
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            answered.append(False)
        else:
            answered.append(True)

    run_review(config, port=0, reviewer="Dr A", judge_id="judge:a", announce=announce)
    assert answered == [True]
    assert served_apps[-1]["address"][1] != 0  # port 0 picked a free port, and that is the one announced


def test_a_taken_port_is_one_clear_error_and_nothing_is_announced(review_run, served_apps):
    config = review_run[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        lines: list[str] = []
        with pytest.raises(ReviewPortError, match=f"cannot listen on 127.0.0.1:{port}: the port is already in use"):
            run_review(config, port=port, reviewer="Dr A", judge_id="judge:a", announce=lines.append)
        assert lines == [] and served_apps == []

        from typer.testing import CliRunner

        from magic_align.cli import app as cli

        result = CliRunner().invoke(cli, ["review", str(config.run_dir / "config.toml"), "--port", str(port),
                                          "--judge", "judge:a"])
    assert result.exit_code == 2
    assert "http://" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in result.output


def test_bind_listener_names_a_bad_address():
    with pytest.raises(ReviewPortError, match="cannot listen on 192.0.2.1:"):
        bind_listener("192.0.2.1", 0)  # TEST-NET-1: never an address of this machine


# ----------------------------------------------------------------------------------------------- sessions
def replay(app, cookie: str, method: str, path: str, **kwargs):
    """One request carrying exactly `cookie` as the session cookie (a fresh client: no cookie jar in between)."""
    return TestClient(app, cookies={SESSION_COOKIE: cookie}).request(method, path, follow_redirects=False, **kwargs)


def test_logout_ends_the_session_for_every_copy_of_its_cookie(locked):
    client, ledger = locked
    assert log_in(client).status_code == 303
    page = client.get("/review/r0-u000-k0")
    form = {"csrf_token": csrf_of(page.text), "checklist_version": VERSION.search(page.text).group(1), "item": ["1"]}
    copied = client.cookies.get(SESSION_COOKIE)
    assert replay(client.app, copied, "GET", "/").status_code == 200  # while the session lives, a copy works
    client.post("/logout", data={"csrf_token": form["csrf_token"]})
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    # after logout the copied cookie is refused everywhere, and cannot save a review
    for path in ("/", "/review/r0-u000-k0", "/image/r0-u000-k0", "/gallery/alpha"):
        response = replay(client.app, copied, "GET", path)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    assert replay(client.app, copied, "GET", "/static/review.js").status_code == 401
    assert replay(client.app, copied, "POST", "/review/r0-u000-k0", data=form).status_code == 401
    assert ledger.reviews() == []


def test_logout_ends_a_named_session_on_loopback(review_run):
    config, ledger, _, _ = review_run
    with TestClient(create_app(config, judge_id="judge:a")) as client:  # no token, name asked at login
        login = client.get("/login")
        client.post("/login", data={"csrf_token": csrf_of(login.text), "reviewer": "Dr Copy"})
        page = client.get("/review/r0-u000-k0")
        form = {"csrf_token": csrf_of(page.text), "checklist_version": VERSION.search(page.text).group(1), "item": ["2"]}
        copied = client.cookies.get(SESSION_COOKIE)
        assert "Dr Copy" in replay(client.app, copied, "GET", "/").text
        client.post("/logout", data={"csrf_token": form["csrf_token"]})
        assert replay(client.app, copied, "GET", "/").headers["location"] == "/login"
        assert replay(client.app, copied, "POST", "/review/r0-u000-k0", data=form).status_code == 401
    assert ledger.reviews() == []


def test_session_store_expires_closes_and_stays_bounded():
    now = [1000.0]
    store = SessionStore(max_age_s=60, max_sessions=3, clock=lambda: now[0])
    store.open("a", "Dr A")
    assert store.get("a").reviewer == "Dr A"
    now[0] += 59
    assert store.get("a") is not None
    now[0] += 1
    assert store.get("a") is None  # expired on the server, whatever the cookie says
    store.open("b", None)
    store.close("b")
    assert store.get("b") is None
    for sid in ("c", "d", "e", "f"):
        store.open(sid, sid)
    assert len(store) == 3 and store.get("c") is None and store.get("f").reviewer == "f"  # the oldest went


# --------------------------------------------------------------------------------------------- static files
def test_static_files_are_behind_the_token_login(locked):
    client, ledger = locked
    for path in ("/static/review.js", "/static/review.css", "/static/", "/%73tatic/review.js"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert b"addEventListener" not in response.content and b"--accent" not in response.content
    login = client.get("/login")
    assert "/static/" not in login.text
    # the login page brings its own style, allowed by its hash and nothing else
    style = re.search(r"<style>(.*?)</style>", login.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in login.headers["content-security-policy"]
    log_in(client)
    assert client.get("/static/review.js").status_code == 200
    page = client.get("/")
    assert '<link rel="stylesheet" href="/static/review.css">' in page.text and "<style>" not in page.text
    assert "style-src 'self'" in page.headers["content-security-policy"]


def test_static_files_need_no_login_where_there_is_none(open_app):
    client, ledger, _ = open_app
    assert client.get("/static/review.js").status_code == 200


# ------------------------------------------------------------------------------------------- body size
def post_stream(app, path: str, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, bytes, int]:
    """POST `chunks` to the ASGI app as a streamed body (one receive() per chunk, as a server hands over a
    chunked request); returns (status, response body, how many chunks the app read)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        await asyncio.Event().wait()  # nothing more: a client that stays connected

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read


FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize("declared", [None, "100"], ids=["chunked", "lying-content-length"])
def test_body_limit_counts_the_bytes_received(open_app, declared):
    client, ledger, _ = open_app
    chunk = b"x" * 4096
    chunks = [b"note="] + [chunk] * 100  # 400 KiB, far over the limit
    headers = {**FORM, "transfer-encoding": "chunked"} if declared is None else {**FORM, "content-length": declared}
    status, body, read = post_stream(client.app, "/review/r0-u000-k0", chunks, headers)
    assert status == 413 and b"larger than 64 KiB" in body
    assert read <= MAX_FORM_BYTES // len(chunk) + 2  # reading stopped at the limit, not at the end
    assert ledger.reviews() == []


def test_body_limit_passes_a_streamed_form_under_it(open_app):
    client, ledger, _ = open_app
    page = client.get("/review/r0-u000-k0")
    form = f"csrf_token={csrf_of(page.text)}&checklist_version={VERSION.search(page.text).group(1)}&item=1&note="
    cookie = f"{SESSION_COOKIE}={client.cookies.get(SESSION_COOKIE)}"
    chunks = [form.encode()] + [b"y" * 100] * 5
    status, _, read = post_stream(client.app, "/review/r0-u000-k0", chunks,
                                  {**FORM, "transfer-encoding": "chunked", "cookie": cookie})
    assert status == 303 and read == len(chunks)
    assert ledger.reviews()[0].note == "y" * 500


@contextlib.contextmanager
def real_server(app):
    """`app` under uvicorn on a free loopback port, in a thread; yields the port."""
    import uvicorn

    listener = bind_listener("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def test_chunked_request_over_the_limit_is_refused_by_the_real_server(open_app):
    client, ledger, _ = open_app
    body = b"note=" + b"z" * (MAX_FORM_BYTES + 1024)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192]) for i in range(0, len(body), 8192))
    request = (b"POST /review/r0-u000-k0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked + b"0\r\n\r\n")
    with real_server(client.app) as port, socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)  # one write: the server has it all before it answers
        answer = b""
        while b"\r\n\r\n" not in answer or b"</html>" not in answer:
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"larger than 64 KiB" in answer
    assert ledger.reviews() == []


def test_httpx_chunked_upload_is_refused(open_app):
    """The same through httpx's ASGI transport, whose generator body goes out chunked, piece by piece."""
    client, ledger, _ = open_app
    pieces = []

    async def body():
        for _ in range(40):
            pieces.append(1)
            yield b"note=" if len(pieces) == 1 else b"w" * 4096

    async def post():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.post("/review/r0-u000-k0", content=body(), headers=FORM)

    response = asyncio.run(post())
    assert response.status_code == 413 and len(pieces) < 40
    assert ledger.reviews() == []


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


def test_notes_and_judge_rationales_are_shown_escaped(review_run):
    from magic_align.judges.base import Verdict

    config, ledger, samples, checklists = review_run
    sample = next(s for s in samples if s.sample_id == "r0-u000-k0")
    checklist = checklists[sample.target_label]
    attack = '<script>alert(1)</script><img src=x onerror=alert(2)>"\'&'
    ledger.put_verdict(sample.image_sha256, "judge:x", checklist.version, "p1",
                       Verdict(items=[1, 0, 1, 0, 1], rationales=[attack] * 5, raw="x"), checklist.condition)
    with TestClient(create_app(config, reviewer="Dr A", judge_id="judge:a")) as client:
        page = client.get("/review/r0-u000-k0")
        version = VERSION.search(page.text).group(1)
        saved = client.post("/review/r0-u000-k0", data={"checklist_version": version, "item": ["1"], "note": attack,
                                                       "csrf_token": csrf_of(page.text)}, follow_redirects=False)
        assert saved.status_code == 303 and ledger.reviews()[0].note == attack
        shown = client.get("/review/r0-u000-k0").text
    assert "<script>alert(1)" not in shown and "<img src=x" not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown  # the rationale and the note, as text
    assert 'value="&lt;script&gt;' in shown  # the note in the form field cannot close the attribute
