"""The paper's experiments as data: tables, data-set slots, the data sets each scale puts in
them, and the claims the tables test.

A table has *slots* (``hh``, ``golden_hh``, ``red_team``, ``qa_feedback``): the paper's data
sets.  A scale fills each slot with a :class:`DataSet` or leaves it empty (Golden HH is
not available offline); at cpu scale PyRIT's human-scored harm data stands in for red-team.
Cells are named by the data set that was actually used (``cells/pyrit/ulma/seed0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The paper's Table 1 / Table 2 rows, in its order.
MAIN_METHODS = ("sft", "rlhf", "dpo", "pointwise_dpo", "unlearning", "unlikelihood", "ulma")
# Not in the paper: extra rows of Tables 1 and 2 (marked so in the reports; no claim reads them).
EXTRA_METHODS = ("kto", "bco")
NOT_IN_PAPER = " (not in the paper)"
# Table 3: learning from positives only (SFT vs Positive DPO), negatives only (Unlearning vs Negative DPO).
ABLATION_METHODS = ("sft", "positive_dpo", "unlearning", "negative_dpo")
SLOTS = ("hh", "golden_hh", "red_team", "qa_feedback")
PAIR_SLOTS = ("hh", "golden_hh")  # pair-wise data sets (claim b)
POINTWISE_SLOTS = ("qa_feedback", "red_team")  # point-wise data sets (claim b)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    caption: str  # what the paper's table reports
    slots: tuple
    methods: tuple


TABLES = {
    "table1": Table("table1", "Table 1", "Perplexity and harmless score (win & tie against the data set's chosen "
                    "answer) of each method on HH, Golden HH and red-team.", ("hh", "golden_hh", "red_team"),
                    MAIN_METHODS + EXTRA_METHODS),
    "table2": Table("table2", "Table 2", "Perplexity and helpful score (win & tie) on QA-feedback.",
                    ("qa_feedback",), MAIN_METHODS + EXTRA_METHODS),
    # The paper says "on various datasets" without naming them; we use Table 1's (harmlessness) data sets.
    "table3": Table("table3", "Table 3", "Ablation of ULMA's hybrid objective: on positives only, SFT (no KL "
                    "regularizer) vs Positive DPO; on negatives only, Unlearning (no regularizer) vs Negative DPO.",
                    ("hh", "golden_hh", "red_team"), ABLATION_METHODS),
}
EXPERIMENTS = (*TABLES, "all")


def tables_of(experiment: str) -> list[Table]:
    if experiment == "all":
        return list(TABLES.values())
    if experiment not in TABLES:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {list(EXPERIMENTS)}")
    return [TABLES[experiment]]


@dataclass(frozen=True)
class DataSet:
    """Where a slot's data comes from and how its split files are written."""

    name: str  # cells/<name>/..., and the data set's name in reports
    title: str  # column title in the tables
    source: str  # a loader of ulma.data.sources.SOURCES
    kind: str  # "pair" | "binary" | "continuous": the examples' kind, for writing and re-reading the split
    path: Optional[str] = None  # None: the loader's default (the hub, or the installed package)
    options: dict = field(default_factory=dict)  # loader options
    test_options: Optional[dict] = None  # loader options of a separate test source (a hub "test" split);
    # None: test and judge prompts are split off `path` itself
    max_length: Optional[int] = None  # prompt + response tokens for this data set; None = the scale's
    note: str = ""  # printed under the table
    unavailable: str = ""  # non-empty: the slot cannot be run at this scale, and why


def shared_data_dir() -> Path:
    """``$ULMA_SHARED_DATA``, else ``../shared/data`` beside the repository (the project's
    layout), else ``../shared/data`` from the working directory."""
    if os.environ.get("ULMA_SHARED_DATA"):
        return Path(os.environ["ULMA_SHARED_DATA"])
    beside_repo = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return beside_repo if beside_repo.is_dir() else Path("../shared/data")


def cpu_data_sets() -> dict:
    """The data at hand: local files and the installed pyrit package."""
    shared = shared_data_dir()
    return {
        "hh": DataSet("hh", "HH", "hh", "pair", str(shared / "hh-rlhf" / "harmless-base-test.part.jsonl.gz"),
                      max_length=None, note="HH: Anthropic HH-RLHF harmless-base, the first 1,800 rows of its test "
                      "file (../shared/data), split here by prompt into train / test / judge; point-wise methods see "
                      "each pair as chosen z=1 and rejected z=0."),
        "golden_hh": DataSet("golden_hh", "Golden HH", "golden_hh", "pair",
                             unavailable="on the hub only: paper scale"),
        "red_team": DataSet("pyrit", "red-team → PyRIT", "pyrit", "continuous",
                            note="red-team → PyRIT: PyRIT's human-scored harm data (990 responses to 390 harmful "
                            "objectives, score = 1 − mean human harm score) stands in for red-team, which is not "
                            "available offline. Unlike red-team it has several responses per objective, so DPO and "
                            "the RLHF reward model get pairs of one objective's responses with different scores."),
        "qa_feedback": DataSet("qa_feedback", "QA-feedback", "qa_feedback", "binary",
                               str(shared / "qa-feedback" / "dev_feedback.part.json"), {"passages": False},
                               max_length=192, note="QA-feedback: the first 400 records of the dev file "
                               "(../shared/data); the prompt is the question without its retrieved passages "
                               "(far longer than the question); positive = the human-corrected answer, negative = "
                               "prediction 1 with marked errors; DPO gets the records that have both as pairs."),
    }


def paper_data_sets() -> dict:
    """The paper's data from the hub (QA-feedback is not on the hub: pass --data-path)."""
    return {
        "hh": DataSet("hh", "HH", "hh", "pair", None, {"split": "train", "data_dir": "harmless-base"},
                      {"split": "test", "data_dir": "harmless-base"},
                      note="HH: Anthropic/hh-rlhf harmless-base; train split for training, its test split "
                      "divided by prompt into test and judge prompts."),
        "golden_hh": DataSet("golden_hh", "Golden HH", "golden_hh", "pair", None, {"split": "train"},
                             {"split": "test"}, note="Golden HH: Unified-Language-Model-Alignment/Anthropic_HH_Golden "
                             "(HH with GPT-4 chosen answers)."),
        "red_team": DataSet("red_team", "red-team", "red_team", "continuous", None, {"split": "train"},
                            note="red-team: Anthropic/hh-rlhf red-team-attempts, score = 1 − rating/4; one response "
                            "per prompt, so DPO has no pairs (n/a)."),
        "qa_feedback": DataSet("qa_feedback", "QA-feedback", "qa_feedback", "binary", None,
                               note="QA-feedback: FineGrainedRLHF train_feedback.json (--data-path qa_feedback=FILE)."),
    }


def data_sets(scale: str, paths: dict | None = None) -> dict:
    """slot -> DataSet at ``scale``; ``paths`` (slot or data-set name -> file) replace the defaults."""
    from ulma.reproduce.scales import LOCAL_SCALES

    found = cpu_data_sets() if scale in LOCAL_SCALES else paper_data_sets()
    for key, path in (paths or {}).items():
        slot = slot_of(key, found)
        old = found[slot]
        found[slot] = DataSet(old.name, old.title, old.source, old.kind, path, old.options, None, old.max_length,
                              old.note)
    return found


def slot_of(key: str, found: dict) -> str:
    """The slot that ``key`` names: a slot, or the name of the data set filling one."""
    if key in found:
        return key
    for slot, ds in found.items():
        if ds.name == key:
            return slot
    names = sorted(set(found) | {d.name for d in found.values()})
    raise ValueError(f"unknown data set {key!r}; choose from {names}")
