"""Sessions and login: the middleware that attaches a session to every request (and keeps /static/ behind
the token login), and the /login and /logout routes. The rules themselves are in `security.py`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from magic_align.review.security import SECURITY_HEADERS, SESSION_COOKIE, InputError, Session, check_reviewer, same_secret
from magic_align.review.site import ReviewSite, site_of

router = APIRouter()


def add_session_middleware(app: FastAPI, site: ReviewSite) -> None:
    """Every request gets its session (a fresh one when the cookie is missing or forged) and the login the
    server holds for it; every response gets the security headers and, when the session is new, its cookie."""

    @app.middleware("http")
    async def sessions_and_headers(request: Request, call_next):
        session = site.signer.loads(request.cookies.get(SESSION_COOKIE))
        issued = session is None
        if session is None:
            session = Session.fresh()
        request.state.session = session
        # the cookie only names the session; whether it is logged in is the server's record (gone after logout)
        request.state.login = site.logins.get(session.sid)
        request.state.new_session = None
        path = request.scope["path"]
        if (path == "/static" or path.startswith("/static/")) and not site.passed_token(request):
            response = site.error_page(request, 401, "log in first: the page's files are served to logged-in sessions only")
        else:
            response = await call_next(request)
        replacement = request.state.new_session
        if replacement is not None or issued:
            response.set_cookie(
                SESSION_COOKIE,
                site.signer.dumps(replacement or session),
                max_age=site.signer.max_age_s,
                httponly=True,
                samesite="strict",
                path="/",
            )
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


@router.get("/login")
def login_page(request: Request, site: ReviewSite = Depends(site_of)) -> Response:
    if site.logged_in_name(request):
        return RedirectResponse("/", status_code=303)
    return site.render(request, "login.html", {"need_token": not site.passed_token(request),
                                               "need_name": site.fixed_reviewer is None, "error": None})


@router.post("/login")
async def login(request: Request, site: ReviewSite = Depends(site_of)) -> Response:
    form = await site.read_form(request)
    site.check_csrf(request, form)
    need_token = not site.passed_token(request)
    context = {"need_token": need_token, "need_name": site.fixed_reviewer is None}
    if need_token:
        given = form.get("token")
        if not isinstance(given, str) or not same_secret(given.strip(), site.token or ""):
            return site.render(request, "login.html", {**context, "error": "wrong or missing token"}, 401)
    name = site.fixed_reviewer
    if name is None:
        try:
            name = check_reviewer(form.get("reviewer") if isinstance(form.get("reviewer"), str) else None)
        except InputError as error:
            return site.render(request, "login.html", {**context, "error": str(error)}, 400)
    # a fresh session id and CSRF token at login: a session planted earlier gains nothing
    site.logins.close(request.state.session.sid)
    fresh = Session.fresh()
    site.logins.open(fresh.sid, None if site.fixed_reviewer else name)
    request.state.new_session = fresh
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
async def logout(request: Request, site: ReviewSite = Depends(site_of)) -> Response:
    form = await site.read_form(request)
    site.check_csrf(request, form)
    site.logins.close(request.state.session.sid)  # every copy of this session's cookie is logged out with it
    request.state.new_session = Session.fresh()
    return RedirectResponse("/login", status_code=303)
