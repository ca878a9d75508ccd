"""Target selection for image-to-image sampling: which condition a source image is turned into.

`uniform` (the default, and the paper's rule on Fitzpatrick17k, which has no body-site column): any condition
other than the source's, each with the same chance, so every condition ends up near 1/N of the targets.
`same_region` keeps the target in the source's body region where metadata says where the lesion is.
`region_of` maps each condition to its region (the checklist's `region:`; see `records.REGIONS`). A condition
whose region is "anywhere" (melanoma) is a candidate for every region, and a source in "anywhere" may go to
any condition. When the region is unknown or no other condition shares it, the choice falls back to uniform
and the reason is logged once per source label. Region names on both sides go through
`records.normalise_region`, so a checklist saying "head" and a dataset saying "FACE" agree.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Literal, Protocol

from magic_align.data.records import normalise_region

logger = logging.getLogger(__name__)

ANYWHERE = "anywhere"


class _IntegerRng(Protocol):  # numpy.random.Generator
    def integers(self, high: int) -> int: ...


def _pick(options: Sequence[str], rng: random.Random | _IntegerRng) -> str:
    # Accept both random.Random and numpy's Generator; index-based so both draw the same way per call.
    if hasattr(rng, "randrange"):
        return options[rng.randrange(len(options))]
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=None)
def _log_fallback(source_label: str | None, reason: str) -> None:
    logger.info("target for %s: uniform among the other conditions (%s)", source_label or "an unlabeled source", reason)


def region_candidates(source_label: str | None, region: str | None, classes: Sequence[str],
                      region_of: Mapping[str, str | None]) -> tuple[list[str], str | None]:
    """Same-region candidates and, when there are none to use, why (the caller then draws uniformly)."""
    others = [c for c in classes if c != source_label]
    if region is None:
        return others, "source region unknown"
    if region == ANYWHERE:
        return others, None
    same = [c for c in others if region_of.get(c) in (region, ANYWHERE)]
    if not same:
        return others, f"no other condition in region {region!r}"
    return same, None


def choose_target(source_label: str | None, classes: Sequence[str], rng: random.Random | _IntegerRng,
                  mode: Literal["uniform", "same_region"] = "uniform",
                  region_of: Mapping[str, str | None] | None = None, source_region: str | None = None) -> str:
    """A target condition different from the source's (any class for an unlabeled source, label None).

    `same_region` restricts the draw to conditions of the source's region: `source_region` when the record
    says where the lesion is, else the source condition's own region in `region_of`.
    """
    others = [c for c in classes if c != source_label]
    if not others:
        raise ValueError(f"no target condition other than {source_label!r} among classes {list(classes)}")
    if mode == "uniform":
        return _pick(others, rng)
    if mode != "same_region":
        raise ValueError(f"target selection mode {mode!r} is not 'uniform' or 'same_region'")
    regions = {name: normalise_region(value) for name, value in (region_of or {}).items()}
    region = normalise_region(source_region) if source_region is not None else regions.get(source_label)
    candidates, reason = region_candidates(source_label, region, classes, regions)
    if reason is not None:
        _log_fallback(source_label, reason)
    return _pick(candidates, rng)
