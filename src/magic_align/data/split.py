"""The train/test split: the N largest classes, stratified per class, seeded, group-aware.

The paper's split is the 20 largest Fitzpatrick17k classes, 50/50 at random. Only labels that have a
checklist can be classes (each class is a sampling target the judge grades); larger labels without one are
left out and named in split.json (PAD-UFES-20: NEV and SEK give way to the paper's ACK, BCC, MEL, SCC).
A leakage group (a SCIN case, a PAD-UFES-20 patient; the image itself otherwise) always lands on one side,
so no patient is both trained and tested on. Groups are placed greedily, largest first, each on the side that keeps every class
closest to its train fraction; with one image per group this is exact (round(fraction x count) per class).

A published split can be used instead (`data.split_dir`): a folder with `train.csv` and `test.csv`, each a
subset of the dataset's own CSV rows, as the MAGIC authors publish theirs (`splits/Fitzpatrick17k/`,
`splits/SCIN/`, `splits/PAD-UFES-20/` in their repository). Rows are matched to the dataset's records by the
dataset's image key (`SPLIT_KEYS`); a row naming an image the dataset lacks, a label that disagrees with the
dataset's, or an image on both sides is an error naming the file and row. The classes are then the split's
labels, and `data.num_classes` must equal their number. A data kind may bring its own split the same way
(`DataKind.given_split`: the demo's skewed, scarce task draws its training and test images apart); a published
split_dir takes precedence.

Data roles. Every image has one role, so no figure is graded on an image that shaped it:

- `train`: the training split (finetuning, sampling for preference pairs, the classifiers' real images);
- `tuning`: part of the test split, for choosing settings (`magic compare`, the default set);
- `locked`: the rest of the test split, graded only for the figures a report states (`magic compare
  --set-name locked`, the pipeline's comparison).

The test split is divided once, seeded (`data.split_seed`) and group-aware like the split itself, with
`data.locked_fraction` of every class locked (`divide_test`). A data kind may bring its own locked set instead
(`DataKind.locked_set`: the demo draws one from another procedural seed); the whole test split is then the
tuning set. `check_roles` refuses a split in which two roles share an image, by id or by file content.

The split is written once to `run/data/split.csv` (id, label, group, split, few_shot, role) with the settings
it was made with in `run/data/split.json`; every later stage reads it back (`run_split`), so all stages and
reruns see the same images. A split.csv written before roles existed (no `role` column) keeps its train and
test sides; its test side is divided on first read, as above, and the file is rewritten with the column.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from magic_align import plugins
from magic_align.checklists.schema import load_checklists
from magic_align.data import data_kind, load_records
from magic_align.data.check import check_images
from magic_align.data.images import sha256_file
from magic_align.data.records import DataError, LoadProblems, Record, match_labels, normalise_label, read_csv_rows
from magic_align.run import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from magic_align.config import RunConfig
    from magic_align.run import RunPaths

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("id", "label", "group", "split", "few_shot")  # required; `role` is added (older files lack it)
ROLES = ("train", "tuning", "locked")
# settings that older split.json files lack; missing, they count as the current value (the file is then upgraded)
LATER_SETTINGS = ("locked_fraction", "locked_set")


class RolesError(DataError):
    """Two data roles share an image; the message names both."""


@dataclass
class Split:
    train: list[Record]
    test: list[Record]
    classes: list[str]  # largest first; classes[i] is class index i for a classifier
    few_shot: list[Record] = field(default_factory=list)  # a stratified subset of train (empty if not asked)
    skipped_classes: list[str] = field(default_factory=list)  # larger labels left out for having no checklist
    tuning: list[Record] = field(default_factory=list)  # part of test: for choosing settings
    locked: list[Record] = field(default_factory=list)  # the rest of test, or a data kind's own set: stated figures

    def role(self, name: str) -> list[Record]:
        """The records of one role: train, tuning or locked."""
        if name not in ROLES:
            raise DataError(f"unknown data role {name!r}; expected one of {', '.join(ROLES)}")
        return {"train": self.train, "tuning": self.tuning, "locked": self.locked}[name]

    def counts(self) -> dict[str, tuple[int, int]]:
        """class -> (train images, test images)."""
        train, test = Counter(r.label for r in self.train), Counter(r.label for r in self.test)
        return {name: (train[name], test[name]) for name in self.classes}


def largest_classes(records: list[Record], num_classes: int,
                    eligible: Collection[str] | None = None) -> tuple[list[str], list[str]]:
    """The `num_classes` labels with most records (ties broken by name, so the choice is reproducible).

    With `eligible` (the checklist's conditions) only those labels count; the second list returned holds the
    labels that were passed over for that reason although they were larger than the smallest one chosen.
    """
    counts = Counter(r.label for r in records if r.label is not None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    usable = [label for label, _ in ranked if eligible is None or label in eligible]
    if len(usable) < num_classes:
        among = "" if eligible is None else " with a checklist"
        raise DataError(
            f"data.num_classes = {num_classes} but the data has only {len(usable)} label(s){among}: "
            f"{', '.join(sorted(usable)) or 'none'}; lower data.num_classes or add data"
            + ("" if eligible is None else f" (checklist conditions: {', '.join(eligible)})")
        )
    chosen = usable[:num_classes]
    smallest = counts[chosen[-1]]
    skipped = [label for label, n in ranked if label not in chosen and n >= smallest and label not in usable]
    return chosen, skipped


def assign_groups(records: list[Record], train_fraction: float, rng: random.Random) -> set[str]:
    """The ids that go to train. Whole groups move together; per-class counts stay near the fraction.

    Groups are taken largest first (random order among equal sizes); each goes to the side where the sum of
    squared distances between every class's count and its target grows least (ties: a coin flip).
    """
    by_group: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_group[record.group or record.id].append(record)
    names = sorted(by_group)
    rng.shuffle(names)
    names.sort(key=lambda name: -len(by_group[name]))  # stable: random order within one size

    totals = Counter(r.label for r in records)
    target = {label: {"train": round(train_fraction * n), "test": n - round(train_fraction * n)}
              for label, n in totals.items()}
    placed = {label: {"train": 0, "test": 0} for label in totals}
    train_ids: set[str] = set()
    for name in names:
        members = Counter(r.label for r in by_group[name])

        def growth(side: str) -> int:
            # change in sum over classes of (placed - target)^2 when this group's k members join `side`
            return sum(2 * k * (placed[c][side] - target[c][side]) + k * k for c, k in members.items())

        train_cost, test_cost = growth("train"), growth("test")
        side = "train" if train_cost < test_cost or (train_cost == test_cost and rng.random() < 0.5) else "test"
        for label, k in members.items():
            placed[label][side] += k
        if side == "train":
            train_ids.update(r.id for r in by_group[name])
    return train_ids


def few_shot_subset(train: list[Record], fraction: float, rng: random.Random) -> list[Record]:
    """A stratified random fraction of the training images (at least one per class)."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for record in train:
        by_label[record.label].append(record)
    chosen: set[str] = set()
    for label in sorted(by_label):
        members = sorted(by_label[label], key=lambda r: r.id)
        count = max(1, round(fraction * len(members)))
        chosen.update(r.id for r in rng.sample(members, count))
    return [r for r in train if r.id in chosen]


def divide_test(test: list[Record], locked_fraction: float | None, seed: int) -> tuple[list[Record], list[Record]]:
    """(tuning, locked): `locked_fraction` of every class locked, whole groups together, seeded; no fraction (a data
    kind that brings its own locked set): all tuning.

    Its own random stream, so the train/test sides and the few-shot subset of a seed are those drawn before roles
    existed; sorted by id first, so the input order does not matter."""
    if not locked_fraction:
        return list(test), []
    ordered = sorted(test, key=lambda r: r.id)
    tuning_ids = assign_groups(ordered, 1 - locked_fraction, random.Random(f"locked-set:{seed}"))
    return [r for r in test if r.id in tuning_ids], [r for r in test if r.id not in tuning_ids]


def build_split(records: list[Record], num_classes: int, train_fraction: float, seed: int,
                few_shot_fraction: float | None = None, eligible: Collection[str] | None = None,
                locked_fraction: float | None = 0.5) -> Split:
    """Split the records of the N largest classes (among `eligible` labels, when given) into train and test,
    and the test side into tuning and locked (see the module docstring; `locked_fraction=None`: all tuning, for
    a data kind that brings its own locked set)."""
    classes, skipped = largest_classes(records, num_classes, eligible)
    wanted = set(classes)
    kept = sorted((r for r in records if r.label in wanted), key=lambda r: r.id)
    rng = random.Random(seed)
    train_ids = assign_groups(kept, train_fraction, rng)
    train = [r for r in kept if r.id in train_ids]
    test = [r for r in kept if r.id not in train_ids]
    _check_both_sides(train, test, classes)
    few_shot = few_shot_subset(train, few_shot_fraction, rng) if few_shot_fraction else []
    tuning, locked = divide_test(test, locked_fraction, seed)
    return Split(train=train, test=test, classes=classes, few_shot=few_shot, skipped_classes=skipped,
                 tuning=tuning, locked=locked)


def check_roles(split: Split, content_hash: Callable[[Path], str] | None = sha256_file,
                extra_train: Collection[Record] = ()) -> None:
    """Refuse a split in which two roles share an image: the same id, or (with `content_hash`) the same file
    content under two ids. `extra_train` are training sources from outside the split (`synthesize.extra_sources`,
    sampled for pairs and synthesized from), checked as train images. The message names both images and their
    roles."""
    seen_ids: dict[str, str] = {}
    seen_content: dict[str, tuple[str, Record]] = {}
    for role in ROLES:
        for record in [*split.role(role), *(extra_train if role == "train" else ())]:
            other = seen_ids.setdefault(record.id, role)
            if other != role:
                raise RolesError(f"data roles share a source: image {record.id} ({record.path}) is both a {other} and "
                                 f"a {role} image; every image has one role (train, tuning or locked): rebuild the "
                                 "split with magic data split --force")
            if content_hash is None:
                continue
            digest = content_hash(record.path)
            other_role, first = seen_content.setdefault(digest, (role, record))
            if other_role != role:
                raise RolesError(f"data roles share a source: {role} image {record.id} ({record.path}) has the same "
                                 f"content as {other_role} image {first.id} ({first.path}); a duplicated image must "
                                 "not be in two roles: remove one copy from the data (or from the published split "
                                 "files), or rebuild a drawn split with magic data split --force")


def group_duplicates(records: list[Record], content_hash: Callable[[Path], str] = sha256_file) -> list[Record]:
    """The records, with every set of identical files (and the groups they join) merged into one group, so the
    split keeps copies of one image on one side and in one role."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    first_group: dict[str, str] = {}
    for record in records:
        group = record.group or record.id
        other = first_group.setdefault(content_hash(record.path), group)
        if root(other) != root(group):
            parent[root(group)] = root(other)
    if not parent:
        return records
    return [replace(r, group=root(r.group or r.id)) if root(r.group or r.id) != (r.group or r.id) else r
            for r in records]


def _check_both_sides(train: list[Record], test: list[Record], classes: list[str]) -> None:
    train_counts, test_counts = Counter(r.label for r in train), Counter(r.label for r in test)
    lopsided = [f"{c} (train {train_counts[c]}, test {test_counts[c]})" for c in classes
                if not train_counts[c] or not test_counts[c]]
    if lopsided:
        raise DataError(f"the split left class(es) with no train or no test image: {', '.join(lopsided)}; each needs "
                        "images in at least two groups (cases, patients): add data or lower data.num_classes")


# ------------------------------------------------------------------------------- published split files
PUBLISHED_SPLIT_FILES = ("train.csv", "test.csv")


def read_split_file(path: Path, kind: str, by_id: dict[str, Record], conditions: Collection[str]) -> list[Record]:
    """The dataset's records named by the rows of one published split file, in file order."""
    split_key = data_kind(kind).split_key  # the columns that name an image, turned into its record id
    if split_key is None:
        readers = [name for name in plugins.data_kinds.names() if data_kind(name).split_key is not None]
        raise DataError(f"data.split_dir: published split files are read for {', '.join(readers)}, "
                        f"not data.kind = {kind!r}; leave data.split_dir unset to draw the split")
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:  # read_csv_rows names bad bytes
        header = {name.strip() for name in (csv.DictReader(handle).fieldnames or [])}
    columns, key_of = split_key(header)
    chosen: list[Record] = []
    seen: dict[str, int] = {}
    # Image keys that differ only in letter case (an md5 digest written in upper-case hex) name the same image,
    # as long as no two of the dataset's ids differ only in case.
    folded = Counter(record_id.casefold() for record_id in by_id)
    by_folded_id = {name.casefold(): record for name, record in by_id.items() if folded[name.casefold()] == 1}
    for row, fields in read_csv_rows(path, columns, f"{kind} split", ("label",)):
        empty = [name for name in columns if not fields.get(name)]
        if empty:
            raise DataError(f"{path} row {row}: empty {', '.join(empty)}; every row must name an image")
        key = key_of(fields)
        record = by_id.get(key) or by_folded_id.get(key.casefold())
        if record is None:
            named = ", ".join(f"{name} {fields[name]!r}" for name in columns)
            raise DataError(f"{path} row {row}: {named} is not an image of the dataset (data.csv, after leaving out "
                            "unreadable images); the split file and the dataset must come from the same release")
        if record.id in seen:
            raise DataError(f"{path} row {row}: the image of row {seen[record.id]} again")
        seen[record.id] = row
        label = fields.get("label")
        if label:
            named = match_labels([Record("x", path, normalise_label(label))], conditions)[0].label
            if named != record.label:
                raise DataError(f"{path} row {row}: label {label!r} but the dataset labels this image "
                                f"{record.label!r}; the split file and the dataset disagree")
        chosen.append(record)
    return chosen


def published_split(split_dir: Path, kind: str, records: list[Record], num_classes: int,
                    eligible: Collection[str] | None = None) -> Split:
    """The split of `split_dir/train.csv` and `split_dir/test.csv` (see the module docstring); `run_split` leaves
    out unreadable images and draws the few-shot subset."""
    split_dir = Path(split_dir)
    missing = [name for name in PUBLISHED_SPLIT_FILES if not (split_dir / name).is_file()]
    if missing:
        raise DataError(f"data.split_dir = {split_dir} has no {' or '.join(missing)}; expected a folder holding "
                        "train.csv and test.csv in the dataset's CSV format (e.g. the authors' splits/Fitzpatrick17k/)")
    by_id = {r.id: r for r in records}
    conditions = list(eligible) if eligible is not None else sorted({r.label for r in records if r.label})
    train_path, test_path = (split_dir / name for name in PUBLISHED_SPLIT_FILES)
    train = read_split_file(train_path, kind, by_id, conditions)
    test = read_split_file(test_path, kind, by_id, conditions)
    train_ids = {r.id: r.row for r in train}
    both = [r for r in test if r.id in train_ids]
    if both:
        raise DataError(f"{test_path}: {len(both)} image(s) also in {train_path}, first {both[0].id} "
                        f"({train_path.name} and {test_path.name} must not share images)")
    return sides_split(train, test, num_classes, eligible, f"the split files in {split_dir}")


def sides_split(train: list[Record], test: list[Record], num_classes: int, eligible: Collection[str] | None,
                source: str) -> Split:
    """The split of given train and test sides (published files, or a data kind's own split): its classes are the
    sides' labels, largest first, each with a checklist (when `eligible` is given) and `num_classes` of them."""
    counts = Counter(r.label for r in train)
    classes = sorted({r.label for r in train + test}, key=lambda label: (-counts[label], label))
    if eligible is not None:
        no_checklist = [label for label in classes if label not in set(eligible)]
        if no_checklist:
            raise DataError(f"{source} hold label(s) without a checklist: "
                            f"{', '.join(no_checklist)}; every class is a sampling target the judge grades")
    if len(classes) != num_classes:
        raise DataError(f"{source} hold {len(classes)} classes but data.num_classes = "
                        f"{num_classes}; set data.num_classes = {len(classes)}")
    _check_both_sides(train, test, classes)
    return Split(train=train, test=test, classes=classes)


def kind_split(config: "RunConfig", paths: "RunPaths", kind, records: list[Record],
               eligible: Collection[str]) -> Split | None:
    """The data kind's own split (`DataKind.given_split`) when it has one for these settings, its records taken
    from the loaded dataset (so labels are matched to the checklist as everywhere else); else None."""
    if kind.given_split is None:
        return None
    sides = kind.given_split(config.data, paths, LoadProblems())
    if sides is None:
        return None
    by_id = {r.id: r for r in records}
    missing = [r.id for side in sides for r in side if r.id not in by_id]
    if missing:
        raise DataError(f"data.kind = {config.data.kind!r}: its own split names {len(missing)} image(s) its dataset "
                        f"does not hold, first {missing[0]}; the kind's load and given_split must agree")
    train, test = ([by_id[r.id] for r in side] for side in sides)
    both = {r.id for r in train} & {r.id for r in test}
    if both:
        raise DataError(f"data.kind = {config.data.kind!r}: its own split puts {len(both)} image(s) on both sides, "
                        f"first {sorted(both)[0]}")
    return sides_split(train, test, config.data.num_classes, eligible,
                       f"the own split of data.kind = {config.data.kind!r}")


# ------------------------------------------------------------------------------------------ files
def write_split(split: Split, csv_path: Path, settings: dict) -> None:
    """split.csv (one row per record, with its role) and split.json (settings, classes, counts) beside it."""
    few = {r.id for r in split.few_shot}
    locked = {r.id for r in split.locked}
    with atomic_path(csv_path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow((*SPLIT_COLUMNS, "role"))
            for side, members in (("train", split.train), ("test", split.test)):
                for r in members:
                    role = "train" if side == "train" else "locked" if r.id in locked else "tuning"
                    writer.writerow([r.id, r.label, r.group, side, int(r.id in few), role])
    summary = {"settings": settings, "classes": split.classes,
               "counts": {name: list(pair) for name, pair in split.counts().items()},
               "roles": {role: len(split.role(role)) for role in ROLES},
               "few_shot": len(split.few_shot), "skipped_classes": split.skipped_classes}
    atomic_write_text(csv_path.with_suffix(".json"), json.dumps(summary, indent=2))


def read_split(csv_path: Path, records: list[Record]) -> Split:
    """Rebuild a split from split.csv and the dataset's records (matched by id). A file without the `role`
    column (written before roles existed) gives empty tuning and locked sets; `run_split` then divides it."""
    by_id = {r.id: r for r in records}
    train, test, few_shot, tuning, locked = [], [], [], [], []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path} is missing column(s) {', '.join(missing)}; expected {', '.join(SPLIT_COLUMNS)}")
        has_roles = "role" in (reader.fieldnames or [])
        for row, fields in enumerate(reader, start=1):
            record = by_id.get(fields["id"])
            if record is None:
                raise DataError(f"{csv_path} row {row}: id {fields['id']!r} is not in the dataset any more; "
                                "the data changed since the split was made (rebuild it: magic data split --force)")
            if fields["split"] not in ("train", "test"):
                raise DataError(f"{csv_path} row {row}: split {fields['split']!r} is not 'train' or 'test'")
            (train if fields["split"] == "train" else test).append(record)
            if fields["few_shot"] == "1":
                few_shot.append(record)
            if has_roles:
                expected = ("train",) if fields["split"] == "train" else ("tuning", "locked")
                if fields["role"] not in expected:
                    raise DataError(f"{csv_path} row {row}: role {fields['role']!r} on the {fields['split']} side; "
                                    f"expected {' or '.join(expected)}")
                {"tuning": tuning, "locked": locked}.get(fields["role"], []).append(record)
    summary_path = csv_path.with_suffix(".json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    classes = summary.get("classes") or [label for label, _ in Counter(r.label for r in train + test).most_common()]
    return Split(train=train, test=test, classes=classes, few_shot=few_shot,
                 skipped_classes=summary.get("skipped_classes", []), tuning=tuning, locked=locked)


def split_settings(config: "RunConfig") -> dict:
    data = config.data
    settings = {"kind": data.kind, "csv": str(data.csv) if data.csv else None, "num_classes": data.num_classes,
                "train_fraction": data.train_fraction, "seed": data.split_seed,
                "few_shot_fraction": data.few_shot_fraction, "checklist": config.judge.checklist,
                "locked_fraction": data.locked_fraction, "locked_set": data_kind(data.kind).locked_set is not None}
    if data.split_dir is not None:  # the files' contents too: a replaced file must not pass for the old one
        folder = Path(data.split_dir)
        settings["split_files"] = {name: sha256_file(folder / name)[:16] if (folder / name).is_file() else None
                                   for name in PUBLISHED_SPLIT_FILES}
        settings["split_dir"] = str(folder)
    return settings


def run_split(config: "RunConfig", paths: "RunPaths", force: bool = False,
              progress: Callable[[int], None] | None = None,
              on_total: Callable[[int], None] | None = None) -> Split:
    """The run's split with its roles: read from run/data/split.csv when it exists for the same settings, else
    built (records loaded, images checked as data.on_bad_image says, classes checked against the checklist,
    identical files kept in one group, roles checked apart). A data kind's own locked set is added last."""
    csv_path = paths.data / "split.csv"
    settings = split_settings(config)
    content_hash = functools.cache(sha256_file)  # grouping identical files and checking roles read each file once
    kind = data_kind(config.data.kind)
    # a kind that brings its own locked set leaves the whole test split for tuning
    locked_fraction = None if kind.locked_set is not None else config.data.locked_fraction
    checklists = load_checklists(config.judge.checklist)
    records = load_records(config.data, paths, conditions=checklists.condition_names)
    if csv_path.is_file() and not force:
        summary_path = csv_path.with_suffix(".json")
        stored = json.loads(summary_path.read_text()).get("settings") if summary_path.is_file() else None
        if stored is not None:
            stored = {**{k: settings[k] for k in LATER_SETTINGS}, **stored}
        if stored is not None and stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise DataError(f"{csv_path} was made with other settings ({', '.join(changed)} differ); a run keeps "
                            "one split: use a new run name, or rebuild it with magic data split --force")
        split = read_split(csv_path, records)
        if split.test and not split.tuning and not split.locked:  # written before roles existed: divide once
            # identical files grouped first, as a new split does (older splits did not group them)
            split.tuning, split.locked = (divide_test(group_duplicates(split.test, content_hash), locked_fraction,
                                                      config.data.split_seed)
                                          if locked_fraction else (list(split.test), []))
            check_roles(split, content_hash)
            logger.warning("%s had no role column: its test split was divided into %d tuning and %d locked images "
                           "(data.locked_fraction, data.split_seed) and the file rewritten", csv_path,
                           len(split.tuning), len(split.locked))
            write_split(split, csv_path, settings)
        return _with_own_locked_set(split, kind, config, paths)
    named = (published_split(config.data.split_dir, config.data.kind, records, config.data.num_classes,
                             eligible=checklists.condition_names)
             if config.data.split_dir is not None else
             kind_split(config, paths, kind, records, checklists.condition_names))
    if named is not None:  # given sides: published files, or the data kind's own
        if on_total is not None:
            on_total(len(named.train) + len(named.test))
        # only the images the split names are checked; unreadable ones are left out (or stop the run)
        good, _ = check_images(named.train + named.test, config.data, progress)
        readable = {r.id for r in good}
        train, test = [r for r in named.train if r.id in readable], [r for r in named.test if r.id in readable]
        _check_both_sides(train, test, named.classes)
        fraction = config.data.few_shot_fraction
        few_shot = few_shot_subset(train, fraction, random.Random(config.data.split_seed)) if fraction else []
        tuning, locked = (divide_test(group_duplicates(test, content_hash), locked_fraction, config.data.split_seed)
                          if locked_fraction else (list(test), []))
        split = Split(train=train, test=test, classes=named.classes, few_shot=few_shot, tuning=tuning, locked=locked)
    else:
        if on_total is not None:
            on_total(len(records))
        good, _ = check_images(records, config.data, progress)
        # Every class is a target the judge grades against, so only labels with a checklist are candidates.
        split = build_split(group_duplicates(good, content_hash), config.data.num_classes, config.data.train_fraction,
                            config.data.split_seed, config.data.few_shot_fraction, eligible=checklists.condition_names,
                            locked_fraction=locked_fraction)
        if split.skipped_classes:
            logger.warning("classes left out of the split for having no checklist in %s: %s", checklists.id,
                           ", ".join(split.skipped_classes))
    check_roles(split, content_hash)
    write_split(split, csv_path, settings)
    return _with_own_locked_set(split, kind, config, paths)


def _with_own_locked_set(split: Split, kind, config: "RunConfig", paths: "RunPaths") -> Split:
    """The split with the data kind's own locked set (its images of the split's classes), when it has one."""
    if kind.locked_set is None:
        return split
    wanted = set(split.classes)
    split.locked = [r for r in kind.locked_set(config.data, paths, LoadProblems()) if r.label in wanted]
    check_roles(split, content_hash=None)  # by id on every read; `magic compare --set-name locked` checks content
    return split
