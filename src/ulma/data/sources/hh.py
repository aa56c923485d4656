"""Anthropic HH-RLHF and Golden HH: pair-wise preference transcripts.

Format (JSONL, often gzip-compressed), one row per comparison::

    {"chosen":   "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <chosen reply>",
     "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <rejected reply>"}

Mapping: a transcript is split at the markers ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"``
(also at the very start of the text); ``Human`` turns become ``user`` turns and
``Assistant`` turns ``assistant`` turns, their text stripped of surrounding white space.
A marker not preceded by a blank line (``"...  Human: ..."``) is part of the text.  The
turns before the final assistant reply are the prompt, which both transcripts must share;
the final replies are the chosen and rejected responses -> :class:`~ulma.data.schema.Pair`.
With ``as="pointwise"`` each pair becomes chosen z=1 and rejected z=0 (paper §5.1).

Bad rows (DataError on field ``chosen`` or ``rejected``): a transcript that is not a
string, has text before its first turn, does not end with an Assistant turn, has an empty
final reply, or whose prompt differs from the other transcript's.  In the first 1,800 rows
of harmless-base/test, 4 chosen transcripts end with an empty reply and 2 pairs have
different prompts (a turn glued to the previous one without a blank line).

Golden HH (``Unified-Language-Model-Alignment/Anthropic_HH_Golden``) has the same format,
with the chosen replies rewritten by GPT-4.

Options: ``as`` ("pair" | "pointwise"); for the hub (``path=None``) ``split`` (default
"train") and, for ``hh``, ``data_dir`` (default "harmless-base"; e.g. "helpful-base").
"""

from __future__ import annotations

import re

from ulma.data.schema import DataError, pair, pairs_to_pointwise

from ._common import LoadResult, Rows, check_choice, check_options, iter_hub, iter_jsonl, load_hub, require

HH_HUB = "Anthropic/hh-rlhf"
GOLDEN_HUB = "Unified-Language-Model-Alignment/Anthropic_HH_Golden"
_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text, *, file="<memory>", row=None, field="transcript") -> list[dict]:
    """HH-style transcript -> list of {"role", "content"} turns (Human -> user, Assistant -> assistant)."""
    if not isinstance(text, str):
        raise DataError(file, row, field, f"must be a string, got {type(text).__name__}")
    parts = _MARKER.split(text)
    if parts[0].strip():
        raise DataError(file, row, field, f"text before the first 'Human:' turn: {parts[0][:40]!r}")
    turns = [{"role": _ROLE[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise DataError(file, row, field, "no 'Human:' or 'Assistant:' turn found")
    return turns


def split_final_reply(turns: list[dict], *, file="<memory>", row=None, field="transcript") -> tuple[list, str]:
    """(prompt turns, final assistant reply) of a transcript that ends with an Assistant turn."""
    if turns[-1]["role"] != "assistant":
        raise DataError(file, row, field, "the transcript does not end with an Assistant turn")
    if not turns[-1]["content"]:
        raise DataError(file, row, field, "the final Assistant reply is empty")
    return turns[:-1], turns[-1]["content"]


def hh_row_to_pair(record, file, row) -> list:
    """One HH row -> [Pair]."""
    sides = []
    for key in ("chosen", "rejected"):
        turns = parse_transcript(require(record, key, file, row), file=file, row=row, field=key)
        sides.append(split_final_reply(turns, file=file, row=row, field=key))
    (prompt, chosen), (other, rejected) = sides
    if prompt != other:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise DataError(file, row, "rejected", f"its prompt differs from the chosen transcript's at turn {at + 1}")
    return [pair(prompt, chosen, rejected, file=file, row=row)]


def _load(source, hub_name, path, on_error, options, allowed) -> LoadResult:
    check_options(source, options, allowed)
    kind = check_choice(source, "as", options.get("as", "pair"), ("pair", "pointwise"))
    if path is None:
        hub_args = {"split": options.get("split", "train")}
        if "data_dir" in allowed:
            hub_args["data_dir"] = options.get("data_dir", "harmless-base")
        file = f"hf:{hub_name}"
        records = iter_hub(load_hub(source, hub_name, **hub_args))
    else:
        file, records = str(path), iter_jsonl(path)
    rows = Rows(on_error)
    for n, record in records:
        rows.add(hh_row_to_pair, record, file, n)
    result = rows.result
    result.stats["pairs"] = len(result.examples)
    if kind == "pointwise":
        result.examples = pairs_to_pointwise(result.examples)
    return result


def load_hh(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """Anthropic HH-RLHF from a local JSONL(.gz) file, or from the hub when ``path`` is None."""
    return _load("hh", HH_HUB, path, on_error, options, {"as", "split", "data_dir"})


def load_golden_hh(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """Golden HH (HH with GPT-4 chosen replies) from a local JSONL(.gz) file or the hub."""
    return _load("golden_hh", GOLDEN_HUB, path, on_error, options, {"as", "split"})
