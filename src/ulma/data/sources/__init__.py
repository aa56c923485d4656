"""Data adapters: every supported data set or file format -> examples of :mod:`ulma.data.schema`.

Use :func:`load_source`::

    result = load_source("hh", "harmless-base-test.jsonl.gz", on_error="skip")
    result.examples        # Pair / PointWise / Demonstration objects
    result.skipped         # DataError for each bad row (never dropped silently)
    print(result.summary())

========================  =============================================  ==================
source                    data                                           options
========================  =============================================  ==================
``hh``, ``golden_hh``     Anthropic HH / Golden HH {chosen, rejected}    as, split, data_dir (hh)
``qa_feedback``           FineGrainedRLHF QA-feedback JSON               as, passages
``red_team``              Anthropic red-team attempts, rating 0-4        split
``pyrit``                 PyRIT human harm scores (offline default)      files
``jsonl`` (``trl``),      your own files in TRL's formats                columns, kind,
``json``, ``csv``,                                                       label_range
``parquet``
``hf``                    any ``datasets.load_dataset`` source           name, data_dir, data_files,
                                                                         split, cache_dir, columns,
                                                                         kind, label_range
========================  =============================================  ==================

Each module's docstring documents its format and mapping.  ``on_error="raise"`` (default)
raises the first :class:`~ulma.data.schema.DataError` (file, row, field); ``"skip"`` keeps
the good rows and lists the bad ones in ``skipped``.  ``.gz`` paths are decompressed.
"""

from __future__ import annotations

from typing import Callable

from ._common import LoadResult
from .generic import load_csv, load_hf, load_json, load_jsonl, load_parquet
from .hh import load_golden_hh, load_hh, parse_transcript
from .pyrit_harm import harm_category, load_pyrit, pyrit_harm_dir
from .qa_feedback import format_qa_prompt, load_qa_feedback
from .red_team import load_red_team, rating_to_score
from .split import prompt_key, split_by_prompt

SOURCES: dict[str, Callable[..., LoadResult]] = {
    "hh": load_hh,
    "golden_hh": load_golden_hh,
    "qa_feedback": load_qa_feedback,
    "red_team": load_red_team,
    "pyrit": load_pyrit,
    "jsonl": load_jsonl,
    "trl": load_jsonl,
    "json": load_json,
    "csv": load_csv,
    "parquet": load_parquet,
    "hf": load_hf,
}


def load_source(source: str, path: str | None = None, *, on_error: str = "raise", **options) -> LoadResult:
    """Load ``source`` (a key of :data:`SOURCES`) from ``path`` (None: the hub or the
    installed package, where the source has one)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[source](path, on_error=on_error, **options)


__all__ = [
    "LoadResult",
    "SOURCES",
    "format_qa_prompt",
    "harm_category",
    "load_source",
    "parse_transcript",
    "prompt_key",
    "pyrit_harm_dir",
    "rating_to_score",
    "split_by_prompt",
]
