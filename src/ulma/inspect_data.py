"""``ulma data inspect``: what a data source holds, before any training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ulma.data.schema import positive_threshold
from ulma.data.sources import SOURCES, load_source
from ulma.data.tokenize import Tokenizer

_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def guess_format(source: str) -> tuple[str, str | None]:
    """(source name, path): a registered name alone, or a file whose format follows its suffix."""
    if source in SOURCES and not Path(source).exists():
        return source, None
    suffixes = [s for s in Path(source).suffixes if s != ".gz"]
    if suffixes and suffixes[-1] in _BY_SUFFIX:
        return _BY_SUFFIX[suffixes[-1]], source
    raise ValueError(f"cannot tell the format of {source!r}; pass --format (one of {sorted(SOURCES)})")


def percentiles(values: list[int], qs=(50, 90, 95, 99, 100)) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] for q in qs}


def inspect_source(source: str, fmt: str | None, options: dict, on_error: str, tokenizer, max_length: int) -> dict:
    name, path = (fmt, source) if fmt else guess_format(source)
    if fmt and source == fmt:
        path = None
    result = load_source(name, path, on_error=on_error, **options)
    ex = result.examples
    kinds = Counter(e.kind for e in ex)
    pw = [e for e in ex if e.kind == "pointwise"]
    thr = positive_threshold(pw)
    report = {
        "source": name,
        "path": path,
        "examples": len(ex),
        "by_kind": dict(kinds),
        "pairs": kinds.get("pair", 0),
        # a pair holds one positive (chosen) and one negative (rejected) response
        "positives": sum(e.label >= thr for e in pw) + kinds.get("demonstration", 0) + kinds.get("pair", 0),
        "negatives": sum(e.label < thr for e in pw) + kinds.get("pair", 0),
        "label_histogram": {str(round(k, 4)): v for k, v in sorted(Counter(e.label for e in pw).items())},
        "skipped_rows": len(result.skipped),
        "skipped_first": [str(e) for e in result.skipped[:5]],
        "prompts": len({e.prompt for e in ex}),
    }
    if tokenizer is not None:
        report["tokens"] = token_stats(ex, tokenizer, max_length)
    return report


def token_stats(examples, tokenizer, max_length: int) -> dict:
    tok = Tokenizer(tokenizer, max_length)
    prompt_len, response_len, total_len = [], [], []
    over = 0
    for e in examples:
        p = tok.encode_prompt(e.prompt)
        responses = [e.chosen, e.rejected] if e.kind == "pair" else [e.response]
        for r in responses:
            n = len(tok.encode_response(r, text=not e.prompt))
            prompt_len.append(len(p))
            response_len.append(n)
            total_len.append(len(p) + n)
            over += len(p) + n > max_length
    return {
        "max_length": max_length,
        "truncated_sequences": over,
        "prompt": percentiles(prompt_len),
        "response": percentiles(response_len),
        "total": percentiles(total_len),
    }


def format_report(r: dict) -> str:
    lines = [
        f"source: {r['source']}" + (f" ({r['path']})" if r["path"] else ""),
        f"examples: {r['examples']}  by kind: {r['by_kind']}  distinct prompts: {r['prompts']}",
        f"positives: {r['positives']}  negatives: {r['negatives']}  pairs: {r['pairs']}",
        f"skipped rows: {r['skipped_rows']}" + (f"  first: {r['skipped_first'][0]}" if r["skipped_first"] else ""),
    ]
    if r["label_histogram"]:
        lines.append("labels: " + ", ".join(f"{k}: {v}" for k, v in r["label_histogram"].items()))
    if "tokens" in r:
        t = r["tokens"]
        lines.append(f"tokens (max_length {t['max_length']}, {t['truncated_sequences']} sequences would be truncated):")
        for part in ("prompt", "response", "total"):
            lines.append(f"  {part:9s} " + "  ".join(f"{k}={v}" for k, v in t[part].items()))
    return "\n".join(lines)
