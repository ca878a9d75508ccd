"""Plug-in points: the registries a domain, data format or model source is added through, and the demo using them
exactly as a user's package would (docs/extending.md)."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magic_align import plugins
from magic_align.checklists.schema import ChecklistError, load_checklists
from magic_align.config import ConfigError, DataConfig, ModelConfig, load_config
from magic_align.data import DataKind, load_records
from magic_align.data.records import DataError, Record
from magic_align.diffusion.loading import ModelLoadError, ModelSource, build_tiny_pipeline, load_pipeline, model_hash
from magic_align.judges.rules import ItemResult, RulesDomain, make_rules_judge

PACKAGE = Path(plugins.__file__).parent

CHECKLISTS = """
id: spots
conditions:
  - condition: red-spot
    display_name: Red spot
    token: <red-spot>
    items:
      - {id: red, aspect: colour, text: "The image is mostly red."}
  - condition: blue-spot
    display_name: Blue spot
    token: <blue-spot>
    items:
      - {id: blue, aspect: colour, text: "The image is mostly blue."}
"""


@pytest.fixture
def spots_plugin(tmp_path, monkeypatch):
    """A small user domain registered the way docs/extending.md shows: preset, checklists, data kind, model
    source and rules domain. `monkeypatch` takes every entry out again after the test."""
    images = tmp_path / "spots"
    images.mkdir()
    for index, colour in enumerate([(220, 30, 30), (30, 30, 220)] * 2):
        Image.new("RGB", (16, 16), colour).save(images / f"{index}.png")
    (tmp_path / "spots.yaml").write_text(CHECKLISTS)
    (tmp_path / "spots.toml").write_text(
        'name = "spots"\n[model]\nsource = "spots-model"\nresolution = 64\n[data]\nkind = "spots"\nnum_classes = 2\n'
        '[judge]\nbackend = "rules"\nchecklist = "spots"\n'
    )
    labels = {"0.png": "red-spot", "1.png": "blue-spot", "2.png": "red-spot", "3.png": "blue-spot"}

    def load_spots(data_cfg, paths, problems):
        return [Record(path.stem, path, labels[path.name], group=path.stem) for path in sorted(images.glob("*.png"))]

    def red_share(image):
        r, g, b = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
        return r / (r + g + b)

    domain = RulesDomain(
        name="spots", version="v1", analyse=red_share, gate=lambda share: ItemResult(True, "any image"),
        items={("red-spot", "red"): lambda share: ItemResult(share > 0.5, f"red share {share:.2f}"),
               ("blue-spot", "blue"): lambda share: ItemResult(share < 0.2, f"red share {share:.2f}")},
    )
    source = ModelSource(load=lambda cfg, dtype: build_tiny_pipeline(seed=cfg.seed + 7, resolution=cfg.resolution),
                         identity=lambda cfg: f"spots-model:{cfg.seed}".encode())
    for registry, name, entry in (
        (plugins.presets, "spots", tmp_path / "spots.toml"),
        (plugins.checklist_sets, "spots", tmp_path / "spots.yaml"),
        (plugins.data_kinds, "spots", DataKind(load_spots)),
        (plugins.model_sources, "spots-model", source),
        (plugins.rules_domains, "spots", domain),
    ):
        monkeypatch.setitem(registry.entries, name, entry)
    return tmp_path


def test_a_user_domain_plugs_into_every_registry(spots_plugin):
    config = load_config("spots")
    records = load_records(config.data, None)
    assert [r.label for r in records] == ["red-spot", "blue-spot", "red-spot", "blue-spot"]
    checklists = load_checklists(config.judge.checklist)
    judge = make_rules_judge(config.judge, checklists)
    red = Image.new("RGB", (8, 8), (230, 20, 20))
    assert judge.id == "rules:spots-v1"
    assert judge.grade(red, checklists["red-spot"]).items == [1]
    assert judge.grade(red, checklists["blue-spot"]).items == [0]
    pipe = load_pipeline(config.model)
    reference = build_tiny_pipeline(seed=7)
    assert all((a == b).all() for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()))
    assert model_hash(config.model) == model_hash(config.model.model_copy())
    assert model_hash(config.model) != model_hash(config.model.model_copy(update={"seed": 1}))
    assert model_hash(config.model) != model_hash(ModelConfig(source="tiny"))


def test_a_preset_file_may_start_from_a_registered_preset(spots_plugin, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('preset = "spots"\nname = "mine"\n')
    config = load_config(path)
    assert config.name == "mine" and config.data.kind == "spots" and config.model.source == "spots-model"


def test_unknown_names_are_errors_that_list_what_is_registered(tmp_path):
    (tmp_path / "mine.toml").write_text('preset = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"'nowhere' is not a preset; expected one of \[.*'demo'.*'paper'.*'tiny'"):
        load_config(tmp_path / "mine.toml")
    with pytest.raises(ConfigError, match=r"config file nowhere does not exist \(or name a preset: demo, paper, tiny"):
        load_config("nowhere")
    with pytest.raises(ChecklistError, match=r"no checklist set named 'nowhere'; known: \[.*'demo'.*'fitzpatrick20'"):
        load_checklists("nowhere")
    with pytest.raises(DataError, match=r"data.kind = 'nowhere' is not a known data kind; .*'folder'.*'procedural'"):
        load_records(DataConfig(kind="nowhere"))
    with pytest.raises(ModelLoadError, match=r"model.source = 'nowhere' is not a known model source; .*'demo'.*'hub'"):
        model_hash(ModelConfig(source="nowhere"))
    with pytest.raises(ConfigError, match=r"no measurement rules for checklist set 'fitzpatrick20'; known domains: "
                                          r"\['demo', 'tiny'\]"):
        make_rules_judge(None, load_checklists("fitzpatrick20"))


def test_a_reference_is_imported_on_first_use_and_a_bad_one_is_named(monkeypatch):
    registry = plugins.Registry("thing")
    registry.register("path", "pathlib:PurePosixPath")
    registry.register("broken", "magic_align.no_such_module:THING")
    assert registry.entries["path"] == "pathlib:PurePosixPath"  # nothing imported yet
    from pathlib import PurePosixPath

    assert registry.find("path") is PurePosixPath and registry.entries["path"] is PurePosixPath
    with pytest.raises(plugins.PluginError, match="thing 'broken' points at 'magic_align.no_such_module:THING'"):
        registry.find("broken")
    assert registry.find("absent") is None


def test_two_entries_under_one_name_are_refused():
    registry = plugins.Registry("model source")
    registry.register("mine", "a:b")
    registry.register("mine", "a:b")  # the same entry again (a module imported twice) is fine
    with pytest.raises(plugins.PluginError, match="two model sources are registered as 'mine'"):
        registry.register("mine", "a:c")


def test_the_demo_is_an_installed_plugin():
    declared = [point for point in plugins.entry_points(group=plugins.ENTRY_POINT_GROUP) if point.name == "demo"]
    assert [point.value for point in declared] == ["magic_align.demo:register"]
    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points."magic_align.plugins"]\ndemo = "magic_align.demo:register"' in pyproject


class CountingEntryPoint:
    name, value = "counting", "counting:register"

    def __init__(self):
        self.calls = 0

    def load(self):
        return self.register

    def register(self):
        self.calls += 1


def test_plugins_are_loaded_once_and_a_broken_one_is_named(monkeypatch):
    point = CountingEntryPoint()
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == plugins.ENTRY_POINT_GROUP else [])
    plugins.load_plugins()
    plugins.load_plugins()
    assert point.calls == 1
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [EntryPoint("broken", "no_such_package:register", group)])
    with pytest.raises(plugins.PluginError, match=r"the plug-in 'broken' \(no_such_package:register\) cannot be loaded"):
        plugins.load_plugins()


# --------------------------------------------------------------------------------------------- layering
def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _product_modules() -> list[Path]:
    """Every module but the demo plug-in and the command line (which offers the demo's own commands)."""
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if "demo" not in path.relative_to(PACKAGE).parts and path.name != "cli.py"]


def test_the_product_never_imports_the_demo():
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}" for path in _product_modules()
                 for name in sorted(_imported_modules(path)) if name == "magic_align.demo" or
                 name.startswith("magic_align.demo.")]
    assert offenders == []


def test_the_product_has_no_demo_special_cases():
    """No comparison with, or branch on, the demo's names: the demo arrives through the registries only."""
    offenders = []
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(value in {"demo", "procedural"} for value in constants):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
