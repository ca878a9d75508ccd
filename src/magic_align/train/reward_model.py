"""The MAGIC-RFT reward model: R(x, c) in [0, 1], how well image x shows condition c.

A small head on frozen image features (`backbones.py`), conditioned on the condition by FiLM: a learned
embedding of the condition scales and shifts the hidden layer, so the same image can score high for one
condition and low for another. Only the head learns; the backbone features are computed once and cached, which
makes fitting the head a matter of seconds even on a CPU.

Labels (docs/training.md, "Reward model"):

- a judged synthetic image gets the fraction of checklist items met for its *target* condition
  (`feedback.sample_rewards`: the configured judge, or the latest expert review with `pairs.prefer_human`;
  a verdict with an undecided item gives no label, as it gives no pair);
- a real training image gets 1 for its own condition;
- optionally (`rft.reward_real_negative_label`, default 0) a real image also gets that label for one other
  condition drawn at random, so the head has to look at the condition and not only at "is this a real lesion".
  Set it to nothing (remove the key) to train on own-condition real labels only.

Files (`aligned/rft/reward/`): `reward_head.safetensors` (the head's tensors) and `reward_model.json`
(backbone name, feature size, hidden size, condition names in embedding order, training summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from magic_align.backbones import load_backbone
from magic_align.run import atomic_path, atomic_write_text
from magic_align.errors import MagicError

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModelError(MagicError, ValueError):
    """Bad labels or a reward-model folder that cannot be read; the message says which and why."""


# --------------------------------------------------------------------------------------------- head
class RewardHead(nn.Module):
    """features [N, D], condition index [N] -> reward [N] in (0, 1).

    h = GELU(FiLM(W1 LayerNorm(f); gamma(c), beta(c))); R = sigmoid(w2 . h + b2), with FiLM(h) = h * (1 + gamma) + beta.
    gamma and beta start at zero so the untrained head is condition-blind and the condition effect is learned.
    """

    def __init__(self, feature_dim: int, num_conditions: int, hidden: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_conditions = num_conditions
        self.hidden = hidden
        self.norm = nn.LayerNorm(feature_dim)
        self.project = nn.Linear(feature_dim, hidden)
        self.film = nn.Embedding(num_conditions, 2 * hidden)
        nn.init.zeros_(self.film.weight)
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(condition).chunk(2, dim=-1)
        hidden = self.project(self.norm(features))
        hidden = nn.functional.gelu(hidden * (1 + gamma) + beta)
        return torch.sigmoid(self.out(hidden).squeeze(-1))


@dataclass
class RewardFit:
    head: RewardHead
    losses: list[float]  # mean training MSE per epoch
    final_mse: float  # MSE of the trained head on its training set


def fit_reward_head(
    features: torch.Tensor,
    condition: torch.Tensor,
    labels: torch.Tensor,
    num_conditions: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    hidden: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
    on_epoch: Callable[[float], None] | None = None,
) -> RewardFit:
    """Fit a `RewardHead` with MSE on (features, condition, label in [0, 1]); `on_epoch(mse)` after each epoch."""
    if not (len(features) == len(condition) == len(labels)):
        raise RewardModelError(
            f"features ({len(features)}), conditions ({len(condition)}) and labels ({len(labels)}) differ in length"
        )
    if len(features) == 0:
        raise RewardModelError("no labelled images to train the reward model on (no judged samples and no real images)")
    if labels.min() < 0 or labels.max() > 1:
        raise RewardModelError(f"reward labels must lie in [0, 1]; got range [{labels.min():.3f}, {labels.max():.3f}]")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's initialisation
    head = RewardHead(features.shape[1], num_conditions, hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features = features.float()
    labels = labels.float()
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            prediction = head(features[index], condition[index])
            loss = nn.functional.mse_loss(prediction, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(features))
        if on_epoch is not None:
            on_epoch(losses[-1])
    with torch.no_grad():
        final = nn.functional.mse_loss(head(features, condition), labels).item()
    return RewardFit(head=head, losses=losses, final_mse=final)


# ---------------------------------------------------------------------------------- full model + I/O
class RewardModel:
    """A frozen backbone plus a trained head; `score(images, conditions)` gives rewards in [0, 1]."""

    def __init__(self, backbone, head: RewardHead, condition_names: list[str], backbone_name: str):
        self.backbone = backbone
        self.head = head.eval()
        self.condition_names = list(condition_names)
        self.backbone_name = backbone_name
        self._index = {name: i for i, name in enumerate(self.condition_names)}

    def condition_index(self, conditions: Sequence[str]) -> torch.Tensor:
        try:
            return torch.tensor([self._index[c] for c in conditions], dtype=torch.long)
        except KeyError as error:
            raise RewardModelError(
                f"condition {error.args[0]!r} is unknown to the reward model; it knows {self.condition_names}"
            ) from None

    @torch.no_grad()
    def score_features(self, features: torch.Tensor, conditions: Sequence[str]) -> torch.Tensor:
        return self.head(features.float().cpu(), self.condition_index(conditions))

    @torch.no_grad()
    def score(self, images: list, conditions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        scores = []
        for start in range(0, len(images), batch_size):
            features = self.backbone.features(images[start : start + batch_size])
            scores.append(self.score_features(features, conditions[start : start + batch_size]))
        return torch.cat(scores) if scores else torch.zeros(0)

    def save(self, folder: Path, summary: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu().contiguous() for key, value in self.head.state_dict().items()}
        with atomic_path(folder / HEAD_FILE) as temporary:
            save_file(state, str(temporary))
        meta = {
            "backbone": self.backbone_name,
            "feature_dim": self.head.feature_dim,
            "hidden": self.head.hidden,
            "conditions": self.condition_names,
            "summary": summary or {},
        }
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def load_reward_model(folder: Path, device: str | torch.device = "cpu") -> RewardModel:
    """Load a reward model saved by `RewardModel.save` (the backbone is rebuilt from its name)."""
    meta_path = Path(folder) / META_FILE
    if not meta_path.exists():
        raise RewardModelError(f"{folder} holds no reward model ({META_FILE} is missing); run `magic train rft` first")
    try:
        meta = json.loads(meta_path.read_text())
        head = RewardHead(int(meta["feature_dim"]), len(meta["conditions"]), int(meta["hidden"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise RewardModelError(f"{meta_path}: expected keys backbone, feature_dim, hidden, conditions ({error})") from None
    head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    backbone = load_backbone(meta["backbone"], device)
    return RewardModel(backbone, head, meta["conditions"], meta["backbone"])
