"""The built-in demo: a procedural dermatology domain that runs every MAGIC stage offline on a CPU.

It is a plug-in like any other (docs/extending.md): `register()` is named by the `magic_align.plugins` entry
point in pyproject.toml and adds, through the registries of `magic_align.plugins`,

- the presets `demo` (`demo.toml`) and `tiny` (`tiny.toml`, the seconds-long plumbing run of the tests);
- the checklist sets `demo` (`demo.yaml`: six conditions, five items each) and `tiny` (`tiny.yaml`);
- the data kind `procedural` (`procedural.py`: draws the dataset into `run/data/procedural/`);
- the model source `demo` (`model.py`: the small base model shipped in `demo-base/`, and its trainer);
- the rules domains `demo` (`rules.py`: measures every demo item from pixels) and `tiny` (`tiny.py`:
  pixel statistics that vary on the noise of the tiny random-init model, so its pairs have winners).

Registering imports nothing heavy: each entry is a "module:attribute" reference, loaded when a run uses it.
"""

from __future__ import annotations

from pathlib import Path

from magic_align import plugins

HERE = Path(__file__).parent


def register() -> None:
    for name in ("demo", "tiny"):
        plugins.presets.register(name, HERE / f"{name}.toml")
        plugins.checklist_sets.register(name, HERE / f"{name}.yaml")
    plugins.data_kinds.register("procedural", "magic_align.demo.procedural:PROCEDURAL")
    plugins.model_sources.register("demo", "magic_align.demo.model:DEMO_MODEL_SOURCE")
    plugins.rules_domains.register("demo", "magic_align.demo.rules:DEMO_DOMAIN")
    plugins.rules_domains.register("tiny", "magic_align.demo.tiny:TINY_DOMAIN")
