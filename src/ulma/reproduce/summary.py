"""The reproduction's report, rebuilt from whatever finished cells ``OUT`` holds.

Writes ``OUT/report.md`` (scale, data, every table, claims, timings), ``OUT/<table>.md``
and ``OUT/<table>.png`` (win / tie / lose bars, Figure 2's style), ``OUT/figure1.png``
(Golden HH, as the paper's Figure 1) and ``OUT/figure2.png`` (HH, QA-feedback, red-team),
and ``OUT/claims.json``.  Tables are rendered by :func:`ulma.evaluation.report.markdown`
with a fixed layout: cells not run say "missing", cells with fewer seeds say "(k/n runs)",
a method that cannot run on a data set says "n/a".
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ulma.atomic import atomic_write_json, atomic_write_text
from ulma.evaluation.io import EvalError, read_json
from ulma.evaluation.report import TableLayout, default_criterion, load_result, markdown, plot_bars
from ulma.reproduce.claims import judge_better_than_chance, judge_claims
from ulma.reproduce.experiments import EXTRA_METHODS, MAIN_METHODS, NOT_IN_PAPER, TABLES
from ulma.reproduce.context import Context
from ulma.reproduce.jobs import MARKER
from ulma.reproduce.scales import scaled_down


def collect(out: Path) -> tuple[list, set, dict]:
    """(RunResults of the finished cells, inapplicable (method, data set) pairs, their markers)."""
    results, na, markers = [], set(), {}
    for marker in sorted(Path(out).glob(f"cells/*/*/seed*/{MARKER}")):
        folder = marker.parent
        dataset, method = folder.parent.parent.name, folder.parent.name
        m = read_json(marker)
        if m.get("inapplicable"):
            na.add((method, dataset))
            continue
        results.append(load_result(folder))
        markers[str(folder.relative_to(out))] = m
    return results, na, markers


def agreement_results(ctx: Context, datasets: list) -> list:
    """The judges' agreement with human labels (RunResults holding only ``agreement``)."""
    out = []
    for ds in datasets:
        folder = ctx.judge_dir(ds) / "agreement"
        if (ctx.judge_dir(ds) / MARKER).exists() and (folder / "agreement.json").exists():
            out.append(load_result(folder))
    return out


def judges_at_chance(ctx: Context) -> set:
    """The data sets whose judge's measured agreement with human labels is not better than chance."""
    run = [ds for ds in ctx.slots.values() if not ds.unavailable]
    return {r.dataset for r in agreement_results(ctx, run) if not judge_better_than_chance(r.agreement)}


def judge_text(ctx: Context) -> str:
    j, s = ctx.judge, ctx.scale
    if j.kind == "reward":
        base = s.judge.model or s.policy.model
        return (f"Judge: a reward model trained by ulma on each data set's judge split (Bradley-Terry on its pairs; "
                f"MSE on scores), {base} + LoRA, disjoint by prompt from every policy's training data; the answer "
                "with the higher "
                f"reward wins (tie when the rewards differ by at most {s.judge.tie_margin:g}). It is not the paper's "
                "GPT-4 judge: its agreement with held-out human labels is in the table below.")
    return (f"Judge: the {j.kind} judge named in the agreement table below, with the paper's Appendix B prompt, "
            "asked in both orders (a disagreement is a tie).")


def table_section(ctx: Context, table, results: list, na: set, seeds: int) -> str:
    """One table in the paper's layout, with its judge, data notes and agreement."""
    slots = [s for s in table.slots if s in ctx.slots]
    run = [ctx.slots[s] for s in slots if not ctx.slots[s].unavailable]
    names = {ds.name: ds.title for ds in run}
    keep = {(m, ds.name) for m in table.methods for ds in run}
    mine = [r for r in results if (r.method, r.dataset) in keep]
    layout = TableLayout(list(table.methods), [ds.name for ds in run], names, seeds, na & keep,
                         labels={m: m + NOT_IN_PAPER for m in EXTRA_METHODS})
    lines = [f"## {table.title}", "", table.caption, "", judge_text(ctx), ""]
    lines += [f"- {ds.note}" for ds in run if ds.note]
    lines += [f"- {ctx.slots[s].title}: not run ({ctx.slots[s].unavailable})." for s in slots
              if ctx.slots[s].unavailable]
    lines += ["", markdown(mine + agreement_results(ctx, run), layout=layout).rstrip(), ""]
    if (ctx.out / f"{table.name}.png").exists():
        lines += [f"![{table.title}: win / tie / lose]({table.name}.png)", ""]
    return "\n".join(lines)


def header(ctx: Context, seeds: int) -> str:
    s = ctx.scale
    lines = [f"# Reproducing ULMA (arXiv 2312.02554): scale `{s.name}`", "",
             f"Built {time.strftime('%Y-%m-%d %H:%M')} from the finished cells in `{ctx.out}`; {seeds} seed(s) "
             "per cell expected; 95% intervals.", ""]
    diffs = scaled_down(s)
    if diffs:
        lines += ["Scaled down from the paper's setup (this scale / the paper's):", "", "| setting | here | paper |",
                  "|---|---|---|"]
        lines += [f"| `{k}` | {_show(a)} | {_show(b)} |" for k, a, b in diffs]
        lines += [""]
    return "\n".join(lines)


def _show(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "all" if v is None else str(v)


def timings(markers: dict, out: Path) -> str:
    """Wall time spent per stage, summed over the finished cells and shared jobs, and the
    optimizer steps each cell took."""
    totals: dict = {}
    for m in markers.values():
        for k, v in m.get("seconds", {}).items():
            totals[k] = totals.get(k, 0.0) + v
    shared = 0.0
    for marker in list(Path(out).glob(f"judge/*/*/{MARKER}")) + list(Path(out).glob(f"rlhf_reward/*/*/{MARKER}")):
        shared += read_json(marker).get("seconds", 0.0) or 0.0
    cells = sum(totals.values())
    parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in totals.items())
    steps: dict = {}
    for name, m in markers.items():  # cells/<data set>/<method>/seed<k>
        steps.setdefault("/".join(name.split("/")[1:3]), set()).add(m.get("steps"))
    step_text = ", ".join(f"{k} {'/'.join(str(v) for v in sorted(s, key=str))}" for k, s in steps.items())
    return (f"## Wall time\n\n{len(markers)} cells: {cells / 60:.1f} min ({parts}); judges and RLHF reward models: "
            f"{shared / 60:.1f} min.\n\nOptimizer steps per cell (PPO: rollout batches): {step_text or 'none yet'}.\n")


def figures(ctx: Context, results: list, tables: list) -> None:
    """Bars per table, and the paper's Figure 1 (Golden HH) and Figure 2 (HH, QA-feedback, red-team)."""
    names = {ds.name: ds.title for ds in ctx.slots.values()}
    crit = {r.dataset: default_criterion(r.dataset) for r in results}

    def draw(path: Path, slots, methods) -> None:
        want = {ctx.slots[s].name for s in slots if s in ctx.slots}
        mine = [r for r in results if r.dataset in want and r.method in methods]
        try:
            plot_bars(mine, path, crit, names)
        except EvalError:  # nothing judged yet
            path.unlink(missing_ok=True)

    for t in tables:
        draw(ctx.out / f"{t.name}.png", t.slots, t.methods)
    main = MAIN_METHODS  # the paper's figures: its methods only
    draw(ctx.out / "figure1.png", ("golden_hh",), main)
    draw(ctx.out / "figure2.png", ("hh", "qa_feedback", "red_team"), main)


def write_report(ctx: Context, tables: list, seeds: int) -> Path:
    """Rebuild every report file from the cells on disk; returns the path of report.md."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    results, na, markers = collect(ctx.out)
    have = {(r.method, r.dataset) for r in results}
    shown = [t for t in TABLES.values() if t in tables or any((m, ctx.slots[s].name) in have for m in t.methods
                                                                for s in t.slots if s in ctx.slots)]
    figures(ctx, results, shown)
    sections = [header(ctx, seeds)]
    for t in shown:
        text = table_section(ctx, t, results, na, seeds)
        atomic_write_text(ctx.out / f"{t.name}.md", text)
        sections.append(text)
    names = {slot: (None if ds.unavailable else ds.name) for slot, ds in ctx.slots.items()}
    verdicts = judge_claims(results, names, at_chance=judges_at_chance(ctx))
    sections.append("## The paper's claims, and ULMA against KTO and BCO\n\n" + "\n".join(v.line() for v in verdicts) + "\n")
    sections.append(timings(markers, ctx.out))
    atomic_write_json(ctx.out / "claims.json", [{**dataclasses.asdict(v), "outcomes": [dataclasses.asdict(o) for o in
                                                                                       v.outcomes]} for v in verdicts])
    path = ctx.out / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path
