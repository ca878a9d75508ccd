"""Judges: one async interface (`base.Judge`) over remote APIs, local VLMs, rules and ensembles.

`make_judge(config.judge, checklists)` builds the configured one:

- `openai`: any OpenAI-compatible chat-completions endpoint (`openai_judge.OpenAIJudge`);
- `hf`: a local Hugging Face vision-language model (`hf_judge.HFJudge`);
- `rules`: the deterministic judge of the domain the checklist set belongs to (`rules.make_rules_judge`);
- `ensemble`: the members listed in `judge.members`, each `"backend"` or `"backend:model"` (for example
  `["openai:gpt-4o", "hf:google/medgemma-4b-it"]`), built from the same section with that backend and model,
  combined per item by `judge.ensemble_rule` (`ensemble.EnsembleJudge`);
- `human` has no judge object: its verdicts are the reviews from the review page.

Backends are imported when asked for, so `import magic_align.judges` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from magic_align.judges.base import Judge, JudgeCallError, ParseStatus, Verdict

if TYPE_CHECKING:
    from magic_align.checklists.schema import ChecklistSet
    from magic_align.config import JudgeConfig

__all__ = ["Judge", "JudgeCallError", "ParseStatus", "Verdict", "make_judge", "member_config"]

MEMBER_BACKENDS = ("openai", "hf", "rules")


def member_config(cfg: "JudgeConfig", spec: str) -> "JudgeConfig":
    """The configuration of one ensemble member: `spec` is "backend" or "backend:model"."""
    from magic_align.config import ConfigError

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


def make_judge(cfg: "JudgeConfig", checklists: "ChecklistSet") -> Judge:
    """Build the judge that `cfg.backend` names (see the module docstring)."""
    from magic_align.config import ConfigError

    backend = cfg.backend
    if backend == "openai":
        from magic_align.judges.openai_judge import OpenAIJudge

        return OpenAIJudge(cfg)
    if backend == "hf":
        from magic_align.judges.hf_judge import HFJudge

        return HFJudge(cfg)
    if backend == "rules":
        from magic_align.judges.rules import make_rules_judge

        return make_rules_judge(cfg, checklists)
    if backend == "ensemble":
        from magic_align.judges.ensemble import EnsembleJudge

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
