"""Read a judge's answer into one verdict per checklist item, tolerantly.

Real answers are not always the requested `[1, 0, 1, 0, 0]`: they come in code fences, with prose around
the list, as yes/no or true/false words, check marks, numbered lines ("1. Location: yes"), JSON objects
(the structured style), truncated JSON, with the wrong number of values, or as refusals. `parse_answer`
tries, in order:

1. JSON anywhere in the text (after unwrapping code fences; single quotes and Python literals repaired);
2. bracketed lists of verdict words (`[yes, no, yes]`, `(1, 0, 1)`, `[✓, ✗, ✓]`);
3. numbered lines (`1. yes`, `**2. Colour**: not met`, `Criterion 3 - satisfied`);
4. a bare sequence (`1, 0, 1, 0, 0`, `yes / no` lines, `10100`), or a last line that is one;
5. `"verdict": 1` fragments of truncated JSON.

When several lists are found, the last one with exactly `n_items` values wins (answers come after any
reasoning); failing that, the longest. The status says how much was usable:

- ok: every item answered;
- partial: the answer had the wrong length or marked some items unknown (missing items are None);
- refused: nothing usable and the text reads as a refusal ("I can't help with medical ...");
- failed: nothing usable (items all None).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from magic_align.judges.base import ParseStatus


@dataclass
class ParsedAnswer:
    items: list[int | None]
    rationales: list[str | None]
    status: ParseStatus
    error: str | None = None  # what was wrong with the answer, for partial / failed / refused
    extra: list[int | None] = field(default_factory=list)  # values beyond n_items (kept for the record)


# ------------------------------------------------------------------------------------- verdict words
_POSITIVE = {
    "1", "1.0", "yes", "y", "true", "met", "satisfied", "fulfilled", "present", "pass", "passed", "passes",
    "correct", "✓", "✔", "✔️", "✅", "☑", "☑️", "🗸",
}
_NEGATIVE = {
    "0", "0.0", "no", "n", "false", "not met", "unmet", "not satisfied", "unsatisfied", "not fulfilled",
    "absent", "not present", "fail", "failed", "fails", "incorrect", "✗", "✘", "❌", "✕", "×", "❎",
}
_UNKNOWN = {
    "null", "none", "n/a", "na", "unknown", "unclear", "uncertain", "?", "cannot tell", "can't tell",
    "cannot determine", "can't determine", "partial", "partially", "partly", "indeterminate",
}
# A verdict word at the start of a phrase ("Not met - the lesion is ...", "Yes, on the elbow").
_LEADING = re.compile(
    r"^[\s*_`'\"(\[]*(not\s+met|not\s+satisfied|not\s+fulfilled|not\s+present|cannot\s+tell|can't\s+tell|"
    r"cannot\s+determine|can't\s+determine|unmet|unsatisfied|yes|no|true|false|met|satisfied|fulfilled|"
    r"present|absent|pass(?:ed|es)?|fail(?:ed|s)?|partially|partly|partial|unclear|uncertain|unknown|"
    r"n/a|[01](?:\.0)?)(?!\w|\.\d)"
    r"|^[\s*_`'\"(\[]*(✓|✔️|✔|✅|☑️|☑|🗸|✗|✘|❌|✕|×|❎)",
    re.IGNORECASE,
)
# Strong words anywhere in a phrase, used only when no phrase starts with a verdict.
_ANYWHERE = re.compile(
    r"\b(not\s+met|not\s+satisfied|not\s+fulfilled|unmet|unsatisfied|met|satisfied|fulfilled)\b|(✓|✔|✅|✗|✘|❌)",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"\s*(?::|\s[-–—]\s|[–—]|=|→|->|\||;|\.\s+)\s*")


def token_verdict(token: str) -> tuple[bool, int | None]:
    """(recognised, value) for a single verdict token such as 'Yes', '0', '✓', 'not met', 'n/a'."""
    word = re.sub(r"\s+", " ", token.strip().strip("*_`'\".,:;!").strip()).lower()
    if word in _POSITIVE:
        return True, 1
    if word in _NEGATIVE:
        return True, 0
    if word in _UNKNOWN:
        return True, None
    return False, None


def _scalar_verdict(value: object) -> tuple[bool, int | None]:
    if isinstance(value, bool):
        return True, int(value)
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return True, int(value)
        return False, None
    if value is None:
        return True, None
    if isinstance(value, str):
        return token_verdict(value) if len(value) < 40 else (False, None)
    return False, None


def phrase_verdict(phrase: str) -> tuple[bool, int | None]:
    """The verdict stated in one line of prose ("Location: yes, on the elbow", "Not met - no scale seen").

    A phrase is cut at separators (colon, dash, arrow, sentence ends); the first piece after the first one that
    starts with a verdict word wins, then the first piece itself (criterion titles come first, verdicts after),
    then a strong word anywhere ("... is met").
    """
    text = phrase.replace("**", "").replace("__", "").strip()
    pieces = [piece for piece in _SEPARATORS.split(text) if piece.strip()]
    for piece in pieces[1:] + pieces[:1]:
        match = _LEADING.match(piece)
        if match:
            return token_verdict(match.group(1) or match.group(2))
    match = _ANYWHERE.search(text)
    if match:
        return token_verdict(match.group(1) or match.group(2))
    return False, None


# -------------------------------------------------------------------------------------- extraction
@dataclass
class _Entry:
    value: int | None
    reason: str | None = None
    position: int | None = None  # 0-based item index when the answer numbers its items


_CONTAINER_KEYS = (
    "items", "verdicts", "answers", "results", "criteria", "checklist", "evaluation", "evaluations", "scores",
    "answer", "verdict", "result", "output",
)
_VERDICT_KEYS = (
    "verdict", "met", "value", "answer", "score", "result", "satisfied", "pass", "passed", "label", "decision",
    "grade", "meets", "fulfilled",
)
_REASON_KEYS = ("reason", "rationale", "explanation", "justification", "comment", "why", "evidence", "notes")
_POSITION_KEYS = ("item", "id", "index", "criterion", "number", "n", "idx", "item_id", "criterion_id")


def _position_from(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value - 1 if value >= 1 else None
    if isinstance(value, str):
        match = re.search(r"(\d{1,3})\s*$", value.strip())
        if match:
            return int(match.group(1)) - 1
    return None


def _lower_keys(mapping: dict) -> dict:
    return {str(key).strip().lower(): value for key, value in mapping.items()}


def _entry_from_dict(mapping: dict) -> _Entry | None:
    lowered = _lower_keys(mapping)
    value: int | None = None
    found = False
    for key in _VERDICT_KEYS:
        if key in lowered:
            found, value = _scalar_verdict(lowered[key])
            if not found and isinstance(lowered[key], str):
                found, value = phrase_verdict(lowered[key])
            if found:
                break
    if not found:
        return None
    reason = next((str(lowered[key]) for key in _REASON_KEYS if isinstance(lowered.get(key), str)), None)
    position = next((_position_from(lowered[key]) for key in _POSITION_KEYS if key in lowered), None)
    return _Entry(value, reason, position)


def _entries_from_json(value: object) -> list[_Entry] | None:
    """Verdict entries from a decoded JSON value, or None when it holds no verdicts."""
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(element, dict) for element in value):
            entries = [_entry_from_dict(element) or _Entry(None) for element in value]
            return entries if any(entry.value is not None for entry in entries) else None
        entries = []
        for element in value:
            recognised, verdict = _scalar_verdict(element)
            reason = None
            if not recognised and isinstance(element, str):
                recognised, verdict = phrase_verdict(element)
                reason = element
            if not recognised:
                return None
            entries.append(_Entry(verdict, reason))
        return entries if any(entry.value is not None for entry in entries) else None
    if isinstance(value, dict):
        lowered = _lower_keys(value)
        for key in _CONTAINER_KEYS:
            if isinstance(lowered.get(key), (list, dict)):
                entries = _entries_from_json(lowered[key])
                if entries:
                    return entries
        single = _entry_from_dict(value)
        if single is not None:
            return [single]
        # {"1": 1, "2": 0} or {"location": {"verdict": 1, "reason": ...}, ...}: values in order
        entries = []
        for key, element in value.items():
            position = _position_from(key)
            if isinstance(element, dict):
                entry = _entry_from_dict(element)
                if entry is None:
                    return None
                entry.position = entry.position if entry.position is not None else position
            else:
                recognised, verdict = _scalar_verdict(element)
                if not recognised:
                    return None
                entry = _Entry(verdict, None, position)
            entries.append(entry)
        return entries if any(entry.value is not None for entry in entries) else None
    return None


def _repair_json_text(text: str) -> str:
    """Python-literal and sloppy JSON into JSON: single quotes, True/False/None, trailing commas."""
    repaired = re.sub(r"\bTrue\b", "true", text)
    repaired = re.sub(r"\bFalse\b", "false", repaired)
    repaired = re.sub(r"\bNone\b", "null", repaired)
    repaired = re.sub(r"'([^'\\]*)'", r'"\1"', repaired)
    return re.sub(r",\s*([\]}])", r"\1", repaired)


def _json_candidates(text: str, n_items: int) -> list[list[_Entry]]:
    decoder = json.JSONDecoder()
    found: list[list[_Entry]] = []
    for source in (text, _repair_json_text(text)):
        index = 0
        while index < len(source):
            if source[index] not in "[{":
                index += 1
                continue
            try:
                value, end = decoder.raw_decode(source, index)
            except json.JSONDecodeError:
                index += 1
                continue
            entries = _entries_from_json(value)
            if entries:
                found.append(entries)
                index = end  # skip what this value contains
            else:
                index += 1
        if found:
            break
    return found


_BRACKETED = re.compile(r"[\[(]([^\[\]()]{1,2000})[\])]")


def _bracket_candidates(text: str, n_items: int) -> list[list[_Entry]]:
    found = []
    for match in _BRACKETED.finditer(text):
        inside = match.group(1).strip()
        chunks = re.split(r"\s*[,;]\s*", inside) if re.search(r"[,;]", inside) else inside.split()
        chunks = [chunk for chunk in chunks if chunk.strip()]
        if not chunks:
            continue
        verdicts = [token_verdict(chunk) for chunk in chunks]
        if all(recognised for recognised, _ in verdicts) and any(value is not None for _, value in verdicts):
            found.append([_Entry(value) for _, value in verdicts])
    return found


_NUMBERED = re.compile(
    r"^[\s>*_#\-•]*(?:(?:criterion|criteria|item|question|q)\s*#?\s*(\d{1,2})(?!\d|\.\d)\s*[.):\]\-–—]?"
    r"|\[?(\d{1,2})(?!\d|\.\d)\s*[.):\]\-–—])[\s*_]*(.*)$",
    re.IGNORECASE,
)


def _numbered_candidates(text: str, n_items: int) -> list[list[_Entry]]:
    entries: list[_Entry] = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if not match:
            continue
        number = int(match.group(1) or match.group(2))
        rest = match.group(3).strip()
        recognised, value = phrase_verdict(rest)
        if not recognised or number < 1:
            continue
        if any(entry.position == number - 1 for entry in entries):
            continue  # a repeated number: the first statement stands
        entries.append(_Entry(value, rest or None, number - 1))
    return [entries] if entries and any(entry.value is not None for entry in entries) else []


_ANSWER_PREFIX = re.compile(r"^\s*(?:final\s+)?(?:answer|verdicts?|results?|output|scores?|evaluation)\s*[:=]\s*", re.IGNORECASE)


def _bare_sequence(text: str, n_items: int) -> list[_Entry] | None:
    body = _ANSWER_PREFIX.sub("", text.strip())
    if re.fullmatch(r"[01]+", body) and len(body) == n_items:
        return [_Entry(int(char)) for char in body]
    separator = r"\s*[,;\n/]\s*" if re.search(r"[,;\n/]", body) else r"\s+"
    chunks = [re.sub(r"^[\s\-*•]+", "", chunk) for chunk in re.split(separator, body)]
    chunks = [chunk for chunk in chunks if chunk.strip()]
    if not chunks:
        return None
    verdicts = [token_verdict(chunk) for chunk in chunks]
    if all(recognised for recognised, _ in verdicts) and any(value is not None for _, value in verdicts):
        return [_Entry(value) for _, value in verdicts]
    return None


def _bare_candidates(text: str, n_items: int) -> list[list[_Entry]]:
    """The whole text as a sequence ("1, 0, 1", one yes/no per line), else its last line that is one
    ("Answer: yes, no, yes" after the model repeated the criteria)."""
    whole = _bare_sequence(text, n_items)
    if whole is not None:
        return [whole]
    for line in reversed([line for line in text.splitlines() if line.strip()]):
        entries = _bare_sequence(line, n_items)
        if entries is not None and (len(entries) > 1 or n_items == 1):
            return [entries]
    return []


_FRAGMENT = re.compile(
    r'(?:"item"\s*:\s*(\d{1,3})\s*,\s*)?"(?:verdict|met|value)"\s*:\s*("?[A-Za-z0-9. ]{1,12}"?)', re.IGNORECASE
)


def _fragment_candidates(text: str, n_items: int) -> list[list[_Entry]]:
    """`"verdict": 1` pieces of JSON that was cut off (max tokens) or is otherwise broken."""
    entries = []
    for match in _FRAGMENT.finditer(text):
        recognised, value = token_verdict(match.group(2))
        if not recognised:
            continue
        position = int(match.group(1)) - 1 if match.group(1) else None
        entries.append(_Entry(value, None, position))
    if entries and any(entry.value is not None for entry in entries):
        if any(entry.position is None for entry in entries):
            for entry in entries:
                entry.position = None
        return [entries]
    return []


def _choose(candidates: list[list[_Entry]], n_items: int) -> list[_Entry] | None:
    if not candidates:
        return None
    exact = [entries for entries in candidates if len(entries) == n_items]
    if exact:
        return exact[-1]
    longest = max(len(entries) for entries in candidates)
    return [entries for entries in candidates if len(entries) == longest][-1]


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)

_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i'?m (?:not able|unable)|i am (?:not able|unable)|"
    r"unable to (?:help|assist|evaluate|provide|comply|analy[sz]e|assess)|not (?:able|qualified|permitted) to|"
    r"cannot (?:help|assist|provide|evaluate|analy[sz]e|assess)|can't (?:help|assist|provide|evaluate|assess)|"
    r"as an ai\b|consult (?:a|your) (?:doctor|dermatologist|healthcare|medical))",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text.replace("’", "'")))


# -------------------------------------------------------------------------------------------- parse
def parse_answer(text: str | None, n_items: int, style: str = "paper") -> ParsedAnswer:
    """Parse a judge answer for a checklist of `n_items` items; never raises on the answer's content.

    `style` is the prompt style the answer responds to; both styles accept every shape (a paper-style judge
    sometimes answers in JSON and the other way round), the style only names what was asked for in errors.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be at least 1, got {n_items}")
    raw = (text or "").strip()
    if not raw:
        return no_answer(n_items, "failed", "empty answer")
    fenced = [block.strip() for block in _FENCE.findall(raw) if block.strip()]
    unfenced = _FENCE.sub(lambda match: match.group(1), raw).replace("`", "")
    sources = fenced + [unfenced]
    # An answer of the right length from the most reliable extractor wins at once; otherwise the longest
    # partial answer found by any extractor (the earlier extractor on a tie).
    fallback: list[_Entry] | None = None
    for extract in (_json_candidates, _bracket_candidates, _numbered_candidates, _bare_candidates, _fragment_candidates):
        for source in sources:
            chosen = _choose(extract(source, n_items), n_items)
            if chosen is None:
                continue
            if len(chosen) == n_items:
                return _finish(chosen, n_items)
            if fallback is None or len(chosen) > len(fallback):
                fallback = chosen
    if fallback is not None:
        return _finish(fallback, n_items)
    if looks_like_refusal(raw):
        return no_answer(n_items, "refused", "the judge declined to grade the image")
    expected = "a list like [1, 0, 1]" if style == "paper" else 'a JSON object {"items": [...]}'
    return no_answer(n_items, "failed", f"no verdicts found in the answer (expected {expected})")


def no_answer(n_items: int, status: ParseStatus, error: str) -> ParsedAnswer:
    """An answer with no verdicts (every item None) and why."""
    return ParsedAnswer([None] * n_items, [None] * n_items, status, error)


def _finish(entries: list[_Entry], n_items: int) -> ParsedAnswer:
    items: list[int | None] = [None] * n_items
    rationales: list[str | None] = [None] * n_items
    extra: list[int | None] = []
    numbered = all(entry.position is not None for entry in entries)
    for index, entry in enumerate(entries):
        position = entry.position if numbered else index
        if position is None or position >= n_items:
            extra.append(entry.value)
            continue
        items[position] = entry.value
        rationales[position] = entry.reason
    known = sum(value is not None for value in items)
    if known == 0:
        return ParsedAnswer(items, rationales, "failed", "the answer gave no usable verdict", extra)
    problems = []
    if len(entries) != n_items:
        problems.append(f"the answer had {len(entries)} values for {n_items} items")
    if known < n_items:
        problems.append(f"{n_items - known} of {n_items} items unknown")
    if extra:
        problems.append(f"{len(extra)} extra value(s) ignored")
    if problems:
        return ParsedAnswer(items, rationales, "partial", "; ".join(problems), extra)
    return ParsedAnswer(items, rationales, "ok", None, extra)
