"""The judge interface: one async call grades one image against one checklist.

Every backend (OpenAI-compatible HTTP, local Hugging Face VLM, rules, human) returns a `Verdict` for an answer
the model gave; the judge stage stores it in the ledger before anything else happens, keyed by
(image hash, judge id, checklist version, prompt version).

A call that got no answer (the server unreachable, timeouts or 5xx after every retry, a rejected key, an
unknown model, an exhausted quota, a local model that could not generate) is not a verdict: the backend raises
`JudgeCallError`, the stage records it as an *attempt* and the image stays to be asked again.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from magic_align.checklists.schema import Checklist
from magic_align.errors import MagicError
from magic_align.ledger import ParseStatus, Verdict

__all__ = ["Judge", "JudgeCallError", "ParseStatus", "Verdict"]


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
