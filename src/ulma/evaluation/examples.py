"""Which examples an evaluation runs on: a data source and split, or a run's held-out data.

- perplexity is taken on the *positives* (chosen answers of pairs, z = 1, the best-rated
  responses of scored data, demonstrations), as in training's held-out evaluation;
- generation and judging use one *reference* per prompt: the prompt's first positive
  (the data set's chosen answer, which the paper's judge compares against);
- judge agreement uses the human orderings: pairs, and (better, worse) responses of one
  prompt with different scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ulma.config import Config, from_dict
from ulma.data.prepare import load_split, subsample
from ulma.data.schema import Pair, as_kind, pointwise_to_pairs
from ulma.data.sources import load_source, split_by_prompt
from ulma.evaluation.loading import dataset_name
from ulma.inspect_data import guess_format


@dataclass
class DataSpec:
    """A data selection from the command line (``source`` None: the run's held-out data)."""

    source: Optional[str] = None  # a source name (pyrit, hh, ...) or a file
    format: Optional[str] = None  # the adapter to read a file with; None = from the suffix
    options: dict = field(default_factory=dict)
    on_error: str = "raise"
    split: str = "all"  # all | test | train (test/train: split by prompt, as training does)
    test_fraction: float = 0.2
    split_seed: int = 0
    limit: Optional[int] = None  # a seeded random subset of this many items
    name: Optional[str] = None  # the data set's name in reports


@dataclass
class EvalData:
    examples: list
    name: str
    skipped: list
    about: dict  # where the examples came from, written into result files


def load_eval_data(spec: DataSpec, run_config: dict | None = None) -> EvalData:
    """The examples of ``spec``, or of the held-out split of the run whose config is given."""
    if spec.source is None:
        if run_config is None:
            raise ValueError("no data: pass --data (a source name or a file), or a run folder as the model")
        return _run_heldout(run_config, spec)
    name, path = (spec.format, spec.source) if spec.format else guess_format(spec.source)
    if spec.format and spec.source == spec.format:
        path = None
    result = load_source(name, path, on_error=spec.on_error, **spec.options)
    examples = _split(result.examples, spec.split, spec.test_fraction, spec.split_seed)
    about = {"source": name, "path": path, "options": spec.options, "split": spec.split,
             "test_fraction": spec.test_fraction, "split_seed": spec.split_seed, "limit": spec.limit}
    return EvalData(examples, spec.name or dataset_name(name, path), result.skipped, about)


def _split(examples: list, split: str, fraction: float, seed: int) -> list:
    if split == "all":
        return examples
    train, test = split_by_prompt(examples, fraction, seed)
    return {"train": train, "test": test}[split]


def _run_heldout(run_config: dict, spec: DataSpec) -> EvalData:
    """The held-out examples that training evaluated: ``data.eval``, or the share of
    ``data.train`` it held out (same fraction, same seed), capped by ``data.eval_limit``."""
    cfg = from_dict(Config, run_config)
    _, examples, skipped = load_split(cfg)
    src = cfg.data.eval if cfg.data.eval is not None else cfg.data.train
    about = {"source": src.source, "path": src.path, "options": src.options, "split": "run held-out",
             "test_fraction": cfg.data.eval_fraction, "split_seed": cfg.train.seed,
             "eval_limit": cfg.data.eval_limit, "limit": spec.limit}
    return EvalData(examples, spec.name or dataset_name(src.source, src.path), skipped, about)


def positives(data: EvalData, limit: int | None = None, seed: int = 0) -> list:
    """Demonstrations: every positive of the data (a seeded subset of ``limit``)."""
    return subsample(as_kind(data.examples, "demonstration"), limit, seed)


def references(data: EvalData, limit: int | None = None, seed: int = 0) -> list:
    """One demonstration per prompt, the prompt's first positive (the reference answer);
    plain text (no prompt) has nothing to answer and is left out."""
    first: dict = {}
    for d in as_kind(data.examples, "demonstration"):
        if d.prompt:
            first.setdefault(d.prompt, d)
    return subsample(list(first.values()), limit, seed)


def human_pairs(data: EvalData, limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Pairs ordered by humans: (chosen, rejected), or (higher, lower score) of one prompt."""
    pairs = [e for e in data.examples if e.kind == "pair"]
    pointwise = [e for e in data.examples if e.kind == "pointwise"]
    return subsample(pairs + pointwise_to_pairs(pointwise), limit, seed)
