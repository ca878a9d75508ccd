"""Small checklists the judge and review tests build (import: `from checklist_builders import gated_checklist`)."""

from __future__ import annotations

from magic_align.checklists.schema import Checklist, ChecklistItem


def gated_checklist(condition: str, gate: tuple[str, str, str], gated: tuple[str, str, str],
                    other: tuple[str, str, str]) -> Checklist:
    """Three items, each `(id, aspect, text)`: `gated` requires `gate`, `other` stands alone. Token `<condition>`."""
    (gate_id, gate_aspect, gate_text), (gated_id, gated_aspect, gated_text), (other_id, other_aspect, other_text) = (
        gate, gated, other)
    return Checklist(
        condition=condition,
        display_name=condition.title(),
        token=f"<{condition}>",
        items=(
            ChecklistItem(id=gate_id, aspect=gate_aspect, text=gate_text),
            ChecklistItem(id=gated_id, aspect=gated_aspect, text=gated_text, requires=gate_id),
            ChecklistItem(id=other_id, aspect=other_aspect, text=other_text),
        ),
    )
