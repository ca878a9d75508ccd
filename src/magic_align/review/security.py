"""What keeps the review page safe to run: who may use it, which requests are genuine, which input is valid.

- **Loopback by default.** `magic review` binds 127.0.0.1. Bound to any other address, or with
  `--require-token` (`review.require_token`) on loopback too, the page asks for a random token (`new_token`,
  printed at start) before anything else, its static files included; the token is exchanged once for a
  session.
- **Sessions live on the server.** The cookie is signed (itsdangerous, a secret drawn when the app starts),
  HttpOnly, SameSite=Strict, and carries only a random session id and the session's CSRF token. Who is logged
  in, under which name and until when is kept in the app's `SessionStore`; logging out deletes the entry, so a
  copied cookie is worthless afterwards, and a restart logs everybody out. A login issues a fresh session (new
  id, new CSRF token), so a session planted before the login is useless.
- **CSRF.** Every POST, login included, carries the session's CSRF token in a hidden field and is refused
  (403) without it or with another one. This holds on loopback too: any web page the reviewer visits could
  otherwise post to 127.0.0.1.
- **Body size.** A request body may bring at most `MAX_FORM_BYTES`, counted as it arrives (`BodyLimit`), so
  chunked bodies and lying `Content-Length` headers are refused (413) like honest big ones.
- **Input.** Sample ids, condition names, item values, notes and reviewer names are checked here against
  explicit rules (`InputError` says what was expected); images are found by sample id in the ledger, never by
  a path from the request.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.exceptions import HTTPException as StarletteHTTPException

from magic_align.errors import MagicError

SESSION_COOKIE = "magic_review_session"
SESSION_MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 1000
MAX_FORM_BYTES = 64 * 1024  # a review form is a few kilobytes
CSRF_FIELD = "csrf_token"
MAX_NOTE_CHARS = 2000
MAX_REVIEWER_CHARS = 64
# Sample ids are chosen by the sampler ("r0-u0007-k1"); these characters cover them and exclude every path
# separator, so an id can never name a file.
SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:~+-]{0,199}$")
REVIEWER_PATTERN = re.compile(r"^[\w][\w .@'-]{0,63}$")
# Control characters other than tab and newline have no place in a note; they are refused, not dropped.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# Sent with every response. The pages use no inline script or style, so the policy can forbid both.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class InputError(MagicError, ValueError):
    """A request field that does not follow its rule; the message names the field and what was expected."""


# ------------------------------------------------------------------------------------------- addresses
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and the name localhost."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything, so it is not treated as loopback


def new_token() -> str:
    """A login token: 32 random bytes, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the time a wrong guess takes says nothing about the right one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# --------------------------------------------------------------------------------------------- session
@dataclass(frozen=True)
class Session:
    """What the cookie carries: a random session id and that session's CSRF token, nothing else. Whether the
    session is logged in is never read from the cookie, only from the server's `SessionStore`."""

    sid: str
    csrf: str

    @classmethod
    def fresh(cls) -> "Session":
        return cls(secrets.token_urlsafe(16), secrets.token_urlsafe(32))


class SessionSigner:
    """Turns a `Session` into a signed cookie value and back; a forged, altered or expired cookie reads as None."""

    def __init__(self, secret: str | None = None, max_age_s: int = SESSION_MAX_AGE_S):
        self._serializer = URLSafeTimedSerializer(secret or secrets.token_urlsafe(32), salt="magic-review-session")
        self.max_age_s = max_age_s

    def dumps(self, session: Session) -> str:
        return self._serializer.dumps(asdict(session))

    def loads(self, value: str | None) -> Session | None:
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=self.max_age_s)
        except BadSignature:  # SignatureExpired is a BadSignature too
            return None
        if not isinstance(data, dict) or set(data) != {"sid", "csrf"}:
            return None
        if not isinstance(data["sid"], str) or not isinstance(data["csrf"], str):
            return None
        return Session(data["sid"], data["csrf"])


@dataclass(frozen=True)
class Login:
    """A logged-in session as the server knows it: the reviewer's name (None when the app fixes the name) and
    when the login ends (in the store's clock)."""

    reviewer: str | None
    expires_at: float


class SessionStore:
    """The logged-in sessions, by session id, in memory. A session id missing here is not logged in, whatever
    its cookie says: logout (`close`) and expiry therefore end a session for every copy of its cookie.

    At most `max_sessions` logins are kept; beyond that the oldest is dropped (its reviewer logs in again), so
    repeated logins cannot grow the server's memory without bound."""

    def __init__(self, max_age_s: int = SESSION_MAX_AGE_S, max_sessions: int = MAX_SESSIONS, clock=time.monotonic):
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._logins: dict[str, Login] = {}  # insertion order = login order, for dropping the oldest
        self._lock = threading.Lock()

    def open(self, sid: str, reviewer: str | None) -> Login:
        login = Login(reviewer, self._clock() + self.max_age_s)
        with self._lock:
            self._drop_expired()
            self._logins.pop(sid, None)
            while len(self._logins) >= self.max_sessions:
                del self._logins[next(iter(self._logins))]
            self._logins[sid] = login
        return login

    def get(self, sid: str) -> Login | None:
        with self._lock:
            login = self._logins.get(sid)
            if login is not None and login.expires_at <= self._clock():
                del self._logins[sid]
                return None
            return login

    def close(self, sid: str) -> None:
        with self._lock:
            self._logins.pop(sid, None)

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired()
            return len(self._logins)

    def _drop_expired(self) -> None:
        now = self._clock()
        for sid in [sid for sid, login in self._logins.items() if login.expires_at <= now]:
            del self._logins[sid]


def csrf_ok(session: Session | None, given: str | None) -> bool:
    return session is not None and same_secret(given, session.csrf)


# ------------------------------------------------------------------------------------------ validation
def check_sample_id(value: str) -> str:
    if not isinstance(value, str) or not SAMPLE_ID_PATTERN.fullmatch(value):
        raise InputError(
            f"sample id {value[:80]!r} is not valid: expected 1 to 200 letters, digits or . _ : ~ + - "
            "(starting with a letter or digit)"
        )
    return value


def check_reviewer(value: str | None) -> str:
    name = (value or "").strip()
    if not REVIEWER_PATTERN.fullmatch(name):
        raise InputError(
            f"reviewer name {name[:80]!r} is not valid: expected 1 to {MAX_REVIEWER_CHARS} letters, digits, "
            "spaces or . _ @ ' - (starting with a letter or digit)"
        )
    return name


def check_note(value: str | None) -> str:
    note = (value or "").replace("\r\n", "\n").strip()
    if len(note) > MAX_NOTE_CHARS:
        raise InputError(f"the note has {len(note)} characters; at most {MAX_NOTE_CHARS} are kept")
    if _CONTROL.search(note):
        raise InputError("the note contains control characters; use plain text")
    return note


def parse_checked_items(values: list[str], n_items: int) -> list[int]:
    """The review's item list from the form's checked boxes: each value is an item number 1..n_items, given at
    most once; items not listed are 'not met' (0)."""
    items = [0] * n_items
    for value in values:
        if not isinstance(value, str) or not value.isdigit() or len(value) > 3:
            raise InputError(f"item value {str(value)[:20]!r} is not valid: expected an item number 1 to {n_items}")
        number = int(value)
        if not 1 <= number <= n_items:
            raise InputError(f"item {number} does not exist: this checklist has items 1 to {n_items}")
        if items[number - 1]:
            raise InputError(f"item {number} was sent twice")
        items[number - 1] = 1
    return items


# ------------------------------------------------------------------------------------------- body size
class BodyLimit:
    """ASGI middleware: a request body may bring at most `max_bytes`, counted on the bytes actually received.

    A chunked body declares no length and a declared `Content-Length` is only a claim, so the header alone
    proves nothing. The app's read that would go past the limit (or its first read, when the declared length
    is already too large) raises HTTP 413 instead of returning data: the form is never parsed and the rest of
    the body is never read."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large_claim = declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes)
        received = 0

        async def limited_receive():
            nonlocal received
            if too_large_claim:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(
            413, f"the form is larger than {self.max_bytes // 1024} KiB; a review needs far less"
        )
