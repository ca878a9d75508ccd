"""The answer parser on a table of answer shapes seen from real chat models (five-item checklists)."""

from __future__ import annotations

import pytest

from magic_align.judges.parsing import parse_answer, phrase_verdict, token_verdict

N = 5

# (name, answer text, expected items, expected status)
CASES = [
    ("plain list", "[1, 0, 1, 0, 0]", [1, 0, 1, 0, 0], "ok"),
    ("no spaces", "[1,1,1,1,1]", [1, 1, 1, 1, 1], "ok"),
    ("json fence", "```json\n[0, 1, 1, 0, 1]\n```", [0, 1, 1, 0, 1], "ok"),
    ("bare fence", "```\n[1, 0, 0, 0, 0]\n```", [1, 0, 0, 0, 0], "ok"),
    ("python fence", "```python\n[True, False, True, True, False]\n```", [1, 0, 1, 1, 0], "ok"),
    ("prose before", "After examining the image carefully, my evaluation is: [1, 1, 0, 0, 1]", [1, 1, 0, 0, 1], "ok"),
    (
        "prose around",
        "The lesion sits on the elbow and shows silvery scale.\n\n[1, 1, 1, 0, 1]\n\nThe colour is too dark for criterion 4.",
        [1, 1, 1, 0, 1],
        "ok",
    ),
    ("answer prefix", "Answer: [0, 0, 0, 0, 0]", [0, 0, 0, 0, 0], "ok"),
    ("yes/no list", "[Yes, No, Yes, Yes, No]", [1, 0, 1, 1, 0], "ok"),
    ("quoted yes/no json", '["yes", "no", "no", "yes", "yes"]', [1, 0, 0, 1, 1], "ok"),
    ("true/false json", "[true, false, true, false, false]", [1, 0, 1, 0, 0], "ok"),
    ("check marks", "[✓, ✗, ✓, ✓, ✗]", [1, 0, 1, 1, 0], "ok"),
    ("emoji marks", "✅, ❌, ✅, ❌, ❌", [1, 0, 1, 0, 0], "ok"),
    ("bare commas", "1, 0, 1, 1, 0", [1, 0, 1, 1, 0], "ok"),
    ("bare spaces", "1 0 0 1 1", [1, 0, 0, 1, 1], "ok"),
    ("digit string", "10110", [1, 0, 1, 1, 0], "ok"),
    ("parentheses", "(1, 0, 1, 0, 1)", [1, 0, 1, 0, 1], "ok"),
    ("float values", "[1.0, 0.0, 1.0, 1.0, 0.0]", [1, 0, 1, 1, 0], "ok"),
    ("numbered yes/no", "1. yes\n2. no\n3. yes\n4. no\n5. no", [1, 0, 1, 0, 0], "ok"),
    ("numbered met", "1: met\n2: not met\n3: met\n4: met\n5: not met", [1, 0, 1, 1, 0], "ok"),
    (
        "numbered with titles",
        "1. Location: Yes, the plaque is on the extensor elbow.\n"
        "2. Lesion type: Yes - a well-demarcated plaque.\n"
        "3. Shape/size: No, the edges are blurred.\n"
        "4. Colour: No.\n"
        "5. Texture: Yes, thick silvery scale.",
        [1, 1, 0, 0, 1],
        "ok",
    ),
    (
        "markdown bold numbered",
        "**1. Location** - Not met (the lesion is on the trunk)\n**2. Lesion type** - Met\n"
        "**3. Shape** - Met\n**4. Colour** - Not met\n**5. Texture** - Met",
        [0, 1, 1, 0, 1],
        "ok",
    ),
    (
        "criterion words",
        "Criterion 1 (location): satisfied.\nCriterion 2 (type): satisfied.\nCriterion 3 (shape): not satisfied.\n"
        "Criterion 4 (colour): satisfied.\nCriterion 5 (texture): not satisfied.",
        [1, 1, 0, 1, 0],
        "ok",
    ),
    (
        "criterion text with 'no' inside",
        "1. Smooth firm papules in rings, no scale: Yes\n2. Annular: No\n3. Skin-coloured: Yes\n4. Hands: Yes\n5. Smooth: No",
        [1, 0, 1, 1, 0],
        "ok",
    ),
    ("numbered digits", "1) 1\n2) 0\n3) 1\n4) 1\n5) 1", [1, 0, 1, 1, 1], "ok"),
    (
        "structured json",
        '{"items": [{"item": 1, "verdict": 1, "reason": "On the elbow."}, {"item": 2, "verdict": 0, "reason": "No plaque."},'
        ' {"item": 3, "verdict": 1, "reason": "Oval."}, {"item": 4, "verdict": 0, "reason": "Too dark."},'
        ' {"item": 5, "verdict": 1, "reason": "Scaly."}]}',
        [1, 0, 1, 0, 1],
        "ok",
    ),
    (
        "structured out of order",
        '{"items": [{"item": 5, "verdict": 0, "reason": "e"}, {"item": 1, "verdict": 1, "reason": "a"},'
        ' {"item": 2, "verdict": 1, "reason": "b"}, {"item": 3, "verdict": 0, "reason": "c"}, {"item": 4, "verdict": 1, "reason": "d"}]}',
        [1, 1, 0, 1, 0],
        "ok",
    ),
    (
        "json keyed by number",
        '{"1": "yes", "2": "no", "3": "yes", "4": "no", "5": "yes"}',
        [1, 0, 1, 0, 1],
        "ok",
    ),
    (
        "json keyed by aspect with met",
        '{"location": {"met": true, "explanation": "face"}, "type": {"met": false, "explanation": "no pustules"},'
        ' "shape": {"met": true}, "color": {"met": true}, "texture": {"met": false}}',
        [1, 0, 1, 1, 0],
        "ok",
    ),
    ("single-quoted python dict", "{'scores': [1, 0, 0, 1, 1]}", [1, 0, 0, 1, 1], "ok"),
    ("trailing comma", "[1, 0, 1, 0, 1,]", [1, 0, 1, 0, 1], "ok"),
    (
        "example echoed then answer",
        "The format asks for something like [1, 0, 1, 0, 0]. My grading of this image is [0, 0, 1, 1, 1].",
        [0, 0, 1, 1, 1],
        "ok",
    ),
    ("yes/no lines", "Yes\nNo\nNo\nYes\nYes", [1, 0, 0, 1, 1], "ok"),
    ("bulleted", "- Yes\n- Yes\n- No\n- No\n- Yes", [1, 1, 0, 0, 1], "ok"),
    (
        "criteria echoed, answer on the last line",
        "Criteria:\n1. The plaques are on the elbows.\n2. The lesions are thick plaques.\n3. Round or oval.\n"
        "4. Pink-red with silvery scale.\n5. Dry and flaky.\n\nAnswer: yes, yes, no, no, yes",
        [1, 1, 0, 0, 1],
        "ok",
    ),
    ("too short", "[1, 0, 1]", [1, 0, 1, None, None], "partial"),
    ("too long", "[1, 0, 1, 1, 0, 1]", [1, 0, 1, 1, 0], "partial"),
    ("unknown marked", "[1, 0, null, 1, 0]", [1, 0, None, 1, 0], "partial"),
    ("unclear word", "[yes, no, unclear, yes, no]", [1, 0, None, 1, 0], "partial"),
    ("numbered with a gap", "1. yes\n2. no\n4. yes\n5. yes", [1, 0, None, 1, 1], "partial"),
    (
        "truncated structured json",
        '{"items": [{"item": 1, "verdict": 1, "reason": "Face."}, {"item": 2, "verdict": 0, "reason": "No comed',
        [1, 0, None, None, None],
        "partial",
    ),
    ("refusal medical", "I'm sorry, but I can't help with medical diagnosis. Please consult a dermatologist.", [None] * 5, "refused"),
    ("refusal curly apostrophe", "I’m unable to evaluate medical images.", [None] * 5, "refused"),
    ("refusal as an ai", "As an AI, I cannot provide a clinical assessment of this photo.", [None] * 5, "refused"),
    ("prose only", "The image shows a reddish area on the skin that looks somewhat inflamed.", [None] * 5, "failed"),
    ("empty", "", [None] * 5, "failed"),
    ("whitespace", "   \n  ", [None] * 5, "failed"),
    ("all unknown", "[null, null, null, null, null]", [None] * 5, "failed"),
    ("score only", "Score: 3/5", [None] * 5, "failed"),
    (
        "hedged but answered",
        "I can't be fully certain from a photo, but here is my assessment: [1, 0, 0, 0, 1]",
        [1, 0, 0, 0, 1],
        "ok",
    ),
]


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize(("name", "text", "items", "status"), CASES, ids=[case[0] for case in CASES])
def test_answer_shapes(name, text, items, status):
    parsed = parse_answer(text, N)
    assert parsed.items == items, name
    assert parsed.status == status, (name, parsed.error)
    assert len(parsed.rationales) == N
    if status != "ok":
        assert parsed.error


def test_structured_rationales_land_on_their_items():
    text = (
        '{"items": [{"item": 2, "verdict": 0, "reason": "No plaque."}, {"item": 1, "verdict": 1, "reason": "On the elbow."}]}'
    )
    parsed = parse_answer(text, 2, "structured")
    assert parsed.items == [1, 0]
    assert parsed.rationales == ["On the elbow.", "No plaque."]


def test_too_long_keeps_extra_values_for_the_record():
    parsed = parse_answer("[1, 0, 1, 1, 0, 1, 0]", N)
    assert parsed.extra == [1, 0]
    assert "7 values" in parsed.error


def test_single_item_checklist():
    assert parse_answer("[1]", 1).items == [1]
    assert parse_answer("No.", 1).items == [0]


def test_n_items_must_be_positive():
    with pytest.raises(ValueError, match="n_items"):
        parse_answer("[1]", 0)


@pytest.mark.parametrize(
    ("token", "expected"),
    [("Yes", (True, 1)), ("NOT MET", (True, 0)), ("'no'", (True, 0)), ("n/a", (True, None)), ("maybe so", (False, None))],
)
def test_token_verdict(token, expected):
    assert token_verdict(token) == expected


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("Location: yes, on the elbow", 1),
        ("No scale visible: no", 0),
        ("Not met - the lesion is round", 0),
        ("The colour criterion is met", 1),
        ("Texture → ✗", 0),
    ],
)
def test_phrase_verdict(phrase, expected):
    assert phrase_verdict(phrase) == (True, expected)
