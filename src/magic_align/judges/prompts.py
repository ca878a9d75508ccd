"""Render a checklist into the text a vision-language judge reads.

Two styles:

- `paper`: the paper's prompt (docs/method.md section 3): grade the image against the numbered checklist of the
  target condition and answer with one list of 0/1 values, e.g. `[1, 0, 1, 0, 0]`; an image that shows no
  valid lesion gets all zeros.
- `structured`: one JSON object per item with a verdict and a one-sentence reason. Servers that support
  JSON-schema response formats get `response_format(...)`; the prompt text asks for the same JSON so the
  answer is still readable when a server ignores or rejects the response format.

`prompt_version(style)` is a content hash of everything fixed that the judge reads (the templates of the
style, the repair message and the response schema), so editing any of it gives a new ledger key. The
checklist's own text is covered by `Checklist.version`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from magic_align.checklists.schema import Checklist

PromptStyle = Literal["paper", "structured"]
PROMPT_STYLES: tuple[str, ...] = ("paper", "structured")

# The templates use str.format placeholders: {display_name}, {criteria}, {n_items}, {example}.
_INTRO = (
    "You are a board-certified dermatologist grading a generated skin image for a research study. "
    "The image is meant to show {display_name}. Judge only what is visible in the image. "
    "Below are {n_items} numbered criteria that a typical image of {display_name} satisfies.\n\n"
    "Criteria:\n{criteria}\n\n"
)

PAPER_TEMPLATE = _INTRO + (
    "For each criterion, write 1 if the image clearly satisfies it and 0 if it does not or you cannot tell. "
    "If the image does not show a valid skin lesion at all, every value is 0.\n"
    "Answer with exactly one list of {n_items} values in the order of the criteria, for example {example}, "
    "and nothing else."
)

STRUCTURED_TEMPLATE = _INTRO + (
    "For each criterion, give verdict 1 if the image clearly satisfies it and 0 if it does not or you cannot "
    "tell, and a reason of one short sentence about what you see. If the image does not show a valid skin "
    "lesion at all, every verdict is 0.\n"
    "Answer with only a JSON object of this form, one entry per criterion in order ({n_items} entries):\n"
    '{{"items": [{{"item": 1, "verdict": 1, "reason": "..."}}, {{"item": 2, "verdict": 0, "reason": "..."}}]}}'
)

PAPER_REPAIR = (
    "Your answer could not be read. Reply again with only one list of {n_items} values (1 or 0), one per "
    "criterion in order, for example {example}. No other text."
)

STRUCTURED_REPAIR = (
    "Your answer could not be read. Reply again with only the JSON object "
    '{{"items": [{{"item": 1, "verdict": 1, "reason": "..."}}, ...]}} with exactly {n_items} entries, '
    "one per criterion in order. No other text."
)

# The JSON schema for `response_format`. Lengths are not constrained in the schema (several servers reject
# minItems/maxItems in strict mode); the parser handles wrong lengths.
VERDICT_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "integer"},
                    "verdict": {"type": "integer", "enum": [0, 1]},
                    "reason": {"type": "string"},
                },
                "required": ["item", "verdict", "reason"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}

_TEMPLATES = {"paper": (PAPER_TEMPLATE, PAPER_REPAIR), "structured": (STRUCTURED_TEMPLATE, STRUCTURED_REPAIR)}


def _check_style(style: str) -> None:
    if style not in _TEMPLATES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def example_answer(n_items: int) -> str:
    """An example list of the right length, e.g. `[1, 0, 1, 0, 0]` for five items (alternating, so it is
    obviously an example and not a suggested answer)."""
    return "[" + ", ".join("1" if index % 2 == 0 else "0" for index in range(n_items)) + "]"


def render_criteria(checklist: Checklist) -> str:
    return "\n".join(f"{index}. {item.text}" for index, item in enumerate(checklist.items, start=1))


def render_prompt(checklist: Checklist, style: str = "paper") -> str:
    """The user-message text for grading one image against `checklist`."""
    _check_style(style)
    template = _TEMPLATES[style][0]
    n_items = len(checklist.items)
    return template.format(
        display_name=checklist.display_name,
        criteria=render_criteria(checklist),
        n_items=n_items,
        example=example_answer(n_items),
    )


def render_repair(n_items: int, style: str = "paper") -> str:
    """The follow-up message sent once when an answer could not be parsed."""
    _check_style(style)
    return _TEMPLATES[style][1].format(n_items=n_items, example=example_answer(n_items))


def response_format(style: str) -> dict | None:
    """The OpenAI `response_format` for a style (None for the paper style, which answers in plain text)."""
    _check_style(style)
    if style != "structured":
        return None
    return {"type": "json_schema", "json_schema": {"name": "checklist_verdict", "strict": True, "schema": VERDICT_SCHEMA}}


def prompt_version(style: str = "paper") -> str:
    """Content hash of the fixed text of a style: templates, repair message and response schema."""
    _check_style(style)
    template, repair = _TEMPLATES[style]
    content = {"style": style, "template": template, "repair": repair, "format": response_format(style)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
