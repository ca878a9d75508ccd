"""Shared pytest fixtures (append only; each fixture says who relies on it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Stable Diffusion saved as a diffusers folder (built once per test session).

    Load it with `load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))`.
    """
    from magic_align.diffusion.loading import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


# Used by tests/test_judge_stage.py, tests/test_feedback.py, tests/test_agreement.py (judge stage, pairs, agreement).
FEEDBACK_CHECKLIST_YAML = """
id: feedback-test
description: two small checklists for the ledger / judge / pairs tests
conditions:
  - condition: alpha
    display_name: Alpha
    token: <alpha>
    items:
      - {id: red, aspect: color, text: "the lesion is red"}
      - {id: round, aspect: shape, text: "the lesion is round", requires: red}
      - {id: big, aspect: size, text: "the lesion is big"}
      - {id: scaly, aspect: texture, text: "the lesion is scaly"}
      - {id: arm, aspect: location, text: "the lesion is on the arm"}
  - condition: beta
    display_name: Beta
    token: <beta>
    items:
      - {id: dark, aspect: color, text: "the lesion is dark"}
      - {id: flat, aspect: shape, text: "the lesion is flat"}
      - {id: small, aspect: size, text: "the lesion is small"}
      - {id: smooth, aspect: texture, text: "the lesion is smooth"}
      - {id: face, aspect: location, text: "the lesion is on the face"}
"""


@pytest.fixture
def feedback_run(tmp_path):
    """A run directory with a ledger holding `units` x K synthetic 8 x 8 PNG samples of round 0.

    Call it: `config, ledger, samples = feedback_run(units=4, k=2)`. Each image's red channel is
    `17 * index` (so images differ); targets alternate between the conditions 'alpha' and 'beta' of a small
    checklist file written beside the run (config.judge.checklist points at it).
    """
    import hashlib

    from PIL import Image

    from magic_align.config import load_config
    from magic_align.ledger import Ledger, SampleRow
    from magic_align.run import prepare_run

    def build(units: int = 4, k: int = 2, real: int = 0, extra: list[str] | None = None):
        checklist_path = tmp_path / "checklists.yaml"
        checklist_path.write_text(FEEDBACK_CHECKLIST_YAML)
        overrides = [f"runs_dir='{tmp_path / 'runs'}'", f"judge.checklist='{checklist_path}'", "judge.concurrency=4"]
        config = load_config("tiny", overrides + (extra or []))
        paths = prepare_run(config)
        ledger = Ledger(paths.ledger)
        rows = []
        for index in range(units * k + real):
            unit, kk = divmod(index, k)
            relative = f"samples/round-0/images/{index:04d}.png"
            target = paths.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), ((17 * index) % 256, 40, 90)).save(target)
            rows.append(
                SampleRow(
                    sample_id=f"r0-u{unit:03d}-k{kk}",
                    round=0,
                    unit_id=f"u{unit:03d}",
                    k=kk,
                    image_path=relative,
                    image_sha256=hashlib.sha256(target.read_bytes()).hexdigest(),
                    source_id=f"real-{unit}",
                    source_label="beta" if unit % 2 == 0 else "alpha",
                    target_label="alpha" if unit % 2 == 0 else "beta",
                    prompt="an image of <alpha> on human skin",
                    seed=index,
                    shard=None,
                    shard_index=None,
                    synthetic=index < units * k,
                )
            )
        ledger.add_samples(rows)
        return config, ledger, rows

    return build
