"""Shared machinery of the data adapters: reading files, collecting rows, checking options.

Row numbers, used in every :class:`~ulma.data.schema.DataError` and ``origin``:

- JSONL and CSV: the 1-based line number in the (decompressed) file where the row starts;
- JSON arrays, parquet tables and hub data sets: the 1-based record number.

Paths ending in ``.gz`` are decompressed transparently.  Text is read as UTF-8 (a byte-order
mark is ignored).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ulma.data.schema import DataError

ON_ERROR = ("raise", "skip")


@dataclass
class LoadResult:
    """What a loader returns: the examples, the rows it skipped and a few counts."""

    examples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # DataError objects (on_error="skip")
    stats: dict = field(default_factory=dict)  # source-specific counts, e.g. QA-feedback "neither"

    def summary(self) -> str:
        text = f"{len(self.examples)} examples, {len(self.skipped)} rows skipped"
        if self.skipped:
            text += f" (first: {self.skipped[0]})"
        if self.stats:
            text += "; " + ", ".join(f"{k}={v}" for k, v in self.stats.items())
        return text


class Rows:
    """Turns rows into examples, raising or recording each bad row according to ``on_error``."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        self.on_error = on_error
        self.result = LoadResult()

    def add(self, convert: Callable, record, *args) -> list | None:
        """``convert(record, *args)`` -> list of examples; a DataError (raised, or passed in
        as ``record`` by a reader) is raised or recorded.  Returns the new examples or None."""
        if isinstance(record, DataError):
            return self.fail(record)
        try:
            out = convert(record, *args)
        except DataError as err:
            return self.fail(err)
        self.result.examples.extend(out)
        return out

    def fail(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.result.skipped.append(err)
        return None


def check_options(source: str, options: dict, allowed: Iterable[str]) -> None:
    """Raise ValueError naming the valid options when ``options`` holds an unknown one."""
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"source {source!r}: unknown option(s) {unknown}; valid options: {valid}")


def check_choice(source: str, name: str, value, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"source {source!r}: option {name!r} must be one of {choices}, got {value!r}")
    return value


def require(record: dict, key: str, file, row, *, kind=str):
    """``record[key]``, which must exist and be of ``kind``; DataError naming ``key`` otherwise."""
    if not isinstance(record, dict):
        raise DataError(file, row, None, f"expected an object, got {type(record).__name__}")
    if key not in record:
        raise DataError(file, row, key, "missing")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(file, row, key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", list: "a list", dict: "an object"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


# ------------------------------------------------------------------------------ reading files


def open_text(path) -> io.TextIOBase:
    """Open a text file for reading, decompressing ``.gz`` paths."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def iter_jsonl(path) -> Iterator[tuple[int, object]]:
    """(line number, record) for each non-blank line; a bad line yields a DataError instead."""
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                yield n, DataError(str(path), n, None, f"invalid JSON: {err}")


def read_json_array(path) -> list:
    """The records of a file holding one JSON array (a whole-file error raises DataError)."""
    with open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise DataError(str(path), None, None, f"invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, list):
        raise DataError(str(path), None, None, f"expected a JSON array of records, got {type(data).__name__}")
    return data


def iter_json_array(path) -> Iterator[tuple[int, object]]:
    """(1-based record number, record) for a JSON-array file."""
    return enumerate(read_json_array(path), 1)


def iter_json_or_jsonl(path) -> Iterator[tuple[int, object]]:
    """A JSON array when the file starts with '[' (JSON rows are records), else JSONL (rows are lines)."""
    with open_text(path) as fh:
        head = fh.read(4096).lstrip()
    return iter_json_array(path) if head.startswith("[") else iter_jsonl(path)


def iter_csv(path, *, skip_comment_line: bool = False) -> Iterator[tuple[int, object]]:
    """(start line, {column: text}) for each CSV row after the header.

    ``skip_comment_line``: the first line is dropped when it starts with '#' (PyRIT's files).
    A row with the wrong number of cells yields a DataError.
    """
    with open_text(path) as fh:
        offset = 0
        if skip_comment_line:
            first = fh.readline()
            if first.startswith("#"):
                offset = 1
            else:
                fh.seek(0)
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(str(path), None, None, "the CSV file is empty (no header)")
        last = reader.line_num
        for cells in reader:
            start, last = offset + last + 1, reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                yield start, DataError(str(path), start, None, f"expected {len(header)} cells, got {len(cells)}")
                continue
            yield start, dict(zip(header, cells))


def iter_parquet(path) -> Iterator[tuple[int, object]]:
    """(1-based record number, record) for a parquet file."""
    import pyarrow.parquet as pq

    return enumerate(pq.read_table(str(path)).to_pylist(), 1)


def load_hub(source: str, name: str, **kwargs):
    """``datasets.load_dataset(name, **kwargs)``, with a clear error when it cannot be had."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        import datasets

        return datasets.load_dataset(name, **kwargs)
    except Exception as err:  # offline, unknown name, missing split: one clear line
        from ulma.errors import UsageError

        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(
            f"data source {source!r}: could not load {name!r} from the Hugging Face hub "
            f"({type(err).__name__}: {reason}); offline or without access, download it and pass the local "
            f"file as data.train.path (e.g. ulma train CONFIG data.train.path=FILE)"
        ) from err


def iter_hub(dataset) -> Iterator[tuple[int, object]]:
    """(1-based record number, record) for a loaded ``datasets.Dataset``."""
    return enumerate((dict(r) for r in dataset), 1)
