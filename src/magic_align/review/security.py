"""What keeps the review page safe to run: who may use it, which requests are genuine, which input is valid.

- **Loopback by default.** `magic review` binds 127.0.0.1. Bound to any other address, the page asks for a
  random token (`new_token`, printed at start) before anything else; the token is exchanged once for a
  session cookie.
- **Session cookie.** Signed (itsdangerous, a secret drawn when the app starts, so a restart logs everybody
  out), HttpOnly, SameSite=Strict, expiring after `SESSION_MAX_AGE_S`. It carries a random session id, the
  session's CSRF token, whether the session is logged in and the reviewer's name; it holds no other data.
  A login issues a fresh session (new id, new CSRF token), so a session planted before the login is useless.
- **CSRF.** Every POST, login included, carries the session's CSRF token in a hidden field and is refused
  (403) without it or with another one. This holds on loopback too: any web page the reviewer visits could
  otherwise post to 127.0.0.1.
- **Input.** Sample ids, condition names, item values, notes and reviewer names are checked here against
  explicit rules (`InputError` says what was expected); images are found by sample id in the ledger, never by
  a path from the request.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from dataclasses import asdict, dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from magic_align.errors import MagicError

SESSION_COOKIE = "magic_review_session"
SESSION_MAX_AGE_S = 12 * 3600
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
@dataclass
class Session:
    sid: str
    csrf: str
    authenticated: bool = False
    reviewer: str | None = None

    @classmethod
    def fresh(cls, authenticated: bool, reviewer: str | None = None) -> "Session":
        return cls(secrets.token_urlsafe(16), secrets.token_urlsafe(32), authenticated, reviewer)


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
        try:
            session = Session(**data)
        except TypeError:
            return None
        if not isinstance(session.sid, str) or not isinstance(session.csrf, str):
            return None
        return session


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
