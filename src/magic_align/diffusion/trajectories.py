"""Trajectory shards: the denoising trajectories the trainers learn from, in safetensors files.

One shard holds N samples that share the sampling settings:

    latents     [N, T+1, C, h, w]  fp16 by default; latents[:, i] is denoised at timesteps[i] into latents[:, i+1],
                                   latents[:, T] is the final latent (the decoded image)
    log_probs   [N, T]             fp32, log p(latents[:, i+1] | latents[:, i]) under the sampling policy
    timesteps   [T]                int64, the timesteps actually used (e.g. 291, 281, ..., 1)
    prompt_ids  [N, L]             int64 token ids of the prompt; the frozen text encoder recomputes embeddings

and, in the safetensors metadata under "magic_align", a JSON header: format version, sample ids, per-sample
records (unit, k, seed, prompt, source and target labels, image path and hash), scheduler config, steps, eta,
guidance, strength, log-prob reduction, negative prompt, model hash, latent dtype.

The latents are those the sampler actually visited: it rounds each latent to the storage dtype before taking the
next step, so the stored log-probs are exactly those of the stored latents (see `sampler.py`).

Shards are named `p<process>-<number>.safetensors` so that processes under `accelerate launch` never write the same
file. Documented for users in docs/formats.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from magic_align.run import atomic_path
from magic_align.errors import MagicError

FORMAT_VERSION = 1
HEADER_KEY = "magic_align"
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_PATTERN = re.compile(r"^p(\d+)-(\d+)\.safetensors$")


class TrajectoryError(MagicError, ValueError):
    """A trajectory shard that cannot be used as asked (missing, malformed, unknown sample id)."""


@dataclass
class TrajectoryBatch:
    """What a trainer needs for some samples: latents in float32, and the timesteps per sample."""

    sample_ids: list[str]
    latents: torch.Tensor  # [N, T+1, C, h, w] float32
    log_probs: torch.Tensor  # [N, T] float32
    timesteps: torch.Tensor  # [N, T] int64
    prompt_ids: torch.Tensor  # [N, L] int64
    headers: list[dict] = field(default_factory=list)  # the shard header of each sample


def shard_name(process_index: int, number: int) -> str:
    return f"p{process_index:02d}-{number:05d}.safetensors"


def next_shard_number(folder: Path, process_index: int) -> int:
    """The first shard number of this process that is not taken (a rerun appends, never overwrites)."""
    taken = [
        int(match.group(2))
        for path in Path(folder).glob("p*-*.safetensors")
        if (match := SHARD_PATTERN.match(path.name)) and int(match.group(1)) == process_index
    ]
    return max(taken, default=-1) + 1


def write_shard(
    path: Path,
    sample_ids: Sequence[str],
    latents: torch.Tensor,
    log_probs: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_ids: torch.Tensor,
    header: dict,
    latent_dtype: str = "float16",
) -> Path:
    """Write one shard atomically. `header` holds the settings; sample ids and shapes are checked here."""
    count = len(sample_ids)
    if len(set(sample_ids)) != count:
        raise TrajectoryError(f"{path}: duplicate sample ids in one shard")
    steps = int(timesteps.shape[0])
    if latents.ndim != 5 or latents.shape[0] != count or latents.shape[1] != steps + 1:
        raise TrajectoryError(f"{path}: latents {tuple(latents.shape)}; expected [{count}, {steps + 1}, C, h, w]")
    if tuple(log_probs.shape) != (count, steps):
        raise TrajectoryError(f"{path}: log_probs {tuple(log_probs.shape)}; expected [{count}, {steps}]")
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != count:
        raise TrajectoryError(f"{path}: prompt_ids {tuple(prompt_ids.shape)}; expected [{count}, L]")
    if latent_dtype not in LATENT_DTYPES:
        raise TrajectoryError(f"latent dtype {latent_dtype!r}: expected one of {sorted(LATENT_DTYPES)}")
    full_header = {
        **header,
        "format_version": FORMAT_VERSION,
        "sample_ids": list(sample_ids),
        "latent_dtype": latent_dtype,
    }
    tensors = {
        "latents": latents.detach().to("cpu", LATENT_DTYPES[latent_dtype]).contiguous(),
        "log_probs": log_probs.detach().to("cpu", torch.float32).contiguous(),
        "timesteps": timesteps.detach().to("cpu", torch.int64).contiguous(),
        "prompt_ids": prompt_ids.detach().to("cpu", torch.int64).contiguous(),
    }
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={HEADER_KEY: json.dumps(full_header)})
    return path


def read_header(path: Path) -> dict:
    """The JSON header of a shard, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"trajectory shard {path} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise TrajectoryError(f"{path} is not a readable safetensors file: {error}") from None
    if HEADER_KEY not in metadata:
        raise TrajectoryError(f"{path} has no '{HEADER_KEY}' header: not a magic-align trajectory shard")
    header = json.loads(metadata[HEADER_KEY])
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise TrajectoryError(
            f"{path} has trajectory format version {header['format_version']}; this magic-align reads up to "
            f"{FORMAT_VERSION}: upgrade magic-align"
        )
    return header


def load_shard(path: Path, sample_ids: Iterable[str] | None = None) -> TrajectoryBatch:
    """The samples of one shard (all, or those named, in the order named), latents as float32."""
    header = read_header(path)
    ids = header["sample_ids"]
    if sample_ids is None:
        rows = list(range(len(ids)))
        wanted = list(ids)
    else:
        wanted = list(sample_ids)
        index = {sample_id: row for row, sample_id in enumerate(ids)}
        missing = [sample_id for sample_id in wanted if sample_id not in index]
        if missing:
            raise TrajectoryError(f"{path} has no sample(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        rows = [index[sample_id] for sample_id in wanted]
    with safe_open(str(path), "pt") as handle:
        timesteps = handle.get_tensor("timesteps")
        names = ("latents", "log_probs", "prompt_ids")
        if rows == list(range(len(ids))):
            latents, log_probs, prompt_ids = (handle.get_tensor(name) for name in names)
        else:  # read only the rows asked for
            slices = [handle.get_slice(name) for name in names]
            latents, log_probs, prompt_ids = (torch.stack([part[row] for row in rows]) for part in slices)
    return TrajectoryBatch(
        sample_ids=wanted,
        latents=latents.to(torch.float32),
        log_probs=log_probs.to(torch.float32),
        timesteps=timesteps.unsqueeze(0).expand(len(rows), -1).clone(),
        prompt_ids=prompt_ids,
        headers=[header] * len(rows),
    )


class TrajectoryStore:
    """Every shard in a folder (or several), indexed by sample id: the trainer's reader.

    `store.get(["r0-u0001-k0", "r0-u0001-k1"])` returns a `TrajectoryBatch` in the order asked, reading only those
    rows. A sample id found in two shards (a crash between writing a shard and recording it, then a rerun) resolves
    to the newest shard.
    """

    def __init__(self, folders: Path | Sequence[Path]):
        folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(folder) for folder in folders]
        self.index: dict[str, tuple[Path, int]] = {}
        self.headers: dict[Path, dict] = {}
        shards = sorted(
            (path for folder in folders if folder.is_dir() for path in folder.glob("*.safetensors")),
            key=lambda path: path.stat().st_mtime_ns,
        )
        for path in shards:
            header = read_header(path)
            self.headers[path] = header
            for row, sample_id in enumerate(header["sample_ids"]):
                self.index[sample_id] = (path, row)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def sample_ids(self) -> list[str]:
        return list(self.index)

    def locate(self, sample_id: str) -> tuple[Path, int]:
        try:
            return self.index[sample_id]
        except KeyError:
            raise TrajectoryError(f"no trajectory for sample {sample_id!r} in the shards indexed") from None

    def header(self, sample_id: str) -> dict:
        return self.headers[self.locate(sample_id)[0]]

    def get(self, sample_ids: Sequence[str]) -> TrajectoryBatch:
        """(latents, log_probs, timesteps, prompt_ids) for these samples, in this order."""
        by_shard: dict[Path, list[str]] = {}
        for sample_id in sample_ids:
            by_shard.setdefault(self.locate(sample_id)[0], []).append(sample_id)
        parts = {path: load_shard(path, ids) for path, ids in by_shard.items()}
        position = {
            sample_id: (path, row) for path, batch in parts.items() for row, sample_id in enumerate(batch.sample_ids)
        }
        shapes = {tuple(batch.latents.shape[1:]) for batch in parts.values()}
        if len(shapes) > 1:
            raise TrajectoryError(f"samples {list(sample_ids)[:4]} come from shards with different latent shapes {shapes}")
        lengths = {batch.prompt_ids.shape[1] for batch in parts.values()}
        if len(lengths) > 1:
            raise TrajectoryError(f"samples {list(sample_ids)[:4]} come from shards with different prompt lengths {lengths}")

        def gather(name: str) -> torch.Tensor:
            return torch.stack([getattr(parts[path], name)[row] for path, row in (position[s] for s in sample_ids)])

        return TrajectoryBatch(
            sample_ids=list(sample_ids),
            latents=gather("latents"),
            log_probs=gather("log_probs"),
            timesteps=gather("timesteps"),
            prompt_ids=gather("prompt_ids"),
            headers=[self.headers[position[s][0]] for s in sample_ids],
        )
