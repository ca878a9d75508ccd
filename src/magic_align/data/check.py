"""Checking a dataset before a run uses it: every image decodes, every label has a checklist.

`check_images` opens every record's file (full decode, JPEGs at reduced scale) and either skips the bad
ones with a count or stops at the first, as `data.on_bad_image` says. `run_data_check` is what
`magic data check` runs: it reports everything and stops at nothing. Every unusable row (dropped while
reading the CSV, a missing, empty, truncated, oversized or non-image file, a repeated id, a label without a
checklist) is named by file and row with its reason, and makes the report not `ok`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from magic_align.checklists.schema import load_checklists
from magic_align.data import load_records
from magic_align.data.images import BadImageError, open_checked
from magic_align.data.records import LoadProblems, Record, where_row

if TYPE_CHECKING:
    from magic_align.config import DataConfig, RunConfig
    from magic_align.run import RunPaths


@dataclass
class ImageCheckReport:
    checked: int = 0
    bad: list[BadImageError] = field(default_factory=list)

    @property
    def good(self) -> int:
        return self.checked - len(self.bad)

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.checked} image(s) checked: {self.good} good, {len(self.bad)} bad"]
        lines += [f"  {error}" for error in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        return "\n".join(lines)


def check_images(records: list[Record], cfg: "DataConfig", progress: Callable[[int], None] | None = None,
                 stop_on_bad: bool | None = None) -> tuple[list[Record], ImageCheckReport]:
    """Return the records whose image decodes, and a report of the others.

    With `cfg.on_bad_image == "stop"` the first bad image raises `BadImageError` (naming file and row);
    `stop_on_bad` overrides the setting (the check command reports everything).
    """
    stop = cfg.on_bad_image == "stop" if stop_on_bad is None else stop_on_bad
    report = ImageCheckReport()
    good = []
    for record in records:
        report.checked += 1
        try:
            open_checked(record.path, cfg.max_image_pixels, record.row or None, record.source or None, reduced=True).close()
        except BadImageError as error:
            if stop:
                raise BadImageError(error.path, f"{error.reason} (data.on_bad_image = 'stop'; set it to 'skip' "
                                    "to leave bad files out with a count)", error.row, error.source) from None
            report.bad.append(error)
        else:
            good.append(record)
        if progress is not None:
            progress(1)
    return good, report


def unknown_labels(records: list[Record], conditions: Collection[str]) -> Counter:
    """Labels (with their record counts) that no checklist covers; unlabeled records are not counted."""
    known = set(conditions)
    return Counter(r.label for r in records if r.label is not None and r.label not in known)


@dataclass(frozen=True)
class UnusableRow:
    """One row (or file) a run cannot use, and why; `where` is 'file.csv row 12' or the file itself."""

    source: str
    row: int
    text: str  # the whole line shown: it names the file, the row and the reason

    def __str__(self) -> str:
        return self.text


@dataclass
class DataCheckReport:
    records: int
    problems: LoadProblems
    images: ImageCheckReport
    labels: Counter  # label -> count, every label
    unknown: Counter  # labels without a checklist
    checklist: str
    conditions: list[str]
    unlabeled: int = 0
    unknown_rows: list[UnusableRow] = field(default_factory=list)  # one per record whose label has no checklist

    @property
    def unusable(self) -> list[UnusableRow]:
        """Every row a run cannot use, in file and row order: dropped while reading, bad image, unknown label."""
        rows = [UnusableRow(source, row, where_row(source, row) + f": {message}")
                for source, row, message in self.problems.dropped]
        rows += [UnusableRow(error.source or str(error.path), error.row or 0, str(error)) for error in self.images.bad]
        rows += self.unknown_rows
        return sorted(rows, key=lambda entry: (entry.source, entry.row))

    @property
    def ok(self) -> bool:
        """True when every row is usable (`magic data check` exits 0)."""
        return not self.unusable

    def summary(self, limit: int = 20) -> str:
        unusable = self.unusable
        lines = [f"{self.records} record(s) read, {len(self.labels)} label(s), {self.unlabeled} unlabeled; "
                 f"{len(unusable)} unusable row(s)"]
        if unusable:
            lines.append(f"{len(unusable)} unusable row(s) (a run leaves them out):")
            lines += [f"  {entry}" for entry in unusable[:limit]]
            if len(unusable) > limit:
                lines.append(f"  ... and {len(unusable) - limit} more")
        if self.problems.notes:
            lines.append(f"{len(self.problems.notes)} row(s) kept with a note:")
            lines += [f"  {message}" for message in self.problems.note_messages[:limit]]
            if len(self.problems.notes) > limit:
                lines.append(f"  ... and {len(self.problems.notes) - limit} more")
        lines.append(f"{self.images.checked} image(s) checked: {self.images.good} good, {len(self.images.bad)} bad")
        if self.unknown:
            shown = ", ".join(f"{label} ({count})" for label, count in self.unknown.most_common(limit))
            lines.append(f"{len(self.unknown)} label(s) without a checklist in {self.checklist} (they cannot be "
                         f"targets or classes of a run): {shown}")
            lines.append(f"  expected one of: {', '.join(self.conditions)}")
        lines.append("every row is usable" if not unusable else
                     f"not usable: {len(unusable)} row(s); fix or remove them (exit status 1)")
        return "\n".join(lines)


def run_data_check(config: "RunConfig", paths: "RunPaths | None",
                   progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None) -> DataCheckReport:
    """Everything `magic data check` reports: rows dropped while reading, bad images, labels without a checklist."""
    checklists = load_checklists(config.judge.checklist)
    problems = LoadProblems()
    records = load_records(config.data, paths, conditions=checklists.condition_names, problems=problems)
    if on_total is not None:
        on_total(len(records))
    _, images = check_images(records, config.data, progress, stop_on_bad=False)
    labels = Counter(r.label for r in records if r.label is not None)
    known = set(checklists.condition_names)
    unknown_rows = [
        UnusableRow(record.source if record.row else str(record.path), record.row,
                    f"{record.where()}{'' if not record.row else f' ({record.path.name})'}: label {record.label!r} "
                    f"has no checklist in {checklists.id}")
        for record in records if record.label is not None and record.label not in known
    ]
    return DataCheckReport(
        records=len(records), problems=problems, images=images, labels=labels,
        unknown=unknown_labels(records, checklists.condition_names), checklist=checklists.id,
        conditions=checklists.condition_names, unlabeled=sum(r.label is None for r in records),
        unknown_rows=unknown_rows,
    )
