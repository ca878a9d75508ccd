"""The review page's pages: the queue, one image to review (GET shows it, POST stores the review), a
condition's gallery, and the images themselves (found by sample id in the ledger, never by a request path)."""

from __future__ import annotations

import hashlib
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from magic_align.ledger import LedgerError, StoredReview
from magic_align.review.queue import condition_agreement
from magic_align.review.security import InputError, check_note, parse_checked_items
from magic_align.review.site import ReviewSite, review_url, site_of, when

logger = logging.getLogger(__name__)

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

router = APIRouter()


@router.get("/")
def queue_page(request: Request, site: ReviewSite = Depends(site_of)) -> Response:
    me = site.current_reviewer(request)
    ledger, settings = site.ledger, site.settings
    views, queue = site.snapshot()
    mine = {review.sample_id for review in ledger.reviews(reviewer=me)}
    latest = ledger.latest_reviews()
    next_up = next((entry.sample_id for entry in queue if entry.sample_id not in mine), None)
    aspects, images = site.agreement_by_aspect()
    conditions = []
    for checklist in site.checklists.conditions:
        members = [v for v in views.values() if v.condition == checklist.condition]
        if members:
            reviewed = sum(1 for v in members if v.sample.sample_id in latest)
            conditions.append({"checklist": checklist, "count": len(members), "reviewed": reviewed})
    return site.render(
        request,
        "queue.html",
        {
            "title": "Review queue",
            "queue": [(entry, views[entry.sample_id], entry.sample_id in mine) for entry in queue],
            "done": sum(1 for entry in queue if entry.sample_id in mine),
            "next_up": next_up,
            "mode": settings.queue,
            "per_condition": settings.per_condition,
            "judging": site.judging,
            "aspects": aspects,
            "agreement_images": images,
            "conditions": conditions,
            "total_reviews": len(ledger.reviews(latest_only=False)),
        },
    )


@router.get("/review/{sample_id}")
def review_page(request: Request, sample_id: str, via: str = "queue", site: ReviewSite = Depends(site_of)) -> Response:
    me = site.current_reviewer(request)
    via = "gallery" if via == "gallery" else "queue"
    views, queue = site.snapshot()
    view = site.find_view(views, sample_id)
    checklist = view.checklist
    sequence = site.order(views, queue, view, via)
    position = sequence.index(sample_id)
    previous_id = sequence[position - 1] if position > 0 else None
    next_id = sequence[position + 1] if position + 1 < len(sequence) else None
    history = site.ledger.reviews(sample_id=sample_id, latest_only=False)
    my_latest = next((review for review in reversed(history) if review.reviewer == me), None)
    primary = view.verdict_of(site.judging.judge_id)
    if my_latest is not None and my_latest.checklist_version == checklist.version:
        start = [value == 1 for value in my_latest.items]
        start_note = my_latest.note
        start_from = f"your review of {when(my_latest.created_at)}"
    elif site.settings.start_from == "judge" and primary is not None and primary.answered:
        start = [value == 1 for value in primary.items]
        start_note = ""
        start_from = f"the answers of {primary.judge_id}"
    else:
        start = [False] * len(checklist.items)
        start_note = ""
        start_from = "nothing ticked"
    rows, images = condition_agreement(list(views.values()), site.ledger.latest_reviews(), site.judging.judge_id,
                                       checklist)
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
    return site.render(
        request,
        "review.html",
        {
            "title": f"Review {sample_id}",
            "view": view,
            "checklist": checklist,
            "items": items,
            "verdicts": view.verdicts,
            "judging": site.judging,
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


@router.post("/review/{sample_id}")
async def save_review(request: Request, sample_id: str, site: ReviewSite = Depends(site_of)) -> Response:
    me = site.current_reviewer(request)
    form = await site.read_form(request)
    site.check_csrf(request, form)
    views, queue = site.snapshot()
    view = site.find_view(views, sample_id)
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
        site.ledger.add_review(sample_id, checklist.version, items, me, note)
    except LedgerError as error:
        raise InputError(str(error)) from None
    sequence = site.order(views, queue, view, via)
    position = sequence.index(sample_id)
    if position + 1 < len(sequence):
        return RedirectResponse(review_url(sequence[position + 1], via), status_code=303)
    target = f"/gallery/{view.condition}?done=1" if via == "gallery" else "/?done=1"
    return RedirectResponse(target, status_code=303)


@router.get("/gallery/{condition}")
def gallery_page(request: Request, condition: str, done: int = 0, site: ReviewSite = Depends(site_of)) -> Response:
    me = site.current_reviewer(request)
    checklists, judging = site.checklists, site.judging
    if condition not in checklists:
        raise StarletteHTTPException(404, f"no condition {condition[:80]!r} in the checklist set {checklists.id!r}")
    checklist = checklists[condition]
    views, _ = site.snapshot()
    members = sorted((v for v in views.values() if v.condition == condition), key=lambda v: v.sample.sample_id)
    latest = site.ledger.latest_reviews()
    mine = {review.sample_id for review in site.ledger.reviews(reviewer=me)}
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
    return site.render(
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


@router.get("/image/{sample_id}")
def image(request: Request, sample_id: str, site: ReviewSite = Depends(site_of)) -> Response:
    site.current_reviewer(request)
    sample = site.known_sample(sample_id)
    # The path comes from the ledger, yet it is still checked: a ledger row must not open files outside
    # the run directory either.
    target = (site.root / sample.image_path).resolve()
    if not target.is_relative_to(site.root) or target.suffix.lower() not in IMAGE_TYPES:
        logger.warning("sample %s points outside the run directory or at a non-image: %s", sample_id, sample.image_path)
        raise StarletteHTTPException(404, f"sample {sample_id} has no servable image")
    try:
        data = target.read_bytes()
    except OSError:
        raise StarletteHTTPException(404, f"the image of sample {sample_id} is missing from the run directory") from None
    if hashlib.sha256(data).hexdigest() != sample.image_sha256:
        raise StarletteHTTPException(409, f"the image of sample {sample_id} changed on disk since it was sampled")
    return Response(data, media_type=IMAGE_TYPES[target.suffix.lower()])
