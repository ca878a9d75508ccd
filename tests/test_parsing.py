"""The answer parser on a corpus of answer shapes seen from real chat models (the five-item psoriasis
checklist: location, lesion type, shape and size, colour, texture): which shapes read to which verdict, and
which are refused (wrong length, conflicting answers, an undecided item)."""

from __future__ import annotations

import pytest

from magic_align.checklists.schema import load_checklists
from magic_align.judges.parsing import ItemLabels, parse_answer, phrase_verdict, token_verdict

N = 5
PSORIASIS = load_checklists("fitzpatrick20")["psoriasis"]
FINE = load_checklists("fitzpatrick20-fine")["psoriasis"]
DEMO_NEVUS = load_checklists("demo")["nevus"]


def ok(*items):
    return ("ok", list(items))


def refused_because(reason):
    return ("failed", reason)


REFUSAL = ("refused", "declined")

# (name, answer text, expected): ok(...) the items stored; refused_because(...) a failed parse whose error
# holds that text; REFUSAL the judge declined.
CORPUS = [
    # ---- lists, as asked
    ("plain list", "[1, 0, 1, 0, 0]", ok(1, 0, 1, 0, 0)),
    ("no spaces", "[1,1,1,1,1]", ok(1, 1, 1, 1, 1)),
    ("json fence", "```json\n[0, 1, 1, 0, 1]\n```", ok(0, 1, 1, 0, 1)),
    ("bare fence", "```\n[1, 0, 0, 0, 0]\n```", ok(1, 0, 0, 0, 0)),
    ("python fence", "```python\n[True, False, True, True, False]\n```", ok(1, 0, 1, 1, 0)),
    ("inline code", "`[1, 1, 0, 0, 1]`", ok(1, 1, 0, 0, 1)),
    ("prose before", "After examining the image carefully, my evaluation is: [1, 1, 0, 0, 1]", ok(1, 1, 0, 0, 1)),
    (
        "prose around",
        "The lesion sits on the elbow and shows silvery scale.\n\n[1, 1, 1, 0, 1]\n\nThe colour is too dark for criterion 4.",
        ok(1, 1, 1, 0, 1),
    ),
    ("answer prefix", "Answer: [0, 0, 0, 0, 0]", ok(0, 0, 0, 0, 0)),
    ("yes/no list", "[Yes, No, Yes, Yes, No]", ok(1, 0, 1, 1, 0)),
    ("quoted yes/no json", '["yes", "no", "no", "yes", "yes"]', ok(1, 0, 0, 1, 1)),
    ("true/false json", "[true, false, true, false, false]", ok(1, 0, 1, 0, 0)),
    ("check marks", "[✓, ✗, ✓, ✓, ✗]", ok(1, 0, 1, 1, 0)),
    ("emoji marks", "✅, ❌, ✅, ❌, ❌", ok(1, 0, 1, 0, 0)),
    ("bare commas", "1, 0, 1, 1, 0", ok(1, 0, 1, 1, 0)),
    ("bare spaces", "1 0 0 1 1", ok(1, 0, 0, 1, 1)),
    ("digit string", "10110", ok(1, 0, 1, 1, 0)),
    ("parentheses", "(1, 0, 1, 0, 1)", ok(1, 0, 1, 0, 1)),
    ("float values", "[1.0, 0.0, 1.0, 1.0, 0.0]", ok(1, 0, 1, 1, 0)),
    ("trailing comma", "[1, 0, 1, 0, 1,]", ok(1, 0, 1, 0, 1)),
    ("single-quoted python dict", "{'scores': [1, 0, 0, 1, 1]}", ok(1, 0, 0, 1, 1)),
    ("repeated identical list", "[1, 1, 0, 0, 1]\n\nFinal answer: [1, 1, 0, 0, 1]", ok(1, 1, 0, 0, 1)),
    (
        "hedged but answered",
        "I can't be fully certain from a photo, but here is my assessment: [1, 0, 0, 0, 1]",
        ok(1, 0, 0, 0, 1),
    ),
    (
        "no lesion, all zeros",
        "The image does not show a recognisable skin lesion, so every criterion is 0.\n[0, 0, 0, 0, 0]",
        ok(0, 0, 0, 0, 0),
    ),
    # ---- examples quoted from the prompt, reasoning blocks
    (
        "example echoed then answer",
        "The format asks for something like [1, 0, 1, 0, 0]. My grading of this image is [0, 0, 1, 1, 1].",
        ok(0, 0, 1, 1, 1),
    ),
    (
        "e.g. in reasoning, final answer after",
        "I need to answer with a list of five values, e.g. [1, 0, 1, 0, 0]. Looking at the image: the plaque is on "
        "the knee, thick and scaly, oval, pink with silver scale, flaky.\n\nFinal answer: [1, 1, 1, 1, 1]",
        ok(1, 1, 1, 1, 1),
    ),
    (
        "think block (DeepSeek-R1 / QwQ style)",
        "<think>\nThe user wants [1, 0, 1, 0, 0] style output. Location: knee, yes. Type: plaque, yes. Shape: oval, "
        "yes. Colour: hmm, looks brownish, no. Texture: scaly, yes. Wait, maybe [1, 1, 1, 1, 1]?\n</think>\n\n[1, 1, 1, 0, 1]",
        ok(1, 1, 1, 0, 1),
    ),
    (
        "think block, per-aspect answer after",
        "<think>Checking each aspect in turn.</think>\nLocation: 1\nLesion type: 1\nShape/size: 0\nColour: 1\nTexture: 0",
        ok(1, 1, 0, 1, 0),
    ),
    ("answer tags", "<think>scaly plaque on the elbow</think><answer>[1, 1, 0, 1, 1]</answer>", ok(1, 1, 0, 1, 1)),
    ("cut off inside the reasoning", "<think>\nLet me look at the location first. The lesion is on the", refused_because("reasoning")),
    (
        "structured template echoed then answer",
        'You asked for {"items": [{"item": 1, "verdict": 1, "reason": "..."}, {"item": 2, "verdict": 0, "reason": "..."}]}.\n'
        '{"items": [{"item": 1, "verdict": 0, "reason": "trunk"}, {"item": 2, "verdict": 1, "reason": "plaque"}, '
        '{"item": 3, "verdict": 1, "reason": "oval"}, {"item": 4, "verdict": 1, "reason": "pink"}, '
        '{"item": 5, "verdict": 0, "reason": "smooth"}]}',
        ok(0, 1, 1, 1, 0),
    ),
    # ---- one line per aspect, named by the checklist's aspects
    ("aspect: digit", "Location: 1\nLesion type: 0\nShape/size: 1\nColour: 0\nTexture: 1", ok(1, 0, 1, 0, 1)),
    (
        "bulleted aspects with words",
        "- Location: satisfied\n- Lesion type: not satisfied\n- Shape and size: satisfied\n- Color: satisfied\n"
        "- Texture: not satisfied",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "aspects out of order",
        "Colour: yes\nTexture: no\nLocation: yes\nShape: yes\nLesion type: no",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "partially with a number in brackets",
        "Location: Yes (1)\nLesion type: Yes (1)\nShape/size: Yes (1)\nColour: Partially (0)\nTexture: Partially met (1)",
        ok(1, 1, 1, 0, 1),
    ),
    ("numbered aspects with dash", "1. Location - yes\n2. Lesion type - yes\n3. Shape/size - no\n4. Colour - no\n5. Texture - yes", ok(1, 1, 0, 0, 1)),
    (
        "bold aspects with marks (GPT-4o)",
        "**Location**: ✓\n**Lesion type**: ✓\n**Shape/size**: ✓\n**Colour**: ✗\n**Texture**: ✓",
        ok(1, 1, 1, 0, 1),
    ),
    (
        "mark first, then aspect and reason",
        "✅ Location – plaques on the extensor knee\n✅ Lesion type – thick, well-demarcated plaque\n"
        "❌ Shape/size – the lesion is a thin linear streak\n✅ Colour – salmon-pink with silvery scale\n"
        "❌ Texture – no flaking visible",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "synonyms: site, morphology, dimensions, pigmentation, surface",
        "Site: met\nMorphology: met\nDimensions: not met\nPigmentation: met\nSurface: not met",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "item ids as labels",
        "location = 1\nlesion = 1\nshape = 0\ncolour = 0\ntexture = 0",
        ok(1, 1, 0, 0, 0),
    ),
    (
        "present/absent",
        "Location: present\nLesion type: present\nShape and size: present\nColour: absent\nTexture: absent",
        ok(1, 1, 1, 0, 0),
    ),
    (
        "pass/fail with reasons",
        "Location — PASS (elbow)\nLesion type — PASS (thick plaque)\nShape & size — FAIL (too small)\n"
        "Colour — PASS\nTexture — FAIL: smooth surface",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "reason first, verdict last (GPT-4o)",
        "1. **Location**: The plaques are on the extensor surface of the elbow. **Yes**\n"
        "2. **Lesion type**: Thick, sharply demarcated plaques with scale. **Yes**\n"
        "3. **Shape and size**: Oval plaques of a few centimetres. **Yes**\n"
        "4. **Colour**: The plaques look brown rather than pink-red. **No**\n"
        "5. **Texture**: Dry, flaky scale is visible. **Yes**",
        ok(1, 1, 1, 0, 1),
    ),
    (
        "label line then verdict line",
        "**1. Location**\nVerdict: Met\n\n**2. Lesion type**\nVerdict: Met\n\n**3. Shape/size**\nVerdict: Not met\n\n"
        "**4. Colour**\nVerdict: Met\n\n**5. Texture**\nVerdict: Not met",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "markdown headings with fields",
        "### Location\n- Met: yes\n- Reason: knee\n### Lesion type\n- Met: yes\n### Shape and size\n- Met: no\n"
        "### Colour\n- Met: yes\n### Texture\n- Met: yes",
        ok(1, 1, 0, 1, 1),
    ),
    (
        "markdown table",
        "| # | Criterion | Met? | Reason |\n|---|---|---|---|\n| 1 | Location | Yes | elbow |\n| 2 | Lesion type | Yes | plaque |\n"
        "| 3 | Shape/size | No | streak |\n| 4 | Colour | Yes | pink |\n| 5 | Texture | No | smooth |",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "table without numbers, verdict column last",
        "| Aspect | Observation | Verdict |\n|:--|:--|:--:|\n| Location | on the scalp | 1 |\n| Lesion type | thin patch | 0 |\n"
        "| Shape and size | round | 1 |\n| Colour | red | 1 |\n| Texture | flaky | 1 |",
        ok(1, 0, 1, 1, 1),
    ),
    ("inline aspects on one line (LLaVA)", "Location: yes, Lesion type: no, Shape/size: yes, Colour: yes, Texture: no", ok(1, 0, 1, 1, 0)),
    ("inline numbered on one line", "1. Yes 2. No 3. Yes 4. Yes 5. No", ok(1, 0, 1, 1, 0)),
    ("checkboxes", "- [x] Location\n- [x] Lesion type\n- [ ] Shape and size\n- [x] Colour\n- [ ] Texture", ok(1, 1, 0, 1, 0)),
    (
        "aspect list with a summary list that agrees",
        "Location: yes\nLesion type: yes\nShape/size: no\nColour: no\nTexture: yes\n\nFinal answer: [1, 1, 0, 0, 1]",
        ok(1, 1, 0, 0, 1),
    ),
    ("summary count that agrees", "1. yes\n2. yes\n3. no\n4. yes\n5. no\n\nScore: 3/5", ok(1, 1, 0, 1, 0)),
    # ---- numbered lines
    ("numbered yes/no", "1. yes\n2. no\n3. yes\n4. no\n5. no", ok(1, 0, 1, 0, 0)),
    ("numbered met", "1: met\n2: not met\n3: met\n4: met\n5: not met", ok(1, 0, 1, 1, 0)),
    ("numbered digits", "1) 1\n2) 0\n3) 1\n4) 1\n5) 1", ok(1, 0, 1, 1, 1)),
    ("item n:", "Item 1: 1\nItem 2: 1\nItem 3: 0\nItem 4: 0\nItem 5: 1", ok(1, 1, 0, 0, 1)),
    (
        "numbered with titles",
        "1. Location: Yes, the plaque is on the extensor elbow.\n2. Lesion type: Yes - a well-demarcated plaque.\n"
        "3. Shape/size: No, the edges are blurred.\n4. Colour: No.\n5. Texture: Yes, thick silvery scale.",
        ok(1, 1, 0, 0, 1),
    ),
    (
        "markdown bold numbered",
        "**1. Location** - Not met (the lesion is on the trunk)\n**2. Lesion type** - Met\n"
        "**3. Shape** - Met\n**4. Colour** - Not met\n**5. Texture** - Met",
        ok(0, 1, 1, 0, 1),
    ),
    (
        "criterion words",
        "Criterion 1 (location): satisfied.\nCriterion 2 (type): satisfied.\nCriterion 3 (shape): not satisfied.\n"
        "Criterion 4 (colour): satisfied.\nCriterion 5 (texture): not satisfied.",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "criterion text with 'no' inside",
        "1. The plaques are on the elbows, knees, scalp, lower back or nails: Yes\n"
        "2. The lesions are thick plaques with sharply defined borders and scale on top: No\n"
        "3. Round, oval or irregular: Yes\n4. Pink-red, no purple: Yes\n5. Dry and flaky: No",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "criteria echoed, answer on the last line",
        "Criteria:\n1. The plaques are on the elbows.\n2. The lesions are thick plaques.\n3. Round or oval.\n"
        "4. Pink-red with silvery scale.\n5. Dry and flaky.\n\nAnswer: yes, yes, no, no, yes",
        ok(1, 1, 0, 0, 1),
    ),
    ("yes/no lines", "Yes\nNo\nNo\nYes\nYes", ok(1, 0, 0, 1, 1)),
    ("bulleted", "- Yes\n- Yes\n- No\n- No\n- Yes", ok(1, 1, 0, 0, 1)),
    (
        "one verdict per line with reasons after an intro",
        "Here is my assessment:\nYes - on the knee\nYes - thick plaque\nNo - too small\nYes - pink\nNo, smooth",
        ok(1, 1, 0, 1, 0),
    ),
    ("sentences naming criteria", "Criteria 1, 2 and 4 are met. Criteria 3 and 5 are not met.", ok(1, 1, 0, 1, 0)),
    # ---- JSON
    (
        "structured json",
        '{"items": [{"item": 1, "verdict": 1, "reason": "On the elbow."}, {"item": 2, "verdict": 0, "reason": "No plaque."},'
        ' {"item": 3, "verdict": 1, "reason": "Oval."}, {"item": 4, "verdict": 0, "reason": "Too dark."},'
        ' {"item": 5, "verdict": 1, "reason": "Scaly."}]}',
        ok(1, 0, 1, 0, 1),
    ),
    (
        "structured out of order",
        '{"items": [{"item": 5, "verdict": 0, "reason": "e"}, {"item": 1, "verdict": 1, "reason": "a"},'
        ' {"item": 2, "verdict": 1, "reason": "b"}, {"item": 3, "verdict": 0, "reason": "c"}, {"item": 4, "verdict": 1, "reason": "d"}]}',
        ok(1, 1, 0, 1, 0),
    ),
    ("json keyed by number", '{"1": "yes", "2": "no", "3": "yes", "4": "no", "5": "yes"}', ok(1, 0, 1, 0, 1)),
    (
        "json keyed by aspect, out of order",
        '{"texture": 0, "colour": 1, "shape_and_size": 1, "lesion_type": 0, "location": 1}',
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json keyed by aspect with met",
        '{"location": {"met": true, "explanation": "elbow"}, "lesion type": {"met": false, "explanation": "no plaque"},'
        ' "shape": {"met": true}, "color": {"met": true}, "texture": {"met": false}}',
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json list naming criteria",
        '```json\n{"criteria": [{"criterion": "Location", "satisfied": "yes"}, {"criterion": "Lesion type", "satisfied": "yes"},'
        ' {"criterion": "Shape and size", "satisfied": "no"}, {"criterion": "Colour", "satisfied": "yes"},'
        ' {"criterion": "Texture", "satisfied": "yes"}]}\n```',
        ok(1, 1, 0, 1, 1),
    ),
    (
        "pretty-printed json with reasons (Qwen-VL)",
        '```json\n{\n  "verdicts": [1, 1, 0, 1, 0],\n  "reasons": ["on the knee", "plaque", "tiny", "pink", "no scale"]\n}\n```',
        ok(1, 1, 0, 1, 0),
    ),
    (
        "json lines, one object per item",
        '{"item": 1, "verdict": 1}\n{"item": 2, "verdict": 1}\n{"item": 3, "verdict": 0}\n{"item": 4, "verdict": 0}\n{"item": 5, "verdict": 1}',
        ok(1, 1, 0, 0, 1),
    ),
    (
        "json cut off after the last verdict",
        '{"items": [{"item": 1, "verdict": 1, "reason": "a"}, {"item": 2, "verdict": 0, "reason": "b"}, '
        '{"item": 3, "verdict": 1, "reason": "c"}, {"item": 4, "verdict": 1, "reason": "d"}, {"item": 5, "verdict": 0, "reason": "The sur',
        ok(1, 0, 1, 1, 0),
    ),
    # ---- refused: wrong length
    ("too short", "[1, 0, 1]", refused_because("wrong length 3 of 5")),
    ("four values", "[1, 0, 1, 1]", refused_because("wrong length 4 of 5")),
    ("six values", "[1, 0, 1, 1, 0, 1]", refused_because("wrong length 6 of 5")),
    ("numbered with a gap", "1. yes\n2. no\n4. yes\n5. yes", refused_because("wrong length 4 of 5")),
    ("six numbered lines", "1. yes\n2. yes\n3. no\n4. yes\n5. no\n6. yes", refused_because("wrong length 6 of 5")),
    ("four aspects", "Location: 1\nLesion type: 1\nColour: 0\nTexture: 1", refused_because("no answer for item 3")),
    (
        "truncated structured json",
        '{"items": [{"item": 1, "verdict": 1, "reason": "Face."}, {"item": 2, "verdict": 0, "reason": "No comed',
        refused_because("wrong length 2 of 5"),
    ),
    # ---- refused: conflicting answers
    ("two lists, or possibly", "[1, 0, 1, 0, 0] or possibly [1, 1, 1, 0, 0]", refused_because("conflicting answers")),
    (
        "list against aspect lines",
        "Location: yes\nLesion type: no\nShape/size: yes\nColour: no\nTexture: no\n\n[1, 1, 1, 0, 0]",
        refused_because("conflicting answers"),
    ),
    (
        "changed its mind without a think block",
        "Initially I would say [1, 1, 0, 0, 1], but on reflection the colour fits, so [1, 1, 0, 1, 1].",
        refused_because("conflicting answers"),
    ),
    ("same item twice", "1. yes\n2. no\n3. yes\n4. no\n5. yes\n2. yes", refused_because("conflicting answers for item 2")),
    ("summary count that disagrees", "1. yes\n2. yes\n3. no\n4. yes\n5. no\n\nScore: 2/5", refused_because("conflicting answers")),
    (
        "number and aspect disagree",
        "1. Colour: yes\n2. Lesion type: yes\n3. Shape/size: no\n4. Location: yes\n5. Texture: no",
        refused_because("conflicting answers"),
    ),
    # ---- refused: undecided items
    ("null in list", "[1, 0, null, 1, 0]", refused_because("item 3 undecided")),
    ("unclear word", "[yes, no, unclear, yes, no]", refused_because("item 3 undecided")),
    ("partially alone", "Location: yes\nLesion type: yes\nShape/size: yes\nColour: partially\nTexture: no", refused_because("item 4 undecided")),
    (
        "cannot determine",
        "1. Yes\n2. Yes\n3. Cannot determine from this crop\n4. No\n5. Yes",
        refused_because("item 3 undecided"),
    ),
    ("n/a in json", '{"items": [1, 1, "n/a", 0, 1]}', refused_because("item 3 undecided")),
    (
        "an aspect that cannot be told",
        "Location: I cannot tell from this close-up\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: no",
        refused_because("item 1 undecided"),
    ),
    (
        "a hedge in the explanation after the list",
        "[1, 1, 0, 1, 0]\n\nExplanation:\n1. On the knee.\n2. A thick plaque.\n3. The outline is hard to tell in this crop.\n"
        "4. Pink-red.\n5. Smooth.",
        ok(1, 1, 0, 1, 0),
    ),
    ("yes but partially", "Location: Yes, partially\nLesion type: yes\nShape/size: no\nColour: no\nTexture: no", refused_because("item 1 undecided")),
    ("warning mark", "Location ✅\nLesion type ✅\nShape/size ⚠️\nColour ✅\nTexture ❌", refused_because("item 3 undecided")),
    # ---- negations are never positives
    (
        "negations",
        "- Location: not met\n- Lesion type: unmet\n- Shape/size: does not meet the criterion\n- Colour: no\n- Texture: absent",
        ok(0, 0, 0, 0, 0),
    ),
    (
        "'not' words inside reasons",
        "Location: yes - not on the face, but on the elbow\nLesion type: yes, not a papule\nShape/size: no (not round)\n"
        "Colour: yes\nTexture: no - not flaky",
        ok(1, 1, 0, 1, 0),
    ),
    # ---- counts and measures are not verdicts
    (
        "a measure before the verdict",
        "Location: yes\nLesion type: yes\nShape and size: 1 cm plaque, too small - no\nColour: yes\nTexture: yes",
        ok(1, 1, 0, 1, 1),
    ),
    (
        "a count before the verdict",
        "1. Location: 1 plaque on the abdomen; not met\n2. Lesion type: met\n3. Shape: met\n4. Colour: met\n5. Texture: met",
        ok(0, 1, 1, 1, 1),
    ),
    # ---- lists in explanations that are not the answer, and an answer inside a JSON string
    ("citations in prose", "The lesions (see areas [1] and [2]) are thick plaques.\n[1, 1, 0, 0, 0]", ok(1, 1, 0, 0, 0)),
    ("confidences beside the list", "[1, 1, 0, 0, 0]\nConfidence: [0.9, 0.8, 0.7, 0.9, 0.6]", ok(1, 1, 0, 0, 0)),
    ("json list inside a string", '{"answer": "[1, 0, 1, 0, 0]"}', ok(1, 0, 1, 0, 0)),
    ("json words inside a string", '{"verdict": "yes, no, yes, no, no"}', ok(1, 0, 1, 0, 0)),
    ("json string of the wrong length", '{"answer": "[1, 0, 1, 0]"}', refused_because("wrong length 4 of 5")),
    # ---- no verdict at all
    ("refusal medical", "I'm sorry, but I can't help with medical diagnosis. Please consult a dermatologist.", REFUSAL),
    ("refusal curly apostrophe", "I’m unable to evaluate medical images.", REFUSAL),
    ("refusal as an ai", "As an AI, I cannot provide a clinical assessment of this photo.", REFUSAL),
    ("prose only", "The image shows a reddish area on the skin that looks somewhat inflamed.", refused_because("no verdicts")),
    ("empty", "", refused_because("empty answer")),
    ("whitespace", "   \n  ", refused_because("empty answer")),
    ("all unknown", "[null, null, null, null, null]", refused_because("item 1 undecided")),
    ("score only", "Score: 3/5", refused_because("no verdicts")),
    ("format echoed only", "Answer with 1 or 0 for each criterion, for example [1, 0, 1, 0, 0].", refused_because("example")),
    # ---- further shapes: questions answered after "?", prose that states a verdict against the list, lines
    # listing the items met, several aspects per line, hedged negations ("not clearly visible" is undecided,
    # "not visible" is 0), comments in JSON, answers cut off, a list given while declining; shapes that are
    # not read (other languages, YAML nesting, one sentence per criterion on one line) fail safely
    (
        "correct location no",
        "Location: Correct location? No\nLesion type: Yes\nShape/size: Yes\nColour: Yes\nTexture: Yes",
        ok(0, 1, 1, 1, 1),
    ),
    ("list vs prose not met", "[1, 1, 1, 1, 1]\nLocation is not met.", refused_because("conflicting answers")),
    (
        "list vs parenthetical",
        "[1,0,1,0,0] (location met, lesion type met, shape met, colour not met, texture not met)",
        refused_because("conflicting answers"),
    ),
    (
        "list + parenthetical agreeing",
        "[1,0,1,0,0] (location met, lesion type not met, shape met, colour not met, texture not met)",
        ok(1, 0, 1, 0, 0),
    ),
    (
        "list + discussion",
        "[1, 1, 0, 1, 1]\nThe location on the elbow is typical. The shape is hard to judge but looks small.",
        ok(1, 1, 0, 1, 1),
    ),
    ("items met lines", "Items met: 1, 3\nItems not met: 2, 4, 5", ok(1, 0, 1, 0, 0)),
    ("criteria met lines", "Criteria met: 1, 2, 4\nCriteria not met: 3, 5", ok(1, 1, 0, 1, 0)),
    (
        "several aspects sentences",
        "Location: Yes. Lesion type: No. Shape/size: Yes. Colour: No. Texture: No.",
        ok(1, 0, 1, 0, 0),
    ),
    (
        "met? no style",
        "Location - Met? No.\nLesion type - Met? Yes.\nShape/size - Met? Yes.\nColour - Met? No.\nTexture - Met? Yes.",
        ok(0, 1, 1, 0, 1),
    ),
    (
        "met? no numbered",
        "1. Location. Met? No.\n2. Lesion type. Met? Yes.\n3. Shape/size. Met? Yes.\n4. Colour. Met? No.\n5. Texture. Met? Yes.",
        ok(0, 1, 1, 0, 1),
    ),
    (
        "not clearly visible",
        "Location: yes\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: Not clearly visible",
        refused_because("item 5 undecided"),
    ),
    (
        "not visible",
        "Location: yes\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: Not visible",
        ok(1, 1, 1, 1, 0),
    ),
    (
        "multilingual si",
        "Location: sí\nLesion type: no\nShape/size: sí\nColour: sí\nTexture: no",
        refused_because("wrong length 2 of 5"),
    ),
    ("german ja nein list", "[Ja, Nein, Ja, Ja, Nein]", refused_because("no verdicts")),
    (
        "french oui non",
        "Localisation : oui\nType de lésion : non\nForme/taille : oui\nCouleur : oui\nTexture : non",
        refused_because("no verdicts"),
    ),
    (
        "french spaced colon english",
        "Location : yes\nLesion type : no\nShape/size : yes\nColour : yes\nTexture : no",
        ok(1, 0, 1, 1, 0),
    ),
    ("chinese colon", "Location：是\nLesion type：否", refused_because("no verdicts")),
    (
        "fullwidth colon english",
        "Location：Yes\nLesion type：No\nShape/size：Yes\nColour：Yes\nTexture：No",
        ok(1, 0, 1, 1, 0),
    ),
    ("emoji check list lines", "1. ✅\n2. ❌\n3. ✅\n4. ✅\n5. ❌", ok(1, 0, 1, 1, 0)),
    ("emoji heavy check", "Location ✔️ Lesion type ✔️ Shape/size ❌ Colour ✔️ Texture ❌", ok(1, 1, 0, 1, 0)),
    (
        "emoji keycap",
        "1️⃣ Location: ✅\n2️⃣ Lesion type: ✅\n3️⃣ Shape/size: ❌\n4️⃣ Colour: ✅\n5️⃣ Texture: ❌",
        ok(1, 1, 0, 1, 0),
    ),
    ("yaml", "location: 1\nlesion_type: 0\nshape_and_size: 1\ncolour: 1\ntexture: 0", ok(1, 0, 1, 1, 0)),
    (
        "yaml nested",
        "items:\n  - item: 1\n    verdict: 1\n  - item: 2\n    verdict: 0\n  - item: 3\n    verdict: 1\n  - item: 4\n    verdict: 1\n  - item: 5\n    verdict: 0",
        refused_because("no verdicts"),
    ),
    ("yaml fence list", "```yaml\nverdicts:\n  - 1\n  - 0\n  - 1\n  - 1\n  - 0\n```", ok(1, 0, 1, 1, 0)),
    (
        "yaml aspects met",
        "location:\n  met: true\nlesion_type:\n  met: false\nshape:\n  met: true\ncolour:\n  met: true\ntexture:\n  met: false",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "criterion dash partially (0)",
        "Criterion 1 — satisfied (1)\nCriterion 2 — satisfied (1)\nCriterion 3 — partially satisfied (0)\nCriterion 4 — not satisfied (0)\nCriterion 5 — satisfied (1)",
        ok(1, 1, 0, 0, 1),
    ),
    (
        "criterion partially no number",
        "Criterion 1 — satisfied\nCriterion 2 — satisfied\nCriterion 3 — partially satisfied\nCriterion 4 — not satisfied\nCriterion 5 — satisfied",
        refused_because("item 3 undecided"),
    ),
    ("list spaces inside", "[ 1 , 0 , 1 , 1 , 0 ]", ok(1, 0, 1, 1, 0)),
    ("list newlines inside", "[\n  1,\n  0,\n  1,\n  1,\n  0\n]", ok(1, 0, 1, 1, 0)),
    ("list newlines words", "[\n  \"yes\",\n  \"no\",\n  \"yes\",\n  \"yes\",\n  \"no\"\n]", ok(1, 0, 1, 1, 0)),
    (
        "list newlines comments",
        "[\n  1, // location\n  0, // lesion type\n  1, // shape\n  1, // colour\n  0  // texture\n]",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json fence comments",
        "```json\n{\n  \"items\": [1, 0, 1, 1, 0] // location, type, shape, colour, texture\n}\n```",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json fence hash comments",
        "```json\n[\n  1, # location\n  0, # lesion\n  1, # shape\n  1, # colour\n  0  # texture\n]\n```",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json fence block comment",
        "```json\n/* verdicts */\n{\"location\": 1, \"lesion_type\": 0, \"shape\": 1, \"colour\": 1, \"texture\": 0}\n```",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "json object comments",
        "```json\n{\n  \"location\": 1, // elbow\n  \"lesion_type\": 0, // thin\n  \"shape\": 1,\n  \"colour\": 1,\n  \"texture\": 0\n}\n```",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "cut mid sentence after lines",
        "Location: yes - on the elbow\nLesion type: yes\nShape/size: no\nColour: yes\nTexture: the scale looks dry and fla",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "cut mid sentence 3 lines",
        "1. Location: Yes\n2. Lesion type: Yes\n3. Shape/size: The plaque is",
        refused_because("wrong length 2 of 5"),
    ),
    ("cut mid list", "[1, 0, 1,", refused_because("no verdicts")),
    ("cut after list", "[1, 0, 1, 1, 0]\n\nExplanation: the location is on the elb", ok(1, 0, 1, 1, 0)),
    ("cut mid list 4", "Final answer: [1, 0, 1, 1", refused_because("no verdicts")),
    (
        "refusal with list",
        "I'm sorry, but I can't provide a medical assessment. If I had to answer, it would be [1, 0, 1, 1, 0], but please consult a dermatologist.",
        refused_because("declined"),
    ),
    (
        "refusal then list",
        "I can't diagnose skin conditions, but based purely on visual features: [1, 1, 0, 1, 0]",
        ok(1, 1, 0, 1, 0),
    ),
    ("refusal placeholder list", "I'm unable to evaluate this image. [0, 0, 0, 0, 0]", refused_because("declined")),
    (
        "refusal cannot assess list",
        "As an AI I cannot assess medical images, so I'll answer [0, 0, 0, 0, 0] for all.",
        refused_because("declined"),
    ),
    (
        "yes no slash",
        "Location: Yes/No -> Yes\nLesion type: Yes\nShape/size: No\nColour: Yes\nTexture: No",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "true false aspects",
        "Location: True\nLesion type: False\nShape/size: True\nColour: True\nTexture: False",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "correct? no everywhere",
        "Location: correct? yes\nLesion type: correct? no\nShape/size: correct? yes\nColour: correct? yes\nTexture: correct? no",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "question then no",
        "1. Is the location correct? No.\n2. Is the lesion type correct? Yes.\n3. Is the shape/size correct? Yes.\n4. Is the colour correct? No.\n5. Is the texture correct? Yes.",
        ok(0, 1, 1, 0, 1),
    ),
    (
        "question then no no numbers",
        "Is the location correct? No.\nIs the lesion type correct? Yes.\nIs the shape/size correct? Yes.\nIs the colour correct? No.\nIs the texture correct? Yes.",
        refused_because("no verdicts"),
    ),
    (
        "aspect: is it met? yes",
        "Location: Is it met? Yes\nLesion type: Is it met? No\nShape/size: Is it met? Yes\nColour: Is it met? Yes\nTexture: Is it met? No",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "not yes",
        "Location: not yes\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "scores 0/1 per aspect",
        "Location: 1/1\nLesion type: 0/1\nShape/size: 1/1\nColour: 1/1\nTexture: 0/1",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "score per line",
        "Location (score 1)\nLesion type (score 0)\nShape/size (score 1)\nColour (score 1)\nTexture (score 0)",
        refused_because("no verdicts"),
    ),
    ("items met sentence", "Items 1, 3 and 4 are met; items 2 and 5 are not.", ok(1, 0, 1, 1, 0)),
    ("met: list only", "Met: 1, 3, 4\nNot met: 2, 5", ok(1, 0, 1, 1, 0)),
    ("satisfied criteria bracket", "Satisfied criteria: [1, 3, 4]\nUnsatisfied criteria: [2, 5]", ok(1, 0, 1, 1, 0)),
    ("passed failed", "Passed: location, shape/size, colour\nFailed: lesion type, texture", ok(1, 0, 1, 1, 0)),
    (
        "list then prose agreeing",
        "[1, 1, 0, 1, 0]\nThe location is met. The texture is not met because the surface is smooth.",
        ok(1, 1, 0, 1, 0),
    ),
    (
        "list then prose colour conflict",
        "[1, 1, 0, 1, 0]\nHowever, the colour does not meet the criterion.",
        refused_because("conflicting answers"),
    ),
    (
        "list then numbered explanation conflicting",
        "[1, 1, 1, 1, 1]\n\n1. Location: not met, trunk.\n2. Lesion type: met.\n3. Shape: met.\n4. Colour: met.\n5. Texture: met.",
        refused_because("conflicting answers"),
    ),
    (
        "list then prose 'location' discussed",
        "[0, 1, 1, 1, 1]\nLocation: the lesion is on the trunk rather than the elbow.",
        ok(0, 1, 1, 1, 1),
    ),
    (
        "list then prose aspects unmet word",
        "[1, 1, 1, 1, 1]\nThe texture criterion is unmet.",
        refused_because("conflicting answers"),
    ),
    (
        "list then prose fails",
        "[1, 1, 1, 1, 1]\nThe colour fails: it is brown.",
        refused_because("conflicting answers"),
    ),
    (
        "list then prose 'not' reasoning",
        "[1, 1, 1, 1, 0]\nI checked whether the texture is met; it is not.",
        ok(1, 1, 1, 1, 0),
    ),
    (
        "bold yes bullets inline",
        "**Location:** ✅ Yes | **Lesion type:** ❌ No | **Shape/size:** ✅ Yes | **Colour:** ✅ Yes | **Texture:** ❌ No",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "python dict list",
        "{'location': True, 'lesion type': False, 'shape': True, 'colour': True, 'texture': False}",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "verdict words uppercase",
        "LOCATION: YES\nLESION TYPE: NO\nSHAPE/SIZE: YES\nCOLOUR: YES\nTEXTURE: NO",
        ok(1, 0, 1, 1, 0),
    ),
    ("medgemma unused", "<unused94>thought\nThe lesion is on the elbow...<unused95>[1, 0, 1, 1, 0]", ok(1, 0, 1, 1, 0)),
    ("llava sentence list", "The answer is 1, 0, 1, 1, 0.", ok(1, 0, 1, 1, 0)),
    ("qwen answer tag numbered", "<answer>\n1. 1\n2. 0\n3. 1\n4. 1\n5. 0\n</answer>", ok(1, 0, 1, 1, 0)),
    (
        "reasoning model final",
        "Let me evaluate each criterion.\nLocation: the elbow, which matches.\nLesion type: a thick plaque, matches.\nShape: oval, fine.\nColour: brown, not pink.\nTexture: flaky.\n\n**Final answer:** [1, 1, 1, 0, 1]",
        ok(1, 1, 1, 0, 1),
    ),
    (
        "colour doesnt match prose after list",
        "[1, 1, 1, 1, 1]\nThe colour doesn't match: the plaque is brown.",
        refused_because("conflicting answers"),
    ),
    ("only location not met sentence", "All criteria are met except location.", refused_because("no verdicts")),
    ("yes with emoji prefix", "✅ Yes\n❌ No\n✅ Yes\n✅ Yes\n❌ No", ok(1, 0, 1, 1, 0)),
    ("one-line mixed separators", "Location=1; Lesion type=0; Shape/size=1; Colour=1; Texture=0", ok(1, 0, 1, 1, 0)),
    ("pipes one line", "Location: 1 | Lesion type: 0 | Shape/size: 1 | Colour: 1 | Texture: 0", ok(1, 0, 1, 1, 0)),
    (
        "numbered with criterion text then no",
        "1. Correct location? No\n2. Correct lesion type? Yes\n3. Correct shape/size? Yes\n4. Correct colour? Yes\n5. Correct texture? Yes",
        ok(0, 1, 1, 1, 1),
    ),
    (
        "table emoji",
        "| Criterion | Met |\n|---|---|\n| Location | ✅ |\n| Lesion type | ❌ |\n| Shape/size | ✅ |\n| Colour | ✅ |\n| Texture | ❌ |",
        ok(1, 0, 1, 1, 0),
    ),
    (
        "table verdict then text no",
        "| Criterion | Verdict |\n|---|---|\n| Location | No - trunk |\n| Lesion type | Yes |\n| Shape/size | Yes |\n| Colour | Yes |\n| Texture | Yes |",
        ok(0, 1, 1, 1, 1),
    ),
    ("list with trailing dots", "[1, 0, 1, 1, 0].", ok(1, 0, 1, 1, 0)),
    (
        "cut json object",
        "{\"location\": 1, \"lesion_type\": 0, \"shape\": 1, \"colour\"",
        refused_because("wrong length 1 of 5"),
    ),
    (
        "negated yes doesn't",
        "Location: The image doesn't show the elbow, so no.\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        ok(0, 1, 1, 1, 1),
    ),
    (
        "not really met",
        "Location: not really\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "hardly",
        "Location: hardly\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "likely yes",
        "Location: likely yes\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "probably not",
        "Location: probably not\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "mostly",
        "Location: mostly\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("wrong length 4 of 5"),
    ),
    (
        "yes-ish",
        "Location: yes-ish\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("item 1 undecided"),
    ),
    (
        "no not met emphatic",
        "Location: ❌ Not met\nLesion type: ✅ Met\nShape/size: ✅ Met\nColour: ✅ Met\nTexture: ✅ Met",
        ok(0, 1, 1, 1, 1),
    ),
    (
        "mark contradicts word",
        "Location: ✅ Not met\nLesion type: ✅ Met\nShape/size: ✅ Met\nColour: ✅ Met\nTexture: ✅ Met",
        refused_because("item 1 undecided"),
    ),
    (
        "n = 5 zeroes spaced sentences",
        "Criterion 1: Met. Criterion 2: Not met. Criterion 3: Met. Criterion 4: Met. Criterion 5: Not met.",
        refused_because("wrong length 1 of 5"),
    ),
    (
        "aspect then newline yes",
        "Location\nYes\nLesion type\nNo\nShape/size\nYes\nColour\nYes\nTexture\nNo",
        refused_because("no verdicts"),
    ),
    ("none met except", "None of the criteria are met except the location.", refused_because("no verdicts")),
    ("1 = yes legend", "(1 = yes, 0 = no)\n[1, 0, 1, 1, 0]", ok(1, 0, 1, 1, 0)),
    (
        "legend Yes=1",
        "Legend: Yes = 1, No = 0\nLocation: 1\nLesion type: 0\nShape/size: 1\nColour: 1\nTexture: 0",
        ok(1, 0, 1, 1, 0),
    ),
    ("truncated ellipsis", "[1, 0, 1, ...]", refused_because("no verdicts")),
    ("list with question", "[1, 0, ?, 1, 0]", refused_because("item 3 undecided")),
    ("list with dash", "[1, 0, -, 1, 0]", refused_because("no verdicts")),
    ("thumbs", "👍 👎 👍 👍 👎", ok(1, 0, 1, 1, 0)),
    (
        "not clearly not",
        "Location: not clearly met\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        refused_because("item 1 undecided"),
    ),
    ("is not clearly visible prose", "[1, 1, 1, 1, 1]\nThe texture is not clearly visible.", ok(1, 1, 1, 1, 1)),
    (
        "does not appear to be met",
        "Location: does not appear to be met\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: yes",
        ok(0, 1, 1, 1, 1),
    ),
    (
        "cannot be confirmed",
        "Location: yes\nLesion type: yes\nShape/size: yes\nColour: yes\nTexture: cannot be confirmed",
        refused_because("item 5 undecided"),
    ),
    (
        "json true false with reasons prose after",
        "{\"verdicts\": [true, false, true, true, false]}\nNote: colour is borderline.",
        ok(1, 0, 1, 1, 0),
    ),
]


def test_corpus_is_broad():
    assert len(CORPUS) >= 60
    assert sum(expected[0] == "ok" for _, _, expected in CORPUS) >= 40
    assert sum(expected[0] != "ok" for _, _, expected in CORPUS) >= 20


@pytest.mark.parametrize(("name", "text", "expected"), CORPUS, ids=[case[0] for case in CORPUS])
def test_answer_shapes(name, text, expected):
    parsed = parse_answer(text, N, checklist=PSORIASIS)
    status, detail = expected
    assert parsed.status == status, (name, parsed.error, parsed.items)
    assert len(parsed.items) == N and len(parsed.rationales) == N
    if status == "ok":
        assert parsed.items == detail
        assert parsed.error is None
    else:
        assert parsed.items == [None] * N  # never a verdict
        assert detail in parsed.error, parsed.error


# Shapes that name no aspect read the same without the checklist (labelled lines then count in order).
WITHOUT_CHECKLIST = [
    case for case in CORPUS
    if case[0] not in ("aspects out of order", "json keyed by aspect, out of order", "number and aspect disagree",
                       "four aspects",
                       # prose and item lists name aspects: without the checklist they are not read
                       "list vs prose not met", "list vs parenthetical", "passed failed", "list then prose colour conflict",
                       "list then prose aspects unmet word", "list then prose fails", "colour doesnt match prose after list",
                       # without aspect names these lines count in order, and fail on their length
                       "yaml nested", "table emoji", "1 = yes legend", "legend Yes=1")
]


@pytest.mark.parametrize(("name", "text", "expected"), WITHOUT_CHECKLIST, ids=[case[0] for case in WITHOUT_CHECKLIST])
def test_answer_shapes_without_checklist(name, text, expected):
    parsed = parse_answer(text, N)
    assert parsed.status == expected[0], (name, parsed.error, parsed.items)
    if expected[0] == "ok":
        assert parsed.items == expected[1]


def test_aspects_out_of_order_need_the_checklist():
    text = "Colour: no\nTexture: no\nLocation: yes\nShape: yes\nLesion type: yes"
    assert parse_answer(text, PSORIASIS).items == [1, 1, 1, 0, 0]  # the checklist in place of n_items
    assert parse_answer(text, N).items == [0, 0, 1, 1, 1]  # without it, the order given


def test_fine_checklist_aspects():
    text = (
        "Location: yes\nDistribution: yes\nLesion type: yes\nShape and size: no\nBorder: yes\nElevation: yes\n"
        "Texture: no\nColour: yes\nTranslucency and content: no"
    )
    assert parse_answer(text, FINE).items == [1, 1, 1, 0, 1, 1, 0, 1, 0]
    shuffled = "Borders: sharp - yes\nPattern: no\n" + "\n".join(
        ["Site: yes", "Morphology: yes", "Size: no", "Height: yes", "Surface: no", "Color: yes", "Contents: no"]
    )
    assert parse_answer(shuffled, FINE).items == [1, 0, 1, 0, 1, 1, 0, 1, 0]


def test_item_labels_match_ids_aspects_synonyms_and_texts():
    labels = ItemLabels(PSORIASIS)
    for label, index in [
        ("Location", 0), ("Anatomical site", 0), ("Lesion type", 1), ("Morphology", 1), ("lesion", 1),
        ("Shape/size", 2), ("Shape & size", 2), ("size", 2), ("Colour", 3), ("COLOR", 3), ("Coloration", 3),
        ("Texture", 4), ("surface", 4), ("thick plaques with sharply defined borders", 1),
    ]:
        assert labels.match(label) == index, label
    for label in ("Valid lesion", "Diagnosis", "Colour/texture", ""):
        assert labels.match(label) is None, label
    demo = ItemLabels(DEMO_NEVUS)
    assert demo.match("dark_lesion") == 0 and demo.match("uniform colour") == 4 and demo.match("Shape") == 3


def test_structured_rationales_land_on_their_items():
    text = (
        '{"items": [{"item": 2, "verdict": 0, "reason": "No plaque."}, {"item": 1, "verdict": 1, "reason": "On the elbow."}]}'
    )
    parsed = parse_answer(text, 2, "structured")
    assert parsed.items == [1, 0]
    assert parsed.rationales == ["On the elbow.", "No plaque."]


def test_aspect_lines_keep_their_reasons():
    parsed = parse_answer("Location: yes - on the elbow\nLesion type: no, a thin patch\nShape: 1\nColour: 1\nTexture: 0", PSORIASIS)
    assert parsed.rationales[:3] == ["on the elbow", "a thin patch", None]


def test_single_item_checklist():
    assert parse_answer("[1]", 1).items == [1]
    assert parse_answer("No.", 1).items == [0]
    assert parse_answer("Yes, the image shows oily skin with comedones.", 1).items == [1]
    assert parse_answer("Verdict: 0", 1).items == [0]
    assert parse_answer("[1, 0]", 1).error.startswith("wrong length 2 of 1")


def test_n_items_must_be_positive_and_match_the_checklist():
    with pytest.raises(ValueError, match="n_items"):
        parse_answer("[1]", 0)
    with pytest.raises(ValueError, match="psoriasis"):
        parse_answer("[1]", 4, checklist=PSORIASIS)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("Yes", (True, 1)), ("NOT MET", (True, 0)), ("'no'", (True, 0)), ("n/a", (True, None)), ("maybe so", (False, None)),
        ("unmet", (True, 0)), ("Not satisfied", (True, 0)), ("Partially (0)", (True, 0)), ("Partially (1)", (True, 1)),
        ("partially", (True, None)), ("cannot determine", (True, None)), ("✓", (True, 1)), ("❌", (True, 0)),
        ("Yes (0)", (True, None)), ("1/5", (False, None)), ("absent", (True, 0)), ("present", (True, 1)),
    ],
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
        ("The colour criterion is not met", 0),
        ("Texture → ✗", 0),
        ("Colour: Partially (0)", 0),
        ("Shape/size: the plaque is oval. Met.", 1),
    ],
)
def test_phrase_verdict(phrase, expected):
    assert phrase_verdict(phrase) == (True, expected)


# ---------------------------------------------------------------------------- through the HTTP judge
# (first answer, repair answer) -> (status, items or the error's reason)
REPAIRS = {
    "aspects out of order": ("Colour: no\nTexture: no\nLocation: yes\nShape: yes\nLesion type: yes", None, ("ok", [1, 1, 1, 0, 0])),
    "conflict settled by the repair": ("[1, 0, 1, 0, 0] or possibly [1, 1, 1, 0, 0]", "[1, 1, 1, 0, 0]", ("ok", [1, 1, 1, 0, 0])),
    "undecided settled by the repair": ("Location: yes\nLesion type: yes\nShape: yes\nColour: partially\nTexture: yes",
                                        "[1, 1, 1, 0, 1]", ("ok", [1, 1, 1, 0, 1])),
    "short twice": ("[1, 0, 1, 1]", "[1, 0, 1, 1]", ("failed", "wrong length 4 of 5")),
    "conflicting twice": ("[1, 1, 0, 0, 1] or [1, 1, 1, 0, 1]", "1. yes\n2. yes\n3. no\n4. no\n5. yes\n\n[1, 1, 1, 0, 1]",
                          ("failed", "conflicting answers")),
}


async def test_the_http_judge_reads_aspects_and_repairs_what_is_not_a_verdict(monkeypatch):
    from fake_openai_server import FakeChatServer
    from PIL import Image

    from magic_align.config import JudgeConfig
    from magic_align.judges.openai_judge import OpenAIJudge

    def answer(request):
        first, repair, _ = REPAIRS[current[0]]
        return (repair or "[0, 0, 0, 0, 0]") if request.is_repair else first

    current = [None]
    monkeypatch.delenv("MAGIC_TEST_PARSING_KEY", raising=False)
    with FakeChatServer(answer=answer) as server:
        judge = OpenAIJudge(JudgeConfig(base_url=server.base_url, model="fake", api_key_env="MAGIC_TEST_PARSING_KEY",
                                        max_retries=0, image_size=32))
        try:
            for name, (_, repair, (status, detail)) in REPAIRS.items():
                current[0] = name
                verdict = await judge.judge(Image.new("RGB", (32, 32), (200, 120, 120)), PSORIASIS)
                assert verdict.parse_status == status, (name, verdict.error)
                if status == "ok":
                    assert verdict.items == detail, name
                else:
                    assert verdict.items == [None] * N and detail in verdict.error, (name, verdict.error)
                assert ("[repair answer]" in verdict.raw) == (repair is not None), name
        finally:
            await judge.aclose()
