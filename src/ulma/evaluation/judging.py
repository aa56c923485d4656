"""Judging files: a model's generations against their references, and the judge against
human labels (agreement).  Results are written whole (temp file + rename); answers are
cached by the judge, so a stopped run resumes."""

from __future__ import annotations

from pathlib import Path

from ulma.atomic import atomic_write_json, atomic_write_jsonl
from ulma.evaluation.generate import read_generations
from ulma.evaluation.judges import Comparison
from ulma.evaluation.winrates import rate_intervals, rates, summarize


def judge_generations(judge, generations: Path, out_dir: Path, stats, on_error: str = "raise",
                      progress: bool = True) -> dict:
    """Judge every row of a generations file; writes ``judgments.jsonl`` and
    ``judge_summary.json`` in ``out_dir`` and returns the summary."""
    rows, meta, skipped = read_generations(generations, on_error)
    if not rows:
        raise ValueError(f"{generations}: no rows to judge")
    items = [Comparison(r["prompt"], r["response"], r["reference"]) for r in rows]
    judgments = judge.judge(items, progress)
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "judgments.jsonl",
                       [{"id": r["id"], "line": r["line"], **j.to_json()} for r, j in zip(rows, judgments)])
    summary = {
        **{k: meta.get(k) for k in ("model", "run", "method", "dataset", "seed")},
        "generations": str(generations),
        "judge": {"id": judge.id, **judge.stats},
        "rows": len(rows),
        "rows_skipped": [str(e) for e in skipped],
        "confidence": stats.confidence,
        "criteria": summarize(judgments, stats.confidence, stats.bootstrap_samples, stats.seed),
    }
    atomic_write_json(out_dir / "judge_summary.json", summary)
    return summary


def judge_agreement(judge, pairs: list, criterion: str, out_dir: Path, stats, dataset: str,
                    progress: bool = True) -> dict:
    """How often the judge orders human-ordered pairs as the humans did.

    Each pair is judged as (better, worse): 'win' = the judge agrees, 'lose' = it
    disagrees, 'tie' = it calls them equal.  Writes ``agreement.jsonl`` and
    ``agreement.json`` in ``out_dir``.
    """
    if not pairs:
        raise ValueError(f"{dataset}: no human-ordered pairs (pairs, or responses of one prompt with different scores)")
    judgments = judge.judge([Comparison(p.prompt, p.chosen, p.rejected) for p in pairs], progress)
    outcomes = [j.verdicts.get(criterion) for j in judgments]
    r, ci = rates(outcomes), rate_intervals(outcomes, stats.confidence, stats.bootstrap_samples, stats.seed)
    decided = r["n"] * (r["win"] + r["lose"]) if r["n"] else 0
    summary = {
        "dataset": dataset, "criterion": criterion, "judge": {"id": judge.id, **judge.stats},
        "pairs": len(pairs), "judged": r["n"], "unparseable": r["unparseable"],
        "agree": r["win"], "tie": r["tie"], "disagree": r["lose"],
        "agree_when_decided": (r["n"] * r["win"] / decided) if decided else float("nan"),
        "confidence": stats.confidence, "ci": {"agree": ci["win"], "tie": ci["tie"], "disagree": ci["lose"]},
    }
    out_dir = Path(out_dir)
    rows = [{"origin": p.origin, "human": "first", "judge": o, **j.to_json()}
            for p, o, j in zip(pairs, outcomes, judgments)]
    atomic_write_jsonl(out_dir / "agreement.jsonl", rows)
    atomic_write_json(out_dir / "agreement.json", summary)
    return summary
