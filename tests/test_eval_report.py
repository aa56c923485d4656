"""Win rates, confidence intervals (t over runs, bootstrap over prompts), the Markdown
report in the paper's layout and the PNG of win/tie/lose bars."""

import json
import math

import pytest

from ulma.cli import main
from ulma.evaluation.report import bar_segments, load_result, markdown, plot_bars
from ulma.evaluation.winrates import bootstrap_interval, perplexity_interval, rate_intervals, rates, t_interval

T_975_DF2 = 4.302652729749464  # t table: 97.5% quantile with 2 degrees of freedom


def test_rates_leave_unparseable_out():
    assert rates(["win", "win", "tie", "lose", None]) == {
        "win": 0.5, "tie": 0.25, "lose": 0.25, "win_tie": 0.75, "n": 4, "unparseable": 1}
    empty = rates([None, None])
    assert math.isnan(empty["win"]) and (empty["n"], empty["unparseable"]) == (0, 2)


def test_t_interval_over_three_runs():
    mean, lo, hi = t_interval([0.5, 0.6, 0.7])
    half = T_975_DF2 * 0.1 / math.sqrt(3)  # s = 0.1
    assert (mean, lo, hi) == pytest.approx((0.6, 0.6 - half, 0.6 + half))
    assert half == pytest.approx(0.248414, abs=1e-6)
    one = t_interval([0.4])
    assert one[0] == 0.4 and math.isnan(one[1]) and math.isnan(one[2])


def test_bootstrap_intervals_over_prompts():
    assert rate_intervals(["win"] * 20)["win"] == [1.0, 1.0]  # nothing varies
    ci = rate_intervals(["win"] * 100 + ["lose"] * 100, n_resamples=2000)
    normal = 1.96 * math.sqrt(0.25 / 200)  # the normal approximation: 0.0693
    assert ci["win"] == pytest.approx([0.5 - normal, 0.5 + normal], abs=0.015)
    assert ci["tie"] == [0.0, 0.0] and ci["win_tie"] == ci["win"]
    assert perplexity_interval([-2.0, -2.0], [1, 1]) == pytest.approx((math.e ** 2, math.e ** 2))
    lo, hi = perplexity_interval([-10.0, -1.0, -4.0, -8.0], [5, 1, 2, 3], n_resamples=500)
    assert lo < math.exp(23 / 11) < hi  # exp(sum NLL / sum tokens) = exp(23/11)
    assert all(math.isnan(v) for v in bootstrap_interval(([],), lambda x, axis: x.mean(axis)))  # no data


def write_eval(folder, method, dataset, seed, ppl=None, criterion=None, wtl=None, ci=None):
    """An evaluation folder as `ulma eval perplexity` and `ulma eval judge` leave it."""
    folder.mkdir(parents=True)
    meta = {"model": f"m-{method}-{seed}", "run": None, "method": method, "dataset": dataset, "seed": seed}
    if ppl is not None:
        (folder / "perplexity.json").write_text(json.dumps({"perplexity": ppl, "ci": [ppl - 1, ppl + 1], "meta": meta}))
    if wtl is not None:
        w, t, lose = wtl
        crit = {"win": w, "tie": t, "lose": lose, "win_tie": w + t, "n": 20, "unparseable": 1,
                "ci": ci or {"win": [w, w], "tie": [t, t], "lose": [lose, lose], "win_tie": [w + t, w + t]}}
        (folder / "judge_summary.json").write_text(json.dumps({**meta, "criteria": {criterion: crit}}))
    return folder


@pytest.fixture
def folders(tmp_path):
    out = [write_eval(tmp_path / f"ulma-{s}", "ulma", "hh", s, ppl=p, criterion="harmless", wtl=w)
           for s, p, w in [(0, 10.0, (0.4, 0.1, 0.5)), (1, 11.0, (0.5, 0.1, 0.4)), (2, 12.0, (0.6, 0.1, 0.3))]]
    out.append(write_eval(tmp_path / "sft-0", "sft", "hh", 0, ppl=14.0, criterion="harmless", wtl=(0.3, 0.2, 0.5),
                          ci={"win": [0.2, 0.4], "tie": [0.1, 0.3], "lose": [0.4, 0.6], "win_tie": [0.4, 0.6]}))
    out.append(write_eval(tmp_path / "ulma-qa", "ulma", "qa_feedback", 0, ppl=5.0, criterion="helpful",
                          wtl=(0.7, 0.2, 0.1)))
    out.append(write_eval(tmp_path / "base", "base", "hh", None, ppl=20.0))  # perplexity only
    agreement = {"dataset": "hh", "criterion": "harmless", "judge": {"id": "api:gpt"}, "pairs": 50, "unparseable": 2,
                 "agree": 0.7, "tie": 0.1, "disagree": 0.2, "ci": {"agree": [0.6, 0.8], "tie": [0.05, 0.15]}}
    (tmp_path / "judge-check").mkdir()
    (tmp_path / "judge-check" / "agreement.json").write_text(json.dumps(agreement))
    return out + [tmp_path / "judge-check"]


def test_markdown_in_the_papers_layout(folders):
    text = markdown([load_result(f) for f in folders])
    lines = text.splitlines()
    half_ppl = T_975_DF2 * 1.0 / math.sqrt(3) * 1  # perplexities 10, 11, 12: s = 1
    assert lines[0] == ("| method | hh perplexity ↓ | hh harmless win & tie (%) ↑ | qa_feedback perplexity ↓ "
                        "| qa_feedback helpful win & tie (%) ↑ |")
    assert lines[2] == "| base | 20.00 [19.00, 21.00] | – | – | – |"
    assert lines[3] == "| sft | 14.00 [13.00, 15.00] | 50.0 [40.0, 60.0] | – | – |"
    assert lines[4] == f"| ulma | 11.00 ± {half_ppl:.2f} | 60.0 ± 24.8 | 5.00 [4.00, 6.00] | 90.0 [90.0, 90.0] |"
    assert "| ulma | hh | harmless | 50.0 ± 24.8 | 10.0 ± 0.0 | 40.0 ± 24.8 | 3 | 3 |" in lines
    assert "| sft | hh | harmless | 30.0 [20.0, 40.0] | 20.0 [10.0, 30.0] | 50.0 [40.0, 60.0] | 1 | 1 |" in lines
    assert "| api:gpt | hh | harmless | 50 | 70.0 [60.0, 80.0] | 10.0 [5.0, 15.0] | 20.0 | 2 |" in lines
    assert len([line for line in lines if line.startswith("| ")]) == 2 + 3 + 2 + 3 + 2 + 1  # no row for it above


def test_bars_and_png(folders, tmp_path):
    results = [load_result(f) for f in folders]
    bars = bar_segments(results, "hh", "harmless")  # in the paper's method order; ulma: the mean of 3 runs
    assert [b[0] for b in bars] == ["sft", "ulma"]
    assert [b[1:] for b in bars] == [pytest.approx((30.0, 20.0, 50.0)), pytest.approx((50.0, 10.0, 40.0))]
    png = plot_bars(results, tmp_path / "fig" / "bars.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (2 * 5.5 * 120, 2.5 * 120)  # two panels; 2 bars + 1.5 in high, 120 dpi
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["bars.png"]  # no temporary file left


def test_report_command(folders, tmp_path, capsys):
    assert main(["report", *map(str, folders), "--out", str(tmp_path / "r" / "report")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert md == markdown([load_result(f) for f in folders])
    assert (tmp_path / "r" / "report.png").exists() and md in capsys.readouterr().out
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no perplexity.json, judge_summary.json, agreement.json or preference.json" in capsys.readouterr().err
