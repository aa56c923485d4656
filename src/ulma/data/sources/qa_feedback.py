"""QA-feedback (FineGrainedRLHF, Wu et al. 2023): human feedback on long-form answers.

Format: one JSON array of records (``tasks/qa_feedback/data/{train,dev,test}_feedback.json``)::

    {"question": str,
     "passages": [[title, sentence, sentence, ...], ...],
     "gold": str,
     "prediction 1": str, ..., "prediction 4": str,
     "feedback": {"errors": [{"error type", "start", "end", "explanation"}, ...],
                  "missing-info": [{"error type", "passage_id", "sentence_id"}, ...],
                  "corrected-prediction": str},          # feedback is on prediction 1 only
     "preference": [six comparisons 1v2, 1v3, 1v4, 2v3, 2v4, 3v4]}   # not used here

Prompt: one user turn (see :func:`format_qa_prompt`)::

    Question: <question>

    Passages:
    Title: <title of passage 1>
    <its sentences joined by single spaces>

    Title: <title of passage 2>
    ...

(a record without passages, or option ``passages=False``, gives just the ``Question:`` line:
the passages are far longer than the question, and a prompt cut from the left to fit
a short ``max_length`` would lose the question, which comes first).

Mapping (paper §5.1, binary point-wise):

- positive, z=1: ``feedback["corrected-prediction"]`` when it is not blank;
- negative, z=0: ``"prediction 1"`` when the feedback lists any error or missing info.

A record with neither gives no example and is counted in ``stats["neither"]``.  With
``as="pair"`` a record with both gives one Pair (chosen = corrected prediction, rejected =
prediction 1); records with only one side are counted in ``stats["unpaired"]``.

In the first 400 dev records: 385 have both, 5 only a positive (no error marked; the
correction equals prediction 1), 10 only a negative (empty correction), 0 neither.

Bad records (DataError): a missing or non-string ``question`` / ``prediction 1``,
``passages`` that are not lists of strings, ``feedback`` that is not an object.
"""

from __future__ import annotations

from ulma.data.schema import DataError, pair, pointwise, user_prompt

from ._common import LoadResult, Rows, check_choice, check_options, iter_json_array, require


def format_qa_prompt(question: str, passages) -> str:
    """The user turn for a question and its ``[title, sentence, ...]`` passages."""
    text = f"Question: {question.strip()}"
    if passages:
        blocks = [f"Title: {p[0].strip()}\n{' '.join(p[1:]).strip()}" for p in passages]
        text += "\n\nPassages:\n" + "\n\n".join(blocks)
    return text


def _passages(record, file, row) -> list:
    passages = record.get("passages", [])
    ok = isinstance(passages, list) and all(
        isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in passages
    )
    if not ok:
        raise DataError(file, row, "passages", "must be a list of [title, sentence, ...] lists of strings")
    return passages


def qa_record_sides(record, file, row, passages: bool = True) -> tuple:
    """(prompt, positive text or None, negative text or None) of one record."""
    question = require(record, "question", file, row)
    if not question.strip():
        raise DataError(file, row, "question", "is empty")
    found = _passages(record, file, row)
    prompt = user_prompt(format_qa_prompt(question, found if passages else []))
    feedback = require(record, "feedback", file, row, kind=dict)
    prediction = require(record, "prediction 1", file, row)
    corrected = feedback.get("corrected-prediction") or ""
    if not isinstance(corrected, str):
        raise DataError(file, row, "feedback", "'corrected-prediction' must be a string")
    flagged = bool(feedback.get("errors")) or bool(feedback.get("missing-info"))
    return prompt, (corrected if corrected.strip() else None), (prediction if flagged else None)


def _pointwise(record, file, row, stats, passages) -> list:
    prompt, pos, neg = qa_record_sides(record, file, row, passages)
    out = []
    if pos is not None:
        out.append(pointwise(prompt, pos, 1, binary=True, file=file, row=row))
    if neg is not None:
        out.append(pointwise(prompt, neg, 0, binary=True, file=file, row=row))
    _count(stats, pos, neg)
    return out


def _pair(record, file, row, stats, passages) -> list:
    prompt, pos, neg = qa_record_sides(record, file, row, passages)
    _count(stats, pos, neg)
    if pos is None or neg is None:
        stats["unpaired"] += pos is not None or neg is not None
        return []
    return [pair(prompt, pos, neg, file=file, row=row)]


def _count(stats, pos, neg) -> None:
    stats["positives"] += pos is not None
    stats["negatives"] += neg is not None
    stats["both"] += pos is not None and neg is not None
    stats["neither"] += pos is None and neg is None


def load_qa_feedback(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """QA-feedback from a local ``*_feedback.json`` file (``as``: "pointwise" | "pair";
    ``passages``: true (default) or false, the question alone as the prompt)."""
    check_options("qa_feedback", options, {"as", "passages"})
    kind = check_choice("qa_feedback", "as", options.get("as", "pointwise"), ("pointwise", "pair"))
    passages = options.get("passages", True)
    if not isinstance(passages, bool):
        raise ValueError(f"source 'qa_feedback': option 'passages' must be true or false, got {passages!r}")
    if path is None:
        raise ValueError(
            "source 'qa_feedback' needs path= to a *_feedback.json file (from "
            "github.com/allenai/FineGrainedRLHF, tasks/qa_feedback/data/); it is not on the hub"
        )
    stats = {"records": 0, "positives": 0, "negatives": 0, "both": 0, "neither": 0}
    if kind == "pair":
        stats["unpaired"] = 0
    rows, convert = Rows(on_error), (_pair if kind == "pair" else _pointwise)
    for n, record in iter_json_array(path):
        stats["records"] += 1
        rows.add(convert, record, str(path), n, stats, passages)
    rows.result.stats = stats
    return rows.result
