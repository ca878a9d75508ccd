"""Every error of the review page as a page of its own: HTTP errors, bad input, a missing login, and
unexpected exceptions (logged; the page names only the exception's type)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from magic_align.review.security import InputError
from magic_align.review.site import LoginNeeded, ReviewSite

logger = logging.getLogger(__name__)


def add_error_pages(app: FastAPI, site: ReviewSite) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = error.detail if isinstance(error.detail, str) else "the request could not be served"
        if error.status_code == 404 and message == "Not Found":
            message = f"there is no page at {request.url.path[:200]}"
        return site.error_page(request, error.status_code, message)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> Response:
        return site.error_page(request, 400, str(error))

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, error: LoginNeeded) -> Response:
        if request.method in ("GET", "HEAD"):
            return RedirectResponse("/login", status_code=303)
        return site.error_page(request, 401, "log in first: this action needs a logged-in session")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("review page error on %s", request.url.path)
        return site.error_page(request, 500, f"internal error ({type(error).__name__}); the terminal running `magic review` has the details")
