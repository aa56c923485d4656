"""From a config's data sources to tokenized training units and a held-out evaluation set."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ulma.data.schema import PointWise, as_kind, pointwise_to_pairs, positive_threshold
from ulma.data.sources import load_source, split_by_prompt
from ulma.data.tokenize import SequenceTable, Tokenizer, Units, build_units


@dataclass
class EvalSet:
    """Held-out data, tokenized once into one table of distinct sequences.

    ``units`` is the data in the method's own kind (for the held-out loss); ``pairs`` are
    (better_row, worse_row) for implicit-reward accuracy; ``positive_rows`` are the rows
    whose perplexity is reported (chosen answers, positives, demonstrations).
    """

    table: SequenceTable
    units: Units
    pairs: list[tuple[int, int]] = field(default_factory=list)
    positive_rows: list[int] = field(default_factory=list)
    labelled_rows: list[tuple[int, bool]] = field(default_factory=list)  # (row, is_positive) of point-wise data


@dataclass
class PreparedData:
    train: Units
    eval: EvalSet
    report: dict


def load_examples(src_cfg, on_error: str):
    result = load_source(src_cfg.source, src_cfg.path, on_error=on_error, **src_cfg.options)
    return result.examples, result.skipped


def load_split(cfg, given: tuple | None = None) -> tuple[list, list, list]:
    """Load the sources, split by prompt (unless held-out data is given), subsample:
    returns (train examples, held-out examples, skipped rows).

    ``given``: (train examples, held-out examples or None, skipped rows) already loaded
    (the Python API's in-memory data), used instead of ``data.train`` / ``data.eval``."""
    if given is not None:
        train_ex, eval_ex, skipped = given
    else:
        train_ex, skipped = load_examples(cfg.data.train, cfg.data.on_error)
        eval_ex = None
        if cfg.data.eval is not None:
            eval_ex, eval_skipped = load_examples(cfg.data.eval, cfg.data.on_error)
            skipped = skipped + eval_skipped
    if eval_ex is None:
        train_ex, eval_ex = split_by_prompt(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    train_ex = subsample(train_ex, cfg.data.train.limit, cfg.train.seed)
    eval_ex = subsample(eval_ex, cfg.data.eval_limit, cfg.train.seed)
    return train_ex, eval_ex, skipped


def prepare(cfg, tokenizer, method, split: tuple | None = None) -> PreparedData:
    """Load, split by prompt, convert to the method's kind, select its part, tokenize.

    ``split``: the result of :func:`load_split`, when the caller has already loaded it."""
    train_ex, eval_ex, skipped = split if split is not None else load_split(cfg)
    tok = Tokenizer(tokenizer, cfg.data.max_length)
    thr = cfg.method.positive_threshold
    train_units = select(as_kind(train_ex, method.kind), method.select, thr)
    train = build_units(train_units, tok, thr)
    if method.kl_rows:
        add_kl_rows(train, train_units, tok, cfg.train.seed)
    if len(train) == 0:
        raise ValueError(f"no training examples left for method {method.name!r} (it trains on: {method.select or 'all'})")
    evalset = build_eval(eval_ex, method, tok, thr, cfg.train.seed)
    report = {
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "train_units": len(train),
        "train_positive_units": sum(train.positive),
        "train_negative_units": len(train) - sum(train.positive),
        "eval_pairs": len(evalset.pairs),
        "eval_positives": len(evalset.positive_rows),
        "skipped_rows": len(skipped),
        "skipped_first": [str(e) for e in skipped[:5]],
        "prompts_truncated": train.table.prompt_truncated + evalset.table.prompt_truncated,
        "responses_truncated": train.table.response_truncated + evalset.table.response_truncated,
    }
    return PreparedData(train, evalset, report)


def subsample(examples: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of ``limit`` examples, in their original order (files are
    often sorted by category, so the first N would not be representative)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def select(examples: list, part: str | None, threshold: float | None) -> list:
    """Keep only positives or negatives (Unlearning, the Table 3 ablations); None keeps all."""
    if part is None:
        return examples
    pw = [e for e in examples if isinstance(e, PointWise)]
    thr = threshold if threshold is not None else positive_threshold(pw)
    want = part == "positive"
    return [e for e in pw if (e.label >= thr) == want]


def kl_partners(prompts: list, seed: int, responses: list | None = None) -> list[int]:
    """For each unit i, the unit j whose response makes its mismatched KL row (x_i, y_j).

    A seeded shuffle is read as a cycle and each unit takes the next one around it whose
    prompt differs from its own and, where one exists, whose response differs too (the same
    prompt or the same text would not make a mismatched pair), as TRL's KTO shifts each
    batch's completions by one.  Deterministic for a seed; with a single prompt (or unit)
    the plain next one.
    """
    n = len(prompts)
    responses = responses if responses is not None else [None] * n
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        nxt = [order[(k + s) % n] for s in range(1, n)] or [i]
        other = [j for j in nxt if prompts[j] != prompts[i]]
        partner[i] = next((j for j in other if responses[j] != responses[i]), (other or nxt)[0])
    return partner


def add_kl_rows(units, examples: list, tok: Tokenizer, seed: int) -> None:
    """Give each point-wise unit (``examples[i]`` made unit i) a mismatched row
    (prompt_i, response_j) in the units' table, for KTO's reference point: the rows are in
    the table, so a precomputed reference covers them."""
    partner = kl_partners([e.prompt for e in examples], seed, [e.response for e in examples])
    units.kl_rows = [tok.add(units.table, e.prompt, examples[j].response, f"kl:{e.origin}")
                     for e, j in zip(examples, partner)]


def build_eval(examples: list, method, tok: Tokenizer, threshold: float | None, seed: int = 0) -> EvalSet:
    table = SequenceTable()
    kept = select(as_kind(examples, method.kind), method.select, threshold)
    units = build_units(kept, tok, threshold, table)
    if method.kl_rows and len(units):
        add_kl_rows(units, kept, tok, seed)
    ev = EvalSet(table, units)
    pairs = [e for e in examples if e.kind == "pair"]
    pw = as_kind([e for e in examples if e.kind == "pointwise"], "pointwise")
    for p in pairs + pointwise_to_pairs(pw):
        ev.pairs.append(tok.add_pair(table, p.prompt, p.chosen, p.rejected))
    thr = threshold if threshold is not None else positive_threshold(pw)
    for e in as_kind(examples, "pointwise") if examples else []:
        ev.labelled_rows.append((tok.add(table, e.prompt, e.response), e.label >= thr))
    for d in as_kind(examples, "demonstration") if examples else []:
        ev.positive_rows.append(tok.add(table, d.prompt, d.response))
    return ev
