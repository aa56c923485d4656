"""Files that are complete or absent: written to a temporary file beside the target, then
renamed over it (``os.replace`` is atomic), so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _replace(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    _replace(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    _replace(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _replace(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    _replace(path, lambda tmp: torch.save(obj, tmp))
