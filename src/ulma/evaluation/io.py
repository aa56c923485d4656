"""Evaluation's errors, and JSON / JSONL read with errors that name the file, the line and
the field (atomic writes: :mod:`ulma.atomic`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ulma.data.schema import DataError


class EvalError(RuntimeError):
    """An evaluation cannot go on (a missing model, a judge endpoint that is down, ...);
    the message says what to do.  Finished work is on disk and a rerun resumes."""


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows in one write and flush them to disk (the resumable log of a long run)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, *, allow_torn_tail: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) for each non-blank line, and how many torn lines were dropped.

    A line that is not a JSON object raises :class:`DataError` naming the file and line,
    except, with ``allow_torn_tail``, a last line without its newline: the trace of a
    run killed mid-write, which the caller redoes.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = 0
    if allow_torn_tail and lines and lines[-1].strip():  # no final newline: maybe torn
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines, torn = lines[:-1], 1
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), n, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(str(path), n, None, f"expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out, torn


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(str(path), None, None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
