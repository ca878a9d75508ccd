"""The expert review page: a small FastAPI app over the run's ledger (`magic review RUN_CONFIG`).

Pages are rendered on the server (Jinja2 templates in `templates/`); one small script (`static/review.js`)
adds the keyboard: digits toggle checklist items, Enter saves and opens the next image, the arrow keys move
without saving. Routes:

    GET  /                      the queue (review.queue mode), progress, agreement per aspect, galleries
    GET  /review/{sample_id}    one image, its target condition, checklist and every judge's verdict
    POST /review/{sample_id}    store a review (items ticked, note) and go to the next image
    GET  /gallery/{condition}   every image of a condition, with per-item agreement judge vs reviewers
    GET  /image/{sample_id}     the PNG of a sample the ledger knows (by id; no paths from the request)
    GET|POST /login, POST /logout
    GET  /static/...            the page's stylesheet and script (behind the token login, where there is one)

Reviews are appended to the ledger (`Ledger.add_review`) with the reviewer's name and the time; the judges'
verdicts are only read. Security rules are in `security.py`; `run_review` binds the port before it prints
the address.

The routes live in routers (`auth.py`: sessions and login; `pages.py`: the pages and images), over the state
they share (`site.py`: `ReviewSite`); error pages are in `error_pages.py`. This module builds the app from
them and serves it.
"""

from __future__ import annotations

import errno
import socket

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.ledger import Ledger
from magic_align.review import auth, pages
from magic_align.review.error_pages import add_error_pages
from magic_align.review.queue import collect_views
from magic_align.review.security import (
    MAX_FORM_BYTES,
    BodyLimit,
    SessionSigner,
    SessionStore,
    check_reviewer,
    is_loopback,
    new_token,
)
from magic_align.review.site import PACKAGE_DIR, Judging, ReviewError, ReviewSite, choose_primary_judge
from magic_align.run import RunPaths

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]

__all__ = ["Judging", "ReviewError", "ReviewPortError", "bind_listener", "choose_primary_judge", "create_app",
           "run_review"]


class ReviewPortError(ReviewError):
    """The address or port cannot be listened on (taken, not this machine's, not permitted)."""


def _collect_views(*args):
    """`queue.collect_views`, looked up in this module when called, so it can be replaced here."""
    return collect_views(*args)


def create_app(
    config: RunConfig,
    token: str | None = None,
    reviewer: str | None = None,
    judge_id: str | None = None,
    allowed_hosts: list[str] | None = None,
    secret: str | None = None,
) -> FastAPI:
    """The review app for the run of `config`.

    token: when set, a session must log in with it first, and nothing but the login page answers before
        (`run_review` sets one for non-loopback hosts and with `require_token`).
    reviewer: the name reviews are stored under; None asks each session for a name at login.
    judge_id: the judge the reviews are compared with (default: see `choose_primary_judge`).
    allowed_hosts: accepted Host headers (DNS-rebinding guard for loopback); None accepts any.
    secret: the cookie signing key (default: random per app). Logins live in this app's memory
        (`SessionStore`), so a restart logs everybody out whatever the key.
    """
    paths = RunPaths(config.run_dir)
    if not paths.ledger.exists():
        raise ReviewError(f"{paths.ledger} does not exist; run `magic sample` (and `magic judge`) first")
    ledger = Ledger(paths.ledger)
    checklists = load_checklists(config.judge.checklist)
    fixed_reviewer = check_reviewer(reviewer) if reviewer is not None else None
    signer = SessionSigner(secret)
    site = ReviewSite(
        config=config, ledger=ledger, checklists=checklists,
        judging=choose_primary_judge(config, ledger, checklists, judge_id), token=token,
        fixed_reviewer=fixed_reviewer, signer=signer, logins=SessionStore(signer.max_age_s),
        root=paths.root.resolve(), collect_views=_collect_views,
    )

    app = FastAPI(title="magic-align review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.site = site
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")
    # added innermost first: the session middleware (added last) sees every request before the others
    app.add_middleware(BodyLimit, max_bytes=MAX_FORM_BYTES)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    auth.add_session_middleware(app, site)
    add_error_pages(app, site)
    app.include_router(auth.router)
    app.include_router(pages.router)
    return app


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or a `ReviewPortError` naming the address and
    why it cannot be had. Bound before anything is announced, so a printed address is one that answers."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:
        raise ReviewPortError(f"cannot listen on {shown}: {error.strerror or error}; check --host") from None
    try:
        # a stopped `magic review` leaves connections in TIME_WAIT; they must not block a restart (a port another
        # server listens on still fails below)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        reasons = {
            errno.EADDRINUSE: "the port is already in use (another `magic review`?); choose another with --port",
            errno.EACCES: "not permitted (ports below 1024 need privileges); choose another with --port",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's; check --host",
        }
        raise ReviewPortError(f"cannot listen on {shown}: {reasons.get(error.errno, error.strerror or str(error))}") from None
    return listener


def _serve(app: FastAPI, listener: socket.socket) -> None:
    """Serve `app` on the already listening socket until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def run_review(
    config: RunConfig,
    host: str | None = None,
    port: int | None = None,
    reviewer: str | None = None,
    judge_id: str | None = None,
    require_token: bool | None = None,
    announce=print,
) -> None:
    """`magic review`: serve the review page until interrupted. Loopback needs no token unless
    `require_token` (default `review.require_token`); any other host always gets one. The token is fresh and
    random, announced here, and each browser session must enter it once. The port is bound before anything is
    announced: a taken port is a `ReviewPortError`, and port 0 picks a free one (the announced address says
    which)."""
    host = host or config.review.host
    port = config.review.port if port is None else port
    if require_token is None:
        require_token = config.review.require_token
    loopback = is_loopback(host)
    token = new_token() if require_token or not loopback else None
    allowed_hosts = LOOPBACK_NAMES + [host.strip("[]")] if loopback else None  # e.g. 127.0.0.2 as bound
    app = create_app(config, token=token, reviewer=reviewer, judge_id=judge_id, allowed_hosts=allowed_hosts)
    listener = bind_listener(host, port)
    try:
        port = listener.getsockname()[1]
        shown_host = f"[{host.strip('[]')}]" if ":" in host else host
        announce(f"review page for run {config.name}: http://{shown_host}:{port}/")
        if token is not None:
            why = "token required (--require-token)" if loopback else f"listening on {host} (not loopback)"
            announce(f"{why}: log in at http://{shown_host}:{port}/login with the token")
            announce(f"token: {token}")
        _serve(app, listener)
    finally:
        listener.close()
