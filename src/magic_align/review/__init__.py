"""The expert review page (`magic review`): dermatologists confirm or correct the judge's verdicts.

`app.create_app(config, token=None, reviewer=None, judge_id=None)` builds the FastAPI app from the routers in
`auth.py` and `pages.py` over the shared state in `site.py`;
`app.run_review(config, host, port, reviewer, judge_id, require_token)` binds the port, then serves it with
uvicorn. See docs/review.md.
"""
