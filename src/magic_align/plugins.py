"""Plug-in points: the registries a domain, data format or model source is added through.

Five registries map a name used in a configuration to what implements it:

| registry          | the setting that names an entry | an entry is                                            |
|-------------------|---------------------------------|--------------------------------------------------------|
| `presets`         | `magic run <name>`, `preset =`  | the path of a TOML preset                              |
| `checklist_sets`  | `judge.checklist`               | the path of a checklist YAML file (`checklists/schema.py`) |
| `data_kinds`      | `data.kind`                     | a `data.DataKind` (reads the dataset as records)       |
| `model_sources`   | `model.source`                  | a `diffusion.loading.ModelSource` (loads the base model) |
| `rules_domains`   | `judge.checklist` (rules judge) | a `judges.rules.RulesDomain` (grades items from pixels) |

The package registers its own entries (the `paper` preset, the dermatology checklists, the dataset loaders,
the hub / local / tiny / architecture model sources) when the module that implements them is imported.
Anything else comes from a plug-in: a package that declares, in its `pyproject.toml`,

    [project.entry-points."magic_align.plugins"]
    my_domain = "my_domain:register"

where `my_domain.register()` registers its entries. The built-in demo (`magic_align.demo`) is such a plug-in.
An entry may be given as the object itself or as a `"module:attribute"` reference, imported on first use, so
that registering stays cheap (a plug-in's heavy modules load only when a run asks for them).
Plug-ins are loaded once, the first time a registry is asked for a name it does not hold or for its names.
docs/extending.md walks through writing one.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from magic_align.errors import MagicError

ENTRY_POINT_GROUP = "magic_align.plugins"


class PluginError(MagicError, RuntimeError):
    """A plug-in that cannot be loaded, or two entries claiming one name."""


class Registry:
    """Names mapped to entries of one kind; `find` and `names` load the plug-ins first."""

    def __init__(self, what: str):
        self.what = what  # e.g. "model source", for messages
        self.entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any) -> None:
        """Add `entry` under `name` (an object, or a "module:attribute" reference imported on first use)."""
        if name in self.entries and self.entries[name] != entry:
            raise PluginError(f"two {self.what}s are registered as {name!r}: {self.entries[name]!r} and {entry!r}")
        self.entries[name] = entry

    def find(self, name: str) -> Any | None:
        """The entry registered as `name`, or None."""
        if name not in self.entries:
            load_plugins()
        entry = self.entries.get(name)
        if isinstance(entry, str):
            entry = self.entries[name] = _resolve(entry, f"{self.what} {name!r}")
        return entry

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self.entries)


def _resolve(reference: str, what: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute) if attribute else module
    except (ImportError, AttributeError) as error:
        raise PluginError(f"the {what} points at {reference!r}, which cannot be imported: {error}") from None


presets = Registry("preset")
checklist_sets = Registry("checklist set")
data_kinds = Registry("data kind")
model_sources = Registry("model source")
rules_domains = Registry("rules domain")

_loaded = False


def load_plugins() -> None:
    """Call the `register()` of every installed plug-in (the `magic_align.plugins` entry points), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before the calls: a plug-in that looks a name up must not load the plug-ins again
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name):
        try:
            entry_point.load()()
        except MagicError:
            _loaded = False
            raise
        except Exception as error:  # noqa: BLE001 - a broken plug-in is named, whatever broke it
            _loaded = False
            raise PluginError(
                f"the plug-in {entry_point.name!r} ({entry_point.value}) cannot be loaded: {type(error).__name__}: {error}"
            ) from None
