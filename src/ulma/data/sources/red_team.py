"""Anthropic red-team attempts (Ganguli et al. 2022): one rated transcript per attack.

Format: a JSON array (as published, ``red_team_attempts.jsonl`` despite its name) or JSONL
of records::

    {"transcript": "\\n\\nHuman: ...\\n\\nAssistant: ...",   # HH-style turns
     "rating": 0.0,                                          # 0-4, the red-teamer's success rating
     "min_harmlessness_score_transcript": -0.9,              # a preference model's score (unused)
     "task_description": "...", "task_descripton_harmlessness_score": 0.6,
     "num_params": "52B", "model_type": "plain lm", "red_team_member_id": 0,
     "is_upworker": false, "tags": null}

Mapping: the transcript is parsed like HH (see :mod:`ulma.data.sources.hh`).  The response
is the last Assistant reply; the prompt is every turn before it.  Human turns after the
last Assistant reply (an attack that ended on the red-teamer's message) are dropped and
counted in ``stats["trailing_turns_dropped"]``.

Continuous label (paper §5.1: "rating 0 = demonstration")::

    score = 1 - rating / 4        rating 0 -> 1.0, 1 -> 0.75, 2 -> 0.5, 3 -> 0.25, 4 -> 0.0

The rating says how successful the attack was, so rating 0 (a failed attack, the model
stayed harmless) is the best response, score 1.0: the positive / demonstration for
continuous ULMA (:func:`ulma.data.schema.positive_threshold`).  Examples are
``PointWise(binary=False)`` with labels in [0, 1].

Bad rows (DataError): ``rating`` missing, not a number (strings, null, booleans) or outside
0..4 (field ``rating``); ``transcript`` not a string, without an Assistant turn, or with an
empty last reply (field ``transcript``).

``path=None`` loads ``Anthropic/hh-rlhf`` with ``data_dir="red-team-attempts"`` from the
hub (option ``split``, default "train").
"""

from __future__ import annotations

import math

from ulma.data.schema import DataError, pointwise

from ._common import LoadResult, Rows, check_options, iter_hub, iter_json_or_jsonl, load_hub, require
from .hh import HH_HUB, parse_transcript

MAX_RATING = 4


def rating_to_score(rating, file="<memory>", row=None) -> float:
    """``1 - rating / 4`` for a rating in 0..4; DataError on field 'rating' otherwise."""
    if isinstance(rating, bool) or not isinstance(rating, (int, float)):
        raise DataError(file, row, "rating", f"must be a number from 0 to {MAX_RATING}, got {rating!r}")
    if not math.isfinite(rating) or not 0 <= rating <= MAX_RATING:
        raise DataError(file, row, "rating", f"must be from 0 to {MAX_RATING}, got {rating!r}")
    return 1.0 - float(rating) / MAX_RATING


def red_team_row(record, file, row, stats) -> list:
    """One red-team record -> [PointWise(binary=False)]."""
    turns = parse_transcript(require(record, "transcript", file, row), file=file, row=row, field="transcript")
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(file, row, "transcript", "has no Assistant turn")
    if not turns[last]["content"]:
        raise DataError(file, row, "transcript", "the last Assistant reply is empty")
    if "rating" not in record:
        raise DataError(file, row, "rating", "missing")
    score = rating_to_score(record["rating"], file, row)
    example = pointwise(turns[:last], turns[last]["content"], score, binary=False, file=file, row=row)
    stats["trailing_turns_dropped"] += len(turns) - last - 1
    return [example]


def load_red_team(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """Red-team attempts from a local JSON array / JSONL (.gz) file, or the hub when ``path`` is None."""
    check_options("red_team", options, {"split"})
    if path is None:
        file = f"hf:{HH_HUB}/red-team-attempts"
        records = iter_hub(
            load_hub("red_team", HH_HUB, data_dir="red-team-attempts", split=options.get("split", "train"))
        )
    else:
        file, records = str(path), iter_json_or_jsonl(path)
    rows, stats = Rows(on_error), {"trailing_turns_dropped": 0}
    for n, record in records:
        rows.add(red_team_row, record, file, n, stats)
    rows.result.stats = stats
    return rows.result
