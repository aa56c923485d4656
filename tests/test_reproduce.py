"""`ulma reproduce`: the split, the runner end to end on the tiny model (cells, skipping
finished ones, a missing cell in the report, re-judging), the claim verdicts on hand-made
numbers, and the paper scale's dry run."""

import json
import math

import pytest
from scipy import stats

from conftest import write_jsonl
from ulma.cli import main
from ulma.data.schema import pair, pointwise
from ulma.data.sources import prompt_key
from ulma.evaluation.report import RunResult
from ulma.reproduce.claims import CONTRADICTED, EVEN, NOT_RUN, SUPPORTED, SUPPORTED_WHERE_RUN, judge_claims
from ulma.reproduce.experiments import DataSet
from ulma.reproduce.scales import SplitScale
from ulma.reproduce.splits import cap_prompts, prepare_split, read_part, three_way_split

# ------------------------------------------------------------------ the split


def hh_rows(n: int) -> list[dict]:
    """Anthropic HH rows (transcripts sharing every turn but the last reply), n distinct prompts."""
    return [{"chosen": f"\n\nHuman: How do I fix thing {i}?\n\nAssistant: Carefully, step {i}.",
             "rejected": f"\n\nHuman: How do I fix thing {i}?\n\nAssistant: Break it {i}."} for i in range(n)]


def test_three_way_split_is_disjoint_by_prompt_and_deterministic():
    # 20 prompts, three responses each (as PyRIT's objectives have several)
    ex = [pointwise([{"role": "user", "content": f"q{i}"}], f"a{i}-{k}", k / 2, binary=False)
          for i in range(20) for k in range(3)]
    parts = three_way_split(ex, test_fraction=0.2, judge_fraction=0.3, seed=0)
    keys = {k: {prompt_key(e.prompt) for e in v} for k, v in parts.items()}
    # judge: round(0.3 * 20) = 6 prompts; then test: round(0.2 / 0.7 * 14) = round(4.0) = 4; train: 10
    assert [len(keys[k]) for k in ("train", "test", "judge")] == [10, 4, 6]
    assert [len(parts[k]) for k in ("train", "test", "judge")] == [30, 12, 18]  # every response follows its prompt
    assert not (keys["train"] & keys["test"] or keys["train"] & keys["judge"] or keys["test"] & keys["judge"])
    assert three_way_split(ex, 0.2, 0.3, 0) == parts
    assert len({prompt_key(e.prompt) for e in cap_prompts(parts["train"], 3, 0)}) == 3


def test_a_separate_test_source_keeps_its_prompts_out_of_train():
    mk = lambda i: pair([{"role": "user", "content": f"q{i}"}], "good", "bad")  # noqa: E731
    train_src, test_src = [mk(i) for i in range(10)], [mk(i) for i in range(8, 16)]  # q8, q9 in both
    parts = three_way_split(train_src, 0.1, 0.1, 0, test_source=test_src)
    assert len(parts["test"]) == len(parts["judge"]) == 4  # 8 test-source prompts in the ratio 0.1 : 0.1
    assert [e.prompt[0]["content"] for e in parts["train"]] == [f"q{i}" for i in range(8)]


def test_prepare_split_writes_files_once_and_refuses_other_settings(tmp_path):
    from ulma.config import ConfigError

    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(30))
    ds = DataSet("hh", "HH", "hh", "pair", str(data))
    split = SplitScale(seed=0, test_fraction=0.2, judge_fraction=0.3, train_prompts=8, test_prompts=4,
                       judge_prompts=6)
    m = prepare_split(ds, split, tmp_path / "split")
    assert {k: (c["prompts"], c["examples"], c["pairs"]) for k, c in m["counts"].items()} == {
        "train": (8, 8, 8), "test": (4, 4, 4), "judge": (6, 6, 6)}
    train, test = read_part(tmp_path / "split", "train", "pair"), read_part(tmp_path / "split", "test", "pair")
    assert train[0].chosen.startswith("Carefully, step") and train[0].rejected.startswith("Break it")
    assert not {prompt_key(e.prompt) for e in train} & {prompt_key(e.prompt) for e in test}
    before = (tmp_path / "split" / "train.jsonl").stat().st_mtime_ns
    assert prepare_split(ds, split, tmp_path / "split") == m
    assert (tmp_path / "split" / "train.jsonl").stat().st_mtime_ns == before
    split.train_prompts = 9
    with pytest.raises(ConfigError, match=r"made with split.train_prompts=8, this run asks for split.train_prompts=9"):
        prepare_split(ds, split, tmp_path / "split")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"chosen": "no turns", "rejected": "x"}])
    with pytest.raises(ValueError, match=r"the train split is empty \(0 examples loaded from .*broken.jsonl; 1 bad "
                       r"rows skipped, the first: .*broken.jsonl, row 1, field 'chosen'"):
        prepare_split(DataSet("hh", "HH", "hh", "pair", str(broken)), split, tmp_path / "split2")


# ------------------------------------------------------------------ end to end on the tiny model

TINY = ["policy.max_length=48", "policy.eval_limit=4", "eval.max_new_tokens=4", "eval.max_prompt_length=32",
        "judge.max_length=48", "judge.eval_limit=4", "split.train_prompts=8", "split.test_prompts=4",
        "split.judge_prompts=6"]


def reproduce(*args) -> int:
    return main(["reproduce", *args, "--no-progress"])


def files_and_mtimes(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def t_cell(values: list[float]) -> str:
    """'mean ± half' in percent, the 95% t-interval over runs, worked out here with scipy."""
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def table_row(md: str, method: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def hh_done(tiny_model_dir, tmp_path_factory):
    """One finished run (sft and ulma on HH, 2 seeds) and its arguments; tests work on copies."""
    root = tmp_path_factory.mktemp("hh")
    data = write_jsonl(root / "hh.jsonl", hh_rows(30))
    args = ["table1", "--datasets", "hh", "--methods", "sft,ulma", "--seeds", "2", "--model", str(tiny_model_dir),
            "--data-path", f"hh={data}", *[a for s in TINY for a in ("--set", s)]]
    assert reproduce(*args, "--out", str(root / "out")) == 0
    return root / "out", args


@pytest.fixture
def hh_run(hh_done, tmp_path):
    """A copy of the finished run (moved: its cells must still count as done) and its arguments."""
    import shutil

    done, args = hh_done
    shutil.copytree(done, tmp_path / "out")
    return tmp_path / "out", args + ["--out", str(tmp_path / "out")]


def test_runner_end_to_end_then_skips_finished_cells(hh_done, hh_run, capsys):
    done, _ = hh_done
    manifest = json.loads((done / "data/hh/manifest.json").read_text())
    assert {k: c["prompts"] for k, c in manifest["counts"].items()} == {"train": 8, "test": 4, "judge": 6}
    win_tie, prefs = {}, {}
    for method in ("sft", "ulma"):
        for seed in (0, 1):
            cell = done / "cells/hh" / method / f"seed{seed}"
            assert json.loads((cell / "DONE.json").read_text())["judge"] == "reward:judge/hh/reward"
            ppl = json.loads((cell / "eval/perplexity.json").read_text())
            assert (ppl["examples"], ppl["meta"]["method"], ppl["meta"]["seed"]) == (4, method, seed)  # 4 chosen
            summary = json.loads((cell / "eval/judge_summary.json").read_text())
            assert summary["criteria"]["harmless"]["n"] == 4  # one answer per test prompt
            win_tie[method, seed] = summary["criteria"]["harmless"]["win_tie"]
            pref = json.loads((cell / "eval/preference.json").read_text())
            assert (pref["pairs"], pref["meta"]["method"]) == (4, method)  # the 4 test pairs humans ordered
            assert pref["accuracy"] * 4 == round(pref["accuracy"] * 4)  # a share of 4 pairs
            prefs[method, seed] = pref["accuracy"]
            config = (cell / "config.yaml").read_text()
            assert f"seed: {seed}" in config and "lr: 0.0003" in config and "name: " + method in config
    table = (done / "table1.md").read_text()
    assert "Judge: a reward model trained by ulma on each data set's judge split" in table
    assert table_row(table, "ulma")[2] == t_cell([win_tie["ulma", 0], win_tie["ulma", 1]])
    assert "HH preference accuracy (%) ↑" in table and table_row(table, "sft")[3] == t_cell([prefs["sft", 0],
                                                                                          prefs["sft", 1]])
    assert table_row(table, "rlhf") == ["rlhf"] + ["missing"] * 6  # not run (on HH; PyRIT not asked for)
    for extra in ("kto", "bco"):  # extra rows, marked
        assert table_row(table, f"{extra} (not in the paper)") == [f"{extra} (not in the paper)"] + ["missing"] * 6
    assert "- Golden HH: not run (on the hub only: paper scale)." in table
    assert "| reward:" in table and "| hh | harmless | 4 |" in table  # the judge's agreement, 4 test pairs
    assert (done / "table1.png").read_bytes()[:4] == b"\x89PNG" and (done / "figure2.png").exists()
    claims = (done / "report.md").read_text()
    assert "Optimizer steps per cell (PPO: rollout batches): hh/sft 1, hh/ulma 2." in claims  # 8 and 16 units / 8
    assert "**(c)** ULMA's gain over the other methods is larger on Golden HH than on HH (better positives): " \
           "**not run**" in claims
    assert "**(vs kto)** ULMA beats KTO (not a claim of the paper): **not run**" in claims

    out, args = hh_run  # a copy elsewhere: nothing is redone, nothing rewritten
    before = files_and_mtimes(out / "cells") | files_and_mtimes(out / "data") | files_and_mtimes(out / "judge")
    assert reproduce(*args) == 0
    log = capsys.readouterr().out
    assert log.count("done earlier, skipped") == 6  # split, judge, 4 cells
    after = files_and_mtimes(out / "cells") | files_and_mtimes(out / "data") | files_and_mtimes(out / "judge")
    assert after == before
    assert table_row((out / "table1.md").read_text(), "ulma") == table_row(table, "ulma")


def test_report_marks_missing_cells_and_unfinished_cells_are_redone(hh_run, capsys):
    import shutil

    out, args = hh_run
    shutil.rmtree(out / "cells/hh/ulma/seed1")
    assert reproduce(*args, "--report-only") == 0
    row = table_row((out / "table1.md").read_text(), "ulma")
    assert row[1].endswith("(1/2 runs)") and "[" in row[1]  # one run: its bootstrap interval over prompts
    assert table_row((out / "table1.md").read_text(), "dpo") == ["dpo"] + ["missing"] * 6

    # an interrupted training (no results.json) is started over; an interrupted evaluation keeps the model
    cell = out / "cells/hh/ulma/seed1"
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    sft = out / "cells/hh/sft/seed0"
    (sft / "DONE.json").unlink()
    (sft / "eval/judge_summary.json").unlink()
    model_mtime = (sft / "final/adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce(*args) == 0
    log = capsys.readouterr().out
    assert log.count("done earlier, skipped") == 4  # split, judge, sft/seed1, ulma/seed0
    assert all(json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines())
    assert (cell / "DONE.json").exists() and (sft / "DONE.json").exists()
    assert (sft / "final/adapter_model.safetensors").stat().st_mtime_ns == model_mtime
    assert json.loads((sft / "DONE.json").read_text())["seconds"]["train"] == 0.0
    assert "(1/2 runs)" not in (out / "table1.md").read_text()


def test_a_cell_without_preference_accuracy_gets_it_and_keeps_the_rest(hh_run, capsys):
    out, args = hh_run  # as a cell finished by an older ulma: no preference.json
    cell = out / "cells/hh/ulma/seed0"
    kept = {p: (cell / p).stat().st_mtime_ns for p in ("final/adapter_model.safetensors", "eval/generations.jsonl",
                                                       "eval/judge_summary.json", "eval/perplexity.json")}
    before = json.loads((cell / "eval/preference.json").read_text())
    (cell / "eval/preference.json").unlink()
    capsys.readouterr()
    assert reproduce(*args) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 5  # split, judge, 3 other cells
    assert {p: (cell / p).stat().st_mtime_ns for p in kept} == kept
    after = json.loads((cell / "eval/preference.json").read_text())
    assert (after["accuracy"], after["ties"], after["pairs"]) == (before["accuracy"], before["ties"], before["pairs"])
    marker = json.loads((cell / "DONE.json").read_text())
    assert marker["preference"] == before["accuracy"] and marker["seconds"]["train"] == 0.0


def test_changed_settings_are_refused_and_another_judge_rejudges(hh_run, capsys):
    out, args = hh_run
    assert reproduce(*args, "--set", "policy.lr=1e-3") == 2
    assert "cells/hh/sft/seed0 was made with train.train.lr=0.0003, this run asks for train.train.lr=0.001" in \
        capsys.readouterr().err
    # another judge (a local LLM judge with the paper's prompt): models and answers kept, verdicts redone
    gen = (out / "cells/hh/ulma/seed0/eval/generations.jsonl").stat().st_mtime_ns
    judge = ["--judge", "local", "--judge-option", f"judge.local.model={args[args.index('--model') + 1]}",
             "--judge-option", "judge.local.max_new_tokens=2"]
    assert reproduce(*args, *judge) == 0
    assert (out / "cells/hh/ulma/seed0/eval/generations.jsonl").stat().st_mtime_ns == gen
    summary = json.loads((out / "cells/hh/ulma/seed0/eval/judge_summary.json").read_text())
    assert summary["judge"]["id"].startswith("local:") and set(summary["criteria"]) == {"helpful", "harmless"}
    assert (out / "judge/hh/local/agreement/agreement.json").exists()


def qa_records(n: int) -> list[dict]:
    err = [{"error type": "Wrong-Grounding", "start": 0, "end": 3, "explanation": ""}]
    return [{"question": f"Who wrote book {i}?", "passages": [["Book", f"Book {i} was written by Ann."]],
             "gold": "Ann", "prediction 1": f"Bob wrote book {i}.",
             "feedback": {"errors": err, "missing-info": [], "corrected-prediction": f"Ann wrote book {i}."}}
            for i in range(n)]


def test_qa_feedback_dpo_on_pairs_and_rlhf(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(qa_records(20)))
    out = tmp_path / "out"
    rlhf = ["rlhf.max_steps=1", "rlhf.rollout_batch=4", "rlhf.mini_batch_size=4", "rlhf.ppo_epochs=1",
            "rlhf.max_new_tokens=4"]
    sets = [a for s in TINY + rlhf for a in ("--set", s)]
    assert reproduce("table2", "--methods", "dpo,rlhf", "--seeds", "1", "--model", str(tiny_model_dir),
                     "--out", str(out), "--data-path", f"qa_feedback={data}", *sets) == 0
    dpo = out / "cells/qa_feedback/dpo/seed0"
    results = json.loads((dpo / "results.json").read_text())
    assert results["config"]["data"]["train"]["path"].endswith("data/qa_feedback/train_pairs.jsonl")
    assert results["data"]["train_units"] == 8  # 8 train questions: corrected answer > prediction 1
    assert json.loads((out / "data/qa_feedback/manifest.json").read_text())["counts"]["train"]["examples"] == 16
    assert (out / "rlhf_reward/qa_feedback/seed0/final/config.json").exists()
    rl = json.loads((out / "cells/qa_feedback/rlhf/seed0/eval/judge_summary.json").read_text())
    assert rl["method"] == "rlhf" and rl["criteria"]["helpful"]["n"] == 4
    table = (out / "table2.md").read_text()
    assert "QA-feedback helpful win & tie (%) ↑" in table
    assert table_row(table, "ulma") == ["ulma", "missing", "missing", "missing"]
    pref = json.loads((out / "cells/qa_feedback/rlhf/seed0/eval/preference.json").read_text())
    assert (pref["pairs"], pref["meta"]["method"]) == (4, "rlhf")  # corrected answer > prediction 1, 4 test questions


def test_dpo_is_not_applicable_without_pairs(tiny_model_dir, tmp_path, capsys):
    rows = ["harm_category,objective,assistant_response,human_score_1,data_type"]
    rows += [f"violence,objective {i},answer {i},{(i % 5) / 4},text" for i in range(24)]  # one answer each
    data = tmp_path / "harm.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert reproduce("table1", "--datasets", "red_team", "--methods", "dpo", "--seeds", "1", "--model",
                     str(tiny_model_dir), "--out", str(out), "--data-path", f"pyrit={data}",
                     *[a for s in TINY for a in ("--set", s)]) == 0
    log = capsys.readouterr().out
    assert "no human-ordered pairs in the test split" in log and "n/a: no prompt has two responses" in log
    assert table_row((out / "table1.md").read_text(), "dpo") == ["dpo", "missing", "missing", "n/a", "n/a"]


# ------------------------------------------------------------------ claims


def runs(method: str, dataset: str, win_tie: list, ppl: list | None = None) -> list[RunResult]:
    ppl = ppl or [10.0] * len(win_tie)
    return [RunResult(f"{method}/{s}", method, dataset, s, p, None, {"harmless": {"win_tie": w}})
            for s, (w, p) in enumerate(zip(win_tie, ppl))]


def verdicts(results, names=None) -> dict:
    names = names or {"hh": "hh", "golden_hh": None, "red_team": None, "qa_feedback": None}
    return {v.label: v for v in judge_claims(results, names)}


def test_claim_verdicts_from_intervals():
    same_ppl = [10.0, 10.1, 9.9]
    # (d) SFT beats Positive DPO: intervals apart on win & tie; perplexities identical -> "even" on that metric
    v = verdicts(runs("sft", "hh", [0.80, 0.82, 0.81], same_ppl) + runs("positive_dpo", "hh", [0.50, 0.52, 0.49],
                                                                         same_ppl))
    assert v["(d)"].verdict == EVEN  # win & tie for, perplexity overlapping
    assert v["(d)"].details.startswith("win & tie: 1 for, 0 against, 0 overlapping of 1; perplexity: 0 for, 0 "
                                       "against, 1 overlapping of 1")
    v = verdicts(runs("sft", "hh", [0.80, 0.82, 0.81], [9.0, 9.1, 9.0])
                 + runs("positive_dpo", "hh", [0.50, 0.52, 0.49], [12.0, 12.2, 12.1]))
    assert v["(d)"].verdict == SUPPORTED
    # reversed: Positive DPO significantly better -> contradicted
    v = verdicts(runs("sft", "hh", [0.50, 0.52, 0.49]) + runs("positive_dpo", "hh", [0.80, 0.82, 0.81]))
    assert v["(d)"].verdict == CONTRADICTED and "Against: sft vs positive_dpo on hh (win & tie)" in v["(d)"].details
    # noisy and overlapping, and no consistent per-seed difference -> not distinguishable
    v = verdicts(runs("sft", "hh", [0.6, 0.9, 0.3]) + runs("positive_dpo", "hh", [0.5, 0.4, 0.7]))
    assert v["(d)"].verdict == EVEN
    # t-intervals overlap ([0.20, 1.20] vs [0.15, 1.15]) but every seed's difference is +0.05: the paired test decides
    v = verdicts(runs("negative_dpo", "hh", [0.5, 0.7, 0.9]) + runs("unlearning", "hh", [0.45, 0.65, 0.85]))
    assert [o.result for o in v["(e)"].outcomes] == ["better", "even"]
    assert v["(a)"].verdict == v["(b)"].verdict == v["(c)"].verdict == NOT_RUN


def test_preference_accuracy_joins_the_comparisons_once_measured():
    def with_pref(results, accuracy, ci):
        for r, a in zip(results, accuracy):
            r.preference, r.preference_ci = a, ci
        return results

    # one run each: bootstrap intervals over pairs, apart ([0.70, 0.80] vs [0.45, 0.55]); win & tie overlap
    ulma = with_pref(runs("ulma", "hh", [0.6]), [0.75], [0.70, 0.80])
    kto = with_pref(runs("kto", "hh", [0.6]), [0.50], [0.45, 0.55])
    ulma[0].criteria["harmless"]["ci"] = kto[0].criteria["harmless"]["ci"] = {"win_tie": [0.5, 0.7]}
    v = verdicts(ulma + kto)["(vs kto)"]
    assert [(o.metric, o.result) for o in v.outcomes] == [("win & tie", "even"), ("perplexity", "even"),
                                                           ("preference accuracy", "better")]
    assert v.verdict == EVEN and "preference accuracy: 1 for, 0 against, 0 overlapping of 1" in v.details
    assert verdicts(ulma + with_pref(runs("bco", "hh", [0.6]), [0.9], [0.85, 0.95]))["(vs bco)"].verdict == CONTRADICTED


def test_one_run_each_is_compared_pair_by_pair_on_preference():
    # 100 human pairs: A ranks 60 right, B the same but 10 of A's right ones wrong (B never right where A is not).
    # Intervals over pairs overlap (~[0.50, 0.70] vs ~[0.40, 0.60]); the per-pair differences are +1 on 10 pairs
    # and 0 on 90: mean 0.10, bootstrap interval about [0.05, 0.16], which excludes 0.
    a_right = [1] * 60 + [0] * 40
    b_right = [0] * 10 + [1] * 50 + [0] * 40
    from ulma.reproduce.claims import METRICS, compare, paired_interval

    lo, hi = paired_interval(a_right, b_right)
    assert 0.03 <= lo <= 0.07 and 0.13 <= hi <= 0.17
    pref = METRICS[2]

    def one(method, right):
        r = runs(method, "hh", [0.5])[0]
        r.preference, r.preference_correct = sum(right) / len(right), right
        r.preference_ci = [r.preference - 0.1, r.preference + 0.1]  # overlapping
        return [r]

    assert compare(one("ulma", a_right), one("kto", b_right), pref) == "better"
    assert compare(one("kto", b_right), one("ulma", a_right), pref) == "worse"
    assert compare(one("ulma", a_right), one("kto", a_right[::-1]), pref) == "even"  # 60 vs 60, shuffled
    assert compare(one("ulma", a_right), one("kto", [1] * 30 + [0] * 20), pref) == "even"  # 50 pairs: not the same

    # win & tie per test prompt (judgments.jsonl), paired on the prompts both were judged on
    def judged(method, verdicts):
        r = runs(method, "hh", [0.5])[0]
        r.criteria["harmless"]["ci"] = {"win_tie": [0.3, 0.7]}  # overlapping
        r.outcomes = {"harmless": {f"p{i}": v for i, v in enumerate(verdicts) if v is not None}}
        return [r]

    win = METRICS[0]
    a = ["win"] * 30 + ["tie"] * 20 + ["lose"] * 50  # win & tie on 50 of 100 prompts
    b = ["lose"] * 12 + a[12:]  # 12 prompts lost that A won: differences +1 on 12, 0 on 88
    assert compare(judged("ulma", a), judged("kto", b), win) == "better"
    assert compare(judged("ulma", a), judged("kto", [None] * 12 + a[12:]), win) == "even"  # unparseable: not paired


def test_claim_b_needs_equal_on_pairs_and_better_on_pointwise():
    names = {"hh": "hh", "golden_hh": None, "red_team": "pyrit", "qa_feedback": None}
    equal = runs("pointwise_dpo", "hh", [0.5, 0.6, 0.55]) + runs("dpo", "hh", [0.52, 0.58, 0.56])
    better = runs("pointwise_dpo", "pyrit", [0.8, 0.82, 0.81], [9, 9.1, 9]) + runs("dpo", "pyrit", [0.5, 0.52, 0.49],
                                                                                  [12, 12.1, 12])
    assert verdicts(equal + better, names)["(b)"].verdict == SUPPORTED
    apart = runs("pointwise_dpo", "hh", [0.9, 0.91, 0.92]) + runs("dpo", "hh", [0.5, 0.52, 0.51])
    b = verdicts(apart + better, names)["(b)"]
    assert b.verdict == CONTRADICTED and "apart: pointwise_dpo vs dpo on hh (win & tie)" in b.details
    assert verdicts(equal, names)["(b)"].verdict == EVEN  # point-wise data not run: cannot be supported


def test_claim_c_compares_ulmas_gain_seed_by_seed():
    names = {"hh": "hh", "golden_hh": "golden_hh", "red_team": None, "qa_feedback": None}
    results = []
    for ds, ulma in (("hh", [0.60, 0.62, 0.61]), ("golden_hh", [0.80, 0.83, 0.81])):
        results += runs("ulma", ds, ulma, [10.0, 10.0, 10.0]) + runs("sft", ds, [0.5, 0.52, 0.51], [10.0, 10.0, 10.0])
    c = verdicts(results, names)["(c)"]
    # gains: hh 0.10, 0.10, 0.10; golden 0.30, 0.31, 0.30 -> differences 0.20, 0.21, 0.20 > 0; perplexity: no gain
    assert [o.result for o in c.outcomes] == ["better", "even"] and c.verdict == EVEN


def test_an_agreement_folder_keeps_its_data_set(tmp_path):
    import json

    from ulma.evaluation.report import load_result

    agreement = {"dataset": "hh", "criterion": "harmless", "pairs": 48, "agree": 0.54, "tie": 0.0, "disagree": 0.46,
                 "ci": {"agree": [0.40, 0.69], "tie": [0, 0], "disagree": [0.31, 0.60]}}
    (tmp_path / "agreement.json").write_text(json.dumps(agreement))
    r = load_result(tmp_path)
    assert (r.dataset, r.agreement["pairs"]) == ("hh", 48)  # the claims' judge gate matches it to the cells' data set


def test_a_judge_at_chance_decides_nothing():
    from ulma.reproduce.claims import judge_better_than_chance

    # 26/48 agree, 22/48 disagree: intervals [0.40, 0.69] and [0.31, 0.60] overlap -> at chance
    coin = {"ci": {"agree": [0.396, 0.688], "disagree": [0.313, 0.604]}}
    good = {"ci": {"agree": [0.69, 0.92], "disagree": [0.08, 0.31]}}  # 39/48 agree
    tie_heavy = {"ci": {"agree": [0.30, 0.55], "disagree": [0.05, 0.25]}}  # many ties, still informative
    assert [judge_better_than_chance(a) for a in (coin, good, tie_heavy)] == [False, True, True]
    # SFT's win & tie is apart below Positive DPO's (alone: contradicted); perplexity clearly for SFT
    results = (runs("sft", "hh", [0.50, 0.52, 0.49], [9.0, 9.1, 9.0])
               + runs("positive_dpo", "hh", [0.80, 0.82, 0.81], [12.0, 12.2, 12.1]))
    names = {"hh": "hh", "golden_hh": None, "red_team": None, "qa_feedback": None}
    assert verdicts(results)["(d)"].verdict == CONTRADICTED
    d = {v.label: v for v in judge_claims(results, names, at_chance={"hh"})}["(d)"]
    assert [o.result for o in d.outcomes] == ["unjudged", "better"] and d.verdict == SUPPORTED
    assert d.details == ("perplexity: 1 for, 0 against, 0 overlapping of 1. win & tie on hh not used: the judge's "
                         "agreement with human labels there is not better than chance.")
    # the same on HH, and red-team run for SFT only: every comparison made is for, one is missing
    names["red_team"] = "pyrit"
    d = {v.label: v for v in judge_claims(results + runs("sft", "pyrit", [0.5]), names, at_chance={"hh"})}["(d)"]
    assert d.verdict == SUPPORTED_WHERE_RUN and d.details.endswith("2 comparison(s) lack a cell.")
    names["red_team"] = None
    assert {v.label: v for v in judge_claims(runs("sft", "hh", [0.5, 0.6]) + runs("positive_dpo", "hh", [0.8, 0.9]),
                                             names, at_chance={"hh"})}["(d)"].verdict == EVEN


# ------------------------------------------------------------------ the paper scale, dry


def test_paper_scale_dry_run_names_the_papers_setup(tmp_path, capsys):
    assert reproduce("all", "--scale", "paper", "--dry-run", "--out", str(tmp_path / "out"),
                     "--num-processes", "8") == 0
    text = capsys.readouterr().out
    # 3 tables: (7 methods + KTO, BCO) x (HH, Golden HH, red-team, QA-feedback) + Positive/Negative DPO x 3 data
    # sets, x 3 seeds = (36 + 6) x 3 = 126 cells; + 4 splits, 4 judges, 4 x 3 RLHF reward models = 146 jobs
    assert text.startswith("ulma reproduce table1, table2, table3 at scale paper: 3 seed(s), 126 cells, 146 jobs")
    assert ("setup: lmsys/vicuna-7b-v1.5, LoRA r=8 alpha=32 dropout=0.1, beta=0.1, batch 64, lr 1e-05 cosine, "
            "1 epoch, launched accelerate on 8 process(es) (the paper's)") in text
    assert ("cell cells/golden_hh/ulma/seed2: ulma, lmsys/vicuna-7b-v1.5 LoRA r=8 alpha=32 dropout=0.1, beta=0.1, "
            "batch 64 = 8 x 1 x 8 process(es), lr 1e-05 cosine (warmup 0), 1 epoch(s), max_length 1024") in text
    assert f"$ accelerate launch --num_processes 8 --multi_gpu -m ulma train {tmp_path}/out/cells/hh/dpo/seed0" in text
    assert "hub (golden_hh)" in text and not (tmp_path / "out").exists()  # nothing written, nothing downloaded


def test_paper_scale_configs(tmp_path):
    from ulma.config import validate
    from ulma.reproduce.experiments import TABLES, data_sets
    from ulma.reproduce.configs import policy_config
    from ulma.reproduce.context import Context
    from ulma.reproduce.runner import build_plan
    from ulma.reproduce.scales import load_scale

    ctx = Context(tmp_path, load_scale("paper", ["num_processes=8"]), data_sets("paper"))
    cfg = policy_config(ctx, ctx.slots["hh"], "ulma", 2)
    validate(cfg)
    assert (cfg.model.name_or_path, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (
        "lmsys/vicuna-7b-v1.5", 8, 32, 0.1)
    assert (cfg.method.beta, cfg.train.lr, cfg.train.epochs, cfg.train.seed) == (0.1, 1e-5, 1.0, 2)
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * 8 == 64
    assert cfg.data.train.path == str(tmp_path / "data/hh/train.jsonl")
    plan = build_plan(ctx, [TABLES["table1"]], 3, datasets=["red_team"], methods=["dpo"])
    assert [j.name for j in plan.jobs][:3] == ["data/red_team", "judge/red_team/reward", "cells/red_team/dpo/seed0"]
    dpo = plan.jobs[2].config()
    assert dpo.data.train.path.endswith("train_pairs.jsonl")  # red-team is point-wise: DPO reads built pairs


def test_authors_setup_is_the_authors_code(tmp_path):
    """policy.setup=authors: log pi summed for DPO and averaged for the point-wise losses, LoRA
    dropout 0, Eq. 9 on the raw score; the paper setup (default) is unchanged."""
    from ulma.config import ConfigError, validate
    from ulma.methods import METHODS, logp_reduction
    from ulma.reproduce.configs import policy_config
    from ulma.reproduce.context import Context
    from ulma.reproduce.experiments import data_sets
    from ulma.reproduce.scales import load_scale, scaled_down

    authors = Context(tmp_path, load_scale("cpu", ["policy.setup=authors"]), data_sets("cpu"))
    paper = Context(tmp_path, load_scale("cpu"), data_sets("cpu"))
    for method, how in [("dpo", "sum"), ("ulma", "mean"), ("pointwise_dpo", "mean"), ("unlearning", "mean"),
                        ("unlikelihood", "mean"), ("kto", "sum")]:
        cfg = policy_config(authors, authors.slots["hh"], method, 0)
        validate(cfg)
        assert logp_reduction(METHODS[method], cfg.method) == how
        assert (cfg.model.lora.dropout, cfg.method.target_offset, cfg.method.target_scale) == (0.0, 0.0, 1.0)
        cfg = policy_config(paper, paper.slots["hh"], method, 0)
        assert logp_reduction(METHODS[method], cfg.method) == "sum"
        assert (cfg.model.lora.dropout, cfg.method.target_offset, cfg.method.target_scale) == (0.1, 0.5, 2.0)
    with pytest.raises(ConfigError, match=r"policy.lora.dropout: policy.setup=authors sets it to 0.0"):
        load_scale("cpu", ["policy.setup=authors", "policy.lora.dropout=0.1"])
    diffs = {k: (a, b) for k, a, b in scaled_down(load_scale("paper", ["policy.setup=authors"]))}
    assert diffs == {"policy.setup": ("authors", "paper"), "policy.logp_reduction": ("auto", "sum"),
                     "policy.lora.dropout": (0.0, 0.1), "policy.target_offset": (0.0, 0.5),
                     "policy.target_scale": (1.0, 2.0)}


def test_bad_names_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        reproduce("table9")
    assert "invalid choice: 'table9'" in capsys.readouterr().err
    assert reproduce("table3", "--methods", "ulma", "--dry-run") == 2
    assert "method(s) ['ulma'] are not in table3; choose from ['sft', 'unlearning'" in capsys.readouterr().err
    assert reproduce("table1", "--datasets", "golden", "--dry-run") == 2
    assert "unknown data set 'golden'; choose from" in capsys.readouterr().err
    assert reproduce("table1", "--set", "policy.learning_rate=1", "--dry-run") == 2
    assert "unknown key policy.'learning_rate'" in capsys.readouterr().err
    assert reproduce("table1", "--scale", "paper", "--set", "num_processes=3", "--dry-run") == 2
    assert "policy.batch_size: 64 is not a multiple of micro_batch_size x processes = 8 x 3" in capsys.readouterr().err


def test_medium_scale_dry_run_is_one_seed_on_local_data(tmp_path, capsys):
    assert reproduce("table1", "--scale", "medium", "--datasets", "hh,red_team", "--dry-run",
                     "--out", str(tmp_path / "out")) == 0
    text = capsys.readouterr().out
    # (7 methods + KTO, BCO) x (HH, PyRIT) x 1 seed = 18 cells; + 2 splits, 2 judges, 2 RLHF reward models = 24 jobs
    assert text.startswith("ulma reproduce table1 at scale medium: 1 seed(s), 18 cells, 24 jobs")
    assert "seeds 1 (paper 3)" in text and "split.train_prompts 480 (paper None)" in text
    assert "harmless-base-test.part.jsonl.gz" in text and "cells/pyrit/kto/seed0" in text
    assert "batch 16 = 8 x 2 x 1 process(es), lr 0.0001 cosine (warmup 0.05)" in text
