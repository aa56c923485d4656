"""``ulma report``: the paper's tables and Figure-1-style bars from evaluation folders.

Each folder given is an evaluation output folder (or a run folder whose ``eval/`` is
one) holding ``perplexity.json`` and/or ``judge_summary.json`` (and ``agreement.json``).
Folders are grouped by (method, data set); a group of several runs (seeds) gets a
t-interval over runs (the paper: 3 runs, 95%), a single run its bootstrap interval over
prompts.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ulma.evaluation.io import EvalError, read_json, read_jsonl
from ulma.evaluation.winrates import OUTCOMES, t_interval

PAPER_ORDER = ("base", "sft", "rlhf", "ppo", "dpo", "pointwise_dpo", "pointwise_dpo_mse", "unlearning",
               "unlikelihood", "token_unlikelihood", "positive_dpo", "negative_dpo", "ulma")
HELPFUL_DATASETS = ("qa_feedback",)  # the paper scores QA-feedback on helpfulness, the rest on harmlessness


def default_criterion(dataset: str) -> str:
    return "helpful" if dataset in HELPFUL_DATASETS else "harmless"


@dataclass
class RunResult:
    """What one evaluated model left: its perplexity and its judge rates (with intervals)."""

    folder: str
    method: str
    dataset: str
    seed: int | None = None
    perplexity: float | None = None
    perplexity_ci: list | None = None
    criteria: dict = field(default_factory=dict)  # criterion -> rates + "ci" (as in judge_summary.json)
    agreement: dict | None = None
    preference: float | None = None  # preference accuracy on human pairs (preference.json)
    preference_ci: list | None = None
    preference_correct: list | None = None  # per pair, 1 if ranked as the humans did (the same pairs in every cell)
    outcomes: dict = field(default_factory=dict)  # criterion -> {prompt id: win | tie | lose} (judgments.jsonl)


@dataclass
class Cell:
    """A value with its interval; ``how`` = 't' (over runs), 'bootstrap' (one run) or ''."""

    mean: float
    low: float = math.nan
    high: float = math.nan
    how: str = ""
    runs: int = 1

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.mean is None or math.isnan(self.mean):
            return "–"
        m = f"{self.mean * scale:.{digits}f}"
        if math.isnan(self.low):
            return m
        if self.how == "t":
            return f"{m} ± {(self.high - self.mean) * scale:.{digits}f}"
        return f"{m} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def load_result(folder: str | Path) -> RunResult:
    """Read one evaluation folder (or a run folder's ``eval/``)."""
    folder = Path(folder)
    if (folder / "eval").is_dir():
        folder = folder / "eval"
    files = {name: folder / f"{name}.json" for name in ("perplexity", "judge_summary", "agreement", "preference")}
    found = {name: read_json(p) for name, p in files.items() if p.exists()}
    if not found:
        raise FileNotFoundError(f"{folder}: no perplexity.json, judge_summary.json, agreement.json or "
                                "preference.json (run `ulma eval perplexity|preference|judge` first)")
    meta = {**found.get("agreement", {}), **found.get("judge_summary", {}),
            **found.get("preference", {}).get("meta", {}), **found.get("perplexity", {}).get("meta", {})}
    ppl, pref = found.get("perplexity", {}), found.get("preference", {})
    return RunResult(
        str(folder), meta.get("method") or "base", meta.get("dataset") or "data", meta.get("seed"),
        ppl.get("perplexity"), ppl.get("ci"), found.get("judge_summary", {}).get("criteria", {}),
        found.get("agreement"), pref.get("accuracy"), pref.get("ci"), pref.get("correct"),
        _outcomes(folder / "judgments.jsonl"),
    )


def _outcomes(path: Path) -> dict:
    """criterion -> {prompt id: verdict} from a judgments.jsonl (unparseable answers left out)."""
    if not path.exists():
        return {}
    out: dict = defaultdict(dict)
    for _, row in read_jsonl(path)[0]:
        for crit, verdict in (row.get("verdicts") or {}).items():
            if verdict is not None:
                out[crit][row["id"]] = verdict
    return dict(out)


def _cell(runs: list[RunResult], value, single_ci, confidence: float) -> Cell:
    """t-interval over runs that have the value; the bootstrap interval when only one has it."""
    have = [r for r in runs if value(r) is not None and not math.isnan(value(r))]
    if not have:
        return Cell(math.nan)
    if len(have) == 1:
        ci = single_ci(have[0]) or [math.nan, math.nan]
        return Cell(value(have[0]), ci[0], ci[1], "bootstrap", 1)
    mean, lo, hi = t_interval([value(r) for r in have], confidence)
    return Cell(mean, lo, hi, "t", len(have))


def group(results: list[RunResult]) -> dict:
    """{(method, dataset): [RunResult, ...]} in the paper's method order."""
    groups: dict = defaultdict(list)
    for r in results:
        groups[(r.method, r.dataset)].append(r)
    rank = {m: i for i, m in enumerate(PAPER_ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][0], kv[0][1])))


def perplexity_cell(runs, confidence=0.95) -> Cell:
    return _cell(runs, lambda r: r.perplexity, lambda r: r.perplexity_ci, confidence)


def preference_cell(runs, confidence=0.95) -> Cell:
    return _cell(runs, lambda r: r.preference, lambda r: r.preference_ci, confidence)


def rate_cell(runs, criterion: str, rate: str, confidence=0.95) -> Cell:
    return _cell(runs, lambda r: r.criteria.get(criterion, {}).get(rate),
                 lambda r: r.criteria.get(criterion, {}).get("ci", {}).get(rate), confidence)


def _ordered(groups: dict) -> tuple[list, list]:
    methods = list(dict.fromkeys(m for m, _ in groups))
    datasets = list(dict.fromkeys(d for _, d in sorted(groups, key=lambda k: k[1])))
    return methods, datasets


@dataclass
class TableLayout:
    """A table whose rows and columns are fixed in advance (an experiment's matrix), so that
    what has not been run shows as such instead of disappearing."""

    methods: list  # rows, in this order
    datasets: list  # columns, in this order
    names: dict = field(default_factory=dict)  # data set -> column title (default: its name)
    runs: int | None = None  # runs expected per cell: fewer are marked "(k/n runs)", none "missing"
    inapplicable: set = field(default_factory=set)  # (method, data set) pairs shown as "n/a"
    labels: dict = field(default_factory=dict)  # method -> its row's title (default: its name)


def markdown(results: list[RunResult], criteria: dict | None = None, confidence: float = 0.95,
             layout: TableLayout | None = None) -> str:
    """The paper's layout (method x data set: perplexity, harmless / helpful win & tie, and the
    preference accuracy on human pairs where any run measured it), then the win / tie / lose
    rates, then the judge's agreement with humans if measured.
    ``layout`` fixes the rows and columns (see :class:`TableLayout`)."""
    groups = group([r for r in results if r.perplexity is not None or r.criteria])  # not agreement-only folders
    methods, datasets = (layout.methods, layout.datasets) if layout else _ordered(groups)
    crit = {d: (criteria or {}).get(d, default_criterion(d)) for d in datasets}
    names = layout.names if layout else {}
    pref = any(r.preference is not None for r in results)
    head = ["method"] + [h for d in datasets for h in (f"{names.get(d, d)} perplexity ↓",
                                                        f"{names.get(d, d)} {crit[d]} win & tie (%) ↑")
                         + ((f"{names.get(d, d)} preference accuracy (%) ↑",) if pref else ())]
    lines = [_row(head), _row(["---"] * len(head))]
    for m in methods:
        cells = [layout.labels.get(m, m) if layout else m]
        for d in datasets:
            runs = groups.get((m, d), [])
            values = [perplexity_cell(runs, confidence).format(1, 2),
                      rate_cell(runs, crit[d], "win_tie", confidence).format(100, 1)]
            values += [preference_cell(runs, confidence).format(100, 1)] if pref else []
            cells += [_mark(v, m, d, runs, layout) for v in values]
        lines.append(_row(cells))
    lines += ["", "Win / tie / lose against the reference answer (%):", ""] + _wtl_table(groups, crit, confidence)
    agreement = [r for r in results if r.agreement]
    if agreement:
        lines += ["", "Judge agreement with human labels (%):", ""] + _agreement_table(agreement)
    pct = round(confidence * 100)
    lines += ["", f"`a ± h`: {pct}% t-interval over training runs (seeds); `a [lo, hi]`: {pct}% bootstrap "
              "interval over prompts (one run); –: not measured. Unparseable judge answers are left out of the rates."]
    if pref:
        lines[-1] += (" Preference accuracy: the share of the test split's human pairs where the policy's "
                      "log pi - log pi_ref is higher for the preferred answer (ties count as wrong; chance 50%).")
    if layout:
        lines[-1] += " missing: not run (yet); n/a: the method cannot run on this data set."
    return "\n".join(lines) + "\n"


def _mark(text: str, method: str, dataset: str, runs: list, layout: TableLayout | None) -> str:
    """A table cell with what the layout expects: n/a, missing, or how many runs it holds."""
    if layout is None:
        return text
    if (method, dataset) in layout.inapplicable:
        return "n/a"
    if not runs:
        return "missing"
    if layout.runs and len(runs) < layout.runs:
        return f"{text} ({len(runs)}/{layout.runs} runs)"
    return text


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _wtl_table(groups: dict, crit: dict, confidence: float) -> list[str]:
    lines = [_row(["method", "data set", "criterion", "win", "tie", "lose", "runs", "unparseable"]),
             _row(["---"] * 8)]
    for (m, d), runs in groups.items():
        c = crit[d]
        if not any(c in r.criteria for r in runs):
            continue
        cells = [rate_cell(runs, c, o, confidence).format(100, 1) for o in OUTCOMES]
        bad = sum(r.criteria.get(c, {}).get("unparseable", 0) for r in runs)
        lines.append(_row([m, d, c, *cells, sum(c in r.criteria for r in runs), bad]))
    return lines


def _agreement_table(results: list[RunResult]) -> list[str]:
    lines = [_row(["judge", "data set", "criterion", "pairs", "agree", "tie", "disagree", "unparseable"]),
             _row(["---"] * 8)]
    for r in results:
        a = r.agreement
        cells = [Cell(a[k], *(a.get("ci", {}).get(k) or [math.nan, math.nan]), "bootstrap").format(100, 1)
                 for k in ("agree", "tie", "disagree")]
        lines.append(_row([a["judge"]["id"], a["dataset"], a["criterion"], a["pairs"], *cells, a["unparseable"]]))
    return lines


def bar_segments(results: list[RunResult], dataset: str, criterion: str) -> list[tuple[str, float, float, float]]:
    """[(method, win, tie, lose)] in percent, the mean over runs, for the bars of one data set."""
    out = []
    for (m, d), runs in group(results).items():
        if d != dataset or not any(criterion in r.criteria for r in runs):
            continue
        means = [rate_cell(runs, criterion, o).mean * 100 for o in OUTCOMES]
        out.append((m, *means))
    return out


def win_tie_intervals(results: list[RunResult], dataset: str, criterion: str) -> dict:
    """{method: (low, high)} of win & tie in percent (NaN when there is no interval), for the bars' whiskers."""
    out = {}
    for (m, d), runs in group(results).items():
        if d == dataset and any(criterion in r.criteria for r in runs):
            c = rate_cell(runs, criterion, "win_tie")
            out[m] = (c.low * 100, c.high * 100)
    return out


def plot_bars(results: list[RunResult], path: str | Path, criteria: dict | None = None,
              names: dict | None = None) -> Path:
    """A PNG of stacked win / tie / lose bars per method, one panel per data set (Figure 1);
    a whisker where the tie segment ends shows the interval of win & tie (a t-interval over
    runs, or a bootstrap over prompts for one run).  ``names``: data set -> panel title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, datasets = _ordered(group(results))
    panels = [(d, (criteria or {}).get(d, default_criterion(d))) for d in datasets]
    panels = [(d, c, bar_segments(results, d, c)) for d, c in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise EvalError("no judge results to plot (no judge_summary.json in the folders given)")
    height = max(2.0, 0.5 * max(len(p[2]) for p in panels) + 1.5)
    fig = Figure(figsize=(5.5 * len(panels), height))
    FigureCanvasAgg(fig)
    for k, (d, c, bars) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        _panel(ax, (names or {}).get(d, d), c, bars)
        _whiskers(ax, bars, win_tie_intervals(results, d, c))
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the panels
    return _save_png(fig, Path(path))


def _panel(ax, dataset: str, criterion: str, bars) -> None:
    names = [b[0] for b in bars][::-1]  # first method on top
    left = [0.0] * len(bars)
    colors = {"win": "#4c9f70", "tie": "#c9c9c9", "lose": "#d0604f"}
    for k, outcome in enumerate(OUTCOMES):
        widths = [b[k + 1] for b in bars][::-1]
        ax.barh(names, widths, left=left, color=colors[outcome], label=outcome)
        for y, (x0, w) in enumerate(zip(left, widths)):
            if w >= 8:
                ax.text(x0 + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=8)
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.set_title(f"{dataset}: {criterion}, vs the reference")


def _whiskers(ax, bars, intervals: dict) -> None:
    """Error bars of win & tie, drawn where the tie segment ends (same row order as :func:`_panel`)."""
    for y, b in enumerate(bars[::-1]):
        low, high = intervals.get(b[0], (math.nan, math.nan))
        if not (math.isnan(low) or math.isnan(high)):
            x = b[1] + b[2]  # rounding can put a bound a hair on the wrong side of the mean
            ax.errorbar(x, y, xerr=[[max(x - low, 0.0)], [max(high - x, 0.0)]], fmt="none", ecolor="black",
                        capsize=3, linewidth=1)


def _save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
