"""Pair rules against hand tables; pairs, rewards, min_kappa, and the feedback file formats."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from magic_align.checklists.schema import load_checklists
from magic_align.config import PairsConfig
from magic_align.feedback import (
    FeedbackError,
    export_authors_feedback,
    export_dpo_dataset,
    import_authors_feedback,
    is_tie,
    margin_rule,
    paper_pair_rule,
    parse_authors_feedback,
    reward,
    run_pairs,
    sample_rewards,
    score_pair,
    weighted_rule,
    weighted_score,
)
from magic_align.judges.base import Verdict

# (S_a, S_b) -> outcome, one or more rows per branch of the paper's rule (docs/method.md section 4)
PAPER_TABLE = [
    ((0, 0), (0, 0)),  # max <= 2: both lose
    ((2, 1), (0, 0)),
    ((2, 2), (0, 0)),  # equal but not > 2: both lose, not both win
    ((0, 2), (0, 0)),
    ((5, 5), (1, 1)),  # min = 5: both win
    ((3, 3), (1, 1)),  # equal > 2: both win
    ((4, 4), (1, 1)),
    ((3, 2), (1, 0)),  # otherwise the higher wins
    ((2, 3), (0, 1)),
    ((5, 0), (1, 0)),
    ((4, 5), (0, 1)),  # min is 4, not 5: the 5 wins
    ((1, 4), (0, 1)),
]


@pytest.mark.parametrize("scores, outcome", PAPER_TABLE)
def test_paper_pair_rule_hand_table(scores, outcome):
    assert paper_pair_rule(*scores) == outcome
    assert paper_pair_rule(scores[1], scores[0]) == outcome[::-1]  # the order of the pair does not matter


def test_paper_rule_counts_over_every_score_pair():
    # Over the 36 ordered pairs of sums 0..5: 9 both lose (both <= 2), 3 both win ((3,3), (4,4), (5,5)), 24 one wins
    counts = Counter()
    for a in range(6):
        for b in range(6):
            outcome = paper_pair_rule(a, b)
            counts["both win" if outcome == (1, 1) else "both lose" if outcome == (0, 0) else "one wins"] += 1
    assert counts == {"both lose": 9, "both win": 3, "one wins": 24}


def test_paper_rule_scales_with_checklist_length():
    assert paper_pair_rule(4, 3, n_items=10) == (0, 0)  # 4 <= 40 % of 10
    assert paper_pair_rule(10, 10, n_items=10) == (1, 1)
    assert paper_pair_rule(6, 5, n_items=10) == (1, 0)


@pytest.mark.parametrize(
    "scores, margin, outcome",
    [((3, 1), 1.0, (1, 0)), ((3, 2.5), 1.0, (0, 0)), ((1, 3), 2.0, (0, 1)), ((2, 2), 0.0, (0, 0)), ((2, 1), 0.0, (1, 0))],
)
def test_margin_rule(scores, margin, outcome):
    assert margin_rule(*scores, margin=margin) == outcome


def test_weighted_rule():
    weights = [3.0, 1.0, 1.0, 0.5, 0.5]
    assert weighted_score([1, 0, None, 1, 0], weights) == 3.5
    assert weighted_rule([1, 0, 0, 0, 0], [0, 1, 1, 0, 0], weights) == (1, 0)  # 3 vs 2
    assert weighted_rule([1, 0, 0, 0, 0], [0, 1, 1, 1, 0], weights, margin=1.0) == (0, 0)  # 3 vs 2.5
    with pytest.raises(FeedbackError, match="2 item weights for a checklist of 5 items"):
        weighted_score([1, 0, 0, 0, 0], [1, 1])


def test_weighted_rule_compares_float_sums_without_rounding_artefacts():
    # 0.1 + 0.2 = 0.30000000000000004 in floats: the same weight met on both sides is a tie, not a win
    assert weighted_rule([1, 1, 0], [0, 0, 1], [0.1, 0.2, 0.3], margin=0.0) == (0, 0)
    assert weighted_rule([0, 0, 1], [1, 1, 0], [0.1, 0.2, 0.3], margin=0.0) == (0, 0)
    # 0.4 + 0.3 - 0.4 = 0.29999999999999993: a lead of exactly the margin wins, as documented
    assert weighted_rule([1, 1, 0], [1, 0, 0], [0.4, 0.3, 0.1], margin=0.3) == (1, 0)
    assert weighted_rule([1, 0, 0], [1, 1, 0], [0.4, 0.3, 0.1], margin=0.3) == (0, 1)
    # a real lead below the margin stays a tie
    assert weighted_rule([1, 1, 0], [1, 0, 0], [0.4, 0.29, 0.1], margin=0.3) == (0, 0)


def test_negative_item_weights_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be >= 0"):
        PairsConfig(rule="weighted", item_weights=[1, -1, 1, 1, 1])
    with pytest.raises(ValidationError, match="finite"):
        PairsConfig(rule="weighted", item_weights=[float("nan"), 1, 1, 1, 1])


def test_ties_and_rewards():
    assert is_tie((1, 1)) and is_tie((0, 0)) and not is_tie((1, 0))
    assert reward([1, 0, 1, None, 1]) == pytest.approx(0.6)  # an undecided item counts as not met
    assert reward([1, 1, 1]) == 1.0 and reward([]) == 0.0


def test_score_pair_follows_config():
    a, b = [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]
    assert score_pair(a, b, PairsConfig()) == (3.0, 1.0, (1, 0))
    assert score_pair(a, b, PairsConfig(rule="margin", margin=3)) == (3.0, 1.0, (0, 0))
    assert score_pair(a, b, PairsConfig(rule="weighted", item_weights=[0, 0, 0, 1, 1]))[2] == (0, 0)
    with pytest.raises(FeedbackError, match="item_weights"):
        score_pair(a, b, PairsConfig(rule="weighted"))


# ---------------------------------------------------------------------------------------- run_pairs
def _judge_all(config, ledger, samples, answers, judge_id="judge-a"):
    checklists = load_checklists(config.judge.checklist)
    ids = []
    for sample, items in zip(samples, answers):
        checklist = checklists[sample.target_label]
        verdict = Verdict(items=items) if items is not None else Verdict(items=[None] * 5, parse_status="failed")
        ids.append(ledger.put_verdict(sample.image_sha256, judge_id, checklist.version, "p", verdict, checklist.condition))
    return ids


def test_run_pairs_k2(feedback_run):
    config, ledger, samples = feedback_run(units=4, k=2)
    # unit 0 (alpha): 4 vs 1 -> a wins; unit 1 (beta): 1 vs 2 -> both lose; unit 2 (alpha): 3 vs 3 -> both win;
    # unit 3: second sample failed -> no pair. In alpha 'round' (item 2) requires 'red' (item 1).
    answers = [[1, 1, 1, 1, 0], [0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], None]
    ids = _judge_all(config, ledger, samples, answers)
    summary = run_pairs(config, judge_id="judge-a")
    pairs = ledger.pairs(0)
    assert [p.unit_id for p in pairs] == ["u000", "u001", "u002"]
    assert [(p.outcome_a, p.outcome_b, p.tie) for p in pairs] == [(1, 0, False), (0, 0, True), (1, 1, True)]
    # unit 0's second sample: 'round' met but 'red' not -> round fails -> score 1 (not 2)
    assert (pairs[0].score_a, pairs[0].score_b) == (4.0, 1.0)
    assert (pairs[2].score_a, pairs[2].score_b) == (3.0, 3.0)  # [0,1,1,1,1] -> round dropped -> 3
    assert (pairs[0].verdict_a, pairs[0].verdict_b) == (ids[0], ids[1])
    assert all(p.source == "judge" and p.rule == "paper" for p in pairs)
    assert (summary.pairs, summary.one_wins, summary.both_lose, summary.both_win) == (3, 1, 1, 1)
    assert summary.missing == {samples[7].sample_id: "verdict failed"}
    # a rerun replaces, never duplicates
    run_pairs(config, judge_id="judge-a")
    assert len(ledger.pairs(0)) == 3


def test_run_pairs_k3_gives_all_pairs(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=3)
    answers = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]] * 2
    _judge_all(config, ledger, samples, answers)
    run_pairs(config, judge_id="judge-a")
    pairs = ledger.pairs(0)
    assert len(pairs) == 6
    assert [p.pair_id for p in pairs[:3]] == ["r0-u000-k0~r0-u000-k1", "r0-u000-k0~r0-u000-k2", "r0-u000-k1~r0-u000-k2"]


def test_prefer_human_uses_reviews_when_both_reviewed(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=2, extra=["pairs.prefer_human=true"])
    checklists = load_checklists(config.judge.checklist)
    _judge_all(config, ledger, samples, [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]] * 2)
    version = checklists["alpha"].version
    first = ledger.add_review(samples[0].sample_id, version, [0, 0, 0, 0, 0], "dr. a")
    second = ledger.add_review(samples[1].sample_id, version, [1, 1, 1, 1, 1], "dr. a")
    ledger.add_review(samples[2].sample_id, checklists["beta"].version, [0, 0, 0, 0, 0], "dr. a")  # partner unreviewed
    summary = run_pairs(config, judge_id="judge-a")
    pairs = ledger.pairs(0)
    assert (pairs[0].source, pairs[0].outcome_a, pairs[0].outcome_b) == ("human", 0, 1)
    assert (pairs[0].verdict_a, pairs[0].verdict_b) == (first, second)
    assert (pairs[1].source, pairs[1].outcome_a) == ("judge", 1)
    assert summary.from_human == 1
    rewards = sample_rewards(config, judge_id="judge-a")
    assert rewards[samples[0].sample_id] == 0.0 and rewards[samples[1].sample_id] == 1.0
    assert rewards[samples[2].sample_id] == 0.0  # its review counts for the reward
    assert rewards[samples[3].sample_id] == 0.0


def test_min_kappa_refuses_a_judge_that_disagrees(feedback_run):
    config, ledger, samples = feedback_run(units=3, k=2, extra=["pairs.min_kappa=0.5"])
    checklists = load_checklists(config.judge.checklist)
    judged = [[1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 1, 0, 0, 1], [0, 0, 1, 1, 1]]
    _judge_all(config, ledger, samples, judged)
    summary = run_pairs(config, judge_id="judge-a")  # no reviews yet: nothing to check against
    assert "not checked" in summary.kappa_note
    for sample, items in zip(samples, judged):
        flipped = list(items)
        flipped[0] = 1 - flipped[0]  # the expert always disagrees on color
        ledger.add_review(sample.sample_id, checklists[sample.target_label].version, flipped, "dr. a")
    with pytest.raises(FeedbackError, match=r"item 'color' has Cohen's kappa -1.00 < pairs.min_kappa = 0.5"):
        run_pairs(config, judge_id="judge-a")
    config.pairs.min_kappa = None
    assert run_pairs(config, judge_id="judge-a").pairs == 3


def test_human_backend_builds_pairs_from_reviews(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=2, extra=["judge.backend='human'"])
    version = load_checklists(config.judge.checklist)["alpha"].version
    ledger.add_review(samples[0].sample_id, version, [1, 1, 1, 0, 0], "dr. a")
    ledger.add_review(samples[1].sample_id, version, [1, 0, 0, 0, 0], "dr. a")
    summary = run_pairs(config)
    assert summary.pairs == 1 and summary.from_human == 1
    assert ledger.pairs(0)[0].outcome_a == 1


# ------------------------------------------------------------------------------------------- formats
def test_parse_authors_feedback_errors():
    assert parse_authors_feedback([[[1, 0, True], [0.0, 0, 1]]]) == [[[1, 0, 1], [0, 0, 1]]]
    with pytest.raises(FeedbackError, match="prompt 0, image 1, item 2 is 2"):
        parse_authors_feedback([[[1, 0, 1], [0, 0, 2]]])
    with pytest.raises(FeedbackError, match="one entry per prompt"):
        parse_authors_feedback({"a": 1})
    with pytest.raises(FeedbackError, match="prompt 1 should be"):
        parse_authors_feedback([[[1]], 3])


def test_authors_feedback_round_trip(feedback_run, tmp_path):
    config, ledger, samples = feedback_run(units=3, k=2)
    feedback = [[[1, 0, 1, 0, 0], [0, 0, 1, 0, 0]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], [[0, 0, 0, 0, 0], [1, 0, 1, 1, 1]]]
    path = tmp_path / "authors.json"
    path.write_text(json.dumps(feedback))
    judge_id = import_authors_feedback(config, path)
    assert judge_id == "import:authors"
    summary = run_pairs(config, judge_id=judge_id)
    assert [(p.outcome_a, p.outcome_b) for p in ledger.pairs(0)] == [(0, 0), (1, 0), (0, 1)]  # 2 vs 1, 5 vs 3, 0 vs 4
    assert summary.one_wins == 2
    out = tmp_path / "out.json"
    assert export_authors_feedback(config, out, judge_id=judge_id) == 3
    assert json.loads(out.read_text()) == feedback  # alpha's requires rule changes nothing in this feedback
    path.write_text(json.dumps(feedback[:2]))
    with pytest.raises(FeedbackError, match="has 2 prompts but round 0 has 3 units"):
        import_authors_feedback(config, path)
    path.write_text(json.dumps([[[1, 0, 1]] * 2] * 3))
    with pytest.raises(FeedbackError, match="prompt 0, image 0 has 3 items but the 'alpha' checklist has 5"):
        import_authors_feedback(config, path)


def test_dpo_export_layout(feedback_run, tmp_path):
    config, ledger, samples = feedback_run(units=3, k=2)
    _judge_all(config, ledger, samples, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0] * 5, [0] * 5])
    run_pairs(config, judge_id="judge-a")
    folder = tmp_path / "dpo"
    assert export_dpo_dataset(config, folder) == 2  # the both-lose tie is left out
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [row["label_0"] for row in rows] == [1.0, 0.0]
    assert all(row["caption"] == samples[0].prompt for row in rows)
    assert (folder / rows[0]["jpg_0"]).read_bytes() == (config.run_dir / samples[0].image_path).read_bytes()
    assert (folder / rows[0]["jpg_1"]).read_bytes() == (config.run_dir / samples[1].image_path).read_bytes()
    with open(folder / "metadata.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["jpg_0"] for row in table] == [row["jpg_0"] for row in rows]
    assert export_dpo_dataset(config, tmp_path / "dpo-ties", include_ties=True) == 3


# ------------------------------------------------------------------------------- undecided items
def test_verdicts_with_an_undecided_item_feed_no_pair_and_no_reward(feedback_run):
    from magic_align.evaluate.report import pair_outcome_counts
    from magic_align.feedback import undecided_counts

    config, ledger, samples = feedback_run(units=3, k=2)
    # unit 0: both decided (4 vs 1); unit 1: the second has an unknown item; unit 2: the first has one, but in
    # alpha 'round' (item 2) requires 'red' (item 1), so an unknown 'round' under a failed 'red' is decided (0).
    answers = [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, None, 1, 1], [0, None, 1, 1, 1], [0, 0, 0, 0, 1]]
    checklists = load_checklists(config.judge.checklist)
    for sample, items in zip(samples, answers):
        checklist = checklists[sample.target_label]
        status = "ok" if None not in items else "partial"
        ledger.put_verdict(sample.image_sha256, "judge-a", checklist.version, "p", Verdict(items=items, parse_status=status),
                           checklist.condition)
    summary = run_pairs(config, judge_id="judge-a")
    assert [p.unit_id for p in ledger.pairs(0)] == ["u000", "u002"]
    assert summary.missing == {samples[3].sample_id: "verdict with an undecided item"}
    assert summary.undecided == 1
    assert "1 verdicts with an undecided item left out" in summary.undecided_note
    assert "undecided item left out" in ledger.stage("pairs:0").detail
    rewards = sample_rewards(config, judge_id="judge-a")
    assert samples[3].sample_id not in rewards and samples[4].sample_id in rewards
    assert len(rewards) == 5
    counts = undecided_counts(ledger, checklists, "judge-a", None)
    assert counts == {0: 1}
    assert pair_outcome_counts(ledger.pairs(), counts)[0]["undecided"] == 1


def test_reviews_with_an_undecided_item_are_left_out(feedback_run):
    config, ledger, samples = feedback_run(units=1, k=2, extra=["judge.backend='human'"])
    version = load_checklists(config.judge.checklist)["alpha"].version
    ledger.add_review(samples[0].sample_id, version, [1, 1, 1, 0, 0], "dr. a")
    ledger.add_review(samples[1].sample_id, version, [1, 0, None, 0, 0], "dr. a")
    summary = run_pairs(config)
    assert summary.pairs == 0 and summary.undecided == 1
    assert summary.missing == {samples[1].sample_id: "review with an undecided item"}
