"""What every route of the review page shares: the run's ledger and checklists, the judge the reviews are
compared with, the login state of a request, page rendering, and the cached views of the samples."""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from magic_align.checklists.schema import ChecklistSet
from magic_align.config import RunConfig
from magic_align.errors import MagicError
from magic_align.judges import judge_identity
from magic_align.judges.agreement import compare
from magic_align.ledger import Ledger, SampleRow
from magic_align.review.queue import QueueEntry, SampleView, build_queue, verdict_counts
from magic_align.review.security import (
    CSRF_FIELD,
    MAX_NOTE_CHARS,
    SECURITY_HEADERS,
    InputError,
    Login,
    Session,
    SessionSigner,
    SessionStore,
    check_sample_id,
    csrf_ok,
)

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(str(resources.files("magic_align") / "review"))
# The style of the pages shown before the token login, inlined (and allowed by its hash in the page's CSP)
# because nothing under /static/ answers before that login.
PUBLIC_STYLE = (PACKAGE_DIR / "templates" / "_public.css").read_text(encoding="utf-8")
PUBLIC_STYLE_CSP = SECURITY_HEADERS["Content-Security-Policy"].replace(
    "style-src 'self'", f"style-src 'sha256-{base64.b64encode(hashlib.sha256(PUBLIC_STYLE.encode()).digest()).decode()}'"
)
ERROR_TITLES = {400: "Bad request", 401: "Login needed", 403: "Refused", 404: "Not found", 409: "Conflict",
                413: "Too large"}


class ReviewError(MagicError, RuntimeError):
    """The review page cannot start (no ledger, no samples); the message says what to run first."""


class LoginNeeded(Exception):
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


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def answer_symbol(value: int | None) -> tuple[str, str]:
    """(symbol, css class) of one item answer."""
    if value == 1:
        return "✓", "met"
    if value == 0:
        return "✗", "unmet"
    return "?", "unknown"


def review_url(sample_id: str, via: str) -> str:
    return f"/review/{sample_id}" + ("?via=gallery" if via == "gallery" else "")


@dataclass
class ReviewSite:
    """The state of one review app (`create_app` builds it; routes reach it through `site_of(request)`).

    token: the login token (None: no token needed). fixed_reviewer: the name every review is stored under
    (None: each session gives its own at login). collect_views: builds the sample views from the ledger
    (`queue.collect_views`)."""

    config: RunConfig
    ledger: Ledger
    checklists: ChecklistSet
    judging: Judging
    token: str | None
    fixed_reviewer: str | None
    signer: SessionSigner
    logins: SessionStore
    root: Path
    collect_views: Callable[..., list[SampleView]]
    templates: Jinja2Templates = field(init=False)
    # derived tables, each with the ledger table versions it was computed from
    _cache: dict[str, tuple] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
        self.templates.env.globals.update(answer=answer_symbol, when=when, isnan=math.isnan, max_note=MAX_NOTE_CHARS)

    @property
    def settings(self):
        return self.config.review

    # -------------------------------------------------------------------------------- who is asking
    def passed_token(self, request: Request) -> bool:
        """True when no token is needed or this session logged in with it."""
        return self.token is None or request.state.login is not None

    def logged_in_name(self, request: Request) -> str | None:
        login: Login | None = request.state.login
        if not self.passed_token(request):
            return None
        return self.fixed_reviewer or (login.reviewer if login is not None else None)

    def current_reviewer(self, request: Request) -> str:
        name = self.logged_in_name(request)
        if not name:
            raise LoginNeeded()
        return name

    # -------------------------------------------------------------------------------------- forms
    @staticmethod
    def check_csrf(request: Request, form) -> None:
        given = form.get(CSRF_FIELD)
        if not isinstance(given, str) or not csrf_ok(request.state.session, given):
            raise StarletteHTTPException(
                403, "the form's CSRF token is missing or does not match this session; reload the page and try again"
            )

    @staticmethod
    async def read_form(request: Request):
        form = await request.form(max_files=0, max_fields=100)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                raise InputError(f"field {key!r}: files are not accepted")
        return form

    # -------------------------------------------------------------------------------------- pages
    def render(self, request: Request, name: str, context: dict, status: int = 200) -> Response:
        session: Session = request.state.session
        assets = self.passed_token(request)
        base = {
            "csrf_field": CSRF_FIELD,
            "csrf_token": (request.state.new_session or session).csrf,
            "reviewer": self.logged_in_name(request),
            "run_name": self.config.name,
            "assets": assets,
            "public_style": PUBLIC_STYLE,
        }
        response = self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
        if not assets:
            response.headers["Content-Security-Policy"] = PUBLIC_STYLE_CSP
        return response

    def error_page(self, request: Request, status: int, message: str) -> Response:
        return self.render(request, "error.html",
                           {"title": ERROR_TITLES.get(status, "Error"), "status": status, "message": message}, status)

    # --------------------------------------------------------------------------------------- data
    def snapshot(self) -> tuple[dict[str, SampleView], list[QueueEntry]]:
        """Samples with their verdicts, and the queue; rebuilt only when samples or verdicts changed."""
        state = tuple(self.ledger.table_versions("samples", "verdicts").values())
        if self._cache.get("views", (None,))[0] != state:
            views = self.collect_views(self.ledger, self.checklists, self.judging.judge_id, self.judging.prompt_version)
            queue = build_queue(views, self.settings.queue, self.settings.per_condition, self.config.seed)
            self._cache["views"] = (state, {view.sample.sample_id: view for view in views}, queue)
        return self._cache["views"][1], self._cache["views"][2]

    def known_sample(self, sample_id: str) -> SampleRow:
        """The ledger's row for a sample id from a URL; 404 for a malformed id or one the ledger lacks."""
        try:
            check_sample_id(sample_id)
        except InputError as error:
            raise StarletteHTTPException(404, f"no sample with that id ({error})") from None
        sample = self.ledger.sample(sample_id)
        if sample is None:
            raise StarletteHTTPException(404, f"the ledger has no sample {sample_id!r}")
        return sample

    def find_view(self, views: dict[str, SampleView], sample_id: str) -> SampleView:
        view = views.get(sample_id)
        if view is None:
            self.known_sample(sample_id)  # 404 with the reason when the id is bad or unknown
            raise StarletteHTTPException(404, f"sample {sample_id} has no checklist in {self.checklists.id!r}")
        return view

    @staticmethod
    def order(views: dict[str, SampleView], queue: list[QueueEntry], view: SampleView, via: str) -> list[str]:
        """The sequence the arrows and Enter walk: the queue, or the condition's gallery."""
        queued = [entry.sample_id for entry in queue]
        if via == "queue" and view.sample.sample_id in queued:
            return queued
        return sorted(v.sample.sample_id for v in views.values() if v.condition == view.condition)

    def agreement_by_aspect(self) -> tuple[list, int]:
        if self.judging.judge_id is None:
            return [], 0
        state = tuple(self.ledger.table_versions("samples", "verdicts", "reviews").values())
        if self._cache.get("aspects", (None,))[0] != state:
            report = compare(self.ledger, self.checklists, self.judging.judge_id, self.judging.prompt_version, "human",
                             resamples=0)
            self._cache["aspects"] = (state, report.items, report.images)
        return self._cache["aspects"][1], self._cache["aspects"][2]


def site_of(request: Request) -> ReviewSite:
    """The review app's shared state (a FastAPI dependency of every route)."""
    return request.app.state.site
