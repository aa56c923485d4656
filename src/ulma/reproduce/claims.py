"""Verdicts on the paper's claims (a)-(e), decided by confidence intervals.

"A beats B" on one metric of one data set is decided by :func:`compare`:

- *better* when A's interval lies entirely on the better side of B's (95% t-intervals over
  seeds; a bootstrap interval over prompts when a method has one run), or when a paired
  comparison over the seeds both have says so (the t-interval of the per-seed differences
  excludes 0: a paired t-test at the same level), or, with one run each, a paired bootstrap
  over the items both runs were measured on (the same human pairs for preference accuracy,
  the same test prompts for win & tie: the interval of the mean per-item difference
  excludes 0);
- *worse* when the same holds the other way;
- *even* otherwise; *missing* when either has no result.

A claim gathers comparisons (every metric measured: the judge's win & tie, higher is better;
perplexity, lower is better; preference accuracy on human pairs, higher is better) and is **supported** when every comparison that could be made
goes its way, **contradicted** when any goes against it, **not distinguishable at this size**
otherwise, and **not run** when none could be made.

A judge whose agreement with held-out human labels was measured and is not better than chance
on a data set (its agree interval does not lie above its disagree interval) decides nothing
there: its win & tie comparisons are *unjudged* and left out, and the verdict says so.  Win
rates from a coin would otherwise contradict or support claims at random.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ulma.evaluation.report import default_criterion, group, perplexity_cell, preference_cell, rate_cell
from ulma.evaluation.winrates import t_interval
from ulma.reproduce.experiments import MAIN_METHODS, PAIR_SLOTS, POINTWISE_SLOTS

SUPPORTED, CONTRADICTED, EVEN, NOT_RUN = "supported", "contradicted", "not distinguishable at this size", "not run"
SUPPORTED_WHERE_RUN = "supported where run"  # every comparison made goes its way, but some cells were not run


@dataclass(frozen=True)
class Metric:
    name: str  # "win_tie" | "perplexity" | "preference"
    higher_better: bool
    label: str

    def value(self, r) -> float | None:
        if self.name == "perplexity":
            return r.perplexity
        if self.name == "preference":
            return r.preference
        return r.criteria.get(default_criterion(r.dataset), {}).get("win_tie")

    def items(self, r) -> dict:
        """Per-item values of one run, for a paired test over the items two runs share: per human
        pair (preference: 1 if ranked as the humans did) or per test prompt (win & tie: 1 for a
        win or a tie); none for perplexity."""
        if self.name == "preference":
            return dict(enumerate(r.preference_correct or []))
        if self.name == "win_tie":
            got = r.outcomes.get(default_criterion(r.dataset), {})
            return {k: float(v in ("win", "tie")) for k, v in got.items()}
        return {}

    def cell(self, runs: list, confidence: float):
        if self.name == "perplexity":
            return perplexity_cell(runs, confidence)
        if self.name == "preference":
            return preference_cell(runs, confidence)
        return rate_cell(runs, default_criterion(runs[0].dataset), "win_tie", confidence) if runs else None


METRICS = (Metric("win_tie", True, "win & tie"), Metric("perplexity", False, "perplexity"),
           Metric("preference", True, "preference accuracy"))


@dataclass(frozen=True)
class Outcome:
    dataset: str
    a: str
    b: str
    metric: str
    result: str  # better | worse | even | missing | unjudged (the judge is at chance on this data set)

    def text(self) -> str:
        return f"{self.a} vs {self.b} on {self.dataset} ({self.metric})"


def _by_seed(runs: list, metric: Metric) -> dict:
    out = {}
    for r in runs:
        v = metric.value(r)
        if r.seed is not None and v is not None and not math.isnan(v):
            out[r.seed] = v
    return out


def compare(a: list, b: list, metric: Metric, confidence: float = 0.95) -> str:
    """Is A (runs of one method) better than B on ``metric``? better / worse / even / missing."""
    ca, cb = metric.cell(a, confidence) if a else None, metric.cell(b, confidence) if b else None
    if ca is None or cb is None or math.isnan(ca.mean) or math.isnan(cb.mean):
        return "missing"
    sign = 1 if metric.higher_better else -1
    apart = not any(math.isnan(x) for x in (ca.low, ca.high, cb.low, cb.high)) and (ca.low > cb.high or
                                                                                  ca.high < cb.low)
    if apart:
        return "better" if sign * (ca.mean - cb.mean) > 0 else "worse"
    va, vb = _by_seed(a, metric), _by_seed(b, metric)
    diffs = [va[s] - vb[s] for s in sorted(set(va) & set(vb))]
    if len(diffs) >= 2:
        mean, lo, hi = t_interval(diffs, confidence)
        if lo > 0 or hi < 0:
            return "better" if sign * mean > 0 else "worse"
    elif len(a) == len(b) == 1:
        ia, ib = metric.items(a[0]), metric.items(b[0])
        shared = [k for k in ia if k in ib]
        same_pairs = metric.name != "preference" or len(ia) == len(ib)  # pairs are keyed by their position
        if shared and same_pairs:
            lo, hi = paired_interval([ia[k] for k in shared], [ib[k] for k in shared], confidence)
            if lo > 0 or hi < 0:  # the interval excludes 0: its sign is the difference's
                return "better" if (lo > 0) == metric.higher_better else "worse"
    return "even"


def paired_interval(a: list, b: list, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of mean(a - b) over items measured on both (a[i] and b[i]: one item)."""
    import numpy as np

    from ulma.evaluation.winrates import bootstrap_interval

    return bootstrap_interval((np.asarray(a, float) - np.asarray(b, float),), np.mean, confidence)


@dataclass
class Verdict:
    label: str
    claim: str
    verdict: str
    details: str = ""
    outcomes: list = field(default_factory=list)

    def line(self) -> str:
        return f"- **{self.label}** {self.claim}: **{self.verdict}**." + (f" {self.details}" if self.details else "")


def judge_better_than_chance(agreement: dict) -> bool:
    """From an ``agreement.json``: the judge agrees with the human labels more often than it
    disagrees, with the 95% intervals apart (for a judge that never ties: agree > 50% with
    the interval's low end above it)."""
    agree, disagree = agreement["ci"]["agree"], agreement["ci"]["disagree"]
    return agree[0] > disagree[1]


def _decided(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.result not in ("missing", "unjudged")]


def beats(outcomes: list[Outcome]) -> str:
    """The verdict of "A beats B" comparisons."""
    have = _decided(outcomes)
    if not have:
        return NOT_RUN
    if any(o.result == "worse" for o in have):
        return CONTRADICTED
    if not all(o.result == "better" for o in have):
        return EVEN
    return SUPPORTED_WHERE_RUN if any(o.result == "missing" for o in outcomes) else SUPPORTED


def tally(outcomes: list[Outcome]) -> str:
    """Per metric: how many comparisons went for, against, or overlapped; which went against."""
    parts = []
    for m in METRICS:
        mine = [o for o in _decided(outcomes) if o.metric == m.label]
        if mine:
            n = {r: sum(o.result == r for o in mine) for r in ("better", "worse", "even")}
            parts.append(f"{m.label}: {n['better']} for, {n['worse']} against, {n['even']} overlapping "
                         f"of {len(mine)}")
    against = [o.text() for o in outcomes if o.result == "worse"]
    missing = sum(o.result == "missing" for o in outcomes)
    unjudged = sorted({o.dataset for o in outcomes if o.result == "unjudged"})
    sentences = ["; ".join(parts)] if parts else []
    sentences += ["Against: " + ", ".join(against)] if against else []
    sentences += [f"win & tie on {', '.join(unjudged)} not used: the judge's agreement with human labels "
                  "there is not better than chance"] if unjudged else []
    sentences += [f"{missing} comparison(s) lack a cell"] if missing else []
    return "".join(f"{x}. " for x in sentences).strip()


class Evidence:
    """The runs, grouped by (method, data set), and which data set fills each slot."""

    def __init__(self, results: list, names: dict, confidence: float = 0.95, at_chance: set | None = None):
        self.groups = group([r for r in results if r.perplexity is not None or r.criteria])
        self.names = {slot: n for slot, n in names.items() if n}  # slot -> data set name (run at this scale)
        self.confidence = confidence
        self.at_chance = at_chance or set()  # data sets whose judge is not better than chance
        measured = any(r.preference is not None for rs in self.groups.values() for r in rs)
        self.metrics = [m for m in METRICS if m.name != "preference" or measured]  # older runs lack it

    def runs(self, method: str, dataset: str) -> list:
        return self.groups.get((method, dataset), [])

    def datasets(self, slots) -> list[str]:
        return [self.names[s] for s in slots if s in self.names]

    def outcomes(self, a: str, b: str, datasets: list[str]) -> list[Outcome]:
        return [Outcome(d, a, b, m.label, self._compare(a, b, d, m)) for d in datasets for m in self.metrics]

    def _compare(self, a: str, b: str, dataset: str, metric: Metric) -> str:
        result = compare(self.runs(a, dataset), self.runs(b, dataset), metric, self.confidence)
        if metric.name == "win_tie" and dataset in self.at_chance and result != "missing":
            return "unjudged"
        return result


def claim_a(ev: Evidence) -> Verdict:
    text = "ULMA beats every other method (SFT, RLHF, DPO, point-wise DPO, Unlearning, Unlikelihood) on every data set"
    sets = ev.datasets(("hh", "golden_hh", "red_team", "qa_feedback"))
    outs = [o for m in MAIN_METHODS if m != "ulma" for o in ev.outcomes("ulma", m, sets)]
    return Verdict("(a)", text, beats(outs), tally(outs), outs)


def claim_b(ev: Evidence) -> Verdict:
    text = "point-wise DPO is about equal to DPO on pair data (HH, Golden HH) and better on point-wise data"
    equal = ev.outcomes("pointwise_dpo", "dpo", ev.datasets(PAIR_SLOTS))
    better = ev.outcomes("pointwise_dpo", "dpo", ev.datasets(POINTWISE_SLOTS))
    eq_have, bt_have = _decided(equal), _decided(better)
    if not eq_have and not bt_have:
        return Verdict("(b)", text, NOT_RUN, "", equal + better)
    separated = [o for o in eq_have if o.result != "even"]
    if separated or any(o.result == "worse" for o in bt_have):
        verdict = CONTRADICTED
    elif eq_have and bt_have and all(o.result == "better" for o in bt_have):
        verdict = SUPPORTED
    else:
        verdict = EVEN
    details = (f"Pair data: {len(eq_have) - len(separated)} of {len(eq_have)} comparisons overlap (≈ holds)"
               + (f", apart: {', '.join(o.text() for o in separated)}" if separated else "")
               + f". Point-wise data: {tally(better) or 'not run.'}")
    return Verdict("(b)", text, verdict, details, equal + better)


def claim_c(ev: Evidence) -> Verdict:
    text = "ULMA's gain over the other methods is larger on Golden HH than on HH (better positives)"
    if "golden_hh" not in ev.names or "hh" not in ev.names:
        return Verdict("(c)", text, NOT_RUN, "It needs Golden HH and HH (Golden HH is on the hub: paper scale).")
    outs = [Outcome("golden_hh - hh", "ulma gain", "", m.label, _gain_growth(ev, m)) for m in ev.metrics]
    details = "; ".join(f"{o.metric}: {o.result}" for o in outs) + " (t-interval over seeds of the gain difference)."
    return Verdict("(c)", text, beats(outs), details, outs)


def _gain_growth(ev: Evidence, metric: Metric) -> str:
    """better if, seed by seed, (ULMA - mean of the others) grows from HH to Golden HH."""
    gains = [_gains(ev, ev.names[slot], metric) for slot in ("golden_hh", "hh")]
    diffs = [gains[0][s] - gains[1][s] for s in sorted(set(gains[0]) & set(gains[1]))]
    if len(diffs) < 2:
        return "missing"
    mean, lo, hi = t_interval(diffs, ev.confidence)
    return "better" if lo > 0 else "worse" if hi < 0 else "even"


def _gains(ev: Evidence, dataset: str, metric: Metric) -> dict:
    sign = 1 if metric.higher_better else -1
    ulma = _by_seed(ev.runs("ulma", dataset), metric)
    others = defaultdict(list)
    for m in MAIN_METHODS:
        if m != "ulma":
            for seed, v in _by_seed(ev.runs(m, dataset), metric).items():
                others[seed].append(v)
    return {s: sign * (v - sum(others[s]) / len(others[s])) for s, v in ulma.items() if others.get(s)}


def claim_d(ev: Evidence) -> Verdict:
    outs = ev.outcomes("sft", "positive_dpo", ev.datasets(("hh", "golden_hh", "red_team")))
    return Verdict("(d)", "on positives only, SFT beats Positive DPO", beats(outs), tally(outs), outs)


def claim_e(ev: Evidence) -> Verdict:
    outs = ev.outcomes("negative_dpo", "unlearning", ev.datasets(("hh", "golden_hh", "red_team")))
    return Verdict("(e)", "on negatives only, Negative DPO beats Unlearning", beats(outs), tally(outs), outs)


def versus(ev: Evidence, other: str) -> Verdict:
    """ULMA against a point-wise method the paper did not compare with (KTO, BCO), on every data set."""
    outs = ev.outcomes("ulma", other, ev.datasets(("hh", "golden_hh", "red_team", "qa_feedback")))
    return Verdict(f"(vs {other})", f"ULMA beats {other.upper()} (not a claim of the paper)", beats(outs),
                   tally(outs), outs)


def judge_claims(results: list, names: dict, confidence: float = 0.95, at_chance: set | None = None) -> list[Verdict]:
    """Verdicts on (a)-(e), then ULMA vs KTO and BCO, from RunResults; ``names``: slot -> the data
    set run in it (or None); ``at_chance``: data sets whose judge is not better than chance (its
    win rates are not used)."""
    ev = Evidence(results, names, confidence, at_chance)
    return [claim_a(ev), claim_b(ev), claim_c(ev), claim_d(ev), claim_e(ev), versus(ev, "kto"), versus(ev, "bco")]
