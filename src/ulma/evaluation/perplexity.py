"""Perplexity of a model on positive responses: exp(mean NLL per response token).

The same tokenization (chat template, EOS, prompt cut from the left) and log-prob code
as training's held-out evaluation (:func:`ulma.evaluation.metrics.table_logps`), so the
number matches ``results.json``'s ``perplexity`` on the same examples.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ulma.atomic import atomic_write_json, atomic_write_jsonl
from ulma.data.tokenize import Tokenizer, build_units
from ulma.evaluation.metrics import perplexity, table_logps


def score_positives(model, tokenizer, demos: list, *, max_length: int = 1024, batch_size: int = 8,
                    bf16: bool = False, progress: bool = True) -> tuple[dict, list[dict]]:
    """Perplexity over ``demos`` (Demonstration objects) and one row per example.

    Returns (summary, rows): summary = {perplexity, tokens, examples, nll_per_token,
    prompts_truncated, responses_truncated}; rows[i] = {index, origin, prompt, response,
    logp, tokens, perplexity} for demos[i] (logp: the sum over response tokens + EOS).
    """
    if not demos:
        raise ValueError("no positive responses to score: the selection holds no positives")
    units = build_units(demos, Tokenizer(tokenizer, max_length))
    rows = [u[0] for u in units.rows]  # one table row per demonstration (duplicates share one)
    logps = table_logps(model, units.table, tokenizer.pad_token_id, batch_size, bf16,
                        rows=sorted(set(rows)), desc="perplexity", progress=progress)
    ppl, tokens = perplexity(logps, rows)
    summary = {
        "perplexity": ppl,
        "tokens": tokens,
        "examples": len(demos),
        "nll_per_token": math.log(ppl),
        "prompts_truncated": units.table.prompt_truncated,
        "responses_truncated": units.table.response_truncated,
        "max_length": max_length,
    }
    return summary, [_row(i, d, logps, r) for i, (d, r) in enumerate(zip(demos, rows))]


def _row(i: int, demo, logps: dict, r: int) -> dict:
    total, count = float(logps["sum"][r]), int(logps["count"][r])
    return {
        "index": i,
        "origin": demo.origin,
        "prompt": [dict(t) for t in demo.prompt],
        "response": demo.response,
        "logp": total,
        "tokens": count,
        "perplexity": math.exp(-total / max(count, 1)),
    }


def write_perplexity(model, tokenizer, demos: list, out: Path, *, meta: dict, about: dict, max_length: int = 1024,
                     batch_size: int = 8, dtype: str = "float32", rows_skipped: int = 0,
                     progress: bool = True) -> dict:
    """Score ``demos`` and write ``out/perplexity.json`` (with a bootstrap interval and the
    run's method / data set / seed in ``meta``) and ``out/logps.jsonl``; returns the summary.
    What ``ulma eval perplexity`` and ``ulma reproduce`` write."""
    from ulma.evaluation.winrates import perplexity_interval

    t0 = time.perf_counter()
    summary, rows = score_positives(model, tokenizer, demos, max_length=max_length, batch_size=batch_size,
                                    progress=progress)
    summary["ci"] = list(perplexity_interval([r["logp"] for r in rows], [r["tokens"] for r in rows]))
    summary.update(seconds=round(time.perf_counter() - t0, 2), dtype=dtype, meta=meta, data=about,
                   data_rows_skipped=rows_skipped)
    atomic_write_jsonl(Path(out) / "logps.jsonl", rows)
    atomic_write_json(Path(out) / "perplexity.json", summary)
    return summary
