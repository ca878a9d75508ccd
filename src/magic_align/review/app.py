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
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import math
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from magic_align.checklists.schema import ChecklistSet, load_checklists
from magic_align.config import RunConfig
from magic_align.ledger import Ledger, LedgerError, StoredReview
from magic_align.review.queue import (
    QueueEntry,
    SampleView,
    build_queue,
    collect_views,
    condition_agreement,
    verdict_counts,
)
from magic_align.review.security import (
    CSRF_FIELD,
    MAX_FORM_BYTES,
    MAX_NOTE_CHARS,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    BodyLimit,
    InputError,
    Login,
    Session,
    SessionSigner,
    SessionStore,
    check_note,
    check_reviewer,
    check_sample_id,
    csrf_ok,
    is_loopback,
    new_token,
    parse_checked_items,
    same_secret,
)
from magic_align.run import RunPaths
from magic_align.errors import MagicError

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(str(resources.files("magic_align") / "review"))
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
# The style of the pages shown before the token login, inlined (and allowed by its hash in the page's CSP)
# because nothing under /static/ answers before that login.
PUBLIC_STYLE = (PACKAGE_DIR / "templates" / "_public.css").read_text(encoding="utf-8")
PUBLIC_STYLE_CSP = SECURITY_HEADERS["Content-Security-Policy"].replace(
    "style-src 'self'", f"style-src 'sha256-{base64.b64encode(hashlib.sha256(PUBLIC_STYLE.encode()).digest()).decode()}'"
)


class ReviewError(MagicError, RuntimeError):
    """The review page cannot start (no ledger, no samples); the message says what to run first."""


class ReviewPortError(ReviewError):
    """The address or port cannot be listened on (taken, not this machine's, not permitted)."""


class _LoginNeeded(Exception):
    """Raised by routes when the session is not logged in (GET: redirect to /login; POST: 401)."""


@dataclass
class Judging:
    """Whose verdicts the page compares the reviews with (the 'primary' judge) and why it was chosen."""

    judge_id: str | None
    prompt_version: str | None
    note: str


def choose_primary_judge(config: RunConfig, ledger: Ledger, checklists: ChecklistSet, judge_id: str | None) -> Judging:
    """The explicit `judge_id`, else the configured judge when it has verdicts here, else the judge with the
    most verdicts in the ledger (None when nobody judged yet: the page still takes reviews)."""
    counts = verdict_counts(ledger)
    if judge_id is not None:
        if judge_id not in counts:
            raise ReviewError(f"judge {judge_id!r} has no verdicts in {ledger.path}; judges present: {sorted(counts) or 'none'}")
        return Judging(judge_id, None, f"judge {judge_id} (chosen with --judge)")
    configured: str | None = None
    if config.judge.backend != "human":
        from magic_align.judge import judge_identity

        try:
            configured, prompt_version = judge_identity(config, checklists)
        except Exception as error:  # a judge that cannot be built here (e.g. remote endpoint not allowed)
            logger.info("configured judge not usable for the review page: %s", error)
        else:
            if configured in counts:
                return Judging(configured, prompt_version, f"the configured judge {configured}")
    if not counts:
        return Judging(None, None, "no judge has graded these images yet")
    busiest = max(sorted(counts), key=lambda name: counts[name])
    why = f"the configured judge {configured} has no verdicts here; " if configured else ""
    return Judging(busiest, None, f"{why}showing {busiest}, the judge with the most verdicts")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _answer(value: int | None) -> tuple[str, str]:
    """(symbol, css class) of one item answer."""
    if value == 1:
        return "✓", "met"
    if value == 0:
        return "✗", "unmet"
    return "?", "unknown"


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
    judging = choose_primary_judge(config, ledger, checklists, judge_id)
    signer = SessionSigner(secret)
    logins = SessionStore(signer.max_age_s)
    settings = config.review
    root = paths.root.resolve()

    app = FastAPI(title="magic-align review", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
    templates.env.globals.update(answer=_answer, when=_when, isnan=math.isnan, max_note=MAX_NOTE_CHARS)
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")
    app.add_middleware(BodyLimit, max_bytes=MAX_FORM_BYTES)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    # ---------------------------------------------------------------------------------- plumbing
    @app.middleware("http")
    async def sessions_and_headers(request: Request, call_next):
        session = signer.loads(request.cookies.get(SESSION_COOKIE))
        issued = session is None
        if session is None:
            session = Session.fresh()
        request.state.session = session
        # the cookie only names the session; whether it is logged in is the server's record (gone after logout)
        request.state.login = logins.get(session.sid)
        request.state.new_session = None
        path = request.scope["path"]
        if (path == "/static" or path.startswith("/static/")) and not passed_token(request):
            response = error_page(request, 401, "log in first: the page's files are served to logged-in sessions only")
        else:
            response = await call_next(request)
        replacement = request.state.new_session
        if replacement is not None or issued:
            response.set_cookie(
                SESSION_COOKIE,
                signer.dumps(replacement or session),
                max_age=signer.max_age_s,
                httponly=True,
                samesite="strict",
                path="/",
            )
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def passed_token(request: Request) -> bool:
        """True when no token is needed or this session logged in with it."""
        return token is None or request.state.login is not None

    def logged_in_name(request: Request) -> str | None:
        login: Login | None = request.state.login
        if not passed_token(request):
            return None
        return fixed_reviewer or (login.reviewer if login is not None else None)

    def render(request: Request, name: str, context: dict, status: int = 200) -> Response:
        session: Session = request.state.session
        assets = passed_token(request)
        base = {
            "csrf_field": CSRF_FIELD,
            "csrf_token": (request.state.new_session or session).csrf,
            "reviewer": logged_in_name(request),
            "run_name": config.name,
            "assets": assets,
            "public_style": PUBLIC_STYLE,
        }
        response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
        if not assets:
            response.headers["Content-Security-Policy"] = PUBLIC_STYLE_CSP
        return response

    def error_page(request: Request, status: int, message: str) -> Response:
        titles = {400: "Bad request", 401: "Login needed", 403: "Refused", 404: "Not found", 409: "Conflict", 413: "Too large"}
        return render(request, "error.html", {"title": titles.get(status, "Error"), "status": status, "message": message}, status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = error.detail if isinstance(error.detail, str) else "the request could not be served"
        if error.status_code == 404 and message == "Not Found":
            message = f"there is no page at {request.url.path[:200]}"
        return error_page(request, error.status_code, message)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> Response:
        return error_page(request, 400, str(error))

    @app.exception_handler(_LoginNeeded)
    async def login_needed(request: Request, error: _LoginNeeded) -> Response:
        if request.method in ("GET", "HEAD"):
            return RedirectResponse("/login", status_code=303)
        return error_page(request, 401, "log in first: this action needs a logged-in session")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("review page error on %s", request.url.path)
        return error_page(request, 500, f"internal error ({type(error).__name__}); the terminal running `magic review` has the details")

    def current_reviewer(request: Request) -> str:
        name = logged_in_name(request)
        if not name:
            raise _LoginNeeded()
        return name

    def check_csrf(request: Request, form) -> None:
        given = form.get(CSRF_FIELD)
        if not isinstance(given, str) or not csrf_ok(request.state.session, given):
            raise StarletteHTTPException(
                403, "the form's CSRF token is missing or does not match this session; reload the page and try again"
            )

    async def read_form(request: Request):
        form = await request.form(max_files=0, max_fields=100)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                raise InputError(f"field {key!r}: files are not accepted")
        return form

    # ------------------------------------------------------------------------------------- data
    cache: dict[str, tuple] = {}

    def snapshot() -> tuple[dict[str, SampleView], list[QueueEntry]]:
        """Samples with their verdicts, and the queue; rebuilt only when samples or verdicts changed."""
        state = tuple(ledger.table_versions("samples", "verdicts").values())
        if cache.get("views", (None,))[0] != state:
            views = collect_views(ledger, checklists, judging.judge_id, judging.prompt_version)
            queue = build_queue(views, settings.queue, settings.per_condition, config.seed)
            cache["views"] = (state, {view.sample.sample_id: view for view in views}, queue)
        return cache["views"][1], cache["views"][2]

    def known_sample(sample_id: str):
        """The ledger's row for a sample id from a URL; 404 for a malformed id or one the ledger lacks."""
        try:
            check_sample_id(sample_id)
        except InputError as error:
            raise StarletteHTTPException(404, f"no sample with that id ({error})") from None
        sample = ledger.sample(sample_id)
        if sample is None:
            raise StarletteHTTPException(404, f"the ledger has no sample {sample_id!r}")
        return sample

    def find_view(views: dict[str, SampleView], sample_id: str) -> SampleView:
        view = views.get(sample_id)
        if view is None:
            known_sample(sample_id)  # 404 with the reason when the id is bad or unknown
            raise StarletteHTTPException(404, f"sample {sample_id} has no checklist in {checklists.id!r}")
        return view

    def order(views: dict[str, SampleView], queue: list[QueueEntry], view: SampleView, via: str) -> list[str]:
        """The sequence the arrows and Enter walk: the queue, or the condition's gallery."""
        queued = [entry.sample_id for entry in queue]
        if via == "queue" and view.sample.sample_id in queued:
            return queued
        return sorted(v.sample.sample_id for v in views.values() if v.condition == view.condition)

    def review_url(sample_id: str, via: str) -> str:
        return f"/review/{sample_id}" + ("?via=gallery" if via == "gallery" else "")

    def agreement_by_aspect() -> tuple[list, int]:
        if judging.judge_id is None:
            return [], 0
        from magic_align.judges.agreement import compare

        state = tuple(ledger.table_versions("samples", "verdicts", "reviews").values())
        if cache.get("aspects", (None,))[0] != state:
            report = compare(ledger, checklists, judging.judge_id, judging.prompt_version, "human", resamples=0)
            cache["aspects"] = (state, report.items, report.images)
        return cache["aspects"][1], cache["aspects"][2]

    # ------------------------------------------------------------------------------------ login
    @app.get("/login")
    def login_page(request: Request) -> Response:
        if logged_in_name(request):
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html", {"need_token": not passed_token(request), "need_name": fixed_reviewer is None, "error": None})

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        check_csrf(request, form)
        need_token = not passed_token(request)
        context = {"need_token": need_token, "need_name": fixed_reviewer is None}
        if need_token:
            given = form.get("token")
            if not isinstance(given, str) or not same_secret(given.strip(), token or ""):
                return render(request, "login.html", {**context, "error": "wrong or missing token"}, 401)
        name = fixed_reviewer
        if name is None:
            try:
                name = check_reviewer(form.get("reviewer") if isinstance(form.get("reviewer"), str) else None)
            except InputError as error:
                return render(request, "login.html", {**context, "error": str(error)}, 400)
        # a fresh session id and CSRF token at login: a session planted earlier gains nothing
        logins.close(request.state.session.sid)
        fresh = Session.fresh()
        logins.open(fresh.sid, None if fixed_reviewer else name)
        request.state.new_session = fresh
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await read_form(request)
        check_csrf(request, form)
        logins.close(request.state.session.sid)  # every copy of this session's cookie is logged out with it
        request.state.new_session = Session.fresh()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------------------------------ pages
    @app.get("/")
    def queue_page(request: Request) -> Response:
        me = current_reviewer(request)
        views, queue = snapshot()
        mine = {review.sample_id for review in ledger.reviews(reviewer=me)}
        latest = ledger.latest_reviews()
        next_up = next((entry.sample_id for entry in queue if entry.sample_id not in mine), None)
        aspects, images = agreement_by_aspect()
        conditions = []
        for checklist in checklists.conditions:
            members = [v for v in views.values() if v.condition == checklist.condition]
            if members:
                reviewed = sum(1 for v in members if v.sample.sample_id in latest)
                conditions.append({"checklist": checklist, "count": len(members), "reviewed": reviewed})
        return render(
            request,
            "queue.html",
            {
                "title": "Review queue",
                "queue": [(entry, views[entry.sample_id], entry.sample_id in mine) for entry in queue],
                "done": sum(1 for entry in queue if entry.sample_id in mine),
                "next_up": next_up,
                "mode": settings.queue,
                "per_condition": settings.per_condition,
                "judging": judging,
                "aspects": aspects,
                "agreement_images": images,
                "conditions": conditions,
                "total_reviews": len(ledger.reviews(latest_only=False)),
            },
        )

    @app.get("/review/{sample_id}")
    def review_page(request: Request, sample_id: str, via: str = "queue") -> Response:
        me = current_reviewer(request)
        via = "gallery" if via == "gallery" else "queue"
        views, queue = snapshot()
        view = find_view(views, sample_id)
        checklist = view.checklist
        sequence = order(views, queue, view, via)
        position = sequence.index(sample_id)
        previous_id = sequence[position - 1] if position > 0 else None
        next_id = sequence[position + 1] if position + 1 < len(sequence) else None
        history = ledger.reviews(sample_id=sample_id, latest_only=False)
        my_latest = next((review for review in reversed(history) if review.reviewer == me), None)
        primary = view.verdict_of(judging.judge_id)
        if my_latest is not None and my_latest.checklist_version == checklist.version:
            start = [value == 1 for value in my_latest.items]
            start_note = my_latest.note
            start_from = f"your review of {_when(my_latest.created_at)}"
        elif settings.start_from == "judge" and primary is not None and primary.answered:
            start = [value == 1 for value in primary.items]
            start_note = ""
            start_from = f"the answers of {primary.judge_id}"
        else:
            start = [False] * len(checklist.items)
            start_note = ""
            start_from = "nothing ticked"
        rows, images = condition_agreement(list(views.values()), ledger.latest_reviews(), judging.judge_id, checklist)
        items = []
        for index, item in enumerate(checklist.items):
            judges = [
                {
                    "judge_id": verdict.judge_id,
                    "value": verdict.items[index] if index < len(verdict.items) else None,
                    "reason": (verdict.rationales[index] if index < len(verdict.rationales) else None) or "",
                }
                for verdict in view.verdicts
            ]
            items.append({"number": index + 1, "item": item, "judges": judges, "checked": start[index], "agreement": rows[index]})
        return render(
            request,
            "review.html",
            {
                "title": f"Review {sample_id}",
                "view": view,
                "checklist": checklist,
                "items": items,
                "verdicts": view.verdicts,
                "judging": judging,
                "position": position + 1,
                "total": len(sequence),
                "via": via,
                "previous_url": review_url(previous_id, via) if previous_id else None,
                "next_url": review_url(next_id, via) if next_id else None,
                "start_from": start_from,
                "start_note": start_note,
                "history": list(reversed(history)),
                "agreement_images": images,
            },
        )

    @app.post("/review/{sample_id}")
    async def save_review(request: Request, sample_id: str) -> Response:
        me = current_reviewer(request)
        form = await read_form(request)
        check_csrf(request, form)
        views, queue = snapshot()
        view = find_view(views, sample_id)
        checklist = view.checklist
        version = form.get("checklist_version")
        if version != checklist.version:
            raise StarletteHTTPException(
                409,
                f"the checklist of {checklist.condition!r} changed since this page was loaded (page: "
                f"{str(version)[:20]!r}, now: {checklist.version!r}); reload the page and review again",
            )
        values = form.getlist("item")
        if len(values) > len(checklist.items):
            raise InputError(f"{len(values)} items sent; the checklist has {len(checklist.items)}")
        items = parse_checked_items(values, len(checklist.items))
        note_value = form.get("note")
        note = check_note(note_value if isinstance(note_value, str) else None)
        via = "gallery" if form.get("via") == "gallery" else "queue"
        try:
            ledger.add_review(sample_id, checklist.version, items, me, note)
        except LedgerError as error:
            raise InputError(str(error)) from None
        sequence = order(views, queue, view, via)
        position = sequence.index(sample_id)
        if position + 1 < len(sequence):
            return RedirectResponse(review_url(sequence[position + 1], via), status_code=303)
        target = f"/gallery/{view.condition}?done=1" if via == "gallery" else "/?done=1"
        return RedirectResponse(target, status_code=303)

    @app.get("/gallery/{condition}")
    def gallery_page(request: Request, condition: str, done: int = 0) -> Response:
        me = current_reviewer(request)
        if condition not in checklists:
            raise StarletteHTTPException(404, f"no condition {condition[:80]!r} in the checklist set {checklists.id!r}")
        checklist = checklists[condition]
        views, _ = snapshot()
        members = sorted((v for v in views.values() if v.condition == condition), key=lambda v: v.sample.sample_id)
        latest = ledger.latest_reviews()
        mine = {review.sample_id for review in ledger.reviews(reviewer=me)}
        rows, images = condition_agreement(list(views.values()), latest, judging.judge_id, checklist)
        tiles = []
        for view in members:
            primary = view.verdict_of(judging.judge_id)
            review: StoredReview | None = latest.get(view.sample.sample_id)
            tiles.append(
                {
                    "view": view,
                    "judge_score": primary.score if primary is not None and primary.answered else None,
                    "review": review,
                    "mine": view.sample.sample_id in mine,
                }
            )
        return render(
            request,
            "gallery.html",
            {
                "title": f"Gallery: {checklist.display_name}",
                "checklist": checklist,
                "tiles": tiles,
                "rows": rows,
                "agreement_images": images,
                "judging": judging,
                "done": bool(done),
                "conditions": [c for c in checklists.conditions if any(v.condition == c.condition for v in views.values())],
            },
        )

    @app.get("/image/{sample_id}")
    def image(request: Request, sample_id: str) -> Response:
        current_reviewer(request)
        sample = known_sample(sample_id)
        # The path comes from the ledger, yet it is still checked: a ledger row must not open files outside
        # the run directory either.
        target = (root / sample.image_path).resolve()
        if not target.is_relative_to(root) or target.suffix.lower() not in IMAGE_TYPES:
            logger.warning("sample %s points outside the run directory or at a non-image: %s", sample_id, sample.image_path)
            raise StarletteHTTPException(404, f"sample {sample_id} has no servable image")
        try:
            data = target.read_bytes()
        except OSError:
            raise StarletteHTTPException(404, f"the image of sample {sample_id} is missing from the run directory") from None
        if hashlib.sha256(data).hexdigest() != sample.image_sha256:
            raise StarletteHTTPException(409, f"the image of sample {sample_id} changed on disk since it was sampled")
        return Response(data, media_type=IMAGE_TYPES[target.suffix.lower()])

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
