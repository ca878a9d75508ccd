"""The run directory: the only interface between stages (docs/architecture.md).

Every stage takes a `RunPaths` and reads what earlier stages wrote; nothing else is passed between them.
Files are written to a temporary name and renamed, so a killed stage never leaves half an artifact.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from magic_align.config import RunConfig, dump_config


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def data(self) -> Path:  # split files and (for the demo) the generated dataset
        return self.root / "data"

    @property
    def model(self) -> Path:  # textual-inversion tokens + lora/ + model.json
        return self.root / "model"

    def samples(self, round_index: int) -> Path:
        return self.root / "samples" / f"round-{round_index}"

    def sample_images(self, round_index: int) -> Path:
        return self.samples(round_index) / "images"

    def trajectories(self, round_index: int) -> Path:
        return self.samples(round_index) / "trajectories"

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    @property
    def aligned(self) -> Path:  # final LoRA(s): aligned/dpo, aligned/rft
        return self.root / "aligned"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def prepare_run(config: RunConfig) -> RunPaths:
    """Create the run directory and write the resolved configuration (once; a rerun keeps the first copy
    unless the configuration changed, in which case the new one is written and the old one kept beside it)."""
    paths = RunPaths(config.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    text = dump_config(config)
    if paths.config.exists():
        previous = paths.config.read_text()
        if previous != text:
            index = 1
            while (paths.root / f"config.{index}.toml").exists():
                index += 1
            paths.config.rename(paths.root / f"config.{index}.toml")
            atomic_write_text(paths.config, text)
    else:
        atomic_write_text(paths.config, text)
    return paths


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`, on error removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.replace(temporary_path, target)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)


def set_aside(folder: Path, *companions: Path) -> Path:
    """Move `folder` (and each existing companion, under the same suffix) to `<name>.other-settings[-N]`, the first
    suffix none of them has been moved to yet, so work made under other settings is kept, never overwritten.
    Returns where `folder` went."""
    folders = [Path(folder), *(Path(companion) for companion in companions)]
    suffix, index = ".other-settings", 1
    while any(item.with_name(item.name + suffix).exists() for item in folders):
        index += 1
        suffix = f".other-settings-{index}"
    for item in folders:
        if item.exists():
            os.replace(item, item.with_name(item.name + suffix))
    return folders[0].with_name(folders[0].name + suffix)
