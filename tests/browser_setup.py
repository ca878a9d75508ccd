"""How the browser tests start Debian's chromium through Playwright (never Playwright's own browser download);
shared by tests/conftest.py (`chromium_browser`) and tests/test_review_browser.py (also a screenshot script)."""

from __future__ import annotations

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
