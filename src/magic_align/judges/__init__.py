"""Judges: one async interface (`base.Judge`) over remote APIs, local VLMs, rules and ensembles.

`make_judge(config.judge, checklists)` builds the configured one:

- `openai`: any OpenAI-compatible chat-completions endpoint (`openai_judge.OpenAIJudge`);
- `hf`: a local Hugging Face vision-language model (`hf_judge.HFJudge`);
- `rules`: the deterministic judge of the domain the checklist set belongs to (`rules.make_rules_judge`);
- `ensemble`: the members listed in `judge.members`, each `"backend"` or `"backend:model"` (for example
  `["openai:gpt-4o", "hf:google/medgemma-4b-it"]`), built from the same section with that backend and model,
  combined per item by `judge.ensemble_rule` (`ensemble.EnsembleJudge`);
- `human` has no judge object: its verdicts are the reviews from the review page.

`judge_identity` names the judge whose verdicts later stages read. The `hf` backend imports torch and transformers
only when it loads its model.
"""

from __future__ import annotations

from magic_align.checklists.schema import ChecklistSet
from magic_align.config import ConfigError, JudgeConfig, RunConfig
from magic_align.judges.base import Judge, JudgeCallError, ParseStatus, Verdict
from magic_align.judges.ensemble import EnsembleJudge
from magic_align.judges.hf_judge import HFJudge
from magic_align.judges.openai_judge import OpenAIJudge
from magic_align.judges.rules import make_rules_judge

__all__ = ["Judge", "JudgeCallError", "ParseStatus", "Verdict", "judge_identity", "make_judge", "member_config"]

MEMBER_BACKENDS = ("openai", "hf", "rules")


def member_config(cfg: JudgeConfig, spec: str) -> JudgeConfig:
    """The configuration of one ensemble member: `spec` is "backend" or "backend:model"."""
    backend, _, model = spec.partition(":")
    backend = backend.strip()
    if backend not in MEMBER_BACKENDS:
        raise ConfigError(
            f"judge.members entry {spec!r}: expected 'backend' or 'backend:model' with backend one of {MEMBER_BACKENDS}"
        )
    update: dict = {"backend": backend, "members": []}
    if model.strip():
        update["model"] = model.strip()
    return cfg.model_copy(update=update)


def make_judge(cfg: JudgeConfig, checklists: ChecklistSet) -> Judge:
    """Build the judge that `cfg.backend` names (see the module docstring)."""
    backend = cfg.backend
    if backend == "openai":
        return OpenAIJudge(cfg)
    if backend == "hf":
        return HFJudge(cfg)
    if backend == "rules":
        return make_rules_judge(cfg, checklists)
    if backend == "ensemble":
        if not cfg.members:
            raise ConfigError('judge.backend = "ensemble" needs judge.members, e.g. ["openai:gpt-4o", "hf:google/medgemma-4b-it"]')
        members = [make_judge(member_config(cfg, spec), checklists) for spec in cfg.members]
        return EnsembleJudge(members, cfg.ensemble_rule)
    if backend == "human":
        raise ConfigError(
            'judge.backend = "human" has no judge to call: human verdicts are the reviews from the review page '
            "(`magic review`)"
        )
    raise ConfigError(f"unknown judge.backend {backend!r}")


def judge_identity(config: RunConfig, checklists: ChecklistSet, judge_id: str | None = None) -> tuple[str, str | None]:
    """(judge id, prompt version) whose verdicts later stages read. An explicit `judge_id` (e.g. imported
    feedback) matches any prompt version, the newest first; otherwise the configured judge is built to ask it."""
    if judge_id is not None:
        return judge_id, None
    try:
        judge = make_judge(config.judge, checklists)
    except Exception as error:
        raise ConfigError(
            f"cannot build the configured judge (judge.backend = {config.judge.backend!r}) to learn its id: "
            f"{error}; name the judge explicitly (--judge ID)"
        ) from error
    return judge.id, judge.prompt_version
