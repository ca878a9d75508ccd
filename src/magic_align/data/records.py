"""One `Record` per real image, whatever dataset it came from, plus the helpers every loader shares.

Loaders turn a dataset's own layout (a CSV with its column names, or folders) into records; everything
downstream (split, sampler, classifier) sees only records. Labels are normalised to checklist condition
names (lowercase, single spaces), body sites to the small region vocabulary of `REGIONS`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from magic_align.errors import MagicError


class DataError(MagicError, ValueError):
    """A dataset problem phrased for the user: which file, which row or column, what was expected."""


@dataclass(frozen=True)
class Record:
    id: str  # unique within the dataset and safe as a file name
    path: Path  # the image file (it may be missing or broken: `check_images` finds out)
    label: str | None  # checklist condition name; None for an unlabeled image (MAGIC-A sources)
    skin_type: int = -1  # Fitzpatrick skin type 1-6, -1 when unknown
    region: str | None = None  # body region (one of REGIONS) where the dataset says where the lesion is
    group: str = ""  # leakage group (case, patient); records of one group never straddle the split
    row: int = 0  # 1-based data row of the CSV it came from, 0 when it came from a folder
    source: str = ""  # the CSV file or folder it came from

    def where(self) -> str:
        """'file.csv row 12', or the image file for a record from a folder, for messages."""
        return f"{self.source} row {self.row}" if self.row else str(self.path)


@dataclass
class LoadProblems:
    """What a loader met while reading, reported by `magic data check`, never silently lost.

    `add` records a row the loader dropped (an unusable row: `magic data check` exits non-zero); `note` records
    a row it kept with a caveat (e.g. an unreadable skin type taken as unknown)."""

    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (source, 1-based row or 0, reason)
    notes: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, source: str, row: int, message: str) -> None:
        self.dropped.append((source, row, message))

    def note(self, source: str, row: int, message: str) -> None:
        self.notes.append((source, row, message))

    @property
    def messages(self) -> list[str]:
        """One line per dropped row: 'file.csv row 12: reason'."""
        return [where_row(source, row) + f": {message}" for source, row, message in self.dropped]

    @property
    def note_messages(self) -> list[str]:
        return [where_row(source, row) + f": {message}" for source, row, message in self.notes]

    def __len__(self) -> int:  # rows dropped
        return len(self.dropped)


def where_row(source: str, row: int) -> str:
    """'file.csv row 12', or the file or folder alone when there is no row."""
    return f"{source} row {row}" if row else source


# ------------------------------------------------------------------------------------------ labels
def normalise_label(text: str) -> str:
    """Dataset label -> checklist condition name: lowercase, trimmed, runs of whitespace made one space."""
    return " ".join(text.replace("\u00a0", " ").split()).lower()


def _match_key(text: str) -> str:
    # Folder names and CSVs spell conditions with underscores or hyphens ("basal_cell_carcinoma").
    return re.sub(r"[\s_\-]+", " ", text.lower()).strip()


def match_labels(records: list[Record], conditions: Collection[str]) -> list[Record]:
    """Rename labels that differ from a checklist condition name only in case, underscores or hyphens."""
    canonical = {_match_key(name): name for name in conditions}
    renamed = []
    for record in records:
        if record.label is not None and record.label not in conditions:
            match = canonical.get(_match_key(record.label))
            if match is not None:
                record = replace(record, label=match)
        renamed.append(record)
    return renamed


# ------------------------------------------------------------------------------------------ regions
# The body-region vocabulary shared by the checklists (`region:` of each condition) and the datasets'
# body-site columns. Coarse on purpose: same-region target selection needs several conditions per region.
REGIONS = ("face", "trunk", "extremities", "hands-feet", "flexures", "anywhere")

# Body-site words (PAD-UFES-20 `region`, SCIN `body_parts_*`, free text) -> region. Matched per word.
_SITE_WORDS = {
    "face": "face", "head": "face", "neck": "face", "scalp": "face", "nose": "face", "ear": "face",
    "ears": "face", "lip": "face", "lips": "face", "cheek": "face", "cheeks": "face", "forehead": "face",
    "eyelid": "face", "eyelids": "face", "chin": "face", "mouth": "face",
    "chest": "trunk", "back": "trunk", "abdomen": "trunk", "trunk": "trunk", "torso": "trunk",
    "buttocks": "trunk", "shoulder": "trunk", "shoulders": "trunk", "belly": "trunk",
    "arm": "extremities", "arms": "extremities", "forearm": "extremities", "forearms": "extremities", "thigh": "extremities",
    "thighs": "extremities", "leg": "extremities", "legs": "extremities", "shin": "extremities", "shins": "extremities", "knee": "extremities",
    "knees": "extremities", "elbow": "extremities", "elbows": "extremities", "limb": "extremities", "limbs": "extremities",
    "extremity": "extremities", "extremities": "extremities",
    "hand": "hands-feet", "hands": "hands-feet", "foot": "hands-feet", "feet": "hands-feet",
    "finger": "hands-feet", "fingers": "hands-feet", "toe": "hands-feet", "toes": "hands-feet",
    "palm": "hands-feet", "palms": "hands-feet", "sole": "hands-feet", "soles": "hands-feet",
    "nail": "hands-feet", "nails": "hands-feet",
    "armpit": "flexures", "armpits": "flexures", "axilla": "flexures", "groin": "flexures",
    "genital": "flexures", "genitals": "flexures", "genitalia": "flexures", "flexure": "flexures",
    "flexures": "flexures", "fold": "flexures", "folds": "flexures",
}


def normalise_region(text: str | None) -> str | None:
    """A body-site description -> one of REGIONS, or None when empty or not recognised.

    'FOREARM' -> extremities, 'back of hand' -> hands-feet, 'head_or_neck' -> face. The first word that names a
    site decides, except that hands/feet words win over arm/leg words ('foot top or side', 'back of hand').
    """
    if text is None:
        return None
    cleaned = text.strip().lower()
    if cleaned in REGIONS:
        return cleaned
    words = re.split(r"[^a-z]+", cleaned)
    regions = [_SITE_WORDS[word] for word in words if word in _SITE_WORDS]
    if not regions:
        return None
    return "hands-feet" if "hands-feet" in regions else regions[0]


# ------------------------------------------------------------------------------------------ fields
def parse_skin_type(text: str | None) -> int | None:
    """'3', '3.0', 'FST3', 'IV' -> 1..6; '' or '-1' -> -1; anything else -> None (a problem to report)."""
    if text is None:
        return -1
    cleaned = text.strip().upper().removeprefix("FST").removeprefix("TYPE").strip()
    if cleaned in {"", "-1", "NA", "N/A", "NAN", "NONE", "UNKNOWN"}:
        return -1
    roman = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
    if cleaned in roman:
        return roman[cleaned]
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value == -1:
        return -1
    if value.is_integer() and 1 <= value <= 6:
        return int(value)
    return None


def safe_id(text: str) -> str:
    """An id usable as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._\-]+", "_", text.strip()).strip("._")
    return cleaned or "_"


# ------------------------------------------------------------------------------------------ CSV
def read_csv_rows(path: Path, required: Collection[str], dataset: str,
                  optional: Collection[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (1-based data row, row) from a CSV, after checking that every required column is present."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{dataset} CSV {path} does not exist (set data.csv to the metadata file)")
    index = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [name for name in required if name not in header]
            if missing:
                expected = ", ".join(required)
                extra = f" (optional: {', '.join(optional)})" if optional else ""
                raise DataError(
                    f"{path} is missing column(s) {', '.join(missing)}; a {dataset} CSV needs the columns "
                    f"{expected}{extra}; found: {', '.join(header) or 'no header'}"
                )
            reader.fieldnames = header
            for index, row in enumerate(reader, start=1):
                yield index, {key: (value or "").strip() for key, value in row.items() if key is not None}
    except UnicodeDecodeError as error:
        line = _first_non_utf8_line(path)
        raise DataError(f"{path} line {line} (data row {line - 1}): not UTF-8 text ({error.reason}); "
                        "save the CSV as UTF-8") from None
    except csv.Error as error:
        raise DataError(f"{path} near data row {index + 1}: not a readable CSV ({error})") from None


def _first_non_utf8_line(path: Path) -> int:
    """1-based line number (header = line 1) of the first line that is not valid UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def find_duplicate_ids(records: list[Record], problems: LoadProblems) -> list[Record]:
    """Keep the first record of each id; later ones are reported (an id must name one image)."""
    seen: dict[str, Record] = {}
    kept = []
    for record in records:
        first = seen.get(record.id)
        if first is not None:
            where = record.source if record.row else str(record.path)
            problems.add(where, record.row, f"id {record.id!r} repeats {first.where()}; skipped")
            continue
        seen[record.id] = record
        kept.append(record)
    return kept
