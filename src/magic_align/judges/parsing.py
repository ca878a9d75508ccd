"""Read a judge's answer into one verdict per checklist item, or say why it is not one.

Real answers are not always the requested `[1, 0, 1, 0, 0]`. Chat models answer in code fences, with prose
around the list, after a `<think>` block, as yes/no words or check marks, one line per aspect ("Location: 1",
"- Lesion type: not satisfied", "**Shape/size**: ✓", "1. Location - yes", "Colour: Partially (0)"), as
markdown tables, or as JSON (a list, `{"items": [...]}`, or an object keyed by aspect or item id).
`parse_answer` collects every statement of a verdict it finds:

- lists: JSON arrays, bracketed lists (`[yes, no, ...]`, `(1, 0, ...)`), a bare sequence (`1, 0, 1, 0, 0`,
  `10100`, one yes/no per line, `Answer: yes, no, ...`);
- per-item statements: numbered lines (`1. yes`, `Item 2: not met`, `Criterion 3 (shape): satisfied`), lines
  and table rows labelled by the checklist's item ids, aspects or item texts (with synonyms and spelling
  variants: colour/color, site, morphology, ...), JSON objects per item or keyed by aspect, a label line
  followed by a `Verdict: ...` line, statements such as "criteria 1, 2 and 4 are met";

and stores a verdict only when they say one thing. It is **not** a verdict (status `failed`, every item None,
`error` saying why) when:

- a list or the numbered items have the wrong length ("wrong length 4 of 5");
- two statements disagree: two different lists, "[1, 0, 1, 0, 0] or possibly [1, 1, 1, 0, 0]", a list
  against a per-aspect line, the same item answered twice differently ("conflicting answers");
- an item is undecided: `partially`, `unclear`, `cannot determine`, `n/a`, `null` without a number in
  brackets ("item 3 undecided"); `Partially (0)` is 0, the number in brackets decides.

Repeating the same list is fine. A list quoted as an example ("e.g. [1, 0, 1, 0, 0]", "in the format ...",
a JSON template whose reasons are "...") is ignored when the answer says anything else, and the reasoning
inside `<think>` blocks is never read as the answer. An answer with no verdict at all is `refused` when it
reads as a refusal, else `failed`.

The parser never returns `partial`; that status remains for other sources (ensembles, older ledgers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from magic_align.judges.base import ParseStatus

if TYPE_CHECKING:
    from magic_align.checklists.schema import Checklist


@dataclass
class ParsedAnswer:
    items: list[int | None]
    rationales: list[str | None]
    status: ParseStatus
    error: str | None = None  # why the answer is not a verdict, for failed / refused
    extra: list[int | None] = field(default_factory=list)  # kept for compatibility; always empty


# ------------------------------------------------------------------------------------- verdict words
# A verdict at the start of a piece of text. Each alternative is tried at the start; the longest match wins
# and, on equal length, undecided before negative before positive ("not met" is never "met").
_END = r"(?![\w'’])"
_TERMINAL = r"(?=\s*(?:$|[^\w\s])|\s+[-–—])"  # followed by the end or punctuation: "No." but not "No scale"
_UNDECIDED_WORDS = [
    r"partial(?:ly)?(?:\s+(?:met|satisfied|fulfill?ed|present|true|yes|correct|visible|consistent))?",
    r"partly(?:\s+(?:met|satisfied|fulfill?ed|present|true|yes))?",
    r"somewhat(?:\s+(?:met|satisfied|present|yes))?",
    r"unclear", r"uncertain", r"unknown", r"unsure", r"undetermined", r"undecided", r"indeterminate",
    r"inconclusive", r"equivocal", r"ambiguous", r"borderline", r"debatable", r"questionable", r"mixed",
    r"not\s+(?:sure|clear|certain|determinable|assessable|evaluable|applicable|determined|assessed|evaluated)",
    r"not\s+possible\s+to\s+(?:tell|determine|assess|say|judge)",
    r"(?:cannot|can\s*not|can[’']t|could\s*not|couldn[’']t|unable\s+to)\s+(?:be\s+)?"
    r"(?:determined?|tell|told|assess(?:ed)?|evaluated?|judged?|say|confirm(?:ed)?|see|verif(?:y|ied)|decided?)",
    r"(?:hard|difficult|impossible)\s+to\s+(?:tell|say|determine|assess|judge)",
    r"insufficient(?:\s+(?:information|detail|evidence|resolution))?",
    r"maybe", r"possibly", r"perhaps", r"n/a", r"null", r"nan", r"(?:yes|no)[\s-]?ish",
    # "not clearly visible", "not fully met": doubt about the item, not a statement that it fails
    r"not\s+(?:clearly|fully|entirely|quite|obviously|definitely|completely|readily)\s+(?:\w+\s+)?"
    r"(?:met|satisfied|fulfill?ed|present|seen|visible|observed|shown|evident|true|correct|consistent|apparent|"
    r"discernible|identifiable|appreciable)",
]
_UNDECIDED_TERMINAL = [r"na", r"none"]
_NEGATIVE_WORDS = [
    r"not\s+(?:really\s+)?"
    r"(?:met|satisfied|fulfill?ed|present|seen|visible|observed|shown|evident|true|correct|passed|matched|consistent)",
    r"(?:does|do|did)\s*(?:not|n[’']t)\s+(?:\w+\s+)?(?:meet|satisfy|fulfill?|match|pass|apply|show)",
    r"(?:is|are|was|were)\s*(?:not|n[’']t)\s+(?:\w+\s+)?(?:met|satisfied|fulfill?ed|present|seen|visible|observed|evident)",
    r"un(?:met|satisfied|fulfill?ed)", r"false", r"absent", r"fail(?:s|ed|ing)?", r"incorrect", r"negative",
    r"nope", r"missing",
]
_NEGATIVE_TERMINAL = [r"no", r"n"]
_POSITIVE_WORDS = [
    r"yes", r"true", r"met", r"satisfied", r"fulfill?ed", r"fulfill?s", r"meets", r"satisfies", r"present",
    r"pass(?:es|ed)?", r"correct", r"positive", r"yep", r"confirmed",
]
_POSITIVE_TERMINAL = [r"y"]
# A count or measure ("1 cm plaque", "1 lesion on the forearm", "1 x 2 cm") is not a verdict.
_NUMBER = r"(?<![\w.])([01])(?:\.0+)?(?!\w|\.\d|\s*/\s*\d|\s*%|\s*(?:out\s+of|of)\s+\d|\s+(?!points?\b|pts?\b)[a-z])"
_POSITIVE_MARKS = "✅|✔️|✔|✓|☑️|☑|🗸|👍|🟢"
_NEGATIVE_MARKS = "❌|❎|✖️|✖|✗|✘|✕|×|⛔|🚫|☒|👎|🔴"
_UNDECIDED_MARKS = "⚠️|⚠|❓|❔|➖|🤷|🟡|🟠"
_ANY_MARK = f"{_POSITIVE_MARKS}|{_NEGATIVE_MARKS}|{_UNDECIDED_MARKS}"


def _alternatives(words: list[str], terminal: list[str]) -> str:
    return "|".join([f"(?:{word}){_END}" for word in words] + [f"(?:{word}){_TERMINAL}" for word in terminal])


_OPENING = r"^[\s*_`'\"“”‘’(\[{<]*"
_LEADING_PATTERNS: list[tuple[re.Pattern, int | None]] = [
    (re.compile(_OPENING + f"(?:{_alternatives(_UNDECIDED_WORDS, _UNDECIDED_TERMINAL)}|{_UNDECIDED_MARKS}|\\?+)", re.I), None),
    (re.compile(_OPENING + f"(?:{_alternatives(_NEGATIVE_WORDS, _NEGATIVE_TERMINAL)}|{_NEGATIVE_MARKS})", re.I), 0),
    (re.compile(_OPENING + f"(?:{_alternatives(_POSITIVE_WORDS, _POSITIVE_TERMINAL)}|{_POSITIVE_MARKS})", re.I), 1),
]
_LEADING_NUMBER = re.compile(_OPENING + _NUMBER)
_LEADING_FRACTION = re.compile(_OPENING + r"([01])\s*/\s*1(?![\d.,])")  # "Location: 1/1", "0/1"
_MARK = re.compile(f"^[\\s*_`'\"(\\[]*(?:{_ANY_MARK})\\s*$")
_QUESTION_AFTER = re.compile(r"^[^.!\n?]{0,60}\?")
# "Yes/No", "1 or 0": the answer format echoed, not an answer.
_FORMAT_ECHO = re.compile(r"^\s*(?:/|or|\|)\s*(?:no|not\s+met|0|yes|1|met)\b", re.I)
_BRACKET_AFTER = re.compile(
    r"^\s*(?:[\(\[]\s*(?:(?:score|value|verdict)\s*[:=]?\s*|=\s*|→\s*)?(?P<inside>[^()\[\]]{1,20}?)\s*[\)\]]"
    r"|(?:→|->|=>|=)\s*(?P<arrow>[01])(?![\w.]))",
    re.I,
)
_HEDGE_AFTER = re.compile(r"^\s*[,;–—-]?\s*(?:but\s+)?(?:only\s+)?(?:partial(?:ly)?|partly|somewhat|\?)", re.I)


def _leading(text: str) -> tuple[bool, int | None, int]:
    """(found, value, end) for a verdict at the very start of `text`."""
    best: tuple[int, int, int | None] | None = None  # (length, -priority, value)
    for priority, (pattern, value) in enumerate(_LEADING_PATTERNS):
        match = pattern.match(text)
        if match and (best is None or match.end() > best[0]):
            best = (match.end(), -priority, value)
    for pattern in (_LEADING_NUMBER, _LEADING_FRACTION):
        match = pattern.match(text)
        if match and (best is None or match.end() > best[0]):
            best = (match.end(), 0, int(match.group(1)))
    if best is None:
        return False, None, 0
    return True, best[2], best[0]


def _refined(value: int | None, rest: str) -> tuple[bool, int | None, int]:
    """What follows a leading verdict may settle or unsettle it: "Partially (0)" is 0, "Yes (0)" is a
    contradiction, "Yes, partially" undecided, "Yes/No" only the format echoed. Returns (found, value, used)."""
    if value == 1 and _FORMAT_ECHO.match(rest):
        return False, None, 0
    match = _BRACKET_AFTER.match(rest)
    if match:
        inside = match.group("inside") if match.group("inside") is not None else match.group("arrow")
        found, said, end = _leading(inside)
        if found and not inside[end:].strip(" .,:;*_`'\""):
            if value is None:
                return True, said, match.end()
            return True, (value if said == value else None), match.end()
    if value is not None and _HEDGE_AFTER.match(rest):
        return True, None, 0
    return True, value, 0


def _verdict_at_start(text: str) -> tuple[bool, int | None, int]:
    """(found, value, end) of a verdict that opens `text`, with what follows it taken into account."""
    found, value, end = _leading(text)
    if not found or _QUESTION_AFTER.match(text[end:]):
        return False, None, 0  # "Correct location? No": the verdict word opens a question, its answer follows
    if _MARK.match(text[:end]):
        # a check mark followed by a verdict word is one verdict; "✅ Not met" contradicts itself
        said, second, second_end = _leading(text[end:])
        if said and not _MARK.match(text[end:end + second_end]) and not _QUESTION_AFTER.match(text[end + second_end:]):
            value = value if second == value else None
            end += second_end
    found, value, used = _refined(value, text[end:])
    return found, value, end + used


_SPACE = re.compile(r"\s+")


def _plain(text: str) -> str:
    """Markdown emphasis, code ticks and curly quotes out; whitespace collapsed."""
    text = text.replace("**", "").replace("__", "").replace("`", "")
    text = re.sub(r"(?<!\w)[*_]|[*_](?!\w)", "", text)
    text = text.replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return _SPACE.sub(" ", text).strip()


def token_verdict(token: str) -> tuple[bool, int | None]:
    """(recognised, value) for a text that is only a verdict: 'Yes', '0', '✓', 'not met', 'n/a', 'Partially (0)'."""
    text = _plain(str(token)).strip(" .,:;!")
    if not text:
        return False, None
    found, value, end = _verdict_at_start(text)
    if not found or text[end:].strip(" .,:;!*_`'\")]}"):
        return False, None
    return True, value


_PIECES = re.compile(r"[.;:!?]\s+|,\s+|\s[-–—]\s|[–—→]|->|=>|[()\[\]]|\s\|\s")
_EXPLICIT = re.compile(
    r"\b(?:final\s+)?(?:verdict|answer|score|result|rating|decision|judg(?:e)?ment|assessment|status|grade|"
    r"met\??|satisfied\??|criterion\s+met\??)\s*[:=]\s*",
    re.I,
)
_STRONG = re.compile(
    r"\b(?:(?:is|are|was|were|appears?\s+to\s+be|seems?\s+to\s+be|looks?)\s+)?((?:not|n't|never)\s+(?:\w+\s+)?)?"
    r"(met|satisfied|fulfill?ed)\b|\b(un(?:met|satisfied|fulfill?ed))\b|\b(partially|partly)\s+(?:met|satisfied|fulfill?ed)\b",
    re.I,
)
_NEGATION_BEFORE = re.compile(r"\b(?:not|never|no\s+longer|hardly|barely)\b|n't\b(?:\s+\w+){0,4}\s*$", re.I)
_REASONING = re.compile(r"\b(?:if|whether|check|need|let\s+me|let's|determine|should|would|might|could)\b", re.I)
_UNDECIDED_ANYWHERE = re.compile(
    r"\b(?:unclear|uncertain|indeterminate|inconclusive|not\s+(?:sure|clear|certain|assessable)|"
    r"(?:cannot|can\s*not|can't|could\s*not|couldn't|unable\s+to)\s+(?:be\s+)?(?:determined?|tell|told|assess(?:ed)?|judged?|say)|"
    r"(?:hard|difficult|impossible)\s+to\s+(?:tell|say|determine|assess|judge))" + _END,
    re.I,
)
_MARK_ANYWHERE = re.compile(f"({_POSITIVE_MARKS})|({_NEGATIVE_MARKS})|({_UNDECIDED_MARKS})")


def _value_in(text: str) -> tuple[bool, int | None, str | None]:
    """(found, value, reason) for the verdict stated in a piece of prose that belongs to one item.

    In order: a verdict that opens it ("Yes, on the elbow", "Not met - ..."), an explicit "Verdict: 0" or
    "→ 1", a verdict that closes it ("... on the elbow. **Met**", "... (1)"), "... is met / is not satisfied"
    (all occurrences agreeing, outside reasoning such as "check whether it is met"), a check mark.
    """
    text = _plain(text)
    if not text:
        return False, None, None
    question, mark, answer = text.rpartition("?")
    if mark and re.search(r"\w", question):
        # "Correct location? No", "Met? Yes": only the answer to the question says something
        if not answer.strip(" .,:;!*_'\"-–—"):
            return False, None, None
        return _value_in(answer)
    found, value, end = _verdict_at_start(text)
    if found:
        return True, value, _reason(text[end:])
    for match in _EXPLICIT.finditer(text):
        found, value, end = _verdict_at_start(text[match.end():])
        if found:
            return True, value, _reason(text[: match.start()])
    for arrow in re.finditer(r"→|->|=>", text):
        found, value, _ = _verdict_at_start(text[arrow.end():])
        if found:
            return True, value, _reason(text[: arrow.start()])
    pieces = [piece.strip(" .,:;!*_'\"") for piece in _PIECES.split(text)]
    pieces = [piece for piece in pieces if piece]
    if len(pieces) > 1:
        found, value = token_verdict(re.sub(r"^(?:so|hence|therefore|thus|thus,|overall)\s+", "", pieces[-1], flags=re.I))
        if found:
            return True, value, _reason(text[: text.rfind(pieces[-1])])
    if not _REASONING.search(text):
        said = set()
        for match in _STRONG.finditer(text):
            clause = re.split(r"[.,;:!]|\b(?:but|and|although|though|however|while|whereas)\b", text[: match.start()])[-1]
            if match.group(4):
                said.add(None)
            elif match.group(3) or match.group(1) or _NEGATION_BEFORE.search(clause):
                said.add(0)
            else:
                said.add(1)
        if len(said) == 1:
            return True, said.pop(), _reason(text)
    marks = {1 if match.group(1) else 0 if match.group(2) else None for match in _MARK_ANYWHERE.finditer(text)}
    if len(marks) == 1:
        return True, marks.pop(), _reason(_MARK_ANYWHERE.sub("", text))
    return False, None, None


def _reason(text: str) -> str | None:
    reason = text.strip(" \t.,:;-–—()[]*_`'\"")
    return reason or None


def phrase_verdict(phrase: str) -> tuple[bool, int | None]:
    """The verdict stated in one line of prose ("Location: yes, on the elbow", "Not met - no scale seen")."""
    text = _plain(phrase)
    found, value, _ = _verdict_at_start(text)
    if found:
        return True, value
    head, _, tail = _split_label(text)
    if tail is not None:
        found, value, _ = _value_in(tail)
        if found:
            return True, value
    found, value, _ = _value_in(text)
    return found, value


# ------------------------------------------------------------------------------------ item labels
_SYNONYMS = {
    "color": "colour", "coloration": "colour", "colouration": "colour", "coloring": "colour", "colouring": "colour",
    "pigmentation": "colour", "pigment": "colour", "hue": "colour",
    "site": "location", "localization": "location", "localisation": "location", "position": "location",
    "region": "location", "placement": "location",
    "morphology": "lesion", "morphologic": "lesion", "morphological": "lesion", "kind": "type",
    "form": "shape", "configuration": "shape", "outline": "shape", "geometry": "shape",
    "dimension": "size", "diameter": "size", "sizing": "size",
    "surface": "texture",
    "edge": "border", "margin": "border", "boundary": "border", "demarcation": "border",
    "height": "elevation", "elevated": "elevation", "raised": "elevation",
    "pattern": "distribution", "arrangement": "distribution", "spread": "distribution",
    "translucent": "translucency", "transparency": "translucency",
    "number": "count", "quantity": "count",
    "present": "presence",
}
_FILLER = {
    "the", "of", "a", "an", "and", "or", "in", "its", "criterion", "criteria", "item", "aspect", "feature",
    "features", "characteristic", "characteristics", "anatomical", "anatomic", "body", "primary", "check", "lesion's",
}
_NOT_ITEM_LABELS = {
    "note", "notes", "reason", "reasons", "reasoning", "explanation", "comment", "comments", "rationale",
    "observation", "observations", "summary", "conclusion", "answer", "final answer", "verdict", "verdicts",
    "final verdict", "result", "results", "output", "score", "scores", "total", "image", "assessment",
    "evaluation", "justification", "confidence", "diagnosis", "analysis", "description", "caveat", "disclaimer",
    "list", "format", "example", "status", "overall assessment", "overall score", "final", "thoughts", "thinking",
    "criteria", "checklist", "impression", "findings", "finding", "details", "detail", "evidence", "response",
    "my answer", "final list", "answer list", "met", "satisfied", "decision", "grade", "rating", "value",
}


def _words(text: str) -> list[str]:
    words = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _FILLER:
            continue
        word = _SYNONYMS.get(word, word)
        if word.endswith("s") and len(word) > 4 and not word.endswith("ss"):
            word = _SYNONYMS.get(word[:-1], word[:-1])
        words.append(word)
    return words


class ItemLabels:
    """Matches a label in an answer ("Lesion type", "Color", "shape/size", "dark_lesion", an item's text) to
    the index of a checklist item."""

    def __init__(self, checklist: "Checklist") -> None:
        self.keys = []
        for item in checklist.items:
            names = {frozenset(_words(item.id.replace("_", " ").replace("-", " "))), frozenset(_words(item.aspect))}
            vocabulary = set().union(*names)
            text_words = {word for word in _words(item.text) if len(word) > 2}
            self.keys.append((names, vocabulary, text_words))

    def match(self, label: str, names_only: bool = False) -> int | None:
        """The item `label` names: by id or aspect (all its words among them), else (unless `names_only`) by
        most of the words of one item's text."""
        words = frozenset(_words(re.sub(r"\d+", " ", label)))
        if not words:
            return None
        exact = [index for index, (names, _, _) in enumerate(self.keys) if words in names]
        if len(exact) == 1:
            return exact[0]
        within = [index for index, (_, vocabulary, _) in enumerate(self.keys) if words <= vocabulary]
        if len(within) == 1:
            return within[0]
        if len(words) >= 3 and not names_only:
            overlap = sorted(((len(words & text) / len(words), index) for index, (_, _, text) in enumerate(self.keys)),
                             reverse=True)
            best = overlap[0]
            if best[0] >= 0.6 and (len(overlap) == 1 or overlap[1][0] < best[0]):
                return best[1]
        return None


# -------------------------------------------------------------------------------------- statements
@dataclass
class _Entry:
    value: int | None
    reason: str | None = None
    position: int | None = None  # 0-based item index when the answer numbers its items
    label: str | None = None  # the aspect or item name the answer gave it
    hedge: bool = False  # undecided only by a word in prose ("I cannot tell"): yields to a verdict stated elsewhere


@dataclass
class _Statement:
    """One statement of the verdict: a list (values by position) or per-item entries."""

    entries: list[_Entry]
    kind: str  # "list" | "items"
    where: str  # for error messages
    start: int = 0  # offset in the text
    example: bool = False  # quoted as an example ("e.g. [1, 0, 1]")


_EXAMPLE_BEFORE = re.compile(
    r"(?:\be\.?\s?g\b\.?|for\s+(?:example|instance)|\bexample\b|\bsuch\s+as|\bsomething\s+like|"
    r"\b(?:list|answer|output|values|response|reply)\s+like|\btemplate\b|\bin\s+the\s+form\b|\bof\s+the\s+form\b|"
    r"\bformat\s+(?:like|such\s+as|of)\b)[^.\n\[\]{}]{0,40}$",
    re.I,
)


def _looks_like_example(text: str, start: int) -> bool:
    return bool(_EXAMPLE_BEFORE.search(text[max(0, start - 80): start]))


def _show(entries: list[_Entry]) -> str:
    return "[" + ", ".join("?" if entry.value is None else str(entry.value) for entry in entries) + "]"


# ------------------------------------------------------------------------------------------- JSON
_CONTAINER_KEYS = (
    "items", "verdicts", "answers", "results", "criteria", "checklist", "evaluation", "evaluations", "scores",
    "answer", "verdict", "result", "output", "final_answer", "final answer", "assessment", "assessments",
    "values", "list", "grades", "aspects", "ratings",
)
_VERDICT_KEYS = (
    "verdict", "met", "value", "answer", "score", "result", "satisfied", "pass", "passed", "decision", "grade",
    "meets", "fulfilled", "is_met", "present", "status", "assessment", "judgement", "judgment", "rating", "label",
    "evaluation", "verdict (0/1)", "met (0/1)",
)
_REASON_KEYS = ("reason", "rationale", "explanation", "justification", "comment", "why", "evidence", "notes", "observation")
_POSITION_KEYS = ("item", "id", "index", "criterion", "number", "n", "idx", "item_id", "criterion_id", "item_number",
                  "criterion_number", "no", "#")
_LABEL_KEYS = ("aspect", "name", "criterion", "item", "criterion_name", "category", "feature", "title", "key", "id",
               "label", "item_name")


def _position_from(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value - 1 if value >= 1 else None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:(?:item|criterion|criteria|c|q|question|no\.?|#)\s*[_#.\-]?\s*)?(\d{1,3})\s*", value, re.I)
        if match:
            return int(match.group(1)) - 1
    return None


def _scalar_verdict(value: object) -> tuple[bool, int | None]:
    if isinstance(value, bool):
        return True, int(value)
    if isinstance(value, (int, float)):
        return (True, int(value)) if value in (0, 1) else (True, None) if 0 < value < 1 else (False, None)
    if value is None:
        return True, None
    if isinstance(value, str):
        found, verdict = token_verdict(value)
        if found:
            return True, verdict
        if len(value) < 300:
            found, verdict, _ = _value_in(value)
            return found, verdict
    return False, None


def _list_in_string(text: str) -> list[_Entry] | None:
    """The verdicts of a JSON string that holds a whole list ("[1, 0, 1]", "yes, no, yes"), else None."""
    body = text.strip()
    bracketed = re.fullmatch(r"[\[(](.*)[\])]", body, re.DOTALL)
    if bracketed:
        body = bracketed.group(1)
    return _sequence(body, 2)


def _lower_keys(mapping: dict) -> dict:
    return {str(key).strip().lower(): value for key, value in mapping.items()}


def _entry_from_dict(mapping: dict) -> _Entry | None:
    lowered = _lower_keys(mapping)
    found, value = False, None
    for key in _VERDICT_KEYS:
        if key in lowered and not isinstance(lowered[key], (dict, list)):
            found, value = _scalar_verdict(lowered[key])
            if found:
                break
    if not found:
        return None
    reason = next((str(lowered[key]) for key in _REASON_KEYS if isinstance(lowered.get(key), str)), None)
    position = next((p for p in (_position_from(lowered[key]) for key in _POSITION_KEYS if key in lowered) if p is not None), None)
    label = next((str(lowered[key]) for key in _LABEL_KEYS
                  if isinstance(lowered.get(key), str) and _position_from(lowered[key]) is None), None)
    return _Entry(value, reason, position, label)


def _json_statement(value: object) -> tuple[list[_Entry], str] | None:
    """Entries from a decoded JSON value and their kind ('list' or 'items'), or None when it holds no verdicts."""
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(element, (int, float)) and not isinstance(element, bool) and element not in (0, 1)
               for element in value):
            return None  # confidences or measures ("[0.9, 0.8]", "[2, 3] cm"), not verdicts
        if all(isinstance(element, dict) for element in value):
            entries = [_entry_from_dict(element) for element in value]
            if not any(entry is not None for entry in entries):
                return None
            entries = [entry or _Entry(None) for entry in entries]
            identified = all(entry.position is not None or entry.label is not None for entry in entries)
            return entries, ("items" if identified else "list")
        entries = []
        for element in value:
            if isinstance(element, (dict, list)):
                return None
            found, verdict = _scalar_verdict(element)
            if not found:
                return None
            entries.append(_Entry(verdict, element if isinstance(element, str) and len(element) > 12 else None))
        return entries, "list"
    if isinstance(value, dict):
        lowered = _lower_keys(value)
        for key in _CONTAINER_KEYS:
            if isinstance(lowered.get(key), (list, dict)):
                inner = _json_statement(lowered[key])
                if inner:
                    return inner
            elif isinstance(lowered.get(key), str):
                listed = _list_in_string(lowered[key])  # {"answer": "[1, 0, 1, 0, 0]"}
                if listed is not None:
                    return listed, "list"
        single = _entry_from_dict(value)
        if single is not None:
            return [single], "items" if (single.position is not None or single.label is not None) else "list"
        entries = []
        for key, element in value.items():
            position = _position_from(key)
            label = None if position is not None else str(key)
            if label is not None and label.strip().lower() in _NOT_ITEM_LABELS:
                continue
            if isinstance(element, dict):
                entry = _entry_from_dict(element)
                if entry is None:
                    return None
                entry.position = entry.position if entry.position is not None else position
                entry.label = label if entry.position is None else entry.label
            elif isinstance(element, list):
                return None
            else:
                found, verdict = _scalar_verdict(element)
                if not found:
                    return None
                reason = element if isinstance(element, str) and len(element) > 12 else None
                entry = _Entry(verdict, reason, position, label)
            entries.append(entry)
        return (entries, "items") if entries else None
    return None


def _repair_json_text(text: str) -> str:
    """Python literals and sloppy JSON into JSON, keeping every offset: single quotes, True/False/None,
    trailing commas."""
    repaired = re.sub(r"\bTrue\b", "true", text)
    repaired = re.sub(r"\bFalse\b", "false", repaired)
    repaired = re.sub(r"\bNone\b", "null", repaired)
    repaired = re.sub(r"'([^'\\\n]*)'", r'"\1"', repaired)
    return re.sub(r",(\s*[\]}])", r" \1", repaired)


def _is_template(value: object) -> bool:
    """A JSON answer that is the prompt's template: every reason is '...'."""
    text = json.dumps(value)
    reasons = re.findall(r'"(?:reason|rationale|explanation)"\s*:\s*"([^"]*)"', text)
    return bool(reasons) and all(reason.strip() in ("...", "…", "") for reason in reasons)


def _json_statements(text: str, n_items: int = 0) -> tuple[list[_Statement], list[tuple[int, int]]]:
    """Statements from every JSON value in the text, and the spans they cover (read no further). A bare
    one-value list in a longer checklist's answer is a citation ("see areas [1] and [2]"), not a verdict."""
    decoder = json.JSONDecoder()
    statements: list[_Statement] = []
    spans: list[tuple[int, int]] = []
    repaired = _repair_json_text(text)
    index = 0
    while index < len(text):
        if text[index] not in "[{":
            index += 1
            continue
        decoded = None
        for source in (text, repaired):
            try:
                decoded = decoder.raw_decode(source, index)
                break
            except json.JSONDecodeError:
                continue
        if decoded is None:
            index += 1
            continue
        value, end = decoded
        found = _json_statement(value)
        if found and n_items > 1 and isinstance(value, list) and len(value) == 1 and not isinstance(value[0], (dict, list)):
            spans.append((index, end))
            index = end
            continue
        if found:
            entries, kind = found
            example = _is_template(value) or _looks_like_example(text, index)
            statements.append(_Statement(entries, kind, f"the JSON {text[index:end][:60]}", index, example))
            spans.append((index, end))
            index = end
        elif isinstance(value, (dict, list)) and (isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in value)):
            spans.append((index, end))  # JSON without verdicts (e.g. only reasons): not read as lines either
            index = end
        else:
            index += 1
    return statements, spans


_FRAGMENT = re.compile(
    r'(?:"(?:item|id|criterion)"\s*:\s*"?(\d{1,3})"?\s*,\s*)?"(?:verdict|met|value|satisfied)"\s*:\s*("?[A-Za-z0-9. ]{1,16}"?)',
    re.I,
)


def _fragment_statement(text: str) -> _Statement | None:
    """`"item": 3, "verdict": 1` pieces of JSON cut off by the token limit."""
    if not re.search(r'[\[{]\s*"', text):
        return None
    entries = []
    for match in _FRAGMENT.finditer(text):
        found, value = token_verdict(match.group(2).strip('"'))
        if not found:
            continue
        entries.append(_Entry(value, None, int(match.group(1)) - 1 if match.group(1) else None))
    if not entries:
        return None
    if all(entry.position is not None for entry in entries):
        return _Statement(entries, "items", "the JSON that was cut off")
    for entry in entries:
        entry.position = None
    return _Statement(entries, "list", "the JSON that was cut off")


# ----------------------------------------------------------------------------------- lists in text
_BRACKETED = re.compile(r"[\[(]([^\[\]()\n]{1,400})[\])]")


def _sequence(body: str, min_length: int) -> list[_Entry] | None:
    """Entries when `body` is nothing but verdicts separated by commas, semicolons, slashes or spaces."""
    body = body.strip()
    if not body or re.search(r"\w\?", body):
        return None
    if re.search(r"[,;]", body):
        chunks = re.split(r"\s*[,;]\s*", body)
    elif "/" in body and not re.search(r"\b(?:yes|1|met)\s*/\s*(?:no|0|not)", body, re.I):
        chunks = re.split(r"\s*/\s*", body)
    else:
        chunks = _split_spaced(body)
    chunks = [chunk for chunk in chunks if chunk.strip()]
    if len(chunks) < min_length:
        return None
    entries = []
    for chunk in chunks:
        found, value = token_verdict(re.sub(r"^(?:and|or)\s+", "", chunk.strip(), flags=re.I))
        if not found:
            return None
        entries.append(_Entry(value))
    return entries


def _split_spaced(body: str) -> list[str]:
    """Space-separated verdicts, keeping two-word verdicts ("not met") together."""
    chunks: list[str] = []
    rest = body.strip()
    while rest:
        found, _, end = _verdict_at_start(rest)
        if not found or end == 0:
            return rest.split()  # not all verdicts: the caller rejects it
        chunks.append(rest[:end])
        rest = rest[end:].strip()
    return chunks


def _bracket_statements(text: str, n_items: int) -> list[_Statement]:
    statements = []
    for match in _BRACKETED.finditer(text):
        entries = _sequence(match.group(1), 1 if n_items == 1 else 2)
        if entries is None or all(entry.value is None for entry in entries) and len(entries) < 2:
            continue
        statements.append(_Statement(entries, "list", f"the list {match.group(0)}", match.start(),
                                     _looks_like_example(text, match.start())))
    return statements


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:(?:my|the)\s+)?(?:final\s+)?(?:answers?|verdicts?|results?|output|scores?|evaluation|list|grades?|"
    r"assessment|response|ratings?)(?:\s*\([^)]*\))?\s*(?:is|are)?\s*[:=]?\s*",
    re.I,
)
_BULLET = re.compile(r"^\s*(?:[-*•+>]|#{1,6})\s*")


def _line_sequences(lines: list[tuple[int, str]], n_items: int) -> list[_Statement]:
    """Lines that are a whole sequence ("1, 0, 1, 0, 0", "Answer: yes, no, ...", "10110"), and runs of
    lines that each hold one verdict ("Yes" / "- No, too small" / "✓")."""
    statements = []
    run: list[_Entry] = []
    run_start = 0
    for offset, line in lines + [(-1, "")]:
        body = _ANSWER_PREFIX.sub("", _plain(_BULLET.sub("", line)), count=1) if offset >= 0 else ""
        entries = None
        if body and re.fullmatch(r"[01]{2,}", body) and len(body) == n_items:
            entries = [_Entry(int(char)) for char in body]
        elif body and not re.match(r"^\s*[\[(]", body):
            entries = _sequence(body, 2)
            introduced = re.match(r"^[^:\n]{1,60}:\s*(?=\S)", body)
            if entries is None and introduced and len(introduced.group(0).split()) <= 8:
                # "Scores for criteria 1-5: 1, 1, 0, 1, 0"
                entries = _sequence(body[introduced.end():], min(3, n_items) if n_items > 1 else 2)
        if entries is not None:
            statements.append(_Statement(entries, "list", f"the line {line.strip()[:60]!r}", offset))
        single = None
        if entries is None and body and offset >= 0 and not _NUMBERED.match(line):
            found, value, reason = _leading_value(body)
            if found:
                single = _Entry(value, reason)
        if single is not None:
            if not run:
                run_start = offset
            run.append(single)
            continue
        if len(run) >= 2 or (len(run) == 1 and n_items == 1 and len(lines) == 1):
            statements.append(_Statement(run, "list", f"{len(run)} lines of one verdict each", run_start))
        run = []
    return statements


# ------------------------------------------------------------------------------------ per-item lines
_NUMBERED = re.compile(
    r"^[\s>*_#\-•+]*(?:(?:criterion|criteria|item|question|q|aspect|point|no\.?)\s*#?\s*(\d{1,2})(?!\d|\.\d)\s*[.):\]\-–—]?"
    r"|#\s*(\d{1,2})(?!\d)\s*[.):\-–—]?|[\[(]?(\d{1,2})(?!\d|\.\d)\s*(?:[.):\]]|\s[-–—]))[\s*_]*(.*)$",
    re.IGNORECASE,
)


def _numbered_position(match: re.Match) -> int:
    """The 0-based item position a `_NUMBERED` match holds (its number is in one of three groups)."""
    return int(match.group(1) or match.group(2) or match.group(3)) - 1


_INLINE_NUMBERS = re.compile(r"(?:(?<=\s)|^)(\d{1,2})[.)]\s+")
_LABEL_SEPARATOR = re.compile(r"\s*(?::|\s[-–—]\s|[–—]|→|->|=>|=|\t)\s*")
_CHECKBOX = re.compile(r"^\s*(?:[-*+]\s*)?\[([ xX✓✔✗✘])\]\s*(.+)$")
_MARK_FIRST = re.compile(f"^\\s*(?:[-*•+]\\s*)?({_ANY_MARK})\\s*(.+)$")
_TRAILING_MARK = re.compile(f"^(.+?)\\s*({_ANY_MARK})\\s*$")
_FIELD_LINE = re.compile(
    r"^\s*(?:[-*•+>]\s*)?(?:final\s+)?(?:verdict|answer|met|satisfied|result|score|assessment|decision|status|"
    r"rating|judg(?:e)?ment|evaluation|criterion\s+met|meets\s+criterion)\s*\??\s*(?:\([^)]*\))?\s*[:=\-–—]\s*(.+)$",
    re.I,
)


def _split_label(text: str) -> tuple[str, str, str | None]:
    """(label, separator, value) at the first separator of a line, or (text, '', None)."""
    match = _LABEL_SEPARATOR.search(text)
    if not match or match.start() == 0:
        return text, "", None
    return text[: match.start()].strip(), match.group(0), text[match.end():]


def _clean_label(label: str) -> str:
    label = _plain(label)
    label = re.sub(r"^\W+|[\s:.\-–—]+$", "", label)
    return label.strip(" ()[]\"'")


@dataclass
class _Line:
    entry: _Entry | None  # the verdict this line states for one item
    header: bool = False  # an item named without a verdict (its verdict may follow on a field line)
    field_value: tuple[int | None, str | None] | None = None  # a "Verdict: 1" line


def _usable_label(label: str, labels: ItemLabels | None, numbered: bool) -> bool:
    low = label.lower().strip()
    if not low or low in _NOT_ITEM_LABELS:
        return False
    if numbered or (labels is not None and labels.match(label) is not None):
        return True
    return len(low.split()) <= 5 and not re.search(r"[.!?]", low)


def _read_line(line: str, labels: ItemLabels | None) -> list[_Line]:
    """What one line of an answer says about one or more items."""
    text = _plain(line)
    if not text:
        return []
    field_match = _FIELD_LINE.match(text)
    if field_match:
        found, value, _ = _verdict_at_start(field_match.group(1))
        if not found:
            found, value, _ = _value_in(field_match.group(1))
        if found:
            return [_Line(None, field_value=(value, _reason(field_match.group(1))))]
        return _inline_labelled(field_match.group(1), labels)
    inline = list(_INLINE_NUMBERS.finditer(text))
    if len(inline) >= 2 and [int(m.group(1)) for m in inline] == list(range(int(inline[0].group(1)), int(inline[0].group(1)) + len(inline))):
        bounds = [m.start() for m in inline] + [len(text)]
        found_lines = [_read_line(text[bounds[i]: bounds[i + 1]].strip(" ,;"), labels) for i in range(len(inline))]
        if all(found and found[0].entry is not None for found in found_lines):
            return [found[0] for found in found_lines]
    checkbox = _CHECKBOX.match(text)
    if checkbox:
        value = 0 if checkbox.group(1) == " " else 1 if checkbox.group(1) in "xX✓✔" else 0
        label, _, reason = _split_label(checkbox.group(2))
        number_match = _NUMBERED.match(label)
        position = None
        if number_match:
            position = _numbered_position(number_match)
            label = number_match.group(4)
        return [_Line(_Entry(value, _reason(reason or ""), position, _clean_label(label) or None))]
    position = None
    rest = text
    numbered = _NUMBERED.match(text)
    if numbered:
        position = _numbered_position(numbered)
        rest = numbered.group(4).strip()
    mark_first = _MARK_FIRST.match(rest)
    if mark_first:
        found, value = token_verdict(mark_first.group(1))
        label, _, reason = _split_label(mark_first.group(2))
        label_number = _NUMBERED.match(label)
        if label_number and position is None:
            position = _numbered_position(label_number)
            label = label_number.group(4)
        label = _clean_label(label)
        if position is None and not _usable_label(label, labels, False):
            return []
        return [_Line(_Entry(value, _reason(reason or ""), position, label or None))]
    if position is not None:
        found, value, reason = _leading_value(rest)
        if found:
            return [_Line(_Entry(value, reason, position))]
    else:
        segments = _inline_labelled(rest, labels)
        if segments:
            return segments
    label, _, value_text = _split_label(rest)
    label = _clean_label(label)
    trailing_mark = _TRAILING_MARK.match(rest)
    if value_text is None and trailing_mark:  # "Location ✅", "3. Shape ⚠️"
        label = _clean_label(trailing_mark.group(1))
        if position is not None or _usable_label(label, labels, False):
            return [_Line(_Entry(token_verdict(trailing_mark.group(2))[1], None, position, label or None))]
    if value_text is None:
        # "2. Lesion type" alone, "**Location**", "### Colour": an item named, its verdict may follow
        if position is not None:
            found, value, reason = _value_in(rest)
            if found:
                return [_Line(_Entry(value, reason, position))]
            if _UNDECIDED_ANYWHERE.search(rest):
                return [_Line(_Entry(None, _reason(rest), position, hedge=True))]
            return [_Line(_Entry(None, None, position, label or None), header=True)]
        if label and len(label.split()) <= 4 and _usable_label(label, labels, False) and (
            labels is not None and labels.match(label) is not None or re.match(r"^\s*(?:#{1,6}|\*\*|__)", line)
        ):
            return [_Line(_Entry(None, None, None, label), header=True)]
        return []
    if position is None and not _usable_label(label, labels, False):
        return []
    found, value, reason = _value_in(value_text)
    if not found:
        if position is None and labels is not None and labels.match(label) is None:
            return []
        if _UNDECIDED_ANYWHERE.search(value_text):  # "Location: I cannot tell from this crop"
            return [_Line(_Entry(None, _reason(value_text), position, label or None, hedge=True))]
        if not value_text.strip():
            return [_Line(_Entry(None, None, position, label or None), header=True)]
        return [_Line(_Entry(None, _reason(value_text), position, label or None), header=True)]
    return [_Line(_Entry(value, reason, position, label or None))]


_SEGMENT = re.compile(r"^(?P<label>[A-Za-z][A-Za-z0-9 /&'()\-]{0,40}?)\s*(?:[:=]|\s[-–—]|[–—→])\s*(?P<value>.+)$")
_SEGMENT_NUMBER = re.compile(r"^(?:criterion|item|question|q|aspect|point)\s*#?\s*(\d{1,2})$", re.I)
_MARK_SPLIT = re.compile(f"({_ANY_MARK})")


def _inline_labelled(text: str, labels: ItemLabels | None) -> list[_Line]:
    """"Location: yes, Lesion type: no, Colour - 1", "Location: Yes. Lesion type: No.", "Location ✔️, Shape ❌",
    "Location ✔️ Lesion type ❌" on one line."""
    segments = [segment.strip() for segment in re.split(r"\s*[,;|]\s*(?![^()]*\))|(?<=[.!])\s+", text) if segment.strip()]
    if len(segments) < 2:
        parts = _MARK_SPLIT.split(text)
        if len(parts) < 5 or parts[-1].strip():
            return []
        segments = [parts[index].strip() + " " + parts[index + 1] for index in range(0, len(parts) - 1, 2)]
    found_lines = []
    for segment in segments:
        match = _SEGMENT.match(segment)
        trailing = _TRAILING_MARK.match(segment)
        if match:
            found, value = token_verdict(match.group("value"))
            label = _clean_label(match.group("label"))
        elif trailing:
            found, value = token_verdict(trailing.group(2))
            label = _clean_label(trailing.group(1))
        else:
            return []
        if not found or not _usable_label(label, labels, False):
            return []
        number = _SEGMENT_NUMBER.match(label)
        found_lines.append(_Line(_Entry(value, None, int(number.group(1)) - 1, None) if number else _Entry(value, None, None, label)))
    return found_lines


_TABLE_VALUE_HEADER = re.compile(
    r"\b(?:met|verdict|satisfied|score|answer|result|assessment|value|decision|pass|yes\s*/\s*no|0\s*/\s*1|present|fulfilled)\b",
    re.I,
)


def _table_lines(rows: list[str], labels: ItemLabels | None) -> list[_Line]:
    """Rows of a markdown table: the verdict column is the one whose header names it, else the first cell
    after the label that holds a verdict."""
    cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
    cells = [row for row in cells if not all(re.fullmatch(r":?-{2,}:?", cell) or not cell for cell in row)]
    if not cells:
        return []
    column = None
    header = cells[0]
    if not any(token_verdict(cell)[0] for cell in header[1:]):
        for index, cell in enumerate(header):
            if index > 0 and _TABLE_VALUE_HEADER.search(cell):
                column = index
                break
        cells = cells[1:]
    found_lines = []
    for row in cells:
        position = None
        label_cells = []
        value = None
        found = False
        reason_cells = []
        for index, cell in enumerate(row):
            plain = _plain(cell)
            if index == 0 and re.fullmatch(r"#?\s*\d{1,2}\.?", plain):
                position = int(re.sub(r"\D", "", plain)) - 1
                continue
            if not found and (index == column or column is None and index > 0 and label_cells):
                found, value, reason = _value_in(plain) if index == column else _leading_value(plain)
                if found:
                    if reason:
                        reason_cells.append(reason)
                    continue
            if found:
                reason_cells.append(plain)
            else:
                label_cells.append(plain)
        if not found:
            continue
        label = _clean_label(" ".join(label_cells))
        number = _NUMBERED.match(label)
        if number and position is None:
            position = _numbered_position(number)
            label = _clean_label(number.group(4))
        found_lines.append(_Line(_Entry(value, _reason(" ".join(reason_cells)), position, label or None)))
    return found_lines


def _leading_value(text: str) -> tuple[bool, int | None, str | None]:
    found, value, end = _verdict_at_start(text)
    if found and (not text[end:].strip() or re.match(r"^\s*(?:[,.;:(\-–—]|\s[-–—])", text[end:])):
        return True, value, _reason(text[end:])
    return False, None, None


def _item_statements(lines: list[tuple[int, str]], labels: ItemLabels | None) -> list[_Statement]:
    """Per-item lines grouped into statements: each group of labelled lines without numbers is one statement
    (its order may stand in for positions); numbered and label-matched lines are single entries."""
    statements: list[_Statement] = []
    group: list[_Entry] = []
    group_start = 0
    pending: _Entry | None = None
    index = 0

    def close_group() -> None:
        nonlocal group
        if group:
            statements.append(_Statement(group, "items", "the lines naming each aspect", group_start))
        group = []

    while index < len(lines):
        offset, line = lines[index]
        if line.lstrip().startswith("|"):
            table = []
            while index < len(lines) and lines[index][1].lstrip().startswith("|"):
                table.append(lines[index][1])
                index += 1
            rows = _table_lines(table, labels)
            if rows:
                statements.append(_Statement([row.entry for row in rows], "items", "the table", offset))
            pending = None
            continue
        index += 1
        for read in _read_line(line, labels):
            if read.field_value is not None:
                if pending is not None:
                    pending.value, pending.reason = read.field_value
                    _add(pending, group, statements, offset)
                    if pending.position is None and not group_start:
                        group_start = offset
                    pending = None
                continue
            if read.header:
                pending = read.entry
                continue
            pending = None
            _add(read.entry, group, statements, offset)
            if read.entry.position is None and len(group) == 1:
                group_start = offset
    close_group()
    return statements


def _add(entry: _Entry, group: list[_Entry], statements: list[_Statement], offset: int) -> None:
    if entry.position is None:
        group.append(entry)
    else:
        statements.append(_Statement([entry], "items", f"the line for item {entry.position + 1}", offset))


_CRITERIA_SENTENCE = re.compile(
    r"\b(?:criteria|criterion|items?)\s+((?:#?\d{1,2}\s*(?:,\s*|\s+and\s+|\s*&\s*|\s*\+\s*)?)+)\s*"
    r"(?:(?:are|is|were|was)\s+((?:not|n't)\s+(?:\w+\s+)?)?(met|satisfied|fulfill?ed|unmet)\b"
    r"|(?:are|is|were|was)\s*(n't|not)(?=\s*(?:[.;!]|$))|(?:aren't|isn't|weren't|wasn't)(?=\s*(?:[.;!]|$)))",
    re.I,
)


_GROUPED = re.compile(
    r"^(?P<noun>(?:items?|criteria|criterion|aspects?|features?)\s+)?(?P<verdict>not\s+met|met|unmet|not\s+satisfied|"
    r"unsatisfied|satisfied|not\s+fulfill?ed|unfulfill?ed|fulfill?ed|passed|pass|failed|fail)"
    r"(?P<after>\s+(?:items?|criteria|criterion|aspects?|features?))?\s*[:=]\s*(?P<list>.+)$",
    re.I,
)


def _grouped_line(line: str, labels: ItemLabels | None) -> _Statement | None:
    """"Items met: 1, 3", "Not met: 2, 4, 5", "Failed: lesion type, texture": the items a verdict applies to."""
    match = _GROUPED.match(_plain(_BULLET.sub("", line)))
    if not match:
        return None
    value = 0 if re.match(r"not|un|fail", match.group("verdict"), re.I) else 1
    listed = match.group("list").strip(" .[](){}")
    if re.fullmatch(r"(?:none|nil|-|–|n/a)", listed, re.I):
        return _Statement([], "items", f"the line {line.strip()[:60]!r}")
    entries = []
    for piece in re.split(r"\s*[,;]\s*", listed):
        piece = re.sub(r"^(?:and|&)\s+", "", piece.strip(), flags=re.I)
        number = re.fullmatch(r"(?:(?:item|criterion|#)\s*)?(\d{1,2})", piece, re.I)
        if number:
            entries.append(_Entry(value, None, int(number.group(1)) - 1))
            continue
        if labels is None:
            return None
        parts = [piece] if labels.match(piece, names_only=True) is not None else re.split(r"\s+(?:and|&)\s+", piece)
        for part in parts:
            position = labels.match(part, names_only=True)
            if position is None:
                return None
            entries.append(_Entry(value, None, position))
    numbers_only = all(not re.search(r"[a-z]", piece, re.I) for piece in re.split(r"[,;]", listed))
    if numbers_only and not (match.group("noun") or match.group("after")) and len(entries) < 2:
        return None  # "Met: 1" is a verdict, not the items met
    return _Statement(entries, "items", f"the line {line.strip()[:60]!r}")


_PROSE_VERDICT = re.compile(
    r"^(?:(?:and|but|however|so|thus|also|overall|the|its|this|while|whereas)\s+)*(?P<subject>[a-z][a-z /&'-]{1,40}?)\s+"
    r"(?:(?:criterion|criteria|aspect|item|requirement)\s+)?(?:"
    r"(?P<hedge>(?:is|are)\s+(?:only\s+)?(?:partially|partly)\s+(?:met|satisfied|fulfill?ed)|(?:partially|partly)\s+met)"
    r"|(?P<negative>(?:is|are|was|were)\s*(?:not|n't)\s+(?:met|satisfied|fulfill?ed|correct)|(?:isn't|aren't)\s+(?:met|satisfied|correct)"
    r"|(?:(?:is|are)\s+)?(?:not\s+met|unmet|unsatisfied)|fails?|failed|is\s+incorrect|is\s+wrong"
    r"|(?:does|do)\s*(?:not|n't)\s+(?:meet|match|satisfy|fulfill?|fit|pass)|doesn't\s+(?:meet|match|satisfy|fulfill?|fit|pass))"
    r"|(?P<positive>(?:is|are|was|were)\s+(?:met|satisfied|fulfill?ed|correct)|met|satisfied|fulfill?ed|passe[sd]))"
    r"(?P<rest>.*)$",
    re.I,
)


def _prose_statements(text: str, labels: ItemLabels | None) -> list[_Statement]:
    """Sentences and clauses of prose that name an aspect and state its verdict ("Location is not met.",
    "(location met, colour not met)", "However, the colour does not meet the criterion"). They stand against a
    list that says otherwise; prose that only describes an aspect ("the colour is brownish") says nothing."""
    if labels is None:
        return []
    statements = []
    for clause in re.split(r"[.;!?\n()\[\]]|,\s+|\s[-–—:]\s|:\s", text):
        clause = _plain(clause)
        if not clause or _REASONING.search(clause) or re.search(r"\b(?:neither|nor|except|unless|not\s+all)\b", clause, re.I):
            continue
        match = _PROSE_VERDICT.match(clause)
        if not match:
            continue
        subject = match.group("subject")
        parts = [subject] if labels.match(subject, names_only=True) is not None else re.split(r"\s*(?:,|\band\b|&)\s*", subject)
        positions = [labels.match(part, names_only=True) for part in parts]
        if not parts or None in positions:
            continue
        hedge = bool(match.group("hedge") or re.match(r"\s*(?:only\s+)?(?:partially|partly|somewhat)\b", match.group("rest"), re.I))
        value = None if hedge else 0 if match.group("negative") else 1
        for position in positions:
            statements.append(_Statement([_Entry(value, None, position, hedge=hedge)], "items", f"the words {clause[:60]!r}"))
    return statements


def _sentence_statements(text: str) -> list[_Statement]:
    """"Criteria 1, 2 and 4 are met; 3 and 5 are not." style statements, outside reasoning."""
    statements = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n", text):
        if _REASONING.search(sentence):
            continue
        for match in _CRITERIA_SENTENCE.finditer(sentence):
            value = 0 if match.group(2) or not match.group(3) or match.group(3).lower() == "unmet" else 1
            for number in re.findall(r"\d{1,2}", match.group(1)):
                statements.append(_Statement([_Entry(value, None, int(number) - 1)], "items", f"'{match.group(0)}'"))
    return statements


_ALL_OR_NONE = re.compile(
    r"^(?:(?:the\s+image\s+)?(?:meets|satisfies|fulfil?ls)\s+(all|none)\s+(?:of\s+the\s+)?(?:\w+\s+)?(?:criteria|items)"
    r"|(all|none\s+of\s+the)\s+(?:\w+\s+)?(?:criteria|items)\s+(?:are|were)\s+(met|satisfied|fulfill?ed))[.!]?$",
    re.I,
)


def _all_or_none(text: str, n_items: int) -> _Statement | None:
    """A short answer that is only "All criteria are met." / "None of the criteria are met."."""
    sentences = [s for s in re.split(r"(?<=[.!])\s+|\n", text.strip()) if s.strip()]
    if not sentences or len(sentences) > 2 or re.search(r"\b(?:except|but|apart|other\s+than|besides|only|not\s+all|partial)", text, re.I):
        return None
    for sentence in sentences:
        match = _ALL_OR_NONE.match(_plain(sentence))
        if match:
            value = 0 if (match.group(1) or match.group(2)).lower().startswith("none") else 1
            return _Statement([_Entry(value) for _ in range(n_items)], "list", repr(sentence.strip()))
    return None


_COUNT_SUMMARY = re.compile(
    r"(?:\b(?:score|total|overall|sum)\s*[:=]?\s*(\d{1,2})\s*(?:/|out\s+of)\s*(\d{1,2})\b)"
    r"|(?:\b(\d{1,2})\s*(?:/|out\s+of|of)\s*(?:the\s+)?(\d{1,2})\s*(?:criteria|items)?\s*(?:are\s+|were\s+)?(?:met|satisfied|fulfill?ed)\b)",
    re.I,
)


def _stated_count(text: str, n_items: int) -> int | None:
    """A summary count "Score: 3/5" or "3 of 5 criteria met", checked against the items (never read as one)."""
    for match in _COUNT_SUMMARY.finditer(text):
        met, total = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        if int(total) == n_items and int(met) <= n_items:
            return int(met)
    return None


# -------------------------------------------------------------------------------------- preparation
_THINK = re.compile(
    r"<(think|thinking|thought|reasoning|reflection)>.*?</\1>|◁think▷.*?◁/think▷|<unused94>.*?<unused95>"
    r"|<\|begin_of_thought\|>.*?<\|end_of_thought\|>",
    re.DOTALL | re.IGNORECASE,
)
_OPEN_THINK = re.compile(r"<(?:think|thinking|thought|reasoning)>|◁think▷|<unused94>|<\|begin_of_thought\|>", re.I)
_ANSWER_TAG = re.compile(r"<(answer|final_answer|output)>(.*?)(?:</\1>|$)", re.DOTALL | re.IGNORECASE)
# "1, // location", "0  # texture", "/* verdicts */" in JSON-like answers
_COMMENT = re.compile(r"(?:(?<=[\d,\[\]{}\"])|(?<=true)|(?<=false)|(?<=null))[ \t]+(?://|#)[ \t][^\n]*|/\*.*?\*/", re.DOTALL)
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)


def _answer_text(raw: str) -> tuple[str | None, str | None]:
    """The part of the answer to read (reasoning blocks out, <answer> tags in, code fences unwrapped), or
    (None, why) when nothing is left."""
    text = raw.replace("\r\n", "\n")
    text = _THINK.sub("\n", text)
    text = re.sub(r"^.*?</think>", "\n", text, count=1, flags=re.DOTALL | re.IGNORECASE)  # opened by the template
    opened = _OPEN_THINK.search(text)
    if opened:
        before = text[: opened.start()]
        if not before.strip():
            return None, "the answer ended inside its reasoning block, before any verdict"
        text = before
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        text = "\n".join(body for _, body in tagged)
    text = _FENCE.sub(lambda match: "\n" + match.group(1) + "\n", text)
    text = text.replace("\uff1a", ": ")  # full-width colon
    text = _COMMENT.sub("", text)
    text = re.sub(r"<\|[a-z_]+\|>", "\n", text)  # stray chat-template tokens
    text = text.replace("\\n", "\n") if "\n" not in text.strip() and "\\n" in text else text
    return text, None


_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i'?m (?:not able|unable)|i am (?:not able|unable)|"
    r"unable to (?:help|assist|evaluate|provide|comply|analy[sz]e|assess)|not (?:able|qualified|permitted) to|"
    r"cannot (?:help|assist|provide|evaluate|analy[sz]e|assess)|can't (?:help|assist|provide|evaluate|assess)|"
    r"as an ai\b|consult (?:a|your) (?:doctor|dermatologist|healthcare|medical))",
    re.IGNORECASE,
)


# A list given while declining to grade ("I can't assess medical images; [0, 0, 0, 0, 0]", "if I had to answer, ...")
# is a placeholder or a guess, not the judge's verdict.
_DECLINES = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|if i (?:had|were) to (?:guess|answer|choose)|placeholder|"
    r"(?:i'?m|i am) (?:not able|unable) to (?:help|assist|evaluate|provide|comply|analy[sz]e|assess|grade)|"
    r"i (?:cannot|can't|can not) (?:help|assist|provide|evaluate|analy[sz]e|assess|grade|comply))",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text.replace("’", "'")))


# -------------------------------------------------------------------------------------------- parse
def parse_answer(
    text: str | None, n_items: "int | Checklist", style: str = "paper", checklist: "Checklist | None" = None
) -> ParsedAnswer:
    """Parse a judge answer for a checklist of `n_items` items; never raises on the answer's content.

    Pass the `checklist` (or give it in place of `n_items`) so lines labelled by aspect ("Colour: no") are
    matched to their items; without it such lines count in the order given. `style` is the prompt style the
    answer responds to; both styles accept every shape, the style only names what was asked for in errors.
    """
    if not isinstance(n_items, int):
        checklist, n_items = n_items, len(n_items.items)
    if n_items < 1:
        raise ValueError(f"n_items must be at least 1, got {n_items}")
    if checklist is not None and len(checklist.items) != n_items:
        raise ValueError(f"n_items = {n_items} but the checklist {checklist.condition!r} has {len(checklist.items)} items")
    raw = (text or "").strip()
    if not raw:
        return no_answer(n_items, "failed", "empty answer")
    body, why = _answer_text(raw)
    if body is None:
        return no_answer(n_items, "failed", why)
    labels = ItemLabels(checklist) if checklist is not None else None
    statements = _statements(body, n_items, labels)
    if not statements and _only_examples(body, n_items):
        return no_answer(n_items, "failed", "the only list in the answer is quoted as an example")
    if not statements:
        if looks_like_refusal(body):
            return no_answer(n_items, "refused", "the judge declined to grade the image")
        expected = "a list like [1, 0, 1]" if style == "paper" else 'a JSON object {"items": [...]}'
        return no_answer(n_items, "failed", f"no verdicts found in the answer (expected {expected})")
    if _DECLINES.search(body.replace("’", "'")):
        return no_answer(n_items, "failed", "the judge declined to grade the image but gave a verdict anyway; not read")
    return _decide(statements, n_items, labels, _stated_count(body, n_items))


def _statements(body: str, n_items: int, labels: ItemLabels | None) -> list[_Statement]:
    statements, spans = _json_statements(body, n_items)
    rest = list(body)
    for start, end in spans:
        for index in range(start, end):
            if rest[index] != "\n":
                rest[index] = " "
    rest_text = "".join(rest)
    opening = re.search(r'[\[{]\s*"', body)
    if opening is not None and not any(start <= opening.start() < end for start, end in spans):
        fragment = _fragment_statement(body[opening.start():])  # JSON cut off by the token limit
        if fragment is not None:
            return statements + [fragment]
    lines = []
    offset = 0
    for line in rest_text.split("\n"):
        grouped = _grouped_line(line, labels) if line.strip() else None
        if grouped is not None:
            grouped.start = offset
            statements.append(grouped)
        elif line.strip():
            lines.append((offset, line))
        offset += len(line) + 1
    statements += _bracket_statements(rest_text, n_items)
    statements += _line_sequences(lines, n_items)
    statements += _item_statements(lines, labels)
    statements += _sentence_statements(rest_text)
    if statements:
        statements += _prose_statements(rest_text, labels)
    if not statements:
        if n_items == 1:
            found, value, _ = _verdict_at_start(_plain(_ANSWER_PREFIX.sub("", rest_text.strip(), count=1)))
            if found:
                statements.append(_Statement([_Entry(value)], "list", "the answer"))
        whole = _all_or_none(rest_text, n_items)
        if whole is not None:
            statements.append(whole)
    # A bracketed list that is also its whole line is one statement, not two.
    unique: list[_Statement] = []
    for statement in statements:
        values = tuple((entry.value, entry.position, entry.label) for entry in statement.entries)
        if any(kept.kind == statement.kind and tuple((e.value, e.position, e.label) for e in kept.entries) == values
               and (kept.start == statement.start or statement.kind == "list" and _same_line(body, kept.start, statement.start))
               for kept in unique):
            continue
        unique.append(statement)
    statements = unique
    # A list quoted as an example ("e.g. [1, 0, 1, 0, 0]") is never the answer.
    return [statement for statement in statements if not statement.example]


def _only_examples(body: str, n_items: int) -> bool:
    statements, _ = _json_statements(body, n_items)
    return any(statement.example for statement in statements + _bracket_statements(body, n_items))


def _same_line(text: str, first: int, second: int) -> bool:
    low, high = sorted((first, second))
    return "\n" not in text[low:high]


def _positions(statement: _Statement, labels: ItemLabels | None, n_items: int) -> tuple[list[_Statement], str | None]:
    """Resolve an 'items' statement's labels to positions. Returns the statement(s) to use and an error
    when numbers and names disagree. A group of labels that cannot all be matched counts in its order."""
    entries = statement.entries
    problems = None
    unresolved = []
    for entry in entries:
        named = labels is not None and entry.label
        if entry.position is not None:
            matched = labels.match(entry.label, names_only=True) if named else None
            if matched is not None and matched != entry.position:
                problems = (f"conflicting answers: item {entry.position + 1} is named {entry.label!r}, "
                            f"which is item {matched + 1} of the checklist")
            continue
        matched = labels.match(entry.label) if named else None
        if matched is not None:
            entry.position = matched
        else:
            unresolved.append(entry)
    if not unresolved:
        return [statement], problems
    in_order = all(entry.position is None or entry.position == index for index, entry in enumerate(entries))
    if in_order and (labels is None or len(entries) == n_items):
        as_list = [_Entry(entry.value, entry.reason) for entry in entries]
        return [_Statement(as_list, "list", statement.where, statement.start)], problems
    # With a checklist, names that match no item are not read (a remark such as "Valid lesion: yes").
    kept = [entry for entry in entries if entry.position is not None]
    return ([_Statement(kept, "items", statement.where, statement.start)] if kept else []), problems


def _decide(statements: list[_Statement], n_items: int, labels: ItemLabels | None, stated_count: int | None) -> ParsedAnswer:
    lists: list[_Statement] = []
    per_item: dict[int, list[_Entry]] = {}
    problems: list[str] = []
    for statement in statements:
        if statement.kind == "items":
            resolved, problem = _positions(statement, labels, n_items)
            if problem:
                problems.append(problem)
            for part in resolved:
                if part.kind == "list":
                    lists.append(part)
                else:
                    for entry in part.entries:
                        per_item.setdefault(entry.position, []).append(entry)
        else:
            lists.append(statement)
    if not lists and not per_item:
        return no_answer(n_items, "failed", "no verdicts found in the answer")
    for statement in lists:
        if len(statement.entries) != n_items:
            return no_answer(
                n_items, "failed",
                f"wrong length {len(statement.entries)} of {n_items}: {statement.where} has {len(statement.entries)} "
                f"values for a checklist of {n_items} items",
            )
    beyond = sorted(position for position in per_item if position >= n_items)
    if beyond:
        return no_answer(n_items, "failed",
                         f"wrong length {beyond[-1] + 1} of {n_items}: the answer grades item {beyond[-1] + 1} "
                         f"of a checklist of {n_items} items")
    if problems:
        return no_answer(n_items, "failed", problems[0])
    distinct = {tuple(entry.value for entry in statement.entries) for statement in lists}
    if len(distinct) > 1:
        shown = " vs ".join(_show(statement.entries) for statement in lists[:3])
        return no_answer(n_items, "failed", f"conflicting answers: {shown}")
    items: list[int | None] = [None] * n_items
    rationales: list[str | None] = [None] * n_items
    answered = [False] * n_items
    if lists:
        for index, entry in enumerate(lists[0].entries):
            items[index], answered[index] = entry.value, True
            rationales[index] = next((s.entries[index].reason for s in lists if s.entries[index].reason), None)
    for position, entries in sorted(per_item.items()):
        firm = [entry for entry in entries if not entry.hedge]
        if firm or answered[position]:
            entries = firm  # a hedge in prose yields to a verdict stated elsewhere
            if not entries:
                continue
        said = {entry.value for entry in entries}
        if len(said) > 1 or (answered[position] and items[position] not in said):
            return no_answer(n_items, "failed", f"conflicting answers for item {position + 1}")
        if not answered[position]:
            items[position], answered[position] = entries[0].value, True
        rationales[position] = rationales[position] or next((entry.reason for entry in entries if entry.reason), None)
    missing = [index + 1 for index, done in enumerate(answered) if not done]
    if missing:
        return no_answer(
            n_items, "failed",
            f"wrong length {n_items - len(missing)} of {n_items}: no answer for item "
            + ", ".join(str(number) for number in missing),
        )
    undecided = [index + 1 for index, value in enumerate(items) if value is None]
    if undecided:
        return no_answer(n_items, "failed", "; ".join(f"item {number} undecided" for number in undecided))
    if stated_count is not None and stated_count != sum(items):
        return no_answer(n_items, "failed",
                         f"conflicting answers: {_show([_Entry(v) for v in items])} meets {sum(items)} items "
                         f"but the answer says {stated_count} of {n_items}")
    return ParsedAnswer(items, rationales, "ok", None)


def no_answer(n_items: int, status: ParseStatus, error: str) -> ParsedAnswer:
    """An answer with no verdicts (every item None) and why."""
    return ParsedAnswer([None] * n_items, [None] * n_items, status, error)
