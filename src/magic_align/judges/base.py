"""The judge interface: one async call grades one image against one checklist.

Every backend (OpenAI-compatible HTTP, local Hugging Face VLM, rules, human) returns a `Verdict` for an answer
the model gave; the judge stage stores it in the ledger before anything else happens, keyed by
(image hash, judge id, checklist version, prompt version).

A call that got no answer (the server unreachable, timeouts or 5xx after every retry, a rejected key, an
unknown model, an exhausted quota, a local model that could not generate) is not a verdict: the backend raises
`JudgeCallError`, the stage records it as an *attempt* and the image stays to be asked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from magic_align.checklists.schema import Checklist
from magic_align.errors import MagicError

# ok: every item answered; partial: some items unknown (wrong length); failed: nothing usable (items all None);
# refused: the model declined to grade.
ParseStatus = Literal["ok", "partial", "failed", "refused"]


@dataclass
class Verdict:
    items: list[int | None]  # one of 1, 0, None (unknown) per checklist item, in checklist order
    rationales: list[str | None] = field(default_factory=list)  # one short reason per item where the backend gives one
    raw: str = ""  # the raw answer text, exactly as received
    parse_status: ParseStatus = "ok"
    latency_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None  # why the answer failed, for failed / refused verdicts
    requests: int = 0  # calls to the model behind this verdict (HTTP requests with retries and repair); 0: not counted

    @property
    def score(self) -> int:
        """Items met (unknown items count as not met)."""
        return sum(1 for value in self.items if value == 1)

    @property
    def answered(self) -> bool:
        return self.parse_status in ("ok", "partial")


class JudgeCallError(MagicError, RuntimeError):
    """A call that produced no answer; never a verdict. `cause` is the short reason the stage counts by
    ("connection error (ConnectError)", "HTTP 503"), `requests` the calls made for it, and `systematic` says
    every later call would fail the same way (rejected key, unknown model, exhausted quota), so the stage stops."""

    def __init__(self, message: str, *, cause: str | None = None, requests: int = 0, systematic: bool = False):
        super().__init__(message)
        self.cause = cause or message
        self.requests = requests
        self.systematic = systematic


@runtime_checkable
class Judge(Protocol):
    id: str  # stable identity for the ledger key, e.g. "openai:gpt-4o" or "rules:demo-v1"
    prompt_version: str  # content hash of the prompt text; "none" for judges without a prompt

    async def judge(self, image: Image.Image, checklist: Checklist) -> Verdict: ...
