"""The review page through FastAPI's test client: queue order, pages, saving reviews, agreement, pairs.

The run comes from the `review_run` fixture (tests/conftest.py): 8 samples with verdicts of "judge:a" and
"judge:b", who disagree on 2 items of r0-u001-k0 and 1 item of r0-u002-k1; judge:b failed on r0-u003-k1.
"""

from __future__ import annotations

import math
import re

import pytest
from fastapi.testclient import TestClient

from checklist_builders import gated_checklist
from magic_align.judges.agreement import cohen_kappa, percent_agreement
from magic_align.ledger import SampleRow, StoredVerdict
from magic_align.review.app import ReviewError, create_app
from magic_align.review.queue import SampleView, build_queue, collect_views, disputed_items, uncertainty

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
VERSION = re.compile(r'name="checklist_version" value="([^"]+)"')


def form_of(page: str) -> dict:
    return {"csrf_token": CSRF.search(page).group(1), "checklist_version": VERSION.search(page).group(1)}


@pytest.fixture
def client(review_run):
    config, ledger, samples, checklists = review_run
    app = create_app(config, reviewer="Dr A", judge_id="judge:a")
    with TestClient(app) as test_client:
        yield test_client, ledger, checklists


# ------------------------------------------------------------------------------------- queue, pure parts
CHECKLIST = gated_checklist("c", ("a", "x", "item a"), ("b", "y", "item b"), ("c", "z", "item c"))


def verdict(judge: str, items, status="ok") -> StoredVerdict:
    return StoredVerdict(items=list(items), parse_status=status, judge_id=judge)


def view(sample_id: str, condition: str, *verdicts: StoredVerdict) -> SampleView:
    checklist = CHECKLIST.model_copy(update={"condition": condition})
    sample = SampleRow(sample_id, 0, "u", 0, f"{sample_id}.png", "0" * 64, "s", "src", condition, "p", 0)
    return SampleView(sample, checklist, list(verdicts))


def test_disputed_items_apply_requires_and_ignore_unknowns():
    # item b requires a: judge 2 failing a makes its b a 0 too, so a and b are disputed; c is unknown for one
    assert disputed_items([verdict("1", [1, 1, 1]), verdict("2", [0, 1, None])], CHECKLIST) == 2
    assert disputed_items([verdict("1", [1, 0, 1]), verdict("2", [1, 0, 1])], CHECKLIST) == 0
    assert disputed_items([verdict("1", [1, 0, 1])], CHECKLIST) == 0  # one judge never disagrees
    assert disputed_items([verdict("1", [1, 0, 1]), verdict("2", [None] * 3, "failed")], CHECKLIST) == 0


def test_uncertainty_reasons():
    assert uncertainty([], 3) == "not judged"
    assert uncertainty([verdict("j", [1, 0, 1])], 3) is None
    assert uncertainty([verdict("j", [1, None, 1], "partial")], 3) == "j: partial"
    assert uncertainty([verdict("j", [1, None, 1])], 3) == "j: items unknown"


def test_queue_disagreements_first_interleaved_and_capped():
    views = [view(f"p{i}", "p", verdict("1", [1, 0, 1]), verdict("2", [1, 0, 1])) for i in range(5)]
    views += [view(f"q{i}", "q", verdict("1", [1, 0, 1]), verdict("2", [1, 0, 1])) for i in range(5)]
    views[3] = view("p3", "p", verdict("1", [1, 1, 1]), verdict("2", [1, 0, 0]))  # 2 disputed
    views[7] = view("q2", "q", verdict("1", [1, 1, 1]), verdict("2", [1, 1, 0]))  # 1 disputed
    queue = build_queue(views, "disagreements", per_condition=3, seed=0)
    assert [entry.sample_id for entry in queue[:2]] == ["p3", "q2"]
    assert queue[0].reason == "judges differ on 2 items" and queue[1].priority == 1
    assert len(queue) == 6 and sum(entry.condition == "p" for entry in queue) == 3
    rest = [entry.condition for entry in queue[2:]]
    assert rest == ["p", "q", "p", "q"]  # conditions take turns
    assert build_queue(list(reversed(views)), "disagreements", 3, seed=0) == queue  # ledger order does not matter
    assert [e.sample_id for e in build_queue(views, "stratified", 5, seed=1)] != [
        e.sample_id for e in build_queue(views, "stratified", 5, seed=2)
    ]


def test_queue_uncertain_mode_puts_failed_answers_first():
    views = [view(f"p{i}", "p", verdict("1", [1, 0, 1])) for i in range(4)]
    views.append(view("p9", "p", verdict("1", [None] * 3, "failed")))
    views.append(view("p8", "p"))
    queue = build_queue(views, "uncertain", per_condition=10, seed=3)
    assert {entry.sample_id for entry in queue[:2]} == {"p8", "p9"}
    assert {entry.reason for entry in queue[:2]} == {"not judged", "1: failed"}
    with pytest.raises(ValueError, match="review.queue"):
        build_queue(views, "loudest", 10)  # type: ignore[arg-type]


def test_collect_views_newest_verdict_primary_first(review_run):
    config, ledger, samples, checklists = review_run
    views = {v.sample.sample_id: v for v in collect_views(ledger, checklists, "judge:b")}
    assert len(views) == 8
    assert [v.judge_id for v in views["r0-u000-k0"].verdicts] == ["judge:b", "judge:a"]
    assert views["r0-u003-k1"].verdict_of("judge:b").parse_status == "failed"


# -------------------------------------------------------------------------------------------- pages
def test_queue_page_lists_disagreements_first(client):
    test_client, ledger, checklists = client
    page = test_client.get("/")
    assert page.status_code == 200
    order = re.findall(r'<span class="sid">([^<]+)</span>', page.text)
    assert order[:2] == ["r0-u001-k0", "r0-u002-k1"]
    assert sorted(order) == sorted(s.sample_id for s in ledger.samples())
    assert 'href="/review/r0-u001-k0" data-key="start"' in page.text
    assert "judges differ on 2 items" in page.text
    assert "/gallery/alpha" in page.text and "/gallery/beta" in page.text


def test_review_page_shows_target_checklist_and_each_judge(client):
    test_client, ledger, checklists = client
    page = test_client.get("/review/r0-u001-k0")
    assert page.status_code == 200
    assert "Target: Beta" in page.text
    for item in checklists["beta"].items:
        assert item.text in page.text
    assert "reason a2.0" in page.text and "judge:b" in page.text
    # the checkboxes start from judge:a's answers: [1, 1, 1, 1, 0] for sample index 2
    ticked = re.findall(r'id="item-(\d)" checked', page.text)
    assert ticked == ["1", "2", "3", "4"]
    assert 'href="/review/r0-u002-k1"' in page.text  # next in the queue
    failed = test_client.get("/review/r0-u003-k1")
    assert "(failed)" in failed.text and "no JSON in the answer" in failed.text


def test_save_review_stores_it_and_moves_on(client):
    test_client, ledger, checklists = client
    verdicts_before = [(row.verdict.id, row.verdict.items) for row in ledger.verdicts()]
    page = test_client.get("/review/r0-u001-k0")
    response = test_client.post(
        "/review/r0-u001-k0",
        data={**form_of(page.text), "item": ["2", "5"], "note": "  border looks off  ", "via": "queue"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/review/r0-u002-k1"
    [review] = ledger.reviews(sample_id="r0-u001-k0")
    assert review.items == [0, 1, 0, 0, 1]
    assert review.reviewer == "Dr A" and review.note == "border looks off"
    assert review.checklist_version == checklists["beta"].version
    assert review.created_at > 0
    assert [(row.verdict.id, row.verdict.items) for row in ledger.verdicts()] == verdicts_before  # judge untouched

    # a second review replaces the first as "latest" but both are kept; the page starts from the latest
    page = test_client.get("/review/r0-u001-k0")
    assert re.findall(r'id="item-(\d)" checked', page.text) == ["2", "5"]
    test_client.post("/review/r0-u001-k0", data={**form_of(page.text), "item": ["1"], "note": ""})
    assert [r.items for r in ledger.reviews(sample_id="r0-u001-k0", latest_only=False)] == [[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]]
    assert ledger.latest_reviews()["r0-u001-k0"].items == [1, 0, 0, 0, 0]
    assert test_client.get("/review/r0-u001-k0").text.count("<b>Dr A</b> ·") == 2


def test_last_image_goes_back_to_queue_and_gallery_order_is_kept(client):
    test_client, ledger, checklists = client
    queue = re.findall(r'<span class="sid">([^<]+)</span>', test_client.get("/").text)
    last = queue[-1]
    page = test_client.get(f"/review/{last}")
    response = test_client.post(f"/review/{last}", data={**form_of(page.text), "via": "queue"}, follow_redirects=False)
    assert response.headers["location"] == "/?done=1"
    assert ledger.reviews(sample_id=last)[0].items == [0, 0, 0, 0, 0]
    # from the gallery, Enter walks the condition's images in id order
    alpha = sorted(s.sample_id for s in ledger.samples() if s.target_label == "alpha")
    page = test_client.get(f"/review/{alpha[0]}?via=gallery")
    assert f'href="/review/{alpha[1]}?via=gallery"' in page.text
    response = test_client.post(f"/review/{alpha[0]}", data={**form_of(page.text), "via": "gallery"}, follow_redirects=False)
    assert response.headers["location"] == f"/review/{alpha[1]}?via=gallery"


def test_agreement_per_item_follows_the_reviews(client):
    test_client, ledger, checklists = client
    checklist = checklists["alpha"]
    alpha = [s for s in ledger.samples() if s.target_label == "alpha"]
    reviewed = {}
    # review every alpha image: item 3 ("big") always met, the rest as judge:a said
    for sample in sorted(alpha, key=lambda s: s.sample_id):
        judge_items = ledger.find_verdict(sample.image_sha256, "judge:a", checklist.version).items
        items = list(judge_items)
        items[2] = 1
        reviewed[sample.sample_id] = (judge_items, items)
        page = test_client.get(f"/review/{sample.sample_id}")
        ticked = [str(i + 1) for i, value in enumerate(items) if value == 1]
        test_client.post(f"/review/{sample.sample_id}", data={**form_of(page.text), "item": ticked})
    gallery = test_client.get("/gallery/alpha").text
    rows = re.findall(r"<tr><td>(\d)</td><td>([a-z]+)</td><td>(\d+)</td>\s*<td>([^<]+)</td><td>([^<]+)</td></tr>", gallery)
    assert [row[1] for row in rows] == [item.id for item in checklist.items]
    big = [(judge[2], human[2]) for judge, human in reviewed.values()]
    expected_agreement = percent_agreement([j for j, _ in big], [h for _, h in big])
    assert rows[2][2] == str(len(alpha))
    assert rows[2][3] == f"{100 * expected_agreement:.0f} %"
    kappa = cohen_kappa([j for j, _ in big], [h for _, h in big])
    assert rows[2][4] == ("–" if math.isnan(kappa) else f"{kappa:.2f}")
    assert rows[4][3] == "100 %"  # "arm" was never changed
    assert f"({len(alpha)} reviewed images)" in gallery
    queue = test_client.get("/").text
    assert re.search(r"<td>size</td><td>\d+</td>", queue)  # per-aspect table on the queue page


def test_reviews_feed_pairs_and_kappa_gate(client, review_run):
    from magic_align.feedback import FeedbackError, run_pairs

    test_client, ledger, checklists = client
    config = review_run[0]
    for sample_id, ticked in (("r0-u000-k0", ["1", "2", "3", "4", "5"]), ("r0-u000-k1", [])):
        page = test_client.get(f"/review/{sample_id}")
        test_client.post(f"/review/{sample_id}", data={**form_of(page.text), "item": ticked})
    human = config.model_copy(update={"pairs": config.pairs.model_copy(update={"prefer_human": True})})
    run_pairs(human, 0, judge_id="judge:a")
    pairs = {pair.unit_id: pair for pair in ledger.pairs(0)}
    assert pairs["u000"].source == "human" and (pairs["u000"].outcome_a, pairs["u000"].outcome_b) == (1, 0)
    assert pairs["u001"].source == "judge"
    # the reviews contradict judge:a on several items: a strict min_kappa refuses the judge
    strict = config.model_copy(update={"pairs": config.pairs.model_copy(update={"min_kappa": 0.99})})
    with pytest.raises(FeedbackError, match="agrees too little with the human reviews"):
        run_pairs(strict, 0, judge_id="judge:a")


def test_reviewer_name_asked_at_login_when_not_fixed(review_run):
    config, ledger, samples, checklists = review_run
    with TestClient(create_app(config, judge_id="judge:a")) as test_client:
        response = test_client.get("/", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
        login = test_client.get("/login")
        assert 'name="reviewer"' in login.text and 'name="token"' not in login.text
        bad = test_client.post("/login", data={"csrf_token": CSRF.search(login.text).group(1), "reviewer": "<script>"})
        assert bad.status_code == 400 and "reviewer name" in bad.text
        test_client.post("/login", data={"csrf_token": CSRF.search(login.text).group(1), "reviewer": "Dr Ngozi Okafor"})
        page = test_client.get("/review/r0-u000-k0")
        assert page.status_code == 200
        test_client.post("/review/r0-u000-k0", data={**form_of(page.text), "item": ["1"]})
    assert ledger.reviews(sample_id="r0-u000-k0")[0].reviewer == "Dr Ngozi Okafor"


def test_missing_ledger_and_unknown_judge_are_clear_errors(review_run, tmp_path):
    config = review_run[0]
    with pytest.raises(ReviewError, match="judge 'nobody' has no verdicts"):
        create_app(config, judge_id="nobody")
    elsewhere = config.model_copy(update={"runs_dir": tmp_path / "empty"})
    with pytest.raises(ReviewError, match="does not exist; run `magic sample`"):
        create_app(elsewhere)


def test_default_judge_is_the_busiest_when_the_configured_one_has_no_verdicts(review_run):
    config, ledger, samples, checklists = review_run
    sample = samples[0]
    checklist = checklists[sample.target_label]
    from magic_align.judges.base import Verdict

    ledger.put_verdict(sample.image_sha256, "judge:b", checklist.version, "p2", Verdict(items=[1] * 5), checklist.condition)
    with TestClient(create_app(config, reviewer="x")) as test_client:
        page = test_client.get("/")
    assert "showing judge:b, the judge with the most verdicts" in page.text


def test_cli_review_command(review_run, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from magic_align.cli import app as cli
    from magic_align.review import app as review_app

    config = review_run[0]
    served = {}
    real_bind = review_app.bind_listener

    def bind(host, port):  # records the address asked for, listens on a free loopback port instead
        served.update(host=host, port=port)
        return real_bind("127.0.0.1", 0)

    monkeypatch.setattr(review_app, "bind_listener", bind)
    monkeypatch.setattr(review_app, "_serve", lambda app, listener: served.update(app=app))
    config_file = config.run_dir / "config.toml"
    result = CliRunner().invoke(cli, ["review", str(config_file), "--port", "8899", "--reviewer", "Dr A", "--judge", "judge:a"])
    assert result.exit_code == 0, result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 8899) and "app" in served
    assert "http://127.0.0.1:" in result.output and "token" not in result.output
    result = CliRunner().invoke(cli, ["review", str(config_file), "--host", "0.0.0.0", "--judge", "judge:a"])
    assert result.exit_code == 0 and "token: " in result.output
    result = CliRunner().invoke(cli, ["review", str(config_file), "--require-token", "--judge", "judge:a"])
    assert result.exit_code == 0 and "token required (--require-token)" in result.output and "token: " in result.output
    result = CliRunner().invoke(cli, ["review", str(config_file), "--judge", "nobody"])
    assert result.exit_code == 2 and "has no verdicts" in result.output
    result = CliRunner().invoke(cli, ["review", str(config_file), "--reviewer", "<x>", "--judge", "judge:a"])
    assert result.exit_code == 2 and "reviewer name" in result.output
