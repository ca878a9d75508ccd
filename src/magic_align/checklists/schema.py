"""Checklists as data: one YAML file holds the checklists of a domain (one per condition).

File layout:

    id: fitzpatrick20            # the checklist set
    description: ...
    conditions:
      - condition: psoriasis     # the dataset label
        display_name: Psoriasis
        token: <psoriasis>       # the textual-inversion token used in prompts
        region: extremities      # optional body region, used for same-region target selection
        items:
          - {id: location, aspect: location, text: "..."}
          - {id: scale, aspect: texture, text: "...", requires: lesion}

A child item (`requires`) counts as failed whenever its parent failed. A checklist's `version` is a content
hash of what the judge sees (condition, items and their texts), so any edit makes a new ledger key.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from magic_align import plugins
from magic_align.errors import MagicError


class ChecklistError(MagicError, ValueError):
    """A checklist file that does not follow the schema; the message names the file, condition and item."""


class ChecklistItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[a-z0-9_\-]+$")
    aspect: str = Field(min_length=1)
    text: str = Field(min_length=3)
    requires: str | None = None


class Checklist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    condition: str = Field(min_length=1)
    display_name: str = Field(min_length=1)
    token: str = Field(min_length=1)
    region: str | None = None
    items: tuple[ChecklistItem, ...] = Field(min_length=1)

    @field_validator("token")
    @classmethod
    def _token_has_no_spaces(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("a token is one word without spaces, e.g. <psoriasis>")
        return value

    @model_validator(mode="after")
    def _items_are_consistent(self) -> "Checklist":
        ids = [item.id for item in self.items]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"item ids must be unique; repeated: {duplicates}")
        position = {item_id: index for index, item_id in enumerate(ids)}
        for index, item in enumerate(self.items):
            if item.requires is None:
                continue
            if item.requires not in position:
                raise ValueError(f"item {item.id!r} requires {item.requires!r}, which is not an item of {self.condition!r}")
            if position[item.requires] >= index:
                raise ValueError(f"item {item.id!r} requires {item.requires!r}, which must come before it")
        return self

    @cached_property
    def version(self) -> str:
        content = {
            "condition": self.condition,
            "display_name": self.display_name,
            "items": [item.model_dump() for item in self.items],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]

    def apply_requires(self, items: list[int | None]) -> list[int | None]:
        """A child fails when its parent failed; unknown parents leave the child as answered."""
        result = list(items)
        position = {item.id: index for index, item in enumerate(self.items)}
        for index, item in enumerate(self.items):
            if item.requires is not None and result[position[item.requires]] == 0:
                result[index] = 0
        return result


class ChecklistSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    description: str = ""
    conditions: tuple[Checklist, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _conditions_are_unique(self) -> "ChecklistSet":
        names = [c.condition for c in self.conditions]
        tokens = [c.token for c in self.conditions]
        for what, values in (("condition", names), ("token", tokens)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"each {what} must appear once; repeated: {repeated}")
        return self

    def __getitem__(self, condition: str) -> Checklist:
        for checklist in self.conditions:
            if checklist.condition == condition:
                return checklist
        known = ", ".join(c.condition for c in self.conditions)
        raise KeyError(f"no checklist for condition {condition!r} in {self.id!r}; known: {known}")

    def __contains__(self, condition: object) -> bool:
        return any(c.condition == condition for c in self.conditions)

    @property
    def condition_names(self) -> list[str]:
        return [c.condition for c in self.conditions]


BUILTIN_DIR = Path(str(resources.files("magic_align") / "checklists"))
# The dermatology sets ship here; plug-ins register theirs (the demo's `demo` and `tiny`) by name.
for _path in sorted(BUILTIN_DIR.glob("*.yaml")):
    plugins.checklist_sets.register(_path.stem, _path)


def builtin_checklists() -> list[str]:
    """The names `load_checklists` accepts: the sets shipped here and those of plug-ins."""
    return plugins.checklist_sets.names()


def load_checklists(name_or_path: str | Path) -> ChecklistSet:
    """Load a registered checklist set by name (e.g. 'fitzpatrick20') or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        registered = plugins.checklist_sets.find(str(name_or_path))
        if registered is None:
            raise ChecklistError(f"no checklist set named {str(name_or_path)!r}; known: {builtin_checklists()}")
        path = Path(registered)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChecklistError(f"checklist file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ChecklistError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ChecklistError(f"{path}: expected a mapping with keys id, description, conditions")
    try:
        return ChecklistSet.model_validate(data)
    except ValidationError as error:
        lines = [f"invalid checklist file {path}:"]
        for problem in error.errors():
            location = _describe_location(data, problem["loc"])
            lines.append(f"  {location}: {problem['msg']}")
        raise ChecklistError("\n".join(lines)) from None


def _describe_location(data: dict, loc: tuple) -> str:
    """Turn ('conditions', 3, 'items', 1, 'text') into 'condition psoriasis, item 2 (scale), field text'."""
    parts: list[str] = []
    node = data
    for index, key in enumerate(loc):
        if key == "conditions" and isinstance(node, dict):
            node = node.get("conditions")
            continue
        if key == "items" and isinstance(node, dict):
            node = node.get("items")
            continue
        if isinstance(key, int) and isinstance(node, list) and key < len(node):
            entry = node[key]
            previous = loc[index - 1] if index else None
            if previous == "conditions":
                name = entry.get("condition") if isinstance(entry, dict) else None
                parts.append(f"condition {name or '#' + str(key + 1)}")
            else:
                name = entry.get("id") if isinstance(entry, dict) else None
                parts.append(f"item {key + 1}" + (f" ({name})" if name else ""))
            node = entry
            continue
        parts.append(f"field {key}")
        node = node.get(key) if isinstance(node, dict) else None
    return ", ".join(parts) or "(top level)"
