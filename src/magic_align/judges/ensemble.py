"""Several judges as one: each member grades the image, the verdicts are combined item by item.

Two rules (`judge.ensemble_rule`):

- `majority`: each item takes the value most members gave, counting only members that answered that item.
  A tie (including no member answering) gives None, "unknown": the ensemble does not pretend to know.
- `mean`: each item takes the mean over the members that answered the image, an unknown item counting as
  not met (as `Verdict.score` does); above 0.5 is met, below is not met, exactly 0.5 (a tie) is not met (0).
  The per-item means are written into the rationales ("mean 0.67 of 3").

Members whose answer failed to parse or refused are left out of both rules; if none answered, the ensemble's
verdict is failed (refused when every member refused). Tokens, cost and requests add up; latency is the slowest
member (they run concurrently). `raw` keeps every member's raw answer as JSON keyed by member id.

A member that got no answer at all (`JudgeCallError`: unreachable, out of retries, rejected key) makes the
ensemble raise `JudgeCallError` for the image too, systematic when the member's was: a verdict from the other
members alone would be a different judge's verdict. The other members' answers to that image are not kept;
they are asked again with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Literal, Sequence

from PIL import Image

from magic_align.checklists.schema import Checklist
from magic_align.judges.base import Judge, JudgeCallError, Verdict

EnsembleRule = Literal["majority", "mean"]


def majority_item(values: Sequence[int | None]) -> int | None:
    met = sum(1 for value in values if value == 1)
    not_met = sum(1 for value in values if value == 0)
    if met == not_met:
        return None
    return 1 if met > not_met else 0


def mean_item(values: Sequence[int | None]) -> tuple[int, float]:
    """(combined value, mean) with unknown counted as not met; a mean of exactly 0.5 is not met."""
    if not values:
        return 0, 0.0
    mean = sum(1 for value in values if value == 1) / len(values)
    return (1 if mean > 0.5 else 0), mean


def combine_items(member_items: Sequence[Sequence[int | None]], rule: EnsembleRule = "majority") -> list[int | None]:
    """Combine the per-item answers of the members that answered an image."""
    if not member_items:
        raise ValueError("combine_items needs at least one member's items")
    lengths = {len(items) for items in member_items}
    if len(lengths) != 1:
        raise ValueError(f"members answered different numbers of items: {sorted(lengths)}")
    columns = list(zip(*member_items))
    if rule == "majority":
        return [majority_item(column) for column in columns]
    if rule == "mean":
        return [mean_item(column)[0] for column in columns]
    raise ValueError(f"unknown ensemble rule {rule!r}; expected 'majority' or 'mean'")


def combine_verdicts(verdicts: Sequence[Verdict], member_ids: Sequence[str], rule: EnsembleRule = "majority") -> Verdict:
    """One verdict from the members' verdicts on the same image (see the module docstring)."""
    if len(verdicts) != len(member_ids) or not verdicts:
        raise ValueError("combine_verdicts needs one member id per verdict, and at least one verdict")
    n_items = len(verdicts[0].items)
    answered = [verdict for verdict in verdicts if verdict.answered]
    raw = json.dumps({member: verdict.raw for member, verdict in zip(member_ids, verdicts)}, ensure_ascii=False)
    errors = [f"{member}: {verdict.error}" for member, verdict in zip(member_ids, verdicts) if verdict.error]
    totals = dict(
        latency_s=max(verdict.latency_s for verdict in verdicts),
        input_tokens=sum(verdict.input_tokens for verdict in verdicts),
        output_tokens=sum(verdict.output_tokens for verdict in verdicts),
        cost_usd=sum(verdict.cost_usd for verdict in verdicts),
        requests=sum(verdict.requests for verdict in verdicts),
    )
    if not answered:
        status = "refused" if all(verdict.parse_status == "refused" for verdict in verdicts) else "failed"
        return Verdict(
            items=[None] * n_items, rationales=[None] * n_items, raw=raw, parse_status=status,
            error="no member answered: " + "; ".join(errors), **totals,
        )
    items = combine_items([verdict.items for verdict in answered], rule)
    if rule == "mean":
        rationales: list[str | None] = [
            f"mean {mean_item(column)[1]:.2f} of {len(column)}" for column in zip(*(verdict.items for verdict in answered))
        ]
    else:
        rationales = [
            f"{sum(1 for v in column if v == 1)} met, {sum(1 for v in column if v == 0)} not met of {len(column)}"
            for column in zip(*(verdict.items for verdict in answered))
        ]
    undecided = sum(1 for value in items if value is None)
    if undecided:
        errors.insert(0, f"{undecided} of {n_items} items undecided (tie or unknown)")
    return Verdict(
        items=items, rationales=rationales, raw=raw, parse_status="partial" if undecided else "ok",
        error="; ".join(errors) or None, **totals,
    )


class EnsembleJudge:
    """A `Judge` that asks every member concurrently and combines their verdicts per item."""

    def __init__(self, members: Sequence[Judge], rule: EnsembleRule = "majority") -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member judge (judge.members)")
        if rule not in ("majority", "mean"):
            raise ValueError(f"judge.ensemble_rule = {rule!r}; expected 'majority' or 'mean'")
        ids = [member.id for member in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"ensemble members must be different judges; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
        self.members = list(members)
        self.rule = rule
        self.id = f"ensemble:{rule}(" + "+".join(ids) + ")"
        versions = json.dumps([[member.id, member.prompt_version] for member in members])
        self.prompt_version = hashlib.sha256(versions.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"EnsembleJudge({self.id!r})"

    async def judge(self, image: Image.Image, checklist: Checklist) -> Verdict:
        outcomes = await asyncio.gather(*(member.judge(image, checklist) for member in self.members), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, JudgeCallError):
                raise outcome
        failures = [(member, outcome) for member, outcome in zip(self.members, outcomes) if isinstance(outcome, JudgeCallError)]
        if failures:
            member, first = failures[0]
            requests = sum(outcome.requests for outcome in outcomes)  # verdicts and errors both count them
            raise JudgeCallError(
                f"ensemble member {member.id}: {first}", cause=f"{member.id}: {first.cause}", requests=requests,
                systematic=any(error.systematic for _, error in failures),
            )
        verdicts = list(outcomes)
        verdict = combine_verdicts(verdicts, [member.id for member in self.members], self.rule)
        if verdict.answered:
            verdict.items = checklist.apply_requires(verdict.items)
        return verdict

    def check_ready(self) -> None:
        """Raise when a member can make no call (see `OpenAIJudge.check_ready`)."""
        for member in self.members:
            check = getattr(member, "check_ready", None)
            if check is not None:
                check()

    async def aclose(self) -> None:
        for member in self.members:
            close = getattr(member, "aclose", None)
            if close is not None:
                await close()
